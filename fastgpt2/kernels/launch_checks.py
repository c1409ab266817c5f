"""Checks every launcher makes before it launches: the I/O dtype, where its tensors are and whether
Triton can run there."""
from __future__ import annotations

import torch
import triton

from .contract import DTYPES


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter: under TRITON_INTERPRET=1, triton.jit returns an
    InterpretedFunction instead of a JITFunction (fixed when the kernel module was imported)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """`t` (argument `name` of `op`) has one of the kernels' I/O dtypes (contract.DTYPES)."""
    if t.dtype not in DTYPES:
        raise ValueError(f"{op}: {name} dtype {t.dtype} is not supported; use one of {', '.join(map(str, DTYPES))}")


def check_device(op: str, tensors: dict[str, torch.Tensor | None], kernel) -> torch.device:
    """The one device of `tensors` ({name: tensor}; None entries, optional tensors not given, are
    skipped), where `kernel` can run: CUDA, or the CPU in the interpreter. Anything else is a
    ValueError naming `op`."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{op}: tensors on different devices: {devices}")
    if first.type != "cuda" and not (first.type == "cpu" and interpreted(kernel)):
        raise ValueError(
            f"{op}: tensors are on {first}; the Triton kernel runs on CUDA (or on the CPU only under TRITON_INTERPRET=1)"
        )
    return first

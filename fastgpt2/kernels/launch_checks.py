"""Checks every launcher makes before it launches: where its tensors are and whether Triton can run there."""
from __future__ import annotations

import torch
import triton


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter: under TRITON_INTERPRET=1, triton.jit returns an
    InterpretedFunction instead of a JITFunction (fixed when the kernel module was imported)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(op: str, tensors: dict[str, torch.Tensor], kernel) -> torch.device:
    """The one device of `tensors` ({name: tensor}), where `kernel` can run: CUDA, or the CPU in the
    interpreter. Anything else is a ValueError naming `op`."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        raise ValueError(f"{op}: tensors on different devices: {devices}")
    if first.type != "cuda" and not (first.type == "cpu" and interpreted(kernel)):
        raise ValueError(
            f"{op}: tensors are on {first}; the Triton kernel runs on CUDA (or on the CPU only under TRITON_INTERPRET=1)"
        )
    return first

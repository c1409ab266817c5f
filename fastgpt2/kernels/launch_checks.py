"""Checks every launcher makes before it launches: the I/O dtype, where its tensors are, whether
Triton can run there, and whether programmatic dependent launch (``pdl``) can."""
from __future__ import annotations

import torch
import triton

from .contract import DTYPES, PDL_MIN_CAPABILITY


def interpreted(kernel) -> bool:
    """Whether `kernel` runs in Triton's interpreter: under TRITON_INTERPRET=1, triton.jit returns an
    InterpretedFunction instead of a JITFunction (fixed when the kernel module was imported)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_dtype(op: str, name: str, t: torch.Tensor) -> None:
    """`t` (argument `name` of `op`) has one of the kernels' I/O dtypes (contract.DTYPES)."""
    if t.dtype not in DTYPES:
        raise ValueError(f"{op}: {name} dtype {t.dtype} is not supported; use one of {', '.join(map(str, DTYPES))}")


def check_operand(op: str, name: str, t, dtype: torch.dtype, ref: str = "x", shape=None) -> None:
    """`t` (argument `name` of `op`): a tensor of `shape` (when given), of `dtype` (argument `ref`'s: one
    dtype for all of a launch's tensors), with a contiguous last dim. Anything else is a ValueError
    naming `op`, the argument and what was expected."""
    if not isinstance(t, torch.Tensor) or (shape is not None and tuple(t.shape) != tuple(shape)):
        raise ValueError(f"{op}: {name} has shape {tuple(getattr(t, 'shape', ()))}, "
                         f"expected {tuple(shape) if shape is not None else 'a tensor'}")
    if t.dtype != dtype:
        raise ValueError(f"{op}: {name} is {t.dtype}, {ref} is {dtype}; mixed dtypes are not supported")
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{op}: {name} must have a contiguous last dim (strides {tuple(t.stride())})")


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


def check_pdl(pdl, device: torch.device, interpreted: bool = False, op: str | None = None,
              error: type[ValueError] = ValueError) -> bool:
    """The one rule of programmatic dependent launch (``pdl``): pdl is True or False, and True needs
    compiled (not interpreted) kernels on a CUDA device of compute capability PDL_MIN_CAPABILITY (9.0)
    or newer. Returns pdl once checked; else raises `error` (a ValueError, or the caller's subclass of
    it), its message led by `op` when given and ending in the fix."""
    lead, need = f"{op}: " if op else "", ".".join(map(str, PDL_MIN_CAPABILITY))
    if not isinstance(pdl, bool):
        raise error(f"{lead}pdl must be True or False, got {pdl!r}")
    if not pdl:
        return False
    if device.type != "cuda" or interpreted:
        where = f"{device} in Triton's interpreter" if interpreted else str(device)
        raise error(f"{lead}pdl=True (programmatic dependent launch) needs a CUDA GPU of compute capability "
                    f"{need} or newer with compiled kernels; this launch is on {where}: pass pdl=False")
    capability = torch.cuda.get_device_capability(device)
    if capability < PDL_MIN_CAPABILITY:
        raise error(f"{lead}pdl=True (programmatic dependent launch) needs compute capability {need} or newer "
                    f"(Hopper); {torch.cuda.get_device_name(device)} is sm_{capability[0]}{capability[1]}: "
                    f"pass pdl=False")
    return True


def pdl_launch_options(op: str, pdl: bool, device: torch.device, kernel) -> dict:
    """The launch options of programmatic dependent launch: {} without it; with it (pdl=True),
    {"launch_pdl": True} once ``check_pdl`` passed for `kernel` on `device`, else a ValueError naming
    `op` and the fix. A kernel launched this way may start before the previous kernel on the stream
    has finished: it must wait (USE_PDL's gdc_wait) before it touches memory."""
    return {"launch_pdl": True} if check_pdl(pdl, device, interpreted(kernel), op) else {}

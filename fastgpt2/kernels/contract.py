"""What fastgpt2's kernels take and how they are built, said once: the I/O dtypes (with their
Triton and user-facing names), the head dims the attention kernels are built for, the activations
of the GEMM epilogue (with their torch references), and ``CompileSpec``, one entry per config a
launcher can choose.

Every kernel module exposes ``compile_specs(dtype) -> list[CompileSpec]`` for dtype "fp16" or
"bf16" (and "fp32"): the exact (kernel, signature, constexprs, num_warps, num_stages) combinations
its launchers can pick. ``tools/compile_report.py`` compiles each one for sm_80 and sm_90 without a
GPU and reads the cubin's resource usage.

This module imports no triton: the config, the torch backend and the tools read these facts
without deciding Triton's mode (TRITON_INTERPRET is fixed when triton is first imported).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

# the I/O dtypes every kernel takes, with their Triton names
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# the names a user may give a dtype by (CLI, from_pretrained(dtype="bf16"))
DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

# head sizes the attention kernels are built for (gpt2 .. gpt2-xl: 64)
HEAD_DIMS = (32, 64, 128)

# the GEMM epilogue's activations (the kernel's ACTIVATION constexpr) and their torch references
ACTIVATIONS = {
    "none": lambda y: y,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"),
    "gelu_erf": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}


@dataclass(frozen=True)
class CompileSpec:
    name: str  # e.g. "linear[gelu_tanh] BM=16 BN=128 BK=64"
    fn: object  # the @triton.jit function
    signature: dict  # arg name -> triton type: "*fp16", "*bf16", "*fp32", "*i32", "i32", "i64", "fp32", "constexpr"
    constexprs: dict = field(default_factory=dict)  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 2
    uses_dot: bool = False  # True: the cubin must contain tensor-core instructions


def check_spec_dtype(dtype: str) -> None:
    """compile_specs' dtype: "fp16", "bf16" or "fp32"."""
    if dtype not in DTYPES.values():
        raise ValueError(f"compile_specs dtype {dtype!r} is not supported; use one of 'fp16', 'bf16', 'fp32'")

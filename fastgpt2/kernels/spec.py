"""What the compile check needs to know about a kernel: one entry per config a launcher can choose.

Every kernel module exposes ``compile_specs(dtype) -> list[CompileSpec]`` for dtype "fp16" or
"bf16": the exact (kernel, signature, constexprs, num_warps, num_stages) combinations its
launchers can pick. ``tools/compile_report.py`` compiles each one for sm_80 and sm_90 without a
GPU and reads the cubin's resource usage. This module imports nothing from triton.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CompileSpec:
    name: str  # e.g. "mlp.linear[gelu_tanh] BM=16 BN=128 BK=64"
    fn: object  # the @triton.jit function
    signature: dict  # arg name -> triton type: "*fp16", "*bf16", "*fp32", "*i32", "i32", "i64", "fp32", "constexpr"
    constexprs: dict = field(default_factory=dict)  # constexpr name -> value
    num_warps: int = 4
    num_stages: int = 2
    uses_dot: bool = False  # True: the cubin must contain tensor-core instructions


def check_spec_dtype(dtype: str) -> None:
    """compile_specs' dtype: "fp16", "bf16" or "fp32"."""
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"compile_specs dtype {dtype!r} is not supported; use one of 'fp16', 'bf16', 'fp32'")

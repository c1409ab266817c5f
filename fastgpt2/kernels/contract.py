"""What fastgpt2's kernels take and how they are built, said once: the I/O dtypes (with their
Triton and user-facing names), the head dims the attention kernels are built for, the decode
kernel's limit of new tokens per step, the packed QKV layout (``split_heads``) and the causal rule
(``causal_visible``) every attention follows, the activations of the GEMM epilogue (with their
torch references), and ``CompileSpec``, one entry per config a launcher can choose.

Every kernel module exposes ``compile_specs(dtype) -> list[CompileSpec]`` for dtype "fp16" or
"bf16" (and "fp32"): the exact (kernel, signature, constexprs, num_warps, num_stages) combinations
its launchers can pick, each signature read off the kernel's own parameters by
``kernel_signature``. ``tools/compile_report.py`` compiles each one for sm_80 and sm_90 (PDL
variants, ``launch_pdl=True``, for sm_90 only) without a GPU and reads the cubin's resource usage.

This module imports no triton: the config, the torch backend and the tools read these facts
without deciding Triton's mode (TRITON_INTERPRET is fixed when triton is first imported).
"""
from __future__ import annotations

import inspect
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
# programmatic dependent launch (griddepcontrol, launch_pdl): compute capability 9.0 (Hopper) and newer
PDL_MIN_CAPABILITY = (9, 0)
# new tokens per sequence the decode attention kernel takes in one step (S <= 8: speculative decoding)
MAX_DECODE_TOKENS = 8


def split_heads(qkv: torch.Tensor, n_head: int):
    """The fused QKV GEMM's output [B, S, 3*H*D] (columns q | k | v, head h at h*D .. h*D+D-1 in
    each) -> q, k, v, each a [B, H, S, D] view."""
    b, s, three_e = qkv.shape
    d = three_e // (3 * n_head)
    return qkv.view(b, s, 3, n_head, d).permute(2, 0, 3, 1, 4).unbind(0)


def causal_visible(n_keys: int, q_pos: torch.Tensor) -> torch.Tensor:
    """GPT-2's causal rule, what every attention computes: the query at position q_pos[..., s] (an
    integer tensor [..., S]) sees keys 0 .. q_pos[..., s]. -> bool [..., S, n_keys], True = visible."""
    return torch.arange(n_keys, device=q_pos.device) <= q_pos[..., None]

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
    launch_pdl: bool = False  # launched with programmatic dependent launch (constexpr USE_PDL=True)

    @property
    def min_cc(self) -> int:
        """The oldest target the spec is compiled for: 90 with PDL (PDL_MIN_CAPABILITY), else 80."""
        return PDL_MIN_CAPABILITY[0] * 10 + PDL_MIN_CAPABILITY[1] if self.launch_pdl else 80


def check_spec_dtype(dtype: str) -> None:
    """compile_specs' dtype: "fp16", "bf16" or "fp32"."""
    if dtype not in DTYPES.values():
        raise ValueError(f"compile_specs dtype {dtype!r} is not supported; use one of 'fp16', 'bf16', 'fp32'")


# a kernel parameter's annotation -> its Triton signature type. Runtime scalars are annotated with
# the type as a string ("tl.int32"): Triton's launcher then leaves their specialisation as it is
# (under ``from __future__ import annotations`` it sees "'tl.int32'", no type it knows).
_PARAM_TYPES = {"tl.constexpr": "constexpr", "tl.int32": "i32", "tl.int64": "i64", "tl.float32": "fp32"}


def _annotation_text(annotation) -> str:
    """A parameter's annotation as source text: "tl.int32" for "tl.int32" and for "'tl.int32'" (a string
    annotation under ``from __future__ import annotations``), "tl.constexpr" for the class itself."""
    if isinstance(annotation, str):
        return annotation.strip().strip("'\"").strip()
    if isinstance(annotation, type) and annotation.__name__ == "constexpr" and annotation.__module__.startswith("triton."):
        return "tl.constexpr"
    return repr(annotation)  # e.g. tl.int32 itself: not taken, the kernels write the type as a string


def kernel_signature(fn, ptr: str, pointers: dict[str, str] | None = None) -> dict[str, str]:
    """The Triton signature of @triton.jit `fn`, in parameter order, read off its own parameters:
    annotated tl.constexpr -> "constexpr"; annotated "tl.int32" / "tl.int64" / "tl.float32" -> "i32" /
    "i64" / "fp32"; unannotated ``*_ptr`` -> pointers[name] if given (e.g. "*i32"), else `ptr` (e.g.
    "*fp16"). Any other parameter is a ValueError: a new one cannot get a type by default."""
    py_fn = getattr(fn, "fn", fn)  # a JITFunction or an InterpretedFunction wraps the Python function
    name = getattr(py_fn, "__name__", repr(py_fn))
    pointers = dict(pointers or {})
    bad = {arg: ty for arg, ty in {"ptr": ptr, **pointers}.items() if not (isinstance(ty, str) and ty.startswith("*"))}
    if bad:
        raise ValueError(f"kernel_signature({name}): pointer types must start with '*', got {bad}")
    signature = {}
    for arg, param in inspect.signature(py_fn).parameters.items():
        if param.annotation is param.empty:
            if not arg.endswith("_ptr"):
                raise ValueError(f"kernel_signature({name}): parameter {arg!r} has no annotation and is not a *_ptr; "
                                 f'annotate it tl.constexpr, "tl.int32", "tl.int64" or "tl.float32"')
            signature[arg] = pointers.pop(arg, ptr)
            continue
        text = _annotation_text(param.annotation)
        ty = _PARAM_TYPES.get(text)
        if ty is None:
            raise ValueError(f"kernel_signature({name}): parameter {arg!r} is annotated {text}; "
                             f'expected tl.constexpr, "tl.int32", "tl.int64" or "tl.float32"')
        signature[arg] = ty
    if pointers:
        raise ValueError(f"kernel_signature({name}): pointers {sorted(pointers)} are not unannotated *_ptr parameters")
    return signature

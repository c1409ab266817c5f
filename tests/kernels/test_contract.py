"""kernel_signature: a kernel's Triton signature read off its own parameters (contract.py), on tiny
kernels defined here. This module uses ``from __future__ import annotations`` like the kernel
modules, so the kernels' annotations arrive as strings ("tl.constexpr", "'tl.int32'")."""
from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from fastgpt2.kernels.contract import kernel_signature

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scale_rows(
    x_ptr,  # [M, N]
    idx_ptr,  # [M] int32 rows of x to read
    out_ptr,  # [M, N]
    N: "tl.int32",
    stride_x: "tl.int64",
    alpha: "tl.float32",
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    src = tl.load(idx_ptr + row).to(tl.int64)
    x = tl.load(x_ptr + src * stride_x + cols, mask=cols < N, other=0.0)
    tl.store(out_ptr + row * N + cols, x * alpha, mask=cols < N)


@triton.jit
def _unannotated(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32), mask=offs < n)


@triton.jit
def _fp16_scalar(x_ptr, v: "tl.float16", BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), v)


SCALE_ROWS = {"x_ptr": "*fp16", "idx_ptr": "*i32", "out_ptr": "*fp16", "N": "i32", "stride_x": "i64",
              "alpha": "fp32", "BLOCK_N": "constexpr"}


def test_types_in_parameter_order():
    sig = kernel_signature(_scale_rows, "*fp16", {"idx_ptr": "*i32"})
    assert list(sig.items()) == list(SCALE_ROWS.items())
    # the JIT object (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1) and the Python
    # function behind it give the same answer
    assert kernel_signature(_scale_rows.fn, "*fp16", {"idx_ptr": "*i32"}) == sig
    assert list(sig) == list(_scale_rows.arg_names)
    assert kernel_signature(_scale_rows, "*bf16")["x_ptr"] == "*bf16"
    assert kernel_signature(_scale_rows, "*bf16")["idx_ptr"] == "*bf16"  # not in pointers: the default


def test_annotation_objects():
    """Without ``from __future__ import annotations`` an annotation is the object itself: tl.constexpr
    is taken; a dtype object is not (the kernels write runtime types as strings, see contract.py)."""
    def kernel(x_ptr, n, BLOCK):
        pass

    kernel.__annotations__ = {"n": "tl.int64", "BLOCK": tl.constexpr}
    assert kernel_signature(kernel, "*fp32") == {"x_ptr": "*fp32", "n": "i64", "BLOCK": "constexpr"}
    kernel.__annotations__ = {"n": tl.int64, "BLOCK": tl.constexpr}
    with pytest.raises(ValueError, match=r"parameter 'n' is annotated triton.language.int64; expected tl.constexpr"):
        kernel_signature(kernel, "*fp32")


def test_the_signature_launches():
    """The tiny kernel runs with what its signature says (int32 idx, int64 stride, fp32 scalar)."""
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    device = "cpu" if INTERPRET else "cuda"
    x = torch.arange(12, dtype=torch.float16, device=device).view(3, 4)
    idx = torch.tensor([2, 0], dtype=torch.int32, device=device)
    out = torch.full((2, 4), float("nan"), dtype=torch.float16, device=device)
    _scale_rows[(2,)](x, idx, out, 4, x.stride(0), 0.5, BLOCK_N=8)
    assert torch.equal(out, x[idx.long()] * 0.5)


def test_unclassifiable_parameters_raise():
    with pytest.raises(ValueError, match=r"kernel_signature\(_unannotated\): parameter 'n' has no annotation and "
                                         r"is not a \*_ptr"):
        kernel_signature(_unannotated, "*fp16")
    with pytest.raises(ValueError, match=r"kernel_signature\(_fp16_scalar\): parameter 'v' is annotated "
                                         r"tl.float16; expected tl.constexpr"):
        kernel_signature(_fp16_scalar, "*fp16")


def test_bad_pointer_arguments_raise():
    with pytest.raises(ValueError, match=r"pointers \['ids_ptr'\] are not unannotated \*_ptr parameters"):
        kernel_signature(_scale_rows, "*fp16", {"ids_ptr": "*i32"})  # a typo must not pass silently
    with pytest.raises(ValueError, match=r"pointers \['N'\] are not unannotated \*_ptr parameters"):
        kernel_signature(_scale_rows, "*fp16", {"N": "*i32"})
    with pytest.raises(ValueError, match=r"pointer types must start with '\*', got \{'ptr': 'fp16'\}"):
        kernel_signature(_scale_rows, "fp16")

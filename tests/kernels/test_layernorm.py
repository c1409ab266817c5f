"""add_layer_norm under Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py without CUDA).

Reference: add_layer_norm_ref in float64 on the same (rounded) inputs. Outputs are poisoned with NaN
before the launch. Tolerances:
- fp32: max|y - ref64| / max|ref64| <= 1e-5 (normwise relative error);
- fp16 / bf16: max|y - ref64| <= 2 * max|torch_at_dtype - ref64| + atol, where torch_at_dtype is the
  same computation in PyTorch at that dtype (x + residual rounded, then F.layer_norm), atol = one
  unit in the last place at 1.0 (fp16 2**-10, bf16 2**-7); for bf16 under the interpreter, the
  larger of that and the same computation with truncating conversions (see below);
- s = x + residual must equal PyTorch's ``x + residual`` at the dtype bit for bit. One exception,
  the interpreter's: triton 3.9's interpreter converts fp32 -> bf16 by truncation (round toward
  zero; ``cast_impl`` calls ``_convert_float`` with no rounding mode) where the GPU rounds to
  nearest even, so under TRITON_INTERPRET=1 a bf16 s may also be the truncated fp32 sum.
"""
import os

import pytest
import torch
from kernel_checks import case_seed, check_tolerance, f64, poisoned

from fastgpt2.kernels import layernorm as LN
from fastgpt2.kernels.layernorm import MAX_N, add_layer_norm, add_layer_norm_ref

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _bf16_truncated(t):
    """fp32 -> bf16 by truncation (round toward zero), the interpreter's conversion."""
    return (t.float().contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


def _check_sum(s, x, r):
    expected = x + r  # PyTorch at the dtype: the fp32 sum rounded to nearest even
    if torch.equal(s, expected):
        return
    assert INTERPRETED and s.dtype == torch.bfloat16, "s must be x + residual rounded once to the dtype"
    ok = (s == expected) | (s == _bf16_truncated(x.float() + r.float()))
    assert ok.all(), "bf16 s is neither the rounded nor the (interpreter's) truncated sum"



def _inputs(m, n, dtype, seed, *, residual=True, scale=2.0, shift=3.0):
    g = torch.Generator().manual_seed(seed)
    # a mean far from 0 next to a modest spread: a one-pass variance would lose digits here
    x = (shift + scale * torch.randn(m, n, generator=g)).to(dtype)
    r = torch.randn(m, n, generator=g).to(dtype) if residual else None
    w = (1.0 + 0.5 * torch.randn(n, generator=g)).to(dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(dtype)
    return x, r, w, b


def _check_y(y, x, r, w, b, eps, dname):
    ref64, _ = add_layer_norm_ref(f64(x), f64(r), f64(w), f64(b), eps)

    def lowp_refs():
        refs = [add_layer_norm_ref(x, r, w, b, eps)[0]]
        if INTERPRETED and dname == "bf16":
            # the same computation with the interpreter's truncating fp32 -> bf16 conversions
            s_t = x if r is None else _bf16_truncated(x.float() + r.float())
            refs.append(_bf16_truncated(add_layer_norm_ref(s_t.float(), None, w.float(), b.float(), eps)[0]))
        return refs

    check_tolerance(y, ref64, lowp_refs, dname)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("n", [37, 768, 1600])
@pytest.mark.parametrize("m", [1, 7, 33])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_layer_norm(m, n, dname, with_residual):
    dtype, eps = DTYPES[dname], 1e-5
    x, r, w, b = _inputs(m, n, dtype, case_seed("ln", m, n, dname, with_residual), residual=with_residual)
    out = poisoned(m, n, dtype)
    res_out = poisoned(m, n, dtype) if with_residual else None
    y, s = add_layer_norm(x, r, w, b, eps, out=out, residual_out=res_out)
    assert y is out
    if with_residual:
        assert s is res_out
        _check_sum(s, x, r)
    else:
        assert s is x, "without a residual, s is x itself"
    _check_y(y, x, r, w, b, eps, dname)


@pytest.mark.parametrize("dname", list(DTYPES))
def test_allocates_outputs(dname):
    dtype = DTYPES[dname]
    x, r, w, b = _inputs(5, 300, dtype, case_seed("alloc", dname))
    y, s = add_layer_norm(x, r, w, b, 1e-5)
    assert y.shape == s.shape == x.shape and y.dtype == s.dtype == dtype
    _check_sum(s, x, r)
    _check_y(y, x, r, w, b, 1e-5, dname)


def test_eps_honoured():
    # variance ~1e-4: eps=1e-3 dominates, so a kernel that ignored eps would be far off
    x, r, w, b = _inputs(7, 768, torch.float32, case_seed("eps"), scale=0.01, shift=0.5, residual=False)
    y, _ = add_layer_norm(x, r, w, b, 1e-3, out=poisoned(7, 768, torch.float32))
    _check_y(y, x, r, w, b, 1e-3, "fp32")
    y_default, _ = add_layer_norm_ref(x, r, w, b, 1e-5)
    assert (y - y_default).abs().max() > 0.1


def test_tiny_rows_and_row_strides():
    # N=1 (variance 0: y == bias) and inputs that are row slices of wider tensors (stride(0) != N)
    x, r, w, b = _inputs(7, 1, torch.float32, case_seed("n1"))
    y, _ = add_layer_norm(x, r, w, b, 1e-5, out=poisoned(7, 1, torch.float32))
    torch.testing.assert_close(y, b.expand(7, 1), rtol=0, atol=1e-6)

    xw, rw, w, b = _inputs(33, 1000, torch.float16, case_seed("strided"))
    x, r = xw[:, 100:868], rw[:, :768]
    out = poisoned(33, 900, torch.float16)[:, :768]
    y, s = add_layer_norm(x, r, w[:768], b[:768], 1e-5, out=out)
    assert torch.equal(s, x + r)
    _check_y(y, x, r, w[:768], b[:768], 1e-5, "fp16")


def test_empty_rows():
    x, r, w, b = _inputs(0, 768, torch.float32, 0)
    y, s = add_layer_norm(x, r, w, b, 1e-5)
    assert y.shape == s.shape == (0, 768)


def test_errors():
    x, r, w, b = _inputs(4, 64, torch.float32, 0)
    with pytest.raises(ValueError, match="x must be a 2-D"):
        add_layer_norm(x[0], None, w, b, 1e-5)
    with pytest.raises(ValueError, match=r"residual has shape \(4, 32\)"):
        add_layer_norm(x, r[:, :32], w, b, 1e-5)
    with pytest.raises(ValueError, match="weight has shape"):
        add_layer_norm(x, r, w[:10], b, 1e-5)
    with pytest.raises(ValueError, match="bias has shape"):
        add_layer_norm(x, r, w, b[:10], 1e-5)
    with pytest.raises(ValueError, match="residual is torch.float16.*mixed dtypes"):
        add_layer_norm(x, r.half(), w, b, 1e-5)
    with pytest.raises(ValueError, match="weight is torch.float16.*mixed dtypes"):
        add_layer_norm(x, r, w.half(), b, 1e-5)
    with pytest.raises(ValueError, match="out is torch.float16"):
        add_layer_norm(x, r, w, b, 1e-5, out=torch.empty(4, 64, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"out has shape \(4, 65\)"):
        add_layer_norm(x, r, w, b, 1e-5, out=torch.empty(4, 65))
    with pytest.raises(ValueError, match="add_layer_norm: x dtype torch.float64 is not supported; use one of "
                                         "torch.float32, torch.float16, torch.bfloat16"):
        add_layer_norm(x.double(), None, w.double(), b.double(), 1e-5)
    with pytest.raises(ValueError, match="x must have a contiguous last dim"):
        add_layer_norm(torch.randn(64, 4).t(), None, w, b, 1e-5)
    with pytest.raises(ValueError, match="residual_out was given but residual is None"):
        add_layer_norm(x, None, w, b, 1e-5, residual_out=torch.empty_like(x))
    big = MAX_N + 1
    with pytest.raises(ValueError, match=f"N={big} is not supported"):
        add_layer_norm(torch.randn(2, big), None, torch.randn(big), torch.randn(big), 1e-5)
    with pytest.raises(ValueError, match="different devices"):
        add_layer_norm(x, None, w.to("meta"), b, 1e-5)
    with pytest.raises(ValueError, match="runs on CUDA"):
        add_layer_norm(x.to("meta"), None, w.to("meta"), b.to("meta"), 1e-5)


# -- embed_layer_norm: the token + position gather fused into the first layernorm ---------------
from fastgpt2.kernels.layernorm import embed_layer_norm, embed_layer_norm_ref  # noqa: E402


def _embed_inputs(b, seq, n, dtype, seed, vocab=50, positions=40):
    g = torch.Generator().manual_seed(seed)
    wte = (0.5 * torch.randn(vocab, n, generator=g)).to(dtype)
    wpe = (0.5 * torch.randn(positions, n, generator=g)).to(dtype)
    w = (1.0 + 0.5 * torch.randn(n, generator=g)).to(dtype)
    bias = (0.5 * torch.randn(n, generator=g)).to(dtype)
    ids = torch.randint(0, vocab, (b, seq), generator=g)
    start = torch.randint(0, positions - seq + 1, (b,), generator=g).to(torch.int32)
    return ids, start, wte, wpe, w, bias


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("b, seq, n", [(1, 1, 768), (3, 1, 37), (2, 7, 1600), (1, 33, 64)])
@pytest.mark.parametrize("with_start", [True, False], ids=["decode", "prefill"])
def test_embed_layer_norm(b, seq, n, dname, with_start):
    dtype = DTYPES[dname]
    ids, start, wte, wpe, w, bias = _embed_inputs(b, seq, n, dtype, case_seed("embed", b, seq, n, dname, with_start))
    start = start if with_start else None
    out, h = poisoned(b * seq, n, dtype), poisoned(b * seq, n, dtype)
    y, s = embed_layer_norm(ids, start, wte, wpe, w, bias, 1e-5, out=out, residual_out=h)
    assert y is out and s is h
    positions = torch.arange(seq).expand(b, seq) + (start[:, None].long() if with_start else 0)
    x, r = wte[ids].reshape(b * seq, n), wpe[positions].reshape(b * seq, n)
    _check_sum(h, x, r)  # h = wte[ids] + wpe[pos], rounded once like PyTorch's add
    _check_y(y, x, r, w, bias, 1e-5, dname)
    ref_y, ref_h = embed_layer_norm_ref(ids, start, wte, wpe, w, bias, 1e-5)
    assert torch.equal(ref_h, x + r) and ref_y.shape == y.shape


def test_embed_layer_norm_errors():
    ids, start, wte, wpe, w, bias = _embed_inputs(2, 3, 16, torch.float32, 1)
    with pytest.raises(ValueError, match=r"ids must be a \[B, S\] int64 tensor"):
        embed_layer_norm(ids.int(), start, wte, wpe, w, bias, 1e-5)
    with pytest.raises(ValueError, match=r"start must be \[B\]=2 int32"):
        embed_layer_norm(ids, start.long(), wte, wpe, w, bias, 1e-5)
    with pytest.raises(ValueError, match="wte has width 16, wpe 8"):
        embed_layer_norm(ids, start, wte, wpe[:, :8].contiguous(), w, bias, 1e-5)
    with pytest.raises(ValueError, match="wpe must be a 2-D torch.float32 table"):
        embed_layer_norm(ids, start, wte, wpe.half(), w, bias, 1e-5)
    with pytest.raises(ValueError, match="embed_layer_norm: wte dtype torch.float64 is not supported"):
        embed_layer_norm(ids, start, wte.double(), wpe.double(), w.double(), bias.double(), 1e-5)
    with pytest.raises(ValueError, match="embed_layer_norm: tensors on different devices"):
        embed_layer_norm(ids, start.to("meta"), wte, wpe, w, bias, 1e-5)
    with pytest.raises(ValueError, match=r"^embed_layer_norm: out has shape \(6, 15\), expected \(6, 16\)"):
        embed_layer_norm(ids, start, wte, wpe, w, bias, 1e-5, out=torch.empty(6, 15))  # names the launcher called
    with pytest.raises(ValueError, match=r"^embed_layer_norm: residual_out is torch.float16, wte is torch.float32"):
        embed_layer_norm(ids, start, wte, wpe, w, bias, 1e-5, residual_out=torch.empty(6, 16, dtype=torch.float16))


# -- compile specs (no kernel launches) ---------------------------------------------------------
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compile_specs_cover_every_config(dtype):
    specs = LN.compile_specs(dtype)
    # every BLOCK_N of the table x (add_layer_norm without / with residual, embed prefill / decode)
    assert len(specs) == 4 * len(LN._WARPS_BY_BLOCK_N)
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        params = list(s.fn.arg_names)
        assert list(s.signature) == params, s.name  # every parameter, in the kernel's order
        assert sorted(s.constexprs) == sorted(p for p in params if s.signature[p] == "constexpr"), s.name
        c = s.constexprs
        assert ("embed_layer_norm" in s.name) == c["GATHER"] and ("decode" in s.name) == c["HAS_START"], s.name
        assert c["HAS_RESIDUAL"] == ("no_residual" not in s.name), s.name
        assert s.num_warps == LN._WARPS_BY_BLOCK_N[c["BLOCK_N"]] and not s.uses_dot, s.name
        # ids / start: what the launcher passes (GATHER: int64 ids, int32 start or ids again; else x)
        ids = "*i64" if c["GATHER"] else "*" + dtype
        start = "*i32" if c["HAS_START"] else ids
        for p, ty in s.signature.items():
            if p.endswith("_ptr"):
                assert ty == {"ids_ptr": ids, "start_ptr": start}.get(p, "*" + dtype), (s.name, p, ty)
            elif ty != "constexpr":
                assert ty == ("fp32" if p == "eps" else "i32"), (s.name, p, ty)
    with pytest.raises(ValueError, match=r"compile_specs dtype 'fp8' is not supported"):
        LN.compile_specs("fp8")

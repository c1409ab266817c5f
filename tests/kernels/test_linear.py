"""linear (GEMM + bias + activation / residual epilogue) under Triton's interpreter.

Reference: linear_ref in float64 on the same (rounded) inputs; outputs poisoned with NaN before the
launch. Tolerances:
- fp32: max|y - ref64| / max|ref64| <= 1e-5 (normwise relative error);
- fp16: max|y - ref64| <= 2 * max|torch_fp16 - ref64| + 2**-10, torch_fp16 being linear_ref run in
  fp16 by PyTorch (x @ w + b, activation, residual, each rounded to fp16).
bf16 GEMMs are not run here: the interpreter's tl.dot is wrong for bf16 operands
(triton-lang/triton#11584); the compile check (tests/compile) covers them.

M = 1, 7, 33 take the decode config (M <= 64), M = 70 and 130 the prefill one; K = 100, N = 300 are
not multiples of any block; GPT-2 small's and xl's layer shapes run in both configs.
"""

import pytest
import torch
from kernel_checks import case_seed, check_tolerance, f64, poisoned

from fastgpt2.kernels import linear as L
from fastgpt2.kernels.contract import ACTIVATIONS
from fastgpt2.kernels.linear import linear, linear_ref

# gelu_tanh / silu of large negative inputs overflow exp() in numpy (the result, 0, is right)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}



def _inputs(m, k, n, dtype, seed, *, residual=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(k, n, generator=g) / k**0.5).to(dtype)  # outputs O(1) for any K
    b = (0.5 * torch.randn(n, generator=g)).to(dtype)
    r = torch.randn(m, n, generator=g).to(dtype) if residual else None
    return x, w, b, r


def _check(y, x, w, b, r, activation, dname):
    ref64 = linear_ref(f64(x), f64(w), f64(b), activation=activation, residual=f64(r))
    check_tolerance(y, ref64, lambda: [linear_ref(x, w, b, activation=activation, residual=r)], dname)


def _run(m, k, n, dname, activation, with_residual, tag):
    dtype = DTYPES[dname]
    x, w, b, r = _inputs(m, k, n, dtype, case_seed(tag, m, k, n, dname, activation, with_residual), residual=with_residual)
    out = poisoned(m, n, dtype)
    y = linear(x, w, b, activation=activation, residual=r, out=out)
    assert y is out
    _check(y, x, w, b, r, activation, dname)


def test_config_table():
    assert [L.pick_config(m).name for m in (1, 7, 33, 64, 65, 70, 4096)] == ["decode"] * 4 + ["prefill"] * 3


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("m", [1, 7, 33, 70, 130])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_odd_shape_every_epilogue(activation, with_residual, m, dname):
    _run(m, 100, 300, dname, activation, with_residual, "odd")


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("m", [7, 70])
@pytest.mark.parametrize(
    "k, n, activation, with_residual",
    [
        (768, 2304, "none", False),  # gpt2 QKV
        (768, 3072, "gelu_tanh", False),  # gpt2 MLP fc
        (3072, 768, "none", True),  # gpt2 MLP proj
    ],
)
def test_gpt2_small_shapes(k, n, activation, with_residual, m, dname):
    _run(m, k, n, dname, activation, with_residual, "gpt2")


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize(
    "m, k, n, activation, with_residual",
    [
        (3, 1600, 1600, "none", True),  # gpt2-xl attention output projection, decode
        (1, 1600, 6400, "gelu_tanh", False),  # gpt2-xl MLP fc, decode
        (70, 1600, 4800, "none", False),  # gpt2-xl QKV, prefill
    ],
)
def test_gpt2_xl_shapes(m, k, n, activation, with_residual, dname):
    _run(m, k, n, dname, activation, with_residual, "xl")


def test_row_strides_and_inplace_residual():
    # x a column slice of a wider activation (stride(0) != K); out is the residual itself
    dtype = torch.float32
    x_wide, w, b, r = _inputs(33, 200, 300, dtype, case_seed("strided"), residual=True)
    x = x_wide[:, 50:150]
    w = w[:100]
    r_copy = r.clone()
    y = linear(x, w, b, residual=r, out=r)
    assert y is r
    _check(y, x, w, b, r_copy, "none", "fp32")


def test_allocation_and_out():
    x, w, b, r = _inputs(5, 64, 96, torch.float16, case_seed("wrappers"), residual=True)
    y = linear(x, w, b, activation="gelu_tanh")
    assert y.shape == (5, 96) and y.dtype == torch.float16
    _check(y, x, w, b, None, "gelu_tanh", "fp16")
    out = poisoned(5, 96, torch.float16)
    assert linear(x, w, b, residual=r, out=out) is out
    _check(out, x, w, b, r, "none", "fp16")


def test_empty():
    x, w, b, _ = _inputs(0, 64, 96, torch.float32, 0)
    assert linear(x, w, b).shape == (0, 96)


def test_errors():
    x, w, b, r = _inputs(4, 32, 48, torch.float32, 0, residual=True)
    with pytest.raises(ValueError, match="unknown activation 'gelu_new'.*allowed: none, gelu_tanh, gelu_erf, relu, silu"):
        linear(x, w, b, activation="gelu_new")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        linear_ref(x, w, b, activation="tanh")
    with pytest.raises(ValueError, match=r"w has shape \(33, 48\), expected \[K=32, N\]"):
        linear(x, torch.randn(33, 48), b)
    with pytest.raises(ValueError, match=r"b has shape \(47,\), expected \(48,\)"):
        linear(x, w, b[:47])
    with pytest.raises(ValueError, match=r"residual has shape \(4, 47\), expected \(4, 48\)"):
        linear(x, w, b, residual=r[:, :47])
    with pytest.raises(ValueError, match=r"out has shape \(5, 48\)"):
        linear(x, w, b, out=torch.empty(5, 48))
    with pytest.raises(ValueError, match="w is torch.float16, x is torch.float32; mixed dtypes"):
        linear(x, w.half(), b)
    with pytest.raises(ValueError, match="residual is torch.bfloat16"):
        linear(x, w, b, residual=r.bfloat16())
    with pytest.raises(ValueError, match="linear: x dtype torch.float64 is not supported; use one of "
                                         "torch.float32, torch.float16, torch.bfloat16"):
        linear(x.double(), w.double(), b.double())
    with pytest.raises(ValueError, match="w must have a contiguous last dim"):
        linear(x, torch.randn(48, 32).t(), b)
    with pytest.raises(ValueError, match="x must be a 2-D tensor"):
        linear(x[None], w, b)
    with pytest.raises(ValueError, match="out overlaps x or w"):
        sq_x, sq_w, sq_b, _ = _inputs(4, 32, 32, torch.float32, 1)
        linear(sq_x, sq_w, sq_b, out=sq_x)
    with pytest.raises(ValueError, match="different devices"):
        linear(x, w.to("meta"), b)
    with pytest.raises(ValueError, match="runs on CUDA"):
        linear(x.to("meta"), w.to("meta"), b.to("meta"))


@pytest.mark.parametrize("dtype", ["fp16", "bf16", "fp32"])
def test_compile_specs_cover_every_config(dtype):
    specs = L.compile_specs(dtype)
    epilogues = len(ACTIVATIONS) * 2 + 2  # activation x residual, residual+layernorm, the nk lm_head
    step_epilogues = len(ACTIVATIONS) + 2  # the decode step's: QKV / c_fc (bias, activation), linear_norm, lm_head
    tiles = sum(len(c.block_ns) * (2 if c.splits else 1) for c in L.CONFIGS)
    assert len(specs) == tiles * (epilogues + step_epilogues)  # plain, and the step's PDL variants (sm_90)
    pdl = [s for s in specs if s.launch_pdl]
    assert len(pdl) == tiles * step_epilogues and all(s.min_cc == 90 and s.name.endswith(" pdl") for s in pdl)
    assert all(s.constexprs["USE_PDL"] == s.launch_pdl and (s.launch_pdl or s.min_cc == 80) for s in specs)
    assert not any(s.constexprs["HAS_RESIDUAL"] and not s.constexprs["HAS_NORM"] for s in pdl)
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        assert s.name.startswith("linear.linear["), s.name  # the module's name, as the compile report shows it
        params = list(s.fn.arg_names)
        assert list(s.signature) == params, s.name  # every parameter, in the kernel's order
        assert sorted(s.constexprs) == sorted(p for p in params if s.signature[p] == "constexpr"), s.name
        c = s.constexprs
        for p, ty in s.signature.items():
            if p == "part_ptr":
                assert ty == ("*fp32" if c["IS_SPLIT"] else "*" + dtype), (s.name, p, ty)
            elif p == "count_ptr":
                assert ty == ("*i32" if c["IS_SPLIT"] or c["HAS_NORM"] else "*" + dtype), (s.name, p, ty)
            elif p.endswith("_ptr"):
                assert ty == "*" + dtype, (s.name, p, ty)
            elif ty != "constexpr":
                assert ty == ("fp32" if p == "eps" else "i32"), (s.name, p, ty)  # M, N, K, strides
        assert s.uses_dot == (dtype != "fp32"), s.name
    # every (config, BLOCK_N, split) the plan can give, with every epilogue and the config's launch options
    for cfg in L.CONFIGS:
        block_k, stages = cfg.tiles(dtype)
        for block_n in cfg.block_ns:
            for split in ((False, True) if cfg.splits else (False,)):
                for _, activation, has_bias, has_res, w_nk, has_norm in L._epilogues():
                    want = {"ACTIVATION": activation, "HAS_BIAS": has_bias, "HAS_RESIDUAL": has_res, "W_NK": w_nk,
                            "IS_SPLIT": split, "HAS_NORM": has_norm, "BLOCK_M": cfg.block_m, "BLOCK_N": block_n,
                            "BLOCK_K": block_k, "NORM_CHUNK": cfg.norm_chunk, "USE_PDL": False}
                    assert any(s.constexprs == want and (s.num_warps, s.num_stages) == (cfg.num_warps, stages)
                               for s in specs), want
    with pytest.raises(ValueError, match=r"compile_specs dtype 'fp8' is not supported"):
        L.compile_specs("fp8")


def _split_plan(m, n, k, dname, sms):
    p = L.plan(m, n, k, dname, sms)
    assert p.split_k > 1 and p.grid(m, n)[2] == p.split_k, (m, n, k, p)
    return p


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("m, k, n, activation, with_residual", [
    (1, 301, 77, "gelu_tanh", False),
    (7, 1023, 130, "none", True),
    (33, 129, 300, "gelu_erf", True),  # 3 row blocks
])
def test_split_k_odd_shapes(m, k, n, activation, with_residual, dname):
    """Split-K at K and N that are multiples of no block (the last split shorter than the others), with
    the caller's workspace and without: the same bits, every output written, the counters left at 0."""
    dtype = DTYPES[dname]
    p = _split_plan(m, n, k, dname, 132)
    assert k % p.k_per_split != 0 and (p.split_k - 1) * p.k_per_split < k <= p.split_k * p.k_per_split
    x, w, b, r = _inputs(m, k, n, dtype, case_seed("split", m, k, n, dname), residual=with_residual)
    ws = L.gemm_workspace([(m, n, k)], dtype, "cpu")
    outs = []
    for workspace in (None, ws):
        out = poisoned(m, n, dtype)
        y = linear(x, w, b, activation=activation, residual=r, out=out, workspace=workspace, sms=132)
        _check(y, x, w, b, r, activation, dname)
        outs.append(y)
    assert torch.equal(outs[0], outs[1]) and not ws.counters.any()


def _norm_inputs(m, k, n, dtype, seed):
    x, w, b, r = _inputs(m, k, n, dtype, seed, residual=True)
    g = torch.Generator().manual_seed(seed + 1)
    nw = (1 + 0.3 * torch.randn(n, generator=g)).to(dtype)
    nb = (0.2 * torch.randn(n, generator=g)).to(dtype)
    return x, w, b, r, nw, nb


# layernorm outputs: fp32 1e-5 relative to max|y|; fp16: y is computed in fp32 from the stored s and
# rounded once, so within an ulp or two of |y| (2**-9 relative) plus 2**-9 absolute for values near 0
_NORM_TOL = {"fp32": (1e-5, 1e-5), "fp16": (2.0**-9, 2.0**-9)}


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("m, k, n", [(1, 200, 300), (7, 333, 77), (33, 129, 600), (70, 100, 300)])
def test_linear_norm(m, k, n, dname):
    """s = x @ w + b + residual, y = layer_norm(s): decode (split-K, the layernorm by the last tile of
    each row block) and prefill (M=70: 2 row blocks, no split); N > NORM_CHUNK loops over chunks."""
    dtype = DTYPES[dname]
    x, w, b, r, nw, nb = _norm_inputs(m, k, n, dtype, case_seed("norm", m, k, n, dname))
    out, norm_out = poisoned(m, n, dtype), poisoned(m, n, dtype)
    y, s = L.linear_norm(x, w, b, r, nw, nb, 1e-5, out=out, norm_out=norm_out, sms=132)
    assert y is norm_out and s is out
    _check(s, x, w, b, r, "none", dname)
    ref = torch.nn.functional.layer_norm(s.double(), (n,), nw.double(), nb.double(), 1e-5)  # from the stored s
    assert not torch.isnan(y).any()
    rtol, atol = _NORM_TOL[dname]
    assert (y.double() - ref).abs().max() <= atol + rtol * ref.abs().max()


def test_linear_norm_in_place_and_errors():
    x, w, b, r, nw, nb = _norm_inputs(7, 200, 96, torch.float32, case_seed("norm-inplace"))
    ref_y, ref_s = L.linear_norm_ref(f64(x), f64(w), f64(b), f64(r), f64(nw), f64(nb), 1e-5)
    y, s = L.linear_norm(x, w, b, r, nw, nb, 1e-5, out=r)  # the residual stream updated in place
    assert s is r
    assert (s.double() - ref_s).abs().max() <= 1e-5 * ref_s.abs().max()
    assert (y.double() - ref_y).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="linear_norm: residual is required"):
        L.linear_norm(x, w, b, None, nw, nb, 1e-5)
    with pytest.raises(ValueError, match=r"linear_norm: norm_weight has shape \(95,\), expected \(96,\)"):
        L.linear_norm(x, w, b, r, nw[:95], nb, 1e-5)


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("m", [1, 7, 70])
@pytest.mark.parametrize("with_bias", [False, True])
def test_nk_layout_lm_head(m, with_bias, dname):
    """w_layout="nk": w [N, K] as it is (the tied embedding as the lm_head), bias optional."""
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(case_seed("nk", m, with_bias, dname))
    k, n = 96, 1001
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = (0.5 * torch.randn(n, generator=g)).to(dtype) if with_bias else None
    out = poisoned(m, n, dtype)
    y = linear(x, w, b, w_layout="nk", out=out)
    ref64 = linear_ref(f64(x), f64(w), f64(b), w_layout="nk")
    check_tolerance(y, ref64, lambda: [linear_ref(x, w, b, w_layout="nk")], dname)


def test_nk_layout_and_workspace_errors():
    x, w, b, _ = _inputs(4, 32, 48, torch.float32, 0)
    with pytest.raises(ValueError, match=r"w has shape \(48, 33\), expected \[N, K=32\] \(w_layout='nk'"):
        linear(x, torch.randn(48, 33), None, w_layout="nk")
    with pytest.raises(ValueError, match="w_layout must be 'kn'"):
        linear(x, w, b, w_layout="t")
    x, w, b, _ = _inputs(1, 768, 768, torch.float32, 1)
    small = L.gemm_workspace([(1, 64, 64)], torch.float32, "cpu")
    with pytest.raises(ValueError, match="make it with gemm_workspace for this shape"):
        linear(x, w, b, workspace=small, sms=132)


def test_pdl_outside_a_hopper_gpu_is_a_clear_error():
    """pdl=True needs compiled kernels on a CUDA GPU of compute capability 9.0+: in the interpreter (or
    on an older GPU) every launcher that takes it says so, before launching anything."""
    from fastgpt2.kernels import attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cuda" and torch.cuda.get_device_capability() >= (9, 0):
        pytest.skip("this GPU runs PDL (tests/runtime/test_engine_step.py checks it)")
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 40, generator=g).to(dev)
    w = torch.randn(40, 24, generator=g).to(dev)
    b = torch.randn(24, generator=g).to(dev)
    r = torch.randn(3, 24, generator=g).to(dev)
    nw, nb = torch.randn(24, generator=g).to(dev), torch.randn(24, generator=g).to(dev)
    pattern = r"pdl=True \(programmatic dependent launch\) needs .*9\.0.*pass pdl=False"
    with pytest.raises(ValueError, match="^linear: " + pattern):
        L.linear(x, w, b, pdl=True)
    with pytest.raises(ValueError, match="^linear_norm: " + pattern):
        L.linear_norm(x, w, b, r, nw, nb, 1e-5, pdl=True)
    with pytest.raises(ValueError, match="pdl must be True or False"):
        L.linear(x, w, b, pdl=1)
    qkv = torch.randn(2, 1, 3 * 64, generator=g).to(dev)
    k_cache, v_cache = torch.randn(2, 1, 32, 64, generator=g).to(dev), torch.randn(2, 1, 32, 64, generator=g).to(dev)
    lens = torch.full((2,), 5, dtype=torch.int32, device=dev)
    k_before = k_cache.clone()
    with pytest.raises(ValueError, match="^decode_attention: " + pattern):
        attention.decode_attention(qkv, k_cache, v_cache, lens, 0.125, pdl=True)
    assert torch.equal(k_cache, k_before)  # nothing launched
    out = L.linear(x, w, b, pdl=False)  # and pdl=False is the plain launch
    assert torch.allclose(out, L.linear_ref(x, w, b), atol=1e-4, rtol=1e-4)

"""The torch backend's CPU GEMM / lm_head paths: each path forced through the private switch and
compared with the plain float32 product, the choice made from the CPU's capability and the oneDNN
probe (both monkeypatched here), and an AVX2-only CPU simulated end to end. A path this CPU cannot
execute is skipped, naming the capability; nothing here depends on the instruction set."""
import pytest
import torch

import fastgpt2
from fastgpt2 import BackendError
from fastgpt2.runtime import cpu_paths
from fastgpt2.runtime.cpu_paths import CpuPath, choose_cpu_path
from fastgpt2.runtime.ops import TorchOps

CPU = torch.device("cpu")
# every path: (dtype, CpuPath.gemm)
PATHS = [(torch.bfloat16, "onednn_packed"), (torch.bfloat16, "addmm_nk"), (torch.bfloat16, "addmm"),
         (torch.float32, "onednn_packed"), (torch.float32, "addmm"), (torch.float16, "addmm_nk"),
         (torch.float16, "addmm")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}  # relative to the reference's max
AVX2_BF16_ERROR = ("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, "
                   "avx512vl and avx512dq")


@pytest.fixture(autouse=True)
def fresh_probe():
    """Every test sees the probe of its own (monkeypatched) CPU, and leaves the real one behind."""
    cpu_paths._onednn_probe.cache_clear()
    yield
    cpu_paths._onednn_probe.cache_clear()


def _skip_unless_runs(dtype, gemm):
    """Skip, naming the capability, where this CPU cannot execute the path."""
    why = cpu_paths._onednn_probe(dtype) if gemm.startswith("onednn") else None
    if why is not None:
        cap = torch.backends.cpu.get_cpu_capability()
        pytest.skip(f"{gemm} for {dtype} does not run here ({why}): this CPU's capability is {cap}")


def _simulate_avx2(monkeypatch):
    """An AVX2-only CPU as torch 2.13 behaves on one: the capability says AVX2, no AMX, and oneDNN's
    packed linear refuses bf16 with its RuntimeError (float32 still runs)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    monkeypatch.setattr(cpu_paths, "_amx", lambda: False)
    ns = torch.ops.mkldnn
    reorder, pointwise = ns._reorder_linear_weight, ns._linear_pointwise

    def refuse_bf16(op):
        def call(*args, **kwargs):
            if args[0].dtype == torch.bfloat16:
                raise RuntimeError(AVX2_BF16_ERROR)
            return op(*args, **kwargs)
        return call

    monkeypatch.setattr(ns, "_reorder_linear_weight", refuse_bf16(reorder))
    monkeypatch.setattr(ns, "_linear_pointwise", refuse_bf16(pointwise))


@pytest.mark.parametrize("dtype,gemm", PATHS, ids=[f"{str(d)[6:]}-{g}" for d, g in PATHS])
def test_every_forced_path_matches_the_plain_float32_product(dtype, gemm):
    _skip_unless_runs(dtype, gemm)
    ops = TorchOps(CPU, dtype, _cpu_path=gemm)
    assert ops.cpu_path.gemm == gemm and ops.cpu_path.forced and ops.cpu_path.dtype == dtype
    assert ops.packed == (gemm == "onednn_packed")
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(100, 300, generator=g).to(dtype), torch.randn(300, generator=g).to(dtype)
    pw = ops.prepare_linear(w)
    assert pw.is_mkldnn == (gemm == "onednn_packed")
    if not pw.is_mkldnn:  # the same [K, N] values, stored [N, K] for addmm_nk
        assert torch.equal(pw, w) and pw.stride() == ((1, 100) if gemm == "addmm_nk" else (300, 1))
    for m in (1, 2, 7, 33):  # one row (fp32 packed: run as two), odd sizes
        x = torch.randn(m, 100, generator=g).to(dtype)
        residual = torch.randn(m, 300, generator=g).to(dtype)
        ref = torch.nn.functional.gelu(torch.addmm(b.float(), x.float(), w.float()), approximate="tanh")
        ref = ref + residual.float()
        y = ops.linear(x, pw, b, "gelu_tanh", residual)
        assert y.dtype == dtype and y.shape == (m, 300)
        assert (y.float() - ref).abs().max() <= TOL[dtype] * ref.abs().max(), (m, gemm)


@pytest.mark.parametrize("amx", [False, True])
@pytest.mark.parametrize("dtype,gemm", PATHS, ids=[f"{str(d)[6:]}-{g}" for d, g in PATHS])
def test_every_lm_head_path_matches_the_plain_float32_product(monkeypatch, dtype, gemm, amx):
    _skip_unless_runs(dtype, gemm)
    monkeypatch.setattr(cpu_paths, "_amx", lambda: amx)  # AMX picks w @ y^T for bf16: both heads run anywhere
    ops = TorchOps(CPU, dtype, _cpu_path=gemm)
    if dtype == torch.float32:  # oneDNN over the row-major table where the GEMMs are oneDNN's
        head = "oneDNN y @ w^T" if gemm == "onednn_packed" else "w @ y^T"
    else:
        head = "w @ y^T" if dtype == torch.bfloat16 and amx else "y @ w^T"
    assert ops.cpu_path.head == head
    g = torch.Generator().manual_seed(4)
    table = torch.randn(301, 48, generator=g).to(dtype)
    wh = ops.prepare_lm_head(table)
    assert torch.equal(wh, table)
    for n in (1, 2, 8, 65):  # the GEMV or oneDNN, w @ y^T or oneDNN, y @ w^T above 64 rows
        y = torch.randn(n, 48, generator=g).to(dtype)
        ref = torch.nn.functional.linear(y.float(), table.float())
        logits = ops.lm_head(y, wh)
        assert logits.dtype == dtype and logits.shape == (n, 301) and logits.is_contiguous()
        assert (logits.float() - ref).abs().max() <= TOL[dtype] * ref.abs().max(), (n, gemm)


@pytest.mark.parametrize("dtype,gemm", PATHS, ids=[f"{str(d)[6:]}-{g}" for d, g in PATHS])
def test_every_forced_path_runs_the_model_like_the_float32_one(monkeypatch, dtype, gemm):
    _skip_unless_runs(dtype, gemm)
    cfg = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32)
    monkeypatch.setattr(cpu_paths, "_FORCE_CPU_PATH", "addmm")
    ref_model = fastgpt2.GPT2.from_config(cfg, dtype=torch.float32, seed=5)
    monkeypatch.setattr(cpu_paths, "_FORCE_CPU_PATH", gemm)
    model = fastgpt2.GPT2.from_config(cfg, dtype=dtype, seed=5)
    assert model.ops.cpu_path.gemm == gemm and f"cpu_path='{model.ops.cpu_path.name}'" in repr(model)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    ref = ref_model(ids)
    out = model(ids).float()
    assert (out - ref).abs().max() <= (1e-4 if dtype == torch.float32 else 0.1) * ref.abs().max()
    new = model.generate(ids, 4)
    assert new.shape == (3, 15) and torch.equal(new[:, :11], ids)


@pytest.mark.parametrize("cap", ["AVX512", "AVX2", "DEFAULT"])
@pytest.mark.parametrize("probe", ["runs", "fails"])
def test_the_path_follows_the_capability_and_the_probe(monkeypatch, cap, probe):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    monkeypatch.setattr(cpu_paths, "_amx", lambda: False)
    packs = []

    def pack(w_nk):
        packs.append(w_nk.dtype)
        if probe == "fails":
            raise RuntimeError(AVX2_BF16_ERROR)
        return torch.ops.mkldnn._reorder_linear_weight(w_nk, 8)

    if probe == "runs":  # any CPU, this one included, as one where oneDNN runs both dtypes
        monkeypatch.setattr(cpu_paths, "_onednn_probe", lambda dtype: packs.append(dtype))
    else:  # the real probe, its oneDNN packing failing as on an AVX2 CPU
        monkeypatch.setattr(cpu_paths, "onednn_pack", pack)
    ok = probe == "runs"
    expected = {
        torch.bfloat16: "onednn_packed" if ok and cap == "AVX512" else "addmm_nk",
        torch.float32: "onednn_packed" if ok and cap in ("AVX512", "AVX2") else "addmm",
        torch.float16: "addmm_nk",
    }
    names = {
        torch.bfloat16: (f"bf16: oneDNN packed ({cap})" if expected[torch.bfloat16] == "onednn_packed"
                         else f"bf16: addmm on [N, K] weights ({cap})"),
        torch.float32: (f"fp32: oneDNN packed ({cap})" if expected[torch.float32] == "onednn_packed"
                        else f"fp32: MKL addmm ({cap})"),
        torch.float16: f"fp16: addmm on [N, K] weights ({cap})",
    }
    heads = {torch.bfloat16: "y @ w^T", torch.float16: "y @ w^T",  # no AMX
             torch.float32: "oneDNN y @ w^T" if expected[torch.float32] == "onednn_packed" else "w @ y^T"}
    for dtype in (torch.bfloat16, torch.float32, torch.float16):
        packs.clear()
        path = choose_cpu_path(dtype)
        assert path == CpuPath(dtype, expected[dtype], cap, False, forced=False, head=heads[dtype]), (dtype, cap)
        assert path.name == str(path) == names[dtype]
        # the probe runs only where the capability leaves oneDNN in the running, and never for fp16
        asked = (dtype == torch.bfloat16 and cap == "AVX512") or (dtype == torch.float32 and cap != "DEFAULT")
        assert bool(packs) == asked, (dtype, cap, packs)
        ops = TorchOps(CPU, dtype)
        assert ops.cpu_path == path and ops.packed == (path.gemm == "onednn_packed")
    if probe == "fails":
        assert "avx_ne_convert" in cpu_paths._onednn_probe(torch.bfloat16)
    assert TorchOps(CPU, torch.bfloat16, pack_weights=False).cpu_path.gemm == "addmm"  # patch_hf: never packed
    assert TorchOps(None, torch.bfloat16).cpu_path is None  # off the CPU: no CPU path


def test_the_probe_runs_once_per_dtype_and_keeps_the_reason(monkeypatch):
    calls = []

    def pack(w_nk):
        calls.append(w_nk.dtype)
        raise RuntimeError(AVX2_BF16_ERROR + "\n(more lines)")

    monkeypatch.setattr(cpu_paths, "onednn_pack", pack)
    for _ in range(3):
        assert cpu_paths._onednn_probe(torch.bfloat16) == f"RuntimeError: {AVX2_BF16_ERROR}"
    assert calls == [torch.bfloat16]
    monkeypatch.setattr(cpu_paths, "_onednn_packing_available", lambda: False)
    assert cpu_paths._onednn_probe(torch.float32) == "oneDNN's packed linear is not in this torch build"


def test_a_forced_path_this_cpu_cannot_run_is_a_backend_error_naming_the_capability(monkeypatch):
    _simulate_avx2(monkeypatch)
    with pytest.raises(BackendError, match=r"'onednn_packed' for torch.bfloat16 cannot run on this CPU \(torch's "
                                           r"CPU capability is AVX2\): RuntimeError: mkldnn_reorder_linear_weight"):
        TorchOps(CPU, torch.bfloat16, _cpu_path="onednn_packed")
    monkeypatch.setattr(cpu_paths, "_FORCE_CPU_PATH", "onednn_packed")
    with pytest.raises(BackendError, match="capability is AVX2"):
        fastgpt2.GPT2.from_config(fastgpt2.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                      n_positions=16), dtype=torch.bfloat16)
    with pytest.raises(BackendError, match=r"'addmm_nk' does not exist for torch.float32 \(choose one of "
                                           r"\('onednn_packed', 'addmm'\)\)"):
        TorchOps(CPU, torch.float32, _cpu_path="addmm_nk")
    assert TorchOps(CPU, torch.float32, _cpu_path="onednn_packed").packed  # oneDNN runs fp32 on AVX2
    with pytest.raises(BackendError, match="'onednn_packed' does not exist for torch.float16"):
        TorchOps(CPU, torch.float16, _cpu_path="onednn_packed")
    with pytest.raises(BackendError, match="'nope' does not exist for torch.float16"):
        TorchOps(CPU, torch.float16, _cpu_path="nope")


def test_bfloat16_on_a_simulated_avx2_cpu_builds_and_matches_transformers_float32(monkeypatch):
    """The issue's failure: GPT2.from_config(cfg, dtype=torch.bfloat16) on an AVX2-only CPU raised
    oneDNN's RuntimeError at construction. It builds on addmm ([N, K] weights) and matches transformers' fp32
    model on the same weights within the bf16 bound of the loader's test."""
    from fastgpt2.benchmark import reference_model

    _simulate_avx2(monkeypatch)
    cfg = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32)
    model = fastgpt2.GPT2.from_config(cfg, dtype=torch.bfloat16, seed=3)
    name = "bf16: addmm on [N, K] weights (AVX2)"
    assert model.ops.cpu_path.name == name and f"cpu_path='{name}'" in repr(model)
    assert not model.ops.packed and model.ops.cpu_path.head == "y @ w^T"
    for layer in model.layers:  # stored [N, K] once, no oneDNN form
        assert not layer.qkv_w.is_mkldnn and layer.qkv_w.shape == (64, 192) and layer.qkv_w.stride() == (1, 64)
    fp32 = fastgpt2.GPT2.from_config(cfg, dtype=torch.float32, seed=3)  # same seeded weights
    assert fp32.ops.cpu_path.name == "fp32: oneDNN packed (AVX2)"  # oneDNN runs fp32 there
    assert fp32.ops.packed and all(layer.qkv_w.is_mkldnn for layer in fp32.layers)
    assert fp32.ops.cpu_path.head == "oneDNN y @ w^T" and fp32.wte.stride() == (64, 1)  # one row-major table
    hf = reference_model(fp32)  # transformers, float32, eager attention
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    out = model(ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 0.1 * ref.abs().max()
    assert model.generate(ids, 6).shape == (3, 17)  # decode too (the lm_head's GEMV, batch 3)


def test_amx_is_named_and_keeps_the_xeons_lm_head(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(cpu_paths, "_amx", lambda: True)
    monkeypatch.setattr(cpu_paths, "_onednn_probe", lambda dtype: None)
    bf16, fp32 = choose_cpu_path(torch.bfloat16), choose_cpu_path(torch.float32)
    assert bf16.name == "bf16: oneDNN packed (AVX512+AMX)" and bf16.head == "w @ y^T"
    assert fp32.name == "fp32: oneDNN packed (AVX512+AMX)" and fp32.head == "oneDNN y @ w^T"
    assert choose_cpu_path(torch.bfloat16, "addmm").name == "bf16: addmm (AVX512+AMX, forced)"

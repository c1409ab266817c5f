"""tools/step_model.py: its byte accounting against config.py's byte counts, its program counts
against the grids the launchers really launch (captured at ``kernel[grid]`` in Triton's
interpreter), and its CLI. Structure only: nothing here asserts a GPU timing."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from triton.runtime.jit import KernelInterface

from fastgpt2.kernels.attention import decode_attention, default_num_splits
from fastgpt2.kernels.layernorm import add_layer_norm
from fastgpt2.kernels.linear import linear, plan
from fastgpt2.runtime.config import GPT2Config, kv_read_bytes
from fastgpt2.runtime.plan import decode_weight_bytes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("step_model", ROOT / "tools" / "step_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CONFIGS = [
    GPT2Config.from_name("gpt2"),
    GPT2Config.from_name("gpt2-large"),
    GPT2Config(n_layer=3, n_embd=48, n_head=4, n_inner=80, vocab_size=100, n_positions=40),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["gpt2", "gpt2-large", "tiny-n_inner"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_weight_and_kv_bytes_match_config(tool, cfg, batch, dtype):
    context = min(20, cfg.n_positions - 2)
    kernels = tool.step_kernels(cfg, batch, dtype, context, cfg.n_positions)
    e, n, size = cfg.n_embd, cfg.n_layer, dtype.itemsize
    # The GEMM kernels read exactly decode_weight_bytes minus the embedding rows' 2*B*E and layer 0's
    # ln_1 (2E; both in the embedding kernel): per layer the four weights + biases and two layernorms
    # (ln_2 in the attention-out epilogue, the next ln_1 or ln_f in the MLP-down one), and the V*E head.
    layer_gemms = [k for k in kernels if "GEMM" in k["kernel"] and k["count"] == n]
    gemm = sum(k["weight_bytes"] * k["count"] for k in kernels if "GEMM" in k["kernel"])
    assert gemm == decode_weight_bytes(cfg, batch, dtype) - size * (2 * batch * e + 2 * e)
    i = cfg.inner_dim
    assert sum(k["weight_bytes"] * n for k in layer_gemms) == size * n * (4 * e * e + 2 * e * i + 9 * e + i)
    assert len(layer_gemms) == 4 and all(k["kind"] == "triton" for k in kernels if "GEMM" in k["kernel"])
    # every weight of the step is read once: the per-kernel weight shares sum to decode_weight_bytes
    assert sum(k["weight_bytes"] * k["count"] for k in kernels) == decode_weight_bytes(cfg, batch, dtype)
    # the K/V cache read (context positions) and written (the new token) = kv_read_bytes over context + 1
    assert sum(k["kv_bytes"] * k["count"] for k in kernels) == kv_read_bytes(cfg, batch, context + 1, dtype)
    for k in kernels:
        assert k["bytes"] >= k["weight_bytes"] + k["kv_bytes"] and k["count"] in (1, n)


def _capture_grids(monkeypatch):
    """Record (kernel name, grid) at every ``kernel[grid](...)`` launch (as step_count.count_ops does)."""
    grids = []
    original = KernelInterface.__getitem__

    def recording(kernel, grid):
        grids.append((getattr(kernel, "__name__", None) or kernel.fn.__name__, tuple(grid)))
        return original(kernel, grid)

    monkeypatch.setattr(KernelInterface, "__getitem__", recording)
    return grids


@pytest.mark.parametrize("m,k,n", [(1, 32, 320), (3, 200, 192), (20, 32, 130), (70, 48, 200)])
def test_gemm_programs_are_the_launched_grid(tool, monkeypatch, m, k, n):
    grids = _capture_grids(monkeypatch)
    gen = torch.Generator().manual_seed(0)
    linear(torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen), torch.randn(n, generator=gen))
    (grid,) = [g for name, g in grids if name == "_linear_kernel"]  # in the interpreter: sm_90's 132 SMs
    p = plan(m, n, k, "fp32", 132)
    assert grid == (math.ceil(m / p.config.block_m), math.ceil(n / p.block_n), p.split_k)
    assert tool.gemm_programs(m, n, k, torch.float32, 132) == grid[0] * grid[1] * grid[2]


def test_gemm_programs_of_gpt2_at_batch_1(tool):
    # every gpt2 projection fills an H200 twice over: split-K and 32-wide tiles where N is short
    programs = [tool.gemm_programs(1, n, k, torch.float16, 132) for n, k in
                ((3 * 768, 768), (768, 768), (4 * 768, 768), (768, 4 * 768), (50257, 768))]
    assert programs == [432, 288, 288, 288, 786]
    assert min(programs) >= 2 * tool.GPUS["H200"]["sms"]


@pytest.mark.parametrize("batch,heads,tmax", [(2, 2, 256), (1, 2, 64), (3, 1, 512)])
def test_attention_programs_are_the_launched_grids(tool, monkeypatch, batch, heads, tmax):
    d = 32
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, 1, 3 * heads * d, generator=gen)
    k_cache = torch.randn(batch, heads, tmax, d, generator=gen)
    v_cache = torch.randn(batch, heads, tmax, d, generator=gen)
    lens = torch.full((batch,), 5, dtype=torch.int32)
    grids = _capture_grids(monkeypatch)
    decode_attention(qkv, k_cache, v_cache, lens, d**-0.5)
    splits, programs = tool.decode_grids(batch, heads, tmax)
    assert splits == default_num_splits(heads, tmax)
    assert grids == [("_decode_attn_kernel", (batch * heads, splits))]  # the splits are combined in-kernel
    assert programs == batch * heads * splits


def test_layernorm_programs_are_the_launched_grid(tool, monkeypatch):
    grids = _capture_grids(monkeypatch)
    x = torch.randn(3, 48)
    add_layer_norm(x, torch.randn(3, 48), torch.ones(48), torch.zeros(48), 1e-5)
    assert grids == [("_add_layernorm_kernel", (tool.layernorm_programs(3),))]


def test_prediction_formula(tool):
    r = tool.model_step("gpt2", 1, "H200", torch.float16, context=128)
    gpu = tool.GPUS["H200"]
    bw = tool.ACHIEVABLE_BW_FRACTION * gpu["hbm_gbps"] * 1e9
    for k in r["kernels"]:
        programs = k["programs"] if k["programs"] is not None else gpu["sms"]
        expect = max(k["bytes"] / (bw * min(1, programs / gpu["sms"])) * 1e6, tool.KERNEL_FLOOR_US)
        assert k["us"] == pytest.approx(expect)
        assert k["waves"] == math.ceil(programs / (gpu["sms"] * tool.RESIDENT_PROGRAMS_PER_SM))
    assert r["step_us"] == pytest.approx(sum(k["us"] * k["count"] for k in r["kernels"]))
    assert r["tokens_per_s"] == pytest.approx(1 / (r["step_us"] * 1e-6))
    roof = decode_weight_bytes(GPT2Config.from_name("gpt2"), 1, torch.float16) / (gpu["hbm_gbps"] * 1e9) * 1e6
    assert r["pct_roofline"] == pytest.approx(100 * roof / r["step_us"])
    assert r["step_us"] > roof  # a model can never beat the roofline
    # per step: embed + 5 kernels per layer + lm_head, argmax, length update
    assert r["launches_per_step"] == 1 + 12 * 5 + 3
    assert tool.GPUS["H100"]["hbm_gbps"] == 3350 and tool.GPUS["A100"]["sms"] == 108


def test_pdl_prediction_lowers_only_the_floor_of_triton_kernels_after_triton_kernels(tool):
    plain = tool.model_step("gpt2-large", 8, "H200", torch.float16, context=128)
    pdl = tool.model_step("gpt2-large", 8, "H200", torch.float16, context=128, pdl=True)
    assert not plain["pdl"] and pdl["pdl"] and tool.PDL_KERNEL_FLOOR_US < tool.KERNEL_FLOOR_US
    kinds = [k["kind"] for k in pdl["kernels"]]
    assert kinds[0] == "triton" and kinds[-2:] == ["torch", "torch"]  # embed first; argmax, length update last
    for index, (k, q) in enumerate(zip(pdl["kernels"], plain["kernels"])):
        follows_triton = index > 0 and k["kind"] == "triton"  # every row before a Triton row is Triton here
        assert k["floor_us"] == (tool.PDL_KERNEL_FLOOR_US if follows_triton else tool.KERNEL_FLOOR_US)
        assert k["bandwidth_us"] == q["bandwidth_us"] and k["us"] == pytest.approx(max(k["bandwidth_us"], k["floor_us"]))
        assert k["us"] <= q["us"]
    assert pdl["step_us"] < plain["step_us"] and pdl["launches_per_step"] == plain["launches_per_step"]


def test_cli_prints_tables_and_summary(tool, capsys, tmp_path):
    out_json = tmp_path / "step.json"
    assert tool.main(["--gpu", "A100", "--model", "gpt2", "--batch", "1,2", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "### gpt2, batch 1, float16, A100 SXM 80GB" in text and "### gpt2, batch 2" in text
    assert "## Summary (A100 SXM 80GB" in text
    for model, batch in (("gpt2", 1), ("gpt2", 8), ("gpt2-large", 1), ("gpt2-large", 8)):
        assert f"| {model} | {batch} |" in text
    assert "| c_proj GEMM + residual + next ln_1 / ln_f (linear_norm) [BN=64, split-K 24] | 12 | 288 | 3 |" in text
    data = json.loads(out_json.read_text())
    assert [(s["model"], s["batch"]) for s in data["steps"]] == [("gpt2", 1), ("gpt2", 2)]
    assert len(data["summary"]) == 4 and data["assumptions"]["KERNEL_FLOOR_US"] == tool.KERNEL_FLOOR_US
    assert [r["pdl"] for r in data["summary_pdl"]] == [True] * 4 and "with PDL: step µs" in text
    assert all(p["step_us"] < r["step_us"] for p, r in zip(data["summary_pdl"], data["summary"]))
    assert tool.main(["--model", "gpt2", "--batch", "1", "--pdl"]) == 0
    assert "### gpt2, batch 1, float16, H200 SXM (132 SMs, 4,800 GB/s), context 128, cache_len 256, PDL" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        tool.main(["--batch", "0"])

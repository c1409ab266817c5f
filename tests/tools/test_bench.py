"""The benchmark's bookkeeping (bytes per step, the roofline tool, the decode step count line, the plot)
and the bench/ suite's CPU run. Structure and validity only: nothing here asserts a timing."""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastgpt2.cli import main
from fastgpt2.runtime.config import GPT2Config, kv_read_bytes
from fastgpt2.runtime.plan import decode_weight_bytes
from fastgpt2.runtime.generate import GPT2
from fastgpt2.runtime.kv_cache import KVCache

ROOT = Path(__file__).resolve().parents[2]
TINY = json.dumps(dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
FAST = ["bench", "--config", TINY, "--batch", "1", "--prompt-len", "4", "--new-tokens", "3", "--runs", "1",
        "--warmup", "0", "--bandwidth-gib", "0.01", "--quiet"]


def _roofline_tool():
    spec = importlib.util.spec_from_file_location("roofline", ROOT / "tools" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("batch", [1, 5])
def test_decode_weight_bytes_reads_every_weight_once(tied, batch):
    cfg = GPT2Config(n_layer=3, n_embd=48, n_head=4, n_inner=80, vocab_size=100, n_positions=40, tie_word_embeddings=tied)
    model = GPT2.from_config(cfg, dtype=torch.float32)
    # every tensor of the model once, except the embedding tables: B rows gathered from each
    read = sum(w.numel() for k, w in model.plain_weights().items() if k not in ("wte.weight", "wpe.weight"))
    read += 2 * batch * cfg.n_embd
    if tied:
        read += cfg.vocab_size * cfg.n_embd  # the lm_head is wte, read whole
    assert decode_weight_bytes(cfg, batch, torch.float32) == 4 * read
    assert decode_weight_bytes(cfg, batch, torch.bfloat16) == 2 * read


def test_kv_read_bytes_of_a_full_cache_is_the_cache_size():
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=40)
    cache = KVCache(cfg, 3, 17, torch.float16, torch.device("cpu"))
    assert kv_read_bytes(cfg, 3, 17, torch.float16) == 2 * cache.k.numel() * cache.k.element_size()


def test_roofline_numbers_for_gpt2(capsys):
    tool = _roofline_tool()
    gpt2 = next(r for r in tool.roofline(torch.float16, 1) if r["model"] == "gpt2")
    e, v, layers = 768, 50257, 12
    weights = layers * (12 * e * e + 13 * e) + 2 * e + v * e + 2 * e  # layers, ln_f, lm_head = wte, 1 row of wte + wpe
    assert gpt2["bytes_per_step"] == 2 * weights == 247_309_824
    h100 = gpt2["gpus"]["H100 SXM"]
    assert h100["us_per_step"] == pytest.approx(247_309_824 / 3350e9 * 1e6) == pytest.approx(73.824, abs=1e-3)
    assert h100["tokens_per_s"] == pytest.approx(13_545.8, abs=0.1)
    assert gpt2["gpus"]["A100 SXM 80GB"]["us_per_step"] == pytest.approx(121.289, abs=1e-3)
    assert gpt2["gpus"]["A100 40GB"]["us_per_step"] == pytest.approx(159.042, abs=1e-3)
    assert gpt2["gpus"]["H100 PCIe"]["us_per_step"] == pytest.approx(123.655, abs=1e-3)
    assert [r["model"] for r in tool.roofline()] == ["gpt2", "distilgpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]
    assert tool.main([]) == 0
    table = capsys.readouterr().out
    assert "(goal, to be measured)" in table
    assert "| gpt2 | 124.4M | 247.3 MB | 121.3 µs, 8,245 tok/s | 159.0 µs, 6,288 tok/s | 73.8 µs, 13,546 tok/s |" in table


def _fake_step_count(monkeypatch, count):
    """benchmark's step_count(backend) -> count(backend), a dict, as a StepCount."""
    from fastgpt2 import benchmark
    from fastgpt2.runtime.step_count import StepCount

    monkeypatch.setattr(benchmark, "step_count", lambda backend: StepCount(**count(backend)))


def test_step_count_is_printed_and_written(monkeypatch, capsys, tmp_path):
    def budget(backend):
        if backend == "torch":
            raise ValueError("no count for the torch backend\n(second line)")
        return {"backend": backend, "unit": "ops", "per_layer": 7, "per_step": 3, "total": 87, "n_layer": 12,
                "fusions": ["residual add in the GEMM epilogue", "K/V write in attention"],
                "by_name": {"triton:_linear_kernel": 48}}

    _fake_step_count(monkeypatch, budget)
    out = tmp_path / "b.json"
    assert main([*FAST, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert ("decode step (backend=triton): 7 ops per layer + 3 per step = 87 (12 layers); ops: Triton launches "
            "+ aten ops (on CUDA each is at least one kernel); fusions: residual add in the GEMM epilogue, K/V write "
            "in attention") in printed
    assert "decode step (backend=torch): not counted: ValueError: (second line)" in printed
    result = json.loads(out.read_text())
    assert list(result["step_count"]) == ["triton", "torch"]  # triton: counted on any machine
    assert result["step_count"]["triton"]["by_name"] == {"triton:_linear_kernel": 48}
    assert result["step_count"]["triton"]["unit"] == "ops" and "error" in result["step_count"]["torch"]


@pytest.mark.parametrize("flag", ["--no-step-count", "--no-launch-budget"])
def test_no_step_count_skips_it(monkeypatch, capsys, flag):
    def budget(backend):
        raise AssertionError(f"{flag} must not count the step")

    _fake_step_count(monkeypatch, budget)
    assert main([*FAST, flag, "--no-reference"]) == 0
    printed = capsys.readouterr().out
    assert "decode step (backend" not in printed and "| fastgpt2[torch] | 1 |" in printed and "| transformers |" not in printed


def test_json_names_the_cpu_its_capability_and_the_forced_path_with_a_roofline_per_row(monkeypatch, capsys,
                                                                                        tmp_path):
    from fastgpt2.runtime import cpu_paths

    monkeypatch.setattr(cpu_paths, "_FORCE_CPU_PATH", "addmm")  # the private switch, as a measurement uses it
    out = tmp_path / "b.json"
    assert main([*FAST, "--batch", "1,2", "--dtype", "bfloat16", "--no-step-count", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    cap = torch.backends.cpu.get_cpu_capability()
    assert result["cpu_model"] and result["cpu_capability"] == cap
    assert result["cpu_path"] == f"bf16: addmm ({cap}{'+AMX' if cpu_paths._amx() and cap == 'AVX512' else ''}, forced)"
    assert f"| CPU path: {result['cpu_path']}" in printed
    assert {(r["engine"], r["batch"]) for r in result["rows"]} == {
        (e, b) for e in ("fastgpt2[torch]", "transformers") for b in (1, 2)}
    for r in result["rows"]:  # % of this machine's roofline on every row, every engine
        assert r["roofline_pct"] > 0 and r["weight_GBps"] > 0
        assert f"{r['roofline_pct']:.1f}%" in printed


def test_cpu_model_falls_back_to_the_platform(monkeypatch):
    from fastgpt2 import benchmark

    monkeypatch.setattr(benchmark, "_cpu_name", lambda: None)
    monkeypatch.setattr(benchmark.platform, "processor", lambda: "Some CPU")
    assert benchmark.cpu_model() == "Some CPU"
    monkeypatch.setattr(benchmark.platform, "processor", lambda: "")
    assert benchmark.cpu_model() == benchmark.platform.machine() or benchmark.cpu_model() == "unknown CPU"


def test_the_machine_line_names_the_features_cpuid_reports_not_proc_cpuinfos(monkeypatch):
    """Under an emulated AVX2-only CPU /proc/cpuinfo still lists the host's avx512f and amx_bf16; the
    machine line must follow what torch reads from CPUID."""
    from fastgpt2 import benchmark
    from fastgpt2.runtime import cpu_paths

    cpuid = {"_is_avx2_supported": True, "_is_avx512_supported": False, "_is_avx512_bf16_supported": False,
             "_is_amx_tile_supported": False}
    monkeypatch.setattr(cpu_paths, "_cpuid", lambda name: cpuid[name])
    monkeypatch.setattr(benchmark, "_cpu_name", lambda: "Intel Xeon (the host's name)")
    line = benchmark.machine_description(torch.device("cpu"))
    assert line == f"Intel Xeon (the host's name) (AVX2), {torch.get_num_threads()} threads"
    cpuid.update(_is_avx512_supported=True, _is_avx512_bf16_supported=True, _is_amx_tile_supported=True)
    assert "(AVX-512, AVX512-BF16, AMX)" in benchmark.machine_description(torch.device("cpu"))
    assert cpu_paths._amx() is True  # the lm_head choice reads the same CPUID check
    cpuid.update(_is_avx2_supported=False, _is_avx512_supported=False, _is_avx512_bf16_supported=False,
                 _is_amx_tile_supported=False)
    assert benchmark.machine_description(torch.device("cpu")).startswith("Intel Xeon (the host's name), ")
    # and on this machine, the real checks: the line names exactly what torch's CPUID reads say
    monkeypatch.undo()
    real = benchmark.machine_description(torch.device("cpu"))
    assert ("AVX-512" in real) == torch.cpu._is_avx512_supported() and ("AMX" in real) == torch.cpu._is_amx_tile_supported()


def test_plot_writes_a_png(monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    _fake_step_count(monkeypatch, lambda backend: {"backend": backend, "unit": "ops", "per_layer": 1, "per_step": 1,
                                                   "total": 3, "n_layer": 2})
    png = tmp_path / "b.png"
    assert main([*FAST, "--batch", "1,2", "--plot", str(png)]) == 0
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit, match=re.escape("--plot needs matplotlib, which is not installed: "
                                                   "pip install 'fastgpt2[bench]'")):
        main([*FAST, "--plot", str(tmp_path / "b.png")])
    assert capsys.readouterr().out == ""  # refused before timing anything


@pytest.mark.parametrize("args, message", [
    (["--batch", "1,x"], "--batch takes comma-separated positive integers"),
    (["--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["--config", "{nope"], "--config must be a JSON object of GPT2Config fields"),
])
def test_bench_argument_errors_are_clear(args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        main([*FAST, *args])


def test_bench_suite_runs_its_cpu_benchmarks():
    """`pytest bench/` collects and runs: the decode benchmarks on this machine (tiny config), the
    kernel benchmarks skipped without CUDA. The environment keeps TRITON_INTERPRET=1 (set by
    tests/conftest.py without CUDA): bench/conftest.py must clear it."""
    env = dict(os.environ, FASTGPT2_BENCH_SMALL="1")
    out = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    summary = text.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    engines = 3 if torch.cuda.is_available() else 2  # transformers, fastgpt2[torch] (+ fastgpt2[triton] on CUDA)
    assert passed >= 2 * engines, summary  # batches 1 and 8
    assert "failed" not in summary and "error" not in summary
    assert "decode speedup vs transformers" in text and "fastgpt2[torch] batch 8:" in text
    if not torch.cuda.is_available():
        assert "kernel benchmarks need a CUDA GPU" in text


@pytest.mark.parametrize("args, message", [
    (["--pdl"], "--pdl: pdl=True (programmatic dependent launch) needs backend='triton' on a CUDA GPU of compute "
                "capability 9.0 or newer"),
    (["--pdl", "--backend", "torch"], "--pdl times the Triton backend's decode step with programmatic dependent "
                                      "launch beside the plain one; it cannot go with --backend torch"),
])
def test_bench_pdl_where_it_cannot_run_is_refused_before_timing(args, message, capsys):
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0) and "torch" not in args:
        pytest.skip("this GPU runs PDL: the refusal is for the CPU and GPUs below sm_90")
    with pytest.raises(SystemExit, match=re.escape(message)):
        main([*FAST, *args])
    assert capsys.readouterr().out == ""


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
def test_bench_pdl_times_the_triton_model_with_pdl_beside_the_plain_one(pdl_launches, monkeypatch, tmp_path):
    """--pdl adds the engine fastgpt2[triton+pdl]: the Triton model on the same weights, its decode
    steps' GEMM and attention launches with PDL, the plain engine's without (in the interpreter here,
    run as plain launches by the pdl_launches fixture)."""
    from fastgpt2 import benchmark

    _fake_step_count(monkeypatch, lambda backend: {"backend": backend, "unit": "ops", "per_layer": 1, "per_step": 1,
                                                   "total": 3, "n_layer": 1})
    by_engine = {}

    real_measure = benchmark._measure

    def measure(fns, device, runs, warmup, tick):  # each fn alone, so that its launches can be told apart
        out = []
        for i, fn in enumerate(fns):
            pdl_launches.clear()
            out += real_measure([fn], device, runs, warmup, tick)
            by_engine[i] = list(pdl_launches)
        return out

    monkeypatch.setattr(benchmark, "_measure", measure)
    out = tmp_path / "b.json"
    cfg = json.dumps(dict(n_layer=1, n_embd=64, n_head=2, vocab_size=64, n_positions=32))  # head_dim 32: the kernels'
    assert main([*FAST, "--config", cfg, "--backend", "triton", "--pdl", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["engine"] for r in rows] == ["fastgpt2[triton]", "fastgpt2[triton+pdl]", "transformers"]
    assert all(r["speedup_decode"] > 0 for r in rows[:2])
    # fns: transformers prefill, generate; triton prefill, generate; triton+pdl prefill, generate
    assert by_engine[0] == by_engine[1] == []  # transformers: no Triton kernel
    for i in (2, 3, 4):  # prefills and the plain generate: no launch with PDL
        assert by_engine[i] and not any(use or flag for _, use, flag in by_engine[i]), i
    pdl = [(name, use, flag) for name, use, flag in by_engine[5] if use or flag]
    assert pdl and all(use and flag for _, use, flag in pdl)
    assert {name for name, _, _ in pdl} == {"_linear_kernel", "_decode_attn_kernel"}

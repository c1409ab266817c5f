"""End-to-end decode tokens/sec: fastgpt2 vs transformers (eager attention) on the same seeded
random weights, in one session. GPT-2 small by default; FASTGPT2_BENCH_SMALL=1 selects a tiny
config (CI). On the CPU: fastgpt2's torch backend; on CUDA also the triton backend.

Each round starts fresh sequences (the setup, untimed: the prompt's prefill and the first token)
and times `new_tokens` greedy decode steps:
- fastgpt2: the rest of `model.stream()` (the decode step its generate() runs, CUDA-graphed on CUDA);
- transformers: the model's own forward over its DynamicCache, one token per sequence per step,
  plus argmax (no generate() bookkeeping: the reference's cheapest decode loop).
extra_info: decode tok/s, ms per step, weight GB/s and % of the memory bandwidth measured in the
same session (fastgpt2.benchmark), the speedup over transformers at the same batch, torch's CPU
capability and (fastgpt2[torch] on the CPU) the GEMM path chosen for it.
"""
from __future__ import annotations

import pytest
import torch
from benchlib import DECODE_RESULTS, DEVICE, SMALL, median_seconds

from fastgpt2.benchmark import hf_prefill_kwargs, measure_bandwidth, reference_model, sync
from fastgpt2.hf import cache_argument
from fastgpt2.runtime.config import GPT2Config, kv_read_bytes
from fastgpt2.runtime.plan import decode_weight_bytes
from fastgpt2.runtime.cpu_paths import cpu_capability
from fastgpt2.runtime.generate import GPT2
from fastgpt2.runtime.model import resolve_dtype

if SMALL:
    CONFIG = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64)
    PROMPT_LEN, NEW_TOKENS, ROUNDS, BANDWIDTH_BYTES = 8, 16, 2, 64 << 20
else:
    CONFIG = GPT2Config.from_name("gpt2")
    PROMPT_LEN, NEW_TOKENS, ROUNDS, BANDWIDTH_BYTES = 32, 32, 3, 1 << 30
DTYPE = resolve_dtype(None, DEVICE)  # fp16 on CUDA, fp32 on the CPU
BATCHES = (1, 8)
ENGINES = ("transformers", "fastgpt2[torch]", "fastgpt2[triton]")  # transformers first: the others' speedup


@pytest.fixture(scope="module")
def bandwidth() -> float:
    return measure_bandwidth(DEVICE, BANDWIDTH_BYTES)["GBps"]


@pytest.fixture(scope="module")
def engines():
    """engine name -> model, built on first use; every engine holds the same weights."""
    base = GPT2.from_config(CONFIG, device=DEVICE, dtype=DTYPE, backend="torch", seed=0)
    built = {"fastgpt2[torch]": base}

    def get(name):
        if name not in built:
            if name == "transformers":
                built[name] = reference_model(base)
            else:  # same tensors: GPT2 moves nothing already on its device and dtype
                built[name] = GPT2(CONFIG, base.plain_weights(), device=DEVICE, dtype=DTYPE, backend="triton")
        return built[name]

    return get


def _fastgpt2_round(model, ids):
    def setup():
        steps = model.stream(ids, max_new_tokens=NEW_TOKENS + 1)
        next(steps)  # prefill and the first token: not timed
        sync(DEVICE)
        return (steps,), {}

    def decode(steps):
        for _ in steps:  # NEW_TOKENS decode steps
            pass
        sync(DEVICE)

    return setup, decode


def _hf_round(hf, ids):
    prefill_kwargs = hf_prefill_kwargs(hf)
    name = cache_argument()  # "cache" from transformers 5.24, "past_key_values" before

    def setup():
        with torch.inference_mode():
            out = hf(ids, use_cache=True, **prefill_kwargs)
            tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(DEVICE)
        return (tokens, out[name]), {}

    def decode(tokens, past):
        with torch.inference_mode():
            for _ in range(NEW_TOKENS):
                out = hf(tokens, use_cache=True, **{name: past})
                past = out[name]
                tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(DEVICE)

    return setup, decode


@pytest.mark.parametrize("engine,batch", [(e, b) for b in BATCHES for e in ENGINES])
def test_decode_tokens_per_second(benchmark, engines, bandwidth, engine, batch):
    if engine == "fastgpt2[triton]" and DEVICE.type != "cuda":
        pytest.skip("the triton backend is timed on CUDA only (bench/ never times kernels in Triton's interpreter)")
    model = engines(engine)
    ids = torch.randint(0, CONFIG.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(batch))
    ids = ids.to(DEVICE)
    setup, decode = (_hf_round if engine == "transformers" else _fastgpt2_round)(model, ids)
    benchmark.group = f"decode batch {batch}"
    benchmark.pedantic(decode, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    step_s = seconds / NEW_TOKENS
    weight_gbps = decode_weight_bytes(CONFIG, batch, DTYPE) / step_s / 1e9
    info = dict(engine=engine, batch=batch, prompt_len=PROMPT_LEN, new_tokens=NEW_TOKENS,
                dtype=str(DTYPE).removeprefix("torch."), decode_tok_s=round(batch / step_s, 2),
                ms_per_step=round(1e3 * step_s, 3), weight_GB_per_s=round(weight_gbps, 2),
                roofline_pct=round(100 * weight_gbps / bandwidth, 1),
                kv_read_bytes_last_step=kv_read_bytes(CONFIG, batch, PROMPT_LEN + NEW_TOKENS, DTYPE),
                cpu_capability=cpu_capability())
    cpu_path = getattr(getattr(model, "ops", None), "cpu_path", None)  # fastgpt2[torch] on the CPU
    if cpu_path is not None:
        info["cpu_path"] = cpu_path.name
    DECODE_RESULTS.setdefault(engine, {})[batch] = batch / step_s
    ref = DECODE_RESULTS.get("transformers", {}).get(batch)
    if engine != "transformers" and ref:
        info["speedup_vs_transformers"] = round(batch / step_s / ref, 3)
    benchmark.extra_info.update(info)

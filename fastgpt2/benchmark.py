"""`fastgpt2 bench`: prefill and decode tokens/sec of fastgpt2 and transformers (eager attention) on
the same weights, in the same process, side by side.

Decode tokens/sec = batch * new_tokens / (generate time - prefill time): both sides run their
public generate() (greedy, no early stop), so the figure includes everything a user pays per
token. Each figure is the median of `runs` timed runs after `warmup` untimed ones.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from .runtime.config import PRESETS, GPT2Config
from .runtime.model import GPT2, resolve_device, resolve_dtype


@dataclass
class Row:
    engine: str  # "fastgpt2[torch]", "fastgpt2[triton]", "transformers"
    batch: int
    prefill_tok_s: float
    decode_tok_s: float
    ms_per_token: float  # per decode step (one token for every sequence of the batch)
    speedup_decode: float | None = None  # vs transformers, same batch
    speedup_prefill: float | None = None


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_seconds(fn, device, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_model(model: GPT2):
    """transformers' GPT2LMHeadModel (eager attention) holding the same weights as `model`."""
    try:
        from transformers import GPT2Config as HFConfig
        from transformers import GPT2LMHeadModel
    except ImportError as exc:
        raise SystemExit(
            "fastgpt2 bench compares against transformers, which is not installed: "
            "pip install 'fastgpt2[bench]' (or pass --no-reference to time fastgpt2 alone)"
        ) from exc
    hf_cfg = HFConfig(**model.config.to_hf_dict())
    hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="eager", dtype=model.dtype)
    state = {"transformer." + k: v for k, v in model.weights.items() if k != "lm_head.weight"}
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = model.weights["lm_head.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"reference model does not take fastgpt2's weights: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # time exactly new_tokens steps
    hf.generation_config.pad_token_id = 0
    return hf.to(model.device).eval()


def bench_pair(prefill, generate, device, batch, prompt_len, new_tokens, runs, warmup):
    """(prefill tok/s, decode tok/s, ms per decode step) from a prefill and a generate callable."""
    t_prefill = _median_seconds(prefill, device, runs, warmup)
    t_generate = _median_seconds(generate, device, runs, warmup)
    decode = max(t_generate - t_prefill, 1e-9)
    steps = new_tokens - 1  # the first new token comes from the prefill's logits
    return batch * prompt_len / t_prefill, batch * steps / decode, 1e3 * decode / steps


def run(args) -> dict:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be >= 2 (decode speed is measured over the steps after the first)")
    log = (lambda *a: print(*a, file=sys.stderr, flush=True)) if not args.quiet else (lambda *a: None)
    backends = ["torch"] if device.type == "cpu" else ["triton", "torch"]
    if args.backend:
        backends = [args.backend]
    models = {}
    for backend in backends:
        if args.model in PRESETS or args.config:
            cfg = GPT2Config(**json.loads(args.config)) if args.config else GPT2Config.from_name(args.model)
            models[backend] = GPT2.from_config(cfg, device=device, dtype=dtype, backend=backend, seed=args.seed)
        else:
            models[backend] = GPT2.from_pretrained(args.model, device=device, dtype=dtype, backend=backend)
    first = next(iter(models.values()))
    cfg = first.config
    hf = None if args.no_reference else reference_model(first)
    batches = [int(b) for b in str(args.batch).split(",")]
    if args.prompt_len + args.new_tokens > cfg.n_positions:
        raise SystemExit(f"--prompt-len + --new-tokens must be <= n_positions ({cfg.n_positions})")

    rows: list[Row] = []
    for batch in batches:
        ids = torch.randint(0, cfg.vocab_size, (batch, args.prompt_len),
                            generator=torch.Generator().manual_seed(args.seed)).to(device)
        ref = None
        if hf is not None:
            log(f"  timing transformers, batch {batch} ...")
            with torch.inference_mode():
                ref = Row("transformers", batch, *bench_pair(
                    lambda: hf(ids, use_cache=True),
                    lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                                        do_sample=False),
                    device, batch, args.prompt_len, args.new_tokens, args.runs, args.warmup))
        for backend, model in models.items():
            log(f"  timing fastgpt2[{backend}], batch {batch} ...")
            cache = model.new_cache(batch, args.prompt_len)
            lens = torch.full((batch,), args.prompt_len, dtype=torch.int32, device=device)
            row = Row(f"fastgpt2[{backend}]", batch, *bench_pair(
                lambda: model.prefill(ids, lens, cache),
                lambda: model.generate(ids, args.new_tokens),
                device, batch, args.prompt_len, args.new_tokens, args.runs, args.warmup))
            if ref is not None:
                row.speedup_decode = row.decode_tok_s / ref.decode_tok_s
                row.speedup_prefill = row.prefill_tok_s / ref.prefill_tok_s
            rows.append(row)
        if ref is not None:
            rows.append(ref)
    return {
        "machine": machine_description(device),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "model": args.model if not args.config else f"config {args.config}",
        "weights": "seeded random" if (args.model in PRESETS or args.config) else "checkpoint",
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "runs": args.runs,
        "torch": torch.__version__,
        "rows": [asdict(r) for r in rows],
    }


def format_table(result: dict) -> str:
    head = (f"fastgpt2 bench: {result['model']} ({result['weights']} weights), {result['device']} "
            f"[{result['machine']}], {result['dtype']}, prompt {result['prompt_len']}, "
            f"{result['new_tokens']} new tokens, median of {result['runs']}")
    lines = [head, "",
             "| engine | batch | prefill tok/s | decode tok/s | ms/step | decode vs transformers | prefill vs transformers |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
        lines.append(f"| {r['engine']} | {r['batch']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{r['ms_per_token']:.2f} | {ratio(r['speedup_decode'])} | {ratio(r['speedup_prefill'])} |")
    return "\n".join(lines)

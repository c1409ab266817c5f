"""`fastgpt2 bench-serving`: a serving-shaped load on the engine, the same workload under three
schedules, in one process on the same model:

- continuous: one ``Engine`` of `max_batch` slots; each request joins a free slot at the first step
  after it arrives (continuous batching);
- static: the same engine, but a batch of up to `max_batch` arrived requests starts only when the
  previous batch has finished (requests that arrive meanwhile wait);
- one at a time: an engine of one slot, requests in arrival order.

The workload is seeded: `requests` requests arriving as a Poisson process of `rate` requests/s (all at
once when rate is None), prompt and output lengths drawn uniformly from the given ranges, half of them
greedy and half sampled (temperature 0.8, top-k 50, top-p 0.95), no stop token (every request makes its
max_new_tokens). Figures per schedule: output tokens/s (all new tokens over the time from the first
arrival to the last token), time to first token (arrival to first token) and inter-token latency
(between a request's consecutive tokens), p50 and p99, in ms. Wall-clock time on the host: the step
reads its tokens back, so every step is synchronised.

run_load(LoadOptions) -> LoadResult; format_load(result) prints it. The command line is cli.py's.
"""
from __future__ import annotations

import random
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field

import torch

from .benchmark import BenchError, machine_description
from .runtime.config import PRESETS, GPT2Config
from .runtime.engine import Engine
from .runtime.generate import GPT2
from .runtime.sampling import Sampling

SCHEDULES = ("continuous", "static", "one at a time")
SAMPLED = Sampling(True, 0.8, 50, 0.95)


@dataclass(frozen=True)
class LoadOptions:
    model: str = "gpt2"  # a preset (seeded random weights) or a checkpoint directory / hub id
    device: str | None = None
    dtype: str | None = None
    backend: str = "auto"
    requests: int = 32
    rate: float | None = 4.0  # requests/s (Poisson arrivals); None: all arrive at once
    max_batch: int = 8
    prompt_lens: tuple[int, int] = (8, 64)  # inclusive range
    output_lens: tuple[int, int] = (16, 64)  # inclusive range
    seed: int = 0


@dataclass(frozen=True)
class ScheduleResult:
    schedule: str
    slots: int
    output_tokens: int
    seconds: float  # first arrival to last token
    tokens_per_s: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    tokens: list[list[int]] = field(repr=False)  # each request's new tokens, in workload order


@dataclass(frozen=True)
class LoadResult:
    options: LoadOptions
    machine: str
    device: str
    dtype: str
    backend: str
    schedules: list[ScheduleResult]

    def to_dict(self) -> dict:
        d = asdict(self)
        for s in d["schedules"]:
            s.pop("tokens")
        return d


def workload(options: LoadOptions, vocab: int) -> list[dict]:
    """The seeded requests: arrival time (s from the start), Engine.add's arguments."""
    rng = random.Random(options.seed)
    t, out = 0.0, []
    for i in range(options.requests):
        if options.rate is not None and i:
            t += rng.expovariate(options.rate)
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(*options.prompt_lens))]
        out.append(dict(arrival=t, prompt_ids=prompt, max_new_tokens=rng.randint(*options.output_lens),
                        sampling=SAMPLED if i % 2 else Sampling(), seed=options.seed * 100_003 + i))
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def run_schedule(model: GPT2, work: list[dict], schedule: str, max_batch: int) -> ScheduleResult:
    """Play the workload in real time under one schedule; returns its figures."""
    slots = 1 if schedule == "one at a time" else max_batch
    engine = Engine(model, max_batch=slots)
    warm = engine.add([0], 2)  # the first step pays one-off costs (Triton compilation on CUDA): not timed
    while engine.busy:
        engine.step()
    assert warm.finished
    pending, ready = deque(range(len(work))), deque()
    requests, index, times = {}, {}, {i: [] for i in range(len(work))}  # workload index -> Request; id -> index
    start = time.perf_counter()
    while pending or ready or engine.busy:
        now = time.perf_counter() - start
        while pending and work[pending[0]]["arrival"] <= now:
            ready.append(pending.popleft())
        if schedule == "continuous" or not engine.busy:  # static: a new batch only once the last has finished
            take = len(ready) if schedule == "continuous" else min(len(ready), slots)
            for _ in range(take):
                i = ready.popleft()
                spec = {k: v for k, v in work[i].items() if k != "arrival"}
                requests[i] = engine.add(**spec)
                index[requests[i].id] = i
        if not engine.busy:  # idle until the next arrival
            time.sleep(max(0.0, work[pending[0]]["arrival"] - (time.perf_counter() - start)))
            continue
        for request, _ in engine.step():
            times[index[request.id]].append(time.perf_counter() - start)
    total = sum(len(t) for t in times.values())
    seconds = max(t[-1] for t in times.values())
    ttft = [(t[0] - work[i]["arrival"]) * 1e3 for i, t in times.items()]
    itl = [(b - a) * 1e3 for t in times.values() for a, b in zip(t, t[1:])]
    return ScheduleResult(schedule, slots, total, seconds, total / seconds, _pct(ttft, 50), _pct(ttft, 99),
                          _pct(itl, 50), _pct(itl, 99), tokens=[requests[i].tokens for i in range(len(work))])


def _load_model(options: LoadOptions) -> GPT2:
    if options.model in PRESETS:
        return GPT2.from_config(GPT2Config.from_name(options.model), device=options.device, dtype=options.dtype,
                                backend=options.backend, seed=options.seed)
    return GPT2.from_pretrained(options.model, device=options.device, dtype=options.dtype, backend=options.backend)


def run_load(options: LoadOptions, model: GPT2 | None = None) -> LoadResult:
    for name, (lo, hi) in (("prompt lengths", options.prompt_lens), ("output lengths", options.output_lens)):
        if not 1 <= lo <= hi:
            raise BenchError(f"{name} must be a range 1 <= LO <= HI, got {lo}..{hi}")
    if options.requests < 1 or options.max_batch < 1 or (options.rate is not None and not options.rate > 0):
        raise BenchError(f"requests and max_batch must be >= 1 and rate > 0 (or none), got {options.requests}, "
                         f"{options.max_batch}, {options.rate}")
    model = model or _load_model(options)
    if options.prompt_lens[1] + options.output_lens[1] > model.config.n_positions:
        raise BenchError(f"the longest prompt plus the longest output ({options.prompt_lens[1]} + "
                         f"{options.output_lens[1]}) is past the model's n_positions ({model.config.n_positions})")
    work = workload(options, model.config.vocab_size)
    results = [run_schedule(model, work, s, options.max_batch) for s in SCHEDULES]
    return LoadResult(options, machine_description(model.device), str(model.device),
                      str(model.dtype).removeprefix("torch."), model.backend, results)


def format_load(result: LoadResult) -> str:
    o = result.options
    rate = "all at once" if o.rate is None else f"Poisson {o.rate:g} req/s"
    lines = [f"fastgpt2 bench-serving: {result.machine}; device {result.device}, {result.dtype}, backend "
             f"{result.backend}; torch {torch.__version__}",
             f"{o.requests} requests ({rate}), prompts {o.prompt_lens[0]}-{o.prompt_lens[1]} tokens, outputs "
             f"{o.output_lens[0]}-{o.output_lens[1]} tokens, half greedy / half sampled, seed {o.seed}", "",
             "| schedule | slots | output tokens | seconds | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
             "| ITL p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in result.schedules:
        lines.append(f"| {s.schedule} | {s.slots} | {s.output_tokens} | {s.seconds:.2f} | {s.tokens_per_s:.1f} | "
                     f"{s.ttft_ms_p50:.0f} | {s.ttft_ms_p99:.0f} | {s.itl_ms_p50:.1f} | {s.itl_ms_p99:.1f} |")
    base = {s.schedule: s.tokens_per_s for s in result.schedules}
    lines += ["", f"continuous batching: {base['continuous'] / base['static']:.2f}x static batching's output tok/s, "
                  f"{base['continuous'] / base['one at a time']:.2f}x one at a time, at the same offered load"]
    return "\n".join(lines)

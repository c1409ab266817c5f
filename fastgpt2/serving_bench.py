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

Closed loop (`concurrency`, e.g. 1, 4, 16, 64): C clients, each sending its next request of the same
workload as soon as its last one finished (arrival = that moment), on the engine in process ("engine") and,
with a URL, through an OpenAI-compatible server's streamed /v1/completions ("server": token-id prompts,
`ignore_eos`, the workload's seeds and sampling; time to first token and between tokens as the client reads
the server-sent events). Against `fastgpt2 serve` on the same model (`serve=True`: started here on a free
loopback port, stopped by its PID) each request's tokens must equal the engine's (`return_token_ids`): the
HTTP layer is measured on the very same work. Figures add requests/s; the server's output tok/s over the
engine's at the same concurrency is the HTTP layer's cost.

run_load(LoadOptions) -> LoadResult; format_load(result) prints it. The command line is cli.py's.
"""
from __future__ import annotations

import random
import statistics
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace

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
    concurrency: tuple[int, ...] = ()  # closed-loop levels (empty: the Poisson schedules above)
    url: str | None = None  # an OpenAI-compatible server to load at each level (with concurrency)
    serve: bool = False  # start `fastgpt2 serve` on this model and load it (with concurrency)
    served_model: str | None = None  # the model name the server expects (default: none sent)


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
    tokens: list[list[int]] = field(repr=False)
    concurrency: int | None = None  # closed-loop clients (None: the Poisson schedules)
    requests_per_s: float | None = None
    same_tokens_as_engine: bool | None = None  # server rows against fastgpt2 serve: every request's tokens equal  # each request's new tokens, in workload order


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
    return _figures(schedule, slots, times, [w["arrival"] for w in work], [requests[i].tokens for i in range(len(work))])


def _figures(schedule: str, slots: int, times: dict[int, list[float]], arrivals: list[float],
             tokens: list[list[int]], concurrency: int | None = None, first: float = 0.0) -> ScheduleResult:
    """The figures of one run from each request's token times (s from the start), arrivals and tokens;
    the run lasts from `first` (its first arrival) to its last token."""
    total = sum(len(t) for t in times.values())
    seconds = max(t[-1] for t in times.values() if t) - first
    ttft = [(t[0] - arrivals[i]) * 1e3 for i, t in times.items() if t]
    itl = [(b - a) * 1e3 for t in times.values() for a, b in zip(t, t[1:])]
    return ScheduleResult(schedule, slots, total, seconds, total / seconds, _pct(ttft, 50), _pct(ttft, 99),
                          _pct(itl, 50), _pct(itl, 99), tokens=tokens, concurrency=concurrency,
                          requests_per_s=len(times) / seconds)


def _add(engine: Engine, spec: dict):
    return engine.add(**{k: v for k, v in spec.items() if k != "arrival"})


def run_closed_loop(model: GPT2, work: list[dict], concurrency: int, max_batch: int) -> ScheduleResult:
    """`concurrency` clients on the engine in process: each sends its next request of `work` (in order)
    the moment its last one finished."""
    engine = Engine(model, max_batch=max_batch)
    warm = engine.add([0], 2)  # the first step pays one-off costs: not timed
    while engine.busy:
        engine.step()
    assert warm.finished
    requests, index, times, arrivals = {}, {}, {i: [] for i in range(len(work))}, [0.0] * len(work)
    start, sent = time.perf_counter(), 0

    def send(now: float) -> None:
        nonlocal sent
        requests[sent] = _add(engine, work[sent])
        index[requests[sent].id], arrivals[sent] = sent, now
        sent += 1

    while sent < min(concurrency, len(work)):
        send(0.0)
    while engine.busy:
        for request, _ in engine.step():
            now = time.perf_counter() - start
            times[index[request.id]].append(now)
            if request.finished and sent < len(work):
                send(now)
    return _figures("engine", max_batch, times, arrivals, [requests[i].tokens for i in range(len(work))], concurrency)


def _body(spec: dict, model_name: str | None) -> dict:
    """The workload request as a streamed /v1/completions body."""
    sampling = spec["sampling"]
    body = {"prompt": spec["prompt_ids"], "max_tokens": spec["max_new_tokens"], "stream": True, "seed": spec["seed"],
            "temperature": sampling.temperature if sampling.do_sample else 0, "ignore_eos": True,
            "return_token_ids": True}
    if sampling.do_sample:
        body |= {"top_k": sampling.top_k or -1, "top_p": sampling.top_p or 1.0}
    if model_name is not None:
        body["model"] = model_name
    return body


def run_http(url: str, work: list[dict], concurrency: int, max_batch: int, model_name: str | None = None) -> ScheduleResult:
    """`concurrency` clients (one asyncio task each, httpx) streaming `work` from the server at `url`: the
    times at which each request's server-sent events arrive (a chunk's tokens: its `token_ids` when the
    server returns them, else one per chunk with text); a connection per request."""
    import asyncio
    import json

    try:
        import httpx
    except ImportError:
        raise BenchError("loading a server needs httpx: pip install 'fastgpt2[bench]'") from None
    times, arrivals, tokens = {i: [] for i in range(len(work))}, [0.0] * len(work), [[] for _ in work]

    async def load() -> None:
        order = iter(range(len(work)))
        # a connection per request: reusing one can race the server's closing it when idle (seen with
        # llama-server and uvicorn), and the bench must not fail on it
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=url.rstrip("/"), timeout=600, limits=limits) as client:
            start = time.perf_counter()

            async def one_client() -> None:
                for i in order:
                    arrivals[i] = time.perf_counter() - start
                    async with client.stream("POST", "/v1/completions", json=_body(work[i], model_name)) as r:
                        if r.status_code != 200:
                            raise BenchError(f"the server answered {r.status_code}: {(await r.aread()).decode()[:300]}")
                        async for line in r.aiter_lines():
                            if not line.startswith("data: ") or line == "data: [DONE]":
                                continue
                            chunk = json.loads(line[len("data: "):])
                            if "error" in chunk:
                                raise BenchError(f"the server's stream failed: {chunk['error']}")
                            choice = chunk["choices"][0] if chunk.get("choices") else {}
                            ids = choice.get("token_ids")
                            count = len(ids) if ids is not None else int(bool(choice.get("text")))
                            now = time.perf_counter() - start
                            times[i] += [now] * count
                            tokens[i] += ids or []

            await asyncio.gather(*(one_client() for _ in range(min(concurrency, len(work)))))

    try:
        asyncio.run(load())
    except httpx.HTTPError as exc:
        raise BenchError(f"the server at {url} failed: {type(exc).__name__}: {exc}") from None
    return _figures("server", max_batch, times, arrivals, tokens, concurrency)


def _start_server(options: LoadOptions) -> tuple[object, str]:
    """`fastgpt2 serve` on this load's model on a free loopback port, up (its /health answers)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "fastgpt2", "serve", "--model", options.model, "--port", str(port),
               "--max-batch", str(options.max_batch), "--backend", options.backend]
    command += ["--load-format", "dummy", "--seed", str(options.seed)] if options.model in PRESETS else []
    command += ["--device", options.device] if options.device else []
    command += ["--dtype", options.dtype] if options.dtype else []
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop_server(proc)
                raise BenchError(f"fastgpt2 serve did not start:\n{proc.stdout.read()}") from None
            time.sleep(0.3)


def _stop_server(proc) -> None:
    proc.terminate()  # by its PID
    try:
        proc.wait(timeout=30)
    except Exception:
        proc.kill()
        proc.wait()


def _load_model(options: LoadOptions) -> GPT2:
    if options.model in PRESETS:
        return GPT2.from_config(GPT2Config.from_name(options.model), device=options.device, dtype=options.dtype,
                                backend=options.backend, seed=options.seed)
    return GPT2.from_pretrained(options.model, device=options.device, dtype=options.dtype, backend=options.backend)


def run_load(options: LoadOptions, model: GPT2 | None = None) -> LoadResult:
    for name, (lo, hi) in (("prompt lengths", options.prompt_lens), ("output lengths", options.output_lens)):
        if not 1 <= lo <= hi:
            raise BenchError(f"{name} must be a range 1 <= LO <= HI, got {lo}..{hi}")
    if any(c < 1 for c in options.concurrency) or ((options.url or options.serve) and not options.concurrency):
        raise BenchError(f"concurrency levels must be >= 1, and a server is loaded at concurrency levels only; got "
                         f"{list(options.concurrency)}")
    if options.url and options.serve:
        raise BenchError("give a server's url or serve=True (start fastgpt2 serve here), not both")
    if options.requests < 1 or options.max_batch < 1 or (options.rate is not None and not options.rate > 0):
        raise BenchError(f"requests and max_batch must be >= 1 and rate > 0 (or none), got {options.requests}, "
                         f"{options.max_batch}, {options.rate}")
    model = model or _load_model(options)
    if options.prompt_lens[1] + options.output_lens[1] > model.config.n_positions:
        raise BenchError(f"the longest prompt plus the longest output ({options.prompt_lens[1]} + "
                         f"{options.output_lens[1]}) is past the model's n_positions ({model.config.n_positions})")
    work = workload(options, model.config.vocab_size)
    if not options.concurrency:
        results = [run_schedule(model, work, s, options.max_batch) for s in SCHEDULES]
    else:
        results, proc, url = [], None, options.url
        if options.serve:
            proc, url = _start_server(options)
        try:
            for c in options.concurrency:
                results.append(run_closed_loop(model, work, c, options.max_batch))
                if url is not None:
                    served = run_http(url, work, c, options.max_batch, options.served_model)
                    if options.serve:
                        served = replace(served, same_tokens_as_engine=served.tokens == results[-1].tokens)
                    results.append(served)
        finally:
            if proc is not None:
                _stop_server(proc)
    return LoadResult(options, machine_description(model.device), str(model.device),
                      str(model.dtype).removeprefix("torch."), model.backend, results)


def format_load(result: LoadResult) -> str:
    o = result.options
    arrivals = (f"closed loop at concurrency {', '.join(map(str, o.concurrency))}" if o.concurrency else
                "all at once" if o.rate is None else f"Poisson {o.rate:g} req/s")
    lines = [f"fastgpt2 bench-serving: {result.machine}; device {result.device}, {result.dtype}, backend "
             f"{result.backend}; torch {torch.__version__}",
             f"{o.requests} requests ({arrivals}), prompts {o.prompt_lens[0]}-{o.prompt_lens[1]} tokens, outputs "
             f"{o.output_lens[0]}-{o.output_lens[1]} tokens, half greedy / half sampled, seed {o.seed}", ""]
    if not o.concurrency:
        lines += ["| schedule | slots | output tokens | seconds | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
                  "| ITL p99 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in result.schedules:
            lines.append(f"| {s.schedule} | {s.slots} | {s.output_tokens} | {s.seconds:.2f} | {s.tokens_per_s:.1f} | "
                         f"{s.ttft_ms_p50:.0f} | {s.ttft_ms_p99:.0f} | {s.itl_ms_p50:.1f} | {s.itl_ms_p99:.1f} |")
        base = {s.schedule: s.tokens_per_s for s in result.schedules}
        lines += ["", f"continuous batching: {base['continuous'] / base['static']:.2f}x static batching's output "
                      f"tok/s, {base['continuous'] / base['one at a time']:.2f}x one at a time, at the same offered load"]
        return "\n".join(lines)
    where = "fastgpt2 serve (started here)" if o.serve else o.url
    lines += [f"engine: in process, {o.max_batch} slots" + (f"; server: {where}" if where else ""), "",
              "| concurrency | run | requests/s | output tok/s | vs engine | TTFT p50 ms | TTFT p99 ms | ITL p50 ms "
              "| ITL p99 ms | tokens = engine's |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    engine = {s.concurrency: s.tokens_per_s for s in result.schedules if s.schedule == "engine"}
    for s in result.schedules:
        same = {None: "", True: "yes", False: "**no**"}[s.same_tokens_as_engine]
        lines.append(f"| {s.concurrency} | {s.schedule} | {s.requests_per_s:.2f} | {s.tokens_per_s:.1f} | "
                     f"{s.tokens_per_s / engine[s.concurrency]:.2f}x | {s.ttft_ms_p50:.0f} | {s.ttft_ms_p99:.0f} | "
                     f"{s.itl_ms_p50:.1f} | {s.itl_ms_p99:.1f} | {same} |")
    return "\n".join(lines)

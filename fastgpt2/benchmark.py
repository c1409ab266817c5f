"""`fastgpt2 bench`: prefill and decode tokens/sec of fastgpt2 (each backend the device runs) and
transformers (eager attention) on the same weights, in the same process, side by side, against the
memory-bandwidth roofline measured in the same run.

Figures (each timed figure is the median of `runs` timed runs after `warmup` untimed ones; timers
are device-synchronised, CUDA events on CUDA). The engines are timed round-robin (each round runs
every engine's prefill and generate once), so the machine's drift during a run falls on all of
them alike instead of on whichever ran last:

- prefill tok/s: batch * prompt_len / prefill time. fastgpt2: ``model.prefill`` into a cache;
  transformers: ``forward(use_cache=True, logits_to_keep=1)``, as its generate() runs the prompt.
- decode tok/s: batch * (new_tokens - 1) / (generate time - prefill time). Both sides run their
  public generate() (greedy, no early stop), so the figure holds everything a user pays per token;
  the first new token comes from the prefill's logits, so new_tokens - 1 decode steps remain.
- ms/token: one decode step (a new token for every sequence of the batch), in ms.
- weight GB/s: ``decode_weight_bytes`` (runtime/plan.py) / step time; % roofline: that over the
  memory bandwidth ``measure_bandwidth`` measured in this run (the decode step cannot read its
  weights faster).
- KV read/step: ``kv_read_bytes`` (runtime/config.py) of the last decode step (K and V of every
  cached position).
- setup s: the first (cold) prefill + generate call, kept out of the steady-state figures; on CUDA
  it holds Triton's compilation and CUDA-graph capture.

With ``pdl`` (``fastgpt2 bench --pdl``, CUDA sm_90+) the Triton model is timed a second time with
programmatic dependent launch (``GPT2(..., pdl=True)``, same tensors), as engine ``fastgpt2[triton+pdl]``.

run(BenchOptions) -> BenchResult (its to_dict() is `fastgpt2 bench --json`); format_table() and
plot_decode() show it. The command line is cli.py's.
"""
from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace

import torch

from .errors import BackendError, FastGPT2Error
from .runtime.config import PRESETS, GPT2Config, kv_read_bytes
from .runtime.plan import decode_weight_bytes
from .runtime.cpu_paths import cpu_capability, cpu_features
from .runtime.generate import GPT2
from .runtime.model import resolve_device, resolve_dtype
from .runtime.ops import resolve_pdl
from .runtime.step_count import step_count

PIP_BENCH = "pip install 'fastgpt2[bench]'"


class BenchError(FastGPT2Error):
    """A benchmark that cannot start: bad options, or the reference / plot's package not installed."""


# --------------------------------------------------------------------------------------------
# Timing and the machine
# --------------------------------------------------------------------------------------------
def _cpu_name() -> str | None:
    """The first "model name" of /proc/cpuinfo (None where there is none). Its name only: the CPU's
    features come from CPUID (cpu_paths.cpu_features)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's "model name", else platform.processor() (else the machine)."""
    return _cpu_name() or platform.processor() or platform.machine() or "unknown CPU"


def machine_description(device: torch.device) -> str:
    """The GPU's name (compute capability, memory) or the CPU's model name (its vector extensions as
    CPUID reports them, threads)."""
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
    isa = cpu_features()
    return f"{cpu_model()}{' (' + ', '.join(isa) + ')' if isa else ''}, {torch.get_num_threads()} threads"


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device) -> float:
    """Seconds one call of fn takes on the device: CUDA events on CUDA, perf_counter on the CPU,
    synchronised before and after."""
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, runs: int = 5) -> dict:
    """Memory read bandwidth as torch reaches it when streaming weights: a matrix-vector product
    over an fp32 [rows, 4096] matrix of `nbytes` (decode's own access pattern; on CPUs a plain
    reduction such as torch.sum is compute-bound below the memory's speed), timed `runs` times
    after one warm-up; the median. Bytes counted: the matrix, read once per product."""
    device = torch.device(device)
    cols = 4096
    rows = max(1, nbytes // (4 * cols))
    matrix = torch.ones(rows, cols, dtype=torch.float32, device=device)
    vector = torch.ones(cols, dtype=torch.float32, device=device)
    with torch.inference_mode():
        torch.mv(matrix, vector)
        times = [time_call(lambda: torch.mv(matrix, vector), device) for _ in range(runs)]
    seconds = statistics.median(times)
    return {"GBps": 4 * rows * cols / seconds / 1e9, "bytes": 4 * rows * cols, "runs": runs,
            "method": "torch.mv over an fp32 [rows, 4096] matrix"}


def _measure(fns: list, device, runs: int, warmup: int, tick) -> list[tuple[float, float, list[float]]]:
    """Time several calls side by side, round-robin: each round calls every fn once, in order, so
    that the machine's drift (other tenants, memory bandwidth, clocks) lands on every engine alike
    and their ratio stays honest. Per fn: (first call's seconds, median of the timed runs, the
    timed runs). The first call is the setup run: a warm-up when warmup >= 1, else also the first
    timed run."""
    firsts = []
    for fn in fns:
        firsts.append(time_call(fn, device))
        tick()
    for _ in range(warmup - 1):
        for fn in fns:
            fn()
            tick()
    times = [[first] if warmup == 0 else [] for first in firsts]
    while len(times[0]) < runs:
        for fn, kept in zip(fns, times):
            kept.append(time_call(fn, device))
            tick()
    return [(first, statistics.median(kept), kept) for first, kept in zip(firsts, times)]


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------
def reference_model(model: GPT2):
    """transformers' GPT2LMHeadModel (eager attention) holding the same weights as `model`."""
    try:
        from transformers import GPT2Config as HFConfig
        from transformers import GPT2LMHeadModel
    except ImportError as exc:
        raise BenchError(
            "fastgpt2 bench compares against transformers, which is not installed: "
            f"{PIP_BENCH} (or pass --no-reference to time fastgpt2 alone)"
        ) from exc
    hf_dict = model.config.to_hf_dict()
    for key in ("bos_token_id", "eos_token_id"):  # tiny test vocabularies lack GPT-2's 50256
        if hf_dict[key] is not None and not 0 <= hf_dict[key] < hf_dict["vocab_size"]:
            hf_dict[key] = None
    hf_cfg = HFConfig(**hf_dict)
    hf = GPT2LMHeadModel._from_config(hf_cfg, attn_implementation="eager", dtype=model.dtype)
    weights = model.plain_weights()
    state = {"transformer." + k: v for k, v in weights.items() if k != "lm_head.weight"}
    if not model.config.tie_word_embeddings:
        state["lm_head.weight"] = weights["lm_head.weight"]
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"reference model does not take fastgpt2's weights: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    hf.generation_config.eos_token_id = None  # time exactly new_tokens steps
    hf.generation_config.pad_token_id = 0
    return hf.to(model.device).eval()


def hf_prefill_kwargs(hf) -> dict:
    """forward() arguments for transformers' prefill as its generate() runs it: only the last
    position's logits when the model takes logits_to_keep (transformers >= 4.50)."""
    import inspect

    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(hf.forward).parameters else {}


# --------------------------------------------------------------------------------------------
# What a decode step runs (fastgpt2.runtime.step_count)
# --------------------------------------------------------------------------------------------
def step_counts(backends: list[str], progress=None) -> dict:
    """{backend: step_count(backend) as a dict}; a backend that cannot be counted maps to
    {"backend": b, "error": why} (printed, never fatal to the bench)."""
    out = {}
    for backend in backends:
        if progress is not None:
            progress.stage(f"decode step count ({backend})")
        try:
            out[backend] = step_count(backend).to_dict()
        except Exception as exc:  # noqa: BLE001 - reported in the output, the timings stand
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            why = lines[-1] if lines else ""  # a failed subprocess's traceback ends with its cause
            out[backend] = {"backend": backend, "error": f"{type(exc).__name__}: {why}"[:300]}
        if progress is not None:
            progress.tick()
    return out


_UNITS = {"kernels": "kernels the GPU ran (torch.profiler)",
          "ops": "ops: Triton launches + aten ops (on CUDA each is at least one kernel)"}


def format_step_count(backend: str, count: dict) -> str:
    if "error" in count:
        return f"decode step (backend={backend}): not counted: {count['error']}"
    unit = count["unit"]
    fusions = ", ".join(count.get("fusions") or []) or "none"
    return (f"decode step (backend={backend}): {count['per_layer']} {unit} per layer + {count['per_step']} per step "
            f"= {count['total']} ({count['n_layer']} layers); {_UNITS.get(unit, unit)}; fusions: {fusions}")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchOptions:
    """What `fastgpt2 bench` times (cli.py builds it from the command line; the defaults are its own)."""

    model: str = "gpt2"  # a checkpoint directory or hub id, or a preset name (seeded random weights)
    config: str | None = None  # a GPT2Config as a JSON object instead of `model` (seeded random weights)
    device: str | None = None  # None: cuda when available
    dtype: str | None = None  # None: float16 on CUDA, float32 on the CPU
    backend: str | None = None  # None: every backend the device runs (triton and torch on CUDA)
    batches: tuple[int, ...] | None = None  # None: 1, 8, 32 on CUDA; 1, 8 on the CPU
    prompt_len: int = 32
    new_tokens: int = 128
    runs: int = 3  # timed runs per figure (the median is reported)
    warmup: int = 1  # untimed runs before timing (the first is reported as setup)
    seed: int = 0
    reference: bool = True  # time transformers too
    step_count: bool = True  # count what the decode step runs (fastgpt2.runtime.step_count)
    bandwidth_gib: float = 1.0  # size of the tensor read to measure memory bandwidth
    progress: bool = True  # progress on stderr
    pdl: bool = False  # also time the Triton decode step with programmatic dependent launch (sm_90+)


@dataclass(frozen=True)
class Row:
    engine: str  # "fastgpt2[torch]", "fastgpt2[triton]", "fastgpt2[triton+pdl]", "transformers"
    batch: int
    prefill_tok_s: float
    decode_tok_s: float
    ms_per_token: float  # per decode step (one token for every sequence of the batch)
    weight_GBps: float  # decode_weight_bytes / step time
    roofline_pct: float | None  # weight_GBps over the measured memory bandwidth, in %
    kv_read_bytes: int  # K/V bytes the last decode step reads
    setup_s: float  # first (cold) prefill + generate call
    speedup_decode: float | None = None  # vs transformers, same batch
    speedup_prefill: float | None = None
    prefill_runs_s: tuple[float, ...] = ()
    generate_runs_s: tuple[float, ...] = ()


@dataclass(frozen=True)
class BenchResult:
    """One bench run: the machine, what was timed, and a Row per engine and batch."""

    machine: str
    cpu_model: str
    cpu_capability: str
    cpu_path: str | None  # the torch backend's GEMM path on the CPU; None off the CPU
    device: str
    dtype: str
    model: str
    weights: str  # "seeded random" or "checkpoint"
    config: dict  # n_layer, n_embd, n_head, vocab_size, parameters
    batches: tuple[int, ...]
    prompt_len: int
    new_tokens: int
    runs: int
    warmup: int
    torch: str  # torch.__version__
    bandwidth: dict  # measure_bandwidth()
    weight_bytes_per_step: dict[str, int]  # str(batch) -> decode_weight_bytes
    rows: tuple[Row, ...]  # per batch: the fastgpt2 backends, then transformers
    step_count: dict  # backend -> step_counts()'s entry

    def to_dict(self) -> dict:
        """The result as `fastgpt2 bench --json` writes it."""
        out = asdict(self)
        out["batches"], out["rows"] = list(self.batches), [asdict(r) for r in self.rows]
        for row in out["rows"]:
            row["prefill_runs_s"], row["generate_runs_s"] = list(row["prefill_runs_s"]), list(row["generate_runs_s"])
        return out


class _Progress:
    """A tqdm bar on stderr; silent when disabled. tqdm comes with the bench extra, which a
    reference-free run (--no-reference) does not need: without tqdm, plain stage lines."""

    def __init__(self, total: int, enabled: bool):
        self.enabled, self.bar = enabled, None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, file=sys.stderr, unit="call", leave=False, dynamic_ncols=True)

    def stage(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif self.enabled:
            print(f"  {text} ...", file=sys.stderr, flush=True)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def require_matplotlib() -> None:
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError(f"--plot needs matplotlib, which is not installed: {PIP_BENCH}")


def run(options: BenchOptions) -> BenchResult:
    o = options
    try:
        device = resolve_device(o.device)
        dtype = resolve_dtype(o.dtype, device)
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if o.new_tokens < 2:
        raise BenchError("--new-tokens must be >= 2 (decode speed is measured over the steps after the first)")
    if o.runs < 1 or o.warmup < 0:
        raise BenchError("--runs must be >= 1 and --warmup >= 0")
    if o.prompt_len < 1:
        raise BenchError("--prompt-len must be >= 1")
    batches = list(o.batches) if o.batches is not None else ([1, 8, 32] if device.type == "cuda" else [1, 8])
    if not batches or min(batches) < 1:
        raise BenchError(f"--batch takes comma-separated positive integers (e.g. 1,8,32), "
                         f"got {','.join(map(str, batches))!r}")
    backends = [o.backend] if o.backend else (["torch"] if device.type == "cpu" else ["triton", "torch"])
    if o.pdl:
        if o.backend == "torch":
            raise BenchError("--pdl times the Triton backend's decode step with programmatic dependent launch beside "
                             "the plain one; it cannot go with --backend torch: drop one of them")
        try:
            resolve_pdl(True, "triton", device)  # before any weights load
        except BackendError as exc:
            raise BenchError(f"--pdl: {exc} (drop --pdl)") from None
    if o.config:
        try:
            cfg = GPT2Config(**json.loads(o.config))
        except (json.JSONDecodeError, TypeError) as exc:
            raise BenchError(f"--config must be a JSON object of GPT2Config fields, e.g. "
                             f"'{{\"n_layer\": 2, \"n_embd\": 64, \"n_head\": 4}}': {exc}") from None
    if not o.bandwidth_gib > 0:
        raise BenchError("--bandwidth-gib must be > 0 (1 GiB or more measures the memory, not a cache)")
    random_weights = bool(o.config) or o.model in PRESETS
    if random_weights:
        first = GPT2.from_config(cfg if o.config else GPT2Config.from_name(o.model),
                                 device=device, dtype=dtype, backend=backends[0], seed=o.seed)
    else:
        first = GPT2.from_pretrained(o.model, device=device, dtype=dtype, backend=backends[0])
    cfg = first.config
    models = {first.backend: first}
    for backend in backends[1:]:  # the same tensors: nothing is copied (CUDA: no backend packs its weights)
        model = GPT2(cfg, first.plain_weights(), device=device, dtype=dtype, backend=backend)
        models.setdefault(model.backend, model)
    engine_models = dict(models)  # engine name (in brackets) -> model; the step count is per backend
    if o.pdl:  # the Triton model again, on the same tensors, its decode steps launched with PDL
        engine_models["triton+pdl"] = GPT2(cfg, first.plain_weights(), device=device, dtype=dtype, backend="triton",
                                           pdl=True)
    if o.prompt_len + o.new_tokens > cfg.n_positions:
        raise BenchError(f"--prompt-len + --new-tokens must be <= n_positions ({cfg.n_positions})")
    hf = reference_model(first) if o.reference else None
    # the triton step is counted on any machine (under the interpreter without CUDA): the GPU decode
    # step's op count, even where only the torch backend is timed
    counted_backends = list(dict.fromkeys(["triton", *models])) if o.step_count else []

    n_engines = len(engine_models) + (hf is not None)
    progress = _Progress(1 + len(batches) * n_engines * 2 * (o.warmup + o.runs) + len(counted_backends),
                         enabled=o.progress)
    try:
        progress.stage(f"memory bandwidth ({o.bandwidth_gib:g} GiB read)")
        bandwidth = measure_bandwidth(device, int(o.bandwidth_gib * 2**30))
        progress.tick()
        rows: list[Row] = []
        for batch in batches:
            ids = torch.randint(0, cfg.vocab_size, (batch, o.prompt_len),
                                generator=torch.Generator().manual_seed(o.seed)).to(device)
            weight_bytes = decode_weight_bytes(cfg, batch, dtype)
            kv_bytes = kv_read_bytes(cfg, batch, o.prompt_len + o.new_tokens - 1, dtype)

            # (engine, prefill, generate) for transformers (the reference, when there is one) and
            # each fastgpt2 backend; all timed in one round-robin so that drift hits them alike
            engines = []
            if hf is not None:
                mask = torch.ones_like(ids)
                kwargs = hf_prefill_kwargs(hf)
                engines.append(("transformers", lambda: hf(ids, use_cache=True, **kwargs),
                                lambda: hf.generate(ids, attention_mask=mask, max_new_tokens=o.new_tokens,
                                                    do_sample=False)))
            for name, model in engine_models.items():
                cache = model.new_cache(batch, o.prompt_len)
                lens = torch.full((batch,), o.prompt_len, dtype=torch.int32, device=device)
                engines.append((f"fastgpt2[{name}]",
                                lambda model=model, cache=cache, lens=lens: model.prefill(ids, lens, cache),
                                lambda model=model: model.generate(ids, o.new_tokens)))
            progress.stage(f"batch {batch}: " + ", ".join(name for name, _, _ in engines) + " (round-robin)")
            with torch.inference_mode():
                timings = _measure([fn for _, prefill, generate in engines for fn in (prefill, generate)],
                                   device, o.runs, o.warmup, progress.tick)
            by_engine = {}
            for i, (engine, _, _) in enumerate(engines):
                (p_first, t_prefill, p_runs), (g_first, t_generate, g_runs) = timings[2 * i], timings[2 * i + 1]
                step_s = max(t_generate - t_prefill, 1e-9) / (o.new_tokens - 1)
                weight_gbps = weight_bytes / step_s / 1e9
                by_engine[engine] = Row(
                    engine=engine, batch=batch, prefill_tok_s=batch * o.prompt_len / t_prefill,
                    decode_tok_s=batch / step_s, ms_per_token=1e3 * step_s, weight_GBps=weight_gbps,
                    roofline_pct=100 * weight_gbps / bandwidth["GBps"], kv_read_bytes=kv_bytes,
                    setup_s=p_first + g_first, prefill_runs_s=tuple(p_runs), generate_runs_s=tuple(g_runs))
            ref = by_engine.pop("transformers", None)
            for row in by_engine.values():
                if ref is not None:
                    row = replace(row, speedup_decode=row.decode_tok_s / ref.decode_tok_s,
                                  speedup_prefill=row.prefill_tok_s / ref.prefill_tok_s)
                rows.append(row)
            if ref is not None:
                rows.append(ref)
        counts = step_counts(counted_backends, progress) if counted_backends else {}
    finally:
        progress.close()
    torch_model = models.get("torch")
    cpu_path = torch_model.ops.cpu_path if torch_model is not None else None  # None off the CPU
    return BenchResult(
        machine=machine_description(device),
        cpu_model=cpu_model(),
        cpu_capability=cpu_capability(),
        cpu_path=cpu_path.name if cpu_path is not None else None,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        model=o.model if not o.config else f"config {o.config}",
        weights="seeded random" if random_weights else "checkpoint",
        config={"n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
                "vocab_size": cfg.vocab_size, "parameters": cfg.num_parameters()},
        batches=tuple(batches),
        prompt_len=o.prompt_len,
        new_tokens=o.new_tokens,
        runs=o.runs,
        warmup=o.warmup,
        torch=torch.__version__,
        bandwidth=bandwidth,
        weight_bytes_per_step={str(b): decode_weight_bytes(cfg, b, dtype) for b in batches},
        rows=tuple(rows),
        step_count=counts,
    )


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------
def _fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.3g}"


def format_table(result: BenchResult) -> str:
    cfg = result.config
    shape = (f"; {cfg['n_layer']} layers, n_embd {cfg['n_embd']}, {cfg['parameters'] / 1e6:.1f}M params"
             if cfg else "")
    bw = result.bandwidth
    batch1 = result.batches[0]
    wbytes = result.weight_bytes_per_step[str(batch1)]
    lines = [
        f"fastgpt2 bench: {result.model} ({result.weights} weights{shape})",
        f"machine: {result.machine} | device {result.device} | dtype {result.dtype} | torch {result.torch}",
        f"CPU: {result.cpu_model} | capability {result.cpu_capability} | "
        f"CPU path: {result.cpu_path or 'none (no torch backend on the CPU)'}",
        f"batch {','.join(map(str, result.batches))} | prompt {result.prompt_len} | new tokens "
        f"{result.new_tokens} | median of {result.runs} runs after {result.warmup} warm-up",
        f"memory bandwidth: {bw['GBps']:.1f} GB/s measured ({bw['method']}, {bw['bytes'] / 2**30:.2f} GiB, "
        f"median of {bw['runs']})",
        f"decode reads {_fmt_bytes(wbytes)} of weights per step at batch {batch1}: roofline "
        f"{bw['GBps'] * 1e9 / wbytes:,.1f} steps/s",
        "",
        "| engine | batch | prefill tok/s | decode tok/s | ms/token | weight GB/s | % roofline | KV read/step "
        "| setup s | decode vs transformers | prefill vs transformers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ratio = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
    for r in result.rows:
        pct = f"{r.roofline_pct:.1f}%" if r.roofline_pct is not None else "-"
        lines.append(
            f"| {r.engine} | {r.batch} | {r.prefill_tok_s:,.0f} | {r.decode_tok_s:,.1f} | "
            f"{r.ms_per_token:.2f} | {_fmt_num(r.weight_GBps)} | {pct} | {_fmt_bytes(r.kv_read_bytes)} | "
            f"{r.setup_s:.2f} | {ratio(r.speedup_decode)} | {ratio(r.speedup_prefill)} |")
    lines.append("")
    speedups = {}
    for r in result.rows:
        if r.speedup_decode is not None:
            speedups.setdefault(r.engine, []).append(
                f"decode {r.speedup_decode:.2f}x, prefill {r.speedup_prefill:.2f}x at batch {r.batch}")
    for engine, parts in speedups.items():
        lines.append(f"{engine} vs transformers (same weights, same batch, same run): {'; '.join(parts)}")
    lines.append("ms/token: one decode step (a token for every sequence). % roofline: weight bytes per step / "
                 "step time / measured bandwidth.")
    lines.append(f"KV read/step: K and V of the last decode step ({result.prompt_len + result.new_tokens - 1} "
                 "positions per sequence), not in weight GB/s. setup s: the first (cold) prefill + generate, "
                 "outside the medians (on CUDA: Triton compilation, CUDA-graph capture).")
    for backend, count in result.step_count.items():
        lines.append(format_step_count(backend, count))
    return "\n".join(lines)


def plot_decode(result: BenchResult, path: str) -> None:
    """A PNG bar chart: decode tok/s per engine, one panel per batch, each fastgpt2 bar labelled
    with its speedup over transformers; the panel title gives the weight-read roofline."""
    require_matplotlib()
    from matplotlib.figure import Figure

    batches = result.batches
    engines = list(dict.fromkeys(r.engine for r in result.rows))
    colours = {e: c for e, c in zip(engines, ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b"))}
    colours["transformers"] = "#ff7f0e"
    fig = Figure(figsize=(1.2 + 3.3 * len(batches), 4.6), layout="constrained")
    axes = fig.subplots(1, len(batches), squeeze=False)[0]
    for ax, batch in zip(axes, batches):
        rows = [r for r in result.rows if r.batch == batch]
        names = [r.engine for r in rows]
        values = [r.decode_tok_s for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[colours[n] for n in names], width=0.65)
        for bar, r in zip(bars, rows):
            label = _fmt_num(r.decode_tok_s)
            if r.speedup_decode is not None:
                label += f"\n{r.speedup_decode:.2f}x"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        xytext=(0, 2), textcoords="offset points", fontsize=9,
                        fontweight="bold" if r.speedup_decode is not None else "normal")
        ax.set_xticks(range(len(rows)), names, rotation=15, fontsize=8)
        ax.set_ylim(0, max(values) * 1.25)
        roof = result.bandwidth["GBps"] * 1e9 / result.weight_bytes_per_step[str(batch)] * batch
        ax.set_title(f"batch {batch}\n(weight-read roofline {roof:,.0f} tok/s)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("decode tokens/s (higher is better)")
    fig.suptitle(f"fastgpt2 bench: {result.model}, {result.device} [{result.machine}], {result.dtype}, "
                 f"prompt {result.prompt_len}, {result.new_tokens} new, median of {result.runs}\n"
                 "bar labels: decode tok/s and, for fastgpt2, its speedup over transformers (same batch, same run)",
                 fontsize=9, wrap=True)
    fig.savefig(path, dpi=120)

"""One prepared GPU check: ``tools/gpu_check.sh`` on a lent GPU machine (one H200, no network; run
from the repository root, fastgpt2 not installed: the wrapper sets PYTHONPATH).

Every stage runs as its own subprocess with its own timeout (a hang costs one stage, not the run;
on a timeout the stage's whole process group is killed). Each stage's stdout/stderr go to
``$OUT/<stage>.out`` / ``$OUT/<stage>.err`` (OUT: env var, default ./gpu_check_out), everything is
collected in ``$OUT/gpu_check.json``, and a summary table (stage, status, seconds, one-line result)
is printed at the end. Exit status 0 only when no stage failed or timed out (skipped is no failure).

Stages and their timeouts on an H200 (sum 390 s = 6 min 30 s; the whole run is also capped by
``--budget``, default 400 s: a stage gets at most what is left of it):

=====================  =======  ================================================================
stage                  timeout  what
=====================  =======  ================================================================
environment              15 s   python/torch/triton/transformers versions, GPU, SMs, memory,
                                nvidia-smi; decides whether CUDA is there
gpu_tests                50 s   pytest -q -m gpu tests (graph replay == eager, no compile in
                                capture, seeded sampling in graphs), kernels compiled for real
kernel_tests             75 s   pytest -q -x tests/kernels, TRITON_INTERPRET unset (compiled)
parity_ckpt              20 s   seeded random GPT2LMHeadModel, gpt2-small shapes, n_layer 2,
                                save_pretrained into $OUT/ckpt (no tokenizer)
parity_float16           30 s   fastgpt2 parity --dtype float16 (gated bounds; exit 1 = FAIL)
parity_bfloat16          25 s   fastgpt2 parity --dtype bfloat16
bench_gpt2_fp16          40 s   fastgpt2 bench --model gpt2 --batch 1,8,32 --dtype float16
                                --prompt-len 32 --new-tokens 64 --runs 2 --warmup 1 (vs transformers)
pdl                      25 s   gpt2 fp16, batch 1 and 8, graphed: the decode step with and without
                                programmatic dependent launch (Engine(pdl=)): same logits bit for
                                bit over 32 steps, then µs/step of each (CUDA events, 200 replays)
                                beside tools/step_model.py's two predictions -> pdl.json
                                (skipped on a GPU older than sm_90)
bench_gpt2_bf16          25 s   the same in bfloat16 (--no-step-count)
bench_gpt2_large_fp16    45 s   gpt2-large, float16, --new-tokens 32 (--no-step-count)
step_model               10 s   tools/step_model.py --gpu H200 (skipped when not present)
profiler                 30 s   one graphed gpt2 fp16 decode step under torch.profiler ->
                                profile.txt, profile.json; step_count("triton") -> step_count.json
=====================  =======  ================================================================

``--dry`` (automatic when torch.cuda.is_available() is False): the stages that need CUDA report
"skipped: no CUDA"; environment, a tiny CPU bench and step_model run, so the script is exercised
end to end on any machine (tests/tools/test_gpu_check.py).

Options: --only STAGE[,STAGE] runs those stages alone; --timeout STAGE=SECONDS overrides one
stage's timeout (repeatable); --budget SECONDS caps the whole run; --list prints the stages.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable or "python3"

TIMEOUTS = {  # seconds on an H200; the module docstring's table
    "environment": 15,
    "gpu_tests": 50,
    "kernel_tests": 75,
    "parity_ckpt": 20,
    "parity_float16": 30,
    "parity_bfloat16": 25,
    "bench_gpt2_fp16": 40,
    "pdl": 25,
    "bench_gpt2_bf16": 25,
    "bench_gpt2_large_fp16": 45,
    "step_model": 10,
    "profiler": 30,
}
DRY_TIMEOUTS = {"environment": 60, "bench_gpt2_fp16": 120, "step_model": 60}  # a slow CPU, under load
DEFAULT_BUDGET = 400.0
TINY_CONFIG = '{"n_layer": 1, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32}'


@dataclass
class StageResult:
    name: str
    status: str  # ok | FAIL | timeout | skipped
    seconds: float
    result: str  # one line
    command: list[str] = field(default_factory=list)
    returncode: int | None = None
    timeout_s: float | None = None
    stdout: str | None = None  # file names under OUT
    stderr: str | None = None
    data: dict | None = None  # what the stage wrote as JSON, when it did

    def to_dict(self) -> dict:
        return asdict(self)


# -- running one stage ---------------------------------------------------------------------------
def child_env(cuda: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cuda:
        env.pop("TRITON_INTERPRET", None)  # on CUDA the kernels compile for real
    return env


def run_stage(name: str, command: list[str], timeout: float, out_dir: Path, env: dict | None = None,
              summarize: Callable[[str, str], str] | None = None, cwd: Path = ROOT) -> StageResult:
    """Run `command` with `timeout` seconds, its output into out_dir/<name>.out|.err; the result's
    status is ok (exit 0), FAIL (other exit, or it could not start) or timeout (its process group
    killed). `summarize(stdout, stderr)` gives the one-line result of a stage that ran."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = out_dir / f"{name}.out", out_dir / f"{name}.err"
    start = time.monotonic()
    res = StageResult(name, "FAIL", 0.0, "", [str(c) for c in command], None, timeout, out_path.name, err_path.name)
    with open(out_path, "w") as out, open(err_path, "w") as err:
        try:
            proc = subprocess.Popen(command, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                    cwd=cwd, start_new_session=True)
        except OSError as exc:
            res.seconds, res.result = time.monotonic() - start, f"could not start: {exc}"
            return res
        try:
            res.returncode = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            res.status, res.seconds = "timeout", time.monotonic() - start
            res.result = f"timeout after {timeout:g} s (killed)"
            tail = _last_line(_read(out_path)) or _last_line(_read(err_path))
            if tail:
                res.result += f"; last output: {tail[:100]}"
            return res
    res.seconds = time.monotonic() - start
    stdout, stderr = _read(out_path), _read(err_path)
    try:
        line = summarize(stdout, stderr) if summarize else ""
    except Exception as exc:  # a summary that cannot be read is the stage's problem, not the run's
        line = f"(summary failed: {type(exc).__name__}: {exc})"
    if res.returncode == 0:
        res.status, res.result = "ok", line or _last_line(stdout) or "exit 0"
    else:
        why = _last_line(stderr) or _last_line(stdout)
        res.result = f"exit {res.returncode}: " + (line or why or "no output")
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the stage's process group (it was started in a session of its own), SIGKILL after 3 s."""
    for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    return lines[-1][:200] if lines else ""


def _load_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def skipped(name: str, why: str) -> StageResult:
    return StageResult(name, "skipped", 0.0, f"skipped: {why}")


# -- the stages' code --------------------------------------------------------------------------------
ENV_SNIPPET = r"""
import json, platform, shutil, subprocess, sys
info = {"python": sys.version.split()[0], "platform": platform.platform()}
import torch
info["torch"] = torch.__version__
info["torch_cuda"] = torch.version.cuda
for mod in ("triton", "transformers"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as exc:
        info[mod] = f"not importable: {type(exc).__name__}: {exc}"
info["cuda_available"] = torch.cuda.is_available()
if info["cuda_available"]:
    p = torch.cuda.get_device_properties(0)
    info.update(gpu=p.name, sm_count=p.multi_processor_count, capability=f"sm_{p.major}{p.minor}",
                memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
if shutil.which("nvidia-smi"):
    q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm",
                        "--format=csv,noheader"], capture_output=True, text=True, timeout=15)
    info["nvidia_smi"] = (q.stdout or q.stderr).strip()
else:
    info["nvidia_smi"] = "not present"
print(json.dumps(info, indent=2))
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
"""

CKPT_SNIPPET = r"""
import sys, torch, transformers
torch.manual_seed(0)
cfg = transformers.GPT2Config(n_layer=2, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257)
model = transformers.GPT2LMHeadModel(cfg).eval()
with torch.no_grad():  # biases and layernorm gains away from their init, as the parity tests do
    for name, p in model.named_parameters():
        if name.endswith("bias") or ".ln_" in name:
            p.add_(torch.randn_like(p) * 0.02)
model.save_pretrained(sys.argv[1])
print(f"wrote {sys.argv[1]}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
"""

PROFILE_SNIPPET = r"""
import json, sys
from collections import defaultdict
import torch
import fastgpt2
from fastgpt2.runtime.engine import Engine
from fastgpt2.runtime.step_count import step_count
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

out_txt, out_json, out_count = sys.argv[1], sys.argv[2], sys.argv[3]
model = fastgpt2.GPT2.from_config(fastgpt2.GPT2Config.from_name("gpt2"), device="cuda", dtype=torch.float16)
ids = torch.randint(0, model.config.vocab_size, (16,), generator=torch.Generator().manual_seed(0))
engine = Engine(model, max_batch=1, max_len=128, use_cuda_graph=True)
engine.add(ids, 64)  # runs past every step below
engine.step()  # admits it: the prefill and its first token
engine.step()  # the first decode step: a warm-up run (compiles the kernels), then its graph is captured
engine.step()
(graph, _), = engine.graphs.values()  # the one graph: 1 slot, greedy
torch.cuda.synchronize()


def profiled(fn):
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    count, total = defaultdict(int), defaultdict(float)
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            count[e.name] += 1
            total[e.name] += e.time_range.elapsed_us()
    return count, total


count, total = profiled(graph.replay)  # one graph replay: the step's device work, not its token read-back
what = "one graphed decode step (graph replay)"
if not count:  # a profiler that does not see inside graph replays: the same step, eager
    eager = Engine(model, max_batch=1, max_len=128, use_cuda_graph=False)
    eager.add(ids, 64)
    eager.step()  # admits it
    eager.step()  # the first decode step (its scratch is made)
    count, total = profiled(lambda: eager._decode(1))  # the device work of one decode step over its slot
    what = "one EAGER decode step (the profiler saw no kernels in the graph replay)"
rows = sorted(total, key=total.get, reverse=True)
step_us = sum(total.values())
with open(out_txt, "w") as f:
    f.write(f"{what}: gpt2, float16, batch 1, cache 128 ({model.config.n_layer} layers)\n")
    f.write(f"{'kernel':<90} {'count':>6} {'total us':>10}\n")
    for name in rows:
        f.write(f"{name[:90]:<90} {count[name]:>6} {total[name]:>10.1f}\n")
    f.write(f"{'TOTAL':<90} {sum(count.values()):>6} {step_us:>10.1f}\n")
sc = step_count("triton")
with open(out_json, "w") as f:
    json.dump({"profile": {"what": what, "kernels": sum(count.values()), "distinct": len(rows), "total_us": step_us,
                           "by_kernel": {n: {"count": count[n], "total_us": total[n]} for n in rows}},
               "step_count": sc.to_dict()}, f, indent=2)
with open(out_count, "w") as f:
    json.dump(sc.to_dict(), f, indent=2)
print(open(out_txt).read())
print(f"PROFILE {'graphed' if 'graphed' in what else 'EAGER'} step: {sum(count.values())} kernels, "
      f"{step_us:.1f} us of kernel time; step_count(triton): "
      f"{sc.per_layer}/layer + {sc.per_step}/step {sc.unit}")
"""


PDL_SNIPPET = r"""
import importlib.util, json, sys
import torch
import fastgpt2
from fastgpt2.runtime.engine import Engine

out_json, step_model_path = sys.argv[1], sys.argv[2]
if torch.cuda.get_device_capability() < (9, 0):
    print(f"PDL skipped: {torch.cuda.get_device_name()} is older than sm_90")
    json.dump({"skipped": "older than sm_90"}, open(out_json, "w"))
    raise SystemExit(0)
spec = importlib.util.spec_from_file_location("step_model", step_model_path)
step_model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_model)
model = fastgpt2.GPT2.from_config(fastgpt2.GPT2Config.from_name("gpt2"), device="cuda", dtype=torch.float16)
prompt, check_steps, timed_steps = 16, 32, 200
rows, mismatches = [], []
for batch in (1, 8):
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(batch))
    engines = {}
    for pdl in (False, True):  # the same prompts in slots 0 .. batch-1 of each engine
        engines[pdl] = Engine(model, max_batch=batch, max_len=512, use_cuda_graph=True, pdl=pdl)
        for row in ids:
            engines[pdl].add(row, 512 - prompt)  # runs past every checked and timed step
        engines[pdl].step()  # admits them: the prefill and each one's first token
    for i in range(check_steps):  # the first step captures each engine's graph
        out = {pdl: [t for _, t in engines[pdl].step()] for pdl in (False, True)}
        if not (torch.equal(engines[True].logits, engines[False].logits) and out[True] == out[False]):
            mismatches.append((batch, i))
    measured = {}
    for pdl in (False, True):
        (graph, _), = engines[pdl].graphs.values()  # the one graph: batch slots, greedy
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(timed_steps):  # the step's device work (its cache lengths advance on the device), no read-back
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        measured[pdl] = start.elapsed_time(end) * 1e3 / timed_steps  # µs per step
    context = prompt + check_steps + timed_steps // 2  # the timed steps' mean context
    pred = {pdl: step_model.model_step("gpt2", batch, "H200", torch.float16, context=min(context, 511), cache_len=512,
                                       pdl=pdl)["step_us"] for pdl in (False, True)}
    rows.append({"model": "gpt2", "batch": batch, "dtype": "float16", "cache_len": 512,
                 "measured_us": {"plain": measured[False], "pdl": measured[True]},
                 "pdl_over_plain": measured[True] / measured[False],
                 "predicted_us": {"plain": pred[False], "pdl": pred[True]}})
json.dump({"rows": rows, "mismatches": mismatches, "gpu": torch.cuda.get_device_name()}, open(out_json, "w"), indent=2)
for r in rows:
    print(f"gpt2 fp16 b{r['batch']}: plain {r['measured_us']['plain']:.1f} us/step, pdl {r['measured_us']['pdl']:.1f} "
          f"({r['pdl_over_plain']:.3f}x); predicted {r['predicted_us']['plain']:.1f} / {r['predicted_us']['pdl']:.1f}")
if mismatches:
    print(f"PDL MISMATCH: the pdl step's logits differ from the plain step's at (batch, step) {mismatches[:8]}")
    raise SystemExit(1)
print("PDL " + "; ".join(f"b{r['batch']} {r['measured_us']['plain']:.0f} -> {r['measured_us']['pdl']:.0f} us/step"
                         for r in rows) + f"; same logits over {check_steps} steps")
"""


def _write_snippet(out_dir: Path, name: str, code: str) -> Path:
    path = out_dir / "snippets" / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


# -- summaries ------------------------------------------------------------------------------------
def _pytest_summary(stdout: str, stderr: str) -> str:
    for line in reversed(stdout.splitlines()):
        s = line.strip().strip("=").strip()
        if any(w in s for w in ("passed", "failed", "error", "skipped", "no tests ran", "deselected")):
            return s
    return _last_line(stdout)


def _env_summary(path: Path) -> Callable[[str, str], str]:
    def summary(stdout, stderr):
        d = _load_json(path) or {}
        gpu = (f"{d.get('gpu')} {d.get('capability')}, {d.get('sm_count')} SMs, {d.get('memory_gib')} GiB"
               if d.get("cuda_available") else "no CUDA")
        return (f"py {d.get('python')} torch {d.get('torch')} triton {d.get('triton')} "
                f"transformers {d.get('transformers')}; {gpu}")
    return summary


def _json_summary(path: Path, describe: Callable[[dict], str | None]) -> Callable[[str, str], str]:
    """A stage's summary from the JSON it wrote at `path`: describe(d), or the stage's last stdout line
    when it wrote none (or describe finds nothing to say)."""
    def summary(stdout, stderr):
        d = _load_json(path)
        line = describe(d) if d is not None else None
        return _last_line(stdout) if line is None else line
    return summary


def _describe_parity(d: dict) -> str:
    worst = d.get("worst_figure")
    figs = d.get("figures") or {}
    head = "passed" if d.get("passed") else f"FAILED {d.get('failed')}"
    parts = [head]
    if worst is not None:
        parts.append(f"worst figure {worst}" + (f" = {figs[worst]:.3g}" if isinstance(figs.get(worst), (int, float))
                                                 else ""))
    if "max_abs_logits" in figs:
        parts.append(f"max|dlogits| {figs['max_abs_logits']:.3g}")
    for ph in (d.get("half_precision") or {}).get("phases", []):
        parts.append(f"{ph.get('phase')} err {ph.get('err_fastgpt2', 0):.3g} vs hf {ph.get('err_transformers', 0):.3g}"
                     f" (bound {ph.get('bound', 0):.3g})")
    return "; ".join(parts)


def _describe_bench(d: dict) -> str:
    rows = d.get("rows") or []
    fast = [r for r in rows if str(r.get("engine", "")).startswith("fastgpt2")]
    if not fast:
        return f"{len(rows)} rows"
    best = max(fast, key=lambda r: r.get("batch", 0))
    line = (f"{best['engine']} b{best['batch']}: {best.get('decode_tok_s', 0):,.0f} decode tok/s, "
            f"{best.get('ms_per_token', 0):.3g} ms/token")
    if best.get("roofline_pct") is not None:
        line += f", {best['roofline_pct']:.0f}% roofline"
    if best.get("speedup_decode") is not None:
        line += f", {best['speedup_decode']:.2f}x transformers"
    b1 = [r for r in fast if r.get("batch") == 1]
    if b1 and b1[0] is not best:
        line += f"; b1 {b1[0].get('ms_per_token', 0):.3g} ms/token"
    return line


def _describe_step_model(d: dict) -> str | None:
    if not isinstance(d.get("summary"), list):
        return None
    return "predicted: " + ", ".join(
        f"{r.get('model')} b{r.get('batch')} {r.get('step_us', 0):.0f} us/step" for r in d["summary"][:4])


def predicted_vs_measured(out: Path) -> list[dict]:
    """tools/step_model.py's predicted step time beside the bench's measured ms/token (fastgpt2's
    triton engine, same model, batch and dtype), where both ran; [] otherwise."""
    model = _load_json(out / "step_model.json") or {}
    benches = [b for b in (_load_json(f) for f in sorted(out.glob("bench_*.json"))) if b]
    rows = []
    for pred in model.get("summary") or []:
        if not isinstance(pred, dict):
            continue
        for b in benches:
            if b.get("model") != pred.get("model") or str(b.get("dtype")) != str(pred.get("dtype")):
                continue
            for r in b.get("rows") or []:
                if r.get("engine") == "fastgpt2[triton]" and r.get("batch") == pred.get("batch"):
                    measured = r.get("ms_per_token", 0) * 1e3
                    rows.append({"model": pred.get("model"), "batch": pred.get("batch"), "dtype": pred.get("dtype"),
                                 "predicted_us": pred.get("step_us"), "measured_us": measured,
                                 "measured_over_predicted": measured / pred["step_us"] if pred.get("step_us") else None,
                                 "prompt_len": b.get("prompt_len"), "new_tokens": b.get("new_tokens"),
                                 "predicted_context": pred.get("context")})
    return rows


def _tagged_summary(tag: str) -> Callable[[str, str], str]:
    """A stage's summary: its last stdout line starting with `tag` (the tag dropped), else its last line."""
    def summary(stdout, stderr):
        for line in reversed(stdout.splitlines()):
            if line.startswith(tag):
                return line[len(tag):]
        return _last_line(stdout)
    return summary


# -- the run ------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    needs_cuda: bool
    build: Callable[["Context"], tuple[list[str], Callable | None] | str]  # (command, summary) or a skip reason
    data_file: str | None = None  # the JSON the stage writes, relative to OUT
    runs_dry: bool = False  # runs on the CPU too (in a quick form)


@dataclass
class Context:
    out: Path
    cuda: bool
    dry: bool


def _bench(model: str, dtype: str, file: str, step_count: bool, new_tokens: int = 64):
    def build(ctx: Context):
        path = ctx.out / file
        if ctx.dry:
            cmd = [PY, "-m", "fastgpt2", "bench", "--config", TINY_CONFIG, "--device", "cpu", "--batch", "1",
                   "--new-tokens", "3", "--prompt-len", "2", "--runs", "1", "--warmup", "0", "--no-step-count",
                   "--bandwidth-gib", "0.01", "--quiet", "--json", str(path)]
        else:
            cmd = [PY, "-m", "fastgpt2", "bench", "--model", model, "--batch", "1,8,32", "--dtype", dtype,
                   "--prompt-len", "32", "--new-tokens", str(new_tokens), "--runs", "2", "--warmup", "1", "--quiet",
                   "--json", str(path)] + ([] if step_count else ["--no-step-count"])
        summary = _json_summary(path, _describe_bench)
        if ctx.dry:  # one decode step of a 1-layer toy on the CPU: the path is exercised, the figures mean nothing
            return cmd, lambda o, e: "dry (tiny CPU config, figures not meaningful): " + summary(o, e)
        return cmd, summary
    return build


def _parity(dtype: str):
    def build(ctx: Context):
        ckpt = ctx.out / "ckpt"
        if not (ckpt / "config.json").exists():
            return "no checkpoint (parity_ckpt did not write one)"
        path = ctx.out / f"parity_{dtype}.json"
        cmd = [PY, "-m", "fastgpt2", "parity", "--model", str(ckpt), "--dtype", dtype, "--device", "cuda",
               "--json", str(path)]
        return cmd, _json_summary(path, _describe_parity)
    return build


def _step_model(ctx: Context):
    script = ROOT / "tools" / "step_model.py"
    if not script.exists():
        return "tools/step_model.py not present"
    path = ctx.out / "step_model.json"
    return [PY, str(script), "--gpu", "H200", "--json", str(path)], _json_summary(path, _describe_step_model)


STAGES = [
    Stage("environment", False, lambda ctx: ([PY, str(_write_snippet(ctx.out, "environment", ENV_SNIPPET)),
                                              str(ctx.out / "environment.json")], _env_summary(ctx.out / "environment.json")),
          "environment.json", runs_dry=True),
    Stage("gpu_tests", True, lambda ctx: ([PY, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"],
                                          _pytest_summary)),
    Stage("kernel_tests", True, lambda ctx: ([PY, "-m", "pytest", "-q", "-x", "tests/kernels", "-p", "no:cacheprovider"],
                                             _pytest_summary)),
    Stage("parity_ckpt", True, lambda ctx: ([PY, str(_write_snippet(ctx.out, "parity_ckpt", CKPT_SNIPPET)),
                                             str(ctx.out / "ckpt")], None)),
    Stage("parity_float16", True, _parity("float16"), "parity_float16.json"),
    Stage("parity_bfloat16", True, _parity("bfloat16"), "parity_bfloat16.json"),
    Stage("bench_gpt2_fp16", True, _bench("gpt2", "float16", "bench_gpt2_fp16.json", True), "bench_gpt2_fp16.json",
          runs_dry=True),
    Stage("pdl", True, lambda ctx: ([PY, str(_write_snippet(ctx.out, "pdl", PDL_SNIPPET)), str(ctx.out / "pdl.json"),
                                     str(ROOT / "tools" / "step_model.py")], _tagged_summary("PDL ")), "pdl.json"),
    Stage("bench_gpt2_bf16", True, _bench("gpt2", "bfloat16", "bench_gpt2_bf16.json", False), "bench_gpt2_bf16.json"),
    Stage("bench_gpt2_large_fp16", True, _bench("gpt2-large", "float16", "bench_gpt2_large_fp16.json", False, 32),
          "bench_gpt2_large_fp16.json"),
    Stage("step_model", False, _step_model, "step_model.json", runs_dry=True),
    Stage("profiler", True, lambda ctx: ([PY, str(_write_snippet(ctx.out, "profiler", PROFILE_SNIPPET)),
                                          str(ctx.out / "profile.txt"), str(ctx.out / "profile.json"),
                                          str(ctx.out / "step_count.json")],
                                         _tagged_summary("PROFILE ")), "profile.json"),
]
STAGE_NAMES = [s.name for s in STAGES]


def _parse_timeouts(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in STAGE_NAMES:
            raise SystemExit(f"gpu_check: --timeout {item!r}: expected STAGE=SECONDS, STAGE one of {STAGE_NAMES}")
        try:
            out[name] = float(value)
        except ValueError:
            raise SystemExit(f"gpu_check: --timeout {item!r}: {value!r} is not a number") from None
    return out


def format_table(results: list[StageResult]) -> str:
    w = max(len("stage"), *(len(r.name) for r in results))
    lines = [f"{'stage':<{w}}  {'status':<8} {'seconds':>8}  result", f"{'-' * w}  {'-' * 8} {'-' * 8}  {'-' * 40}"]
    for r in results:
        lines.append(f"{r.name:<{w}}  {r.status:<8} {r.seconds:>8.1f}  {r.result}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="tools/gpu_check.sh", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU run: CUDA stages skipped, the rest in a quick form")
    ap.add_argument("--only", default=None, help="comma-separated stages to run (others are left out)")
    ap.add_argument("--timeout", action="append", default=[], metavar="STAGE=SECONDS", help="override a timeout")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="cap on the whole run, seconds")
    ap.add_argument("--list", action="store_true", help="print the stages and their timeouts, then exit")
    args = ap.parse_args(argv)

    overrides = _parse_timeouts(args.timeout)
    if args.list:
        for name in STAGE_NAMES:
            print(f"{name:<24} {overrides.get(name, TIMEOUTS[name]):>6g} s")
        return 0
    selected = STAGE_NAMES
    if args.only:
        selected = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in selected if s not in STAGE_NAMES]
        if bad:
            raise SystemExit(f"gpu_check: --only: unknown stage(s) {bad}; stages are {STAGE_NAMES}")

    out = Path(os.environ.get("OUT") or "gpu_check_out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"gpu_check: output in {out}", flush=True)
    ctx = Context(out=out, cuda=False, dry=True)
    results: list[StageResult] = []
    cuda_known = False
    for stage in STAGES:
        if stage.name not in selected:
            continue
        if stage.name != "environment" and not cuda_known:
            # environment decides whether there is CUDA; without its answer (left out, failed) probe here
            ctx.cuda, cuda_known = _probe_cuda(), True
            ctx.dry = args.dry or not ctx.cuda
        if stage.needs_cuda and ctx.dry and not stage.runs_dry:
            res = skipped(stage.name, "no CUDA" + (" (--dry)" if args.dry and ctx.cuda else ""))
        else:
            built = stage.build(ctx)
            if isinstance(built, str):
                res = skipped(stage.name, built)
            else:
                cmd, summary = built
                timeout = overrides.get(stage.name, (DRY_TIMEOUTS if ctx.dry else {}).get(stage.name, TIMEOUTS[stage.name]))
                left = args.budget - (time.monotonic() - t0)
                if left < 1:
                    res = skipped(stage.name, f"run budget of {args.budget:g} s spent")
                else:
                    print(f"[{time.monotonic() - t0:6.1f} s] {stage.name} (timeout {min(timeout, left):.0f} s) ...",
                          flush=True)
                    res = run_stage(stage.name, cmd, min(timeout, left), out, child_env(ctx.cuda and not args.dry),
                                    summary)
                    if stage.data_file:
                        res.data = _load_json(out / stage.data_file)
        if stage.name == "environment" and res.status == "ok":
            env = _load_json(out / "environment.json") or {}
            ctx.cuda, cuda_known = bool(env.get("cuda_available")), True
            ctx.dry = args.dry or not ctx.cuda
        print(f"[{time.monotonic() - t0:6.1f} s] {res.name}: {res.status}  {res.result}", flush=True)
        results.append(res)
        _write_json(out, results, ctx, args, time.monotonic() - t0)  # after every stage: a killed run keeps its part

    total = time.monotonic() - t0
    _write_json(out, results, ctx, args, total)
    failed = [r.name for r in results if r.status in ("FAIL", "timeout")]
    print("\n" + format_table(results))
    pvm = predicted_vs_measured(out)
    if pvm:
        print("\nstep model vs bench (us per decode step): " + ", ".join(
            f"{r['model']} b{r['batch']} {r['dtype']}: {r['predicted_us']:.0f} predicted, {r['measured_us']:.0f} measured"
            for r in pvm))
    print(f"\n{len(results)} stages in {total:.1f} s; {'FAILED: ' + ', '.join(failed) if failed else 'no failures'}"
          f"{' (dry run: no CUDA)' if ctx.dry else ''}; {out / 'gpu_check.json'}")
    return 1 if failed else 0


def _probe_cuda() -> bool:
    try:
        p = subprocess.run([PY, "-c", "import torch; print(torch.cuda.is_available())"], capture_output=True,
                           text=True, timeout=60)
        return p.stdout.strip().endswith("True")
    except (subprocess.TimeoutExpired, OSError):
        return False


def _write_json(out: Path, results: list[StageResult], ctx: Context, args, total: float) -> None:
    doc = {"dry": ctx.dry, "cuda": ctx.cuda, "seconds": round(total, 2), "budget_s": args.budget,
           "failed": [r.name for r in results if r.status in ("FAIL", "timeout")],
           "stages": [r.to_dict() for r in results], "predicted_vs_measured": predicted_vs_measured(out)}
    tmp = out / "gpu_check.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, default=str))
    tmp.replace(out / "gpu_check.json")


if __name__ == "__main__":
    raise SystemExit(main())

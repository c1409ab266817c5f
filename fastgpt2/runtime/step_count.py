"""What one decode step runs, counted under the name of what is counted (``StepCount.unit``):

- ``"kernels"`` (CUDA): the kernels the GPU executes, from torch.profiler's CUDA activity: Triton,
  cuBLAS and torch's own kernels alike.
- ``"ops"`` (elsewhere, where there are no kernels to see): Triton launches, counted at
  ``kernel[grid](...)`` (in the interpreter on a machine without CUDA), plus aten ops, counted with a
  TorchDispatchMode. Views, allocations and other metadata-only ops are not counted. On CUDA every
  op is at least one kernel, so an op count is a lower bound of the kernel count.

``step_count(backend)`` measures one decode step of the engine (runtime/engine.py: the step that
generate and stream run) of a 1-layer and a 2-layer model; the difference is the per-layer count,
the rest the per-step count (embedding, ln_f, lm_head, next-token choice, length update, idle slots
emptied).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import plan
from .config import GPT2Config
from .generate import GPT2
from .engine import Engine, slot_bucket

# ops that launch no kernel: allocation and metadata
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "set_", "resize_"}

# which fusions each backend's decode step has: the Triton step's are its plan's (runtime/plan.py)
FUSIONS = {"triton": plan.fusions(), "torch": []}


@dataclass(frozen=True)
class StepCount:
    backend: str
    unit: str  # "kernels" (CUDA, from the profiler) | "ops" (Triton launches + aten ops)
    per_layer: int
    per_step: int
    total: int  # of the n_layer-layer model measured
    n_layer: int
    fusions: list[str] = field(default_factory=list)
    by_name: dict[str, int] = field(default_factory=dict)  # the n_layer model's count per kernel / op

    def to_dict(self) -> dict:
        return asdict(self)


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.triton: Counter = Counter()
        self.aten: Counter = Counter()
        self._inside_triton = 0  # the interpreter's own torch calls are not launches

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self._inside_triton and not func.is_view and name not in _NO_LAUNCH:
            self.aten[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.triton.values()) + sum(self.aten.values())

    def by_op(self) -> dict[str, int]:
        out = {f"triton:{k}": v for k, v in self.triton.items()}
        out.update({f"aten:{k}": v for k, v in self.aten.items()})
        return dict(sorted(out.items()))


@contextmanager
def count_ops():
    """Count Triton launches and aten ops issued inside the block."""
    from triton.runtime.jit import KernelInterface  # triton is imported when ops are counted, not before

    counter = OpCounter()
    original = KernelInterface.__getitem__

    def counted_getitem(kernel, grid):
        launch = original(kernel, grid)

        def run(*args, **kwargs):
            counter.triton[getattr(kernel, "__name__", None) or kernel.fn.__name__] += 1
            counter._inside_triton += 1
            try:
                return launch(*args, **kwargs)
            finally:
                counter._inside_triton -= 1

        return run

    KernelInterface.__getitem__ = counted_getitem
    try:
        with counter:
            yield counter
    finally:
        KernelInterface.__getitem__ = original


def _decode_step(model, batch: int = 1, prompt_len: int = 5):
    """One greedy eager decode step of an engine of `model` over `batch` running requests, ready to be
    counted: a callable. The requests are admitted (prefilled) and one decode step is run first (the
    first may build things once). The engine's slots are n_positions long: on CUDA the step attends
    over the whole cache, so decode attention splits and reduces (the Triton kernels split by the
    cache's length on any device). On CUDA the callable is the step's device work as ``Engine.step``
    runs it (and a graph captures it) without the step's read-back of the chosen tokens (a copy, no
    kernel); elsewhere it is ``Engine.step`` itself (the read-back is no op)."""
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    engine = Engine(model, max_batch=batch, max_len=cfg.n_positions, use_cuda_graph=False)
    for row in ids:
        engine.add(row, cfg.n_positions - prompt_len)  # never finishes while it is counted
    engine.step()  # admits them: the prefills and their first tokens
    engine.step()  # one decode step over slots 0 .. batch-1
    if model.device.type == "cuda":
        n = slot_bucket(batch, engine.max_batch)
        return lambda: engine._decode(n)
    return engine.step


def count_kernels(fn) -> Counter:
    """The CUDA kernels `fn()` runs, by name, from torch.profiler (CUDA only)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return Counter(e.name for e in prof.events() if e.device_type == DeviceType.CUDA)


def measure_step_count(backend: str, unit: str | None = None, n_embd: int = 64, n_head: int = 1) -> StepCount:
    """`backend`'s decode step counted in this process (see the module docstring); unit "kernels"
    needs CUDA (the default there), "ops" runs anywhere (the default elsewhere)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    unit = unit or ("kernels" if device == "cuda" else "ops")
    if unit not in ("kernels", "ops") or (unit == "kernels" and device != "cuda"):
        raise ValueError(f"unit must be 'ops', or 'kernels' on a CUDA machine; got {unit!r} on {device}")
    counts = {}
    for n_layer in (1, 2):
        cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=128, n_positions=1024)
        step = _decode_step(GPT2.from_config(cfg, device=device, backend=backend))  # a callable
        if unit == "kernels":
            counts[n_layer] = count_kernels(step)
        else:
            with count_ops() as counter:
                step()
            counts[n_layer] = counter.by_op()
    per_layer = sum(counts[2].values()) - sum(counts[1].values())
    return StepCount(backend=backend, unit=unit, per_layer=per_layer, per_step=sum(counts[1].values()) - per_layer,
                     total=sum(counts[2].values()), n_layer=2, fusions=FUSIONS[backend], by_name=dict(counts[2]))


def step_count(backend: str) -> StepCount:
    """`measure_step_count` in this machine's unit, in a subprocess with Triton's interpreter when
    `backend` is triton and there is no CUDA (the interpreter must be switched on before triton is
    first imported)."""
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        code = ("import json; from fastgpt2.runtime.step_count import measure_step_count; "
                f"print(json.dumps(measure_step_count({backend!r}).to_dict()))")
        env = dict(os.environ, TRITON_INTERPRET="1")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"counting the triton decode step failed:\n{out.stderr[-2000:]}")
        return StepCount(**json.loads(out.stdout.strip().splitlines()[-1]))
    return measure_step_count(backend)

"""What one decode step launches: Triton kernels (counted at `kernel[grid](...)`) and aten ops
(counted with a TorchDispatchMode; on CUDA each is at least one kernel launch). Views, allocations
and other metadata-only ops launch nothing and are not counted.

The count is a property of the code, not of the device: on a machine without CUDA the Triton
kernels run in the interpreter and are counted the same way. `launch_budget(backend)` measures a
decode step of a 1-layer and a 2-layer model; the difference is the per-layer count, the rest is
the per-step count (embedding, ln_f, lm_head, next-token choice, length update).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from contextlib import contextmanager

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch no kernel: allocation and metadata
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "detach", "alias", "lift_fresh", "set_", "resize_"}

# which fusions the Triton decode step has (kept beside the code that implements them)
FUSIONS = {
    "triton": [
        "token + position embedding gather fused into layer 0's ln_1 (embed_layer_norm)",
        "attention-output residual add fused into its GEMM's epilogue",
        "MLP-output residual add fused into the next layernorm (ln_f after the last layer)",
        "bias + activation fused into the c_fc GEMM epilogue",
        "K/V cache write fused into the attention kernels (prefill and decode)",
        "flash-decoding's reduce skipped when one split covers the cache (short caches only)",
    ],
    "torch": [],
}


class LaunchCounter(TorchDispatchMode):
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
def count_launches():
    """Count Triton launches and aten ops issued inside the block."""
    from triton.runtime.jit import KernelInterface

    counter = LaunchCounter()
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


def count_decode_step(model, batch: int = 1, prompt_len: int = 5) -> LaunchCounter:
    """Launches of one greedy decode step of `model` (after a prefill and one uncounted step)."""
    from .graphs import DecodeStep

    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch, cfg.n_positions)  # a long cache: decode attention splits and reduces
    step = DecodeStep(model, cache, use_cuda_graph=False)
    logits = model.prefill(ids.to(model.device), torch.full((batch,), prompt_len, dtype=torch.int32, device=model.device), cache)
    step.start(logits)
    step()  # warm: the first call may build things once
    with count_launches() as counter:
        step()
    return counter


def measure_budget(backend: str, n_embd: int = 64, n_head: int = 1) -> dict:
    """The launch budget of `backend`'s decode step, in this process (see module docstring)."""
    from .config import GPT2Config
    from .model import GPT2

    counts = {}
    for n_layer in (1, 2):
        cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=128, n_positions=1024)
        counts[n_layer] = count_decode_step(GPT2.from_config(cfg, backend=backend))
    per_layer = counts[2].total - counts[1].total
    return {
        "backend": backend,
        "per_layer": per_layer,
        "per_step": counts[1].total - per_layer,
        "total": counts[2].total,
        "n_layer": 2,
        "fusions": FUSIONS[backend],
        "by_op": counts[2].by_op(),
    }


def launch_budget(backend: str) -> dict:
    """`measure_budget`, run in a subprocess with Triton's interpreter when `backend` is triton and
    there is no CUDA (the interpreter must be switched on before triton is first imported)."""
    if backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        code = f"import json; from fastgpt2.runtime.launches import measure_budget; print(json.dumps(measure_budget({backend!r})))"
        env = dict(os.environ, TRITON_INTERPRET="1")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if out.returncode:
            raise RuntimeError(f"counting the triton decode step failed:\n{out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    return measure_budget(backend)

"""The decode step's plan (runtime/plan.py) against the code: a decode step calls exactly the plan's
ops, in its order, with its GEMM shapes (the engine's step, which generate and stream run, on the
torch backend and on the Triton kernels in the interpreter); the weight bytes are the plan's sum; the
README's table says the plan's counts."""
import os
from pathlib import Path

import pytest
import torch

import fastgpt2
from fastgpt2.runtime import plan
from fastgpt2.runtime.engine import Engine

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
CFG = fastgpt2.GPT2Config(n_layer=3, n_embd=64, n_head=2, n_inner=96, vocab_size=101, n_positions=32)
KERNEL_OPS = {op.op for op in plan.STEP if op.kind == "triton"}


def expected_calls(cfg):
    layer = [op.op for op in plan.per_layer()]
    return ([op.op for op in plan.per_step() if op.kind == "triton" and op.op != "lm_head"] + layer * cfg.n_layer
            + ["lm_head"])


class Recorder:
    """Wraps the model's ops: each call of a plan op is recorded as (method, (M, N, K) of its GEMM)."""

    def __init__(self, model):
        self.calls, self.depth = [], 0  # an op calling another op (torch's linear_norm) is one call
        for name in KERNEL_OPS:
            method = getattr(model.ops, name)
            setattr(model.ops, name, self._wrap(name, method))

    def _wrap(self, name, method):
        def call(*args, **kwargs):
            shape = None
            if name in ("linear", "linear_norm"):
                x, w = args[0], args[1]
                # N from the bias: a packed (oneDNN) weight does not say its shape
                shape = (x.shape[0], args[2].shape[0], x.shape[1])
                assert w.is_mkldnn or w.shape[1] == shape[1]
            elif name == "lm_head":
                shape = (args[0].shape[0], args[1].shape[0], args[1].shape[1])
            if not self.depth:
                self.calls.append((name, shape))
            self.depth += 1
            try:
                return method(*args, **kwargs)
            finally:
                self.depth -= 1
        return call


def run_steps(model):
    ids = torch.randint(0, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    engine = Engine(model, max_batch=2, use_cuda_graph=False)
    for row in ids:
        engine.add(row, 3)
    engine.step()  # the prefills
    recorder = Recorder(model)
    engine.step()  # one decode step over both slots
    return recorder.calls


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON, reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)"))])
def test_a_decode_step_runs_the_plans_ops_in_order_with_its_gemm_shapes(backend):
    model = fastgpt2.GPT2.from_config(CFG, dtype=torch.float32, backend=backend, seed=1)
    calls = run_steps(model)
    assert [name for name, _ in calls] == expected_calls(CFG)
    gemms = [shape for _, shape in calls if shape is not None]
    shapes = plan.gemm_shapes(CFG, batch=2)
    per_layer, head = shapes[:-1], shapes[-1]
    assert gemms == per_layer * CFG.n_layer + [head]
    assert model.decode_gemm_shapes(2, 1) == shapes


def test_the_weight_bytes_are_the_plans_sum_and_every_weight_once():
    for name in ("gpt2", "gpt2-medium", "gpt2-xl"):
        cfg = fastgpt2.GPT2Config.from_name(name)
        e, i, v, n = cfg.n_embd, cfg.inner_dim, cfg.vocab_size, cfg.n_layer
        for batch in (1, 8):
            assert plan.decode_weight_bytes(cfg, batch, torch.float16) == 2 * (
                n * (4 * e * e + 2 * e * i + 9 * e + i) + 2 * e + v * e + 2 * batch * e)
    assert plan.decode_weight_bytes(fastgpt2.GPT2Config.from_name("gpt2"), 1, torch.float16) == 247_309_824


def test_the_readmes_table_says_the_plans_counts():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert f"| triton | {len(plan.per_layer())} | {len(plan.per_step())} |" in readme
    for fusion in ("embedding gather fused into layer 0's ln_1", "bias +\nactivation in the c_fc GEMM's epilogue"):
        assert fusion in readme

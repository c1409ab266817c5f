"""The decode step's plan: the ordered fused ops of one decode step, the GEMM each runs, the weights it
reads and the fusions it carries, built from the config. One description of the step, read by

- the model: ``GPT2Network.decode_gemm_shapes`` (the workspaces are sized from ``gemm_shapes``), and
  ``tests/runtime/test_plan.py`` checks that a decode step calls exactly these ops, in this order;
- ``decode_weight_bytes`` (here): the weights one step reads, each once;
- ``runtime/step_count.py``: its fusions, and the kernels per layer / per step the counts must meet;
- ``tools/step_model.py``: one row per op, its GEMM shape and weight bytes.

Each op names the ``Ops`` method (or the step's own torch op) that runs it and, as ``kind``, who
launches it on the Triton backend: one fastgpt2 kernel per op, or a torch op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GPT2Config


@dataclass(frozen=True)
class PlanOp:
    name: str  # what it computes, as tables print it
    op: str  # the Ops method (or the step's own torch op) that runs it
    per_layer: bool  # once per layer, else once per step
    weights: tuple[str, ...] = ()  # checkpoint keys it reads whole; a per-layer op's under h.{i}.
    gemm: str | None = None  # which GEMM: "qkv" | "attn_out" | "mlp_up" | "mlp_down" | "lm_head"
    fuses: str = ""  # the fusion it carries (the Triton kernel's epilogue or prologue)
    kind: str = "triton"  # "triton" (a fastgpt2 kernel) | "torch" (a torch op)


STEP = (
    PlanOp("embed + ln_1 (embed_layer_norm)", "embed_layer_norm", False, ("h.0.ln_1.weight", "h.0.ln_1.bias"),
           fuses="token + position embedding gather fused into layer 0's ln_1 (embed_layer_norm)"),
    PlanOp("QKV GEMM (c_attn)", "linear", True, ("attn.c_attn.weight", "attn.c_attn.bias"), "qkv"),
    PlanOp("decode attention", "decode_attention", True,
           fuses="K/V cache write and flash-decoding's split combine (by the last split of each head) inside "
                 "the attention kernel"),
    PlanOp("attn-out GEMM + residual + ln_2 (linear_norm)", "linear_norm", True,
           ("attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias"), "attn_out",
           "attention-output residual add and ln_2 fused into its GEMM's epilogue (linear_norm)"),
    PlanOp("c_fc GEMM + activation", "linear", True, ("mlp.c_fc.weight", "mlp.c_fc.bias"), "mlp_up",
           "bias + activation fused into the c_fc GEMM epilogue"),
    PlanOp("c_proj GEMM + residual + next ln_1 / ln_f (linear_norm)", "linear_norm", True,
           ("mlp.c_proj.weight", "mlp.c_proj.bias", "+next norm"), "mlp_down",
           "MLP-output residual add and the next layernorm (ln_f after the last layer) fused into the MLP down "
           "GEMM's epilogue (linear_norm)"),
    PlanOp("lm_head GEMM (the [V, E] table as it is)", "lm_head", False, ("+head",), "lm_head",
           "lm_head on fastgpt2's GEMM kernel, reading the [V, E] table as it is"),
    PlanOp("next-token choice (argmax: torch.max)", "choose", False, kind="torch"),
    PlanOp("length update (lengths += S)", "advance", False, kind="torch"),
)
# every GEMM's split-K partials (fp32) are summed by the last program of each tile, inside the kernel
SPLIT_K = "split-K partials (fp32) reduced by the last program of each tile, inside the GEMM (no reduce pass)"


def per_layer() -> list[PlanOp]:
    return [op for op in STEP if op.per_layer]


def per_step() -> list[PlanOp]:
    return [op for op in STEP if not op.per_layer]


def fusions() -> list[str]:
    """The Triton step's fusions, each once, in the step's order."""
    return [op.fuses for op in STEP if op.fuses] + [SPLIT_K]


def gemm_shapes(cfg: GPT2Config, batch: int, s: int = 1) -> list[tuple[int, int, int]]:
    """(M, N, K) of each GEMM of the step in its order (the per-layer ones once, then the lm_head over
    the last token of each sequence): the workspace a step's GEMMs need is sized from these."""
    e, inner, m = cfg.n_embd, cfg.inner_dim, batch * s
    dims = {"qkv": (m, 3 * e, e), "attn_out": (m, e, e), "mlp_up": (m, inner, e), "mlp_down": (m, e, inner),
            "lm_head": (batch, cfg.vocab_size, e)}
    return [dims[op.gemm] for op in STEP if op.gemm]


def _elements(cfg: GPT2Config, key: str) -> int:
    e, inner, v = cfg.n_embd, cfg.inner_dim, cfg.vocab_size
    key = key.split(".", 2)[-1] if key.startswith("h.") else key
    sizes = {"ln_1.weight": e, "ln_1.bias": e, "ln_2.weight": e, "ln_2.bias": e, "attn.c_attn.weight": e * 3 * e,
             "attn.c_attn.bias": 3 * e, "attn.c_proj.weight": e * e, "attn.c_proj.bias": e,
             "mlp.c_fc.weight": e * inner, "mlp.c_fc.bias": inner, "mlp.c_proj.weight": inner * e,
             "mlp.c_proj.bias": e, "+next norm": 2 * e, "+head": v * e}
    return sizes[key]


def op_weight_elements(cfg: GPT2Config, op: PlanOp, batch: int = 1) -> int:
    """Weight elements one launch of `op` reads (the embedding also gathers one row of wte and of wpe
    per sequence; the c_proj epilogue the next layernorm's 2E; the lm_head the whole [V, E] table)."""
    rows = 2 * batch * cfg.n_embd if op.op == "embed_layer_norm" else 0
    return rows + sum(_elements(cfg, k) for k in op.weights)


def decode_weight_bytes(cfg: GPT2Config, batch: int = 1, dtype: torch.dtype = torch.float16) -> int:
    """Bytes of weights one decode step reads, every weight read once, in the model dtype: the sum over
    the plan's ops. With E = n_embd, I = inner dim, L = n_layer, V = vocab_size, B = batch:

        bytes = itemsize(dtype) * (L * (4E^2 + 2EI + 9E + I) + 2E + V*E + 2*B*E)

    (every block's weights; ln_f; the lm_head, wte read whole when tied; one row of wte and of wpe per
    sequence). The KV cache is not a weight: see ``config.kv_read_bytes``. GPT-2 small in fp16 at
    batch 1: 247,309,824 bytes (the full 124.4M parameters would be 248.9 MB; the step skips the
    other 1023 rows of wpe)."""
    return dtype.itemsize * sum(op_weight_elements(cfg, op, batch) * (cfg.n_layer if op.per_layer else 1)
                                for op in STEP)

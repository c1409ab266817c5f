"""fastgpt2 vs transformers on one checkpoint, figure by figure, layer by layer: `fastgpt2 parity`
(whose options, in cli.py, are run()'s arguments; compare() -> a ParityResult; format_report() its text).

fastgpt2 loads --model on the chosen device / dtype / backend; transformers loads --reference (by
default the same checkpoint) on the same device, in --reference-dtype (float32 by default: the
reference is the exact model, so the figures measure fastgpt2's own error), with
``attn_implementation="eager"`` for Stanford CRFM configs (transformers honours
scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn only there) and "sdpa" otherwise.

Each prompt (built-in English prompts through the checkpoint's tokenizer, ``--prompts FILE`` one
per line, or seeded random token ids when the checkpoint has no tokenizer) runs alone (batch 1, no
padding) through both. Figures, over every position of every prompt:

  max / mean |Δlogits|     |logits_fastgpt2 - logits_reference|
  KL mean / max            KL(reference || fastgpt2) of the next-token distributions (float64)
  top-1 agreement          fraction of positions whose argmax agrees
  identical greedy tokens  leading tokens of the greedy continuation (--new-tokens) that agree,
                           the worst prompt (transformers: its forward over its own cache)
  perplexity               of each model on the prompts (teacher forced); and their relative gap
  hidden states            per layer: max |Δ| of the residual stream over max |reference|.
                           transformers: output_hidden_states (+ the last block's output);
                           fastgpt2: the residual stream its own forward computes, recorded at
                           each layernorm call of its ops (nothing recomputed).

Tolerances are per fastgpt2 dtype (TOLERANCES; shown by --help). float32 must pass for a correct
model (max |Δlogits| <= 1e-4). The float16 / bfloat16 bounds are first estimates of rounding error
alone (checked on CPU with tests-made checkpoints, not yet on GPT-2 weights on a GPU); they are
loose enough that a small weight error can hide under them: check a suspect model in float32.

The half-precision gate (fastgpt2 in float16 or bfloat16 only; the way flash-attention checks its
kernels): with err(x) = max |logits_x - logits of transformers in float32|, fastgpt2 must reach

  err(fastgpt2) <= HALF_FACTOR (2) * err(transformers in fastgpt2's dtype) + HALF_ATOL[dtype]

that is, be no more than twice as far from the exact model as transformers itself is in the same
dtype. It is checked twice: on the prompts' logits (prefill: the forward above, and model.prefill's
last-position logits) and on decode logits (fastgpt2's greedy continuation fed back one token at a
time through its own cache, model.prefill then model.decode; not measured with --new-tokens 0);
both against transformers' full forward over prompt + continuation at the same positions. For it,
transformers runs in float32 and in fastgpt2's dtype (a second load besides --reference-dtype's
model, which keeps its meaning for every other figure). A float32 run has no gate.

When a figure is past its tolerance the result fails (the command exits 1) and names the failing
figures, the first layer whose hidden state is past the hidden-state tolerance and the layer where the discrepancy
jumps the most (where it is introduced).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Mapping

import torch

from .errors import FastGPT2Error
from .hf import TESTED_TRANSFORMERS, cache_argument
from .runtime.generate import GPT2
from .runtime.loader import load_config
from .runtime.model import resolve_device, resolve_dtype
from .runtime.tokenizer import TokenizerError, load_tokenizer

# tolerance per fastgpt2 dtype, against a float32 reference
TOLERANCES = {
    "float32": dict(max_abs_logits=1e-4, kl_mean=1e-8, kl_max=1e-6, top1=0.999, greedy="all", ppl_rel=1e-4,
                    hidden_rel=1e-5),
    "float16": dict(max_abs_logits=0.5, kl_mean=1e-3, kl_max=2e-2, top1=0.97, greedy=None, ppl_rel=1e-2,
                    hidden_rel=1e-2),
    "bfloat16": dict(max_abs_logits=2.0, kl_mean=1e-2, kl_max=1e-1, top1=0.9, greedy=None, ppl_rel=5e-2,
                     hidden_rel=5e-2),
}
# The half-precision gate (module docstring): err(fastgpt2) <= HALF_FACTOR * err(transformers in
# fastgpt2's dtype) + HALF_ATOL[dtype], err against transformers in float32.
# atol is a floor for where transformers' own error happens to be small: fastgpt2 returns its logits
# in the half dtype, so their final rounding alone costs up to half an ulp at the logits' magnitude
# whatever transformers does; HALF_ATOL is that half ulp for |logits| in [2, 4) (tests-made
# checkpoints' logits are below 4): 2^-10 in float16, 2^-7 in bfloat16. On GPT-2's weights (logits
# of magnitude ~100) it is far below 2 * err(transformers), so the factor is the bound.
HALF_FACTOR = 2.0
HALF_ATOL = {"float16": 1e-3, "bfloat16": 8e-3}
# name -> (label, comparison): "<=" the value must not exceed the tolerance, ">=" must reach it
FIGURES = {
    "max_abs_logits": ("max |Δlogits|", "<="),
    "mean_abs_logits": ("mean |Δlogits|", None),
    "kl_mean": ("KL(ref||fastgpt2) mean", "<="),
    "kl_max": ("KL(ref||fastgpt2) max", "<="),
    "top1": ("top-1 agreement", ">="),
    "greedy": ("identical greedy tokens (worst prompt)", ">="),
    "greedy_mean": ("identical greedy tokens (mean)", None),
    "ppl_reference": ("perplexity, transformers", None),
    "ppl_fastgpt2": ("perplexity, fastgpt2", None),
    "ppl_rel": ("perplexity relative gap", "<="),
    "hidden_rel": ("hidden states, worst layer (rel)", "<="),
    # the half-precision gate (float16 / bfloat16): err(fastgpt2) vs its bound 2 * err(transformers) + atol
    "half_prefill": ("half gate: prefill err vs float32", "<="),
    "half_decode": ("half gate: decode err vs float32", "<="),
}
_HALF_FIGURES = {"prefill": "half_prefill", "decode": "half_decode"}

PROMPTS = [
    "Hello, I'm a language model,",
    "The quick brown fox jumps over the lazy dog.",
    "In 1492, Columbus sailed across the Atlantic Ocean and",
    "The capital of France is Paris, and the capital of Germany is",
    "Once upon a time, in a small village by the sea, there lived",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Machine learning models are trained on large amounts of data to",
    "She opened the door slowly, not knowing what she would find on the other side.",
]


def _tol_text(key, value) -> str:
    if value is None:
        return "(shown)"
    if key == "greedy":
        return "all" if value == "all" else f">= {value}"
    if key == "top1":
        return f">= {100 * value:g}%"
    text = f"{value:.0e}".replace("e-0", "e-") if value < 0.01 else f"{value:g}"
    return f"<= {text}"


def _epilog() -> str:
    dtypes = list(TOLERANCES)
    rows = [("max_abs_logits", "max |Δlogits|"), ("kl_mean", "KL(ref||fastgpt2) mean"),
            ("kl_max", "KL(ref||fastgpt2) max"), ("top1", "top-1 agreement"), ("greedy", "identical greedy tokens"),
            ("ppl_rel", "perplexity relative gap"), ("hidden_rel", "hidden states (rel, per layer)")]
    lines = ["tolerances (fastgpt2 dtype, against a float32 reference; a figure past its tolerance fails):",
             ("  " + f"{'figure':<32}" + "".join(f"{d:<12}" for d in dtypes)).rstrip()]
    for key, label in rows:
        lines.append(("  " + f"{label:<32}" + "".join(f"{_tol_text(key, TOLERANCES[d][key]):<12}" for d in dtypes)).rstrip())
    atol = ", ".join(f"{d} {a:g}" for d, a in HALF_ATOL.items())
    lines += [
        "hidden states rel = max |Δ| / max |reference| of the residual stream after each layer.",
        "Override one with --tol NAME=VALUE, NAME one of: " + " ".join(TOLERANCES["float32"]) + ".",
        "(--tol greedy=none only shows it.) Exit status: 0 every figure within tolerance, 1 a figure past",
        "it, 2 an error. The float16/bfloat16 bounds are first estimates for rounding alone.",
        "",
        "half-precision gate (fastgpt2 in float16 or bfloat16; none in float32), as flash-attention checks",
        "its kernels: with err = max |logits - logits of transformers in float32|, a run fails when",
        f"  err(fastgpt2) > {HALF_FACTOR:g} * err(transformers in fastgpt2's dtype) + atol   (atol: {atol})",
        "on the prompts' logits (prefill) or on the greedy continuation fed back one token at a time",
        "through fastgpt2's cache (decode; not measured with --new-tokens 0). For it transformers is also",
        "loaded in float32 and in fastgpt2's dtype; --reference-dtype's model gives the other figures.",
    ]
    return "\n".join(lines)


# the tolerance table of `fastgpt2 parity --help` (cli.py prints it as the epilog)
EPILOG = _epilog()


class ParityError(FastGPT2Error):
    """A parity run that cannot start: a checkpoint transformers cannot load, bad prompts or options."""


# -- the result ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Figures:
    """The figures over every position of every prompt (FIGURES names them; None: not measured)."""

    max_abs_logits: float
    mean_abs_logits: float
    kl_mean: float
    kl_max: float
    top1: float
    greedy: int | None  # None: no greedy continuation (new_tokens 0)
    greedy_mean: float | None
    ppl_reference: float | None  # None: no prompt longer than one token
    ppl_fastgpt2: float | None
    ppl_rel: float | None
    hidden_rel: float | None = None  # None: the forward exposed no per-layer hidden states
    half_prefill: float | None = None  # the half-precision gate's err(fastgpt2); None: no gate (float32)
    half_decode: float | None = None  # None: no gate, or no decode (new_tokens 0)

    def items(self) -> list[tuple[str, float | int | None]]:
        """(name, value) in FIGURES' order; hidden_rel and the half gate's only when measured, as in
        the JSON."""
        optional = ("hidden_rel", "half_prefill", "half_decode")
        return [(f.name, getattr(self, f.name)) for f in fields(self)
                if f.name not in optional or getattr(self, f.name) is not None]


@dataclass(frozen=True)
class Check:
    """One figure against its tolerance."""

    figure: str  # a FIGURES name
    label: str
    value: float
    op: str  # "<=": the value must not exceed the tolerance; ">=": it must reach it
    tolerance: float
    ok: bool


@dataclass(frozen=True)
class LayerDiff:
    """The residual stream at one point (embeddings, after layer i, ln_f), worst over the prompts."""

    name: str  # "embeddings", "layer 0" .. "layer L-1", "ln_f"
    max_abs_diff: float
    max_abs_reference: float
    rel: float  # max_abs_diff / max_abs_reference


@dataclass(frozen=True)
class GatePhase:
    """The half-precision gate on one phase's logits, every prompt's positions together."""

    phase: str  # "prefill" (the prompts' positions) or "decode" (the continuation through the cache)
    positions: int
    err_fastgpt2: float  # max |fastgpt2 - transformers in float32|
    err_transformers: float  # max |transformers in fastgpt2's dtype - transformers in float32|
    bound: float  # HALF_FACTOR * err_transformers + atol
    ok: bool


@dataclass(frozen=True)
class HalfPrecisionGate:
    """err(fastgpt2) <= factor * err(transformers in `dtype`) + atol, both against float32 transformers."""

    dtype: str  # fastgpt2's (float16 or bfloat16), and the second transformers model's
    factor: float
    atol: float
    phases: tuple[GatePhase, ...]  # prefill, then decode (absent with new_tokens 0)


@dataclass(frozen=True)
class RunInfo:
    """What run() compared: the two models, where, and on which prompts."""

    model: str
    reference: str
    device: str
    dtype: str
    backend: str
    reference_dtype: str
    reference_attn_implementation: str
    transformers_version: str
    transformers_tested: tuple[str, str]
    torch_version: str
    prompts: int
    positions: int
    prompt_source: str
    new_tokens: int
    tolerances: dict


@dataclass(frozen=True)
class ParityResult:
    """compare()'s verdict; run() adds `info`."""

    figures: Figures
    checks: tuple[Check, ...]
    layers: tuple[LayerDiff, ...]  # empty: the forward exposed no per-layer hidden states
    first_divergent_layer: str | None  # the first layer past the hidden-state tolerance
    worst_layer: str | None  # where the discrepancy jumps the most (past the tolerance)
    worst_figure: str | None  # the failed figure furthest past its tolerance
    failed: tuple[str, ...]  # names of the failed figures
    passed: bool
    half_precision: HalfPrecisionGate | None = None  # None: fastgpt2 in float32 (no gate)
    info: RunInfo | None = None

    def to_dict(self) -> dict:
        """The result as `fastgpt2 parity --json` writes it: the verdict's fields, then run()'s."""
        out = {
            "figures": dict(self.figures.items()),
            "checks": [asdict(c) for c in self.checks],
            "layers": [asdict(x) for x in self.layers],
            "first_divergent_layer": self.first_divergent_layer,
            "worst_layer": self.worst_layer,
            "worst_figure": self.worst_figure,
            "failed": list(self.failed),
            "passed": self.passed,
        }
        if self.half_precision is not None:  # absent in float32, whose output is as it always was
            out["half_precision"] = asdict(self.half_precision)
            out["half_precision"]["phases"] = [asdict(p) for p in self.half_precision.phases]
        if self.info is not None:
            out.update(asdict(self.info))
            out["transformers_tested"] = list(self.info.transformers_tested)
        return out


# -- loading -------------------------------------------------------------------------------------
def _tolerances(dtype_name: str, overrides: Mapping[str, float | int | str | None]) -> dict:
    """TOLERANCES[dtype_name] with `overrides` by name (greedy: a token count, "all" or None: shown only)."""
    tol = dict(TOLERANCES[dtype_name])
    for name, value in overrides.items():
        if name not in tol:
            raise ParityError(f"unknown tolerance {name!r}; the tolerances are {sorted(tol)}")
        tol[name] = value
    return tol


def _load_reference(source, device: torch.device, dtype: torch.dtype):
    from transformers import GPT2LMHeadModel

    cfg, directory = load_config(source)
    crfm = cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn
    attn = "eager" if crfm else "sdpa"
    try:
        model = GPT2LMHeadModel.from_pretrained(str(directory), attn_implementation=attn, dtype=dtype)
    except Exception as exc:  # transformers raises many types for unreadable checkpoints
        raise ParityError(f"transformers cannot load the reference {source}: {type(exc).__name__}: {exc}") from exc
    return model.to(device).eval(), directory, attn


def _tokenizer_for(*directories):
    for d in directories:
        try:
            return load_tokenizer(d), d
        except TokenizerError:
            continue
    return None, None


def _prompt_ids(model, directories, prompts_file, new_tokens: int, random_prompts: int,
                seed: int) -> tuple[list[list[int]], str]:
    """Token-id prompts and a line describing them."""
    vocab, limit = model.config.vocab_size, model.config.n_positions - new_tokens
    if limit < 1:
        raise ParityError(f"--new-tokens {new_tokens} leaves no room for a prompt in n_positions="
                          f"{model.config.n_positions}")
    tokenizer, where = _tokenizer_for(*directories)
    if prompts_file is not None:
        path = Path(prompts_file)
        try:
            texts = [line for line in path.read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise ParityError(f"--prompts {path}: cannot read it ({exc})") from exc
        if not texts:
            raise ParityError(f"--prompts {path} holds no prompt (one per line)")
        if tokenizer is None:
            raise ParityError(f"--prompts needs a tokenizer (tokenizer.json, or vocab.json + merges.txt) in {directories[0]}")
        what = f"{len(texts)} prompts from {path}"
    elif tokenizer is not None:
        texts, what = PROMPTS, f"{len(PROMPTS)} built-in English prompts"
    else:
        gen = torch.Generator().manual_seed(seed)
        lengths = [min(limit, n) for n in (4, 9, 16, 25, 40, 64, 100, 7, 33, 12)]
        n = max(1, random_prompts)
        ids = [torch.randint(0, vocab, (lengths[i % len(lengths)],), generator=gen).tolist() for i in range(n)]
        return ids, f"{n} random token-id prompts (seed {seed}; no tokenizer in {directories[0]})"
    prompts = []
    for text in texts:
        ids = tokenizer.encode(text).ids[:limit]
        if not ids:
            raise ParityError(f"prompt {text!r} encodes to no tokens")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ParityError(f"the tokenizer in {where} gives token id {bad[0]}, outside the model's vocabulary "
                              f"[0, {vocab}): it does not belong to this checkpoint")
        prompts.append(ids)
    return prompts, f"{what} (tokenizer from {where})"


# -- recording fastgpt2's residual stream ------------------------------------------------------------
class _RecordingOps:
    """Wraps a model's ops and keeps the residual stream its layernorm calls see: the forward's own
    tensors, nothing recomputed. A layernorm with layer j's ln_1 weight normalises the stream entering
    layer j (the output of layer j - 1); the one with ln_f normalises the last layer's output."""

    def __init__(self, inner, model):
        self._inner = inner
        self._ln1 = {id(lw.ln_1_w): i for i, lw in enumerate(model.layers)}
        self._ln_f = id(model.ln_f[0])
        self.n_layer = len(model.layers)
        self.states: dict[int, torch.Tensor] = {}  # index into [embeddings, layer 0..L-1, ln_f]

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def _keep(self, index, t):
        self.states[index] = t.detach().float().clone()

    def embed_layer_norm(self, ids, start, wte, wpe, weight, bias, eps):
        y, h = self._inner.embed_layer_norm(ids, start, wte, wpe, weight, bias, eps)
        if self._ln1.get(id(weight)) == 0:
            self._keep(0, h)
        return y, h

    def _record(self, weight, y, s):
        key = id(weight)
        if key in self._ln1:
            self._keep(self._ln1[key], s)  # the stream entering layer j
        elif key == self._ln_f:
            self._keep(self.n_layer, s)  # the last layer's output
            self._keep(self.n_layer + 1, y)
        return y, s

    def layer_norm(self, x, residual, weight, bias, eps):
        return self._record(weight, *self._inner.layer_norm(x, residual, weight, bias, eps))

    def linear_norm(self, x, w, b, residual, weight, bias, eps, workspace=None):
        # the MLP down projection + residual + the next layernorm (layer j's ln_1 or ln_f): one op
        return self._record(weight, *self._inner.linear_norm(x, w, b, residual, weight, bias, eps, workspace))


def _fastgpt2_forward(model, ids):
    recorder = _RecordingOps(model.ops, model)
    model.ops = recorder
    try:
        logits = model(ids)
    finally:
        model.ops = recorder._inner
    n = model.config.n_layer + 2
    states = [recorder.states.get(i) for i in range(n)]
    return logits[0].float(), (states if all(s is not None for s in states) else None)


def _reference_forward(reference, ids):
    captured = {}

    def hook(_module, _args, output):
        captured["last"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = reference.transformer.h[-1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = reference(ids, output_hidden_states=True)
    finally:
        handle.remove()
    hs = [h[0].float() for h in out.hidden_states]  # [embeddings, out_0 .. out_{L-2}, ln_f(out_{L-1})]
    states = hs[:-1] + [captured["last"][0].float(), hs[-1]]
    return out.logits[0].float(), states


def _reference_greedy(reference, ids, n):
    """transformers' greedy continuation of ids [1, T], exactly n tokens (its forward over its own cache)."""
    name = cache_argument()  # "cache" from transformers 5.24, "past_key_values" before
    out_tokens = []
    with torch.no_grad():
        out = reference(ids, use_cache=True)
        for step in range(n):
            nxt = out.logits[:, -1].argmax(-1)
            out_tokens.append(int(nxt))
            if step + 1 < n:
                out = reference(nxt[:, None], use_cache=True, **{name: out[name]})
    return out_tokens


def _fastgpt2_through_cache(model, ids_list, tokens):
    """fastgpt2's logits through its own cache: model.prefill over the prompt (its last position),
    then `tokens` fed one at a time with model.decode -> [1 + len(tokens), V] float32, positions
    T-1 .. T-1+len(tokens)."""
    device = model.device
    cache = model.new_cache(1, len(ids_list) + len(tokens))
    seq_lens = torch.tensor([len(ids_list)], dtype=torch.int32, device=device)
    out = [model.prefill(torch.tensor([ids_list], device=device), seq_lens, cache)]
    for token in tokens:
        out.append(model.decode(torch.tensor([[token]], device=device), cache))
    return torch.cat(out).float()


def _gate_errors(model, half_references, ids_list, forward_logits, continuation) -> dict:
    """{phase: (err fastgpt2, err transformers in the half dtype, positions)} of one prompt for the
    half-precision gate; every logit against transformers in float32 over prompt + continuation."""
    exact_model, half_model = half_references
    seq = torch.tensor([ids_list + continuation], device=model.device)
    with torch.no_grad():
        exact = exact_model(seq).logits[0].float()  # [T + n, V]
        half = half_model(seq).logits[0].float()
    t = len(ids_list)
    cached = _fastgpt2_through_cache(model, ids_list, continuation)  # [1 + n, V]: positions t-1 ..
    phases = {  # phase -> (fastgpt2, float32 reference, half reference, positions)
        "prefill": (torch.cat([forward_logits, cached[:1]]), torch.cat([exact[:t], exact[t - 1 : t]]),
                    torch.cat([half[:t], half[t - 1 : t]]), t),  # position t-1 twice: forward and prefill
        "decode": (cached[1:], exact[t:], half[t:], len(continuation)),
    }
    return {phase: (float((ours - ref).abs().max()), float((hf - ref).abs().max()), n)
            for phase, (ours, ref, hf, n) in phases.items() if n > 0}


def _worst(a: float, b: float) -> float:
    """The larger of a and b; NaN when either is (max() would drop a NaN, and it must fail)."""
    return a if math.isnan(a) else b if math.isnan(b) else max(a, b)


def _half_gate(dtype_name: str, atol: float, errors: dict) -> HalfPrecisionGate:
    phases = []
    for phase in ("prefill", "decode"):
        if phase not in errors:
            continue
        ours, hf, positions = errors[phase]
        bound = HALF_FACTOR * hf + atol
        phases.append(GatePhase(phase=phase, positions=positions, err_fastgpt2=ours, err_transformers=hf,
                                bound=bound, ok=math.isfinite(ours) and math.isfinite(bound) and ours <= bound))
    return HalfPrecisionGate(dtype=dtype_name, factor=HALF_FACTOR, atol=atol, phases=tuple(phases))


# -- the comparison ------------------------------------------------------------------------------
def compare(model, reference, prompts: list[list[int]], new_tokens: int, tol: dict,
            half_references=None, half_atol: float | None = None) -> ParityResult:
    """All figures, per-layer differences and the verdict of fastgpt2 `model` against transformers
    `reference` on token-id `prompts` (each alone, batch 1), greedy continuations of `new_tokens`,
    with the tolerances `tol` (TOLERANCES' names; greedy "all": every token).

    half_references: (transformers in float32, transformers in fastgpt2's dtype) for the
    half-precision gate (None: no gate, as for float32); half_atol: its atol (default
    HALF_ATOL[fastgpt2's dtype])."""
    device = model.device
    dtype_name = str(model.dtype).removeprefix("torch.")
    gate_errors = {}  # phase -> [err fastgpt2, err transformers, positions], worst over the prompts
    n_layer = model.config.n_layer
    names = ["embeddings"] + [f"layer {i}" for i in range(n_layer)] + ["ln_f"]
    layer_diff = [0.0] * len(names)
    layer_ref = [0.0] * len(names)
    have_layers = True
    max_abs = sum_abs = 0.0
    n_values = n_pos = agree = 0
    kl_sum, kl_max = 0.0, 0.0
    nll_ref = nll_ours = 0.0
    n_nll = 0
    greedy = []
    for ids_list in prompts:
        ids = torch.tensor([ids_list], device=device)
        ours, our_states = _fastgpt2_forward(model, ids)
        ref, ref_states = _reference_forward(reference, ids)
        diff = (ours - ref).abs()
        max_abs = _worst(max_abs, float(diff.max()))
        sum_abs += float(diff.double().sum())
        n_values += diff.numel()
        lp_ref, lp_ours = ref.double().log_softmax(-1), ours.double().log_softmax(-1)
        kl = (lp_ref.exp() * (lp_ref - lp_ours)).sum(-1).clamp_min(0)  # [T]
        kl_sum += float(kl.sum())
        kl_max = _worst(kl_max, float(kl.max()))
        agree += int((ref.argmax(-1) == ours.argmax(-1)).sum())
        n_pos += ref.shape[0]
        if len(ids_list) > 1:
            target = ids[0, 1:]
            nll_ref -= float(lp_ref[:-1].gather(1, target[:, None]).sum())
            nll_ours -= float(lp_ours[:-1].gather(1, target[:, None]).sum())
            n_nll += len(ids_list) - 1
        if our_states is None or len(ref_states) != len(names):
            have_layers = False
        else:
            for k, (a, b) in enumerate(zip(our_states, ref_states)):
                a = a.reshape(b.shape)
                layer_diff[k] = _worst(layer_diff[k], float((a - b).abs().max()))
                layer_ref[k] = _worst(layer_ref[k], float(b.abs().max()))
        ours_new = []
        if new_tokens > 0:
            ours_new = model.generate(ids, max_new_tokens=new_tokens)[0, len(ids_list):].tolist()
            ref_new = _reference_greedy(reference, ids, new_tokens)
            same = 0
            while same < new_tokens and ours_new[same] == ref_new[same]:
                same += 1
            greedy.append(same)
        if half_references is not None:
            for phase, (e_ours, e_hf, n) in _gate_errors(model, half_references, ids_list, ours, ours_new).items():
                worst = gate_errors.setdefault(phase, [0.0, 0.0, 0])
                worst[0], worst[1], worst[2] = _worst(worst[0], e_ours), _worst(worst[1], e_hf), worst[2] + n

    layers = ()
    if have_layers:
        layers = tuple(LayerDiff(name, d, r, d / r if r > 0 else d) for name, d, r in zip(names, layer_diff, layer_ref))
    ppl_ref = math.exp(nll_ref / n_nll) if n_nll else None
    ppl_ours = math.exp(nll_ours / n_nll) if n_nll else None
    figures = Figures(
        max_abs_logits=max_abs,
        mean_abs_logits=sum_abs / max(1, n_values),
        kl_mean=kl_sum / max(1, n_pos),
        kl_max=kl_max,
        top1=agree / max(1, n_pos),
        greedy=min(greedy) if greedy else None,
        greedy_mean=sum(greedy) / len(greedy) if greedy else None,
        ppl_reference=ppl_ref,
        ppl_fastgpt2=ppl_ours,
        ppl_rel=abs(ppl_ours - ppl_ref) / ppl_ref if n_nll else None,
        hidden_rel=max(x.rel for x in layers) if layers else None,
    )
    gate = None
    if half_references is not None:
        gate = _half_gate(dtype_name, HALF_ATOL[dtype_name] if half_atol is None else half_atol, gate_errors)
        by_phase = {p.phase: p.err_fastgpt2 for p in gate.phases}
        figures = replace(figures, half_prefill=by_phase.get("prefill"), half_decode=by_phase.get("decode"))

    checks = []
    for key, value in figures.items():
        label, op = FIGURES[key]
        limit = tol.get(key)
        if key == "greedy" and limit == "all":
            limit = new_tokens
        if op is None or limit is None or value is None:
            continue
        ok = value <= limit if op == "<=" else value >= limit
        if not math.isfinite(value):
            ok = False
        checks.append(Check(figure=key, label=label, value=value, op=op, tolerance=limit, ok=ok))
    for p in gate.phases if gate is not None else ():  # each phase's err against its own bound
        key = _HALF_FIGURES[p.phase]
        checks.append(Check(figure=key, label=FIGURES[key][0], value=p.err_fastgpt2, op="<=", tolerance=p.bound,
                            ok=p.ok))

    first = jump = None
    if layers:
        hidden_tol = tol["hidden_rel"]
        for x in layers:
            if first is None and not x.rel <= hidden_tol:
                first = x.name
        floor = hidden_tol * 1e-3
        ratios = [layers[0].rel / floor] + [
            layers[k].rel / max(layers[k - 1].rel, floor) for k in range(1, len(layers))
        ]
        k = max(range(len(layers)), key=lambda i: ratios[i])
        if layers[k].rel > hidden_tol:
            jump = layers[k].name
    failed = [c for c in checks if not c.ok]
    worst = None
    if failed:
        def badness(c):
            v, t = c.value, c.tolerance
            if not math.isfinite(v):
                return math.inf
            return v / t if c.op == "<=" and t > 0 else (t - v) / max(t, 1e-30) if c.op == ">=" else 0.0
        worst = max(failed, key=badness).figure
    return ParityResult(
        figures=figures,
        checks=tuple(checks),
        layers=layers,
        first_divergent_layer=first,
        worst_layer=jump,
        worst_figure=worst,
        failed=tuple(c.figure for c in failed),
        passed=not failed,
        half_precision=gate,
    )


def run(
    model: str,
    reference: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    backend: str | None = None,
    reference_dtype: str = "float32",
    prompts_file: str | Path | None = None,
    new_tokens: int = 32,
    random_prompts: int = 6,
    seed: int = 0,
    tol_overrides: Mapping[str, float | int | str | None] | None = None,
    half_atol: float | None = None,
) -> ParityResult:
    """Load `model` in fastgpt2 (device / dtype / backend: None picks as GPT2.from_pretrained does) and
    `reference` (default: the same checkpoint) in transformers, in `reference_dtype` ("same": fastgpt2's),
    and compare() them on the prompts: `prompts_file` (one per line), else the built-in English ones
    through the checkpoint's tokenizer, else `random_prompts` seeded random-id prompts. The tolerances
    are TOLERANCES[fastgpt2's dtype] with `tol_overrides` by name. fastgpt2 in float16 / bfloat16 also
    runs the half-precision gate: `reference` in transformers in float32 and in fastgpt2's dtype (the
    `reference_dtype` model where it is one of them), atol `half_atol` (default HALF_ATOL[dtype]).
    The result carries the run's `info`."""
    import transformers

    try:
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        ref_dtype = dtype if reference_dtype == "same" else resolve_dtype(reference_dtype, device)
    except ValueError as exc:  # torch's own device / dtype errors: the user's to fix
        raise ParityError(str(exc)) from None
    dtype_name = str(dtype).removeprefix("torch.")
    tol = _tolerances(dtype_name, tol_overrides or {})
    if new_tokens < 0:
        raise ParityError(f"--new-tokens must be >= 0, got {new_tokens}")
    ours = GPT2.from_pretrained(model, device=device, dtype=dtype, backend=backend or "auto")
    reference_source = reference if reference is not None else model
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_model, ref_dir, attn = _load_reference(reference_source, device, ref_dtype)
            if ref_model.config.vocab_size != ours.config.vocab_size or ref_model.config.n_layer != ours.config.n_layer:
                raise ParityError(
                    f"--reference {reference_source} is not the same architecture as --model {model}: "
                    f"vocab {ref_model.config.vocab_size} vs {ours.config.vocab_size}, layers "
                    f"{ref_model.config.n_layer} vs {ours.config.n_layer}")
            half_references = None
            if dtype != torch.float32:  # the half-precision gate: transformers in float32 and in fastgpt2's dtype
                half_references = tuple(ref_model if ref_dtype == d else _load_reference(reference_source, device, d)[0]
                                        for d in (torch.float32, dtype))
            prompts, prompt_note = _prompt_ids(ours, [ours.source_dir, ref_dir], prompts_file, new_tokens,
                                               random_prompts, seed)
            result = compare(ours, ref_model, prompts, new_tokens, tol, half_references, half_atol)
    finally:
        transformers.logging.set_verbosity(level)
    info = RunInfo(
        model=str(model),
        reference=str(reference_source),
        device=str(device),
        dtype=dtype_name,
        backend=ours.backend,
        reference_dtype=str(ref_dtype).removeprefix("torch."),
        reference_attn_implementation=attn,
        transformers_version=transformers.__version__,
        transformers_tested=tuple(TESTED_TRANSFORMERS),
        torch_version=torch.__version__,
        prompts=len(prompts),
        positions=sum(len(p) for p in prompts),
        prompt_source=prompt_note,
        new_tokens=new_tokens,
        tolerances=tol,
    )
    return replace(result, info=info)


# -- the report ------------------------------------------------------------------------------------
def _fmt(key, value):
    if value is None:
        return "n/a"
    if key == "top1":
        return f"{100 * value:.2f}%"
    if key in ("greedy",):
        return f"{value}"
    if key in ("greedy_mean",):
        return f"{value:.1f}"
    if key.startswith("ppl_") and key != "ppl_rel":
        return f"{value:.4f}"
    return f"{value:.3e}"


def format_report(r: ParityResult) -> str:
    """The figures, their tolerances and the verdict as text (what `fastgpt2 parity` prints)."""
    lines = ["fastgpt2 parity"]
    if r.info is not None:
        i = r.info
        lines += [
            f"  fastgpt2:  {i.model}  (backend {i.backend}, {i.device}, {i.dtype})",
            f"  reference: {i.reference}  (transformers {i.transformers_version}, attn "
            f"{i.reference_attn_implementation}, {i.device}, {i.reference_dtype})",
            f"  prompts:   {i.prompt_source}: {i.positions} positions; greedy continuation {i.new_tokens} tokens",
        ]
    lines += ["", f"  {'figure':<42} {'value':>12}   {'tolerance':<14} status"]
    checks = {c.figure: c for c in r.checks}
    for key, value in r.figures.items():
        label = FIGURES[key][0]
        c = checks.get(key)
        if c is None:
            tol_text, status = "", ""
        else:
            tol_text = f"{c.op} {_fmt(key, c.tolerance)}"
            status = "ok" if c.ok else "FAIL"
        lines.append(f"  {label:<42} {_fmt(key, value):>12}   {tol_text:<14} {status}".rstrip())
    g = r.half_precision
    if g is not None:
        lines += ["", f"  half-precision gate ({g.dtype}): err = max |logits - transformers float32 logits|; "
                      f"bound = {g.factor:g} * err(transformers {g.dtype}) + {g.atol:g}",
                  f"    {'phase':<9} {'positions':>9}  {'fastgpt2':>10}  {'transformers':>12}  {'bound':>10}  status"]
        for p in g.phases:
            lines.append(f"    {p.phase:<9} {p.positions:>9}  {p.err_fastgpt2:>10.3e}  {p.err_transformers:>12.3e}  "
                         f"{p.bound:>10.3e}  {'ok' if p.ok else 'FAIL'}")
        if all(p.phase != "decode" for p in g.phases):
            lines.append("    decode    not measured (no greedy continuation: --new-tokens 0)")
    if r.layers:
        lines += ["", "  per-layer hidden states (max |Δ|, max |reference|, relative):"]
        hidden = checks.get("hidden_rel")  # absent when its tolerance is None: shown only
        for x in r.layers:
            mark = "" if hidden is None or x.rel <= hidden.tolerance else "  <- past tolerance"
            if x.name == r.first_divergent_layer:
                mark += " (first)"
            if x.name == r.worst_layer:
                mark += " (largest jump)"
            name = x.name if x.name in ("embeddings", "ln_f") else x.name + " out"
            lines.append(f"    {name:<14} {x.max_abs_diff:.3e}  {x.max_abs_reference:.3e}  {x.rel:.3e}{mark}")
    else:
        lines += ["", "  per-layer hidden states: not available (the model's forward did not expose them)"]
    lines.append("")
    if r.passed:
        lines.append("PASS: every figure is within its tolerance")
    else:
        parts = []
        for c in r.checks:
            if not c.ok:
                word = "above" if c.op == "<=" else "below"
                parts.append(f"{c.label} {_fmt(c.figure, c.value)} is {word} {_fmt(c.figure, c.tolerance)}")
        lines.append("FAIL: " + "; ".join(parts))
        lines.append(f"  worst figure: {FIGURES[r.worst_figure][0]}")
        if r.first_divergent_layer is not None:
            lines.append(f"  the discrepancy starts at: {r.first_divergent_layer}"
                         + (f"; it jumps most at: {r.worst_layer} (worst layer)" if r.worst_layer else ""))
        elif r.failed == ("half_decode",):  # the hidden states are the forward's: they do not see decode
            lines.append("  only the decode logits fail (the prompts' are within the gate): the difference is in "
                         "the decode path (the cache, decode attention, decode positions)")
        elif set(r.failed) <= set(_HALF_FIGURES.values()):
            lines.append("  only the half-precision gate fails; every hidden state is within its own (looser) "
                         "tolerance: a float32 run (--dtype float32) names the layer")
        elif r.layers:
            lines.append("  every layer's hidden state is within tolerance: the difference is in the head (lm_head)")
    return "\n".join(lines)

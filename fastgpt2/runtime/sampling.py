"""Choosing the next token from logits: greedy, or sampled after transformers' warpers
(temperature, top-k, top-p). ``RowSampler`` chooses each row's token with its own settings, as
device tensors: the engine's decode step (runtime/engine.py) runs it on the prefill's last logits
and on every step's, inside a CUDA graph on CUDA. ``filter_logits`` is the warpers for one setting,
the reference the per-row filter follows.

Sampling draws with the exponential race (argmax of p / q with q ~ Exp(1), an exact sample of p),
its noise from a counter-based generator (``race_noise``) on the model's device: no host sync,
capturable, and a seed reproduces a run.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import InputError


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def check(self) -> "Sampling":
        """Itself, or an InputError naming the bad setting (settings without do_sample are one)."""
        if self.do_sample:
            if not self.temperature > 0:
                raise InputError(f"temperature must be > 0 when sampling, got {self.temperature!r}")
            k = self.top_k
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise InputError(f"top_k must be an integer >= 1 (or None), got {k!r}")
            if self.top_p is not None and not 0 < self.top_p <= 1:
                raise InputError(f"top_p must be in (0, 1] (or None), got {self.top_p!r}")
        elif self.temperature != 1.0 or self.top_k is not None or self.top_p is not None:
            raise InputError("temperature, top_k and top_p shape sampling; pass do_sample=True to use them "
                             "(greedy ignores them)")
        return self


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None):
    """Sampling warpers in transformers' order: temperature, then top-k, then top-p (nucleus: keep the
    smallest set of most likely tokens whose probability mass is >= top_p). logits [B, V] fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the top token always stays (mass_before = 0 < top_p)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return logits


# -- per-row sampling: one step serves any mix of settings ------------------------------------------
# splitmix64's constants as signed int64 (torch has no uint64 arithmetic; products wrap)
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 x by k (torch's >> is arithmetic on negative values)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors: a bijection that scrambles every bit."""
    x = (x ^ _srl(x, 30)) * _MIX1
    x = (x ^ _srl(x, 27)) * _MIX2
    return x ^ _srl(x, 31)


def race_noise(seed: torch.Tensor, draw: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [R, V] (float64) for the exponential race of rows with seeds [R] at their draw
    counts [R] (int64), over token ids vocab [V] (int64): a counter-based generator, so a row's
    noise depends on its seed, its draw and the token only, never on the rows beside it."""
    x = _mix(_mix(seed[:, None] * _GOLDEN + draw[:, None]) + vocab[None, :] * _GOLDEN)
    u = (_srl(x, 11).double() + 0.5) * 2.0**-53  # (0, 1), 53 bits
    return -torch.log(u)


class RowSampler:
    """Per-row sampling parameters as device tensors [B] (greedy or sampled, temperature, top-k, top-p,
    seed and draw count) and the choice of each row's next token from logits [B, V], so that one step
    (one captured graph on CUDA) serves any mix of settings. Greedy rows take the first maximal logit;
    sampled rows apply transformers' warpers in its order (temperature, top-k, top-p, as
    ``filter_logits``) and draw by the exponential race with ``race_noise``: a row's tokens depend on
    its own logits, settings, seed and draw count only.

    The host keeps a mirror of each row's settings (``set_row``), so a step over rows that are all
    greedy, or that filter nothing, skips the sort without reading the device."""

    def __init__(self, batch: int, vocab_size: int, device: torch.device):
        self.batch, self.device = batch, device
        self.sample = torch.zeros(batch, dtype=torch.bool, device=device)  # [B]
        self.temperature = torch.ones(batch, dtype=torch.float32, device=device)  # [B]
        self.top_k = torch.full((batch,), vocab_size, dtype=torch.long, device=device)  # [B] (V: off)
        self.top_p = torch.ones(batch, dtype=torch.float32, device=device)  # [B] (1: off)
        self.seed = torch.zeros(batch, dtype=torch.long, device=device)  # [B]
        self.draws = torch.zeros(batch, dtype=torch.long, device=device)  # [B] draws made by each row
        self.vocab = torch.arange(vocab_size, dtype=torch.long, device=device)  # [V]
        self.best = torch.empty(batch, dtype=torch.float32, device=device)  # [B] torch.max's values output
        self.host: list[Sampling] = [Sampling()] * batch

    def set_row(self, row: int, sampling: Sampling, seed: int) -> None:
        """Row `row` samples with `sampling` from `seed` (its draw count restarts at 0)."""
        v = self.vocab.shape[0]
        self.host[row] = sampling
        self.sample[row] = sampling.do_sample
        self.temperature[row] = sampling.temperature
        self.top_k[row] = min(sampling.top_k, v) if sampling.top_k is not None else v
        self.top_p[row] = sampling.top_p if sampling.top_p is not None else 1.0
        self.seed[row] = seed
        self.draws[row] = 0

    def copy_rows(self, other: "RowSampler") -> None:
        """Take over the rows of a smaller sampler (an engine growing its slots): rows 0 .. other.batch-1."""
        b = other.batch
        for name in ("sample", "temperature", "top_k", "top_p", "seed", "draws"):
            getattr(self, name)[:b].copy_(getattr(other, name))
        self.host[:b] = other.host

    def variant(self, rows: slice | None = None) -> tuple[bool, bool]:
        """(any row samples, any sampled row filters): the work a call over `rows` does, from the host
        mirror. A CUDA graph captures one variant and replays it for any settings of the same variant."""
        host = self.host[slice(None) if rows is None else rows]
        return (any(s.do_sample for s in host),
                any(s.do_sample and (s.top_k is not None or s.top_p is not None) for s in host))

    def __call__(self, logits: torch.Tensor, tokens: torch.Tensor, rows: slice | None = None) -> None:
        """tokens [R] (long) = the next tokens of rows `rows` (default: all) after their logits [R, V]."""
        rows = slice(None) if rows is None else rows
        sample, filtered = self.variant(rows)
        x = logits.float()
        # greedy: the first maximal logit, through torch.max (on the CPU 3-4x faster than torch.argmax
        # over a GPT-2 vocabulary: README, "CPU (measured)")
        torch.max(x, dim=-1, out=(self.best[rows], tokens))
        if not sample:
            return
        x = x / self.temperature[rows, None]
        if filtered:
            x = self._filter(x, self.top_k[rows], self.top_p[rows])
        noise = race_noise(self.seed[rows], self.draws[rows], self.vocab)  # [R, V]
        drawn = (x.softmax(-1).double() / noise).argmax(-1)  # [R]
        sample = self.sample[rows]
        tokens.copy_(torch.where(sample, drawn, tokens))
        self.draws[rows] += sample.long()

    @staticmethod
    def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
        """filter_logits' top-k then top-p with per-row k [R] (V: off) and p [R] (1: off); x [R, V] fp32."""
        sorted_x, order = torch.sort(x, descending=True, dim=-1)  # [R, V]
        kth = sorted_x.gather(-1, (top_k - 1)[:, None])  # [R, 1]
        x = x.masked_fill(x < kth, float("-inf"))
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))  # the same order, the same values
        probs = sorted_x.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the strictly more likely tokens
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)  # the top token always stays
        return x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))

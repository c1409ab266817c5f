"""`fastgpt2 eval`: perplexity of a model on a text, with a sliding window as transformers' perplexity
guide computes it (https://huggingface.co/docs/transformers/perplexity).

The text's tokens are scored in windows of `max_length` tokens (default: the model's n_positions)
that start `stride` tokens apart (default min(512, max_length)); each window scores the tokens the
previous one did not, except its own first token (it has no context in the window: with disjoint
windows, stride == max_length, each window's first token goes unscored, as in the guide), each with
the window's tokens before it as context. The
perplexity is exp(mean negative log-likelihood) over every scored token, in float32 whatever the
model's dtype. stride == max_length: disjoint windows (fast, less context); a smaller stride: more
context per token, more forwards.

    result = perplexity(model, token_ids, stride=512)   # EvalResult: perplexity, nll, tokens, seconds
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from .errors import FastGPT2Error
from .runtime.generate import GPT2


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    nll: float  # mean negative log-likelihood (nats) per scored token
    scored_tokens: int  # tokens whose log-likelihood counts
    windows: int
    seconds: float  # the forwards' wall-clock time (synchronised)

    @property
    def tokens_per_s(self) -> float:
        return self.scored_tokens / self.seconds


def windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) per window over n_tokens tokens, as the guide's loop:
    a window [begin, end) scores positions max(begin + 1, previous end) .. end - 1."""
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + max_length, n_tokens)
        out.append((begin, end, max(begin + 1, prev_end)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def perplexity(model: GPT2, token_ids: list[int] | torch.Tensor, stride: int | None = None,
               max_length: int | None = None) -> EvalResult:
    """The sliding-window perplexity of `token_ids` (at least 2 tokens) under `model`; stride defaults
    to min(512, max_length), max_length to n_positions."""
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    max_length = max_length or model.config.n_positions
    stride = min(512, max_length) if stride is None else stride
    if not 2 <= max_length <= model.config.n_positions:
        raise FastGPT2Error(f"max_length must be in [2, n_positions = {model.config.n_positions}], got {max_length}")
    if not 1 <= stride <= max_length:
        raise FastGPT2Error(f"stride must be in [1, max_length = {max_length}], got {stride}")
    if ids.numel() < 2:
        raise FastGPT2Error(f"the text has {ids.numel()} token(s): perplexity needs at least 2")
    if int(ids.min()) < 0 or int(ids.max()) >= model.config.vocab_size:
        raise FastGPT2Error(f"token ids must be in the model's vocabulary [0, {model.config.vocab_size})")
    nll, count = 0.0, 0
    spans = windows(ids.numel(), max_length, stride)
    start = time.perf_counter()
    with torch.inference_mode():
        for begin, end, first in spans:
            window = ids[begin:end].to(model.device)
            logits = model(window[None])[0].float()  # [T, V]: position t predicts token t + 1
            lp = torch.log_softmax(logits[first - begin - 1:end - begin - 1], -1)  # [scored, V]
            nll -= float(lp.gather(1, window[first - begin:, None]).sum())
            count += end - first
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    return EvalResult(math.exp(nll / count), nll / count, count, len(spans), seconds)

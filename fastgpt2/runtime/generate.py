"""Generation: ``generate`` / ``stream`` over a batch of prompts, greedy or sampled (temperature,
top-k, top-p), per-row EOS stopping, seeded sampling, streaming; and ``GPT2``, the public model: the
network (runtime/model.py) with those methods and its engine (runtime/engine.py), on which they run:
each row is a request of the engine, so every prompt is generated exactly as it would be alone.

Batches may be ragged (left-padded, as transformers expects for generation); each row's tokens
start at position 0 of its cache slot.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterator, Sequence

import torch

from .engine import Engine, slot_bucket
from .graphs import graph_cache_len, resolve_use_cuda_graph
from .model import GPT2Network, InputError, prepare_batch
from .sampling import Sampling


def _eos_list(eos_token_id) -> list:
    """eos_token_id (None, one id or several) as a list."""
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _check_args(model: GPT2Network, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id):
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    Sampling(bool(do_sample), temperature, top_k, top_p).check()
    eos = _eos_list(eos_token_id)
    vocab = model.config.vocab_size
    for tok in eos + ([] if pad_token_id is None else [pad_token_id]):
        if isinstance(tok, bool) or not isinstance(tok, int) or not 0 <= tok < vocab:
            raise InputError(f"eos/pad token id {tok!r} is not a token of this model's vocabulary [0, {vocab})")
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else None)
    return eos, pad


def stream(
    model: GPT2,
    input_ids,
    max_new_tokens: int = 32,
    attention_mask=None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    use_cuda_graph: bool | None = None,
    stop_check_every: int | None = None,
) -> Iterator[torch.Tensor]:
    """An iterator over each step's next tokens [B] (rows that already stopped yield the pad token),
    ending once every row has stopped. Arguments are checked here, before the first step.

    The rows run as requests of the model's engine (``model.engine``, shared by every stream and
    generate call of the model: one cache), so a row's tokens are the ones that prompt gets alone.
    seed: row 0 samples from `seed`, row b from a seed derived from (seed, b); None: fresh seeds.
    use_cuda_graph: replay the decode step from CUDA graphs (default: True on CUDA; the CPU runs the
    same step eagerly). stop_check_every is deprecated and ignored: the engine reads each step's
    tokens and stops a row at its EOS."""
    eos, pad = _check_args(model, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
    ids, _, lens = prepare_batch(model, input_ids, attention_mask, require_left_padding=True)
    total = int(lens.max()) + max_new_tokens
    if total > model.config.n_positions:
        raise InputError(
            f"the longest prompt ({int(lens.max())} tokens) plus max_new_tokens ({max_new_tokens}) is {total}, "
            f"past this model's n_positions ({model.config.n_positions}); shorten the prompt or generate fewer tokens"
        )
    use_cuda_graph = resolve_use_cuda_graph(use_cuda_graph, model.device)
    if stop_check_every is not None:
        warnings.warn("stop_check_every is deprecated and has no effect: generation runs on the model's engine, "
                      "which reads every step's tokens and stops each row at its EOS", DeprecationWarning, stacklevel=2)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InputError(f"seed must be an integer (or None), got {seed!r}")
    sampling = Sampling(do_sample, temperature, top_k, top_p) if do_sample else Sampling()
    prompts = [row[:n].tolist() for row, n in zip(ids.cpu(), lens.tolist())]
    return _steps(model, prompts, total, max_new_tokens, sampling, eos, pad, seed, use_cuda_graph)


def row_seed(seed: int, row: int) -> int:
    """Row `row`'s seed in a batch generated with `seed`: the seed itself for row 0 (so a prompt alone
    samples as the engine's request with that seed), splitmix64 of (seed, row) for the others; 62 bits."""
    if row == 0:
        return seed % 2**62
    x = (seed * 0x9E3779B97F4A7C15 + row) % 2**64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % 2**64
    return (x ^ (x >> 31)) % 2**62


def _steps(model, prompts, total, max_new_tokens, sampling, eos, pad, seed, use_cuda_graph):
    """The rows as the engine's requests, one step's tokens [B] at a time: arguments already checked."""
    if max_new_tokens == 0:
        return
    engine = model.engine
    with engine.lock:  # room for this batch beside what already runs or waits, then its requests
        engine.reserve(slot_bucket(len(engine.running) + len(engine.queue) + len(prompts), 2**30),
                       graph_cache_len(total, model.config.n_positions))  # (powers of two: few sizes, few graphs)
        requests = [engine.add(p, max_new_tokens, sampling, None if seed is None else row_seed(seed, i), eos)
                    for i, p in enumerate(prompts)]
    try:
        for i in range(max_new_tokens):
            with engine.lock:
                while any(len(r.tokens) <= i and not r.finished for r in requests):
                    engine.step(use_cuda_graph)  # every running request gets its next token, this stream's too
            yield torch.tensor([r.tokens[i] if i < len(r.tokens) else pad for r in requests], device=model.device)
            if all(r.finished and len(r.tokens) <= i + 1 for r in requests):
                return
    finally:  # exhausted, closed or collected: its rows leave the engine
        for r in requests:
            engine.cancel(r)


def generate(
    model: GPT2,
    input_ids,
    max_new_tokens: int = 32,
    attention_mask=None,
    streamer: Callable[[torch.Tensor], None] | None = None,
    **kwargs,
) -> torch.Tensor:
    """prompt + new tokens [B, T + n], n <= max_new_tokens (fewer when every row hit EOS).
    `streamer`, if given, is called with each step's tokens [B] as they are chosen."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids)
    prompt = input_ids[None] if input_ids.dim() == 1 else input_ids
    steps = []
    for tokens in stream(model, input_ids, max_new_tokens, attention_mask, **kwargs):
        steps.append(tokens)
        if streamer is not None:
            streamer(tokens)
    if not steps:
        return prompt.clone()
    new = torch.stack(steps, 1)  # [B, n]
    return torch.cat([prompt, new.to(device=prompt.device, dtype=prompt.dtype)], 1)


class GPT2(GPT2Network):
    """A GPT-2 language model on fastgpt2's kernels: the network (prefill, decode, forward; every
    constructor: from_pretrained, from_config, from_hf) plus generation. Inference only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._engine = None

    @property
    def engine(self) -> Engine:
        """This model's engine (runtime/engine.py), built on first use with one slot of 16 positions:
        generate and stream grow it to what their batches need, and every stream of the model shares it
        (one cache, whatever the sampling settings)."""
        if self._engine is None:
            self._engine = Engine(self, max_batch=1, max_len=min(16, self.config.n_positions))
        return self._engine

    def generate(self, input_ids, max_new_tokens: int = 32, attention_mask=None, **kwargs) -> torch.Tensor:
        """prompt + new tokens [B, T + n]: see ``generate`` (this module) for every argument."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask, **kwargs)

    def stream(self, input_ids, max_new_tokens: int = 32, attention_mask=None, **kwargs) -> Iterator[torch.Tensor]:
        """Like generate, but yields each step's new tokens [B] as they are chosen."""
        return stream(self, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask, **kwargs)

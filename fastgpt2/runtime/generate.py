"""Generation: the prefill + decode loop over the preallocated cache, greedy or sampled
(temperature, top-k, top-p), per-row EOS stopping, seeded sampling, streaming; and ``GPT2``, the
public model: the network (runtime/model.py) with ``generate`` / ``stream`` methods and its pool of
captured decode steps.

Batches may be ragged (left-padded, as transformers expects for generation): each row is moved to
start at cache position 0, so every prompt is generated exactly as it would be alone.
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from .graphs import GraphPool, resolve_use_cuda_graph
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
    """An iterator over each step's next tokens [B] (rows that already stopped yield the pad token).
    Arguments are checked here, before the first step.

    use_cuda_graph: replay the decode step from a CUDA graph (default: True on CUDA; the CPU runs
    the same step eagerly). stop_check_every: how often (in steps) the host reads whether every row
    has stopped, the one host sync of the loop (default: 1 on the CPU, 8 on CUDA); up to N-1 extra
    pad steps may be yielded, and generate() trims them."""
    eos, pad = _check_args(model, max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
    ids, _, lens = prepare_batch(model, input_ids, attention_mask, require_left_padding=True)
    total = int(lens.max()) + max_new_tokens
    if total > model.config.n_positions:
        raise InputError(
            f"the longest prompt ({int(lens.max())} tokens) plus max_new_tokens ({max_new_tokens}) is {total}, "
            f"past this model's n_positions ({model.config.n_positions}); shorten the prompt or generate fewer tokens"
        )
    use_cuda_graph = resolve_use_cuda_graph(use_cuda_graph, model.device)
    if stop_check_every is None:
        stop_check_every = 8 if model.device.type == "cuda" else 1
    if isinstance(stop_check_every, bool) or not isinstance(stop_check_every, int) or stop_check_every < 1:
        raise InputError(f"stop_check_every must be an integer >= 1, got {stop_check_every!r}")
    sampling = Sampling(do_sample, temperature, top_k, top_p) if do_sample else Sampling()
    return _steps(model, ids, lens, total, max_new_tokens, sampling, eos, pad, seed, use_cuda_graph, stop_check_every)


def _steps(model, ids, lens, total, max_new_tokens, sampling, eos, pad, seed, use_cuda_graph, stop_check_every):
    """The prefill + decode loop behind stream(): arguments already checked."""
    if max_new_tokens == 0:
        return
    b = ids.shape[0]
    pool = model.graphs
    step = pool.lease(b, total, sampling, seed, use_cuda_graph)  # this stream's own step, until it ends
    try:
        yield from _decode(model, step, ids, lens, max_new_tokens, eos, pad, stop_check_every)
    finally:  # exhausted, closed or collected: the step goes back to the pool
        pool.release(step)


def _decode(model, step, ids, lens, max_new_tokens, eos, pad, stop_check_every):
    b, cache = ids.shape[0], step.cache
    eos_ids = torch.tensor(eos, device=model.device, dtype=torch.long)
    done = torch.zeros(b, dtype=torch.bool, device=model.device)

    tokens = step.start(model.prefill(ids, lens.to(model.device, torch.int32), cache))  # [B], static
    for i in range(max_new_tokens):
        if i:
            step()  # reads tokens, writes the next ones into the same buffer
        if len(eos):
            tokens.masked_fill_(done, pad)  # in place: a stopped row feeds the pad token on
            done |= torch.isin(tokens, eos_ids)
        yield tokens.clone()
        if i + 1 == max_new_tokens:
            return
        if len(eos) and (i + 1) % stop_check_every == 0 and bool(done.all()):
            return


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
    eos = kwargs.get("eos_token_id")
    if eos is not None and len(steps) > 1:
        # with stop_check_every > 1 the loop may run past the step where every row had stopped
        eos_ids = torch.tensor(_eos_list(eos), device=new.device)
        stopped = torch.isin(new, eos_ids).cummax(1).values.all(0)  # [n]: every row has hit EOS by then
        if bool(stopped.any()):
            new = new[:, : int(stopped.int().argmax()) + 1]
    return torch.cat([prompt, new.to(device=prompt.device, dtype=prompt.dtype)], 1)


class GPT2(GPT2Network):
    """A GPT-2 language model on fastgpt2's kernels: the network (prefill, decode, forward; every
    constructor: from_pretrained, from_config, from_hf) plus generation. Inference only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._graphs = None

    @property
    def graphs(self) -> GraphPool:
        """This model's pool of decode steps (runtime/graphs.py: eager and CUDA-graphed, each leased to one
        stream at a time), built on first use."""
        if self._graphs is None:
            self._graphs = GraphPool(self)
        return self._graphs

    def generate(self, input_ids, max_new_tokens: int = 32, attention_mask=None, **kwargs) -> torch.Tensor:
        """prompt + new tokens [B, T + n]: see ``generate`` (this module) for every argument."""
        return generate(self, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask, **kwargs)

    def stream(self, input_ids, max_new_tokens: int = 32, attention_mask=None, **kwargs) -> Iterator[torch.Tensor]:
        """Like generate, but yields each step's new tokens [B] as they are chosen."""
        return stream(self, input_ids, max_new_tokens=max_new_tokens, attention_mask=attention_mask, **kwargs)

"""Decode steps through the preallocated cache, teacher-forced, logits against transformers.

A ragged batch is prefilled right-padded, then fed given tokens for 24+ steps through
``GPT2.decode`` (one token, then S = 3 tokens per step) and through the engine's decode step (the
step generate and stream run: each row a request in its own slot); every step's logits are
compared with transformers' full fp32 forward over the whole sequence at the same position. Cache
lengths 129, 300 and 512 make the Triton decode attention run with 2, 3 and 4 key splits
(``default_num_splits``: one per 128 cache positions here), so the fp32 partials and their reduce
are on the path; each split covers ceil(ceil(L / splits) / BLOCK_N) * BLOCK_N of a row's L cached
keys, so with the rows' 9 .. 94 cached keys some splits are full, one is ragged and the shorter
rows' last splits are empty. A cache of 100 positions runs the single-split kernel that writes its
output directly.

Tolerance (fp32): max |Δlogits| <= 2e-5 * max |reference| + 2e-5, per step.
"""
import os

import pytest
import torch
from hf_reference import hf_model, save_checkpoint

import fastgpt2
from fastgpt2.runtime.engine import Engine

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = {
    "plain": dict(n_layer=1, n_embd=64, n_head=2, vocab_size=1031),  # head_dim 32, an odd vocabulary
    "crfm": dict(n_layer=2, n_embd=64, n_head=2, vocab_size=997, scale_attn_by_inverse_layer_idx=True,
                 reorder_and_upcast_attn=True),
    "head64": dict(n_layer=1, n_embd=128, n_head=2, vocab_size=512),
}
STEPS = 24  # single-token steps; then 3 steps of S = 3 tokens


def _close(got, ref, what):
    err = (got.float() - ref).abs().max().item()
    bound = 2e-5 * ref.abs().max().item() + 2e-5
    assert err <= bound, f"{what}: max |Δlogits| {err:.3e} > {bound:.3e}"


def _case(name, max_len, seed):
    """(transformers fp32 model, prompt lengths [B], tokens [B, Lmax + STEPS + 9]) for a cache of max_len."""
    cfg = CONFIGS[name]
    hf = hf_model(seed, n_positions=512, bos_token_id=cfg["vocab_size"] - 1, eos_token_id=cfg["vocab_size"] - 1,
                  **cfg)
    longest = min(61, max_len - STEPS - 9)  # every row's prompt + 24 + 3*3 fed tokens fit
    lens = [longest, longest - 23, 9]  # ragged: each row's last split ends somewhere else
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, cfg["vocab_size"], (len(lens), longest + STEPS + 9), generator=g)
    return hf, lens, tokens


def _reference(hf, lens, tokens):
    """Per row: transformers' fp32 logits over prompt + every fed token, [T_b, V] (no padding, alone)."""
    with torch.no_grad():
        return [hf(tokens[b : b + 1, : n + STEPS + 9]).logits[0] for b, n in enumerate(lens)]


def _fed(tokens, lens, i, s=1):
    """The s tokens fed to every row at feed offset i (after its own prompt): [B, s]."""
    return torch.stack([tokens[b, n + i : n + i + s] for b, n in enumerate(lens)])


def _prefill(model, tokens, lens, max_len):
    b, t = len(lens), max(lens)
    ids = torch.zeros(b, t, dtype=torch.long)
    for row, n in enumerate(lens):
        ids[row, :n] = tokens[row, :n]  # right padding
    cache = model.new_cache(b, max_len)
    logits = model.prefill(ids.to(model.device), torch.tensor(lens, dtype=torch.int32, device=model.device), cache)
    return cache, logits


def _check_decode(model, hf, lens, tokens, max_len, label):
    ref = _reference(hf, lens, tokens)
    at = lambda i: torch.stack([r[n - 1 + i] for r, n in zip(ref, lens)])  # noqa: E731 - [B, V] after i fed tokens
    cache, logits = _prefill(model, tokens, lens, max_len)
    _close(logits.cpu(), at(0), f"{label} prefill")
    for i in range(STEPS):  # GPT2.decode, one token per step
        logits = model.decode(_fed(tokens, lens, i).to(model.device), cache)
        _close(logits.cpu(), at(i + 1), f"{label} decode step {i} (S=1)")
    for j in range(3):  # S = 3 new tokens per step
        i = STEPS + 3 * j
        logits = model.decode(_fed(tokens, lens, i, 3).to(model.device), cache)
        _close(logits.cpu(), at(i + 3), f"{label} decode step {STEPS + j} (S=3)")
    assert cache.lengths.tolist() == [n + STEPS + 9 for n in lens]


def _check_engine_step(model, hf, lens, tokens, max_len, label):
    """The engine's decode step (eager here; graphed on CUDA in tests/runtime/test_engine_step.py):
    each row a request, admitted into slots 0 .. B-1 by one step (one ragged prefill), then
    teacher-forced by writing each fed token into the engine's token buffer before each step."""
    ref = _reference(hf, lens, tokens)
    engine = Engine(model, max_batch=len(lens), max_len=max_len, use_cuda_graph=False)
    requests = [engine.add(tokens[b, :n], STEPS + 2) for b, n in enumerate(lens)]
    engine.step()  # admits every request: the prefill and each one's first token, no decode
    assert [r.slot for r in requests] == list(range(len(lens))) and engine.logits is None
    for i in range(STEPS):
        engine.tokens[: len(lens)].copy_(_fed(tokens, lens, i)[:, 0].to(model.device))
        out = engine.step()
        assert [r for r, _ in out] == requests  # a decode step, in slot order
        _close(engine.logits.cpu(), torch.stack([r[n + i] for r, n in zip(ref, lens)]), f"{label} engine step {i}")
        assert [t for _, t in out] == engine.logits.argmax(-1).tolist()  # greedy: each slot's own logits
    assert [r.length for r in requests] == [n + STEPS + 1 for n in lens]


def _model(tmp_path, hf, backend):
    return fastgpt2.GPT2.from_pretrained(save_checkpoint(hf, tmp_path), device=DEVICE, dtype=torch.float32,
                                         backend=backend)


@pytest.mark.parametrize("name, max_len", [("plain", 129), ("crfm", 300), ("head64", 512), ("plain", 100)])
def test_decode_logits_torch_backend(tmp_path, name, max_len):
    hf, lens, tokens = _case(name, max_len, seed=30 + max_len)
    model = _model(tmp_path, hf, "torch")
    _check_decode(model, hf, lens, tokens, max_len, f"torch {name} cache {max_len}")
    _check_engine_step(model, hf, lens, tokens, max_len, f"torch {name} cache {max_len}")


@pytest.mark.skipif(not TRITON, reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
@pytest.mark.parametrize("name, max_len, splits", [("plain", 129, 2), ("crfm", 300, 3), ("head64", 512, 4),
                                                   ("plain", 100, 1)])
def test_decode_logits_triton_backend(tmp_path, name, max_len, splits):
    """The kernels in the interpreter (slow: the engine's step, the same device work as GPT2.decode's,
    is run for one cache only)."""
    from fastgpt2.kernels.attention import default_num_splits

    hf, lens, tokens = _case(name, max_len, seed=60 + max_len)
    assert default_num_splits(hf.config.n_head, max_len) == splits
    model = _model(tmp_path, hf, "triton")
    _check_decode(model, hf, lens, tokens, max_len, f"triton {name} cache {max_len}")
    if max_len == 129:
        _check_engine_step(model, hf, lens, tokens, max_len, f"triton {name} cache {max_len}")

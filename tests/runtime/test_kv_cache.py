"""The preallocated cache: allocated once, written in place at each sequence's own length."""
import pytest
import torch

import fastgpt2
from fastgpt2 import CacheError

CFG = fastgpt2.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=24)


@pytest.fixture(scope="module")
def model():
    return fastgpt2.GPT2.from_config(CFG, seed=2)


def test_layout_and_lengths_on_the_device(model):
    cache = model.new_cache(3, 20)
    assert cache.k.shape == cache.v.shape == (2, 3, 2, 20, 16)  # [L, B, H, T_max, D]
    assert cache.k.dtype == model.dtype and cache.lengths.dtype == torch.int32
    assert cache.lengths.device == model.device and cache.lengths.tolist() == [0, 0, 0]


def test_a_new_cache_holds_zeros_not_stale_memory(model):
    # freed NaN blocks of the cache's size: an uninitialised allocation would hand them back, and the
    # torch backend's ragged decode reads unwritten positions under its mask (0 * NaN = NaN)
    shape = (2, 3, 2, 20, 16)
    junk = [torch.full(shape, float("nan"), dtype=model.dtype) for _ in range(4)]
    del junk
    cache = model.new_cache(3, 20)
    assert cache.k.shape == shape
    assert torch.count_nonzero(cache.k) == 0 and torch.count_nonzero(cache.v) == 0


def test_longer_than_n_positions_is_refused(model):
    with pytest.raises(CacheError, match=r"cache length 25 is out of range.*n_positions \(24\)"):
        model.new_cache(1, 25)


def test_decode_writes_in_place_at_each_sequence_length(model):
    cache = model.new_cache(2, 12)
    k_ptr, v_ptr, len_ptr = cache.k.data_ptr(), cache.v.data_ptr(), cache.lengths.data_ptr()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    lens = torch.tensor([6, 2], dtype=torch.int32)
    model.prefill(ids, lens, cache)
    assert cache.lengths.tolist() == [6, 2]
    before = cache.k.clone()
    for step in range(3):
        model.decode(torch.tensor([[1 + step], [2 + step]]), cache)
        # same buffers every step
        assert (cache.k.data_ptr(), cache.v.data_ptr(), cache.lengths.data_ptr()) == (k_ptr, v_ptr, len_ptr)
    assert cache.lengths.tolist() == [9, 5]
    # row 1 wrote positions 2, 3, 4 (its own length), and left row 0's positions < 6 alone
    assert torch.equal(cache.k[:, 0, :, :6], before[:, 0, :, :6])
    assert torch.equal(cache.k[:, 1, :, :2], before[:, 1, :, :2])


def test_decode_logits_equal_a_full_forward(model):
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(1))
    full = model(ids)[0]  # [9, V]
    cache = model.new_cache(1, 9)
    logits = model.prefill(ids[:, :5], torch.tensor([5], dtype=torch.int32), cache)
    assert torch.allclose(logits[0], full[4], atol=1e-5)
    for t in range(5, 9):
        logits = model.decode(ids[:, t : t + 1], cache)
        assert torch.allclose(logits[0], full[t], atol=1e-5)


def test_multi_token_decode_step(model):
    ids = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = model.new_cache(2, 8)
    model.prefill(ids[:, :5], torch.tensor([5, 5], dtype=torch.int32), cache)
    logits = model.decode(ids[:, 5:8], cache)  # S = 3 new tokens per sequence
    assert torch.allclose(logits, full[:, 7], atol=1e-5)
    assert cache.lengths.tolist() == [8, 8]


def test_overflow_is_an_error_before_any_compute(model):
    cache = model.new_cache(1, 6)
    model.prefill(torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([5], dtype=torch.int32), cache)
    model.decode(torch.tensor([[6]]), cache)
    k_before = cache.k.clone()
    with pytest.raises(CacheError, match="holds up to 6 tokens per sequence; 6 are used and 1 more"):
        model.decode(torch.tensor([[7]]), cache)
    assert torch.equal(cache.k, k_before) and cache.lengths.tolist() == [6]
    with pytest.raises(CacheError, match="batch 2 is larger than the cache's batch 1"):
        model.prefill(torch.tensor([[1], [2]]), torch.tensor([1, 1], dtype=torch.int32), cache)

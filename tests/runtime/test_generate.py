"""Generation: sampling reproducibility, top-k/top-p semantics, EOS stopping, streaming, errors."""
import pytest
import torch

import fastgpt2
from fastgpt2 import InputError
from fastgpt2.runtime.sampling import filter_logits

CFG = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=48)


@pytest.fixture(scope="module")
def model():
    return fastgpt2.GPT2.from_config(CFG, seed=1)


def _prompt(b=2, t=5, seed=0):
    return torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    ids = _prompt()
    a = model.generate(ids, 20, do_sample=True, temperature=1.5, seed=123)
    b = model.generate(ids, 20, do_sample=True, temperature=1.5, seed=123)
    c = model.generate(ids, 20, do_sample=True, temperature=1.5, seed=124)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_k_1_equals_greedy(model):
    ids = _prompt(3, 4, seed=2)
    greedy = model.generate(ids, 16)
    assert torch.equal(model.generate(ids, 16, do_sample=True, top_k=1, temperature=2.0, seed=5), greedy)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.40, 0.10, 0.25, 0.20]])  # sorted: 0.40 0.25 0.20 0.10 0.05
    logits = probs.log()
    def kept(p):
        return torch.isfinite(filter_logits(logits, top_p=p))[0].nonzero().flatten().tolist()
    # (boundaries probed just off the exact sums, which fp32 softmax rounds either way)
    assert kept(0.399) == [1]  # 0.40 alone reaches 0.399
    assert kept(0.401) == [1, 3]  # 0.65 >= 0.401, 0.40 is not
    assert kept(0.649) == [1, 3]  # reached by two: no third token
    assert kept(0.66) == [1, 3, 4]  # 0.85
    assert kept(0.95) == [1, 2, 3, 4]
    assert kept(1.0) == [0, 1, 2, 3, 4]
    assert kept(0.01) == [1]  # the most likely token always stays
    kept_probs = filter_logits(logits, top_p=0.66).softmax(-1)[0]
    assert torch.allclose(kept_probs[[1, 3, 4]], torch.tensor([0.40, 0.25, 0.20]) / 0.85)


def test_top_k_then_temperature():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    out = filter_logits(logits, temperature=2.0, top_k=2)
    assert torch.equal(torch.isfinite(out)[0], torch.tensor([False, True, True, False]))
    assert torch.allclose(out[0, 1:3], torch.tensor([2.0, 1.5]))


def test_sampling_follows_the_distribution(model):
    """With top_k=2 only the two most likely tokens of the first step may appear."""
    ids = _prompt(1, 3, seed=9)
    with torch.no_grad():
        first = model(ids)[0, -1]
    allowed = set(torch.topk(first, 2).indices.tolist())
    seen = {int(model.generate(ids, 1, do_sample=True, top_k=2, seed=s)[0, -1]) for s in range(30)}
    assert seen <= allowed and len(seen) == 2


def test_eos_stops_each_row_and_pads(model):
    ids = _prompt(3, 4, seed=3)
    free = model.generate(ids, 12)
    eos = int(free[0, 4 + 2])  # row 0's third new token
    out = model.generate(ids, 12, eos_token_id=eos)
    for row in range(3):
        new = out[row, 4:].tolist()
        if eos in new:
            hit = new.index(eos)
            assert new[: hit + 1] == free[row, 4 : 4 + hit + 1].tolist()
            assert all(tok == eos for tok in new[hit:])  # padded with eos after stopping
        else:
            assert new == free[row, 4 : 4 + len(new)].tolist()
    if all(eos in out[row, 4:].tolist() for row in range(3)):
        assert out.shape[1] < 4 + 12 or eos in free[:, -1].tolist()


def test_generation_stops_early_when_every_row_is_done(model):
    ids = _prompt(1, 4, seed=4)
    free = model.generate(ids, 10)
    eos = int(free[0, 4 + 3])
    first_hit = free[0, 4:].tolist().index(eos)
    out = model.generate(ids, 10, eos_token_id=eos, pad_token_id=0)
    assert out.shape == (1, 4 + first_hit + 1)


def test_streamer_and_stream_see_every_step(model):
    ids = _prompt(2, 6, seed=6)
    seen = []
    out = model.generate(ids, 9, streamer=seen.append)
    assert torch.equal(torch.stack(seen, 1), out[:, 6:])
    assert torch.equal(torch.stack(list(model.stream(ids, 9)), 1), out[:, 6:])


def test_max_new_tokens_zero_returns_the_prompt(model):
    ids = _prompt()
    assert torch.equal(model.generate(ids, 0), ids)


def test_one_dimensional_prompt(model):
    ids = _prompt(1, 5)
    assert torch.equal(model.generate(ids[0], 4), model.generate(ids, 4))


@pytest.mark.parametrize("kwargs, message", [
    (dict(input_ids=torch.tensor([[1, 97]])), r"token id 97, outside the vocabulary \[0, 97\)"),
    (dict(input_ids=torch.tensor([[-1, 3]])), r"token id -1, outside the vocabulary"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "empty prompt"),
    (dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 0]])), "empty prompt: row 0"),
    (dict(input_ids=torch.tensor([[1.0, 2.0]])), "integer token ids"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=44), r"plus max_new_tokens \(44\) is 49, past this model's n_positions \(48\)"),
    (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 0]])), "padded on the right; generation needs left padding"),
    (dict(attention_mask=torch.tensor([[1, 0, 1, 1, 1]])), "one run of 1s per row"),
    (dict(attention_mask=torch.ones(1, 4)), r"attention_mask has shape \(1, 4\), expected \(1, 5\)"),
    (dict(top_k=5), "pass do_sample=True"),
    (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
    (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(do_sample=True, top_k=0), "top_k must be an integer >= 1"),
    (dict(eos_token_id=500), "eos/pad token id 500 is not a token"),
])
def test_bad_inputs_are_named(model, kwargs, message):
    args = dict(input_ids=_prompt(1, 5), max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(InputError, match=message):
        model.generate(args.pop("input_ids"), **args)


def test_forward_rejects_prompts_longer_than_n_positions(model):
    with pytest.raises(InputError, match="49 positions; this model covers at most n_positions=48"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_stream_checks_its_arguments_before_the_first_step(model):
    with pytest.raises(InputError, match="max_new_tokens must be an integer >= 0"):
        model.stream(_prompt(), -3)  # raises at the call, not at the first next()

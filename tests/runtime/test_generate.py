"""Generation: greedy tokens against a loop of full forwards, sampling reproducibility and
distribution, top-k/top-p semantics, exact EOS stopping, streaming, errors."""
import pytest
import torch

import fastgpt2
from fastgpt2 import InputError
from fastgpt2.runtime.loader import expected_shapes
from fastgpt2.runtime.sampling import filter_logits

CFG = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=48)


def _weights(seed=1, std=0.2):
    """Seeded random weights with ten times from_config's spread: from_config's N(0, 0.02) model
    repeats one token under greedy decoding, which hides wrong positions and EOS handling; this one
    changes token from step to step (top-2 logit margins >= 0.01, far above rounding)."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in expected_shapes(CFG).items():
        if key == "lm_head.weight":  # tied to wte
            continue
        value = torch.randn(shape, generator=gen) * std
        if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            value = 1 + value / 10
        elif key.endswith("bias"):
            value /= 10
        weights[key] = value
    return weights


@pytest.fixture(scope="module")
def model():
    return fastgpt2.GPT2(CFG, _weights())


def _prompt(b=2, t=5, seed=0):
    return torch.randint(0, CFG.vocab_size, (b, t), generator=torch.Generator().manual_seed(seed))


def _greedy_loop(model, prompt, n):
    """The reference: n greedy steps, each a full forward over the whole sequence so far (no cache,
    no decode step, no token chooser). prompt [T] -> its n new tokens, a list."""
    seq = prompt[None]  # [1, T]
    for _ in range(n):
        seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq[0, prompt.numel():].tolist()


def _stopped(free, eos, pad):
    """What EOS stopping makes of free-running new tokens free [B, n] (a list of rows): each row up
    to and including its first token in eos, then pad; cut after the step where the last row
    stopped, when every row did. Returns (rows, stop step of each row or None)."""
    rows, stops = [], []
    for row in free:
        hit = next((i for i, tok in enumerate(row) if tok in eos), None)
        stops.append(hit)
        rows.append(row if hit is None else row[: hit + 1] + [pad] * (len(row) - hit - 1))
    if None not in stops:
        rows = [row[: max(stops) + 1] for row in rows]
    return rows, stops


def test_greedy_equals_a_loop_of_full_forwards_for_each_row_alone(model):
    """A left-padded ragged batch (garbage under the padding): each row's new tokens are the greedy
    loop's over that prompt alone; a second call, on the pool's reused step and cache, repeats them."""
    lens, t, n = [7, 3, 5], 7, 14
    ids = _prompt(3, t, seed=11)
    mask = (torch.arange(t)[None, :] >= t - torch.tensor(lens)[:, None]).long()  # [B, T] left padding
    out = model.generate(ids, n, attention_mask=mask)
    assert out.shape == (3, t + n) and torch.equal(out[:, :t], ids)
    for row, length in enumerate(lens):
        want = _greedy_loop(model, ids[row, t - length:], n)
        assert out[row, t:].tolist() == want, f"row {row} (prompt of {length}) differs from the greedy loop"
        assert len(set(want)) > 3  # the reference moves (not one token repeated)
    assert torch.equal(model.generate(ids, n, attention_mask=mask), out)
    assert torch.equal(model.generate(ids[1:2, t - lens[1]:], n)[0, lens[1]:], out[1, t:])  # alone, unpadded


def test_same_seed_same_tokens_other_seed_other_tokens(model):
    ids = _prompt()
    a = model.generate(ids, 20, do_sample=True, temperature=1.5, seed=123)
    c = model.generate(ids, 20, do_sample=True, temperature=1.5, seed=124)
    b = model.generate(ids, 20, do_sample=True, temperature=1.5, seed=123)  # reseeds the reused step
    assert torch.equal(a[:, :5], ids)
    assert torch.equal(a, b)
    assert (a[:, 5:] != c[:, 5:]).double().mean() > 0.5, "another seed should change most tokens"
    assert (a[:, 5:] != model.generate(ids, 20)[:, 5:]).any(), "sampling gave the greedy tokens"


def test_top_k_1_and_a_tiny_top_p_equal_greedy(model):
    ids = _prompt(3, 4, seed=2)
    greedy = model.generate(ids, 16)
    for warp in (dict(top_k=1), dict(top_p=1e-6)):  # one token kept: the most likely
        assert torch.equal(model.generate(ids, 16, do_sample=True, temperature=2.0, seed=5, **warp), greedy), warp


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


@pytest.mark.parametrize("warp", [dict(temperature=2.0, top_k=4), dict(temperature=1.5, top_p=0.5)], ids=str)
def test_sampling_follows_the_distribution(model, warp):
    """N copies of one prompt draw their first token independently: only the tokens the warpers keep
    appear, each as often as softmax(logits / temperature) renormalised over the kept set says
    (within 5 standard deviations), the logits from a full forward."""
    n = 2000
    ids = _prompt(1, 3, seed=9)
    probs = (model(ids)[0, -1].double() / warp["temperature"]).softmax(-1)  # [V]
    order = probs.argsort(descending=True).tolist()
    if "top_k" in warp:
        kept = order[: warp["top_k"]]
    else:  # the smallest most-likely set with mass >= top_p
        kept = [tok for i, tok in enumerate(order) if probs[order[:i]].sum() < warp["top_p"]]
    assert len(kept) >= 3
    want = probs[kept] / probs[kept].sum()  # [K]
    tokens = model.generate(ids.expand(n, -1), 1, do_sample=True, seed=21, **warp)[:, -1]  # [N]
    assert set(tokens.tolist()) <= set(kept)
    freq = torch.stack([(tokens == tok).double().mean() for tok in kept])
    sigma = (want * (1 - want) / n).sqrt()
    assert ((freq - want).abs() <= 5 * sigma).all(), f"frequencies {freq.tolist()} vs probabilities {want.tolist()}"


def test_eos_stops_each_row_and_pads(model):
    """One EOS id, pad defaulting to it: a row stops at its first EOS and is padded with EOS after;
    a row that never meets it runs all max_new_tokens steps, so nothing is cut."""
    ids = _prompt(3, 4, seed=3)
    free = model.generate(ids, 12)[:, 4:].tolist()
    eos = free[0][6]
    rows, stops = _stopped(free, [eos], eos)
    assert None in stops and any(s is not None and 0 < s < 11 for s in stops)  # both cases are tested
    out = model.generate(ids, 12, eos_token_id=eos)
    assert torch.equal(out, torch.cat([ids, torch.tensor(rows)], 1)), f"stops {stops}"


def test_generation_stops_early_when_every_row_is_done(model):
    """Several EOS ids and a pad token of its own: every row stops (at different steps), the
    output ends at the step where the last row stopped, and the stream yields exactly that many
    steps. stop_check_every, deprecated, warns and changes nothing."""
    ids = _prompt(3, 4, seed=3)
    free = model.generate(ids, 12)[:, 4:].tolist()
    eos, pad = [free[0][3], free[1][6], free[2][4]], 0
    assert pad not in eos
    rows, stops = _stopped(free, eos, pad)
    assert len(set(stops)) == 3 and max(stops) < 11  # rows stop at different steps, before the end
    want = torch.cat([ids, torch.tensor(rows)], 1)  # [B, 4 + max(stops) + 1]
    assert torch.equal(model.generate(ids, 12, eos_token_id=eos, pad_token_id=pad), want), f"stops {stops}"
    for every in (1, 4):
        with pytest.warns(DeprecationWarning, match="stop_check_every is deprecated"):
            out = model.generate(ids, 12, eos_token_id=eos, pad_token_id=pad, stop_check_every=every)
        assert torch.equal(out, want), f"stop_check_every={every}, stops {stops}"
    assert len(list(model.stream(ids, 12, eos_token_id=eos, pad_token_id=pad))) == max(stops) + 1


def test_streamer_and_stream_see_every_step(model):
    ids = _prompt(2, 6, seed=6)
    seen = []
    out = model.generate(ids, 9, streamer=seen.append)
    assert len(seen) == 9 and all(tokens.shape == (2,) for tokens in seen)
    assert torch.equal(torch.stack(seen, 1), out[:, 6:])
    assert len({tokens.data_ptr() for tokens in seen}) == 9, "each step must get its own copy, not the step's buffer"
    steps = model.stream(ids, 9)
    first = next(steps)  # step by step
    assert torch.equal(first, out[:, 6])
    assert torch.equal(torch.stack([first, *steps], 1), out[:, 6:])


def test_max_new_tokens_zero_returns_the_prompt(model):
    ids = _prompt()
    out = model.generate(ids, 0)
    assert torch.equal(out, ids) and out is not ids
    assert list(model.stream(ids, 0)) == []


def test_one_dimensional_prompt(model):
    ids = _prompt(1, 5)
    out = model.generate(ids[0], 4)
    assert out.shape == (1, 9) and torch.equal(out, model.generate(ids, 4))


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


# -- one engine per model: streams share its cache ------------------------------------------------
FIVE_SETTINGS = [dict(), dict(do_sample=True, seed=1), dict(do_sample=True, temperature=0.7, top_k=5, seed=2),
                 dict(do_sample=True, top_p=0.8, seed=3), dict(do_sample=True, temperature=1.3, top_k=12, top_p=0.9,
                                                               seed=4)]


def _live_caches(foreign=()):
    """Every KVCache alive now, but those in `foreign` (other tests' models')."""
    import gc

    from fastgpt2.runtime.kv_cache import KVCache

    gc.collect()
    return [o for o in gc.get_objects() if type(o) is KVCache and not any(o is f for f in foreign)]


def test_five_streams_with_five_sampling_settings_hold_one_cache():
    """Five streams, five sampling settings, interleaved step by step: the model holds one cache (its
    engine's, five rows of it in use at once), and each stream's tokens are that prompt's alone."""
    foreign = _live_caches()
    model = fastgpt2.GPT2(CFG, _weights())
    prompts = [_prompt(1, t, seed=t) for t in (3, 5, 1, 8, 2)]
    alone = [model.generate(p, 10, **kw)[0, p.shape[1]:].tolist() for p, kw in zip(prompts, FIVE_SETTINGS)]
    streams = [model.stream(p, 10, **kw) for p, kw in zip(prompts, FIVE_SETTINGS)]
    got = [[] for _ in streams]
    for i, step in enumerate(zip(*streams)):
        for row, tokens in zip(got, step):
            row.append(int(tokens[0]))
        caches = _live_caches(foreign)
        assert caches == [model.engine.cache], caches  # one cache, not one per setting
        if i == 0:  # every stream has started: five requests decode side by side
            assert len(model.engine.running) == 5
    assert got == alone
    assert len({tuple(t) for t in got}) == 5
    assert not model.engine.busy and model.engine.max_batch == 8  # 5 rows at once: the next power of two
    for p, kw in zip(prompts, FIVE_SETTINGS):  # sequential settings: still that one cache
        model.generate(p, 4, **kw)
    assert _live_caches(foreign) == [model.engine.cache]


def test_threads_sharing_the_model_get_each_prompt_alone():
    import threading

    model = fastgpt2.GPT2(CFG, _weights())
    prompts = [_prompt(2, t, seed=t) for t in (4, 6, 9)]
    alone = [model.generate(p, 12, do_sample=True, seed=7) for p in prompts]
    out = [None] * len(prompts)

    def work(i):
        out[i] = model.generate(prompts[i], 12, do_sample=True, seed=7)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(out, alone))
    assert not model.engine.busy

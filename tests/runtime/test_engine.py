"""The engine (runtime/engine.py): continuous batching with per-request sampling over one cache.

Every request's tokens equal that request run alone (greedy: identical; sampled: identical for the same
seed), whatever joins, leaves or is cancelled around it: a random arrival/cancel schedule of mixed
greedy/sampled requests of ragged lengths, on the torch backend and on the Triton kernels (interpreter).
Greedy requests also equal GPT2.generate; the per-row sampler equals filter_logits row by row and
draws with its distribution."""
import os
import random

import pytest
import torch

import fastgpt2
from fastgpt2.runtime.engine import Engine
from fastgpt2.runtime.sampling import RowSampler, Sampling, filter_logits

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
SETTINGS = [Sampling(), Sampling(True), Sampling(True, 0.7, 5), Sampling(True, 1.3, None, 0.8),
            Sampling(True, 0.9, 12, 0.9), Sampling(True, 2.0, 1)]


def model_for(backend):
    # head_dim 32 (the kernels' smallest); a vocabulary wide enough for sampling to spread
    cfg = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=211, n_positions=64)
    return fastgpt2.GPT2.from_config(cfg, device="cpu", dtype=torch.float32, backend=backend, seed=3)


def requests(n, seed):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        prompt = [rng.randrange(211) for _ in range(rng.choice([1, 2, 7, 19, 30]))]
        stop = [rng.randrange(211)] if rng.random() < 0.3 else []
        out.append(dict(prompt_ids=prompt, max_new_tokens=rng.choice([1, 3, 9, 17]),
                        sampling=SETTINGS[i % len(SETTINGS)], seed=1000 + i, stop_token_ids=stop))
    return out


def alone(model, spec, max_batch):
    engine = Engine(model, max_batch=max_batch)
    request = engine.add(**spec)
    while engine.busy:
        engine.step()
    return request


def run_schedule(model, specs, max_batch, seed):
    """Requests arrive at random steps, some are cancelled while running; returns the handles."""
    rng = random.Random(seed)
    engine = Engine(model, max_batch=max_batch)
    pending, handles, cancelled = list(specs), [], set()
    steps = 0
    while pending or engine.busy:
        while pending and rng.random() < 0.5:
            handles.append(engine.add(**pending.pop(0)))
        running = engine.running
        if running and rng.random() < 0.1:
            victim = rng.choice(running)
            engine.cancel(victim)
            cancelled.add(victim.id)
            assert victim.finish_reason == "cancelled" and victim not in engine.running
        for request, token in engine.step():
            assert request.tokens[-1] == token
        assert len(engine.running) <= max_batch
        steps += 1
    assert steps < 500
    return handles, cancelled


def check_schedule(model, n, max_batch, seed):
    specs = requests(n, seed)
    handles, cancelled = run_schedule(model, specs, max_batch, seed)
    assert len(handles) == n and all(h.finished for h in handles)
    for spec, handle in zip(specs, handles):
        expected = alone(model, spec, max_batch)
        if handle.id in cancelled:
            assert handle.tokens == expected.tokens[:len(handle.tokens)]
        else:
            assert handle.tokens == expected.tokens, (spec, handle.tokens, expected.tokens)
            assert handle.finish_reason == expected.finish_reason
            stop = spec["stop_token_ids"]
            assert (handle.finish_reason == "stop") == (bool(stop) and handle.tokens[-1] == stop[0])
            assert len(handle.tokens) == spec["max_new_tokens"] or handle.finish_reason == "stop"
    sampled = [h.tokens for s, h in zip(specs, handles) if s["sampling"].do_sample and h.id not in cancelled]
    assert len({tuple(t) for t in sampled}) > 1
    return specs, handles, cancelled


def test_random_schedule_equals_each_request_alone_torch():
    model = model_for("torch")
    specs, handles, cancelled = check_schedule(model, 24, 3, seed=0)
    # greedy requests also equal the model's own generate (an independent decode path)
    for spec, handle in zip(specs, handles):
        if not spec["sampling"].do_sample and handle.id not in cancelled:
            out = model.generate(torch.tensor([spec["prompt_ids"]]), len(handle.tokens))
            assert out[0, len(spec["prompt_ids"]):].tolist() == handle.tokens


@pytest.mark.skipif(not TRITON, reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
def test_random_schedule_equals_each_request_alone_triton():
    check_schedule(model_for("triton"), 8, 3, seed=1)


def test_a_freed_slot_is_taken_by_the_next_request_in_the_same_step():
    engine = Engine(model_for("torch"), max_batch=1)
    a = engine.add([1, 2, 3], 2)
    b = engine.add([4, 5], 3)
    assert [r.id for r, _ in engine.step()] == [a.id]  # a admitted; b waits for the only slot
    assert b.slot is None and engine.queue[0] is b
    assert [r.id for r, _ in engine.step()] == [a.id, b.id]  # a's last token frees the slot, b is prefilled
    assert a.finish_reason == "length" and b.slot == 0
    engine.cancel(b)
    assert b.finish_reason == "cancelled" and not engine.busy and engine.step() == []
    c = engine.add([6], 1)
    engine.cancel(c)  # cancelled while waiting
    assert c.finish_reason == "cancelled" and not engine.busy


def test_one_cache_whatever_the_sampling_mix():
    model = model_for("torch")
    engine = Engine(model, max_batch=5)
    cache_ids = {id(engine.cache.k), id(engine.cache.v)}
    handles = [engine.add([7, 8, 9], 6, sampling=s, seed=i) for i, s in enumerate(SETTINGS[:5])]
    while engine.busy:
        engine.step()
        assert {id(engine.cache.k), id(engine.cache.v)} == cache_ids
    assert all(len(h.tokens) == 6 for h in handles)
    assert engine.cache.k.shape[1] == 5  # one cache of five slots


def test_bad_requests_are_clear_errors():
    engine = Engine(model_for("torch"), max_batch=2, max_len=16)
    with pytest.raises(fastgpt2.CacheError, match=r"plus max_new_tokens \(8\) is 18, past the engine's 16 positions"):
        engine.add(list(range(10)), 8)
    with pytest.raises(fastgpt2.InputError, match="at least one prompt token"):
        engine.add([], 4)
    with pytest.raises(fastgpt2.InputError, match=r"vocabulary \[0, 211\)"):
        engine.add([211], 4)
    with pytest.raises(fastgpt2.InputError, match="max_new_tokens must be an integer >= 1"):
        engine.add([1], 0)
    with pytest.raises(fastgpt2.InputError, match="temperature must be > 0"):
        engine.add([1], 2, Sampling(True, 0.0))
    with pytest.raises(fastgpt2.InputError, match="top_p must be in"):
        engine.add([1], 2, Sampling(True, 1.0, None, 1.5))
    with pytest.raises(fastgpt2.InputError, match="max_batch must be an integer >= 1"):
        Engine(engine.model, max_batch=0)
    assert not engine.busy


def test_the_row_sampler_filters_each_row_as_filter_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(SETTINGS), 211, generator=g) * 3
    sampler = RowSampler(len(SETTINGS), 211, torch.device("cpu"))
    for row, s in enumerate(SETTINGS):
        sampler.set_row(row, s, seed=row)
    filtered = RowSampler._filter(logits / sampler.temperature[:, None], sampler.top_k, sampler.top_p)
    for row, s in enumerate(SETTINGS):
        expected = filter_logits(logits[row:row + 1], s.temperature, s.top_k, s.top_p)
        assert torch.equal(torch.isinf(filtered[row]), torch.isinf(expected[0])), s
        kept = ~torch.isinf(expected[0])
        assert torch.allclose(filtered[row][kept], expected[0][kept])


def test_the_row_sampler_draws_from_the_filtered_distribution():
    rows, vocab = 6000, 6
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).expand(rows, vocab)
    sampler = RowSampler(rows, vocab, torch.device("cpu"))
    setting = Sampling(True, 0.8, 4, 0.95)
    for row in range(rows):
        sampler.host[row] = setting
    sampler.sample.fill_(True)
    sampler.temperature.fill_(0.8)
    sampler.top_k.fill_(4)
    sampler.top_p.fill_(0.95)
    sampler.seed.copy_(torch.arange(rows))  # every row its own seed: independent draws
    tokens = torch.empty(rows, dtype=torch.long)
    sampler(logits, tokens)
    expected = filter_logits(logits[:1], 0.8, 4, 0.95).softmax(-1)[0]
    freq = torch.bincount(tokens, minlength=vocab).double() / rows
    assert (freq - expected).abs().max() < 0.025, (freq, expected)
    assert freq[expected == 0].sum() == 0  # filtered tokens are never drawn
    assert torch.equal(sampler.draws, torch.ones(rows, dtype=torch.long))
    again = torch.empty_like(tokens)
    sampler.draws.zero_()
    sampler(logits, again)
    assert torch.equal(again, tokens)  # the same seeds and draw counts: the same tokens


def test_cuda_graphs_need_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the graphed engine is tested by the GPU test below")
    with pytest.raises(fastgpt2.FastGPT2Error, match="use_cuda_graph=True needs a CUDA device"):
        Engine(model_for("torch"), max_batch=2, use_cuda_graph=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the engine's CUDA-graph replay")
def test_graphed_engine_equals_the_eager_one_on_a_random_schedule():
    cfg = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=211, n_positions=64)
    model = fastgpt2.GPT2.from_config(cfg, device="cuda", dtype=torch.float16, backend="triton", seed=3)
    specs = requests(16, seed=5)
    runs = []
    for graphed in (False, True):
        engine = Engine(model, max_batch=4, use_cuda_graph=graphed)
        handles = [engine.add(**spec) for spec in specs]
        while engine.busy:
            engine.step()
        runs.append([h.tokens for h in handles])
        assert (len(engine.graphs) > 0) == graphed  # one graph per sampling variant met
    assert runs[0] == runs[1]


def test_settings_without_sampling_are_refused_as_generate_refuses_them():
    engine = Engine(model_for("torch"), max_batch=1)
    with pytest.raises(fastgpt2.InputError, match="pass do_sample=True to use them"):
        engine.add([1], 2, Sampling(False, 0.7))
    with pytest.raises(fastgpt2.InputError, match="top_k must be an integer >= 1"):
        engine.add([1], 2, Sampling(True, 1.0, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_logits_are_bit_identical_alone_and_beside_others(dtype):
    """The engine steps over its occupied slots only, so a request alone runs a 1-row step and beside
    others an n-row one (n up to 8 here): its logits must not change by a bit. Widths large enough
    for the CPU's real GEMM kernels (K = 256, 1024; a 1000-token head)."""
    cfg = fastgpt2.GPT2Config(n_layer=1, n_embd=256, n_head=4, vocab_size=1000, n_positions=64)
    model = fastgpt2.GPT2.from_config(cfg, device="cpu", dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 1000, (9,), generator=g).tolist()
    others = [torch.randint(0, 1000, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (7,), generator=g)]

    def run(neighbours):
        engine = Engine(model, max_batch=8)
        for ids in neighbours[:3]:
            engine.add(ids, 12)
        request = engine.add(prompt, 12)
        for ids in neighbours[3:]:
            engine.add(ids, 12)
        engine.step()  # admits every request
        rows = []
        while not request.finished:
            engine.step()
            rows.append(engine.logits[request.slot].clone() if not request.finished else None)
        return request.tokens, rows[:-1]

    tokens_alone, alone = run([])
    tokens_beside, beside = run(others)
    assert tokens_alone == tokens_beside
    assert len(alone) == len(beside) == 10
    for i, (a, b) in enumerate(zip(alone, beside)):
        assert torch.equal(a, b), (i, (a.float() - b.float()).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_prefilled_beside_others_gets_the_bits_it_gets_alone(dtype):
    """The engine prefills the requests it admits into neighbouring slots as one right-padded batch:
    each row's last-token logits (and so its cache) must equal that prompt prefilled alone, for long
    ragged prompts too (where torch's fused attention over a padded batch rounds otherwise)."""
    cfg = fastgpt2.GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=1000, n_positions=512)
    model = fastgpt2.GPT2.from_config(cfg, device="cpu", dtype=dtype, seed=4)
    g = torch.Generator().manual_seed(1)
    lens = [150, 230, 40, 199, 1]
    ids = torch.zeros(len(lens), max(lens), dtype=torch.long)
    for i, n in enumerate(lens):
        ids[i, :n] = torch.randint(0, 1000, (n,), generator=g)
    batched = model.prefill(ids, torch.tensor(lens, dtype=torch.int32), model.new_cache(len(lens), 512))
    for i, n in enumerate(lens):
        alone = model.prefill(ids[i:i + 1, :n], torch.tensor([n], dtype=torch.int32), model.new_cache(1, 512))
        assert torch.equal(alone[0], batched[i]), (i, n)

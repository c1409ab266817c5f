"""fastgpt2.patch_hf: a live transformers GPT-2 running on fastgpt2's ops gives the same results as
transformers (forward, pipeline sampling, greedy plain and left-padded, DynamicCache and StaticCache,
beam search, the cache argument, hidden states, scores), shares its weights, falls back visibly where
it cannot serve, refuses a release that changed what it relies on, and unpatches exactly. Also model_from_hf (a fastgpt2
GPT2 on the same tensors) and the error for non-GPT-2 models.

Run on both ends of the tested range (TESTED_TRANSFORMERS): .ci/run runs this directory with the
newest and the oldest release. transformers' deprecation warnings are errors here: a test that
passes an argument by a name the installed release deprecated fails."""
import inspect
import os
import warnings

import pytest
import torch
from hf_reference import VOCAB, hf_greedy, hf_model

import fastgpt2
from fastgpt2 import hf as hf_mod
from fastgpt2.hf import (FallbackWarning, HFModelError, UntestedTransformersWarning, is_patched, model_from_hf,
                                 patch_hf, patch_stats, unpatch_hf)

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"), pytest.mark.filterwarnings("error::DeprecationWarning")]


def _cache_name():
    """The cache argument and output field of this transformers release: "cache" from 5.24,
    "past_key_values" before."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Model

    return "cache" if "cache" in inspect.signature(GPT2Model.forward).parameters else "past_key_values"


CACHE = _cache_name()

SMALL = dict(n_layer=2, n_embd=64, n_head=4)
CRFM = dict(n_layer=3, n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True)
TEXT = [
    "Hello, I'm a language model, and I like to write about the weather and the sea.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "A language model predicts the next word from the words that came before it.",
    "Paris is the capital of France; Berlin is the capital of Germany.",
] * 10


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(TEXT, vocab_size=500, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert len(tok) <= 500
    return tok


def lm_for(tok, seed, **cfg):
    """A random GPT-2 whose vocabulary is the tokenizer's; sampling by default, as gpt2's card."""
    eos = tok.eos_token_id
    model = hf_model(seed, vocab_size=len(tok), bos_token_id=eos, eos_token_id=eos, **cfg)
    model.generation_config.pad_token_id = eos
    model.generation_config.do_sample = True
    model.generation_config.top_k = 50
    return model


def rand_ids(seed, shape, high=VOCAB):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def served(model):
    stats = patch_stats(model)
    assert not any(k.startswith("fallback") for k in stats), stats
    return stats


def cached_logits(model, ids, steps):
    """Logits of a prefill over ids, then of each step's tokens appended through past_key_values."""
    outs = []
    with torch.no_grad():
        out = model(ids, use_cache=True)
        outs.append(out.logits)
        for step in steps:
            out = model(step, use_cache=True, **{CACHE: out[CACHE]})
            outs.append(out.logits)
    return outs


# -- the model card, generation ---------------------------------------------------------------
def test_model_card_pipeline_sampling_gives_the_same_texts(tokenizer):
    from transformers import pipeline, set_seed

    model = lm_for(tokenizer, seed=11, **SMALL)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    set_seed(42)
    expected = generator("Hello, I'm a language model,", max_new_tokens=20, num_return_sequences=5)

    assert patch_hf(model) is model and is_patched(model)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    set_seed(42)
    got = generator("Hello, I'm a language model,", max_new_tokens=20, num_return_sequences=5)
    texts = [r["generated_text"] for r in got]
    assert texts == [r["generated_text"] for r in expected]
    assert len(texts) == 5 and len(set(texts)) > 1  # really sampled, five different continuations
    stats = served(model)
    assert stats["prefill"] == SMALL["n_layer"] and stats["decode"] > 0 and stats["mlp"] > 0


def test_greedy_left_padded_batch_of_three(tokenizer):
    model = lm_for(tokenizer, seed=12, **SMALL)
    tokenizer.padding_side = "left"
    prompts = ["Hello", "The quick brown zebra plays a xylophone", "Paris is the capital"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    assert (enc["attention_mask"] == 0).any(dim=1).sum() == 2  # two rows really padded
    with torch.no_grad():
        expected = model.generate(**enc, max_new_tokens=16, do_sample=False)
        patch_hf(model)
        got = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, expected)
    assert tokenizer.batch_decode(got) == tokenizer.batch_decode(expected)
    stats = served(model)
    # the padded prompt runs torch SDPA with transformers' mask; every decode step runs the kernel, the
    # mask's per-row first key as its kv_start (the padding is not read)
    assert stats["sdpa"] == SMALL["n_layer"] and stats["decode"] == 15 * SMALL["n_layer"]
    assert "prefill" not in stats and not any(key.startswith("fallback") for key in stats)


def test_beam_search_four_beams(tokenizer):
    model = lm_for(tokenizer, seed=13, **SMALL)
    tokenizer.padding_side = "left"
    enc = tokenizer(["The quick brown fox jumps", "A language model"], return_tensors="pt", padding=True)
    single = tokenizer(["Hello, I'm a language model,"], return_tensors="pt")
    kw = dict(max_new_tokens=12, do_sample=False, num_beams=4, num_return_sequences=2)
    with torch.no_grad():
        expected = model.generate(**enc, **kw)
        expected_single = model.generate(**single, **kw)
        patch_hf(model)
        got = model.generate(**enc, **kw)
        got_single = model.generate(**single, **kw)
    assert got.shape == expected.shape == (4, enc["input_ids"].shape[1] + 12)
    assert torch.equal(got, expected) and torch.equal(got_single, expected_single)
    stats = served(model)
    # the padded prompt on SDPA, its 11 beam steps on the decode kernel (kv_start), then the unpadded prompt
    assert stats["sdpa"] == SMALL["n_layer"] and stats["prefill"] == SMALL["n_layer"]
    assert stats["decode"] == 2 * 11 * SMALL["n_layer"]


@pytest.mark.parametrize("cache_implementation", [None, "static"], ids=["dynamic", "static"])
def test_greedy_on_transformers_caches(cache_implementation):
    """DynamicCache (the default) and StaticCache (upper-left causal prefill over an empty buffer,
    then decode steps with a materialised mask): transformers' cache, fastgpt2's kernels."""
    model = hf_model(seed=23, **SMALL)
    ids = rand_ids(15, (2, 9))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
              cache_implementation=cache_implementation)
    with torch.no_grad():
        expected = model.generate(ids, **kw)
        patch_hf(model)
        got = model.generate(ids, **kw)
    assert torch.equal(got, expected)
    stats = served(model)
    assert stats["prefill"] == SMALL["n_layer"] and stats["decode"] == 11 * SMALL["n_layer"] and "sdpa" not in stats


def test_generate_without_cache_and_with_scores():
    """use_cache=False: every step a full causal prefill; return_dict_in_generate with scores and
    hidden states: the same scores (fp32 tolerance) and tokens."""
    model = hf_model(seed=24, **SMALL)
    ids = rand_ids(16, (1, 7))
    kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    rich = dict(kw, return_dict_in_generate=True, output_scores=True, output_hidden_states=True)
    with torch.no_grad():
        expected_plain = model.generate(ids, use_cache=False, **kw)
        expected = model.generate(ids, **rich)
        patch_hf(model)
        got_plain = model.generate(ids, use_cache=False, **kw)
        assert torch.equal(got_plain, expected_plain)
        assert served(model) == {"prefill": 6 * SMALL["n_layer"], "layer_norm": 6 * (2 * SMALL["n_layer"] + 1),
                                 "mlp": 6 * SMALL["n_layer"]}
        got = model.generate(ids, **rich)
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.scores) == len(expected.scores) == 6
    for g, e in zip(got.scores, expected.scores):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert len(got.hidden_states) == 6 and len(got.hidden_states[0]) == SMALL["n_layer"] + 1
    for g, e in zip(got.hidden_states[-1], expected.hidden_states[-1]):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert served(model)["decode"] == 5 * SMALL["n_layer"]


# -- forward, cache, hidden states ----------------------------------------------------------------
def test_forward_past_key_values_and_hidden_states():
    model = hf_model(seed=14, **SMALL)
    ids = rand_ids(1, (2, 13))
    more = [rand_ids(2, (2, 1)), rand_ids(3, (2, 3)), rand_ids(4, (2, 10))]  # decode kernel x2, then S > 8

    def run():
        outs = []
        with torch.no_grad():
            out = model(ids, use_cache=True, output_hidden_states=True)
            outs.append(out.logits)
            hidden = out.hidden_states
            past = out[CACHE]
            for step in more:
                out = model(step, use_cache=True, **{CACHE: past})  # the release's own argument name
                past = out[CACHE]
                outs.append(out.logits)
        return outs, hidden, past.get_seq_length()

    expected, expected_hidden, expected_len = run()
    patch_hf(model)
    got, hidden, length = run()
    assert length == expected_len == 13 + 1 + 3 + 10
    for g, e in zip(got, expected):
        assert g.shape == e.shape and (g - e).abs().max().item() <= 1e-5
    assert len(hidden) == len(expected_hidden) == SMALL["n_layer"] + 1
    for h, e in zip(hidden, expected_hidden):
        assert (h - e).abs().max().item() <= 1e-5
    stats = served(model)
    assert stats["prefill"] == 2 and stats["decode"] == 4 and stats["sdpa"] == 2


def test_no_parameter_is_copied_and_unpatch_restores_bit_for_bit():
    model = hf_model(seed=15, **SMALL)
    ids = rand_ids(5, (2, 11))
    with torch.no_grad():
        before = model(ids).logits
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    patch_hf(model)
    assert model.config._attn_implementation == hf_mod.ATTN_IMPLEMENTATION
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    with torch.no_grad():
        patched = model(ids).logits
        assert (patched - before).abs().max().item() <= 1e-5
        # the patch reads the live parameters: an in-place edit shows in the output
        w = model.transformer.h[1].mlp.c_fc.weight
        w[3, 5] += 1.0
        edited = model(ids).logits
        assert (edited - patched).abs().max().item() > 1e-3
        unpatch_hf(model)
        edited_ref = model(ids).logits
        assert (edited - edited_ref).abs().max().item() <= 1e-5
        w[3, 5] -= 1.0
        after = model(ids).logits
    assert not is_patched(model) and patch_stats(model) == {}
    assert all("forward" not in mod.__dict__ for mod in model.modules())
    assert all(not any(k.startswith("_fastgpt2") for k in mod.__dict__) for mod in model.modules())
    assert not model.transformer._forward_pre_hooks and not model.transformer._forward_hooks
    assert model.config._attn_implementation == "sdpa"  # the original implementation is back
    assert torch.equal(after, before)


def test_deepcopy_of_a_patched_model_runs_on_its_own_weights_and_instance_forwards_are_kept():
    import copy

    model = hf_model(seed=22, **SMALL)
    mlp = model.transformer.h[0].mlp
    calls = []

    def hooked(x, _orig=mlp.forward):  # an instance forward set before patching (as accelerate's hooks do)
        calls.append(1)
        return _orig(x)

    mlp.forward = hooked
    ids = rand_ids(14, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
        patch_hf(model)
        twin = copy.deepcopy(model)
        assert is_patched(twin) and twin.transformer.h[1].attn.c_attn.weight.data_ptr() != \
            model.transformer.h[1].attn.c_attn.weight.data_ptr()
        assert (twin(ids).logits - expected).abs().max().item() <= 1e-5
        twin.transformer.h[1].attn.c_attn.weight.mul_(1.5)  # the copy's own parameter
        changed = twin(ids).logits
        assert (changed - expected).abs().max().item() > 1e-3
        assert (model(ids).logits - expected).abs().max().item() <= 1e-5  # the original is untouched
        assert patch_stats(twin)["prefill"] == 2 * SMALL["n_layer"] and patch_stats(model)["prefill"] == SMALL["n_layer"]
        unpatch_hf(twin)
        assert (twin(ids).logits - changed).abs().max().item() <= 1e-5 and is_patched(model)
        unpatch_hf(model)
        n = len(calls)
        assert torch.equal(model(ids).logits, expected) and len(calls) == n + 1  # the earlier forward is back
    assert mlp.__dict__["forward"] is hooked


def test_output_attentions_falls_back_once_with_transformers_result():
    model = hf_model(seed=16, **SMALL)
    model.config._attn_implementation = "eager"  # so that transformers returns real attention weights
    ids = rand_ids(6, (2, 9))
    with torch.no_grad():
        expected = model(ids, output_attentions=True)
        patch_hf(model)
        with pytest.warns(FallbackWarning, match="output_attentions=True is not served") as record:
            got = model(ids, output_attentions=True)
        assert len([w for w in record if issubclass(w.category, FallbackWarning)]) == 1
        with warnings.catch_warnings(record=True) as again:
            warnings.simplefilter("always")
            got2 = model(ids, output_attentions=True)
        plain = model(ids)
    assert not [w for w in again if issubclass(w.category, FallbackWarning)]  # once per model per reason
    assert len(got.attentions) == SMALL["n_layer"] and got.attentions[0].shape == (2, 4, 9, 9)
    for a, e in zip(got.attentions + got2.attentions, expected.attentions * 2):
        assert torch.equal(a, e)
    assert torch.equal(got.logits, expected.logits)  # transformers' own code: bit for bit
    stats = patch_stats(model)
    assert stats["fallback:output_attentions"] == 2 and stats["prefill"] == SMALL["n_layer"]
    assert (plain.logits - expected.logits).abs().max().item() <= 1e-5


def test_gradients_fall_back_and_match_transformers():
    model = hf_model(seed=17, **SMALL)
    ids = rand_ids(7, (1, 8))
    loss = model(ids, labels=ids).loss
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    patch_hf(model)
    with pytest.warns(FallbackWarning, match="gradients were asked for"):
        loss2 = model(ids, labels=ids).loss
    loss2.backward()
    assert torch.equal(loss2, loss)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, expected[n]), n
    assert patch_stats(model).get("prefill", 0) == 0


# -- configs and backends ------------------------------------------------------------------------
def _patched_equals_unpatched(model, ids, steps, prompt, new_tokens, **patch_kwargs):
    """Logits over a prefill and cached steps (1e-4) and a greedy continuation (exactly) equal
    before and after patch_hf; returns which attention paths served the patched run."""
    expected = cached_logits(model, ids, steps)
    expected_greedy = hf_greedy(model, prompt, new_tokens)
    patch_hf(model, **patch_kwargs)
    got = cached_logits(model, ids, steps)
    got_greedy = hf_greedy(model, prompt, new_tokens)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and (g - e).abs().max().item() <= 1e-4
    assert torch.equal(got_greedy, expected_greedy)
    return served(model)


def test_crfm_config_matches_transformers_eager():
    model = hf_model(seed=18, **CRFM)
    assert model.config._attn_implementation == "eager"
    ids = rand_ids(8, (2, 21))
    steps = [rand_ids(20, (2, 1)), rand_ids(21, (2, 4))]
    stats = _patched_equals_unpatched(model, ids, steps, rand_ids(9, (1, 7)), 24)
    # eager hands over a float mask; without padding it is recognised as causal: the kernels serve it
    assert stats["prefill"] == 2 * CRFM["n_layer"] and stats["decode"] == 25 * CRFM["n_layer"] and "sdpa" not in stats


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
def test_triton_backend_under_the_interpreter():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(seed=19, n_layer=1, n_embd=64, n_head=1, vocab_size=128,
                     bos_token_id=127, eos_token_id=127).to(device)  # head_dim 64
    model.generation_config.pad_token_id = 127
    ids = rand_ids(10, (2, 6), high=128).to(device)
    steps = [rand_ids(22, (2, 2), high=128).to(device)]
    prompt = rand_ids(11, (1, 5), high=128).to(device)
    stats = _patched_equals_unpatched(model, ids, steps, prompt, 3, backend="triton")
    assert stats["prefill"] == 2 and stats["decode"] == 3


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
def test_triton_backend_left_padded_greedy_decodes_on_the_kernel():
    """A left-padded batch (rows padded by 0, 3 and 6) on the Triton kernels: the decode kernel takes
    each row's first real key from transformers' mask (kv_start) and gives transformers' tokens."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = hf_model(seed=26, n_layer=2, n_embd=64, n_head=2, vocab_size=128,
                     bos_token_id=127, eos_token_id=127).to(device)  # head_dim 32
    model.generation_config.pad_token_id = 127
    ids = rand_ids(27, (3, 9), high=127).to(device)
    mask = torch.ones_like(ids)
    for row, pad in enumerate((0, 3, 6)):
        ids[row, :pad], mask[row, :pad] = 127, 0
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False)
    with torch.no_grad():
        expected = model.generate(ids, **kw)
        patch_hf(model, backend="triton")
        got = model.generate(ids, **kw)
    assert torch.equal(got, expected)
    stats = served(model)
    assert stats["sdpa"] == 2 and stats["decode"] == 4 * 2 and "prefill" not in stats


def test_triton_backend_needs_a_kernel_head_dim():
    model = hf_model(seed=20, n_layer=1, n_embd=32, n_head=4)  # head_dim 8
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        with pytest.raises(HFModelError, match="head_dim in"):
            patch_hf(model, backend="triton")
    else:
        with pytest.raises(fastgpt2.BackendError):
            patch_hf(model, backend="triton")
    assert not is_patched(model)


# -- model_from_hf and errors ---------------------------------------------------------------------
def test_model_from_hf_shares_the_weight_tensors():
    hf = hf_model(seed=21, n_layer=2, n_embd=64, n_head=4, n_inner=100, activation_function="gelu")
    ours = fastgpt2.GPT2.from_hf(hf, backend="torch")
    hf_ptrs = {k.removeprefix("transformer."): v.data_ptr() for k, v in hf.state_dict().items()}
    assert set(ours.weights) == set(hf_ptrs) - {"lm_head.weight"}
    for key, w in ours.weights.items():
        assert w.data_ptr() == hf_ptrs[key], key
    assert ours.lm_head.data_ptr() == hf.lm_head.weight.data_ptr()
    ids = rand_ids(12, (2, 15))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4
    prompt = rand_ids(13, (1, 6))
    assert torch.equal(ours.generate(prompt, max_new_tokens=16), hf_greedy(hf, prompt, 16))
    bare = model_from_hf(hf.transformer, backend="torch")  # a GPT2Model: the head is wte
    assert bare.wte.data_ptr() == hf.transformer.wte.weight.data_ptr()
    # in-place updates of the transformers weights are seen, on every GEMM path (30 rows here)
    with torch.no_grad():
        hf.transformer.h[0].mlp.c_fc.weight.mul_(1.5)
        expected = hf(ids).logits
    assert (ours(ids) - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_model_other_than_gpt2_is_a_clear_error(kind):
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
        name = "LlamaForCausalLM"
    else:
        from transformers import BertConfig, BertModel

        model = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2))
        name = "BertModel"
    for call in (patch_hf, model_from_hf, fastgpt2.GPT2.from_hf):
        with pytest.raises(HFModelError, match=f"GPT-2 .*got {name}") as info:
            call(model)
        assert isinstance(info.value, fastgpt2.FastGPT2Error)
    with pytest.raises(HFModelError, match=name):
        unpatch_hf(model)


# -- nothing swallowed, the tested range ---------------------------------------------------------
@pytest.mark.parametrize("change", ["mlp", "conv1d", "model"])
def test_a_release_that_renamed_an_argument_is_refused(monkeypatch, change):
    """A fake release whose signatures differ from the tested ones: patch_hf refuses, naming the
    release and the tested range, and leaves the model as it was."""
    from transformers.models.gpt2 import modeling_gpt2 as m

    if change == "mlp":
        monkeypatch.setattr(m.GPT2MLP, "forward", lambda self, hidden: hidden)  # hidden_states -> hidden
        what = r"GPT2MLP.forward\('self', 'hidden'\)"
    elif change == "conv1d":
        monkeypatch.setattr(m.Conv1D, "forward", lambda self, x, bias_scale=1.0: x)
        what = r"Conv1D.forward"
    else:
        def forward(self, input_ids=None, cache=None, attn_mask=None, encoder_hidden_states=None, use_cache=None):
            raise AssertionError("never called")

        monkeypatch.setattr(m.GPT2Model, "forward", forward)  # attention_mask -> attn_mask
        what = r"GPT2Model.forward\(attention_mask=...\)"
    model = hf_model(seed=26, **SMALL)
    with pytest.raises(HFModelError, match=rf"transformers .* changed what fastgpt2.patch_hf relies on: .*{what}.*"
                                           rf"tested with transformers 5.17.0 to 5.25.0"):
        patch_hf(model)
    assert not is_patched(model) and model.config._attn_implementation == "sdpa"


def test_transformers_that_bypasses_the_attention_interface_is_an_error(monkeypatch):
    """A release whose GPT-2 no longer calls the registered attention although fastgpt2's is selected."""
    from transformers.models.gpt2 import modeling_gpt2 as m

    sdpa = m.ALL_ATTENTION_FUNCTIONS["sdpa"]

    class Bypass:
        def get_interface(self, name, default):
            return sdpa

    model = patch_hf(hf_model(seed=27, **SMALL))
    monkeypatch.setattr(m, "ALL_ATTENTION_FUNCTIONS", Bypass())
    assert model.config._attn_implementation == hf_mod.ATTN_IMPLEMENTATION
    with torch.no_grad(), pytest.raises(HFModelError, match=r"without calling fastgpt2's attention \(0 of 2 layers\)"):
        model(rand_ids(18, (1, 4)))


@pytest.mark.parametrize("how", ["set_attn_implementation", "config"])
def test_another_attention_selected_after_patching_runs_transformers_code(how):
    """set_attn_implementation("eager") on a patched model (as transformers' own tests and assisted
    decoding do): transformers' own code serves those calls, bit for bit, until patch_hf again."""
    ref = hf_model(seed=29, **SMALL)
    model = patch_hf(hf_model(seed=29, **SMALL))
    ids = rand_ids(20, (2, 6))
    for m in (ref, model):
        if how == "config":
            m.config._attn_implementation = "eager"
        else:
            m.set_attn_implementation("eager")
    with torch.no_grad():
        expected = ref(ids).logits
        with pytest.warns(FallbackWarning, match=r"attn_implementation is 'eager', set after patch_hf"):
            got = model(ids).logits
        assert torch.equal(got, expected)
        assert patch_stats(model) == {"fallback:attn_implementation": 1} and is_patched(model)
        patch_hf(model)  # selects fastgpt2's attention again
        assert (model(ids).logits - expected).abs().max().item() <= 1e-4
    assert patch_stats(model)["prefill"] == SMALL["n_layer"]


def test_the_tested_range_is_enforced(monkeypatch):
    assert hf_mod.TESTED_TRANSFORMERS == ("5.17.0", "5.25.0")
    with pytest.raises(HFModelError, match=r"needs transformers >= 5.17.0; this is transformers 5.16.2"):
        hf_mod._check_transformers_version("5.16.2")
    with pytest.raises(HFModelError, match=r"this is transformers 4.57.1"):
        hf_mod._check_transformers_version("4.57.1")
    for v in ("5.17.0", "5.20.1", "5.25.0"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert hf_mod._check_transformers_version(v) == v
    monkeypatch.setattr(hf_mod, "_warned_untested", set())
    with pytest.warns(UntestedTransformersWarning, match=r"tested with transformers 5.17.0 to 5.25.0; this is 5.31.0"):
        hf_mod._check_transformers_version("5.31.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hf_mod._check_transformers_version("5.31.0")  # once per process


def test_a_model_built_on_a_patched_models_config_runs_sdpa_with_a_warning(monkeypatch):
    """Its config names fastgpt2's attention, but patch_hf never saw the model: transformers' SDPA
    serves it, as it would have without fastgpt2, with one warning saying how to patch it."""
    from transformers import GPT2LMHeadModel

    patched = patch_hf(hf_model(seed=28, **SMALL))
    twin = GPT2LMHeadModel(patched.config).eval()
    twin.load_state_dict(patched.state_dict())
    ref = hf_model(seed=28, **SMALL)
    assert twin.config._attn_implementation == hf_mod.ATTN_IMPLEMENTATION and not is_patched(twin)
    ids = rand_ids(19, (2, 4))
    monkeypatch.setattr(hf_mod, "_warned_unpatched", set())
    with torch.no_grad(), pytest.warns(FallbackWarning, match=r"did not patch .* transformers' sdpa attention serves"):
        got = twin(ids).logits
    with torch.no_grad():
        assert torch.equal(got, ref(ids).logits)
        patch_hf(twin)  # the patch of such a model falls back to SDPA, never to itself
        with pytest.warns(FallbackWarning, match="a head mask"):
            assert torch.equal(twin(ids, head_mask=torch.ones(2, 4)).logits, ref(ids).logits)
    unpatch_hf(twin)
    assert twin.config._attn_implementation == "sdpa"


def test_torch_compile_traces_transformers_code_without_a_graph_break():
    """Dynamo cannot trace fastgpt2's routing (a context variable, the mask read on the host): under
    torch.compile (fullgraph) a patched model traces transformers' own code, as unpatched."""
    ref = hf_model(seed=30, **SMALL)
    model = patch_hf(hf_model(seed=30, **SMALL))
    ids = rand_ids(21, (2, 7))
    torch._dynamo.reset()
    with torch.no_grad():
        expected = ref(ids).logits
        got = torch.compile(model, backend="eager", fullgraph=True)(ids).logits
    torch._dynamo.reset()
    assert torch.equal(got, expected) and patch_stats(model) == {}
    with torch.no_grad():
        assert (model(ids).logits - expected).abs().max().item() <= 1e-4  # eagerly: the kernels again
    assert patch_stats(model)["prefill"] == SMALL["n_layer"]


def test_the_cache_argument_under_both_names_the_release_accepts():
    """transformers 5.24 renamed GPT-2's past_key_values to cache (the old name deprecated until 5.40).
    The old patch replaced forwards that named past_key_values, so cache= vanished into **kwargs and
    every decode step ran without its past. Both names must give transformers' logits, on the decode
    kernel; on 5.17 the only name is past_key_values."""
    from transformers import __version__

    assert CACHE == ("cache" if hf_mod._release(__version__) >= (5, 24, 0) else "past_key_values")
    model = hf_model(seed=29, **SMALL)
    ids, step = rand_ids(20, (2, 7)), rand_ids(21, (2, 1))
    with torch.no_grad():
        first = model(ids, use_cache=True)
        expected = model(step, use_cache=True, **{CACHE: first[CACHE]}).logits
        patch_hf(model)
        names = ["past_key_values"] + (["cache"] if CACHE == "cache" else [])
        for name in names:
            past = model(ids, use_cache=True)[CACHE]
            if name != CACHE:  # the deprecated spelling: transformers warns and maps it
                with pytest.warns(FutureWarning, match="past_key_values"):
                    got = model(step, use_cache=True, past_key_values=past).logits
            else:
                got = model(step, use_cache=True, **{name: past}).logits
            assert (got - expected).abs().max().item() <= 1e-5, name
    assert served(model)["decode"] == len(names) * SMALL["n_layer"]


def test_mask_recognition_left_padding_only():
    """_causal_past takes a mask to the decode kernel only when it is causal after a run of left
    padding (kv_start <= past); a hole in the middle, a padded new token or an additive bias go to SDPA."""
    s, t, past = 2, 9, 7

    def mask(starts):
        m = hf_mod._causal_visible(t, s, past, "cpu")[None].repeat(len(starts), 1, 1)  # [B, S, T]
        for b, k0 in enumerate(starts):
            m[b, :, :k0] = False
        return m[:, None]  # [B, 1, S, T]

    got_past, starts = hf_mod._causal_past(mask([0, 3, 7]), s, t)
    assert got_past == past and starts.dtype == torch.int32 and starts.tolist() == [0, 3, 7]
    assert hf_mod._causal_past(mask([0, 0]), s, t) == (past, None)
    float_mask = torch.zeros(2, 1, s, t).masked_fill(~mask([2, 0]), torch.finfo(torch.float32).min)
    assert hf_mod._causal_past(float_mask, s, t)[1].tolist() == [2, 0]
    assert hf_mod._causal_past(mask([8, 0]), s, t) is None  # the first new token would be padding
    hole = mask([0, 2])
    hole[1, :, :, 4] = False  # padding in the middle of a sequence
    assert hf_mod._causal_past(hole, s, t) is None
    assert hf_mod._causal_past(float_mask - 0.5, s, t) is None  # a bias, not a mask
    ragged = mask([0, 0])
    ragged[1, :, :, past + 1] = False  # rows ending at different positions
    assert hf_mod._causal_past(ragged, s, t) is None

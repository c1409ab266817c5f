"""A patched model accepts every call the unpatched one accepts and returns the same (issue 22).

Each case goes through the public model call of two GPT-2s built from the same seed, one patched
and one not, and checks the result and the route it took (patch_stats): an argument that cannot
change attention's result is served by the kernels (head_mask=None, num_items_in_batch,
inputs_embeds, gradient checkpointing at inference, resized embeddings, a reloaded checkpoint); one
that changes it (a real head mask, gradients, training) or one never seen before (an invented
keyword) runs transformers' own attention with the argument, with a FallbackWarning that names it;
what raises unpatched raises the same way patched. Run at both ends of the tested range by .ci/run."""
import warnings
from types import MethodType

import pytest
import torch
from hf_reference import VOCAB, hf_model

from fastgpt2.hf import FallbackWarning, is_patched, patch_hf, patch_stats

pytestmark = [pytest.mark.filterwarnings("error::FutureWarning"), pytest.mark.filterwarnings("error::DeprecationWarning")]

SMALL = dict(n_layer=2, n_embd=64, n_head=4)
LAYERS = SMALL["n_layer"]
TOL = 1e-4  # the torch backend's ops against transformers' fp32 modules (as test_patch_hf)


def ids_of(seed, shape):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def pair(seed, **cfg):
    """(unpatched, patched): two models with the same seeded weights."""
    return hf_model(seed, **SMALL, **cfg), patch_hf(hf_model(seed, **SMALL, **cfg))


def fallbacks(model):
    return {k: v for k, v in patch_stats(model).items() if k.startswith("fallback")}


def close(a, b):
    assert a.shape == b.shape and (a - b).abs().max().item() <= TOL


def quiet(call):
    """call() with no FallbackWarning allowed (the kernels served it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FallbackWarning)
        return call()


# -- arguments that cannot change the result: the kernels serve them ----------------------------------
def test_head_mask_none_is_served():
    ref, model = pair(40)
    ids = ids_of(1, (2, 9))
    with torch.no_grad():
        expected = ref(ids, head_mask=None).logits
        got = quiet(lambda: model(ids, head_mask=None).logits)
    close(got, expected)
    assert patch_stats(model)["prefill"] == LAYERS and not fallbacks(model)


def test_num_items_in_batch_is_served_and_the_loss_uses_it():
    ref, model = pair(41)
    ids = ids_of(2, (2, 9))
    n = torch.tensor(5)  # not the real count: the loss must be divided by it, as transformers does
    with torch.no_grad():
        expected = ref(ids, labels=ids, num_items_in_batch=n).loss
        got = quiet(lambda: model(ids, labels=ids, num_items_in_batch=n).loss)
        plain = ref(ids, labels=ids).loss
    assert abs(got.item() - expected.item()) <= TOL * abs(expected.item())
    assert abs(got.item() - plain.item()) > 0.1  # num_items_in_batch really reached the loss
    assert patch_stats(model)["prefill"] == LAYERS and not fallbacks(model)


def test_the_losss_own_keywords_are_served():
    ref, model = pair(52)
    ids = ids_of(13, (2, 9))
    shift = torch.cat([ids[:, 1:], torch.full((2, 1), -7)], dim=1)  # labels shifted by the caller, -7 ignored
    kwargs = dict(labels=ids, shift_labels=shift, ignore_index=-7)
    with torch.no_grad():
        expected = ref(ids, **kwargs).loss
        got = quiet(lambda: model(ids, **kwargs).loss)
    assert abs(got.item() - expected.item()) <= TOL * abs(expected.item())
    assert patch_stats(model)["prefill"] == LAYERS and not fallbacks(model)


def test_inputs_embeds_is_served():
    ref, model = pair(42)
    ids = ids_of(3, (2, 7))
    with torch.no_grad():
        embeds = ref.transformer.wte(ids) + 0.01 * torch.randn(2, 7, SMALL["n_embd"],
                                                               generator=torch.Generator().manual_seed(3))
        expected = ref(inputs_embeds=embeds).logits
        got = quiet(lambda: model(inputs_embeds=embeds).logits)
    close(got, expected)
    assert patch_stats(model)["prefill"] == LAYERS and not fallbacks(model)


def test_resized_embeddings_are_served_on_the_new_table():
    ref, model = pair(43)
    for m in (ref, model):
        torch.manual_seed(0)  # the new rows are drawn from the RNG
        m.resize_token_embeddings(VOCAB + 13)
    assert torch.equal(model.transformer.wte.weight, ref.transformer.wte.weight)
    ids = torch.cat([ids_of(4, (2, 6)), torch.tensor([[VOCAB + 12], [VOCAB + 3]])], dim=1)  # new tokens too
    with torch.no_grad():
        expected = ref(ids).logits
        got = quiet(lambda: model(ids).logits)
    assert got.shape == (2, 7, VOCAB + 13)
    close(got, expected)
    assert patch_stats(model)["prefill"] == LAYERS and not fallbacks(model)


def test_save_and_reload_of_a_patched_model(tmp_path):
    from transformers import GPT2LMHeadModel

    ref, model = pair(44)
    model.save_pretrained(tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert not is_patched(reloaded) and reloaded.config._attn_implementation != "fastgpt2"  # the file is plain
    ids = ids_of(5, (1, 8))
    with torch.no_grad():
        expected = ref(ids).logits
        assert torch.equal(reloaded(ids).logits, expected)
        patch_hf(reloaded)
        got = quiet(lambda: reloaded(ids).logits)
    close(got, expected)
    assert patch_stats(reloaded)["prefill"] == LAYERS


# -- arguments that change the result: transformers' own attention, warned -----------------------------
def test_a_real_head_mask_runs_transformers_code_with_it():
    ref, model = pair(45)
    ids = ids_of(6, (2, 8))
    head_mask = torch.ones(LAYERS, SMALL["n_head"])
    head_mask[0, 1] = 0.0
    with torch.no_grad():
        expected = ref(ids, head_mask=head_mask).logits
        with pytest.warns(FallbackWarning, match="a head mask is not served"):
            got = model(ids, head_mask=head_mask).logits
    assert torch.equal(got, expected)  # transformers' own code, whatever it makes of the mask
    assert fallbacks(model) == {"fallback:head_mask": 1} and "prefill" not in patch_stats(model)


def test_an_invented_keyword_goes_to_transformers_attention_with_one_warning_naming_it():
    ref, model = pair(46)
    ids = ids_of(7, (2, 8))
    with torch.no_grad():
        expected = ref(ids, my_new_flag=3).logits  # transformers hands it to the attention, which ignores it
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = model(ids, my_new_flag=3).logits
            again = model(ids, my_new_flag=3).logits
    named = [w for w in record if issubclass(w.category, FallbackWarning)]
    assert len(named) == 1 and "my_new_flag=" in str(named[0].message)  # once per model and argument
    close(got, expected)
    assert torch.equal(again, got)
    assert fallbacks(model) == {"fallback:argument:my_new_flag": 2 * LAYERS}  # every attention call, the rest served
    assert patch_stats(model)["mlp"] == 2 * LAYERS


def outcome(call):
    """("returned", value) or ("raised", the exception's type and message)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FallbackWarning)
        try:
            return "returned", call()
        except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the patch must raise too
            return "raised", (type(exc), str(exc))


def test_what_raises_unpatched_raises_the_same_patched_and_what_returns_returns_the_same():
    ref, model = pair(47)
    ids = ids_of(8, (1, 5))
    x = torch.randn(1, 2, SMALL["n_embd"])
    calls = [  # softcap: 5.25's SDPA refuses it, 5.17's ignores it; scale=: GPT2MLP.forward takes no such argument
        lambda m: m(ids, softcap=30.0).logits,
        lambda m: m.transformer.h[0].mlp(x, scale=2.0),
    ]
    with torch.no_grad():
        for call in calls:
            (kind, expected), (got_kind, got) = outcome(lambda: call(ref)), outcome(lambda: call(model))
            assert got_kind == kind
            if kind == "raised":
                assert got == expected
            else:
                close(got, expected)
    assert outcome(lambda: ref.transformer.h[0].mlp(x, scale=2.0))[1][0] is TypeError
    assert "fallback:argument:softcap" in fallbacks(model) and "fallback:argument:GPT2MLP.forward" in fallbacks(model)


def test_train_mode_without_gradients_runs_transformers_dropout():
    ref, model = pair(48)
    ids = ids_of(9, (2, 8))
    ref.train(), model.train()
    with torch.no_grad():
        torch.manual_seed(1)
        expected = ref(ids).logits
        torch.manual_seed(1)
        with pytest.warns(FallbackWarning, match="train mode with dropout"):
            got = model(ids).logits
    assert torch.equal(got, expected)  # the same dropout masks: transformers' own code throughout
    assert set(fallbacks(model)) == {"fallback:training"}


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_trains_as_transformers_and_serves_inference(use_reentrant):
    ref, model = pair(49)
    ids = ids_of(10, (2, 8))
    grads = []
    for m in (ref, model):
        if hasattr(m, "activation_checkpointing_enable"):  # 5.25 (gradient_checkpointing_enable deprecated)
            m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        m.train()
        torch.manual_seed(2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            m(ids, labels=ids).loss.backward()  # the backward recomputes each block: its modules fall back too
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for name, g in grads[0].items():
        assert torch.equal(grads[1][name], g), name
    assert "prefill" not in patch_stats(model) and "fallback:training" in fallbacks(model)
    for m in (ref, model):
        m.eval()
    with torch.no_grad():
        close(quiet(lambda: model(ids).logits), ref(ids).logits)
    assert patch_stats(model)["prefill"] == LAYERS


def test_a_short_trainer_run_matches_unpatched_and_its_evaluation_is_served(tmp_path):
    """The Trainer passes num_items_in_batch down to the attention; training falls back (autograd,
    dropout), evaluation runs on the kernels."""
    from transformers import Trainer, TrainingArguments

    ref, model = pair(50)
    data = [{"input_ids": ids, "labels": ids} for ids in ids_of(11, (8, 12))]
    results = []
    for m in (ref, model):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                 per_device_eval_batch_size=4, learning_rate=1e-2, seed=3, report_to=[],
                                 save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True,
                                 dataloader_num_workers=0)
        trainer = Trainer(model=m, args=args, train_dataset=data, eval_dataset=data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FallbackWarning)
            trainer.train()
        results.append(({n: p.detach().clone() for n, p in m.named_parameters()}, trainer.evaluate()["eval_loss"]))
    (expected_params, expected_loss), (params, loss) = results
    for name, p in expected_params.items():
        assert torch.equal(params[name], p), name  # training ran on transformers' own code, bit for bit
    assert abs(loss - expected_loss) <= TOL * abs(expected_loss)
    stats = patch_stats(model)
    assert stats.get("fallback:training", 0) + stats.get("fallback:autograd", 0) > 0
    assert stats["prefill"] == 2 * LAYERS  # two evaluation batches on the kernels
    assert not any(k.startswith("fallback:argument") for k in stats)  # num_items_in_batch is known


# -- transformers 5.25: hub kernels, train()/eval() --------------------------------------------------
def test_the_patch_survives_train_eval_and_use_kernels_toggles():
    """5.25 kernelizes from_pretrained models by default and re-applies it in train()/eval(); the
    kernels library swaps the forward of hub-decorated activations (mlp.act), never the modules
    patch_hf replaced. A swapped activation is never called on the kernels' path, and is the one
    transformers' own MLP calls on a fallback, as unpatched."""
    ref, model = pair(51)
    ids = ids_of(12, (2, 8))
    with torch.no_grad():
        expected = ref(ids).logits
    from transformers.utils import is_kernels_available

    toggles = [lambda m: m.train(), lambda m: m.eval()]
    if is_kernels_available():  # a hard dependency from 5.25 (5.17 needs kernels 0.16, not installed)
        toggles += [lambda m: setattr(m, "use_kernels", True), lambda m: m.train(), lambda m: m.eval(),
                    lambda m: setattr(m, "use_kernels", False)]
    for toggle in toggles:
        toggle(model)
    model.eval()
    with torch.no_grad():
        close(quiet(lambda: model(ids).logits), expected)
    assert is_patched(model) and patch_stats(model)["prefill"] == LAYERS

    # the kernels library's way of installing a hub activation: an instance forward on mlp.act
    calls = []

    def hub_gelu(self, x):
        calls.append(x.shape)
        return type(self).forward(self, x)

    for block in model.transformer.h:
        block.mlp.act.forward = MethodType(hub_gelu, block.mlp.act)
    with torch.no_grad():
        close(quiet(lambda: model(ids).logits), expected)
        assert not calls  # the patched MLP fuses its own activation
        with pytest.warns(FallbackWarning, match="a head mask"):
            model(ids, head_mask=torch.ones(LAYERS, SMALL["n_head"]))
    assert len(calls) == LAYERS  # transformers' own MLP on the fallback

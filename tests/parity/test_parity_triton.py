"""backend="triton" (the Triton kernels; on CPU in Triton's interpreter) vs transformers, fp32,
on tiny checkpoints: logits, greedy continuations, a ragged left-padded batch."""
import os

import pytest
import torch
from hf_reference import VOCAB, hf_greedy, hf_model

import fastgpt2

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = {
    "gpt2": dict(n_layer=2, n_embd=128, n_head=2),  # head_dim 64, as every GPT-2 size
    "crfm": dict(n_layer=3, n_embd=128, n_head=2, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
}


@pytest.fixture(scope="module", params=sorted(TINY))
def pair(request, tmp_path_factory):
    hf = hf_model(seed=31, **TINY[request.param])
    d = tmp_path_factory.mktemp("triton-" + request.param)
    hf.save_pretrained(d)
    ours = fastgpt2.GPT2.from_pretrained(d, device=DEVICE, dtype=torch.float32, backend="triton")
    assert ours.backend == "triton"
    return request.param, hf, ours


def test_logits_match_transformers(pair):
    family, hf, ours = pair
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (ours(ids.to(DEVICE)).cpu() - ref).abs().max().item() <= 1e-4, family


def test_greedy_32_tokens_match_transformers(pair):
    family, hf, ours = pair
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(9))
    assert torch.equal(ours.generate(ids.to(DEVICE), max_new_tokens=32).cpu(), hf_greedy(hf, ids, 32)), family


def test_ragged_batch_equals_each_prompt_alone(pair):
    family, hf, ours = pair
    gen = torch.Generator().manual_seed(10)
    prompts = [torch.randint(0, VOCAB - 1, (n,), generator=gen) for n in (6, 1, 13)]
    t = max(len(p) for p in prompts)
    ids = torch.full((3, t), VOCAB - 1)
    mask = torch.zeros(3, t, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, t - len(p):] = p
        mask[row, t - len(p):] = 1
    out = ours.generate(ids.to(DEVICE), max_new_tokens=10, attention_mask=mask.to(DEVICE)).cpu()
    for row, p in enumerate(prompts):
        assert torch.equal(out[row, t:], hf_greedy(hf, p[None], 10)[0, len(p):]), f"{family} row {row}"
    # the padded forward gives each row's own logits too
    logits = ours(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).cpu()
    for row, p in enumerate(prompts):
        with torch.no_grad():
            alone = hf(p[None]).logits[0]
        assert (logits[row, t - len(p):] - alone).abs().max() <= 1e-4

"""fastgpt2 (torch backend, fp32, CPU) vs transformers.GPT2LMHeadModel on checkpoints written by
save_pretrained and loaded back from disk: logits and 32-token greedy continuations."""
import zlib

import pytest
import torch
from hf_reference import FAMILIES, VOCAB, hf_greedy, hf_model

import fastgpt2


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    family = request.param
    hf = hf_model(seed=zlib.crc32(family.encode()) % 1000, **FAMILIES[family])  # the same weights in every process (hash() is salted)
    directory = tmp_path_factory.mktemp(family)
    hf.save_pretrained(directory)
    ours = fastgpt2.GPT2.from_pretrained(directory, device="cpu", dtype=torch.float32, backend="torch")
    return family, hf, ours


def test_logits_match(pair):
    family, hf, ours = pair
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 37), generator=gen)
    with torch.no_grad():
        ref = hf(ids).logits
    out = ours(ids)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-4, family


def test_greedy_32_tokens_match(pair):
    family, hf, ours = pair
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(0, VOCAB, (1, 11), generator=gen)
    ref = hf_greedy(hf, ids, 32)
    out = ours.generate(ids, max_new_tokens=32)
    assert torch.equal(out, ref), family


@pytest.mark.parametrize("family", ["gpt2", "crfm"])
def test_ragged_left_padded_batch_equals_each_prompt_alone(family):
    hf = hf_model(seed=7, **FAMILIES[family])
    ours = fastgpt2.GPT2(fastgpt2.GPT2Config.from_hf(hf.config.to_dict()),
                         {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
                          if k != "lm_head.weight" and not k.endswith(".attn.bias")},
                         device="cpu", dtype=torch.float32, backend="torch")
    gen = torch.Generator().manual_seed(3)
    lengths = [5, 1, 17, 9, 3, 12, 7, 2]  # 8 rows: the float32 CPU path's packed oneDNN GEMMs too
    prompts = [torch.randint(0, VOCAB - 1, (n,), generator=gen) for n in lengths]
    t = max(lengths)
    ids = torch.full((len(lengths), t), VOCAB - 1)
    mask = torch.zeros(len(lengths), t, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, t - len(p):] = p
        mask[row, t - len(p):] = 1
    out = ours.generate(ids, max_new_tokens=12, attention_mask=mask)
    assert out.shape == (len(lengths), t + 12)
    assert torch.equal(out[:, :t], ids)
    for row, p in enumerate(prompts):
        alone = hf_greedy(hf, p[None], 12)
        assert torch.equal(out[row, t:], alone[0, len(p):]), f"row {row} (prompt length {len(p)})"


def test_forward_with_padding_matches_each_row_alone():
    hf = hf_model(seed=9, **FAMILIES["n_inner"])
    ours = fastgpt2.GPT2(fastgpt2.GPT2Config.from_hf(hf.config.to_dict()),
                         {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
                          if k != "lm_head.weight"},
                         device="cpu", dtype=torch.float32, backend="torch")
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (3, 10), generator=gen)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1],   # left padding
                         [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],   # right padding
                         [1] * 10])
    out = ours(ids, attention_mask=mask)
    for row in range(3):
        keep = mask[row].bool()
        with torch.no_grad():
            alone = hf(ids[row][keep][None]).logits[0]
        assert (out[row][keep] - alone).abs().max() <= 1e-4
        assert (out[row][~keep] == 0).all()

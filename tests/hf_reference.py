"""The transformers reference: seeded random GPT-2 checkpoints written with save_pretrained.

Every parameter is drawn fresh (biases and layernorm parameters included, never zeros), so a
wrong bias, gain or layer order shows in the logits.
"""
from __future__ import annotations

import torch

# scaled-down config families (heads and head sizes kept where they matter)
FAMILIES = {
    "gpt2": dict(n_layer=2, n_embd=768, n_head=12),  # 12 heads, head_dim 64
    "distilgpt2": dict(n_layer=3, n_embd=384, n_head=6),
    "gpt2-xl": dict(n_layer=2, n_embd=400, n_head=25),  # 25 heads, as gpt2-xl (head_dim 16 to stay small)
    "n_inner": dict(n_layer=2, n_embd=128, n_head=4, n_inner=200),
    "gelu": dict(n_layer=2, n_embd=128, n_head=4, activation_function="gelu"),
    "crfm": dict(n_layer=3, n_embd=128, n_head=4, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
}

VOCAB = 1000
POSITIONS = 128


def hf_config(**overrides):
    from transformers import GPT2Config

    kwargs = dict(vocab_size=VOCAB, n_positions=POSITIONS, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)
    kwargs.update(overrides)
    return GPT2Config(**kwargs)


def hf_model(seed: int = 0, **overrides):
    """A transformers GPT2LMHeadModel with seeded random weights; eager attention for CRFM configs
    (transformers honours their flags only there)."""
    from transformers import GPT2LMHeadModel

    cfg = hf_config(**overrides)
    crfm = cfg.scale_attn_by_inverse_layer_idx or cfg.reorder_and_upcast_attn
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="eager" if crfm else "sdpa")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if ".ln_" in name or name.startswith("transformer.ln_f") else 0.05 * noise)
    model.generation_config.eos_token_id = None  # references run exactly the asked number of steps
    model.generation_config.pad_token_id = VOCAB - 1
    return model.eval()


def save_checkpoint(model, directory, **kwargs):
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_greedy(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' greedy continuation of one unpadded prompt [1, T], exactly new_tokens long."""
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return out


TOKENIZER_TEXT = ["Hello, I'm a language model, and I like caf\u00e9s and \u00fcber long words.",
                  "The quick brown fox jumps over the lazy dog. \u65e5\u672c\u8a9e\u3082\u5c11\u3057."] * 20


def byte_level_tokenizer():
    """A GPT-2-style byte-level BPE (the `tokenizers` library) trained on TOKENIZER_TEXT: 400 tokens,
    multi-byte characters included; save it beside a checkpoint as tokenizer.json."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(TOKENIZER_TEXT, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    return tok


def save_tiny_checkpoint(directory, seed: int):
    """A 2-layer, 64-wide seeded GPT-2 saved to `directory` with the byte-level tokenizer beside it
    (what the CLI and server tests load); returns the directory."""
    hf_model(seed=seed, n_layer=2, n_embd=64, n_head=4).save_pretrained(directory)
    byte_level_tokenizer().save(str(directory / "tokenizer.json"))
    return directory

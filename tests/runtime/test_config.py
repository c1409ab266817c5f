import json

import pytest
import torch

import fastgpt2
from fastgpt2 import ConfigError, GPT2Config

PRESET_SHAPES = {  # name: (n_layer, n_embd, n_head, parameters)
    "gpt2": (12, 768, 12, 124_439_808),
    "distilgpt2": (6, 768, 12, 81_912_576),
    "gpt2-medium": (24, 1024, 16, 354_823_168),
    "gpt2-large": (36, 1280, 20, 774_030_080),
    "gpt2-xl": (48, 1600, 25, 1_557_611_200),
}


@pytest.mark.parametrize("name", sorted(PRESET_SHAPES))
def test_presets_match_the_released_models(name):
    cfg = GPT2Config.from_name(name)
    n_layer, n_embd, n_head, params = PRESET_SHAPES[name]
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head) == (n_layer, n_embd, n_head)
    assert (cfg.vocab_size, cfg.n_positions, cfg.head_dim, cfg.inner_dim) == (50257, 1024, 64, 4 * n_embd)
    assert cfg.num_parameters() == params  # the counts transformers reports for these checkpoints


def test_preset_parameter_count_equals_transformers():
    from transformers import GPT2Config as HFConfig, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=40, n_inner=100)
    hf = GPT2LMHeadModel(HFConfig(**cfg.to_hf_dict()))
    assert cfg.num_parameters() == sum(p.numel() for p in hf.parameters())


def test_unknown_preset_names_the_choices():
    with pytest.raises(ConfigError, match="unknown preset 'gpt3'.*gpt2-xl"):
        GPT2Config.from_name("gpt3")


def test_old_config_json_gets_transformers_defaults(tmp_path):
    # the shape of the 2019 gpt2 config.json: no activation_function, n_inner, CRFM flags, model_type
    old = {"n_ctx": 512, "n_embd": 64, "n_head": 4, "n_layer": 3, "vocab_size": 321, "layer_norm_epsilon": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = GPT2Config.from_hf(tmp_path)
    assert cfg.n_positions == 512 and cfg.n_layer == 3 and cfg.vocab_size == 321
    assert cfg.activation_function == "gelu_new" and cfg.n_inner is None and cfg.inner_dim == 256
    assert cfg.scale_attn_weights and not cfg.scale_attn_by_inverse_layer_idx and not cfg.reorder_and_upcast_attn


def test_from_hf_matches_transformers_fields():
    from transformers import GPT2Config as HFConfig

    hf = HFConfig(n_layer=3, n_embd=48, n_head=3, n_inner=77, activation_function="gelu",
                  scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True, layer_norm_epsilon=1e-3)
    cfg = GPT2Config.from_hf(hf.to_dict())
    assert (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_inner) == (3, 48, 3, 77)
    assert cfg.activation == "gelu_erf" and cfg.layer_norm_epsilon == 1e-3
    assert cfg.scale_attn_by_inverse_layer_idx and cfg.reorder_and_upcast_attn
    # layer 2 (0-based): 1/sqrt(16) / 3, as transformers' GPT2Attention.scaling
    assert cfg.attn_scale(2) == pytest.approx(16**-0.5 / 3, rel=1e-12)


@pytest.mark.parametrize("act, kernel", [("gelu_new", "gelu_tanh"), ("gelu_pytorch_tanh", "gelu_tanh"),
                                         ("gelu_fast", "gelu_tanh"), ("gelu", "gelu_erf"), ("relu", "relu"), ("silu", "silu")])
def test_supported_activations(act, kernel):
    assert GPT2Config(activation_function=act).activation == kernel


def test_unknown_activation_is_named():
    with pytest.raises(ConfigError, match="activation_function 'swiglu' is not supported"):
        GPT2Config.from_hf({"activation_function": "swiglu"})


def test_other_model_type_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(ConfigError, match="model_type is 'llama'.*GPT-2 models only"):
        GPT2Config.from_hf(tmp_path)


def test_bad_shapes_are_named():
    with pytest.raises(ConfigError, match=r"n_embd \(100\) must be divisible by n_head \(12\)"):
        GPT2Config(n_embd=100, n_head=12)
    with pytest.raises(ConfigError, match="n_layer must be a positive integer"):
        GPT2Config(n_layer=0)


def test_missing_or_invalid_config_json(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        GPT2Config.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        GPT2Config.from_hf(tmp_path)


def test_from_config_is_seeded_and_defaults_follow_the_device():
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    a = fastgpt2.GPT2.from_config(cfg, seed=3)
    b = fastgpt2.GPT2.from_config(cfg, seed=3)
    c = fastgpt2.GPT2.from_config(cfg, seed=4)
    assert a.device.type == "cpu" and a.dtype == torch.float32 and a.backend == "torch"
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(a(ids), b(ids)) and not torch.equal(a(ids), c(ids))

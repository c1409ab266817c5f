"""GPT2Config: every field that changes GPT-2's math, the five OpenAI presets, config.json parsing, and
the bytes a decode step reads (weights, KV cache)."""
from __future__ import annotations

from ..errors import FastGPT2Error

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# activation_function values that transformers' GPT-2 accepts and fastgpt2 serves, mapped to the
# kernel's activation name. gelu_new, gelu_pytorch_tanh and gelu_fast are the same tanh formula.
HF_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu_erf",
    "relu": "relu",
    "silu": "silu",
}


class ConfigError(FastGPT2Error):
    """A config that fastgpt2 cannot serve, with what to change."""


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None = 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False  # Stanford CRFM (Mistral) checkpoints
    reorder_and_upcast_attn: bool = False  # Stanford CRFM: QK^T and softmax in fp32
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"GPT2Config.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd / n_head channels"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"n_inner must be a positive integer or None (= 4 * n_embd), got {self.n_inner!r}")
        if self.activation_function not in HF_ACTIVATIONS:
            raise ConfigError(
                f"activation_function {self.activation_function!r} is not supported; "
                f"fastgpt2 serves {sorted(HF_ACTIVATIONS)}"
            )
        if not self.layer_norm_epsilon > 0:
            raise ConfigError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")

    # -- derived -----------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def activation(self) -> str:
        """The kernel-level activation name (gelu_tanh, gelu_erf, relu, silu)."""
        return HF_ACTIVATIONS[self.activation_function]

    def attn_scale(self, layer_idx: int) -> float:
        """The softmax scale of layer `layer_idx` (0-based), exactly as transformers computes it."""
        scale = self.head_dim**-0.5 if self.scale_attn_weights else 1.0
        if self.scale_attn_by_inverse_layer_idx:
            scale /= float(layer_idx + 1)
        return scale

    @property
    def layer_parameters(self) -> int:
        """Weights of one block: ln_1 and ln_2 (4E), c_attn (E*3E + 3E), attn.c_proj (E*E + E), c_fc
        (E*I + I), mlp.c_proj (I*E + E); = 4E^2 + 2EI + 9E + I."""
        e, i = self.n_embd, self.inner_dim
        return 4 * e + (e * 3 * e + 3 * e) + (e * e + e) + (e * i + i) + (i * e + e)

    def num_parameters(self) -> int:
        e = self.n_embd
        head = 0 if self.tie_word_embeddings else self.vocab_size * e
        return self.vocab_size * e + self.n_positions * e + self.n_layer * self.layer_parameters + 2 * e + head

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> "GPT2Config":
        """The config of an OpenAI GPT-2 release: gpt2, distilgpt2, gpt2-medium, gpt2-large, gpt2-xl."""
        key = name.split("/")[-1] if name.startswith("openai-community/") or name.startswith("distilbert/") else name
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets are {sorted(PRESETS)}")
        return cls(**PRESETS[key])

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> "GPT2Config":
        """Parse a transformers GPT-2 config: a dict, a config.json path, or a directory holding one.

        Old files lack fields; they get transformers' defaults (gelu_new, n_inner=None, eps 1e-5,
        scale_attn_weights=True, the CRFM flags False)."""
        where = "config dict"
        if isinstance(source, dict):
            raw = dict(source)
        else:
            path = Path(source)
            if path.is_dir():
                path = path / "config.json"
            where = str(path)
            if not path.is_file():
                raise ConfigError(f"no config.json at {path}")
            try:
                raw = json.loads(path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path} is not valid JSON: {exc}") from exc
            if not isinstance(raw, dict):
                raise ConfigError(f"{path} must hold a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ConfigError(
                f"{where}: model_type is {model_type!r}; fastgpt2 runs GPT-2 models only (model_type 'gpt2')"
            )
        if raw.get("add_cross_attention"):
            raise ConfigError(f"{where}: add_cross_attention=True (an encoder-decoder GPT-2) is not supported")
        # transformers' attribute_map: hidden_size/num_hidden_layers/... are aliases; n_ctx is the old n_positions
        aliases = {
            "hidden_size": "n_embd",
            "num_hidden_layers": "n_layer",
            "num_attention_heads": "n_head",
            "max_position_embeddings": "n_positions",
            "n_ctx": "n_positions",
        }
        for alias, field in aliases.items():
            if alias in raw and field not in raw:
                raw[field] = raw[alias]
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: raw[k] for k in names if k in raw}
        try:
            return cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """The config as a transformers GPT2Config dict (for building the reference model)."""
        out = dataclasses.asdict(self)
        out["model_type"] = "gpt2"
        out["n_ctx"] = self.n_positions
        return out


PRESETS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "distilgpt2": dict(n_layer=6, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


# --------------------------------------------------------------------------------------------
# Bytes a decode step reads: the roofline's numerator (fastgpt2 bench, tools/roofline.py)
# --------------------------------------------------------------------------------------------
def kv_read_bytes(cfg: GPT2Config, batch: int, kv_len: int, dtype: torch.dtype) -> int:
    """K and V bytes one decode step reads when each of `batch` sequences attends over `kv_len`
    positions (its own new token included): 2 * n_layer * batch * kv_len * n_embd * itemsize."""
    return 2 * cfg.n_layer * batch * kv_len * cfg.n_embd * dtype.itemsize

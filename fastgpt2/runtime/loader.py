"""Hugging Face GPT-2 checkpoints -> fastgpt2 weights.

Sources: a local directory holding model.safetensors, a sharded model.safetensors.index.json, or
pytorch_model.bin (or its sharded index); or a hub id resolved through huggingface_hub's cache.
Pickled files are read with ``torch.load(weights_only=True)`` only: a pickle that would run code
is refused. Keys are accepted with or without the ``transformer.`` prefix; Conv1D weights stay in
their (in, out) layout; ``lm_head.weight`` may be absent (tied to wte); the stale
``attn.bias``/``attn.masked_bias`` causal-mask buffers are ignored.

A live transformers model (``read_hf_model``, behind ``GPT2.from_hf`` and patch_hf) hands over its
own tensors: nothing is copied.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import FastGPT2Error
from .config import ConfigError, GPT2Config

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PT_BIN = "pytorch_model.bin"
PT_BIN_INDEX = "pytorch_model.bin.index.json"

# Files fetched for a hub id, safetensors first; the pickled .bin only when a repo has no safetensors.
_META = ["config.json", "generation_config.json", "tokenizer.json", "vocab.json", "merges.txt"]
_HUB_SAFETENSORS = _META + [SAFETENSORS, SAFETENSORS_INDEX, "model-*.safetensors"]
_HUB_BIN = _META + [PT_BIN, PT_BIN_INDEX, "pytorch_model-*.bin"]

# causal-mask buffers that old transformers versions saved with the weights
_STALE = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")


def is_stale_buffer(key: str) -> bool:
    """A causal-mask buffer (``h.N.attn.bias`` / ``h.N.attn.masked_bias``, key without
    ``transformer.``), not a weight; never ``c_attn.bias``."""
    return _STALE.match(key) is not None


class CheckpointError(FastGPT2Error):
    """A checkpoint fastgpt2 cannot load, naming the file, the key and what was expected."""


class BlockWeight(NamedTuple):
    """One weight of a transformer block, as a checkpoint holds it and as the model keeps it."""

    key: str  # checkpoint key under ``h.{i}.``
    field: str  # runtime/model.py's LayerWeights field
    shape: tuple  # in "E" (n_embd) and "I" (inner dim), e.g. ("E", "3E")
    gemm: bool = False  # a Conv1D (in, out) GEMM weight (the model prepares it with ops.prepare_linear)


# The one table of a block's checkpoint keys: expected_shapes and the model's LayerWeights read it.
BLOCK_WEIGHTS = (
    BlockWeight("ln_1.weight", "ln_1_w", ("E",)),
    BlockWeight("ln_1.bias", "ln_1_b", ("E",)),
    BlockWeight("attn.c_attn.weight", "qkv_w", ("E", "3E"), gemm=True),
    BlockWeight("attn.c_attn.bias", "qkv_b", ("3E",)),
    BlockWeight("attn.c_proj.weight", "attn_proj_w", ("E", "E"), gemm=True),
    BlockWeight("attn.c_proj.bias", "attn_proj_b", ("E",)),
    BlockWeight("ln_2.weight", "ln_2_w", ("E",)),
    BlockWeight("ln_2.bias", "ln_2_b", ("E",)),
    BlockWeight("mlp.c_fc.weight", "fc_w", ("E", "I"), gemm=True),
    BlockWeight("mlp.c_fc.bias", "fc_b", ("I",)),
    BlockWeight("mlp.c_proj.weight", "mlp_proj_w", ("I", "E"), gemm=True),
    BlockWeight("mlp.c_proj.bias", "mlp_proj_b", ("E",)),
)


def expected_shapes(cfg: GPT2Config) -> dict[str, tuple[int, ...]]:
    """Every weight of a GPT-2 LM checkpoint (keys without ``transformer.``) and its shape."""
    e, i, v, p = cfg.n_embd, cfg.inner_dim, cfg.vocab_size, cfg.n_positions
    dims = {"E": e, "3E": 3 * e, "I": i}
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (v, e), "wpe.weight": (p, e)}
    for layer in range(cfg.n_layer):
        shapes.update({f"h.{layer}.{w.key}": tuple(dims[d] for d in w.shape) for w in BLOCK_WEIGHTS})
    shapes["ln_f.weight"] = (e,)
    shapes["ln_f.bias"] = (e,)
    shapes["lm_head.weight"] = (v, e)
    return shapes


def resolve(name_or_path: str | os.PathLike, revision: str | None = None) -> Path:
    """A local checkpoint directory, or the hub cache's snapshot directory of a hub id."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the checkpoint directory that holds config.json and the weights")
    text = str(name_or_path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "") or not text:
        raise CheckpointError(f"no checkpoint directory at {path}")
    return _resolve_hub(text, revision)


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download

    def fetch(patterns: list[str]) -> Path:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))

    try:
        snapshot = fetch(_HUB_SAFETENSORS)
        if not _weights_present(snapshot):
            snapshot = fetch(_HUB_BIN)
    except Exception as exc:  # huggingface_hub raises many types: offline, missing repo, no network
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(
            f"could not get hub model {repo_id!r}{offline}: its files are not in the hub cache at "
            f"{constants.HF_HUB_CACHE} and could not be downloaded ({type(exc).__name__}: {exc}). "
            "Download it once with network access (huggingface-cli download "
            f"{repo_id}), or pass a local checkpoint directory."
        ) from exc
    if not _weights_present(snapshot):
        raise CheckpointError(f"hub model {repo_id!r} ({snapshot}) has no {SAFETENSORS}, {SAFETENSORS_INDEX} or {PT_BIN}")
    return snapshot


def _weights_present(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (SAFETENSORS, SAFETENSORS_INDEX, PT_BIN, PT_BIN_INDEX))


def weight_files(directory: Path) -> list[Path]:
    """The files holding the weights, safetensors preferred over pickled .bin."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PT_BIN, PT_BIN_INDEX)):
        if (directory / single).is_file():
            return [directory / single]
        if (directory / index).is_file():
            return _shards(directory / index)
    raise CheckpointError(
        f"{directory} holds no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {PT_BIN} or {PT_BIN_INDEX}"
    )


def _shards(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index (needs a 'weight_map'): {exc}") from exc
    shards = []
    for name in dict.fromkeys(weight_map.values()):
        shard = index_path.parent / name
        if not shard.is_file():
            raise CheckpointError(f"{index_path} names shard {name!r}, which is missing from {index_path.parent}")
        shards.append(shard)
    return shards


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, on the CPU, as stored."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"{path} is truncated or corrupt and cannot be read as safetensors: {exc}") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights_only" in str(exc) or "Unpickl" in type(exc).__name__ or "GLOBAL" in str(exc):
            raise CheckpointError(
                f"{path}: refused to load: the pickle holds objects other than tensors (it could run code), "
                "and fastgpt2 loads .bin files with torch.load(weights_only=True) only. Convert the "
                "checkpoint to safetensors with a trusted tool, or use its model.safetensors."
            ) from exc
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read as a PyTorch checkpoint: {exc}") from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return state


def load_weights(directory: Path, cfg: GPT2Config, dtype: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """Read, check and cast the checkpoint's weights; keys without ``transformer.``, ``lm_head.weight``
    present only when the head is untied. Raises one CheckpointError listing every problem."""
    expected = expected_shapes(cfg)
    found: dict[str, tuple[torch.Tensor, Path]] = {}
    problems: list[str] = []
    for path in weight_files(directory):
        for raw_key, tensor in read_tensors(path).items():
            key = raw_key[len("transformer.") :] if raw_key.startswith("transformer.") else raw_key
            if is_stale_buffer(key):
                continue
            if key not in expected:
                problems.append(f"{path.name}: unexpected key {raw_key!r}")
                continue
            if key in found:
                problems.append(f"{path.name}: key {raw_key!r} appears twice (also in {found[key][1].name})")
                continue
            if tuple(tensor.shape) != expected[key]:
                problems.append(
                    f"{path.name}: {raw_key!r} has shape {tuple(tensor.shape)}, expected {expected[key]} for this config"
                )
                continue
            if not tensor.is_floating_point():
                problems.append(f"{path.name}: {raw_key!r} has dtype {tensor.dtype}, expected a floating-point tensor")
                continue
            found[key] = (tensor, path)
    optional = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = [k for k in expected if k not in found and k not in optional]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        problems.append(f"missing keys (config: {cfg.n_layer} layers, n_embd {cfg.n_embd}): {shown}")
    if problems:
        raise CheckpointError(f"cannot load {directory}:\n  " + "\n  ".join(problems))

    weights = {key: tensor.to(device=device, dtype=dtype).contiguous() for key, (tensor, _) in found.items()}
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)  # tied: the head is wte (transformers ignores a stored copy too)
    return weights


def load_config(name_or_path, revision: str | None = None) -> tuple[GPT2Config, Path]:
    """(config, directory) of a checkpoint directory or hub id; a bad config.json is a CheckpointError."""
    directory = resolve(name_or_path, revision)
    try:
        return GPT2Config.from_hf(directory), directory
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from exc


def load_checkpoint(name_or_path, dtype: torch.dtype, device: torch.device, revision: str | None = None):
    """(config, weights, directory) of a checkpoint directory or hub id."""
    cfg, directory = load_config(name_or_path, revision)
    return cfg, load_weights(directory, cfg, dtype, device), directory


# -- a live transformers model ---------------------------------------------------------------------
class HFModelError(FastGPT2Error):
    """A model that patch_hf / GPT2.from_hf cannot take (not a transformers GPT-2), or cannot serve."""


def gpt2_classes():
    """transformers' GPT-2 module (imported when a transformers model is handed over: it is a test
    and drop-in extra, never a runtime dependency)."""
    try:
        from transformers.models.gpt2 import modeling_gpt2 as m
    except ImportError as exc:  # pragma: no cover - transformers is a test extra
        raise HFModelError("a transformers model needs the transformers package (pip install transformers)") from exc
    return m


def describe_model(model) -> str:
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    return f"{name} (model_type {model_type!r})" if model_type else name


def find_gpt2(model):
    """The GPT2Model inside `model` (GPT2LMHeadModel, GPT2Model, or another GPT-2 head model)."""
    m = gpt2_classes()
    if isinstance(model, m.GPT2Model):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(model, m.GPT2PreTrainedModel) and isinstance(inner, m.GPT2Model):
        return inner
    raise HFModelError(
        f"fastgpt2 runs transformers GPT-2 models only (GPT2LMHeadModel or GPT2Model); got {describe_model(model)}"
    )


def read_hf_model(hf_model) -> tuple[GPT2Config, dict[str, torch.Tensor]]:
    """The config and the very weight tensors (same storage, detached) of a live transformers
    GPT2LMHeadModel or GPT2Model, under fastgpt2's keys; an untied head is kept as lm_head.weight."""
    m = gpt2_classes()
    if not isinstance(hf_model, (m.GPT2LMHeadModel, m.GPT2Model)):
        raise HFModelError(
            f"fastgpt2 builds from transformers GPT-2 models only (GPT2LMHeadModel or GPT2Model); got "
            f"{describe_model(hf_model)}")
    gpt2 = find_gpt2(hf_model)
    cfg = GPT2Config.from_hf(gpt2.config.to_dict())
    weights = {k: v.detach() for k, v in gpt2.state_dict(keep_vars=True).items() if not is_stale_buffer(k)}
    head = getattr(hf_model, "lm_head", None)
    if head is not None and head.weight.data_ptr() != gpt2.wte.weight.data_ptr():
        # an untied head (config says so, or the weights were untied after loading): serve it as stored
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        weights["lm_head.weight"] = head.weight.detach()
    elif head is None and not cfg.tie_word_embeddings:
        raise HFModelError("this GPT2Model has no lm_head and its config unties the head from wte; pass the "
                           "GPT2LMHeadModel instead")
    return cfg, weights

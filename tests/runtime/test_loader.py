"""Checkpoint variants load to the same logits; every bad checkpoint gives one clear error."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from hf_reference import VOCAB, hf_model

import fastgpt2
from fastgpt2 import CheckpointError

SMALL = dict(n_layer=2, n_embd=64, n_head=4)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    hf = hf_model(seed=11, **SMALL)
    base = tmp_path_factory.mktemp("base")
    hf.save_pretrained(base)
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = hf(ids).logits
    state = {k: v.clone().contiguous() for k, v in hf.state_dict().items()}  # keys with transformer.
    return base, ids, logits, state


def _dir_with(base, tmp_path, name, tensors, **save):
    d = tmp_path / name
    d.mkdir()
    shutil.copy(base / "config.json", d / "config.json")
    if name.endswith("bin"):
        torch.save(tensors, d / "pytorch_model.bin")
    else:
        save_file(tensors, str(d / "model.safetensors"), **save)
    return d


def _variants(state):
    no_prefix = {k.removeprefix("transformer."): v for k, v in state.items()}
    without_head = {k: v for k, v in state.items() if k != "lm_head.weight"}
    stale = dict(without_head)
    for layer in range(SMALL["n_layer"]):  # the causal-mask buffers old transformers saved
        stale[f"transformer.h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
        stale[f"transformer.h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    return {
        "with_prefix_with_head": state,
        "no_prefix": no_prefix,
        "without_head": without_head,
        "stale_attn_bias": stale,
        "pickled_bin": state,
    }


@pytest.mark.parametrize("variant", list(_variants({})))
def test_variants_give_the_same_logits(reference, tmp_path, variant):
    base, ids, logits, state = reference
    tensors = _variants(state)[variant]
    d = _dir_with(base, tmp_path, variant + ("_bin" if variant == "pickled_bin" else ""), tensors)
    model = fastgpt2.GPT2.from_pretrained(d, device="cpu", dtype=torch.float32)
    assert (model(ids) - logits).abs().max() <= 1e-4


def test_save_pretrained_output_and_sharded_safetensors(reference, tmp_path):
    base, ids, logits, _ = reference
    assert fastgpt2.GPT2.from_pretrained(base)(ids).sub(logits).abs().max() <= 1e-4
    hf = hf_model(seed=11, **SMALL)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    files = os.listdir(tmp_path)
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 2
    model = fastgpt2.GPT2.from_pretrained(tmp_path)
    assert (model(ids) - logits).abs().max() <= 1e-4


def test_weights_are_cast_once_at_load(reference):
    base, ids, logits, _ = reference
    model = fastgpt2.GPT2.from_pretrained(base, dtype="bfloat16")
    assert {w.dtype for w in model.weights.values()} == {torch.bfloat16}
    packed = model.ops.cpu_path.gemm == "onednn_packed"  # the bf16 path this CPU runs (else plain addmm)
    assert all(layer.fc_w.is_mkldnn == packed and layer.fc_w.dtype == torch.bfloat16 for layer in model.layers)
    out = model(ids)
    assert out.dtype == torch.bfloat16
    assert (out.float() - logits).abs().max() <= 0.1 * logits.abs().max()


def test_missing_key_is_named(reference, tmp_path):
    base, _, _, state = reference
    broken = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_fc.bias"}
    d = _dir_with(base, tmp_path, "missing", broken)
    with pytest.raises(CheckpointError, match=r"missing keys .*h\.1\.mlp\.c_fc\.bias"):
        fastgpt2.GPT2.from_pretrained(d)


def test_unexpected_key_is_named(reference, tmp_path):
    base, _, _, state = reference
    d = _dir_with(base, tmp_path, "unexpected", {**state, "multiple_choice_head.summary.weight": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected key 'multiple_choice_head\.summary\.weight'"):
        fastgpt2.GPT2.from_pretrained(d)


def test_shape_mismatch_names_file_key_and_shapes(reference, tmp_path):
    base, _, _, state = reference
    broken = dict(state)
    broken["transformer.h.0.attn.c_attn.weight"] = broken["transformer.h.0.attn.c_attn.weight"].t().contiguous()
    d = _dir_with(base, tmp_path, "transposed", broken)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: 'transformer\.h\.0\.attn\.c_attn\.weight' has shape "
                                              r"\(192, 64\), expected \(64, 192\)"):
        fastgpt2.GPT2.from_pretrained(d)


def test_truncated_safetensors_is_named(reference, tmp_path):
    base, _, _, _ = reference
    d = tmp_path / "truncated"
    shutil.copytree(base, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated or corrupt"):
        fastgpt2.GPT2.from_pretrained(d)


def test_corrupt_bin_is_named(reference, tmp_path):
    base, _, _, state = reference
    d = _dir_with(base, tmp_path, "corrupt_bin", state)
    (d / "pytorch_model.bin").write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin is truncated or corrupt"):
        fastgpt2.GPT2.from_pretrained(d)


class _RunsCode:
    """Unpickling this calls open(path, 'w'): the file appearing would prove that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bin_whose_pickle_runs_code_is_refused_and_the_code_does_not_run(reference, tmp_path):
    base, _, _, state = reference
    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(base / "config.json", d / "config.json")
    sentinel = tmp_path / "code-ran"
    torch.save({**state, "payload": _RunsCode(str(sentinel))}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused to load.*weights_only=True"):
        fastgpt2.GPT2.from_pretrained(d)
    assert not sentinel.exists()


def test_shard_index_naming_a_missing_shard(reference, tmp_path):
    base, _, _, state = reference
    d = _dir_with(base, tmp_path, "index", state)
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    index = {"weight_map": {k: "model-00001-of-00002.safetensors" for k in state}}
    index["weight_map"]["transformer.ln_f.bias"] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"names shard 'model-00002-of-00002\.safetensors', which is missing"):
        fastgpt2.GPT2.from_pretrained(d)


def test_directory_without_weights(reference, tmp_path):
    base, _, _, _ = reference
    shutil.copy(base / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="holds no weights: expected model.safetensors"):
        fastgpt2.GPT2.from_pretrained(tmp_path)


def test_missing_local_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory at"):
        fastgpt2.GPT2.from_pretrained(tmp_path / "nope")


def _fake_hub_cache(cache, repo_id, files_from):
    """The huggingface_hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in files_from.iterdir():
        shutil.copy(f, snap / f.name)
    return snap


def test_hub_id_resolves_offline_from_the_cache(reference, tmp_path, monkeypatch):
    base, ids, logits, _ = reference
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    _fake_hub_cache(tmp_path, "stanford-crfm/alias-gpt2-small-x21", base)
    model = fastgpt2.GPT2.from_pretrained("stanford-crfm/alias-gpt2-small-x21")
    assert (model(ids) - logits).abs().max() <= 1e-4


def test_hub_id_not_cached_names_the_id_and_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=rf"hub model 'gpt2' .*not in the hub cache at {tmp_path}"):
        fastgpt2.GPT2.from_pretrained("gpt2")

"""`fastgpt2 parity`: passes on a tests-made checkpoint (table, valid JSON, exit 0) and fails, naming
the layer, when one weight of fastgpt2's copy is altered after saving (transformers reads the original).
In bfloat16 the half-precision gate (2 * transformers' own bfloat16 error + atol) passes a correct
model and fails a broken one whose errors pass every other bfloat16 tolerance."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from hf_reference import hf_model

from fastgpt2.cli import main
from fastgpt2.parity import HALF_ATOL
from fastgpt2.runtime import model as network

TEXT = ["Hello, I'm a language model, and I like to write about the weather.",
        "The quick brown fox jumps over the lazy dog. Paris is the capital of France."] * 10
CFG = dict(n_layer=3, n_embd=64, n_head=4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from safetensors.torch import load_file, save_file
    from tokenizers import ByteLevelBPETokenizer

    root = tmp_path_factory.mktemp("parity")
    good, bad, bare = root / "good", root / "bad", root / "bare"
    hf_model(seed=41, **CFG).save_pretrained(good)
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(TEXT, vocab_size=400, min_frequency=1, special_tokens=["<|endoftext|>"])
    tok.save(str(good / "tokenizer.json"))
    shutil.copytree(good, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    key = "transformer.h.1.mlp.c_fc.weight"
    original = tensors[key].clone()
    tensors[key][5, 17] += 0.5  # one weight of layer 1
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    assert not torch.equal(load_file(str(bad / "model.safetensors"))[key], original)
    hf_model(seed=42, n_layer=2, n_embd=64, n_head=4, scale_attn_by_inverse_layer_idx=True,
             reorder_and_upcast_attn=True).save_pretrained(bare)  # CRFM, and no tokenizer
    return good, bad, bare


def test_help_documents_the_tolerances():
    out = subprocess.run([sys.executable, "-m", "fastgpt2", "parity", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: fastgpt2 parity" in out.stdout
    assert "max |Δlogits|" in out.stdout and "<= 1e-4" in out.stdout and "bfloat16" in out.stdout
    assert "--reference" in out.stdout and "--new-tokens" in out.stdout
    assert "half-precision gate" in out.stdout and "err(fastgpt2) > 2 * err(transformers in fastgpt2's dtype)" in out.stdout


def test_a_correct_checkpoint_passes(checkpoints, tmp_path, capsys):
    good, _, _ = checkpoints
    report = tmp_path / "parity.json"
    assert main(["parity", "--model", str(good), "--json", str(report), "--new-tokens", "16"]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "max |Δlogits|" in out and "layer 2 out" in out and "built-in English" in out
    r = json.loads(report.read_text())
    assert r["passed"] is True and r["failed"] == [] and r["dtype"] == "float32" and r["backend"] == "torch"
    f = r["figures"]
    assert 0 <= f["max_abs_logits"] <= 1e-4 and 0 <= f["mean_abs_logits"] <= f["max_abs_logits"]
    assert 0 <= f["kl_mean"] <= f["kl_max"] <= 1e-6
    assert f["top1"] == 1.0 and f["greedy"] == 16 and f["greedy_mean"] == 16
    assert abs(f["ppl_fastgpt2"] - f["ppl_reference"]) <= 1e-4 * f["ppl_reference"] and f["ppl_reference"] > 1
    assert [x["name"] for x in r["layers"]] == ["embeddings", "layer 0", "layer 1", "layer 2", "ln_f"]
    assert all(x["rel"] <= 1e-5 and x["max_abs_reference"] > 0 for x in r["layers"])
    assert r["prompts"] == 8 and r["positions"] > 8
    assert r["first_divergent_layer"] is None and r["worst_layer"] is None
    assert "half_precision" not in r and "half_prefill" not in f and "half gate" not in out  # float32: no gate


def test_one_altered_weight_fails_and_names_the_layer(checkpoints, tmp_path, capsys):
    good, bad, _ = checkpoints
    report = tmp_path / "parity.json"
    code = main(["parity", "--model", str(bad), "--reference", str(good), "--json", str(report), "--new-tokens", "8"])
    assert code == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "the discrepancy starts at: layer 1" in out and "worst layer" in out
    r = json.loads(report.read_text())
    assert r["passed"] is False and "max_abs_logits" in r["failed"] and "hidden_rel" in r["failed"]
    assert r["first_divergent_layer"] == "layer 1" and r["worst_layer"] == "layer 1"
    rel = {x["name"]: x["rel"] for x in r["layers"]}
    assert rel["embeddings"] <= 1e-5 and rel["layer 0"] <= 1e-5 and rel["layer 1"] > 1e-3
    assert r["worst_figure"] in r["failed"]


def test_no_tokenizer_uses_random_ids_and_crfm_uses_eager(checkpoints, tmp_path, capsys):
    _, _, bare = checkpoints
    report = tmp_path / "parity.json"
    assert main(["parity", "--model", str(bare), "--json", str(report), "--new-tokens", "8",
                 "--random-prompts", "3", "--seed", "5"]) == 0
    r = json.loads(report.read_text())
    assert "random token-id prompts" in r["prompt_source"] and r["prompts"] == 3
    assert r["reference_attn_implementation"] == "eager" and r["passed"] is True
    assert r["figures"]["max_abs_logits"] <= 1e-4


def test_prompts_file_and_a_tolerance_override(checkpoints, tmp_path, capsys):
    good, bad, _ = checkpoints
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The quick brown fox\n\nHello, I'm a language model\n")
    report = tmp_path / "parity.json"
    # the altered copy passes when every tolerance is loosened past its figures
    loose = ["--tol", "max_abs_logits=10", "--tol", "kl_mean=1", "--tol", "kl_max=1", "--tol", "top1=0",
             "--tol", "ppl_rel=1", "--tol", "hidden_rel=1", "--tol", "greedy=none"]
    assert main(["parity", "--model", str(bad), "--reference", str(good), "--prompts", str(prompts),
                 "--new-tokens", "4", "--json", str(report), *loose]) == 0
    r = json.loads(report.read_text())
    assert r["prompts"] == 2 and "prompts.txt" in r["prompt_source"] and r["figures"]["max_abs_logits"] > 1e-3
    assert main(["parity", "--model", str(good), "--tol", "nonsense=1"]) == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err


def _gate(r):
    return {p["phase"]: p for p in r["half_precision"]["phases"]}


def test_bfloat16_passes_the_half_precision_gate(checkpoints, tmp_path, capsys):
    good, _, _ = checkpoints
    report = tmp_path / "parity.json"
    assert main(["parity", "--model", str(good), "--dtype", "bfloat16", "--new-tokens", "12",
                 "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "half-precision gate (bfloat16)" in out and "bound = 2 * err(transformers bfloat16)" in out
    r = json.loads(report.read_text())
    assert r["passed"] is True and r["dtype"] == "bfloat16" and r["reference_dtype"] == "float32"
    g = r["half_precision"]
    assert g["dtype"] == "bfloat16" and g["factor"] == 2 and g["atol"] == HALF_ATOL["bfloat16"]
    phases = _gate(r)
    assert list(phases) == ["prefill", "decode"]
    assert phases["prefill"]["positions"] == r["positions"] and phases["decode"]["positions"] == 12 * r["prompts"]
    checks = {c["figure"]: c for c in r["checks"]}
    for phase, p in phases.items():
        # bfloat16 rounding shows (transformers' own error is not 0), fastgpt2 is within its bound
        assert 1e-3 < p["err_transformers"] < 0.1 and 0 < p["err_fastgpt2"] <= p["bound"] and p["ok"] is True
        assert p["bound"] == pytest.approx(2 * p["err_transformers"] + HALF_ATOL["bfloat16"])
        assert r["figures"]["half_" + phase] == p["err_fastgpt2"]
        assert checks["half_" + phase]["tolerance"] == p["bound"] and checks["half_" + phase]["ok"] is True
    # the prefill phase covers the max |Δlogits| figure's positions (the same forward, float32 reference)
    assert phases["prefill"]["err_fastgpt2"] >= r["figures"]["max_abs_logits"] - 1e-5
    # --reference-dtype same: the other figures against transformers in bfloat16; the gate as before
    assert main(["parity", "--model", str(good), "--dtype", "bfloat16", "--new-tokens", "12",
                 "--reference-dtype", "same", "--json", str(report)]) == 0
    same = json.loads(report.read_text())
    assert same["reference_dtype"] == "bfloat16" and same["figures"]["max_abs_logits"] != r["figures"]["max_abs_logits"]
    for phase, p in _gate(same).items():
        assert p["ok"] is True and p["err_fastgpt2"] == pytest.approx(phases[phase]["err_fastgpt2"], rel=1e-3)
        assert p["err_transformers"] == pytest.approx(phases[phase]["err_transformers"], rel=1e-3)


def _wrong_decode_positions(monkeypatch):
    """A decode-only bug: decode steps take the position embedding one past their own position."""
    blocks = network.GPT2Network._blocks
    monkeypatch.setattr(network.GPT2Network, "_blocks",
                        lambda self, ids, start, attend, workspace=None:
                        blocks(self, ids, None if start is None else start + 1, attend, workspace))


def _one_weight_5_percent_off(monkeypatch):
    """fastgpt2's copy of one weight matrix 5% too large (transformers reads the checkpoint's)."""
    init = network.GPT2Network.__init__

    def broken(self, cfg, weights, *args, **kwargs):
        weights = dict(weights, **{"h.1.mlp.c_fc.weight": weights["h.1.mlp.c_fc.weight"] * 1.05})
        init(self, cfg, weights, *args, **kwargs)

    monkeypatch.setattr(network.GPT2Network, "__init__", broken)


@pytest.mark.parametrize("bug, failing", [(_wrong_decode_positions, ["half_decode"]),
                                          (_one_weight_5_percent_off, ["half_prefill", "half_decode"])],
                         ids=["wrong decode positions", "one weight 5% off"])
def test_bfloat16_half_precision_gate_fails_a_broken_model(checkpoints, tmp_path, capsys, monkeypatch, bug, failing):
    good, _, _ = checkpoints
    bug(monkeypatch)
    report = tmp_path / "parity.json"
    assert main(["parity", "--model", str(good), "--dtype", "bfloat16", "--new-tokens", "12",
                 "--json", str(report)]) == 1
    out = capsys.readouterr().out
    assert "FAIL: half gate:" in out and "half-precision gate (bfloat16)" in out
    assert ("the difference is in the decode path" in out) is (failing == ["half_decode"])
    assert ("a float32 run (--dtype float32) names the layer" in out) is (failing != ["half_decode"])
    r = json.loads(report.read_text())
    assert r["passed"] is False and r["failed"] == failing and r["worst_figure"] in failing  # only the gate fails
    for phase, p in _gate(r).items():
        assert p["ok"] is ("half_" + phase not in failing)
        assert p["ok"] or p["err_fastgpt2"] > p["bound"] > 2 * p["err_transformers"]


def test_a_nan_weight_shows_as_nan_in_every_worst_figure(checkpoints, tmp_path, capsys, monkeypatch):
    """A NaN in fastgpt2's logits is the worst value, never dropped by max(): max |Δlogits|, KL max and the
    layers' differences read nan (the JSON writes it as a string) and fail."""
    good, _, _ = checkpoints
    original = network.GPT2Network.__init__

    def broken(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.layers[1].fc_b[3] = float("nan")  # layer 1's c_fc bias, after preparation

    monkeypatch.setattr(network.GPT2Network, "__init__", broken)
    report = tmp_path / "nan.json"
    assert main(["parity", "--model", str(good), "--json", str(report), "--new-tokens", "0"]) == 1
    r = json.loads(report.read_text())
    assert r["figures"]["max_abs_logits"] == r["figures"]["kl_max"] == "nan"
    assert {"max_abs_logits", "kl_max"} <= set(r["failed"])
    diffs = [x["max_abs_diff"] for x in r["layers"]]  # embeddings, layer 0, layer 1, layer 2, ln_f
    assert diffs[0] <= 1e-5 and diffs[1] <= 1e-5 and diffs[2:] == ["nan"] * 3
    capsys.readouterr()

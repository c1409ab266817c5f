"""tools/hf_model_tests.py on a stand-in for transformers' test tree (written here: the real one is
not shipped with transformers): the plugin patches every GPT-2 model as it is built (a head model's
GPT2Model, a from_pretrained model), the kernels serve their calls, and a test that passes unpatched
but not patched is reported and fails the run."""
import json
import subprocess
import sys
from pathlib import Path

TOOL = Path(__file__).resolve().parents[2] / "tools" / "hf_model_tests.py"

STAND_IN = '''
import os
import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model, GPT2ForSequenceClassification

from fastgpt2.hf import is_patched

PATCHED = os.environ.get("FASTGPT2_PATCH_ALL") == "1"
CFG = dict(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2, pad_token_id=0)


def test_every_model_class_is_patched_as_it_is_built():
    for cls in (GPT2LMHeadModel, GPT2Model, GPT2ForSequenceClassification):
        model = cls(GPT2Config(**CFG)).eval()
        assert is_patched(model) == PATCHED
        with torch.no_grad():
            model(torch.randint(1, 50, (2, 7)))  # never the pad token 0: no padding mask


def test_from_pretrained_models_are_patched(tmp_path):
    GPT2LMHeadModel(GPT2Config(**CFG)).save_pretrained(tmp_path)
    model = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert is_patched(model) == PATCHED
    with torch.no_grad():
        model.generate(torch.randint(1, 50, (1, 4)), max_new_tokens=3, do_sample=False)  # no pad token: no mask


def test_passes_only_unpatched():
    assert not is_patched(GPT2Model(GPT2Config(**CFG)))


def test_fails_in_both():
    assert False, "a test that fails unpatched too is not the drop-in's"
'''


def test_the_tool_patches_every_model_and_reports_what_passes_only_unpatched(tmp_path):
    tree = tmp_path / "transformers"
    test_file = tree / "tests" / "models" / "gpt2" / "test_modeling_gpt2.py"
    test_file.parent.mkdir(parents=True)
    test_file.write_text(STAND_IN)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(TOOL), "--tests", str(tree), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"] == {"unpatched": {"passed": 3, "failed": 1}, "patched": {"passed": 2, "failed": 2}}
    assert list(summary["regressions"]) == ["tests.models.gpt2.test_modeling_gpt2::test_passes_only_unpatched"]
    assert list(summary["unpatched_failures"]) == ["tests.models.gpt2.test_modeling_gpt2::test_fails_in_both"]
    assert "PASSES UNPATCHED, NOT PATCHED: tests.models.gpt2.test_modeling_gpt2::test_passes_only_unpatched" in run.stdout
    routes = summary["routes"]
    # 3 classes, the saved and the reloaded model, the one in the patched-only failure: each a patched GPT2Model;
    # the kernels served the 4 prefills and the 2 decode steps, 2 layers each
    assert routes["models"] == 6 and routes["prefill"] == 4 * 2 and routes["decode"] == 2 * 2
    assert not any(k.startswith("fallback") for k in routes)

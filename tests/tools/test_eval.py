"""`fastgpt2 eval` (fastgpt2/evaluate.py): the sliding-window perplexity equals transformers' own loss
over the same windows (labels masked to the tokens each window scores) to 1e-4 relative in float32,
for disjoint and overlapping windows; the windows score each token at most once, all but the first
when they overlap; the command prints it; bad options are refused."""
import math

import pytest
import torch

import fastgpt2
from fastgpt2.cli import main
from fastgpt2.errors import FastGPT2Error
from fastgpt2.evaluate import perplexity, windows
from fastgpt2.runtime.tokenizer import load_tokenizer
from hf_reference import save_tiny_checkpoint

TEXT = ("The sliding window keeps as much context as the model allows. " * 3 + "Perplexity is the exponent of "
        "the mean negative log-likelihood of each token given the ones before it. Les données à 7 €. ") * 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("eval"), seed=25)


def transformers_perplexity(model, ids, max_length, stride):
    """transformers' perplexity-guide loop, each window's loss weighted by the tokens it scores."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        window = torch.tensor([ids[begin:end]])
        labels = window.clone()
        labels[:, :max(begin + 1, prev_end) - begin] = -100  # only what this window newly scores
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + float(loss) * scored, count + scored, end
        if end == len(ids):
            break
    return math.exp(nll / count), count


@pytest.mark.parametrize("max_length, stride", [(128, 128), (128, 50), (40, 13), (7, 1)])
def test_perplexity_equals_transformers_over_the_same_windows(checkpoint, max_length, stride):
    from transformers import GPT2LMHeadModel

    ids = load_tokenizer(checkpoint).encode(TEXT).ids
    assert len(ids) > 2 * max_length
    hf = GPT2LMHeadModel.from_pretrained(checkpoint).eval()
    expected, count = transformers_perplexity(hf, ids, max_length, stride)
    got = perplexity(fastgpt2.GPT2.from_pretrained(checkpoint), ids, stride=stride, max_length=max_length)
    # overlapping windows score every token but the text's first; disjoint ones skip each window's first
    assert got.scored_tokens == count == len(ids) - (got.windows if stride == max_length else 1)
    assert got.perplexity == pytest.approx(expected, rel=1e-4) and got.nll == pytest.approx(math.log(expected), rel=1e-4)
    assert got.perplexity > 1 and got.seconds > 0


@pytest.mark.parametrize("n, max_length, stride", [(2, 2, 1), (10, 4, 4), (10, 4, 3), (1023, 1024, 512), (1600, 1024, 7)])
def test_windows_score_each_token_once_with_context_inside_the_window(n, max_length, stride):
    scored, spans = [], windows(n, max_length, stride)
    for begin, end, first in spans:
        assert 0 <= begin < first <= end <= n and end - begin <= max_length
        scored += range(first, end)
    unscored = {0} | ({begin for begin, _, _ in spans} if stride == max_length else set())
    assert scored == [t for t in range(n) if t not in unscored] and spans[-1][1] == n


def test_the_command_prints_the_perplexity(checkpoint, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    assert main(["eval", "--model", str(checkpoint), "--text", str(text), "--stride", "50", "--max-length", "128"]) == 0
    out = capsys.readouterr().out
    ids = load_tokenizer(checkpoint).encode(TEXT).ids
    expected = perplexity(fastgpt2.GPT2.from_pretrained(checkpoint), ids, stride=50, max_length=128)
    assert f"perplexity {expected.perplexity:.4f}" in out and f"over {len(ids) - 1} tokens" in out


@pytest.mark.parametrize("kwargs, ids, message", [
    (dict(stride=0), [1, 2, 3], "stride must be in \\[1, max_length = 128\\]"),
    (dict(stride=129), [1, 2, 3], "stride must be in \\[1, max_length = 128\\]"),
    (dict(max_length=129), [1, 2, 3], "max_length must be in \\[2, n_positions = 128\\]"),
    ({}, [5], "perplexity needs at least 2"),
    ({}, [5, 10**6], "vocabulary"),
])
def test_bad_options_are_refused(checkpoint, kwargs, ids, message):
    with pytest.raises(FastGPT2Error, match=message):
        perplexity(fastgpt2.GPT2.from_pretrained(checkpoint), ids, **kwargs)

"""The fastgpt2 command: generate with the checkpoint's tokenizer, bench's smoke run, --help."""
import json
import subprocess
import sys

import pytest
import torch
from hf_reference import TOKENIZER_TEXT, byte_level_tokenizer, save_tiny_checkpoint

import fastgpt2
from fastgpt2.cli import main
from fastgpt2.runtime.tokenizer import StreamDecoder, TokenizerError, load_tokenizer

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("cli"), seed=21)


@pytest.mark.parametrize("command", [[], ["generate"], ["bench"]])
def test_help(command):
    out = subprocess.run([sys.executable, "-m", "fastgpt2", *command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: fastgpt2" in out.stdout


def test_generate_streams_the_greedy_continuation(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "Hello, I'm a", "--max-new-tokens", "12", "--ignore-eos"]) == 0
    printed = capsys.readouterr().out
    tok = load_tokenizer(checkpoint)
    ids = tok.encode("Hello, I'm a").ids
    model = fastgpt2.GPT2.from_pretrained(checkpoint)
    expected = tok.decode(model.generate(torch.tensor([ids]), 12)[0].tolist())
    assert printed == expected + "\n"


def test_vocab_and_merges_files_work_like_tokenizer_json(tmp_path):
    tok = byte_level_tokenizer()
    tok.save_model(str(tmp_path))  # vocab.json + merges.txt
    loaded = load_tokenizer(tmp_path)
    for text in TOKENIZER_TEXT[:2]:
        assert loaded.encode(text).ids == tok.encode(text).ids
        assert loaded.decode(loaded.encode(text).ids) == text


def test_no_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer: expected tokenizer.json, or vocab.json and merges.txt"):
        load_tokenizer(tmp_path)


def test_stream_decoder_holds_partial_multibyte_characters():
    tok = byte_level_tokenizer()
    # one token per byte of "é" (c3 a9) and of "日" (e6 97 a5), as byte-level BPE can split them
    byte_tokens = [tok.token_to_id(c) for c in ["\u00c3", "\u00a9", "\u00e6", "\u0139", "\u00a5"]]
    assert None not in byte_tokens
    decoder = StreamDecoder(tok, tok.encode("caf").ids)
    pieces = [decoder.push(t) for t in byte_tokens]
    assert pieces == ["", "\u00e9", "", "", "\u65e5"]
    assert decoder.flush() == ""


def test_bench_smoke_run_prints_a_table_and_valid_json(tmp_path, capsys):
    cfg = json.dumps(dict(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    out = tmp_path / "bench.json"
    code = main(["bench", "--config", cfg, "--batch", "1,2", "--prompt-len", "5", "--new-tokens", "4",
                 "--runs", "1", "--warmup", "0", "--json", str(out), "--quiet", "--no-step-count",
                 "--bandwidth-gib", "0.01"])
    assert code == 0
    printed = capsys.readouterr()
    table = printed.out
    assert "prefill" not in printed.err and "%|" not in printed.err  # --quiet: no progress
    assert "| fastgpt2[torch] | 1 |" in table and "| transformers | 2 |" in table
    assert "device cpu | dtype float32 | torch " in table and "batch 1,2 | prompt 5 | new tokens 4" in table
    assert "memory bandwidth:" in table and "fastgpt2[torch] vs transformers" in table
    assert "decode step (backend" not in table
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["dtype"] == "float32" and result["torch"] == torch.__version__
    assert result["machine"] and result["batches"] == [1, 2] and result["step_count"] == {}
    # the CPU the figures belong to, and the GEMM path the torch backend chose on it
    assert result["cpu_model"].strip() and result["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert result["cpu_path"].startswith("fp32: ") and f"({result['cpu_capability']}" in result["cpu_path"]
    assert (f"CPU: {result['cpu_model']} | capability {result['cpu_capability']} | CPU path: {result['cpu_path']}"
            in table)
    assert result["bandwidth"]["GBps"] > 0 and result["bandwidth"]["bytes"] == int(0.01 * 2**30) // (4 * 4096) * 4 * 4096  # whole [rows, 4096] fp32
    engines = [(r["engine"], r["batch"]) for r in result["rows"]]
    assert engines == [("fastgpt2[torch]", 1), ("transformers", 1), ("fastgpt2[torch]", 2), ("transformers", 2)]
    for r in result["rows"]:
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ms_per_token"] > 0 and r["setup_s"] > 0
        assert r["weight_GBps"] > 0 and r["roofline_pct"] > 0
        assert r["kv_read_bytes"] == 2 * 1 * r["batch"] * (5 + 4 - 1) * 32 * 4
        assert len(r["prefill_runs_s"]) == len(r["generate_runs_s"]) == 1
    assert all(r["speedup_decode"] > 0 for r in result["rows"] if r["engine"] != "transformers")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    assert "fastgpt2 generate: error: no checkpoint directory at" in capsys.readouterr().err

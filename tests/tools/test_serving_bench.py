"""`fastgpt2 bench-serving` (fastgpt2/serving_bench.py) on a tiny model: every request of the seeded
workload completes under each schedule with the same tokens (a request's tokens do not depend on what
runs beside it, nor on when it was admitted), the figures are consistent, the command prints the table
and writes the JSON, and bad options are refused before any work. No timed assertion."""
import json

import pytest
import torch

import fastgpt2
from fastgpt2.benchmark import BenchError
from fastgpt2.cli import main
from fastgpt2.serving_bench import SCHEDULES, LoadOptions, format_load, run_load, workload

CFG = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=64)


def test_every_schedule_completes_the_workload_with_the_same_tokens():
    model = fastgpt2.GPT2.from_config(CFG, dtype=torch.float32, seed=1)
    options = LoadOptions(requests=9, rate=200.0, max_batch=3, prompt_lens=(1, 12), output_lens=(2, 10), seed=4)
    result = run_load(options, model=model)
    work = workload(options, CFG.vocab_size)
    assert [s.schedule for s in result.schedules] == list(SCHEDULES)
    assert [s.slots for s in result.schedules] == [3, 3, 1]
    for s in result.schedules:
        assert [len(t) for t in s.tokens] == [w["max_new_tokens"] for w in work]
        assert s.output_tokens == sum(w["max_new_tokens"] for w in work)
        assert s.tokens == result.schedules[0].tokens  # same workload, same tokens, whatever the schedule
        assert s.seconds > 0 and s.tokens_per_s == pytest.approx(s.output_tokens / s.seconds)
        assert 0 <= s.ttft_ms_p50 <= s.ttft_ms_p99 and 0 <= s.itl_ms_p50 <= s.itl_ms_p99
    text = format_load(result)
    assert "| continuous | 3 |" in text and "| one at a time | 1 |" in text and "x static batching's" in text
    assert all(0 < w["arrival"] for w in work[1:]) and work[0]["arrival"] == 0
    assert {w["sampling"].do_sample for w in work} == {True, False}


def test_the_command_prints_the_table_and_writes_json(tmp_path, capsys):
    path = tmp_path / "load.json"
    config = tmp_path / "tiny"
    from hf_reference import hf_model

    hf_model(seed=3, n_layer=2, n_embd=64, n_head=4).save_pretrained(config)
    assert main(["bench-serving", "--model", str(config), "--requests", "4", "--rate", "0", "--max-batch", "2",
                 "--prompt-lens", "2-6", "--output-lens", "2-4", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "4 requests (all at once)" in out and "| static | 2 |" in out
    data = json.loads(path.read_text())
    assert [s["schedule"] for s in data["schedules"]] == list(SCHEDULES) and data["options"]["rate"] is None
    assert "tokens" not in data["schedules"][0]


@pytest.mark.parametrize("options, message", [
    (LoadOptions(prompt_lens=(5, 2)), "prompt lengths must be a range"),
    (LoadOptions(requests=0), "requests and max_batch must be >= 1"),
    (LoadOptions(rate=-1.0), "rate > 0"),
    (LoadOptions(prompt_lens=(8, 40), output_lens=(8, 40)), "past the model's n_positions \\(64\\)"),
    (LoadOptions(concurrency=(4, 0)), "concurrency levels must be >= 1"),
    (LoadOptions(serve=True), "a server is loaded at concurrency levels only"),
    (LoadOptions(concurrency=(1,), serve=True, url="http://127.0.0.1:1"), "not both"),
])
def test_bad_options_are_refused_before_any_work(options, message):
    model = fastgpt2.GPT2.from_config(CFG, seed=1)
    with pytest.raises(BenchError, match=message):
        run_load(options, model=model)


def test_closed_loop_on_the_engine_and_through_fastgpt2_serve_gives_the_same_tokens(tmp_path, capsys):
    """--concurrency 1,3 --serve on a tiny checkpoint: at each level the engine in process and the server
    (started by the command, loaded over HTTP) complete every request with the Poisson schedules' tokens;
    the table names both runs and the server's ratio to the engine."""
    pytest.importorskip("fastapi", reason="the serve extra is in the test extra")
    from hf_reference import hf_model

    checkpoint = tmp_path / "tiny"
    hf_model(seed=5, n_layer=2, n_embd=64, n_head=4).save_pretrained(checkpoint)
    path = tmp_path / "load.json"
    options = LoadOptions(model=str(checkpoint), requests=7, max_batch=2, prompt_lens=(1, 9), output_lens=(2, 8), seed=2)
    assert main(["bench-serving", "--model", str(checkpoint), "--requests", "7", "--max-batch", "2", "--prompt-lens",
                 "1-9", "--output-lens", "2-8", "--seed", "2", "--concurrency", "1,3", "--serve", "--json",
                 str(path)]) == 0
    out = capsys.readouterr().out
    assert "closed loop at concurrency 1, 3" in out and "| 3 | server |" in out and "| yes |" in out
    data = json.loads(path.read_text())["schedules"]
    assert [(s["concurrency"], s["schedule"]) for s in data] == [(1, "engine"), (1, "server"), (3, "engine"),
                                                                 (3, "server")]
    assert [s["same_tokens_as_engine"] for s in data] == [None, True, None, True]
    model = fastgpt2.GPT2.from_pretrained(checkpoint)
    work = workload(options, model.config.vocab_size)
    assert all(s["output_tokens"] == sum(w["max_new_tokens"] for w in work) and s["requests_per_s"] > 0 for s in data)
    poisson = run_load(LoadOptions(**{**options.__dict__, "rate": 100.0}), model=model).schedules[0].tokens
    closed = run_load(LoadOptions(**{**options.__dict__, "concurrency": (3,)}), model=model).schedules[0]
    assert closed.schedule == "engine" and closed.tokens == poisson

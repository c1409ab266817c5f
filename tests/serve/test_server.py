"""`fastgpt2 serve` against the official `openai` client: a server started by the test on a free
loopback port (stopped by its PID), its answers equal the same request generated offline (greedy, and
seeded sampling), streamed and not; bad requests get OpenAI-style errors and the server keeps serving."""
import socket
import subprocess
import sys
import time

import pytest
import torch

import fastgpt2
from fastgpt2.runtime.tokenizer import load_tokenizer

openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is in the test extra")

NAME = "tiny-gpt2"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(checkpoint, *extra):
    """A `fastgpt2 serve` process on a free loopback port, up (its /health answers): (process, url)."""
    import urllib.request

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fastgpt2", "serve", "--model", str(checkpoint), "--port", str(port),
                             "--served-model-name", NAME, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                raise RuntimeError(f"the server did not start:\n{proc.stdout.read()}")
            time.sleep(0.3)


def _stop(proc) -> None:
    proc.terminate()  # by its PID
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def server(checkpoint):
    proc, url = _start(checkpoint, "--max-batch", "4")
    try:
        yield url
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(checkpoint):
    model = fastgpt2.GPT2.from_pretrained(checkpoint)
    tok = load_tokenizer(checkpoint)

    def run(prompt, n, **kwargs):
        ids = tok.encode(prompt).ids
        out = model.generate(torch.tensor([ids]), n, eos_token_id=model.config.eos_token_id, **kwargs)[0, len(ids):]
        return tok.decode(out.tolist()), len(out)

    return run


PROMPT = "Hello, I'm a language model,"


def test_greedy_completion_equals_offline_generation(client, offline):
    text, n = offline(PROMPT, 12)
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == text and got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == n == 12 and got.usage.prompt_tokens > 0
    assert got.model == NAME and got.object == "text_completion"


def test_streamed_completion_equals_the_whole_one(client, offline):
    text, _ = offline(PROMPT, 12)
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.choices[0].finish_reason is None
                                                                  for c in chunks[:-1])


def test_seeded_sampling_equals_offline_and_repeats(client, offline):
    text, _ = offline(PROMPT, 16, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=16, temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 40})
    first = client.completions.create(**kw).choices[0].text
    assert first == text and client.completions.create(**kw).choices[0].text == text
    other = client.completions.create(**{**kw, "seed": 8}).choices[0].text
    assert other != text


def test_token_id_prompt_and_a_stop_string(client, offline):
    got = client.completions.create(model=NAME, prompt=[5, 17, 230], max_tokens=4, temperature=0)
    assert got.usage.prompt_tokens == 3 and got.usage.completion_tokens == 4
    text, _ = offline(PROMPT, 12)
    stop = text[3:6]
    assert stop and stop in text
    got = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == text[:text.index(stop)] and got.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(max_tokens=0), "BadRequestError", "'max_tokens' must be >= 1"),
    (dict(max_tokens=200), "BadRequestError", "past this model's context of 128 positions"),
    (dict(temperature=-1), "BadRequestError", "'temperature' must be in [0, 100]"),
    (dict(top_p=1.5), "BadRequestError", "'top_p' must be in (0, 1]"),
    (dict(n=17), "BadRequestError", "'n' must be in [1, 16]"),
    (dict(model="gpt-4"), "NotFoundError", "model 'gpt-4' does not exist here"),
    (dict(prompt=[PROMPT, []]), "BadRequestError", "prompt 1 is empty"),
    (dict(prompt=[[1, 2], [3, 99999]]), "BadRequestError", "prompt 1 holds token ids outside the vocabulary"),
    (dict(prompt=[[1] * 60, [1] * 126], max_tokens=4), "BadRequestError", "prompt 1 (126 tokens) plus max_tokens (4)"),
    (dict(prompt=[PROMPT] * 20, n=16), "BadRequestError", "20 prompts x n = 16 is 320 completions"),
    (dict(prompt=[{"text": PROMPT}]), "BadRequestError", "'prompt' must be a string, a list of token ids"),
])
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client, offline, kwargs, error, words):
    args = dict(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0) | kwargs
    with pytest.raises(getattr(openai, error)) as info:
        client.completions.create(**args)
    assert words in str(info.value), str(info.value)
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text == \
        offline(PROMPT, 12)[0]


def test_malformed_json_models_health_and_chat(server):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(server + "/v1/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400 and "not valid JSON" in json.loads(info.value.read())["error"]["message"]
    with urllib.request.urlopen(server + "/v1/models", timeout=30) as r:
        assert [m["id"] for m in json.loads(r.read())["data"]] == [NAME]
    req = urllib.request.Request(server + "/v1/chat/completions", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(req, timeout=30)
    assert info.value.code == 400 and "no chat template" in json.loads(info.value.read())["error"]["message"]


def _metrics(server) -> dict:
    """The Prometheus text of /metrics as {sample name with labels: value}."""
    import urllib.request

    with urllib.request.urlopen(server + "/metrics", timeout=30) as r:
        text = r.read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    """A streaming client reads two chunks and hangs up: its request is cancelled (counted as such) and
    no request stays running; then a request succeeds."""
    import http.client
    import json
    from urllib.parse import urlparse

    before = _metrics(server).get('fastgpt2_requests_total{finish_reason="cancelled"}', 0.0)
    url = urlparse(server)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    body = {"model": NAME, "prompt": [5, 6, 7], "max_tokens": 120, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the first event
    conn.sock.shutdown(2)  # hang up mid-stream
    conn.close()
    deadline = time.monotonic() + 30
    while True:
        m = _metrics(server)
        if m.get('fastgpt2_requests_total{finish_reason="cancelled"}', 0.0) == before + 1:
            break
        assert time.monotonic() < deadline, m
        time.sleep(0.05)
    assert m["fastgpt2_requests_running"] == 0 and m["fastgpt2_requests_waiting"] == 0
    assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0).usage.completion_tokens == 4


def test_metrics_count_requests_tokens_and_latencies(server, client):
    before = _metrics(server)
    client.completions.create(model=NAME, prompt=[1, 2, 3, 4], max_tokens=5, temperature=0)
    after = _metrics(server)
    grew = lambda name: after.get(name, 0.0) - before.get(name, 0.0)
    assert grew('fastgpt2_requests_total{finish_reason="length"}') == 1
    assert grew("fastgpt2_prompt_tokens_total") == 4 and grew("fastgpt2_generation_tokens_total") == 5
    assert grew("fastgpt2_time_to_first_token_seconds_count") == 1
    assert grew("fastgpt2_inter_token_latency_seconds_count") == 4


def _open_stream(url, prompt, max_tokens):
    """A raw streaming request (http.client), its response, headers read."""
    import http.client
    import json
    from urllib.parse import urlparse

    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    body = {"model": NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def test_a_full_queue_gets_429_and_sigterm_drains_the_running_requests(checkpoint, offline):
    """One slot, one waiting place: a third request while the first runs and the second waits gets a
    429 with Retry-After, then requests succeed again. SIGTERM while a stream runs: the stream still
    ends with every token and [DONE], and the server exits."""
    import json
    import signal

    proc, url = _start(checkpoint, "--max-batch", "1", "--max-waiting", "1")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        first, r1 = _open_stream(url, [5, 6, 7], 120)
        assert r1.status == 200 and r1.readline().startswith(b"data: ")  # running
        second, r2 = _open_stream(url, [8, 9], 120)  # waits for the slot
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=NAME, prompt=PROMPT, max_tokens=4, temperature=0)
        assert info.value.response.headers["retry-after"] == "1" and "at capacity" in str(info.value)
        for conn in (first, second):
            conn.close()
        assert client.completions.create(model=NAME, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text == \
            offline(PROMPT, 12)[0]

        conn, response = _open_stream(url, PROMPT, 60)
        assert response.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        events = [line for line in response.read().decode().split("\n") if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        last = json.loads(events[-2][6:])
        assert last["choices"][0]["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 60
        # uvicorn exits by the signal it was sent once its graceful shutdown is done
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        _stop(proc)


def test_logprobs_and_echo_equal_the_models_own_log_softmax(client, checkpoint):
    """echo + logprobs (what lm-evaluation-harness's local-completions reads for loglikelihood): the
    prompt's tokens with log p(token | prefix) (None first), then the greedy completion's, each the
    log-softmax of fastgpt2's own forward over the sequence; top N listed, the greedy token the likeliest."""
    model = fastgpt2.GPT2.from_pretrained(checkpoint)
    prompt = [5, 17, 230, 44, 9]
    got = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=2, echo=True)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(prompt) + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    new = model.generate(torch.tensor([prompt]), 4, eos_token_id=model.config.eos_token_id)[0].tolist()
    ref = torch.log_softmax(model(torch.tensor([new]))[0].float(), -1)  # [T, V]
    for i in range(1, len(new)):
        assert abs(lp.token_logprobs[i] - float(ref[i - 1, new[i]])) < 1e-4, i
        assert len(lp.top_logprobs[i]) == 2
    for i in range(len(prompt), len(new)):  # greedy: the chosen token is the likeliest
        assert abs(max(lp.top_logprobs[i].values()) - lp.token_logprobs[i]) < 1e-6
    tok = load_tokenizer(checkpoint)
    assert got.choices[0].text == tok.decode(prompt) + tok.decode(new[len(prompt):])
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    plain = client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=0)
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[len(prompt):]
    # streamed: the prompt's chunk first, then the tokens'; joined, the same text, tokens, log p and offsets
    chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=4, temperature=0, logprobs=2,
                                            echo=True, stream=True))
    joined = {k: sum((getattr(c.choices[0].logprobs, k) for c in chunks if c.choices[0].logprobs), [])
              for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert joined == {k: getattr(lp, k) for k in joined}
    assert "".join(c.choices[0].text for c in chunks) == got.choices[0].text
    assert chunks[0].choices[0].text == tok.decode(prompt)


def test_several_prompts_in_one_request_each_answer_as_alone(client):
    """A batch of prompts (strings, or token-id lists as lm-evaluation-harness sends them) with n = 2:
    choice p * n + i is prompt p's i-th sample, each equal to that prompt sent alone; usage counts all."""
    prompts = [PROMPT, "The quick brown fox", "1, 2, 3,"]
    kw = dict(model=NAME, max_tokens=6, temperature=0.8, seed=5, n=2, extra_body={"return_token_ids": True})
    got = client.completions.create(prompt=prompts, **kw)
    assert [c.index for c in got.choices] == list(range(6))
    alone = [client.completions.create(prompt=p, **kw) for p in prompts]
    assert [c.text for c in got.choices] == [c.text for a in alone for c in a.choices]
    assert [c.token_ids for c in got.choices] == [c.token_ids for a in alone for c in a.choices]
    assert got.choices[0].token_ids != got.choices[1].token_ids  # a prompt's two samples differ
    assert got.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert got.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    streamed = [""] * 6
    for chunk in client.completions.create(prompt=prompts, stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == [c.text for c in got.choices]
    ids = [[5, 17, 230], [44, 9]]
    greedy = client.completions.create(model=NAME, prompt=ids, max_tokens=5, temperature=0,
                                       extra_body={"return_token_ids": True})
    for choice, prompt in zip(greedy.choices, ids):
        alone = client.completions.create(model=NAME, prompt=prompt, max_tokens=5, temperature=0,
                                          extra_body={"return_token_ids": True})
        assert choice.token_ids == alone.choices[0].token_ids and choice.text == alone.choices[0].text


def test_n_choices_equal_a_batch_generated_offline_with_the_seed(client, checkpoint):
    """n = 3 sampled choices: choice i is row i of generate() over the prompt repeated, with the same
    seed (row i samples from row_seed(seed, i)); streamed, each index's deltas join to its choice."""
    model = fastgpt2.GPT2.from_pretrained(checkpoint)
    tok = load_tokenizer(checkpoint)
    ids = tok.encode(PROMPT).ids
    rows = model.generate(torch.tensor([ids] * 3), 10, do_sample=True, temperature=0.9, seed=11,
                          eos_token_id=model.config.eos_token_id)[:, len(ids):]
    expected = [tok.decode([t for t in row.tolist() if t != model.config.eos_token_id]) for row in rows]
    kw = dict(model=NAME, prompt=PROMPT, max_tokens=10, temperature=0.9, seed=11, n=3)
    got = client.completions.create(**kw)
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert [c.text for c in got.choices] == expected and len(set(expected)) > 1
    eos = model.config.eos_token_id
    tokens = [row.tolist().index(eos) + 1 if eos in row.tolist() else len(row) for row in rows]  # EOS included
    assert got.usage.completion_tokens == sum(tokens)
    streamed = ["", "", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert streamed == expected


def test_an_api_key_is_required_when_set(checkpoint):
    proc, url = _start(checkpoint, "--api-key", "s3cret")
    try:
        without = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError, match="a valid API key is required"):
            without.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0)
        with_key = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert with_key.completions.create(model=NAME, prompt=PROMPT, max_tokens=2, temperature=0).usage.completion_tokens == 2
        import urllib.request

        with urllib.request.urlopen(url + "/health", timeout=10) as r:  # health needs no key
            assert r.status == 200
    finally:
        _stop(proc)


def test_a_failed_engine_step_answers_500_and_the_server_goes_on(checkpoint, offline, monkeypatch):
    """An engine step that raises (injected): its request gets a 500 naming the error (mid-stream: an
    OpenAI-style error event, then [DONE]), the engine's slots are empty again, and the next requests are
    served, equal to offline generation. In-process (the app under Starlette's TestClient)."""
    import json

    from fastapi.testclient import TestClient

    from fastgpt2.runtime.engine import Engine
    from fastgpt2.server import create_app

    real, calls, fail_at = Engine.step, [0], {1}

    def flaky(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] in fail_at:
            raise RuntimeError("injected fault")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "step", flaky)
    app = create_app(fastgpt2.GPT2.from_pretrained(checkpoint), load_tokenizer(checkpoint), model_name=NAME)
    body = {"model": NAME, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    with TestClient(app) as http:
        failed = http.post("/v1/completions", json=body)
        assert failed.status_code == 500, failed.text
        assert "injected fault" in failed.json()["error"]["message"] and failed.json()["error"]["type"] == "server_error"
        ok = http.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == offline(PROMPT, 12)[0]
        fail_at.add(calls[0] + 4)  # the stream's 4th step
        with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and "injected fault" in json.loads(events[-2])["error"]["message"]
        assert len(events) >= 5 and all("choices" in json.loads(e) for e in events[:-2])  # tokens came first
        ok = http.post("/v1/completions", json=body)
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == offline(PROMPT, 12)[0]
        metrics = http.get("/metrics").text
        assert 'fastgpt2_requests_total{finish_reason="error"} 2.0' in metrics
        assert "fastgpt2_requests_running 0.0" in metrics and http.get("/health").status_code == 200


def test_ignore_eos_drops_only_the_models_eos_from_the_stops():
    from fastgpt2.server import parse_completion

    body = {"prompt": [1, 2], "stop": [7]}
    assert parse_completion(body, None, 100, 64, eos=50).stop_token_ids == [7, 50]
    assert parse_completion(body | {"ignore_eos": True}, None, 100, 64, eos=50).stop_token_ids == [7]
    with pytest.raises(Exception, match="'ignore_eos' must be true or false"):
        parse_completion(body | {"ignore_eos": "yes"}, None, 100, 64, eos=50)
    with pytest.raises(Exception, match="stop strings need a tokenizer"):
        parse_completion(body | {"stop": "\n"}, None, 100, 64, eos=50)


def test_load_format_dummy_serves_a_preset_with_seeded_random_weights_and_refuses_a_path(tmp_path):
    from fastgpt2.errors import FastGPT2Error
    from fastgpt2.server import load_app

    with pytest.raises(FastGPT2Error, match="'dummy' builds a preset with random weights; '/no/such' is not one of"):
        load_app("/no/such", load_format="dummy")
    with pytest.raises(FastGPT2Error, match="unknown load format 'pt'"):
        load_app("distilgpt2", load_format="pt")
    from fastapi.testclient import TestClient

    with TestClient(load_app("distilgpt2", load_format="dummy", seed=3)) as http:
        got = http.post("/v1/completions", json={"prompt": [10, 20, 30], "max_tokens": 3, "temperature": 0,
                                                 "return_token_ids": True, "ignore_eos": True}).json()
    model = fastgpt2.GPT2.from_config(fastgpt2.GPT2Config.from_name("distilgpt2"), seed=3)
    assert got["choices"][0]["token_ids"] == model.generate(torch.tensor([[10, 20, 30]]), 3)[0, 3:].tolist()
    assert got["model"] == "distilgpt2"


def test_the_engine_loop_loads_and_runs_all_model_work_in_its_own_thread(checkpoint):
    """EngineLoop(factory): the factory (the model's load) runs in the engine's thread, as does call()'s
    work (echo's forward); a factory that raises raises from the constructor."""
    import asyncio
    import threading

    from fastgpt2.runtime.engine import Engine
    from fastgpt2.server import EngineLoop

    seen = {}

    def make():
        seen["load"] = threading.get_ident()
        return Engine(fastgpt2.GPT2.from_pretrained(checkpoint), max_batch=2)

    loop = EngineLoop(make)
    try:
        async def work():
            ident = await loop.call(threading.get_ident)
            with pytest.raises(ZeroDivisionError):
                await loop.call(lambda: 1 / 0)
            return ident
        ran = asyncio.run(work())
        assert seen["load"] == ran == loop._thread.ident != threading.get_ident()
    finally:
        loop.stop()

    def broken():
        raise OSError("no such checkpoint")

    with pytest.raises(OSError, match="no such checkpoint"):
        EngineLoop(broken)

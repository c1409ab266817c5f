"""fastgpt2.serve_ray on a local Ray instance (2 CPUs): the tiny checkpoint deployed as 2 replicas
(made by app_builder from string arguments, as `serve run` passes them), behind Ray Serve's HTTP proxy
on a free loopback port. Concurrent requests through the proxy with the official `openai` client
(greedy and seeded-sampled, streamed and not) each return the token ids of the same request generated
offline; both replicas answer (the x-fastgpt2-replica header). Serve and Ray are shut down after, and
no process they started is left. Without Ray installed, the module still imports and names the extra."""
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import fastgpt2
from fastgpt2.runtime.tokenizer import load_tokenizer

NAME = "tiny-gpt2"


def test_imports_without_ray_and_names_the_extra():
    code = ("import sys; sys.modules['ray'] = None\n"  # as if ray were not installed
            "import fastgpt2.serve_ray as m\n"
            "try:\n    m.deployment('gpt2')\nexcept ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install 'fastgpt2[ray]'" in out.stdout


def test_app_builder_checks_its_arguments():
    from fastgpt2.serve_ray import app_builder

    with pytest.raises(ValueError, match="unknown argument.*replicas"):
        app_builder({"model_dir": "gpt2", "replicas": "2"})
    with pytest.raises(ValueError, match="model_dir is required"):
        app_builder({"num_replicas": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants() -> set[int]:
    """The PIDs of this process's descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":  # (a zombie is gone, only not yet reaped)
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = set(), [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


@pytest.fixture(scope="module")
def proxy(checkpoint):
    """Ray Serve's HTTP proxy on a free loopback port, before 2 replicas of the tiny checkpoint: its URL."""
    ray = pytest.importorskip("ray", reason="Ray Serve is in the test extra (and the ray extra)")
    serve = pytest.importorskip("ray.serve", reason="Ray Serve is in the test extra (and the ray extra)")
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is in the test extra")
    from fastgpt2.serve_ray import app_builder

    check_processes = os.path.isdir("/proc")
    before = _descendants() if check_processes else set()
    port = _free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # strings, as `serve run fastgpt2.serve_ray:app_builder model_dir=... num_replicas=2` passes them
        app = app_builder({"model_dir": str(checkpoint), "num_replicas": "2", "num_cpus_per_replica": "1",
                           "served_model_name": NAME, "max_batch": "4"})
        serve.run(app, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    if check_processes:  # every process Ray started (its GCS, raylet, workers, replicas, proxy) has ended
        deadline = time.monotonic() + 30
        while (left := _descendants() - before) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"processes left after ray.shutdown(): {sorted(left)}"


@pytest.fixture(scope="module")
def offline(checkpoint):
    """The token ids the same request gets from GPT2.generate (an EOS that stopped it included, as the
    server returns it) and the finish reason it ends with."""
    model = fastgpt2.GPT2.from_pretrained(checkpoint)
    eos = model.config.eos_token_id

    def run(prompt_ids, max_tokens, **kwargs):
        out = model.generate(torch.tensor([prompt_ids]), max_tokens, eos_token_id=eos, **kwargs)[0, len(prompt_ids):]
        out = out.tolist()
        if out and out[-1] == eos:
            return out, "stop"
        return out, "length"

    return run


def _requests(tokenizer):
    """16 requests: text and token-id prompts, greedy and seeded-sampled, every other one streamed."""
    texts = ["Hello, I'm a language model,", "The quick brown fox", "Ray Serve", "a b c d e f"]
    out = []
    for i in range(16):
        prompt = texts[i % 4] if i < 8 else [(37 * i + 11 * k) % 990 + 1 for k in range(1 + i % 5)]
        sampled = i % 4 >= 2
        body = dict(prompt=prompt, max_tokens=6 + i, stream=i % 2 == 1, seed=100 + i if sampled else None,
                    temperature=0.9 if sampled else 0, top_p=0.95 if sampled else 1,
                    top_k=40 if sampled else -1)
        ids = tokenizer.encode(prompt).ids if isinstance(prompt, str) else prompt
        out.append((body, ids))
    return out


def _ask(client, body):
    """(token ids, finish_reason, replica) of one request through the proxy, streamed or not."""
    kw = dict(model=NAME, prompt=body["prompt"], max_tokens=body["max_tokens"], temperature=body["temperature"],
              top_p=body["top_p"], seed=body["seed"], stream=body["stream"],
              extra_body={"top_k": body["top_k"], "return_token_ids": True})
    raw = client.completions.with_raw_response.create(**kw)
    replica = raw.headers.get("x-fastgpt2-replica")
    if not body["stream"]:
        choice = raw.parse().choices[0]
        return choice.model_extra["token_ids"], choice.finish_reason, replica
    ids, reason = [], None
    for chunk in raw.parse():
        choice = chunk.choices[0]
        ids += choice.model_extra["token_ids"]
        reason = choice.finish_reason or reason
    return ids, reason, replica


def test_two_replicas_through_the_proxy_answer_as_offline_generation(proxy, checkpoint, offline):
    openai = pytest.importorskip("openai", reason="the openai client is in the test extra")
    from ray import serve

    status = serve.status().applications["default"].deployments["fastgpt2"]
    assert status.replica_states == {"RUNNING": 2}, status
    client = openai.OpenAI(base_url=proxy + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [NAME]

    requests = _requests(load_tokenizer(checkpoint))
    with ThreadPoolExecutor(len(requests)) as pool:  # all at once: the proxy spreads them over the replicas
        answers = list(pool.map(lambda r: _ask(client, r[0]), requests))
    replicas = set()
    for (body, ids), (got, reason, replica) in zip(requests, answers):
        sampling = dict(do_sample=True, temperature=body["temperature"], top_p=body["top_p"], top_k=body["top_k"],
                        seed=body["seed"]) if body["seed"] is not None else {}
        want, want_reason = offline(ids, body["max_tokens"], **sampling)
        assert (got, reason) == (want, want_reason), body
        replicas.add(replica)
    assert None not in replicas

    # both replicas serve: concurrent requests are spread by the proxy's router (a few more rounds,
    # should the 16 above have all landed on one)
    for _ in range(5):
        if len(replicas) >= 2:
            break
        with ThreadPoolExecutor(8) as pool:
            replicas |= set(pool.map(lambda _: _ask(client, {**requests[0][0], "stream": False})[2], range(8)))
    assert len(replicas) == 2, replicas

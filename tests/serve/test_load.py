"""A bounded loopback load test of `fastgpt2 serve`: 1,000 requests from 64 concurrent streaming
clients, mixed greedy / seeded-sampled, ragged prompt and output lengths. Every request completes and
its tokens equal the same request run offline on an engine of its own, alone."""
import asyncio
import json
import random

import httpx
from test_server import NAME, _start, _stop

import fastgpt2
from fastgpt2.runtime.engine import Engine
from fastgpt2.runtime.sampling import Sampling

REQUESTS, CLIENTS = 1000, 64


def _workload(seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(REQUESTS):
        prompt = [rng.randrange(1, 990) for _ in range(rng.randint(1, 24))]
        sampled = i % 2 == 1
        out.append({"prompt": prompt, "max_tokens": rng.randint(1, 24), "temperature": 0.8 if sampled else 0,
                    "top_k": 50 if sampled else -1, "seed": 1000 + i})
    return out


async def _play(url, workload):
    """Each request streamed (64 at a time); returns each one's generated token ids, by index."""
    results = [None] * len(workload)
    limit = asyncio.Semaphore(CLIENTS)

    async def one(i, client):
        body = {"model": NAME, "stream": True, "return_token_ids": True, **workload[i]}
        async with limit:
            ids, reason, usage = [], None, None
            async with client.stream("POST", url + "/v1/completions", json=body) as response:
                assert response.status_code == 200, await response.aread()
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    choice = chunk["choices"][0]
                    ids += choice["token_ids"]
                    reason = choice["finish_reason"] or reason
                    usage = chunk.get("usage") or usage
            results[i] = (ids, reason, usage["completion_tokens"])

    # a connection per request (no keep-alive: no race with the server closing an idle one)
    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=0)) as client:
        await asyncio.gather(*(one(i, client) for i in range(len(workload))))
    return results


def test_a_thousand_streamed_requests_from_64_clients_each_equal_it_alone(checkpoint):
    workload = _workload()
    proc, url = _start(checkpoint, "--max-batch", "8", "--max-waiting", "1024")
    try:
        served = asyncio.run(_play(url, workload))
    finally:
        _stop(proc)
    model = fastgpt2.GPT2.from_pretrained(checkpoint)
    eos = model.config.eos_token_id
    for i, (spec, (ids, reason, count)) in enumerate(zip(workload, served)):
        engine = Engine(model, max_batch=1)  # alone
        sampling = Sampling(True, 0.8, 50) if spec["temperature"] else Sampling()
        request = engine.add(spec["prompt"], spec["max_tokens"], sampling, spec["seed"], [eos])
        while engine.busy:
            engine.step()
        assert (ids, reason, count) == (request.tokens, request.finish_reason, len(request.tokens)), (i, spec)
    assert sum(len(ids) for ids, _, _ in served) > 5000

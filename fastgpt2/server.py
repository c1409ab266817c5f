"""`fastgpt2 serve`: an OpenAI-compatible completions server on the engine (FastAPI + uvicorn, the
`serve` extra).

One background thread steps the engine (runtime/engine.py) while it has work; HTTP handlers never
step it: they add a request and await its tokens, which the thread hands to the handler's event loop.
A client that disconnects mid-stream cancels its request (its slot is free for the next step).

Endpoints (OpenAI's shapes): POST /v1/completions (prompt as text or token ids; max_tokens, temperature
(0: greedy), top_p, top_k (extension), seed, stop (strings or token ids), stream (server-sent events,
ending `data: [DONE]`), usage), GET /v1/models, GET /health, GET /metrics (Prometheus text: requests
by finish reason, prompt and generated tokens, running and waiting requests, time-to-first-token and
inter-token latency histograms). Errors are OpenAI-style JSON ({"error": {"message", "type", "param",
"code"}}) naming the problem. `logprobs` (top N, up to 20) and `echo` (the prompt's own log-probabilities,
from one forward over it: what lm-evaluation-harness's local-completions reads for loglikelihood) are
served without `stream`; `return_token_ids` (an extension, as vLLM's) adds each choice's (or chunk's)
generated token ids, the stop token excepted; `n` choices (up to 16: n requests of the engine, choice i sampling from
row_seed(seed, i) as generate's rows), streamed or not. Not built yet (a 400 that says so): logprobs or
echo with stream; /v1/chat/completions answers that GPT-2 has no chat template.

    app = create_app(model, tokenizer, model_name="gpt2", max_batch=8)   # a FastAPI app
"""

import asyncio
import contextlib
import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from .errors import FastGPT2Error
from .runtime.engine import Engine, Request
from .runtime.generate import row_seed
from .runtime.sampling import Sampling
from .runtime.tokenizer import StreamDecoder


class ServerError(FastGPT2Error):
    """A request the server answers with an OpenAI-style error."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


class EngineLoop:
    """The engine, stepped by one background thread while it has work. ``submit`` (from an event loop)
    adds a request and returns an asyncio.Queue that receives (token, finish_reason or None) per step."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fastgpt2-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], max_new_tokens: int, sampling: Sampling, seed: int | None,
               stop_token_ids: list[int], logprobs: int | None = None) -> tuple[Request, asyncio.Queue]:
        queue: asyncio.Queue = asyncio.Queue()
        with self.engine.lock:
            request = self.engine.add(prompt, max_new_tokens, sampling, seed, stop_token_ids, logprobs)
            self._listeners[request.id] = (asyncio.get_running_loop(), queue)
        self._wake.set()
        return request, queue

    def cancel(self, request: Request) -> None:
        with self.engine.lock:
            self.engine.cancel(request)
            self._listeners.pop(request.id, None)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped:
            if not self.engine.busy:
                self._wake.wait()
                self._wake.clear()
                continue
            with self.engine.lock:
                out = self.engine.step()
                delivered = []
                for request, token in out:
                    listener = self._listeners.get(request.id)
                    if listener is not None:
                        delivered.append((listener, token, request.finish_reason))
                    if request.finished:
                        self._listeners.pop(request.id, None)
            for (loop, queue), token, reason in delivered:
                loop.call_soon_threadsafe(queue.put_nowait, (token, reason))


@dataclass
class CompletionParams:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    seed: int | None
    stop_strings: list[str]
    stop_token_ids: list[int]
    stream: bool
    logprobs: int | None = None
    echo: bool = False
    n: int = 1
    return_token_ids: bool = False


_KNOWN = {"return_token_ids", "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n",
          "logprobs", "echo", "user", "stream_options", "frequency_penalty", "presence_penalty", "best_of",
          "logit_bias", "suffix"}


def _number(body: dict, name: str, default, kind=(int, float)):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ServerError(f"'{name}' must be a {'number' if kind == (int, float) else 'integer'}, got {value!r}",
                          param=name)
    return value


def parse_completion(body: Any, tokenizer, vocab_size: int, n_positions: int, eos: int | None) -> CompletionParams:
    """The request body of /v1/completions, checked: a ServerError (400) names any problem."""
    if not isinstance(body, dict):
        raise ServerError("the request body must be a JSON object")
    unknown = sorted(set(body) - _KNOWN)
    if unknown:
        raise ServerError(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0])
    for name, ok in (("best_of", lambda v: v in (None, 1, body.get("n", 1))),
                     ("suffix", lambda v: v is None), ("logit_bias", lambda v: not v),
                     ("frequency_penalty", lambda v: v in (None, 0)), ("presence_penalty", lambda v: v in (None, 0))):
        if not ok(body.get(name)):
            raise ServerError(f"'{name}' = {body.get(name)!r} is not supported by this server yet", param=name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ServerError("this server has no tokenizer (the checkpoint has no tokenizer files): send the prompt "
                              "as a list of token ids", param="prompt")
        ids = tokenizer.encode(prompt).ids
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids = list(prompt)
    else:
        raise ServerError("'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")
    if not ids:
        raise ServerError("'prompt' is empty: give at least one token", param="prompt")
    if any(not 0 <= t < vocab_size for t in ids):
        raise ServerError(f"'prompt' holds token ids outside the vocabulary [0, {vocab_size})", param="prompt")
    max_tokens = _number(body, "max_tokens", 16, int)
    if max_tokens < 1:
        raise ServerError(f"'max_tokens' must be >= 1, got {max_tokens}", param="max_tokens")
    if len(ids) + max_tokens > n_positions:
        raise ServerError(f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is {len(ids) + max_tokens}, "
                          f"past this model's context of {n_positions} positions", param="max_tokens")
    temperature = _number(body, "temperature", 1.0)
    top_p = _number(body, "top_p", 1.0)
    top_k = _number(body, "top_k", -1, int)
    if not 0 <= temperature <= 100:
        raise ServerError(f"'temperature' must be in [0, 100], got {temperature}", param="temperature")
    if not 0 < top_p <= 1:
        raise ServerError(f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    if top_k == 0 or top_k < -1:
        raise ServerError(f"'top_k' must be >= 1 (or -1: off), got {top_k}", param="top_k")
    if temperature == 0:  # greedy (OpenAI's convention); top_p / top_k then change nothing
        sampling = Sampling()
    else:
        sampling = Sampling(True, float(temperature), None if top_k == -1 else top_k, None if top_p == 1 else top_p)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ServerError(f"'seed' must be an integer, got {seed!r}", param="seed")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, (str, int)) and not isinstance(stop, bool) else stop
    if not isinstance(stop, list) or not all((isinstance(s, str) and s) or (isinstance(s, int) and not isinstance(
            s, bool) and 0 <= s < vocab_size) for s in stop) or len(stop) > 16:
        raise ServerError("'stop' must be up to 16 non-empty strings or token ids", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ServerError(f"'stream' must be true or false, got {stream!r}", param="stream")
    logprobs = body.get("logprobs")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or not 0 <= logprobs <= 20):
        raise ServerError(f"'logprobs' must be an integer in [0, 20], got {logprobs!r}", param="logprobs")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise ServerError(f"'echo' must be true or false, got {echo!r}", param="echo")
    if stream and (logprobs is not None or echo):
        raise ServerError("'logprobs' and 'echo' with 'stream' are not supported by this server yet", param="stream")
    return_token_ids = body.get("return_token_ids", False)
    if not isinstance(return_token_ids, bool):
        raise ServerError(f"'return_token_ids' must be true or false, got {return_token_ids!r}", param="return_token_ids")
    n = _number(body, "n", 1, int)
    if not 1 <= n <= 16:
        raise ServerError(f"'n' must be in [1, 16], got {n}", param="n")
    stop_ids = [s for s in stop if isinstance(s, int)] + ([eos] if eos is not None else [])
    return CompletionParams(ids, max_tokens, sampling, seed, [s for s in stop if isinstance(s, str)], stop_ids, stream,
                            logprobs, echo, n, return_token_ids)


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token]) if tokenizer is not None else f"token_id:{token}"


def logprobs_block(tokens, token_logprobs, top_logprobs, tokenizer, start: int) -> dict:
    """OpenAI's completion logprobs for `tokens`: their strings, log-probabilities (None: the prompt's
    first token), top alternatives as {string: log p} and text offsets counted from `start`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = start
    for token, lp, top in zip(tokens, token_logprobs, top_logprobs):
        text = _token_text(tokenizer, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else {_token_text(tokenizer, t): v for t, v in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def prompt_logprobs(model, prompt: list[int], top: int) -> tuple[list, list]:
    """log p(prompt[i] | prompt[:i]) for every prompt token (None for the first) and the top `top`
    tokens at each position, from one forward over the prompt (float32 log-softmax)."""
    import torch

    with torch.inference_mode():
        lp = torch.log_softmax(model(torch.tensor([prompt], device=model.device))[0].float(), -1)  # [T, V]
    ids = torch.tensor(prompt[1:], device=lp.device)
    token_lp = [None] + lp[:-1].gather(1, ids[:, None])[:, 0].tolist()
    tops = [None]
    if len(prompt) > 1:
        values, indices = torch.topk(lp[:-1], top, -1) if top else (None, None)
        for i in range(len(prompt) - 1):
            tops.append(list(zip(indices[i].tolist(), values[i].tolist())) if top else [])
    return token_lp, tops


def _error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
                code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def load_app(model_dir: str, *, device: str | None = None, dtype: str | None = None, backend: str = "auto",
             served_model_name: str | None = None, max_batch: int = 8, api_key: str | None = None,
             max_waiting: int = 256, log=None):
    """`fastgpt2 serve`'s app: the checkpoint at `model_dir` (a directory or a Hub id) loaded with its
    tokenizer (none: token-id prompts only, said through `log`) and served under `served_model_name`
    (default: the path's last part). The one place the CLI and the Ray Serve deployment build it."""
    from .runtime.generate import GPT2  # lazy: the model's modules load with the app
    from .runtime.tokenizer import TokenizerError, load_tokenizer

    model = GPT2.from_pretrained(model_dir, device=device, dtype=dtype, backend=backend)
    try:
        tokenizer = load_tokenizer(model.source_dir)
    except TokenizerError as exc:
        if log is not None:
            log(f"{exc} Serving token-id prompts only.")
        tokenizer = None
    name = served_model_name or str(model_dir).rstrip("/").split("/")[-1]
    return create_app(model, tokenizer, model_name=name, max_batch=max_batch, api_key=api_key, max_waiting=max_waiting)


def create_app(model, tokenizer=None, model_name: str = "gpt2", max_batch: int = 8, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, max_waiting: int = 256):
    """The FastAPI app serving `model` (a GPT2) under `model_name`, with its own engine of `max_batch`
    slots stepped by one background thread (started on the first request, stopped at the app's
    shutdown). A request that finds `max_waiting` requests already waiting for a slot gets a 429 with
    Retry-After."""
    # lazy: the serve extra (FastAPI, Starlette) is needed by the server only, never by the runtime
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    cfg = model.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None and 0 <= cfg.eos_token_id < cfg.vocab_size else None
    loop_holder: dict[str, EngineLoop] = {}
    ids = itertools.count()

    def engine_loop() -> EngineLoop:
        if "loop" not in loop_holder:
            loop_holder["loop"] = EngineLoop(Engine(model, max_batch=max_batch))
        return loop_holder["loop"]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        if "loop" in loop_holder:  # shutdown: the engine's thread ends
            loop_holder["loop"].stop()

    app = FastAPI(title="fastgpt2", docs_url=None, redoc_url=None, lifespan=lifespan)
    registry = CollectorRegistry()  # this app's own metrics
    finished = Counter("fastgpt2_requests", "Completion requests finished, by finish reason", ["finish_reason"],
                       registry=registry)
    prompt_tokens = Counter("fastgpt2_prompt_tokens", "Prompt tokens of admitted requests", registry=registry)
    generated = Counter("fastgpt2_generation_tokens", "Tokens generated", registry=registry)
    Gauge("fastgpt2_requests_running", "Requests decoding in the engine's slots", registry=registry).set_function(
        lambda: len(loop_holder["loop"].engine.running) if "loop" in loop_holder else 0)
    Gauge("fastgpt2_requests_waiting", "Requests waiting for a slot", registry=registry).set_function(
        lambda: len(loop_holder["loop"].engine.queue) if "loop" in loop_holder else 0)
    latency_buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
    ttft = Histogram("fastgpt2_time_to_first_token_seconds", "Time from a request's arrival to its first token",
                     buckets=latency_buckets, registry=registry)
    itl = Histogram("fastgpt2_inter_token_latency_seconds", "Time between a request's consecutive tokens",
                    buckets=latency_buckets, registry=registry)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def error(exc: ServerError) -> JSONResponse:
        return JSONResponse(_error_body(str(exc), exc.kind, exc.param), status_code=exc.status)

    @app.middleware("http")
    async def _checks(request: HTTPRequest, call_next):
        if api_key is not None and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization") != f"Bearer {api_key}":
                return JSONResponse(_error_body("a valid API key is required (Authorization: Bearer KEY)",
                                                "authentication_error", code="invalid_api_key"), status_code=401)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            return JSONResponse(_error_body(f"the request body ({length} bytes) is larger than this server's "
                                            f"limit of {max_body_bytes} bytes"), status_code=413)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "fastgpt2",
                                            "max_model_len": cfg.n_positions}]}

    @app.post("/v1/chat/completions")
    def chat() -> JSONResponse:
        return JSONResponse(_error_body(f"{model_name} has no chat template: GPT-2 is a plain language model; use "
                                        "/v1/completions", param="messages"), status_code=400)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        try:
            body = json.loads(await http.body())
        except ValueError as exc:
            return error(ServerError(f"the request body is not valid JSON ({exc})"))
        try:
            if isinstance(body, dict) and body.get("model") not in (None, model_name):
                raise ServerError(f"model {body.get('model')!r} does not exist here; this server serves "
                                  f"{model_name!r}", status=404, param="model", kind="not_found_error")
            params = parse_completion(body, tokenizer, cfg.vocab_size, cfg.n_positions, eos)
        except ServerError as exc:
            return error(exc)
        worker = engine_loop()
        if len(worker.engine.queue) >= max_waiting:
            return JSONResponse(_error_body(f"the server is at capacity ({max_batch} requests running, {max_waiting} "
                                            f"waiting); retry shortly", "rate_limit_error", code="queue_full"),
                                status_code=429, headers={"Retry-After": "1"})
        arrived = time.monotonic()
        completion_id = f"cmpl-{next(ids)}-{int(time.time() * 1000)}"
        created = int(time.time())
        # n choices: n requests of the engine; choice i samples from row_seed(seed, i) (as generate's rows)
        submitted = [worker.submit(params.prompt, params.max_tokens, params.sampling,
                                   None if params.seed is None else row_seed(params.seed, i), params.stop_token_ids,
                                   params.logprobs) for i in range(params.n)]
        prompt_tokens.inc(len(params.prompt))

        async def pieces(request, queue):
            """(text delta, finish_reason or None, tokens so far, the token ids since the last delta) per new
            token of one request; stop strings end the text before them."""
            decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
            text, sent, count, last, outcome, fresh = "", 0, 0, arrived, "cancelled", []
            try:
                while True:
                    token, reason = await queue.get()
                    now = time.monotonic()
                    (itl if count else ttft).observe(now - last)
                    last = now
                    count += 1
                    generated.inc()
                    if reason == "stop" and token in params.stop_token_ids:
                        piece = ""  # the stop token is not part of the text (OpenAI's stop)
                    else:
                        piece = decoder.push(token) if decoder is not None else ""
                        fresh.append(token)
                    text += piece
                    hit = min((i for i in (text.find(s, max(0, sent - len(s))) for s in params.stop_strings)
                               if i >= 0), default=-1)
                    if hit >= 0:
                        worker.cancel(request)
                        outcome = "stop"
                        yield text[sent:hit], "stop", count, fresh
                        return
                    if reason is not None:
                        tail = decoder.flush() if decoder is not None and reason != "stop" else ""
                        text += tail
                        outcome = reason
                        yield text[sent:], reason, count, fresh
                        return
                    if params.stop_strings:  # hold back what could be the start of a stop string
                        keep = max(len(s) - 1 for s in params.stop_strings)
                        safe = max(sent, len(text) - keep)
                    else:
                        safe = len(text)
                    yield text[sent:safe], None, count, fresh
                    sent, fresh = safe, []
            finally:
                if not request.finished:
                    worker.cancel(request)  # the client went away: its slot is free for the next step
                finished.labels(outcome).inc()

        usage = lambda n: {"prompt_tokens": len(params.prompt), "completion_tokens": n,
                           "total_tokens": len(params.prompt) + n}
        base = {"id": completion_id, "object": "text_completion", "created": created, "model": model_name}

        async def choice(index, request, queue):
            """One whole choice (the non-streamed answer) and its token count."""
            text, reason, n, token_ids = "", None, 0, []
            async for piece, reason, n, fresh in pieces(request, queue):
                text += piece
                token_ids += fresh
            logprobs = None
            prompt_text = tokenizer.decode(params.prompt) if params.echo and tokenizer is not None else ""
            if params.logprobs is not None:
                # the completion's tokens that made its text (not a stop token, nothing after a stop string)
                kept, length = 0, 0
                for token in request.tokens:
                    if length >= len(text) or token in params.stop_token_ids:
                        break
                    length += len(_token_text(tokenizer, token))
                    kept += 1
                tokens, lps, tops = request.tokens[:kept], request.token_logprobs[:kept], request.top_logprobs[:kept]
                if params.echo:
                    with worker.engine.lock:  # one forward over the prompt, between two engine steps
                        p_lps, p_tops = prompt_logprobs(model, params.prompt, params.logprobs)
                    tokens, lps, tops = params.prompt + tokens, p_lps + lps, p_tops + tops
                logprobs = logprobs_block(tokens, lps, tops, tokenizer, 0)
            out = {"text": prompt_text + text, "index": index, "logprobs": logprobs, "finish_reason": reason}
            if params.return_token_ids:
                out["token_ids"] = token_ids
            return out, n

        if not params.stream:
            try:
                done = await asyncio.gather(*(choice(i, r, q) for i, (r, q) in enumerate(submitted)))
            finally:
                for request, _ in submitted:
                    worker.cancel(request)  # (finished ones: nothing to do)
            return {**base, "choices": [c for c, _ in done], "usage": usage(sum(n for _, n in done))}

        async def events():
            merged: asyncio.Queue = asyncio.Queue()  # (index, piece, reason, count) from every choice

            async def feed(index, request, queue):
                async for piece, reason, n, fresh in pieces(request, queue):
                    await merged.put((index, piece, reason, n, fresh))

            feeders = [asyncio.create_task(feed(i, r, q)) for i, (r, q) in enumerate(submitted)]
            counts, open_choices = [0] * params.n, params.n
            try:
                while open_choices:
                    index, piece, reason, n, fresh = await merged.get()
                    counts[index] = n
                    open_choices -= reason is not None
                    if piece or fresh or reason is not None:
                        chunk = {**base, "choices": [{"text": piece, "index": index, "logprobs": None,
                                                      "finish_reason": reason}]}
                        if params.return_token_ids:
                            chunk["choices"][0]["token_ids"] = fresh
                        if not open_choices:
                            chunk["usage"] = usage(sum(counts))
                        yield f"data: {json.dumps(chunk)}\n\n"
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or all done): every choice's request leaves the engine
                for task in feeders:
                    task.cancel()
                await asyncio.gather(*feeders, return_exceptions=True)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app

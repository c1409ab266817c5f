"""`fastgpt2 serve`: an OpenAI-compatible completions server on the engine (FastAPI + uvicorn, the
`serve` extra).

One background thread steps the engine (runtime/engine.py) while it has work; HTTP handlers never
step it: they add a request and await its tokens, which the thread hands to the handler's event loop.
A client that disconnects mid-stream cancels its request (its slot is free for the next step).

Endpoints (OpenAI's shapes): POST /v1/completions (prompt as text, token ids, or a list of either; max_tokens,
temperature (0: greedy), top_p, top_k (extension), seed, stop (strings or token ids), n, stream (server-sent
events, ending `data: [DONE]`), logprobs (the top N, up to 20, per token), echo (the prompt and, with logprobs,
its own log-probabilities from one forward over it: what lm-evaluation-harness's local-completions reads for
loglikelihood), usage), GET /v1/models, GET /health, GET /metrics (Prometheus text: requests by finish reason,
prompt and generated tokens, running and waiting requests, time-to-first-token and inter-token latency
histograms). Errors are OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}) naming the problem.
Choice p * n + i is prompt p's i-th sample, sampling from row_seed(seed, i) as generate's rows do (each prompt
samples as it would alone). `ignore_eos` (vLLM's extension: the model's EOS does not stop; for
benchmarks) and `return_token_ids` (an extension, as vLLM's) adds each choice's (or chunk's)
generated token ids. A stop token (the model's EOS, or a stop id) ends the text without appearing in it,
but is a generated token: it is in the token ids and in `logprobs` (as vLLM; lm-evaluation-harness's
loglikelihood reads the prompt's log-probabilities up to the last, generated, entry). A failed engine step answers its requests with a 500 (an error
event mid-stream) and the loop goes on. /v1/chat/completions answers that GPT-2 has no chat template.

    app = create_app(model, tokenizer, model_name="gpt2", max_batch=8)   # a FastAPI app
"""

import asyncio
import contextlib
import itertools
import json
import threading
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from .errors import FastGPT2Error
from .runtime.engine import Engine, Request
from .runtime.generate import row_seed
from .runtime.sampling import Sampling
from .runtime.tokenizer import StreamDecoder

log = logging.getLogger("fastgpt2.serve")


class ServerError(FastGPT2Error):
    """A request the server answers with an OpenAI-style error."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind


class EngineLoop:
    """The engine, stepped by one background thread while it has work. ``submit`` (from an event loop)
    adds a request and returns an asyncio.Queue that receives (token, finish_reason or None) per step,
    or (None, message) when a step failed: the step's requests end, and the loop goes on with new ones.
    ``call(fn)`` runs other model work (echo's forward over a prompt) in the same thread, between steps.

    `engine`: an Engine, or a function that makes one (loading its model), which the thread calls
    first (the constructor waits for it and raises what it raised). Made there, every torch op of the
    server runs in that one thread: on the CPU, a model loaded by one thread and stepped by another
    decodes slower (measured: 160 vs 208 tok/s at batch 8, gpt2 float32, 2 cores: each thread that
    runs torch's parallel ops keeps its own OpenMP thread team)."""

    def __init__(self, engine: Engine | Callable[[], Engine]):
        self.engine: Engine | None = engine if isinstance(engine, Engine) else None
        self._wake = threading.Event()
        self._listeners: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._calls: list[tuple[Callable[[], Any], asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._calls_lock = threading.Lock()
        self._stopped = False
        made: dict[str, Any] = {}
        ready = threading.Event()

        def run() -> None:
            if self.engine is None:
                try:
                    self.engine = engine()
                except BaseException as exc:  # the constructor raises it
                    made["error"] = exc
                    return
                finally:
                    ready.set()
            self._run()

        self._thread = threading.Thread(target=run, name="fastgpt2-engine", daemon=True)
        self._thread.start()
        if not isinstance(engine, Engine):
            ready.wait()
            if "error" in made:
                raise made["error"]

    def call(self, fn: Callable[[], Any]) -> asyncio.Future:
        """fn() run by the engine's thread between two steps; its result (or exception) in the future."""
        future = asyncio.get_running_loop().create_future()
        with self._calls_lock:
            self._calls.append((fn, asyncio.get_running_loop(), future))
        self._wake.set()
        return future

    def _run_calls(self) -> None:
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for fn, loop, future in calls:
            try:
                result, error = fn(), None
            except Exception as exc:
                result, error = None, exc
            settle = (lambda f=future, e=error: f.done() or f.set_exception(e)) if error is not None else (
                lambda f=future, r=result: f.done() or f.set_result(r))
            loop.call_soon_threadsafe(settle)

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

    @property
    def alive(self) -> bool:
        """Whether the engine's thread is running (it ends only at stop())."""
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stopped:
            if self._calls:
                self._run_calls()
            if not self.engine.busy:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                with self.engine.lock:
                    out = self.engine.step()
                    delivered = []
                    for request, token in out:
                        listener = self._listeners.get(request.id)
                        if listener is not None:
                            delivered.append((listener, (token, request.finish_reason)))
                        if request.finished:
                            self._listeners.pop(request.id, None)
            except Exception as exc:  # a failed step fails its requests, not the server
                log.exception("an engine step failed; its running and waiting requests are answered with an error")
                delivered = self._fail_all(f"{type(exc).__name__}: {exc}")
            for (loop, queue), item in delivered:
                loop.call_soon_threadsafe(queue.put_nowait, item)

    def _fail_all(self, message: str) -> list:
        """After a failed step: every running and waiting request leaves the engine (their slots empty
        again) and each listener gets (None, message)."""
        with self.engine.lock:
            for request in self.engine.running + list(self.engine.queue):
                self.engine.cancel(request)
            delivered = [(listener, (None, message)) for listener in self._listeners.values()]
            self._listeners.clear()
        return delivered


MAX_COMPLETIONS = 256  # prompts x n in one request


def _prompts(prompt, tokenizer, vocab_size: int) -> list[list[int]]:
    """The request's prompts as token ids: a string, a list of token ids, or a list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt or not all(
            isinstance(p, str) or (isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p))
            for p in prompt):
        raise ServerError("'prompt' must be a string, a list of token ids, or a list of strings or of token-id lists",
                          param="prompt")
    out = []
    for i, p in enumerate(prompt):
        which = f"prompt {i}" if len(prompt) > 1 else "'prompt'"
        if isinstance(p, str):
            if tokenizer is None:
                raise ServerError("this server has no tokenizer (the checkpoint has no tokenizer files): send prompts "
                                  "as lists of token ids", param="prompt")
            p = tokenizer.encode(p).ids
        if not p:
            raise ServerError(f"{which} is empty: give at least one token", param="prompt")
        if any(not 0 <= t < vocab_size for t in p):
            raise ServerError(f"{which} holds token ids outside the vocabulary [0, {vocab_size})", param="prompt")
        out.append(list(p))
    return out


@dataclass
class CompletionParams:
    prompts: list[list[int]]
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


_KNOWN = {"return_token_ids", "ignore_eos", "model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream", "n",
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
    prompts = _prompts(body.get("prompt"), tokenizer, vocab_size)
    max_tokens = _number(body, "max_tokens", 16, int)
    if max_tokens < 1:
        raise ServerError(f"'max_tokens' must be >= 1, got {max_tokens}", param="max_tokens")
    for i, ids in enumerate(prompts):
        if len(ids) + max_tokens > n_positions:
            which = f"prompt {i}" if len(prompts) > 1 else "the prompt"
            raise ServerError(f"{which} ({len(ids)} tokens) plus max_tokens ({max_tokens}) is {len(ids) + max_tokens}, "
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
    return_token_ids = body.get("return_token_ids", False)
    if not isinstance(return_token_ids, bool):
        raise ServerError(f"'return_token_ids' must be true or false, got {return_token_ids!r}", param="return_token_ids")
    n = _number(body, "n", 1, int)
    if not 1 <= n <= 16:
        raise ServerError(f"'n' must be in [1, 16], got {n}", param="n")
    if len(prompts) * n > MAX_COMPLETIONS:
        raise ServerError(f"{len(prompts)} prompts x n = {n} is {len(prompts) * n} completions, more than this "
                          f"server's {MAX_COMPLETIONS} per request: split the request", param="prompt")
    if tokenizer is None and any(isinstance(s, str) for s in stop):
        raise ServerError("stop strings need a tokenizer, and this server has none (the checkpoint has no tokenizer "
                          "files): give stop token ids", param="stop")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ServerError(f"'ignore_eos' must be true or false, got {ignore_eos!r}", param="ignore_eos")
    stop_ids = [s for s in stop if isinstance(s, int)] + ([eos] if eos is not None and not ignore_eos else [])
    return CompletionParams(prompts, max_tokens, sampling, seed, [s for s in stop if isinstance(s, str)], stop_ids, stream,
                            logprobs, echo, n, return_token_ids)


@dataclass
class Piece:
    """What one new token of a completion adds: its text (possibly none yet), the finish reason (on the
    last piece), the tokens generated so far, and the tokens this piece releases with their log p and
    top alternatives (None without logprobs)."""
    text: str
    reason: str | None
    count: int
    token_ids: list[int]
    logprobs: list
    tops: list


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
             max_waiting: int = 256, load_format: str = "auto", seed: int = 0, log=None):
    """`fastgpt2 serve`'s app: the checkpoint at `model_dir` (a directory or a Hub id) loaded with its
    tokenizer (none: token-id prompts only, said through `log`) and served under `served_model_name`
    (default: the path's last part). load_format "dummy" (vLLM's name): `model_dir` is a preset
    (gpt2, ..., gpt2-xl) built with seeded random weights (`seed`, as `fastgpt2 bench`), no tokenizer: for
    benchmarks. The model is loaded by the engine's thread (see EngineLoop), which starts here. The one
    place the CLI and the Ray Serve deployment build the app."""
    # lazy: the model's modules load with the app, not with the server module
    from .runtime.config import PRESETS, GPT2Config
    from .runtime.generate import GPT2  # lazy: as above
    from .runtime.tokenizer import TokenizerError, load_tokenizer  # lazy: as above

    if load_format not in ("auto", "dummy"):
        raise FastGPT2Error(f"unknown load format {load_format!r}: 'auto' (a checkpoint) or 'dummy' (a preset, random "
                            "weights)")
    if load_format == "dummy" and model_dir not in PRESETS:
        raise FastGPT2Error(f"load format 'dummy' builds a preset with random weights; {model_dir!r} is not one of "
                            f"{sorted(PRESETS)}")

    def make_engine() -> Engine:  # in the engine's thread, which then does all of the server's model work
        if load_format == "dummy":
            model = GPT2.from_config(GPT2Config.from_name(model_dir), device=device, dtype=dtype, backend=backend,
                                     seed=seed)
        else:
            model = GPT2.from_pretrained(model_dir, device=device, dtype=dtype, backend=backend)
        return Engine(model, max_batch=max_batch)

    loop = EngineLoop(make_engine)
    model, tokenizer = loop.engine.model, None
    if load_format == "auto":
        try:
            tokenizer = load_tokenizer(model.source_dir)
        except TokenizerError as exc:
            if log is not None:
                log(f"{exc} Serving token-id prompts only.")
    name = served_model_name or str(model_dir).rstrip("/").split("/")[-1]
    return create_app(model, tokenizer, model_name=name, max_batch=max_batch, api_key=api_key, max_waiting=max_waiting,
                      engine_loop=loop)


def create_app(model, tokenizer=None, model_name: str = "gpt2", max_batch: int = 8, api_key: str | None = None,
               max_body_bytes: int = 1 << 20, max_waiting: int = 256, engine_loop: EngineLoop | None = None):
    """The FastAPI app serving `model` (a GPT2) under `model_name`, with its own engine of `max_batch`
    slots stepped by one background thread (started on the first request, stopped at the app's
    shutdown), or `engine_loop`'s (an EngineLoop already running `model`'s engine: load_app's). A request that finds `max_waiting` requests already waiting for a slot gets a 429 with
    Retry-After."""
    # lazy: the serve extra (FastAPI, Starlette) is needed by the server only, never by the runtime
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    cfg = model.config
    eos = cfg.eos_token_id if cfg.eos_token_id is not None and 0 <= cfg.eos_token_id < cfg.vocab_size else None
    loop_holder: dict[str, EngineLoop] = {} if engine_loop is None else {"loop": engine_loop}
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
    def health():
        if "loop" in loop_holder and not loop_holder["loop"].alive:
            return JSONResponse({"status": "error", "message": "the engine's thread has stopped"}, status_code=503)
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
        base = {"id": f"cmpl-{next(ids)}-{int(time.time() * 1000)}", "object": "text_completion",
                "created": int(time.time()), "model": model_name}
        n, prompts = params.n, params.prompts
        # choice p * n + i: prompt p's i-th sample, one request of the engine, sampling from row_seed(seed, i)
        # as generate's rows do: each prompt samples as it would alone
        submitted = [(p, *worker.submit(prompt, params.max_tokens, params.sampling,
                                        None if params.seed is None else row_seed(params.seed, i),
                                        params.stop_token_ids, params.logprobs))
                     for p, prompt in enumerate(prompts) for i in range(n)]
        prompt_tokens.inc(sum(len(prompt) for prompt in prompts))
        usage = lambda count: {"prompt_tokens": n * sum(map(len, prompts)), "completion_tokens": count,
                               "total_tokens": n * sum(map(len, prompts)) + count}

        async def pieces(request, queue):
            """One Piece per new token of `request` (the last with its finish reason). Stop strings end the
            text before them; with stop strings, text that could start one (and its tokens) is held back."""
            decoder = StreamDecoder(tokenizer) if tokenizer is not None else None
            text, sent, count, last, outcome = "", 0, 0, arrived, "cancelled"
            pending: list[tuple[int, int, float | None, list | None]] = []  # (text offset, token, log p, top)

            def release(upto: int | None, piece: str, reason: str | None) -> Piece:
                nonlocal pending
                out = [x for x in pending if upto is None or x[0] < upto]
                pending = [] if upto is None or reason is not None else [x for x in pending if x[0] >= upto]
                return Piece(piece, reason, count, [x[1] for x in out], [x[2] for x in out], [x[3] for x in out])

            try:
                while True:
                    token, reason = await queue.get()
                    if token is None:  # the engine's step failed
                        outcome = "error"
                        raise ServerError(f"the engine failed while generating this completion ({reason}); the "
                                          "server goes on serving", status=500, kind="server_error")
                    now = time.monotonic()
                    (itl if count else ttft).observe(now - last)
                    last, count = now, count + 1
                    generated.inc()
                    k = count - 1  # (the engine recorded the token's log-probabilities before handing it over)
                    lp, top = ((request.token_logprobs[k], request.top_logprobs[k]) if params.logprobs is not None
                               else (None, None))
                    pending.append((len(text), token, lp, top))  # a stop token too: in token ids and logprobs
                    if reason == "stop" and token in params.stop_token_ids:
                        piece = ""  # ... but not in the text (OpenAI's stop)
                    else:
                        piece = decoder.push(token) if decoder is not None else ""
                    text += piece
                    hit = min((i for i in (text.find(s, max(0, sent - len(s))) for s in params.stop_strings)
                               if i >= 0), default=-1)
                    if hit >= 0:
                        worker.cancel(request)
                        outcome = "stop"
                        yield release(hit, text[sent:hit], "stop")
                        return
                    if reason is not None:
                        text += decoder.flush() if decoder is not None and reason != "stop" else ""
                        outcome = reason
                        yield release(None, text[sent:], reason)
                        return
                    if params.stop_strings:  # hold back what could be the start of a stop string
                        safe = max(sent, len(text) - max(len(s) - 1 for s in params.stop_strings))
                        yield release(safe, text[sent:safe], None)
                    else:
                        safe = len(text)
                        yield release(None, text[sent:], None)
                    sent = safe
            finally:
                if not request.finished:
                    worker.cancel(request)  # the client went away: its slot is free for the next step
                finished.labels(outcome).inc()

        async def echoed(p: int) -> tuple[str, list, list, list]:
            """Prompt p's text and, with logprobs, (its tokens, their log-probabilities, top alternatives): one
            forward over the prompt, in the engine's thread between two steps."""
            text = tokenizer.decode(prompts[p]) if tokenizer is not None else ""
            if params.logprobs is None:
                return text, [], [], []

            lps, tops = await worker.call(lambda: prompt_logprobs(model, prompts[p], params.logprobs))
            return text, prompts[p], lps, tops

        def block(tokens, lps, tops, offset) -> dict | None:
            return None if params.logprobs is None else logprobs_block(tokens, lps, tops, tokenizer, offset)

        async def whole(request, queue) -> Piece:
            """A whole choice (the non-streamed answer): its pieces joined."""
            out = Piece("", None, 0, [], [], [])
            async for piece in pieces(request, queue):
                out = Piece(out.text + piece.text, piece.reason, piece.count, out.token_ids + piece.token_ids,
                            out.logprobs + piece.logprobs, out.tops + piece.tops)
            return out

        if not params.stream:
            try:
                echoes = [await echoed(p) for p in range(len(prompts))] if params.echo else None
                done = await asyncio.gather(*(whole(r, q) for _, r, q in submitted))
            except ServerError as exc:
                return error(exc)
            finally:
                for _, request, _ in submitted:
                    worker.cancel(request)  # (finished ones: nothing to do)
            choices = []
            for index, ((p, _, _), piece) in enumerate(zip(submitted, done)):
                prefix, p_ids, p_lps, p_tops = echoes[p] if echoes else ("", [], [], [])
                choice = {"text": prefix + piece.text, "index": index, "finish_reason": piece.reason,
                          "logprobs": block(p_ids + piece.token_ids, p_lps + piece.logprobs, p_tops + piece.tops, 0)}
                if params.return_token_ids:
                    choice["token_ids"] = piece.token_ids
                choices.append(choice)
            return {**base, "choices": choices, "usage": usage(sum(piece.count for piece in done))}

        try:
            echoes = [await echoed(p) for p in range(len(prompts))] if params.echo else None
        except BaseException:
            for _, request, _ in submitted:
                worker.cancel(request)
            raise

        def chunk(index: int, text: str, reason: str | None, logprobs: dict | None, token_ids: list[int],
                  count: int | None = None) -> str:
            """One server-sent event of a streamed completion (the last one carries the usage)."""
            choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}
            if params.return_token_ids:
                choice["token_ids"] = token_ids
            event = {**base, "choices": [choice]}
            if count is not None:
                event["usage"] = usage(count)
            return f"data: {json.dumps(event)}\n\n"

        async def events():
            merged: asyncio.Queue = asyncio.Queue()  # (index, Piece or ServerError) from every choice

            async def feed(index, request, queue):
                try:
                    async for piece in pieces(request, queue):
                        await merged.put((index, piece))
                except ServerError as exc:
                    await merged.put((index, exc))

            offsets = [0] * len(submitted)  # each choice's text so far (logprobs' text_offset)
            if echoes:  # each choice opens with its prompt (and the prompt's log-probabilities)
                for index, (p, _, _) in enumerate(submitted):
                    prefix, p_ids, p_lps, p_tops = echoes[p]
                    yield chunk(index, prefix, None, block(p_ids, p_lps, p_tops, 0), [])
                    offsets[index] = len(prefix)
            feeders = [asyncio.create_task(feed(i, r, q)) for i, (_, r, q) in enumerate(submitted)]
            counts, open_choices = [0] * len(submitted), len(submitted)
            try:
                while open_choices:
                    index, piece = await merged.get()
                    if isinstance(piece, ServerError):  # OpenAI's in-stream error, then the stream ends
                        yield f"data: {json.dumps(_error_body(str(piece), piece.kind))}\n\n"
                        break
                    counts[index] = piece.count
                    open_choices -= piece.reason is not None
                    if piece.text or piece.token_ids or piece.reason is not None:
                        logprobs = block(piece.token_ids, piece.logprobs, piece.tops, offsets[index])
                        if logprobs is not None:
                            offsets[index] += sum(map(len, logprobs["tokens"]))
                        yield chunk(index, piece.text, piece.reason, logprobs, piece.token_ids,
                                    None if open_choices else sum(counts))
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or all done): every choice's request leaves the engine
                for task in feeders:
                    task.cancel()
                await asyncio.gather(*feeders, return_exceptions=True)
                for _, request, _ in submitted:
                    worker.cancel(request)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app

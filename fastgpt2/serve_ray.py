"""`fastgpt2 serve`'s app as a Ray Serve deployment (the `ray` extra: pip install 'fastgpt2[ray]').

Each replica builds its own app with server.load_app, so each owns its model and its engine (one
background thread stepping a continuous batch); Ray Serve's HTTP proxy spreads requests over the
replicas and passes the app's answers through unchanged, server-sent events included. A replica asks
Ray for `num_gpus_per_replica` GPUs, fractional allowed (0.5: two replicas share one GPU, each with its
own weights and KV cache), and runs on "cuda" when it asks for any, else on "cpu". When Ray tears a
replica down it runs the app's lifespan shutdown, which stops the engine's thread. Each answer carries
the replica that served it in an `x-fastgpt2-replica` header.

On a Ray cluster (fastgpt2[ray] installed on every node, the checkpoint readable on every node or a
Hub id), from a driver attached to it:

    import ray
    from ray import serve
    from fastgpt2.serve_ray import deployment

    ray.init(address="auto")
    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(deployment("gpt2", num_replicas=4, num_gpus_per_replica=0.5), route_prefix="/")
    # OpenAI-compatible: http://HEAD:8000/v1/completions, /v1/models, /health, /metrics (per replica)

or with Ray Serve's CLI (arguments as key=value; the same in a `serve deploy` config's `args:`):

    serve run fastgpt2.serve_ray:app_builder model_dir=gpt2 num_replicas=4 num_gpus_per_replica=0.5

Needs Ray Serve's ingress builder functions (ray[serve] >= 2.47). Importing this module needs neither
Ray nor FastAPI: both load when a deployment is made.
"""

from __future__ import annotations

REPLICA_HEADER = "x-fastgpt2-replica"
MIN_RAY = (2, 47)


def _serve():
    """ray.serve, or an ImportError that names the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise ImportError(f"fastgpt2.serve_ray needs Ray Serve ({exc.name or 'ray'} is missing): "
                          "pip install 'fastgpt2[ray]'", name=exc.name) from exc
    version = tuple(int(p) for p in ray.__version__.split(".")[:2] if p.isdigit())
    if version < MIN_RAY:
        raise ImportError(f"fastgpt2.serve_ray needs ray[serve] >= {'.'.join(map(str, MIN_RAY))} (an ingress built "
                          f"in each replica); this is ray {ray.__version__}: pip install -U 'fastgpt2[ray]'")
    return serve


class _ReplicaHeader:
    """ASGI middleware: every HTTP answer names the replica that served it (`x-fastgpt2-replica`)."""

    def __init__(self, app, replica: str):
        self.app, self.header = app, (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)


def _build_app(model_dir: str, options: dict):
    """One replica's app (called inside the replica): server.load_app's, its answers tagged with the
    replica's id."""
    import logging
    import os

    from ray import serve

    from .server import load_app  # lazy: FastAPI loads in the replica, with the app it builds

    logger = logging.getLogger("ray.serve")
    app = load_app(model_dir, log=logger.warning, **options)
    try:
        replica = serve.get_replica_context().replica_tag
    except Exception:  # outside a replica (a test of the builder itself)
        replica = f"pid-{os.getpid()}"
    app.add_middleware(_ReplicaHeader, replica=replica)
    return app


def deployment(model_dir: str, *, num_replicas: int = 1, num_gpus_per_replica: float = 0,
               num_cpus_per_replica: float = 1, device: str | None = None, dtype: str | None = None,
               backend: str = "auto", served_model_name: str | None = None, max_batch: int = 8,
               api_key: str | None = None, max_waiting: int = 256, max_ongoing_requests: int | None = None,
               name: str = "fastgpt2", **deployment_options):
    """The app of `fastgpt2 serve --model model_dir` as a Ray Serve Application, for
    ``serve.run(app, route_prefix="/")``: `num_replicas` replicas, each loading the checkpoint into its
    own engine of `max_batch` slots (server.load_app, with `device`, `dtype`, `backend`,
    `served_model_name`, `api_key`, `max_waiting` as there; `served_model_name` defaults to the path's
    last part), on `num_cpus_per_replica` CPUs and `num_gpus_per_replica` GPUs (a fraction shares a
    GPU). `device` defaults to "cuda" when the replica asks for GPUs, else "cpu". Ray sends a replica
    at most `max_ongoing_requests` requests at a time (default 2 x max_batch: a full batch and as many
    waiting) and queues the rest in its routers. Other Ray Serve deployment options
    (autoscaling_config, max_queued_requests, ...) pass through `deployment_options`."""
    serve = _serve()
    if not isinstance(num_replicas, int) or isinstance(num_replicas, bool) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    if num_gpus_per_replica < 0 or num_cpus_per_replica < 0:
        raise ValueError(f"num_gpus_per_replica ({num_gpus_per_replica}) and num_cpus_per_replica "
                         f"({num_cpus_per_replica}) must be >= 0")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    model_dir = str(model_dir)
    options = dict(device=device or ("cuda" if num_gpus_per_replica > 0 else "cpu"), dtype=dtype, backend=backend,
                   served_model_name=served_model_name or model_dir.rstrip("/").split("/")[-1],
                   max_batch=max_batch, api_key=api_key, max_waiting=max_waiting)

    def build():  # Ray calls it in each replica, as it starts: the replica's own model and engine
        return _build_app(model_dir, options)

    @serve.ingress(build)
    class FastGPT2:
        """A replica of fastgpt2's OpenAI-compatible server."""

    actor_options = {"num_cpus": num_cpus_per_replica, "num_gpus": num_gpus_per_replica,
                     **deployment_options.pop("ray_actor_options", {})}
    return serve.deployment(name=name, num_replicas=num_replicas, ray_actor_options=actor_options,
                            max_ongoing_requests=max_ongoing_requests or 2 * max_batch,
                            **deployment_options)(FastGPT2).bind()


_ARGS = {"model_dir": str, "num_replicas": int, "num_gpus_per_replica": float, "num_cpus_per_replica": float,
         "device": str, "dtype": str, "backend": str, "served_model_name": str, "max_batch": int, "api_key": str,
         "max_waiting": int, "max_ongoing_requests": int, "name": str}


def app_builder(args: dict):
    """`deployment` for Ray Serve's CLI and config files (an application builder): ``serve run
    fastgpt2.serve_ray:app_builder model_dir=DIR num_replicas=2 ...``; values may come as strings."""
    unknown = sorted(set(args) - set(_ARGS))
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(_ARGS)}")
    if "model_dir" not in args:
        raise ValueError("model_dir is required (a checkpoint directory or a Hub id): model_dir=DIR")
    typed = {key: None if value is None else _ARGS[key](value) for key, value in args.items()}
    return deployment(typed.pop("model_dir"), **{k: v for k, v in typed.items() if v is not None})

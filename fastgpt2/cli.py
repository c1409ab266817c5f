"""The `fastgpt2` command: generate, serve, bench, bench-serving, parity, eval. Argument parsing and printing only: the
work is runtime/generate's (generate), benchmark's (bench), serving_bench's (bench-serving), parity's
(parity) and evaluate's (eval), each imported when its
subcommand runs, so that parsing arguments and printing --help import none of them."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from .errors import FastGPT2Error


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose description and epilog may be functions, called when the help is
    printed: parity's help holds its tolerance table, which parsing arguments does not need."""

    def format_help(self) -> str:
        if callable(self.description):
            self.description = self.description()
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", default=default_model, required=default_model is None,
                   help="a checkpoint directory or hub id" + (" or preset name (gpt2, distilgpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl: seeded random weights)" if default_model else ""))
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton"],
                   help="auto: triton on CUDA, torch on CPU")


# -- generate --------------------------------------------------------------------------------------
def _generate(args) -> int:
    import torch

    # lazy: the model and its tokenizer load when `fastgpt2 generate` runs, not to parse arguments
    from .runtime.generate import GPT2
    from .runtime.tokenizer import StreamDecoder, load_tokenizer  # lazy: as GPT2, above

    model = GPT2.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend or "auto")
    tokenizer = load_tokenizer(model.source_dir)
    ids = tokenizer.encode(args.prompt).ids
    if not ids:
        raise SystemExit("the prompt encodes to no tokens; give some text")
    decoder = StreamDecoder(tokenizer, ids)
    out = sys.stdout
    out.write(args.prompt)
    out.flush()

    def show(tokens):
        text = decoder.push(int(tokens[0]))
        if text:
            out.write(text)
            out.flush()

    eos = model.config.eos_token_id if not args.ignore_eos else None
    model.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                   temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   eos_token_id=eos, streamer=show)
    out.write(decoder.flush() + "\n")
    return 0


# -- serve ---------------------------------------------------------------------------------------------
def _serve(args) -> int:
    try:  # lazy: the serve extra is needed by this subcommand only
        import uvicorn
        from .server import load_app  # lazy: FastAPI, as uvicorn above
    except ImportError as exc:
        raise SystemExit(f"fastgpt2 serve needs the serve extra ({exc.name} is missing): pip install 'fastgpt2[serve]'")
    app = load_app(args.model, device=args.device, dtype=args.dtype, backend=args.backend or "auto",
                   served_model_name=args.served_model_name, max_batch=args.max_batch, api_key=args.api_key,
                   max_waiting=args.max_waiting, load_format=args.load_format, seed=args.seed,
                   log=lambda message: print(f"fastgpt2 serve: {message}", file=sys.stderr))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


# -- eval ----------------------------------------------------------------------------------------------
def _eval(args) -> int:
    from .evaluate import perplexity  # lazy: the model loads when `fastgpt2 eval` runs
    from .runtime.generate import GPT2  # lazy: as above
    from .runtime.tokenizer import load_tokenizer  # lazy: as above

    model = GPT2.from_pretrained(args.model, device=args.device, dtype=args.dtype, backend=args.backend or "auto")
    with open(args.text, encoding="utf-8") as f:
        ids = load_tokenizer(model.source_dir).encode(f.read()).ids
    result = perplexity(model, ids, stride=args.stride, max_length=args.max_length)
    print(f"fastgpt2 eval: {args.model} on {args.text}; {model.device}, {str(model.dtype).removeprefix('torch.')}, "
          f"backend {model.backend}")
    print(f"perplexity {result.perplexity:.4f} (mean NLL {result.nll:.5f} nats) over {result.scored_tokens} tokens, "
          f"{result.windows} window(s) of <= {args.max_length or model.config.n_positions} tokens; "
          f"{result.tokens_per_s:.0f} tokens/s")
    return 0


# -- bench ---------------------------------------------------------------------------------------------
def _write_json(path: str | None, result) -> None:
    """--json: the result's to_dict() to `path` (when given), and say so."""
    if path:
        with open(path, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
        print(f"\nwrote {path}")


def _parse_batches(text: str) -> tuple[int, ...]:
    """--batch's integers; whether they are positive (and any at all) is benchmark.run's check."""
    try:
        return tuple(int(b) for b in str(text).split(",") if b.strip())
    except ValueError:
        raise SystemExit(f"fastgpt2 bench: error: --batch takes comma-separated positive integers (e.g. 1,8,32), "
                         f"got {text!r}") from None


def _bench(args) -> int:
    # lazy: the benchmark (and through it the model) loads when `fastgpt2 bench` runs, not to parse arguments
    from .benchmark import BenchError, BenchOptions, format_table, plot_decode, require_matplotlib, run

    options = BenchOptions(
        model=args.model, config=args.config, device=args.device, dtype=args.dtype, backend=args.backend,
        batches=_parse_batches(args.batch) if args.batch is not None else None, prompt_len=args.prompt_len,
        new_tokens=args.new_tokens, runs=args.runs, warmup=args.warmup, seed=args.seed,
        reference=not args.no_reference, step_count=not args.no_step_count, bandwidth_gib=args.bandwidth_gib,
        progress=not args.quiet, pdl=args.pdl)
    try:
        if args.plot:
            require_matplotlib()  # before minutes of timing, not after
        result = run(options)
    except BenchError as exc:  # bench's own refusals exit with the message (status 1), as they always have
        raise SystemExit(f"fastgpt2 bench: error: {exc}") from None
    print(format_table(result))
    _write_json(args.json, result)
    if args.plot:
        plot_decode(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


# -- bench-serving -------------------------------------------------------------------------------------
def _range(text: str) -> tuple[int, int]:
    try:
        lo, _, hi = str(text).partition("-")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO-HI (e.g. 8-64), got {text!r}") from None


def _levels(text: str) -> list[int]:
    try:
        return [int(c) for c in str(text).split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected concurrency levels C,C,... (e.g. 1,4,16,64), got {text!r}") from None


def _bench_serving(args) -> int:
    from .benchmark import BenchError  # lazy: the engine and the model load when the command runs
    from .serving_bench import LoadOptions, format_load, run_load  # lazy: as above

    options = LoadOptions(model=args.model, device=args.device, dtype=args.dtype, backend=args.backend or "auto",
                          requests=args.requests, rate=None if args.rate == 0 else args.rate,
                          max_batch=args.max_batch, prompt_lens=args.prompt_lens, output_lens=args.output_lens,
                          seed=args.seed, concurrency=tuple(args.concurrency or ()), url=args.url, serve=args.serve,
                          served_model=args.served_model_name)
    try:
        result = run_load(options)
    except BenchError as exc:
        raise SystemExit(f"fastgpt2 bench-serving: error: {exc}") from None
    print(format_load(result))
    _write_json(args.json, result)
    return 0


# -- parity --------------------------------------------------------------------------------------------
def _parity_description() -> str:
    from .hf import TESTED_TRANSFORMERS  # lazy: read when the help is printed (hf imports torch)

    return ("Run a checkpoint in transformers and in fastgpt2 on the same prompts and report max/mean "
            "|Δlogits|, KL divergence, top-1 agreement, identical greedy continuation, perplexity, and "
            "per-layer hidden-state differences (naming the layer where a discrepancy starts). "
            f"The reference is tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}.")


def _parity_epilog() -> str:
    from .parity import EPILOG  # lazy: parity's tolerance table, read when the help is printed

    return EPILOG


def _parse_tolerances(items: list[str], names) -> dict:
    """--tol NAME=VALUE items as {name: value}: greedy a token count, "all" or None ("none": shown only),
    the others numbers."""
    tol = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in names:
            raise FastGPT2Error(f"--tol {item!r}: expected NAME=VALUE with NAME one of {sorted(names)}")
        if name == "greedy":
            if value in ("none", "", "all"):
                tol[name] = value if value == "all" else None
            elif value.isdigit():
                tol[name] = int(value)
            else:
                raise FastGPT2Error(f"--tol {item!r}: {value!r} is not a token count, all or none")
        else:
            try:
                tol[name] = float(value)
            except ValueError:
                raise FastGPT2Error(f"--tol {item!r}: {value!r} is not a number") from None
    return tol


def _json_safe(value):
    """NaN / inf (a broken model's figures) as strings, so that the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _parity(args) -> int:
    # lazy: parity (transformers, the model) loads when `fastgpt2 parity` runs, not to parse arguments
    from .parity import TOLERANCES, format_report, run

    result = run(args.model, args.reference, device=args.device, dtype=args.dtype, backend=args.backend,
                 reference_dtype=args.reference_dtype, prompts_file=args.prompts, new_tokens=args.new_tokens,
                 random_prompts=args.random_prompts, seed=args.seed,
                 tol_overrides=_parse_tolerances(args.tol, TOLERANCES["float32"]))
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(result.to_dict()), indent=2, allow_nan=False))
        print(f"wrote {args.json}")
    return 0 if result.passed else 1


# -- the parser ----------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fastgpt2", description="GPT-2 inference on Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a prompt, streaming the text",
                       description="Continue a prompt with a checkpoint's own tokenizer (tokenizer.json, or "
                                   "vocab.json + merges.txt), printing the text as it is generated.")
    _add_model_args(g, None)
    g.add_argument("prompt", help="the text to continue")
    g.add_argument("--max-new-tokens", type=int, default=50)
    g.add_argument("--do-sample", action="store_true", help="sample (default: greedy)")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    g.add_argument("--ignore-eos", action="store_true", help="do not stop at the end-of-text token")
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="tokens/sec of fastgpt2 vs transformers on the same weights",
                       description="Prefill and decode tokens/sec of fastgpt2 (every backend the device runs) and "
                                   "transformers (eager attention) on the same weights, in one process, with the "
                                   "weight bandwidth each reaches against the memory bandwidth measured in the same "
                                   "run. With no arguments: GPT-2 small with seeded random weights, no download.")
    _add_model_args(b, "gpt2")
    b.add_argument("--config", default=None, help="a GPT2Config as JSON instead of --model (random weights)")
    b.add_argument("--batch", default=None, help="comma-separated batch sizes (default: 1,8,32 on CUDA, 1,8 on CPU)")
    b.add_argument("--prompt-len", type=int, default=32)
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--runs", type=int, default=3, help="timed runs per figure (the median is reported)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (the first is reported as setup)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--no-reference", action="store_true", help="time fastgpt2 alone (no transformers)")
    b.add_argument("--no-step-count", "--no-launch-budget", dest="no_step_count", action="store_true",
                   help="skip counting what the decode step runs (fastgpt2.runtime.step_count: kernels on CUDA, "
                        "ops elsewhere); --no-launch-budget is its old name")
    b.add_argument("--bandwidth-gib", type=float, default=1.0, metavar="GIB",
                   help="size of the tensor read to measure memory bandwidth (default: 1 GiB)")
    b.add_argument("--pdl", action="store_true", help="also time the Triton decode step with programmatic dependent "
                   "launch, as fastgpt2[triton+pdl] (CUDA, compute capability 9.0+)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    b.add_argument("--plot", default=None, metavar="FILE",
                   help="also write a PNG bar chart of decode tok/s per engine and batch (needs matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(func=_bench)

    s = sub.add_parser("bench-serving", help="a serving-shaped load on the engine: continuous vs static batching",
                       description="The same seeded workload (requests arriving as a Poisson process, ragged prompt "
                                   "and output lengths, half greedy, half sampled) on fastgpt2's engine under three "
                                   "schedules: continuous batching, static batches, one request at a time. Output "
                                   "tokens/s, time to first token and inter-token latency (p50, p99).")
    _add_model_args(s, "gpt2")
    s.add_argument("--requests", type=int, default=32)
    s.add_argument("--rate", type=float, default=4.0, help="arrivals per second (0: all at once; default 4)")
    s.add_argument("--max-batch", type=int, default=8, help="the engine's slots (default 8)")
    s.add_argument("--prompt-lens", type=_range, default=(8, 64), metavar="LO-HI", help="default 8-64")
    s.add_argument("--output-lens", type=_range, default=(16, 64), metavar="LO-HI", help="default 16-64")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--concurrency", type=_levels, default=None, metavar="C,C,...", help="closed loop instead: C "
                   "clients each sending its next request when its last finished, at each level (e.g. 1,4,16,64); "
                   "on the engine in process, and on a server with --serve or --url")
    s.add_argument("--serve", action="store_true", help="with --concurrency: also start `fastgpt2 serve` on this "
                   "model (loopback, a free port) and load it over HTTP; its tokens are checked equal the engine's")
    s.add_argument("--url", default=None, help="with --concurrency: also load this OpenAI-compatible server "
                   "(streamed /v1/completions, token-id prompts)")
    s.add_argument("--served-model-name", default=None, help="the model name sent to --url's server")
    s.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    s.set_defaults(func=_bench_serving)

    v = sub.add_parser("serve", help="an OpenAI-compatible completions server on the engine",
                       description="POST /v1/completions (text or token-id prompts, streaming, seeds, stops), "
                                   "GET /v1/models, GET /health, on FastAPI + uvicorn (pip install "
                                   "'fastgpt2[serve]'); the engine steps in one background thread.")
    _add_model_args(v, None)
    v.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-batch", type=int, default=8, help="the engine's slots (default 8)")
    v.add_argument("--max-waiting", type=int, default=256, help="requests that may wait for a slot; past them "
                   "a 429 with Retry-After (default 256)")
    v.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on /v1/")
    v.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                   "checkpoint directory's name)")
    v.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="dummy: --model is a preset "
                   "(gpt2, ..., gpt2-xl) with seeded random weights, as fastgpt2 bench's; token-id prompts only "
                   "(benchmarks)")
    v.add_argument("--seed", type=int, default=0, help="the dummy weights' seed (default 0)")
    v.add_argument("--log-level", default="warning")
    v.set_defaults(func=_serve)

    e = sub.add_parser("eval", help="perplexity of a checkpoint on a text (sliding window)",
                       description="Perplexity as transformers' perplexity guide computes it: windows of --max-length "
                                   "tokens, --stride apart, each scoring the tokens the last one did not; the "
                                   "checkpoint's tokenizer encodes the text. Prints perplexity, mean NLL, tokens/s.")
    _add_model_args(e, None)
    e.add_argument("--text", required=True, help="a UTF-8 text file")
    e.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: "
                   "min(512, max length))")
    e.add_argument("--max-length", type=int, default=None, help="tokens per window (default: n_positions)")
    e.set_defaults(func=_eval)

    p = sub.add_parser("parity",
                       help="compare fastgpt2 with transformers on a checkpoint: logits, KL, greedy, per layer",
                       description=_parity_description, epilog=_parity_epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p, None)
    p.add_argument("--reference", default=None, metavar="DIR_OR_ID",
                   help="the checkpoint transformers loads (default: the same as --model)")
    p.add_argument("--reference-dtype", default="float32", choices=["float32", "float16", "bfloat16", "same"],
                   help="dtype of the transformers reference (default float32; 'same': fastgpt2's dtype)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="prompts, one per line (default: built-in "
                   "English prompts; random token ids when the checkpoint has no tokenizer)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy continuation length (default 32)")
    p.add_argument("--random-prompts", type=int, default=6, metavar="N",
                   help="how many random-id prompts when there is no tokenizer (default 6)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-id prompts")
    p.add_argument("--tol", action="append", default=[], metavar="NAME=VALUE", help="override one tolerance")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_parity)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastGPT2Error as exc:  # a problem the user can fix: one line, no traceback
        print(f"fastgpt2 {args.command}: error: {exc}", file=sys.stderr)
        return 2

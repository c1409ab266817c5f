"""The `fastgpt2` command: generate, bench."""
from __future__ import annotations

import argparse
import json
import sys

from .errors import FastGPT2Error


def _add_model_args(p: argparse.ArgumentParser, default_model: str | None) -> None:
    p.add_argument("--model", default=default_model, required=default_model is None,
                   help="a checkpoint directory or hub id" + (" or preset name (gpt2, distilgpt2, gpt2-medium, "
                        "gpt2-large, gpt2-xl: seeded random weights)" if default_model else ""))
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "triton"],
                   help="auto: triton on CUDA, torch on CPU")


def _generate(args) -> int:
    import torch

    from .runtime.model import GPT2
    from .runtime.tokenizer import StreamDecoder, load_tokenizer

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


def _bench(args) -> int:
    from .benchmark import format_table, plot_decode, run

    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"\nwrote {args.json}")
    if args.plot:
        plot_decode(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastgpt2", description="GPT-2 inference on Triton kernels.")
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
    b.add_argument("--no-launch-budget", action="store_true",
                   help="skip counting the decode step's kernel launches (fastgpt2.runtime.launches)")
    b.add_argument("--bandwidth-gib", type=float, default=1.0, metavar="GIB",
                   help="size of the tensor read to measure memory bandwidth (default: 1 GiB)")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    b.add_argument("--plot", default=None, metavar="FILE",
                   help="also write a PNG bar chart of decode tok/s per engine and batch (needs matplotlib)")
    b.add_argument("--quiet", action="store_true", help="no progress on stderr")
    b.set_defaults(func=_bench)

    from .parity import add_parser as _add_parity
    _add_parity(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FastGPT2Error as exc:  # a problem the user can fix: one line, no traceback
        print(f"fastgpt2 {args.command}: error: {exc}", file=sys.stderr)
        return 2

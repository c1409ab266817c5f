"""The GPU decode roofline of GPT-2: the goal the GPU benchmark is to be measured against.

    python tools/roofline.py [--dtype float16] [--batch 1]

A decode step reads every weight once, so it can take no less than (weight bytes per step) / (HBM
bandwidth). For each GPT-2 size and each GPU this prints that bound, in µs per step and tokens/s,
as a markdown table. Bytes per step come from `fastgpt2.runtime.plan.decode_weight_bytes` (the
function `fastgpt2 bench` uses; its docstring has the formula), the configs from GPT2Config's
presets, bandwidths from the vendors' datasheets. The KV cache is left out: at batch 1 and short
contexts it is small beside the weights (`fastgpt2 bench` reports it). These are bounds, not
measurements: `fastgpt2 bench` on a GPU measures the bandwidth it reaches and its % of it.
"""
from __future__ import annotations

import argparse

import torch

from fastgpt2.kernels.contract import DTYPE_NAMES
from fastgpt2.runtime.config import GPT2Config
from fastgpt2.runtime.plan import decode_weight_bytes

MODELS = ("gpt2", "distilgpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
# name -> HBM bandwidth in GB/s (1e9 bytes/s), datasheet figures
GPUS = {
    "A100 SXM 80GB": 2039,
    "A100 40GB": 1555,
    "H100 SXM": 3350,
    "H100 PCIe": 2000,
}
_DTYPE_CHOICES = ("bfloat16", "float16", "float32")  # names of kernels.contract.DTYPE_NAMES


def roofline(dtype: torch.dtype = torch.float16, batch: int = 1) -> list[dict]:
    """One row per model: its parameter count, weight bytes per decode step, and per GPU the
    bound on one step in µs and on decode tokens/s (batch tokens per step)."""
    rows = []
    for name in MODELS:
        cfg = GPT2Config.from_name(name)
        nbytes = decode_weight_bytes(cfg, batch, dtype)
        bounds = {}
        for gpu, gbps in GPUS.items():
            seconds = nbytes / (gbps * 1e9)
            bounds[gpu] = {"us_per_step": seconds * 1e6, "tokens_per_s": batch / seconds}
        rows.append({"model": name, "parameters": cfg.num_parameters(), "bytes_per_step": nbytes, "gpus": bounds})
    return rows


def format_markdown(rows: list[dict], dtype: torch.dtype = torch.float16, batch: int = 1) -> str:
    dname = str(dtype).removeprefix("torch.")
    lines = [
        f"GPT-2 decode roofline, {dname}, batch {batch}: weight bytes read per step / HBM bandwidth "
        "(goal, to be measured)",
        "",
        "| model | params | weights read per step | "
        + " | ".join(f"{gpu} ({gbps:,} GB/s)" for gpu, gbps in GPUS.items()) + " |",
        "|---|---:|---:|" + "---:|" * len(GPUS),
    ]
    for r in rows:
        cells = [f"{b['us_per_step']:.1f} µs, {b['tokens_per_s']:,.0f} tok/s" for b in r["gpus"].values()]
        lines.append(f"| {r['model']} | {r['parameters'] / 1e6:.1f}M | {r['bytes_per_step'] / 1e6:,.1f} MB | "
                     + " | ".join(cells) + " |")
    lines += [
        "",
        "Each cell: the least time one decode step can take (every weight read once, lm_head included, "
        "KV cache excluded) and the most tokens/s it allows. Measured figures: `fastgpt2 bench` on the GPU.",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float16", choices=_DTYPE_CHOICES)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    if args.batch < 1:
        p.error("--batch must be >= 1")
    dtype = DTYPE_NAMES[args.dtype]
    print(format_markdown(roofline(dtype, args.batch), dtype, args.batch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

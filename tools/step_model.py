"""A step-time model of fastgpt2's Triton decode step (one new token per sequence, batch B), no GPU.

    python tools/step_model.py [--gpu H200|H100|A100] [--model gpt2 ...] [--batch 1,8]
                               [--dtype float16] [--context 128] [--cache-len N] [--pdl] [--json FILE]

For every kernel the step launches (the step's plan, ``fastgpt2.runtime.plan``: its ops in order, each
one kernel, with their fusions, GEMM shapes and weights) this lists the bytes it moves (weights,
activations, KV cache read and written, in the model dtype; split partials in fp32), the programs
it launches (the grid its launcher computes, from the launchers' own helpers: the GEMMs' ``plan``
for the GPU's SM count, ``default_num_splits``, one layernorm program per row), the waves, and a
predicted time

    t = max(bytes / (ACHIEVABLE_BW_FRACTION * HBM * min(1, programs / SMs)), KERNEL_FLOOR_US)

i.e. a kernel that launches fewer programs than the GPU has SMs is taken to reach only that share
of the bandwidth (one resident program streams from one SM), and no kernel takes less than a
fixed launch/latency floor (``KERNEL_FLOOR_US``; with programmatic dependent launch, ``--pdl`` and
the summary's PDL columns, ``PDL_KERNEL_FLOOR_US`` for a Triton kernel after a Triton kernel). The
step is the sum. Reported: tokens/s = B / step, and % of the HBM
roofline = (decode_weight_bytes / HBM) / step (the bound tools/roofline.py prints).

This is a model, not a measurement: the constants below are assumptions to calibrate against a
GPU run (``fastgpt2 bench``, the bench/ suite). Left out: compute time (decode GEMMs at B <= 64 are
far from the tensor-core limit), L2 hits (the next layer's activations and the split partials are
L2-resident, so the activation bytes here are an upper bound on DRAM traffic), tail effects within
a wave (the last program of a tile or row block to arrive also reduces it), the argmax's and length
update's real torch grids (taken to fill the GPU), and sampling (greedy only).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch

from fastgpt2.kernels import attention as _attention
from fastgpt2.kernels.contract import DTYPE_NAMES
from fastgpt2.kernels.contract import DTYPES
from fastgpt2.kernels.linear import plan
from fastgpt2.runtime.config import GPT2Config, kv_read_bytes
from fastgpt2.runtime import plan as step_plan
from fastgpt2.runtime.graphs import graph_cache_len
from fastgpt2.runtime.plan import decode_weight_bytes


def _load_roofline():
    """tools/roofline.py (not a package module), loaded by path as tests/tools/test_bench.py does."""
    spec = importlib.util.spec_from_file_location("roofline", Path(__file__).resolve().parent / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_ROOFLINE = _load_roofline()

# --- assumptions, to be calibrated by a GPU run --------------------------------------------------
# Share of the HBM datasheet bandwidth a well-fed streaming kernel reaches (H200: 0.9 * 4.8 = 4.32
# TB/s, about its measured device-to-device copy rate). ASSUMPTION.
ACHIEVABLE_BW_FRACTION = 0.9
# Least time of one kernel inside a CUDA graph (launch, ramp-up, drain, the dependency on the
# previous kernel), in µs. ASSUMPTION.
KERNEL_FLOOR_US = 3.0
# The same floor for a Triton kernel launched with programmatic dependent launch after another one
# (``Engine(pdl=True)``): its launch and scheduling overlap the previous kernel's tail, leaving
# the drain and the wait. The kernel after a torch op (the step's first) keeps KERNEL_FLOOR_US.
# ASSUMPTION (the GPU check's pdl stage measures the step both ways).
PDL_KERNEL_FLOOR_US = 1.5
# Programs of one kernel resident on one SM at once. 1: the model takes one program per SM (a decode
# GEMM program, 4 warps with ~60 KiB of shared memory in flight, could fit 2-3 per SM on sm_90, but
# whether that raises the bandwidth of one SM is what a GPU run has to show). ASSUMPTION.
RESIDENT_PROGRAMS_PER_SM = 1
# Programs assumed for the kernels whose grid the code does not choose (torch's max and add): they
# are taken to fill the GPU (None -> SM count). ASSUMPTION.
LIBRARY_PROGRAMS = None

# --- GPUs: SM count and HBM GB/s (1e9 bytes/s); bandwidths from tools/roofline.py's table where it
# has the GPU, the datasheet figure otherwise ---------------------------------------------------
_H200_GBPS = 4800  # H200 SXM datasheet (tools/roofline.py has no H200 row); ~4.3 TB/s measured copy
GPUS = {
    "H200": {"name": "H200 SXM", "sms": 132, "hbm_gbps": _H200_GBPS},
    "H100": {"name": "H100 SXM", "sms": 132, "hbm_gbps": _ROOFLINE.GPUS["H100 SXM"]},
    "A100": {"name": "A100 SXM 80GB", "sms": 108, "hbm_gbps": _ROOFLINE.GPUS["A100 SXM 80GB"]},
}
_DTYPE_CHOICES = ("bfloat16", "float16", "float32")  # names of kernels.contract.DTYPE_NAMES
DEFAULT_CONTEXT = 128  # cached positions each sequence attends over (before the new token)
SUMMARY_MODELS = ("gpt2", "gpt2-large")
SUMMARY_BATCHES = (1, 8)


def _kernel(name, count, programs, nbytes, weight_bytes=0, kv_bytes=0, kind="triton"):
    return {"kernel": name, "count": count, "programs": programs, "bytes": nbytes,
            "weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "kind": kind}


def gemm_plan(m: int, n: int, k: int, dtype: torch.dtype, sms: int):
    """linear()'s launch for x [M, K] @ w [K, N] on a GPU of `sms` SMs: kernels.linear.plan."""
    return plan(m, n, k, DTYPES[dtype], sms)


def gemm_programs(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> int:
    """Programs of that launch: cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N) * split_k."""
    return gemm_plan(m, n, k, dtype, sms).programs(m, n)


def layernorm_programs(rows: int) -> int:
    """add_layer_norm / embed_layer_norm launch one program per row: grid (M,)."""
    return rows


def decode_grids(batch: int, n_head: int, cache_len: int) -> tuple[int, int]:
    """-> (num_splits, decode programs), as _launch_decode: grid (B*H, num_splits); the last split of
    each (b, h) to finish combines the splits in the same kernel."""
    splits = _attention.default_num_splits(n_head, cache_len)
    return splits, batch * n_head * splits


def step_kernels(cfg: GPT2Config, batch: int, dtype: torch.dtype, context: int, cache_len: int,
                 sms: int = 132) -> list[dict]:
    """The kernels of one greedy decode step, one row per distinct kernel with its count per step.
    Bytes are per launch; weight_bytes the share of them that is weights (as decode_weight_bytes
    counts them), kv_bytes the K/V cache share (read and written)."""
    i, b, e, n, h = dtype.itemsize, batch, cfg.n_embd, cfg.n_layer, cfg.n_head
    d = cfg.head_dim
    f32, idx = 4, 8  # fp32 partials, int64 token ids
    splits, dec_programs = decode_grids(b, h, cache_len)
    shapes = dict(zip((op.gemm for op in step_plan.STEP if op.gemm), step_plan.gemm_shapes(cfg, b)))
    out = []
    for op in step_plan.STEP:  # one kernel per op of the plan, in its order
        count = n if op.per_layer else 1
        w = step_plan.op_weight_elements(cfg, op, b) * i  # the weights it reads (the plan's)
        if op.op == "embed_layer_norm":
            # gathers 1 row of wte and of wpe per sequence + ln_1 of layer 0; reads ids and lengths, writes a, h
            out.append(_kernel(op.name, count, layernorm_programs(b), w + b * (idx + 4) + 2 * b * e * i, w))
        elif op.gemm:
            # x [b, k] @ w [k, n] (+ bias), weights as the plan counts them; x, y; split-K partials (fp32,
            # written and read back); linear_norm: the residual in and the stream out, y read back (from L2)
            # and the normalised rows written
            _, n_dim, k_dim = shapes[op.gemm]
            p = gemm_plan(b, n_dim, k_dim, dtype, sms)
            norm = op.op == "linear_norm"
            act = (b * k_dim + b * n_dim + (b * e + 2 * b * n_dim if norm else 0)) * i
            partials = 2 * p.split_k * b * n_dim * f32 if p.split_k > 1 else 0
            label = f"{op.name} [BN={p.block_n}" + (f", split-K {p.split_k}]" if p.split_k > 1 else "]")
            out.append(_kernel(label, count, p.programs(b, n_dim), w + act + partials, w))
        elif op.op == "decode_attention":
            # q, k_new, v_new from qkv; the cached K/V of `context` positions; the new K/V written; lengths;
            # with splits, the fp32 partials written and read back by the combining program, then out
            kv = 2 * b * context * e * i + 2 * b * e * i
            partials = 2 * b * h * splits * (d + 2) * f32 if splits > 1 else 0
            label = f"{op.name} ({splits} split{'s combined in-kernel' if splits > 1 else ''})"
            out.append(_kernel(label, count, dec_programs, 3 * b * e * i + kv + b * 4 + partials + b * e * i,
                               kv_bytes=kv))
        elif op.op == "choose":
            out.append(_kernel(op.name, count, LIBRARY_PROGRAMS, b * cfg.vocab_size * i + b * (i + idx), kind="torch"))
        elif op.op == "advance":
            out.append(_kernel(op.name, count, LIBRARY_PROGRAMS, 2 * b * 4, kind="torch"))
        else:
            raise ValueError(f"the step model has no bytes for the plan's op {op.op!r} ({op.name})")
    return out


def predict(kernels: list[dict], gpu: dict, pdl: bool = False) -> list[dict]:
    """Adds waves and predicted µs (per launch and per step) to each kernel row, in place. pdl: the
    Triton kernels that follow a Triton kernel have PDL_KERNEL_FLOOR_US as their floor."""
    bw = ACHIEVABLE_BW_FRACTION * gpu["hbm_gbps"] * 1e9  # bytes/s
    sms = gpu["sms"]
    for index, k in enumerate(kernels):
        after_triton = index > 0 and k["kind"] == "triton" and kernels[index - 1]["kind"] == "triton"
        k["floor_us"] = PDL_KERNEL_FLOOR_US if pdl and after_triton else KERNEL_FLOOR_US
        programs = k["programs"] if k["programs"] is not None else sms
        k["waves"] = math.ceil(programs / (sms * RESIDENT_PROGRAMS_PER_SM))
        k["sm_share"] = min(1.0, programs / sms)
        k["bandwidth_us"] = k["bytes"] / (bw * k["sm_share"]) * 1e6
        k["us"] = max(k["bandwidth_us"], k["floor_us"])
        k["floor_bound"] = k["bandwidth_us"] < k["floor_us"]
        k["us_per_step"] = k["us"] * k["count"]
    return kernels


def model_step(model: str, batch: int, gpu_key: str = "H200", dtype: torch.dtype = torch.float16,
               context: int = DEFAULT_CONTEXT, cache_len: int | None = None, pdl: bool = False) -> dict:
    cfg = GPT2Config.from_name(model)
    if cache_len is None:  # a graphed step's cache: the next power of two >= context + 1, <= n_positions
        cache_len = graph_cache_len(context + 1, cfg.n_positions)
    if not 0 <= context < cache_len:
        raise ValueError(f"context {context} must be in [0, cache_len {cache_len})")
    gpu = GPUS[gpu_key]
    kernels = predict(step_kernels(cfg, batch, dtype, context, cache_len, gpu["sms"]), gpu, pdl)
    step_us = sum(k["us_per_step"] for k in kernels)
    weight_bytes = decode_weight_bytes(cfg, batch, dtype)
    roofline_us = weight_bytes / (gpu["hbm_gbps"] * 1e9) * 1e6
    return {
        "model": model, "batch": batch, "dtype": str(dtype).removeprefix("torch."), "gpu": gpu["name"], "pdl": pdl,
        "sms": gpu["sms"], "hbm_gbps": gpu["hbm_gbps"], "context": context, "cache_len": cache_len,
        "kernels": kernels,
        "launches_per_step": sum(k["count"] for k in kernels),
        "bytes_per_step": sum(k["bytes"] * k["count"] for k in kernels),
        "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_step": kv_read_bytes(cfg, batch, context + 1, dtype),
        "step_us": step_us,
        "tokens_per_s": batch / (step_us * 1e-6),
        "roofline_us": roofline_us,
        "pct_roofline": 100.0 * roofline_us / step_us,
        "floor_us_per_step": sum(k["count"] * k["floor_us"] for k in kernels if k["floor_bound"]),
    }


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e6:,.3f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def format_step(r: dict) -> str:
    lines = [
        f"### {r['model']}, batch {r['batch']}, {r['dtype']}, {r['gpu']} ({r['sms']} SMs, {r['hbm_gbps']:,} GB/s), "
        f"context {r['context']}, cache_len {r['cache_len']}" + (", PDL" if r["pdl"] else ""),
        "",
        "| kernel | count/step | programs | waves | bytes/launch | µs/launch | µs/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in r["kernels"]:
        programs = k["programs"] if k["programs"] is not None else f"({r['sms']})"
        bound = " (floor)" if k["floor_bound"] else ""
        lines.append(f"| {k['kernel']} | {k['count']} | {programs} | {k['waves']} | {_fmt_bytes(k['bytes'])} | "
                     f"{k['us']:.2f}{bound} | {k['us_per_step']:.1f} |")
    lines += ["", f"Summary: {r['model']} batch {r['batch']}: predicted step {r['step_us']:.1f} µs, "
                  f"{r['tokens_per_s']:,.0f} tok/s, {r['pct_roofline']:.1f}% of the HBM roofline "
                  f"({r['roofline_us']:.1f} µs); {r['launches_per_step']} launches, "
                  f"{r['floor_us_per_step']:.1f} µs of it at the per-kernel floor; "
                  f"{r['bytes_per_step'] / 1e6:,.1f} MB moved ({r['weight_bytes_per_step'] / 1e6:,.1f} MB weights, "
                  f"{r['kv_bytes_per_step'] / 1e6:,.1f} MB KV)."]
    return "\n".join(lines)


def format_summary(rows: list[dict], pdl_rows: list[dict] | None = None) -> str:
    """The summary table; with pdl_rows (the same steps predicted with PDL), their columns beside."""
    gpu = rows[0]["gpu"] if rows else ""
    head = "| model | batch | predicted step µs | tok/s | roofline µs | % roofline |"
    rule = "|---|---:|---:|---:|---:|---:|"
    if pdl_rows:
        head += " with PDL: step µs | % roofline |"
        rule += "---:|---:|"
    lines = [f"## Summary ({gpu}, predicted, uncalibrated)", "", head, rule]
    for index, r in enumerate(rows):
        line = (f"| {r['model']} | {r['batch']} | {r['step_us']:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{r['roofline_us']:.1f} | {r['pct_roofline']:.1f}% |")
        if pdl_rows:
            line += f" {pdl_rows[index]['step_us']:.1f} | {pdl_rows[index]['pct_roofline']:.1f}% |"
        lines.append(line)
    lines += ["", f"Assumptions (to calibrate on a GPU): achievable bandwidth = {ACHIEVABLE_BW_FRACTION} x HBM, "
                  f"scaled by min(1, programs / SMs); {KERNEL_FLOOR_US} µs floor per kernel (CUDA graph)"
                  + (f", {PDL_KERNEL_FLOOR_US} µs for a Triton kernel after a Triton kernel with PDL" if pdl_rows else "")
                  + f"; {RESIDENT_PROGRAMS_PER_SM} resident program per SM; torch's argmax / add fill the GPU."]
    return "\n".join(lines)


def _batches(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch takes comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"--batch values must be >= 1, got {text!r}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default="H200", choices=sorted(GPUS))
    p.add_argument("--model", nargs="+", default=list(SUMMARY_MODELS), choices=list(_ROOFLINE.MODELS))
    p.add_argument("--batch", type=_batches, default=list(SUMMARY_BATCHES), help="comma-separated, e.g. 1,8")
    p.add_argument("--dtype", default="float16", choices=_DTYPE_CHOICES)
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="cached positions per sequence")
    p.add_argument("--cache-len", type=int, default=None,
                   help="the cache's max_len (Tmax; sets num_splits); default: the graphed step's bucket")
    p.add_argument("--pdl", action="store_true", help="the per-kernel tables with programmatic dependent launch")
    p.add_argument("--json", default=None, help="write every row and the summary to this file")
    args = p.parse_args(argv)
    dtype = DTYPE_NAMES[args.dtype]
    try:
        rows = [model_step(m, b, args.gpu, dtype, args.context, args.cache_len, args.pdl)
                for m in args.model for b in args.batch]
        summary, summary_pdl = ([model_step(m, b, args.gpu, dtype, args.context, args.cache_len, pdl)
                                 for m in SUMMARY_MODELS for b in SUMMARY_BATCHES] for pdl in (False, True))
    except ValueError as exc:
        p.error(str(exc))
    for r in rows:
        print(format_step(r))
        print()
    print(format_summary(summary, summary_pdl))
    if args.json:
        constants = {"ACHIEVABLE_BW_FRACTION": ACHIEVABLE_BW_FRACTION, "KERNEL_FLOOR_US": KERNEL_FLOOR_US,
                     "PDL_KERNEL_FLOOR_US": PDL_KERNEL_FLOOR_US, "RESIDENT_PROGRAMS_PER_SM": RESIDENT_PROGRAMS_PER_SM}
        Path(args.json).write_text(json.dumps({"assumptions": constants, "gpu": GPUS[args.gpu], "steps": rows,
                                               "summary": summary, "summary_pdl": summary_pdl}, indent=2))
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Compile every Triton kernel config of fastgpt2 for sm_80 and sm_90 without a GPU and report its resources.

    python tools/compile_report.py [--json FILE] [--jobs 2] [--align both|aligned|generic] [--fresh-cache]

For each kernel module present among ``fastgpt2.kernels.{layernorm, linear, attention}`` (a module
that exists but fails to import, or lacks ``compile_specs``, is a failure, never skipped), every
``CompileSpec`` from ``compile_specs(dtype)`` is compiled for cc 80 and 90 (from its ``min_cc``: the
programmatic-dependent-launch variants, ``launch_pdl``, for cc 90 only) and dtype fp16 and bf16,
in two specializations of the arguments, as Triton's launcher would produce them (once, shown as
``any``, for a kernel that marks all its arguments ``do_not_specialize``):

- ``16B``: every pointer 16-byte aligned and every integer argument a multiple of 16 (except the
  ones the kernel marks ``do_not_specialize``): what GPT-2 shapes get at run time (vectorized,
  cp.async-pipelined loads, so the most shared memory);
- ``none``: no alignment known (any shape, e.g. K=100): the plain compile of the spec.

Registers, shared memory (Triton's dynamic allocation + the cubin's static) and local memory /
stack come from ``cuobjdump --dump-resource-usage``; tensor-core instructions (HMMA, HGMMA) from
``cuobjdump --dump-sass`` (the cuobjdump bundled with the triton wheel).

Fails (exit 1, each failing spec named on stderr) on: a compile error, any local memory or stack
(a spill), shared memory over the target's limit, a ``uses_dot`` spec without tensor-core
instructions. Prints a markdown table on stdout. TRITON_INTERPRET is cleared: in the interpreter,
@triton.jit functions cannot be compiled.
"""
from __future__ import annotations

import os

# Before anything imports triton: the kernels must be real JITFunctions, not interpreted ones.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the 3.9 default, stated to silence its warning

import argparse
import concurrent.futures as cf
import hashlib
import importlib
import importlib.util
import json
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULES = ("layernorm", "linear", "attention")
CCS = (80, 90)
DTYPES = ("fp16", "bf16")
ALIGNS = ("16B", "none")
# max shared memory per block (dynamic + static), bytes
SMEM_LIMIT = {80: 166912, 90: 232448}


def _cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not path.exists():
        raise FileNotFoundError(f"cuobjdump not found at {path} (it ships with the triton wheel)")
    return str(path)


def _attrs(spec, align: str) -> dict:
    """Triton's run-time specialization: tt.divisibility=16 on pointers and integers (16B variant)."""
    if align in ("none", "any"):
        return {}
    fn = spec.fn
    names = list(fn.arg_names)
    no_spec = {names[i] if isinstance(i, int) else i for i in (getattr(fn, "do_not_specialize", None) or ())}
    no_align = {names[i] if isinstance(i, int) else i for i in (getattr(fn, "do_not_specialize_on_alignment", None) or ())}
    attrs = {}
    for i, name in enumerate(names):
        ty = spec.signature.get(name)
        if ty is None or ty == "constexpr" or name in no_spec or name in no_align:
            continue
        if ty.startswith("*") or ty in ("i32", "i64", "u32", "u64"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs


def _resource_usage(text: str) -> dict:
    """The kernel function's line of `cuobjdump --dump-resource-usage`."""
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            usage = {key: int(val) for key, val in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
    return usage


def _inspect_cubin(cubin: bytes) -> tuple[dict, list]:
    """cuobjdump's resource usage and the tensor-core opcodes found in the SASS.

    Disassembling takes ~0.3 s a kernel, more than a cached compile, so the answer is kept next to
    Triton's cache, keyed by the cubin's own bytes (the same bytes always give the same answer)."""
    import triton
    from triton import knobs

    digest = hashlib.sha256(cubin + triton.__version__.encode()).hexdigest()
    memo = Path(knobs.cache.dir) / "fastgpt2-cuobjdump" / f"{digest}.json"
    try:
        saved = json.loads(memo.read_text())
        return saved["usage"], saved["tensor_cores"]
    except (OSError, ValueError, KeyError):
        pass
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        usage_text = subprocess.run([tool, "--dump-resource-usage", str(path)], check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", str(path)], check=True, capture_output=True, text=True).stdout
    usage = _resource_usage(usage_text)
    found = [op for op in ("HGMMA", "HMMA") if re.search(rf"\b{op}\b", sass)]
    if usage:
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp_file.write_text(json.dumps({"usage": usage, "tensor_cores": found}))
        os.replace(tmp_file, memo)  # atomic: concurrent workers never see half a file
    return usage, found


def compile_options(spec) -> dict:
    """triton.compile's options for a spec, as its launcher passes them."""
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
    if spec.launch_pdl:
        options["launch_pdl"] = True
    return options


def compile_one(task: tuple) -> dict:
    """Worker: compile one (module, dtype, spec index, cc, align) and read its resources."""
    module_name, dtype, index, cc, align = task
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = importlib.import_module(module_name).compile_specs(dtype)[index]
    row = {
        "module": module_name.rsplit(".", 1)[-1], "name": spec.name, "cc": cc, "dtype": dtype, "align": align,
        "num_warps": spec.num_warps, "num_stages": spec.num_stages, "uses_dot": spec.uses_dot,
        "registers": None, "shared": None, "local": None, "stack": None, "tensor_cores": "-",
        "seconds": None, "errors": [],
    }
    start = time.perf_counter()
    try:
        src = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=_attrs(spec, align))
        kernel = triton.compile(
            src, target=GPUTarget("cuda", cc, 32), options=compile_options(spec)
        )
    except Exception as exc:  # noqa: BLE001 - reported as this spec's failure
        lines = str(exc).strip().splitlines()
        row["errors"].append(f"compile error: {type(exc).__name__}: {lines[-1] if lines else ''}")
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)

    usage, found = _inspect_cubin(kernel.asm["cubin"])
    if not usage:
        row["errors"].append("no resource usage line in cuobjdump's output")
        return row
    row["registers"] = usage.get("REG")
    row["shared"] = int(kernel.metadata.shared) + usage.get("SHARED", 0)  # dynamic (Triton) + static
    row["local"] = usage.get("LOCAL", 0)
    row["stack"] = usage.get("STACK", 0)
    row["tensor_cores"] = "/".join(found) or "-"

    if row["local"] or row["stack"]:
        row["errors"].append(f"spills: LOCAL={row['local']} STACK={row['stack']} bytes")
    if row["shared"] > SMEM_LIMIT[cc]:
        row["errors"].append(f"shared memory {row['shared']} B > sm_{cc} limit {SMEM_LIMIT[cc]} B")
    if spec.uses_dot and not found:
        row["errors"].append(f"uses_dot but no tensor-core instruction (HMMA/HGMMA) in the sm_{cc} SASS")
    return row


def discover(modules=MODULES) -> tuple[list, list, list]:
    """-> (present module names, absent module names, failures for modules that exist but cannot be used)."""
    present, absent, failures = [], [], []
    for short in modules:
        name = short if "." in short else f"fastgpt2.kernels.{short}"  # a dotted name is taken as is
        try:
            found = importlib.util.find_spec(name) is not None
        except Exception as exc:  # noqa: BLE001 - the package itself is broken
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if not found:
            absent.append(name)
            continue
        try:
            module = importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - a module that exists must be checked, not skipped
            failures.append(f"{name}: import failed: {type(exc).__name__}: {exc}")
            continue
        if not callable(getattr(module, "compile_specs", None)):
            failures.append(f"{name}: has no compile_specs(dtype)")
            continue
        present.append(name)
    return present, absent, failures


def build_tasks(present, dtypes=DTYPES, ccs=CCS, aligns=ALIGNS) -> tuple[list, list]:
    tasks, failures = [], []
    for name in present:
        module = importlib.import_module(name)
        for dtype in dtypes:
            try:
                specs = list(module.compile_specs(dtype))
            except Exception as exc:  # noqa: BLE001
                failures.append(f"{name}.compile_specs({dtype!r}) failed: {type(exc).__name__}: {exc}")
                continue
            if not specs:
                failures.append(f"{name}.compile_specs({dtype!r}) returned no specs")
            for index, spec in enumerate(specs):
                # a kernel that specializes none of its arguments compiles the same both ways: once
                variants = aligns if _attrs(spec, "16B") else ("any",)
                for cc in ccs:
                    if cc < spec.min_cc:  # a PDL variant: sm_90 and newer only
                        continue
                    for align in variants:
                        tasks.append((name, dtype, index, cc, align))
    return tasks, failures


def markdown(rows: list) -> str:
    head = ("kernel / config", "cc", "dtype", "align", "warps", "stages", "registers", "shared memory (B)",
            "local memory (B)", "tensor cores", "status")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        local = "-" if r["local"] is None else str(r["local"] + (r["stack"] or 0))
        cells = (r["name"], f"sm_{r['cc']}", r["dtype"], r["align"], r["num_warps"], r["num_stages"],
                 "-" if r["registers"] is None else r["registers"], "-" if r["shared"] is None else r["shared"],
                 local, r["tensor_cores"], "FAIL: " + "; ".join(r["errors"]) if r["errors"] else "ok")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", action="store_true", help="print the markdown table (the default output)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default: 2 at most)")
    parser.add_argument("--align", choices=("both", "aligned", "generic"), default="both",
                        help="argument specializations to compile: 16B-aligned, unaligned, or both (default)")
    parser.add_argument("--modules", default=",".join(MODULES), help="comma-separated kernel modules: short names under fastgpt2.kernels, or dotted module names (default: layernorm,linear,attention)")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (default: fp16,bf16)")
    parser.add_argument("--fresh-cache", action="store_true", help="compile into an empty private TRITON_CACHE_DIR")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    cache = None
    if args.fresh_cache:
        cache = tempfile.TemporaryDirectory(prefix="fastgpt2-compile-")
        os.environ["TRITON_CACHE_DIR"] = cache.name  # inherited by the workers
    aligns = {"both": ALIGNS, "aligned": ("16B",), "generic": ("none",)}[args.align]
    modules = tuple(m.strip() for m in args.modules.split(",") if m.strip())
    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())

    present, absent, failures = discover(modules)
    tasks, spec_failures = build_tasks(present, dtypes=dtypes, aligns=aligns)
    failures += spec_failures

    jobs = max(1, min(args.jobs, len(tasks) or 1))
    if jobs == 1:
        rows = [compile_one(t) for t in tasks]
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/triton state
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            rows = list(pool.map(compile_one, tasks, chunksize=4))
    if cache is not None:
        cache.cleanup()

    for r in rows:
        for err in r["errors"]:
            failures.append(f"{r['name']} sm_{r['cc']} {r['dtype']} align={r['align']}: {err}")

    print(f"# Triton compile report ({len(rows)} compiles, {time.perf_counter() - start:.0f} s)\n")
    print("modules: " + ", ".join(present) + (f"; absent: {', '.join(absent)}" if absent else "") + "\n")
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"present": present, "absent": absent, "failures": failures, "rows": rows}, indent=1))
    if failures:
        print(f"\n{len(failures)} failure(s):", file=sys.stderr)
        for f in failures:
            print(f"FAIL {f}", file=sys.stderr)
        return 1
    if not present:
        print("no kernel module found", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

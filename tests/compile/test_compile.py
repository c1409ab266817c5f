"""The compile check: every Triton kernel config compiled for sm_80 and sm_90 (fp16, bf16) without a GPU.

tools/compile_report.py does the work. It runs in a subprocess with TRITON_INTERPRET removed from
the environment: this pytest session may be interpreting kernels (tests/conftest.py sets
TRITON_INTERPRET=1 without CUDA), and interpreted @triton.jit functions cannot be compiled.
Triton's on-disk cache is left on: its key covers the kernel source, constexprs, attributes,
options, target and triton version, so a hit is the very binary a fresh compile would give, and
re-runs take seconds (a cold run compiles ~300 kernels: about 2-3 minutes on 2 cores).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastgpt2.kernels import layernorm, linear

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "compile_report.py"


def _run_tool(*args, pythonpath=None, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run(
        [sys.executable, str(TOOL), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "report.json"
    proc = _run_tool("--json", str(out), "--jobs", "2")
    data = json.loads(out.read_text()) if out.exists() else None
    return proc, data


def test_every_kernel_compiles_within_limits(report):
    proc, data = report
    failing = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("FAIL")) or proc.stderr[-3000:]
    assert proc.returncode == 0, f"compile check failed:\n{failing}"
    assert data is not None and not data["failures"]
    assert "| kernel / config |" in proc.stdout  # the markdown table


def test_every_spec_of_every_present_module_is_reported(report):
    _, data = report
    assert data is not None
    present = set(data["present"])
    assert {"fastgpt2.kernels.layernorm", "fastgpt2.kernels.linear"} <= present
    attention_exists = (ROOT / "fastgpt2" / "kernels" / "attention.py").exists()
    assert ("fastgpt2.kernels.attention" in present) == attention_exists, "an existing module must not be skipped"
    for module, name in ((layernorm, "layernorm"), (linear, "linear")):
        for dtype in ("fp16", "bf16"):
            specs = module.compile_specs(dtype)
            assert any(s.launch_pdl for s in specs) == (module is linear) and not all(s.launch_pdl for s in specs)
            for cc in (80, 90):
                names = {s.name for s in specs if cc >= s.min_cc}  # PDL variants: sm_90 only
                rows = [r for r in data["rows"] if r["module"] == name and r["dtype"] == dtype and r["cc"] == cc]
                assert {r["name"] for r in rows} == names
                assert len(rows) == 2 * len(names)  # 16B-aligned and unaligned specializations
    for r in data["rows"]:
        if r["module"] == "linear":
            assert r["tensor_cores"] != "-", r["name"]
            if r["cc"] == 80:
                assert r["tensor_cores"] == "HMMA", r["name"]


UNIT_INTS_SCRIPT = textwrap.dedent('''
    import importlib, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, "tools")
    import compile_report

    present, _, failures = compile_report.discover()
    assert not failures, failures
    for name in present:
        seen = set()
        for spec in importlib.import_module(name).compile_specs("fp16"):
            if spec.fn in seen:
                continue
            seen.add(spec.fn)
            names = list(spec.fn.arg_names)
            fixed = {names[i] if isinstance(i, int) else i for i in spec.fn.do_not_specialize or ()}
            ints = [n for n, t in spec.signature.items() if t in ("i32", "i64") and n not in fixed]
            sig = dict(spec.signature, **{n: "constexpr" for n in ints})
            constexprs = dict(spec.constexprs, **{n: 1 for n in ints})
            triton.compile(ASTSource(fn=spec.fn, signature=sig, constexprs=constexprs),
                           target=GPUTarget("cuda", max(80, spec.min_cc), 32), options=compile_report.compile_options(spec))
            print("ok", spec.name, ints)
''')


def test_kernels_compile_with_unit_integer_arguments():
    """Triton's launcher turns an integer argument equal to 1 into a constant (N=1, a stride of 1):
    the kernels must still compile then (e.g. no ``.to()`` on what became a Python int)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", UNIT_INTS_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok linear.linear" in proc.stdout and "ok layernorm.add_layer_norm" in proc.stdout


def test_checker_catches_spills_smem_and_missing_tensor_cores(tmp_path):
    """The failure paths, on deliberately bad kernels in a throwaway package."""
    pkg = tmp_path / "fg2_compile_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "bad.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl
        from fastgpt2.kernels.contract import CompileSpec


        @triton.jit
        def _copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


        @triton.jit
        def _dot(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
            rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
            acc = tl.zeros((BM, BN), tl.float32)
            for k in range(0, 8):
                a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :] + k * BK)
                b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :] + k * BK * BN)
                acc = tl.dot(a, b, acc)
            tl.store(c_ptr + rm[:, None] * BN + rn[None, :], acc.to(c_ptr.dtype.element_ty))


        def compile_specs(dtype):
            p = f"*{dtype}"
            copy_sig = {"x_ptr": p, "y_ptr": p, "n": "i32", "BLOCK": "constexpr"}
            dot_sig = {"a_ptr": p, "b_ptr": p, "c_ptr": p, "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
            return [
                CompileSpec("probe.no_dot", _copy, copy_sig, {"BLOCK": 1024}, num_warps=4, num_stages=1, uses_dot=True),
                CompileSpec("probe.spill", _copy, copy_sig, {"BLOCK": 65536}, num_warps=1, num_stages=1),
                CompileSpec("probe.smem", _dot, dot_sig, {"BM": 128, "BN": 128, "BK": 128}, num_warps=8,
                            num_stages=8, uses_dot=True),
            ]
    '''))
    (pkg / "broken.py").write_text("raise RuntimeError('half-written kernel module')\n")

    proc = _run_tool("--modules", "fg2_compile_probe.bad,fg2_compile_probe.broken,fg2_compile_probe.absent",
                     "--dtypes", "fp16", "--align", "aligned", "--jobs", "1", pythonpath=tmp_path)
    assert proc.returncode == 1
    fails = [line for line in proc.stderr.splitlines() if line.startswith("FAIL")]
    assert any("probe.no_dot sm_80" in f and "no tensor-core instruction" in f for f in fails), fails
    assert any("probe.no_dot sm_90" in f and "no tensor-core instruction" in f for f in fails), fails
    assert any("probe.spill sm_80" in f and "spills" in f for f in fails), fails
    assert any("probe.smem sm_90" in f and "shared memory" in f and "> sm_90 limit 232448" in f for f in fails), fails
    assert any("fg2_compile_probe.broken: import failed" in f for f in fails), fails  # present but broken: not skipped
    assert "absent: fg2_compile_probe.absent" in proc.stdout  # missing: reported, not a failure


HANDOFF_SCRIPT = textwrap.dedent('''
    import re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastgpt2.kernels import attention, linear
    sys.path.insert(0, "tools")
    from compile_report import compile_options

    # every spec whose programs hand work to the last one to arrive: split-K, the layernorm epilogue,
    # the attention's split combine
    for module, handoff in ((linear, lambda s: s.constexprs["IS_SPLIT"] or s.constexprs["HAS_NORM"]),
                            (attention, lambda s: s.constexprs.get("WRITE_OUT") is False)):
        for spec in module.compile_specs("fp16"):
            if not handoff(spec):
                continue
            for cc in (80, 90):
                if cc < spec.min_cc:
                    continue
                ptx = triton.compile(ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs),
                                     target=GPUTarget("cuda", cc, 32), options=compile_options(spec)).asm["ptx"]
                atoms = set(re.findall(r"atom[.][a-z0-9_.]+", ptx))
                assert atoms == {"atom.global.gpu.acq_rel.add.u32"}, (spec.name, cc, atoms)
                assert "bar.sync" in ptx and "ld.global.cg" in ptx, (spec.name, cc)
            print("ok", spec.name)
''')


def test_last_arriver_handoff_is_ordered_in_the_ptx():
    """The cross-program handoffs (a GEMM tile's split-K sum, linear_norm's row normalisation, the
    attention's split combine) rely on: a CTA barrier after the partial stores, one gpu-scope
    acquire-release atomic add on the counter, and L2 (.cg) loads of the other programs' partials.
    The interpreter runs programs one by one and cannot show an ordering bug; the PTX can show the
    instructions are there."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", HANDOFF_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ok linear.linear[residual+layernorm] prefill" in proc.stdout and "split-K" in proc.stdout
    assert "ok attention.decode[fp16,split] D=64" in proc.stdout


PDL_SCRIPT = textwrap.dedent('''
    import re, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fastgpt2.kernels import attention, linear
    sys.path.insert(0, "tools")
    from compile_report import compile_options

    MEMORY = re.compile(r"\\b(ld|st|atom|red|cp)[.](global|async)")
    for module in (linear, attention):
        for spec in module.compile_specs("fp16"):
            if not spec.launch_pdl and not spec.name.startswith(("linear.linear[none] decode BM=16 BN=64",
                                                                "attention.decode[fp16,split] D=64")):
                continue  # every PDL variant, and two plain ones that must have no griddepcontrol
            ptx = triton.compile(ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs),
                                 target=GPUTarget("cuda", 90, 32), options=compile_options(spec)).asm["ptx"]
            body = ptx[ptx.index(".entry"):]
            if not spec.launch_pdl:
                assert "griddepcontrol" not in body and "prefetch" not in body, spec.name
                print("plain", spec.name)
                continue
            wait = body.find("griddepcontrol.wait")
            first_memory = MEMORY.search(body)
            assert wait >= 0, (spec.name, "no griddepcontrol.wait")
            assert "griddepcontrol.launch_dependents" in body, (spec.name, "no griddepcontrol.launch_dependents")
            assert first_memory is not None and wait < first_memory.start(), (spec.name, "memory access before the wait")
            prefetch = body.find("prefetch.global.L2")
            if module is linear and (spec.constexprs["IS_SPLIT"] or spec.constexprs["W_NK"]):
                # the weight slab, read-only, is prefetched into L2 before the wait
                assert 0 <= prefetch < wait, (spec.name, "no L2 prefetch of the weights before the wait")
            else:
                assert prefetch < 0, (spec.name, "an unsplit [K, N] GEMM or the attention prefetches")
            print("ok", spec.name)
''')


def test_pdl_variants_wait_before_any_memory_access_in_the_ptx():
    """A kernel launched with programmatic dependent launch may run while the previous kernel is still
    writing: its griddepcontrol.wait must come before its first global load, store or atomic (and
    launch_dependents must be there, or the launch gains nothing); before the wait a GEMM only
    prefetches its weights (read-only) into L2. The plain variants have none of it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", PDL_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    for kernel in ("ok linear.linear[residual+layernorm] decode",
                   "ok linear.linear[nk, no bias] prefill", "ok attention.decode[fp16,split] D=64"):
        assert any(line.startswith(kernel) and line.endswith("pdl") for line in ok), kernel
    assert proc.stdout.count("plain ") >= 2

"""transformers' own GPT-2 model tests, run once as they are and once with every GPT-2 model patched
by fastgpt2.patch_hf: a test that passes unpatched and fails patched is the drop-in's bug.

    python tools/hf_model_tests.py --tests DIR [--python PY] [--out DIR] [-- PYTEST ARGS]

DIR holds transformers' test tree for the installed release (``tests/models/gpt2/test_modeling_gpt2.py``
with the common tester mixins it imports: a checkout of the release's tag; the PyPI sdist ships only
the top-level ``tests/*.py``). Nothing of it is part of fastgpt2. PY is the Python whose transformers
is tested (default: this one); pytest runs in DIR, offline (HF_HUB_OFFLINE=1: tests that download
checkpoints fail alike in both runs).

The patched run loads this file as a pytest plugin (``-p hf_model_tests``, FASTGPT2_PATCH_ALL=1): every
GPT2Model is patched as its constructor returns (a head model's inner one included; a model built on
the meta device when from_pretrained returns it). So the tests that read
``config._attn_implementation`` right after construction see "fastgpt2". At the end the plugin writes
the routes every patched model took (patch_stats, summed) to $FASTGPT2_PATCH_STATS.

Prints both runs' counts, then every test that passed unpatched and did not pass patched, with the
patched failure's first line; writes OUT/summary.json; exits 1 if there is any.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import weakref
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

TEST_FILE = "tests/models/gpt2/test_modeling_gpt2.py"
ENV_FLAG = "FASTGPT2_PATCH_ALL"
ENV_STATS = "FASTGPT2_PATCH_STATS"


# -- the plugin (loaded by pytest in the patched run) ------------------------------------------------
_routes: Counter = Counter()
_live: weakref.WeakSet = weakref.WeakSet()


def _add_stats(stats: dict) -> None:
    _routes.update(stats)
    _routes["models"] += 1


def _patch(model) -> None:
    from fastgpt2.hf import is_patched, patch_hf

    if is_patched(model):
        return
    patch_hf(model)
    _live.add(model)
    state = model.__dict__["_fastgpt2_patch"]  # counts survive the model: summed when it is collected
    weakref.finalize(model, _add_stats, state.counts)


def _patch_every_gpt2() -> None:
    from transformers.models.gpt2 import modeling_gpt2 as m

    init = m.GPT2Model.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        first = next(self.parameters(), None)
        if first is not None and first.device.type != "meta":
            _patch(self)

    m.GPT2Model.__init__ = __init__
    from_pretrained = m.GPT2PreTrainedModel.from_pretrained.__func__

    def patched_from_pretrained(cls, *args, **kwargs):
        result = from_pretrained(cls, *args, **kwargs)
        model = result[0] if isinstance(result, tuple) else result
        gpt2 = getattr(model, "transformer", model)
        if isinstance(gpt2, m.GPT2Model):
            _patch(gpt2)
        return result

    m.GPT2PreTrainedModel.from_pretrained = classmethod(patched_from_pretrained)


def pytest_configure(config):
    if os.environ.get(ENV_FLAG) == "1":
        _patch_every_gpt2()


def pytest_unconfigure(config):
    if os.environ.get(ENV_FLAG) != "1" or not os.environ.get(ENV_STATS):
        return
    from fastgpt2.hf import patch_stats

    totals = Counter(_routes)
    for model in list(_live):
        totals.update(patch_stats(model))
        totals["models"] += 1
    Path(os.environ[ENV_STATS]).write_text(json.dumps(dict(sorted(totals.items())), indent=1))


# -- the runner ------------------------------------------------------------------------------------
def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """test id -> (passed | failed | error | skipped, first line of the message)."""
    out = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                text = (node.get("message") or node.text or "").strip()
                message = text.splitlines()[0][:300] if text else ""
                break
        out[name] = (outcome, message)
    return out


def _run(python: str, tests: Path, out: Path, patched: bool, extra: list[str]) -> tuple[dict, float, dict]:
    label = "patched" if patched else "unpatched"
    junit = out / f"{label}.xml"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    args = [python, "-m", "pytest", TEST_FILE, "-p", "no:cacheprovider", "-q", f"--junitxml={junit}", *extra]
    if patched:
        stats = out / "patched_routes.json"
        env.update({ENV_FLAG: "1", ENV_STATS: str(stats),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), env.get("PYTHONPATH")]))})
        args[3:3] = ["-p", "hf_model_tests"]
    start = time.perf_counter()
    with open(out / f"{label}.log", "w") as log:
        subprocess.run(args, cwd=tests, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    if not junit.exists():
        sys.exit(f"hf_model_tests: the {label} run wrote no report; see {out / (label + '.log')}")
    routes = json.loads((out / "patched_routes.json").read_text()) if patched else {}
    return _outcomes(junit), seconds, routes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tests", type=Path, required=True, help=f"the directory holding {TEST_FILE}")
    ap.add_argument("--python", default=sys.executable, help="the Python (venv) whose transformers is tested")
    ap.add_argument("--out", type=Path, default=Path("hf_model_tests.out"), help="reports and logs go here")
    ap.add_argument("pytest_args", nargs="*", help="after --: passed to both pytest runs (e.g. -k, -x)")
    args = ap.parse_args(argv)
    if not (args.tests / TEST_FILE).is_file():
        ap.error(f"{args.tests / TEST_FILE} does not exist: --tests takes the directory above transformers' tests/")
    args.out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([args.python, "-c", "import transformers; print(transformers.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    plain, plain_s, _ = _run(args.python, args.tests.resolve(), args.out.resolve(), False, args.pytest_args)
    patched, patched_s, routes = _run(args.python, args.tests.resolve(), args.out.resolve(), True, args.pytest_args)
    regressions = {}  # passed unpatched, not patched: the patched failure's message (or its outcome)
    for name, (outcome, _) in plain.items():
        got, message = patched.get(name, ("missing", ""))
        if outcome == "passed" and got != "passed":
            regressions[name] = message or got
    fixed = sorted(n for n, (o, _) in patched.items() if o == "passed" and plain.get(n, ("",))[0] != "passed")
    counts = {label: dict(Counter(o for o, _ in runs.values()))
              for label, runs in (("unpatched", plain), ("patched", patched))}
    print(f"transformers {version}: {TEST_FILE}")
    print(f"  unpatched {counts['unpatched']} in {plain_s:.0f} s")
    print(f"  patched   {counts['patched']} in {patched_s:.0f} s")
    print(f"  routes of the patched models: {routes}")
    for name, why in sorted(regressions.items()):
        print(f"  PASSES UNPATCHED, NOT PATCHED: {name}: {why}")
    for name in fixed:
        print(f"  passes patched only: {name}")
    summary = {"transformers": version, "counts": counts, "seconds": {"unpatched": plain_s, "patched": patched_s},
               "routes": routes, "regressions": regressions, "passes_patched_only": fixed,
               "unpatched_failures": {n: m for n, (o, m) in plain.items() if o in ("failed", "error")}}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"{len(regressions)} passed unpatched and not patched" + ("" if regressions else ": the drop-in passes"))
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())

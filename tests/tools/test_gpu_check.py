"""tools/gpu_check.sh, the prepared GPU check, end to end in its dry form (CUDA stages skipped, a tiny
CPU bench), and its timeouts: a stage past its timeout is reported "timeout" and its processes killed."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)
    spec.loader.exec_module(module)
    return module


gpu_check = _load()


def _run(tmp_path, *args, timeout=180):
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=timeout)


def test_dry_run_end_to_end(tmp_path):
    proc = _run(tmp_path, "--dry")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("\nstage "):]
    rows = {line.split()[0]: line for line in table.splitlines()[3:] if line.strip() and not line.startswith(" ")}
    for stage in gpu_check.STAGES:
        assert stage.name in rows, f"{stage.name} missing from the summary:\n{table}"
        if stage.needs_cuda and not stage.runs_dry:
            assert "skipped: no CUDA" in rows[stage.name]
    assert "no failures" in proc.stdout

    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert doc["dry"] is True and doc["failed"] == []
    by_name = {s["name"]: s for s in doc["stages"]}
    assert [s["name"] for s in doc["stages"]] == gpu_check.STAGE_NAMES
    assert by_name["environment"]["status"] == "ok" and by_name["environment"]["data"]["torch"]
    bench = by_name["bench_gpt2_fp16"]
    assert bench["status"] == "ok" and bench["data"]["rows"], bench
    assert (tmp_path / "out" / "bench_gpt2_fp16.out").exists()
    step_model = by_name["step_model"]
    if (ROOT / "tools" / "step_model.py").exists():
        assert step_model["status"] == "ok", step_model
    else:
        assert step_model["result"] == "skipped: tools/step_model.py not present"
    for stage in gpu_check.STAGES:
        if stage.needs_cuda and not stage.runs_dry:
            assert by_name[stage.name]["status"] == "skipped"


def test_stage_past_its_timeout_is_reported_and_killed(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # the stage starts a grandchild that would outlive it: the whole process group must go
    code = ("import subprocess, sys, time; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    start = time.monotonic()
    res = gpu_check.run_stage("sleeper", [sys.executable, "-c", code], 1.5, tmp_path / "out")
    assert time.monotonic() - start < 15
    assert res.status == "timeout" and res.result.startswith("timeout after 1.5 s"), res
    assert "started" in (tmp_path / "out" / "sleeper.out").read_text()
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the stage's grandchild {grandchild} outlived its timeout")


def test_failing_stage_is_fail_with_its_last_line(tmp_path):
    res = gpu_check.run_stage("boom", [sys.executable, "-c", "import sys; sys.exit('it broke')"], 30, tmp_path)
    assert res.status == "FAIL" and res.returncode == 1 and "it broke" in res.result


def test_timeout_option_through_the_command_line(tmp_path):
    proc = _run(tmp_path, "--dry", "--only", "environment", "--timeout", "environment=0.05")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert [(s["name"], s["status"]) for s in doc["stages"]] == [("environment", "timeout")]
    assert doc["failed"] == ["environment"]
    assert "FAILED: environment" in proc.stdout


def test_timeouts_fit_the_run():
    assert set(gpu_check.TIMEOUTS) == set(gpu_check.STAGE_NAMES)
    assert sum(gpu_check.TIMEOUTS.values()) <= 390  # 6.5 minutes; the run's whole budget is 7
    assert gpu_check.DEFAULT_BUDGET <= 420
    for name, seconds in gpu_check.TIMEOUTS.items():
        assert f"\n{name} " in gpu_check.__doc__ and f"{seconds} s" in gpu_check.__doc__


def test_inline_snippets_compile():
    for name in ("ENV_SNIPPET", "CKPT_SNIPPET", "PROFILE_SNIPPET", "PDL_SNIPPET"):
        compile(getattr(gpu_check, name), name, "exec")

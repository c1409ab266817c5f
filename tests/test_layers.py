"""The package's import graph: layers bottom to top, imports only downward, no cycle, no function-local
import of a fastgpt2 module without a reason beside it; and each module imports alone in a fresh
interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import fastgpt2

ROOT = Path(fastgpt2.__file__).parent
# bottom to top; a module may import only modules of lower layers (none of its own layer)
LAYERS = [
    ["fastgpt2.errors"],
    ["fastgpt2.kernels.contract"],
    ["fastgpt2.kernels.launch_checks"],
    ["fastgpt2.kernels.attention", "fastgpt2.kernels.layernorm", "fastgpt2.kernels.linear"],
    ["fastgpt2.runtime.config"],
    ["fastgpt2.runtime.loader", "fastgpt2.runtime.kv_cache", "fastgpt2.runtime.tokenizer",
     "fastgpt2.runtime.cpu_paths", "fastgpt2.runtime.plan"],
    ["fastgpt2.runtime.ops"],
    ["fastgpt2.runtime.model"],
    ["fastgpt2.runtime.sampling"],
    ["fastgpt2.runtime.graphs"],
    ["fastgpt2.runtime.engine"],
    ["fastgpt2.runtime.generate"],
    ["fastgpt2.runtime.step_count", "fastgpt2.hf"],
    ["fastgpt2.parity", "fastgpt2.benchmark", "fastgpt2.evaluate"],
    ["fastgpt2.serving_bench", "fastgpt2.server"],
    ["fastgpt2.serve_ray"],
    ["fastgpt2.cli"],
    ["fastgpt2.__main__", "fastgpt2"],
]
LAYER = {name: i for i, layer in enumerate(LAYERS) for name in layer}
PACKAGES = {"fastgpt2.kernels", "fastgpt2.runtime"}  # their __init__ holds no code and imports nothing
LAZY = "# lazy:"  # the marker of a function-local import's reason: on its line or the line above


def _module_name(path: Path) -> str:
    parts = ("fastgpt2",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imports(name: str, path: Path):
    """(target module, line, is function-local) for every fastgpt2 import in the file."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    local_lines = {n.lineno for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.split(".")[0] == "fastgpt2"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "fastgpt2":
                continue
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):  # one per module, in order
            yield target, node.lineno, node.lineno in local_lines


def test_every_module_has_a_layer():
    assert set(MODULES) - PACKAGES == set(LAYER), "add new modules to LAYERS (and keep the README's layout true)"


def test_imports_go_only_downward_and_local_ones_say_why():
    lines = {name: path.read_text().splitlines() for name, path in MODULES.items()}
    problems = []
    for name, path in MODULES.items():
        for target, line, local in _imports(name, path):
            if target in PACKAGES:
                continue  # `from ..kernels import attention` names its modules, checked on their own
            if target not in LAYER:
                problems.append(f"{name}:{line} imports {target}, which is not a module")
            elif name not in PACKAGES and LAYER[target] >= LAYER[name]:
                problems.append(f"{name}:{line} imports {target} (layer {LAYER[target]} >= its own {LAYER[name]})")
            if local and not any(LAZY in text for text in lines[name][max(0, line - 2):line]):
                problems.append(f"{name}:{line} imports {target} inside a function without a '{LAZY} reason' comment")
    for package in PACKAGES:
        assert not list(_imports(package, MODULES[package])), f"{package}/__init__.py must import nothing"
    assert not problems, "\n".join(problems)


def test_the_checker_sees_an_upward_and_an_unexplained_local_import(tmp_path):
    """The checker itself can fail: a kernel importing the model, and a model importing hf in a function."""
    kernel, model = tmp_path / "k.py", tmp_path / "m.py"
    kernel.write_text("from ..runtime.model import GPT2Network\n")
    model.write_text("def f():\n    from ..hf import patch_hf\n")
    assert list(_imports("fastgpt2.kernels.k", kernel)) == [("fastgpt2.runtime.model", 1, False)]
    assert list(_imports("fastgpt2.runtime.m", model)) == [("fastgpt2.hf", 2, True)]


@pytest.mark.parametrize("name", sorted(set(MODULES) - {"fastgpt2.__main__"}))
def test_each_module_imports_alone_in_a_fresh_interpreter(name):
    """No module relies on another having been imported first; none below the kernels' own files (nor the
    package) imports triton, whose mode is fixed at its first import."""
    code = f"import sys, {name}; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    kernel_file = name.startswith("fastgpt2.kernels.") and name not in ("fastgpt2.kernels.contract",)
    assert out.stdout.split()[-1] == str(kernel_file), f"{name} imports triton: {out.stdout}"

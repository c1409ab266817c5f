"""Test-wide set-up. Without CUDA, Triton kernels run in Triton's interpreter: the switch must be
set before anything imports triton, so it lives here, ahead of every test module."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def pdl_launches(monkeypatch):
    """Every Triton launch from here on, recorded at ``kernel[grid](...)`` as (kernel name, USE_PDL,
    launch_pdl). Without CUDA, pdl=True is let through the checks the interpreter would (rightly)
    fail (``resolve_pdl``, the launchers' ``pdl_launch_options``) and each recorded launch runs as a
    plain one (the interpreter cannot run griddepcontrol; the PDL kernels themselves are checked by
    tests/compile's PTX test and the GPU tests)."""
    from triton.runtime.jit import KernelInterface

    from fastgpt2 import benchmark
    from fastgpt2.kernels import attention, linear
    from fastgpt2.runtime import engine as engine_module
    from fastgpt2.runtime import model as model_module

    interpreted = not torch.cuda.is_available()
    if interpreted:
        for module in (model_module, engine_module, benchmark):
            monkeypatch.setattr(module, "resolve_pdl", lambda pdl, backend, dev: pdl)
        for module in (attention, linear):
            monkeypatch.setattr(module, "pdl_launch_options", lambda op, pdl, dev, kernel: {"launch_pdl": True} if pdl else {})
    launches = []
    original = KernelInterface.__getitem__

    def recorded(kernel, grid):
        launch = original(kernel, grid)

        def run(*args, **kwargs):
            name = getattr(kernel, "__name__", None) or kernel.fn.__name__
            launches.append((name, kwargs.get("USE_PDL", False), kwargs.get("launch_pdl", False)))
            if interpreted:
                kwargs = dict(kwargs, USE_PDL=False)
                kwargs.pop("launch_pdl", None)
            return launch(*args, **kwargs)

        return run

    monkeypatch.setattr(KernelInterface, "__getitem__", recorded)
    return launches

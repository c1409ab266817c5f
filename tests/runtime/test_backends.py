import pytest
import torch

import fastgpt2
from fastgpt2 import BackendError

CFG = fastgpt2.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16)


def test_auto_is_torch_on_cpu():
    assert fastgpt2.GPT2.from_config(CFG, device="cpu").backend == "torch"


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendError, match="runs only in Triton's interpreter: set TRITON_INTERPRET=1"):
        fastgpt2.GPT2.from_config(CFG, device="cpu", backend="triton")


def test_unknown_backend_and_dtype():
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        fastgpt2.GPT2.from_config(CFG, backend="cuda")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        fastgpt2.GPT2.from_config(CFG, dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="sees no CUDA device"):
        fastgpt2.GPT2.from_config(CFG, device="cuda")


def test_importing_fastgpt2_imports_no_triton():
    import subprocess
    import sys

    code = "import sys, fastgpt2; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

import pytest
import torch

import fastgpt2
from fastgpt2 import BackendError
from fastgpt2.runtime import cpu_paths

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


def test_cpu_bfloat16_prepacks_gemm_weights_and_matches_plain_addmm(monkeypatch):
    """The torch backend's CPU bf16 path this CPU runs (oneDNN prepacked GEMMs on AVX-512 where
    oneDNN runs bf16, else addmm on [N, K]-stored weights) computes the same model as the plain addmm path, within bf16
    rounding; the GEMM weights are prepacked exactly when the chosen path says so."""

    cfg = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32)
    chosen = fastgpt2.GPT2.from_config(cfg, dtype=torch.bfloat16, seed=5)
    path = chosen.ops.cpu_path
    assert path == cpu_paths.choose_cpu_path(torch.bfloat16) and path.gemm in ("onednn_packed", "addmm_nk")
    assert path.name.startswith("bf16: ") and path.capability in path.name
    packed = path.gemm == "onednn_packed"
    assert chosen.ops.packed == packed and all(layer.qkv_w.is_mkldnn == packed for layer in chosen.layers)
    monkeypatch.setattr(cpu_paths, "_FORCE_CPU_PATH", "addmm")
    plain = fastgpt2.GPT2.from_config(cfg, dtype=torch.bfloat16, seed=5)
    assert not plain.ops.packed and plain.ops.cpu_path.gemm == "addmm"
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    a, b = chosen(ids).float(), plain(ids).float()
    assert (a - b).abs().max() <= 0.02 * b.abs().max()
    assert torch.equal(chosen.generate(ids, 8), plain.generate(ids, 8))
    monkeypatch.setattr(cpu_paths, "_FORCE_CPU_PATH", None)
    fp32 = fastgpt2.GPT2.from_config(cfg, dtype=torch.float32, seed=5)
    assert not fp32.ops.packed  # fp32: MKL's addmm for one row, packed lazily (or never) from 2
    assert fp32.ops.cpu_path.gemm in ("onednn_from_2", "addmm")


def test_cpu_lm_head_equals_the_plain_product():
    from fastgpt2.runtime.ops import TorchOps

    g = torch.Generator().manual_seed(2)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        ops = TorchOps(torch.device("cpu"), dtype)
        plain = torch.randn(301, 48, generator=g).to(dtype)
        w = ops.prepare_lm_head(plain)
        assert torch.equal(w, plain) and w.stride() == ((1, 301) if dtype == torch.float32 else (48, 1))
        for n in (1, 2, 5, 8, 64, 65, 200):  # the GEMV, the packed copy (fp32) or w @ y^T, y @ w^T
            y = torch.randn(n, 48, generator=g).to(dtype)
            logits = ops.lm_head(y, w)
            ref = y.double() @ w.double().t()
            assert logits.dtype == dtype and logits.shape == (n, 301) and logits.is_contiguous()
            assert (logits.double() - ref).abs().max() <= tol * ref.abs().max(), (dtype, n)


def test_cpu_float32_model_keeps_one_column_major_table_for_embedding_and_head():
    cfg = fastgpt2.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=97, n_positions=16)
    fp32 = fastgpt2.GPT2.from_config(cfg, dtype=torch.float32, seed=6)
    assert fp32.wte is fp32.lm_head is fp32.weights["wte.weight"]  # no second copy of the table
    assert fp32.wte.stride() == (1, 97)
    assert fp32.ops.cpu_path.dtype == torch.float32  # the head's layout holds on every fp32 path
    bf16 = fastgpt2.GPT2.from_config(cfg, dtype=torch.bfloat16, seed=6)  # any bf16 path: a row-major table
    assert bf16.ops.cpu_path.gemm in ("onednn_packed", "addmm_nk") and bf16.wte is bf16.lm_head
    assert bf16.wte.is_contiguous() and torch.equal(bf16.wte, fp32.wte.to(torch.bfloat16))
    ids = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(7))
    h = fp32.wte[ids]  # the gather from the column-major table is the plain one
    assert torch.equal(h, fp32.wte.contiguous()[ids])


def test_triton_model_built_on_a_cpu_float32_models_weights_gets_a_row_major_table():
    """The torch model's column-major table, handed to a triton model (TRITON_INTERPRET=1 here), is
    copied row-major for the embedding kernel, and both compute the same logits."""
    cfg = fastgpt2.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=97, n_positions=16)
    torch_model = fastgpt2.GPT2.from_config(cfg, dtype=torch.float32, backend="torch", seed=8)
    assert not torch_model.wte.is_contiguous()
    triton_model = fastgpt2.GPT2(cfg, torch_model.weights, device="cpu", dtype=torch.float32, backend="triton")
    assert triton_model.wte.is_contiguous() and triton_model.wte is triton_model.lm_head
    assert torch.equal(triton_model.wte, torch_model.wte)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(9))
    ref = torch_model(ids)
    assert (triton_model(ids) - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_cpu_float32_packs_lazily_from_2_rows_and_matches_addmm():
    from fastgpt2.runtime.ops import TorchOps

    ops = TorchOps(torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(100, 300, generator=g), torch.randn(300, generator=g)
    packs = 1 if ops.cpu_path.gemm == "onednn_from_2" else 0  # the path this CPU runs
    for m in (1, 2, 7, 33):
        x = torch.randn(m, 100, generator=g)
        ref = torch.addmm(b.double(), x.double(), w.double())
        assert (ops.linear(x, w, b).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        # a packed copy exists only once a call had >= 2 rows, and only where this CPU runs oneDNN fp32
        assert len(ops.lazy_packed or {}) == (0 if m == 1 else packs), m
    assert TorchOps.PACK_FROM_ROWS == 2


def test_cpu_float32_packed_copy_follows_the_weight_not_its_address():
    """The lazily packed copy is keyed by the weight tensor and its version: a weight updated in place
    is packed again, and a new tensor on reused storage never gets another weight's packed copy."""
    from fastgpt2.runtime.ops import TorchOps

    if cpu_paths._onednn_probe(torch.float32) is not None:
        pytest.skip(f"oneDNN fp32 packing does not run here ({cpu_paths._onednn_probe(torch.float32)}; "
                    f"capability {torch.backends.cpu.get_cpu_capability()})")
    ops = TorchOps(torch.device("cpu"), torch.float32, _cpu_path="onednn_from_2")
    g = torch.Generator().manual_seed(4)
    storage = torch.randn(64 * 48, generator=g)
    w, b, x = storage.view(64, 48), torch.randn(48, generator=g), torch.randn(3, 64, generator=g)

    def check(weight):
        ref = torch.addmm(b.double(), x.double(), weight.double())
        assert (ops.linear(x, weight, b).double() - ref).abs().max() <= 1e-5 * ref.abs().max()

    check(w)
    w.mul_(-2.0)  # in place: same tensor, same address, new values
    check(w)
    other = storage.view(48, 64).t()  # another tensor over the same storage (same data_ptr), other values
    assert other.data_ptr() == w.data_ptr()
    check(other)
    assert len(ops.lazy_packed) == 2  # one entry per live weight tensor


@pytest.mark.parametrize("S", [1, 3])
def test_torch_decode_separate_left_padded_matches_the_kernels_reference(S):
    """TorchOps' kv_start (the drop-in's left-padded decode): keys before kv_start[b] are not seen;
    the padding holds huge values, which would dominate the softmax if they were."""
    from fastgpt2.kernels.attention import separate_attention_ref
    from fastgpt2.runtime.ops import TorchOps

    g = torch.Generator().manual_seed(41)
    B, H, D, past = 3, 2, 32, 11
    q = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, past + S + 2, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, past + S + 2, D, generator=g, dtype=torch.float64)
    starts = torch.tensor([0, 5, 11], dtype=torch.int32)
    for b, k0 in enumerate(starts.tolist()):
        k[b, :, :k0], v[b, :, :k0] = 1e4, 1e4
    ops = TorchOps(torch.device("cpu"), torch.float64)
    got = ops.decode_attention_separate(q, k, v, past, 0.3, False, starts)  # [B, S, H*D]
    torch.testing.assert_close(got, separate_attention_ref(q, k, v, past, 0.3, starts), rtol=1e-12, atol=1e-12)
    plain = ops.decode_attention_separate(q, k, v, past, 0.3, False)
    assert torch.equal(plain[0], got[0]) and not torch.allclose(plain[1:], got[1:])

"""Helpers the kernel tests share: per-case seeds, float64 references, poisoned outputs."""
import zlib

import torch


def case_seed(*key) -> int:
    """A seed of its own for every test case (fresh inputs per case, reproducible)."""
    return zlib.crc32(repr(key).encode())


def f64(t):
    """The float64 copy the references run on (None stays None)."""
    return None if t is None else t.double()


def poisoned(m, n, dtype):
    """An [m, n] output filled with NaN, so that an element the kernel never writes fails the test."""
    return torch.full((m, n), float("nan"), dtype=dtype)


ATOL = {"fp16": 2.0**-10, "bf16": 2.0**-7}  # one unit in the last place at 1.0


def check_tolerance(out, ref64, lowp_refs, dname):
    """The kernels' tolerance. fp32: max|out - ref64| / max|ref64| <= 1e-5 (normwise relative).
    fp16/bf16: max|out - ref64| <= 2 * (the largest error of `lowp_refs()`, the same computation by
    PyTorch at that dtype, against ref64) + ATOL[dname]. `out` must hold no NaN (outputs are poisoned)."""
    assert not torch.isnan(out).any(), "poisoned output not fully written"
    err = (out.double() - ref64).abs().max().item()
    if dname == "fp32":
        rel = err / ref64.abs().max().item()
        assert rel <= 1e-5, f"fp32 normwise relative error {rel:.3g} > 1e-5"
        return
    torch_err = max((r.double() - ref64).abs().max().item() for r in lowp_refs())
    assert err <= 2 * torch_err + ATOL[dname], f"{dname} error {err:.3g} > 2 * torch's {torch_err:.3g} + atol"

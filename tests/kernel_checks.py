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

"""The CUDA-graph settings shared by the engine's decode step (runtime/engine.py) and generation
(runtime/generate.py): whether a step is graphed (``resolve_use_cuda_graph``), the error a graph
request that cannot be served raises (``GraphError``), and the power-of-two length buckets
(``graph_cache_len``) that let a few sizes of cache (and so of captured step) serve every length.
"""
from __future__ import annotations

import torch

from ..errors import FastGPT2Error


class GraphError(FastGPT2Error):
    """A CUDA-graph request that cannot be served."""


def resolve_use_cuda_graph(use_cuda_graph: bool | None, device: torch.device) -> bool:
    """None: graphed on CUDA, eager elsewhere; True where there is no CUDA device is an error."""
    if use_cuda_graph is None:
        return device.type == "cuda"
    if use_cuda_graph and device.type != "cuda":
        raise GraphError(f"use_cuda_graph=True needs a CUDA device; this model is on {device}")
    return use_cuda_graph


def graph_cache_len(needed: int, n_positions: int) -> int:
    """Cache length of a graphed step: the next power of two >= needed (so graphs are reused
    across prompt lengths), at most n_positions."""
    length = 16
    while length < needed:
        length *= 2
    return min(length, n_positions)

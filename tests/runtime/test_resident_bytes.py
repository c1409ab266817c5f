"""Nothing held twice (issue 23): a model and its engine keep the checkpoint's bytes once plus one KV
cache, whatever the dtype's CPU path prepares (column-major copies, oneDNN-packed forms) and whatever
mix of sampling settings the engine serves; plain_weights() gives back every checkpoint value."""
import pytest
import torch

import fastgpt2
from fastgpt2.runtime.engine import Engine
from fastgpt2.runtime.loader import expected_shapes
from fastgpt2.runtime.sampling import Sampling

CFG = fastgpt2.GPT2Config(n_layer=3, n_embd=128, n_head=4, vocab_size=211, n_positions=64)


def _tensors(obj, seen, depth=0):
    """Every tensor reachable from obj through attributes, dicts, lists, tuples (not through modules'
    code: models, ops, caches, engines and the dataclasses they hold)."""
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v, seen, depth + 1)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("fastgpt2"):
        for v in vars(obj).values():
            yield from _tensors(v, seen, depth + 1)


def resident_bytes(*objs) -> int:
    """Bytes of the distinct storages behind every tensor reachable from objs (a packed oneDNN tensor,
    which exposes no storage, counts its elements)."""
    storages, total = set(), 0
    seen = set()
    for obj in objs:
        for t in _tensors(obj, seen):
            if t.is_mkldnn:
                total += t.numel() * t.element_size()
                continue
            key = t.untyped_storage().data_ptr()
            if key not in storages:
                storages.add(key)
                total += t.untyped_storage().nbytes()
    return total


def checkpoint_bytes(cfg, dtype) -> int:
    shapes = expected_shapes(cfg)
    return sum(torch.Size(s).numel() for k, s in shapes.items()
               if not (k == "lm_head.weight" and cfg.tie_word_embeddings)) * dtype.itemsize


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_model_and_its_engine_hold_the_weights_once_and_one_cache(dtype):
    model = fastgpt2.GPT2.from_config(CFG, dtype=dtype, seed=1)
    engine = Engine(model, max_batch=5)
    settings = [Sampling(), Sampling(True), Sampling(True, 0.7, 5), Sampling(True, 1.3, None, 0.8),
                Sampling(True, 0.9, 12, 0.9)]
    for i, s in enumerate(settings):  # five requests, five settings: one cache
        engine.add([1, 2, 3], 4, sampling=s, seed=i)
    while engine.busy:
        engine.step()
    cache = engine.cache
    cache_bytes = (cache.k.numel() + cache.v.numel()) * dtype.itemsize
    expected = checkpoint_bytes(CFG, dtype) + cache_bytes
    held = resident_bytes(model, engine)
    assert expected <= held <= 1.05 * expected, (model.ops.cpu_path.name, held, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plain_weights_give_back_every_checkpoint_value(dtype):
    g = torch.Generator().manual_seed(2)
    weights = {k: torch.randn(s, generator=g) for k, s in expected_shapes(CFG).items() if k != "lm_head.weight"}
    model = fastgpt2.GPT2(CFG, weights, dtype=dtype)
    plain = model.plain_weights()
    assert set(plain) == set(weights)
    for key, value in weights.items():
        assert plain[key].shape == value.shape and torch.equal(plain[key], value.to(dtype)), key

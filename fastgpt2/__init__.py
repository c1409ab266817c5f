"""fastgpt2: GPT-2 inference on hand-written Triton kernels, checked against transformers.

    import fastgpt2
    model = fastgpt2.GPT2.from_pretrained("gpt2")        # a directory or a hub id (hub cache)
    ids = model.generate(input_ids, max_new_tokens=32)

Importing fastgpt2 touches no GPU and compiles nothing.
"""
from .errors import BackendError, FastGPT2Error
from .runtime.config import ConfigError, GPT2Config
from .runtime.kv_cache import CacheError, KVCache
from .runtime.loader import CheckpointError
from .runtime.engine import Engine, Request
from .runtime.generate import GPT2
from .runtime.sampling import Sampling
from .runtime.model import InputError
from .hf import FallbackWarning, HFModelError, UntestedTransformersWarning, patch_hf, unpatch_hf

__all__ = [
    "GPT2", "GPT2Config", "KVCache", "Engine", "Request", "Sampling", "patch_hf", "unpatch_hf",
    "FastGPT2Error", "BackendError", "CacheError", "CheckpointError", "ConfigError", "HFModelError", "InputError",
    "FallbackWarning", "UntestedTransformersWarning",
]
__version__ = "0.1.0"

"""Drop-in: run a live transformers GPT-2 model on fastgpt2's ops, and share its weights with fastgpt2.

    import fastgpt2
    from transformers import GPT2LMHeadModel, pipeline
    model = GPT2LMHeadModel.from_pretrained("gpt2")
    fastgpt2.patch_hf(model)                  # in place; returns model; no parameter is copied
    pipeline("text-generation", model=model, tokenizer=...)("Hello", max_length=30)
    fastgpt2.unpatch_hf(model)                # back to transformers' own code, bit for bit

Tested with transformers 5.17.0 to 5.25.0 (``TESTED_TRANSFORMERS``; torch 2.13 CPU, backend="torch",
and the Triton kernels under TRITON_INTERPRET=1). Older releases are refused; a newer one runs after
one ``UntestedTransformersWarning``. model_from_hf only reads weights and works with any 5.x.

patch_hf takes a GPT2LMHeadModel, a GPT2Model or another GPT-2 head model (the GPT2Model inside is
patched); anything else is an ``HFModelError`` naming the class. backend="triton" needs head_dim in
(32, 64, 128).

Only transformers' public extension points and leaf modules whose forward has been the same through
5.x are used; GPT2Model / GPT2Block / GPT2Attention keep transformers' own forward, so its cache
(DynamicCache, StaticCache, beam reordering), masks, generation utilities and argument names (5.24
renamed ``past_key_values`` to ``cache``) stay transformers' business:

- attention: ``AttentionInterface.register("fastgpt2", ...)`` and
  ``AttentionMaskInterface.register("fastgpt2", ...)`` (the mask is transformers' own SDPA mask), selected
  with ``model.set_attn_implementation("fastgpt2")``. transformers updates its cache first and hands over
  query [B, H, S, D] and the whole key/value [B, H, T, D]; each call takes one route, counted in
  ``patch_stats(model)``:

  ``"prefill"``  ops.prefill_attention_separate (the kernel): causal over the first S keys, no padding
                 (mask None with S > 1, as SDPA's is_causal; or a mask equal to that: StaticCache's
                 upper-left prefill, eager-style float masks).
  ``"decode"``   ops.decode_attention_separate (the kernel): S <= 8 new tokens over the cache behind
                 them (mask None with S == 1, or a mask equal to causal at that offset, StaticCache's
                 included), left-padded batches too (greedy, sampling, beam search over padded
                 prompts: the mask's per-sequence first key is the kernel's kv_start, the padding is
                 not read). The cache is read, never written a second time.
  ``"sdpa"``     torch's scaled_dot_product_attention with transformers' mask: the prefill of a padded
                 batch, other masks, more than 8 new tokens over a past. Same math, not a fallback.

  The softmax scale is the ``scaling`` transformers passes (``module.scaling`` when it passes
  none); ``module.reorder_and_upcast_attn`` is read here (transformers honours it only in "eager").
- every ``nn.LayerNorm`` (ln_1, ln_2, ln_f): ``ops.layer_norm``; every ``GPT2MLP``:
  ``ops.linear(c_fc, activation)`` then ``ops.linear(c_proj)``; the self-attention's ``Conv1D``s
  (c_attn, c_proj): ``ops.linear``. Weights are read from the modules at each call.
- the GPT2Model gets a forward pre-hook (reading its arguments by name) and a forward hook: the
  model-level guards below, and a check that every layer's attention went through fastgpt2.

A patched model accepts every call the unpatched one accepts and returns the same. The keyword
arguments GPT-2's attention receives through transformers' ``**kwargs`` (the model's own extra keywords,
handed down to every layer) are sorted by ``_ATTENTION_KWARGS``: one that cannot change attention's
result (``position_ids``, ``use_cache``, ``num_items_in_batch``, ``head_mask=None``, ...) is served by the
kernels; one that changes it (a real ``head_mask``, ``output_attentions=True``) and one never seen before
(``"fallback:argument:<name>"``) go to transformers' own attention with the argument, for that call.
A patched leaf forward given arguments transformers never passes runs the module's own forward with
them. Nothing is dropped, and nothing that works unpatched raises. patch_hf inspects, by name, the
signatures and attributes it relies on and refuses a release that changed them (``HFModelError``
naming the release and the tested range), at patch time.

What falls back to transformers' own code, for that call, with a ``FallbackWarning`` (once per
model per reason; counted as ``"fallback:<reason>"``): ``output_attentions=True`` (eager attention,
which returns the weights), cross-attention (``encoder_hidden_states``), a head mask, autograd (grad
enabled while parameters require grad), train mode with dropout > 0, an activation fastgpt2 does not
serve, inputs on another device or dtype than the model had when patched, an argument fastgpt2 has not
seen, another attention implementation selected after patch_hf (``set_attn_implementation("eager")``,
as assisted decoding's assistant and transformers' own tests do: the whole call, until patch_hf
again). Never silently a different result. A model that patch_hf never saw but whose config names
fastgpt2's attention (built on a patched model's config) runs transformers' SDPA, warned once.

Under torch.compile the patched forwards, hooks and attention step aside and dynamo traces
transformers' own code (fullgraph works; the kernels and the routing, which reads the mask on the
host, run eagerly only); nothing is counted or warned there.

What differs from an unpatched model, by construction: ``config._attn_implementation`` reads
"fastgpt2" after patch_hf, and transformers' config refuses ``config.output_attentions = True`` for
any implementation but "eager" (pass ``output_attentions=True`` to the call instead: served by
transformers' eager attention).

transformers 5.25 kernelizes models by default (``use_kernels``; ``train()`` / ``eval()`` re-apply it):
the ``kernels`` library swaps the forward of hub-decorated activations only (for GPT-2, ``mlp.act``),
which the patched GPT2MLP does not call; transformers' own MLP, on a fallback, calls it as unpatched.

``model_from_hf(hf_model, backend)`` builds a fastgpt2 ``GPT2`` (its own KV cache, generation, CUDA
graphs) whose weights are the very tensors of the transformers model (same data_ptr).
"""
from __future__ import annotations

import contextvars
import copy
import functools
import inspect
import os
import re
import sys
import types
import warnings
from collections import Counter

import torch
import torch.nn.functional as F

from .kernels.contract import HEAD_DIMS, MAX_DECODE_TOKENS, causal_visible
from .runtime.config import HF_ACTIVATIONS
from .runtime.generate import GPT2
from .runtime.loader import HFModelError, find_gpt2, gpt2_classes
from .runtime.ops import make_ops, resolve_backend

TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")  # the oldest and the newest release the tests ran on
ATTN_IMPLEMENTATION = "fastgpt2"  # the name registered with transformers' attention interfaces

_STATE_ATTR = "_fastgpt2_patch"  # the _PatchState, on the GPT2Model
_SLOT_ATTR = "_fastgpt2_slot"  # a _Slot, on each patched module (the attention modules included)
# set while a call that cannot be served runs transformers' own code: every patched module defers
_CALL_FALLBACK: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgpt2_hf_fallback", default=None)
# what patch_hf relies on, checked by name at patch time
_GPT2_ATTENTION_ATTRS = ("scaling", "reorder_and_upcast_attn", "is_cross_attention", "layer_idx", "num_heads",
                         "head_dim", "c_attn", "c_proj", "attn_dropout", "_upcast_and_reordered_attn")
_GPT2_MODEL_PARAMS = ("attention_mask", "encoder_hidden_states", "use_cache")

# (reason, detail) of a call that runs on transformers' own code, shared by the model-level and the
# module-level checks
_AUTOGRAD = ("autograd", "gradients were asked for (grad enabled and parameters require grad), and fastgpt2's "
                         "kernels are inference-only: wrap the call in torch.no_grad() / torch.inference_mode() "
                         "or call model.requires_grad_(False)")
_TRAINING = ("training", "the model is in train mode with dropout > 0, which fastgpt2 does not apply; call model.eval()")
_OUTPUT_ATTENTIONS = ("output_attentions", "output_attentions=True is not served (fastgpt2's kernels never "
                                           "materialise attention weights)")
_CROSS_ATTENTION = ("cross-attention", "cross-attention (encoder_hidden_states) is not served")
_HEAD_MASK = ("head_mask", "a head mask is not served")


def _any(value) -> bool:
    return True


def _compiling() -> bool:
    """Under torch.compile (dynamo tracing): the patched model traces transformers' own code, as
    unpatched; fastgpt2's kernels and its routing (which reads the mask on the host) run eagerly only."""
    return torch.compiler.is_compiling()


# The keyword arguments GPT-2's attention function receives through **kwargs (read from
# modeling_gpt2 of 5.17.0 and 5.25.0: GPT2Model hands position_ids, use_cache and its own **kwargs
# down to every layer; generation adds cache_position, the Trainer and the loss their keywords): name ->
# (the values the kernels serve, the fallback reason for any other value). A name not here is one
# fastgpt2 has never seen: transformers' own attention serves that call, with the argument.
_ATTENTION_KWARGS = {
    "position_ids": (_any, None),  # the positions are already in the embeddings
    "cache_position": (_any, None),  # transformers already updated its cache
    "use_cache": (_any, None),
    # the causal-LM loss's own keywords (transformers' ForCausalLMLoss), not read by attention
    "num_items_in_batch": (_any, None),  # its normaliser (the Trainer passes it)
    "ignore_index": (_any, None),
    "shift_labels": (_any, None),
    "output_hidden_states": (_any, None),  # transformers' output capture, not read by attention
    "head_mask": (lambda v: v is None, _HEAD_MASK),
    "output_attentions": (lambda v: not v, _OUTPUT_ATTENTIONS),
}


def _kwargs_reason(kwargs: dict) -> tuple[str, str] | None:
    """Why the kernels cannot serve an attention call given these **kwargs (reason, detail), or None."""
    for name, value in kwargs.items():
        if name not in _ATTENTION_KWARGS:
            return (f"argument:{name}", f"the attention got {name}=, an argument fastgpt2 has not seen from "
                                        f"transformers {_tested_range()}; transformers' own attention serves it")
        served, why = _ATTENTION_KWARGS[name]
        if not served(value):
            return why
    return None


class FallbackWarning(UserWarning):
    """A call (or part of one) that fastgpt2 does not serve ran on transformers' own code."""


class UntestedTransformersWarning(UserWarning):
    """transformers is newer than the newest release patch_hf was tested with."""


def _release(version: str) -> tuple[int, ...]:
    """'5.24.0' -> (5, 24, 0); '5.25.0.dev0' -> (5, 25, 0)."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def _tested_range() -> str:
    return f"{TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]}"


_warned_untested: set[str] = set()


def _check_transformers_version(version: str | None = None) -> str:
    """The installed transformers release; below the tested range an HFModelError, above it one
    UntestedTransformersWarning per process."""
    if version is None:
        import transformers

        version = transformers.__version__
    if _release(version) < _release(TESTED_TRANSFORMERS[0]):
        raise HFModelError(
            f"patch_hf needs transformers >= {TESTED_TRANSFORMERS[0]}; this is transformers {version} "
            f"(tested range {_tested_range()}): pip install 'transformers>={TESTED_TRANSFORMERS[0]}'")
    if _release(version) > _release(TESTED_TRANSFORMERS[1]) and version not in _warned_untested:
        _warned_untested.add(version)
        warnings.warn(
            f"fastgpt2.patch_hf was tested with transformers {_tested_range()}; this is {version}. It checks the "
            f"signatures it relies on and refuses a release that changed them, but run `fastgpt2 parity` on your "
            f"model before trusting it", UntestedTransformersWarning, stacklevel=3)
    return version


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _check_api(m, gpt2, version: str) -> None:
    """Everything patch_hf relies on, by name; a release that changed any of it is refused."""
    problems = []
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError as exc:
        problems.append(f"transformers' attention interfaces ({exc})")
    else:
        for name, obj in (("AttentionInterface.register", AttentionInterface),
                          ("AttentionMaskInterface.register", AttentionMaskInterface)):
            if not callable(getattr(obj, "register", None)):
                problems.append(name)
        if "attention_mask" not in _params(sdpa_mask):
            problems.append("masking_utils.sdpa_mask(attention_mask=...)")
    if not callable(getattr(gpt2, "set_attn_implementation", None)):
        problems.append("PreTrainedModel.set_attn_implementation")
    expected = {"GPT2MLP.forward": (m.GPT2MLP.forward, ["self", "hidden_states"]),
                "Conv1D.forward": (m.Conv1D.forward, ["self", "x"]),
                "nn.LayerNorm.forward": (torch.nn.LayerNorm.forward, ["self", "input"])}
    for name, (fn, params) in expected.items():
        if _params(fn) != params:
            problems.append(f"{name}{tuple(_params(fn))} (expected {tuple(params)})")
    model_params = _params(m.GPT2Model.forward)
    problems += [f"GPT2Model.forward({p}=...)" for p in _GPT2_MODEL_PARAMS if p not in model_params]
    if len(gpt2.h):  # every block is built alike: the first one stands for all
        block = gpt2.h[0]
        problems += [f"GPT2Attention.{a}" for a in _GPT2_ATTENTION_ATTRS if not hasattr(block.attn, a)]
        problems += [f"Conv1D.{a}" for a in ("weight", "bias", "nf") if not hasattr(block.attn.c_attn, a)]
        problems += [f"GPT2MLP.{a}" for a in ("c_fc", "c_proj", "act", "dropout") if not hasattr(block.mlp, a)]
    if problems:
        raise HFModelError(
            f"transformers {version} changed what fastgpt2.patch_hf relies on: {', '.join(sorted(set(problems)))}. "
            f"patch_hf is tested with transformers {_tested_range()}; install one of those "
            f"(pip install 'transformers>={TESTED_TRANSFORMERS[0]},<={TESTED_TRANSFORMERS[1]}') or use "
            f"fastgpt2.GPT2.from_hf(model), which only reads the weights")


def cache_argument() -> str:
    """The name under which this transformers release's GPT-2 forward takes and returns the cache:
    "cache" from 5.24, "past_key_values" before (5.24 deprecated the old name, removed in 5.40)."""
    m = gpt2_classes()
    return "cache" if "cache" in _params(m.GPT2Model.forward) else "past_key_values"


# -- the patch state -------------------------------------------------------------------------------
class _PatchState:
    def __init__(self, backend: str, device: torch.device, dtype: torch.dtype, n_head: int, label: str = "model"):
        self.label = label
        self.backend = backend
        self.device = device
        self.dtype = dtype
        # the patched modules hand over their own live weights at every call: nothing is prepacked
        self.ops = make_ops(backend, device, dtype, n_head, pack_weights=False)
        self.counts: Counter = Counter()
        self.warned: set[str] = set()
        self.model_params: list[torch.nn.Parameter] = []
        self.dropouts: list[torch.nn.Dropout] = []
        self.original_impl = "sdpa"  # the model's attn_implementation before patch_hf
        self.n_layer = 0
        self.attention_calls = 0  # calls of fastgpt2's attention function (served or deferred)
        self.calls = []  # per GPT2Model call in flight: (attention_calls at its start, fallback token)
        self._mask_memo = None  # (mask, version, S, T, result): one check per forward, not per layer

    def __deepcopy__(self, memo):
        """A copied model gets its own state: fresh ops and counters, its own parameters (through memo)."""
        new = _PatchState.__new__(_PatchState)
        memo[id(self)] = new
        fresh = {"counts": Counter, "warned": set, "calls": list, "_mask_memo": lambda: None,
                 "attention_calls": lambda: 0}
        for key, value in self.__dict__.items():
            if key == "ops":
                value = make_ops(self.backend, self.device, self.dtype, self.ops.n_head, pack_weights=False)
            elif key in fresh:
                value = fresh[key]()
            elif key == "label":
                value = f"a copy of {self.label}"
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def fallback(self, reason: str, detail: str) -> None:
        self.counts["fallback:" + reason] += 1
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(
                f"fastgpt2.patch_hf ({self.label}): {detail}; this call runs on transformers' own code "
                f"(warned once per model and reason)", FallbackWarning, stacklevel=_caller_level(),
            )

    def causal_past(self, mask: torch.Tensor, s: int, t: int) -> tuple[int, torch.Tensor | None] | None:
        memo = self._mask_memo
        if memo is not None and memo[0] is mask and memo[1:4] == (mask._version, s, t):
            return memo[4]
        result = _causal_past(mask, s, t)
        self._mask_memo = (mask, mask._version, s, t, result)
        return result


def _caller_level() -> int:
    """warnings' stacklevel of the first frame outside torch, transformers and fastgpt2: the user's call."""
    skip = tuple(os.path.dirname(os.path.dirname(mod.__file__)) + os.sep
                 for mod in (torch, sys.modules[__name__.split(".")[0]]))
    skip += tuple(os.path.dirname(m.__file__) + os.sep for name, m in list(sys.modules.items())
                  if name == "transformers" and getattr(m, "__file__", None))
    frame, level = sys._getframe(1), 1  # the caller of this function (fallback) is stacklevel 1 of its warn()
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _visible(mask: torch.Tensor) -> torch.Tensor | None:
    """A transformers 4-D mask as bool (True = attend): bool masks as they are; float masks 0 = attend,
    very negative = blocked; None for anything else (an additive bias)."""
    if mask.dtype == torch.bool:
        return mask
    visible = mask == 0
    blocked = mask <= torch.finfo(mask.dtype).min / 2  # transformers writes finfo.min (or -inf)
    return visible if bool((visible | blocked).all()) else None


def _causal_past(mask: torch.Tensor, s: int, t: int) -> tuple[int, torch.Tensor | None] | None:
    """(p, kv_start) when `mask` [B, 1, S, T] is causal at offset p for every sequence, after a run of
    left padding: query j of sequence b sees exactly keys kv_start[b] .. p + j, with
    0 <= kv_start[b] <= p (kv_start None when no sequence is padded); else None."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != s or mask.shape[3] != t:
        return None
    visible = _visible(mask)
    if visible is None:
        return None
    last = visible[:, 0, -1]  # [B, T] what the last query sees: kv_start[b] .. p + S - 1
    if not bool(last.any(-1).all()):
        return None
    keys = torch.arange(t, device=mask.device)
    first = torch.where(last, keys, t).amin(-1)  # [B] kv_start
    end = torch.where(last, keys, -1).amax(-1)  # [B] p + S - 1
    past = int(end[0]) - (s - 1)
    if past < 0 or bool((end != end[0]).any()) or int(first.max()) > past:
        return None
    expected = _causal_visible(t, s, past, mask.device)[None] & (keys[None, None, :] >= first[:, None, None])
    if not bool((visible[:, 0] == expected).all()):
        return None
    return past, (first.to(torch.int32) if bool(first.any()) else None)


def _causal_visible(k: int, s: int, past_len: int, device) -> torch.Tensor:
    """[S, K] bool: new token j (at position past_len + j) sees keys 0 .. past_len + j (``causal_visible``)."""
    return causal_visible(k, past_len + torch.arange(s, device=device))


def _params_need_grad(params) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def _module_reason(state: _PatchState, module, x: torch.Tensor, dropouts=()) -> tuple[str, str] | None:
    """Why this module call cannot be served (reason, detail), or None."""
    if _params_need_grad(module.parameters()) or x.requires_grad:
        return _AUTOGRAD
    if module.training and any(p > 0 for p in dropouts):
        return _TRAINING
    if x.device != state.device:
        return "device", (f"the input is on {x.device} but the model was patched on {state.device}; "
                          "call fastgpt2.patch_hf(model) again after moving the model")
    if x.dtype != state.dtype:
        return "dtype", (f"the input is {x.dtype} but the model was patched in {state.dtype} (autocast or a dtype change "
                         "after patching); call fastgpt2.patch_hf(model) again after changing the dtype")
    return None


# -- the patched leaf forwards ---------------------------------------------------------------------
# Each patched module holds a _Slot in its __dict__ and a forward bound to it with types.MethodType,
# reading the state from the slot: copy.deepcopy of a patched model gives a patched copy running on
# the copy's own parameters (deepcopy rebinds bound methods and copies the slot and the state).
class _Slot:
    def __init__(self, state, original, previous, extra=()):
        self.state = state
        self.original = original  # the forward to fall back to (bound to this module); None: not replaced
        self.previous = previous  # (had an instance forward before the patch, which one); None: not replaced
        self.extra = extra


def _slot(module) -> _Slot:
    return module.__dict__[_SLOT_ATTR]


def _served(module, x, args, kwargs, dropouts=(), refused=None) -> _PatchState | None:
    """The patch state when this leaf call runs on fastgpt2; None when it runs on the module's own
    forward (with every argument given): the whole call falls back, or this module cannot be served
    (`refused`, arguments transformers never passes to it, or a reason of ``_module_reason``: warned
    once per model and reason)."""
    if _compiling() or _CALL_FALLBACK.get() is not None:
        return None
    state = _slot(module).state
    why = _module_reason(state, module, x, dropouts) or refused
    if why is None and (args or kwargs):
        given = ", ".join([f"{len(args)} more positional"] * bool(args) + [f"{k}=" for k in kwargs])
        why = (f"argument:{type(module).__name__}.forward",
               f"{type(module).__name__}.forward got arguments transformers does not pass it ({given}); "
               f"the module's own forward serves that call")
    if why is not None:
        state.fallback(*why)
        return None
    return state


def _layer_norm_forward(self, x, *args, **kwargs):
    refused = None
    if self.weight is None or self.bias is None or self.weight.dtype != x.dtype:
        refused = ("layernorm", "a LayerNorm without elementwise weight and bias (or in another dtype) is not served")
    state = _served(self, x, args, kwargs, refused=refused)
    if state is None:
        return _slot(self).original(x, *args, **kwargs)
    e = self.weight.shape[0]
    y, _ = state.ops.layer_norm(x.reshape(-1, e).contiguous(), None, self.weight, self.bias, self.eps)  # [M, E]
    state.counts["layer_norm"] += 1
    return y.view(x.shape)


def _mlp_forward(self, hidden_states, *args, **kwargs):
    activation, act_name = _slot(self).extra
    refused = None
    if activation is None:
        refused = (f"activation:{act_name}", f"activation {act_name!r} is not one fastgpt2 serves ({sorted(HF_ACTIVATIONS)})")
    state = _served(self, hidden_states, args, kwargs, (self.dropout.p,), refused)
    if state is None:
        return _slot(self).original(hidden_states, *args, **kwargs)
    ops, shape = state.ops, hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1]).contiguous()  # [M, E]
    h = ops.linear(x, self.c_fc.weight, self.c_fc.bias, activation=activation)  # [M, inner]
    out = ops.linear(h, self.c_proj.weight, self.c_proj.bias)  # [M, E]
    state.counts["mlp"] += 1
    return out.view(*shape[:-1], out.shape[-1])


def _conv1d_forward(self, x, *args, **kwargs):
    """The attention's c_attn / c_proj: [.., K] @ weight [K, N] + bias."""
    state = _served(self, x, args, kwargs)
    if state is None:
        return _slot(self).original(x, *args, **kwargs)
    y = state.ops.linear(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.bias)  # [M, N]
    return y.view(*x.shape[:-1], y.shape[-1])


def _eager_mask(mask, query, key):
    """The additive float mask eager attention takes, from the bool (SDPA) mask fastgpt2's mask
    function builds; None (SDPA's is_causal) is made explicit: upper-left causal for S > 1."""
    s, t = query.shape[2], key.shape[2]
    if mask is None:
        if s == 1:
            return None
        mask = _causal_visible(t, s, 0, query.device)[None, None]
    if mask.dtype != torch.bool:
        return mask.to(query.dtype)
    blocked = torch.full(mask.shape, torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device)
    return blocked.masked_fill(mask, 0.0)


def _transformers_attention(state, module, query, key, value, attention_mask, dropout, scaling, reason, kwargs):
    """transformers' own attention for this call: eager (the model's choice, or output_attentions,
    which needs the weights), else the model's own implementation."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    impl = state.original_impl
    if reason == _OUTPUT_ATTENTIONS[0] or impl == "eager" or impl not in ALL_ATTENTION_FUNCTIONS:
        mask = _eager_mask(attention_mask, query, key)
        if module.reorder_and_upcast_attn:
            return module._upcast_and_reordered_attn(query, key, value, mask)
        m = gpt2_classes()
        return m.eager_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    return ALL_ATTENTION_FUNCTIONS[impl](module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                         **kwargs)


_warned_unpatched: set[str] = set()


def _warn_unpatched(module) -> None:
    name = type(module).__name__
    if name not in _warned_unpatched:
        _warned_unpatched.add(name)
        warnings.warn(
            f"attn_implementation={ATTN_IMPLEMENTATION!r} is set on a {name} that fastgpt2.patch_hf did not patch (its "
            f"config was taken from a patched model?): transformers' sdpa attention serves it (warned once); call "
            f"fastgpt2.patch_hf(model) to run it on fastgpt2, or model.set_attn_implementation('sdpa')",
            FallbackWarning, stacklevel=_caller_level())


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """fastgpt2's attention for transformers' AttentionInterface. query [B, H, S, D]; key, value
    [B, H, T, D] (transformers' cache, already updated; read only); attention_mask None or
    [B, 1, S, T] from fastgpt2's mask function. Returns ([B, S, H, D], None)."""
    slot = module.__dict__.get(_SLOT_ATTR)
    if slot is None:  # e.g. a model built on the config of a patched one, which names fastgpt2's attention
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _warn_unpatched(module)
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, dropout=dropout,
                                              scaling=scaling, **kwargs)
    if _compiling():  # dynamo traces transformers' own attention (fastgpt2's routing reads the mask on the host)
        return _transformers_attention(slot.state, module, query, key, value, attention_mask, dropout, scaling,
                                       "compile", kwargs)
    state = slot.state
    state.attention_calls += 1
    reason = _CALL_FALLBACK.get()
    if reason is None:
        why = (_kwargs_reason(kwargs) or (_CROSS_ATTENTION if module.is_cross_attention else None)
               or (_TRAINING if dropout > 0 else None) or _module_reason(state, module, query))
        if why is not None:
            state.fallback(*why)
            reason = why[0]
    if reason is not None:
        return _transformers_attention(state, module, query, key, value, attention_mask, dropout, scaling, reason,
                                       kwargs)
    ops = state.ops
    b, h, s, d = query.shape
    t = key.shape[2]
    scale = float(scaling if scaling is not None else module.scaling)  # transformers passes module.scaling
    upcast = bool(module.reorder_and_upcast_attn)
    kv_start = None  # [B] int32: where each sequence's keys begin after left padding (None: at 0)
    if attention_mask is None:  # SDPA's convention: is_causal (upper-left) for S > 1, every key for S == 1
        past = 0 if s > 1 else t - 1
    else:
        causal = state.causal_past(attention_mask, s, t)
        past, kv_start = (None, None) if causal is None else causal
    if past == 0 and s <= t:  # (kv_start <= past: no padding)
        out = ops.prefill_attention_separate(query, key, value, scale, upcast)  # [B, S, H*D]
        state.counts["prefill"] += 1
    elif past is not None and s <= MAX_DECODE_TOKENS:
        out = ops.decode_attention_separate(query, key, value, past, scale, upcast, kv_start)  # [B, S, H*D]
        state.counts["decode"] += 1
    else:
        mask = attention_mask
        if mask is None:  # more than the decode kernel's new tokens over a past
            mask = _causal_visible(t, s, past, query.device)[None, None]
        q, k, v = query, key, value
        if upcast and q.dtype != torch.float32:
            q, k, v = q.float(), k.float(), v.float()
        if mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # [B, H, S, D]
        out = out.to(query.dtype).transpose(1, 2)  # [B, S, H, D]
        state.counts["sdpa"] += 1
    return out.reshape(b, s, h, d), None


def _register() -> None:
    """fastgpt2's attention and, as its mask function, transformers' own SDPA mask (bool [B, 1, S, T],
    True = attend; None where SDPA's is_causal suffices)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


# -- model-level guards: hooks on the GPT2Model ------------------------------------------------------
def _model_reason(gpt2, state, arguments) -> tuple[str, str] | None:
    impl = gpt2.config._attn_implementation
    if impl != ATTN_IMPLEMENTATION:  # the user's choice (set_attn_implementation, config) since patch_hf
        return ("attn_implementation", f"the model's attn_implementation is {impl!r}, set after patch_hf (transformers "
                                       f"calls that attention, not fastgpt2's): call fastgpt2.patch_hf(model) again "
                                       f"to run it on fastgpt2")
    if arguments.get("output_attentions", getattr(gpt2.config, "output_attentions", False)):
        return _OUTPUT_ATTENTIONS
    if arguments.get("encoder_hidden_states") is not None:
        return _CROSS_ATTENTION
    if arguments.get("head_mask") is not None:
        return _HEAD_MASK
    if any(d.training and d.p > 0 for d in state.dropouts):
        return _TRAINING
    if _params_need_grad(state.model_params):
        return _AUTOGRAD
    return None


@functools.cache
def _signature(fn) -> inspect.Signature:
    """fn's signature, read once per function (the pre-hook runs on every forward)."""
    return inspect.signature(fn)


def _pre_hook(gpt2, args, kwargs):
    if _compiling():
        return None
    state = gpt2.__dict__[_STATE_ATTR]
    try:
        arguments = _signature(type(gpt2).forward).bind(gpt2, *args, **kwargs).arguments
    except TypeError:
        arguments = dict(kwargs)  # transformers itself reports the bad call
    arguments.update(arguments.pop("kwargs", {}))
    token = None
    if _CALL_FALLBACK.get() is None:
        why = _model_reason(gpt2, state, arguments)
        if why is not None:
            state.fallback(*why)
            token = _CALL_FALLBACK.set(why[0])
    state.calls.append((state.attention_calls, token))
    return None


def _post_hook(gpt2, args, kwargs, output):
    if _compiling():
        return None
    state = gpt2.__dict__[_STATE_ATTR]
    if not state.calls:
        return None
    start, token = state.calls.pop()
    if token is not None:
        _CALL_FALLBACK.reset(token)
    ran = state.attention_calls - start
    if output is not None and ran < state.n_layer and gpt2.config._attn_implementation == ATTN_IMPLEMENTATION:
        import transformers

        raise HFModelError(
            f"transformers {transformers.__version__} ran this GPT2Model call without calling fastgpt2's attention "
            f"({ran} of {state.n_layer} layers): the model is not running on fastgpt2. Tested range "
            f"{_tested_range()}; fastgpt2.unpatch_hf(model) restores transformers' own code")
    return None


def _remove_hooks(gpt2) -> None:
    for hook_id, fn in list(gpt2._forward_pre_hooks.items()):
        if fn is _pre_hook:
            del gpt2._forward_pre_hooks[hook_id]
            gpt2._forward_pre_hooks_with_kwargs.pop(hook_id, None)
    for hook_id, fn in list(gpt2._forward_hooks.items()):
        if fn is _post_hook:
            del gpt2._forward_hooks[hook_id]
            gpt2._forward_hooks_with_kwargs.pop(hook_id, None)
            gpt2._forward_hooks_always_called.pop(hook_id, None)


# -- public ------------------------------------------------------------------------------------
def _set_forward(state: _PatchState, module, forward, extra=()):
    had = "forward" in module.__dict__
    previous = (had, module.__dict__.get("forward"))
    original = module.forward  # bound: the class's forward, or a hook wrapper someone set before us
    object.__setattr__(module, _SLOT_ATTR, _Slot(state, original, previous, extra))
    object.__setattr__(module, "forward", types.MethodType(forward, module))


def patch_hf(model, backend: str = "auto"):
    """Run `model` (a transformers GPT2LMHeadModel or GPT2Model) on fastgpt2's ops, in place; returns it.

    The model's parameters are read at each call (no copy; in-place weight edits are seen).
    `backend`: "auto" (triton on CUDA, torch on CPU), "torch", or "triton" (CUDA, or the CPU under
    TRITON_INTERPRET=1). Patching an already patched model re-patches it with `backend`."""
    m = gpt2_classes()
    gpt2 = find_gpt2(model)
    version = _check_transformers_version()
    _check_api(m, gpt2, version)
    if getattr(gpt2, _STATE_ATTR, None) is not None:  # kept on the GPT2Model: patching a head model or its
        unpatch_hf(gpt2)                              # .transformer is the same patch
    first = next(gpt2.parameters())
    device, dtype = first.device, first.dtype
    backend = resolve_backend(backend, device)
    cfg = gpt2.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if backend == "triton" and head_dim not in HEAD_DIMS:
        raise HFModelError(
            f"backend='triton': the attention kernels take head_dim in {HEAD_DIMS}, this model has "
            f"{head_dim} (n_embd {cfg.hidden_size} / n_head {cfg.num_attention_heads}); use backend='torch'"
        )
    state = _PatchState(backend, device, dtype, cfg.num_attention_heads, f"{type(model).__name__} at {id(model):#x}")
    state.model_params = list(gpt2.parameters())
    state.dropouts = [d for d in gpt2.modules() if isinstance(d, torch.nn.Dropout)]
    # the implementation fallbacks run and unpatch restores; a config taken from a patched model names
    # fastgpt2: transformers' default then
    state.original_impl = cfg._attn_implementation if cfg._attn_implementation != ATTN_IMPLEMENTATION else "sdpa"
    state.n_layer = len(gpt2.h)
    act_name = getattr(cfg, "activation_function", "gelu_new")
    try:
        from transformers.activations import ACT2FN

        act_type = type(ACT2FN[act_name])
    except Exception:  # an unknown name: transformers itself would have failed to build the model
        act_type = None
    for module in gpt2.modules():
        if isinstance(module, torch.nn.LayerNorm):
            _set_forward(state, module, _layer_norm_forward)
        elif isinstance(module, m.GPT2MLP):
            activation = HF_ACTIVATIONS.get(act_name) if type(module.act) is act_type else None
            _set_forward(state, module, _mlp_forward, (activation, act_name))
        elif isinstance(module, m.GPT2Attention):
            object.__setattr__(module, _SLOT_ATTR, _Slot(state, None, None))  # read by _attention
            if not module.is_cross_attention:
                _set_forward(state, module.c_attn, _conv1d_forward)
                _set_forward(state, module.c_proj, _conv1d_forward)
    object.__setattr__(gpt2, _STATE_ATTR, state)
    gpt2.register_forward_pre_hook(_pre_hook, with_kwargs=True)
    gpt2.register_forward_hook(_post_hook, with_kwargs=True, always_call=True)
    _register()
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        selected = (model.config._attn_implementation, gpt2.config._attn_implementation)
    except Exception as exc:
        unpatch_hf(model)
        raise HFModelError(f"transformers {version} refused attn_implementation={ATTN_IMPLEMENTATION!r}: {exc}") from exc
    if selected != (ATTN_IMPLEMENTATION, ATTN_IMPLEMENTATION):
        unpatch_hf(model)
        raise HFModelError(
            f"model.set_attn_implementation({ATTN_IMPLEMENTATION!r}) did not take (config._attn_implementation is "
            f"{selected[0]!r}) with transformers {version}; tested range {_tested_range()}")
    return model


def unpatch_hf(model):
    """Undo patch_hf: every module gets back the forward it had and the model its attention
    implementation; returns the model. A model that is not patched is returned unchanged."""
    gpt2 = find_gpt2(model)
    state = getattr(gpt2, _STATE_ATTR, None)
    if state is None:
        return model
    for module in gpt2.modules():
        slot = module.__dict__.get(_SLOT_ATTR)
        if slot is None:
            continue
        if slot.previous is not None:
            had, previous = slot.previous
            if had:
                object.__setattr__(module, "forward", previous)
            else:
                object.__delattr__(module, "forward")
        object.__delattr__(module, _SLOT_ATTR)
    _remove_hooks(gpt2)
    object.__delattr__(gpt2, _STATE_ATTR)
    if gpt2.config._attn_implementation == ATTN_IMPLEMENTATION:
        target = model if hasattr(model, "set_attn_implementation") else gpt2
        target.set_attn_implementation(state.original_impl)
    return model


def _state(model):
    try:
        return getattr(find_gpt2(model), _STATE_ATTR, None)
    except HFModelError:
        return None


def is_patched(model) -> bool:
    return _state(model) is not None


def patch_stats(model) -> dict[str, int]:
    """Which path served how many calls since patch_hf: prefill / decode / sdpa (attention),
    mlp, layer_norm, fallback:<reason>. Empty for a model that is not patched."""
    state = _state(model)
    return dict(state.counts) if state is not None else {}


def model_from_hf(hf_model, backend: str = "auto") -> GPT2:
    """``fastgpt2.GPT2.from_hf``: a fastgpt2 GPT2 sharing the weight tensors of a transformers
    GPT2LMHeadModel or GPT2Model (same storage; the model runs on the parameters' device and dtype)."""
    return GPT2.from_hf(hf_model, backend=backend)


__all__ = ["patch_hf", "unpatch_hf", "is_patched", "patch_stats", "model_from_hf", "HFModelError",
           "FallbackWarning", "UntestedTransformersWarning", "TESTED_TRANSFORMERS", "ATTN_IMPLEMENTATION",
           "cache_argument"]

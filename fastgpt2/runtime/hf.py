"""Drop-in: run a live transformers GPT-2 model on fastgpt2's ops, and share its weights with fastgpt2.

    import fastgpt2
    from transformers import GPT2LMHeadModel, pipeline
    model = GPT2LMHeadModel.from_pretrained("gpt2")
    fastgpt2.patch_hf(model)                  # in place; returns model; no parameter is copied
    pipeline("text-generation", model=model, tokenizer=...)("Hello", max_length=30)
    fastgpt2.unpatch_hf(model)                # back to transformers' own code, bit for bit

Tested with transformers 5.23.0 (torch 2.13, tokenizers 0.23; CPU, backend="torch", and the Triton
kernels under TRITON_INTERPRET=1; not yet on a GPU). patch_hf refuses transformers 4.x with a clear
error (its GPT-2 attention has another signature); other 5.x releases should work as long as
GPT2Attention / GPT2MLP keep their 5.x forward signatures and attributes. model_from_hf only reads
weights and works with any version.

patch_hf takes a GPT2LMHeadModel, a GPT2Model or another GPT-2 head model (the GPT2Model inside is
patched); anything else is an ``HFModelError`` naming the class. The embeddings, the residual adds
and the lm_head stay transformers' own. backend="triton" needs head_dim in (32, 64, 128).

What the patch does (module level; transformers keeps its own model loop, embeddings, caches and
generation utilities, so ``forward``, ``generate`` with greedy / sampling / beam search /
``num_return_sequences`` / left padding, ``pipeline``, ``past_key_values`` and
``output_hidden_states`` all keep working):

- every ``nn.LayerNorm`` of the GPT2Model (ln_1, ln_2, ln_f): ``ops.layer_norm`` with the module's
  own weight, bias and eps;
- every ``GPT2MLP``: ``ops.linear(c_fc, activation)`` then ``ops.linear(c_proj)`` (Conv1D weights
  are [in, out], read from the module at each call); the activation is config.activation_function
  mapped through ``fastgpt2.runtime.config.ACTIVATIONS``;
- every self-attention ``GPT2Attention``: QKV and the output projection through ``ops.linear``, the
  attention itself by one of three paths, counted in ``patch_stats(model)``:

  ``"prefill"``  ops.prefill_attention (the kernel): no past in the cache and a purely causal mask
                 (``attention_mask`` None, or a 4-D mask equal to the causal one: no padding).
  ``"decode"``   ops.decode_attention (the kernel): tokens appended to a cache (S <= 8 new
                 tokens), purely causal. transformers' cache is updated first as usual; its full
                 K/V [B, H, T_total, D] is handed to the kernel with cache_lens = T_total - S (the
                 kernel rewrites the same new K/V in place, which changes nothing).
  ``"sdpa"``     torch's scaled_dot_product_attention with transformers' own 4-D mask: padded
                 batches (left padding, beam search over padded prompts) and other non-causal
                 masks, and more than 8 new tokens over a past. Same math, not a fallback.

  The softmax scale is the module's own (``scaling``: scale_attn_weights and
  scale_attn_by_inverse_layer_idx), and reorder_and_upcast_attn computes scores in fp32.

What falls back to transformers' own code, for that call, with a ``FallbackWarning`` (once per
model per reason; counted as ``"fallback:<reason>"``): ``output_attentions=True`` (fastgpt2's
kernels never materialise attention weights), cross-attention (``encoder_hidden_states``), a head
mask, autograd (grad enabled while parameters require grad: the kernels are inference-only), train
mode with dropout > 0, an activation fastgpt2 does not serve, inputs on another device or dtype
than the model had when patched. Never silently a different result.

``model_from_hf(hf_model, backend)`` builds a fastgpt2 ``GPT2`` (its own KV cache, generation, CUDA
graphs) whose weights are the very tensors of the transformers model (same data_ptr).
"""
from __future__ import annotations

import contextvars
import copy
import types
import warnings
from collections import Counter

import torch
import torch.nn.functional as F

from ..errors import FastGPT2Error
from .backends import _split_heads, make_ops, resolve_backend
from .config import ACTIVATIONS, GPT2Config

TESTED_TRANSFORMERS = ("5.23.0",)

_STATE_ATTR = "_fastgpt2_patch"  # the _PatchState, on the GPT2Model
_SLOT_ATTR = "_fastgpt2_slot"  # a _Slot, on each patched module
# set while a call that cannot be served runs transformers' own code: every patched module defers
_CALL_FALLBACK: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastgpt2_hf_fallback", default=None)
_MAX_DECODE_TOKENS = 8  # the decode kernel's limit on new tokens per step
_KERNEL_HEAD_DIMS = (32, 64, 128)  # head sizes the Triton attention kernels are built for

# (reason, detail) of a call that runs on transformers' own code, shared by the model-level and the
# module-level checks
_AUTOGRAD = ("autograd", "gradients were asked for (grad enabled and parameters require grad), and fastgpt2's "
                         "kernels are inference-only: wrap the call in torch.no_grad() / torch.inference_mode() "
                         "or call model.requires_grad_(False)")
_TRAINING = ("training", "the model is in train mode with dropout > 0, which fastgpt2 does not apply; call model.eval()")
_OUTPUT_ATTENTIONS = ("output_attentions", "output_attentions=True is not served (fastgpt2's kernels never "
                                           "materialise attention weights)")
_CROSS_ATTENTION = ("cross-attention", "cross-attention (encoder_hidden_states) is not served")


class HFModelError(FastGPT2Error):
    """A model that patch_hf / model_from_hf cannot take (not a transformers GPT-2), or cannot serve."""


class FallbackWarning(UserWarning):
    """A call (or part of one) that fastgpt2 does not serve ran on transformers' own code."""


# -- finding the GPT-2 inside a transformers model ----------------------------------------------
def _gpt2_classes():
    try:
        from transformers.models.gpt2 import modeling_gpt2 as m
    except ImportError as exc:  # pragma: no cover - transformers is a test extra
        raise HFModelError("patch_hf needs the transformers package (pip install transformers)") from exc
    return m


def _check_transformers_version():
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        raise HFModelError(
            f"patch_hf needs transformers >= 5 (its GPT-2 attention takes a Cache object); this is "
            f"transformers {transformers.__version__}. Tested with {', '.join(TESTED_TRANSFORMERS)}."
        )


def _describe(model) -> str:
    name = type(model).__name__
    cfg = getattr(model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    return f"{name} (model_type {model_type!r})" if model_type else name


def _find_gpt2(model):
    """The GPT2Model inside `model` (GPT2LMHeadModel, GPT2Model, or another GPT-2 head model)."""
    m = _gpt2_classes()
    if isinstance(model, m.GPT2Model):
        return model
    inner = getattr(model, "transformer", None)
    if isinstance(model, m.GPT2PreTrainedModel) and isinstance(inner, m.GPT2Model):
        return inner
    raise HFModelError(
        f"fastgpt2 runs transformers GPT-2 models only (GPT2LMHeadModel or GPT2Model); got {_describe(model)}"
    )


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
        self._mask_memo = None  # (mask, version, S, past_len, result): one check per forward, not per layer

    def __deepcopy__(self, memo):
        """A copied model gets its own state: fresh ops and counters, its own parameters (through memo)."""
        new = _PatchState.__new__(_PatchState)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "ops":
                value = make_ops(self.backend, self.device, self.dtype, self.ops.n_head, pack_weights=False)
            elif key == "counts":
                value = Counter()
            elif key == "warned":
                value = set()
            elif key == "_mask_memo":
                value = None
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

    def plain_causal(self, mask: torch.Tensor, s: int, past_len: int) -> bool:
        memo = self._mask_memo
        if memo is not None and memo[0] is mask and memo[1:4] == (mask._version, s, past_len):
            return memo[4]
        result = _is_plain_causal(mask, s, past_len)
        self._mask_memo = (mask, mask._version, s, past_len, result)
        return result


def _caller_level() -> int:
    """warnings' stacklevel of the first frame outside torch, transformers and fastgpt2: the user's call."""
    import os
    import sys

    skip = tuple(os.path.dirname(os.path.dirname(mod.__file__)) + os.sep
                 for mod in (torch, sys.modules[__name__.split(".")[0]]))
    skip += tuple(os.path.dirname(m.__file__) + os.sep for name, m in list(sys.modules.items())
                  if name == "transformers" and getattr(m, "__file__", None))
    frame, level = sys._getframe(1), 1  # the caller of this function (fallback) is stacklevel 1 of its warn()
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _is_plain_causal(mask: torch.Tensor, s: int, past_len: int) -> bool:
    """Whether a transformers 4-D mask [B, 1 | H, S, K] (bool: True = attend; float: 0 = attend,
    very negative = blocked) is exactly causal over past_len + S positions: no padding, no bias."""
    if mask.dim() != 4 or mask.shape[-2] != s or mask.shape[-1] < past_len + s:
        return False
    if mask.dtype == torch.bool:
        visible = mask
    else:
        visible = mask == 0
        blocked = mask <= torch.finfo(mask.dtype).min / 2  # transformers writes finfo.min (or -inf)
        if not bool((visible | blocked).all()):
            return False  # an additive bias: not a plain mask
    return bool((visible == _causal_visible(mask.shape[-1], s, past_len, mask.device)).all())


def _causal_visible(k: int, s: int, past_len: int, device) -> torch.Tensor:
    """[S, K] bool: new token j (at position past_len + j) sees keys 0 .. past_len + j."""
    return torch.arange(k, device=device)[None, :] <= past_len + torch.arange(s, device=device)[:, None]


def _params_need_grad(params) -> bool:
    return torch.is_grad_enabled() and any(p.requires_grad for p in params)


def _module_reason(state: _PatchState, module, x: torch.Tensor, dropouts=()) -> tuple[str, str] | None:
    """Why this module call cannot be served (reason, detail), or None."""
    if _params_need_grad(module.parameters()):
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


# -- the patched forwards --------------------------------------------------------------------------
# Each patched module holds a _Slot in its __dict__ and a forward bound to it with types.MethodType,
# reading the state from the slot: copy.deepcopy of a patched model gives a patched copy running on
# the copy's own parameters (deepcopy rebinds bound methods and copies the slot and the state).
class _Slot:
    def __init__(self, state, original, previous, extra=()):
        self.state = state
        self.original = original  # the forward to fall back to (bound to this module)
        self.previous = previous  # (had an instance forward before the patch, which one)
        self.extra = extra


def _slot(module) -> _Slot:
    return module.__dict__[_SLOT_ATTR]


def _layer_norm_forward(self, x):
    slot = _slot(self)
    state, original = slot.state, slot.original
    if _CALL_FALLBACK.get() is not None:
        return original(x)
    why = _module_reason(state, self, x)
    if why is None and (self.weight is None or self.bias is None or self.weight.dtype != x.dtype):
        why = ("layernorm", "a LayerNorm without elementwise weight and bias (or in another dtype) is not served")
    if why is not None:
        state.fallback(*why)
        return original(x)
    e = self.weight.shape[0]
    y, _ = state.ops.layer_norm(x.reshape(-1, e).contiguous(), None, self.weight, self.bias, self.eps)
    state.counts["layer_norm"] += 1
    return y.view(x.shape)


def _mlp_forward(self, hidden_states):
    slot = _slot(self)
    state, original, (activation, act_name) = slot.state, slot.original, slot.extra
    if _CALL_FALLBACK.get() is not None:
        return original(hidden_states)
    why = _module_reason(state, self, hidden_states, (self.dropout.p,))
    if why is None and activation is None:
        why = (f"activation:{act_name}", f"activation {act_name!r} is not one fastgpt2 serves ({sorted(ACTIVATIONS)})")
    if why is not None:
        state.fallback(*why)
        return original(hidden_states)
    ops, shape = state.ops, hidden_states.shape
    x = hidden_states.reshape(-1, shape[-1]).contiguous()
    h = ops.linear(x, self.c_fc.weight, self.c_fc.bias, activation=activation)
    out = ops.linear(h, self.c_proj.weight, self.c_proj.bias)
    state.counts["mlp"] += 1
    return out.view(*shape[:-1], out.shape[-1])


def _kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """A cache tensor the Triton launchers accept: contiguous, 16-byte aligned."""
    if not t.is_contiguous() or t.data_ptr() % 16:
        t = torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t)
    return t


def _attention_extra(module):
    scale = getattr(module, "scaling", None)
    if scale is None:  # transformers versions before the precomputed `scaling`: the same rule, ours
        scale = GPT2Config.from_hf(module.config.to_dict()).attn_scale(module.layer_idx)
    return float(scale), bool(module.reorder_and_upcast_attn)


def _attention_forward(self, hidden_states, past_key_values=None, attention_mask=None, encoder_hidden_states=None,
                       encoder_attention_mask=None, output_attentions=False, **kwargs):
    slot = _slot(self)
    state, original, (scale, upcast) = slot.state, slot.original, slot.extra

    def run_original():
        return original(hidden_states, past_key_values=past_key_values, attention_mask=attention_mask,
                        encoder_hidden_states=encoder_hidden_states, encoder_attention_mask=encoder_attention_mask,
                        output_attentions=output_attentions, **kwargs)

    if _CALL_FALLBACK.get() is not None:
        return run_original()
    if self.is_cross_attention or encoder_hidden_states is not None:
        why = _CROSS_ATTENTION
    elif output_attentions:
        why = _OUTPUT_ATTENTIONS
    else:
        why = _module_reason(state, self, hidden_states, (self.attn_dropout.p, self.resid_dropout.p))
    if why is not None:
        state.fallback(*why)
        return run_original()
    return _serve_attention(state, self, hidden_states, past_key_values, attention_mask, scale, upcast)


def _serve_attention(state, module, hidden_states, past_key_values, attention_mask, scale, upcast):
    ops = state.ops
    b, s, e = hidden_states.shape
    nh, d = module.num_heads, module.head_dim
    qkv = ops.linear(hidden_states.reshape(b * s, e).contiguous(), module.c_attn.weight, module.c_attn.bias)
    qkv = qkv.view(b, s, 3 * e)
    q, k, v = _split_heads(qkv, nh)  # [B, H, S, D] views, as transformers splits

    cache = past_key_values
    if cache is not None:
        cache = getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: this is self-attention
        past_len = int(cache.get_seq_length(module.layer_idx))
        keys, values = cache.update(k, v, module.layer_idx)
    else:
        past_len, keys, values = 0, k, v
    total = past_len + s
    causal = attention_mask is None or state.plain_causal(attention_mask, s, past_len)
    if causal and past_len == 0:
        if cache is not None and keys.shape[2] == s and keys.is_contiguous() and keys.data_ptr() % 16 == 0 \
                and values.is_contiguous() and values.data_ptr() % 16 == 0:
            k_buf, v_buf = keys, values  # the kernel writes the same K/V into them again
        else:
            k_buf = torch.empty(b, nh, s, d, dtype=qkv.dtype, device=qkv.device)
            v_buf = torch.empty_like(k_buf)
        lens = torch.full((b,), s, dtype=torch.int32, device=qkv.device)
        att = ops.prefill_attention(qkv, k_buf, v_buf, lens, scale, upcast)
        state.counts["prefill"] += 1
    elif causal and s <= _MAX_DECODE_TOKENS and keys.shape[2] >= total:
        k_buf, v_buf = _kernel_ready(keys), _kernel_ready(values)
        lens = torch.full((b,), past_len, dtype=torch.int32, device=qkv.device)
        att = ops.decode_attention(qkv, k_buf, v_buf, lens, scale, upcast, total)
        state.counts["decode"] += 1
    else:
        if attention_mask is None:  # causal over a past, more than the decode kernel's new tokens
            attention_mask = _causal_visible(keys.shape[2], s, past_len, qkv.device)[None, None]
        mask = attention_mask
        if upcast and q.dtype != torch.float32:
            q, keys, values = q.float(), keys.float(), values.float()
            if mask.dtype != torch.bool:
                mask = mask.float()
        elif mask.dtype != torch.bool and mask.dtype != q.dtype:
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # [B, H, S, D]
        att = out.to(qkv.dtype).transpose(1, 2).reshape(b, s, e)
        state.counts["sdpa"] += 1
    out = ops.linear(att.reshape(b * s, e).contiguous(), module.c_proj.weight, module.c_proj.bias)
    return out.view(b, s, e), None


def _gpt2_model_forward(self, *args, **kwargs):
    """The GPT2Model's forward: decides, for the whole call, what cannot be served."""
    slot = _slot(self)
    state, original = slot.state, slot.original
    if _CALL_FALLBACK.get() is not None:
        return original(*args, **kwargs)
    why = None
    if kwargs.get("output_attentions", getattr(self.config, "output_attentions", False)):
        why = _OUTPUT_ATTENTIONS
    elif kwargs.get("encoder_hidden_states") is not None or (len(args) > 6 and args[6] is not None):
        why = _CROSS_ATTENTION
    elif kwargs.get("head_mask") is not None:
        why = ("head_mask", "a head mask is not served")
    elif any(d.training and d.p > 0 for d in state.dropouts):
        why = _TRAINING
    elif _params_need_grad(state.model_params):
        why = _AUTOGRAD
    if why is None:
        return original(*args, **kwargs)
    state.fallback(*why)
    token = _CALL_FALLBACK.set(why[0])
    try:
        return original(*args, **kwargs)
    finally:
        _CALL_FALLBACK.reset(token)


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
    m = _gpt2_classes()
    gpt2 = _find_gpt2(model)
    _check_transformers_version()
    if getattr(gpt2, _STATE_ATTR, None) is not None:  # kept on the GPT2Model: patching a head model or its
        unpatch_hf(gpt2)                              # .transformer is the same patch
    first = next(gpt2.parameters())
    device, dtype = first.device, first.dtype
    backend = resolve_backend(backend, device)
    cfg = gpt2.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    if backend == "triton" and head_dim not in _KERNEL_HEAD_DIMS:
        raise HFModelError(
            f"backend='triton': the attention kernels take head_dim in {_KERNEL_HEAD_DIMS}, this model has "
            f"{head_dim} (n_embd {cfg.hidden_size} / n_head {cfg.num_attention_heads}); use backend='torch'"
        )
    state = _PatchState(backend, device, dtype, cfg.num_attention_heads, f"{type(model).__name__} at {id(model):#x}")
    state.model_params = list(gpt2.parameters())
    state.dropouts = [d for d in gpt2.modules() if isinstance(d, torch.nn.Dropout)]
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
            activation = ACTIVATIONS.get(act_name) if type(module.act) is act_type else None
            _set_forward(state, module, _mlp_forward, (activation, act_name))
        elif isinstance(module, m.GPT2Attention):
            _set_forward(state, module, _attention_forward, _attention_extra(module))
    _set_forward(state, gpt2, _gpt2_model_forward)
    object.__setattr__(gpt2, _STATE_ATTR, state)
    return model


def unpatch_hf(model):
    """Undo patch_hf: every module gets back the forward it had; returns the model. A model that is not
    patched is returned unchanged."""
    gpt2 = _find_gpt2(model)
    if getattr(gpt2, _STATE_ATTR, None) is None:
        return model
    for module in gpt2.modules():
        slot = module.__dict__.get(_SLOT_ATTR)
        if slot is None:
            continue
        had, previous = slot.previous
        if had:
            object.__setattr__(module, "forward", previous)
        else:
            object.__delattr__(module, "forward")
        object.__delattr__(module, _SLOT_ATTR)
    object.__delattr__(gpt2, _STATE_ATTR)
    return model


def _state(model):
    try:
        return getattr(_find_gpt2(model), _STATE_ATTR, None)
    except HFModelError:
        return None


def is_patched(model) -> bool:
    return _state(model) is not None


def patch_stats(model) -> dict[str, int]:
    """Which path served how many calls since patch_hf: prefill / decode / sdpa (attention),
    mlp, layer_norm, fallback:<reason>. Empty for a model that is not patched."""
    state = _state(model)
    return dict(state.counts) if state is not None else {}


def model_from_hf(hf_model, backend: str = "auto"):
    """A fastgpt2 GPT2 sharing the weight tensors of a transformers GPT2LMHeadModel or GPT2Model
    (same storage; the model runs on the parameters' device and dtype)."""
    from .loader import is_stale_buffer
    from .model import GPT2

    m = _gpt2_classes()
    if not isinstance(hf_model, (m.GPT2LMHeadModel, m.GPT2Model)):
        raise HFModelError(
            f"fastgpt2 builds from transformers GPT-2 models only (GPT2LMHeadModel or GPT2Model); got {_describe(hf_model)}"
        )
    gpt2 = _find_gpt2(hf_model)
    cfg = GPT2Config.from_hf(gpt2.config.to_dict())
    weights = {k: v.detach() for k, v in gpt2.state_dict(keep_vars=True).items() if not is_stale_buffer(k)}
    head = getattr(hf_model, "lm_head", None)
    if head is not None and head.weight.data_ptr() != gpt2.wte.weight.data_ptr():
        # an untied head (config says so, or the weights were untied after loading): serve it as stored
        import dataclasses

        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
        weights["lm_head.weight"] = head.weight.detach()
    elif head is None and not cfg.tie_word_embeddings:
        raise HFModelError("this GPT2Model has no lm_head and its config unties the head from wte; pass the "
                           "GPT2LMHeadModel instead")
    first = gpt2.wte.weight
    # shared weights: no prepacked copies, so that in-place updates of the transformers model are seen
    model = GPT2(cfg, weights, device=first.device, dtype=first.dtype, backend=backend, pack_weights=False)
    return model


__all__ = ["patch_hf", "unpatch_hf", "is_patched", "patch_stats", "model_from_hf", "HFModelError",
           "FallbackWarning", "TESTED_TRANSFORMERS"]

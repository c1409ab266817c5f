"""fastgpt2 in half precision against transformers, gated the way flash-attention tests its kernels:
with err(x) = max |logits_x - logits of transformers in float32| over the positions compared,
fastgpt2 in a half dtype must satisfy

    err(fastgpt2 in dtype) <= 2 * err(transformers in the same dtype) + atol

that is, be at most twice as far from the exact (float32) model as transformers itself is when it
runs in that dtype. Prefill logits (the ragged batch's forward, every prompt position, and
model.prefill's last-token logits) and decode logits (tokens fed one at a time through fastgpt2's
cache: model.prefill, then model.decode steps) are gated separately; both are compared with
transformers' full forward over each whole sequence alone, at the same positions. float16 runs the
Triton backend (Triton's interpreter on CPU), bfloat16 the torch backend (the interpreter's tl.dot
is wrong for bf16 operands). atol per dtype: parity.HALF_ATOL (the reason is beside it)."""
import copy
import os

import pytest
import torch
from hf_reference import hf_model

import fastgpt2
from fastgpt2.parity import HALF_ATOL, HALF_FACTOR
from fastgpt2.runtime.config import GPT2Config

TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
VOCAB = 1031  # odd: no vocabulary-sized block divides it
LENS = (7, 1, 12)  # a ragged batch: three prompts, one of a single token
STEPS = 12  # decode steps after the prefill
GPT2 = dict(n_layer=2, n_embd=128, n_head=2)  # head_dim 64
CASES = {  # name -> (dtype, backend, config)
    "float16-triton": (torch.float16, "triton", GPT2),
    "float16-triton-crfm-hd32": (torch.float16, "triton", dict(n_layer=2, n_embd=64, n_head=2,
                                                               scale_attn_by_inverse_layer_idx=True,
                                                               reorder_and_upcast_attn=True)),
    "bfloat16-torch": (torch.bfloat16, "torch", dict(n_layer=2, n_embd=128, n_head=4)),
    "bfloat16-torch-crfm": (torch.bfloat16, "torch", dict(n_layer=2, n_embd=128, n_head=4,
                                                          scale_attn_by_inverse_layer_idx=True,
                                                          reorder_and_upcast_attn=True)),
}


def _models(dtype, backend, cfg, seed=5, alter=None):
    """transformers in float32 and fastgpt2 in `dtype` on the same seeded weights; alter(weights) may
    change fastgpt2's copy (to check that the gate fails a wrong model)."""
    hf = hf_model(seed=seed, vocab_size=VOCAB, bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1, **cfg)
    weights = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()
               if k != "lm_head.weight" and not k.endswith(".attn.bias")}
    if alter is not None:
        alter(weights)
    ours = fastgpt2.GPT2(GPT2Config.from_hf(hf.config.to_dict()), weights, device=DEVICE, dtype=dtype,
                         backend=backend)
    assert ours.backend == backend
    return hf, ours


def _hf_logits(hf, dtype, seqs):
    """transformers' full forward over each sequence alone, in `dtype` (a copy of the float32 model:
    casting it back would keep the rounding) -> float32 logits [T, V] each."""
    model = hf if dtype == torch.float32 else copy.deepcopy(hf).to(dtype)
    with torch.no_grad():
        return [model(s[None]).logits[0].float() for s in seqs]


def _errors(hf, ours, dtype, seed=6):
    """{"prefill" | "decode": (err fastgpt2, err transformers in dtype)} on the ragged batch LENS."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, VOCAB, (n + STEPS,), generator=gen) for n in LENS]
    b, t = len(LENS), max(LENS)
    ids = torch.zeros(b, t, dtype=torch.long)  # right padding, as the cache keeps a batch
    for row, (s, n) in enumerate(zip(seqs, LENS)):
        ids[row, :n] = s[:n]
    mask = (torch.arange(t)[None, :] < torch.tensor(LENS)[:, None]).long()
    forward = ours(ids.to(DEVICE), attention_mask=mask.to(DEVICE)).float().cpu()  # [B, T, V]
    cache = ours.new_cache(b)
    last = ours.prefill(ids.to(DEVICE), torch.tensor(LENS, dtype=torch.int32, device=DEVICE), cache).float().cpu()
    steps = []
    for j in range(STEPS):
        fed = torch.stack([s[n + j] for s, n in zip(seqs, LENS)])[:, None]  # [B, 1]: position n + j of each row
        steps.append(ours.decode(fed.to(DEVICE), cache).float().cpu())
    decoded = torch.stack(steps, 1)  # [B, STEPS, V]: positions n .. n + STEPS - 1
    exact, half = _hf_logits(hf, torch.float32, seqs), _hf_logits(hf, dtype, seqs)
    err = {"prefill": [0.0, 0.0], "decode": [0.0, 0.0]}
    for row, n in enumerate(LENS):
        ref, hf_half = exact[row], half[row]
        prefill_ours = torch.cat([forward[row, :n], last[row, None]])
        prefill_ref, prefill_half = torch.cat([ref[:n], ref[n - 1 : n]]), torch.cat([hf_half[:n], hf_half[n - 1 : n]])
        pairs = {"prefill": (prefill_ours, prefill_ref, prefill_half), "decode": (decoded[row], ref[n:], hf_half[n:])}
        for phase, (a, r, h) in pairs.items():
            err[phase][0] = max(err[phase][0], float((a - r).abs().max()))
            err[phase][1] = max(err[phase][1], float((h - r).abs().max()))
    return {phase: tuple(e) for phase, e in err.items()}


def _bound(dtype, err_hf):
    return HALF_FACTOR * err_hf + HALF_ATOL[str(dtype).removeprefix("torch.")]


@pytest.fixture(scope="module", params=sorted(CASES))
def measured(request):
    dtype, backend, cfg = CASES[request.param]
    if backend == "triton" and not TRITON:
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
    hf, ours = _models(dtype, backend, cfg)
    return request.param, dtype, _errors(hf, ours, dtype)


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_within_twice_transformers_rounding(measured, phase):
    name, dtype, err = measured
    ours, hf = err[phase]
    assert hf > 0, f"{name}: transformers in {dtype} equals float32 exactly: nothing measured"
    assert ours <= _bound(dtype, hf), f"{name} {phase}: err {ours:.3e} > 2 * {hf:.3e} + atol"


def _drop_softmax_scale(monkeypatch):
    monkeypatch.setattr(GPT2Config, "attn_scale", lambda self, i: 1.0)  # no 1/sqrt(head_dim)


def _scale_one_weight(weights):
    weights["h.1.mlp.c_fc.weight"] *= 1.01  # one GEMM weight of the last layer, 1% too large


@pytest.mark.parametrize("name, bug", [("bfloat16-torch", "no softmax scale"), ("float16-triton", "1% weight")])
def test_the_gate_fails_a_wrong_model(name, bug, monkeypatch):
    """The bound is tight enough to catch a real bug. float16's (err ~2e-3) fails a 1% error in one
    weight matrix; bfloat16's (err ~2e-2, as large as that weight error's own effect on these logits)
    does not, but fails a missing 1/sqrt(head_dim)."""
    dtype, backend, cfg = CASES[name]
    if backend == "triton" and not TRITON:
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
    if bug == "no softmax scale":
        _drop_softmax_scale(monkeypatch)
    hf, ours = _models(dtype, backend, cfg, alter=_scale_one_weight if bug == "1% weight" else None)
    monkeypatch.undo()  # the reference keeps its own scale (it never reads fastgpt2's config)
    for phase, (err_ours, err_hf) in _errors(hf, ours, dtype).items():
        assert err_ours > _bound(dtype, err_hf), f"{name} with {bug}: {phase} err {err_ours:.3e} passes the gate"

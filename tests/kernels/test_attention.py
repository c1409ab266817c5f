"""Prefill and decode attention kernels vs their float64 references (Triton interpreter on CPU).

Tolerances (error = max |kernel - ref64| over all elements):
  fp32: error <= 1e-5 * max|ref64|  (relative to the largest reference magnitude)
  fp16: error <= 2 * (error of the same *_ref run by PyTorch in fp16) + 1e-3
bf16 is only run on a real GPU: tl.dot on bf16 is wrong under the interpreter
(triton-lang/triton#11584); the compile check covers the bf16 kernels.
"""
import math
import os

import pytest
import torch

from fastgpt2.kernels import attention as A

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)
DEVICE = torch.device("cpu" if INTERPRET else "cuda")
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])
NAN = float("nan")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, seed):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float32).to(dtype=dtype, device=DEVICE)


def _poisoned_cache(Bmax, H, Tmax, D, dtype, layers=3, layer=1):
    """NaN-filled [L, Bmax, H, Tmax, D] like the model's cache; returns the layer views (offset views)."""
    k = torch.full((layers, Bmax, H, Tmax, D), NAN, dtype=dtype, device=DEVICE)
    v = torch.full((layers, Bmax, H, Tmax, D), NAN, dtype=dtype, device=DEVICE)
    return k[layer], v[layer]


def _lens(values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def _split_heads(qkv, H):
    """[B, T, 3*H*D] -> q, k, v each [B, H, T, D]."""
    B, T, C = qkv.shape
    D = C // (3 * H)
    x = qkv.view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


def _check_close(out, ref64, ref_lowp):
    """out: kernel output; ref64: float64 reference; ref_lowp: the same reference run in out's dtype."""
    assert out.dtype == ref_lowp.dtype
    out64 = out.double().cpu()
    ref64 = ref64.cpu()
    assert torch.isfinite(out64).all(), "kernel output has NaN/inf"
    err = (out64 - ref64).abs().max().item()
    if out.dtype == torch.float32:
        bound = 1e-5 * ref64.abs().max().item()
    else:
        torch_err = (ref_lowp.double().cpu() - ref64).abs().max().item()
        bound = 2 * torch_err + 1e-3
    assert err <= bound, f"{out.dtype}: max error {err:.3g} > bound {bound:.3g}"


def _prefill_refs(qkv, lens, scale, H):
    ref64 = A.prefill_attention_ref(qkv.double().cpu(), lens.cpu(), scale, H)
    ref_lowp = A.prefill_attention_ref(qkv.cpu(), lens.cpu(), scale, H)
    return ref64, ref_lowp


def _decode_refs(qkv, kc, vc, cache_lens, scale):
    ref64 = A.decode_attention_ref(qkv.double().cpu(), kc.double().cpu(), vc.double().cpu(), cache_lens.cpu(), scale)
    ref_lowp = A.decode_attention_ref(qkv.cpu(), kc.cpu(), vc.cpu(), cache_lens.cpu(), scale)
    return ref64, ref_lowp


def _check_prefill_cache(kc, vc, qkv, lens, H):
    """Written positions equal qkv's K/V bit for bit; every other position is still NaN."""
    _, k, v = _split_heads(qkv, H)  # [B, H, T, D]
    B = qkv.shape[0]
    for b, n in enumerate(lens.tolist()):
        assert torch.equal(kc[b, :, :n], k[b, :, :n]), f"k_cache[{b}, :, :{n}] != k from qkv"
        assert torch.equal(vc[b, :, :n], v[b, :, :n]), f"v_cache[{b}, :, :{n}] != v from qkv"
        assert torch.isnan(kc[b, :, n:]).all() and torch.isnan(vc[b, :, n:]).all(), f"cache row {b} written at t >= {n}"
    assert torch.isnan(kc[B:]).all() and torch.isnan(vc[B:]).all(), "cache rows b >= B were written"


# ---------------------------------------------------------------------------------------------
# prefill
# ---------------------------------------------------------------------------------------------
def _run_prefill(B, T, H, D, lens, dtype, scale, seed, Bmax=None, Tmax=None):
    Bmax = Bmax or B + 1
    Tmax = Tmax or T + 5
    qkv = _randn((B, T, 3 * H * D), dtype, seed)
    lens_t = _lens(lens)
    kc, vc = _poisoned_cache(Bmax, H, Tmax, D, dtype)
    out = torch.full((B, T, H * D), NAN, dtype=dtype, device=DEVICE)
    res = A.prefill_attention(qkv, kc, vc, lens_t, scale, out=out)
    assert res is out
    ref64, ref_lowp = _prefill_refs(qkv, lens_t, scale, H)
    _check_close(out, ref64, ref_lowp)
    for b, n in enumerate(lens):
        assert (out[b, n:] == 0).all(), f"padding rows of sequence {b} are not 0"
    _check_prefill_cache(kc, vc, qkv, lens_t, H)
    return out


def test_prefill_ragged_fp32_d64():
    # T=257 spans several query tiles, with lengths ending mid-tile, on a tile edge + 1, and 1
    _run_prefill(B=4, T=257, H=2, D=64, lens=[1, 17, 100, 257], dtype=torch.float32,
                 scale=1 / math.sqrt(64), seed=1, Bmax=5, Tmax=300)


# (fp32, D=64) is test_prefill_ragged_fp32_d64
@pytest.mark.parametrize("dtype, D", [(dt, d) for dt in DTYPES for d in (32, 64, 128)
                                      if (dt, d) != (torch.float32, 64)], ids=str)
def test_prefill_dtypes_head_dims(dtype, D):
    _run_prefill(B=3, T=70, H=2, D=D, lens=[70, 33, 2], dtype=dtype, scale=1 / math.sqrt(D), seed=10 + D)


@pytest.mark.parametrize("D", [32, 64, 128])
def test_prefill_fp16_query_tiles(D):
    # fp16 query tiles are BLOCK_M = 64 / 128 rows: T = BLOCK_M + 7 gives a second tile (keys of the
    # first tile unmasked, its own diagonal in BLOCK_M / BLOCK_N key blocks). Lengths: T (7 rows into
    # the second tile), BLOCK_M + 1 (one row), BLOCK_M (ends on the tile edge: the second tile is all
    # padding), BLOCK_M - 1 (ends inside the first tile) and 3.
    bm, bn, _, _ = A._PREFILL_CONFIGS[("half", D)]
    T = bm + 7
    _run_prefill(B=5, T=T, H=3, D=D, lens=[T, bm + 1, bm, bm - 1, 3], dtype=torch.float16,
                 scale=1 / math.sqrt(D), seed=110 + D, Bmax=6, Tmax=T + 9)


def test_prefill_allocates_out():
    qkv = _randn((2, 9, 3 * 2 * 32), torch.float32, 3)
    kc, vc = _poisoned_cache(2, 2, 9, 32, torch.float32)
    lens = _lens([9, 4])
    out = A.prefill_attention(qkv, kc, vc, lens, 0.2)
    assert out.shape == (2, 9, 64) and out.dtype == torch.float32 and out.device.type == DEVICE.type
    _check_close(out, *_prefill_refs(qkv, lens, 0.2, 2))


@pytest.mark.parametrize("scale_kind", ["inverse_layer_idx", "one"])
def test_prefill_scales(scale_kind):
    D = 64
    # scale_attn_by_inverse_layer_idx at layer_idx 2: 1/sqrt(D)/3; scale_attn_weights=False: 1.0
    scale = 1 / math.sqrt(D) / 3 if scale_kind == "inverse_layer_idx" else 1.0
    _run_prefill(B=2, T=45, H=2, D=D, lens=[45, 20], dtype=torch.float32, scale=scale, seed=20)


# ---------------------------------------------------------------------------------------------
# decode
# ---------------------------------------------------------------------------------------------
def _filled_cache(Bmax, H, Tmax, D, dtype, cache_lens, seed):
    """Cache views with random K/V at positions < cache_lens[b], NaN elsewhere."""
    kc, vc = _poisoned_cache(Bmax, H, Tmax, D, dtype)
    k = _randn((Bmax, H, Tmax, D), dtype, seed)
    v = _randn((Bmax, H, Tmax, D), dtype, seed + 1)
    for b, n in enumerate(cache_lens):
        kc[b, :, :n] = k[b, :, :n]
        vc[b, :, :n] = v[b, :, :n]
    return kc, vc


def _run_decode(cache_lens, S, H, D, dtype, num_splits, scale, seed, Tmax=None):
    B = len(cache_lens)
    Tmax = Tmax or max(cache_lens) + S + 3
    qkv = _randn((B, S, 3 * H * D), dtype, seed)
    kc, vc = _filled_cache(B + 1, H, Tmax, D, dtype, cache_lens, seed + 100)
    kc0, vc0 = kc.clone(), vc.clone()
    lens_t = _lens(cache_lens)
    ref64, ref_lowp = _decode_refs(qkv, kc0, vc0, lens_t, scale)
    out = torch.full((B, S, H * D), NAN, dtype=dtype, device=DEVICE)
    res = A.decode_attention(qkv, kc, vc, lens_t, scale, out=out, num_splits=num_splits)
    assert res is out
    _check_close(out, ref64, ref_lowp)
    assert torch.equal(lens_t, _lens(cache_lens)), "decode_attention must not update cache_lens"
    _, k_new, v_new = _split_heads(qkv, H)  # [B, H, S, D]
    for b, n in enumerate(cache_lens):
        assert torch.equal(kc[b, :, :n], kc0[b, :, :n]) and torch.equal(vc[b, :, :n], vc0[b, :, :n]), \
            f"old cache of sequence {b} changed"
        assert torch.equal(kc[b, :, n:n + S], k_new[b]), f"new K of sequence {b} not written at {n}..{n + S - 1}"
        assert torch.equal(vc[b, :, n:n + S], v_new[b]), f"new V of sequence {b} not written at {n}..{n + S - 1}"
        assert torch.isnan(kc[b, :, n + S:]).all() and torch.isnan(vc[b, :, n + S:]).all(), \
            f"cache of sequence {b} written past {n + S - 1}"
    assert torch.isnan(kc[B:]).all() and torch.isnan(vc[B:]).all(), "cache rows b >= B were written"
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cache_lens", [[13], [1, 77, 300]], ids=["B1", "B3"])
@pytest.mark.parametrize("S", [1, 3])
def test_decode_splits_agree(dtype, cache_lens, S):
    # lengths are not multiples of any block size; num_splits=1 (direct write), 3 and 8 (reduce
    # kernel; with 8 splits some splits of the short caches are empty) must agree with the reference
    # and with each other.
    D, H = 64, 2
    outs = [_run_decode(cache_lens, S, H, D, dtype, ns, 1 / math.sqrt(D), seed=30 + S)
            for ns in (1, 3, 8)]
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    for o in outs[1:]:
        torch.testing.assert_close(o.double(), outs[0].double(), rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 128])
def test_decode_head_dims(dtype, D):
    _run_decode([5, 130], S=2, H=2, D=D, dtype=dtype, num_splits=None, scale=1 / math.sqrt(D), seed=40 + D)


def test_decode_empty_cache_and_max_s():
    # cache_lens 0 (all split chunks empty: only the new keys), S = 8 (the largest), filling Tmax exactly
    _run_decode([0, 9], S=8, H=2, D=32, dtype=torch.float32, num_splits=4, scale=0.125, seed=50, Tmax=17)


@pytest.mark.parametrize("scale_kind", ["inverse_layer_idx", "one"])
def test_decode_scales(scale_kind):
    D = 64
    scale = 1 / math.sqrt(D) / 3 if scale_kind == "inverse_layer_idx" else 1.0
    _run_decode([40, 7], S=3, H=2, D=D, dtype=torch.float32, num_splits=2, scale=scale, seed=60)


def test_decode_allocates_out_and_default_splits():
    qkv = _randn((2, 1, 3 * 2 * 32), torch.float16, 4)
    kc, vc = _filled_cache(2, 2, 40, 32, torch.float16, [20, 3], 5)
    lens = _lens([20, 3])
    ref = _decode_refs(qkv, kc.clone(), vc.clone(), lens, 0.3)
    out = A.decode_attention(qkv, kc, vc, lens, 0.3)
    assert out.shape == (2, 1, 64) and out.dtype == torch.float16
    _check_close(out, *ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("S", [1, 3])
def test_decode_matches_prefill(dtype, S):
    """Prefill all but the last 2*S tokens of each sequence, then decode them in two steps of S with
    the same buffers and the lengths updated in place between steps (as a replayed CUDA graph sees
    them): the outputs equal the matching rows of a prefill over all tokens (for S=1, its last rows),
    and the cache ends up equal to that prefill's cache."""
    H, D = 2, 64
    n = [50, 23]
    B, T = len(n), max(n)
    scale = 1 / math.sqrt(D)
    qkv = _randn((B, T, 3 * H * D), dtype, 70 + S)
    full_k, full_v = _poisoned_cache(B, H, T + 8, D, dtype)
    full = A.prefill_attention(qkv, full_k, full_v, _lens(n), scale)

    steps = 2
    pre = [x - steps * S for x in n]
    kc, vc = _poisoned_cache(B, H, T + 8, D, dtype)
    lens = _lens(pre)
    A.prefill_attention(qkv, kc, vc, lens, scale)  # rows t >= pre[b] are ignored (right padding)
    out = torch.full((B, S, H * D), NAN, dtype=dtype, device=DEVICE)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=2e-3)
    for step in range(steps):
        pos = [p + step * S for p in pre]
        step_qkv = torch.stack([qkv[b, pos[b]:pos[b] + S] for b in range(B)])  # [B, S, 3HD]
        A.decode_attention(step_qkv, kc, vc, lens, scale, out=out, num_splits=2)
        want = torch.stack([full[b, pos[b]:pos[b] + S] for b in range(B)])
        torch.testing.assert_close(out.double(), want.double(), **tol)
        lens += S  # in place, on the device
    for b in range(B):
        assert torch.equal(kc[b, :, :n[b]], full_k[b, :, :n[b]])
        assert torch.equal(vc[b, :, :n[b]], full_v[b, :, :n[b]])


# ---------------------------------------------------------------------------------------------
# separate q/k/v (transformers' cache: read, never written)
# ---------------------------------------------------------------------------------------------
def _separate_inputs(B, H, S, T, D, dtype, seed, strided):
    """q [B, H, S, D], k/v [B, H, T, D]. strided: q is a head view of a packed [B, S, 3HD] tensor and
    k/v views of a larger StaticCache-like buffer (as transformers hands them over)."""
    if strided:
        q = _split_heads(_randn((B, S, 3 * H * D), dtype, seed), H)[0]
        big_k = _randn((B + 1, H, T + 6, D), dtype, seed + 1)
        big_v = _randn((B + 1, H, T + 6, D), dtype, seed + 2)
        return q, big_k[1:, :, :T], big_v[1:, :, :T]
    return (_randn((B, H, S, D), dtype, seed), _randn((B, H, T, D), dtype, seed + 1),
            _randn((B, H, T, D), dtype, seed + 2))


def _separate_refs(q, k, v, past, scale, kv_start=None):
    starts = None if kv_start is None else kv_start.cpu()
    ref64 = A.separate_attention_ref(q.double().cpu(), k.double().cpu(), v.double().cpu(), past, scale, starts)
    return ref64, A.separate_attention_ref(q.cpu(), k.cpu(), v.cpu(), past, scale, starts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B, S, T, strided", [(1, 1, 1, False), (3, 33, 33, True), (2, 70, 75, False)])
def test_prefill_separate(dtype, B, S, T, strided):
    # T > S: a StaticCache's prefill, keys t >= S are empty slots (NaN here: they must not be read)
    H, D = 3, 64
    q, k, v = _separate_inputs(B, H, S, T, D, dtype, 80 + S, strided)
    k[:, :, S:] = NAN
    v[:, :, S:] = NAN
    k0, v0 = k.clone(), v.clone()
    out = torch.full((B, S, H * D), NAN, dtype=dtype, device=DEVICE)
    assert A.prefill_attention_separate(q, k, v, 1 / math.sqrt(D), out=out) is out
    _check_close(out, *_separate_refs(q, k, v, 0, 1 / math.sqrt(D)))
    assert torch.equal(k.nan_to_num(), k0.nan_to_num()) and torch.equal(v.nan_to_num(), v0.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("past, S, splits, strided", [(0, 1, 1, False), (37, 1, 3, True), (130, 3, 1, True),
                                                       (9, 8, 2, False)])
def test_decode_separate(dtype, past, S, splits, strided):
    # keys past + S .. T-1 are beyond the sequence (NaN): never read; k/v are never written
    B, H, D = 2, 2, 32
    T = past + S + 5
    q, k, v = _separate_inputs(B, H, S, T, D, dtype, 90 + past, strided)
    k[:, :, past + S:] = NAN
    v[:, :, past + S:] = NAN
    k0, v0 = k.clone(), v.clone()
    out = torch.full((B, S, H * D), NAN, dtype=dtype, device=DEVICE)
    assert A.decode_attention_separate(q, k, v, past, 0.2, out=out, num_splits=splits) is out
    _check_close(out, *_separate_refs(q, k, v, past, 0.2))
    assert torch.equal(k.nan_to_num(), k0.nan_to_num()) and torch.equal(v.nan_to_num(), v0.nan_to_num())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("past, S, splits, starts", [
    (7, 1, 1, [0, 3, 7]),  # one row without padding, one with all of its past padded
    (130, 1, 3, [1, 33, 129]),  # starts inside, at and off BLOCK_N edges; a split left empty
    (300, 3, 2, [255, 0, 17]),  # S > 1 new tokens; a ragged last split
])
def test_decode_separate_left_padded(dtype, past, S, splits, starts):
    """kv_start: a left-padded batch (transformers' cache, padding first). Padding keys hold NaN: a
    kernel that reads one gives NaN; keys past + S .. T-1 too."""
    B, H, D = len(starts), 2, 64
    T = past + S + 4
    q, k, v = _separate_inputs(B, H, S, T, D, dtype, 70 + past, strided=True)
    kv_start = _lens(starts)
    for b, k0 in enumerate(starts):
        k[b, :, :k0] = NAN
        v[b, :, :k0] = NAN
    k[:, :, past + S:] = NAN
    v[:, :, past + S:] = NAN
    out = torch.full((B, S, H * D), NAN, dtype=dtype, device=DEVICE)
    assert A.decode_attention_separate(q, k, v, past, 0.2, kv_start=kv_start, out=out, num_splits=splits) is out
    _check_close(out, *_separate_refs(q, k.nan_to_num(), v.nan_to_num(), past, 0.2, kv_start))
    if starts[1] > 0:  # the padding really changes the result: without kv_start the NaN keys are read
        plain = A.decode_attention_separate(q, k.nan_to_num(), v.nan_to_num(), past, 0.2, num_splits=splits)
        assert not torch.allclose(plain[1].float(), out[1].float(), atol=1e-2)


def test_separate_matches_packed():
    """The same numbers through the packed (cache-writing) and separate launchers agree bit for bit."""
    B, H, D, n = 2, 2, 64, 21
    qkv = _randn((B, n, 3 * H * D), torch.float32, 95)
    kc, vc = _poisoned_cache(B, H, n + 3, D, torch.float32)
    packed = A.prefill_attention(qkv, kc, vc, _lens([n, n]), 0.125)
    q, k, v = _split_heads(qkv, H)
    assert torch.equal(A.prefill_attention_separate(q, k, v, 0.125), packed)
    kc2, vc2 = _poisoned_cache(B, H, n + 3, D, torch.float32)
    A.prefill_attention(qkv[:, : n - 1].contiguous(), kc2, vc2, _lens([n - 1] * B), 0.125)
    dec = A.decode_attention(qkv[:, n - 1 :].contiguous(), kc2, vc2, _lens([n - 1] * B), 0.125, num_splits=2)
    sep = A.decode_attention_separate(q[:, :, n - 1 :], k, v, n - 1, 0.125, num_splits=2)
    assert torch.equal(sep, dec)


def test_separate_errors():
    q = torch.zeros((2, 2, 3, 32), device=DEVICE)
    k = torch.zeros((2, 2, 10, 32), device=DEVICE)
    with pytest.raises(ValueError, match=r"k shape .* != v shape"):
        A.prefill_attention_separate(q, k, k[:, :, :5], 1.0)
    with pytest.raises(ValueError, match=r"prefill over S=3 queries needs at least S keys, k/v hold T=2"):
        A.prefill_attention_separate(q, k[:, :, :2], k[:, :, :2], 1.0)
    with pytest.raises(ValueError, match=r"does not match q .*expected \[B, H, T, D\] = \[2, 2, T, 32\]"):
        A.prefill_attention_separate(q, k[:1], k[:1], 1.0)
    with pytest.raises(ValueError, match=r"past_len must be an int with 0 <= past_len and past_len \+ S <= T \(S=3, T=10\), got 8"):
        A.decode_attention_separate(q, k, k, 8, 1.0)
    with pytest.raises(ValueError, match=r"decode_attention_separate: k is torch.float16, q is torch.float32; mixed dtypes"):
        A.decode_attention_separate(q, k.half(), k.half(), 2, 1.0)
    with pytest.raises(ValueError, match=r"q must be 4-d"):
        A.decode_attention_separate(q[0], k, k, 2, 1.0)
    with pytest.raises(ValueError, match=r"kv_start dtype torch.int64 is not supported, expected torch.int32"):
        A.decode_attention_separate(q, k, k, 2, 1.0, kv_start=torch.zeros(2, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"kv_start must have shape \[B\] = \[2\], got \(3,\)"):
        A.decode_attention_separate(q, k, k, 2, 1.0, kv_start=_lens([0, 0, 0]))
    with pytest.raises(ValueError, match=r"decode_attention_separate: tensors on different devices: .*'kv_start': "
                                         r"device\(type='meta'\)"):
        A.decode_attention_separate(q, k, k, 2, 1.0, kv_start=_lens([0, 0]).to("meta"))
    with pytest.raises(ValueError, match=r"prefill_attention_separate: tensors on different devices: .*'out': "
                                         r"device\(type='meta'\)"):
        A.prefill_attention_separate(q, k, k, 1.0, out=torch.empty((2, 3, 64), device="meta"))
    with pytest.raises(ValueError, match=r"prefill_attention_separate: tensors are on meta; the Triton kernel runs on CUDA"):
        A.prefill_attention_separate(q.to("meta"), k.to("meta"), k.to("meta"), 1.0)


# ---------------------------------------------------------------------------------------------
# launcher errors, config table, compile specs (no kernel launches)
# ---------------------------------------------------------------------------------------------
def _valid(B=2, T=4, H=2, D=32, dtype=torch.float32, Tmax=8):
    qkv = torch.zeros((B, T, 3 * H * D), dtype=dtype, device=DEVICE)
    kc, vc = _poisoned_cache(B, H, Tmax, D, dtype)
    return qkv, kc, vc, _lens([T] * B)


def test_prefill_errors():
    qkv, kc, vc, lens = _valid()
    with pytest.raises(ValueError, match=r"prefill_attention: k_cache is torch.float16, qkv is torch.float32; mixed dtypes"):
        A.prefill_attention(qkv, kc.half(), vc, lens, 1.0)
    with pytest.raises(ValueError, match=r"prefill_attention: qkv dtype torch.float64 is not supported; use one of "
                                         r"torch.float32, torch.float16, torch.bfloat16"):
        A.prefill_attention(qkv.double(), kc.double(), vc.double(), lens, 1.0)
    with pytest.raises(ValueError, match=r"qkv last dim 180 does not match the cache: expected 3\*H\*D = 3\*2\*32 = 192"):
        A.prefill_attention(qkv[..., :180].contiguous(), kc, vc, lens, 1.0)
    with pytest.raises(ValueError, match=r"seq_lens dtype torch.int64 is not supported, expected torch.int32"):
        A.prefill_attention(qkv, kc, vc, lens.long(), 1.0)
    with pytest.raises(ValueError, match=r"seq_lens must have shape \[B\] = \[2\]"):
        A.prefill_attention(qkv, kc, vc, lens[:1], 1.0)
    with pytest.raises(ValueError, match=r"prompt length T=4 is longer than the cache \(Tmax=3\)"):
        A.prefill_attention(qkv, kc[:, :, :3], vc[:, :, :3], lens, 1.0)
    with pytest.raises(ValueError, match=r"qkv batch 2 is larger than the cache batch Bmax=1"):
        A.prefill_attention(qkv, kc[:1], vc[:1], lens, 1.0)
    with pytest.raises(ValueError, match=r"head_dim 48 is not supported, expected one of \(32, 64, 128\)"):
        q48, k48, v48, l48 = _valid(D=48)
        A.prefill_attention(q48, k48, v48, l48, 1.0)
    with pytest.raises(ValueError, match=r"qkv must be 3-d"):
        A.prefill_attention(qkv[0], kc, vc, lens, 1.0)
    with pytest.raises(ValueError, match=r"out has shape \(2, 4, 32\), expected \(2, 4, 64\)"):
        A.prefill_attention(qkv, kc, vc, lens, 1.0, out=torch.empty((2, 4, 32), device=DEVICE))
    with pytest.raises(ValueError, match=r"k_cache must have a contiguous last dim"):
        A.prefill_attention(qkv, kc.transpose(2, 3), vc, lens, 1.0)
    with pytest.raises(ValueError, match=r"prefill_attention: tensors on different devices: .*'k_cache': "
                                         r"device\(type='meta'\)"):
        A.prefill_attention(qkv, kc.to("meta"), vc, lens, 1.0)
    with pytest.raises(ValueError, match=r"prefill_attention: tensors are on meta; the Triton kernel runs on CUDA"):
        A.prefill_attention(qkv.to("meta"), kc.to("meta"), vc.to("meta"), lens.to("meta"), 1.0)


def test_decode_errors():
    qkv, kc, vc, lens = _valid(T=1)
    with pytest.raises(ValueError, match=r"1 <= S <= 8, got S=9"):
        A.decode_attention(torch.zeros((2, 9, qkv.shape[2]), device=DEVICE), kc, vc, lens, 1.0)
    with pytest.raises(ValueError, match=r"decode_attention: v_cache is torch.float16, qkv is torch.float32; mixed dtypes"):
        A.decode_attention(qkv, kc, vc.half(), lens, 1.0)
    with pytest.raises(ValueError, match=r"cache_lens dtype torch.int64 is not supported, expected torch.int32"):
        A.decode_attention(qkv, kc, vc, lens.long(), 1.0)
    with pytest.raises(ValueError, match=r"num_splits must be an int >= 1, got 0"):
        A.decode_attention(qkv, kc, vc, lens, 1.0, num_splits=0)
    with pytest.raises(ValueError, match=r"decode_attention: out is torch.float16, qkv is torch.float32; mixed dtypes"):
        A.decode_attention(qkv, kc, vc, lens, 1.0, out=torch.empty((2, 1, 64), dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match=r"k_cache shape .* != v_cache shape"):
        A.decode_attention(qkv, kc, vc[:, :, :4], lens, 1.0)
    with pytest.raises(ValueError, match=r"decode_attention: tensors on different devices: .*'cache_lens': "
                                         r"device\(type='meta'\)"):
        A.decode_attention(qkv, kc, vc, lens.to("meta"), 1.0)
    with pytest.raises(ValueError, match=r"decode_attention: qkv dtype torch.float64 is not supported"):
        A.decode_attention(qkv.double(), kc.double(), vc.double(), lens, 1.0)


@pytest.mark.parametrize("entry", [("fp32", 32), ("half", 128)])
def test_prefill_config_block_m_must_be_a_multiple_of_block_n(monkeypatch, entry):
    """The diagonal loop starts on a key-block edge, so a table entry with BLOCK_M % BLOCK_N != 0 would
    attend to future keys: it is refused by a real check (not an assert, which python -O strips),
    naming the entry, before anything is launched, and by compile_specs."""
    bad = (32, 64, 4, 2)  # BLOCK_M 32 < BLOCK_N 64
    monkeypatch.setitem(A._PREFILL_CONFIGS, entry, bad)
    msg = (rf"_PREFILL_CONFIGS\[\('{entry[0]}', {entry[1]}\)\] = \(32, 64, 4, 2\): BLOCK_M=32 is not a multiple "
           rf"of BLOCK_N=64")
    D = entry[1]
    dtype = torch.float32 if entry[0] == "fp32" else torch.float16
    qkv, kc, vc, lens = _valid(D=D, dtype=dtype)
    out = torch.full((2, 4, 2 * D), NAN, dtype=dtype, device=DEVICE)
    with pytest.raises(RuntimeError, match=msg):
        A.prefill_attention(qkv, kc, vc, lens, 1.0, out=out)
    q, k, v = _split_heads(qkv, 2)
    with pytest.raises(RuntimeError, match=msg):
        A.prefill_attention_separate(q, k, v, 1.0, out=out)
    assert torch.isnan(out).all(), "a kernel ran with the bad config"
    with pytest.raises(RuntimeError, match=msg):
        A.compile_specs("fp32" if entry[0] == "fp32" else "fp16")


@pytest.mark.parametrize("S", [1, 3])
def test_decode_checks_the_lengths_fit_the_cache(S):
    """cache_lens[b] + S > Tmax: the kernel would drop the new K/V past the cache end. The lengths live
    on the device, so decode_attention reads them on the host only on the CPU (the interpreter) or
    with check_lens=True (on CUDA a sync), and names the row; nothing is written or launched."""
    H, D, Tmax = 2, 32, 13
    ok = [Tmax - S, 0, 4]  # row 0 fills the cache exactly
    qkv = _randn((3, S, 3 * H * D), torch.float32, 120 + S)
    kc, vc = _filled_cache(4, H, Tmax, D, torch.float32, [Tmax] * 4, 121 + S)
    kc0, vc0 = kc.clone(), vc.clone()
    out = torch.full((3, S, H * D), NAN, dtype=torch.float32, device=DEVICE)
    for row, n in ((1, Tmax - S + 1), (2, Tmax), (0, -1)):
        lens = list(ok)
        lens[row] = n
        msg = (rf"decode_attention: cache_lens\[{row}\] = {n} with S={S} new tokens does not fit the cache "
               rf"\(Tmax={Tmax}\): expected 0 <= cache_lens\[b\] and cache_lens\[b\] \+ S <= Tmax")
        with pytest.raises(ValueError, match=msg):
            A.decode_attention(qkv, kc, vc, _lens(lens), 0.2, out=out, check_lens=True)
        if DEVICE.type == "cpu":  # the default reads them too on the CPU (no sync to save)
            with pytest.raises(ValueError, match=msg):
                A.decode_attention(qkv, kc, vc, _lens(lens), 0.2, out=out, num_splits=2)
    assert torch.isnan(out).all(), "a kernel ran with bad lengths"
    assert torch.equal(kc, kc0) and torch.equal(vc, vc0), "the cache was written"
    # lengths that fit (row 0 up to the last position) pass the check
    A.decode_attention(qkv, kc, vc, _lens(ok), 0.2, out=out, check_lens=True)
    _check_close(out, *_decode_refs(qkv, kc0, vc0, _lens(ok), 0.2))
    assert torch.equal(kc[0, :, Tmax - S:], _split_heads(qkv, H)[1][0])


def test_default_num_splits_is_static():
    assert A.default_num_splits(12, 1024) == 8  # GPT-2 small: 96 programs per sequence, whatever the batch
    assert A.default_num_splits(256, 1024) == 1  # enough heads already
    assert A.default_num_splits(2, 16) == 1  # short cache: no split
    for Tmax in (1, 100, 1024, 2048):
        assert 1 <= A.default_num_splits(25, Tmax) <= 32


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_compile_specs_cover_every_config(dtype):
    specs = A.compile_specs(dtype)
    # per head_dim: prefill (cache-writing + separate), decode (direct/split x cache-writing/separate/
    # separate with kv_start), and decode_attention's direct/split PDL variants (sm_90); the split
    # variants combine in-kernel (no reduce kernel)
    assert len(specs) == 3 * 10
    pdl = [s for s in specs if s.launch_pdl]
    assert len(pdl) == 3 * 2 and all(s.constexprs["WRITE_KV"] and s.min_cc == 90 for s in pdl)
    assert all(s.constexprs.get("USE_PDL", False) == s.launch_pdl for s in specs)  # prefill: no PDL
    assert len({s.name for s in specs}) == len(specs)
    # pointers that are not of the I/O dtype: the [B] int32 lengths and the fp32 split partials
    other_ptrs = {"seq_lens_ptr": "*i32", "cache_lens_ptr": "*i32", "kv_start_ptr": "*i32",
                  "part_m_ptr": "*fp32", "part_l_ptr": "*fp32", "part_acc_ptr": "*fp32", "count_ptr": "*i32"}
    for s in specs:
        params = list(s.fn.arg_names)
        assert list(s.signature) == params, s.name  # every parameter, in the kernel's order
        consts = [p for p in params if s.signature[p] == "constexpr"]
        assert sorted(s.constexprs) == sorted(consts), s.name
        for p, ty in s.signature.items():
            if p.endswith("_ptr"):
                assert ty == other_ptrs.get(p, "*" + dtype), (s.name, p, ty)
            elif p.startswith("stride_"):
                assert ty == "i64", (s.name, p, ty)
            elif ty != "constexpr":
                assert ty == {"scale": "fp32"}.get(p, "i32"), (s.name, p, ty)
        assert s.uses_dot
        if "WRITE_KV" in s.constexprs:
            assert s.constexprs["WRITE_KV"] == ("separate" not in s.name), s.name
        if "HAS_KV_START" in s.constexprs:
            assert s.constexprs["HAS_KV_START"] == ("kv_start" in s.name), s.name
    for D in (32, 64, 128):
        bm, bn, w, st = A._PREFILL_CONFIGS[("half", D)]
        assert any(s.constexprs.get("HEAD_DIM") == D and s.constexprs.get("BLOCK_M") == bm
                   and s.num_warps == w and s.num_stages == st for s in specs)
        assert bm % bn == 0
    with pytest.raises(ValueError, match=r"compile_specs dtype 'fp8' is not supported"):
        A.compile_specs("fp8")


def test_decode_workspace_gives_the_same_bits_and_is_checked():
    """decode_attention with the caller's workspace (what a CUDA-graph step passes) equals the one
    that allocates its partials per call, bit for bit; a workspace of another shape is refused."""
    B, H, S, D, Tmax = 3, 2, 2, 64, 300
    qkv = _randn((B, S, 3 * H * D), torch.float32, 140)
    lens = _lens([250, 17, 101])
    outs = []
    for ws in (None, A.decode_workspace(_poisoned_cache(B, H, Tmax, D, torch.float32)[0], B, S)):
        kc, vc = _poisoned_cache(B, H, Tmax, D, torch.float32)
        kc[:, :, :250] = _randn((B, H, 250, D), torch.float32, 141)
        vc[:, :, :250] = _randn((B, H, 250, D), torch.float32, 142)
        outs.append(A.decode_attention(qkv, kc, vc, lens, 0.125, workspace=ws))
    assert A.decode_workspace(kc, B, S).num_splits == A.default_num_splits(H, Tmax) == 3
    assert torch.equal(outs[0], outs[1]) and torch.isfinite(outs[1]).all()
    with pytest.raises(ValueError, match=r"workspace holds partials \(6, 3, 1, 64\) for 3 split\(s\); this call "
                                         r"needs 3 split\(s\) of \[B\*H, splits, S, D\] = \[6, 3, 2, 64\]"):
        A.decode_attention(qkv, kc, vc, lens, 0.125, workspace=A.decode_workspace(kc, B, 1))
    with pytest.raises(ValueError, match=r"needs 2 split\(s\)"):
        A.decode_attention(qkv, kc, vc, lens, 0.125, num_splits=2, workspace=A.decode_workspace(kc, B, S))


def test_decode_kernel_clamps_a_negative_length_to_zero():
    """On CUDA the lengths are not read on the host: the kernel itself keeps a bad (negative) length
    inside the row, writing the new K/V at positions 0.. and nothing before the row (another head,
    layer or sequence). Driven through the launcher's internals, past the host check."""
    B, H, S, D, Tmax = 2, 2, 2, 32, 16
    full_k = torch.full((3, B, H, Tmax, D), NAN, device=DEVICE)
    full_v = torch.full((3, B, H, Tmax, D), NAN, device=DEVICE)
    kc, vc = full_k[1], full_v[1]
    qkv = _randn((B, S, 3 * H * D), torch.float32, 150)
    q, k, v = _split_heads(qkv, H)
    out = torch.full((B, S, H * D), NAN, device=DEVICE)
    A._launch_decode(q, k, v, kc, vc, _lens([-3, 0]), out, 0.2, 1, write_kv=True)
    assert torch.equal(kc[:, :, :S], k) and torch.equal(vc[:, :, :S], v)  # written at 0 .. S-1 of each row
    assert torch.isnan(full_k[0]).all() and torch.isnan(full_k[2]).all() and torch.isnan(kc[:, :, S:]).all()
    assert torch.isfinite(out).all()  # no NaN (unwritten cache) was read
    ref = A.decode_attention_ref(qkv, kc, vc, _lens([0, 0]), 0.2)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

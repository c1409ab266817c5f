"""The decode GEMMs' launch plan (kernels.linear.plan): the grid every decode GEMM of gpt2 ..
gpt2-xl launches on the GPUs it is built for. Pure Python: no kernel runs."""
import triton

from fastgpt2.kernels import linear as L

MODELS = {"gpt2": 768, "gpt2-medium": 1024, "gpt2-large": 1280, "gpt2-xl": 1600}
VOCAB = 50257


def _gemms(e: int):
    """(name, N, K) of every GEMM of a decode step of a GPT-2 of width e."""
    return [("qkv", 3 * e, e), ("attn-out", e, e), ("mlp-up", 4 * e, e), ("mlp-down", e, 4 * e), ("lm_head", VOCAB, e)]


def test_every_decode_gemm_fills_the_gpu_twice():
    """At least 2x the SM count programs (264 on H100/H200, 216 on A100) for every decode GEMM at
    every batch 1..32, in every dtype."""
    failing = []
    for target, sms in L.TARGET_SMS.items():
        for model, e in MODELS.items():
            for batch in range(1, 33):
                for dtype in ("fp16", "bf16", "fp32"):
                    for name, n, k in _gemms(e):
                        p = L.plan(batch, n, k, dtype, sms)
                        if p.programs(batch, n) < L.MIN_WAVES * sms:
                            failing.append((target, model, batch, dtype, name, p.programs(batch, n)))
    assert L.MIN_WAVES == 2 and L.TARGET_SMS["sm_90"] == 132
    assert not failing, failing


def test_plans_are_well_formed():
    for model, e in MODELS.items():
        for batch in (1, 7, 8, 17, 32, 64, 65, 1024):
            for name, n, k in _gemms(e):
                p = L.plan(batch, n, k, "fp16", 132)
                assert p.block_n in p.config.block_ns and p.k_per_split % p.block_k == 0
                assert p.split_k * p.k_per_split >= k > (p.split_k - 1) * p.k_per_split, (model, batch, name, p)
                assert p.grid(batch, n) == (triton.cdiv(batch, p.config.block_m), triton.cdiv(n, p.block_n), p.split_k)
                assert p.counters(batch, n) == p.grid(batch, n)[0] * (p.grid(batch, n)[1] + 1)
                if batch > 64:
                    assert p.config.name == "prefill" and p.split_k == 1  # prefill never splits


def test_a_short_k_gets_no_empty_splits():
    # K = 64 is one K tile: it cannot split, however few programs that leaves
    p = L.plan(1, 64, 64, "fp16", 132)
    assert p.split_k == 1 and p.block_n == 32
    p = L.plan(1, 64, 200, "fp16", 132)
    assert p.split_k == triton.cdiv(200, p.block_k) == 4
    # the widest tile that reaches the bound is kept: gpt2's QKV at batch 1 stays 64 wide
    assert L.plan(1, 2304, 768, "fp16", 132).block_n == 64 and L.plan(1, 768, 768, "fp16", 132).block_n == 32


def test_a_decode_plan_is_the_same_for_every_row_count():
    """The engine steps 1..64 slots: a row's K split (so the order of its sums) must not depend on
    how many rows run beside it; only the row blocks of the grid grow with M."""
    for target, sms in L.TARGET_SMS.items():
        for e in MODELS.values():
            for name, n, k in _gemms(e):
                for dtype in ("fp16", "bf16", "fp32"):
                    one = L.plan(1, n, k, dtype, sms)
                    for m in (2, 7, 16, 17, 33, 64):
                        assert L.plan(m, n, k, dtype, sms) == one, (target, e, name, dtype, m)
    assert L.plan(65, 768, 768, "fp16", 132).config.name == "prefill"  # past 64 rows: the prefill plan

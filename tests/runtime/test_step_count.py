"""What the decode step runs: ops counted on any machine (Triton in the interpreter here), kernels
counted from the profiler on CUDA."""
import pytest
import torch

from fastgpt2.runtime import plan as step_plan
from fastgpt2.runtime.step_count import count_ops, measure_step_count


def test_counter_counts_aten_ops_and_skips_views_and_allocations():
    x = torch.randn(4, 8)
    with count_ops() as c:
        y = x.view(8, 4).t()  # views: nothing launched
        z = torch.empty(3)  # an allocation: nothing launched
        w = (y.t() @ y).relu()  # 2 ops: [8, 4] @ [4, 8]
        w += 1  # 1 op
    assert dict(c.aten) == {"mm": 1, "relu": 1, "add_": 1}, dict(c.aten)
    assert c.total == 3 and z.numel() == 3 and w.shape == (8, 8)


def test_counter_counts_triton_launches_once_each():
    import triton
    import triton.language as tl

    @triton.jit
    def _double(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * 2, mask=offs < n)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(100, device=device)
    ref = x * 4
    with count_ops() as c:
        _double[(4,)](x, 100, BLOCK=32)
        _double[(4,)](x, 100, BLOCK=32)
    assert dict(c.triton) == {"_double": 2} and not c.aten  # the interpreter's own torch calls are not counted
    assert torch.equal(x, ref)


def test_triton_decode_step_fits_the_budget():
    # the budget of issue 14: <= 6 kernels per layer, <= 4 per step (counted over a long cache, so that
    # decode attention splits, and K long enough that the GEMMs split K: every in-kernel reduction runs)
    count = measure_step_count("triton", unit="ops")
    assert count.unit == "ops" and count.per_layer <= 6 and count.per_step <= 4, count
    # what they are: the plan's ops (runtime/plan.py), one launch each: per layer QKV, attention,
    # attention-out + ln_2, MLP up, MLP down + next layernorm; per step the embedding (+ layer 0's ln_1),
    # the lm_head, the greedy choice (torch.max: the argmax) and the length update
    assert (count.per_layer, count.per_step) == (len(step_plan.per_layer()), len(step_plan.per_step())) == (5, 4), count
    assert count.fusions == step_plan.fusions()
    from fastgpt2.kernels.attention import default_num_splits
    from fastgpt2.kernels.linear import plan

    assert plan(1, 64, 4 * 64, "fp32", 132).split_k > 1 and default_num_splits(1, 1024) > 1  # the measured model's
    assert count.by_name == {"triton:_linear_kernel": 2 * 4 + 1, "triton:_decode_attn_kernel": 2,
                             "triton:_add_layernorm_kernel": 1, "aten:max": 1, "aten:add_": 1}, count.by_name


def test_torch_backend_is_counted_too():
    count = measure_step_count("torch", unit="ops")
    assert count.per_layer > 0 and count.total == 2 * count.per_layer + count.per_step
    assert count.to_dict()["unit"] == "ops" and sum(count.by_name.values()) == count.total


def test_kernels_are_counted_only_where_there_are_kernels():
    if torch.cuda.is_available():
        count = measure_step_count("triton")
        assert count.unit == "kernels" and count.per_layer >= 6 and count.total == sum(count.by_name.values())
    else:
        with pytest.raises(ValueError, match="unit must be 'ops', or 'kernels' on a CUDA machine; got 'kernels' on cpu"):
            measure_step_count("torch", unit="kernels")

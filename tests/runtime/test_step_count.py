"""The launch budget of the decode step: counted on any machine (Triton in the interpreter here)."""
import torch

from fastgpt2.runtime.launches import count_launches, measure_budget


def test_counter_counts_aten_ops_and_skips_views_and_allocations():
    x = torch.randn(4, 8)
    with count_launches() as c:
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
    with count_launches() as c:
        _double[(4,)](x, 100, BLOCK=32)
        _double[(4,)](x, 100, BLOCK=32)
    assert dict(c.triton) == {"_double": 2} and not c.aten  # the interpreter's own torch calls are not counted
    assert torch.equal(x, ref)


def test_triton_decode_step_fits_the_budget():
    budget = measure_budget("triton")
    assert budget["per_layer"] <= 8, budget
    assert budget["per_step"] <= 4, budget
    # every layer op is a Triton kernel; the only aten ops are the per-step lm_head, the greedy choice
    # (torch.max: the argmax), the length update
    assert {k for k in budget["by_op"] if k.startswith("aten:")} <= {"aten:mm", "aten:matmul", "aten:max", "aten:add_"}


def test_torch_backend_is_counted_too():
    budget = measure_budget("torch")
    assert budget["per_layer"] > 0 and budget["total"] == 2 * budget["per_layer"] + budget["per_step"]

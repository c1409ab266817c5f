"""The decode step's static contract (same buffers every step, no cache-sized allocation per
step) on the CPU, and CUDA-graph replay vs eager on a GPU."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgpt2
from fastgpt2.runtime.graphs import DecodeStep, GraphError, graph_cache_len
from fastgpt2.runtime.sampling import Sampling

CFG = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=64)


class _Allocations(TorchDispatchMode):
    """Records the element count of every tensor an op allocates: views, in-place and out= ops
    (whose results alias an input) are excluded."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and all(r.alias_info is None for r in func._schema.returns):
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(True, 0.8, 20, 0.9)], ids=["greedy", "sampled"])
def test_same_buffers_every_step_and_no_cache_sized_allocation(sampling):
    model = fastgpt2.GPT2.from_config(CFG, seed=3)
    batch, prompt, max_len = 3, 6, 40
    cache = model.new_cache(batch, max_len)
    step = DecodeStep(model, cache, sampling, seed=1, use_cuda_graph=False)
    ids = torch.randint(0, CFG.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(2))
    step.start(model.prefill(ids, torch.full((batch,), prompt, dtype=torch.int32), cache))
    ptrs = (step.tokens.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.lengths.data_ptr())
    one_layer_k = batch * CFG.n_head * max_len * CFG.head_dim  # the smallest cache-sized tensor
    for i in range(20):
        with _Allocations() as seen:
            out = step()
        assert out is step.tokens
        assert (step.tokens.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.lengths.data_ptr()) == ptrs
        assert max(seen.sizes) < one_layer_k, f"step {i} allocated a cache-sized tensor"
    assert cache.lengths.tolist() == [prompt + 20] * batch


def test_eager_step_equals_model_decode():
    model = fastgpt2.GPT2.from_config(CFG, seed=4)
    ids = torch.randint(0, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(5))
    lens = torch.full((2,), 5, dtype=torch.int32)
    cache_a, cache_b = model.new_cache(2, 20), model.new_cache(2, 20)
    step = DecodeStep(model, cache_a, use_cuda_graph=False)
    tokens = step.start(model.prefill(ids, lens, cache_a)).clone()
    model.prefill(ids, lens, cache_b)
    for _ in range(8):
        logits_b = model.decode(tokens[:, None], cache_b)
        step()
        assert torch.equal(step.logits, logits_b)
        assert torch.equal(step.tokens, logits_b.argmax(-1))
        tokens = step.tokens.clone()


def test_graph_cache_len_buckets():
    assert [graph_cache_len(n, 1024) for n in (1, 16, 17, 100, 600, 1024)] == [16, 16, 32, 128, 1024, 1024]
    assert graph_cache_len(40, 32) == 32


def test_cuda_graph_on_cpu_is_a_clear_error():
    model = fastgpt2.GPT2.from_config(CFG)
    with pytest.raises(GraphError, match="use_cuda_graph=True needs a CUDA device"):
        model.generate(torch.tensor([[1, 2]]), 3, use_cuda_graph=True)
    with pytest.raises(GraphError, match="needs a CUDA device"):
        DecodeStep(model, model.new_cache(1, 8), use_cuda_graph=True)


def test_stop_check_every_n_steps_trims_to_the_same_output():
    model = fastgpt2.GPT2.from_config(CFG, seed=6)
    ids = torch.randint(0, CFG.vocab_size, (2, 4), generator=torch.Generator().manual_seed(7))
    free = model.generate(ids, 20)
    eos = int(free[0, 4 + 2])
    every_step = model.generate(ids, 20, eos_token_id=eos)
    for n in (3, 8):
        assert torch.equal(model.generate(ids, 20, eos_token_id=eos, stop_check_every=n), every_step)


# -- GPU: graphed vs eager -------------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none here")


def _gpu_model(backend="auto"):
    cfg = fastgpt2.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=256)
    return fastgpt2.GPT2.from_config(cfg, device="cuda", dtype=torch.float16, backend=backend, seed=0)


def _run_steps(model, ids, graphed, steps, sampling=Sampling(), seed=None, pdl=None):
    b, t = ids.shape
    cache = model.new_cache(b, t + steps + 1)
    step = DecodeStep(model, cache, sampling, seed, use_cuda_graph=graphed, pdl=pdl)
    step.start(model.prefill(ids, torch.full((b,), t, dtype=torch.int32, device="cuda"), cache))
    tokens, logits = [], []
    for _ in range(steps):
        step()
        tokens.append(step.tokens.clone())
        logits.append(step.logits.clone())
    return torch.stack(tokens, 1), torch.stack(logits, 1)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("batch", [1, 8])
def test_graphed_equals_eager_over_64_steps(backend, batch):
    model = _gpu_model(backend)
    ids = torch.randint(0, 1000, (batch, 9), device="cuda")
    tok_e, log_e = _run_steps(model, ids, graphed=False, steps=64)
    tok_g, log_g = _run_steps(model, ids, graphed=True, steps=64)
    assert torch.equal(tok_g, tok_e)
    assert torch.equal(log_g, log_e)


hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                            reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+; none here")


@hopper
@pytest.mark.gpu
@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graphed"])
@pytest.mark.parametrize("batch", [1, 8])
def test_pdl_step_equals_the_plain_step_over_64_steps(graphed, batch):
    """With programmatic dependent launch every kernel may be scheduled while the one before it is
    still running, and waits on the GPU before touching memory: the same bits, or a wait is missing."""
    model = _gpu_model("triton")
    ids = torch.randint(0, 1000, (batch, 9), device="cuda")
    tok_p, log_p = _run_steps(model, ids, graphed=graphed, steps=64, pdl=True)
    tok_n, log_n = _run_steps(model, ids, graphed=graphed, steps=64, pdl=False)
    assert torch.equal(tok_p, tok_n)
    assert torch.equal(log_p, log_n)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("max_len", [64, 512])  # one key split, and 4 with the reduce
def test_capture_compiles_nothing_and_replay_equals_eager(max_len):
    """Every Triton kernel of the step is compiled by the warm-up at its final shapes: none while the
    graph is being captured (triton's jit_cache_hook runs before every compilation)."""
    from triton import knobs

    model = _gpu_model("triton")
    ids = torch.randint(0, 1000, (3, 9), device="cuda")
    lens = torch.full((3,), 9, dtype=torch.int32, device="cuda")
    steps = {}
    for graphed in (False, True):
        cache = model.new_cache(3, max_len)
        steps[graphed] = DecodeStep(model, cache, use_cuda_graph=graphed)
        steps[graphed].start(model.prefill(ids, lens, cache))
    compiled_in_capture = []

    def hook(*args, **kwargs):
        compiled_in_capture.append(torch.cuda.is_current_stream_capturing())
        return None  # go on compiling

    previous, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    try:
        for _ in range(12):
            steps[True]()
            steps[False]()
            assert torch.equal(steps[True].logits, steps[False].logits)
            assert torch.equal(steps[True].tokens, steps[False].tokens)
    finally:
        knobs.runtime.jit_cache_hook = previous
    assert not any(compiled_in_capture), "a Triton kernel compiled inside the CUDA-graph capture"
    assert steps[True].graph is not None


@gpu
@pytest.mark.gpu
def test_resizing_the_batch_rebuilds_graphs():
    model = _gpu_model()
    for batch in (1, 8, 3, 8, 1):
        ids = torch.randint(0, 1000, (batch, 7), device="cuda")
        graphed = model.generate(ids, 24, use_cuda_graph=True)
        eager = model.generate(ids, 24, use_cuda_graph=False)
        assert torch.equal(graphed, eager), f"batch {batch}"
    assert {key[0] for key in model.graphs.idle if key[3]} == {1, 3, 8} and not model.graphs.leased


@gpu
@pytest.mark.gpu
def test_seeded_sampling_reproduces_in_graphs():
    model = _gpu_model()
    ids = torch.randint(0, 1000, (4, 5), device="cuda")
    kwargs = dict(do_sample=True, temperature=0.9, top_k=50, seed=1234)
    a = model.generate(ids, 40, use_cuda_graph=True, **kwargs)
    b = model.generate(ids, 40, use_cuda_graph=True, **kwargs)
    c = model.generate(ids, 40, use_cuda_graph=False, **kwargs)
    assert torch.equal(a, b)
    assert torch.equal(a, c)


# -- the step pool: each stream leases its own step ------------------------------------------------
def test_pool_leases_a_step_to_one_stream_at_a_time():
    model = fastgpt2.GPT2.from_config(CFG)
    pool = model.graphs
    a = pool.lease(2, 20, Sampling(), None, use_cuda_graph=False)
    b = pool.lease(2, 20, Sampling(), None, use_cuda_graph=False)  # same bucket, a is still leased
    assert a is not b and a.cache is not b.cache and a.tokens.data_ptr() != b.tokens.data_ptr()
    pool.release(a)
    assert pool.lease(2, 17, Sampling(), None, use_cuda_graph=False) is a  # same bucket (cache 32), idle again
    with pytest.raises(GraphError, match="not leased from this pool"):
        pool.release(a) or pool.release(a)
    pool.release(b)
    assert sum(len(v) for v in pool.idle.values()) == 2 and not pool.leased


def test_pool_keeps_at_most_max_idle_steps():
    model = fastgpt2.GPT2.from_config(CFG)
    pool = model.graphs
    pool.max_idle = 2
    steps = [pool.lease(b, 10, Sampling(), None, use_cuda_graph=False) for b in (1, 2, 3)]
    for step in steps:
        pool.release(step)
    assert sorted(key[0] for key in pool.idle) == [2, 3]  # batch 1, the least recently used, dropped


def test_two_interleaved_streams_give_the_tokens_of_two_sequential_ones():
    """Same bucket (batch, cache length, sampling): with a shared step the second stream's prefill
    would overwrite the first one's cache and tokens mid-generation."""
    model = fastgpt2.GPT2.from_config(CFG, seed=3)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randint(0, 101, (2, 6), generator=g), torch.randint(0, 101, (2, 6), generator=g)
    for kwargs in (dict(), dict(do_sample=True, top_k=20, seed=7)):
        alone_x = model.generate(x, 12, **kwargs)[:, 6:]
        alone_y = model.generate(y, 12, **kwargs)[:, 6:]
        sx, sy = model.stream(x, 12, **kwargs), model.stream(y, 12, **kwargs)
        got_x, got_y = [], []
        for tx, ty in zip(sx, sy):  # one step of each in turn
            got_x.append(tx)
            got_y.append(ty)
        assert torch.equal(torch.stack(got_x, 1), alone_x) and torch.equal(torch.stack(got_y, 1), alone_y)
        assert len(model.graphs.leased) == 1  # sx is exhausted and gave its step back; zip never finished sy
        sy.close()
        assert not model.graphs.leased


def test_a_closed_stream_returns_its_step():
    model = fastgpt2.GPT2.from_config(CFG)
    s = model.stream(torch.tensor([[1, 2, 3]]), 10)
    next(s)
    assert len(model.graphs.leased) == 1
    s.close()
    assert not model.graphs.leased and sum(len(v) for v in model.graphs.idle.values()) == 1


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
def test_triton_step_allocates_its_split_partials_once_before_any_step(monkeypatch):
    """The decode step owns the kernels' scratch (made at construction, before a capture would run):
    the attention's split partials and the arrival counters of the attention and of the split-K /
    layernorm GEMMs. A step allocates none of it, and equals GPT2.decode (which allocates per call)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = fastgpt2.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=101, n_positions=300)
    model = fastgpt2.GPT2.from_config(cfg, device=device, backend="triton", seed=8)
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(9)).to(device)
    lens = torch.full((2,), 5, dtype=torch.int32, device=device)
    cache, other = model.new_cache(2, 300), model.new_cache(2, 300)  # 3 key splits: partials, combined in-kernel
    step = DecodeStep(model, cache, use_cuda_graph=False)
    attention, gemm = step.workspace.attention, step.workspace.gemm
    assert attention.num_splits == 3 and tuple(attention.part_acc.shape) == (2 * 2, 3, 1, 32)
    assert gemm.counters.dtype == torch.int32 and gemm.partials.numel() > 1  # the MLP down projection splits K
    step.start(model.prefill(ids, lens, cache))
    model.prefill(ids, lens, other)
    made = []
    real_empty, real_zeros = torch.empty, torch.zeros

    def empty(*args, **kwargs):
        if args and isinstance(args[0], tuple) and args[0][:3] == (2 * 2, 3, 1):  # [B*H, splits, S(, D)]
            made.append(args[0])
        return real_empty(*args, **kwargs)

    def zeros(*args, **kwargs):
        if kwargs.get("dtype") == torch.int32:  # arrival counters (attention and GEMMs)
            made.append(("counters", args))
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty)  # what the launchers would call
    monkeypatch.setattr(torch, "zeros", zeros)
    for _ in range(3):
        fed = step.tokens.clone()
        step()
        assert not made, f"the step allocated kernel scratch: {made}"
        assert torch.equal(step.logits, model.decode(fed[:, None], other))
        assert len(made) > 3 and made.clear() is None  # GPT2.decode allocates its own, per call
    assert not attention.counters.any() and not gemm.counters.any()  # every launch left its counters at zero


def test_pdl_where_it_cannot_run_is_a_clear_error(monkeypatch):
    from fastgpt2.errors import BackendError
    from fastgpt2.runtime import ops

    with pytest.raises(BackendError, match=r"pdl=True .*backend='triton' on a CUDA GPU.*backend='torch' on cpu"):
        fastgpt2.GPT2.from_config(CFG, pdl=True)
    model = fastgpt2.GPT2.from_config(CFG)
    assert model.pdl is False and "pdl" not in repr(model)
    with pytest.raises(BackendError, match="pass pdl=False"):
        DecodeStep(model, model.new_cache(1, 16), use_cuda_graph=False, pdl=True)
    with pytest.raises(BackendError, match="True or False"):
        ops.resolve_pdl("yes", "triton", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(BackendError, match="NVIDIA A100 is sm_80"):
        ops.resolve_pdl(True, "triton", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ops.resolve_pdl(True, "triton", torch.device("cuda")) is True
    assert ops.resolve_pdl(False, "torch", torch.device("cpu")) is False


@pytest.mark.skipif(not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")
def test_pdl_step_launches_every_triton_kernel_with_pdl(pdl_launches):
    """The flag reaches every GEMM and attention launch of the step (USE_PDL and launch_pdl together)
    and no other launch (the embedding, the step's first kernel, follows a torch op or the graph's
    start: nothing to overlap): recorded at ``kernel[grid](...)`` (the ``pdl_launches`` fixture; in the interpreter
    they run as plain launches)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    launches = pdl_launches
    cfg = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=101, n_positions=300)
    model = fastgpt2.GPT2.from_config(cfg, device=device, backend="triton", seed=4)
    ids = torch.randint(0, 101, (2, 5), generator=torch.Generator().manual_seed(5)).to(device)
    lens = torch.full((2,), 5, dtype=torch.int32, device=device)
    steps = {}
    for pdl in (False, True):
        cache = model.new_cache(2, 300)  # 3 key splits: the attention's combine runs too
        steps[pdl] = DecodeStep(model, cache, use_cuda_graph=False, pdl=pdl)
        assert steps[pdl].workspace.pdl is pdl
        steps[pdl].start(model.prefill(ids, lens, cache))
    seen = {}
    for pdl in (False, True):
        launches.clear()
        steps[pdl]()
        seen[pdl] = list(launches)
        embed = [launch for launch in seen[pdl] if launch[0] == "_add_layernorm_kernel"]
        assert embed == [("_add_layernorm_kernel", False, False)], seen[pdl]
        assert all(use == pdl and flag == pdl for name, use, flag in seen[pdl] if name != "_add_layernorm_kernel")
    names = [name for name, _, _ in seen[True]]
    assert names == [name for name, _, _ in seen[False]]
    assert {"_linear_kernel", "_decode_attn_kernel", "_add_layernorm_kernel"} == set(names)
    assert names.count("_linear_kernel") == 4 * cfg.n_layer + 1  # QKV, attn-out, MLP up, MLP down; lm_head
    assert torch.equal(steps[True].logits, steps[False].logits)
    assert torch.equal(steps[True].tokens, steps[False].tokens)
    launches.clear()
    model.prefill(ids, lens, model.new_cache(2, 300))  # outside a decode step: plain launches
    assert launches and not any(use or flag for _, use, flag in launches)

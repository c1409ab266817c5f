"""The engine's decode step (runtime/engine.py), the step generate and stream run: its static contract
on the CPU (the same buffers every step, no cache-sized allocation, the kernels' scratch made once
before any step that could be captured), eager steps equal to GPT2.decode, seeded sampling, streams
sharing the model's engine; on a GPU, CUDA-graph replay equal to the eager step bit for bit and
programmatic dependent launch equal to plain launches."""
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastgpt2
from fastgpt2.runtime.engine import Engine
from fastgpt2.runtime.graphs import GraphError, graph_cache_len
from fastgpt2.runtime.sampling import Sampling

CFG = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=101, n_positions=64)
TRITON = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
triton_here = pytest.mark.skipif(not TRITON, reason="no CUDA and TRITON_INTERPRET is not 1 (tests/conftest.py sets it)")


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


def _prompts(lengths, seed, vocab=CFG.vocab_size):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def _seed():
    return int(torch.randint(0, 2**31, ()))


def _right_padded(prompts, device):
    """ids [B, T] right-padded and lens [B] int32, on `device`: GPT2.prefill's inputs."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, :len(p)] = p
    return ids.to(device), torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)


@pytest.mark.parametrize("sampling", [Sampling(), Sampling(True, 0.8, 20, 0.9)], ids=["greedy", "sampled"])
def test_same_buffers_every_step_and_no_cache_sized_allocation(sampling):
    model = fastgpt2.GPT2.from_config(CFG, device="cpu", seed=3)
    lengths, max_len, steps = [6, 3, 5], 40, 20
    engine = Engine(model, max_batch=3, max_len=max_len, use_cuda_graph=False)
    requests = [engine.add(p, steps + 2, sampling, seed=i) for i, p in enumerate(_prompts(lengths, _seed()))]
    engine.step()  # admits the three: the prefill and each one's first token
    cache = engine.cache
    ptrs = (engine.tokens.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.lengths.data_ptr())
    one_layer_k = 3 * CFG.n_head * max_len * CFG.head_dim  # the smallest cache-sized tensor
    for i in range(steps):
        with _Allocations() as seen:
            out = engine.step()
        assert [r for r, _ in out] == requests and [t for _, t in out] == engine.tokens.tolist()
        assert (engine.tokens.data_ptr(), cache.k.data_ptr(), cache.v.data_ptr(), cache.lengths.data_ptr()) == ptrs
        assert max(seen.sizes) < one_layer_k, f"step {i} allocated a cache-sized tensor"
    assert cache.lengths.tolist() == [n + steps for n in lengths] == [r.length - 1 for r in requests]
    assert all(not r.finished for r in requests)


@pytest.mark.parametrize("lengths", [[6, 6, 6], [5, 2, 9]], ids=["uniform", "ragged"])
def test_eager_step_equals_model_decode(lengths):
    """Prompts in neighbouring slots: each engine step's logits are GPT2.decode's over a cache prefilled
    with the same prompts and fed the same tokens, within rounding (the engine attends over a
    power-of-two bound of the longest sequence with the ragged mask; GPT2.decode over the longest + 1,
    and without a mask when every row holds the same length)."""
    model = fastgpt2.GPT2.from_config(CFG, device="cpu", seed=4)
    prompts = _prompts(lengths, _seed())
    engine = Engine(model, max_batch=3, max_len=24, use_cuda_graph=False)
    requests = [engine.add(p, 10) for p in prompts]
    engine.step()
    other = model.new_cache(3, 24)
    prefill_logits = model.prefill(*_right_padded(prompts, "cpu"), other)
    tokens = engine.tokens.clone()
    assert torch.equal(tokens, prefill_logits.argmax(-1))
    for _ in range(8):
        logits = model.decode(tokens[:, None], other)
        out = engine.step()
        torch.testing.assert_close(engine.logits, logits, rtol=0, atol=1e-6)
        assert [t for _, t in out] == engine.logits.argmax(-1).tolist() == engine.tokens.tolist()
        tokens = engine.tokens.clone()
    assert [len(r.tokens) for r in requests] == [9] * 3 and engine.cache.lengths.tolist() == [n + 8 for n in lengths]


def test_graph_cache_len_buckets():
    assert [graph_cache_len(n, 1024) for n in (1, 16, 17, 100, 600, 1024)] == [16, 16, 32, 128, 1024, 1024]
    assert graph_cache_len(40, 32) == 32


def test_cuda_graph_on_cpu_is_a_clear_error():
    model = fastgpt2.GPT2.from_config(CFG, device="cpu")
    with pytest.raises(GraphError, match="use_cuda_graph=True needs a CUDA device"):
        model.generate(torch.tensor([[1, 2]]), 3, use_cuda_graph=True)
    with pytest.raises(GraphError, match="needs a CUDA device"):
        Engine(model, max_batch=1, use_cuda_graph=True)
    engine = Engine(model, max_batch=1, max_len=16)  # eager: the CPU's default
    request = engine.add([1, 2], 3)
    with pytest.raises(GraphError, match="needs a CUDA device"):
        engine.step(use_cuda_graph=True)
    assert list(engine.queue) == [request] and not engine.running and not request.tokens  # refused before any work


def test_stop_check_every_is_deprecated_and_changes_nothing():
    model = fastgpt2.GPT2.from_config(CFG, device="cpu", seed=6)
    ids = torch.randint(1, CFG.vocab_size, (2, 4), generator=torch.Generator().manual_seed(_seed()))
    free = model.generate(ids, 20)
    eos = int(free[0, 4 + 2])
    every_step = model.generate(ids, 20, eos_token_id=eos)
    assert (every_step[0, 4 + 3:] == eos).all()  # row 0 stopped at its EOS and is padded with it
    for n in (3, 8):
        with pytest.warns(DeprecationWarning, match="stop_check_every is deprecated and has no effect"):
            out = model.generate(ids, 20, eos_token_id=eos, stop_check_every=n)
        assert torch.equal(out, every_step)


def test_a_seeded_request_samples_the_same_tokens_in_any_engine():
    """A sampled request's tokens depend on its prompt, settings and seed only: alone in a fresh engine
    or beside other requests in another slot, the same; with another seed, others."""
    model = fastgpt2.GPT2.from_config(CFG, device="cpu", seed=5)
    prompt, *others = _prompts([7, 3, 11], _seed())
    sampling, seed = Sampling(True, 1.2, 40, 0.95), _seed()

    def run(engine, seed, neighbours=()):
        for p in neighbours:
            engine.add(p, 6, Sampling(True), seed=seed + 1)
        request = engine.add(prompt, 16, sampling, seed=seed)
        while engine.busy:
            engine.step()
        return request.tokens

    alone = run(Engine(model, max_batch=1, max_len=32), seed)
    assert run(Engine(model, max_batch=1, max_len=32), seed) == alone
    assert run(Engine(model, max_batch=4, max_len=64), seed, others) == alone  # slot 2, beside two others
    assert run(Engine(model, max_batch=1, max_len=32), seed + 1) != alone


@pytest.mark.parametrize("kwargs", [dict(), dict(do_sample=True, top_k=20, seed=7)], ids=["greedy", "sampled"])
def test_interleaved_streams_each_equal_alone_and_leave_the_engine(kwargs):
    """Two streams of one model step its one engine in turn: each one's tokens are the ones it gets
    alone, and a stream's requests leave the engine once it is exhausted or closed."""
    model = fastgpt2.GPT2.from_config(CFG, device="cpu", seed=3)
    g = torch.Generator().manual_seed(_seed())
    x, y = torch.randint(1, 101, (2, 6), generator=g), torch.randint(1, 101, (2, 6), generator=g)
    alone_x = model.generate(x, 12, **kwargs)[:, 6:]
    alone_y = model.generate(y, 12, **kwargs)[:, 6:]
    assert not model.engine.busy
    sx, sy = model.stream(x, 12, **kwargs), model.stream(y, 12, **kwargs)
    got_x, got_y = [], []
    for i, (tx, ty) in enumerate(zip(sx, sy)):  # one step of each in turn
        got_x.append(tx)
        got_y.append(ty)
        if i < 10:  # both streams' rows share the engine until x's last token (x's rows run one token
            assert len(model.engine.running) == 4  # ahead: the step that admits y's rows decodes x's)
    assert torch.equal(torch.stack(got_x, 1), alone_x) and torch.equal(torch.stack(got_y, 1), alone_y)
    assert not model.engine.running and not model.engine.busy  # every row ran to its max_new_tokens
    sy.close()

    s = model.stream(x, 12, **kwargs)
    assert torch.equal(next(s), alone_x[:, 0]) and torch.equal(next(s), alone_x[:, 1])
    rows = model.engine.running
    assert len(rows) == 2 and model.engine.busy
    s.close()  # closed mid-way: its rows leave the engine at once
    assert not model.engine.running and not model.engine.busy
    assert all(r.finish_reason == "cancelled" for r in rows)


@triton_here
def test_triton_step_allocates_its_split_partials_once_before_any_step(monkeypatch):
    """The engine owns each slot count's kernel scratch (made by the first decode step over that many
    slots: on CUDA in the warm-up run, before a capture): the attention's split partials and the
    arrival counters of the attention and of the split-K / layernorm GEMMs. A later step allocates
    none of it, and equals GPT2.decode (which allocates per call)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = fastgpt2.GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=101, n_positions=300)
    model = fastgpt2.GPT2.from_config(cfg, device=device, backend="triton", seed=8)
    prompts = _prompts([5, 5], _seed())
    engine = Engine(model, max_batch=2, max_len=300, use_cuda_graph=False)  # 3 key splits: partials, combined in-kernel
    requests = [engine.add(p, 8) for p in prompts]
    engine.step()  # admits both: the prefill
    assert not engine.workspaces  # no decode step yet
    other = model.new_cache(2, 300)
    model.prefill(*_right_padded(prompts, device), other)
    first = torch.tensor([r.tokens[0] for r in requests], device=device)
    engine.step()  # the first decode step over 2 slots makes their scratch
    assert torch.equal(engine.logits, model.decode(first[:, None], other))
    workspace = engine.workspaces[2]
    attention, gemm = workspace.attention, workspace.gemm
    assert attention.num_splits == 3 and tuple(attention.part_acc.shape) == (2 * 2, 3, 1, 32)
    assert gemm.counters.dtype == torch.int32 and gemm.partials.numel() > 1  # the MLP down projection splits K
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
        fed = engine.tokens[:2].clone()
        engine.step()
        assert not made, f"the step allocated kernel scratch: {made}"
        assert engine.workspaces[2] is workspace
        assert torch.equal(engine.logits, model.decode(fed[:, None], other))
        assert len(made) > 3 and made.clear() is None  # GPT2.decode allocates its own, per call
    assert not attention.counters.any() and not gemm.counters.any()  # every launch left its counters at zero


def test_pdl_where_it_cannot_run_is_a_clear_error(monkeypatch):
    from fastgpt2.errors import BackendError
    from fastgpt2.runtime import ops

    with pytest.raises(BackendError, match=r"pdl=True .*backend='triton' on a CUDA GPU.*backend='torch' on cpu"):
        fastgpt2.GPT2.from_config(CFG, device="cpu", pdl=True)
    model = fastgpt2.GPT2.from_config(CFG, device="cpu")
    assert model.pdl is False and "pdl" not in repr(model)
    with pytest.raises(BackendError, match="pass pdl=False"):
        Engine(model, max_batch=1, max_len=16, pdl=True)  # refused when the engine is built
    with pytest.raises(BackendError, match="True or False"):
        ops.resolve_pdl("yes", "triton", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(BackendError, match="NVIDIA A100 is sm_80"):
        ops.resolve_pdl(True, "triton", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert ops.resolve_pdl(True, "triton", torch.device("cuda")) is True
    assert ops.resolve_pdl(False, "torch", torch.device("cpu")) is False


@triton_here
def test_pdl_step_launches_every_triton_kernel_with_pdl(pdl_launches):
    """The flag reaches every GEMM and attention launch of the engine's decode step (USE_PDL and
    launch_pdl together) and no other launch (the embedding, the step's first kernel, follows a torch
    op or the graph's start: nothing to overlap): recorded at ``kernel[grid](...)`` (the
    ``pdl_launches`` fixture; in the interpreter they run as plain launches)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    launches = pdl_launches
    cfg = fastgpt2.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=101, n_positions=300)
    model = fastgpt2.GPT2.from_config(cfg, device=device, backend="triton", seed=4)
    prompts = _prompts([5, 3], _seed())
    engines = {}
    for pdl in (False, True):
        engines[pdl] = Engine(model, max_batch=2, max_len=300, use_cuda_graph=False, pdl=pdl)  # 3 key splits
        for p in prompts:
            engines[pdl].add(p, 4)
        engines[pdl].step()  # admits both: the prefill
    seen, out = {}, {}
    for pdl in (False, True):
        launches.clear()
        out[pdl] = [t for _, t in engines[pdl].step()]  # one decode step over both slots
        seen[pdl] = list(launches)
        assert engines[pdl].workspaces[2].pdl is pdl
        embed = [launch for launch in seen[pdl] if launch[0] == "_add_layernorm_kernel"]
        assert embed == [("_add_layernorm_kernel", False, False)], seen[pdl]
        assert all(use == pdl and flag == pdl for name, use, flag in seen[pdl] if name != "_add_layernorm_kernel")
    names = [name for name, _, _ in seen[True]]
    assert names == [name for name, _, _ in seen[False]]
    assert {"_linear_kernel", "_decode_attn_kernel", "_add_layernorm_kernel"} == set(names)
    assert names.count("_linear_kernel") == 4 * cfg.n_layer + 1  # QKV, attn-out, MLP up, MLP down; lm_head
    assert torch.equal(engines[True].logits, engines[False].logits)
    assert out[True] == out[False]
    launches.clear()
    model.prefill(*_right_padded(prompts, device), model.new_cache(2, 300))  # outside a decode step: plain launches
    assert launches and not any(use or flag for _, use, flag in launches)


# -- GPU: graphed vs eager, PDL vs plain -----------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device; none here")
hopper = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                            reason="programmatic dependent launch needs a CUDA GPU of compute capability 9.0+; none here")


def _gpu_model(backend="auto"):
    cfg = fastgpt2.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=256)
    return fastgpt2.GPT2.from_config(cfg, device="cuda", dtype=torch.float16, backend=backend, seed=0)


def _run_steps(model, ids, graphed, steps, sampling=Sampling(), seed=0, pdl=None):
    """Each row of ids [B, T] a request in slots 0 .. B-1 of a fresh engine: the tokens [B, steps] and
    logits [B, steps, V] of `steps` decode steps after the step that admits them."""
    b, t = ids.shape
    engine = Engine(model, max_batch=b, max_len=t + steps + 1, use_cuda_graph=graphed, pdl=pdl)
    for i, row in enumerate(ids):
        engine.add(row, steps + 1, sampling, seed + i)
    engine.step()  # admits every request (its first token), no decode
    tokens, logits = [], []
    for _ in range(steps):
        out = engine.step()
        tokens.append(torch.tensor([tok for _, tok in out]))
        logits.append(engine.logits[:b].clone())
    assert not engine.busy and (len(engine.graphs) == 1) == graphed
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

    cfg = fastgpt2.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, n_positions=max_len)
    model = fastgpt2.GPT2.from_config(cfg, device="cuda", dtype=torch.float16, backend="triton", seed=0)
    ids = torch.randint(0, 1000, (3, 9), device="cuda")
    engines = {}
    for graphed in (False, True):
        engines[graphed] = Engine(model, max_batch=3, max_len=max_len, use_cuda_graph=graphed)
        for row in ids:
            engines[graphed].add(row, 13)
        engines[graphed].step()  # admits the three: the prefill
    compiled_in_capture = []

    def hook(*args, **kwargs):
        compiled_in_capture.append(torch.cuda.is_current_stream_capturing())
        return None  # go on compiling

    previous, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, hook
    try:
        for _ in range(12):
            graphed_out, eager_out = engines[True].step(), engines[False].step()
            assert torch.equal(engines[True].logits, engines[False].logits)
            assert [t for _, t in graphed_out] == [t for _, t in eager_out]
    finally:
        knobs.runtime.jit_cache_hook = previous
    assert not any(compiled_in_capture), "a Triton kernel compiled inside the CUDA-graph capture"
    assert list(engines[True].graphs) == [(3, False, False)] and not engines[False].graphs


@gpu
@pytest.mark.gpu
def test_batches_of_other_sizes_capture_one_graph_per_slot_bucket():
    """generate on the model's engine: it grows to each batch (recapturing its graphs), a batch of 3
    replays the 4-slot bucket, and every batch's graphed tokens equal the eager ones."""
    model = _gpu_model()
    for batch in (1, 8, 3, 8, 1):
        ids = torch.randint(0, 1000, (batch, 7), device="cuda")
        graphed = model.generate(ids, 24, use_cuda_graph=True)
        eager = model.generate(ids, 24, use_cuda_graph=False)
        assert torch.equal(graphed, eager), f"batch {batch}"
    engine = model.engine
    assert engine.max_batch == 8 and {key[0] for key in engine.graphs} == {1, 4, 8} and not engine.busy


@gpu
@pytest.mark.gpu
def test_seeded_sampling_reproduces_in_graphs():
    model = _gpu_model()
    ids = torch.randint(0, 1000, (4, 5), device="cuda")
    kwargs = dict(do_sample=True, temperature=0.9, top_k=50)
    a = model.generate(ids, 40, use_cuda_graph=True, seed=1234, **kwargs)
    b = model.generate(ids, 40, use_cuda_graph=True, seed=1234, **kwargs)
    c = model.generate(ids, 40, use_cuda_graph=False, seed=1234, **kwargs)
    d = model.generate(ids, 40, use_cuda_graph=True, seed=1235, **kwargs)
    assert torch.equal(a, b)
    assert torch.equal(a, c)
    assert not torch.equal(a, d)
    assert any(key[1] for key in model.engine.graphs)  # a sampled variant was captured

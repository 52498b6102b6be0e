"""Cross-cutting reliability of every op (issue "Reliability"): opcheck of every custom op that a
forward + backward actually calls, torch.compile of a training step and autocast for every module,
and on CUDA: graph capture and replay of forward + backward, two streams at once, tensors above
2^31 elements (64-bit indexing) and peak memory at T = 64K.

Each op case builds small inputs on a device and returns a function whose outputs are
differentiated; the CUDA-only tests compare against the same case run eagerly / serially.
"""

from __future__ import annotations

import longattn as la
import pytest
import torch
from harness import BF16, assert_finite, cuda_only, rel_err
from torch.utils._python_dispatch import TorchDispatchMode


def _randn(shape, device, dtype, scale=1.0):
    return (torch.randn(shape, device=device, dtype=torch.float32) * scale).to(dtype)


def _selection(B, T, Hkv, n, block, device):
    """Valid block indices: the own block, block 0 and random earlier blocks, −1 padded."""
    t = torch.arange(T, device=device)
    own = (t // block)[None, :, None, None].expand(B, T, Hkv, 1)
    rnd = (torch.rand(B, T, Hkv, n - 1, device=device) * (own.float() + 1)).long()
    idx = torch.cat([own, rnd], -1).sort(-1).values
    dup = torch.cat(
        [torch.zeros_like(idx[..., :1], dtype=torch.bool), idx[..., 1:] == idx[..., :-1]], -1
    )
    return idx.masked_fill(dup, -1).to(torch.int32)


class Case:
    """make(device, dtype, B, T) -> (fn, inputs): fn(*inputs) returns differentiable outputs."""

    def __init__(self, name, make, big_t=4096):
        self.name, self.make, self.big_t = name, make, big_t


def _lightning(device, dtype, B, T, H=4, D=32):
    q, k, v = (_randn((B, T, H, D), device, dtype) for _ in range(3))
    # fixed slopes, as the module's buffers: a learned slope runs a 16-bit backward in float32
    # (tests/test_lightning.py covers that path)
    slopes = torch.linspace(0.05, 0.8, H, device=device)

    def fn(q, k, v):
        o, s = la.lightning_attn(q, k, v, slopes, scale=D**-0.5, output_final_state=True)
        return o, s

    return fn, [q, k, v]


def _rat(device, dtype, B, T, H=4, D=32):
    q, k, v = (_randn((B, T, H, D), device, dtype) for _ in range(3))
    g = torch.sigmoid(_randn((B, T, H, D), device, torch.float32) + 2)
    return (lambda q, k, v, g: (la.rat_attn(q, k, v, g, chunk_size=16),)), [q, k, v, g]


def _gqa(device, dtype, B, T, Hq=4, Hkv=2, D=32):
    return (
        _randn((B, T, Hq, D), device, dtype),
        _randn((B, T, Hkv, D), device, dtype),
        _randn((B, T, Hkv, D), device, dtype),
    )


def _landmark(device, dtype, B, T):
    q, k, v = _gqa(device, dtype, B, T)
    return (lambda q, k, v: (la.landmark_attn(q, k, v, block_size=51),)), [q, k, v]


def _landmark_retrieval(device, dtype, B, T):
    q, k, v = _gqa(device, dtype, B, T)
    idx = la.landmark_topk_blocks(q, k, block_size=32, topk=3)
    return (lambda q, k, v, idx: (la.landmark_attn(q, k, v, block_size=32, block_indices=idx),)), [
        q,
        k,
        v,
        idx,
    ]


def _compress(device, dtype, B, T, Hkv=2, D=32, ks=32, kd=16):
    x = _randn((B, T, Hkv, D), device, dtype)
    w = _randn((Hkv, ks * D, D), device, dtype, scale=(ks * D) ** -0.5)
    pe = _randn((Hkv, ks, D), device, dtype, scale=0.1)
    return (
        lambda x, w, pe: (la.nsa_compress(x, kernel_size=ks, kernel_stride=kd, weight=w, pe=pe)[0],)
    ), [x, w, pe]


def _compressed_attn(device, dtype, B, T, ks=32, kd=16):
    q, k, v = _gqa(device, dtype, B, T)
    kc = la.nsa_compress(k, kernel_size=ks, kernel_stride=kd)[0]
    vc = la.nsa_compress(v, kernel_size=ks, kernel_stride=kd)[0]
    return (
        lambda q, kc, vc: la.nsa_compressed_attn(
            q, kc, vc, kernel_size=ks, kernel_stride=kd, return_lse=True
        )
    ), [q, kc, vc]


def _selected(device, dtype, B, T, block=64, n=4):
    q, k, v = _gqa(device, dtype, B, T)
    idx = _selection(B, T, k.shape[2], n, block, device)
    return (lambda q, k, v, idx: (la.nsa_selected_attn(q, k, v, idx, block_size=block),)), [
        q,
        k,
        v,
        idx,
    ]


def _sliding(device, dtype, B, T):
    q, k, v = _gqa(device, dtype, B, T)
    return (lambda q, k, v: (la.sliding_window_attn(q, k, v, window_size=100),)), [q, k, v]


def _nsa(device, dtype, B, T, ks=32, kd=16):
    q, k, v = _gqa(device, dtype, B, T)
    gates = [torch.sigmoid(_randn((B, T, q.shape[2]), device, dtype)) for _ in range(3)]

    def fn(q, k, v, g0, g1, g2):
        kc = la.nsa_compress(k, kernel_size=ks, kernel_stride=kd)[0]
        vc = la.nsa_compress(v, kernel_size=ks, kernel_stride=kd)[0]
        o = la.nsa_attn(
            q, k, v, g0, g1, g2, k_cmp=kc, v_cmp=vc, kernel_size=ks, kernel_stride=kd,
            block_size=64, topk=4, window_size=128,
        )  # fmt: skip
        return (o,)

    return fn, [q, k, v, *gates]


CASES = [
    Case("lightning", _lightning, big_t=65536),
    Case("rat", _rat, big_t=65536),
    Case("landmark", _landmark),
    Case("landmark_retrieval", _landmark_retrieval),
    Case("nsa_compress", _compress, big_t=65536),
    Case("nsa_compressed_attn", _compressed_attn, big_t=65536),
    Case("nsa_selected_attn", _selected, big_t=65536),
    Case("sliding_window_attn", _sliding, big_t=65536),
    Case("nsa_attn", _nsa, big_t=65536),
]
CASE_IDS = [c.name for c in CASES]


def _run(case, device, dtype=torch.float32, B=2, T=200, seed=0, inputs=None):
    """Outputs and input gradients of one forward + backward (loss Σ o·do, do fixed by seed)."""
    torch.manual_seed(seed)
    fn, made = case.make(device, dtype, B, T)
    inputs = made if inputs is None else inputs
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    outs = fn(*leaves)
    douts = [torch.randn_like(o) if o.is_floating_point() else None for o in outs]
    pairs = [(o, d) for o, d in zip(outs, douts, strict=True) if d is not None]
    loss = sum((o.float().nan_to_num(0, 0, 0) * d.float()).sum() for o, d in pairs)
    diff = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, diff, allow_unused=True)
    return [o.detach() for o in outs], [g for g in grads if g is not None]


# ------------------------------------------------------------------------------------ opcheck


class _RecordOps(TorchDispatchMode):
    """Records every longattn custom-op call (forward and backward) with its arguments."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "longattn" and func not in self.calls:
            clone = lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x  # noqa: E731
            self.calls[func] = (
                tuple(clone(a) for a in args),
                {k: clone(v) for k, v in kwargs.items()},
            )
        return func(*args, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_opcheck_every_called_op(case, device):
    with _RecordOps() as rec:
        _run(case, device, torch.float32, B=1, T=70)
    assert rec.calls, "no longattn op was called"
    for func, (args, kwargs) in rec.calls.items():
        torch.library.opcheck(func, args, kwargs)


# ------------------------------------------------------------------------ modules: compile/autocast


def _module(kind, device, dtype=torch.float32):
    torch.manual_seed(0)
    kw = dict(device=device, dtype=dtype)
    if kind == "lightning":
        return la.nn.LightningAttention(64, 4, **kw)
    if kind == "rat":
        return la.nn.RATAttention(64, 4, chunk_size=8, **kw)
    if kind == "landmark":
        return la.nn.LandmarkAttention(64, 4, 2, 16, block_size=16, **kw)
    return la.nn.NativeSparseAttention(
        64, 4, 2, 16, kernel_size=16, kernel_stride=8, block_size=16, topk=3, window_size=24, **kw
    )


KINDS = ["lightning", "rat", "landmark", "nsa"]


@pytest.mark.parametrize("kind", KINDS)
def test_compile_training_step(kind, device):
    torch._dynamo.reset()
    mod = _module(kind, device)
    x = torch.randn(2, 70, 64, device=device)

    def step(x):
        y, _ = mod(x)
        return y.float().square().mean()

    backend = "inductor" if device == "cuda" else "aot_eager"
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss_c = compiled(x)
    grads_c = torch.autograd.grad(loss_c, list(mod.parameters()))
    loss_e = step(x)
    grads_e = torch.autograd.grad(loss_e, list(mod.parameters()))
    assert rel_err(loss_c, loss_e) <= 1e-5
    for (name, _), gc, ge in zip(mod.named_parameters(), grads_c, grads_e, strict=True):
        assert_finite(gc, name)
        assert rel_err(gc, ge) <= 1e-4, name


@pytest.mark.parametrize("kind", KINDS)
def test_autocast_bf16(kind, device):
    mod = _module(kind, device)
    x = torch.randn(2, 70, 64, device=device)
    y32, _ = mod(x)
    with torch.autocast(device_type=device, dtype=BF16):
        y16, _ = mod(x)
    assert y16.dtype in (BF16, torch.float32)
    assert rel_err(y16, y32) <= 5e-2
    grads = torch.autograd.grad(y16.float().sum(), list(mod.parameters()), allow_unused=True)
    assert any(g is not None for g in grads)
    for g in grads:
        if g is not None:
            assert_finite(g, "grad")


# ------------------------------------------------------------------------------- CUDA only


@cuda_only
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_graph_capture_forward_backward(case):
    torch.manual_seed(0)
    fn, inputs = case.make("cuda", BF16, 2, 200)
    static = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    diff = [x for x in static if x.requires_grad]
    douts = None

    def step():
        nonlocal douts
        outs = fn(*static)
        if douts is None:
            douts = [torch.randn_like(o) for o in outs if o.is_floating_point()]
        fl = [o for o in outs if o.is_floating_point()]
        loss = sum((o.float() * d.float()).sum() for o, d in zip(fl, douts, strict=True))
        return outs, torch.autograd.grad(loss, diff, allow_unused=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        g_outs, g_grads = step()
    for x in static:  # new data, same buffers
        if x.is_floating_point():
            with torch.no_grad():
                x.copy_(torch.randn_like(x) if x.dtype == BF16 else x * 0.9)
    graph.replay()
    torch.cuda.synchronize()
    e_outs, e_grads = step()
    for a, b in zip(g_outs, e_outs, strict=True):
        assert torch.equal(a, b), "graph replay output differs from eager"
    for a, b in zip(g_grads, e_grads, strict=True):
        if a is not None:
            assert torch.equal(a, b), "graph replay gradient differs from eager"


@cuda_only
@pytest.mark.parametrize("i", range(len(CASES)), ids=CASE_IDS)
def test_cuda_two_streams_agree_with_serial(i):
    a, b = CASES[i], CASES[(i + 1) % len(CASES)]
    serial = [_run(c, "cuda", BF16, B=2, T=300, seed=s) for s, c in enumerate((a, b))]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    results = [None, None]
    for s, (c, st) in enumerate(zip((a, b), streams, strict=True)):
        st.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(st):
            results[s] = _run(c, "cuda", BF16, B=2, T=300, seed=s)
    for st in streams:
        torch.cuda.current_stream().wait_stream(st)
    torch.cuda.synchronize()
    for (o1, g1), (o2, g2) in zip(serial, results, strict=True):
        for x, y in zip(o1 + g1, o2 + g2, strict=True):
            assert torch.equal(x, y), "a result on a side stream differs from the serial run"


@cuda_only
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_above_2_31_elements(case):
    """Batch rows past 2^31 elements give the same result as that row computed alone."""
    free, _ = torch.cuda.mem_get_info()
    T = 1024
    per_row = T * 4 * 32  # q: T x Hq=4 x D=32
    B = (1 << 31) // per_row + 2
    need = 16 * B * per_row * 2  # inputs, outputs, gradients and scratch, in units of q's bytes
    if free < need:
        pytest.skip(f"needs about {need >> 30} GiB free on the GPU")
    torch.manual_seed(0)
    fn, inputs = case.make("cuda", BF16, B, T)
    last = [x[-1:].clone() if x.dim() >= 3 and x.shape[0] == B else x for x in inputs]
    big = [x.requires_grad_(x.is_floating_point()) for x in inputs]
    outs = fn(*big)
    o_last = [o[-1:] for o in outs]
    diff = [x for x in big if x.requires_grad]
    loss = sum(o.float().sum() for o in o_last)
    grads = torch.autograd.grad(loss, diff, allow_unused=True)
    ref_in = [x.requires_grad_(x.is_floating_point()) for x in last]
    ref_outs = fn(*ref_in)
    ref_grads = torch.autograd.grad(
        sum(o.float().sum() for o in ref_outs), [x for x in ref_in if x.requires_grad],
        allow_unused=True,
    )  # fmt: skip
    for a, b in zip(o_last, ref_outs, strict=True):
        fin = torch.isfinite(b)  # lse is −inf on rows that see no key
        assert torch.equal(fin, torch.isfinite(a)), "non-finite entries of the last batch row"
        assert rel_err(a[fin], b[fin]) <= 1e-6, "output of the last batch row"
    for x, ga, gb in zip(diff, grads, ref_grads, strict=True):
        if ga is None or gb is None:
            continue
        if x.shape[0] == B and ga.shape[0] == B:
            assert rel_err(ga[-1:], gb) <= 1e-6, "gradient of the last batch row"
    del outs, grads, big, inputs
    torch.cuda.empty_cache()


@cuda_only
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_peak_memory_64k(case):
    """Forward + backward at T = 64K allocates O(B·T·H) memory: bounded by a small multiple of
    the inputs (dense attention would need T² = 4·10^9 scores per head)."""
    torch.manual_seed(0)
    T = case.big_t
    fn, inputs = case.make("cuda", BF16, 1, T)
    in_bytes = sum(x.numel() * x.element_size() for x in inputs)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    _run(case, "cuda", BF16, B=1, T=T, inputs=inputs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 40 * in_bytes + (64 << 20), f"peak {peak >> 20} MiB for {in_bytes >> 20} MiB in"


# --------------------------------------------------------------------------- CPU peak memory


def _peak_rss_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


@pytest.mark.parametrize("case", [c for c in CASES if c.big_t >= 65536], ids=lambda c: c.name)
def test_cpu_peak_memory_64k(case):
    torch.manual_seed(0)
    fn, inputs = case.make("cpu", torch.float32, 1, case.big_t)
    in_bytes = sum(x.numel() * x.element_size() for x in inputs)
    if not _peak_rss_reset():
        pytest.skip("cannot reset the peak RSS (/proc/self/clear_refs)")
    base = _status_kib("VmRSS") * 1024
    _run(case, "cpu", torch.float32, B=1, T=case.big_t, inputs=inputs)
    peak = _status_kib("VmHWM") * 1024 - base
    print(f"{case.name}: peak {peak >> 20} MiB above the inputs' {in_bytes >> 20} MiB")
    assert peak <= 40 * in_bytes + (256 << 20), f"peak {peak >> 20} MiB for {in_bytes >> 20} MiB in"


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_cuda_tensors_on_a_non_current_device(case):
    """Kernels follow the tensors' device, not torch.cuda.current_device()."""
    with torch.cuda.device(0):
        on0 = _run(case, "cuda:0", BF16)
        on1 = _run(case, "cuda:1", BF16)
    torch.cuda.synchronize(1)
    for a, b in zip(on0[0] + on0[1], on1[0] + on1[1], strict=True):
        assert b.device.index == 1
        assert torch.equal(a, b.to(a.device)), "cuda:1 result differs from cuda:0"

"""longattn.nn.LightningAttention vs a plain-PyTorch MiniMax-01 layer; opcheck; compile."""

from __future__ import annotations

import longattn
import pytest
import torch
import torch.nn.functional as F
from harness import BF16, F32, F64, assert_close_to_ref, assert_finite, rel_err, tolerance
from longattn.nn import LightningAttention, LightningCache
from longattn.reference import lightning_attn_recurrent, lightning_slopes_reference
from torch.utils._python_dispatch import TorchDispatchMode


def minimax_layer_reference(mod: LightningAttention, x, initial_state=None, cu_seqlens=None):
    """The MiniMax-01 lightning token mixer written out in float64 with the reference op and
    the reference slopes, reading the module's weights."""

    def lin(layer, inp):
        b = None if layer.bias is None else layer.bias.double()
        return F.linear(inp, layer.weight.double(), b)

    x = x.double()
    B, T, _ = x.shape
    H, D = mod.num_heads, mod.head_dim
    qkv = F.silu(lin(mod.qkv_proj, x)).reshape(B, T, H, 3 * D)
    q, k, v = qkv[..., :D], qkv[..., D : 2 * D], qkv[..., 2 * D :]
    slopes = lightning_slopes_reference(H, mod.layer_idx, mod.num_layers).to(x.device, F64)
    s0 = None if initial_state is None else initial_state.double()
    o, state = lightning_attn_recurrent(q, k, v, slopes, 1.0, s0, cu_seqlens)
    o = o.reshape(B, T, H * D)
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mod.norm.eps) * mod.norm.weight.double()
    o = torch.sigmoid(lin(mod.output_gate, x)) * o
    return lin(mod.out_proj, o), state


def _module(device, dtype=F32, **kw):
    cfg = {"hidden_size": 64, "num_heads": 4, "layer_idx": 2, "num_layers": 6}
    cfg.update(kw)
    mod = LightningAttention(**cfg, device=device, dtype=dtype)
    with torch.no_grad():  # non-trivial norm weight and biases
        mod.norm.weight.uniform_(0.5, 1.5)
        for lin in (mod.qkv_proj, mod.output_gate, mod.out_proj):
            if lin.bias is not None:
                lin.bias.uniform_(-0.1, 0.1)
    return mod


def _tol(dtype, device):
    """harness.TOL's (bf16 end to end, projections, op, norm, gate: measured ~6e-3 on the CPU),
    except float64 (the module end to end: 1e-10) and float32 on CUDA (TF32: 1e-3)."""
    if dtype == F64:
        return 1e-10
    if dtype == F32 and device != "cpu":
        return 1e-3
    return tolerance(dtype, device)


CONFIGS = {
    "default": {},
    "head_dim": {"hidden_size": 48, "num_heads": 3, "head_dim": 32, "layer_idx": 0},
    "bias-last-layer": {"bias": True, "layer_idx": 5},
    "12-heads": {"hidden_size": 96, "num_heads": 12, "num_layers": 1, "layer_idx": 0},
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("dtype", [F64, F32, BF16], ids=str)
def test_module_matches_plain_pytorch(device, dtype, cfg):
    if dtype == F64 and device != "cpu":
        pytest.skip("float64 runs on the CPU only")
    mod = _module(device, dtype, **CONFIGS[cfg])
    B, T = 2, 100
    x = torch.randn(B, T, mod.hidden_size, device=device, dtype=dtype, requires_grad=True)
    y, cache = mod(x)
    assert cache is None
    assert y.shape == x.shape and y.dtype == dtype
    y_ref, _ = minimax_layer_reference(mod, x)
    tol = _tol(dtype, device)
    assert_close_to_ref("y", y, y_ref, dtype, device, tol=tol)

    dy = torch.randn_like(y)
    params = [p for p in mod.parameters()]
    grads = torch.autograd.grad(y, [x, *params], dy)
    ref_grads = torch.autograd.grad(y_ref, [x, *params], dy.double())
    names = ["x"] + [n for n, _ in mod.named_parameters()]
    for name, g, gr in zip(names, grads, ref_grads, strict=True):
        assert_close_to_ref(f"d{name}", g, gr, dtype, device, grad=True, tol=tol)


@pytest.mark.parametrize("T,M", [(60, 10), (1, 5), (64, 1)])
def test_module_prefill_then_decode_equals_full(device, T, M):
    mod = _module(device)
    B = 3
    x = torch.randn(B, T + M, mod.hidden_size, device=device)
    with torch.no_grad():
        y_full, cache_full = mod(x, use_cache=True)
        y_pre, cache = mod(x[:, :T], use_cache=True)
        ys = [y_pre]
        for t in range(T, T + M):
            assert isinstance(cache, LightningCache)
            assert cache.state.shape == (B, 4, 16, 16) and cache.state.dtype == F32
            y_t, cache = mod(x[:, t : t + 1], cache=cache, use_cache=True)
            ys.append(y_t)
    y_inc = torch.cat(ys, dim=1)
    tol = _tol(F32, device)
    assert rel_err(y_inc, y_full) <= tol
    assert rel_err(cache.state, cache_full.state) <= tol
    y_ref, st_ref = minimax_layer_reference(mod, x)
    assert rel_err(y_inc, y_ref) <= tol
    assert rel_err(cache.state, st_ref) <= tol


def test_module_decode_without_use_cache_returns_none(device):
    mod = _module(device)
    x = torch.randn(2, 20, mod.hidden_size, device=device)
    with torch.no_grad():
        _, cache = mod(x[:, :19], use_cache=True)
        y_last, none = mod(x[:, 19:], cache=cache)
        y_full, _ = mod(x)
    assert none is None
    assert rel_err(y_last, y_full[:, 19:]) <= _tol(F32, device)


def test_module_empty_cache_is_no_cache(device):
    mod = _module(device)
    x = torch.randn(2, 30, mod.hidden_size, device=device)
    with torch.no_grad():
        y0, _ = mod(x)
        y1, _ = mod(x, cache=mod.init_cache(2))
    assert rel_err(y1, y0) <= _tol(F32, device)


def test_module_varlen_equals_separate_sequences(device):
    mod = _module(device)
    lens = [5, 70, 1, 64]
    cu = torch.tensor([0, 5, 75, 76, 140], dtype=torch.int32, device=device)
    x = torch.randn(1, 140, mod.hidden_size, device=device)
    with torch.no_grad():
        y, cache = mod(x, use_cache=True, cu_seqlens=cu)
        assert cache.state.shape == (4, 4, 16, 16)
        for i, n in enumerate(lens):
            a = int(cu[i])
            y_i, c_i = mod(x[:, a : a + n], use_cache=True)
            assert rel_err(y[:, a : a + n], y_i) <= _tol(F32, device), f"sequence {i}"
            assert rel_err(cache.state[i : i + 1], c_i.state) <= _tol(F32, device)
        # and one decode token per sequence continues every state
        xd = torch.randn(1, 4, mod.hidden_size, device=device)
        cu_dec = torch.arange(5, dtype=torch.int32, device=device)
        yd, _ = mod(xd, cache=cache, cu_seqlens=cu_dec)
        yb, _ = mod(xd.transpose(0, 1), cache=cache)
    assert rel_err(yd, yb.transpose(0, 1)) <= _tol(F32, device)
    y_ref, _ = minimax_layer_reference(mod, x, cu_seqlens=cu)
    assert rel_err(y, y_ref) <= _tol(F32, device)


def test_module_slopes_and_state_dict():
    mod = LightningAttention(128, 8, layer_idx=3, num_layers=8)
    torch.testing.assert_close(
        mod.slopes, longattn.lightning_slopes(8, layer_idx=3, num_layers=8), rtol=0, atol=0
    )
    torch.testing.assert_close(mod.slopes, lightning_slopes_reference(8, 3, 8), rtol=1e-6, atol=0)
    keys = set(mod.state_dict())
    assert keys == {"qkv_proj.weight", "output_gate.weight", "norm.weight", "out_proj.weight"}
    assert mod.qkv_proj.weight.shape == (3 * 128, 128)
    assert mod.output_gate.weight.shape == (128, 128)
    assert mod.norm.weight.shape == (128,)
    assert mod.out_proj.weight.shape == (128, 128)
    # dtype conversion keeps exact float32 slopes
    mod = mod.to(BF16)
    assert mod.slopes.dtype == F32 and mod.qkv_proj.weight.dtype == BF16
    torch.testing.assert_close(
        mod.slopes, longattn.lightning_slopes(8, layer_idx=3, num_layers=8), rtol=0, atol=0
    )
    # head dim that does not divide hidden size must be given explicitly
    with pytest.raises(ValueError, match="head_dim"):
        LightningAttention(100, 3)


def test_module_qkv_layout_is_per_head_interleaved():
    """qkv_proj rows are [q_h | k_h | v_h] per head (MiniMax layout): zeroing the k rows of
    head 0 makes that head's output exactly zero before the norm, whatever the rest."""
    mod = _module("cpu", F64, hidden_size=32, num_heads=2)
    D = mod.head_dim
    with torch.no_grad():
        mod.qkv_proj.weight[D : 2 * D] = 0.0  # head 0, k rows
    captured = {}

    def hook(module, args):
        captured["o"] = args[0]

    h = mod.norm.register_forward_pre_hook(hook)
    mod(torch.randn(1, 12, 32, dtype=F64))
    h.remove()
    o = captured["o"].reshape(1, 12, 2, D)
    assert torch.count_nonzero(o[:, :, 0]) == 0
    assert torch.count_nonzero(o[:, :, 1]) > 0


# ---------------------------------------------------------------------------- opcheck


class _RecordLongattnOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "longattn":
            self.calls.append((func, args, kwargs))
        return func(*args, **kwargs)


def _clone_args(obj, requires_grad):
    if isinstance(obj, torch.Tensor):
        c = obj.detach().clone()
        if requires_grad and c.is_floating_point():
            c.requires_grad_()
        return c
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone_args(o, requires_grad) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone_args(v, requires_grad) for k, v in obj.items()}
    return obj


def _registered_lightning_ops() -> set[str]:
    names = torch._C._dispatch_get_all_op_names()
    return {n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("longattn::lightning")}


@pytest.mark.parametrize("variant", ["state", "nostate", "varlen"])
def test_opcheck_lightning_custom_ops(device, variant):
    registered = _registered_lightning_ops()
    assert registered, "no custom op named longattn::lightning* is registered"
    for name in registered:
        assert hasattr(torch.ops.longattn, name)
    fwd = getattr(longattn.ops.lightning, "lightning_fwd", None)
    if fwd is not None:
        assert "lightning_fwd" in registered

    H, D, E = 2, 8, 6
    if variant == "varlen":
        B, T = 1, 80
        cu = torch.tensor([0, 10, 80], dtype=torch.int32, device=device)
        n = 2
    else:
        B, T, cu, n = 2, 70, None, 2
    q = torch.randn(B, T, H, D, device=device, requires_grad=True)
    k = torch.randn(B, T, H, D, device=device, requires_grad=True)
    v = torch.randn(B, T, H, E, device=device, requires_grad=True)
    slopes = torch.tensor([0.1, 0.01], device=device, requires_grad=True)
    s0 = None
    if variant != "nostate":
        s0 = torch.randn(n, H, D, E, device=device, requires_grad=True)

    fwd_rec, bwd_rec = _RecordLongattnOps(), _RecordLongattnOps()
    with fwd_rec:
        o, st = longattn.lightning_attn(
            q, k, v, slopes, initial_state=s0, output_final_state=True, cu_seqlens=cu
        )
    with bwd_rec:
        torch.autograd.backward([o, st], [torch.randn_like(o), torch.randn_like(st)])
    assert fwd_rec.calls, "lightning_attn dispatched no longattn custom op"
    for func, _, _ in fwd_rec.calls + bwd_rec.calls:
        assert func._opname in registered, f"{func} is not a longattn::lightning* op"

    for recorded, needs_grad in ((fwd_rec.calls, True), (bwd_rec.calls, False)):
        for func, args, kwargs in recorded:
            args_c = _clone_args(args, needs_grad)
            kwargs_c = _clone_args(kwargs, needs_grad)
            torch.library.opcheck(func, args_c, kwargs_c)


# ---------------------------------------------------------------------------- compile


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    B, T, H, D, E = 2, 90, 2, 16, 12
    q = torch.randn(B, T, H, D, requires_grad=True)
    k = torch.randn(B, T, H, D, requires_grad=True)
    v = torch.randn(B, T, H, E, requires_grad=True)
    slopes = torch.tensor([0.05, 0.5], requires_grad=True)
    s0 = torch.randn(B, H, D, E, requires_grad=True)

    def fn(q, k, v, slopes, s0):
        o, st = longattn.lightning_attn(
            q * 2.0, k, v, slopes, scale=0.5, initial_state=s0, output_final_state=True
        )
        return (o.float().sin().sum() + st.square().sum()) * 1.0

    compiled = torch.compile(fn, fullgraph=True)
    inputs = (q, k, v, slopes, s0)
    loss_c = compiled(*inputs)
    grads_c = torch.autograd.grad(loss_c, inputs)
    loss_e = fn(*inputs)
    grads_e = torch.autograd.grad(loss_e, inputs)
    assert rel_err(loss_c, loss_e) <= 1e-5
    for name, gc, ge in zip(["dq", "dk", "dv", "dslopes", "dS0"], grads_c, grads_e, strict=True):
        assert_finite(gc, name)
        assert rel_err(gc, ge) <= 1e-5, name
    # the compiled function also matches the float64 reference
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    o_r, st_r = lightning_attn_recurrent(ref_in[0] * 2.0, *ref_in[1:4], 0.5, ref_in[4])
    loss_r = o_r.sin().sum() + st_r.square().sum()
    assert rel_err(loss_c, loss_r) <= 1e-5


def test_torch_compile_module_fullgraph():
    torch._dynamo.reset()
    mod = _module("cpu")
    x = torch.randn(2, 40, mod.hidden_size, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True, backend="aot_eager")
    y_c, _ = compiled(x)
    y_e, _ = mod(x)
    assert rel_err(y_c, y_e) <= 1e-6
    (g_c,) = torch.autograd.grad(y_c.sum(), x)
    (g_e,) = torch.autograd.grad(y_e.sum(), x)
    assert rel_err(g_c, g_e) <= 1e-6

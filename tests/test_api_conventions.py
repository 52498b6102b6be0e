"""The public API follows one set of conventions (docs/api/conventions.md): every softmax op has a
keyword-only ``return_lse``; options after the tensors are keyword-only; RoPE is ``rope_theta``;
every module with a cache builds an empty one with ``init_cache(batch_size, *, device, dtype)``;
block indices may be int32 or int64. The deprecated spellings keep working and warn.

The public names are walked (``longattn.__all__``, ``longattn.nn.__all__``, the op modules'
``__all__``), so a new function or module has to be classified here and follow the rules."""

from __future__ import annotations

import inspect
import warnings

import longattn
import longattn.nn as lnn
import pytest
import torch
from harness import F32, F64
from longattn import ops
from longattn import reference as R
from longattn._deprecation import DEPRECATED

B, T, HQ, HKV, D = 2, 12, 4, 2, 8
KW_ONLY = inspect.Parameter.KEYWORD_ONLY
POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)

# every callable of longattn.__all__, classified: softmax ops return (o, lse) on request
SOFTMAX_OPS = {
    "landmark_attn",
    "nsa_compressed_attn",
    "nsa_selected_attn",
    "rat_attn",
    "sliding_window_attn",
}
OTHER_FUNCTIONS = {
    "cuda_unavailable_reason": "no tensors",
    "insert_landmarks": "token layout",
    "remove_landmarks": "token layout",
    "landmark_topk_blocks": "block selection (int32 indices)",
    "nsa_topk_blocks": "block selection (int32 indices)",
    "nsa_compress": "compression: (x_cmp, cu_seqlens_cmp)",
    "lightning_attn": "linear attention, no softmax: (o, final_state)",
    "lightning_slopes": "slopes",
    "nsa_attn": "a gated sum of three softmaxes: no single lse",
}
# positional parameters that are not tensors but the subject of the call
POSITIONAL_NON_TENSORS = {("lightning_slopes", "num_heads")}
# return_lse's default: False, except nsa_compressed_attn's deprecation release (None: warn and
# return (o, lse) as before)
RETURN_LSE_DEFAULT = {"nsa_compressed_attn": None}

ROPE_MODULES = {"NativeSparseAttention", "LandmarkAttention", "RATAttention"}
MODULES = {
    "NativeSparseAttention": "NSACache",
    "LandmarkAttention": "LandmarkCache",
    "RATAttention": "RATCache",
    "LightningAttention": "LightningCache",
}


def public_functions() -> dict:
    return {
        n: getattr(longattn, n)
        for n in longattn.__all__
        if inspect.isfunction(inspect.unwrap(getattr(longattn, n)))
    }


def all_public_callables():
    """(qualified name, callable) of every public function and module/cache method."""
    seen = {}
    for mod in (ops.landmark, ops.lightning, ops.nsa, ops.rat, R, longattn):
        for n in mod.__all__:
            obj = getattr(mod, n)
            if callable(obj) and not inspect.isclass(obj) and not inspect.ismodule(obj):
                seen[f"{mod.__name__}.{n}"] = obj
    for n in lnn.__all__:
        cls = getattr(lnn, n)
        for m, fn in vars(cls).items():
            if isinstance(fn, classmethod | staticmethod):
                fn = fn.__func__
            if inspect.isfunction(fn) and (not m.startswith("_") or m == "__init__"):
                seen[f"longattn.nn.{n}.{m}"] = fn
    from longattn.nn import rat as nn_rat

    seen["longattn.nn.rat.rat_continue"] = nn_rat.rat_continue
    return seen


@pytest.fixture
def no_deprecations():
    """The new spellings never warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        yield


def _t(*shape, dtype=F32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _selected_indices():
    """Block 0 and the current block (−1 while they coincide), int64 [B, T, HKV, 2]."""
    cur = torch.arange(T) // 4
    idx = torch.stack([torch.zeros_like(cur), torch.where(cur > 0, cur, -1)], dim=-1)
    return idx[None, :, None, :].expand(B, T, HKV, 2).contiguous()


def softmax_call(name: str, dtype):
    """(op call taking **extra, reference call returning (o, lse), Hq) on tiny CPU inputs."""
    q, k, v = _t(B, T, HQ, D, dtype=dtype), _t(B, T, HKV, D, dtype=dtype, seed=1), None
    v = _t(B, T, HKV, D, dtype=dtype, seed=2)
    if name == "sliding_window_attn":
        kw = {"window_size": 3}
        return (
            lambda **x: longattn.sliding_window_attn(q, k, v, **kw, **x),
            lambda: R.sliding_window_attn_reference(q, k, v, **kw, return_lse=True),
            HQ,
        )
    if name == "nsa_compressed_attn":
        kc, vc = _t(B, 5, HKV, D, dtype=dtype, seed=3), _t(B, 5, HKV, D, dtype=dtype, seed=4)
        kw = {"kernel_size": 4, "kernel_stride": 2}
        return (
            lambda **x: longattn.nsa_compressed_attn(q, kc, vc, **kw, **x),
            lambda: R.nsa_compressed_attn_reference(q, kc, vc, **kw),
            HQ,
        )
    if name == "nsa_selected_attn":
        idx = _selected_indices()
        return (
            lambda **x: longattn.nsa_selected_attn(q, k, v, idx, block_size=4, **x),
            lambda: R.nsa_selected_attn_reference(q, k, v, idx, block_size=4, return_lse=True),
            HQ,
        )
    if name == "landmark_attn":
        return (
            lambda **x: longattn.landmark_attn(q, k, v, block_size=4, **x),
            lambda: R.landmark_attn_reference(q, k, v, block_size=4, return_lse=True),
            HQ,
        )
    if name == "rat_attn":
        qh = _t(B, T, HKV, D, dtype=dtype, seed=5)
        g = torch.sigmoid(_t(B, T, HKV, D, dtype=dtype, seed=6))
        return (
            lambda **x: longattn.rat_attn(qh, k, v, g, chunk_size=4, **x),
            lambda: R.rat_attn_reference(qh, k, v, g, chunk_size=4, return_lse=True),
            HKV,
        )
    raise AssertionError(name)


# ----------------------------------------------------------------------------- classification


def test_every_public_function_is_classified():
    names = set(public_functions())
    assert names == SOFTMAX_OPS | set(OTHER_FUNCTIONS), (
        "classify new public functions in SOFTMAX_OPS or OTHER_FUNCTIONS: "
        f"{sorted(names ^ (SOFTMAX_OPS | set(OTHER_FUNCTIONS)))}"
    )
    assert set(lnn.__all__) == set(MODULES) | set(MODULES.values())


# ----------------------------------------------------------------------------- return_lse


@pytest.mark.parametrize("name", sorted(SOFTMAX_OPS))
def test_softmax_op_has_keyword_only_return_lse(name):
    p = inspect.signature(getattr(longattn, name)).parameters.get("return_lse")
    assert p is not None, f"{name}: no return_lse"
    assert p.kind is KW_ONLY
    assert p.default is RETURN_LSE_DEFAULT.get(name, False)


@pytest.mark.parametrize("name", sorted(OTHER_FUNCTIONS))
def test_non_softmax_functions_have_no_return_lse(name):
    assert "return_lse" not in inspect.signature(getattr(longattn, name)).parameters


@pytest.mark.parametrize("name", sorted(SOFTMAX_OPS))
def test_return_lse_gives_o_and_float32_lse(name, no_deprecations):
    op, _, hq = softmax_call(name, F32)
    o = op(return_lse=False)
    assert isinstance(o, torch.Tensor)
    out = op(return_lse=True)
    assert isinstance(out, tuple) and len(out) == 2
    o2, lse = out
    assert torch.equal(o2, o)
    assert lse.dtype == torch.float32
    assert lse.shape == (B, T, hq)
    assert not lse.requires_grad


@pytest.mark.parametrize("name", sorted(SOFTMAX_OPS))
def test_lse_is_the_softmax_normaliser(name, no_deprecations):
    """float64: lse against the reference's log-sum-exp (the same layout, natural log)."""
    op, ref, _ = softmax_call(name, F64)
    o, lse = op(return_lse=True)
    ro, rlse = ref()
    assert lse.dtype == F64  # float64 inputs keep a float64 lse (state precision)
    torch.testing.assert_close(o, ro, rtol=1e-9, atol=1e-10)
    finite = torch.isfinite(rlse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite], rlse[finite], rtol=1e-9, atol=1e-10)


def test_return_lse_gradient_flows_through_o_only(no_deprecations):
    op, _, _ = softmax_call("sliding_window_attn", F64)
    q = _t(B, T, HQ, D, dtype=F64).requires_grad_()
    k, v = _t(B, T, HKV, D, dtype=F64, seed=1), _t(B, T, HKV, D, dtype=F64, seed=2)
    o, lse = longattn.sliding_window_attn(q, k, v, window_size=3, return_lse=True)
    o.sum().backward()
    assert q.grad is not None and not lse.requires_grad
    del op


def test_nsa_compressed_attn_default_is_deprecated():
    op, _, _ = softmax_call("nsa_compressed_attn", F32)
    with pytest.warns(DeprecationWarning, match="return_lse=True"):
        out = op()
    assert isinstance(out, tuple) and len(out) == 2  # the old behaviour, for one release
    torch.testing.assert_close(out[0], op(return_lse=False))


def test_lightning_attn_returns_o_and_state():
    q, k = _t(B, T, HKV, D), _t(B, T, HKV, D, seed=1)
    v = _t(B, T, HKV, D, seed=2)
    o, state = longattn.lightning_attn(q, k, v, longattn.lightning_slopes(HKV))
    assert state is None and o.shape == v.shape
    _, state = longattn.lightning_attn(
        q, k, v, longattn.lightning_slopes(HKV), output_final_state=True
    )
    assert state.shape == (B, HKV, D, D) and state.dtype == torch.float32


# ----------------------------------------------------------------------------- keyword-only options


@pytest.mark.parametrize("name", sorted(public_functions()))
def test_options_after_the_tensors_are_keyword_only(name):
    sig = inspect.signature(getattr(longattn, name))
    for p in sig.parameters.values():
        assert p.kind is not inspect.Parameter.VAR_POSITIONAL, f"{name}: *{p.name}"
        if p.kind in POSITIONAL and (name, p.name) not in POSITIONAL_NON_TENSORS:
            assert "Tensor" in str(p.annotation) and "None" not in str(p.annotation), (
                f"{name}: option {p.name} ({p.annotation}) is positional; make it keyword-only"
            )


@pytest.mark.parametrize(
    ("fn", "args", "kwargs"),
    [
        (longattn.insert_landmarks, (7, 4), {"landmark_id": 7, "block_size": 4}),
        (longattn.remove_landmarks, (4,), {"block_size": 4}),
        (longattn.remove_landmarks, (4, 1), {"block_size": 4, "dim": 1}),
    ],
)
def test_positional_options_are_deprecated(fn, args, kwargs):
    ids = torch.arange(2 * 9).view(2, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        want = fn(ids, **kwargs)
    with pytest.warns(DeprecationWarning, match="positionally is deprecated"):
        got = fn(ids, *args)
    assert torch.equal(got, want)


# the sizes a module constructor takes positionally; everything else is an option
MODULE_SIZES = {
    "NativeSparseAttention": ("hidden_size", "num_heads", "num_kv_heads", "head_dim"),
    "LandmarkAttention": ("hidden_size", "num_heads", "num_kv_heads", "head_dim"),
    "RATAttention": ("hidden_size", "num_heads"),
    "LightningAttention": ("hidden_size", "num_heads"),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_options_are_keyword_only(name):
    params = list(inspect.signature(getattr(lnn, name)).parameters.values())
    assert tuple(p.name for p in params if p.kind in POSITIONAL) == MODULE_SIZES[name]
    assert all(p.kind is KW_ONLY for p in params[len(MODULE_SIZES[name]) :])


@pytest.mark.parametrize(
    ("name", "sizes", "options"),
    [
        ("RATAttention", (32, 4), {"chunk_size": 4, "ngroups": 1}),
        ("LightningAttention", (32, 4), {"head_dim": 16, "layer_idx": 2}),
        (
            "NativeSparseAttention",
            (32, 4, 2, 8),
            {"compress": "linear", "kernel_size": 16, "kernel_stride": 8},
        ),
        ("LandmarkAttention", (32, 4, 2, 8), {"block_size": 4, "rope_theta": 500.0}),
    ],
)
def test_module_positional_options_are_deprecated(name, sizes, options):
    cls = getattr(lnn, name)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        want = cls(*sizes, **options)
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning, match="positionally is deprecated"):
        got = cls(*sizes, *options.values())
    assert repr(got) == repr(want)
    for key, value in options.items():
        assert getattr(got, key, value) == value
    for (k, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_lightning_slopes_positional_layer_is_deprecated():
    want = longattn.lightning_slopes(8, layer_idx=3, num_layers=8)
    with pytest.warns(DeprecationWarning, match="layer_idx, num_layers"):
        got = longattn.lightning_slopes(8, 3, 8)
    assert torch.equal(got, want)
    assert not torch.equal(want, longattn.lightning_slopes(8))  # the options did arrive


def test_positional_shim_rejects_too_many_and_duplicates():
    ids = torch.zeros(1, 6, dtype=torch.long)
    with pytest.raises(TypeError):
        longattn.insert_landmarks(ids, 1, 4, 5)
    with pytest.raises(TypeError, match="multiple values"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        longattn.insert_landmarks(ids, 1, landmark_id=2, block_size=4)


# ----------------------------------------------------------------------------- block indices


def test_landmark_accepts_int64_block_indices(no_deprecations):
    q, k, v = _t(B, T, HQ, D, dtype=F64), _t(B, T, HKV, D, dtype=F64, seed=1), None
    v = _t(B, T, HKV, D, dtype=F64, seed=2)
    idx = _selected_indices()
    assert idx.dtype == torch.int64
    o64 = longattn.landmark_attn(q, k, v, block_size=4, block_indices=idx)
    o32 = longattn.landmark_attn(q, k, v, block_size=4, block_indices=idx.int())
    assert torch.equal(o64, o32)
    # bounds-safe: 2^32 (a plain cast would wrap it to block 0) and −2^40 are skipped like −1
    far = torch.where(idx == 0, torch.full_like(idx, 2**32), idx)
    far[..., 1] = torch.where(idx[..., 1] < 0, -(2**40), idx[..., 1])
    skipped = torch.where(idx == 0, -1, idx)
    o_far = longattn.landmark_attn(q, k, v, block_size=4, block_indices=far)
    o_skip = longattn.landmark_attn(q, k, v, block_size=4, block_indices=skipped.int())
    assert torch.equal(o_far, o_skip)
    assert not torch.equal(o_far, o32)
    with pytest.raises(TypeError, match="block_indices"):
        longattn.landmark_attn(q, k, v, block_size=4, block_indices=idx.to(torch.int16))


def test_nsa_selected_accepts_int32_and_int64(no_deprecations):
    op64, _, _ = softmax_call("nsa_selected_attn", F64)
    q, k, v = _t(B, T, HQ, D, dtype=F64), _t(B, T, HKV, D, dtype=F64, seed=1), None
    v = _t(B, T, HKV, D, dtype=F64, seed=2)
    idx = _selected_indices()
    o64 = longattn.nsa_selected_attn(q, k, v, idx, block_size=4)
    o32 = longattn.nsa_selected_attn(q, k, v, idx.int(), block_size=4)
    assert torch.equal(o64, o32)
    del op64


# ----------------------------------------------------------------------------- RoPE


def test_rope_modules_take_rope_theta():
    for name in MODULES:
        params = inspect.signature(getattr(lnn, name).__init__).parameters
        assert ("rope_theta" in params) == (name in ROPE_MODULES), name


def test_no_public_signature_exposes_rope_base_except_as_deprecated_alias():
    aliases = []
    for qual, fn in all_public_callables().items():
        params = inspect.signature(fn).parameters
        if "rope_base" in params:
            p = params["rope_base"]
            assert p.default is DEPRECATED, f"{qual}: rope_base is not a deprecated alias"
            assert p.kind is KW_ONLY, qual
            assert "rope_theta" in params, f"{qual}: rope_base without rope_theta"
            aliases.append(qual)
    assert "longattn.rat_attn" in aliases  # the walk did reach the aliases


def test_rope_base_alias_warns_and_means_rope_theta(no_deprecations):
    op, _, _ = softmax_call("rat_attn", F64)
    want = op(rope_theta=7.0)
    assert not torch.equal(want, op())  # the base matters at T > chunk_size
    with warnings.catch_warnings():
        warnings.simplefilter("default", DeprecationWarning)
        with pytest.warns(DeprecationWarning, match="rope_base= is deprecated"):
            got = op(rope_base=7.0)
        assert torch.equal(got, want)
        with pytest.warns(DeprecationWarning, match="rope_base"):
            assert torch.equal(op(rope_base=None), op(rope_theta=None))
        with pytest.raises(TypeError, match="both"):
            op(rope_theta=7.0, rope_base=5.0)


def test_rat_module_rope_base_alias(no_deprecations):
    m = lnn.RATAttention(32, 4, rope_theta=7.0)
    assert m.rope_theta == 7.0 and "rope_theta=7.0" in repr(m)
    with warnings.catch_warnings():
        warnings.simplefilter("default", DeprecationWarning)
        with pytest.warns(DeprecationWarning, match="rope_base"):
            old = lnn.RATAttention(32, 4, rope_base=5.0)
        assert old.rope_theta == 5.0
        with pytest.warns(DeprecationWarning, match="rope_theta"):
            assert old.rope_base == 5.0


def test_reference_rope_base_alias():
    q, k, v = (_t(1, 6, 1, 4, dtype=F64, seed=s) for s in range(3))
    g = torch.sigmoid(_t(1, 6, 1, 4, dtype=F64, seed=3))
    want = R.rat_attn_reference(q, k, v, g, chunk_size=2, rope_theta=3.0)
    with pytest.warns(DeprecationWarning, match="rope_base"):
        got = R.rat_attn_reference(q, k, v, g, chunk_size=2, rope_base=3.0)
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- caches


def small_module(name: str):
    torch.manual_seed(0)
    if name == "NativeSparseAttention":
        return lnn.NativeSparseAttention(
            32, 4, 2, 8, kernel_size=4, kernel_stride=2, block_size=4, topk=2, window_size=4,
            dtype=F64,
        )  # fmt: skip
    if name == "LandmarkAttention":
        return lnn.LandmarkAttention(32, 4, 2, 8, block_size=4, dtype=F64)
    if name == "RATAttention":
        return lnn.RATAttention(32, 4, chunk_size=4, dtype=F64)
    return lnn.LightningAttention(32, 4, dtype=F64)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_cache_module_has_init_cache(name, no_deprecations):
    cls = getattr(lnn, name)
    assert "cache" in inspect.signature(cls.forward).parameters
    params = list(inspect.signature(cls.init_cache).parameters.values())
    assert [p.name for p in params[:2]] == ["self", "batch_size"]
    assert params[1].kind in POSITIONAL
    assert {"device", "dtype"} <= {p.name for p in params[2:]}
    assert all(p.kind is KW_ONLY for p in params[2:])
    m = small_module(name)
    cache = m.init_cache(2)
    assert isinstance(cache, getattr(lnn, MODULES[name]))
    assert cache.batch_size == 2
    x = torch.randn(2, 10, 32, dtype=F64)
    with torch.no_grad():
        want, _ = m(x)
        got, new = m(x, cache=cache, use_cache=True)
    assert new is not None
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("name", ["NSACache", "LandmarkCache", "RATCache"])
def test_cache_empty_is_deprecated(name):
    module = {v: k for k, v in MODULES.items()}[name]
    m = small_module(module)
    want = m.init_cache(3)
    with pytest.warns(DeprecationWarning, match=rf"{name}.empty is deprecated.*init_cache"):
        heads = m.num_heads if name == "RATCache" else m.num_kv_heads
        got = getattr(lnn, name).empty(3, heads, m.head_dim, dtype=F64)
    for f in ("k", "v", "k_store", "v_store", "k_run", "v_run"):
        if hasattr(want, f):
            a, b = getattr(want, f), getattr(got, f)
            assert a.shape == b.shape and a.dtype == b.dtype, f


def test_lightning_init_cache_positional_device_is_deprecated():
    m = small_module("LightningAttention")
    assert m.init_cache(2).state.dtype == F64  # float64 module: float64 state
    with pytest.warns(DeprecationWarning, match="device"):
        c = m.init_cache(2, "cpu", torch.float32)
    assert c.state.dtype == torch.float32

"""Bad inputs (docs/api/conventions.md, "Errors"), NaN/Inf propagation and thread safety for
every CPU op.

Every bad call must raise ValueError or TypeError whose message names the offending argument,
before any kernel runs; afterwards the same op still gives the same result on valid input.
"""

from __future__ import annotations

import re
import threading

import longattn as la
import pytest
import torch
from harness import F64, rel_err
from longattn.reference import landmark as RL
from longattn.reference import lightning as RLi
from longattn.reference import nsa as RN
from longattn.reference import rat as RR

B, T, HQ, HKV, D = 1, 12, 4, 2, 8
KS, KD, BS = 4, 2, 4  # compression kernel / stride, block size
C = (T - KS) // KD + 1  # compressed rows


def _t(*shape, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def _idx(n=2):
    out = torch.full((B, T, HKV, n), -1, dtype=torch.int32)
    for t in range(T):
        out[0, t, :, 0] = t // BS
        if t // BS > 0:
            out[0, t, :, 1] = 0
    return out


def valid_args(op: str) -> dict:
    """Keyword arguments of one valid call of `op` (float64, B=1, T=12, GQA 4/2 where allowed)."""
    q, k, v = _t(B, T, HQ, D), _t(B, T, HKV, D, seed=1), _t(B, T, HKV, D, seed=2)
    qh = _t(B, T, HKV, D, seed=3)  # same head count as k (ops defined per head)
    kc, vc = _t(B, C, HKV, D, seed=4), _t(B, C, HKV, D, seed=5)
    cu = torch.tensor([0, 5, 5, 6, 12], dtype=torch.int32)
    if op == "lightning_attn":
        return dict(
            q=qh, k=k, v=v, slopes=torch.tensor([0.1, 0.5], dtype=F64),
            initial_state=_t(B, HKV, D, D, seed=6) * 0.1, output_final_state=True,
        )  # fmt: skip
    if op == "rat_attn":
        return dict(q=qh, k=k, v=v, g=torch.sigmoid(_t(B, T, HKV, D, seed=7)), chunk_size=4)
    if op == "landmark_attn":
        return dict(q=q, k=k, v=v, block_size=BS, cu_seqlens=cu)
    if op == "landmark_topk_blocks":
        return dict(q=q, k=k, block_size=BS, topk=2, cu_seqlens=cu)
    if op == "nsa_compress":
        return dict(
            x=k, kernel_size=KS, kernel_stride=KD, weight=_t(HKV, KS * D, 5, seed=8) * 0.2,
            pe=_t(HKV, KS, D, seed=9),
        )  # fmt: skip
    if op == "nsa_compressed_attn":
        return dict(q=q, k_cmp=kc, v_cmp=vc, kernel_size=KS, kernel_stride=KD)
    if op == "nsa_topk_blocks":
        _, lse = la.nsa_compressed_attn(
            q, kc, vc, kernel_size=KS, kernel_stride=KD, return_lse=True
        )
        return dict(q=q, k_cmp=kc, lse=lse, kernel_size=KS, kernel_stride=KD, block_size=BS, topk=2)
    if op == "nsa_selected_attn":
        return dict(q=q, k=k, v=v, block_indices=_idx(), block_size=BS, cu_seqlens=cu)
    if op == "sliding_window_attn":
        return dict(q=q, k=k, v=v, window_size=3, cu_seqlens=cu)
    if op == "nsa_attn":
        gs = [torch.sigmoid(_t(B, T, HQ, seed=10 + i)) for i in range(3)]
        return dict(
            q=q, k=k, v=v, g_cmp=gs[0], g_slc=gs[1], g_swa=gs[2], k_cmp=kc, v_cmp=vc,
            kernel_size=KS, kernel_stride=KD, block_size=BS, topk=2, window_size=3,
        )  # fmt: skip
    raise AssertionError(op)


POSITIONAL = {
    "lightning_attn": ["q", "k", "v", "slopes"],
    "rat_attn": ["q", "k", "v", "g"],
    "landmark_attn": ["q", "k", "v"],
    "landmark_topk_blocks": ["q", "k"],
    "nsa_compress": ["x"],
    "nsa_compressed_attn": ["q", "k_cmp", "v_cmp"],
    "nsa_topk_blocks": ["q", "k_cmp", "lse"],
    "nsa_selected_attn": ["q", "k", "v", "block_indices"],
    "sliding_window_attn": ["q", "k", "v"],
    "nsa_attn": ["q", "k", "v", "g_cmp", "g_slc", "g_swa"],
}
OPS = list(POSITIONAL)
# the main [B, T, H, D] inputs and the size arguments of every op
MAIN = {
    op: [n for n in POSITIONAL[op] if n in ("q", "k", "v", "x", "k_cmp", "v_cmp")] for op in OPS
}
SIZES = {
    "rat_attn": ["chunk_size"],
    "landmark_attn": ["block_size"],
    "landmark_topk_blocks": ["block_size", "topk"],
    "nsa_compress": ["kernel_size", "kernel_stride"],
    "nsa_compressed_attn": ["kernel_size", "kernel_stride"],
    "nsa_topk_blocks": ["kernel_size", "kernel_stride", "block_size", "topk"],
    "nsa_selected_attn": ["block_size"],
    "sliding_window_attn": ["window_size"],
    "nsa_attn": ["kernel_size", "kernel_stride", "block_size", "topk", "window_size"],
}
CU_OPS = [op for op in OPS if op not in ("nsa_attn",)]


def call(op: str, kw: dict):
    kw = dict(kw)
    args = [kw.pop(n) for n in POSITIONAL[op]]
    if op == "nsa_compressed_attn":
        kw.setdefault("return_lse", True)  # the one-release default would warn
    return getattr(la, op)(*args, **kw)


def first(out):
    return out[0] if isinstance(out, tuple) else out


def _with_cu(op, kw, cu):
    """Valid args switched to packed mode with the given cu_seqlens."""
    kw = dict(kw, cu_seqlens=cu)
    if op == "lightning_attn":
        kw["initial_state"] = None
    return kw


def _set(name, fn):
    return lambda kw: {**kw, name: fn(kw[name])}


def cases():
    """(op, case id, mutation of the valid kwargs, argument the message must name)."""
    out = []
    for op in OPS:
        add = lambda cid, mut, arg, op=op: out.append(pytest.param(op, mut, arg, id=f"{op}-{cid}"))  # noqa: E731
        for n in POSITIONAL[op]:
            add(f"{n}-rank", _set(n, lambda t: t[0]), n)
            add(f"{n}-not-tensor", _set(n, lambda t: t.tolist()), n)
        for n in MAIN[op]:
            # dense k_cmp rows are "the rows available", any count is valid for the selection
            if n not in ("q", "x") and not (op == "nsa_topk_blocks" and n == "k_cmp"):
                # k_cmp and v_cmp are checked against each other: either may be named
                names = ("k_cmp", "v_cmp") if n in ("k_cmp", "v_cmp") else n
                add(f"{n}-time", _set(n, lambda t: t[:, :-1]), names)
                add(f"{n}-dtype", _set(n, lambda t: t.float()), n)
            add(f"{n}-int-dtype", _set(n, lambda t: t.to(torch.int32)), n)
            add(f"{n}-complex", _set(n, lambda t: t.to(torch.complex128)), n)
            if op != "nsa_compress":  # x is its only batched input
                names = (n, "g_cmp") if op == "nsa_attn" else n  # gates are checked against q
                add(f"{n}-batch", _set(n, lambda t: torch.cat([t, t])), names)
        for n in MAIN[op]:
            if n in ("k", "k_cmp", "x"):
                names = ("x", "weight") if n == "x" else n  # weight's rows are kernel_size·D
                add(f"{n}-headdim", _set(n, lambda t: t[..., :-1]), names)
        if op in ("lightning_attn", "rat_attn"):
            add("k-heads", _set("k", lambda t: torch.cat([t, t], dim=2)), "k")
            add("v-heads", _set("v", lambda t: torch.cat([t, t], dim=2)), "v")
        elif "k" in POSITIONAL[op] or "k_cmp" in POSITIONAL[op]:
            kn = "k" if "k" in POSITIONAL[op] else "k_cmp"
            add("heads-not-divide", _set(kn, lambda t: torch.cat([t, t[:, :, :1]], dim=2)), kn)
        for n in SIZES.get(op, []):
            add(f"{n}-zero", _set(n, lambda s: 0), n)
            add(f"{n}-negative", _set(n, lambda s: -3), n)
            add(f"{n}-str", _set(n, lambda s: "4"), n)
            add(f"{n}-float", _set(n, lambda s: 2.5), n)
        big = "x" if op == "nsa_compress" else "q"
        add("head-dim-257", lambda kw, big=big, op=op: _big_head(op, kw), big)
        if op in CU_OPS:
            tot = T
            for cid, vals in [
                ("non-monotone", [0, 6, 4, tot]),
                ("first-not-zero", [1, 6, tot]),
                ("past-end", [0, 6, tot + 1]),
                ("short-total", [0, 6, tot - 1]),
                ("negative", [0, -1, tot]),
                ("single-entry", [0]),
            ]:
                cu = torch.tensor(vals, dtype=torch.int64)
                add(f"cu-{cid}", lambda kw, cu=cu, op=op: _with_cu(op, kw, cu), "cu_seqlens")
            cuf = torch.tensor([0.0, 6.0, tot])
            add("cu-float", lambda kw, cu=cuf, op=op: _with_cu(op, kw, cu), "cu_seqlens")
            cu2 = torch.tensor([[0, 6, tot]])
            add("cu-2d", lambda kw, cu=cu2, op=op: _with_cu(op, kw, cu), "cu_seqlens")
            add("cu-list", lambda kw, op=op: _with_cu(op, kw, [0, 6, T]), "cu_seqlens")
        if op in ("landmark_attn", "nsa_selected_attn"):
            if op == "nsa_selected_attn":
                add("idx-float", _set("block_indices", lambda t: t.float()), "block_indices")
                add("idx-heads", _set("block_indices", lambda t: t[:, :, :1]), "block_indices")
                add("idx-time", _set("block_indices", lambda t: t[:, :-1]), "block_indices")
            else:
                add("idx-float", lambda kw: {**kw, "block_indices": _idx().float()},
                    "block_indices")  # fmt: skip
                add("idx-heads", lambda kw: {**kw, "block_indices": _idx()[:, :, :1]},
                    "block_indices")  # fmt: skip
                add("idx-time", lambda kw: {**kw, "block_indices": _idx()[:, :-1]},
                    "block_indices")  # fmt: skip
        if op == "nsa_selected_attn":
            bc = torch.zeros(B, T, HKV + 1, dtype=torch.int32)
            add("counts-shape", lambda kw, bc=bc: {**kw, "block_counts": bc}, "block_counts")
        if op == "lightning_attn":
            add("slopes-len", _set("slopes", lambda t: torch.cat([t, t])), "slopes")
            add("state-shape", _set("initial_state", lambda t: t[:, :, :-1]), "initial_state")
            add("state-dtype", _set("initial_state", lambda t: t.to(torch.int32)), "initial_state")
            add("state-rank", _set("initial_state", lambda t: t[0]), "initial_state")
        if op == "rat_attn":
            add("g-shape", _set("g", lambda t: t[..., :-1]), "g")
            add("g-int", _set("g", lambda t: t.to(torch.int32)), "g")
            add("rope-base", lambda kw: {**kw, "rope_theta": -1.0}, "rope_theta")
            add("rope-odd-D", lambda kw: _odd_rat(kw), "rope_theta")
        if op == "nsa_compress":
            add("weight-shape", _set("weight", lambda t: t[:, :-1]), "weight")
            add("weight-heads", _set("weight", lambda t: t[:1]), "weight")
            add("pe-shape", _set("pe", lambda t: t[:, :-1]), "pe")
            add("pe-without-weight", lambda kw: {**kw, "weight": None}, "pe")
        if op in ("nsa_compressed_attn", "nsa_topk_blocks"):
            cu1 = torch.tensor([0, T], dtype=torch.int32)
            add("k_cmp-rows-packed",
                lambda kw, cu1=cu1: {**kw, "k_cmp": kw["k_cmp"][:, :-1], "cu_seqlens": cu1,
                                     **({"v_cmp": kw["v_cmp"][:, :-1]} if "v_cmp" in kw else {})},
                "k_cmp")  # fmt: skip
        if op == "nsa_topk_blocks":
            add("lse-shape", _set("lse", lambda t: t[:, :-1]), "lse")
            add("stride-divides", lambda kw: {**kw, "kernel_stride": 3}, "kernel_stride")
            add("init-negative", lambda kw: {**kw, "init_blocks": -1}, "init_blocks")
        if op == "nsa_attn":
            add("g_cmp-shape", _set("g_cmp", lambda t: t[:, :-1]), "g_cmp")
        if op in ("landmark_attn", "landmark_topk_blocks"):
            add("block-size-1", lambda kw: {**kw, "block_size": 1}, "block_size")
            add("cu-tk-ne-tq", lambda kw: _longer_keys(kw), "cu_seqlens")
    return out


def _big_head(op, kw):
    kw = dict(kw)
    for n in MAIN[op] + (["g"] if op == "rat_attn" else []):
        t = kw[n]
        kw[n] = torch.zeros(*t.shape[:-1], 257, dtype=t.dtype)
    if op == "lightning_attn":
        kw["initial_state"] = None
    if op == "nsa_compress":
        kw["weight"] = kw["pe"] = None
    if op == "nsa_topk_blocks":
        kw["lse"] = torch.zeros_like(kw["lse"])
    return kw


def _longer_keys(kw):
    kw = {**kw, "k": torch.cat([kw["k"], kw["k"]], 1)}
    if "v" in kw:
        kw["v"] = torch.cat([kw["v"], kw["v"]], 1)
    return kw


def _odd_rat(kw):
    kw = {n: (t[..., :-1] if isinstance(t, torch.Tensor) else t) for n, t in kw.items()}
    return {**kw, "rope_theta": 10000.0}


CASES = cases()


@pytest.mark.parametrize(("op", "mutate", "arg"), CASES)
def test_bad_input_raises_and_names_argument(op, mutate, arg):
    kw = valid_args(op)
    expected = first(call(op, kw))
    with pytest.raises((ValueError, TypeError)) as info:
        call(op, mutate(kw))
    msg = str(info.value)
    names = (arg,) if isinstance(arg, str) else arg
    assert any(re.search(rf"(?<![A-Za-z_]){re.escape(a)}(?![A-Za-z_])", msg) for a in names), (
        f"{type(info.value).__name__} does not name {arg!r}: {msg}"
    )
    # the process survives and the op still works
    again = first(call(op, valid_args(op)))
    assert torch.equal(again, expected)


def test_case_table_covers_every_op():
    ops = {c.values[0] for c in CASES}
    assert ops == set(OPS)
    assert len(CASES) > 200


# ----------------------------------------------------------------------------- NaN / Inf


def reference(op: str, kw: dict):
    kw = dict(kw)
    if op == "lightning_attn":
        return RLi.lightning_attn_recurrent(
            kw["q"], kw["k"], kw["v"], kw["slopes"], 1.0, kw["initial_state"], kw.get("cu_seqlens")
        )[0]
    fns = {
        "rat_attn": RR.rat_attn_reference,
        "landmark_attn": RL.landmark_attn_reference,
        "nsa_compress": RN.nsa_compress_reference,
        "nsa_compressed_attn": RN.nsa_compressed_attn_reference,
        "nsa_selected_attn": RN.nsa_selected_attn_reference,
        "sliding_window_attn": RN.sliding_window_attn_reference,
        "nsa_attn": RN.nsa_attn_reference,
    }
    args = [kw.pop(n) for n in POSITIONAL[op]]
    return first(fns[op](*args, **kw))


NONFINITE_OPS = [op for op in OPS if op not in ("landmark_topk_blocks", "nsa_topk_blocks")]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("arg", ["q", "k", "v", "x"])
@pytest.mark.parametrize("op", NONFINITE_OPS)
def test_nonfinite_inputs_propagate(op, arg, value):
    kw = valid_args(op)
    if arg not in kw or op == "nsa_attn" and arg == "q":
        pytest.skip("no such input" if arg not in kw else "selection on NaN scores is undefined")
    if op == "nsa_attn":
        kw["block_indices"] = _idx()  # selection from NaN scores is unspecified
        kw.pop("topk")
    if op == "rat_attn" and value == value:
        # with RoPE, ±Inf meets inf − inf in a rotation whose order differs between the kernel
        # (relative rotation) and the reference (both sides rotated): compare without it
        kw["rope_theta"] = None
    clean = first(call(op, kw))
    t = kw[arg].clone()
    t[0, 5, 0, 1] = value  # token 5 (with cu_seqlens: the one-token sequence [5, 6))
    kw[arg] = t
    out = first(call(op, kw))  # no exception, no crash
    ref = reference(op, kw)
    bad, rbad = ~torch.isfinite(out), ~torch.isfinite(ref)
    assert rbad.any(), "the reference should see the non-finite input"
    assert torch.equal(bad, rbad), (
        f"non-finite pattern differs: op {int(bad.sum())} vs reference {int(rbad.sum())}"
    )
    fin = ~rbad
    assert rel_err(out[fin], ref[fin]) < 1e-10
    if op != "nsa_compress":
        # causality: earlier tokens never see it (no 0·NaN from masked future entries)
        assert torch.equal(out[:, :5], clean[:, :5])


@pytest.mark.parametrize("t0", [0, 4, 5, 11])
def test_lightning_nan_in_v_does_not_leak_back_in_time(t0):
    """Regression: the CPU kernel multiplied masked (zero) intra-chunk weights with the values
    of later tokens of the same micro-tile, so a NaN/Inf in v[t] poisoned o[t'] for t' < t."""
    q, k, v = (_t(1, 12, 2, 8, seed=s) for s in range(3))
    v[0, t0, 1, 3] = float("nan")
    out, _ = la.lightning_attn(q, k, v, torch.tensor([0.1, 0.3], dtype=F64))
    assert torch.isfinite(out[:, :t0]).all()
    assert torch.isfinite(out[:, :, 0]).all()
    assert torch.isnan(out[:, t0:, 1]).any(dim=-1).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nsa_nonfinite_single_key_row_is_not_empty(value):
    """Regression: the NSA branch kernel turned a row whose scores were NaN (or all −inf) into
    an "empty" row, o = 0 and lse = −inf, instead of propagating NaN like the reference."""
    q, k, v = _t(1, 4, 1, 8), _t(1, 4, 1, 8, seed=1), _t(1, 4, 1, 8, seed=2)
    q[0, 2, 0, :] = value
    o = la.sliding_window_attn(q, k, v, window_size=1)
    ref = RN.sliding_window_attn_reference(q, k, v, window_size=1)
    assert torch.isnan(ref[0, 2]).all()
    assert torch.isnan(o[0, 2]).all()
    assert torch.isfinite(o[0, [0, 1, 3]]).all()


def test_topk_with_nan_does_not_crash():
    for op in ("landmark_topk_blocks", "nsa_topk_blocks"):
        kw = valid_args(op)
        kw["q"] = kw["q"].clone()
        kw["q"][0, 7, 1, 0] = float("nan")
        out = call(op, kw)
        nb = T // BS + 1
        assert out.dtype == torch.int32
        assert ((out >= -1) & (out < nb)).all()


# ----------------------------------------------------------------------------- threads


def test_threads_match_serial():
    """4 Python threads calling every CPU op at once (the kernels run without the GIL) give
    bit-identical results to serial calls."""
    jobs = []
    for op in OPS:
        for seed in range(2):
            kw = valid_args(op)
            kw = {
                n: (t * (1 + seed) if isinstance(t, torch.Tensor) and t.is_floating_point()
                    and n not in ("lse", "slopes", "g", "g_cmp", "g_slc", "g_swa") else t)
                for n, t in kw.items()
            }  # fmt: skip
            jobs.append((op, kw))
    serial = [first(call(op, kw)) for op, kw in jobs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(w: int):
        try:
            barrier.wait()
            for rep in range(3):
                order = range(len(jobs)) if (w + rep) % 2 == 0 else reversed(range(len(jobs)))
                for i in order:
                    op, kw = jobs[i]
                    out = first(call(op, kw))
                    if (i, w) in results:
                        assert torch.equal(results[(i, w)], out), f"{op} differs between reps"
                    results[(i, w)] = out
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (i, _), out in results.items():
        assert torch.equal(out, serial[i]), f"{jobs[i][0]}: threaded result differs from serial"


def test_threads_backward_match_serial():
    """Backward passes from 4 threads at once (autograd + native backward kernels)."""

    def run(op):
        kw = valid_args(op)
        leaves = [kw[n].requires_grad_() for n in MAIN[op]]
        out = first(call(op, kw))
        return torch.autograd.grad(out.sum(), leaves)

    ops = [op for op in OPS if "topk" not in op]
    serial = {op: run(op) for op in ops}
    errors: list[BaseException] = []

    def worker():
        try:
            for op in ops * 2:
                for a, b in zip(run(op), serial[op], strict=True):
                    assert torch.equal(a, b), f"{op} gradient differs in a thread"
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors

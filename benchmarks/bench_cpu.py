"""Benchmark the CPU kernels of every family against the same math in torch eager (float32).

The targets ("Performance targets" in docs/api/<family>.md): lightning, RAT and NSA at least 3×
faster than the float32 torch-eager formulation on the same threads, landmark at most 1.5× the time
of torch SDPA (causal, float32). Eager baselines: ``lightning_attn_chunked`` and
``rat_attn_chunked`` (the references' chunked forms), SDPA causal for landmark, and for the NSA
attention branches the dense masked softmax (``nsa_dense_masked_attn`` with the branch's mask: what
the math costs without a sparse kernel). Every timing is forward + backward (``torch.autograd.grad``
of ``(o·do).sum()``), the median of ``--reps`` runs after one warm-up, and of ``--runs`` whole
passes over the cases, float32, on ``torch.get_num_threads()`` threads.

    python benchmarks/bench_cpu.py --out cpu.json [--quick] [--budget-s 300]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from bench_nsa import block_indices


def fwd_bwd(fn, inputs):
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    diff = [x for x in leaves if x.requires_grad]
    torch.autograd.grad((out * torch.ones_like(out)).sum(), diff)


def timeit(fn, inputs, reps):
    fwd_bwd(fn, inputs)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fwd_bwd(fn, inputs)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cases(quick: bool):
    """(op, shape fields, {impl: (fn, inputs)}) for every family."""
    import longattn as la
    from longattn.reference import lightning as RLi
    from longattn.reference import nsa as RN
    from longattn.reference import rat as RR

    F = torch.float32
    T = 1024 if quick else 2048

    def randn(*s, scale=1.0):
        return torch.randn(*s, dtype=F) * scale

    H, D = 8, 64
    q, k, v = randn(1, T, H, D, scale=0.5), randn(1, T, H, D, scale=0.5), randn(1, T, H, D)
    slopes = la.lightning_slopes(H).float()
    yield (
        "lightning_attn",
        {"B": 1, "T": T, "H": H, "D": D},
        {
            "longattn": (
                lambda q, k, v, s: la.lightning_attn(q, k, v, s, scale=1.0),
                [q, k, v, slopes],
            ),
            "eager": (
                lambda q, k, v, s: RLi.lightning_attn_chunked(q, k, v, s, 1.0),
                [q, k, v, slopes],
            ),
        },
    )

    L = 16
    g = torch.sigmoid(randn(1, T, H, D) + 2)
    q, k, v = randn(1, T, H, D), randn(1, T, H, D), randn(1, T, H, D)
    yield (
        "rat_attn",
        {"B": 1, "T": T, "H": H, "D": D, "L": L},
        {
            "longattn": (lambda q, k, v, g: la.rat_attn(q, k, v, g, chunk_size=L), [q, k, v, g]),
            "eager": (
                lambda q, k, v, g: RR.rat_attn_chunked(q, k, v, g, chunk_size=L),
                [q, k, v, g],
            ),
        },
    )

    def sdpa(q, k, v):
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return o.transpose(1, 2)

    bs = 64
    yield (
        "landmark_attn",
        {"B": 1, "T": T, "H": H, "D": D, "block_size": bs},
        {
            "longattn": (lambda q, k, v: la.landmark_attn(q, k, v, block_size=bs), [q, k, v]),
            "sdpa": (sdpa, [q, k, v]),
        },
    )

    Hkv, G = 2, 4
    q = randn(1, T, Hkv * G, D)
    k, v = randn(1, T, Hkv, D), randn(1, T, Hkv, D)
    n, bsel = 8, 64
    idx = block_indices(T, Hkv, n, bsel, "cpu")  # the GPU benchmark's selection
    sel_mask = RN.nsa_selection_mask(idx, bsel, T)
    yield (
        "nsa_selected_attn",
        {"B": 1, "T": T, "Hkv": Hkv, "G": G, "D": D, "block_size": bsel, "topk": n},
        {
            "longattn": (
                lambda q, k, v: la.nsa_selected_attn(q, k, v, idx, block_size=bsel),
                [q, k, v],
            ),
            "eager": (lambda q, k, v: RN.nsa_dense_masked_attn(q, k, v, sel_mask)[0], [q, k, v]),
        },
    )

    W = 256
    win_mask = RN.sliding_window_mask(T, W)[None, None].expand(1, Hkv, T, T)
    yield (
        "sliding_window_attn",
        {"B": 1, "T": T, "Hkv": Hkv, "G": G, "D": D, "window_size": W},
        {
            "longattn": (lambda q, k, v: la.sliding_window_attn(q, k, v, window_size=W), [q, k, v]),
            "eager": (lambda q, k, v: RN.nsa_dense_masked_attn(q, k, v, win_mask)[0], [q, k, v]),
        },
    )

    ks, kd = 32, 16
    C = (T - ks) // kd + 1
    kc, vc = randn(1, C, Hkv, D), randn(1, C, Hkv, D)
    cmask = RN.compressed_visibility_mask(T, C, ks, kd)[None, None].expand(1, Hkv, T, C)
    yield (
        "nsa_compressed_attn",
        {"B": 1, "T": T, "Hkv": Hkv, "G": G, "D": D, "kernel_size": ks, "kernel_stride": kd},
        {
            "longattn": (
                lambda q, kc, vc: la.nsa_compressed_attn(
                    q, kc, vc, kernel_size=ks, kernel_stride=kd, return_lse=True
                )[0],
                [q, kc, vc],
            ),
            "eager": (lambda q, kc, vc: RN.nsa_dense_masked_attn(q, kc, vc, cmask)[0], [q, kc, vc]),
        },
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_cpu.json")
    ap.add_argument("--budget-s", type=float, default=600.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument(
        "--runs", type=int, default=3, help="whole passes over the cases (recorded: their median)"
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    t_start = time.time()
    threads = torch.get_num_threads()
    records: dict = {}
    # Whole passes, not more reps in a row: this machine's speed drifts over tens of seconds.
    for _ in range(args.runs):
        for op, shape, impls in cases(args.quick):
            for impl, (fn, inputs) in impls.items():
                if time.time() - t_start > args.budget_s:
                    break
                rec = records.setdefault((op, impl), {
                    "op": op, "impl": impl, **shape, "dtype": "float32", "direction": "fwd+bwd",
                    "device": "cpu", "threads": threads, "runs_ms": [],
                })  # fmt: skip
                try:
                    rec["runs_ms"].append(round(timeit(fn, inputs, args.reps), 3))
                    rec["ms"] = statistics.median(rec["runs_ms"])
                except Exception as e:  # recorded, never fatal
                    rec["error"] = f"{type(e).__name__}: {e}"
                print(rec, flush=True)
                with open(args.out, "w") as f:
                    json.dump(list(records.values()), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark the NSA attention branches against their peers, in one process, same inputs.

Selected attention (bf16, D = 128, B_K = 64, n = 16, Hkv = 4, G in {1, 2, 4, 8, 16}, one
sequence of T in {8K, 32K, 64K}), forward and backward separately:

* ``longattn``: ``longattn.ops.nsa.nsa_selected_attn`` (KV-outer for G <= 8, query-outer above).
* ``fsa``: Relaxed-System-Lab/Flash-Sparse-Attention ``FSA_topk_sparse_attention`` (sources in
  ``<repo>/.peers/fsa``; its reduce kernel's one-element tuple pointer ``(ptr + off,)`` does not
  compile on Triton 3.6: the bench copies the sources to a temporary folder and patches it).
* ``nsa_ref``: XunhaoLai/native-sparse-attention-triton ``topk_sparse_attention``
  (``<repo>/.peers/nsa_ref``).
* ``fla``: ``fla.ops.nsa.parallel_nsa`` (fla-core; refuses G < 16: recorded as an error).

Every implementation gets the same random block indices: valid, distinct, sorted, with the
first block and the two most recent blocks forced (−1 padding where fewer blocks exist).

Full layer (fwd+bwd): ``nsa_attn`` (compressed + selected + sliding window W = 512, given block
indices, k_cmp/v_cmp precomputed) vs ``sdpa`` causal (dense cuDNN).

Timing: ``triton.testing.do_bench`` (median). bwd = ``torch.autograd.grad(o, inputs, do,
retain_graph=True)`` on a retained forward graph. Results: a JSON list, rewritten after every
measurement. ``--quick``: T = 8K and 64K at G = 1 and 16 (about a minute).

    python3 benchmarks/bench_nsa.py --out nsa.json --budget-s 240 [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.path.join(ROOT, ".peers")


def err_str(e: BaseException, limit: int = 600) -> str:
    s = f"{type(e).__name__}: {e}"
    return s if len(s) <= limit else s[:limit] + "..."


def block_indices(T: int, Hkv: int, n: int, bs: int, device) -> torch.Tensor:
    """[1, T, Hkv, n] int32: distinct sorted blocks, block 0 and the 2 local blocks forced."""
    nb = (T + bs - 1) // bs
    t = torch.arange(T, device=device)
    cur = (t // bs)[None, :, None, None]
    blk = torch.arange(nb, device=device)
    score = torch.rand(1, T, Hkv, nb, device=device)
    score = score.masked_fill(blk > cur, -1.0)
    forced = (blk == 0) | ((blk <= cur) & (blk > cur - 2))
    score = torch.where(forced & (blk <= cur), 2.0, score)
    top = score.topk(min(n, nb), dim=-1)
    idx = torch.where(top.values >= 0, top.indices, nb + 1).sort(-1).values
    idx = torch.where(idx > nb, -1, idx)
    if idx.shape[-1] < n:
        idx = torch.cat([idx, idx.new_full((1, T, Hkv, n - idx.shape[-1]), -1)], -1)
    return idx.to(torch.int32).contiguous()


def load_fsa():
    src = os.path.join(PEERS, "fsa")
    tmp = tempfile.mkdtemp(prefix="fsa_patched_")
    for sub in ("fsa", "nsa_ref"):
        shutil.copytree(os.path.join(src, sub), os.path.join(tmp, sub))
    path = os.path.join(tmp, "fsa", "ops", "FSA_topk_sparse_attention.py")
    text = open(path).read()
    # one-element tuple pointer (does not compile on Triton 3.6) -> plain pointer
    text = re.sub(r"=\s*\((\w+_ptr\s*\+[^,()]*),\)", r"= \1", text)
    open(path, "w").write(text)
    sys.path.insert(0, tmp)
    from fsa.ops.FSA_topk_sparse_attention import FSA_topk_sparse_attention

    return FSA_topk_sparse_attention


def load_nsa_ref():
    sys.path.insert(0, os.path.join(PEERS, "nsa_ref"))
    from native_sparse_attention.ops.triton.topk_sparse_attention import topk_sparse_attention

    return topk_sparse_attention


def load_fla():
    from fla.ops.nsa import parallel_nsa

    return parallel_nsa


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="bench_nsa.json")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ts", help="comma list of sequence lengths (overrides the defaults)")
    ap.add_argument("--gs", help="comma list of GQA group sizes (overrides the defaults)")
    ap.add_argument(
        "--impls",
        help="comma list of implementations to run (longattn, fsa, nsa_ref, fla, "
        "longattn_nsa_attn, sdpa_causal; default: all)",
    )
    args = ap.parse_args()
    t_start = time.time()
    records: list[dict] = []

    def save():
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)

    from longattn.ops import nsa as N

    dev = torch.device(args.device)
    if dev.type == "cuda":
        from triton.testing import do_bench

        def timeit(fn):
            return do_bench(fn, warmup=10, rep=40)
    else:

        def timeit(fn):
            fn()
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3

    peers = {}
    for name, loader in (("fsa", load_fsa), ("nsa_ref", load_nsa_ref), ("fla", load_fla)):
        try:
            peers[name] = loader() if dev.type == "cuda" else None
            if peers[name] is None:
                raise RuntimeError("peers run on CUDA only")
        except Exception as e:  # recorded, never fatal
            peers[name] = e
    dtype, D, bs, n, Hkv = torch.bfloat16, 128, 64, 16, 4
    if dev.type == "cpu":
        Ts, Gs = [512], [1, 4]
    elif args.quick:
        Ts, Gs = [8192, 65536], [1, 16]
    else:
        Ts, Gs = [8192, 32768, 65536], [1, 2, 4, 8, 16]
    if args.ts:
        Ts = [int(x) for x in args.ts.split(",")]
    if args.gs:
        Gs = [int(x) for x in args.gs.split(",")]
    wanted = set(args.impls.split(",")) if args.impls else set()

    def over():
        return time.time() - t_start > args.budget_s

    for T in Ts:
        idx = block_indices(T, Hkv, n, bs, dev)
        idx_peer = idx[0].permute(1, 0, 2).contiguous()  # [Hkv, T, n]
        cu = torch.tensor([0, T], dtype=torch.int32, device=dev)
        for G in Gs:
            if over():
                break
            Hq = G * Hkv
            q = torch.randn(1, T, Hq, D, device=dev, dtype=dtype, requires_grad=True)
            k = torch.randn(1, T, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
            v = torch.randn(1, T, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
            do = torch.randn(1, T, Hq, D, device=dev, dtype=dtype)
            # forward FLOPs: 2 products of (selected keys) x D per query head
            sel = (idx >= 0).sum().item() * bs * G  # upper bound (ignores the causal tail)
            flops = {"fwd": 4.0 * sel * D, "bwd": 10.0 * sel * D}
            impls = {
                "longattn": lambda: N.nsa_selected_attn(q, k, v, idx, block_size=bs),  # noqa: B023
            }
            for name in ("fsa", "nsa_ref"):
                fn = peers[name]
                if not isinstance(fn, Exception):
                    impls[name] = lambda fn=fn, q=q, k=k, v=v, i=idx_peer, cu=cu: fn(
                        q[0], k[0], v[0], i, bs, cu
                    )[None]
                else:
                    impls[name] = fn
            fla = peers["fla"]
            if isinstance(fla, Exception):
                impls["fla"] = fla
            else:
                idx_long = idx.long()
                impls["fla"] = lambda fla=fla, q=q, k=k, v=v, i=idx_long: fla(
                    q, k, v, block_indices=i, block_counts=n, block_size=bs
                )
            for impl, fn in impls.items():
                if wanted and impl not in wanted:
                    continue
                base = {"op": "nsa_selected_attn", "impl": impl, "T": T, "G": G, "Hkv": Hkv,
                        "D": D, "block_size": bs, "topk": n, "dtype": "bfloat16"}  # fmt: skip
                if isinstance(fn, Exception):
                    records.append({**base, "direction": "fwd", "error": err_str(fn)})
                    save()
                    continue
                try:
                    ms = timeit(lambda fn=fn: fn())
                    records.append({**base, "direction": "fwd", "ms": ms,
                                    "tflops": flops["fwd"] / ms / 1e9})  # fmt: skip
                    o = fn()
                    ms = timeit(
                        lambda o=o: torch.autograd.grad(o, (q, k, v), do, retain_graph=True)  # noqa: B023
                    )
                    records.append({**base, "direction": "bwd", "ms": ms,
                                    "tflops": flops["bwd"] / ms / 1e9})  # fmt: skip
                    del o
                except Exception as e:
                    traceback.print_exc()
                    records.append({**base, "direction": "fwd/bwd", "error": err_str(e)})
                print(records[-1], flush=True)
                save()
        # full layer: nsa_attn (three branches, given indices) vs dense causal sdpa
        if over():
            break
        if wanted and not wanted & {"longattn_nsa_attn", "sdpa_causal"}:
            continue
        G = 16
        Hq = G * Hkv
        q = torch.randn(1, T, Hq, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, T, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, T, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        C = (T - 32) // 16 + 1
        kc = torch.randn(1, C, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        vc = torch.randn(1, C, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        gates = [torch.rand(1, T, Hq, device=dev, dtype=dtype, requires_grad=True) for _ in "abc"]
        do = torch.randn(1, T, Hq, D, device=dev, dtype=dtype)

        def layer():
            o = N.nsa_attn(q, k, v, *gates, k_cmp=kc, v_cmp=vc, block_indices=idx,  # noqa: B023
                           window_size=512)  # fmt: skip
            return torch.autograd.grad(o, (q, k, v, kc, vc, *gates), do)  # noqa: B023

        def dense():
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # noqa: B023
            o = torch.nn.functional.scaled_dot_product_attention(
                qt, kt, vt, is_causal=True, enable_gqa=True
            )
            return torch.autograd.grad(o, (q, k, v), do.transpose(1, 2))  # noqa: B023

        for impl, fn in (("longattn_nsa_attn", layer), ("sdpa_causal", dense)):
            if wanted and impl not in wanted:
                continue
            base = {"op": "nsa_layer", "impl": impl, "T": T, "G": G, "Hkv": Hkv, "D": D,
                    "dtype": "bfloat16", "direction": "fwd+bwd"}  # fmt: skip
            try:
                records.append({**base, "ms": timeit(fn)})
            except Exception as e:
                traceback.print_exc()
                records.append({**base, "error": err_str(e)})
            print(records[-1], flush=True)
            save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())

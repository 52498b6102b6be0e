#!/usr/bin/env python3
"""Small NSA selection-stage workload for compute-sanitizer (memcheck, racecheck) on CUDA.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_nsa_selection.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_nsa_selection.py

Cases (bf16 and float32): nsa_compress mean / linear / linear + pe, forward and backward
(dx, dW, dpe), batched with a ragged tail and varlen with sequences shorter than the window;
nsa_topk_blocks for G = 1, 3 (shared-memory head reduction), 4 and 16, batched and varlen,
including tokens that see no window. Every result is checked against the float64 reference
(topk: exact equality outside near-tied rows). Exit status 1 when a case raised or missed its
tolerance. `--cpu` runs the same cases on the CPU (a check of this script).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sanitize_common import Cases, rel, workload_device

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> int:
    from longattn.ops import nsa as N
    from longattn.reference import nsa as R
    from test_nsa_selection import compressed_lse, topk_fast

    dev = workload_device()
    cases = Cases(dev)
    torch.manual_seed(0)

    for dtype in (torch.bfloat16, torch.float32):
        dn = str(dtype).removeprefix("torch.")
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5

        def compress(mode, cu, dtype=dtype):
            B = 1 if cu is not None else 2
            T, H, D, ks, kd = 150, 2, 32, 16, 8
            x = torch.randn(B, T, H, D, dtype=torch.float64).to(dtype)
            w = (torch.randn(H, ks * D, 48, dtype=torch.float64) / 20).to(dtype)
            pe = torch.randn(H, ks, D, dtype=torch.float64).to(dtype)
            w = w if mode != "mean" else None
            pe = pe if mode == "linear_pe" else None
            leaves = [t for t in (x, w, pe) if t is not None]
            dl = [t.to(dev).requires_grad_() for t in leaves]
            rl = [t.double().requires_grad_() for t in leaves]
            args = lambda ls: dict(  # noqa: E731
                weight=ls[1] if w is not None else None,
                pe=ls[2] if pe is not None else None,
            )
            cud = None if cu is None else cu.to(dev)
            out, _ = N.nsa_compress(dl[0], kernel_size=ks, kernel_stride=kd, cu_seqlens=cud,
                                    **args(dl))  # fmt: skip
            ref, _ = R.nsa_compress_reference(rl[0], kernel_size=ks, kernel_stride=kd,
                                              cu_seqlens=cu, **args(rl))  # fmt: skip
            do = torch.randn(ref.shape, dtype=torch.float64)
            g = torch.autograd.grad((out * do.to(dev, dtype)).sum(), dl)
            gr = torch.autograd.grad((ref * do).sum(), rl)
            errs = {"out": rel(out, ref)}
            for name, a, b in zip(("dx", "dw", "dpe"), g, gr, strict=False):
                errs[name] = rel(a, b)
            return errs

        def topk(G, cu, dtype=dtype):
            B = 1 if cu is not None else 2
            T, Hkv, D, ks, kd, bk, n = 260, 2, 64, 16, 8, 32, 5
            q = torch.randn(B, T, G * Hkv, D, dtype=torch.float64).to(dtype)
            k = torch.randn(B, T, Hkv, D, dtype=torch.float64).to(dtype)
            kc, _ = R.nsa_compress_reference(k.double(), kernel_size=ks, kernel_stride=kd,
                                             cu_seqlens=cu)  # fmt: skip
            kc = kc.to(dtype)
            scale = D**-0.5
            lse = compressed_lse(q, kc, ks, kd, scale, cu).float()
            cud = None if cu is None else cu.to(dev)
            got = N.nsa_topk_blocks(q.to(dev), kc.to(dev), lse.to(dev), kernel_size=ks,
                                    kernel_stride=kd, block_size=bk, topk=n, init_blocks=1,
                                    local_blocks=1, scale=scale, cu_seqlens=cud).cpu()  # fmt: skip
            want, tie = topk_fast(q, kc, lse, ks, kd, bk, n, 1, 1, scale, cu)
            bad = ((got != want).any(-1) & ~tie).sum().item()
            return {"wrong_rows": float(bad)}

        cu = torch.tensor([0, 7, 7, 90, 150], dtype=torch.int32)
        for mode in ("mean", "linear", "linear_pe"):
            cases.check(f"{dn} compress {mode} batched", lambda m=mode: compress(m, None), tol)
            cases.check(f"{dn} compress {mode} varlen", lambda m=mode, cu=cu: compress(m, cu), tol)
        cu2 = torch.tensor([0, 3, 70, 200, 260], dtype=torch.int64)
        for G in (1, 3, 4, 16):
            cases.check(f"{dn} topk G={G} batched", lambda G=G: topk(G, None), 0.0)
            cases.check(f"{dn} topk G={G} varlen", lambda G=G, cu2=cu2: topk(G, cu2), 0.0)

    return cases.exit_status()


if __name__ == "__main__":
    sys.exit(main())

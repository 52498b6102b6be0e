#!/usr/bin/env python3
"""A small NSA attention workload for compute-sanitizer (memcheck, racecheck) on CUDA.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_nsa.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_nsa.py

Every kernel direction (forward, backward) of every branch: sliding window, compressed (batch
and varlen), selected attention in both loop orders (KV-outer at G = 2, query-outer at G = 16),
block sizes 32 and 128 (two key tiles per block), with block counts and −1 / future entries,
in bf16 and float32, each checked against the float64 reference. Exit status 1 when a case
raised or missed its tolerance. `--cpu` runs the same cases on the CPU (a check of this script).
"""

from __future__ import annotations

import os
import sys

import torch
from sanitize_common import Cases, rel, workload_device


def main():
    from longattn.ops import nsa as N
    from longattn.reference import nsa as R

    dev = workload_device()
    cases = Cases(dev)
    torch.manual_seed(0)

    def indices(B, T, Hkv, n, bs):
        out = torch.full((B, T, Hkv, n), -1, dtype=torch.int32)
        for t in range(T):
            nb = t // bs + 1
            for g in range(Hkv):
                sel = torch.randperm(nb)[: min(n - 1, nb)]
                out[:, t, g, : sel.numel()] = sel.sort().values.to(torch.int32)
                if t % 5 == 0:
                    out[:, t, g, -1] = nb + 2  # a future block: skipped
        return out

    only = os.environ.get("SANITIZE_ONLY", "")  # a substring of the case names to keep

    def case(name, fn_ker, fn_ref, inputs, dtype):
        if only not in name:
            return
        tol = 1e-5 if dtype == torch.float32 else 2e-2

        def errors():
            lo = [x.detach().to(dev, dtype).clone().requires_grad_() for x in inputs]
            hi = [x.detach().double().clone().requires_grad_() for x in inputs]
            o, o2 = fn_ker(*lo), fn_ref(*hi)
            do = torch.randn(o2.shape, dtype=torch.float64)
            o.backward(do.to(dev, dtype))
            o2.backward(do)
            errs = {"o": rel(o, o2)}
            for n, a, b in zip("qkv", lo, hi, strict=True):
                errs["d" + n] = rel(a.grad, b.grad)
            return errs

        # float32 gradients sum over G heads on 3xTF32 tensor cores (see tests/test_nsa.py)
        grad_tol = 5e-5 if dtype == torch.float32 else tol
        cases.check(f"{name} {str(dtype).removeprefix('torch.')}", errors, grad_tol, o=tol)

    for dtype in (torch.bfloat16, torch.float32):
        B, T, Hkv = 1, 150, 2
        # G = 16 with D = 128: float32 takes the query-outer kernel's single-buffer path
        for G, D in ((2, 64), (16, 64), (16, 128)):
            for bs, n in ((32, 4), (128, 2)):
                q = torch.randn(B, T, G * Hkv, D)
                k, v = torch.randn(B, T, Hkv, D), torch.randn(B, T, Hkv, D)
                idx = indices(B, T, Hkv, n, bs)
                counts = torch.randint(0, n + 1, (B, T, Hkv), dtype=torch.int32)
                case(
                    f"selected G={G} D={D} bs={bs}",
                    lambda q, k, v, idx=idx, bs=bs, c=counts: N.nsa_selected_attn(
                        q, k, v, idx.to(dev), block_size=bs, block_counts=c.to(dev)
                    ),
                    lambda q, k, v, idx=idx, bs=bs, c=counts: R.nsa_selected_attn_reference(
                        q, k, v, idx, block_size=bs, block_counts=c
                    ),
                    (q, k, v),
                    dtype,
                )
    cu = torch.tensor([0, 7, 90, 150], dtype=torch.int32)
    for dtype in (torch.bfloat16, torch.float32):
        T, D = 150, 64
        q = torch.randn(1, T, 6, D)
        k, v = torch.randn(1, T, 2, D), torch.randn(1, T, 2, D)
        idx = torch.cat([indices(1, e - s, 2, 3, 32) for s, e in ((0, 7), (7, 90), (90, 150))], 1)
        for G, qq in ((3, q), (16, torch.randn(1, T, 32, D))):
            case(
                f"selected varlen G={G}",
                lambda q, k, v, idx=idx: N.nsa_selected_attn(
                    q, k, v, idx.to(dev), block_size=32, cu_seqlens=cu.to(dev)
                ),
                lambda q, k, v, idx=idx: R.nsa_selected_attn_reference(
                    q, k, v, idx, block_size=32, cu_seqlens=cu
                ),
                (qq, k, v),
                dtype,
            )
        case(
            "window varlen",
            lambda q, k, v: N.sliding_window_attn(q, k, v, window_size=20, cu_seqlens=cu.to(dev)),
            lambda q, k, v: R.sliding_window_attn_reference(q, k, v, window_size=20, cu_seqlens=cu),
            (q, k, v),
            dtype,
        )
        case(
            "window batch",
            lambda q, k, v: N.sliding_window_attn(q, k, v, window_size=70),
            lambda q, k, v: R.sliding_window_attn_reference(q, k, v, window_size=70),
            (torch.randn(2, 130, 4, D), torch.randn(2, 130, 4, D), torch.randn(2, 130, 4, 32)),
            dtype,
        )
        kc = torch.randn(1, 7, 2, D)  # windows of l = 16, d = 8 over T = 70
        case(
            "compressed batch",
            lambda q, k, v: N.nsa_compressed_attn(
                q, k, v, kernel_size=16, kernel_stride=8, return_lse=False
            ),
            lambda q, k, v: R.nsa_compressed_attn_reference(
                q, k, v, kernel_size=16, kernel_stride=8
            )[0],
            (torch.randn(1, 70, 4, D), kc, torch.randn(1, 7, 2, D)),
            dtype,
        )
        kcv, _ = R.nsa_compress_reference(k, kernel_size=16, kernel_stride=8, cu_seqlens=cu)
        case(
            "compressed varlen",
            lambda q, k, v: N.nsa_compressed_attn(
                q, k, v, kernel_size=16, kernel_stride=8, cu_seqlens=cu.to(dev), return_lse=True
            )[0],
            lambda q, k, v: R.nsa_compressed_attn_reference(
                q, k, v, kernel_size=16, kernel_stride=8, cu_seqlens=cu
            )[0],
            (q, kcv, torch.randn_like(kcv)),
            dtype,
        )
    return cases.exit_status()


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""A small rat_attn workload for compute-sanitizer (memcheck, racecheck) on CUDA.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_rat.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_rat.py

Cases (forward + backward, each checked against the float64 per-token reference, so an unwritten
or wrong element shows up too): bf16 and float32 at L = 16 (tiles of whole chunks), L = 3 (tiles
that do not start at a multiple of 64), L = 100 (sub-tiles inside a chunk: the carries and the
reverse scan across sub-tiles), D = 40 (padded head dim), NoPE, g in bf16, varlen with an empty
and a one-token sequence, stride-0 grouped keys.  Decode cases (one ``rat_continue`` step, the
fused ``rat_decode`` kernel on CUDA, against the float64 PyTorch path on the same cache): bf16
and float32, C = 0 and C > 0, a fresh chunk, mid-chunk and chunk-completing steps, few rows with
C = 300 (split over CTAs and combined), D = 36 (scalar loads); the state capacity is exactly what
the step needs, so a read past C is out of bounds.  Exit status 1 when a case raised or missed its
tolerance; the sanitizer's own verdict is its 'ERROR SUMMARY' line.  `--cpu` runs the same cases
on the CPU (a check of this script, no sanitizer).
"""

from __future__ import annotations

import sys

import torch
from sanitize_common import Cases, rel, workload_device


def main() -> int:
    from longattn import rat_attn
    from longattn.reference.rat import rat_attn_reference

    dev = workload_device()
    cases = Cases(dev)
    torch.manual_seed(0)

    def run(name, B, T, H, D, L, dtype, g_dtype=torch.float32, rope=10000.0, cu=None, group=0):
        tol_y = 1e-5 if dtype == torch.float32 else 2e-2
        tol_g = 1e-4 if dtype == torch.float32 else 2e-2

        def errors():
            q = torch.randn(B, T, H, D, device=dev).to(dtype).requires_grad_()
            hk = group or H
            k0 = torch.randn(B, T, hk, D, device=dev).to(dtype).requires_grad_()
            v = torch.randn(B, T, H, D, device=dev).to(dtype).requires_grad_()
            g = torch.sigmoid(torch.randn(B, T, H, D, device=dev) + 1).to(g_dtype).requires_grad_()
            k = k0.expand(B, T, H, D) if group else k0
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=dev)
            kw = {"chunk_size": L, "rope_theta": rope, "cu_seqlens": cu_t}
            dy = torch.randn(B, T, H, D, device=dev)
            y = rat_attn(q, k, v, g, **kw)
            grads = torch.autograd.grad(y, (q, k0, v, g), dy.to(dtype))
            d64 = [t.detach().double().requires_grad_() for t in (q, k0, v, g)]
            k64 = d64[1].expand(B, T, H, D) if group else d64[1]
            yr = rat_attn_reference(d64[0], k64, d64[2], d64[3], **kw)
            grads_r = torch.autograd.grad(yr, d64, dy.double())
            errs = {"y": rel(y, yr)}
            for n, a, b in zip("qkvg", grads, grads_r, strict=True):
                errs["d" + n] = rel(a, b)
            return errs

        cases.check(name, errors, tol_g, y=tol_y)

    def run_decode(name, B, H, D, L, C, offset, dtype):
        from longattn.nn.rat import RATCache, rat_continue

        def errors():
            cap = max(C + (offset == L - 1), 1)
            cache = RATCache._zeros(B, H, D, dtype=dtype, device=dev, capacity=cap)
            cache.k_store.copy_(torch.randn(B, H, cap, D, device=dev))
            cache.v_store.copy_(torch.randn(B, H, cap, D, device=dev))
            cache.k_run.copy_(torch.randn(B, H, D, device=dev))
            cache.v_run.copy_(torch.randn(B, H, D, device=dev))
            cache.seen, cache.num_chunks = C * L + offset, C
            tensors = (cache.k_store, cache.v_store, cache.k_run, cache.v_run)
            ref = RATCache(
                *(t.double().cpu() for t in tensors),
                cache.seen,
                cache.num_chunks,
            )
            q, k, v = (torch.randn(B, 1, H, D, device=dev).to(dtype) for _ in range(3))
            g = torch.sigmoid(torch.randn(B, 1, H, D, device=dev) + 1)
            y, cache = rat_continue(q, k, v, g, cache, chunk_size=L)
            yr, ref = rat_continue(*(t.double().cpu() for t in (q, k, v, g)), ref, chunk_size=L)
            errs = {"y": rel(y, yr), "k_run": rel(cache.k_run, ref.k_run)}
            if offset == L - 1:
                errs["appended"] = rel(cache.k_store[:, :, C], ref.k_store[:, :, C])
            return errs

        cases.check(name, errors, 1e-5 if dtype == torch.float32 else 2e-2)

    bf16, f32 = torch.bfloat16, torch.float32
    run("bf16 L16 D64", 2, 150, 2, 64, 16, bf16)
    run("f32 L16 D64", 1, 150, 2, 64, 16, f32)
    run("f32 L3 D40", 1, 141, 2, 40, 3, f32)
    run("bf16 L100 D128", 1, 230, 2, 128, 100, bf16)
    run("f32 L100 D32 NoPE", 1, 230, 2, 32, 100, f32, rope=None)
    run("f16 L1 D64 g-f16", 1, 70, 2, 64, 1, torch.float16, g_dtype=torch.float16)
    run("bf16 L16 varlen", 1, 120, 2, 64, 16, bf16, cu=[0, 5, 5, 101, 102, 120])
    run("f32 L100 varlen", 1, 260, 2, 32, 100, f32, cu=[0, 70, 259, 260])
    run("bf16 L16 grouped", 2, 90, 4, 64, 16, bf16, group=1)
    run_decode("decode bf16 C0 fresh", 3, 4, 128, 16, 0, 0, bf16)
    run_decode("decode f32 C0 completing", 3, 4, 64, 16, 0, 15, f32)
    run_decode("decode bf16 C5 mid-chunk", 3, 4, 128, 16, 5, 7, bf16)
    run_decode("decode f32 C300 split completing", 1, 2, 128, 16, 300, 15, f32)
    run_decode("decode bf16 C300 split mid-chunk", 1, 2, 128, 16, 300, 3, bf16)
    run_decode("decode bf16 L1 C40 D36", 2, 2, 36, 1, 40, 0, bf16)
    return cases.exit_status()


if __name__ == "__main__":
    sys.exit(main())

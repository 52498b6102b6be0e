#!/usr/bin/env python3
"""A small landmark-attention workload for compute-sanitizer (memcheck, racecheck) on CUDA.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_landmark.py
    compute-sanitizer --tool racecheck python3 benchmarks/sanitize_landmark.py

Runs every kernel (forward, dQ, dK/dV, top-k) in bf16 and float32 (f16 once): a ragged tail
(T not a multiple of the block), tiny blocks (many blocks per key tile), block 51 and 64, blocks
of several key tiles (100, 128: a statistics pass per block; also varlen and retrieval), Tk > Tq,
GQA, a padded head dim, varlen (cu_seqlens with an empty sequence), retrieval (block_indices
with -1 entries) and a one-token retrieval decode. Each case is checked against the float64
reference, so an unwritten or wrong element shows up too. Exit status 1 when a case raised or
missed its tolerance; the sanitizer's verdict is its 'ERROR SUMMARY' line. `--cpu` runs the same
cases on the CPU (a check of this script, no sanitizer).
"""

from __future__ import annotations

import sys

import torch
from sanitize_common import Cases, rel, workload_device


def main() -> int:
    from longattn import landmark_attn, landmark_topk_blocks
    from longattn.reference.landmark import (
        landmark_attn_reference,
        landmark_topk_blocks_reference,
    )

    dev = workload_device()
    cases = Cases(dev)
    torch.manual_seed(0)

    def attn_case(name, B, Tq, Tk, Hq, Hkv, D, bs, dtype, idx=False, cu=None, grad=True):
        def run():
            q = torch.randn(B, Tq, Hq, D).to(dev, dtype).requires_grad_(grad)
            k = torch.randn(B, Tk, Hkv, D).to(dev, dtype).requires_grad_(grad)
            v = torch.randn(B, Tk, Hkv, D).to(dev, dtype).requires_grad_(grad)
            bi = None
            if idx:
                nb = Tk // bs + 1
                bi = torch.randint(-1, nb + 1, (B, Tq, Hkv, 3), dtype=torch.int32).to(dev)
            cuv = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=dev)
            o = landmark_attn(q, k, v, block_size=bs, block_indices=bi, cu_seqlens=cuv)
            q64, k64, v64 = (x.detach().cpu().double().requires_grad_(grad) for x in (q, k, v))
            ref = landmark_attn_reference(
                q64, k64, v64, block_size=bs,
                block_indices=None if bi is None else bi.cpu(),
                cu_seqlens=None if cuv is None else cuv.cpu(),
            )  # fmt: skip
            errs = {"o": rel(o, ref)}
            if grad:
                go = torch.randn(o.shape).to(dev, dtype)
                gs = torch.autograd.grad(o, (q, k, v), go)
                rg = torch.autograd.grad(ref, (q64, k64, v64), go.cpu().double())
                errs.update({n: rel(g, r) for n, g, r in zip("qkv", gs, rg, strict=True)})
            return errs

        tol = 2e-5 if dtype == torch.float32 else 2.5e-2
        cases.check(name, run, tol)

    def topk_case(name, dtype):
        def run():
            q = torch.randn(1, 40, 4, 32).to(dev, dtype)
            k = torch.randn(1, 60, 2, 32).to(dev, dtype)
            got = landmark_topk_blocks(q, k, block_size=6, topk=3)
            ref = landmark_topk_blocks_reference(q.cpu(), k.cpu(), block_size=6, topk=3)
            cu = torch.tensor([0, 17, 40], dtype=torch.int64, device=dev)
            got2 = landmark_topk_blocks(q, k[:, :40], block_size=4, topk=2, cu_seqlens=cu)
            ref2 = landmark_topk_blocks_reference(
                q.cpu(), k[:, :40].cpu(), block_size=4, topk=2, cu_seqlens=cu.cpu()
            )
            bad = int((got.cpu() != ref).sum()) + int((got2.cpu() != ref2).sum())
            return {"mismatches": float(bad)}

        cases.check(name, run, 0.5)

    def decode_case(name, dtype):
        def run():
            bs, T = 16, 150
            q = torch.randn(1, 1, 4, 64).to(dev, dtype)
            k = torch.randn(1, T, 2, 64).to(dev, dtype)
            v = torch.randn(1, T, 2, 64).to(dev, dtype)
            idx = landmark_topk_blocks(q, k, block_size=bs, topk=3)
            o = landmark_attn(q, k, v, block_size=bs, block_indices=idx)
            ref = landmark_attn_reference(
                q.cpu().double(), k.cpu().double(), v.cpu().double(), block_size=bs,
                block_indices=idx.cpu(),
            )  # fmt: skip
            return {"o": rel(o, ref)}

        cases.check(name, run, 2e-5 if dtype == torch.float32 else 2e-2)

    bf16, f32, f16 = torch.bfloat16, torch.float32, torch.float16
    for dt, tag in ((bf16, "bf16"), (f32, "f32")):
        attn_case(f"{tag} ragged bs64 gqa", 1, 150, 150, 4, 2, 64, 64, dt)
        attn_case(f"{tag} bs51 Tk>Tq D128", 1, 70, 130, 2, 1, 128, 51, dt)
        attn_case(f"{tag} tiny blocks D40", 1, 45, 45, 2, 2, 40, 3, dt)
        attn_case(f"{tag} varlen", 1, 140, 140, 2, 1, 32, 8, dt, cu=[0, 9, 9, 100, 140])
        attn_case(f"{tag} retrieval", 2, 90, 90, 2, 1, 64, 8, dt, idx=True)
        attn_case(f"{tag} retrieval bs40", 1, 170, 170, 2, 1, 64, 40, dt, idx=True)
        attn_case(f"{tag} bs100 gqa Tk>Tq", 1, 230, 310, 4, 2, 64, 100, dt)
        attn_case(f"{tag} bs128 D128", 1, 300, 300, 2, 1, 128, 128, dt)
        attn_case(f"{tag} bs100 retrieval", 1, 330, 330, 2, 1, 64, 100, dt, idx=True)
        topk_case(f"{tag} topk", dt)
        decode_case(f"{tag} retrieval decode", dt)
    attn_case("f16 bs5", 1, 60, 60, 2, 1, 64, 5, f16)
    attn_case("bf16 bs128 varlen", 1, 420, 420, 2, 1, 32, 128, bf16, cu=[0, 50, 50, 320, 420])
    return cases.exit_status()


if __name__ == "__main__":
    sys.exit(main())

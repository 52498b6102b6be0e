#!/usr/bin/env python3
"""A small workload of the Hopper attention engine (the sm_90a forwards of landmark_attn,
sliding_window_attn and the NSA compressed branch, and the backward of the last two) for
compute-sanitizer (memcheck, racecheck, synccheck):

    compute-sanitizer --tool racecheck --kernel-name kns=_sm90 python3 benchmarks/sanitize_engine.py

Every engine variant's shape class once, bf16 and f16: ragged row tiles, every compile-time block
size (16, 32, 51, 64, 128), retrieval, varlen with empty and one-token sequences, Tk > Tq, GQA,
head dims 64 and 128; windows inside and across tiles. Each case is checked against the float64
reference and must have run on the engine (on a Hopper GPU). Exit status 1 on any failure.
"""

from __future__ import annotations

import os
import sys

import torch
from sanitize_common import Cases, rel

os.environ["LONGATTN_FORCE_SM80"] = "0"
os.environ["LONGATTN_SM90"] = "1"  # the engine (off by default until run on a GPU)
os.environ["LONGATTN_LANDMARK_SM90"] = "1"  # the engine's landmark policy is opt-in


def main() -> int:
    from longattn import _native, landmark_attn, nsa_compressed_attn, sliding_window_attn
    from longattn.reference.landmark import landmark_attn_reference
    from longattn.reference.nsa import (
        nsa_compressed_attn_reference,
        sliding_window_attn_reference,
    )

    torch.manual_seed(0)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    cases = Cases(torch.device("cuda"))

    def check(name, run):
        """run() returns the largest relative error; on a Hopper GPU the engine must have run."""
        before = _native.sm90_launch_count()

        def errors():
            err = run()
            off_engine = hopper and _native.sm90_launch_count() == before
            return {"rel": err, "off_engine": float(off_engine)}

        cases.check(name, errors, 2e-2, off_engine=0.0)

    def lm(B, Tq, Tk, Hq, Hkv, D, bs, dtype, idx=False, cu=None):
        q = torch.randn(B, Tq, Hq, D).to("cuda", dtype)
        k = torch.randn(B, Tk, Hkv, D).to("cuda", dtype)
        v = torch.randn(B, Tk, Hkv, D).to("cuda", dtype)
        bi = None
        if idx:
            bi = torch.randint(-1, Tk // bs + 1, (B, Tq, Hkv, 3), dtype=torch.int32).cuda()
        cuv = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
        o = landmark_attn(q, k, v, block_size=bs, block_indices=bi, cu_seqlens=cuv)
        ref = landmark_attn_reference(
            q.double(), k.double(), v.double(), block_size=bs, block_indices=bi, cu_seqlens=cuv
        )
        return rel(o, ref)

    def win(T, Hq, Hkv, D, W, dtype, cu=None):
        x = [torch.randn(1, T, h, D).to("cuda", dtype).requires_grad_() for h in (Hq, Hkv, Hkv)]
        x64 = [t.detach().double().requires_grad_() for t in x]
        cuv = None if cu is None else torch.tensor(cu, dtype=torch.int32, device="cuda")
        o = sliding_window_attn(*x, window_size=W, cu_seqlens=cuv)
        ref = sliding_window_attn_reference(*x64, window_size=W, cu_seqlens=cuv)
        do = torch.randn_like(ref)
        grads = torch.autograd.grad(o, x, do.to(dtype))
        refs = torch.autograd.grad(ref, x64, do)
        return max(rel(a, b) for a, b in zip((o, *grads), (ref, *refs), strict=True))

    def cmp(T, Hq, Hkv, D, ks, d, dtype, cu=None):
        cuv = None if cu is None else torch.tensor(cu, dtype=torch.int64, device="cuda")
        C = (
            (T - ks) // d + 1
            if cu is None
            else sum(max(0, (b - a - ks) // d + 1) for a, b in zip(cu[:-1], cu[1:], strict=True))
        )
        x = [
            torch.randn(1, n, h, D).to("cuda", dtype).requires_grad_()
            for n, h in ((T, Hq), (C, Hkv), (C, Hkv))
        ]
        x64 = [t.detach().double().requires_grad_() for t in x]
        o = nsa_compressed_attn(
            *x, kernel_size=ks, kernel_stride=d, cu_seqlens=cuv, return_lse=False
        )
        ref = nsa_compressed_attn_reference(*x64, kernel_size=ks, kernel_stride=d, cu_seqlens=cuv)[
            0
        ]
        do = torch.randn_like(ref)
        grads = torch.autograd.grad(o, x, do.to(dtype))
        refs = torch.autograd.grad(ref, x64, do)
        return max(rel(a, b) for a, b in zip((o, *grads), (ref, *refs), strict=True))

    bf16, f16 = torch.bfloat16, torch.float16
    for pingpong in ("0", "1"):  # the forward's two consumer schedules
        os.environ["LONGATTN_SM90_PINGPONG"] = pingpong
        run_cases(check, lm, win, cmp, bf16, f16)
    return cases.exit_status()


def run_cases(check, lm, win, cmp, bf16, f16):
    for bs in (16, 32, 51, 64, 128):
        check(f"landmark bs {bs}", lambda bs=bs: lm(1, 300, 300, 2, 1, 128, bs, bf16))
    check("landmark D 64 f16 Tk > Tq", lambda: lm(2, 150, 230, 2, 2, 64, 64, f16))
    check("landmark retrieval", lambda: lm(1, 270, 270, 2, 1, 64, 32, bf16, idx=True))
    check(
        "landmark varlen", lambda: lm(1, 333, 333, 2, 1, 64, 51, bf16, cu=[0, 70, 71, 71, 200, 333])
    )
    check("window GQA", lambda: win(300, 8, 2, 128, 100, bf16))
    check("window D 64 f16", lambda: win(200, 2, 2, 64, 512, f16))
    check("window varlen", lambda: win(333, 4, 2, 64, 64, bf16, cu=[0, 70, 71, 71, 200, 333]))
    check("compressed GQA", lambda: cmp(400, 8, 2, 128, 32, 16, bf16))
    check("compressed varlen f16", lambda: cmp(300, 2, 2, 64, 16, 8, f16, cu=[0, 10, 11, 150, 300]))


if __name__ == "__main__":
    sys.exit(main())

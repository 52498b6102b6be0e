#!/usr/bin/env python3
"""A small lightning-attention workload for compute-sanitizer (memcheck, racecheck) on CUDA.

    compute-sanitizer --tool memcheck python3 benchmarks/sanitize_lightning.py

Runs, in bf16 and float32: forward + backward at B=1, T=200, H=2, D=64, E=32 (several blocks
and a ragged tail) without and with an initial/final state, a varlen call (cu_seqlens, one
sequence shorter than a block), and a T=1 decode step with a state.  Each case is checked against
a float64 token recurrence, so an unwritten or wrong element shows up too.  Exit status 1 when a
case raised or missed its tolerance; the sanitizer's own verdict is its 'ERROR SUMMARY' line.
`--cpu` runs the same cases on the CPU (a check of this script, no sanitizer).
"""

from __future__ import annotations

import sys

import torch
from sanitize_common import Cases, rel, workload_device


def reference(q, k, v, s, scale, h0):
    """float64 token recurrence: S_t = exp(-s) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t."""
    q, k, v = (x.detach().double() for x in (q, k, v))
    B, T, H, D = q.shape
    E = v.shape[-1]
    lam = torch.exp(-s.detach().double())[None, :, None, None]
    S = h0.detach().double().clone() if h0 is not None else q.new_zeros(B, H, D, E)
    o = q.new_zeros(B, T, H, E)
    for t in range(T):
        S = lam * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        o[:, t] = scale * torch.einsum("bhd,bhde->bhe", q[:, t], S)
    return o, S


def main():
    import longattn

    dev = workload_device()
    cases = Cases(dev)
    torch.manual_seed(0)
    B, T, H, D, E = 1, 200, 2, 64, 32
    slopes = longattn.lightning_slopes(H).to(dev, torch.float32)
    scale = D**-0.5

    for dtype in (torch.bfloat16, torch.float32):
        tol = 2e-2 if dtype == torch.bfloat16 else 2e-3
        dn = str(dtype).removeprefix("torch.")

        def mk(*shape, dtype=dtype, scale=1.0):
            return (torch.randn(*shape, device=dev) * scale).to(dtype).requires_grad_()

        def train(with_state, dtype=dtype):
            q, k = mk(B, T, H, D, scale=0.5), mk(B, T, H, D, scale=0.5)
            v = mk(B, T, H, E)
            h0 = mk(B, H, D, E, dtype=torch.float32, scale=0.1) if with_state else None
            o, sT = longattn.lightning_attn(
                q, k, v, slopes, scale=scale, initial_state=h0, output_final_state=with_state
            )
            do = torch.randn_like(o)
            loss = (o.float() * do.float()).sum()
            if with_state:
                loss = loss + (sT * torch.randn_like(sT)).sum()
            wrt = [q, k, v] + ([h0] if with_state else [])
            torch.autograd.grad(loss, wrt)
            o_ref, s_ref = reference(q, k, v, slopes, scale, h0)
            errs = {"o": rel(o, o_ref)}
            if with_state:
                errs["final_state"] = rel(sT, s_ref)
            return errs

        def varlen(dtype=dtype):
            cu = torch.tensor([0, 37, 200], device=dev, dtype=torch.int32)
            q, k = mk(1, T, H, D, scale=0.5), mk(1, T, H, D, scale=0.5)
            v = mk(1, T, H, E)
            h0 = mk(2, H, D, E, dtype=torch.float32, scale=0.1)
            o, sT = longattn.lightning_attn(
                q,
                k,
                v,
                slopes,
                scale=scale,
                initial_state=h0,
                output_final_state=True,
                cu_seqlens=cu,
            )
            torch.autograd.grad((o.float() * torch.randn_like(o).float()).sum(), [q, k, v, h0])
            errs = {}
            for i, (a, b) in enumerate(((0, 37), (37, 200))):
                o_ref, s_ref = reference(
                    q[:, a:b], k[:, a:b], v[:, a:b], slopes, scale, h0[i : i + 1]
                )
                errs[f"o{i}"] = rel(o[:, a:b], o_ref)
                errs[f"state{i}"] = rel(sT[i : i + 1], s_ref)
            return errs

        def decode(dtype=dtype):
            with torch.no_grad():
                q, k = mk(B, 1, H, D, scale=0.5), mk(B, 1, H, D, scale=0.5)
                v = mk(B, 1, H, E)
                h0 = mk(B, H, D, E, dtype=torch.float32, scale=0.1)
                o, sT = longattn.lightning_attn(
                    q, k, v, slopes, scale=scale, initial_state=h0, output_final_state=True
                )
                o_ref, s_ref = reference(q, k, v, slopes, scale, h0)
                return {"o": rel(o, o_ref), "final_state": rel(sT, s_ref)}

        cases.check(f"{dn} fwd+bwd T={T} no state", lambda: train(False), tol)
        cases.check(f"{dn} fwd+bwd T={T} with state", lambda: train(True), tol)
        cases.check(f"{dn} varlen cu_seqlens=[0,37,200]", varlen, tol)
        cases.check(f"{dn} decode T=1", decode, tol)

    return cases.exit_status()


if __name__ == "__main__":
    sys.exit(main())

"""``python -m longattn check``: every op against its float64 reference on the present device.

Each case draws fresh random inputs, runs the op in the device's working dtype (float32 on the
CPU, bfloat16 on a GPU) and the reference in float64 on the CPU, and compares the output and the
input gradients of a random projection of it by relative error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import ops
from .reference import (
    landmark_attn_reference,
    lightning_attn_recurrent,
    nsa_compressed_attn_reference,
    nsa_selected_attn_reference,
    rat_attn_reference,
    sliding_window_attn_reference,
)

B, T, HQ, HKV, D = 1, 100, 4, 2, 32


@dataclass
class Case:
    name: str
    op: Callable[..., torch.Tensor]
    ref: Callable[..., torch.Tensor]
    make: Callable[[torch.Generator], dict[str, torch.Tensor]]
    differentiable: tuple[str, ...] = ("q", "k", "v")


def _qkv(gen: torch.Generator, hkv: int = HKV) -> dict[str, torch.Tensor]:
    return {
        "q": torch.randn(B, T, HQ, D, generator=gen),
        "k": torch.randn(B, T, hkv, D, generator=gen),
        "v": torch.randn(B, T, hkv, D, generator=gen),
    }


def _selection(gen: torch.Generator) -> dict[str, torch.Tensor]:
    block = torch.arange(T) // 16
    first = torch.zeros(T, dtype=torch.long)
    last = torch.where(block > 0, block, torch.full_like(block, -1))
    idx = torch.stack([first, last], dim=-1)[None, :, None, :].expand(B, T, HKV, 2)
    return {**_qkv(gen), "block_indices": idx.contiguous()}


def _compressed(gen: torch.Generator) -> dict[str, torch.Tensor]:
    windows = (T - 16) // 8 + 1
    return {
        "q": torch.randn(B, T, HQ, D, generator=gen),
        "k_cmp": torch.randn(B, windows, HKV, D, generator=gen),
        "v_cmp": torch.randn(B, windows, HKV, D, generator=gen),
    }


CASES = [
    Case(
        "lightning_attn",
        lambda x: ops.lightning.lightning_attn(x["q"], x["k"], x["v"], x["slopes"])[0],
        lambda x: lightning_attn_recurrent(x["q"], x["k"], x["v"], x["slopes"])[0],
        lambda g: {**_qkv(g, HQ), "slopes": ops.lightning.lightning_slopes(HQ)},
    ),
    Case(
        "rat_attn",
        lambda x: ops.rat.rat_attn(x["q"], x["k"], x["v"], x["g"], chunk_size=8),
        lambda x: rat_attn_reference(x["q"], x["k"], x["v"], x["g"], chunk_size=8),
        lambda g: {**_qkv(g, HQ), "g": torch.rand(B, T, HQ, D, generator=g) * 0.9 + 0.05},
        ("q", "k", "v", "g"),
    ),
    Case(
        "landmark_attn",
        lambda x: ops.landmark.landmark_attn(x["q"], x["k"], x["v"], block_size=8),
        lambda x: landmark_attn_reference(x["q"], x["k"], x["v"], block_size=8),
        _qkv,
    ),
    Case(
        "sliding_window_attn",
        lambda x: ops.nsa.sliding_window_attn(x["q"], x["k"], x["v"], window_size=16),
        lambda x: sliding_window_attn_reference(x["q"], x["k"], x["v"], window_size=16),
        _qkv,
    ),
    Case(
        "nsa_selected_attn",
        lambda x: ops.nsa.nsa_selected_attn(
            x["q"], x["k"], x["v"], x["block_indices"], block_size=16
        ),
        lambda x: nsa_selected_attn_reference(
            x["q"], x["k"], x["v"], x["block_indices"], block_size=16
        ),
        _selection,
    ),
    Case(
        "nsa_compressed_attn",
        lambda x: ops.nsa.nsa_compressed_attn(
            x["q"], x["k_cmp"], x["v_cmp"], kernel_size=16, kernel_stride=8, return_lse=False
        ),
        lambda x: nsa_compressed_attn_reference(
            x["q"], x["k_cmp"], x["v_cmp"], kernel_size=16, kernel_stride=8
        )[0],
        _compressed,
        ("q", "k_cmp", "v_cmp"),
    ),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run(case: Case, inputs: dict[str, torch.Tensor], fn, device, dtype):
    leaves = {}
    for name, t in inputs.items():
        t = t.to(device, dtype) if t.is_floating_point() and name != "slopes" else t.to(device)
        if name in case.differentiable:
            t.requires_grad_()
        leaves[name] = t
    out = fn(leaves)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad((out * weight).sum(), [leaves[n] for n in case.differentiable])
    return out, grads


def check_case(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """(forward error, worst gradient error) of one op against its float64 reference."""
    inputs = case.make(torch.Generator().manual_seed(seed))
    out, grads = _run(case, inputs, case.op, device, dtype)
    ref_out, ref_grads = _run(case, inputs, case.ref, torch.device("cpu"), torch.float64)
    grad_err = max(_rel(g, r) for g, r in zip(grads, ref_grads, strict=True))
    return _rel(out, ref_out), grad_err


def run(device: torch.device) -> bool:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    print(f"longattn check on {device}: {dtype} against float64 references, tolerance {tol:g}\n")
    print("| op | forward rel. err | gradient rel. err | result |\n|---|---|---|---|")
    ok = True
    for case in CASES:
        try:
            fwd, grad = check_case(case, device, dtype)
        except NotImplementedError as e:
            print(f"| {case.name} | – | – | not on {device.type}: {str(e).splitlines()[0][:60]} |")
            continue
        passed = fwd <= tol and grad <= tol
        ok &= passed
        print(f"| {case.name} | {fwd:.2e} | {grad:.2e} | {'pass' if passed else 'FAIL'} |")
    return ok

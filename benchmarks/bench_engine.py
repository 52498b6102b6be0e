"""The Hopper attention engine's targets, in one process: landmark_attn against torch SDPA (causal,
its default backend: cuDNN on Hopper), sliding_window_attn and the NSA compressed branch against
compiled FlexAttention with the same mask, forward and forward+backward, bf16. Each longattn op is
also timed on the sm_80 kernels (LONGATTN_FORCE_SM80=1) beside the Hopper path.

    python benchmarks/bench_engine.py [--quick] [--out bench_engine.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import longattn
import torch
import torch.nn.functional as F
from triton.testing import do_bench

os.environ["LONGATTN_SM90"] = "1"  # the engine (off by default until run on a GPU)
os.environ["LONGATTN_LANDMARK_SM90"] = "1"  # time the engine's landmark policy (opt-in)


def timed(fn, warmup=25, rep=100):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def fwd_bwd(fn, inputs):
    out = fn()
    grad = torch.randn_like(out)

    def step():
        o = fn()
        torch.autograd.grad(o, inputs, grad)

    return step


def paths(fn):
    """Times fn on the Hopper path (with and without the forward's pingpong schedule) and on the
    forced sm_80 path."""
    res = {}
    for name, force, pingpong in (
        ("sm90", "0", "0"),
        ("sm90_pingpong", "0", "1"),
        ("sm80", "1", "0"),
    ):
        os.environ["LONGATTN_FORCE_SM80"] = force
        os.environ["LONGATTN_SM90_PINGPONG"] = pingpong
        res[name] = timed(fn)
    os.environ["LONGATTN_FORCE_SM80"] = "0"
    os.environ["LONGATTN_SM90_PINGPONG"] = "0"
    return res


def causal_tflops(t, h, d, ms, passes=2):
    return passes * 2 * t * t / 2 * d * h / (ms * 1e-3) / 1e12


DEADLINE = [float("inf")]


def bf16(*shape):
    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)


def landmark_row(t, blocks, h=32, d=128):
    q, k, v = (bf16(1, t, h, d) for _ in range(3))
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    row = {"op": "landmark", "T": t, "H": h, "D": d}
    row["sdpa_fwd"] = timed(sdpa)
    row["sdpa_fwdbwd"] = timed(fwd_bwd(sdpa, (qt, kt, vt)))
    row["sdpa_fwd_tflops"] = causal_tflops(t, h, d, row["sdpa_fwd"])
    for bs in blocks:

        def lm(bs=bs):
            return longattn.landmark_attn(q, k, v, block_size=bs)

        with torch.no_grad():
            row[f"bs{bs}_fwd"] = paths(lm)
        row[f"bs{bs}_fwdbwd"] = paths(fwd_bwd(lm, (q, k, v)))
        row[f"bs{bs}_fwd_tflops"] = causal_tflops(t, h, d, row[f"bs{bs}_fwd"]["sm90"])
    return row


def window_row(flex, t, hq, hkv, w=512, d=128):
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = bf16(1, t, hq, d), bf16(1, t, hkv, d), bf16(1, t, hkv, d)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

    def band(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < w)

    mask = create_block_mask(band, 1, None, t, t, device="cuda")

    def fx():
        return flex(qt, kt, vt, block_mask=mask, enable_gqa=hq != hkv)

    def win():
        return longattn.sliding_window_attn(q, k, v, window_size=w)

    row = {"op": "window", "T": t, "Hq": hq, "Hkv": hkv, "D": d, "W": w}
    row["flex_fwd"] = timed(fx)
    row["flex_fwdbwd"] = timed(fwd_bwd(fx, (qt, kt, vt)))
    with torch.no_grad():
        row["fwd"] = paths(win)
    row["fwdbwd"] = paths(fwd_bwd(win, (q, k, v)))
    row["fwd_tflops"] = 4 * t * w * d * hq / (row["fwd"]["sm90"] * 1e-3) / 1e12
    return row


def compressed_row(flex, t, hq, hkv, ks=32, d=16, dh=128):
    """The NSA compressed branch (queries over the compressed keys whose window they have seen)
    against FlexAttention with the same visibility mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    c = (t - ks) // d + 1
    q, k, v = bf16(1, t, hq, dh), bf16(1, c, hkv, dh), bf16(1, c, hkv, dh)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))

    def seen(b, h, qi, ki):
        return qi >= ki * d + ks - 1

    mask = create_block_mask(seen, 1, None, t, c, device="cuda")

    def fx():
        return flex(qt, kt, vt, block_mask=mask, enable_gqa=hq != hkv)

    def cmp():
        return longattn.nsa_compressed_attn(
            q, k, v, kernel_size=ks, kernel_stride=d, return_lse=False
        )

    row = {"op": "compressed", "T": t, "Hq": hq, "Hkv": hkv, "D": dh, "C": c}
    row["flex_fwd"] = timed(fx)
    row["flex_fwdbwd"] = timed(fwd_bwd(fx, (qt, kt, vt)))
    with torch.no_grad():
        row["fwd"] = paths(cmp)
    row["fwdbwd"] = paths(fwd_bwd(cmp, (q, k, v)))
    pairs = sum(max(0, (i - ks + 1) // d + 1) for i in range(t))  # visible (query, key) pairs
    row["fwd_tflops"] = 4 * pairs * dh * hq / (row["fwd"]["sm90"] * 1e-3) / 1e12
    return row


def run_rows(make, shapes):
    rows = []
    for shape in shapes:
        if time.time() > DEADLINE[0]:
            print(f"out of time before {shape}", flush=True)
            break
        rows.append(make(*shape))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="bench_engine.json")
    ap.add_argument("--only", choices=("landmark", "window", "compressed"), default=None)
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no new shape after this")
    a = ap.parse_args()
    gpu = torch.cuda.get_device_name(0)
    t0 = time.time()
    DEADLINE[0] = t0 + a.budget_s
    res = {"bench": "engine", "date": time.strftime("%Y-%m-%d"), "gpu": gpu, "rows": []}
    res["torch"] = torch.__version__
    if a.only in (None, "landmark"):
        ts = [2048, 8192] if a.quick else [2048, 8192, 32768]
        res["rows"] += run_rows(landmark_row, [(t, [64, 51]) for t in ts])
    if a.only in (None, "window"):
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        ts = [16384] if a.quick else [16384, 65536]
        heads = [(32, 32), (64, 4)]
        res["rows"] += run_rows(window_row, [(flex, t, hq, hkv) for t in ts for hq, hkv in heads])
    if a.only in (None, "compressed"):
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        ts = [16384] if a.quick else [16384, 65536]
        res["rows"] += run_rows(compressed_row, [(flex, t, 64, 4) for t in ts])
    res["seconds"] = time.time() - t0
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"{gpu}: {len(res['rows'])} rows in {res['seconds']:.0f}s")


if __name__ == "__main__":
    main()

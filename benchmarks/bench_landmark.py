#!/usr/bin/env python3
"""Benchmark ``longattn.landmark_attn`` against its peers (docs/api/landmark.md,
"Performance targets").

Implementations, on the same inputs (bf16, B = 1, H = 32, D = 128, T in {2K, 8K, 32K}):

* ``longattn``: ``landmark_attn(q, k, v, block_size=bs)``, layout [B, T, H, D], bs in
  ``--blocks`` (default 64,51; e.g. ``--blocks 64,51,128`` adds a block longer than a key tile).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``,
  layout [B, H, T, D] (transposed copies made outside the timed region), default backend
  (cuDNN on the H200): dense causal attention, the speed reference of the targets.
* ``official``: the Triton kernel of epfml/landmark-attention
  (``llama/ltriton/flash_landmark_attention.py``, ``FusedLandmarkAttention.apply(q, k, v, 0,
  scale, 64)``, layout [B, H, T, D]; block 64 only, T divisible by 64), imported from
  ``<repo>/.peers/landmark`` (never committed). Import or run failures are recorded as errors.

Retrieval decode (one token, 32K context, top-k 8, block 64): ``landmark_topk_blocks`` +
``landmark_attn(..., block_indices=idx)`` over the whole cache (``retrieval_decode``; the two
parts are also timed alone) against SDPA over the full cache (``sdpa_decode``).

Directions: fwd (a training forward on inputs that require grad) and fwdbwd (forward plus
``torch.autograd.grad((o * do).sum(), [q, k, v])``). Timing: ``triton.testing.do_bench``
(median) on CUDA, a perf_counter loop on CPU. FLOPs are the nominal causal-attention count
(fwd 2·B·H·T²·D, fwdbwd 3.5× that) for every implementation. Results go to ``--out`` as JSON (a
list of records), rewritten after every measurement; the run stops starting new measurements when
``--budget-s`` is spent.

    python3 benchmarks/bench_landmark.py --out results/landmark.json --budget-s 240
    python3 benchmarks/bench_landmark.py --quick --device cpu --out /tmp/lm.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
PEER_DIR = REPO / ".peers" / "landmark"


def load_official():
    """The official FusedLandmarkAttention (or the error string)."""
    try:
        sys.path.insert(0, str(PEER_DIR / "llama" / "ltriton"))
        import flash_landmark_attention as fla  # type: ignore

        return fla.FusedLandmarkAttention, None
    except Exception as e:  # noqa: BLE001
        return None, f"import failed: {type(e).__name__}: {e}"


def timer(device: str, quick: bool):
    if device == "cuda":
        from triton.testing import do_bench

        def run(fn):
            return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100))

        return run

    def run_cpu(fn):
        fn()
        reps = 2 if quick else 5
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3

    return run_cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default="landmark_bench.json")
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--quick", action="store_true", help="a one-minute subset")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--blocks", default="64,51", help="block sizes of longattn, comma-separated")
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")]

    from longattn import landmark_attn, landmark_topk_blocks

    dev = args.device
    t_start = time.time()
    records: list[dict] = []
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out_path.write_text(json.dumps(records, indent=1))

    def left() -> float:
        return args.budget_s - (time.time() - t_start)

    bench = timer(dev, args.quick)
    if dev == "cuda":
        Ts, H, D = ([2048, 8192] if args.quick else [2048, 8192, 32768]), 32, 128
        dtype = torch.bfloat16
        decode_T = 32768
    else:
        Ts, H, D = [256, 512], 2, 64
        dtype = torch.float32
        decode_T = 2048
    official, official_err = load_official() if dev == "cuda" else (None, "CUDA only")

    def record(rec: dict):
        rec.update(dtype=str(dtype).replace("torch.", ""), device=dev)
        records.append(rec)
        save()
        msg = rec.get("error") or f"{rec['ms']:.3f} ms"
        print(f"{rec['impl']:10s} {rec['direction']:7s} {rec.get('T')} bs={rec.get('block_size')}: "
              f"{msg}", flush=True)  # fmt: skip

    def measure(impl, direction, T, bs, fn, flops):
        base = dict(op="landmark_attn", impl=impl, direction=direction, B=1, T=T, H=H, D=D,
                    block_size=bs)  # fmt: skip
        if left() <= 0:
            return
        try:
            ms = bench(fn)
            base.update(ms=ms, tflops=flops / ms / 1e9 if flops else None)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            base.update(error=f"{type(e).__name__}: {str(e)[:300]}")
        record(base)

    for T in Ts:
        torch.manual_seed(0)
        q = torch.randn(1, T, H, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(1, T, H, D, device=dev, dtype=dtype, requires_grad=True)
        v = torch.randn(1, T, H, D, device=dev, dtype=dtype, requires_grad=True)
        do = torch.randn(1, T, H, D, device=dev, dtype=dtype)
        qt, kt, vt, dot = (x.detach().transpose(1, 2).contiguous() for x in (q, k, v, do))
        for x in (qt, kt, vt):
            x.requires_grad_(True)
        fwd_flops = 2.0 * H * T * T * D

        def fwdbwd(f, ins, g):
            def run():
                o = f()
                torch.autograd.grad((o * g).sum(), ins)

            return run

        for bs in blocks:

            def ours(bs=bs, q=q, k=k, v=v):
                return landmark_attn(q, k, v, block_size=bs)

            measure("longattn", "fwd", T, bs, ours, fwd_flops)
            measure("longattn", "fwdbwd", T, bs, fwdbwd(ours, (q, k, v), do), 3.5 * fwd_flops)

        def sdpa(qt=qt, kt=kt, vt=vt):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

        measure("sdpa", "fwd", T, None, sdpa, fwd_flops)
        measure("sdpa", "fwdbwd", T, None, fwdbwd(sdpa, (qt, kt, vt), dot), 3.5 * fwd_flops)

        if official is None:
            for direction in ("fwd", "fwdbwd"):
                record(dict(op="landmark_attn", impl="official", direction=direction, B=1, T=T,
                            H=H, D=D, block_size=64, error=official_err))  # fmt: skip
        elif left() > 0:

            def off(qt=qt, kt=kt, vt=vt):
                return official.apply(qt, kt, vt, 0, D**-0.5, 64)

            try:  # agreement with ours (informational: the official masking of landmark rows
                # differs slightly)
                with torch.no_grad():
                    a = off().float().transpose(1, 2)
                    b = landmark_attn(q, k, v, block_size=64).float()
                agree = ((a - b).norm() / b.norm()).item()
            except Exception as e:  # noqa: BLE001
                agree = f"{type(e).__name__}: {str(e)[:200]}"
            measure("official", "fwd", T, 64, off, fwd_flops)
            records[-1]["rel_diff_vs_longattn"] = agree
            if T <= 8192 or not args.quick:
                measure("official", "fwdbwd", T, 64, fwdbwd(off, (qt, kt, vt), dot),
                        3.5 * fwd_flops)  # fmt: skip
        del q, k, v, do, qt, kt, vt, dot
        if dev == "cuda":
            torch.cuda.empty_cache()

    # retrieval decode: one token against a 32K cache, top-k 8
    if left() > 0:
        torch.manual_seed(0)
        T = decode_T
        q = torch.randn(1, 1, H, D, device=dev, dtype=dtype)
        k = torch.randn(1, T, H, D, device=dev, dtype=dtype)
        v = torch.randn(1, T, H, D, device=dev, dtype=dtype)
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        idx = landmark_topk_blocks(q, k, block_size=64, topk=8)

        def retrieval():
            i = landmark_topk_blocks(q, k, block_size=64, topk=8)
            return landmark_attn(q, k, v, block_size=64, block_indices=i)

        def topk_only():
            return landmark_topk_blocks(q, k, block_size=64, topk=8)

        def attn_only():
            return landmark_attn(q, k, v, block_size=64, block_indices=idx)

        def sdpa_decode():
            return F.scaled_dot_product_attention(qt, kt, vt)

        for impl, fn in (("retrieval_decode", retrieval), ("topk_only", topk_only),
                         ("attn_only", attn_only), ("sdpa_decode", sdpa_decode)):  # fmt: skip
            if left() <= 0:
                break
            rec = dict(op="landmark_decode", impl=impl, direction="fwd", B=1, T=T, H=H, D=D,
                       block_size=64, topk=8)  # fmt: skip
            try:
                ms = bench(fn)
                rec.update(ms=ms, gbps=None)
                if impl == "sdpa_decode":
                    rec["gbps"] = 2 * T * H * D * q.element_size() / ms / 1e6
            except Exception as e:  # noqa: BLE001
                rec.update(error=f"{type(e).__name__}: {str(e)[:300]}")
            record(rec)

    # summary ratios
    def ms_of(impl, direction, T, bs=None):
        for r in records:
            if (r.get("impl"), r.get("direction"), r.get("T")) == (impl, direction, T) and (
                bs is None or r.get("block_size") == bs
            ):
                return r.get("ms")
        return None

    summary = []
    for T in Ts:
        for d in ("fwd", "fwdbwd"):
            ours64, ours51, ref = (ms_of("longattn", d, T, 64), ms_of("longattn", d, T, 51),
                                   ms_of("sdpa", d, T))  # fmt: skip
            if ours64 and ref:
                ratio = (ours51 / ours64) if ours51 else None
                summary.append(dict(T=T, direction=d, vs_sdpa=ours64 / ref, bs51_vs_bs64=ratio))
    dec, sd = ms_of("retrieval_decode", "fwd", decode_T), ms_of("sdpa_decode", "fwd", decode_T)
    if dec and sd:
        summary.append(dict(decode_speedup_vs_sdpa=sd / dec))
    records.append(dict(op="summary", rows=summary))
    save()
    for row in summary:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark the NSA selection stage: ``nsa_topk_blocks``, compressed attention + top-k, and
``nsa_compress`` (mean / linear) forward and backward.

Shapes (docs/api/nsa.md, "Performance targets"): bf16, one sequence, D = 128, Hkv = 4,
G ∈ {1, 4, 16}, T ∈ {8K, 32K, 64K}, l = 32, d = 16, B_K = 64, n = 16, init_blocks = 1,
local_blocks = 2.

Records (a JSON list, rewritten after every measurement):
* op "nsa_topk_blocks", impl "longattn": selection alone (lse given).
* op "selection" (compressed attention + scores + top-k): impl "longattn"
  (``nsa_compressed_attn`` then ``nsa_topk_blocks``; an "error" entry when the compressed
  attention raises, e.g. NotImplementedError on a branch without it) and impl "nsa_ref"
  (XunhaoLai/native-sparse-attention-triton ``compressed_attention(..., topk=16)``, imported
  from ``<repo>/.peers/nsa_ref``; an "error" entry if it cannot be imported or run).
* op "nsa_compress", impl "longattn", mode mean / linear (with pe), direction fwd / bwd, GB/s
  over the tensors each direction must read and write once (x, W, pe, out / dout, dx, dW, dpe).

Timing: ``triton.testing.do_bench`` (median) after warm-up on CUDA; a perf_counter loop on CPU.

Usage:
    python benchmarks/bench_nsa_selection.py --out results/nsa_selection.json --budget-s 120
    python benchmarks/bench_nsa_selection.py --quick --device cpu --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
KS, KD, BK, TOPK, HKV, D = 32, 16, 64, 16, 4, 128
SCALE = D**-0.5


def err_str(e: BaseException, limit: int = 800) -> str:
    s = f"{type(e).__name__}: {e}".strip()
    return s if len(s) <= limit else s[:limit] + " ..."


class Bench:
    def __init__(self, args):
        self.args = args
        self.t0 = time.perf_counter()
        self.records: list[dict] = []
        self.cuda = args.device == "cuda"

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.args.budget_s

    def add(self, rec: dict) -> None:
        self.records.append(rec)
        print(json.dumps(rec), flush=True)
        if self.args.out:
            Path(self.args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.out).write_text(json.dumps(self.records, indent=1))

    def time_ms(self, fn) -> float:
        if self.cuda:
            import triton.testing

            fn()
            torch.cuda.synchronize()
            return float(triton.testing.do_bench(fn, warmup=5, rep=self.args.rep_ms))
        fn()
        ts = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1e3)
        return statistics.median(ts)

    def measure(self, base: dict, fn, extra=None) -> None:
        if self.over_budget():
            return
        rec = dict(base)
        try:
            ms = self.time_ms(fn)
            rec["ms"] = round(ms, 4)
            if extra:
                rec.update(extra(ms))
        except Exception as e:  # noqa: BLE001
            rec["error"] = err_str(e)
            if self.args.verbose:
                traceback.print_exc()
        self.add(rec)


def lse_torch(q, kc, scale, chunk=1024):
    """float32 lse of compressed attention (causal window visibility), chunked over tokens."""
    T, Hq = q.shape[1], q.shape[2]
    C, Hkv = kc.shape[1], kc.shape[2]
    G = Hq // Hkv
    kk = kc[0].float().repeat_interleave(G, dim=1).transpose(0, 1)  # [Hq, C, D]
    out = torch.empty(1, T, Hq, dtype=torch.float32, device=q.device)
    win_end = torch.arange(C, device=q.device) * KD + KS - 1
    for t0 in range(0, T, chunk):
        qq = q[0, t0 : t0 + chunk].float().transpose(0, 1)  # [Hq, c, D]
        s = torch.bmm(qq, kk.transpose(1, 2)) * scale
        t = torch.arange(t0, t0 + qq.shape[1], device=q.device)
        s = s.masked_fill(~(t[:, None] >= win_end[None, :])[None], -math.inf)
        out[0, t0 : t0 + chunk] = torch.logsumexp(s, dim=-1).transpose(0, 1)
    return out


def load_peer():
    sys.path.insert(0, str(REPO / ".peers" / "nsa_ref"))
    from native_sparse_attention.ops.triton.compressed_attention import compressed_attention

    return compressed_attention


def bench_selection(b: Bench, Ts, Gs):
    import longattn

    dev, dt = b.args.device, torch.bfloat16
    peer, peer_err = None, None
    if b.cuda:
        try:
            peer = load_peer()
        except Exception as e:  # noqa: BLE001
            peer_err = "import failed: " + err_str(e)
    for T in Ts:
        for G in Gs:
            if b.over_budget():
                return
            Hq = G * HKV
            torch.manual_seed(0)
            q = torch.randn(1, T, Hq, D, device=dev, dtype=dt)
            k = torch.randn(1, T, HKV, D, device=dev, dtype=dt)
            v = torch.randn(1, T, HKV, D, device=dev, dtype=dt)
            kc, _ = longattn.nsa_compress(k, kernel_size=KS, kernel_stride=KD)
            vc, _ = longattn.nsa_compress(v, kernel_size=KS, kernel_stride=KD)
            C = kc.shape[1]
            base = dict(dtype="bfloat16", T=T, G=G, Hq=Hq, Hkv=HKV, D=D, C=C, kernel_size=KS,
                        kernel_stride=KD, block_size=BK, topk=TOPK, direction="fwd")  # fmt: skip
            lse = None
            try:
                _, lse = longattn.nsa_compressed_attn(
                    q, kc, vc, kernel_size=KS, kernel_stride=KD, scale=SCALE, return_lse=True
                )
                cmp_err = None
            except Exception as e:  # noqa: BLE001
                cmp_err = err_str(e)
            if lse is None:
                lse = lse_torch(q, kc, SCALE)

            def topk_only(q=q, kc=kc, lse=lse):
                return longattn.nsa_topk_blocks(
                    q, kc, lse, kernel_size=KS, kernel_stride=KD, block_size=BK, topk=TOPK,
                    init_blocks=1, local_blocks=2, scale=SCALE,
                )  # fmt: skip

            b.measure(dict(op="nsa_topk_blocks", impl="longattn", **base), topk_only)

            def both(q=q, kc=kc, vc=vc):
                _, lse_ = longattn.nsa_compressed_attn(
                    q, kc, vc, kernel_size=KS, kernel_stride=KD, scale=SCALE, return_lse=True
                )
                return longattn.nsa_topk_blocks(
                    q, kc, lse_, kernel_size=KS, kernel_stride=KD, block_size=BK, topk=TOPK,
                    init_blocks=1, local_blocks=2, scale=SCALE,
                )  # fmt: skip

            if cmp_err is None:
                b.measure(dict(op="selection", impl="longattn", **base), both)
            else:
                b.add(dict(op="selection", impl="longattn", **base, error=cmp_err))
            if not b.cuda:
                continue
            if peer is None:
                b.add(dict(op="selection", impl="nsa_ref", **base, error=peer_err))
                continue
            cu_q = torch.tensor([0, T], dtype=torch.int32, device=dev)
            cu_k = torch.tensor([0, C], dtype=torch.int32, device=dev)

            def peer_fn(q=q, kc=kc, vc=vc, cu_q=cu_q, cu_k=cu_k, T=T, C=C):
                return peer(
                    q[0], kc[0], vc[0], KS, KD, BK, TOPK, cu_q, cu_k, max_seqlen_q=T,
                    max_seqlen_k=C, sm_scale=SCALE, init_blocks=1, local_blocks=2,
                )  # fmt: skip

            b.measure(dict(op="selection", impl="nsa_ref", **base), peer_fn)
            del q, k, v, kc, vc, lse
            if b.cuda:
                torch.cuda.empty_cache()


def bench_compress(b: Bench, Ts):
    import longattn

    dev, dt = b.args.device, torch.bfloat16
    es = 2
    for T in Ts:
        for mode in ("mean", "linear"):
            if b.over_budget():
                return
            x = torch.randn(1, T, HKV, D, device=dev, dtype=dt, requires_grad=True)
            w = pe = None
            if mode == "linear":
                w = (torch.randn(HKV, KS * D, D, device=dev) / math.sqrt(KS * D)).to(dt)
                pe = torch.randn(HKV, KS, D, device=dev, dtype=dt)
                w.requires_grad_()
                pe.requires_grad_()
            C = (T - KS) // KD + 1
            base = dict(op="nsa_compress", impl="longattn", mode=mode, dtype="bfloat16", T=T,
                        H=HKV, D=D, C=C, kernel_size=KS, kernel_stride=KD)  # fmt: skip
            x_b = T * HKV * D * es
            o_b = C * HKV * D * es
            w_b = 0 if w is None else (w.numel() + pe.numel()) * es

            def fwd(x=x, w=w, pe=pe):
                return longattn.nsa_compress(x, kernel_size=KS, kernel_stride=KD, weight=w, pe=pe)

            fwd_bytes = x_b + o_b + w_b
            b.measure(dict(base, direction="fwd"), fwd,
                      lambda ms, n=fwd_bytes: {"GB/s": round(n / ms / 1e6, 1)})  # fmt: skip
            try:
                out, _ = fwd()
                do = torch.randn_like(out)
                wrt = [x] + ([w, pe] if w is not None else [])

                def bwd(out=out, do=do, wrt=wrt):
                    return torch.autograd.grad(out, wrt, do, retain_graph=True)

                bwd_bytes = 2 * x_b + o_b + 2 * w_b
                b.measure(dict(base, direction="bwd"), bwd,
                          lambda ms, n=bwd_bytes: {"GB/s": round(n / ms / 1e6, 1)})  # fmt: skip
            except Exception as e:  # noqa: BLE001
                b.add(dict(base, direction="bwd", error=err_str(e)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/nsa_selection.json"))
    ap.add_argument("--budget-s", type=float, default=120.0)
    ap.add_argument("--quick", action="store_true", help="a subset (T = 8K and 64K, G 1 and 16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rep-ms", type=int, default=60, help="do_bench repetition time")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args(argv)
    b = Bench(args)
    if b.cuda:
        Ts = [8192, 65536] if args.quick else [8192, 32768, 65536]
        Gs = [1, 16] if args.quick else [1, 4, 16]
        Tc = [65536] if args.quick else [8192, 65536]
    else:
        Ts, Gs, Tc = [256], [1, 4], [512]
    bench_selection(b, Ts, Gs)
    bench_compress(b, Tc)
    print(f"done in {time.perf_counter() - b.t0:.1f} s, {len(b.records)} records", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

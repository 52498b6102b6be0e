#!/usr/bin/env python3
"""Benchmark ``longattn.rat_attn`` against its peers, in one process, on the same inputs.

Shapes: the official RAT benchmark's Config2 (H 16, D 128, L 16, bf16, B·T = 64K tokens):
B16×T4K, B4×T16K, B1×T64K.  g is float32 (as the official layer computes it).

Implementations (each one that fails is recorded with its error string, never dropped):

* ``longattn``: ``rat_attn(q, k, v, g, chunk_size=16)``.
* ``sdpa``: ``F.scaled_dot_product_attention(q, k, v, is_causal=True)`` on the same q/k/v in
  [B, H, T, D] (transposed outside the timed region), default backend (cuDNN on the H200).
* ``official``: the official RAT core (CLAIRE-Labo/RAT, ``src/model/backbone/rat/rat.py``,
  ``RAT.forward`` between the projections and the output gate): ``ascan`` (their compiled
  associative scan, ``src/model/op/ascan.py``) over ``(1 - g)·[v | k]``, their
  ``apply_rotary_pos_emb`` with InterRoPE's chunk angles, ``flex_attention`` over the chunk-final
  states with their block mask, and ``merge_last_token_naive``.  The sources are read from a
  snapshot in ``<repo>/.peers/rat`` (never committed); the helpers that need hydra/omegaconf
  are not imported (``util.py``'s RoPE functions are extracted with ``ast``), and
  ``create_block_mask`` gets a plain function (a bound method fails under torch.compile on
  torch 2.11).  The flex_attention call is compiled (as the official layer is).

Directions: ``fwd`` (a training forward, inputs require grad) and ``fwdbwd`` (forward plus
``torch.autograd.grad((o * do).sum(), inputs)``).

Decode (``--only decode`` runs just this part, ``--no-decode`` skips it): batch 512, 4K
context, H 16, D 128, L 16, bf16: one token of ``longattn.nn.rat.rat_continue`` on a RATCache of
256 rotated bf16 chunk states (the fused ``rat_decode`` kernel on CUDA), mid-chunk
(``longattn-ratcache``) and on a chunk-completing step that appends its state
(``longattn-ratcache-chunk-end``), against SDPA over a full 4K bf16 KV cache (q_len 1, no mask).
Each timed call resets ``seen`` so that it repeats the same step.

Results go to ``--out`` as JSON (a list of records), written after every measurement.

Usage:
    python3 benchmarks/bench_rat.py --out results.json --budget-s 240 [--quick]
    python3 benchmarks/bench_rat.py --only decode --out decode.json
    python3 benchmarks/bench_rat.py --device cpu --quick --out /tmp/rat-cpu.json   # smoke test
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / ".peers" / "rat"

SHAPES = [(16, 4096), (4, 16384), (1, 65536)]
CPU_SHAPES = [(1, 256), (2, 128)]
H, D, L = 16, 128, 16


def load_official():
    """(ascan, merge_last_token_naive, apply_rotary_pos_emb) from the official sources."""
    op = PEER / "src" / "model" / "op"
    mods = {}
    for name in ("ascan", "merge_lastt"):
        spec = importlib.util.spec_from_file_location(f"rat_official_{name}", op / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mods[name] = mod
    util_src = (PEER / "src" / "model" / "backbone" / "util.py").read_text()
    tree = ast.parse(util_src)
    keep = [
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name in ("rotate_half", "apply_rotary_pos_emb")
    ]
    ns = {"torch": torch}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(PEER / "util.py"), "exec"), ns)
    return (
        mods["ascan"].ascan,
        mods["merge_lastt"].merge_last_token_naive,
        ns["apply_rotary_pos_emb"],
    )


def make_official_core(B, T, device):
    """The official core as a function of (q, k, v, g) in our [B, T, H, D] layout."""
    from torch.nn.attention import flex_attention as fla

    ascan, merge, apply_rope = load_official()
    C = T // L
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2, device=device).float() / D))
    freqs = torch.einsum("i,j->ij", torch.arange(C, device=device).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos().repeat_interleave(L, 0)[None, None].to(torch.bfloat16)
    sin = emb.sin().repeat_interleave(L, 0)[None, None].to(torch.bfloat16)

    def block_causal(b, h, q_idx, kv_idx):  # a plain function (not a bound method)
        return q_idx // L > kv_idx

    block_mask = fla.create_block_mask(block_causal, 1, 1, T, C, device=device)
    flex = torch.compile(fla.flex_attention)
    scale = D**-0.5
    Dm = H * D

    def core(q, k, v, g):
        # official layout: x, k, g as (b, c, l, d_model); q as (b, h, t, p)
        x4 = v.reshape(B, C, L, Dm)
        k4 = k.reshape(B, C, L, Dm)
        g4 = g.reshape(B, C, L, Dm).repeat(1, 1, 1, 2)
        intra_xk = ascan(g4, ((1.0 - g4) * torch.cat([x4, k4], dim=-1))).to(torch.bfloat16)
        intra_x = intra_xk[..., :Dm].reshape(B, T, H, D).transpose(1, 2)
        intra_k = intra_xk[..., Dm:].reshape(B, T, H, D).transpose(1, 2)
        qh = q.transpose(1, 2)
        qr, kr = apply_rope(qh, intra_k, cos, sin)
        qr, kr = qr.to(intra_k.dtype), kr.to(intra_k.dtype)
        ck = kr[..., L - 1 :: L, :]
        cx = intra_x[..., L - 1 :: L, :]
        out, lse = flex(qr, ck, cx, scale=scale, block_mask=block_mask, return_lse=True)
        intra_lse = (torch.einsum("balp,balp->bal", qr, kr) * scale).to(torch.float32)
        return merge(out, intra_x, lse, intra_lse).transpose(1, 2)

    return core


class Bench:
    def __init__(self, args):
        self.args = args
        self.records = []
        self.t_end = time.monotonic() + args.budget_s
        self.cuda = args.device == "cuda"

    def left(self):
        return self.t_end - time.monotonic()

    def save(self, rec):
        self.records.append(rec)
        print(json.dumps(rec), flush=True)
        if self.args.out:
            Path(self.args.out).write_text(json.dumps(self.records, indent=1))

    def time(self, fn):
        if self.cuda:
            import triton.testing

            fn()
            torch.cuda.synchronize()
            rep = 30 if self.args.quick else 100
            return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")
        fn()
        t0 = time.perf_counter()
        n = 3
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    def measure(self, rec, fn, flops=None):
        if self.left() <= 0:
            return
        try:
            ms = self.time(fn)
            rec["ms"] = round(ms, 4)
            if flops:
                rec["tflops"] = round(flops / ms / 1e9, 2)
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"[:2000]
            traceback.print_exc()
        self.save(rec)


def run_shape(bench, rat_attn, B, T, dev, dt):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.sigmoid(torch.randn(B, T, H, D, device=dev) + 2).requires_grad_()
    do = torch.randn(B, T, H, D, device=dev, dtype=dt)
    base = {"op": "rat_attn", "B": B, "T": T, "H": H, "D": D, "L": L, "dtype": str(dt)[6:]}
    # FLOPs of the chunk-state attention: QK^T and PV over T·C/2 pairs (+ the own state)
    rat_f = 4 * B * H * T * (T / L / 2) * D
    sdpa_f = 4 * B * H * T * T / 2 * D
    impls = {"longattn": (lambda: rat_attn(q, k, v, g, chunk_size=L), (q, k, v, g), do, rat_f)}
    if bench.cuda:
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        dot = do.transpose(1, 2).contiguous()
        impls["sdpa"] = (
            lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
            (qt, kt, vt),
            dot,
            sdpa_f,
        )
        try:
            core = make_official_core(B, T, dev)
            impls["official"] = (lambda: core(q, k, v, g), (q, k, v, g), do, rat_f)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            err = f"import: {type(e).__name__}: {e}"
            bench.save({**base, "impl": "official", "error": err})
    for name, (fn, inputs, grad_out, flops) in impls.items():
        bench.measure({**base, "impl": name, "direction": "fwd"}, fn, flops)

        def fwdbwd(fn=fn, inputs=inputs, grad_out=grad_out):
            o = fn()
            torch.autograd.grad((o * grad_out).sum(), inputs)

        bench.measure({**base, "impl": name, "direction": "fwd+bwd"}, fwdbwd, 3.5 * flops)


def run_decode(bench, dev, dt):
    from longattn.nn.rat import RATCache, rat_continue

    Bd, Tc = (512, 4096) if bench.cuda else (4, 256)
    base = {"op": "rat_decode", "B": Bd, "T": Tc, "H": H, "D": D, "L": L, "dtype": str(dt)[6:]}
    try:
        torch.manual_seed(0)
        C = Tc // L
        cache = RATCache._zeros(Bd, H, D, dtype=dt, device=dev, capacity=2 * C)
        cache.k_store[:, :, :C].normal_()
        cache.v_store[:, :, :C].normal_()
        cache.k_run.normal_()
        cache.v_run.normal_()
        q1, k1, v1 = (torch.randn(Bd, 1, H, D, device=dev, dtype=dt) for _ in range(3))
        g1 = torch.sigmoid(torch.randn(Bd, 1, H, D, device=dev))
        for impl, offset in (("longattn-ratcache", 1), ("longattn-ratcache-chunk-end", L - 1)):

            def step(offset=offset):
                cache.seen, cache.num_chunks = C * L + offset, C
                with torch.no_grad():
                    rat_continue(q1, k1, v1, g1, cache, chunk_size=L)

            bench.measure({**base, "impl": impl, "direction": "decode"}, step)
        cache = None  # free the states before the KV cache is allocated
        kc, vc = (torch.randn(Bd, H, Tc, D, device=dev, dtype=dt) for _ in range(2))
        qd = torch.randn(Bd, H, 1, D, device=dev, dtype=dt)

        def sdpa_step():
            with torch.no_grad():
                F.scaled_dot_product_attention(qd, kc, vc)

        bench.measure({**base, "impl": "sdpa-kvcache", "direction": "decode"}, sdpa_step)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        bench.save({**base, "impl": "decode", "error": f"{type(e).__name__}: {e}"})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget-s", type=float, default=240.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-decode", action="store_true", help="same as --only train")
    ap.add_argument("--only", choices=("all", "train", "decode"), default="all")
    args = ap.parse_args()
    if args.no_decode:
        args.only = "train"

    from longattn import rat_attn

    bench = Bench(args)
    dev = torch.device(args.device)
    dt = torch.bfloat16 if bench.cuda else torch.float32
    if args.only != "decode":
        shapes = SHAPES if bench.cuda else CPU_SHAPES
        if args.quick:
            shapes = shapes[:1]
        for B, T in shapes:
            run_shape(bench, rat_attn, B, T, dev, dt)
            if bench.cuda:
                torch.cuda.empty_cache()
    if args.only != "train" and bench.left() > 0:
        run_decode(bench, dev, dt)


if __name__ == "__main__":
    main()

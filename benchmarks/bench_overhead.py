"""Per-call host overhead: wall time of one eager call of every public op's forward at a tiny
shape, and of every module's one-token decode step, beside torch SDPA at the same shape.

On a GPU at B 1, T 64, H 16, D 64 the kernels do almost no work, so the time per call is what
the host spends around them (Python wrapper, custom-op dispatch, validation, DLPack, output
allocation, the launch). Each case runs ``--calls`` back-to-back eager calls per batch; the
result is the median (and minimum) over ``--batches`` batches of the wall time per call, and the
median of the calling thread's CPU time per call. On CUDA the device is synchronised once per
batch, not per call. Inputs do not require grad; module decode runs under ``torch.no_grad()``
from a cache prefilled with T tokens. On a CPU the kernels' compute dominates at that shape:
``--shape 1 4 1 8 --decode-shape 1 8`` leaves mostly the host path.

    python benchmarks/bench_overhead.py --device cuda --out overhead.json [--only lightning]
    python benchmarks/bench_overhead.py --device cpu --shape 1 4 1 8 --decode-shape 1 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import longattn as la
import torch
import torch.nn.functional as F
from longattn import nn as lann

WINDOW, BLOCK, TOPK, CHUNK = 16, 16, 2, 16
KERNEL, STRIDE = 16, 8  # NSA compression windows


def op_cases(shape, decode_shape, device: str, dtype: torch.dtype) -> dict:
    """name -> zero-argument callable of one eager forward."""
    B, T, H, D = shape
    hkv = max(1, H // 4)  # kv heads of the NSA and landmark cases (GQA groups of 4)
    decode_h, decode_d = decode_shape
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    kg, vg = randn(B, T, hkv, D), randn(B, T, hkv, D)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # SDPA's [B, H, T, D]
    slopes = la.lightning_slopes(H).to(device)
    gate = torch.rand(B, T, H, D, generator=g).mul(0.8).add(0.1).to(device=device, dtype=dtype)
    k_cmp, _ = la.nsa_compress(kg, kernel_size=KERNEL, kernel_stride=STRIDE)
    v_cmp, _ = la.nsa_compress(vg, kernel_size=KERNEL, kernel_stride=STRIDE)
    cmp_opts = {"kernel_size": KERNEL, "kernel_stride": STRIDE}
    o_cmp, lse = la.nsa_compressed_attn(q, k_cmp, v_cmp, **cmp_opts, return_lse=True)
    sel_opts = {**cmp_opts, "block_size": BLOCK, "topk": TOPK}
    block_indices = la.nsa_topk_blocks(q, k_cmp, lse, **sel_opts)
    gates = [torch.rand(B, T, H, generator=g).to(device=device, dtype=dtype) for _ in range(3)]
    lm_indices = la.landmark_topk_blocks(q, kg, block_size=BLOCK, topk=TOPK)
    # lightning decode: one token over a carried state
    dq, dk, dv = (randn(1, 1, decode_h, decode_d, scale=0.1) for _ in range(3))
    decode_slopes = la.lightning_slopes(decode_h).to(device)
    state = torch.zeros(1, decode_h, decode_d, decode_d, device=device)
    return {
        "sdpa (causal)": lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True),
        "lightning_attn": lambda: la.lightning_attn(q, k, v, slopes),
        "rat_attn": lambda: la.rat_attn(q, k, v, gate, chunk_size=CHUNK),
        "sliding_window_attn": lambda: la.sliding_window_attn(q, kg, vg, window_size=WINDOW),
        "nsa_compress": lambda: la.nsa_compress(kg, **cmp_opts),
        "nsa_compressed_attn": lambda: la.nsa_compressed_attn(
            q, k_cmp, v_cmp, **cmp_opts, return_lse=True
        ),
        "nsa_topk_blocks": lambda: la.nsa_topk_blocks(q, k_cmp, lse, **sel_opts),
        "nsa_selected_attn": lambda: la.nsa_selected_attn(
            q, kg, vg, block_indices, block_size=BLOCK
        ),
        "nsa_attn (layer)": lambda: la.nsa_attn(
            q, kg, vg, *gates, k_cmp=k_cmp, v_cmp=v_cmp, **sel_opts, window_size=WINDOW
        ),
        "landmark_attn": lambda: la.landmark_attn(q, kg, vg, block_size=BLOCK),
        "landmark_attn (retrieval)": lambda: la.landmark_attn(
            q, kg, vg, block_size=BLOCK, block_indices=lm_indices
        ),
        "landmark_topk_blocks": lambda: la.landmark_topk_blocks(q, kg, block_size=BLOCK, topk=TOPK),
        f"sdpa decode (1 query, H {decode_h}, D {decode_d})": lambda: (
            F.scaled_dot_product_attention(
                dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)
            )
        ),
        f"lightning_attn decode (H {decode_h}, D {decode_d})": lambda: la.lightning_attn(
            dq, dk, dv, decode_slopes, initial_state=state, output_final_state=True
        ),
    }


def module_cases(shape, device: str, dtype: torch.dtype) -> dict:
    """name -> (module, cache prefilled with T tokens): one-token decode steps."""
    B, T, H, D = shape
    hkv = max(1, H // 4)
    hidden = H * D
    factory = {"device": device, "dtype": dtype}
    modules = {
        "LightningAttention decode": lann.LightningAttention(hidden, H, **factory),
        "RATAttention decode": lann.RATAttention(
            hidden, H, chunk_size=CHUNK, ngroups=2 if H % 2 == 0 else 1, **factory
        ),
        "NativeSparseAttention decode": lann.NativeSparseAttention(
            hidden,
            H,
            hkv,
            D,
            kernel_size=KERNEL,
            kernel_stride=STRIDE,
            block_size=BLOCK,
            topk=TOPK,
            window_size=WINDOW,
            **factory,
        ),  # fmt: skip
        "LandmarkAttention decode": lann.LandmarkAttention(
            hidden, H, hkv, D, block_size=BLOCK, topk=TOPK, **factory
        ),
    }
    prompt = torch.randn(B, T, hidden, generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device=device, dtype=dtype)
    cases = {}
    with torch.no_grad():
        for name, module in modules.items():
            module.eval()
            _, cache = module(prompt, cache=module.init_cache(B), use_cache=True)
            cases[name] = (module, cache)
    return cases


def breakdown_cases(shape, device: str, dtype: torch.dtype) -> dict:
    """lightning_attn's forward layer by layer, innermost first: each calls one layer further
    out (the public call skips the dispatcher where ``direct_call`` allows)."""
    from longattn import _native
    from longattn._runtime import native_call
    from longattn.ops import lightning as ops

    B, T, H, D = shape
    q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
    slopes = la.lightning_slopes(H).to(device)
    out, state = torch.empty_like(v), torch.empty(B, H, D, D, device=device)
    body = ops.lightning_fwd._init_fn  # the op's Python implementation

    def native():
        with native_call(q) as stream:
            _native.lightning_fwd(q, k, v, slopes, out, None, state, 1.0, None, stream)

    return {
        "Rust: DLPack import, checks, kernel": native,
        "+ op body: outputs, stream, detach": lambda: body(q, k, v, slopes, None, 1.0, None),
        "+ dispatcher, autograd wrapper": lambda: torch.ops.longattn.lightning_fwd.default(
            q, k, v, slopes, None, 1.0, None
        ),
        "lightning_attn (the public call)": lambda: la.lightning_attn(q, k, v, slopes),
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(step, device: str, calls: int, batches: int, fresh=None) -> list[tuple]:
    """(wall µs, calling thread's CPU µs) per call of each batch of ``calls`` back-to-back calls,
    after one warm-up batch. The thread's CPU time is the host work itself, which other
    processes on a shared machine disturb less than the wall time. ``fresh`` (when given) makes
    the batch's starting state, outside the timed region."""
    per_call = []
    for i in range(batches + 1):
        state = fresh() if fresh is not None else None
        sync(device)
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            state = step(state)
        sync(device)
        if i:  # the first batch warms caches (kernels, allocator)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            per_call.append((wall / calls * 1e6, cpu / calls * 1e6))
    return per_call


def decode_step(module, x):
    def step(cache):
        _, cache = module(x, cache=cache, use_cache=True)
        return cache

    return step


def fresh_cache(cache):
    # RATCache is updated in place; the other caches are immutable and can be shared
    return cache.clone if isinstance(cache, lann.RATCache) else lambda: cache


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: float32 on cpu, bfloat16 on cuda")  # fmt: skip
    p.add_argument(
        "--shape", type=int, nargs=4, default=(1, 64, 16, 64), metavar=("B", "T", "H", "D")
    )
    p.add_argument("--decode-shape", type=int, nargs=2, default=(64, 128), metavar=("H", "D"),
                   help="lightning decode: heads and D = E")  # fmt: skip
    p.add_argument("--calls", type=int, default=200, help="back-to-back calls per batch")
    p.add_argument("--batches", type=int, default=7)
    p.add_argument("--only", default="", help="run only cases whose name contains this")
    p.add_argument("--out", default=None, help="write the results as JSON")
    p.add_argument("--label", default="", help="names the run in benchmarks/report.py's table")
    p.add_argument("--breakdown", action="store_true", help="also time lightning_attn's layers")
    p.add_argument("--note", default="", help="a sentence report.py prints under the table")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    if args.device == "cpu":
        torch.set_num_threads(1)  # tiny shapes: thread hand-offs would only add noise

    results = []

    def record(name, per_call, baseline):
        walls = [w for w, _ in per_call]
        median, best = statistics.median(walls), min(walls)
        cpu = statistics.median(c for _, c in per_call)
        ratio = median / baseline if baseline else 1.0
        results.append(
            {"case": name, "median_us": median, "min_us": best, "cpu_us": cpu, "ratio": ratio}
        )
        print(f"{name:38s} {median:9.1f} {best:9.1f} {cpu:9.1f} {ratio:8.2f}", flush=True)

    B, T, H, D = args.shape
    print(f"{args.device} {dtype} B {B} T {T} H {H} D {D}; {args.calls} calls x {args.batches}")
    print(f"{'case':38s} {'median µs':>9s} {'min µs':>9s} {'CPU µs':>9s} {'vs SDPA':>8s}")
    sdpa = {}
    with torch.no_grad():
        for name, fn in op_cases(args.shape, args.decode_shape, args.device, dtype).items():
            if args.only not in name and not name.startswith("sdpa"):
                continue
            per_call = time_calls(lambda _, fn=fn: fn(), args.device, args.calls, args.batches)
            baseline = "decode" if "decode" in name else "tiny"
            if name.startswith("sdpa"):
                sdpa[baseline] = statistics.median(w for w, _ in per_call)
            record(name, per_call, sdpa.get(baseline))
    x = torch.randn(B, 1, H * D, device=args.device, dtype=dtype)
    for name, (module, cache) in module_cases(args.shape, args.device, dtype).items():
        if args.only not in name:
            continue
        with torch.no_grad():
            step = decode_step(module, x)
            per_call = time_calls(step, args.device, args.calls, args.batches, fresh_cache(cache))
        record(name, per_call, sdpa.get("tiny"))
    breakdown = []
    if args.breakdown:
        print("lightning_attn layer by layer (no grad):")
        with torch.no_grad():
            for name, fn in breakdown_cases(args.shape, args.device, dtype).items():
                per_call = time_calls(lambda _, fn=fn: fn(), args.device, args.calls, args.batches)
                wall = statistics.median(w for w, _ in per_call)
                cpu = statistics.median(c for _, c in per_call)
                breakdown.append({"layer": name, "median_us": wall, "cpu_us": cpu})
                print(f"{name:44s} {wall:9.1f} {cpu:9.1f}", flush=True)
    if args.out:
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        meta = {
            "torch": torch.__version__,
            "device": args.device,
            "device_name": name,
            "dtype": str(dtype),
            "shape": [B, T, H, D],
            "decode_shape": list(args.decode_shape),
            "calls": args.calls,
            "batches": args.batches,
        }
        with open(args.out, "w") as f:
            run = {"bench": "overhead", "date": time.strftime("%Y-%m-%d"), "label": args.label}
            run.update(meta=meta, results=results, breakdown=breakdown, note=args.note)
            json.dump(run, f, indent=1)


if __name__ == "__main__":
    main()

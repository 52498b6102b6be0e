"""Command line: ``python -m longattn demo`` (the main job: long-context MQAR training per
attention family, then a sweep of training-step time and memory against sequence length),
``python -m longattn check`` (every op against its float64 reference on this device) and
``python -m longattn bench`` (quick side-by-side timing on this machine).

The bench times ``lightning_attn`` against the same blocked math in torch eager (float32, on the
same threads) and, on a GPU, against SDPA causal; it prints a table and, with matplotlib, writes a
PNG. The full peer comparison (fla, the official kernels) is ``benchmarks/bench_lightning.py``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .check import run as run_check
from .demo import FAMILIES, DemoConfig
from .demo import run as run_demo
from .ops.lightning import lightning_attn, lightning_slopes
from .reference.lightning import lightning_attn_chunked


def _time_ms(fn: Callable[[], object], device: torch.device, budget_s: float) -> float:
    """Median wall time of fn (CUDA-synchronised), after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < budget_s and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _fwd_bwd(attn: Callable[..., torch.Tensor], leaves: list[torch.Tensor], do: torch.Tensor):
    def run() -> None:
        out = attn(*leaves)
        torch.autograd.grad(out, leaves, do)

    return run


def _bench_shape(shape, device: torch.device, dtype: torch.dtype, budget: float):
    B, T, H, D = shape
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g).to(device, dtype) for _ in range(3))
    leaves = [x.requires_grad_() for x in (q, k, v)]
    slopes = lightning_slopes(H).to(device)
    do = torch.randn(B, T, H, D, generator=g).to(device, dtype)

    def ours(q, k, v):
        return lightning_attn(q, k, v, slopes)[0]

    def eager(q, k, v):
        return lightning_attn_chunked(q, k, v, slopes, dtype=torch.float32)[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        ).transpose(1, 2)

    impls = {"longattn": ours, "torch eager (chunked)": eager}
    if device.type == "cuda":
        impls["sdpa causal"] = sdpa
    flops = B * T * H * (4 * D * D + 64 * 2 * D)  # blocked linear attention, forward
    rows = []
    for name, fn in impls.items():
        with torch.no_grad():
            fwd = _time_ms(lambda fn=fn: fn(q, k, v), device, budget)
        fb = _time_ms(_fwd_bwd(fn, leaves, do), device, budget)
        rows.append((f"{B}x{T}x{H}x{D}", name, fwd, fb, flops / fwd / 1e6))
    return rows


def bench(args: argparse.Namespace) -> int:
    device = torch.device(_default_device(args.device))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = [(1, t, args.heads, args.dim) for t in args.seqlens]
    print(f"longattn bench on {device} ({torch.get_num_threads()} threads), {dtype}")
    if device.type == "cpu":
        a = torch.randn(1024, 1024)
        ms = _time_ms(lambda: a @ a, device, 0.5)
        print(f"torch matmul 1024^3 float32: {2 * 1024**3 / ms / 1e6:.1f} GFLOP/s")
    rows = []
    for shape in shapes:
        rows += _bench_shape(shape, device, dtype, args.budget)
    print(f"\n{'B×T×H×D':<18}{'impl':<24}{'fwd ms':>10}{'fwd+bwd ms':>12}{'fwd GFLOP/s':>13}")
    for shape, name, fwd, fb, gflops in rows:
        print(f"{shape:<18}{name:<24}{fwd:>10.2f}{fb:>12.2f}{gflops:>13.1f}")
    by_shape: dict[str, dict[str, float]] = {}
    for shape, name, _, fb, _ in rows:
        by_shape.setdefault(shape, {})[name] = fb
    for shape, t in by_shape.items():
        ratio = t["torch eager (chunked)"] / t["longattn"]
        print(f"{shape}: longattn fwd+bwd is {ratio:.1f}x faster than torch eager")
    if args.png:
        _plot(rows, args.png)
    return 0


def _plot(rows, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r[1] for r in rows):
        pts = [(int(r[0].split("x")[1]), r[3]) for r in rows if r[1] == name]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="fwd+bwd ms")
    ax.set_title("lightning_attn")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def _default_device(requested: str | None) -> str:
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longattn")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="time lightning_attn against torch eager (and SDPA on GPU)")
    b.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    b.add_argument("--seqlens", type=int, nargs="+", default=[512, 2048, 8192])
    b.add_argument("--heads", type=int, default=8)
    b.add_argument("--dim", type=int, default=64)
    b.add_argument("--budget", type=float, default=1.0, help="seconds of timing per measurement")
    b.add_argument("--png", help="write a plot of fwd+bwd time against sequence length")
    d = sub.add_parser("demo", help="train a small LM on long-context MQAR with every family")
    d.add_argument("--families", default=",".join(FAMILIES), help="comma list")
    d.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    d.add_argument("--seq-len", type=int, help="default 512 on the CPU, 4096 on a GPU")
    d.add_argument("--pairs", type=int, help="key-value pairs (default 8 CPU, 64 GPU)")
    d.add_argument("--queries", type=int, help="answered queries per sequence")
    d.add_argument("--steps", type=int, help="training steps per family")
    d.add_argument("--batch-size", type=int)
    d.add_argument("--chunk-size", type=int, help="RAT's chunk size L")
    d.add_argument("--png", default="mqar.png", help="recall plot (empty: none)")
    d.add_argument("--sweep-png", default="mqar-sweep.png", help="sweep plot (empty: none)")
    d.add_argument("--no-sweep", action="store_true", help="skip the sequence-length sweep")
    d.add_argument("--sweep-lengths", type=int, nargs="+", help="sweep lengths (tokens)")
    c = sub.add_parser("check", help="every op against its float64 reference on this device")
    c.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench(args)
    if args.command == "check":
        return 0 if run_check(torch.device(_default_device(args.device))) else 1
    chosen = {
        "seq_len": args.seq_len,
        "num_pairs": args.pairs,
        "num_queries": args.queries,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "rat_chunk": args.chunk_size,
        "sweep_lengths": tuple(args.sweep_lengths) if args.sweep_lengths else None,
    }
    cfg = DemoConfig.for_device(
        _default_device(args.device),
        families=tuple(f.strip() for f in args.families.split(",") if f.strip()),
        **{name: value for name, value in chosen.items() if value is not None},
    )
    results, _ = run_demo(cfg, args.png or None, args.sweep_png or None, not args.no_sweep)
    return 0 if all(r.error is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Benchmark ``longattn.lightning_attn`` against its peers, in one process, on the same inputs.

Peers (each one that fails to import, compile or match the reference is recorded with its error
string, never dropped):

* ``fla``: ``fla.ops.simple_gla.chunk_simple_gla(q, k, v, g_gamma=-slopes, scale=1.0)`` from
  ``fla-core``; layout [B, T, H, D]; ``g_gamma`` is the natural-log decay per head, so
  ``g_gamma = -slopes`` is the same decay exp(-s).  Decode: ``fused_recurrent_simple_gla`` with
  the same arguments plus ``initial_state``/``output_final_state`` (state [N, H, K, V], float32,
  the canonical convention S_t = lambda S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t).
* ``lightning_attn``: OpenNLPLab lightning-attention 0.0.5,
  ``lightning_attn.ops.lightning_attn_func(q, k, v, s)``; layout [B, H, T, D] (the transpose is
  done outside the timed region); ``s`` = slopes as a contiguous float32 [H, 1, 1] tensor (the
  kernel reads element h of it); no scale argument (scale 1), no initial or final state, no
  gradient for ``s``.  D > 128 is split into 64-wide slices of q/k and summed.
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``, layout
  [B, H, T, D], default backend (cuDNN on the H200): dense softmax attention, a speed reference.
* ``torch_chunked``: the same chunked math in torch eager (float32), on by default only with --cpu.

Timing: ``triton.testing.do_bench`` (median, with p20/p80) on CUDA, a perf_counter loop on CPU.
* fwd: one forward call on inputs that require grad (a training forward).
* fwdbwd: forward plus ``torch.autograd.grad((o * do).sum(), [q, k, v])`` with a random ``do``
  (every family's fwd+bwd in docs/benchmarks.md).  The loss adds elementwise passes (o*do, the sum
  and the mul's backward); their cost alone is measured once per shape as ``loss_overhead_ms``.
* bwd: ``torch.autograd.grad(o, [q, k, v], do, retain_graph=True)`` on a retained forward graph,
  i.e. the backward kernels alone (no loss overhead).

Bytes (memory floor) and FLOPs, per element size ``es``:
* fwd: read q, k, v, write o = B*T*H*(2D + 2E)*es; bwd: read q, k, v, do, write dq, dk, dv =
  B*T*H*(4D + 3E)*es; fwdbwd: the sum (11 tensors when D = E).  Floor time = bytes / --hbm-gbps
  (4300 GB/s: the device-to-device copy rate measured on the H200).
* linear attention, chunk C = 64: fwd = B*T*H*(4*D*E + C*(D + E)) (state update, inter-chunk
  product, and the causal half of the two intra-chunk products); bwd = 2 x fwd.
* sdpa (causal): fwd = B*H*T^2*(D + E); bwd = 2.5 x fwd.

Results go to ``--out`` as JSON, written after every measurement (a run killed at its time limit
keeps what it measured).  A CUDA fault (illegal address, ...) poisons the process: the script
records it, disables that implementation and re-executes itself with ``--resume`` to carry on.

Usage:
    python3 benchmarks/bench_lightning.py [--out PATH] [--budget-s 420]
    python3 benchmarks/bench_lightning.py --cpu --out /tmp/bench-cpu.json   # quick smoke test
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from longattn.reference.lightning import lightning_attn_chunked

REPO = Path(__file__).resolve().parent.parent

SPEC_SHAPES = [(4, 32768, 32, 128), (1, 8192, 96, 128), (2, 16384, 16, 128)]
FLA_SHAPES = [(4, 2048, 16, 128), (4, 4096, 64, 128), (8, 1024, 8, 64), (8, 2048, 32, 256)]
SCALING_T = [2048, 4096, 8192, 16384, 32768]
SCALING_BHD = (1, 32, 128)
DECODE_HD = (64, 128)
# several chunks and a ragged tail; H and D as in a timed shape, so fla autotunes once for both
CHECK_SHAPE = (2, 2085, 16, 128)

CPU_SPEC_SHAPES = [(1, 256, 2, 32), (2, 200, 3, 16)]
CPU_FLA_SHAPES = [(2, 128, 2, 64)]
CPU_SCALING_T = [128, 256, 512]
CPU_SCALING_BHD = (1, 2, 32)
CPU_DECODE_HD = (4, 32)
CPU_CHECK_SHAPE = (1, 150, 2, 32)

# Fixed times shown as the "target" column of docs/benchmarks.md (the goals themselves, as ratios
# to the peers: docs/api/lightning.md, "Performance targets").
TARGETS = {"4x32768x32x128": {"fwd_ms": 1.3, "fwdbwd_ms": 4.0}}
DECODE_TARGET_US = 20.0
CHUNK = 64

LINEAR_IMPLS = ("longattn", "fla", "lightning_attn", "torch_chunked")
GPU_IMPLS = ("longattn", "fla", "lightning_attn", "sdpa")
CPU_IMPLS = ("longattn", "torch_chunked", "fla", "lightning_attn", "sdpa")
DECODE_IMPLS = ("longattn", "fla", "torch_eager")
SCALING_IMPLS = ("longattn", "fla", "lightning_attn")
SECTIONS = ("check", "decode", "spec", "scaling", "fla")
MAX_RESTARTS = 6


class WrongResult(RuntimeError):
    pass


def log(*a):
    print(*a, flush=True)


def err_str(e: BaseException, limit: int = 1500) -> str:
    s = f"{type(e).__name__}: {e}".strip()
    if not str(e).strip():  # e.g. a bare assert: say where it was raised
        tb = traceback.extract_tb(e.__traceback__)
        if tb:
            f = tb[-1]
            s += f" at {Path(f.filename).name}:{f.lineno} `{(f.line or '').strip()}`"
    return s if len(s) <= limit else s[:limit] + " ..."


def shape_key(shape) -> str:
    return "x".join(str(x) for x in shape)


# ----------------------------------------------------------------------------------------------
# Reference math (chunked, float64 by default) and the torch-eager baselines


def decode_step(q, k, v, slopes, initial_state, scale=1.0, dtype=torch.float32):
    """One recurrent step, T = 1: q, k [B,1,H,D], v [B,1,H,E], S0 [B,H,D,E] -> (o, S_1)."""
    lam = torch.exp(-slopes.to(device=q.device, dtype=dtype))[None, :, None, None]
    S = (
        lam * initial_state.to(dtype)
        + k[:, 0].to(dtype)[..., :, None] * v[:, 0].to(dtype)[..., None, :]
    )
    o = scale * torch.einsum("bhd,bhde->bhe", q[:, 0].to(dtype), S)
    return o[:, None].to(q.dtype), S


def rel_err(a, b) -> float:
    a = a.detach().to(torch.float64)
    b = b.detach().to(device=a.device, dtype=torch.float64)
    if not bool(torch.isfinite(a).all()):
        return float("nan")
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def finite_or_raise(what, *tensors):
    for t in tensors:
        if t is not None and not bool(torch.isfinite(t).all()):
            raise WrongResult(f"non-finite values in {what}")


# ----------------------------------------------------------------------------------------------
# Implementations


class Impl:
    name = "?"
    layout = "BTHD"  # or "BHTD"
    linear = True
    package = None  # distribution name for the version
    _fn = None

    def __init__(self):
        self.error = None
        self.version = None
        self.where = None
        try:
            self.load()
        except Exception as e:  # noqa: BLE001 - every import failure is a result
            self.error = err_str(e)
        if self.package:
            try:
                self.version = importlib.metadata.version(self.package)
            except importlib.metadata.PackageNotFoundError:
                self.version = None

    def load(self):
        pass

    def prep_slopes(self, slopes):
        return slopes

    def forward(self, q, k, v, s):
        raise NotImplementedError

    def info(self):
        return {"version": self.version, "import_error": self.error, "module": self.where}


class LongattnImpl(Impl):
    name = "longattn"
    package = "longattn"

    def load(self):
        import longattn

        self.mod = longattn
        self.where = getattr(longattn, "__file__", None)
        if self.version is None:
            self.version = getattr(longattn, "__version__", None)
        self.mod.lightning_attn  # noqa: B018 - raise now if the op is missing

    def forward(self, q, k, v, s):
        return self.mod.lightning_attn(q, k, v, s, scale=1.0)[0]


class FlaImpl(Impl):
    name = "fla"
    package = "fla-core"

    def load(self):
        from fla.ops.simple_gla import chunk_simple_gla

        self.fn = chunk_simple_gla
        self.where = sys.modules["fla"].__file__
        try:
            from fla.ops.simple_gla import fused_recurrent_simple_gla

            self.recurrent = fused_recurrent_simple_gla
        except Exception as e:  # noqa: BLE001
            self.recurrent = None
            self.recurrent_error = err_str(e)

    def prep_slopes(self, slopes):
        return (-slopes.float()).contiguous()

    def forward(self, q, k, v, s):
        return self.fn(q, k, v, g_gamma=s, scale=1.0)[0]


class LightningAttnImpl(Impl):
    name = "lightning_attn"
    package = "lightning-attn"
    layout = "BHTD"

    def load(self):
        from lightning_attn.ops import lightning_attn_func

        self.fn = lightning_attn_func
        self.where = sys.modules["lightning_attn"].__file__

    def prep_slopes(self, slopes):
        return slopes.float().reshape(-1, 1, 1).contiguous()

    def forward(self, q, k, v, s):
        return self.fn(q, k, v, s)


class SdpaImpl(Impl):
    name = "sdpa"
    layout = "BHTD"
    linear = False

    def load(self):
        self.version = torch.__version__

    def forward(self, q, k, v, s):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class TorchChunkedImpl(Impl):
    name = "torch_chunked"

    def load(self):
        self.version = torch.__version__

    def forward(self, q, k, v, s):
        return lightning_attn_chunked(q, k, v, s, 1.0, dtype=torch.float32)[0]


IMPL_CLASSES = {
    c.name: c for c in (LongattnImpl, FlaImpl, LightningAttnImpl, SdpaImpl, TorchChunkedImpl)
}


# ----------------------------------------------------------------------------------------------
# Timing


class Timer:
    def __init__(self, cuda: bool, warmup_ms: float, rep_ms: float):
        self.cuda = cuda
        self.warmup_ms = warmup_ms
        self.rep_ms = rep_ms
        if cuda:
            import triton.testing

            self.do_bench = triton.testing.do_bench

    def __call__(self, fn) -> dict:
        if self.cuda:
            p20, p50, p80 = self.do_bench(
                fn, warmup=self.warmup_ms, rep=self.rep_ms, quantiles=[0.2, 0.5, 0.8]
            )
            return {"ms": p50, "p20_ms": p20, "p80_ms": p80}
        t_end = time.perf_counter() + self.warmup_ms / 1e3
        fn()
        while time.perf_counter() < t_end:
            fn()
        times = []
        t_end = time.perf_counter() + self.rep_ms / 1e3
        while (time.perf_counter() < t_end or len(times) < 3) and len(times) < 1000:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        q = statistics.quantiles(times, n=10, method="inclusive")
        return {"ms": statistics.median(times), "p20_ms": q[1], "p80_ms": q[7]}


def cuda_alive() -> bool:
    try:
        torch.cuda.synchronize()
        x = torch.ones(4, device="cuda")
        return float((x + 1).sum().item()) == 8.0
    except Exception:  # noqa: BLE001
        return False


def graph_replay_us(fn, n_inner=50, n_replay=20) -> float:
    """Device time per call from replaying a CUDA graph of n_inner back-to-back calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(n_inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(n_replay):
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / n_inner)
    del g
    return statistics.median(times)


def eager_loop_us(fn, cuda: bool, n=200) -> float:
    """Wall time per call of n back-to-back eager calls (host overhead included)."""
    for _ in range(5):
        fn()
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / n


# ----------------------------------------------------------------------------------------------
# Cost model


def io_bytes(B, T, H, D, E, es):
    n = B * T * H
    fwd = n * (2 * D + 2 * E) * es
    bwd = n * (4 * D + 3 * E) * es
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}


def flops(impl_linear: bool, B, T, H, D, E):
    if impl_linear:
        f = B * T * H * (4 * D * E + CHUNK * (D + E))
        return {"fwd": f, "bwd": 2 * f, "fwdbwd": 3 * f}
    f = B * H * T * T * (D + E)
    return {"fwd": f, "bwd": 2.5 * f, "fwdbwd": 3.5 * f}


# ----------------------------------------------------------------------------------------------
# The run


class Bench:
    def __init__(self, args):
        self.args = args
        self.cuda = not args.cpu
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
            args.dtype or ("fp32" if args.cpu else "bf16")
        ]
        self.es = torch.empty((), dtype=self.dtype).element_size()
        self.timer = Timer(self.cuda, args.warmup, args.rep)
        self.out = Path(args.out)
        self.t_start = time.time()
        env_deadline = os.environ.get("_LONGATTN_BENCH_DEADLINE")
        if env_deadline:
            self.deadline = float(env_deadline)
        elif args.budget_s and args.budget_s > 0:
            self.deadline = self.t_start + args.budget_s
        else:
            self.deadline = None
        self.data = None
        if args.resume and self.out.exists():
            try:
                self.data = json.loads(self.out.read_text())
                log(f"resuming from {self.out} (restart {self.data.get('restarts', 0)})")
            except Exception as e:  # noqa: BLE001
                log(f"cannot resume from {self.out}: {err_str(e)}")
        if self.data is None:
            self.data = self.new_data()
        elif not os.environ.get("_LONGATTN_BENCH_RESTART"):
            # A resume asked for by hand (a new build, peers carried this time): try everything
            # that was disabled, skipped or not importable again.
            self.data["disabled_impls"] = {}
            self.data["restarts"] = 0
        self.data["complete"] = False
        self.disabled = self.data.setdefault("disabled_impls", {})
        names = args.impls.split(",") if args.impls else list(CPU_IMPLS if args.cpu else GPU_IMPLS)
        self.impls = {}
        for n in names:
            if n not in IMPL_CLASSES:
                raise SystemExit(f"unknown impl {n!r}; known: {', '.join(IMPL_CLASSES)}")
            self.impls[n] = IMPL_CLASSES[n]()
        self.fla = self.impls.get("fla") or FlaImpl()
        self.longattn = self.impls.get("longattn") or LongattnImpl()
        peers = self.data.setdefault("peers", {})
        for n, impl in {**self.impls, "fla": self.fla, "longattn": self.longattn}.items():
            peers[n] = impl.info()
        self.save()

    # -- bookkeeping ---------------------------------------------------------------------------

    def new_data(self):
        d = {
            "schema": 1,
            "benchmark": "lightning",
            "date": datetime.date.today().isoformat(),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda,
            "device": "cpu" if not self.cuda else "cuda",
            "dtype": str(self.dtype).replace("torch.", ""),
            "settings": {
                "timer": (
                    "triton.testing.do_bench median (p20/p80 kept)"
                    if self.cuda
                    else "perf_counter loop median"
                ),
                "warmup_ms": self.args.warmup,
                "rep_ms": self.args.rep,
                "fwd": "one forward on inputs that require grad",
                "fwdbwd": "forward + torch.autograd.grad((o * do).sum(), [q, k, v])",
                "bwd": "torch.autograd.grad(o, [q, k, v], do, retain_graph=True) on a retained "
                "forward graph (backward kernels alone)",
                "calls": {
                    "longattn": "longattn.lightning_attn(q, k, v, slopes, scale=1.0) [B,T,H,D]",
                    "fla": "fla.ops.simple_gla.chunk_simple_gla(q, k, v, g_gamma=-slopes, "
                    "scale=1.0) [B,T,H,D]; decode: fused_recurrent_simple_gla(..., "
                    "initial_state=h0, output_final_state=True)",
                    "lightning_attn": "lightning_attn.ops.lightning_attn_func(q, k, v, "
                    "slopes.reshape(H, 1, 1)) [B,H,T,D], scale 1, no state",
                    "sdpa": "F.scaled_dot_product_attention(q, k, v, is_causal=True) [B,H,T,D]",
                },
                "scaling": "forward only, on inputs that do not require grad",
                "decode": "T=1 with initial_state and output_final_state=True; do_bench median "
                "(L2 flushed between calls), CUDA-graph replay of 50 calls, and an eager loop",
                "loss_overhead": "torch.autograd.grad((x * do).sum(), x) on an o-sized x: the "
                "part of fwdbwd that is the loss, not the op",
                "hbm_GBps": self.args.hbm_gbps,
                "bytes": "fwd B*T*H*(2D+2E)*es, bwd B*T*H*(4D+3E)*es, fwdbwd their sum",
                "flops_linear": "fwd B*T*H*(4*D*E + 64*(D+E)), bwd 2x fwd",
                "flops_sdpa": "fwd B*H*T^2*(D+E) (causal), bwd 2.5x fwd",
                "slopes": "longattn.lightning_slopes(H) (ALiBi ladder), else the same ladder in "
                "torch",
                "inputs": "q, k ~ N(0,1)*D^-0.25, v, do ~ N(0,1), in dtype",
            },
            "targets": {"train": TARGETS, "decode_us": DECODE_TARGET_US},
            "restarts": 0,
        }
        d["git_commit"] = None
        try:
            head = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--verify", "-q", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            if re.fullmatch(r"[0-9a-f]{40}", head):
                d["git_commit"] = head
        except Exception:  # noqa: BLE001
            pass
        if self.cuda:
            p = torch.cuda.get_device_properties(0)
            d["gpu"] = p.name
            d["gpu_capability"] = f"{p.major}.{p.minor}"
            d["gpu_sms"] = p.multi_processor_count
            d["gpu_memory_GiB"] = round(p.total_memory / 2**30, 1)
            try:
                import triton

                d["triton"] = triton.__version__
            except Exception as e:  # noqa: BLE001
                d["triton"] = err_str(e)
            try:
                d["driver"] = subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                ).stdout.strip()
            except Exception:  # noqa: BLE001
                d["driver"] = None
        else:
            d["gpu"] = "cpu"
            d["cpu"] = platform.processor() or platform.machine()
            d["threads"] = torch.get_num_threads()
            try:
                import triton

                d["triton"] = triton.__version__
            except Exception:  # noqa: BLE001
                d["triton"] = None
        return d

    def save(self):
        self.data["elapsed_s"] = round(
            self.data.get("elapsed_prev_s", 0.0) + time.time() - self.t_start, 1
        )
        self.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out.with_suffix(self.out.suffix + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.out)

    def over_budget(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def restart(self, impl_name: str, why: str):
        """The CUDA context is gone: disable the culprit, save, re-execute with --resume."""
        self.disabled[impl_name] = why
        self.data["restarts"] = self.data.get("restarts", 0) + 1
        self.data["elapsed_prev_s"] = self.data.get("elapsed_prev_s", 0.0) + (
            time.time() - self.t_start
        )
        self.t_start = time.time()
        self.save()
        if self.data["restarts"] > MAX_RESTARTS:
            log(f"CUDA fault in {impl_name}; too many restarts, stopping: {why}")
            sys.exit(3)
        log(f"CUDA fault in {impl_name}; restarting with --resume: {why}")
        argv = [a for a in sys.argv if a != "--resume"] + ["--resume"]
        env = dict(os.environ, _LONGATTN_BENCH_RESTART="1")
        if self.deadline is not None:
            env["_LONGATTN_BENCH_DEADLINE"] = str(self.deadline)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *argv], env)

    def fail(self, impl_name: str, e: BaseException, store: dict, key: str = "error") -> str:
        """Record an exception as an error string in store[key] (saved at once); restart the
        process when the CUDA context is dead."""
        s = err_str(e)
        oom = isinstance(e, torch.OutOfMemoryError)
        if oom:
            s = "OOM: " + s
            if self.cuda:
                torch.cuda.empty_cache()
        store[key] = s
        if key != "error":
            store.setdefault("error", f"{key.removesuffix('_error')}: {s}")
        if self.args.verbose:
            traceback.print_exception(e)
        fake = os.environ.get("_LONGATTN_BENCH_TEST_FAULT") == impl_name  # tests the restart
        if (self.cuda and not oom and not cuda_alive()) or fake:
            self.restart(impl_name, s)
        return s

    def usable(self, impl) -> str | None:
        if impl.error:
            return "import failed: " + impl.error
        if impl.name in self.disabled:
            return "disabled after a CUDA fault earlier in this run: " + self.disabled[impl.name]
        return None

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def free(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()

    # -- inputs --------------------------------------------------------------------------------

    def slopes(self, H):
        try:
            if self.longattn.error is None and hasattr(self.longattn.mod, "lightning_slopes"):
                return self.longattn.mod.lightning_slopes(H).to(self.device, torch.float32)
        except Exception as e:  # noqa: BLE001
            log(f"lightning_slopes({H}) failed, using the torch ladder: {err_str(e)}")

        def ladder(n):
            return [2.0 ** (-8.0 * (h + 1) / n) for h in range(n)]

        p = 2 ** int(math.floor(math.log2(H)))
        s = ladder(p) + ladder(2 * p)[0::2][: H - p]
        return torch.tensor(s, dtype=torch.float32, device=self.device)

    def inputs(self, B, T, H, D, E, seed=0):
        g = torch.Generator(device=self.device).manual_seed(seed)

        def rnd(*shape, scale=1.0):
            x = torch.randn(*shape, generator=g, device=self.device, dtype=torch.float32)
            return (x * scale).to(self.dtype)

        q = rnd(B, T, H, D, scale=D**-0.25)
        k = rnd(B, T, H, D, scale=D**-0.25)
        v = rnd(B, T, H, E)
        do = rnd(B, T, H, E)
        return q, k, v, do

    @staticmethod
    def to_layout(impl, *xs):
        """Fresh tensors (new leaves) in the implementation's layout."""
        if impl.layout == "BHTD":
            return [x.detach().transpose(1, 2).contiguous() for x in xs]
        return [x.detach().contiguous() for x in xs]

    @staticmethod
    def from_layout(impl, x):
        return x.transpose(1, 2) if impl.layout == "BHTD" else x

    def mem_ok(self, B, T, H, D, E) -> str | None:
        if not self.cuda:
            return None
        free, _ = torch.cuda.mem_get_info()
        t = B * T * H * max(D, E) * self.es
        states = 2 * B * math.ceil(T / CHUNK) * H * D * E * 4
        need = 20 * t + states
        if need > 0.9 * free:
            return f"skipped: needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        return None

    # -- sections ------------------------------------------------------------------------------

    def run_check(self):
        """Correctness on one shape vs a float64 reference: all linear implementations without
        state (o, dq, dk, dv), then longattn and fla with initial and final state (o, S_T, dq,
        dk, dv, dS0, and ds for longattn)."""
        sec = self.data.setdefault("check", {})
        B, T, H, D = CPU_CHECK_SHAPE if self.args.cpu else CHECK_SHAPE
        E = D
        sec["shape"] = {"B": B, "T": T, "H": H, "D": D, "E": E}
        tol = 1e-3 if self.dtype == torch.float32 else 2e-2
        sec["tolerance"] = tol
        log(f"== check B={B} T={T} H={H} D=E={D} (tolerance {tol})")
        q, k, v, do = self.inputs(B, T, H, D, E, seed=1)
        slopes = self.slopes(H)
        ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
        o_ref, _ = lightning_attn_chunked(*ref_leaves, slopes, 1.0)
        ref_grads = torch.autograd.grad((o_ref * do.double()).sum(), ref_leaves)
        o_ref = o_ref.detach()

        def judge(r):
            # ds sums (t+1)(q.dq - k.dk) over all tokens: cancellation, so a looser bound
            bad = [
                n
                for n, x in r.items()
                if isinstance(x, float) and not x <= (5 * tol if n == "ds" else tol)
            ]
            r["ok"] = not bad
            if bad:
                r["error"] = "wrong result: rel err " + ", ".join(f"{n}={r[n]:.3g}" for n in bad)

        # A: no state; every linear implementation.
        res_a = sec.setdefault("no_state", {})
        impls = [self.longattn, self.fla] + [
            self.impls[n] for n in ("lightning_attn", "torch_chunked") if n in self.impls
        ]
        outs = {}
        for impl in impls:
            name = impl.name
            if not pending(res_a.get(name)):
                continue
            why = self.usable(impl)
            if why:
                res_a[name] = {"error": why, "ok": False}
                continue
            r = res_a[name] = {"ok": False}
            try:
                s = impl.prep_slopes(slopes)
                leaves = [x.requires_grad_() for x in self.to_layout(impl, q, k, v)]
                (do_l,) = self.to_layout(impl, do)
                o = impl.forward(*leaves, s)
                grads = torch.autograd.grad((o * do_l).sum(), leaves)
                self.sync()
                o = self.from_layout(impl, o.detach())
                grads = [self.from_layout(impl, g_) for g_ in grads]
                r["o"] = rel_err(o, o_ref)
                for nm, g_, gr in zip(("dq", "dk", "dv"), grads, ref_grads, strict=True):
                    r[nm] = rel_err(g_, gr)
                judge(r)
                outs[name] = o
            except Exception as e:  # noqa: BLE001
                self.fail(name, e, r)
            log(f"   no_state   {name:15s} " + ", ".join(f"{a}={fmt_num(b)}" for a, b in r.items()))
            self.save()
        if "longattn" in outs and "fla" in outs:
            sec["longattn_vs_fla_o"] = rel_err(outs["longattn"], outs["fla"])
            log(f"   longattn vs fla: o rel err = {sec['longattn_vs_fla_o']:.3g}")
        del outs

        # B: initial state and final state; longattn and fla (the official kernel has no state).
        res_b = sec.setdefault("with_state", {})
        gen = torch.Generator(device=self.device).manual_seed(2)
        h0 = 0.1 * torch.randn(B, H, D, E, generator=gen, device=self.device)
        dsT = torch.randn(B, H, D, E, generator=gen, device=self.device)
        ref = [x.detach().double().requires_grad_() for x in (q, k, v, h0, slopes)]
        o_r, s_r = lightning_attn_chunked(*ref[:3], ref[4], 1.0, initial_state=ref[3])
        loss = (o_r * do.double()).sum() + (s_r * dsT.double()).sum()
        g_r = torch.autograd.grad(loss, ref)
        o_r, s_r = o_r.detach(), s_r.detach()
        for impl in (self.longattn, self.fla):
            name = impl.name
            if not pending(res_b.get(name)):
                continue
            why = self.usable(impl)
            if why:
                res_b[name] = {"error": why, "ok": False}
                continue
            r = res_b[name] = {"ok": False}
            try:
                lv = [x.detach().clone().requires_grad_() for x in (q, k, v)]
                hl = h0.clone().requires_grad_()
                if name == "longattn":
                    sl = slopes.clone().requires_grad_()
                    o, sT = impl.mod.lightning_attn(
                        *lv, sl, scale=1.0, initial_state=hl, output_final_state=True
                    )
                    wrt = [*lv, hl, sl]
                else:
                    o, sT = impl.fn(
                        *lv,
                        g_gamma=impl.prep_slopes(slopes),
                        scale=1.0,
                        initial_state=hl,
                        output_final_state=True,
                    )
                    wrt = [*lv, hl]
                loss = (o.float() * do.float()).sum() + (sT.float() * dsT).sum()
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
                self.sync()
                r["o"] = rel_err(o, o_r)
                r["final_state"] = rel_err(sT, s_r)
                for nm, g_, gr in zip(("dq", "dk", "dv", "dS0", "ds"), grads, g_r, strict=False):
                    r[nm] = rel_err(g_, gr) if g_ is not None else float("nan")
                judge(r)
            except Exception as e:  # noqa: BLE001
                self.fail(name, e, r)
            log(f"   with_state {name:15s} " + ", ".join(f"{a}={fmt_num(b)}" for a, b in r.items()))
            self.save()
        self.free()

    def run_train_shape(self, set_name, shape):
        B, T, H, D = shape
        E = D
        key = shape_key(shape)
        sec = self.data.setdefault("train", {})
        entry = sec.setdefault(key, {})
        entry.update(
            {
                "set": set_name,
                "shape": {"B": B, "T": T, "H": H, "D": D, "E": E},
                "target": TARGETS.get(key),
                "bytes": io_bytes(B, T, H, D, E, self.es),
            }
        )
        entry["floor_ms"] = {
            m: b / (self.args.hbm_gbps * 1e9) * 1e3 for m, b in entry["bytes"].items()
        }
        res = entry.setdefault("results", {})
        todo = [n for n in self.impls if pending(res.get(n))]
        if not todo:
            return
        if self.over_budget():
            for n in todo:
                res[n] = {"skipped": "time budget"}
            self.save()
            return
        why_mem = self.mem_ok(B, T, H, D, E)
        if why_mem:
            for n in todo:
                res[n] = {"skipped": why_mem}
            self.save()
            return
        log(f"== train {set_name} B={B} T={T} H={H} D={D}")
        q, k, v, do = self.inputs(B, T, H, D, E)
        slopes = self.slopes(H)
        if "loss_overhead_ms" not in entry:
            try:
                x = torch.randn_like(do).requires_grad_()
                entry["loss_overhead_ms"] = self.timer(
                    lambda: torch.autograd.grad((x * do).sum(), x)
                )["ms"]
                del x
            except Exception as e:  # noqa: BLE001
                entry["loss_overhead_ms"] = None
                self.fail("loss", e, entry, "loss_overhead_error")
        outs, grads = {}, {}
        for name in todo:
            impl = self.impls[name]
            if self.over_budget():
                res[name] = {"skipped": "time budget"}
                continue
            why = self.usable(impl)
            if why:
                res[name] = {"error": why}
                log(f"   {name:15s} {fmt_num(why)}")
                self.save()
                continue
            r = res[name] = {}
            fl = flops(impl.linear, B, T, H, D, E)
            try:
                o, g_ = self.bench_train_impl(impl, q, k, v, do, slopes, r)
                if impl.linear and o is not None:
                    outs[name] = o
                    if g_ is not None:
                        grads[name] = g_
            except Exception as e:  # noqa: BLE001
                self.fail(name, e, r)
            for m in ("fwd", "bwd", "fwdbwd"):
                t = r.get(f"{m}_ms")
                if t:
                    r[f"{m}_GBps"] = entry["bytes"][m] / (t * 1e-3) / 1e9
                    r[f"{m}_TFLOPs"] = fl[m] / (t * 1e-3) / 1e12
                    r[f"{m}_x_floor"] = t / entry["floor_ms"][m]
            log(f"   {name:15s} " + fmt_result(r))
            self.free()
            self.save()
        # Cross-checks between the linear implementations (bf16 vs bf16).
        base = "fla" if "fla" in outs else ("longattn" if "longattn" in outs else None)
        if base:
            for name, o in outs.items():
                if name == base:
                    continue
                c = {"o": rel_err(o, outs[base])}
                if name in grads and base in grads:
                    for nm, a, b in zip(("dq", "dk", "dv"), grads[name], grads[base], strict=True):
                        c[nm] = rel_err(a, b)
                res[name][f"rel_err_vs_{base}"] = c
                worst = max(c.values())
                if not worst <= 5e-2:  # two bf16 roundings differ by ~1e-2, not more
                    res[name]["warning"] = f"disagrees with {base}: rel diff " + ", ".join(
                        f"{a}={b:.3g}" for a, b in c.items()
                    )
                log(f"   {name} vs {base}: " + ", ".join(f"{a}={b:.3g}" for a, b in c.items()))
        del outs, grads  # q, k, v, do go when this returns
        self.free()
        self.save()

    def bench_train_impl(self, impl, q, k, v, do, slopes, r):
        s = impl.prep_slopes(slopes)
        q_, k_, v_, do_ = self.to_layout(impl, q, k, v, do)
        leaves = [x.requires_grad_() for x in (q_, k_, v_)]

        def fwd():
            return impl.forward(*leaves, s)

        def fwdbwd():
            o = fwd()
            return torch.autograd.grad((o * do_).sum(), leaves)

        # forward
        try:
            o_first = fwd()
            self.sync()
            finite_or_raise("forward output", o_first)
            o_first = self.from_layout(impl, o_first.detach())
            r.update(prefixed("fwd", self.timer(fwd)))
        except Exception as e:  # noqa: BLE001
            self.fail(impl.name, e, r, "fwd_error")
            return None, None
        # forward + backward
        grads = None
        try:
            grads = fwdbwd()
            self.sync()
            finite_or_raise("gradients", *grads)
            grads = [self.from_layout(impl, g_.detach()) for g_ in grads]
            r.update(prefixed("fwdbwd", self.timer(fwdbwd)))
        except Exception as e:  # noqa: BLE001
            self.fail(impl.name, e, r, "fwdbwd_error")
            grads = None
        # backward alone on a retained graph
        if "fwdbwd_error" not in r:
            try:
                o = fwd()

                def bwd():
                    return torch.autograd.grad(o, leaves, do_, retain_graph=True)

                r.update(prefixed("bwd", self.timer(bwd)))
                del o
            except Exception as e:  # noqa: BLE001
                self.fail(impl.name, e, r, "bwd_error")
        errs = [f"{m}: {r[m + '_error']}" for m in ("fwd", "fwdbwd", "bwd") if m + "_error" in r]
        if errs:
            r["error"] = "; ".join(errs)
        return o_first, grads

    def run_decode(self, B):
        H, D = CPU_DECODE_HD if self.args.cpu else DECODE_HD
        E = D
        key = f"B{B}"
        sec = self.data.setdefault("decode", {})
        entry = sec.setdefault(key, {})
        state_bytes = 2 * B * H * D * E * 4 + B * H * (2 * D + 2 * E) * self.es
        entry.update(
            {
                "shape": {"B": B, "T": 1, "H": H, "D": D, "E": E},
                "target_us": DECODE_TARGET_US if B == 1 else None,
                "bytes": state_bytes,
                "floor_us": state_bytes / (self.args.hbm_gbps * 1e9) * 1e6,
            }
        )
        res = entry.setdefault("results", {})
        todo = [n for n in DECODE_IMPLS if pending(res.get(n))]
        if self.args.impls:
            todo = [n for n in todo if n in self.impls or n == "torch_eager"]
        if not todo:
            return
        log(f"== decode B={B} H={H} D=E={D}")
        g = torch.Generator(device=self.device).manual_seed(3)

        def rnd(*shape, scale=1.0):
            return torch.randn(*shape, generator=g, device=self.device) * scale

        q = rnd(B, 1, H, D, scale=D**-0.25).to(self.dtype)
        k = rnd(B, 1, H, D, scale=D**-0.25).to(self.dtype)
        v = rnd(B, 1, H, E).to(self.dtype)
        h0 = rnd(B, H, D, E, scale=0.1)
        slopes = self.slopes(H)
        o_ref, s_ref = decode_step(q, k, v, slopes, h0, dtype=torch.float64)
        neg = (-slopes).contiguous()
        fns = {}
        if "longattn" in todo:
            why = self.usable(self.longattn)
            if why:
                res["longattn"] = {"error": why}
            else:
                mod = self.longattn.mod
                fns["longattn"] = lambda: mod.lightning_attn(
                    q, k, v, slopes, scale=1.0, initial_state=h0, output_final_state=True
                )
        if "fla" in todo:
            why = self.usable(self.fla)
            if why:
                res["fla"] = {"error": why}
            elif self.fla.recurrent is None:
                res["fla"] = {"error": "no fused_recurrent_simple_gla: " + self.fla.recurrent_error}
            else:
                rec = self.fla.recurrent
                fns["fla"] = lambda: rec(
                    q, k, v, g_gamma=neg, scale=1.0, initial_state=h0, output_final_state=True
                )
        if "torch_eager" in todo:
            fns["torch_eager"] = lambda: decode_step(q, k, v, slopes, h0)
        for name, fn in fns.items():
            if self.over_budget():
                res[name] = {"skipped": "time budget"}
                continue
            r = res[name] = {}
            try:
                o, sT = fn()
                self.sync()
                r["rel_err_o"] = rel_err(o, o_ref)
                r["rel_err_state"] = rel_err(sT, s_ref)
                tol = 1e-3 if self.dtype == torch.float32 else 2e-2
                if not (r["rel_err_o"] <= tol and r["rel_err_state"] <= 1e-3):
                    r["error"] = (
                        f"wrong result: rel err o={r['rel_err_o']:.3g} "
                        f"state={r['rel_err_state']:.3g}"
                    )
                t = self.timer(fn)
                r["us"] = t["ms"] * 1e3
                r["p20_us"] = t["p20_ms"] * 1e3
                r["p80_us"] = t["p80_ms"] * 1e3
                r["eager_loop_us"] = eager_loop_us(fn, self.cuda)
            except Exception as e:  # noqa: BLE001
                self.fail(name, e, r)
            if self.cuda and "us" in r:
                try:
                    r["graph_us"] = graph_replay_us(fn)
                except Exception as e:  # noqa: BLE001
                    r["graph_error"] = err_str(e)
                    if not cuda_alive():
                        self.restart(name, "CUDA graph capture: " + r["graph_error"])
            if "us" in r:
                r["GBps"] = state_bytes / (r.get("graph_us", r["us"]) * 1e-6) / 1e9
            log(f"   {name:15s} " + ", ".join(f"{a}={fmt_num(b)}" for a, b in r.items()))
            self.save()
        self.free()

    def run_scaling(self):
        B, H, D = CPU_SCALING_BHD if self.args.cpu else SCALING_BHD
        E = D
        sec = self.data.setdefault("scaling", {})
        for T in CPU_SCALING_T if self.args.cpu else SCALING_T:
            key = f"T{T}"
            entry = sec.setdefault(key, {})
            entry["shape"] = {"B": B, "T": T, "H": H, "D": D, "E": E}
            entry["bytes_fwd"] = io_bytes(B, T, H, D, E, self.es)["fwd"]
            res = entry.setdefault("results", {})
            names = [n for n in SCALING_IMPLS if n in self.impls]
            todo = [n for n in names if pending(res.get(n))]
            if not todo:
                continue
            log(f"== scaling B={B} T={T} H={H} D={D}")
            q, k, v, _ = self.inputs(B, T, H, D, E)
            slopes = self.slopes(H)
            for name in todo:
                impl = self.impls[name]
                if self.over_budget():
                    res[name] = {"skipped": "time budget"}
                    continue
                why = self.usable(impl)
                if why:
                    res[name] = {"error": why}
                    continue
                r = res[name] = {}
                try:
                    s = impl.prep_slopes(slopes)
                    ql, kl, vl = self.to_layout(impl, q, k, v)
                    o = impl.forward(ql, kl, vl, s)
                    self.sync()
                    finite_or_raise("forward output", o)
                    del o
                    t = self.timer(lambda: impl.forward(ql, kl, vl, s))  # noqa: B023
                    r["fwd_ms"] = t["ms"]
                    r["fwd_p20_ms"], r["fwd_p80_ms"] = t["p20_ms"], t["p80_ms"]
                    r["ns_per_token"] = t["ms"] * 1e6 / (B * T)
                    r["fwd_GBps"] = entry["bytes_fwd"] / (t["ms"] * 1e-3) / 1e9
                    r["fwd_TFLOPs"] = flops(True, B, T, H, D, E)["fwd"] / (t["ms"] * 1e-3) / 1e12
                except Exception as e:  # noqa: BLE001
                    self.fail(name, e, r)
                log(f"   {name:15s} " + ", ".join(f"{a}={fmt_num(b)}" for a, b in r.items()))
                self.save()
            del q, k, v
            self.free()

    def run(self):
        sections = self.args.sections.split(",") if self.args.sections else list(SECTIONS)
        spec = self.args.shapes and [tuple(int(x) for x in s.split("x")) for s in self.args.shapes]
        for sec in sections:
            if sec not in SECTIONS:
                raise SystemExit(f"unknown section {sec!r}; known: {', '.join(SECTIONS)}")
        for sec in sections:
            if sec == "check":
                self.run_check()
            elif sec == "decode":
                for B in [int(b) for b in self.args.decode_batches.split(",") if b]:
                    self.run_decode(B)
            elif sec == "spec":
                for shape in spec or (CPU_SPEC_SHAPES if self.args.cpu else SPEC_SHAPES):
                    self.run_train_shape("spec", shape)
            elif sec == "fla":
                if spec:
                    continue
                for shape in CPU_FLA_SHAPES if self.args.cpu else FLA_SHAPES:
                    self.run_train_shape("fla", shape)
            elif sec == "scaling":
                self.run_scaling()
        self.data["complete"] = "time budget" not in json.dumps(self.data)
        self.data["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.save()


# ----------------------------------------------------------------------------------------------
# Printing


def pending(r) -> bool:
    """Whether a measurement is still to do: missing, skipped, or never started because its
    implementation was disabled or did not import."""
    if r is None or "skipped" in r:
        return True
    return str(r.get("error", "")).startswith(("disabled after", "import failed"))


def prefixed(mode, t):
    return {f"{mode}_ms": t["ms"], f"{mode}_p20_ms": t["p20_ms"], f"{mode}_p80_ms": t["p80_ms"]}


def fmt_num(x):
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, str) and len(x) > 160:
        return x[:160] + "..."
    return str(x)


def fmt_result(r):
    if "skipped" in r:
        return r["skipped"]
    parts = []
    for m in ("fwd", "bwd", "fwdbwd"):
        if f"{m}_ms" in r:
            parts.append(f"{m} {r[f'{m}_ms']:.4g} ms ({r.get(f'{m}_GBps', 0):.0f} GB/s)")
    if "error" in r:
        parts.append("ERROR " + fmt_num(r["error"]))
    return "; ".join(parts)


def cell(r, key, scale=1.0):
    if r is None:
        return "-"
    if key in r:
        return f"{r[key] * scale:.4g}"
    if "skipped" in r:
        return "skip"
    return "FAIL" if "error" in r else "-"


def print_summary(d):
    log("")
    log(
        f"== summary: {d.get('gpu')}  torch {d.get('torch')}  triton {d.get('triton')}  "
        f"dtype {d.get('dtype')}"
    )
    for n, p in d.get("peers", {}).items():
        log(f"   {n:15s} version {p.get('version')}  {p.get('import_error') or ''}")
    chk = d.get("check", {})
    if chk:
        log(f"-- check {chk.get('shape')} (tol {chk.get('tolerance')})")
        for part in ("no_state", "with_state"):
            for n, r in chk.get(part, {}).items():
                errs = ", ".join(f"{a}={b:.2e}" for a, b in r.items() if isinstance(b, float))
                log(
                    f"   {part:10s} {n:15s} {'ok' if r.get('ok') else 'FAIL'} {errs} "
                    f"{fmt_num(r.get('error', ''))}"
                )
        if "longattn_vs_fla_o" in chk:
            log(f"   longattn vs fla: o rel err {chk['longattn_vs_fla_o']:.3e}")
    train = d.get("train", {})
    if train:
        names = sorted(
            {n for e in train.values() for n in e.get("results", {})},
            key=lambda n: (n != "longattn", n),
        )
        for mode in ("fwd", "bwd", "fwdbwd"):
            log(f"-- {mode} ms (x = peer / longattn)")
            hdr = f"   {'shape':18s} {'floor':>7s} {'target':>7s}" + "".join(
                f" {n[:14]:>14s}" for n in names
            )
            log(hdr)
            for key, e in train.items():
                res = e.get("results", {})
                la = res.get("longattn", {}).get(f"{mode}_ms")
                tgt = (e.get("target") or {}).get(f"{mode}_ms")
                row = f"   {key:18s} {e['floor_ms'][mode]:7.3f} {tgt if tgt else '':>7}"
                for n in names:
                    r = res.get(n)
                    c = cell(r, f"{mode}_ms")
                    if la and r and f"{mode}_ms" in r and n != "longattn":
                        c += f" x{r[f'{mode}_ms'] / la:.2f}"
                    row += f" {c:>14s}"
                log(row)
    dec = d.get("decode", {})
    for key, e in dec.items():
        log(
            f"-- decode {key} {e.get('shape')}: floor {e['floor_us']:.2f} us, target "
            f"{e.get('target_us')} us"
        )
        for n, r in e.get("results", {}).items():
            log(
                f"   {n:15s} do_bench {cell(r, 'us')} us  graph {cell(r, 'graph_us')} us  "
                f"eager {cell(r, 'eager_loop_us')} us  {fmt_num(r.get('error', ''))}"
            )
    sc = d.get("scaling", {})
    if sc:
        names = sorted(
            {n for e in sc.values() for n in e.get("results", {})},
            key=lambda n: (n != "longattn", n),
        )
        log("-- scaling (fwd): ms and ns/token")
        log("   " + f"{'T':>7s}" + "".join(f" {n[:22]:>22s}" for n in names))
        for e in sc.values():
            row = f"   {e['shape']['T']:7d}"
            for n in names:
                r = e["results"].get(n)
                if r and "fwd_ms" in r:
                    row += f" {r['fwd_ms']:10.4g} {r['ns_per_token']:8.3g}ns"
                else:
                    row += f" {cell(r, 'fwd_ms'):>22s}"
            log(row)
    log(
        f"-- complete: {d.get('complete')}  elapsed {d.get('elapsed_s')} s  restarts "
        f"{d.get('restarts')}  disabled {d.get('disabled_impls') or '-'}"
    )


def slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="results JSON (default benchmarks/results/<date>-<gpu>.json)")
    ap.add_argument("--cpu", action="store_true", help="tiny shapes on the CPU: a smoke test")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default bf16 (fp32 --cpu)")
    ap.add_argument("--warmup", type=float, default=25.0, help="do_bench warmup, ms")
    ap.add_argument("--rep", type=float, default=100.0, help="do_bench repetition time, ms")
    ap.add_argument("--impls", help=f"comma list from {', '.join(IMPL_CLASSES)}")
    ap.add_argument("--sections", help=f"comma list from {', '.join(SECTIONS)} (default all)")
    ap.add_argument("--shapes", nargs="*", help="override the spec shapes, e.g. 4x32768x32x128")
    ap.add_argument("--decode-batches", default="1,16", help="decode batch sizes (default 1,16)")
    ap.add_argument("--hbm-gbps", type=float, default=4300.0, help="bandwidth for the floor")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting new measurements after this many seconds (0: no limit); "
        "what is left is recorded as skipped",
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from --out, redoing only missing or skipped measurements",
    )
    ap.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --cpu for the smoke test")
    if not args.out:
        name = "cpu" if args.cpu else slug(torch.cuda.get_device_name(0))
        args.out = str(REPO / "benchmarks" / "results" / f"{datetime.date.today()}-{name}.json")
    torch.manual_seed(0)
    log(f"bench_lightning: out={args.out} device={'cpu' if args.cpu else 'cuda'}")
    b = Bench(args)
    for n, p in b.data["peers"].items():
        log(
            f"   peer {n:15s} version {p.get('version')} {p.get('module') or ''} "
            f"{('IMPORT ERROR ' + p['import_error']) if p.get('import_error') else ''}"
        )
    b.run()
    print_summary(b.data)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

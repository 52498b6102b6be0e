#!/usr/bin/env python3
"""Write docs/benchmarks.md and PNG plots under docs/img/ from the JSON results of the benchmarks.

Usage:
    python3 benchmarks/report.py                       # every benchmarks/results/*.json (GPU runs)
    python3 benchmarks/report.py RESULT.json [...] [--md docs/benchmarks.md] [--img-dir docs/img]

Each results file gets its own section (newest first): correctness, one table per training mode
(fwd, bwd, fwd+bwd) with the memory floor, the target, longattn's time, GB/s and TFLOP/s,
every peer's time and longattn's speedup over it (peer ms / longattn ms: above 1 means longattn
is faster), the decode table and the time-per-token table.  Failures and skips are shown in the
cells and listed with their error strings under the section.

Lightning results (``*-lightning.json``, a dict from bench_lightning.py) come first.  Then each
``*-rat.json``, ``*-landmark.json``, ``*-nsa.json`` and ``*-nsa_selection.json`` (a JSON list of
records {"op", "impl", shape fields, "dtype", "direction", "ms" or "error", ...} from
bench_rat.py, bench_landmark.py, bench_nsa.py, bench_nsa_selection.py) gets a section: one table
per op (rows: shapes; columns: each impl's ms per direction and longattn's speed-up over the
fastest peer), the targets marked MET / MISSED, the failed peers with the first line of
their error, and a log-log plot of the main op's time against T (``docs/img/<family>-<stem>.png``).
Per-call overhead results (a dict with "bench": "overhead" from bench_overhead.py) come last.
Records with "device": "cpu" are skipped unless --include-cpu.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = (("fwd", "forward"), ("bwd", "backward"), ("fwdbwd", "forward + backward"))
PEER_LABEL = {
    "longattn": "longattn",
    "fla": "fla chunk_simple_gla",
    "lightning_attn": "lightning-attn (official)",
    "sdpa": "SDPA causal (dense)",
    "torch_chunked": "torch eager (chunked)",
    "torch_eager": "torch eager",
}
SHORT = {
    "fla": "fla",
    "lightning_attn": "lightning-attn",
    "sdpa": "SDPA",
    "torch_chunked": "torch",
    "torch_eager": "torch",
}
ORDER = ("longattn", "fla", "lightning_attn", "sdpa", "torch_chunked", "torch_eager")


def order(names):
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(s)).strip("-").lower() or "x"


def fnum(x, digits=3):
    if x is None:
        return "–"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


class Notes:
    """Numbered footnotes for failures and skips."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, text: str) -> int:
        text = " ".join(str(text).split())
        if len(text) > 400:
            text = text[:400] + " …"
        if text in self.items:
            return self.items.index(text) + 1
        self.items.append(text)
        return len(self.items)


def status_cell(r, key, notes: Notes, where: str, fmt=fnum):
    """The value of r[key], or 'fail [n]' / 'skip [n]' with a footnote."""
    if r is None:
        return "–"
    if r.get(key) is not None:
        err = str(r.get("error") or "")
        if "wrong result" in err or r.get("warning"):
            n = notes.add(f"{where}: {err if 'wrong result' in err else r['warning']}")
            return f"{fmt(r[key])} ⚠[{n}]"
        return fmt(r[key])
    if "skipped" in r:
        n = notes.add(f"{where}: skipped: {r['skipped']}")
        return f"skip [{n}]"
    mode = key.removesuffix("_ms").removesuffix("_us")
    err = r.get("error") or r.get(f"{mode}_error")
    if err:
        n = notes.add(f"{where}: {err}")
        return f"fail [{n}]"
    return "–"


def speedup(peer_ms, la_ms):
    if not peer_ms or not la_ms:
        return "–"
    return f"{peer_ms / la_ms:.2f}×"


def table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------


def section_header(d, path: Path):
    peers = d.get("peers", {})

    def ver(n):
        p = peers.get(n) or {}
        v = p.get("version") or "?"
        return f"{v} (import failed)" if p.get("import_error") else v

    lines = [
        f"## {d.get('gpu', '?')}, {d.get('date', '?')}",
        "",
        f"Source: `{path_rel(path)}`; torch {d.get('torch')}, triton {d.get('triton')}, CUDA "
        f"{d.get('cuda_runtime')}, driver {d.get('driver') or '?'}, {d.get('dtype')}. longattn "
        f"{ver('longattn')} (commit {(d.get('git_commit') or '?')[:10]}), fla-core {ver('fla')}, "
        f"lightning-attn {ver('lightning_attn')}."
        + (
            ""
            if d.get("complete")
            else " **Incomplete run** (time budget or restarts): some cells are skipped."
        )
        + (f" Restarted {d['restarts']}× after CUDA faults." if d.get("restarts") else ""),
        "",
    ]
    st = d.get("settings", {})
    if st:
        lines += [
            f"Timer: {st.get('timer')}, warmup {st.get('warmup_ms')} ms, rep {st.get('rep_ms')} ms."
            f" fwd: {st.get('fwd')}. fwd+bwd: {st.get('fwdbwd')}. bwd: {st.get('bwd')}."
            f" Memory floor: bytes at {st.get('hbm_GBps')} GB/s ({st.get('bytes')}). FLOPs:"
            f" linear {st.get('flops_linear')}; SDPA {st.get('flops_sdpa')}. Speedup columns are"
            " peer time / longattn time (above 1: longattn is faster).",
            "",
        ]
    return lines


def path_rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def check_section(d, notes: Notes):
    chk = d.get("check")
    if not chk:
        return []
    sh = chk.get("shape", {})
    lines = [
        f"### Correctness (B={sh.get('B')}, T={sh.get('T')}, H={sh.get('H')}, D=E={sh.get('D')};"
        f" relative error vs float64, tolerance {chk.get('tolerance')})",
        "",
    ]
    cols = ("o", "final_state", "dq", "dk", "dv", "dS0", "ds")
    rows = []
    for part, label in (("no_state", "no state"), ("with_state", "initial + final state")):
        for n in order(chk.get(part, {})):
            r = chk[part][n]
            row = [PEER_LABEL.get(n, n), label]
            for c in cols:
                v = r.get(c)
                row.append(f"{v:.2e}" if isinstance(v, float) else "–")
            if r.get("ok"):
                row.append("ok")
            else:
                row.append(f"**fail** [{notes.add(f'check {label} {n}: ' + str(r.get('error')))}]")
            rows.append(row)
    lines += [table(["impl", "case", *cols, "result"], rows), ""]
    if "longattn_vs_fla_o" in chk:
        lines += [
            f"longattn vs fla, output: relative difference {chk['longattn_vs_fla_o']:.2e}.",
            "",
        ]
    return lines


def train_sections(d, notes: Notes, img_prefix: str, img_dir: Path, img_rel: str | None):
    train = d.get("train")
    if not train:
        return []
    names = order({n for e in train.values() for n in e.get("results", {})})
    peers = [n for n in names if n != "longattn"]
    lines = []
    for mode, label in MODES:
        lines += [f"### Training, {label} (ms)", ""]
        header = ["B×T×H×D", "set", "floor", "target", "longattn", "GB/s", "TFLOP/s"]
        for p in peers:
            header += [SHORT.get(p, p), f"vs {SHORT.get(p, p)}"]
        if mode == "fwdbwd":
            header.append("loss part")
        rows = []
        for key, e in train.items():
            res = e.get("results", {})
            la = res.get("longattn")
            la_ms = (la or {}).get(f"{mode}_ms")
            where = key
            tgt = (e.get("target") or {}).get(f"{mode}_ms")
            tcell = "–"
            if tgt:
                tcell = f"≤ {tgt}" + ((" ✓" if la_ms <= tgt else " ✗") if la_ms else "")
            row = [
                key.replace("x", "×"),
                e.get("set", ""),
                fnum(e.get("floor_ms", {}).get(mode)),
                tcell,
                status_cell(la, f"{mode}_ms", notes, f"longattn {where}"),
                fnum((la or {}).get(f"{mode}_GBps"), 4),
                fnum((la or {}).get(f"{mode}_TFLOPs")),
            ]
            for p in peers:
                r = res.get(p)
                row.append(status_cell(r, f"{mode}_ms", notes, f"{p} {where}"))
                row.append(speedup((r or {}).get(f"{mode}_ms"), la_ms))
            if mode == "fwdbwd":
                row.append(fnum(e.get("loss_overhead_ms")))
            rows.append(row)
        lines += [table(header, rows), ""]
    lines += [
        "floor: the memory floor (bytes moved at the measured copy bandwidth). `loss part`: the "
        "time of the `(o * do).sum()` loss and its backward alone, included in every fwd+bwd "
        "time.",
        "",
    ]
    # cross-checks
    xs = []
    for key, e in train.items():
        for n, r in e.get("results", {}).items():
            for k, c in r.items():
                if k.startswith("rel_err_vs_"):
                    xs.append(
                        [key.replace("x", "×"), n, k.removeprefix("rel_err_vs_")]
                        + [f"{c[m]:.2e}" if m in c else "–" for m in ("o", "dq", "dk", "dv")]
                    )
    if xs:
        lines += [
            "Agreement between implementations on the timed inputs (relative difference, bf16 "
            "vs bf16):",
            "",
            table(["shape", "impl", "vs", "o", "dq", "dk", "dv"], xs),
            "",
        ]
    if img_rel is not None:
        for key, e in train.items():
            name = f"{img_prefix}-{slug(key)}.png"
            if plot_shape(key, e, img_dir / name):
                lines.append(f"![{key}]({img_rel}/{name})")
        lines.append("")
    return lines


def decode_section(d, notes: Notes):
    dec = d.get("decode")
    if not dec:
        return []
    lines = ["### Decode (T = 1, initial state in, final state out; µs)", ""]
    names = order({n for e in dec.values() for n in e.get("results", {})})
    peers = [n for n in names if n != "longattn"]
    header = ["B×H×D×E", "floor", "target", "longattn (graph)", "longattn (do_bench)", "eager loop"]
    for p in peers:
        header += [
            f"{SHORT.get(p, p)} (graph)",
            f"{SHORT.get(p, p)} (do_bench)",
            f"vs {SHORT.get(p, p)}",
        ]
    rows = []
    for key, e in dec.items():
        sh = e.get("shape", {})
        res = e.get("results", {})
        la = res.get("longattn")
        la_t = (la or {}).get("graph_us") or (la or {}).get("us")
        tgt = e.get("target_us")
        tcell = "–"
        if tgt:
            tcell = f"< {tgt}" + ((" ✓" if la_t < tgt else " ✗") if la_t else "")
        where = f"decode {key}"
        row = [
            f"{sh.get('B')}×{sh.get('H')}×{sh.get('D')}×{sh.get('E')}",
            fnum(e.get("floor_us")),
            tcell,
            status_cell(la, "graph_us", notes, f"longattn {where}"),
            status_cell(la, "us", notes, f"longattn {where}"),
            fnum((la or {}).get("eager_loop_us")),
        ]
        for p in peers:
            r = res.get(p) or {}
            row.append(status_cell(r, "graph_us", notes, f"{p} {where}"))
            row.append(status_cell(r, "us", notes, f"{p} {where}"))
            row.append(speedup(r.get("graph_us") or r.get("us"), la_t))
        rows.append(row)
    lines += [
        table(header, rows),
        "",
        "graph: device time per call from replaying a CUDA graph of 50 calls (state warm in L2); "
        "do_bench: median of single calls with L2 flushed between them; eager loop: wall time per "
        "call of 200 back-to-back eager calls (host overhead included). The speedup uses graph "
        "times where both have them. floor: the state read and written once at the copy rate.",
        "",
    ]
    return lines


def scaling_section(d, notes: Notes, img_prefix: str, img_dir: Path, img_rel: str | None):
    sc = d.get("scaling")
    if not sc:
        return []
    first = next(iter(sc.values()))["shape"]
    names = order({n for e in sc.values() for n in e.get("results", {})})
    peers = [n for n in names if n != "longattn"]
    lines = [
        f"### Time per token, forward (B={first['B']}, H={first['H']}, D=E={first['D']})",
        "",
    ]
    header = ["T", "longattn ms", "ns/token", "GB/s"]
    for p in peers:
        header += [f"{SHORT.get(p, p)} ms", "ns/token", f"vs {SHORT.get(p, p)}"]
    rows = []
    for key, e in sc.items():
        res = e.get("results", {})
        la = res.get("longattn")
        la_ms = (la or {}).get("fwd_ms")
        where = f"scaling {key}"
        row = [
            e["shape"]["T"],
            status_cell(la, "fwd_ms", notes, f"longattn {where}"),
            fnum((la or {}).get("ns_per_token")),
            fnum((la or {}).get("fwd_GBps"), 4),
        ]
        for p in peers:
            r = res.get(p)
            row += [
                status_cell(r, "fwd_ms", notes, f"{p} {where}"),
                fnum((r or {}).get("ns_per_token")),
                speedup((r or {}).get("fwd_ms"), la_ms),
            ]
        rows.append(row)
    lines += [table(header, rows), ""]
    if img_rel is not None:
        name = f"{img_prefix}-scaling.png"
        if plot_scaling(sc, img_dir / name):
            lines += [f"![time against sequence length]({img_rel}/{name})", ""]
    return lines


# ----------------------------------------------------------------------------------------------
# Plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scaling(sc, path: Path) -> bool:
    plt = _plt()
    names = order({n for e in sc.values() for n in e.get("results", {})})
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    any_line = False
    for n in names:
        pts = [
            (e["shape"]["T"], e["results"][n]["fwd_ms"], e["results"][n]["ns_per_token"])
            for e in sc.values()
            if n in e.get("results", {}) and e["results"][n].get("fwd_ms")
        ]
        if not pts:
            continue
        any_line = True
        ts, ms, ns = zip(*pts, strict=True)
        ax1.plot(ts, ms, marker="o", label=PEER_LABEL.get(n, n))
        ax2.plot(ts, ns, marker="o", label=PEER_LABEL.get(n, n))
    if not any_line:
        plt.close(fig)
        return False
    first = next(iter(sc.values()))["shape"]
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("forward time (ms)")
    ax2.set_ylabel("ns per token")
    ax2.set_ylim(bottom=0)
    ax1.legend(fontsize=8)
    fig.suptitle(f"lightning attention forward, B={first['B']} H={first['H']} D={first['D']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_shape(key, e, path: Path) -> bool:
    plt = _plt()
    res = e.get("results", {})
    names = [n for n in order(res) if any(res[n].get(f"{m}_ms") for m, _ in MODES)]
    if not names:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [res[n].get(f"{m}_ms") or 0 for m, _ in MODES]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(MODES))]
        bars = ax.bar(xs, vals, width, label=PEER_LABEL.get(n, n))
        for b, v in zip(bars, vals, strict=True):
            if v:
                ax.annotate(
                    f"{v:.3g}",
                    (b.get_x() + b.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    floor = e.get("floor_ms", {})
    tgt = e.get("target") or {}
    for j, (m, _) in enumerate(MODES):
        if floor.get(m):
            ax.hlines(floor[m], j - 0.45, j + 0.45, colors="k", linestyles=":", lw=1)
        if tgt.get(f"{m}_ms"):
            ax.hlines(tgt[f"{m}_ms"], j - 0.45, j + 0.45, colors="r", linestyles="--", lw=1)
    ax.set_xticks(range(len(MODES)), [label for _, label in MODES])
    ax.set_yscale("log")
    ax.set_ylabel("ms (log scale)")
    title = f"B×T×H×D = {key.replace('x', '×')}: dotted = memory floor"
    if tgt:
        title += ", dashed = target"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------
# RAT, landmark and NSA: results files holding a JSON list of records, one per (op, impl, shape,
# direction): {"op", "impl", shape fields, "dtype", "direction", "ms" | "error", ...}.

DIRS = ("fwd", "bwd", "fwd+bwd", "decode")
NOT_SHAPE = {"op", "impl", "direction", "ms", "tflops", "GB/s", "gbps", "error", "dtype"}
NOT_SHAPE |= {"device", "rel_diff_vs_longattn", "warning", "skipped", "runs_ms"}
FIELD_ORDER = ("T", "B", "G", "Hq", "Hkv", "H", "D", "L", "C", "block_size", "topk", "mode")

FAMILIES = {
    "rat": {
        "title": "RAT attention",
        "scripts": ("bench_rat.py",),
        "intro": "`rat_attn`: recurrence inside chunks of L tokens (a gated linear scan), softmax "
        "attention over the chunk-final states across chunks (the official benchmark's Config2: "
        "H 16, D 128, L 16, B·T = 64K tokens). Peers: torch SDPA causal on the same q/k/v "
        "(dense attention, cuDNN; a speed reference, not the same math) and the official RAT "
        "core (CLAIRE-Labo/RAT: compiled associative scan + FlexAttention + merge). Decode: one "
        "token of the RATCache step at 4K context, batch 512, against SDPA over a full KV cache.",
        "labels": {
            "longattn": "longattn",
            "sdpa": "SDPA",
            "official": "official RAT core",
            "longattn-ratcache": "longattn RATCache step",
            "longattn-ratcache-chunk-end": "longattn RATCache chunk-completing step",
            "sdpa-kvcache": "SDPA over KV cache",
            "decode": "decode",
        },
        "ours": ("longattn", "longattn-ratcache", "longattn-ratcache-chunk-end"),
        "main": "rat_attn",
    },
    "landmark": {
        "title": "Landmark attention",
        "scripts": ("bench_landmark.py",),
        "intro": "`landmark_attn`: causal attention with one landmark token per block whose "
        "softmax gates the block (grouped softmax), B 1, H 32, D 128, block 64 and 51. Peers: "
        "torch SDPA causal (dense, cuDNN; the reference of the targets) and the official "
        "Triton kernel (epfml/landmark-attention, block 64 only). Retrieval decode: one token "
        "over a 32K cache, top-k 8 blocks (`landmark_topk_blocks` then `landmark_attn` on the "
        "chosen blocks; the two parts also timed alone) against SDPA decode over the full cache.",
        "labels": {
            "longattn": "longattn",
            "sdpa": "SDPA",
            "official": "official Triton kernel",
            "retrieval_decode": "longattn retrieval decode",
            "topk_only": "longattn top-k alone",
            "attn_only": "longattn attention alone",
            "sdpa_decode": "SDPA decode (full cache)",
        },
        "ours": ("longattn", "retrieval_decode", "topk_only", "attn_only"),
        "split": "block_size",
        "primary_split": "64",
        "main": "landmark_attn",
    },
    "nsa": {
        "title": "NSA attention",
        "scripts": ("bench_nsa.py",),
        "intro": "`nsa_selected_attn`: each query group attends to its top-n KV blocks (B_K 64, "
        "n 16, Hkv 4, D 128, G query heads per KV head, one sequence; the same random valid "
        "block indices for every implementation); fwd and bwd timed separately (bwd on a "
        "retained graph). Peers: FSA (Relaxed-System-Lab/Flash-Sparse-Attention, patched to "
        "compile on Triton 3.6), the NSA reference (XunhaoLai/native-sparse-attention-triton) "
        "and fla's `parallel_nsa`. Full layer: `nsa_attn` (compressed + selected + sliding "
        "window 512) fwd+bwd against dense SDPA causal (cuDNN). Runs: T = 64K comes from a "
        "second run (KV-outer forward up to G = 8); longattn's 64K numbers for G = 1, 4, 8 from "
        "a third (dQ from the KV-outer dK/dV kernel); longattn's bwd at T ≤ 32K and at G = 2 "
        "predates that change (query-outer dQ, 5–8× slower at G = 1). G = 16 at 16K and 64K "
        "(and G = 1 at 64K) from a fourth run: the 4-warp split-key query-outer kernels (G > 8; "
        "before them 51.7 / 117 ms at 64K); G = 16 at 8K and 32K predates them.",
        "labels": {
            "longattn": "longattn",
            "fsa": "FSA",
            "nsa_ref": "NSA ref",
            "fla": "fla",
            "longattn_nsa_attn": "longattn nsa_attn",
            "sdpa_causal": "SDPA causal",
        },
        "ours": ("longattn", "longattn_nsa_attn"),
        "main": "nsa_selected_attn",
    },
    "nsa_selection": {
        "title": "NSA selection",
        "scripts": ("bench_nsa_selection.py",),
        "spec": "nsa",
        "intro": "The NSA selection stage (one sequence, D 128, Hkv 4, compression l 32 / d 16, "
        "B_K 64, top-16): `nsa_topk_blocks` alone (lse given), `selection` = compressed "
        "attention + block scores + top-k (longattn's `nsa_compressed_attn` then "
        "`nsa_topk_blocks`, against the NSA reference's `compressed_attention(..., topk=16)`), "
        "and `nsa_compress` (mean / linear with positional encoding) forward and backward.",
        "labels": {"longattn": "longattn", "nsa_ref": "NSA ref"},
        "ours": ("longattn",),
        "main": "selection",
    },
}
FAMILIES["cpu"] = {
    "title": "CPU kernels",
    "scripts": ("bench_cpu.py",),
    "intro": "Every family's CPU kernel, forward + backward in float32 on the machine's threads, "
    "against the same math in torch eager on the same threads: `lightning_attn_chunked` and "
    "`rat_attn_chunked` (the references' chunked forms), SDPA causal for landmark (its target's "
    "yardstick), and for the NSA branches the dense masked softmax with the branch's mask "
    "(`nsa_dense_masked_attn`: what the math costs without a sparse kernel).",
    "labels": {"longattn": "longattn", "eager": "torch eager", "sdpa": "SDPA causal"},
    "ours": ("longattn",),
    "targets_heading": 'Targets (the "Performance targets" sections of docs/api/lightning.md, '
    "rat.md, landmark.md, nsa.md):",
    "plot": False,
}
FAMILY_ORDER = ("lightning", *FAMILIES)


def family_of(path: Path, data) -> str:
    stem = path.stem
    for fam in sorted(FAMILY_ORDER, key=len, reverse=True):
        if stem == fam or stem.endswith("-" + fam):
            return fam
    return "lightning" if isinstance(data, dict) else "other"


def norm_dirs(r) -> list[str]:
    d = r.get("direction")
    if d is None:
        return []  # every direction of its op
    d = str(d).replace("fwdbwd", "fwd+bwd")
    return [d] if d in DIRS or "/" not in d else [x.strip() for x in d.split("/")]


def short_err(e) -> str:
    line = next((x.strip() for x in str(e).splitlines() if x.strip()), "?")
    return line if len(line) <= 200 else line[:200] + " …"


def fmt_field(k, v):
    if k == "T" and isinstance(v, int) and v >= 1024 and v % 1024 == 0:
        return f"{v // 1024}K"
    return "–" if v is None else str(v)


class Fam:
    """One list-of-records results file of a family."""

    def __init__(self, fam: str, recs: list[dict]):
        self.fam = fam
        self.cfg = FAMILIES.get(fam, {"title": fam, "labels": {}, "ours": ("longattn",)})
        self.split = self.cfg.get("split")
        self.recs = [r for r in recs if isinstance(r, dict) and r.get("impl") and r.get("op")]
        self.recs = [r for r in self.recs if r["op"] != "summary"]
        self.ops = list(dict.fromkeys(r["op"] for r in self.recs))
        self.split_ops = {
            op
            for op in self.ops
            if self.split and len({repr(r.get(self.split)) for r in self.recs if r["op"] == op}) > 1
        }
        main = self.cfg.get("main")
        if main in self.ops:
            self.ops.remove(main)
            self.ops.insert(0, main)

    def is_ours(self, impl: str) -> bool:
        return impl in self.cfg["ours"] or impl.startswith("longattn")

    def impl_key(self, r) -> str:
        v = r.get(self.split) if r["op"] in self.split_ops else None
        return r["impl"] if v is None else f"{r['impl']}@{v}"

    def label(self, key: str) -> str:
        impl, _, v = key.partition("@")
        lab = self.cfg["labels"].get(impl, impl)
        return f"{lab} (block {v})" if v else lab

    def impl_order(self, keys):
        known = list(self.cfg["labels"])

        def k(key):
            impl, _, v = key.partition("@")
            rank = known.index(impl) if impl in known else len(known)
            primary = v != self.cfg.get("primary_split", v)  # the headline block size first
            return (not self.is_ours(impl), rank, impl, primary, -int(v) if v.isdigit() else 0, v)

        return sorted(keys, key=k)

    def shape_fields(self, recs):
        split = {self.split} if recs and recs[0]["op"] in self.split_ops else set()
        fields = {k for r in recs for k in r if k not in NOT_SHAPE and k not in split}
        rank = {f: i for i, f in enumerate(FIELD_ORDER)}
        return sorted(fields, key=lambda f: (rank.get(f, len(rank)), f))

    def cells(self, op):
        """{(shape tuple, impl key, direction): record}, the row fields and the directions."""
        recs = [r for r in self.recs if r["op"] == op]
        fields = self.shape_fields(recs)
        vary = [f for f in fields if len({repr(r.get(f)) for r in recs}) > 1]
        const = [f for f in fields if f not in vary]
        dirs = [d for d in DIRS if any(d in norm_dirs(r) for r in recs)]
        extra = sorted({d for r in recs for d in norm_dirs(r)} - set(DIRS))
        dirs += extra
        out = {}
        for r in recs:
            shape = tuple(r.get(f) for f in vary)
            for d in norm_dirs(r) or dirs or ["fwd"]:
                key = (shape, self.impl_key(r), d)
                if key not in out or out[key].get("ms") is None:
                    out[key] = r
        if not dirs:
            dirs = ["fwd"]
        return out, vary, const, dirs, recs


def row_sort_key(shape):
    return tuple((0, v, "") if isinstance(v, int | float) else (1, 0, str(v)) for v in shape)


def ms_of(cells, shape, impl, d):
    r = cells.get((shape, impl, d))
    return r.get("ms") if r else None


def op_table(F: Fam, op, failures: dict):
    cells, vary, const, dirs, recs = F.cells(op)
    impls = F.impl_order({k[1] for k in cells})
    ours = [i for i in impls if F.is_ours(i.partition("@")[0])]
    peers = [i for i in impls if i not in ours]
    primary = ours[0] if ours else None
    shapes = sorted({k[0] for k in cells}, key=row_sort_key)
    cols = [(i, d) for i in impls for d in dirs if any((s, i, d) in cells for s in shapes)]
    thr = []
    for d in dirs:
        for key, name in (("tflops", "TFLOP/s"), ("GB/s", "GB/s"), ("gbps", "GB/s")):
            if any(ms_of(cells, s, primary, d) and cells[(s, primary, d)].get(key) for s in shapes):
                thr.append((d, key, name))
                break
    header = list(vary) + [f"{F.label(i)} {d}" for i, d in cols]
    header += [f"{F.label(primary)} {d} {name}" for d, _, name in thr]
    sp_dirs = [
        d for d in dirs if peers and primary and any((s, primary, d) in cells for s in shapes)
    ]
    header += [f"speed-up {d}" for d in sp_dirs]
    rows = []
    for s in shapes:
        where = " ".join(f"{f}={fmt_field(f, v)}" for f, v in zip(vary, s, strict=True))
        row = [fmt_field(f, v) for f, v in zip(vary, s, strict=True)]
        for i, d in cols:
            r = cells.get((s, i, d))
            if r is None:
                row.append("–")
            elif r.get("ms") is not None:
                row.append(fnum(r["ms"]))
            elif r.get("error"):
                k = (F.label(i), short_err(r["error"]))
                failures.setdefault(k, ({}, {}))[0][d] = None
                failures[k][1][where or op] = None
                row.append(f"failed [{list(failures).index(k) + 1}]")
            else:
                row.append("–")
        for d, key, _ in thr:
            r = cells.get((s, primary, d))
            row.append(fnum(r.get(key)) if r and r.get("ms") is not None else "–")
        for d in sp_dirs:
            la = ms_of(cells, s, primary, d)
            best = [(ms_of(cells, s, p, d), F.label(p)) for p in peers]
            best = sorted(b for b in best if b[0])
            if la and best:
                row.append(f"{best[0][0] / la:.2f}× vs {best[0][1]}")
            else:
                row.append("–")
        rows.append(row)
    consts = [f"{f} = {fmt_field(f, recs[0].get(f))}" for f in const if recs[0].get(f) is not None]
    dtypes = sorted({str(r.get("dtype")) for r in recs if r.get("dtype")})
    cap = f"### `{op}` (ms; {', '.join(consts + dtypes)})"
    lines = [cap, "", table(header, rows), ""]
    if sp_dirs:
        lines += [
            f"speed-up = fastest peer's time / {F.label(primary)}'s time, per direction: above "
            "1× longattn is faster, below 1× it is slower by the inverse factor.",
            "",
        ]
    return lines


# Targets (thresholds after the "Performance targets" of docs/api/<family>.md): each a list of
# (text, status) per op.


def _status(ok):
    return "no data" if ok is None else ("**MET**" if ok else "**MISSED**")


def _find(recs, op, impl, d, **shape):
    for r in recs:
        if r.get("op") != op or r.get("impl") != impl or r.get("ms") is None:
            continue
        if d not in (norm_dirs(r) or [d]):
            continue
        if all(r.get(k) == v for k, v in shape.items()):
            return r["ms"]
    return None


def targets_rat(recs, _other):
    out = {"rat_attn": [], "rat_decode": []}
    for B, T, lim in ((16, 4096, 3.0), (4, 16384, 3.5), (1, 65536, 3.5)):
        ms = _find(recs, "rat_attn", "longattn", "fwd+bwd", B=B, T=T)
        got = f"{fnum(ms)} ms" if ms else "not measured"
        out["rat_attn"].append(
            (f"fwd+bwd ≤ {lim} ms at B{B}×T{T // 1024}K: {got}", None if ms is None else ms <= lim)
        )
    la = _find(recs, "rat_decode", "longattn-ratcache", "decode")
    sd = _find(recs, "rat_decode", "sdpa-kvcache", "decode")
    ok = None if not (la and sd) else sd / la >= 9
    got = f"{sd / la:.2f}× ({fnum(la)} vs {fnum(sd)} ms)" if la and sd else "not measured"
    out["rat_decode"].append((f"decode ≥ 9× faster than SDPA decode: {got}", ok))
    return out


def targets_landmark(recs, _other):
    out = {"landmark_attn": [], "landmark_decode": []}
    Ts = sorted({r["T"] for r in recs if r.get("op") == "landmark_attn" and r.get("T")})
    for d in ("fwd", "fwd+bwd"):
        for T in Ts:
            la = _find(recs, "landmark_attn", "longattn", d, T=T, block_size=64)
            sd = _find(recs, "landmark_attn", "sdpa", d, T=T)
            ok = None if not (la and sd) else la / sd <= 1.3
            got = f"{la / sd:.2f}× SDPA's time" if la and sd else "not measured"
            out["landmark_attn"].append((f"{d} ≤ 1.3× SDPA at T={fmt_field('T', T)}: {got}", ok))
    for d in ("fwd", "fwd+bwd"):
        for T in Ts:
            a = _find(recs, "landmark_attn", "longattn", d, T=T, block_size=64)
            b = _find(recs, "landmark_attn", "longattn", d, T=T, block_size=51)
            ok = None if not (a and b) else b / a <= 1.15
            got = f"{b / a:.2f}× block 64's time" if a and b else "not measured"
            out["landmark_attn"].append(
                (f"block 51 ≤ 1.15× block 64, {d} at T={fmt_field('T', T)}: {got}", ok)
            )
    la = _find(recs, "landmark_decode", "retrieval_decode", "fwd")
    sd = _find(recs, "landmark_decode", "sdpa_decode", "fwd")
    ok = None if not (la and sd) else sd / la >= 5
    got = f"{sd / la:.2f}× ({fnum(la)} vs {fnum(sd)} ms)" if la and sd else "not measured"
    out["landmark_decode"].append((f"retrieval decode ≥ 5× faster than SDPA decode: {got}", ok))
    return out


def targets_nsa(recs, _other):
    op = "nsa_selected_attn"
    out = {op: [], "nsa_layer": []}
    for G, lf, lb in ((1, 2, 3), (4, 3, 6), (16, 7, 17)):
        for d, lim in (("fwd", lf), ("bwd", lb)):
            ms = _find(recs, op, "longattn", d, T=65536, G=G)
            got = f"{fnum(ms)} ms" if ms else "not measured"
            out[op].append(
                (f"{d} ≤ {lim} ms at T=64K, G={G}: {got}", None if ms is None else ms <= lim)
            )
    keys = sorted({(r["T"], r["G"]) for r in recs if r.get("op") == op and "T" in r and "G" in r})
    lost, n = [], 0
    for T, G in keys:
        for d in ("fwd", "bwd"):
            la = _find(recs, op, "longattn", d, T=T, G=G)
            peers = {r["impl"] for r in recs if r.get("op") == op and r.get("impl") != "longattn"}
            best = [m for p in sorted(peers) if (m := _find(recs, op, p, d, T=T, G=G))]
            if la and best:
                n += 1
                if la > min(best):
                    lost.append(f"{d} T={fmt_field('T', T)} G={G}")
    txt = f"never slower than the fastest peer: slower in {len(lost)} of {n} (T, G, direction)"
    txt += " cells" + (f" ({', '.join(lost)})" if lost else "")
    out[op].append((txt, None if not n else not lost))
    la = _find(recs, "nsa_layer", "longattn_nsa_attn", "fwd+bwd", T=65536)
    sd = _find(recs, "nsa_layer", "sdpa_causal", "fwd+bwd", T=65536)
    got = f"{sd / la:.2f}×" if la and sd else "not measured at 64K"
    if not (la and sd):
        seen = [
            f"{sd2 / la2:.2f}× at T={fmt_field('T', T)}"
            for T in sorted({r["T"] for r in recs if r.get("op") == "nsa_layer" and "T" in r})
            if (la2 := _find(recs, "nsa_layer", "longattn_nsa_attn", "fwd+bwd", T=T))
            and (sd2 := _find(recs, "nsa_layer", "sdpa_causal", "fwd+bwd", T=T))
        ]
        got += f" (measured: {', '.join(seen)})" if seen else ""
    ok = None if not (la and sd) else sd / la >= 8
    out["nsa_layer"].append((f"full layer fwd+bwd at 64K ≥ 8× faster than SDPA: {got}", ok))
    return out


def targets_nsa_selection(recs, other):
    """other: the records of the NSA results file of the same run (selected forward times)."""
    res = []
    keys = sorted({(r["T"], r["G"]) for r in recs if r.get("op") == "selection" and "G" in r})
    for T, G in keys:
        sel = _find(recs, "selection", "longattn", "fwd", T=T, G=G)
        fwd = _find(other, "nsa_selected_attn", "longattn", "fwd", T=T, G=G)
        ok = None if not (sel and fwd) else sel <= fwd
        got = f"{fnum(sel)} vs {fnum(fwd)} ms" if sel and fwd else "no selected-forward time"
        res.append((f"  - T={fmt_field('T', T)} G={G}: {got}", ok))
    if not res:
        return {}
    met = sum(1 for _, ok in res if ok)
    known = sum(1 for _, ok in res if ok is not None)
    head = (
        f"selection (compressed attention + scores + top-k) no slower than the selected "
        f"forward (`nsa_selected_attn` fwd from the NSA results of the same run): met in {met} "
        f"of {known}",
        None if not known else met == known,
    )
    return {"selection": [head] + res}


def targets_cpu(recs, _other):
    """Eager time / longattn time ≥ 3 (landmark: longattn ≤ 1.5× SDPA), per op and shape."""
    out: dict = {}
    for r in recs:
        if r.get("impl") != "longattn" or r.get("ms") is None:
            continue
        op = r["op"]
        shape = {k: v for k, v in r.items() if k not in NOT_SHAPE and k != "threads"}
        where = ", ".join(f"{k} {fmt_field(k, v)}" for k, v in shape.items())
        if op == "landmark_attn":
            base = _find(recs, op, "sdpa", "fwd+bwd", **shape)
            ok = None if base is None else r["ms"] <= 1.5 * base
            got = f"{r['ms'] / base:.2f}× SDPA's time" if base else "not measured"
            text = f"fwd+bwd ≤ 1.5× SDPA causal ({where}): {got}"
        else:
            base = _find(recs, op, "eager", "fwd+bwd", **shape)
            ok = None if base is None else base / r["ms"] >= 3
            got = f"{base / r['ms']:.2f}×" if base else "not measured"
            text = f"fwd+bwd ≥ 3× faster than torch eager ({where}): {got}"
        out.setdefault(op, []).append((text, ok))
    return out


TARGETS = {
    "cpu": targets_cpu,
    "rat": targets_rat,
    "landmark": targets_landmark,
    "nsa": targets_nsa,
    "nsa_selection": targets_nsa_selection,
}


def plot_family(F: Fam, path: Path) -> bool:
    """Time against T (log-log) for the family's main op: one line per impl and direction."""
    op = F.cfg.get("main") or (F.ops[0] if F.ops else None)
    recs = [r for r in F.recs if r["op"] == op and r.get("ms") and r.get("T")]
    if not recs:
        return False
    # fix every field that does not follow T to its most common value (ties: smallest)
    fields = [f for f in F.shape_fields(recs) if f != "T"]
    by_t = {}
    for r in recs:
        for f in fields:
            by_t.setdefault((f, r["T"]), set()).add(repr(r.get(f)))
    free = [f for f in fields if any(len(by_t[(f, r["T"])]) > 1 for r in recs)]
    counts = {}
    for r in recs:
        k = tuple((f, r.get(f)) for f in free)
        counts[k] = counts.get(k, 0) + 1
    pick = min(counts, key=lambda k: (-counts[k], repr(k)))
    recs = [r for r in recs if tuple((f, r.get(f)) for f in free) == pick]
    lines = {}
    for r in recs:
        for d in norm_dirs(r) or ["fwd"]:
            lines.setdefault((F.impl_key(r), d), []).append((r["T"], r["ms"]))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i in F.impl_order({k[0] for k in lines}):
        for d in DIRS + tuple(sorted({k[1] for k in lines} - set(DIRS))):
            if (i, d) in lines:
                ts, ms = zip(*sorted(lines[(i, d)]), strict=True)
                style = "-" if F.is_ours(i.partition("@")[0]) else "--"
                ax.plot(ts, ms, style, marker="o", label=f"{F.label(i)} {d}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("ms (median)")
    sub = ", ".join(f"{f}={v}" for f, v in pick)
    ax.set_title(f"{F.cfg['title']}: {op}" + (f" ({sub})" if sub else ""), fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_title(path: Path, fam: str) -> str:
    stem = path.stem.removesuffix("-" + fam)
    m = re.match(r"(\d{4}-\d\d-\d\d)-?(.*)", stem)
    date, gpu = (m.group(1), m.group(2)) if m else ("?", stem)
    if fam == "cpu":
        return f"{date}"
    gpu = gpu.replace("-", " ").upper().replace("NVIDIA ", "NVIDIA ") if gpu else "?"
    return f"{gpu}, {date}"


def family_section(fam, path: Path, recs, other, img_dir: Path, img_rel: str | None):
    F = Fam(fam, recs)
    cfg = F.cfg
    lines = [f"## {cfg['title']}: {run_title(path, fam)}", ""]
    if cfg.get("intro"):
        lines += [cfg["intro"], ""]
    scripts = ", ".join(f"`benchmarks/{s}`" for s in cfg.get("scripts", ()))
    dts = sorted({str(r.get("dtype")) for r in F.recs if r.get("dtype")})
    alldirs = {d for r in F.recs for d in norm_dirs(r)}
    timer = "`triton.testing.do_bench` on the GPU"
    if all(r.get("device") == "cpu" for r in F.recs):
        threads = sorted({r.get("threads") for r in F.recs if r.get("threads")})
        timer = f"a perf_counter loop after one warm-up on {'/'.join(map(str, threads))} threads"
    elif any(r.get("device") == "cpu" for r in F.recs):
        timer = "`triton.testing.do_bench` on the GPU (a perf_counter loop for CPU records)"
    how = []
    if "fwd+bwd" in alldirs:
        how.append("fwd+bwd: the forward plus `torch.autograd.grad` of `(o * do).sum()`")
    if "bwd" in alldirs:
        how.append("bwd: `torch.autograd.grad(o, inputs, do)` on a retained forward graph")
    lines += [
        f"Source: `{path_rel(path)}` ({scripts or 'unknown script'}). Each time is the median "
        f"of {timer}, {'/'.join(dts) or '?'}, every implementation "
        "in one process on the same inputs"
        + "".join(f"; {h}" for h in how)
        + ". `failed [n]`: the numbered failures under the section.",
        "",
    ]
    if not F.recs:
        return lines + ["No records.", ""]
    failures: dict = {}
    tg = TARGETS[fam](F.recs, other) if fam in TARGETS else {}
    for op in F.ops:
        lines += op_table(F, op, failures)
        if tg.get(op):
            spec = cfg.get("spec", fam)
            default = f'Targets (docs/api/{spec}.md, "Performance targets"):'
            default = default if fam in FAMILIES else "Targets:"
            lines.append(cfg.get("targets_heading", default))
            lines.append("")
            for t, ok in tg[op]:
                if ok is None:
                    t = t.removesuffix(": not measured").removesuffix(": no selected-forward time")
                lines.append(f"{'' if t.startswith('  - ') else '- '}{t}: {_status(ok)}")
            lines.append("")
    if img_rel is not None and cfg.get("plot", True):
        stem = path.stem if re.fullmatch(r"[A-Za-z0-9._-]+", path.stem) else slug(path.stem)
        name = f"{fam}-{stem}.png"
        try:
            ok = plot_family(F, img_dir / name)
        except ImportError:
            ok = False
        if ok:
            lines += [f"![{cfg['title']}: time against T]({img_rel}/{name})", ""]
    if failures:
        lines += ["Failures (peers that failed, with the first line of their error):", ""]
        for n, ((impl, err), (dirs, where)) in enumerate(failures.items(), 1):
            lines.append(f"{n}. {impl} ({', '.join(dirs)}) at {'; '.join(where)}: `{err}`")
        lines.append("")
    return lines


# ----------------------------------------------------------------------------------------------


def load(f):
    try:
        return json.loads(Path(f).read_text())
    except Exception as e:  # noqa: BLE001
        print(f"skipping {f}: {e}", file=sys.stderr)
        return None


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def engine_section(d, path: Path) -> list[str]:
    """benchmarks/bench_engine.py: the Hopper engine against SDPA (landmark) and compiled
    FlexAttention (sliding window, NSA compressed branch), each longattn op also on its sm_80
    kernels."""
    out = [f"## Hopper attention engine: {d['gpu']}, {d.get('date', '?')}", ""]
    # runs before the engine's backward and pingpong switch timed neither
    has_pp = any("sm90_pingpong" in r.get("fwd", r.get("bs64_fwd", {})) for r in d["rows"])
    out += [
        f"`benchmarks/bench_engine.py`, `{path_rel(path)}`; torch {d.get('torch', '?')}, bfloat16, "
        "medians of `triton.testing.do_bench` (ms). *engine*: the sm_90a kernels "
        "(`cuda/attn_sm90.cuh`, `cuda/attn_bwd_sm90.cuh`); *sm80*: the same call with "
        "`LONGATTN_FORCE_SM80=1`"
        + ("; *pingpong*: the engine with `LONGATTN_SM90_PINGPONG=1`" if has_pp else "")
        + ". Landmark's backward runs the sm_80 kernels"
        + ("" if has_pp else "; so did every backward in this run")
        + ". TFLOP/s count the visible (causal, banded or compressed-causal) work of the forward.",
        "",
    ]

    def pp(x):
        return [fnum(x["sm90_pingpong"])] if has_pp else []

    lm = [r for r in d["rows"] if r["op"] == "landmark"]
    if lm:
        r0 = lm[0]
        out += [f"### `landmark_attn` (B = 1, H = {r0['H']}, D = {r0['D']})", ""]
        head = ["T", "SDPA fwd", "SDPA fwd+bwd"]
        for bs in (64, 51):
            head += [f"bs {bs} engine fwd"] + ([f"bs {bs} pingpong fwd"] if has_pp else [])
            head += [f"bs {bs} sm80 fwd", f"bs {bs} fwd+bwd"]
        head += ["engine fwd / SDPA (bs 64)", "engine TFLOP/s (bs 64)"]
        rows = []
        for r in lm:
            row = [fmt_field("T", r["T"]), fnum(r["sdpa_fwd"]), fnum(r["sdpa_fwdbwd"])]
            for bs in (64, 51):
                f = r[f"bs{bs}_fwd"]
                row += [fnum(f["sm90"])] + pp(f)
                row += [fnum(f["sm80"]), fnum(r[f"bs{bs}_fwdbwd"]["sm90"])]
            row += [f"{r['bs64_fwd']['sm90'] / r['sdpa_fwd']:.2f}×", f"{r['bs64_fwd_tflops']:.0f}"]
            rows.append(row)
        out += [table(head, rows), ""]
    for op, title in (
        ("window", "`sliding_window_attn`"),
        ("compressed", "`nsa_compressed_attn` (kernel 32, stride 16)"),
    ):
        rs = [r for r in d["rows"] if r["op"] == op]
        if not rs:
            continue
        extra = f", window {rs[0]['W']}" if op == "window" else ""
        out += [f"### {title} (B = 1, D = {rs[0]['D']}{extra})", ""]
        head = ["T", "Hq / Hkv", "Flex fwd", "Flex fwd+bwd", "engine fwd"]
        head += (["pingpong fwd"] if has_pp else []) + ["sm80 fwd", "engine fwd+bwd"]
        head += (["sm80 fwd+bwd"] if has_pp else []) + ["fwd speed-up vs Flex"]
        head += ["fwd+bwd speed-up vs Flex", "engine TFLOP/s"]
        rows = []
        for r in rs:
            rows.append(
                [fmt_field("T", r["T"]), f"{r['Hq']} / {r['Hkv']}"]
                + [fnum(r["flex_fwd"]), fnum(r["flex_fwdbwd"]), fnum(r["fwd"]["sm90"])]
                + pp(r["fwd"])
                + [fnum(r["fwd"]["sm80"]), fnum(r["fwdbwd"]["sm90"])]
                + ([fnum(r["fwdbwd"]["sm80"])] if has_pp else [])
                + [speedup(r["flex_fwd"], r["fwd"]["sm90"])]
                + [speedup(r["flex_fwdbwd"], r["fwdbwd"]["sm90"]), f"{r['fwd_tflops']:.0f}"]
            )
        out += [table(head, rows), ""]
    if d.get("note"):
        out += [d["note"], ""]
    return out


def overhead_table(runs, field: str, key: str, ratio: bool) -> str:
    """One row per case (or layer) of ``runs`` (label, results dict): each run's wall and CPU µs,
    then (``ratio``) the last run's wall time over SDPA's."""
    head = ["case" if key == "case" else key]
    for label, _ in runs:
        head += [f"{label} µs", f"{label} CPU µs"]
    head += [f"{runs[-1][0]} vs SDPA"] if ratio else []
    names = list(dict.fromkeys(r[key] for _, d in runs for r in d[field]))
    rows = []
    for name in names:
        found = [next((r for r in d[field] if r[key] == name), None) for _, d in runs]
        row = [name]
        for r in found:
            row += [f"{r['median_us']:.1f}", f"{r['cpu_us']:.1f}"] if r else ["—", "—"]
        if ratio:
            row.append(f"{found[-1]['ratio']:.2f}×" if found[-1] else "—")
        rows.append(row)
    return table(head, rows)


def overhead_section(runs) -> list[str]:
    """benchmarks/bench_overhead.py: µs per eager call at a tiny shape. Runs of one device, dtype
    and shape (e.g. before and after a change, each with its ``label``) share one table."""
    groups: dict[tuple, list] = {}
    for path, d in runs:
        m = d["meta"]
        key = (m["device_name"], m["dtype"], tuple(m["shape"]), tuple(m["decode_shape"]))
        groups.setdefault(key, []).append((path, d))
    out = []
    for (name, dtype, shape, decode), group in groups.items():
        group.sort(key=lambda x: (x[1].get("date", ""), x[0].name))
        dates = sorted({d.get("date", "?") for _, d in group})
        files = ", ".join(f"`{path_rel(p)}`" for p, _ in group)
        b, t, h, dim = shape
        out += [f"## Per-call overhead: {name}, {', '.join(dates)}", ""]
        out += [
            f"`benchmarks/bench_overhead.py`, {files}; {dtype}, B {b}, T {t}, H {h}, D {dim} "
            f"(lightning decode: H {decode[0]}, D = E = {decode[1]}). Wall time per eager call "
            "(median of batches of back-to-back calls) and the calling thread's CPU time per "
            "call (*CPU*), µs; *vs SDPA*: wall time over SDPA's (the decode rows over SDPA "
            "decode's, the modules over the tiny SDPA's). Inputs do not require grad; module "
            "decode steps run under `torch.no_grad()` from a cache of T tokens. To run it: "
            "`python benchmarks/bench_overhead.py --device cuda --breakdown --out "
            "benchmarks/results/<date>-<gpu>-overhead.json`, then `python benchmarks/report.py`.",
            "",
        ]
        labelled = [(d.get("label") or d.get("date", "?"), d) for _, d in group]
        out += [overhead_table(labelled, "results", "case", ratio=True), ""]
        layered = [(label, d) for label, d in labelled if d.get("breakdown")]
        if layered:
            out += [
                "`lightning_attn`'s forward layer by layer (`--breakdown`, no grad), µs per "
                "call: each row calls one layer further out; the public call skips the "
                "dispatcher where the inputs allow (`direct_call`).",
                "",
                overhead_table(layered, "breakdown", "layer", ratio=False),
                "",
            ]
        for _, d in group:
            out += [d["note"], ""] if d.get("note") else []
    return out


def render(files, img_dir: Path, img_rel: str | None, include_cpu: bool = False) -> str:
    if img_rel is not None and not have_matplotlib():
        print("matplotlib is not importable: no plots", file=sys.stderr)
        img_rel = None
    runs, lists, engines, overheads = [], [], [], []
    for f in files:
        d = load(f)
        if isinstance(d, dict) and d.get("bench") == "engine":
            engines.append((d.get("date", ""), Path(f), d))
        elif isinstance(d, dict) and d.get("bench") == "overhead":
            overheads.append((Path(f), d))
        elif isinstance(d, dict):
            runs.append((d.get("started") or d.get("date") or "", Path(f), d))
        elif isinstance(d, list):
            recs = [r for r in d if isinstance(r, dict)]
            fam = family_of(Path(f), d)
            if not include_cpu and fam != "cpu":  # the CPU family's file is all CPU records
                recs = [r for r in recs if r.get("device") != "cpu"]
            lists.append((fam, Path(f), recs))
        elif d is not None:
            print(f"skipping {f}: neither a dict nor a list", file=sys.stderr)
    runs.sort(key=lambda x: x[0], reverse=True)
    rank = {f: i for i, f in enumerate(FAMILY_ORDER)}
    lists.sort(key=lambda x: (rank.get(x[0], len(rank)), x[0], tuple(-ord(c) for c in x[1].stem)))
    out = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/report.py` from the JSON results in `benchmarks/results/` (do "
        "not edit by hand): lightning attention first, then RAT, landmark, NSA, the CPU "
        "kernels and the per-call overhead. Every speed-up is a peer's time divided by "
        "longattn's time: above 1× longattn is faster, below 1× it is slower. Targets are the "
        "thresholds written in `benchmarks/report.py`; the current goals, not all the same, "
        'are the "Performance targets" sections of docs/api/<family>.md.',
        "",
    ]
    for _, path, d in sorted(engines, key=lambda x: x[0], reverse=True):
        out += engine_section(d, path)
    if runs:
        out += [
            "**Lightning attention** (`benchmarks/bench_lightning.py`). Peers run in the same "
            "process on the same inputs: fla's `chunk_simple_gla` (`g_gamma = -slopes`, scale 1), "
            "the official lightning-attention Triton kernel (`lightning_attn_func`, [B, H, T, D], "
            "transposed outside the timed region) and torch SDPA causal (dense softmax attention: "
            "a speed reference, not the same math).",
            "",
        ]
    for _, path, d in runs:
        notes = Notes()
        prefix = f"lightning-{slug(path.stem.removesuffix('-lightning'))}"
        body = (
            check_section(d, notes)
            + train_sections(d, notes, prefix, img_dir, img_rel)
            + decode_section(d, notes)
            + scaling_section(d, notes, prefix, img_dir, img_rel)
        )
        out += section_header(d, path) + body
        if d.get("disabled_impls"):
            out += [
                "Disabled after a CUDA fault: "
                + "; ".join(f"{k}: {v}" for k, v in d["disabled_impls"].items()),
                "",
            ]
        if notes.items:
            out += ["Failures and skips:", ""]
            out += [f"{i}. {t}" for i, t in enumerate(notes.items, 1)]
            out.append("")
    for fam, path, recs in lists:
        other = []
        if fam == "nsa_selection":
            sib = path.with_name(path.name.removesuffix("nsa_selection.json") + "nsa.json")
            loaded = [r for f2, p2, r in lists if f2 == "nsa" and p2.resolve() == sib.resolve()]
            other = loaded[0] if loaded else (load(sib) if sib.exists() else None) or []
            other = [r for r in other if isinstance(r, dict)] if isinstance(other, list) else []
        out += family_section(fam, path, recs, other, img_dir, img_rel)
    out += overhead_section(overheads)
    if not runs and not lists and not overheads:
        out += ["No results yet.", ""]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="results JSON (default: benchmarks/results/*.json)")
    ap.add_argument("--md", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument("--img-dir", default=None, help="default: img/ beside --md")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--include-cpu", action="store_true", help="also CPU smoke-test results")
    args = ap.parse_args(argv)
    files = args.files or sorted(str(p) for p in (REPO / "benchmarks" / "results").glob("*.json"))
    if not args.include_cpu and not args.files:
        files = [
            f for f in files if not (isinstance(d := load(f), dict) and d.get("device") == "cpu")
        ]
    md = Path(args.md)
    img_dir = Path(args.img_dir) if args.img_dir else md.parent / "img"
    img_rel = None if args.no_plots else os.path.relpath(img_dir, md.parent)
    text = render(files, img_dir, img_rel, include_cpu=args.include_cpu)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(f"wrote {md} from {len(files)} file(s); images in {img_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

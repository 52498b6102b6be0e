#!/usr/bin/env python3
"""Write docs/benchmarks.md and PNG plots under docs/img/ from bench_lightning.py's JSON results.

Usage:
    python3 benchmarks/report.py                       # every benchmarks/results/*.json (GPU runs)
    python3 benchmarks/report.py RESULT.json [...] [--md docs/benchmarks.md] [--img-dir docs/img]

Each results file gets its own section (newest first): correctness, one table per training mode
(fwd, bwd, fwd+bwd) with the memory floor, the spec target, longattn's time, GB/s and TFLOP/s,
every peer's time and longattn's speedup over it (peer ms / longattn ms: above 1 means longattn
is faster), the decode table and the time-per-token table.  Failures and skips are shown in the
cells and listed with their error strings under the section.
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


def render(files, img_dir: Path, img_rel: str | None) -> str:
    runs = []
    for f in files:
        try:
            d = json.loads(Path(f).read_text())
        except Exception as e:  # noqa: BLE001
            print(f"skipping {f}: {e}", file=sys.stderr)
            continue
        runs.append((d.get("started") or d.get("date") or "", Path(f), d))
    runs.sort(key=lambda x: x[0], reverse=True)
    out = [
        "# Benchmarks",
        "",
        "Generated by `benchmarks/report.py` from the JSON results of "
        "`benchmarks/bench_lightning.py` (do not edit by hand). Peers run in the same process "
        "on the same inputs: fla's `chunk_simple_gla` (`g_gamma = -slopes`, scale 1), the "
        "official lightning-attention Triton kernel (`lightning_attn_func`, [B, H, T, D], "
        "transposed outside the timed region) and torch SDPA causal (dense softmax attention: a "
        "speed reference, not the same math).",
        "",
    ]
    for _, path, d in runs:
        notes = Notes()
        prefix = f"lightning-{slug(path.stem)}"
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
    if not runs:
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
        files = [f for f in files if json.loads(Path(f).read_text()).get("device") != "cpu"]
    md = Path(args.md)
    img_dir = Path(args.img_dir) if args.img_dir else md.parent / "img"
    img_rel = None if args.no_plots else os.path.relpath(img_dir, md.parent)
    text = render(files, img_dir, img_rel)
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print(f"wrote {md} from {len(files)} file(s); images in {img_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

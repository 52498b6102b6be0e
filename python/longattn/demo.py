"""The main job: train a small causal LM on long-context multi-query associative recall (MQAR),
once per attention family plus a dense SDPA baseline, compare recall, speed, memory and size,
then sweep the time and memory of one training step against the sequence length.

MQAR (Zoology, Arora et al. 2023), stretched over a long sequence: key-value pairs are spread
over the first half of the sequence, one pair per slot, between random filler tokens; queries
repeat keys in the last quarter, so every query is more than T/4 tokens after its key. A sliding
window or a single chunk shorter than that cannot answer; the model must retrieve from far back.
"""

from __future__ import annotations

import dataclasses
import math
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import nn as lnn
from .ops.landmark import insert_landmarks

FAMILIES = ("sdpa", "lightning", "rat", "nsa", "landmark")
IGNORE = -100


@dataclass
class DemoConfig:
    """The demo's sizes; the defaults are the CPU run, :meth:`for_device` scales them for a GPU."""

    families: tuple[str, ...] = FAMILIES
    seq_len: int = 512
    num_pairs: int = 8
    num_queries: int | None = None  # answered positions in the last quarter (None: all T/4)
    num_keys: int = 16  # distinct key ids (and as many value ids)
    num_filler: int = 16  # filler ids between pairs and queries
    d_model: int = 64
    num_heads: int = 2
    num_layers: int = 2
    short_conv: int = 3  # taps of the causal convolution before each mixer (0: positions)
    steps: int = 400  # in all, the short ones included
    batch_size: int = 16
    # length curriculum: the first short_share of the steps train on short_len tokens (same
    # task layout, batch short_batch_size), where attention finds the pairs quickly; recall is
    # always measured at seq_len. The model has no position embedding: what it learns carries.
    short_len: int = 64
    short_share: float = 0.8
    short_batch_size: int = 32
    lr: float = 3e-3
    eval_every: int = 30
    eval_size: int = 32
    rat_chunk: int = 8
    landmark_block: int = 16
    device: str = "cpu"
    seed: int = 0
    sweep_lengths: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)

    def __post_init__(self) -> None:
        if self.num_queries is None:
            self.num_queries = max(self.seq_len // 4, 1)

    @property
    def short_steps(self) -> int:
        return round(self.steps * self.short_share)

    @classmethod
    def for_device(cls, device: str, **overrides) -> DemoConfig:
        """The CPU defaults, or on a GPU a 4K-token task with more pairs and a sweep to 64K."""
        if torch.device(device).type != "cuda":
            return cls(device=device, **overrides)
        gpu = {
            "seq_len": 4096,
            "num_pairs": 64,
            "num_keys": 128,
            "d_model": 128,
            "num_heads": 4,
            "short_len": 512,
            "steps": 2000,
            "eval_every": 100,
            "batch_size": 32,
            "eval_size": 128,
            "landmark_block": 64,
            "sweep_lengths": tuple(2**p for p in range(10, 17)),
        }
        return cls(device=device, **(gpu | overrides))

    @property
    def vocab(self) -> int:
        """Filler ids, key ids, value ids, and one landmark id."""
        return self.num_filler + 2 * self.num_keys + 1

    def validate(self) -> None:
        slot = (self.seq_len // 2) // max(self.num_pairs, 1)
        if self.num_pairs < 1 or slot < 2:
            raise ValueError(
                f"num_pairs: each pair needs a slot of at least 2 tokens in the first half of "
                f"seq_len {self.seq_len}, got {self.num_pairs} pairs"
            )
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs: at most num_keys ({self.num_keys}) distinct keys")
        if not 1 <= self.num_queries <= self.seq_len - query_start(self.seq_len):
            raise ValueError(f"num_queries: 1 to {self.seq_len // 4} (the last quarter)")


@dataclass
class FamilyResult:
    family: str
    params: int
    accuracy: float
    tokens_per_s: float
    peak_mem_mb: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


def query_start(seq_len: int) -> int:
    """Queries sit in the last quarter; keys and values in the first half."""
    return seq_len - seq_len // 4


def recall_batch(cfg: DemoConfig, n: int, generator: torch.Generator):
    """Token ids ``[n, seq_len]`` and targets (the value at each query position, else IGNORE).

    Pair i's key sits at a random offset of slot i (the first half cut in num_pairs slots), its
    value right after; queries at random positions of the last quarter ask random pairs; every
    other position is a random filler id. Ids: filler ``[0, F)``, keys ``[F, F + K)``, values
    ``[F + K, F + 2K)``.
    """
    T, P, Q, K, F_ = cfg.seq_len, cfg.num_pairs, cfg.num_queries, cfg.num_keys, cfg.num_filler
    slot = (T // 2) // P

    def rand(*size):
        return torch.rand(*size, generator=generator)

    keys = rand(n, K).argsort(-1)[:, :P] + F_
    values = torch.randint(0, K, (n, P), generator=generator) + F_ + K
    key_pos = torch.arange(P) * slot + torch.randint(0, slot - 1, (n, P), generator=generator)
    first_query = query_start(T)
    query_pos = rand(n, T - first_query).argsort(-1)[:, :Q] + first_query
    pick = torch.randint(0, P, (n, Q), generator=generator)
    ids = torch.randint(0, F_, (n, T), generator=generator)
    ids.scatter_(1, key_pos, keys)
    ids.scatter_(1, key_pos + 1, values)
    ids.scatter_(1, query_pos, torch.gather(keys, 1, pick))
    targets = torch.full((n, T), IGNORE)
    targets.scatter_(1, query_pos, torch.gather(values, 1, pick))
    return ids, targets


class SdpaMixer(nn.Module):
    """Dense causal softmax attention (the baseline every family is compared with)."""

    def __init__(self, d_model: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.num_heads, C // self.num_heads).unbind(2)
        y = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        return self.out(y.transpose(1, 2).reshape(B, T, C))


def make_mixer(family: str, cfg: DemoConfig, layer_idx: int, seq_len: int) -> nn.Module:
    d, h = cfg.d_model, cfg.num_heads
    if family == "sdpa":
        return SdpaMixer(d, h)
    if family == "lightning":
        return lnn.LightningAttention(d, h, layer_idx=layer_idx, num_layers=cfg.num_layers)
    if family == "rat":
        return lnn.RATAttention(d, h, chunk_size=cfg.rat_chunk, ngroups=1)
    if family == "nsa":
        # NSA's defaults (window 512, 16 blocks of 64) see all of a short sequence; a window of
        # T/8 and a selection of T/4 at most keep it sparse at every length
        block = 64 if seq_len >= 4096 else 32
        window = max(min(512, seq_len // 8), 16)
        topk = max(min(16, seq_len // (4 * block)), 3)
        return lnn.NativeSparseAttention(
            d, h, h, d // h, block_size=block, topk=topk, window_size=window
        )
    if family == "landmark":
        return lnn.LandmarkAttention(d, h, h, d // h, block_size=cfg.landmark_block)
    raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")


class TinyLM(nn.Module):
    def __init__(self, family: str, cfg: DemoConfig, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        # a short causal convolution per layer (as in Zoology's MQAR models) hands each value
        # its key; attention is left to find, far back, the value whose key the query repeats.
        # Without it (short_conv 0), learned absolute positions: the earlier seq-32 demo's model.
        taps = cfg.short_conv
        self.convs = nn.ModuleList(
            nn.Conv1d(cfg.d_model, cfg.d_model, taps, groups=cfg.d_model, padding=taps - 1)
            if taps
            else nn.Identity()
            for _ in range(cfg.num_layers)
        )
        # room for the landmark tokens too (one per landmark_block - 1 >= 2 tokens)
        self.pos = None if taps else nn.Embedding(seq_len + seq_len // 2, cfg.d_model)
        self.mixers = nn.ModuleList(
            make_mixer(family, cfg, i, seq_len) for i in range(cfg.num_layers)
        )
        self.mlps = nn.ModuleList(
            nn.Sequential(
                nn.Linear(cfg.d_model, 4 * cfg.d_model),
                nn.GELU(),
                nn.Linear(4 * cfg.d_model, cfg.d_model),
            )
            for _ in range(cfg.num_layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(cfg.d_model) for _ in range(2 * cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        x = self.embed(ids)
        if self.pos is not None:
            x = x + self.pos(torch.arange(T, device=ids.device))
        layers = zip(self.convs, self.mixers, self.mlps, strict=True)
        for i, (conv, mixer, mlp) in enumerate(layers):
            h = self.norms[2 * i](x)
            if self.pos is None:
                h = h + conv(h.transpose(1, 2))[..., :T].transpose(1, 2)
            y = mixer(h)
            x = x + (y[0] if isinstance(y, tuple) else y)
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(self.final_norm(x))


def prepare(family: str, cfg: DemoConfig, ids: torch.Tensor, targets: torch.Tensor):
    """The batch as the family's model reads it (landmark tokens inserted, with no target)."""
    if family != "landmark":
        return ids, targets
    landmark_id = cfg.vocab - 1
    ids = insert_landmarks(ids, landmark_id=landmark_id, block_size=cfg.landmark_block)
    targets = insert_landmarks(targets, landmark_id=IGNORE, block_size=cfg.landmark_block)
    return ids, targets


class PeakMemory:
    """Peak memory of a block above its start, in MiB. CUDA: torch's peak allocation. CPU: the
    process's peak resident set (Linux VmHWM, reset at the start through /proc/self/clear_refs;
    where that is refused, the peak since the process started, so it only grows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current resident set
            except OSError:
                pass
            self._start = _rss_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _rss_kib("VmHWM") * 1024
        self.mib = max(peak - self._start, 0) / 2**20


def _rss_kib(field_name: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _accuracy(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, batch: int) -> float:
    hits = total = 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch):
            logits, tgt = model(ids[i : i + batch]), targets[i : i + batch]
            mask = tgt != IGNORE
            hits += int((logits.argmax(-1)[mask] == tgt[mask]).sum())
            total += int(mask.sum())
    return hits / total


def _progress_bar(total: int, desc: str):
    """tqdm on a terminal; disabled otherwise (the caller logs a few summary lines instead)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"{desc:>9}", disable=not sys.stderr.isatty(), leave=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, opt, ids, targets) -> torch.Tensor:
    logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def _new_model(family: str, cfg: DemoConfig, seq_len: int, device: torch.device):
    torch.manual_seed(cfg.seed)
    model = TinyLM(family, cfg, seq_len).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    return model, opt


def train_family(family: str, cfg: DemoConfig, make_batch=recall_batch) -> FamilyResult:
    """Trains one family's model on batches of ``make_batch(cfg, n, generator)``."""
    if make_batch is recall_batch:
        cfg.validate()
    device = torch.device(cfg.device)
    gen = torch.Generator().manual_seed(cfg.seed)  # same data for every family
    short_len = min(cfg.short_len, cfg.seq_len)
    short = dataclasses.replace(cfg, seq_len=short_len, num_queries=None)
    model, opt = _new_model(family, cfg, cfg.seq_len, device)
    params = sum(p.numel() for p in model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    eval_ids, eval_targets = (
        x.to(device) for x in prepare(family, cfg, *make_batch(cfg, cfg.eval_size, gen))
    )
    curve: list[tuple[int, float]] = []
    tokens, train_time = 0, 0.0
    log_every = max(cfg.steps // 4, 1)
    with PeakMemory(device) as mem, _progress_bar(cfg.steps, family) as bar:
        for step in range(1, cfg.steps + 1):
            phase, batch = (
                (short, cfg.short_batch_size) if step <= cfg.short_steps else (cfg, cfg.batch_size)
            )
            ids, targets = (
                x.to(device) for x in prepare(family, cfg, *make_batch(phase, batch, gen))
            )
            t0 = time.perf_counter()
            loss = train_step(model, opt, ids, targets)
            sched.step()
            _sync(device)
            train_time += time.perf_counter() - t0
            tokens += batch * phase.seq_len  # task tokens (landmarks not counted)
            if step % cfg.eval_every == 0 or step == cfg.steps:
                curve.append((step, _accuracy(model, eval_ids, eval_targets, cfg.batch_size)))
                bar.set_postfix(loss=f"{loss.item():.3f}", recall=f"{curve[-1][1]:.3f}")
            bar.update()
            if bar.disable and (step % log_every == 0 or step == cfg.steps):
                recall = f" recall {curve[-1][1]:.3f}" if curve else ""
                sys.stderr.write(
                    f"{family:>9} step {step}/{cfg.steps} loss {loss.item():.3f}{recall}\n"
                )
    return FamilyResult(
        family=family,
        params=params,
        accuracy=curve[-1][1],
        tokens_per_s=tokens / train_time,
        peak_mem_mb=mem.mib,
        curve=curve,
    )


def _memory_note(device: str) -> str:
    if torch.device(device).type == "cuda":
        return "peak memory: torch's peak CUDA allocation above the allocation at the start."
    return (
        "peak memory: the process's peak resident set (VmHWM, reset at the start) above the "
        "resident set at the start."
    )


def format_table(results: list[FamilyResult], cfg: DemoConfig) -> str:
    lines = [
        f"MQAR: {cfg.num_pairs} key-value pairs in the first half of {cfg.seq_len} tokens, "
        f"{cfg.num_queries} queries in the last quarter; {cfg.num_layers} layers, d_model "
        f"{cfg.d_model}, {cfg.steps} steps of batch {cfg.batch_size} on {cfg.device}",
        "",
        "| family | recall accuracy | tokens/s | peak memory (MiB) | parameters |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.family} | failed: {r.error} | – | – | – |")
        else:
            lines.append(
                f"| {r.family} | {r.accuracy:.3f} | {r.tokens_per_s:,.0f} | "
                f"{r.peak_mem_mb:,.0f} | {r.params:,} |"
            )
    lines += ["", _memory_note(cfg.device) + " Tokens/s: the training steps only."]
    return "\n".join(lines)


@dataclass
class SweepCell:
    """One family at one length: ms per training step and peak MiB, or why there is none."""

    ms: float | None = None
    mem_mb: float | None = None
    failure: str | None = None  # "OOM" or "failed"


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in str(error)


def time_step(family: str, cfg: DemoConfig, seq_len: int) -> SweepCell:
    """One training step (forward, backward, AdamW) of the demo model at batch 1: the median
    time after a warm-up step, and the peak memory of one step above the model at rest."""
    device = torch.device(cfg.device)
    model, opt = _new_model(family, cfg, seq_len, device)
    sized = dataclasses.replace(cfg, seq_len=seq_len, num_queries=None)
    ids, targets = (
        x.to(device)
        for x in prepare(family, cfg, *recall_batch(sized, 1, torch.Generator().manual_seed(0)))
    )
    repeats = 3 if device.type == "cuda" else 1
    train_step(model, opt, ids, targets)  # warm-up: kernels compiled, optimizer states made
    times = []
    with PeakMemory(device) as mem, SavedForBackward() as saved:
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            train_step(model, opt, ids, targets)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
    # the CPU allocator reuses the warm-up step's memory, so the resident set barely moves:
    # there the step's memory is what autograd keeps for the backward pass
    mem_mb = mem.mib if device.type == "cuda" else saved.mib
    return SweepCell(ms=statistics.median(times), mem_mb=mem_mb)


class SavedForBackward:
    """MiB of the distinct tensor storages autograd saves for backward inside the block."""

    def __init__(self):
        self._storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        self._storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedForBackward:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def mib(self) -> float:
        return sum(self._storages.values()) / 2**20


def sweep(cfg: DemoConfig) -> dict[str, dict[int, SweepCell]]:
    """:func:`time_step` for every family at every length; a failure fills its cell only."""
    cells: dict[str, dict[int, SweepCell]] = {f: {} for f in cfg.families}
    device = torch.device(cfg.device)
    jobs = [(n, f) for n in cfg.sweep_lengths for f in cfg.families]
    with _progress_bar(len(jobs), "sweep") as bar:
        for seq_len, family in jobs:
            bar.set_postfix(family=family, seq_len=seq_len)
            try:
                cells[family][seq_len] = time_step(family, cfg, seq_len)
            except (RuntimeError, ValueError, NotImplementedError, MemoryError) as e:
                failure = "OOM" if _is_oom(e) else "failed"
                sys.stderr.write(f"sweep {family} at {seq_len}: {failure}: {_first_line(e)}\n")
                cells[family][seq_len] = SweepCell(failure=failure)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            bar.update()
    return cells


def format_sweep(cells: dict[str, dict[int, SweepCell]], cfg: DemoConfig) -> str:
    lengths = cfg.sweep_lengths
    head = " | ".join(f"{n:,}" for n in lengths)
    rule = "|---" * (len(lengths) + 1) + "|"
    lines = [
        f"One training step (forward, backward, AdamW) of the demo model, batch 1, on "
        f"{cfg.device}: time (ms) and peak memory (MiB) against sequence length",
        "",
        f"| ms per step | {head} |",
        rule,
    ]
    for family, row in cells.items():
        lines.append(f"| {family} | " + " | ".join(_cell(row[n], "ms") for n in lengths) + " |")
    lines += ["", f"| peak MiB | {head} |", rule]
    for family, row in cells.items():
        lines.append(f"| {family} | " + " | ".join(_cell(row[n], "mem_mb") for n in lengths) + " |")
    if torch.device(cfg.device).type == "cuda":
        note = _memory_note(cfg.device).replace("the start", "the step (model at rest)")
    else:
        note = "peak memory: the tensors autograd saves for backward in one step (the activations)."
    lines += ["", note]
    return "\n".join(lines)


def _cell(cell: SweepCell, attr: str) -> str:
    return cell.failure or f"{getattr(cell, attr):,.0f}"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_recall(results: list[FamilyResult], cfg: DemoConfig, path: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.curve:
            ax.plot(*zip(*r.curve, strict=True), marker="o", markersize=3, label=r.family)
    ax.set(xlabel="training step", ylabel="recall accuracy", ylim=(0, 1.02))
    ax.set_title(f"MQAR recall while training ({cfg.seq_len} tokens, {cfg.num_pairs} pairs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_sweep(cells: dict[str, dict[int, SweepCell]], cfg: DemoConfig, path: str) -> bool:
    plt = _pyplot()
    if plt is None:
        return False
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for family, row in cells.items():
        ok = [(n, c) for n, c in row.items() if c.failure is None]
        if ok:
            ax_t.plot([n for n, _ in ok], [c.ms for _, c in ok], marker="o", label=family)
            ax_m.plot([n for n, _ in ok], [c.mem_mb for _, c in ok], marker="o", label=family)
    ax_t.set(xscale="log", yscale="log", xlabel="sequence length", ylabel="ms per training step")
    ax_m.set(xscale="log", xlabel="sequence length", ylabel="peak MiB per step")
    for ax in (ax_t, ax_m):
        ax.set_xticks(
            cfg.sweep_lengths, [f"{n // 1024}K" if n >= 1024 else str(n) for n in cfg.sweep_lengths]
        )
        ax.minorticks_off()  # the log axis's minor labels would overlap the lengths
        ax.legend()
    fig.suptitle(f"Demo model, batch 1, one training step on {cfg.device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:80]


def run(
    cfg: DemoConfig, png: str | None, sweep_png: str | None, do_sweep: bool = True
) -> tuple[list[FamilyResult], dict[str, dict[int, SweepCell]]]:
    results = []
    for family in cfg.families:
        try:
            results.append(train_family(family, cfg))
        except (NotImplementedError, AttributeError, RuntimeError, ValueError) as e:
            sys.stderr.write(f"\n{family}: {_first_line(e)}\n")
            results.append(FamilyResult(family, 0, math.nan, 0.0, 0.0, error=_first_line(e)))
    print(format_table(results, cfg))
    if png:
        print(f"\nwrote {png}" if plot_recall(results, cfg, png) else "\nmatplotlib missing")
    cells: dict[str, dict[int, SweepCell]] = {}
    if do_sweep and cfg.sweep_lengths:
        cells = sweep(cfg)
        print("\n" + format_sweep(cells, cfg))
        if sweep_png:
            wrote = plot_sweep(cells, cfg, sweep_png)
            print(f"\nwrote {sweep_png}" if wrote else "\nmatplotlib missing")
    return results, cells

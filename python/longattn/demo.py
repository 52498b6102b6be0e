"""The main job: train a small causal LM on multi-query associative recall (MQAR), once per
attention family plus a dense SDPA baseline, and compare recall, speed, memory and size.

MQAR (Zoology, Arora et al. 2023): a sequence starts with key-value pairs, then asks for keys
again; the answer to each query is the value that followed that key. Solving it needs precise
retrieval from the context, which is what separates the attention families.
"""

from __future__ import annotations

import math
import resource
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
    families: tuple[str, ...] = FAMILIES
    seq_len: int = 32
    num_pairs: int = 4
    num_keys: int = 16
    d_model: int = 128
    num_heads: int = 4
    num_layers: int = 2
    steps: int = 400
    batch_size: int = 64
    lr: float = 1e-3
    eval_every: int = 25
    eval_size: int = 256
    landmark_block: int = 8
    device: str = "cpu"
    seed: int = 0


@dataclass
class FamilyResult:
    family: str
    params: int
    accuracy: float
    tokens_per_s: float
    peak_mem_mb: float
    curve: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None


def mqar_batch(cfg: DemoConfig, n: int, generator: torch.Generator):
    """Token ids [n, seq_len] and targets (the value at each query position, else IGNORE)."""
    P, K = cfg.num_pairs, cfg.num_keys
    keys = torch.stack([torch.randperm(K, generator=generator)[:P] for _ in range(n)]) + 1
    values = torch.randint(K + 1, 2 * K + 1, (n, P), generator=generator)
    context = torch.stack([keys, values], dim=2).reshape(n, 2 * P)
    n_queries = cfg.seq_len - 2 * P
    pick = torch.randint(0, P, (n, n_queries), generator=generator)
    queries = torch.gather(keys, 1, pick)
    answers = torch.gather(values, 1, pick)
    ids = torch.cat([context, queries], dim=1)
    targets = torch.cat([torch.full((n, 2 * P), IGNORE), answers], dim=1)
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


def make_mixer(family: str, cfg: DemoConfig, layer_idx: int) -> nn.Module:
    d, h = cfg.d_model, cfg.num_heads
    if family == "sdpa":
        return SdpaMixer(d, h)
    if family == "lightning":
        return lnn.LightningAttention(d, h, layer_idx=layer_idx, num_layers=cfg.num_layers)
    if family == "rat":
        return lnn.RATAttention(d, h, chunk_size=8, ngroups=1)
    if family == "nsa":
        return lnn.NativeSparseAttention(d, h, h, d // h)
    if family == "landmark":
        return lnn.LandmarkAttention(d, h, h, d // h, block_size=cfg.landmark_block)
    raise ValueError(f"family: expected one of {', '.join(FAMILIES)}, got {family!r}")


class TinyLM(nn.Module):
    def __init__(self, family: str, cfg: DemoConfig, vocab: int, max_len: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, cfg.d_model)
        self.pos = nn.Embedding(max_len, cfg.d_model)
        self.mixers = nn.ModuleList(make_mixer(family, cfg, i) for i in range(cfg.num_layers))
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
        self.head = nn.Linear(cfg.d_model, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for i, (mixer, mlp) in enumerate(zip(self.mixers, self.mlps, strict=True)):
            y = mixer(self.norms[2 * i](x))
            x = x + (y[0] if isinstance(y, tuple) else y)
            x = x + mlp(self.norms[2 * i + 1](x))
        return self.head(self.final_norm(x))


def _prepare(family: str, cfg: DemoConfig, ids: torch.Tensor, targets: torch.Tensor):
    """Landmark models read a landmark token after every block_size − 1 tokens."""
    if family != "landmark":
        return ids, targets
    landmark_id = 2 * cfg.num_keys + 1
    ids = insert_landmarks(ids, landmark_id=landmark_id, block_size=cfg.landmark_block)
    # Landmark positions carry no target: insert IGNORE where the ids got a landmark.
    targets = insert_landmarks(targets, landmark_id=IGNORE, block_size=cfg.landmark_block)
    return ids, targets


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    mask = targets != IGNORE
    return (logits.argmax(-1)[mask] == targets[mask]).float().mean().item()


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak (Linux: KiB)


def _progress(family: str, step: int, total: int, loss: float, acc: float | None) -> None:
    """A progress bar on a terminal; one line per evaluation otherwise (logs stay short)."""
    if not sys.stderr.isatty():
        if acc is not None and (step == total or step % max(total // 10, 1) == 0):
            sys.stderr.write(f"{family:>9} step {step}/{total} loss {loss:.3f} acc {acc:.3f}\n")
        return
    width = 24
    done = int(width * step / total)
    acc_s = f" acc {acc:.2f}" if acc is not None else ""
    bar = "#" * done + "." * (width - done)
    sys.stderr.write(f"\r{family:>9} [{bar}] {step}/{total} loss {loss:.3f}{acc_s}   ")
    sys.stderr.flush()


def train_family(family: str, cfg: DemoConfig) -> FamilyResult:
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab = 2 * cfg.num_keys + 2
    max_len = cfg.seq_len + cfg.seq_len // max(cfg.landmark_block - 1, 1) + 1
    model = TinyLM(family, cfg, vocab, max_len).to(device)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    eval_ids, eval_targets = _prepare(family, cfg, *mqar_batch(cfg, cfg.eval_size, gen))
    eval_ids, eval_targets = eval_ids.to(device), eval_targets.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    curve: list[tuple[int, float]] = []
    tokens, train_time, acc = 0, 0.0, None
    for step in range(1, cfg.steps + 1):
        ids, targets = _prepare(family, cfg, *mqar_batch(cfg, cfg.batch_size, gen))
        ids, targets = ids.to(device), targets.to(device)
        t0 = time.perf_counter()
        logits = model(ids)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_time += time.perf_counter() - t0
        tokens += ids.numel()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                acc = _accuracy(model(eval_ids), eval_targets)
            curve.append((step, acc))
        _progress(family, step, cfg.steps, loss.item(), acc)
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    return FamilyResult(
        family=family,
        params=params,
        accuracy=curve[-1][1],
        tokens_per_s=tokens / train_time,
        peak_mem_mb=_peak_mem_mb(device),
        curve=curve,
    )


def format_table(results: list[FamilyResult], cfg: DemoConfig) -> str:
    lines = [
        f"MQAR: {cfg.num_pairs} key-value pairs, sequence {cfg.seq_len}, {cfg.num_layers} layers, "
        f"d_model {cfg.d_model}, {cfg.steps} steps on {cfg.device}",
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
    if cfg.device == "cpu":
        lines.append("")
        lines.append("peak memory on the CPU is the process's peak resident set so far.")
    return "\n".join(lines)


def plot(results: list[FamilyResult], path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        if r.curve:
            ax.plot(*zip(*r.curve, strict=True), marker="o", markersize=3, label=r.family)
    ax.set(xlabel="training step", ylabel="recall accuracy", ylim=(0, 1.02))
    ax.set_title("MQAR recall while training")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def run(cfg: DemoConfig, png: str | None) -> list[FamilyResult]:
    results = []
    for family in cfg.families:
        try:
            results.append(train_family(family, cfg))
        except (NotImplementedError, AttributeError, RuntimeError, ValueError) as e:
            sys.stderr.write(f"\n{family}: {type(e).__name__}: {e}\n")
            msg = f"{type(e).__name__}: {e}".splitlines()[0][:80]
            results.append(FamilyResult(family, 0, math.nan, 0.0, 0.0, error=msg))
    print(format_table(results, cfg))
    if png:
        print(f"\nwrote {png}" if plot(results, png) else "\nmatplotlib missing: no plot")
    return results

"""Why RAT (chunk 8) stayed at 0.365 recall in the earlier seq-32 demo: gradient checks of
``longattn.nn.RATAttention`` at the demo's sizes, then a chunk-size sweep on the earlier seq-32
task and on the long-context task of ``python -m longattn demo``.

1. ``torch.autograd.gradcheck`` of the module in float64 on the CPU (input and gate bias), for
   every chunk size of the sweep;
2. the module's output and gradients (input and every parameter) against the same layer computed
   with the float64 reference ``longattn.reference.rat.rat_attn_reference``;
3. recall after training the demo's model with RAT at chunk sizes 1, 2, 4, 8.

Prints markdown tables (docs/demo.md holds the results). About 10 minutes on 2 CPU cores with the
defaults; ``--new-steps 0`` skips the long-context task.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from longattn import demo
from longattn.nn import RATAttention
from longattn.reference.rat import rat_attn_reference

CHUNKS = (1, 2, 4, 8)
# the earlier demo: 4 pairs then 24 queries in 32 tokens, learned positions, no filler
SEQ32 = demo.DemoConfig(
    families=("rat",),
    seq_len=32,
    num_pairs=4,
    num_keys=16,
    num_filler=1,  # id 0, unused: keys 1..16, values 17..32 as before
    d_model=128,
    num_heads=4,
    short_conv=0,
    steps=400,
    short_share=0.0,  # no curriculum: 32 tokens throughout
    batch_size=64,
    lr=1e-3,
    eval_every=25,
    eval_size=256,
    landmark_block=8,
)


def seq32_batch(cfg: demo.DemoConfig, n: int, generator: torch.Generator):
    """The earlier demo's MQAR batch: the pairs first, then queries repeating their keys."""
    P, K = cfg.num_pairs, cfg.num_keys
    keys = torch.stack([torch.randperm(K, generator=generator)[:P] for _ in range(n)]) + 1
    values = torch.randint(K + 1, 2 * K + 1, (n, P), generator=generator)
    context = torch.stack([keys, values], dim=2).reshape(n, 2 * P)
    pick = torch.randint(0, P, (n, cfg.seq_len - 2 * P), generator=generator)
    ids = torch.cat([context, torch.gather(keys, 1, pick)], dim=1)
    ignored = torch.full((n, 2 * P), demo.IGNORE)
    return ids, torch.cat([ignored, torch.gather(values, 1, pick)], dim=1)


def rat_layer(chunk: int, cfg: demo.DemoConfig) -> RATAttention:
    torch.manual_seed(0)
    return RATAttention(cfg.d_model, cfg.num_heads, chunk_size=chunk, ngroups=1).double()


def gradcheck_module(chunk: int, cfg: demo.DemoConfig, batch: int, seq_len: int, fast: bool):
    """gradcheck of the layer (input and gate bias); ``fast``: random projections of the
    Jacobian (torch's fast_mode) instead of every entry."""
    layer = rat_layer(chunk, cfg)
    x = torch.randn(batch, seq_len, cfg.d_model, dtype=torch.float64, requires_grad=True)
    bias = layer.gate_bias.detach().clone().requires_grad_()

    def forward(x, bias):
        out, _ = torch.func.functional_call(layer, {"gate_bias": bias}, (x,))
        return out

    return torch.autograd.gradcheck(
        forward, (x, bias), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=fast
    )


def against_reference(chunk: int, cfg: demo.DemoConfig, batch: int, seq_len: int) -> float:
    """Largest relative difference of output and gradients: module vs the reference layer."""
    layer = rat_layer(chunk, cfg)
    x = torch.randn(batch, seq_len, cfg.d_model, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(batch, seq_len, cfg.d_model, dtype=torch.float64)
    leaves = [x, *layer.parameters()]

    def reference_forward(x):
        z, q, k, v, g = layer.project(x)
        y = rat_attn_reference(q, k, v, g, chunk_size=chunk, rope_theta=layer.rope_theta)
        return layer.out_proj(y.reshape(x.shape) * torch.sigmoid(z))

    worst = 0.0
    out_mod, out_ref = layer(x)[0], reference_forward(x)
    grads_mod = torch.autograd.grad((out_mod * probe).sum(), leaves)
    grads_ref = torch.autograd.grad((out_ref * probe).sum(), leaves)
    for a, b in zip((out_mod, *grads_mod), (out_ref, *grads_ref), strict=True):
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    return worst


def recall(chunk: int, cfg: demo.DemoConfig, make_batch) -> tuple[float, float]:
    cfg = dataclasses.replace(cfg, rat_chunk=chunk)
    t0 = time.time()
    result = demo.train_family("rat", cfg, make_batch)
    return result.accuracy, time.time() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-steps", type=int, default=demo.DemoConfig.steps)
    parser.add_argument("--chunks", type=int, nargs="+", default=list(CHUNKS))
    args = parser.parse_args()

    print("float64, batch 2, 32 tokens, d_model 128, 4 heads; full gradcheck for the demo's")
    print(f"chunk {demo.DemoConfig.rat_chunk}, fast_mode (random projections) for the others\n")
    print("| chunk | gradcheck | module vs reference (max relative difference) |")
    print("|---|---|---|")
    for chunk in args.chunks:
        full = chunk == demo.DemoConfig.rat_chunk
        ok = gradcheck_module(chunk, SEQ32, batch=2, seq_len=32, fast=not full)
        diff = against_reference(chunk, SEQ32, batch=2, seq_len=32)
        kind = "full" if full else "fast"
        print(f"| {chunk} | {'pass' if ok else 'FAIL'} ({kind}) | {diff:.1e} |", flush=True)

    new_task = dataclasses.replace(demo.DemoConfig(families=("rat",)), steps=args.new_steps)
    print("\n| chunk | seq-32 task recall | long task recall |")
    print("|---|---|---|")
    for chunk in args.chunks:
        old, old_s = recall(chunk, SEQ32, seq32_batch)
        new = recall(chunk, new_task, demo.recall_batch)[0] if args.new_steps else float("nan")
        print(f"| {chunk} | {old:.3f} | {new:.3f} |  ({old_s:.0f}s)", flush=True)


if __name__ == "__main__":
    main()

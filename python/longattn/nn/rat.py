"""The RAT token mixer (CLAIRE-Labo/RAT) as a drop-in ``torch.nn.Module``.

    h       = RMSNorm(x)                     (only with ``norm_and_residual=True``)
    z|v|g|q|k = in_proj(h)                   (widths D_model, D_model, D_model, G·D, G·D)
    g       = sigmoid(g + b_g) in float32    (b_g initialised to log U(1, L − 1))
    q, k    tiled over heads: head h uses group h mod G
    y       = rat_attn(q, k, v, g) * sigmoid(z)
    out     = out_proj(y)                    (+ x with ``norm_and_residual=True``)

Generation keeps a :class:`RATCache`: the chunk-final states (T/L per layer) plus the running
state of the current chunk. A call without a cache runs the fused op (CPU or CUDA); a call with
a cache (one token, or a chunk of a prefill) continues from it in PyTorch over the cached states
(O(T/L) per token, on any device, without host synchronisation) and equals the full forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ops.rat import rat_attn, rat_attn_with_states
from ..reference.rat import _scan_chunks, rat_rope
from .lightning import _RMSNorm

__all__ = ["RATAttention", "RATCache", "rat_continue"]


@dataclass
class RATCache:
    """Decode state of one :class:`RATAttention` layer (B sequences that advance together).

    ``k_states``/``v_states``: ``[B, C, H, D]`` final states of the C completed chunks
    (un-rotated); ``k_run``/``v_run``: ``[B, H, D]`` running state of the current chunk;
    ``seen``: tokens consumed. float32 (float64 for float64 modules).
    """

    k_states: torch.Tensor
    v_states: torch.Tensor
    k_run: torch.Tensor
    v_run: torch.Tensor
    seen: int

    @classmethod
    def empty(cls, B, H, D, dtype=torch.float32, device=None) -> RATCache:
        z = torch.zeros(B, 0, H, D, dtype=dtype, device=device)
        r = torch.zeros(B, H, D, dtype=dtype, device=device)
        return cls(z, z.clone(), r, r.clone(), 0)

    @property
    def batch_size(self) -> int:
        return self.k_run.shape[0]


def rat_continue(q, k, v, g, cache: RATCache, *, chunk_size, scale=None, rope_base=10000.0):
    """RAT attention of M new tokens ``[B, M, H, D]`` continuing from ``cache``; returns
    ``(y, new_cache)``. Plain PyTorch: O(M·(C + M/L)) scores."""
    B, M, H, D = q.shape
    L = chunk_size
    s = D**-0.5 if scale is None else scale
    cd = cache.k_run.dtype
    P = cache.seen
    o = P % L
    qc, kc, vc, gc = (t.to(cd) for t in (q, k, v, g))
    if o:
        # o prefix rows aligned to the chunk grid; g = 0 makes the state equal the row, so the
        # last prefix row re-creates the running state.
        pad = torch.zeros(B, o, H, D, dtype=cd, device=q.device)
        kx = torch.cat([pad[:, :-1], cache.k_run[:, None], kc], dim=1)
        vx = torch.cat([pad[:, :-1], cache.v_run[:, None], vc], dim=1)
        gx = torch.cat([pad, gc], dim=1)
    else:
        kx, vx, gx = kc, vc, gc
    kt = _scan_chunks(kx, gx, L)[:, o:]
    vt = _scan_chunks(vx, gx, L)[:, o:]
    pos = P + torch.arange(M, device=q.device)
    c = pos // L
    # new tokens that complete a chunk: offsets first, first + L, ... (a slice, no host sync)
    first = (L - 1 - P) % L
    if first < M:
        all_k = torch.cat([cache.k_states, kt[:, first::L]], dim=1)
        all_v = torch.cat([cache.v_states, vt[:, first::L]], dim=1)
    else:  # no chunk completes: the cached states are reused as they are (no copy)
        all_k, all_v = cache.k_states, cache.v_states
    j = torch.arange(all_k.shape[1], device=q.device)
    qr = rat_rope(qc, c, rope_base)
    kr = rat_rope(all_k, j, rope_base)  # state j rotated by its chunk index
    prev = torch.einsum("bthd,bjhd->bthj", qr, kr) * s
    prev = prev.masked_fill(~(j[None, :] < c[:, None])[None, :, None, :], float("-inf"))
    own = (qc * kt).sum(-1, keepdim=True) * s
    p = torch.softmax(torch.cat([prev, own], dim=-1), dim=-1)
    y = torch.einsum("bthj,bjhd->bthd", p[..., :-1], all_v) + p[..., -1:] * vt
    new = RATCache(all_k.detach(), all_v.detach(), kt[:, -1].detach(), vt[:, -1].detach(), P + M)
    return y.to(q.dtype), new


class RATAttention(nn.Module):
    """RAT token mixer.

    Args:
        hidden_size: model width D_model (= num_heads · head_dim).
        num_heads: heads H (head_dim D = hidden_size // H).
        chunk_size: L.
        ngroups: G query/key groups shared across heads by tiling (head h uses group h mod G).
        rope_base: chunk-RoPE base, or None.
        norm_and_residual: RMSNorm before the projection and the residual inside (the official
            layer); False for a drop-in replacement of a transformers attention module.
        bias: bias in the input and output projections (the gate always has its own bias b_g).

    ``forward(x, cache=None, use_cache=False, cu_seqlens=None) -> (y, new_cache)``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        chunk_size: int = 16,
        ngroups: int = 2,
        rope_base: float | None = 10000.0,
        norm_and_residual: bool = False,
        bias: bool = False,
        eps: float = 1e-6,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"num_heads: must divide hidden_size ({hidden_size}), got {num_heads}")
        if ngroups < 1 or num_heads % ngroups:
            raise ValueError(f"ngroups: must divide num_heads ({num_heads}), got {ngroups}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: must be at least 1, got {chunk_size}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.ngroups = hidden_size, num_heads, ngroups
        self.head_dim = hidden_size // num_heads
        self.chunk_size, self.rope_base = chunk_size, rope_base
        self.norm_and_residual = norm_and_residual
        gd = ngroups * self.head_dim
        self.in_proj = nn.Linear(hidden_size, 3 * hidden_size + 2 * gd, bias=bias, **factory)
        self.gate_bias = nn.Parameter(torch.empty(hidden_size, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)
        self.norm = _RMSNorm(hidden_size, eps, **factory) if norm_and_residual else None
        self.reset_gate_bias()

    @torch.no_grad()
    def reset_gate_bias(self) -> None:
        hi = max(self.chunk_size - 1, 1)
        self.gate_bias.copy_(torch.empty_like(self.gate_bias).uniform_(1.0, hi).log())
        if hi == 1:
            self.gate_bias.zero_()

    def _apply(self, fn, *args, **kwargs):
        # .to(dtype)/.half() would cast the gate bias; the gate is computed in float32.
        super()._apply(fn, *args, **kwargs)
        if self.gate_bias.dtype not in (torch.float32, torch.float64):
            self.gate_bias.data = self.gate_bias.data.float()
        return self

    def project(self, x: torch.Tensor):
        """(z, q, k, v, g) of x ``[B, T, D_model]``; q, k, v, g as ``[B, T, H, D]``."""
        B, T, _ = x.shape
        H, D, G = self.num_heads, self.head_dim, self.ngroups
        Dm = self.hidden_size
        zvgqk = self.in_proj(x)
        z, v, g, q, k = zvgqk.split([Dm, Dm, Dm, G * D, G * D], dim=-1)
        gdt = torch.float64 if x.dtype == torch.float64 else torch.float32
        g = torch.sigmoid(g.to(gdt) + self.gate_bias.to(gdt)).view(B, T, H, D)
        q = q.reshape(B, T, G, D).repeat(1, 1, H // G, 1)  # head h -> group h mod G
        k = k.reshape(B, T, G, D).repeat(1, 1, H // G, 1)
        v = v.reshape(B, T, H, D)
        return z, q, k, v, g

    def forward(
        self,
        x: torch.Tensor,
        cache: RATCache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RATCache | None]:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("cu_seqlens: not supported together with a cache")
        B, T, _ = x.shape
        H, D, L = self.num_heads, self.head_dim, self.chunk_size
        h = self.norm(x) if self.norm is not None else x
        z, q, k, v, g = self.project(h)
        new_cache = None
        if cache is not None:
            y, new_cache = rat_continue(q, k, v, g, cache, chunk_size=L, rope_base=self.rope_base)
        elif use_cache:
            y, _, ks, vs = rat_attn_with_states(q, k, v, g, chunk_size=L, rope_base=self.rope_base)
            full = T // L
            if T % L:
                k_run, v_run = ks[:, -1], vs[:, -1]
            else:
                k_run = torch.zeros(B, H, D, dtype=ks.dtype, device=x.device)
                v_run = torch.zeros_like(k_run)
            new_cache = RATCache(ks[:, :full], vs[:, :full], k_run, v_run, T)
        else:
            y = rat_attn(q, k, v, g, chunk_size=L, rope_base=self.rope_base, cu_seqlens=cu_seqlens)
        y = y.reshape(B, T, self.hidden_size) * torch.sigmoid(z)
        out = self.out_proj(y)
        if self.norm_and_residual:
            out = x + out
        if not use_cache:
            new_cache = None
        return out, new_cache

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"chunk_size={self.chunk_size}, ngroups={self.ngroups}, rope_base={self.rope_base}, "
            f"norm_and_residual={self.norm_and_residual}"
        )

"""Landmark attention (docs/api/landmark.md, "Module") as a drop-in ``torch.nn.Module``.

    q, k, v = q_proj(x), k_proj(x), v_proj(x)       # [B, T, Hq|Hkv, D]; x already holds the
                                                     # landmark tokens (see insert_landmarks)
    o       = landmark_attn(RoPE(q, t), RoPE(k, t), v, block_size)    # training mode
    y       = o_proj(o)

RoPE is the Llama ``rotate_half`` form (:func:`longattn.nn.nsa.apply_rotary`); setting the
attribute ``rotary`` to a callable ``rotary(x, pos) -> x rotated`` replaces it (every rotation
below, remapped positions included, goes through it), e.g. by a model's own (scaled) RoPE.

Generation keeps a :class:`LandmarkCache` with the keys *before* RoPE and the values. A call
without a cache runs the training-mode op over its tokens (the official inference's first chunk).
A call with a cache processes its tokens one by one as the official decode step does
(epfml/landmark-attention, ``llama/llama_mem.py`` with ``mem_freq``/``cache_top_k``): for the
token at position t with c = t // block_size earlier full blocks and k = min(topk, c),

- the landmark keys are rotated at remapped positions: the k most recent blocks in slots 1..k,
  every older block in slot 0, slot s covering positions ``c·bs − (k + 1 − s)·bs + [0, bs)``;
- each kv head keeps the k blocks with the largest landmark logit (max over its query heads;
  ties to the lower block), sorted ascending; selected rank r goes to slot r, or r + 1 when it is
  one of the k most recent blocks, and its keys are rotated at that slot's positions;
- the query (at t) attends with the grouped landmark softmax over those k blocks followed by its
  own block (keys at their true positions): ``landmark_attn`` over the compact key sequence.

So relative distances stay within (k + 2) blocks. With ``topk=None`` there is no retrieval: the
continuation is the training-mode op over the whole cache (Tk ≥ Tq). With topk ≥ the number of
blocks every block sits at its true position and the result equals the training-mode forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._deprecation import keyword_only_options, warn
from .._runtime import state_dtype
from ..ops.landmark import landmark_attn
from .nsa import _positions, apply_rotary

__all__ = ["LandmarkAttention", "LandmarkCache"]


@dataclass
class LandmarkCache:
    """Decode state of one :class:`LandmarkAttention` layer (B sequences advancing together).

    ``k``: ``[B, S, Hkv, D]`` keys before RoPE; ``v``: ``[B, S, Hkv, D]``; ``seen``: S.
    """

    k: Tensor
    v: Tensor
    seen: int

    @classmethod
    def empty(cls, batch_size, num_kv_heads, head_dim, dtype=torch.float32, device=None):
        """Deprecated: use :meth:`LandmarkAttention.init_cache` (the one cache constructor of every
        module)."""
        warn(
            "LandmarkCache.empty is deprecated and will be removed in the next release; use "
            "LandmarkAttention.init_cache(batch_size, device=..., dtype=...)"
        )
        return cls._zeros(batch_size, num_kv_heads, head_dim, dtype=dtype, device=device)

    @classmethod
    def _zeros(cls, batch_size, num_kv_heads, head_dim, *, dtype, device):
        z = torch.zeros(batch_size, 0, num_kv_heads, head_dim, dtype=dtype, device=device)
        return cls(z, z.clone(), 0)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]


class LandmarkAttention(nn.Module):
    """Landmark attention layer.

    Args:
        hidden_size: model width.
        num_heads: query heads Hq; num_kv_heads: kv heads Hkv (Hq % Hkv == 0); head_dim: D
            (even, for RoPE).
        block_size: landmark block length (the landmark included), ≥ 2.
        rope_theta: RoPE base.
        topk: blocks retrieved per token when decoding with a cache (None: no retrieval).
        scale: softmax scale (default D ** -0.5).
        bias: bias in the q/k/v/o projections.

    ``forward(x, cache=None, use_cache=False, cu_seqlens=None) -> (y, new_cache)``; an empty
    cache: :meth:`init_cache`.
    """

    @keyword_only_options
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        block_size: int = 64,
        rope_theta: float = 10000.0,
        topk: int | None = None,
        scale: float | None = None,
        bias: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads: must divide num_heads ({num_heads}), got {num_kv_heads}"
            )
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim: must be a positive even number (RoPE), got {head_dim}")
        if block_size < 2:
            raise ValueError(f"block_size: must be at least 2, got {block_size}")
        if topk is not None and int(topk) < 1:
            raise ValueError(f"topk: must be None or at least 1, got {topk}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.block_size = head_dim, int(block_size)
        self.rope_theta = float(rope_theta)
        self.rotary = None  # callable (x, pos) -> rotated x replacing apply_rotary
        self.topk = None if topk is None else int(topk)
        self.scale = float(head_dim**-0.5 if scale is None else scale)
        H, Hkv, D = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, H * D, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, Hkv * D, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, Hkv * D, bias=bias, **factory)
        self.o_proj = nn.Linear(H * D, hidden_size, bias=bias, **factory)

    def init_cache(self, batch_size: int, *, device=None, dtype: torch.dtype | None = None):
        """An empty :class:`LandmarkCache` for ``batch_size`` sequences (before their first token).
        ``device`` and ``dtype`` (the dtype of the activations the cache will see) default to
        the module's."""
        w = self.o_proj.weight
        return LandmarkCache._zeros(
            batch_size,
            self.num_kv_heads,
            self.head_dim,
            dtype=w.dtype if dtype is None else dtype,
            device=w.device if device is None else device,
        )

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """RoPE of x ``[B, T, H, D]`` at integer positions pos (``[T]``, ``[B, T]`` or
        ``[B, T, H]``): ``self.rotary`` when set, else :func:`apply_rotary` with ``rope_theta``."""
        if self.rotary is not None:
            return self.rotary(x, pos)
        return apply_rotary(x, pos, self.rope_theta)

    def project(self, x: Tensor):
        """(q, k, v) of x ``[B, T, hidden]``, before RoPE."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        cache: LandmarkCache | None = None,
        use_cache: bool = False,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, LandmarkCache | None]:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("cu_seqlens: not supported together with a cache")
        B, T, _ = x.shape
        q, k, v = self.project(x)
        bs = self.block_size
        if cache is None:
            pos = _positions(T, cu_seqlens, x.device)
            o = landmark_attn(
                self.rotate(q, pos), self.rotate(k, pos), v, block_size=bs,
                scale=self.scale, cu_seqlens=cu_seqlens,
            )  # fmt: skip
            new_cache = LandmarkCache(k.detach(), v.detach(), T) if use_cache else None
        else:
            if cache.batch_size != B:
                raise ValueError(f"cache: holds {cache.batch_size} sequences, x has {B}")
            P = cache.seen
            k_all = torch.cat([cache.k, k], dim=1)
            v_all = torch.cat([cache.v, v], dim=1)
            qr = self.rotate(q, torch.arange(P, P + T, device=x.device))
            if self.topk is None:
                kr = self.rotate(k_all, torch.arange(P + T, device=x.device))
                o = landmark_attn(qr, kr, v_all, block_size=bs, scale=self.scale)
            else:
                outs = [
                    self._retrieve(qr[:, i : i + 1], P + i, k_all[:, : P + i + 1], v_all)
                    for i in range(T)
                ]
                o = torch.cat(outs, dim=1)
            new_cache = LandmarkCache(k_all.detach(), v_all.detach(), P + T)
        y = self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
        return y, (new_cache if use_cache else None)

    def _retrieve(self, q: Tensor, t: int, k_raw: Tensor, v_all: Tensor) -> Tensor:
        """Output ``[B, 1, Hq, D]`` of the query q (rotated at t) with top-k retrieval over the
        un-rotated keys ``k_raw[:, :t+1]`` (the official decode step)."""
        B, _, H, D = q.shape
        Hkv = self.num_kv_heads
        G = H // Hkv
        bs, dev = self.block_size, q.device
        nm = t // bs  # earlier full blocks
        full = nm * bs
        cur_k = self.rotate(k_raw[:, full : t + 1], torch.arange(full, t + 1, device=dev))
        cur_v = v_all[:, full : t + 1]
        if nm == 0:
            return landmark_attn(q, cur_k, cur_v, block_size=bs, scale=self.scale)
        kt = min(self.topk, nm)
        prefix = full - (kt + 1) * bs  # first position of slot 0
        j = torch.arange(nm, device=dev)
        recent = j >= nm - kt
        lm_slot = torch.where(recent, j - (nm - kt) + 1, 0)
        lm = self.rotate(k_raw[:, bs - 1 : full : bs], prefix + lm_slot * bs + bs - 1)
        with torch.no_grad():
            cdt = state_dtype(q.dtype)
            qg = q[:, 0].to(cdt).view(B, Hkv, G, D)
            s = torch.einsum("bhgd,bjhd->bhgj", qg, lm.to(cdt)).amax(dim=2)  # [B, Hkv, nm]
            order = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :kt]
            sel = torch.sort(order, dim=-1).values  # [B, Hkv, kt] ascending
        slot = torch.arange(kt, device=dev) + (sel >= nm - kt).long()  # rank r -> r or r + 1
        ar = torch.arange(bs, device=dev)
        tok = (sel[..., None] * bs + ar).reshape(B, Hkv, kt * bs)
        pos = (prefix + slot[..., None] * bs + ar).reshape(B, Hkv, kt * bs)
        idx = tok.transpose(1, 2)[..., None].expand(-1, -1, -1, D)  # [B, kt·bs, Hkv, D]
        sel_k = self.rotate(k_raw.gather(1, idx), pos.transpose(1, 2))
        sel_v = v_all.gather(1, idx)
        keys = torch.cat([sel_k, cur_k], dim=1)
        vals = torch.cat([sel_v, cur_v], dim=1)
        return landmark_attn(q, keys, vals, block_size=bs, scale=self.scale)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"block_size={self.block_size}, rope_theta={self.rope_theta}, topk={self.topk}"
        )

"""The RAT token mixer (CLAIRE-Labo/RAT) as a drop-in ``torch.nn.Module``.

    h       = RMSNorm(x)                     (only with ``norm_and_residual=True``)
    z|v|g|q|k = in_proj(h)                   (widths D_model, D_model, D_model, G·D, G·D)
    g       = sigmoid(g + b_g) in float32    (b_g initialised to log U(1, L − 1))
    q, k    tiled over heads: head h uses group h mod G
    y       = rat_attn(q, k, v, g) * sigmoid(z)
    out     = out_proj(y)                    (+ x with ``norm_and_residual=True``)

Generation keeps a :class:`RATCache`: the chunk-final states (T/L per layer, stored rotated, in
the module dtype, with geometrically growing capacity) plus the float32 running state of the
current chunk. A call without a cache runs the fused op (CPU or CUDA); a call with a cache
continues from it and equals the full forward: one token on CUDA runs the fused ``rat_decode``
kernel (O(T/L) per token, states appended in place, no host synchronisation); a prefill chunk,
or any call on the CPU, runs in PyTorch over the cached states.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .._deprecation import DEPRECATED, keyword_only_options, renamed, warn
from .._runtime import state_dtype, unit_last_stride
from ..ops.rat import rat_attn, rat_attn_with_states, rat_decode

__all__ = ["RATAttention", "RATCache", "rat_continue"]

_MIN_CAPACITY = 16


def _chunk_rope(x: torch.Tensor, chunk: torch.Tensor, base: float | None) -> torch.Tensor:
    """``x [..., T, H, D]`` rotated by the angle ``chunk[t]·base^(−2i/D)`` (``rotate_half`` pairs
    i and i + D/2), as the kernels rotate: angles in float64, products in float32 (float64 for
    float64 x); returns x's dtype."""
    if base is None:
        return x
    D = x.shape[-1]
    cd = state_dtype(x.dtype)
    freq = float(base) ** -(torch.arange(0, D, 2, dtype=torch.float64, device=x.device) / D)
    angle = chunk.to(device=x.device, dtype=torch.float64)[:, None] * freq  # [T, D/2]
    angle = torch.cat([angle, angle], dim=-1)[:, None, :]  # [T, 1, D]
    cos, sin = angle.cos().to(cd), angle.sin().to(cd)
    xc = x.to(cd)
    x1, x2 = xc[..., : D // 2], xc[..., D // 2 :]
    return (xc * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def _chunk_scan(x: torch.Tensor, g: torch.Tensor, L: int) -> torch.Tensor:
    """The gated states ``h_t = g_t·h_{t−1} + (1 − g_t)·x_t`` of x, g ``[B, T, H, D]``, restarting
    at every multiple of L: all chunks at once, one step per offset in the chunk."""
    B, T, H, D = x.shape
    n = -(-T // L)  # chunks, the last one padded
    pad = (0, 0, 0, 0, 0, n * L - T)
    xs = torch.nn.functional.pad(x, pad).view(B, n, L, H, D)
    gs = torch.nn.functional.pad(g, pad).view(B, n, L, H, D)
    h = x.new_zeros(B, n, H, D)
    states = []
    for j in range(L):
        h = gs[:, :, j] * h + (1 - gs[:, :, j]) * xs[:, :, j]
        states.append(h)
    return torch.stack(states, dim=2).view(B, n * L, H, D)[:, :T]


def _capacity_for(n: int) -> int:
    """State slots allocated for n states: the next power of two, at least 16 (amortised O(1)
    growth per appended state)."""
    return max(_MIN_CAPACITY, 1 << max(n - 1, 0).bit_length())


@dataclass
class RATCache:
    """Decode state of one :class:`RATAttention` layer (B sequences that advance together).

    ``k_store``/``v_store``: ``[B, H, capacity, D]`` in the module dtype; slot j < ``num_chunks``
    holds the final state of completed chunk j, the key already rotated by the chunk RoPE of
    chunk j (the rotation depends only on j, so it is applied once, when the state is appended).
    Slots past ``num_chunks`` are free; the capacity grows to the next power of two when full.
    ``k_run``/``v_run``: ``[B, H, D]`` state of the current chunk at the last token seen (the
    chunk's final state when that token ended it), float32 (float64 for float64 modules).
    ``seen``: tokens consumed; ``num_chunks``: completed chunks (``seen // chunk_size``).

    :func:`rat_continue` (and ``RATAttention.forward(..., cache=...)``) update the cache IN PLACE
    and return it: :meth:`clone` it first to continue one prefix twice (beam search reorders it
    through ``index_select`` on every tensor field, which copies).
    """

    k_store: torch.Tensor
    v_store: torch.Tensor
    k_run: torch.Tensor
    v_run: torch.Tensor
    seen: int
    num_chunks: int

    @classmethod
    def empty(cls, B, H, D, dtype=torch.float32, device=None, capacity=_MIN_CAPACITY) -> RATCache:
        """Deprecated: use :meth:`RATAttention.init_cache` (the one cache constructor of every
        module). A cache before the first token; ``dtype`` is the module (q) dtype."""
        warn(
            "RATCache.empty is deprecated and will be removed in the next release; use "
            "RATAttention.init_cache(batch_size, device=..., dtype=...)"
        )
        return cls._zeros(B, H, D, dtype=dtype, device=device, capacity=capacity)

    @classmethod
    def _zeros(cls, B, H, D, *, dtype, device, capacity=_MIN_CAPACITY) -> RATCache:
        store = torch.zeros(B, H, capacity, D, dtype=dtype, device=device)
        run = torch.zeros(B, H, D, dtype=state_dtype(dtype), device=device)
        return cls(store, store.clone(), run, run.clone(), 0, 0)

    @classmethod
    def from_states(
        cls,
        k_states,
        v_states,
        k_run,
        v_run,
        seen,
        *,
        dtype,
        rope_theta: float | None = 10000.0,
        rope_base: float | None = DEPRECATED,
    ) -> RATCache:
        """A cache from un-rotated chunk-final states ``[B, C, H, D]`` (as returned by
        :func:`~longattn.ops.rat.rat_attn_with_states`) and the running state ``[B, H, D]``.
        ``rope_base``: deprecated alias of ``rope_theta``."""
        rope_theta = renamed(
            "RATCache.from_states", "rope_base", rope_base, "rope_theta", rope_theta, 10000.0
        )
        B, C, H, D = k_states.shape
        cap = _capacity_for(C + 1)
        cache = cls._zeros(B, H, D, dtype=dtype, device=k_states.device, capacity=cap)
        j = torch.arange(C, device=k_states.device)
        cache.k_store[:, :, :C] = _chunk_rope(k_states, j, rope_theta).transpose(1, 2)
        cache.v_store[:, :, :C] = v_states.transpose(1, 2)
        cache.k_run.copy_(k_run)
        cache.v_run.copy_(v_run)
        cache.seen, cache.num_chunks = seen, C
        return cache

    @property
    def batch_size(self) -> int:
        return self.k_run.shape[0]

    @property
    def capacity(self) -> int:
        return self.k_store.shape[2]

    @property
    def k_states(self) -> torch.Tensor:
        """``[B, H, C, D]`` view of the completed chunks' keys (rotated)."""
        return self.k_store[:, :, : self.num_chunks]

    @property
    def v_states(self) -> torch.Tensor:
        """``[B, H, C, D]`` view of the completed chunks' values."""
        return self.v_store[:, :, : self.num_chunks]

    def clone(self) -> RATCache:
        return RATCache(
            self.k_store.clone(),
            self.v_store.clone(),
            self.k_run.clone(),
            self.v_run.clone(),
            self.seen,
            self.num_chunks,
        )

    def reserve(self, n: int) -> None:
        """Makes room for n states (one copy of the used slots when the capacity grows)."""
        if n <= self.capacity:
            return
        B, H, _, D = self.k_store.shape
        C = self.num_chunks
        for name in ("k_store", "v_store"):
            old = getattr(self, name)
            new = torch.zeros(B, H, _capacity_for(n), D, dtype=old.dtype, device=old.device)
            new[:, :, :C] = old[:, :, :C]
            setattr(self, name, new)

    def _conform(self, dtype: torch.dtype) -> None:
        """Casts the states to the module dtype (a cache made with another dtype, once)."""
        if self.k_store.dtype != dtype:
            self.k_store, self.v_store = self.k_store.to(dtype), self.v_store.to(dtype)
        sdt = state_dtype(dtype)
        if self.k_run.dtype != sdt:
            self.k_run, self.v_run = self.k_run.to(sdt), self.v_run.to(sdt)


_FUSED_DECODE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused_decode(q: torch.Tensor) -> bool:
    """Whether one step runs the CUDA ``rat_decode`` kernel (its dtypes and head dims)."""
    B, M, H, D = q.shape
    max_d = 128 if q.dtype == torch.float32 else 256
    return (
        q.is_cuda
        and M == 1
        and q.dtype in _FUSED_DECODE_DTYPES
        and D <= max_d
        and B <= 65535
        and H <= 65535
    )


def rat_continue(
    q,
    k,
    v,
    g,
    cache: RATCache,
    *,
    chunk_size,
    scale=None,
    rope_theta: float | None = 10000.0,
    rope_base: float | None = DEPRECATED,
):
    """RAT attention of M new tokens ``[B, M, H, D]`` continuing from ``cache``; returns
    ``(y, cache)`` with the cache updated in place. One token on CUDA: the fused ``rat_decode``
    kernel (no gradient); otherwise plain PyTorch, O(M·(C + M/L)) scores. ``rope_base``:
    deprecated alias of ``rope_theta``."""
    rope_theta = renamed("rat_continue", "rope_base", rope_base, "rope_theta", rope_theta, 10000.0)
    B, M, H, D = q.shape
    L = chunk_size
    s = D**-0.5 if scale is None else float(scale)
    P = cache.seen
    if cache.num_chunks != P // L:
        raise ValueError(
            f"cache: {cache.num_chunks} chunk states after {P} tokens do not match chunk_size={L}"
        )
    cache._conform(q.dtype)
    if M == 0:
        return q.new_empty(q.shape), cache
    if _fused_decode(q):
        if P % L == L - 1:
            cache.reserve(P // L + 1)
        if g.dtype not in (torch.float32, q.dtype):
            g = g.float()
        y = rat_decode(
            *(unit_last_stride(t.detach()) for t in (q, k, v, g)),
            cache.k_run,
            cache.v_run,
            cache.k_store,
            cache.v_store,
            P,
            L,
            s,
            None if rope_theta is None else float(rope_theta),
        )
        cache.seen, cache.num_chunks = P + 1, (P + 1) // L
        return y, cache
    cd = cache.k_run.dtype
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
    kt = _chunk_scan(kx, gx, L)[:, o:]
    vt = _chunk_scan(vx, gx, L)[:, o:]
    c = (P + torch.arange(M, device=q.device)) // L
    # new tokens that complete a chunk: offsets first, first + L, ... (appended rotated)
    first = (L - 1 - P) % L
    C = cache.num_chunks
    if first < M:
        new_k, new_v = kt[:, first::L].detach(), vt[:, first::L].detach()
        n = new_k.shape[1]
        cache.reserve(C + n)
        j_new = torch.arange(C, C + n, device=q.device)
        cache.k_store[:, :, C : C + n] = _chunk_rope(new_k, j_new, rope_theta).transpose(1, 2)
        cache.v_store[:, :, C : C + n] = new_v.transpose(1, 2)
        C += n
    ks, vs = cache.k_store[:, :, :C].to(cd), cache.v_store[:, :, :C].to(cd)
    j = torch.arange(C, device=q.device)
    qr = _chunk_rope(qc, c, rope_theta)
    prev = torch.einsum("bthd,bhjd->bthj", qr, ks) * s
    prev = prev.masked_fill(~(j[None, :] < c[:, None])[None, :, None, :], float("-inf"))
    own = (qc * kt).sum(-1, keepdim=True) * s
    p = torch.softmax(torch.cat([prev, own], dim=-1), dim=-1)
    y = torch.einsum("bthj,bhjd->bthd", p[..., :-1], vs) + p[..., -1:] * vt
    cache.k_run.copy_(kt[:, -1].detach())
    cache.v_run.copy_(vt[:, -1].detach())
    cache.seen, cache.num_chunks = P + M, C
    return y.to(q.dtype), cache


class RATAttention(nn.Module):
    """RAT token mixer.

    Args:
        hidden_size: model width D_model (= num_heads · head_dim).
        num_heads: heads H (head_dim D = hidden_size // H).
        chunk_size: L.
        ngroups: G query/key groups shared across heads by tiling (head h uses group h mod G).
        rope_theta: chunk-RoPE base, or None (``rope_base``: its deprecated alias).
        norm_and_residual: RMSNorm before the projection and the residual inside (the official
            layer); False for a drop-in replacement of a transformers attention module.
        bias: bias in the input and output projections (the gate always has its own bias b_g).

    ``forward(x, cache=None, use_cache=False, cu_seqlens=None) -> (y, new_cache)``; an empty
    cache: :meth:`init_cache`.
    """

    @keyword_only_options
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        chunk_size: int = 16,
        ngroups: int = 2,
        rope_theta: float | None = 10000.0,
        norm_and_residual: bool = False,
        bias: bool = False,
        eps: float = 1e-6,
        device=None,
        dtype=None,
        rope_base: float | None = DEPRECATED,
    ):
        super().__init__()
        rope_theta = renamed(
            "RATAttention", "rope_base", rope_base, "rope_theta", rope_theta, 10000.0
        )
        if num_heads < 1 or hidden_size % num_heads:
            raise ValueError(f"num_heads: must divide hidden_size ({hidden_size}), got {num_heads}")
        if ngroups < 1 or num_heads % ngroups:
            raise ValueError(f"ngroups: must divide num_heads ({num_heads}), got {ngroups}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: must be at least 1, got {chunk_size}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.ngroups = hidden_size, num_heads, ngroups
        self.head_dim = hidden_size // num_heads
        self.chunk_size, self.rope_theta = chunk_size, rope_theta
        self.norm_and_residual = norm_and_residual
        gd = ngroups * self.head_dim
        self.in_proj = nn.Linear(hidden_size, 3 * hidden_size + 2 * gd, bias=bias, **factory)
        self.gate_bias = nn.Parameter(torch.empty(hidden_size, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias, **factory)
        self.norm = nn.RMSNorm(hidden_size, eps=eps, **factory) if norm_and_residual else None
        self.reset_gate_bias()

    @property
    def rope_base(self) -> float | None:
        """Deprecated alias of :attr:`rope_theta`."""
        warn("RATAttention.rope_base is deprecated; read rope_theta", stacklevel=3)
        return self.rope_theta

    def init_cache(
        self,
        batch_size: int,
        *,
        device=None,
        dtype: torch.dtype | None = None,
        capacity: int = _MIN_CAPACITY,
    ) -> RATCache:
        """An empty cache for ``batch_size`` sequences (before their first token). ``device`` and
        ``dtype`` (the dtype of the activations the cache will see) default to the module's;
        ``capacity``: chunk-state slots allocated up front (the cache grows past them)."""
        w = self.out_proj.weight
        return RATCache._zeros(
            batch_size,
            self.num_heads,
            self.head_dim,
            dtype=w.dtype if dtype is None else dtype,
            device=w.device if device is None else device,
            capacity=capacity,
        )

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
        # the norm in its weight's dtype (float32 h for 16-bit x in a float32 module)
        h = self.norm(x.to(self.norm.weight.dtype)) if self.norm is not None else x
        z, q, k, v, g = self.project(h)
        new_cache = None
        if cache is not None:
            y, new_cache = rat_continue(q, k, v, g, cache, chunk_size=L, rope_theta=self.rope_theta)
        elif use_cache:
            y, _, ks, vs = rat_attn_with_states(
                q, k, v, g, chunk_size=L, rope_theta=self.rope_theta
            )
            full = T // L
            if T % L:
                k_run, v_run = ks[:, -1], vs[:, -1]
            else:
                k_run = torch.zeros(B, H, D, dtype=ks.dtype, device=x.device)
                v_run = torch.zeros_like(k_run)
            new_cache = RATCache.from_states(
                ks[:, :full],
                vs[:, :full],
                k_run,
                v_run,
                T,
                dtype=q.dtype,
                rope_theta=self.rope_theta,
            )
        else:
            y = rat_attn(
                q, k, v, g, chunk_size=L, rope_theta=self.rope_theta, cu_seqlens=cu_seqlens
            )
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
            f"chunk_size={self.chunk_size}, ngroups={self.ngroups}, rope_theta={self.rope_theta}, "
            f"norm_and_residual={self.norm_and_residual}"
        )

"""Native Sparse Attention (docs/api/nsa.md) as a drop-in ``torch.nn.Module``.

    q, k, v = q_proj(x), k_proj(x), v_proj(x)          # [B, T, Hq|Hkv, D]
    g       = sigmoid(g_proj(x)).view(B, T, Hq, 3)      # index 0 cmp, 1 slc, 2 swa (fla layout)
    q, k    = RoPE(q, t), RoPE(k, t)                    # fine keys rotated at their position
    linear: k̃ = RoPE(nsa_compress(k_unrotated, W_k, pe), i·d);  ṽ = nsa_compress(v, W_v)
    mean:   k̃ = nsa_compress(RoPE(k));                  ṽ = nsa_compress(v)
    o       = nsa_attn(q, k, v, g_cmp, g_slc, g_swa, k_cmp=k̃, v_cmp=ṽ, ...)
    y       = o_proj(o)

RoPE is the Llama ``rotate_half`` form over all D dims (D even), computed in float32 (float64
for float64 modules). Positions restart at every sequence of ``cu_seqlens``. Setting the attribute
``rotary`` to a callable ``rotary(x [B, T, H, D], pos) -> x rotated`` (pos as in
:func:`apply_rotary`) replaces it, e.g. by a model's own (scaled) RoPE; ``rope_theta`` is then
unused.

Generation keeps an :class:`NSACache` (rotated fine keys, values, compressed keys/values and the
un-rotated keys of the current partial window). A call without a cache runs the fused ops; a call
with a cache (one token, or a chunk of a prefill) computes the new compressed windows with
``nsa_compress`` and the three branches of the new tokens in PyTorch over the cached tensors:
O(T/d + n·B_K + W) work per token, O(T) per step, and equal to the full forward (the block
selection follows the kernel's rules: forced init/local blocks, ties to the lower block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .._deprecation import keyword_only_options, warn
from .._runtime import state_dtype
from ..ops.nsa import nsa_attn, nsa_compress

__all__ = ["NSACache", "NativeSparseAttention", "apply_rotary"]


def apply_rotary(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Llama-style RoPE (``rotate_half`` over all D dims) of x ``[B, T, H, D]`` at integer
    positions pos ``[T]``, ``[B, T]`` or ``[B, T, H]`` (any integers, also remapped ones).
    Computed in float32 (float64 for float64 inputs); returns x's dtype."""
    D = x.shape[-1]
    if D % 2:
        raise ValueError(f"head_dim: RoPE needs an even head dim, got {D}")
    cdt = state_dtype(x.dtype)
    inv_freq = 1.0 / (
        float(theta) ** (torch.arange(0, D, 2, device=x.device, dtype=cdt) / D)
    )  # [D/2]
    freqs = pos.to(device=x.device, dtype=cdt)[..., None] * inv_freq  # [(B,) T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    if pos.dim() < x.dim() - 1:
        emb = emb[..., None, :]  # [(B,) T, 1, D]: one position for all heads
    cos, sin = emb.cos(), emb.sin()
    xf = x.to(cdt)
    x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
    rot = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rot * sin).to(x.dtype)


def _positions(T: int, cu_seqlens: Tensor | None, device) -> Tensor:
    """Position of every token within its sequence ``[T]`` (restarting at cu_seqlens)."""
    ar = torch.arange(T, device=device)
    if cu_seqlens is None:
        return ar
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=T)
    return ar - starts


@dataclass
class NSACache:
    """Decode state of one :class:`NativeSparseAttention` layer (B sequences advancing
    together).

    ``k``: ``[B, S, Hkv, D]`` fine keys after RoPE; ``v``: ``[B, S, Hkv, D]``;
    ``k_cmp``/``v_cmp``: ``[B, C, Hkv, D]`` compressed keys (after RoPE) and values of the C
    complete windows; ``k_tail``: ``[B, r, Hkv, D]`` un-rotated keys of the last
    r = min(S, kernel_size − 1) tokens (linear compression of the next windows; empty for mean
    compression); ``seen``: tokens consumed (S). All in the module's dtype.
    """

    k: Tensor
    v: Tensor
    k_cmp: Tensor
    v_cmp: Tensor
    k_tail: Tensor
    seen: int

    @classmethod
    def empty(cls, batch_size, num_kv_heads, head_dim, dtype=torch.float32, device=None):
        """Deprecated: use :meth:`NativeSparseAttention.init_cache` (the one cache constructor
        of every module)."""
        warn(
            "NSACache.empty is deprecated and will be removed in the next release; use "
            "NativeSparseAttention.init_cache(batch_size, device=..., dtype=...)"
        )
        return cls._zeros(batch_size, num_kv_heads, head_dim, dtype=dtype, device=device)

    @classmethod
    def _zeros(cls, batch_size, num_kv_heads, head_dim, *, dtype, device):
        z = torch.zeros(batch_size, 0, num_kv_heads, head_dim, dtype=dtype, device=device)
        return cls(z, z.clone(), z.clone(), z.clone(), z.clone(), 0)

    @property
    def batch_size(self) -> int:
        return self.k.shape[0]


def _masked_softmax(s: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax of scores s over the last dim where mask is True; rows without a key give
    weights 0 and lse −inf (zero gradient)."""
    if s.shape[-1] == 0:
        return s, s.sum(-1) - math.inf
    s = s.masked_fill(~mask, -math.inf)
    any_ = mask.any(-1, keepdim=True)
    mx = torch.where(any_, s.amax(-1, keepdim=True), torch.zeros_like(s[..., :1])).detach()
    e = torch.exp(s - mx)
    den = e.sum(-1, keepdim=True)
    den = torch.where(any_, den, torch.ones_like(den))
    lse = torch.where(any_, mx + torch.log(den), torch.full_like(den, -math.inf))
    return e / den, lse[..., 0]


class NativeSparseAttention(nn.Module):
    """NSA layer: compressed, selected and sliding-window branches mixed by per-head gates.

    Args:
        hidden_size: model width.
        num_heads: query heads Hq; num_kv_heads: kv heads Hkv (Hq % Hkv == 0); head_dim: D.
        compress: ``"linear"`` (learned ``[Hkv, l·D, D]`` key/value compression weights and a
            key position embedding ``[Hkv, l, D]``, initialised to mean pooling) or ``"mean"``.
        kernel_size, kernel_stride: compression window l and stride d.
        block_size, topk: selection block B_K and number of selected blocks n (forced:
            ``init_blocks`` first and ``local_blocks`` most recent blocks).
        window_size: sliding window W (keys t − W + 1 … t).
        rope_theta: RoPE base.
        scale: softmax scale (default D ** -0.5).
        bias: bias in the q/k/v/o and gate projections.

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
        compress: str = "linear",
        kernel_size: int = 32,
        kernel_stride: int = 16,
        block_size: int = 64,
        topk: int = 16,
        window_size: int = 512,
        rope_theta: float = 10000.0,
        init_blocks: int = 1,
        local_blocks: int = 2,
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
        if compress not in ("linear", "mean"):
            raise ValueError(f"compress: expected 'linear' or 'mean', got {compress!r}")
        for name, val in (
            ("kernel_size", kernel_size),
            ("kernel_stride", kernel_stride),
            ("block_size", block_size),
            ("topk", topk),
            ("window_size", window_size),
        ):
            if int(val) < 1:
                raise ValueError(f"{name}: must be at least 1, got {val}")
        if kernel_size % kernel_stride or block_size % kernel_stride:
            raise ValueError(
                f"kernel_stride: must divide kernel_size ({kernel_size}) and block_size "
                f"({block_size}), got {kernel_stride}"
            )
        for name, val in (("init_blocks", init_blocks), ("local_blocks", local_blocks)):
            if int(val) < 0:
                raise ValueError(f"{name}: must be >= 0, got {val}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.num_kv_heads = hidden_size, num_heads, num_kv_heads
        self.head_dim, self.compress = head_dim, compress
        self.kernel_size, self.kernel_stride = int(kernel_size), int(kernel_stride)
        self.block_size, self.topk, self.window_size = int(block_size), int(topk), int(window_size)
        self.init_blocks, self.local_blocks = int(init_blocks), int(local_blocks)
        self.rope_theta = float(rope_theta)
        self.rotary = None  # callable (x, pos) -> rotated x replacing apply_rotary (see above)
        self.scale = float(head_dim**-0.5 if scale is None else scale)
        H, Hkv, D, L = num_heads, num_kv_heads, head_dim, self.kernel_size
        self.q_proj = nn.Linear(hidden_size, H * D, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, Hkv * D, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, Hkv * D, bias=bias, **factory)
        self.g_proj = nn.Linear(hidden_size, 3 * H, bias=bias, **factory)
        self.o_proj = nn.Linear(H * D, hidden_size, bias=bias, **factory)
        if compress == "linear":
            self.k_cmp_weight = nn.Parameter(torch.empty(Hkv, L * D, D, **factory))
            self.k_cmp_pe = nn.Parameter(torch.empty(Hkv, L, D, **factory))
            self.v_cmp_weight = nn.Parameter(torch.empty(Hkv, L * D, D, **factory))
        else:
            self.register_parameter("k_cmp_weight", None)
            self.register_parameter("k_cmp_pe", None)
            self.register_parameter("v_cmp_weight", None)
        self.reset_compression_parameters()

    @torch.no_grad()
    def reset_compression_parameters(self) -> None:
        """Linear compression starts as mean pooling (W = [I/l; …; I/l]) with pe = 0."""
        if self.k_cmp_weight is None:
            return
        D, L = self.head_dim, self.kernel_size
        eye = torch.eye(D, dtype=self.k_cmp_weight.dtype, device=self.k_cmp_weight.device)
        w = (eye / L).repeat(L, 1)  # [L·D, D]
        self.k_cmp_weight.copy_(w.expand_as(self.k_cmp_weight))
        self.v_cmp_weight.copy_(w.expand_as(self.v_cmp_weight))
        self.k_cmp_pe.zero_()

    # ------------------------------------------------------------------ pieces

    def init_cache(self, batch_size: int, *, device=None, dtype: torch.dtype | None = None):
        """An empty :class:`NSACache` for ``batch_size`` sequences (before their first token).
        ``device`` and ``dtype`` (the dtype of the activations the cache will see) default to
        the module's."""
        w = self.o_proj.weight
        return NSACache._zeros(
            batch_size,
            self.num_kv_heads,
            self.head_dim,
            dtype=w.dtype if dtype is None else dtype,
            device=w.device if device is None else device,
        )

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """RoPE of x ``[B, T, H, D]`` at integer positions pos (:func:`apply_rotary`'s shapes):
        ``self.rotary`` when set, else :func:`apply_rotary` with ``rope_theta``."""
        if self.rotary is not None:
            return self.rotary(x, pos)
        return apply_rotary(x, pos, self.rope_theta)

    def project(self, x: Tensor, pos: Tensor):
        """(q rotated, k un-rotated, k rotated, v, gates ``[B, T, Hq, 3]``) of x at positions
        pos ``[T]``."""
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, H, D)
        k = self.k_proj(x).view(B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, Hkv, D)
        g = torch.sigmoid(self.g_proj(x)).view(B, T, H, 3)
        q = self.rotate(q, pos)
        k_rot = self.rotate(k, pos)
        return q, k, k_rot, v, g

    def _compress(self, k_raw, k_rot, v, cu_seqlens=None, first_window: int = 0):
        """Compressed keys (rotated at their window start) and values of x's windows; window i
        of the input is global window ``first_window + i`` (cu_seqlens: per sequence)."""
        ks, d = self.kernel_size, self.kernel_stride
        # Under autocast the activations arrive in the autocast dtype, the parameters do not.
        like = lambda p: None if p is None else p.to(k_raw.dtype)  # noqa: E731
        if self.compress == "linear":
            k_cmp, cu_cmp = nsa_compress(
                k_raw, kernel_size=ks, kernel_stride=d, weight=like(self.k_cmp_weight),
                pe=like(self.k_cmp_pe), cu_seqlens=cu_seqlens,
            )  # fmt: skip
            cpos = _positions(k_cmp.shape[1], cu_cmp, k_cmp.device) + first_window
            k_cmp = self.rotate(k_cmp, cpos * d)
        else:
            k_cmp, _ = nsa_compress(k_rot, kernel_size=ks, kernel_stride=d, cu_seqlens=cu_seqlens)
        v_cmp, _ = nsa_compress(
            v,
            kernel_size=ks,
            kernel_stride=d,
            weight=like(self.v_cmp_weight),
            cu_seqlens=cu_seqlens,
        )
        return k_cmp, v_cmp

    def _tail(self, k_raw: Tensor) -> Tensor:
        r = min(k_raw.shape[1], self.kernel_size - 1) if self.compress == "linear" else 0
        return k_raw[:, k_raw.shape[1] - r :].detach()

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        x: Tensor,
        cache: NSACache | None = None,
        use_cache: bool = False,
        cu_seqlens: Tensor | None = None,
    ) -> tuple[Tensor, NSACache | None]:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x: expected [B, T, {self.hidden_size}], got {tuple(x.shape)}")
        if cu_seqlens is not None and (cache is not None or use_cache):
            raise ValueError("cu_seqlens: not supported together with a cache")
        B, T, _ = x.shape
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache: holds {cache.batch_size} sequences, x has {B}")
            pos = torch.arange(cache.seen, cache.seen + T, device=x.device)
            q, k_raw, k_rot, v, g = self.project(x, pos)
            o, new_cache = self._continue(q, k_raw, k_rot, v, g, cache)
        else:
            pos = _positions(T, cu_seqlens, x.device)
            q, k_raw, k_rot, v, g = self.project(x, pos)
            k_cmp, v_cmp = self._compress(k_raw, k_rot, v, cu_seqlens)
            o = nsa_attn(
                q, k_rot, v, g[..., 0], g[..., 1], g[..., 2], k_cmp=k_cmp, v_cmp=v_cmp,
                kernel_size=self.kernel_size, kernel_stride=self.kernel_stride,
                block_size=self.block_size, topk=self.topk, window_size=self.window_size,
                init_blocks=self.init_blocks, local_blocks=self.local_blocks, scale=self.scale,
                cu_seqlens=cu_seqlens,
            )  # fmt: skip
            new_cache = None
            if use_cache:
                new_cache = NSACache(
                    k_rot.detach(), v.detach(), k_cmp.detach(), v_cmp.detach(), self._tail(k_raw), T
                )
        y = self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim))
        return y, (new_cache if use_cache else None)

    # ------------------------------------------------------------------ cached continuation

    def _continue(self, q, k_raw, k_rot, v, g, cache: NSACache):
        """The M new tokens at positions P … P+M−1 over the cache (plus themselves)."""
        B, M, H, D = q.shape
        P = cache.seen
        ks, d = self.kernel_size, self.kernel_stride
        k_all = torch.cat([cache.k, k_rot], dim=1)
        v_all = torch.cat([cache.v, v], dim=1)
        raw = torch.cat([cache.k_tail, k_raw], dim=1)  # linear: keys [P − r, P + M)
        # new complete windows: C_old … C_new − 1, the first one starting at C_old·d
        c_old = cache.k_cmp.shape[1]
        start = c_old * d
        if P + M - start >= ks:
            if self.compress == "linear":
                seg_raw = raw[:, start - (P - cache.k_tail.shape[1]) :]
            else:
                seg_raw = None
            seg_k, seg_v = k_all[:, start:], v_all[:, start:]
            kc_new, vc_new = self._compress(seg_raw, seg_k, seg_v, None, c_old)
            k_cmp = torch.cat([cache.k_cmp, kc_new], dim=1)
            v_cmp = torch.cat([cache.v_cmp, vc_new], dim=1)
        else:
            k_cmp, v_cmp = cache.k_cmp, cache.v_cmp
        new_cache = NSACache(
            k_all.detach(), v_all.detach(), k_cmp.detach(), v_cmp.detach(),
            self._tail(raw), P + M,
        )  # fmt: skip

        Hkv = self.num_kv_heads
        per_tok = max(
            Hkv * self.topk * self.block_size * D,
            H * (k_cmp.shape[1] + self.window_size + M) * 4,
        )
        mc = max(1, min(M, (1 << 24) // per_tok))
        outs = []
        for m0 in range(0, M, mc):
            m1 = min(M, m0 + mc)
            outs.append(
                self._branches(q[:, m0:m1], g[:, m0:m1], P + m0, k_all[:, : P + m1],
                               v_all[:, : P + m1], k_cmp, v_cmp)
            )  # fmt: skip
        return torch.cat(outs, dim=1), new_cache

    def _branches(self, q, g, t0, k_all, v_all, k_cmp, v_cmp):
        """Gated NSA output of queries q ``[B, m, Hq, D]`` at positions t0 … t0+m−1 over keys
        ``k_all[:, :t0+m]`` (PyTorch, float32 / float64 accumulation)."""
        B, m, H, D = q.shape
        Hkv = self.num_kv_heads
        G = H // Hkv
        ks, d, bk, n = self.kernel_size, self.kernel_stride, self.block_size, self.topk
        W, sc = self.window_size, self.scale
        cdt = state_dtype(q.dtype)
        dev = q.device
        t = t0 + torch.arange(m, device=dev)  # [m]
        qf = q.to(cdt).view(B, m, Hkv, G, D).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, m, D]

        # compressed branch: window i visible iff t ≥ i·d + l − 1
        C = k_cmp.shape[1]
        kc = k_cmp.to(cdt).permute(0, 2, 1, 3)  # [B, Hkv, C, D]
        vc = v_cmp.to(cdt).permute(0, 2, 1, 3)
        nvis = torch.where(t + 1 >= ks, torch.div(t + 1 - ks, d, rounding_mode="floor") + 1, 0)
        vis = torch.arange(C, device=dev)[None, :] < nvis[:, None]  # [m, C]
        s = torch.einsum("bhgmd,bhcd->bhgmc", qf, kc) * sc
        p, lse = _masked_softmax(s, vis)
        o_cmp = torch.einsum("bhgmc,bhcd->bhgmd", p, vc)

        # block selection (docs/api/nsa.md, "Math"), no gradient
        with torch.no_grad():
            tb = torch.div(t, bk, rounding_mode="floor")  # current block per token
            nb = int(tb.max()) + 1
            a, b = ks // d, bk // d
            pr = torch.where(vis, torch.exp(s - lse[..., None]), 0.0).sum(2)  # [B, Hkv, m, C]
            L = nb * b
            pr = pr[..., :L]
            pad = L - pr.shape[-1]
            pr = torch.nn.functional.pad(pr, (a - 1, pad))
            qsum = pr.unfold(-1, a, 1).sum(-1)  # [B, Hkv, m, L]: Σ_x P[i' − x]
            score = qsum.view(B, Hkv, m, nb, b).sum(-1)  # [B, Hkv, m, nb]
            j = torch.arange(nb, device=dev)
            forced = (j[None, :] < self.init_blocks) | (
                (j[None, :] > tb[:, None] - self.local_blocks) & (j[None, :] <= tb[:, None])
            )
            exists = j[None, :] <= tb[:, None]
            score = torch.where(forced, math.inf, score)
            score = torch.where(exists, score, -math.inf)
            vals, order = torch.sort(score, dim=-1, descending=True, stable=True)
            vals, order = vals[..., :n], order[..., :n]
            valid = vals > -math.inf  # [B, Hkv, m, n']
            big = torch.iinfo(torch.long).max
            idx = torch.sort(torch.where(valid, order, big), dim=-1).values
            valid = idx != big
            idx = torch.where(valid, idx, 0)

        # selected branch: gather the n·B_K keys of every (token, kv head)
        kpos = idx[..., None] * bk + torch.arange(bk, device=dev)  # [B, Hkv, m, n', bk]
        kmask = valid[..., None] & (kpos <= t[:, None, None])
        n_sel = kpos.shape[-2] * bk
        kpos = kpos.reshape(B, Hkv, m * n_sel).clamp(max=k_all.shape[1] - 1)
        kk = k_all.to(cdt).permute(0, 2, 1, 3)  # [B, Hkv, S, D]
        vv = v_all.to(cdt).permute(0, 2, 1, 3)
        gi = kpos[..., None].expand(-1, -1, -1, D)
        ksel = kk.gather(2, gi).view(B, Hkv, m, n_sel, D)
        vsel = vv.gather(2, gi).view(B, Hkv, m, n_sel, D)
        s = torch.einsum("bhgmd,bhmsd->bhgms", qf, ksel) * sc
        p, _ = _masked_softmax(s, kmask.reshape(B, Hkv, 1, m, n_sel))
        o_slc = torch.einsum("bhgms,bhmsd->bhgmd", p, vsel)

        # sliding window: keys max(0, t − W + 1) … t
        lo = max(0, t0 - W + 1)
        kw, vw = kk[:, :, lo:], vv[:, :, lo:]
        wpos = lo + torch.arange(kw.shape[2], device=dev)
        wmask = (wpos[None, :] <= t[:, None]) & (wpos[None, :] > t[:, None] - W)
        s = torch.einsum("bhgmd,bhsd->bhgms", qf, kw) * sc
        p, _ = _masked_softmax(s, wmask)
        o_swa = torch.einsum("bhgms,bhsd->bhgmd", p, vw)

        def heads(o):  # [B, Hkv, G, m, D] -> [B, m, Hq, D]
            return o.permute(0, 3, 1, 2, 4).reshape(B, m, H, D)

        gf = g.to(cdt)
        out = (
            gf[..., 0:1] * heads(o_cmp) + gf[..., 1:2] * heads(o_slc) + gf[..., 2:3] * heads(o_swa)
        )
        return out.to(q.dtype)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"compress={self.compress!r}, kernel_size={self.kernel_size}, "
            f"kernel_stride={self.kernel_stride}, block_size={self.block_size}, "
            f"topk={self.topk}, window_size={self.window_size}, rope_theta={self.rope_theta}"
        )

"""The MiniMax-01 lightning-attention token mixer as a drop-in ``torch.nn.Module``.

Order of operations follows MiniMax-01's ``MiniMaxText01LightningAttention`` (also
``MiniMaxLightningAttention`` in transformers):

    qkv = SiLU(qkv_proj(x))                 # [B, T, H, 3D], per head [q | k | v]
    o   = lightning_attn(q, k, v, slopes, scale=1)   # layer-scaled ALiBi slopes
    o   = RMSNorm(o.reshape(B, T, H*D))     # one norm over all heads, weight of size H*D
    o   = sigmoid(output_gate(x)) * o
    y   = out_proj(o)

Generation keeps a recurrent state (``LightningCache``): prefill returns the final state,
and every later call (one token at a time, or more) continues from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import longattn

from .._deprecation import keyword_only_options
from .._runtime import state_dtype

__all__ = ["LightningAttention", "LightningCache"]


@dataclass
class LightningCache:
    """Recurrent state of one :class:`LightningAttention` layer.

    ``state``: ``[B, H, D, D]`` (``[N, H, D, D]`` for packed sequences), float32 (float64
    for float64 modules): ``sum_j lam^(t-j) k_j v_j^T`` over every token seen so far.
    """

    state: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.state.shape[0]


class LightningAttention(nn.Module):
    """MiniMax-01 lightning attention layer (token mixer).

    Args:
        hidden_size: model width.
        num_heads: number of heads H.
        head_dim: per-head dim D (default ``hidden_size // num_heads``); values use E = D.
        layer_idx, num_layers: layer position for the slope scaling of
            :func:`longattn.lightning_slopes`.
        bias: bias in the qkv, gate and output projections (MiniMax uses none).
        eps: RMSNorm epsilon.

    ``forward(x, cache=None, use_cache=False, cu_seqlens=None) -> (y, new_cache)`` with
    ``x: [B, T, hidden_size]`` (B == 1 with ``cu_seqlens``). ``new_cache`` is a
    :class:`LightningCache` when ``use_cache`` is true, else ``None``; an empty cache:
    :meth:`init_cache`.
    """

    @keyword_only_options
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        *,
        head_dim: int | None = None,
        layer_idx: int = 0,
        num_layers: int = 1,
        bias: bool = False,
        eps: float = 1e-6,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if head_dim is None:
            if hidden_size % num_heads != 0:
                raise ValueError(
                    f"hidden_size ({hidden_size}) is not divisible by num_heads ({num_heads}); "
                    "pass head_dim"
                )
            head_dim = hidden_size // num_heads
        if head_dim < 1:
            raise ValueError(f"head_dim must be >= 1, got {head_dim}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.num_layers = num_layers
        inner = num_heads * head_dim

        self.qkv_proj = nn.Linear(hidden_size, 3 * inner, bias=bias, **factory)
        self.output_gate = nn.Linear(hidden_size, inner, bias=bias, **factory)
        self.norm = nn.RMSNorm(inner, eps=eps, **factory)
        self.out_proj = nn.Linear(inner, hidden_size, bias=bias, **factory)
        self.register_buffer("slopes", self._make_slopes(device), persistent=False)

    def _make_slopes(self, device) -> torch.Tensor:
        slopes = longattn.lightning_slopes(
            self.num_heads, layer_idx=self.layer_idx, num_layers=self.num_layers
        )
        return slopes.to(device=device, dtype=torch.float32)

    def _apply(self, fn, *args, **kwargs):
        # Module.to(dtype) / .half() would cast the slopes buffer; they stay exact float32.
        super()._apply(fn, *args, **kwargs)
        if self.slopes.dtype != torch.float32:
            self.slopes = self._make_slopes(self.slopes.device)
        return self

    def forward(
        self,
        x: torch.Tensor,
        cache: LightningCache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LightningCache | None]:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must be [B, T, {self.hidden_size}], got shape {tuple(x.shape)}")
        B, T, _ = x.shape
        H, D = self.num_heads, self.head_dim

        qkv = F.silu(self.qkv_proj(x)).view(B, T, H, 3 * D)
        q, k, v = qkv.split(D, dim=-1)  # strided [B, T, H, D] views, last stride 1

        slopes = self.slopes
        if x.dtype == torch.float64:
            slopes = slopes.to(torch.float64)
        initial_state = None if cache is None else cache.state
        o, final_state = longattn.lightning_attn(
            q,
            k,
            v,
            slopes,
            scale=1.0,
            initial_state=initial_state,
            output_final_state=use_cache,
            cu_seqlens=cu_seqlens,
        )

        # in the norm's dtype: under autocast o is 16-bit and the weight float32, which
        # torch.nn.RMSNorm would round back to 16 bits (the result stays float32, as before)
        o = self.norm(o.reshape(B, T, H * D).to(self.norm.weight.dtype))
        o = torch.sigmoid(self.output_gate(x)) * o
        y = self.out_proj(o)
        new_cache = LightningCache(final_state) if use_cache else None
        return y, new_cache

    @keyword_only_options
    def init_cache(
        self, batch_size: int, *, device=None, dtype: torch.dtype | None = None
    ) -> LightningCache:
        """An empty (all-zero) cache for ``batch_size`` sequences, equivalent to starting
        without one. ``device`` and ``dtype`` (the dtype of the activations the cache will see)
        default to the module's; the state is float32 (float64 for float64). Passing
        ``device``/``dtype`` positionally is deprecated."""
        w = self.qkv_proj.weight
        device = device if device is not None else w.device
        sdt = state_dtype(w.dtype if dtype is None else dtype)
        D = self.head_dim
        state = torch.zeros(batch_size, self.num_heads, D, D, device=device, dtype=sdt)
        return LightningCache(state)

    def extra_repr(self) -> str:
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"head_dim={self.head_dim}, layer_idx={self.layer_idx}, "
            f"num_layers={self.num_layers}"
        )

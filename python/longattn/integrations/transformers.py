"""longattn in Hugging Face ``transformers`` (5.x) decoder models, two ways.

**Attention functions** (mechanisms that reuse the model's q/k/v/o projections unchanged): importing
this module registers, in transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``),

- ``"longattn_sliding_window"``: causal softmax attention over the last W keys
  (:func:`longattn.sliding_window_attn`), W = ``config.longattn_window_size``, else the model's
  ``config.sliding_window``, else 512;
- ``"longattn_landmark"``: landmark attention (:func:`longattn.landmark_attn`), block size
  ``config.longattn_landmark_block_size`` (default 64), retrieval of the top
  ``config.longattn_landmark_topk`` blocks (default None: no retrieval).

``AutoModelForCausalLM.from_config(cfg, attn_implementation="longattn_landmark")`` (or
``from_pretrained(..., attn_implementation=...)``, ``model.set_attn_implementation(...)``) selects
one. The model keeps its modules, weights, RoPE (with its scaling: the model rotates q and k before
calling the attention function) and its own key/value cache; GQA is native. Landmark is also a
``swap_attention`` kind: its official retrieval decode rotates the retrieved blocks at remapped
positions, which needs the keys before RoPE, and an attention function only sees rotated ones.

**Module replacement** (mechanisms with parameters of their own): ``swap_attention(model, kind,
layers=None, **config)`` replaces ``layer.self_attn`` of every decoder layer (or of the layer
indices in ``layers``) of a Llama-family model (Llama, Mistral, Qwen2, Qwen3 and any model whose
attention module has ``q_proj``/``k_proj``/``v_proj``/``o_proj`` ``nn.Linear`` layers and whose
decoder layers keep their own RMSNorm and residual) with a longattn module of ``kind`` in
``{"nsa", "lightning", "rat", "landmark"}``, in place, and returns the model. Forward, backward
and ``generate()`` (with or without a cache) keep working. The swap is recorded in
``model.config.longattn_swaps``, so ``save_pretrained`` saves it and :func:`from_pretrained`
re-applies it before the weights are loaded.

What each kind reuses from the original attention (copied, so the values are equal right after the
swap) and what it initialises:

========== ======================================================= ===============================
kind       reused                                                  new
========== ======================================================= ===============================
nsa        q_proj, k_proj, v_proj, o_proj (+ Qwen3 q_norm/k_norm)  g_proj ~ N(0, initializer_range)
                                                                   (gates start at 0.5); linear
                                                                   compression = mean pooling
landmark   q_proj, k_proj, v_proj, o_proj (+ Qwen3 q_norm/k_norm)  nothing
lightning  q/k/v into the fused qkv_proj (per head [q|k|v], kv     output_gate ~ N(0, init range),
           heads repeated for GQA), o_proj -> out_proj             norm = 1, ALiBi-style slopes
rat        v_proj into in_proj's v rows (kv heads repeated for     z, g, q, k rows of in_proj
           GQA), o_proj -> out_proj                                ~ N(0, init range), gate bias
                                                                   log U(1, L - 1)
========== ======================================================= ===============================

Biases: where the model has a bias on some of q/k/v/o (Qwen2: q/k/v), the module is built with
biases everywhere; the copied ones keep their values, the others start at 0. RoPE: nsa and
landmark rotate q/k with the model's own rotary embedding (:class:`ModelRotary`: the module that
computes the ``position_embeddings`` the decoder layers receive, so rope scaling such as llama3
or yarn applies), at every position they need (also NSA's compressed keys at their window starts
and landmark's remapped retrieval positions); rat's RoPE runs over chunk indices inside its fused
kernel, with the model's ``rope_theta`` as base unless ``rope_theta=`` is given (no scaling);
lightning has no RoPE.

Caches: with a ``transformers`` cache (``generate()``, or ``use_cache=True``), the swapped layer's
slot of that cache is replaced by a :class:`LongAttnCacheLayer` holding the module's own cache
(:class:`~longattn.nn.NSACache`, ...) and the number of tokens seen, so ``get_seq_length()``,
position ids and the masks of the layers that keep full attention stay right, and every new
``generate()`` call (which makes a new cache) starts fresh.

Limits of swapped layers: they are causal over 0..T-1 (plus the cached tokens): a padding mask
with zeros (left- or right-padded batches), a non-causal 4D mask or position ids other than
``past + arange(T)`` (packed sequences) raise ``ValueError`` instead of being ignored. The cache
cannot be cropped (assisted / contrastive decoding) and attention weights are not returned. The
attention functions take padded batches (row by row) and packed sequences (``cu_seqlens``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

try:
    from transformers import AttentionInterface, PreTrainedConfig
    from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "longattn.integrations.transformers needs the `transformers` package, version 5 or later "
        '(pip install "transformers>=5")'
    ) from e

from ..nn import LandmarkAttention, LightningAttention, NativeSparseAttention, RATAttention
from ..ops.landmark import landmark_attn, landmark_topk_blocks
from ..ops.nsa import sliding_window_attn

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DEFAULT_LANDMARK_BLOCK_SIZE",
    "DEFAULT_WINDOW_SIZE",
    "KINDS",
    "HeadRMSNormLinear",
    "LandmarkLogitsProcessor",
    "LongAttnCacheLayer",
    "LongAttnSelfAttention",
    "ModelRotary",
    "apply_recorded_swaps",
    "from_pretrained",
    "landmark_attention_forward",
    "longattn_attention_mask",
    "sliding_window_attention_forward",
    "swap_attention",
]

KINDS = {
    "nsa": NativeSparseAttention,
    "lightning": LightningAttention,
    "rat": RATAttention,
    "landmark": LandmarkAttention,
}

# constructor arguments that swap_attention derives from the model (not settable via **config)
_DERIVED = {
    "nsa": {"hidden_size", "num_heads", "num_kv_heads", "head_dim", "rope_theta", "bias"},
    "landmark": {"hidden_size", "num_heads", "num_kv_heads", "head_dim", "rope_theta", "bias"},
    "lightning": {"hidden_size", "num_heads", "head_dim", "layer_idx", "num_layers", "bias"},
    "rat": {"hidden_size", "num_heads", "norm_and_residual", "bias"},
}

# options renamed since (old -> new): accepted with a DeprecationWarning by swap_attention, and
# silently in the swaps that an older config.json records (from_pretrained)
_RENAMED_OPTIONS = {"rope_base": "rope_theta"}

DEFAULT_WINDOW_SIZE = 512
DEFAULT_LANDMARK_BLOCK_SIZE = 64


# --------------------------------------------------------------------------- attention functions


def _config_int(cfg: Any, name: str, default: int | None, minimum: int) -> int | None:
    val = getattr(cfg, name, None)
    if val is None:
        return default
    if isinstance(val, bool) or not isinstance(val, int) or val < minimum:
        raise ValueError(f"config.{name}: expected an int >= {minimum} (or None), got {val!r}")
    return val


def _window_size(module: nn.Module) -> int:
    """W of ``longattn_sliding_window`` from the module's config (see the module docstring)."""
    cfg = getattr(module, "config", None)
    model_window = getattr(cfg, "sliding_window", None)
    if isinstance(model_window, bool) or not isinstance(model_window, int) or model_window < 1:
        model_window = None
    window = _config_int(cfg, "longattn_window_size", None, 1)
    if window is None:
        return model_window or DEFAULT_WINDOW_SIZE
    if model_window is not None and window > model_window:
        raise ValueError(
            f"config.longattn_window_size: {window} is larger than the model's "
            f"config.sliding_window ({model_window}), and transformers' cache keeps only the last "
            f"{model_window - 1} keys of sliding layers; use at most {model_window}, or set "
            "config.sliding_window = None"
        )
    return window


def _landmark_options(module: nn.Module) -> tuple[int, int | None]:
    """(block size, topk) of ``longattn_landmark`` from the module's config."""
    cfg = getattr(module, "config", None)
    if getattr(cfg, "sliding_window", None) is not None:
        raise ValueError(
            f"longattn_landmark: the model's config.sliding_window = {cfg.sliding_window} makes "
            "transformers keep only the last keys in its cache (and mark layers as sliding), but "
            "landmark attention needs every key; set config.sliding_window = None"
        )
    bs = _config_int(cfg, "longattn_landmark_block_size", DEFAULT_LANDMARK_BLOCK_SIZE, 2)
    topk = _config_int(cfg, "longattn_landmark_topk", None, 1)
    return bs, topk


class _LastResult:
    """One-slot memo keyed by a tensor's identity and version: the mask / position ids tensor of
    one forward is the same object in every layer, so its host-side analysis runs once per
    forward (an in-place change of the tensor bumps its version and is analysed again)."""

    def __init__(self):
        self.ref: Any = None
        self.version = -1
        self.value: Any = None

    def get(self, key: torch.Tensor, fn):
        if self.ref is not None and self.ref() is key and self.version == key._version:
            return self.value
        value = fn(key)
        self.ref, self.version, self.value = weakref.ref(key), key._version, value
        return value


_ROWS = _LastResult()
_PACKED = _LastResult()


def _row_spans(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[(start, end)] of the tokens of each row of a 2D bool padding mask; one run per row."""
    count = mask.sum(1)
    first = mask.to(torch.int8).argmax(1)
    ar = torch.arange(mask.shape[1], device=mask.device)[None]
    run = (ar >= first[:, None]) & (ar < (first + count)[:, None])
    if not bool((run == mask).all()):
        raise ValueError(
            "attention_mask: the longattn attention functions take left- or right-padded rows "
            "(one run of tokens per row); this mask has holes"
        )
    return [(int(f), int(f) + int(c)) for f, c in zip(first.tolist(), count.tolist(), strict=True)]


def _packed_cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor | None:
    """int32 cu_seqlens over the flattened rows when position ids restart inside a row (packed
    sequences: a new sequence wherever the position does not grow by 1), else None."""
    pos = position_ids.reshape(position_ids.shape[0], -1)
    brk = (pos[:, 1:] - pos[:, :-1]) != 1
    if not bool(brk.any()):
        return None
    starts = torch.cat([torch.ones_like(brk[:, :1]), brk], dim=1).flatten()
    idx = starts.nonzero().flatten()
    end = torch.tensor([starts.numel()], device=idx.device, dtype=idx.dtype)
    return torch.cat([idx, end]).to(torch.int32)


def _window_torch(q, k, v, window: int, scale: float | None) -> torch.Tensor:
    """Sliding-window attention of the Tq queries at the end of Tk keys (Tq < Tk: cached decode
    or chunked prefill), in PyTorch over the last W + Tq - 1 keys only."""
    Tq, Tk = q.shape[1], k.shape[1]
    lo = max(0, Tk - Tq - window + 1)
    k, v = k[:, lo:], v[:, lo:]
    qpos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    kpos = torch.arange(lo, Tk, device=q.device)[None, :]
    allowed = (kpos <= qpos) & (kpos > qpos - window)
    o = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return o.transpose(1, 2)


def _check_call(name: str, module, query, key, value, attention_mask, dropout, kwargs) -> None:
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"{name}: expected query/key/value [B, H, T, D]")
    B, Hq, Tq, _ = query.shape
    Hkv, Tk = key.shape[1], key.shape[2]
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"{name}: {Hkv} kv heads do not divide {Hq} query heads")
    groups = getattr(module, "num_key_value_groups", None)
    if isinstance(groups, int) and groups != Hq // Hkv:
        raise ValueError(
            f"{name}: module.num_key_value_groups is {groups}, the tensors have "
            f"{Hq} query and {Hkv} kv heads"
        )
    if Tk < Tq:
        raise ValueError(f"{name}: {Tk} keys for {Tq} queries (need at least as many keys)")
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    if not is_causal:
        raise ValueError(f"{name}: causal attention only (is_causal=False was requested)")
    if dropout:
        raise ValueError(
            f"{name}: attention dropout is not supported (got {dropout}); set "
            "config.attention_dropout = 0"
        )
    for opt in ("softcap", "s_aux", "sinks", "position_bias"):
        if kwargs.get(opt) is not None:
            raise ValueError(f"{name}: {opt} is not supported")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            shape = getattr(attention_mask, "shape", None)
            raise ValueError(
                f"{name}: expected no mask or a 2D padding mask, got "
                f"{type(attention_mask).__name__} of shape {tuple(shape or ())} (a custom 4D "
                "mask is not supported: pass the 2D attention_mask of the tokens)"
            )
        if tuple(attention_mask.shape) != (B, Tk):
            raise ValueError(
                f"{name}: the padding mask has shape {tuple(attention_mask.shape)}, expected "
                f"{(B, Tk)} (a static cache is not supported)"
            )


def _run(name: str, attend, query, key, value, attention_mask, kwargs) -> torch.Tensor:
    """Shared body of the attention functions: ``attend(q, k, v, cu_seqlens)`` on tensors laid
    out ``[B, T, H, D]`` (queries at the last Tq key positions) once for the batch, once over the
    flattened rows of packed sequences, or once per row of a padded batch. Returns
    ``[B, Tq, Hq, Dv]``."""
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    B, Tq, Hq, _ = q.shape
    Tk = k.shape[1]
    if attention_mask is not None:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask != 0
        spans = _ROWS.get(attention_mask, lambda _: _row_spans(mask))
        rows = []
        for b, (s, e) in enumerate(spans):
            q0 = max(s, Tk - Tq)  # first real query position
            lead, trail = q0 - (Tk - Tq), Tk - max(e, q0)
            parts = []
            if lead:
                parts.append(q.new_zeros(1, lead, Hq, v.shape[-1]))
            if e > q0:
                qb = q[b : b + 1, q0 - (Tk - Tq) : e - (Tk - Tq)]
                parts.append(attend(qb, k[b : b + 1, s:e], v[b : b + 1, s:e], None))
            if trail:
                parts.append(q.new_zeros(1, trail, Hq, v.shape[-1]))
            rows.append(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        return torch.cat(rows, dim=0)
    pos = kwargs.get("position_ids")
    if Tq == Tk and isinstance(pos, torch.Tensor) and pos.shape[-1] == Tq and Tq > 1:
        cu = _PACKED.get(pos, _packed_cu_seqlens)
        if cu is not None:
            if pos.reshape(-1, Tq).shape[0] not in (1, B):
                raise ValueError(f"{name}: position_ids of shape {tuple(pos.shape)} for {B} rows")
            if pos.reshape(-1, Tq).shape[0] != B:
                cu = _packed_cu_seqlens(pos.reshape(1, Tq).expand(B, Tq))
            flat = [t.reshape(1, B * Tq, *t.shape[2:]) for t in (q, k, v)]
            return attend(*flat, cu).reshape(B, Tq, Hq, -1)
    return attend(q, k, v, None)


def sliding_window_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="longattn_sliding_window"``: causal softmax attention of each query
    over the last W keys (itself included), W from :func:`_window_size`.

    query ``[B, Hq, Tq, D]``, key/value ``[B, Hkv, Tk, D]`` (after the model's RoPE; the queries
    are the last Tq of the Tk positions). Returns ``([B, Tq, Hq, D], None)``. Without a cache
    (Tq == Tk) :func:`longattn.sliding_window_attn` runs; cached steps (Tq < Tk) run in PyTorch
    over the last W + Tq - 1 keys.
    """
    name = "longattn_sliding_window"
    _check_call(name, module, query, key, value, attention_mask, dropout, kwargs)
    window = _window_size(module)

    def attend(q, k, v, cu):
        if q.shape[1] == k.shape[1]:
            return sliding_window_attn(q, k, v, window_size=window, scale=scaling, cu_seqlens=cu)
        return _window_torch(q, k, v, window, scaling)

    out = _run(name, attend, query, key, value, attention_mask, kwargs)
    return out.contiguous(), None


def landmark_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``attn_implementation="longattn_landmark"``: :func:`longattn.landmark_attn` (grouped
    softmax over landmark-gated blocks); the key at position p with ``p % block_size ==
    block_size - 1`` is a landmark (lay tokens out with :func:`longattn.insert_landmarks`).

    Positions count from each row's first token (after left padding) and restart at every packed
    sequence. With ``config.longattn_landmark_topk = n`` every query (prefill and cached decode
    alike) takes part only in its own block and the n earlier blocks with the largest landmark
    score (:func:`longattn.landmark_topk_blocks`), at their true positions. Returns
    ``([B, Tq, Hq, D], None)``.
    """
    name = "longattn_landmark"
    _check_call(name, module, query, key, value, attention_mask, dropout, kwargs)
    block_size, topk = _landmark_options(module)

    def attend(q, k, v, cu):
        idx = None
        if topk is not None:
            idx = landmark_topk_blocks(
                q, k, block_size=block_size, topk=topk, scale=scaling, cu_seqlens=cu
            )
        return landmark_attn(
            q, k, v, block_size=block_size, scale=scaling, cu_seqlens=cu, block_indices=idx
        )

    out = _run(name, attend, query, key, value, attention_mask, kwargs)
    return out.contiguous(), None


def longattn_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask builder registered in ``AttentionMaskInterface`` for the longattn attention
    functions (like flash attention's): None when every key of every row is a token (the causal /
    window / landmark pattern is the function's own), else the 2D bool padding mask
    ``[B, kv_length]``. Static caches (keys beyond the tokens seen) raise ``ValueError``."""
    if isinstance(q_offset, torch.Tensor) or kv_length > int(q_offset) + q_length:
        raise ValueError(
            "the longattn attention functions support dynamic caches only (a static cache holds "
            "keys beyond the tokens seen); use the default DynamicCache"
        )
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:]
    if mask.dtype != torch.bool:
        mask = mask != 0
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


ATTN_IMPLEMENTATIONS = {
    "longattn_sliding_window": sliding_window_attention_forward,
    "longattn_landmark": landmark_attention_forward,
}

for _name, _fn in ATTN_IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _fn)
    AttentionMaskInterface.register(_name, longattn_attention_mask)
del _name, _fn


# --------------------------------------------------------------------------- model RoPE


class ModelRotary:
    """A model's own RoPE at any integer positions: ``rotary(x [B, T, H, D], pos) -> x rotated``
    with pos ``[T]``, ``[B, T]`` or ``[B, T, H]`` (the ``rotary`` hook of
    :class:`~longattn.nn.NativeSparseAttention` and :class:`~longattn.nn.LandmarkAttention`).

    ``rotary_emb`` is the model's rotary embedding module (``model.model.rotary_emb``: the one
    that computes the ``position_embeddings`` (cos, sin) its decoder layers receive, with the
    model's rope scaling and attention factor); the rotation is the Llama ``rotate_half`` form
    over the whole head, computed in float32 and returned in x's dtype. The module is referenced,
    not owned (it stays the model's, with its device and buffers)."""

    def __init__(self, rotary_emb: nn.Module):
        self.rotary_emb = rotary_emb

    def __repr__(self) -> str:
        return f"ModelRotary({type(self.rotary_emb).__name__})"

    def __call__(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        B, T, H, D = x.shape
        pos = pos.to(device=x.device, dtype=torch.long)
        if pos.dim() == 1:
            ids = pos[None]
        elif pos.dim() == 2:
            ids = pos
        elif pos.dim() == 3:
            ids = pos.flatten(1)
        else:
            raise ValueError(f"pos: expected [T], [B, T] or [B, T, H], got {tuple(pos.shape)}")
        probe = torch.empty(0, device=x.device, dtype=torch.float32)
        cos, sin = self.rotary_emb(probe, ids)
        if cos.shape[-1] != D:
            raise ValueError(
                f"the model's rotary embedding covers {cos.shape[-1]} of the {D} head dims "
                "(partial RoPE is not supported)"
            )
        if pos.dim() == 3:
            cos, sin = cos.view(*pos.shape, D), sin.view(*pos.shape, D)
        else:
            cos, sin = cos[:, :, None, :], sin[:, :, None, :]
        xf = x.float()
        x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
        rot = torch.cat([-x2, x1], dim=-1)
        return (xf * cos.float() + rot * sin.float()).to(x.dtype)


# --------------------------------------------------------------------------- cache slot


def _map_tensors(state: Any, fn) -> Any:
    """A copy of the dataclass cache ``state`` with ``fn`` applied to its tensor fields (all
    of them have the batch first)."""
    if state is None:
        return None
    values = {}
    for f in dataclasses.fields(state):
        v = getattr(state, f.name)
        values[f.name] = fn(v) if isinstance(v, torch.Tensor) else v
    return type(state)(**values)


class LongAttnCacheLayer(CacheLayerMixin):
    """The slot of a swapped layer in a ``transformers`` cache.

    ``state`` is the longattn module's own cache (``NSACache``, ``LightningCache``, ``RATCache``
    or ``LandmarkCache``; None before the first token) and ``seen`` the number of tokens it holds.
    It answers ``get_seq_length`` / ``get_mask_sizes`` like a ``DynamicLayer`` holding ``seen``
    tokens, and follows beam reordering / batch expansion; it stores no keys of its own
    (``update`` raises) and cannot be cropped.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, kind: str = "", **kwargs):
        super().__init__()
        self.kind = kind
        self.state: Any = None
        self.seen = 0
        self.is_initialized = True

    def __repr__(self) -> str:
        return f"LongAttnCacheLayer(kind={self.kind!r}, seen={self.seen})"

    def lazy_initialization(self, key_states, value_states) -> None:  # pragma: no cover
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise NotImplementedError(
            "LongAttnCacheLayer: this layer's attention was swapped by longattn; its cache is "
            "managed by the longattn module, not by key/value updates"
        )

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def offload(self) -> None:
        pass

    def prefetch(self) -> None:
        pass

    def reset(self) -> None:
        self.state = None
        self.seen = 0

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.state = _map_tensors(self.state, lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.state = _map_tensors(self.state, lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.state = _map_tensors(self.state, lambda t: t[indices])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "LongAttnCacheLayer: the cache of a longattn-swapped layer cannot be cropped "
            "(assisted / contrastive decoding are not supported)"
        )


def _check_cache_type(cache: Cache) -> None:
    if any(isinstance(layer, StaticLayer) for layer in cache.layers):
        raise ValueError(
            f"cache: {type(cache).__name__} with static layers is not supported by "
            "longattn-swapped layers (their masks assume every layer is static); use the default "
            "DynamicCache (generate() without cache_implementation='static')"
        )


def _cache_slot(cache: Cache, layer_idx: int, kind: str) -> LongAttnCacheLayer:
    """The :class:`LongAttnCacheLayer` of ``layer_idx`` in ``cache``, installed on first use."""
    if not isinstance(cache, Cache):
        raise TypeError(
            f"cache: expected a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}"
        )
    _check_cache_type(cache)
    layers = cache.layers
    while len(layers) <= layer_idx:
        if cache.layer_class_to_replicate is None:
            raise ValueError(
                f"cache: has {len(layers)} layers, the swapped layer is number {layer_idx}"
            )
        layers.append(cache.layer_class_to_replicate())
    slot = layers[layer_idx]
    if isinstance(slot, LongAttnCacheLayer):
        return slot
    held = slot.get_seq_length() if hasattr(slot, "get_seq_length") else 0
    if held:
        raise ValueError(
            f"cache: layer {layer_idx} already holds {held} tokens of standard attention; a cache "
            "filled before swap_attention cannot be continued by the swapped layer"
        )
    slot = LongAttnCacheLayer(kind)
    layers[layer_idx] = slot
    return slot


# --------------------------------------------------------------------------- modules


class HeadRMSNormLinear(nn.Linear):
    """``nn.Linear`` followed by an RMSNorm over each head's ``head_dim`` features: Qwen3's
    ``q_proj`` + ``q_norm`` (resp. ``k_proj`` + ``k_norm``) as one projection, so that a longattn
    module that calls ``q_proj(x).view(B, T, H, D)`` gets normed heads (before its RoPE)."""

    def __init__(self, linear: nn.Linear, norm: nn.Module, head_dim: int):
        super().__init__(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
        )
        self.head_dim = head_dim
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        return self.norm(y.unflatten(-1, (-1, self.head_dim))).flatten(-2)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", head_dim={self.head_dim} (per-head RMSNorm)"


class LongAttnSelfAttention(nn.Module):
    """A longattn module (``self.attn``) behind the ``transformers`` attention-module calling
    convention: ``forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs) ->
    (attn_output, None)``.

    The module computes its own positions (0..T-1 after the tokens in its cache); nsa and
    landmark rotate with the model's rotary embedding (:class:`ModelRotary`, the source of the
    ``position_embeddings`` the decoder layer passes), at the token positions and at the others
    they need. ``attention_mask`` is not used (the model-level checks installed by
    :func:`swap_attention` reject padding masks and shifted position ids). With a cache, the
    longattn cache lives in this layer's slot of the ``transformers`` cache.
    """

    def __init__(
        self,
        kind: str,
        attn: nn.Module,
        layer_idx: int,
        reused: tuple[str, ...] = (),
        new: tuple[str, ...] = (),
    ):
        super().__init__()
        self.kind = kind
        self.attn = attn
        self.layer_idx = layer_idx
        self.reused = tuple(reused)
        self.new = tuple(new)
        self.is_causal = True

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        past_key_values: Cache | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        if cache is None:
            cache = past_key_values
        if cache is None:
            y, _ = self.attn(hidden_states)
            return y, None
        slot = _cache_slot(cache, self.layer_idx, self.kind)
        y, slot.state = self.attn(hidden_states, cache=slot.state, use_cache=True)
        slot.seen += hidden_states.shape[1]
        return y, None

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind!r}, layer_idx={self.layer_idx}, "
            f"reused={list(self.reused)}, new={list(self.new)}"
        )


class LandmarkLogitsProcessor:
    """A ``generate()`` logits processor for landmark models: the token generated at a position
    p with ``p % block_size == block_size - 1`` is forced to ``landmark_id``, and
    ``landmark_id`` is never generated elsewhere, so the generated stream keeps the layout of
    :func:`longattn.insert_landmarks` (prompts must be laid out with it too). Drop the landmarks
    from the result with :func:`longattn.remove_landmarks`.

    ``model.generate(ids, logits_processor=LogitsProcessorList([LandmarkLogitsProcessor(...)]))``
    """

    def __init__(self, landmark_id: int, block_size: int):
        if block_size < 2:
            raise ValueError(f"block_size: must be at least 2, got {block_size}")
        self.landmark_id, self.block_size = int(landmark_id), int(block_size)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        if input_ids.shape[-1] % self.block_size == self.block_size - 1:
            keep = scores[:, self.landmark_id].clone()
            scores.fill_(-float("inf"))
            scores[:, self.landmark_id] = torch.where(torch.isfinite(keep), keep, 0.0)
        else:
            scores[:, self.landmark_id] = -float("inf")
        return scores


# --------------------------------------------------------------------------- model checks


def _as_bool_allowed(mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask == 0  # additive mask: 0 where allowed, -inf / dtype min where masked
    return mask != 0


def _check_model_inputs(names: list[str], args: tuple, kwargs: dict) -> None:
    """Forward pre-hook body of the decoder stack: swapped layers are causal-only."""
    given = dict(zip(names, args, strict=False))
    given.update(kwargs)
    cache = given.get("cache", given.get("past_key_values"))
    past = 0
    if isinstance(cache, Cache):
        _check_cache_type(cache)
        past = int(cache.get_seq_length())
    mask = given.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise ValueError(
                f"attention_mask: longattn-swapped layers are causal-only; a "
                f"{type(mask).__name__} mask is not supported"
            )
        if mask.dim() == 2:
            if not bool(_as_bool_allowed(mask).all()):
                raise ValueError(
                    "attention_mask: longattn-swapped layers are causal-only and do not support "
                    "padding (the mask has zeros: left- or right-padded batches); run the "
                    "sequences one by one or pack equal lengths"
                )
        elif mask.dim() == 4:
            T, K = mask.shape[-2:]
            i = torch.arange(T, device=mask.device)[:, None]
            j = torch.arange(K, device=mask.device)[None, :]
            causal = j <= (K - T) + i
            if not bool((_as_bool_allowed(mask) == causal).all()):
                raise ValueError(
                    "attention_mask: longattn-swapped layers are causal-only; this 4D mask is not "
                    "the plain causal mask (padding, packing or a custom pattern)"
                )
        else:
            raise ValueError(
                f"attention_mask: expected a 2D or 4D mask, got shape {tuple(mask.shape)}"
            )
    pos = given.get("position_ids")
    if isinstance(pos, torch.Tensor) and pos.numel():
        T = pos.shape[-1]
        want = torch.arange(past, past + T, device=pos.device)
        if not bool((pos == want).all()):
            raise ValueError(
                "position_ids: longattn-swapped layers place the tokens at positions "
                f"{past}..{past + T - 1} (tokens in the cache + arange); other position ids "
                "(packed sequences, left padding) are not supported"
            )


def _install_checks(base: nn.Module) -> None:
    if getattr(base, "_longattn_checks", None) is not None:
        return
    try:
        params = inspect.signature(base.forward).parameters.values()
        names = [
            p.name
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
        ]
    except (TypeError, ValueError):  # pragma: no cover
        names = ["input_ids", "attention_mask", "position_ids"]

    def hook(module, args, kwargs):
        _check_model_inputs(names, args, kwargs)

    base._longattn_checks = base.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------- building


def _find_decoder(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the decoder stack module, its ``layers`` ModuleList) of a Llama-family model."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if (
            isinstance(layers, nn.ModuleList)
            and len(layers) > 0
            and all(hasattr(layer, "self_attn") for layer in layers)
        ):
            return module, layers
    raise ValueError(
        f"model: found no decoder stack (a module with a `layers` ModuleList of layers that "
        f"have `self_attn`) in {type(model).__name__}"
    )


def _find_rotary(base: nn.Module) -> nn.Module | None:
    """The decoder stack's rotary embedding module (``rotary_emb``), if it has one."""
    rotary = getattr(base, "rotary_emb", None)
    return rotary if isinstance(rotary, nn.Module) else None


def _rope_theta(config: Any) -> tuple[float, str]:
    rp = getattr(config, "rope_parameters", None) or {}
    if isinstance(rp, dict) and "rope_theta" not in rp:
        # per-layer-type parameters ({"full_attention": {...}, ...})
        nested = [v for v in rp.values() if isinstance(v, dict) and "rope_theta" in v]
        rp = nested[0] if nested else rp
    theta = rp.get("rope_theta") if isinstance(rp, dict) else None
    if theta is None:
        theta = getattr(config, "rope_theta", None) or 10000.0
    rope_type = rp.get("rope_type", "default") if isinstance(rp, dict) else "default"
    return float(theta), str(rope_type)


def _copy_linear(dst: nn.Linear, src: nn.Linear) -> None:
    dst.weight.copy_(src.weight)
    if dst.bias is not None:
        if src.bias is not None:
            dst.bias.copy_(src.bias)
        else:
            dst.bias.zero_()


def _init_linear(lin: nn.Linear, std: float) -> None:
    lin.weight.normal_(0.0, std)
    if lin.bias is not None:
        lin.bias.zero_()


def _repeat_kv_rows(w: torch.Tensor, n_kv: int, groups: int) -> torch.Tensor:
    """Rows ``[Hkv·D, ...]`` of a k/v projection as ``[Hq·D, ...]``: query head h reads kv head
    h // groups (the transformers ``repeat_kv`` convention)."""
    return w.unflatten(0, (n_kv, -1)).repeat_interleave(groups, dim=0).flatten(0, 1)


def _build(kind: str, attn: nn.Module, idx: int, info: dict, options: dict):
    """(longattn module, reused names, new names, dropped names) replacing ``attn`` (weights
    copied)."""
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    D, Hq, Hkv = info["head_dim"], info["num_heads"], info["num_kv_heads"]
    hidden, std = info["hidden_size"], info["init_std"]
    bias = any(lin.bias is not None for lin in (q, k, v, o))
    factory = {"device": q.weight.device, "dtype": q.weight.dtype}
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    cls = KINDS[kind]

    if kind in ("nsa", "landmark"):
        mod = cls(
            hidden, Hq, Hkv, D, rope_theta=info["rope_theta"], bias=bias, **factory, **options
        )
        reused = ["q_proj", "k_proj", "v_proj", "o_proj"]
        for name, norm in (("q_proj", q_norm), ("k_proj", k_norm)):
            if norm is not None:
                setattr(mod, name, HeadRMSNormLinear(getattr(mod, name), copy.deepcopy(norm), D))
                reused.append(name.replace("proj", "norm"))
        for dst, src in ((mod.q_proj, q), (mod.k_proj, k), (mod.v_proj, v), (mod.o_proj, o)):
            _copy_linear(dst, src)
        new = []
        if kind == "nsa":
            _init_linear(mod.g_proj, std)
            new.append("g_proj")
            if mod.k_cmp_weight is not None:
                new += ["k_cmp_weight", "k_cmp_pe", "v_cmp_weight"]
        return mod, reused, new, []

    dropped = [n for n, m in (("q_norm", q_norm), ("k_norm", k_norm)) if m is not None]
    G = Hq // Hkv
    if kind == "lightning":
        options.setdefault("eps", info["eps"])
        mod = cls(
            hidden, Hq, head_dim=D, layer_idx=idx, num_layers=info["num_layers"], bias=bias,
            **factory, **options,
        )  # fmt: skip
        parts = [
            q.weight.unflatten(0, (Hq, D)),
            _repeat_kv_rows(k.weight, Hkv, G).unflatten(0, (Hq, D)),
            _repeat_kv_rows(v.weight, Hkv, G).unflatten(0, (Hq, D)),
        ]
        mod.qkv_proj.weight.copy_(torch.stack(parts, dim=1).flatten(0, 2))  # per head [q|k|v]
        if bias:
            zeros = torch.zeros(Hq * D, **factory)
            bq = q.bias if q.bias is not None else zeros
            bk = _repeat_kv_rows(k.bias, Hkv, G) if k.bias is not None else zeros
            bv = _repeat_kv_rows(v.bias, Hkv, G) if v.bias is not None else zeros
            b = torch.stack([t.view(Hq, D) for t in (bq, bk, bv)], dim=1).flatten()
            mod.qkv_proj.bias.copy_(b)
        _copy_linear(mod.out_proj, o)
        _init_linear(mod.output_gate, std)
        return mod, ["q_proj", "k_proj", "v_proj", "o_proj"], ["output_gate", "norm"], dropped

    # rat
    if Hq * D != hidden:
        raise ValueError(
            f"kind='rat': RATAttention needs num_heads * head_dim == hidden_size to reuse v_proj "
            f"and o_proj, got {Hq} * {D} != {hidden}"
        )
    options.setdefault("rope_theta", info["rope_theta"])
    options.setdefault("eps", info["eps"])
    mod = cls(hidden, Hq, norm_and_residual=False, bias=bias, **factory, **options)
    W = mod.in_proj.weight  # rows [z | v | g | q | k]
    W.normal_(0.0, std)
    W[hidden : 2 * hidden].copy_(_repeat_kv_rows(v.weight, Hkv, G))
    if mod.in_proj.bias is not None:
        mod.in_proj.bias.zero_()
        if v.bias is not None:
            mod.in_proj.bias[hidden : 2 * hidden].copy_(_repeat_kv_rows(v.bias, Hkv, G))
    _copy_linear(mod.out_proj, o)
    new = ["in_proj[z]", "in_proj[g]", "in_proj[q]", "in_proj[k]", "gate_bias"]
    return mod, ["v_proj", "o_proj"], new, dropped + ["q_proj", "k_proj"]


def _layer_indices(layers: Iterable[int] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    if isinstance(layers, int | str | bytes) or not isinstance(layers, Iterable):
        raise ValueError(f"layers: expected None or a list of layer indices, got {layers!r}")
    out = []
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"layers: indices must be ints, got {i!r}")
        if not -n <= i < n:
            raise ValueError(f"layers: index {i} out of range for a model with {n} layers")
        i %= n
        if i not in out:
            out.append(i)
    if not out:
        raise ValueError("layers: empty list (pass None to swap every layer)")
    return sorted(out)


def _json_option(kind: str, name: str, value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ValueError(
        f"{kind}: option {name}={value!r} is not a JSON scalar (None, bool, int, float, str); "
        "swap options are recorded in the model config"
    )


def swap_attention(
    model: nn.Module, kind: str, *, layers: Iterable[int] | None = None, **config: Any
) -> nn.Module:
    """Replace the self-attention of decoder layers of a Llama-family ``transformers`` model with
    the longattn module ``kind``, in place; returns ``model``.

    Args:
        model: a decoder-only model (``LlamaForCausalLM``, ``MistralForCausalLM``,
            ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``, their base models, ...) whose decoder
            layers have ``self_attn`` with ``q_proj``/``k_proj``/``v_proj``/``o_proj``.
        kind: ``"nsa"``, ``"lightning"``, ``"rat"`` or ``"landmark"``.
        layers: indices of the decoder layers to swap (negative ones count from the end); None
            swaps all of them. The others keep their attention (hybrid models).
        **config: options of the module's constructor, e.g. ``block_size``, ``topk``,
            ``window_size``, ``kernel_size``, ``kernel_stride``, ``compress`` (nsa);
            ``block_size``, ``topk`` (landmark); ``chunk_size``, ``ngroups``, ``rope_theta`` (rat;
            ``rope_base`` is its deprecated alias);
            ``eps`` (lightning, rat). Sizes and RoPE come from the model and cannot be set.

    The swap is appended to ``model.config.longattn_swaps`` (a list of ``{"kind", "layers",
    "options"}``), which ``save_pretrained`` writes to config.json and :func:`from_pretrained`
    replays.

    Raises:
        ValueError: unknown kind or option, bad layer index, a layer already swapped, a layer
            without the expected projections, or sizes the module does not support.
    """
    config = _renamed_options(config, warn=True)
    idxs = _swap(model, kind, layers, config)
    cfg = getattr(model, "config", None)
    if cfg is None:
        cfg = getattr(_find_decoder(model)[0], "config", None)
    if cfg is not None:
        record = {"kind": kind, "layers": idxs, "options": dict(config)}
        cfg.longattn_swaps = [*(getattr(cfg, "longattn_swaps", None) or []), record]
    return model


def _renamed_options(config: dict, *, warn: bool) -> dict:
    """config with the renamed options under their new names (both given: a ValueError)."""
    out = dict(config)
    for old, new in _RENAMED_OPTIONS.items():
        if old not in out:
            continue
        if new in out:
            raise ValueError(f"options: got both {new}= and its deprecated alias {old}=")
        if warn:
            warnings.warn(
                f"swap_attention: {old}= is deprecated and will be removed in the next release; "
                f"pass {new}=",
                DeprecationWarning,
                stacklevel=3,
            )
        out[new] = out.pop(old)
    return out


@torch.no_grad()
def _swap(model: nn.Module, kind: str, layers: Iterable[int] | None, config: dict) -> list[int]:
    """swap_attention without recording it in the config; returns the swapped layer indices."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {sorted(KINDS)}, got {kind!r}")
    cls = KINDS[kind]
    allowed = set(inspect.signature(cls.__init__).parameters) - {"self", "device", "dtype"}
    allowed -= _DERIVED[kind]
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(
            f"{kind}: unknown or derived option(s) {unknown}; settable options: {sorted(allowed)}"
        )
    for name, value in config.items():
        _json_option(kind, name, value)
    base, stack = _find_decoder(model)
    idxs = _layer_indices(layers, len(stack))

    cfg = getattr(model, "config", None) or getattr(base, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    theta, rope_type = _rope_theta(cfg)
    rotary = _find_rotary(base) if kind in ("nsa", "landmark") else None
    if rotary is None and rope_type != "default" and kind in ("nsa", "landmark"):
        warnings.warn(
            f"swap_attention: the model uses rope_type={rope_type!r} but has no `rotary_emb` "
            f"module; the swapped {kind} layers apply plain RoPE with rope_theta={theta} (the "
            "scaling is not reproduced)",
            stacklevel=3,
        )

    for i in idxs:
        attn = stack[i].self_attn
        if isinstance(attn, LongAttnSelfAttention):
            raise ValueError(f"layers: layer {i} is already swapped (kind={attn.kind!r})")
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        missing = [n for n in names if not isinstance(getattr(attn, n, None), nn.Linear)]
        if missing:
            raise ValueError(
                f"layer {i}: {type(attn).__name__} does not have q_proj/k_proj/v_proj/o_proj "
                f"nn.Linear projections (missing: {missing})"
            )

    for i in idxs:
        attn = stack[i].self_attn
        D = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
        if not D:
            D = cfg.hidden_size // cfg.num_attention_heads
        info = {
            "head_dim": int(D),
            "num_heads": attn.q_proj.out_features // D,
            "num_kv_heads": attn.k_proj.out_features // D,
            "hidden_size": attn.q_proj.in_features,
            "num_layers": len(stack),
            "rope_theta": theta,
            "eps": float(getattr(cfg, "rms_norm_eps", 1e-6)),
            "init_std": float(getattr(cfg, "initializer_range", 0.02)),
        }
        if info["num_heads"] % info["num_kv_heads"]:
            raise ValueError(
                f"layer {i}: {info['num_kv_heads']} kv heads do not divide "
                f"{info['num_heads']} query heads"
            )
        mod, reused, new, dropped = _build(kind, attn, i, info, dict(config))
        if rotary is not None:
            mod.rotary = ModelRotary(rotary)
        if any(n.endswith("_norm") for n in dropped):
            warnings.warn(
                f"swap_attention: kind={kind!r} has no place for the per-head "
                f"{[n for n in dropped if n.endswith('_norm')]} of layer {i}; they are dropped",
                stacklevel=3,
            )
        wrapper = LongAttnSelfAttention(kind, mod, i, tuple(reused), tuple(new))
        wrapper.train(attn.training)
        stack[i].self_attn = wrapper

    _install_checks(base)
    return idxs


def apply_recorded_swaps(model: nn.Module) -> nn.Module:
    """Replay the swaps recorded in ``model.config.longattn_swaps`` on ``model`` (a freshly built
    model of the same config: its layers are not swapped yet), without recording them again.
    Weights are whatever the swap derives from the model's own; load the saved ones afterwards
    (:func:`from_pretrained` does it all). Returns ``model``."""
    swaps = getattr(getattr(model, "config", None), "longattn_swaps", None) or []
    if not isinstance(swaps, list | tuple):
        raise ValueError(f"config.longattn_swaps: expected a list, got {type(swaps).__name__}")
    for n, rec in enumerate(swaps):
        if not isinstance(rec, dict) or "kind" not in rec:
            raise ValueError(
                f"config.longattn_swaps[{n}]: expected a dict with kind, layers and options"
            )
        with warnings.catch_warnings():  # warned once already, when the swap was made
            warnings.simplefilter("ignore", UserWarning)
            options = _renamed_options(dict(rec.get("options") or {}), warn=False)
            _swap(model, rec["kind"], rec.get("layers"), options)
    return model


_HUB_KWARGS = (
    "cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder",
    "trust_remote_code", "proxies",
)  # fmt: skip


def from_pretrained(
    pretrained_model_name_or_path: Any, *model_args: Any, model_class: Any = None, **kwargs: Any
) -> nn.Module:
    """Load a model saved after :func:`swap_attention`: the swaps in its config
    (``longattn_swaps``) are applied while the model is built, before transformers loads the
    weights, so the saved weights of the swapped modules land in them (transformers' own loading:
    sharded checkpoints, the Hub, ``dtype=``, ``device_map=`` ... all work as usual).

    Args:
        pretrained_model_name_or_path, *model_args, **kwargs: as for
            ``model_class.from_pretrained`` (``attn_implementation=`` included: it applies to the
            layers that were not swapped). Keyword arguments named ``longattn_*`` (the options of
            the attention functions, e.g. ``longattn_window_size=1024``) are set on the config.
        model_class: a model class (``LlamaForCausalLM``, ...) or an Auto class; default
            ``AutoModelForCausalLM``.

    A checkpoint without ``longattn_swaps`` loads as ``model_class.from_pretrained`` would.
    Returns an instance of the model's own class (e.g. ``LlamaForCausalLM``).

    Raises:
        ValueError: a recorded swap that does not apply, or a checkpoint without the weights of
            a swapped module.
    """
    import transformers

    options = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("longattn_")}
    if "longattn_swaps" in options:
        raise ValueError(
            "longattn_swaps: not an option of from_pretrained (a checkpoint saved without the swap "
            "has no weights for the swapped modules); load the model, then call swap_attention"
        )
    config = kwargs.get("config")
    if isinstance(config, PreTrainedConfig):
        config = copy.deepcopy(config)
    else:
        hub = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        config = transformers.AutoConfig.from_pretrained(
            config if config is not None else pretrained_model_name_or_path, **hub
        )
    for name, value in options.items():
        setattr(config, name, value)
    kwargs["config"] = config
    cls = transformers.AutoModelForCausalLM if model_class is None else model_class
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is not None:  # an Auto class: the concrete class of this config
        from transformers.models.auto.auto_factory import _get_model_class

        cls = _get_model_class(config, mapping)
    if not getattr(config, "longattn_swaps", None):
        return cls.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    def __init__(self, config, *args, **kw):
        cls.__init__(self, config, *args, **kw)
        apply_recorded_swaps(self)

    # a subclass whose constructor swaps, so the model that transformers fills is the swapped one
    swapped = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    swapped.__qualname__ = cls.__qualname__
    want_info = kwargs.pop("output_loading_info", False)
    model, info = swapped.from_pretrained(
        pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
    )
    model.__class__ = cls  # a plain instance of the model's class again
    prefixes = [
        name + "."
        for name, module in model.named_modules()
        if isinstance(module, LongAttnSelfAttention)
    ]
    missing = sorted(k for k in info["missing_keys"] if any(k.startswith(p) for p in prefixes))
    if missing:
        raise ValueError(
            f"{pretrained_model_name_or_path}: the checkpoint has no weights for the swapped "
            f"modules' {missing[:4]}{' ...' if len(missing) > 4 else ''}; config.longattn_swaps "
            "does not match the saved weights"
        )
    for module in model.modules():
        if isinstance(module, LightningAttention):  # non-persistent buffer: not in the checkpoint
            module.slopes = module._make_slopes(module.qkv_proj.weight.device)
    return (model, info) if want_info else model

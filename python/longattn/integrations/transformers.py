"""Drop-in replacement of the self-attention of Hugging Face ``transformers`` decoder models.

``swap_attention(model, kind, layers=None, **config)`` replaces ``layer.self_attn`` of every
decoder layer (or of the layer indices in ``layers``) of a Llama-family model (Llama, Mistral,
Qwen2, Qwen3 and any model whose attention module has ``q_proj``/``k_proj``/``v_proj``/``o_proj``
``nn.Linear`` layers and whose decoder layers keep their own RMSNorm and residual) with a
longattn module of ``kind`` in ``{"nsa", "lightning", "rat", "landmark"}``, in place, and returns
the model. Forward, backward and ``generate()`` (with or without a cache) keep working.

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
landmark rotate q/k with the model's ``rope_theta`` (Llama ``rotate_half``; rope scaling types
other than ``"default"`` are not reproduced: a warning says so); rat uses the model's
``rope_theta`` as its chunk-RoPE base unless ``rope_base=`` is given; lightning has no RoPE.

Caches: with a ``transformers`` cache (``generate()``, or ``use_cache=True``), the swapped layer's
slot of that cache is replaced by a :class:`LongAttnCacheLayer` holding the module's own cache
(:class:`~longattn.nn.NSACache`, ...) and the number of tokens seen, so ``get_seq_length()``,
position ids and the masks of the layers that keep full attention stay right, and every new
``generate()`` call (which makes a new cache) starts fresh.

Limits: swapped layers are causal over 0..T-1 (plus the cached tokens): a padding mask with zeros
(left- or right-padded batches), a non-causal 4D mask or position ids other than
``past + arange(T)`` (packed sequences) raise ``ValueError`` instead of being ignored. The cache
cannot be cropped (assisted / contrastive decoding) and attention weights are not returned.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

try:
    from transformers.cache_utils import Cache, CacheLayerMixin, StaticLayer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "longattn.integrations.transformers needs the `transformers` package "
        "(pip install transformers)"
    ) from e

from ..nn import LandmarkAttention, LightningAttention, NativeSparseAttention, RATAttention

__all__ = [
    "KINDS",
    "HeadRMSNormLinear",
    "LandmarkLogitsProcessor",
    "LongAttnCacheLayer",
    "LongAttnSelfAttention",
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

    The module computes its own positions (0..T-1 after the tokens in its cache) and RoPE;
    ``position_embeddings`` and ``attention_mask`` are not used (the model-level checks installed
    by :func:`swap_attention` reject padding masks and shifted position ids). With a cache, the
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
    options.setdefault("rope_base", info["rope_theta"])
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


@torch.no_grad()
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
            ``block_size``, ``topk`` (landmark); ``chunk_size``, ``ngroups``, ``rope_base`` (rat);
            ``eps`` (lightning, rat). Sizes and RoPE come from the model and cannot be set.

    Raises:
        ValueError: unknown kind or option, bad layer index, a layer already swapped, a layer
            without the expected projections, or sizes the module does not support.
    """
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
    base, stack = _find_decoder(model)
    idxs = _layer_indices(layers, len(stack))

    cfg = getattr(model, "config", None) or getattr(base, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config(decoder=True)
    theta, rope_type = _rope_theta(cfg)
    if rope_type != "default" and kind in ("nsa", "landmark"):
        warnings.warn(
            f"swap_attention: the model uses rope_type={rope_type!r}; the swapped {kind} layers "
            f"apply plain RoPE with rope_theta={theta} (the scaling is not reproduced)",
            stacklevel=2,
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
        if any(n.endswith("_norm") for n in dropped):
            warnings.warn(
                f"swap_attention: kind={kind!r} has no place for the per-head "
                f"{[n for n in dropped if n.endswith('_norm')]} of layer {i}; they are dropped",
                stacklevel=2,
            )
        wrapper = LongAttnSelfAttention(kind, mod, i, tuple(reused), tuple(new))
        wrapper.train(attn.training)
        stack[i].self_attn = wrapper

    _install_checks(base)
    return model

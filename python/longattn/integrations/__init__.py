"""Integrations of the longattn modules into other libraries.

- :mod:`longattn.integrations.transformers`: importing it registers the attention
  implementations ``"longattn_sliding_window"`` and ``"longattn_landmark"`` in ``transformers``;
  ``swap_attention(model, kind, layers=None, **config)`` replaces the self-attention of
  Llama-family decoder layers (Llama, Mistral, Qwen2, Qwen3, ...) with a longattn module, in
  place, and ``from_pretrained(path)`` loads a model saved after such a swap.

Submodules import their library on first use, so ``import longattn`` never needs them.
"""

__all__ = ["transformers"]


def __getattr__(name: str):
    if name == "transformers":
        import importlib

        return importlib.import_module(f"{__name__}.transformers")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

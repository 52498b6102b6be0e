"""Naive, float64-capable PyTorch references: the oracles for every test."""

from .lightning import (
    lightning_attn_parallel,
    lightning_attn_recurrent,
    lightning_slopes_reference,
)

__all__ = [
    "lightning_attn_parallel",
    "lightning_attn_recurrent",
    "lightning_slopes_reference",
]

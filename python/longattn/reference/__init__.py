"""Naive, float64-capable PyTorch references: the oracles for every test."""

from .landmark import (
    landmark_attn_reference,
    landmark_topk_blocks_reference,
    landmark_weights_reference,
)
from .lightning import (
    lightning_attn_chunked,
    lightning_attn_parallel,
    lightning_attn_recurrent,
    lightning_slopes_reference,
)
from .nsa import (
    compressed_visibility_mask,
    nsa_attn_reference,
    nsa_compress_reference,
    nsa_compressed_attn_reference,
    nsa_dense_masked_attn,
    nsa_num_windows,
    nsa_selected_attn_reference,
    nsa_selection_mask,
    nsa_topk_blocks_reference,
    sliding_window_attn_reference,
    sliding_window_mask,
)
from .rat import rat_attn_chunked, rat_attn_reference

__all__ = [
    "compressed_visibility_mask",
    "landmark_attn_reference",
    "landmark_topk_blocks_reference",
    "landmark_weights_reference",
    "lightning_attn_chunked",
    "lightning_attn_parallel",
    "lightning_attn_recurrent",
    "lightning_slopes_reference",
    "nsa_attn_reference",
    "nsa_compress_reference",
    "nsa_compressed_attn_reference",
    "nsa_dense_masked_attn",
    "nsa_num_windows",
    "nsa_selected_attn_reference",
    "nsa_selection_mask",
    "nsa_topk_blocks_reference",
    "rat_attn_chunked",
    "rat_attn_reference",
    "sliding_window_attn_reference",
    "sliding_window_mask",
]

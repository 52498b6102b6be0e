"""longattn: long-context attention kernels for PyTorch (CUDA and CPU).

Ops: ``lightning_attn`` and ``lightning_slopes`` (lightning-linear attention, CPU and CUDA);
landmark attention (``landmark_*``), the native sparse attention family (``nsa_*``,
``sliding_window_attn``) and ``rat_attn`` (RAT chunked attention), all on CPU and CUDA.
Modules live in ``longattn.nn``; float64 references in ``longattn.reference``.
"""

from importlib import metadata as _metadata

from . import nn
from ._runtime import cuda_unavailable_reason
from .ops.landmark import (
    insert_landmarks,
    landmark_attn,
    landmark_topk_blocks,
    remove_landmarks,
)
from .ops.lightning import lightning_attn, lightning_slopes
from .ops.nsa import (
    nsa_attn,
    nsa_compress,
    nsa_compressed_attn,
    nsa_selected_attn,
    nsa_topk_blocks,
    sliding_window_attn,
)
from .ops.rat import rat_attn

try:  # one version source: Cargo.toml, which maturin writes into the package metadata
    __version__ = _metadata.version("longattn")
except _metadata.PackageNotFoundError:  # pragma: no cover - imported without being installed
    __version__ = "0+unknown"
del _metadata

__all__ = [
    "cuda_unavailable_reason",
    "insert_landmarks",
    "landmark_attn",
    "landmark_topk_blocks",
    "lightning_attn",
    "lightning_slopes",
    "nn",
    "nsa_attn",
    "nsa_compress",
    "nsa_compressed_attn",
    "nsa_selected_attn",
    "nsa_topk_blocks",
    "rat_attn",
    "remove_landmarks",
    "sliding_window_attn",
]

"""longattn: long-context attention kernels for PyTorch (CUDA and CPU).

Ops: ``lightning_attn`` (lightning-linear attention) and ``lightning_slopes``.
Modules live in ``longattn.nn``; float64 references in ``longattn.reference``.
"""

from ._runtime import cuda_unavailable_reason
from .ops.lightning import lightning_attn, lightning_slopes

__version__ = "0.1.0"

__all__ = ["cuda_unavailable_reason", "lightning_attn", "lightning_slopes"]

"""Drop-in ``torch.nn.Module`` layers built on the longattn ops."""

from .landmark import LandmarkAttention, LandmarkCache
from .lightning import LightningAttention, LightningCache
from .nsa import NativeSparseAttention, NSACache
from .rat import RATAttention, RATCache

__all__ = [
    "LandmarkAttention",
    "LandmarkCache",
    "LightningAttention",
    "LightningCache",
    "NSACache",
    "NativeSparseAttention",
    "RATAttention",
    "RATCache",
]

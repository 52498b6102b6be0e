"""Drop-in ``torch.nn.Module`` layers built on the longattn ops."""

from .lightning import LightningAttention, LightningCache
from .rat import RATAttention, RATCache

__all__ = ["LightningAttention", "LightningCache", "RATAttention", "RATCache"]

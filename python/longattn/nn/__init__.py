"""Drop-in ``torch.nn.Module`` layers built on the longattn ops."""

from .lightning import LightningAttention, LightningCache

__all__ = ["LightningAttention", "LightningCache"]

"""torch.library custom ops (namespace ``longattn``), one module per op family."""

from . import lightning

__all__ = ["lightning"]

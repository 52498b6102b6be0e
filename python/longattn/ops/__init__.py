"""torch.library custom ops (namespace ``longattn``), one module per op family."""

from . import landmark, lightning, nsa, rat

__all__ = ["landmark", "lightning", "nsa", "rat"]

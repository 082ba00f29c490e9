"""torchlamb: LAMB and LARS for PyTorch, for training with very large batches."""

from .groups import param_groups
from .lamb import Lamb
from .lars import Lars
from .trust import TrustStats

__all__ = ["Lamb", "Lars", "TrustStats", "param_groups"]
__version__ = "0.1.0"

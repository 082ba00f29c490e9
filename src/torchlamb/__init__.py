"""torchlamb: LAMB and LARS for PyTorch, for training with very large batches."""

from .accumulate import GradientAccumulation
from .batch_ramp import BatchRamp, linear_schedule
from .checkpoint import Checkpointer
from .groups import param_groups
from .lamb import Lamb
from .lars import Lars
from .noise_scale import NoiseScale
from .presets import LARS_PRESETS, PRESETS
from .schedules import BERT_LAMB_PHASES, WarmupPolyLR, scale_lr, warmup_poly
from .telemetry import TrustMonitor
from .trust import TrustStats

__all__ = ["BERT_LAMB_PHASES", "LARS_PRESETS", "PRESETS", "BatchRamp", "Checkpointer", "GradientAccumulation", "Lamb",
           "Lars", "NoiseScale", "TrustMonitor", "TrustStats", "WarmupPolyLR", "linear_schedule", "param_groups",
           "scale_lr", "warmup_poly"]
__version__ = "0.1.0"

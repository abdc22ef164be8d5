"""lightning_logits: logit-level training methods as PyTorch Lightning callbacks and modules."""

from lightning_logits.loss_terms import LossTermCallback, LossTermHub, StepContext
from lightning_logits.taps import LogitTap, find_classifier, find_module

__version__ = "0.1.0"

__all__ = [
    "LogitTap",
    "LossTermCallback",
    "LossTermHub",
    "StepContext",
    "__version__",
    "find_classifier",
    "find_module",
]

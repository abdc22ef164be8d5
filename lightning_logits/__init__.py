"""lightning_logits: logit-level training methods as PyTorch Lightning callbacks and modules."""

from lightning_logits.loss_terms import LossTermCallback, LossTermHub, StepContext

__version__ = "0.1.0"

__all__ = [
    "LossTermCallback",
    "LossTermHub",
    "StepContext",
    "__version__",
]

"""torchmetrics ``Metric`` classes: state that DDP reduces the way torchmetrics does."""

from lightning_logits.metrics.replay import AccuracyMatrix

__all__ = ["AccuracyMatrix"]

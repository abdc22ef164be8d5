"""torchmetrics ``Metric`` classes whose state accumulates over batches and reduces across DDP ranks."""

from lightning_logits.metrics.diagnostics import AURC, MaNoScore, OODDetection
from lightning_logits.metrics.replay import AccuracyMatrix

__all__ = ["AURC", "AccuracyMatrix", "MaNoScore", "OODDetection"]

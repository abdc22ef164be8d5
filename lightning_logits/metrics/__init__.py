"""torchmetrics ``Metric`` classes whose state accumulates over batches and reduces across DDP ranks."""

from lightning_logits.metrics.diagnostics import AURC, MaNoScore, OODDetection

__all__ = ["AURC", "MaNoScore", "OODDetection"]

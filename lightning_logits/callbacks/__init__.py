"""Callbacks that attach logit-level training methods to any LightningModule."""

from lightning_logits.loss_terms import LossTermCallback

__all__ = ["LossTermCallback"]

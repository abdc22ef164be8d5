"""LightningModules: :class:`Classifier` wraps any classification model."""

from lightning_logits.modules.classifier import Classifier, build_model

__all__ = ["Classifier", "build_model"]

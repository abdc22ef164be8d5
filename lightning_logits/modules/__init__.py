"""LightningModules: :class:`Classifier` wraps any classification model; :class:`Mowst` mixes graph experts."""

from lightning_logits.modules.classifier import Classifier
from lightning_logits.modules.mowst import GNNClassifier, Mowst

__all__ = ["Classifier", "GNNClassifier", "Mowst"]

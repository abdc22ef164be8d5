"""LightningModules: :class:`Classifier` wraps any classification model; :class:`Mowst` mixes graph experts."""

from lightning_logits.modules.classifier import Classifier, build_model
from lightning_logits.modules.mowst import GNNClassifier, Mowst, build_expert

__all__ = ["Classifier", "GNNClassifier", "Mowst", "build_expert", "build_model"]

"""LightningModules: :class:`Classifier` wraps any classification model, :class:`CausalLM` any causal
language model; :class:`Mowst` mixes graph experts."""

from lightning_logits.modules.causal_lm import CausalLM
from lightning_logits.modules.classifier import Classifier
from lightning_logits.modules.mowst import GNNClassifier, Mowst

__all__ = ["CausalLM", "Classifier", "GNNClassifier", "Mowst"]

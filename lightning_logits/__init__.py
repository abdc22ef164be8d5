"""lightning_logits: logit-level training methods as PyTorch Lightning callbacks and modules."""

from lightning_logits.loss_terms import LossTermCallback, LossTermHub, StepContext

__version__ = "0.1.0"
"""The package version (``project.version`` in ``pyproject.toml``).

Example:
    >>> from importlib.metadata import version
    >>> import lightning_logits
    >>> lightning_logits.__version__ == version("lightning-logits")
    True
"""

__all__ = [
    "LossTermCallback",
    "LossTermHub",
    "StepContext",
    "__version__",
]

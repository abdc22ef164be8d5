"""Callbacks that attach logit-level training methods to any LightningModule."""

from lightning_logits.callbacks.diagnostics import LogitDiagnostics
from lightning_logits.callbacks.distillation import ResizeInput, TeacherDistillation
from lightning_logits.callbacks.lawn import LAWN
from lightning_logits.callbacks.replay import ERACE, UER, ExperienceReplay, ReplayCallback
from lightning_logits.callbacks.replay_metrics import ContinualMetrics, plot_accuracy_matrix
from lightning_logits.callbacks.uskd import USKD
from lightning_logits.loss_terms import LossTermCallback

__all__ = [
    "ERACE",
    "LAWN",
    "UER",
    "USKD",
    "ContinualMetrics",
    "ExperienceReplay",
    "LogitDiagnostics",
    "LossTermCallback",
    "ReplayCallback",
    "ResizeInput",
    "TeacherDistillation",
    "plot_accuracy_matrix",
]

"""Distillation suite: what TeacherDistillation costs beyond the teacher's own forward pass.

Cases (timm models on 32x32 digits):

- ``student``: plain :class:`Classifier` training of the student.
- ``student+teacher_forward``: the *floor*: the same student step plus the teacher's forward pass
  (no_grad, eval mode, on the batch's input) run inside the timed step, with no loss term.
- ``student+nkd``: :class:`TeacherDistillation` with NKD; its ratio to the floor is the price of
  the mechanism (hub, logit tap, loss, logging): target at most 1.05.
- ``student+nkd_cache``: NKD from a top-k teacher-logit cache (k = 10) instead of a teacher;
  ratio to the plain student step: target at most 1.10.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.harness import SpeedCase
from lightning_logits.batch import batch_input
from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.data.digits import DigitsDataModule
from lightning_logits.modules.classifier import Classifier
from lightning_logits.networks import build_model
from lightning_logits.teacher_cache import TeacherLogitCache, build_teacher_cache


class TeacherForwardOnly(Callback):
    """The floor: run the frozen teacher on each batch inside the timed step, and nothing else."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher = teacher.requires_grad_(False).eval()
        self._input: Tensor | None = None
        self.sink = 0.0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teacher.to(pl_module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        self._input = batch_input(batch)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        assert self._input is not None
        with torch.no_grad():
            logits = self.teacher(self._input)
        self.sink = float(logits[0, 0])  # keeps the forward pass from being skipped (and syncs like .item())


def _teacher(name: str) -> nn.Module:
    torch.manual_seed(1)  # random weights: the speed does not depend on them
    return build_model(name, 10, in_chans=1)


def _cache_dir(teacher_name: str, batch_size: int) -> Path:
    path = Path(tempfile.gettempdir()) / f"lightning_logits_bench_cache_{teacher_name}"
    try:
        TeacherLogitCache(path)
    except (FileNotFoundError, ValueError):
        data = DigitsDataModule(image_size=32, return_index=True)
        data.setup("fit")
        loader = DataLoader(data.dataset("train"), batch_size=batch_size * 4)
        build_teacher_cache(_teacher(teacher_name), loader, path, k=10, source=teacher_name, overwrite=True)
    return path


def speed_cases(smoke: bool) -> list[SpeedCase]:
    student, teacher = ("resnet10t", "resnet10t") if smoke else ("resnet10t", "resnet18")
    batch_size = 16 if smoke else 64

    def make_module() -> Classifier:
        torch.manual_seed(0)
        return Classifier(student, num_classes=10, in_chans=1)

    def make_data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=batch_size, image_size=32)

    def make_indexed_data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=batch_size, image_size=32, return_index=True)

    def floor() -> list[Callback]:
        return [TeacherForwardOnly(_teacher(teacher))]

    def nkd() -> list[Callback]:
        return [TeacherDistillation(_teacher(teacher), loss="nkd")]

    def nkd_cache() -> list[Callback]:
        return [TeacherDistillation(cache=str(_cache_dir(teacher, batch_size)), loss="nkd")]

    return [
        SpeedCase("student", make_module, make_data),
        SpeedCase("student+teacher_forward", make_module, make_data, floor, baseline="student"),
        SpeedCase("student+nkd", make_module, make_data, nkd, baseline="student+teacher_forward", target=1.05),
        SpeedCase("student+nkd_cache", make_module, make_indexed_data, nkd_cache, baseline="student", target=1.10),
    ]

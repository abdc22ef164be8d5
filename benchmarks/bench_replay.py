"""Continual suite: a UER step against an ER step with the same replay batch, and the buffer's share.

``er`` (the baseline), ``er_ace`` and ``uer`` all draw a replay batch of 10 from a reservoir
of 200 and run it in a second forward pass; they differ only in the loss (ER-ACE: the incoming
softmax over the classes in the batch; UER: cosine logits on the incoming batch).
``uer+profiled`` is ``uer`` with ``profile_buffer=True``: it times every buffer operation
(retrieval and reservoir update) and, at the end of each run, prints the share of the step time
spent in them (target <= 2%). Its ratio to ``uer`` shows what the timing itself costs. On the
CPU every case trains on one thread (restored afterwards): steadier on a shared machine.

Full run: timm resnet18 on digits at 32x32 (the model class of the method's CIFAR setting), batch
10. Smoke: a small CNN on 8x8 digits.

    python -m benchmarks.speed --suite replay [--smoke]
"""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.harness import OneThread, SpeedCase
from lightning_logits.callbacks.replay import ERACE, UER, ExperienceReplay, ReplayCallback
from lightning_logits.data.digits import DigitsDataModule
from lightning_logits.modules.classifier import Classifier

BUFFER, REPLAY = 200, 10


class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm and a linear ``fc`` head, for 8x8 inputs."""

    def __init__(self, num_classes: int = 10, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Any) -> Any:
        return self.fc(self.features(x))


class BufferShare(Callback):
    """Prints the share of training-step time spent in the replay callback's buffer operations."""

    def __init__(self, replay: ReplayCallback, warmup: int = 1) -> None:
        self.replay = replay
        self.warmup = warmup
        self._seen = 0
        self._start = 0.0
        self._buffer_at_start = 0.0
        self.step_seconds = 0.0
        self.buffer_seconds = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._start = time.perf_counter()
        self._buffer_at_start = self.replay.buffer_seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Runs after the replay callback's on_train_batch_end (callbacks run in list order), so
        # the reservoir update of this step is included.
        if self._seen >= self.warmup:
            self.step_seconds += time.perf_counter() - self._start
            self.buffer_seconds += self.replay.buffer_seconds - self._buffer_at_start
        self._seen += 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.step_seconds > 0:
            share = 100 * self.buffer_seconds / self.step_seconds
            steps = self._seen - self.warmup
            print(
                f"buffer share: {share:.2f}% of step time ({1e6 * self.buffer_seconds / steps:.0f} us of "
                f"{1e3 * self.step_seconds / steps:.2f} ms per step; target <= 2%)",
                flush=True,
            )


def speed_cases(smoke: bool) -> list[SpeedCase]:
    def make_module() -> Classifier:
        if smoke:
            return Classifier(SmallCNN(), num_classes=10)
        return Classifier("resnet18", num_classes=10, in_chans=1)

    def make_data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=10, image_size=8 if smoke else 32)

    def profiled() -> list[Callback]:
        uer = UER(BUFFER, replay_batch_size=REPLAY, profile_buffer=True)
        return [uer, BufferShare(uer), OneThread()]

    return [
        SpeedCase(
            "er", make_module, make_data, lambda: [ExperienceReplay(BUFFER, replay_batch_size=REPLAY), OneThread()]
        ),
        SpeedCase(
            "uer",
            make_module,
            make_data,
            lambda: [UER(BUFFER, replay_batch_size=REPLAY), OneThread()],
            baseline="er",
            target=1.05,
        ),
        SpeedCase(
            "er_ace",
            make_module,
            make_data,
            lambda: [ERACE(BUFFER, replay_batch_size=REPLAY), OneThread()],
            baseline="er",
            target=1.05,
        ),
        SpeedCase("uer+profiled", make_module, make_data, profiled, baseline="uer"),
    ]

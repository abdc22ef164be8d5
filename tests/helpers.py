"""Small models, data and trainers for fast tests of callbacks and modules."""

from __future__ import annotations

import atexit
import multiprocessing
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_logits.parallel import end_process_group


class TinyNet(nn.Module):
    """A small CNN with a BatchNorm, a ``features`` stage and a linear ``fc`` head: ``[N, 1, 8, 8] -> [N, C]``."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class TinyMLP(nn.Module):
    """An MLP without normalization: ``[N, D] -> [N, C]``; deterministic, for exact DDP comparisons."""

    def __init__(self, in_features: int = 16, num_classes: int = 4, hidden: int = 12) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))


def blob_data(n: int = 64, in_features: int = 16, num_classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Linearly separable-ish Gaussian blobs: ``x [n, in_features]``, ``y [n]``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    centers = torch.randn(num_classes, in_features, generator=g) * 2
    x = centers[y] + torch.randn(n, in_features, generator=g)
    return x, y


class TensorDataModule(pl.LightningDataModule):
    """Fixed tensors, no shuffling: sample order is known, so runs can be compared exactly."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int = 8, num_classes: int | None = None) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        if num_classes is not None:
            self.num_classes = num_classes

    def _loader(self) -> DataLoader[Any]:
        dataset = TensorDataset(self.x, self.y)
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # Lightning's own sampler always shuffles training data under DDP; this one keeps the
            # order (rank r takes samples r, r + W, ...), so a run with ``use_distributed_sampler=False``
            # sees, per step, exactly the samples one process sees with W times the batch size.
            sampler = DistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=False)
            return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader()


class EndProcessGroupAtExit(pl.Callback):
    """In a ``ddp_spawn`` child that finished its run, end the gloo process group before the interpreter exits.

    Lightning ends the process group at exit for NCCL only. A gloo group left alive until interpreter
    finalization sometimes aborts the child ("terminate called without an active exception", SIGABRT)
    after a good run, as pytorch/pytorch PR 179291 describes; it failed CI runs of our 2-process tests.
    The barrier keeps one rank from closing its sockets while the other still talks to it. Registered
    from ``teardown``, which Lightning calls only after a run that raised nothing, so a failed rank
    never waits at the barrier for a rank that is stuck.
    """

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.world_size > 1 and multiprocessing.parent_process() is not None:
            atexit.unregister(end_process_group)
            atexit.register(end_process_group)


def fast_trainer(**kwargs: Any) -> pl.Trainer:
    """A CPU Trainer with no logger, checkpoints, progress bar or summary (override any).

    A multi-process Trainer also gets :class:`EndProcessGroupAtExit`.
    """
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    if defaults["devices"] != 1:
        callbacks = defaults.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        defaults["callbacks"] = [*callbacks, EndProcessGroupAtExit()]
    return pl.Trainer(**defaults)

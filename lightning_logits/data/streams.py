"""Class-incremental streams for online continual learning (the data side of replay methods).

:class:`ClassIncrementalStream` turns a classification data set into ``T`` tasks of disjoint
classes, one task per training epoch: run it with ``max_epochs=T`` and
``reload_dataloaders_every_n_epochs=1``. Each epoch's training loader holds only the current
task's samples, each once, in small batches; the validation loader holds the test samples of
every task seen so far, so Lightning's end-of-epoch validation is the "evaluate after each task"
step of continual learning.

:class:`~lightning_logits.callbacks.ContinualMetrics` turns those evaluations into the accuracy
matrix ``R[i, j]`` (accuracy on task ``j`` after training task ``i``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from typing_extensions import override

from lightning_logits.batch import batch_input, batch_target

__all__ = ["ClassIncrementalStream"]

_SOURCES = ("digits", "cifar10", "cifar100")


def _dataset_labels(dataset: Dataset[Any]) -> Tensor:
    """The int64 labels of a classification data set, read without loading its inputs when possible."""
    if isinstance(dataset, Subset):
        return _dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.int64)
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) >= 2:
        return tensors[1].long()
    return torch.tensor([int(batch_target(dataset[i])) for i in range(len(dataset))], dtype=torch.int64)  # type: ignore[arg-type]


class _FlattenInputs(Dataset[Any]):
    """``(input.flatten(), target)`` pairs: lets an MLP train on image data sets."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        item = self.dataset[index]
        return batch_input(item).flatten(), torch.as_tensor(batch_target(item))


class _UnpaddedDistributedSampler(DistributedSampler[Any]):
    """Rank ``r`` of ``W`` gets indices ``r, r + W, ...``, without the padding duplicates.

    Lightning keeps a loader's ``DistributedSampler`` as is, so evaluation counts every test
    sample exactly once over all ranks (the default sampler repeats a few to even out shards).
    """

    @override
    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]

    @override
    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))  # type: ignore[arg-type]


class _TaskLoader(DataLoader[Any]):
    """A task's training loader that can resume mid-epoch (Lightning saves its ``state_dict``).

    Its state is the number of batches the trainer has taken from it in the current task; after
    ``load_state_dict`` the next pass skips them, so a run stopped mid-task and resumed sees each
    sample once, as an uninterrupted run does.
    """

    def __init__(self, *args: Any, stream: ClassIncrementalStream | None = None, task: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stream = stream
        self.task = task
        self._skip = 0

    def state_dict(self) -> dict[str, int]:
        trainer = None if self.stream is None else self.stream.trainer
        done = 0 if trainer is None else int(trainer.fit_loop.epoch_loop.batch_progress.current.ready)
        return {"task": self.task, "batches": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["batches"]) if int(state["task"]) == self.task else 0

    @override
    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator, None)
        return iterator


class ClassIncrementalStream(pl.LightningDataModule):
    """A classification data set split into ``num_tasks`` tasks of disjoint classes, seen once.

    Epoch ``t`` trains on task ``t`` only (its samples shuffled with a seed, each seen once, in
    batches of ``batch_size``); validation and test use the test samples of tasks ``0..t``.
    Train with ``Trainer(max_epochs=num_tasks, reload_dataloaders_every_n_epochs=1)`` (checked in
    ``setup``) and add :class:`ContinualMetrics` for the accuracy matrix and forgetting.

    Args:
        source: ``"digits"`` (scikit-learn's, embedded: 10 classes, 5 tasks of 2 by default),
            ``"cifar10"``, ``"cifar100"`` (torchvision; ``data_dir``/``download``), or any
            LightningDataModule whose ``train_dataloader()`` and ``test_dataloader()`` read
            classification data sets (labels are read from ``.targets``, ``.tensors[1]``, or
            sample by sample).
        num_tasks: number of tasks ``T``; the class count must be a multiple of it.
        batch_size: training batch size (10 in the online continual learning literature).
        eval_batch_size: batch size of validation and test.
        class_order: explicit class order (a permutation of all classes); overrides ``seed``.
        seed: seed of the class order and of the in-task shuffle.
        flatten: flatten every input to a vector (for MLPs).
        image_size: digits only, the image side (8 native; larger is upsampled).
        test_fraction: digits only, the share of each class held out for testing.
        data_dir: CIFAR only, where the data set lives.
        download: CIFAR only, download it when missing.
        data_augmentation: CIFAR only, keep the CIFAR data module's training augmentation (random
            crop and flip, applied when a sample is loaded, so the replay buffer stores augmented
            samples). Off by default: training samples get the test transform (``ToTensor`` and
            normalization), the protocol of the ER/UER papers; add augmentation at replay time
            with the replay callbacks' ``augment=`` instead.
        num_workers: dataloader workers.

    Attributes:
        class_order: ``[C]`` the classes in task order.
        task_of_class: ``[C]`` int64 task index of every class.
        current_task: the task the current epoch trains on.

    Example:
        >>> stream = ClassIncrementalStream("digits", num_tasks=5, seed=0)
        >>> stream.setup("fit")
        >>> len(stream.tasks), len(stream.tasks[0])
        (5, 2)
        >>> x, y = next(iter(stream.train_dataloader()))
        >>> tuple(x.shape), set(y.tolist()) <= set(stream.tasks[0])
        ((10, 1, 8, 8), True)
    """

    def __init__(
        self,
        source: str | pl.LightningDataModule = "digits",
        num_tasks: int = 5,
        batch_size: int = 10,
        eval_batch_size: int = 256,
        class_order: Sequence[int] | None = None,
        seed: int = 0,
        flatten: bool = False,
        image_size: int = 8,
        test_fraction: float = 0.25,
        data_dir: str = "data",
        download: bool = False,
        num_workers: int = 0,
        data_augmentation: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(source, str) and source not in _SOURCES:
            raise ValueError(f"source must be one of {_SOURCES} or a LightningDataModule, got {source!r}")
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be at least 1, got {num_tasks}")
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size} and {eval_batch_size}")
        self.save_hyperparameters(ignore=["source"] if not isinstance(source, str) else None)
        self.source = source
        self.num_tasks = num_tasks
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self._class_order_arg = None if class_order is None else [int(c) for c in class_order]
        self.seed = seed
        self.flatten = flatten
        self.image_size = image_size
        self.test_fraction = test_fraction
        self.data_dir = data_dir
        self.download = download
        self.num_workers = num_workers
        self.data_augmentation = data_augmentation
        self.num_classes = 0
        # Filled in setup. (No empty tensors before that: ddp_spawn cannot share 0-size storage.)
        self.class_order = torch.zeros(1, dtype=torch.int64)
        self.task_of_class = torch.zeros(1, dtype=torch.int64)
        self.tasks: list[list[int]] = []
        self._train: Dataset[Any] | None = None
        self._test: Dataset[Any] | None = None
        self._train_index: list[Tensor] = []
        self._test_index: list[Tensor] = []

    def _source_module(self) -> pl.LightningDataModule:
        if not isinstance(self.source, str):
            return self.source
        if self.source == "digits":
            from lightning_logits.data.digits import DigitsDataModule

            return DigitsDataModule(
                image_size=self.image_size, val_fraction=0.05, test_fraction=self.test_fraction, seed=self.seed
            )
        from lightning_logits.data.cifar import CIFAR10DataModule, CIFAR100DataModule

        cls = CIFAR10DataModule if self.source == "cifar10" else CIFAR100DataModule
        return cls(data_dir=self.data_dir, download=self.download, num_workers=self.num_workers)

    @override
    def prepare_data(self) -> None:
        if self.source in ("cifar10", "cifar100") or not isinstance(self.source, str):
            self._source_module().prepare_data()

    @override
    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        if trainer is not None and stage == "fit":
            reload = getattr(trainer, "reload_dataloaders_every_n_epochs", None)  # set by the data connector
            if reload != 1:
                raise ValueError(
                    "ClassIncrementalStream trains one task per epoch: set "
                    f"Trainer(reload_dataloaders_every_n_epochs=1), got {reload}"
                )
            if trainer.max_epochs is not None and trainer.max_epochs > self.num_tasks:
                raise ValueError(
                    f"the stream has {self.num_tasks} tasks (one per epoch) but max_epochs is "
                    f"{trainer.max_epochs}: set max_epochs to at most {self.num_tasks}"
                )
        if self._train is not None:
            return
        module = self._source_module()
        module.setup("fit")
        train = module.train_dataloader().dataset
        test = module.test_dataloader().dataset
        if self.source in ("cifar10", "cifar100") and not self.data_augmentation:
            train = copy.copy(train)  # shares the arrays; only the transform differs
            train.transform = test.transform
        train_labels, test_labels = _dataset_labels(train), _dataset_labels(test)
        self.num_classes = int(max(int(train_labels.max()), int(test_labels.max()))) + 1
        if self.num_classes % self.num_tasks:
            raise ValueError(
                f"{self.num_classes} classes do not split into {self.num_tasks} tasks of equal size; "
                "choose num_tasks that divides the class count"
            )
        if self._class_order_arg is not None:
            order = torch.tensor(self._class_order_arg, dtype=torch.int64)
            if sorted(order.tolist()) != list(range(self.num_classes)):
                raise ValueError(
                    f"class_order must be a permutation of 0..{self.num_classes - 1}, got {self._class_order_arg}"
                )
        else:
            order = torch.randperm(self.num_classes, generator=torch.Generator().manual_seed(self.seed))
        per_task = self.num_classes // self.num_tasks
        self.class_order = order
        self.tasks = [order[t * per_task : (t + 1) * per_task].tolist() for t in range(self.num_tasks)]
        self.task_of_class = torch.empty(self.num_classes, dtype=torch.int64)
        self.task_of_class[order] = torch.arange(self.num_classes) // per_task
        train_task, test_task = self.task_of_class[train_labels], self.task_of_class[test_labels]
        shuffle = torch.Generator().manual_seed(self.seed + 1)
        self._train_index = []
        for t in range(self.num_tasks):
            index = torch.nonzero(train_task == t).flatten()
            self._train_index.append(index[torch.randperm(len(index), generator=shuffle)])
        self._test_index = [torch.nonzero(test_task == t).flatten() for t in range(self.num_tasks)]
        self._train = _FlattenInputs(train) if self.flatten else train
        self._test = _FlattenInputs(test) if self.flatten else test

    @property
    def current_task(self) -> int:
        """The task of the current training epoch (the last task once the stream is done)."""
        trainer = self.trainer
        epoch = trainer.current_epoch if trainer is not None else 0
        return min(epoch, self.num_tasks - 1)

    def task_dataset(self, task: int, split: str = "train") -> Dataset[Any]:
        """The samples of one task (``split``: ``"train"`` or ``"test"``), after ``setup``."""
        if self._train is None or self._test is None:
            self.setup()
        assert self._train is not None and self._test is not None
        if not 0 <= task < self.num_tasks:
            raise IndexError(f"task must be in [0, {self.num_tasks}), got {task}")
        if split == "train":
            return Subset(self._train, self._train_index[task].tolist())
        return Subset(self._test, self._test_index[task].tolist())

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        # Already shuffled with the seed in setup: a fixed order, so a resumed run sees the same samples.
        task = self.current_task
        return _TaskLoader(
            self.task_dataset(task, "train"),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            stream=self,
            task=task,
        )

    def _eval_loader(self) -> DataLoader[Any]:
        if self._test is None:
            self.setup()
        seen = torch.cat(self._test_index[: self.current_task + 1]).tolist()
        dataset = Subset(self._test, seen)  # type: ignore[arg-type]
        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = _UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank, shuffle=False)
        return DataLoader(dataset, batch_size=self.eval_batch_size, sampler=sampler, num_workers=self.num_workers)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        return self._eval_loader()

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        return self._eval_loader()

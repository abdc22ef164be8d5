"""The scikit-learn digits data set (1797 8x8 grayscale images, 10 classes) as a DataModule.

It ships inside scikit-learn, so it needs no download: the quickstart, the tests and the small
benchmarks all run on it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset
from typing_extensions import override


class IndexedTensorDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    """``(input, target, index)`` triples; the index keys per-sample caches (teacher logits)."""

    def __init__(self, inputs: Tensor, targets: Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.inputs[index], self.targets[index], torch.tensor(index)


def load_digits_tensors(image_size: int = 8) -> tuple[Tensor, Tensor]:
    """All 1797 digits as ``[N, 1, S, S]`` float images in ``[-1, 1]`` and ``[N]`` int64 labels.

    Args:
        image_size: side ``S`` of the returned images (8, the original size, or larger: resized).

    Example:
        >>> images, labels = load_digits_tensors(image_size=16)
        >>> images.shape, labels.shape, labels.unique().tolist()
        (torch.Size([1797, 1, 16, 16]), torch.Size([1797]), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
        >>> bool(images.min() >= -1) and bool(images.max() <= 1)
        True
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if image_size != 8:
        images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    return images * 2.0 - 1.0, torch.tensor(data.target, dtype=torch.int64)


class DigitsDataModule(pl.LightningDataModule):
    """Seeded, stratified train/val/test splits of scikit-learn's digits.

    Batches are ``(input [B, 1, S, S], target [B])``, or ``(input, target, index)`` with
    ``return_index=True`` (index into the training split, for per-sample caches).

    Args:
        batch_size: samples per batch (training drops its last incomplete batch).
        image_size: side of the square images: 8 (native) or larger, upsampled bilinearly
            (32 suits timm CNNs, whose stems downsample 32x).
        val_fraction: share of the data held out for validation.
        test_fraction: share held out for testing.
        train_fraction: share of the remaining training split to keep (a smaller split leaves a
            student room to learn from a teacher).
        seed: seed of the splits and of the training shuffle.
        return_index: append each sample's index to the batch.
        num_workers: dataloader workers (the data is in memory: 0 is fastest here).

    Example:
        >>> dm = DigitsDataModule(image_size=32)
        >>> dm.setup("fit")
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), dm.num_classes
        ((64, 1, 32, 32), 10)
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        batch_size: int = 64,
        image_size: int = 8,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        train_fraction: float = 1.0,
        seed: int = 0,
        return_index: bool = False,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"val_fraction ({val_fraction}) and test_fraction ({test_fraction}) must be in "
                "(0, 1) and sum to less than 1"
            )
        if not 0 < train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 (the native size), got {image_size}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.train_fraction = train_fraction
        self.seed = seed
        self.return_index = return_index
        self.num_workers = num_workers
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.model_selection import train_test_split

        images, labels = load_digits_tensors(self.image_size)
        index = torch.arange(len(labels)).numpy()
        rest, test = train_test_split(
            index, test_size=self.test_fraction, stratify=labels.numpy(), random_state=self.seed
        )
        val_share = self.val_fraction / (1 - self.test_fraction)
        train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest].numpy(), random_state=self.seed)
        if self.train_fraction < 1:
            train, _ = train_test_split(
                train, train_size=self.train_fraction, stratify=labels[train].numpy(), random_state=self.seed
            )
        for name, idx in (("train", train), ("val", val), ("test", test)):
            t = torch.as_tensor(idx)
            self.splits[name] = (images[t], labels[t])

    def dataset(self, split: str) -> Dataset[Any]:
        """The ``"train"``, ``"val"`` or ``"test"`` split as a dataset (after :meth:`setup`)."""
        if split not in self.splits:
            self.setup()
        inputs, targets = self.splits[split]
        if self.return_index:
            return IndexedTensorDataset(inputs, targets)
        return TensorDataset(inputs, targets)

    def _loader(self, split: str, shuffle: bool) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)

"""MNIST-1D (Greydanus, 2020), the one copy every benchmark reads.

4000 training and 1000 test signals of 40 samples, 10 classes, generated offline by the ``mnist1d``
package from its default arguments (which fix its seed, so every run gets the same data) and cached
as ``data/mnist1d.pt`` at the repository root (ignored by git). The package is in the ``bench`` and
``dev`` extras.

    >>> from benchmarks.mnist1d import load_mnist1d
    >>> x, y, x_test, y_test = load_mnist1d()  # doctest: +SKIP
    >>> x.shape, y.shape, x_test.shape  # doctest: +SKIP
    (torch.Size([4000, 40]), torch.Size([4000]), torch.Size([1000, 40]))
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "data" / "mnist1d.pt"


def load_mnist1d(cache: Path = CACHE) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x [4000, 40] float32, y [4000] int64, x_test [1000, 40] float32, y_test [1000] int64)``."""
    if cache.exists():
        data = torch.load(cache)
    else:
        from mnist1d.data import get_dataset_args, make_dataset

        raw = make_dataset(get_dataset_args())
        data = {k: torch.as_tensor(raw[k]) for k in ("x", "y", "x_test", "y_test")}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(data, cache)
    return data["x"].float(), data["y"].long(), data["x_test"].float(), data["y_test"].long()


class MNIST1DDataModule(pl.LightningDataModule):
    """MNIST-1D as seeded train/val/test splits: batches ``(input [B, *shape], target [B])``.

    The validation split is a stratified, seeded ``val_fraction`` of the 4000 training signals (never
    the test set); the test split is the package's 1000 test signals.

    Args:
        batch_size: samples per batch (training shuffles with ``seed`` and drops its last
            incomplete batch).
        seed: seed of the validation split and of the training shuffle.
        val_fraction: share of the training signals held out for validation (0: none).
        shape: the shape of one input: ``(40,)`` for an MLP, ``(1, 40)`` for a 1-D CNN,
            ``(1, 1, 40)`` for a 2-D CNN.
        cache: where the generated data is kept (made on first use).

    Example:
        >>> dm = MNIST1DDataModule(shape=(1, 40))  # doctest: +SKIP
        >>> dm.setup()  # doctest: +SKIP
        >>> {k: tuple(x.shape) for k, (x, _) in dm.splits.items()}  # doctest: +SKIP
        {'train': (3200, 1, 40), 'val': (800, 1, 40), 'test': (1000, 1, 40)}
    """

    num_classes = 10

    def __init__(
        self,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.2,
        shape: tuple[int, ...] = (40,),
        cache: Path = CACHE,
    ) -> None:
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size = batch_size
        self.seed = seed
        self.val_fraction = val_fraction
        self.shape = tuple(shape)
        self.cache = Path(cache)
        self.splits: dict[str, tuple[Tensor, Tensor]] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        x, y, x_test, y_test = load_mnist1d(self.cache)
        x, x_test = x.reshape(-1, *self.shape), x_test.reshape(-1, *self.shape)
        if self.val_fraction == 0:
            self.splits = {"train": (x, y), "test": (x_test, y_test)}
            return
        from sklearn.model_selection import train_test_split

        train, val = train_test_split(
            torch.arange(len(y)).numpy(), test_size=self.val_fraction, stratify=y.numpy(), random_state=self.seed
        )
        train, val = torch.as_tensor(train), torch.as_tensor(val)
        self.splits = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x_test, y_test)}

    def _loader(self, split: str, shuffle: bool) -> DataLoader[tuple[Tensor, Tensor]]:
        self.setup()
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            TensorDataset(*self.splits[split]),
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        if "val" not in self.splits and self.val_fraction == 0:
            raise ValueError("this MNIST1DDataModule has no validation split: set val_fraction > 0")
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader[tuple[Tensor, Tensor]]:
        return self._loader("test", shuffle=False)

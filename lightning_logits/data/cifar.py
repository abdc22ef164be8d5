"""CIFAR-10 and CIFAR-100 DataModules on torchvision, for users with internet or a local copy."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override


class CIFARDataModule(pl.LightningDataModule):
    """Shared logic of :class:`CIFAR10DataModule` and :class:`CIFAR100DataModule`.

    Training uses the standard augmentation (4-pixel padded random crop, horizontal flip);
    validation and test use the official test split. Batches are ``(input [B, 3, 32, 32], target)``.

    Args:
        data_dir: where the extracted data set lives (or is downloaded to).
        download: download it when missing. Off by default: a missing data set is an error that
            says where it looked.
        batch_size: samples per batch.
        num_workers: dataloader workers.
    """

    num_classes: ClassVar[int]
    folder: ClassVar[str]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    in_channels = 3

    def __init__(
        self, data_dir: str = "data", download: bool = False, batch_size: int = 128, num_workers: int = 4
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.datasets: dict[str, Dataset[Any]] = {}

    def _dataset_class(self) -> Any:
        raise NotImplementedError

    def check_available(self) -> None:
        """Raise ``FileNotFoundError`` naming the folder when the data is absent and download is off."""
        path = Path(self.data_dir) / self.folder
        if not self.download and not path.is_dir():
            raise FileNotFoundError(
                f"{type(self).__name__}: no data set at '{path.resolve()}'. Set download: true "
                f"(needs internet), or point data_dir at the folder that holds '{self.folder}'"
            )

    @override
    def prepare_data(self) -> None:
        self.check_available()
        if self.download:
            cls = self._dataset_class()
            cls(self.data_dir, train=True, download=True)
            cls(self.data_dir, train=False, download=True)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        self.check_available()
        from torchvision import transforms as T

        normalize = T.Normalize(self.mean, self.std)
        train_tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        eval_tf = T.Compose([T.ToTensor(), normalize])
        cls = self._dataset_class()
        self.datasets["train"] = cls(self.data_dir, train=True, transform=train_tf)
        self.datasets["test"] = cls(self.data_dir, train=False, transform=eval_tf)

    def _loader(self, split: str, shuffle: bool) -> DataLoader[Any]:
        return DataLoader(
            self.datasets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    @override
    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader[Any]:
        return self._loader("test", shuffle=False)


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10 (50k/10k 32x32 colour images, 10 classes). See :class:`CIFARDataModule`.

    Batches are ``(input [B, 3, 32, 32], target [B])``. The data is not shipped: set
    ``download=True`` once with internet, or extract ``cifar-10-batches-py`` under ``data_dir``.

    Example:
        >>> dm = CIFAR10DataModule(data_dir="no/such/folder")
        >>> dm.num_classes, dm.in_channels
        (10, 3)
        >>> dm.setup("fit")  # no local copy and download=False: the error says what to do
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR10DataModule: no data set at '...cifar-10-batches-py'. Set download: true ...
    """

    num_classes = 10
    folder = "cifar-10-batches-py"
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    def _dataset_class(self) -> Any:
        from torchvision.datasets import CIFAR10

        return CIFAR10


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 (50k/10k 32x32 colour images, 100 classes). See :class:`CIFARDataModule`.

    Batches are ``(input [B, 3, 32, 32], target [B])``. The data is not shipped: set
    ``download=True`` once with internet, or extract ``cifar-100-python`` under ``data_dir``.

    Example:
        >>> dm = CIFAR100DataModule(data_dir="no/such/folder", batch_size=64)
        >>> dm.num_classes, dm.folder
        (100, 'cifar-100-python')
        >>> dm.prepare_data()
        Traceback (most recent call last):
        ...
        FileNotFoundError: CIFAR100DataModule: no data set at '...cifar-100-python'. Set download: true ...
    """

    num_classes = 100
    folder = "cifar-100-python"
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    def _dataset_class(self) -> Any:
        from torchvision.datasets import CIFAR100

        return CIFAR100

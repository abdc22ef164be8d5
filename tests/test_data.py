"""DataModules: seeded digits splits, and CIFAR's clear error when the data is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_logits.data import CIFAR10DataModule, CIFAR100DataModule, DigitsDataModule


def _labels(dm: DigitsDataModule, split: str) -> torch.Tensor:
    return dm.splits[split][1]


def test_digits_splits_are_disjoint_stratified_and_seeded() -> None:
    dm = DigitsDataModule(val_fraction=0.2, test_fraction=0.2, seed=3)
    dm.setup("fit")
    sizes = {k: len(v[1]) for k, v in dm.splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == 360 and sizes["val"] == 360
    # stratified: every class in every split, shares within 2 points of 10%
    for split in ("train", "val", "test"):
        share = torch.bincount(_labels(dm, split), minlength=10).float() / sizes[split]
        assert share.min() > 0.08 and share.max() < 0.12
    # disjoint: no image appears in two splits
    flat = {k: {tuple(x.flatten().tolist()) for x in v[0]} for k, v in dm.splits.items()}
    assert not flat["train"] & flat["test"] and not flat["val"] & flat["test"]
    again = DigitsDataModule(val_fraction=0.2, test_fraction=0.2, seed=3)
    again.setup("fit")
    torch.testing.assert_close(again.splits["test"][0], dm.splits["test"][0])
    other = DigitsDataModule(seed=4)
    other.setup("fit")
    assert not torch.equal(other.splits["test"][1], dm.splits["test"][1])


def test_digits_resize_range_index_and_train_fraction() -> None:
    dm = DigitsDataModule(image_size=32, batch_size=16, return_index=True, train_fraction=0.5)
    dm.setup("fit")
    x, y, idx = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 32, 32) and y.shape == (16,) and idx.shape == (16,)
    assert x.min() >= -1.0 and x.max() <= 1.0
    train_x, train_y = dm.splits["train"]
    torch.testing.assert_close(train_x[idx], x)
    assert len(train_y) == pytest.approx(0.5 * (1797 - 720), abs=1)
    # training drops the last incomplete batch (even batches for mixup); evaluation keeps all samples
    assert all(len(b[1]) == 16 for b in dm.train_dataloader())
    assert sum(len(b[1]) for b in dm.val_dataloader()) == 360


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum to less than 1"),
        ({"train_fraction": 0.0}, "train_fraction"),
        ({"image_size": 4}, "at least 8"),
    ],
)
def test_digits_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize(
    ("cls", "folder"), [(CIFAR10DataModule, "cifar-10-batches-py"), (CIFAR100DataModule, "cifar-100-python")]
)
def test_cifar_missing_data_says_where_it_looked(cls, folder: str, tmp_path: Path) -> None:
    dm = cls(data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"no data set at '{tmp_path}/{folder}'.*download: true"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="download: true"):
        dm.setup("fit")

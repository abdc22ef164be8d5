"""Offline OOD sets and the digits corruption generator."""

from __future__ import annotations

import pytest
import torch

from lightning_logits.data import (
    DigitsShiftDataModule,
    corrupt_images,
    load_digits_tensors,
    shape_images,
    split_held_out_classes,
    uniform_noise_images,
)


def test_ood_images_shapes_ranges_and_seeds() -> None:
    for fn in (uniform_noise_images, shape_images):
        x = fn(20, image_size=8, seed=3)
        assert x.shape == (20, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
        assert torch.equal(x, fn(20, image_size=8, seed=3))
        assert not torch.equal(x, fn(20, image_size=8, seed=4))
    shapes = shape_images(50, seed=0)
    assert set(shapes.unique().tolist()) == {-1.0, 1.0}  # strokes on background
    ink = (shapes > 0).float().mean(dim=(1, 2, 3))
    assert (ink > 0).all() and (ink < 1).all()


def test_split_held_out_classes_relabels_in_order() -> None:
    x = torch.arange(6.0).view(6, 1, 1, 1)
    y = torch.tensor([0, 1, 2, 3, 2, 1])
    x_in, y_in, x_out, y_out = split_held_out_classes(x, y, (1,))
    assert y_in.tolist() == [0, 1, 2, 1] and x_in.flatten().tolist() == [0, 2, 3, 4]
    assert x_out.flatten().tolist() == [1, 5] and y_out.tolist() == [1, 1]
    with pytest.raises(ValueError, match="not in the labels' range"):
        split_held_out_classes(x, y, (7,))


@pytest.mark.parametrize("corruption", ["gaussian_noise", "gaussian_blur", "contrast", "rotation"])
def test_corruptions_grow_with_severity(corruption: str) -> None:
    x, _ = load_digits_tensors()
    x = x[:200]
    dists = [(corrupt_images(x, corruption, s) - x).pow(2).mean().item() for s in range(1, 6)]
    assert all(d > 0 for d in dists)
    assert dists == sorted(dists), dists  # monotone in severity
    y = corrupt_images(x, corruption, 3)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert torch.equal(y, corrupt_images(x, corruption, 3))  # seeded


def test_blur_and_contrast_hand_values() -> None:
    # contrast with factor 0.5 (severity 1) halves deviations from the image mean
    x = torch.tensor([-1.0, 1.0, -1.0, 1.0]).view(1, 1, 2, 2)
    torch.testing.assert_close(corrupt_images(x, "contrast", 1), x * 0.5)
    # blur keeps a constant background image constant (padding is background)
    bg = torch.full((1, 1, 8, 8), -1.0)
    torch.testing.assert_close(corrupt_images(bg, "gaussian_blur", 5), bg)
    # blur of a single ink pixel spreads ink but keeps its total (away from the border)
    dot = bg.clone()
    dot[0, 0, 4, 4] = 1.0
    blurred = corrupt_images(dot, "gaussian_blur", 1)
    assert blurred[0, 0, 4, 4] < 1.0 and blurred[0, 0, 4, 5] > -1.0
    assert (blurred + 1).sum().item() == pytest.approx(2.0, rel=1e-4)


def test_bad_corruption_arguments() -> None:
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ValueError, match="corruption must be one of"):
        corrupt_images(x, "snow", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="severity must be"):
        corrupt_images(x, "contrast", 6)


def test_shift_datamodule() -> None:
    dm = DigitsShiftDataModule(held_out_classes=(8, 9), ood_sets=("noise", "held_out"), severities=(1, 5))
    dm.setup("fit")
    assert dm.num_classes == 8
    for split in ("train", "val", "test"):
        assert int(dm.splits[split][1].max()) == 7
    ood = dm.ood_dataloaders()
    x, y = next(iter(ood["held_out"]))
    assert (y == -1).all() and x.shape[1:] == (1, 8, 8)
    shifted = dm.shifted_dataloaders()
    assert sorted(shifted) == sorted(f"{c}_{s}" for c in dm.corruptions for s in (1, 5))
    x, y = next(iter(shifted["rotation_5"]))
    assert y.max() <= 7
    with pytest.raises(ValueError, match="needs held_out_classes"):
        DigitsShiftDataModule(ood_sets=("held_out",))


def test_cifar10c_reader_on_a_fake_folder(tmp_path) -> None:
    import numpy as np

    from lightning_logits.data import CIFAR10ShiftDataModule

    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.save(folder / "labels.npy", np.tile(np.arange(10), 2))  # 5 severities x 4 images
    np.save(folder / "fog.npy", rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8))
    dm = CIFAR10ShiftDataModule(corruptions_dir=str(folder), severities=(2, 5), ood_sets=("noise",), ood_size=6)
    loaders = dm.shifted_dataloaders()
    assert sorted(loaders) == ["fog_2", "fog_5"]
    x, y = next(iter(loaders["fog_5"]))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [6, 7, 8, 9]  # rows 16..19
    raw = torch.from_numpy(np.load(folder / "fog.npy")[16]).permute(2, 0, 1).float() / 255
    want = (raw - torch.tensor(dm.mean).view(3, 1, 1)) / torch.tensor(dm.std).view(3, 1, 1)
    torch.testing.assert_close(x[0], want)
    x, y = next(iter(dm.ood_dataloaders()["noise"]))
    assert x.shape == (6, 3, 32, 32) and (y == -1).all()
    with pytest.raises(FileNotFoundError, match="no CIFAR-10-C"):
        CIFAR10ShiftDataModule(corruptions_dir=str(tmp_path / "missing")).shifted_dataloaders()

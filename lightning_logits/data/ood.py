"""Offline out-of-distribution and shifted data for the digits: OOD sets and a corruption generator.

Everything is generated here from scikit-learn's digits and seeded noise, so the diagnostics run
without downloads:

- OOD sets: :func:`uniform_noise_images` (uniform noise), :func:`shape_images` (random
  rectangles and lines), and held-out classes (:func:`split_held_out_classes`: train on some
  digits, score the others as OOD);
- a corruption generator in the spirit of CIFAR-10-C (Hendrycks & Dietterich, 2019):
  :func:`corrupt_images` with ``gaussian_noise``, ``gaussian_blur``, ``contrast`` and
  ``rotation`` at severities 1 to 5 (severity values sized for 8x8 digits, where the CIFAR
  values barely change accuracy);
- :class:`DigitsShiftDataModule`: digits (optionally without held-out classes) plus
  ``ood_dataloaders()`` and ``shifted_dataloaders()``, which
  :class:`~lightning_logits.callbacks.diagnostics.LogitDiagnostics` picks up.

Images are ``[N, 1, S, S]`` floats in ``[-1, 1]`` (background ``-1``) like
:func:`~lightning_logits.data.digits.load_digits_tensors`. OOD samples carry the label ``-1``
(no class): passing an OOD set where labels are needed fails with a clear error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from typing_extensions import override

from lightning_logits.data.cifar import CIFAR10DataModule
from lightning_logits.data.digits import DigitsDataModule

__all__ = [
    "CIFAR10ShiftDataModule",
    "CORRUPTIONS",
    "OOD_SETS",
    "DigitsShiftDataModule",
    "corrupt_images",
    "shape_images",
    "split_held_out_classes",
    "uniform_noise_images",
]

Corruption = Literal["gaussian_noise", "gaussian_blur", "contrast", "rotation"]
OODSet = Literal["noise", "shapes", "held_out"]
CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "gaussian_blur", "contrast", "rotation")
"""The corruptions :func:`corrupt_images` applies, each at severities 1-5.

Example:
    >>> import torch
    >>> images = torch.zeros(2, 1, 8, 8)
    >>> [tuple(corrupt_images(images, c, severity=3).shape) for c in CORRUPTIONS] == [(2, 1, 8, 8)] * 4
    True
"""
OOD_SETS: tuple[str, ...] = ("noise", "shapes", "held_out")
"""The offline OOD sets of :class:`DigitsShiftDataModule`: uniform noise, random shapes, held-out digit classes.

Example:
    >>> OOD_SETS
    ('noise', 'shapes', 'held_out')
"""
OOD_LABEL = -1

# Severity 1..5 parameters, for images in [-1, 1] (noise std on that scale, blur sigma in 8x8
# pixels, contrast factor, maximum rotation in degrees).
_SEVERITY = {
    "gaussian_noise": (0.2, 0.4, 0.6, 0.9, 1.2),
    "gaussian_blur": (0.5, 0.75, 1.0, 1.25, 1.5),
    "contrast": (0.5, 0.35, 0.25, 0.15, 0.08),
    "rotation": (15.0, 30.0, 45.0, 60.0, 80.0),
}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform_noise_images(n: int, image_size: int = 8, seed: int = 0) -> Tensor:
    """``n`` images of i.i.d. uniform noise in ``[-1, 1]``: ``[n, 1, S, S]``.

    Example:
        >>> x = uniform_noise_images(4)
        >>> tuple(x.shape), bool(x.min() >= -1 and x.max() <= 1)
        ((4, 1, 8, 8), True)
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return torch.rand(n, 1, image_size, image_size, generator=_generator(seed)) * 2 - 1


def shape_images(n: int, image_size: int = 8, seed: int = 0) -> Tensor:
    """``n`` images of random rectangles (filled or outlined) and straight lines on a ``-1`` background.

    Strokes have intensity ``1`` like the digits' ink, so the images look like "other shapes"
    rather than noise. Each image holds one to three shapes.

    Args:
        n: number of images ``N``.
        image_size: side ``S`` of the images.
        seed: seed of the shapes.

    Returns:
        ``[N, 1, S, S]`` float images in ``[-1, 1]``.

    Example:
        >>> x = shape_images(3, seed=1)
        >>> tuple(x.shape), bool((x > 0).any())
        ((3, 1, 8, 8), True)
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = _generator(seed)
    s = image_size
    out = torch.full((n, 1, s, s), -1.0)
    ys, xs = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")

    def rint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi, (1,), generator=g))

    for i in range(n):
        for _ in range(rint(1, 4)):
            kind = rint(0, 3)
            if kind < 2:  # rectangle
                y0, x0 = rint(0, s - 2), rint(0, s - 2)
                y1, x1 = rint(y0 + 2, s + 1), rint(x0 + 2, s + 1)
                if kind == 0:
                    out[i, 0, y0:y1, x0:x1] = 1.0
                else:
                    out[i, 0, y0:y1, [x0, x1 - 1]] = 1.0
                    out[i, 0, [y0, y1 - 1], x0:x1] = 1.0
            else:  # line through two random points, one pixel wide
                p0 = torch.rand(2, generator=g) * (s - 1)
                p1 = torch.rand(2, generator=g) * (s - 1)
                d = p1 - p0
                length = float(d.norm()) + 1e-6
                # distance of each pixel centre to the segment
                t = (((ys - p0[0]) * d[0] + (xs - p0[1]) * d[1]) / length**2).clamp(0, 1)
                dist = ((ys - p0[0] - t * d[0]) ** 2 + (xs - p0[1] - t * d[1]) ** 2).sqrt()
                out[i, 0][dist <= 0.5] = 1.0
    return out


def split_held_out_classes(
    images: Tensor, labels: Tensor, held_out: tuple[int, ...]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Split into kept classes (relabelled ``0..K-1`` in order) and held-out ones (the OOD set).

    Returns:
        ``(kept_images, kept_labels, held_out_images, held_out_original_labels)``.

    Example:
        >>> import torch
        >>> x, y = torch.zeros(4, 1, 8, 8), torch.tensor([0, 1, 2, 1])
        >>> _, y_in, x_out, _ = split_held_out_classes(x, y, (1,))
        >>> y_in.tolist(), x_out.shape[0]
        ([0, 1], 2)
    """
    num_classes = int(labels.max()) + 1 if labels.numel() else 0
    bad = [c for c in held_out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"held_out classes {bad} are not in the labels' range [0, {num_classes - 1}]")
    if len(set(held_out)) >= num_classes - 1:
        raise ValueError(f"holding out {sorted(set(held_out))} leaves fewer than 2 classes to train on")
    out_mask = torch.isin(labels, torch.tensor(list(held_out), dtype=labels.dtype))
    kept = [c for c in range(num_classes) if c not in held_out]
    remap = torch.full((num_classes,), -1, dtype=torch.long)
    remap[torch.tensor(kept)] = torch.arange(len(kept))
    return images[~out_mask], remap[labels[~out_mask]], images[out_mask], labels[out_mask]


def _gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    coords = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = images.shape[1]
    # blur the ink above the background so the padding (background) adds no ink
    x = images + 1.0
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="constant"), kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c
    )
    x = F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="constant"), kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c
    )
    return x - 1.0


def _rotate(images: Tensor, max_degrees: float, g: torch.Generator) -> Tensor:
    n = images.shape[0]
    # angles in [max/2, max] with a random sign: every image is rotated by at least half the severity
    magnitude = (0.5 + 0.5 * torch.rand(n, generator=g)) * max_degrees
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.deg2rad(magnitude * sign)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros = torch.zeros_like(cos)
    affine = torch.stack([torch.stack([cos, -sin, zeros], 1), torch.stack([sin, cos, zeros], 1)], 1)
    grid = F.affine_grid(affine.to(images.dtype), list(images.shape), align_corners=False)
    # rotate the ink (background 0 after the shift) so the zero padding is background
    return F.grid_sample(images + 1.0, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1.0


def corrupt_images(images: Tensor, corruption: Corruption, severity: int, seed: int = 0) -> Tensor:
    """Apply one corruption at severity 1 (mild) to 5 (strong); the result stays in ``[-1, 1]``.

    - ``gaussian_noise``: additive noise of std 0.2, 0.4, 0.6, 0.9, 1.2 (on the ``[-1, 1]`` scale);
    - ``gaussian_blur``: Gaussian blur of sigma 0.5 to 1.5 pixels (scaled with the image size);
    - ``contrast``: ``(x - mean) * f + mean`` per image with ``f`` = 0.5, 0.35, 0.25, 0.15, 0.08;
    - ``rotation``: rotation by a random angle between half and all of 15, 30, 45, 60, 80 degrees
      with a random direction.

    Example:
        >>> import torch
        >>> x = torch.rand(2, 1, 8, 8) * 2 - 1
        >>> y = corrupt_images(x, "contrast", 3)
        >>> bool(y.std() < x.std())
        True
    """
    if corruption not in _SEVERITY:
        raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {corruption!r}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be an integer from 1 to 5, got {severity!r}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape [N, C, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        return images.clone()
    value = _SEVERITY[corruption][severity - 1]
    g = _generator(seed * 1000 + severity)
    x = images.float()
    if corruption == "gaussian_noise":
        x = x + torch.randn(x.shape, generator=g) * value
    elif corruption == "gaussian_blur":
        x = _gaussian_blur(x, value * x.shape[-1] / 8)
    elif corruption == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * value + mean
    else:
        x = _rotate(x, value, g)
    return x.clamp(-1.0, 1.0)


class DigitsShiftDataModule(DigitsDataModule):
    """Digits with OOD sets and corrupted copies of the test split for :class:`LogitDiagnostics`.

    Training, validation and test splits are those of :class:`DigitsDataModule`, without the
    ``held_out_classes`` (the remaining classes relabelled ``0..K-1``). ``ood_dataloaders()``
    returns ``{name: loader}`` for ``ood_sets`` (``"noise"``, ``"shapes"``, ``"held_out"``; each
    the size of the test split, label ``-1``), and ``shifted_dataloaders()`` returns
    ``{"<corruption>_<severity>": loader}`` of the corrupted test split with its labels.

    Args:
        held_out_classes: digits excluded from training and used as the ``"held_out"`` OOD set
            (required for that set).
        ood_sets: which OOD sets to build (default: all, ``"held_out"`` only with held-out classes).
        corruptions: which corruptions to apply to the test split.
        severities: which severities (1..5).
        **kwargs: passed to :class:`DigitsDataModule` (``batch_size``, ``image_size``, ``seed``...).

    Example:
        >>> dm = DigitsShiftDataModule(held_out_classes=(8, 9), corruptions=("contrast",), severities=(1, 5))
        >>> dm.setup("fit")
        >>> dm.num_classes, sorted(dm.ood_dataloaders()), sorted(dm.shifted_dataloaders())
        (8, ['held_out', 'noise', 'shapes'], ['contrast_1', 'contrast_5'])
    """

    def __init__(
        self,
        held_out_classes: tuple[int, ...] = (),
        ood_sets: tuple[str, ...] | None = None,
        corruptions: tuple[str, ...] = CORRUPTIONS,
        severities: tuple[int, ...] = (1, 2, 3, 4, 5),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        held_out_classes = tuple(int(c) for c in held_out_classes)
        if ood_sets is None:
            ood_sets = ("noise", "shapes", "held_out") if held_out_classes else ("noise", "shapes")
        for name in ood_sets:
            if name not in OOD_SETS:
                raise ValueError(f"ood_sets entries must be in {OOD_SETS}, got {name!r}")
        if "held_out" in ood_sets and not held_out_classes:
            raise ValueError("the 'held_out' OOD set needs held_out_classes, e.g. held_out_classes=(8, 9)")
        for c in corruptions:
            if c not in CORRUPTIONS:
                raise ValueError(f"corruptions entries must be in {CORRUPTIONS}, got {c!r}")
        for s in severities:
            if s not in (1, 2, 3, 4, 5):
                raise ValueError(f"severities must be integers from 1 to 5, got {s!r}")
        if any(not 0 <= c < 10 for c in held_out_classes) or len(set(held_out_classes)) > 8:
            raise ValueError(f"held_out_classes must be distinct digits 0-9 leaving 2 or more, got {held_out_classes}")
        self.held_out_classes = held_out_classes
        self.ood_sets, self.corruptions, self.severities = tuple(ood_sets), tuple(corruptions), tuple(severities)
        self.num_classes = 10 - len(set(held_out_classes))
        self.held_out_images: dict[str, Tensor] = {}

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        super().setup(stage)
        if self.held_out_classes:
            for name in ("train", "val", "test"):
                x, y = self.splits[name]
                x_in, y_in, x_out, _ = split_held_out_classes(x, y, self.held_out_classes)
                self.splits[name] = (x_in, y_in)
                self.held_out_images[name] = x_out

    def _fixed_loader(self, x: Tensor, y: Tensor) -> DataLoader[Any]:
        return DataLoader(TensorDataset(x, y), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)

    def ood_dataloaders(self) -> dict[str, DataLoader[Any]]:
        """``{name: loader}`` of the OOD sets; batches are ``(images, labels=-1)``."""
        self.setup()
        n = len(self.splits["test"][1])
        sets: dict[str, Tensor] = {}
        for name in self.ood_sets:
            if name == "noise":
                sets[name] = uniform_noise_images(n, self.image_size, seed=self.seed + 101)
            elif name == "shapes":
                sets[name] = shape_images(n, self.image_size, seed=self.seed + 202)
            else:
                sets[name] = self.held_out_images["test"]
        return {k: self._fixed_loader(v, torch.full((len(v),), OOD_LABEL)) for k, v in sets.items()}

    def shifted_dataloaders(self) -> dict[str, DataLoader[Any]]:
        """``{"<corruption>_<severity>": loader}`` of the corrupted test split, with its labels."""
        self.setup()
        x, y = self.splits["test"]
        return {
            f"{c}_{s}": self._fixed_loader(corrupt_images(x, c, s, seed=self.seed), y)  # type: ignore[arg-type]
            for c in self.corruptions
            for s in self.severities
        }


class CIFAR10ShiftDataModule(CIFAR10DataModule):
    """CIFAR-10 with OOD sets and CIFAR-10-C shifted sets, for :class:`LogitDiagnostics` (needs the data).

    ``shifted_dataloaders()`` reads CIFAR-10-C (Hendrycks & Dietterich, 2019) in its released
    layout: ``<corruptions_dir>/<corruption>.npy`` (``[50000, 32, 32, 3]`` uint8, severities 1-5
    in blocks of 10000) and ``labels.npy``; download it from https://zenodo.org/records/2535967.
    ``ood_dataloaders()`` gives ``"noise"`` (uniform pixel noise, normalized like CIFAR-10) and
    ``"svhn"`` (torchvision's SVHN test split under ``data_dir``; ``download_ood`` fetches it).

    Args:
        corruptions_dir: the CIFAR-10-C folder.
        corruptions: corruption names (file stems); ``None``: every ``.npy`` in the folder but labels.
        severities: which severities (1..5).
        ood_sets: ``"noise"`` and/or ``"svhn"``.
        ood_size: samples per OOD set (default 10000).
        download_ood: download SVHN when missing.
        **kwargs: passed to :class:`CIFAR10DataModule`.

    Example:
        >>> dm = CIFAR10ShiftDataModule(corruptions_dir="no/such/CIFAR-10-C", severities=(3,), ood_sets=("noise",))
        >>> dm.num_classes, dm.severities
        (10, (3,))
        >>> dm.shifted_dataloaders()
        Traceback (most recent call last):
        ...
        FileNotFoundError: no CIFAR-10-C at '...CIFAR-10-C' (labels.npy missing); download CIFAR-10-C.tar from ...
    """

    def __init__(
        self,
        corruptions_dir: str = "data/CIFAR-10-C",
        corruptions: tuple[str, ...] | None = None,
        severities: tuple[int, ...] = (1, 2, 3, 4, 5),
        ood_sets: tuple[str, ...] = ("noise", "svhn"),
        ood_size: int = 10000,
        download_ood: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        for s in severities:
            if s not in (1, 2, 3, 4, 5):
                raise ValueError(f"severities must be integers from 1 to 5, got {s!r}")
        for name in ood_sets:
            if name not in ("noise", "svhn"):
                raise ValueError(f"ood_sets entries must be 'noise' or 'svhn', got {name!r}")
        self.corruptions_dir = corruptions_dir
        self.corruptions = None if corruptions is None else tuple(corruptions)
        self.severities = tuple(severities)
        self.ood_sets = tuple(ood_sets)
        self.ood_size = ood_size
        self.download_ood = download_ood

    def _normalize(self, images_uint8_nhwc: Tensor) -> Tensor:
        x = images_uint8_nhwc.permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def shifted_dataloaders(self) -> dict[str, DataLoader[Any]]:
        """``{"<corruption>_<severity>": loader}`` from the CIFAR-10-C folder."""
        import numpy as np

        folder = Path(self.corruptions_dir)
        labels_path = folder / "labels.npy"
        if not labels_path.is_file():
            raise FileNotFoundError(
                f"no CIFAR-10-C at '{folder.resolve()}' (labels.npy missing); download CIFAR-10-C.tar from "
                "https://zenodo.org/records/2535967 and point corruptions_dir at the extracted folder"
            )
        names = self.corruptions or tuple(sorted(p.stem for p in folder.glob("*.npy") if p.stem != "labels"))
        labels = torch.from_numpy(np.load(labels_path)).long()
        per_severity = len(labels) // 5
        loaders: dict[str, DataLoader[Any]] = {}
        for name in names:
            path = folder / f"{name}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"CIFAR-10-C corruption '{name}' not found at '{path.resolve()}'")
            images = np.load(path, mmap_mode="r")
            for s in self.severities:
                block = slice((s - 1) * per_severity, s * per_severity)
                x = self._normalize(torch.from_numpy(np.ascontiguousarray(images[block])))
                loaders[f"{name}_{s}"] = DataLoader(
                    TensorDataset(x, labels[block]), batch_size=self.batch_size, shuffle=False
                )
        return loaders

    def ood_dataloaders(self) -> dict[str, DataLoader[Any]]:
        """``{name: loader}`` of the OOD sets; batches are ``(images, labels=-1)``."""
        loaders: dict[str, DataLoader[Any]] = {}
        for name in self.ood_sets:
            if name == "noise":
                g = _generator(0)
                pixels = (torch.rand(self.ood_size, 32, 32, 3, generator=g) * 255).to(torch.uint8)
                x = self._normalize(pixels)
            else:
                from torchvision.datasets import SVHN

                svhn = SVHN(self.data_dir, split="test", download=self.download_ood)
                data = torch.from_numpy(svhn.data[: self.ood_size]).permute(0, 2, 3, 1)  # NCHW -> NHWC
                x = self._normalize(data)
            loaders[name] = DataLoader(
                TensorDataset(x, torch.full((len(x),), OOD_LABEL)), batch_size=self.batch_size, shuffle=False
            )
        return loaders

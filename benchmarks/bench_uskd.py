"""USKD suite: step time and peak memory of timm resnet18 and deit_tiny with and without USKD.

Each model trains on the embedded digits data at 32x32 (deit_tiny with 4x4 patches, 64 tokens plus
the class token, so it stays small on the CPU) once as the baseline and once with the
:class:`~lightning_logits.callbacks.uskd.USKD` callback (default layer, ImageNet weights). The
paper claims negligible extra time and memory; the target is a ratio of at most 1.05.

    python -m benchmarks.speed --suite uskd            # the real run
    python -m benchmarks.speed --suite uskd --smoke    # tiny sizes: checks the code runs
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.callbacks import Callback

from benchmarks.harness import SpeedCase
from lightning_logits.callbacks.uskd import USKD
from lightning_logits.data import DigitsDataModule
from lightning_logits.modules import Classifier

TARGET = 1.05


def _module(model: str, kwargs: dict[str, Any]) -> Callable[[], Classifier]:
    def make() -> Classifier:
        return Classifier(model, num_classes=10, in_chans=1, **kwargs)

    return make


def _uskd() -> list[Callback]:
    return [USKD()]


def speed_cases(smoke: bool) -> list[SpeedCase]:
    batch = 8 if smoke else 32
    vit_kwargs: dict[str, Any] = {"img_size": 16 if smoke else 32, "patch_size": 4}
    if smoke:
        vit_kwargs["depth"] = 2
    image_size = 16 if smoke else 32
    models = [
        ("resnet10t" if smoke else "resnet18", "resnet10t" if smoke else "resnet18", {}),
        ("deit_tiny", "deit_tiny_patch16_224", vit_kwargs),
    ]

    def make_data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=batch, image_size=image_size)

    cases = []
    for short, name, kwargs in models:
        make = _module(name, kwargs)
        cases.append(SpeedCase(short, make, make_data))
        cases.append(SpeedCase(f"{short}+uskd", make, make_data, _uskd, baseline=short, target=TARGET))
    return cases

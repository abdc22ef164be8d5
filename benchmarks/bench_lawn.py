"""LAWN suite: the cost of LAWN's per-step work (gradient projection and weight rescale).

Each LAWN case starts its constrained phase at the first step (``free_steps=0``), so every timed
step projects and rescales; ``log_norms`` stays on (its default), as a user would run it.

- ``resnet`` / ``resnet+lawn``: timm resnet on digits at 32x32, Adam; LAWN constrains the classifier
  (the layer after the last BatchNorm) - the common case.
- ``resnet+lawn_all`` (``lawn_all``): the same with ``scope="all"``: every conv and linear weight is
  constrained (the weights that feed BatchNorm included), a fused projection and rescale over all
  weight tensors of the network; target <= 1.05x the plain step.
"""

from __future__ import annotations

import torch

from benchmarks.harness import SpeedCase
from lightning_logits.callbacks.lawn import LAWN
from lightning_logits.data.digits import DigitsDataModule
from lightning_logits.modules.classifier import Classifier


def _adam(params: object) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=1e-3)  # type: ignore[arg-type]


def speed_cases(smoke: bool) -> list[SpeedCase]:
    model = "resnet10t" if smoke else "resnet18"

    def make_module() -> Classifier:
        return Classifier(model, num_classes=10, in_chans=1, optimizer=_adam)

    def make_data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=16 if smoke else 64, image_size=32)

    return [
        SpeedCase("resnet", make_module, make_data),
        SpeedCase("resnet+lawn", make_module, make_data, lambda: [LAWN(free_steps=0)], baseline="resnet", target=1.02),
        SpeedCase(
            "resnet+lawn_all",
            make_module,
            make_data,
            lambda: [LAWN(free_steps=0, scope="all")],
            baseline="resnet",
            target=1.05,
        ),
    ]

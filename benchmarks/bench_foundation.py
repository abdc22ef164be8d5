"""Foundation suite: the cost of the loss-term mechanism itself.

``classifier`` is plain :class:`Classifier` training; ``classifier+zero_term`` adds a
:class:`LossTermCallback` whose term is zero, so the ratio is the price of the hub (wrapping
``training_step``, the logit tap, logging) that every method pays.
"""

from __future__ import annotations

from benchmarks.harness import SpeedCase
from lightning_logits.data import DigitsDataModule
from lightning_logits.loss_terms import LossTermCallback, StepContext
from lightning_logits.modules import Classifier


class ZeroTerm(LossTermCallback):
    def __init__(self) -> None:
        super().__init__(name="zero", weight=1.0)

    def loss_term(self, context: StepContext) -> object:
        return context.logits.sum() * 0.0


def speed_cases(smoke: bool) -> list[SpeedCase]:
    model = "resnet10t" if smoke else "resnet18"

    def make_module() -> Classifier:
        return Classifier(model, num_classes=10, in_chans=1)

    def make_data() -> DigitsDataModule:
        return DigitsDataModule(batch_size=16 if smoke else 64, image_size=32)

    return [
        SpeedCase("classifier", make_module, make_data),
        SpeedCase(
            "classifier+zero_term",
            make_module,
            make_data,
            lambda: [ZeroTerm()],
            baseline="classifier",
            target=1.02,
        ),
    ]

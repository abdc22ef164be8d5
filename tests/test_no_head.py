"""A user's module whose head the tap cannot find: the opt-in of returning logits works for every
method that needs only logits, and methods that need the head say which attribute to set."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_logits.callbacks import UER, USKD, TeacherDistillation
from tests.helpers import TensorDataModule, fast_trainer


class ConvHeadModule(pl.LightningModule):
    """Ends in Conv2d(16, 10, 1) + global pooling + Flatten: no Linear, no fc/head attribute."""

    def __init__(self, classifier_head: str | None = None) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU())
        self.out = nn.Sequential(nn.Conv2d(16, 10, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        if classifier_head is not None:
            self.classifier_head = classifier_head

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.body(x))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        logits = self(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data() -> TensorDataModule:
    g = torch.Generator().manual_seed(0)
    return TensorDataModule(torch.randn(32, 1, 8, 8, generator=g), torch.arange(32) % 10, batch_size=8)


def _teacher() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("loss", ["kd", "nkd"])
def test_distillation_trains_on_logits_returned_by_the_step(loss: str) -> None:
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[TeacherDistillation(_teacher(), loss=loss)])
    trainer.fit(ConvHeadModule(), datamodule=_data())
    assert torch.isfinite(trainer.callback_metrics[f"train/loss_{loss}_step"])


def test_uskd_with_a_named_feature_layer_trains_without_a_head() -> None:
    module = ConvHeadModule()
    module.num_classes = 10  # the class count a module without a findable head may declare
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[USKD(feature_layer="body")])
    trainer.fit(module, datamodule=_data())
    assert torch.isfinite(trainer.callback_metrics["train/loss_uskd_step"])


def test_replay_needs_the_head_and_names_the_attribute_to_set() -> None:
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[UER(buffer_size=8)])
    with pytest.raises(LookupError, match=r"self\.classifier_head = '<dotted path of the head>'"):
        trainer.fit(ConvHeadModule(), datamodule=_data())


def test_classifier_head_attribute_is_used_by_the_tap() -> None:
    # With the attribute set the head is found (a Conv2d: replay still refuses it, naming the type).
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[UER(buffer_size=8)])
    with pytest.raises(TypeError, match=r"'out.0' is a Conv2d, not an nn.Linear"):
        trainer.fit(ConvHeadModule(classifier_head="out.0"), datamodule=_data())

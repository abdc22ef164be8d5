"""Every timm family trains with TeacherDistillation + USKD + LAWN and no configuration (issue 12, item 9).

Each model is built at the smallest size timm allows (1 input channel, 10 classes, 16x16 or 32x32
images) and trained for two steps of batch 2 under a resnet10t teacher: USKD finds and pools its
default intermediate layer (feature maps, NHWC maps or tokens), LAWN finds the final layers, and
every term is finite.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import timm
import torch
from torch import Tensor, nn

from lightning_logits.callbacks.distillation import ResizeInput, TeacherDistillation
from lightning_logits.callbacks.lawn import LAWN
from lightning_logits.callbacks.uskd import USKD
from lightning_logits.loss_terms import StepContext
from lightning_logits.modules.classifier import Classifier
from lightning_logits.networks.heads import aux_modules
from tests.helpers import TensorDataModule, fast_trainer


def _mixer() -> nn.Module:
    # the registered mixer_s16_224 fixes patch_size/num_blocks/embed_dim; the class takes a small config
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(num_classes=10, img_size=16, in_chans=1, patch_size=4, num_blocks=2, embed_dim=32)


VIT = {"img_size": 16, "patch_size": 4, "depth": 2}
SWIN = {"img_size": 32, "window_size": 2, "depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": (1, 1, 1, 1)}
FAMILIES: list[tuple[str, str | Any, dict[str, Any], int]] = [
    ("resnet", "resnet10t", {}, 16),
    ("vit", "vit_tiny_patch16_224", VIT, 16),
    ("deit", "deit_tiny_patch16_224", VIT, 16),
    ("mixer", _mixer, {}, 16),
    ("levit", "levit_128s", {"img_size": 32}, 32),
    ("swin", "swin_tiny_patch4_window7_224", SWIN, 32),
    ("convnext", "convnext_atto", {}, 32),
    ("efficientnet", "efficientnet_b0", {}, 32),
    ("mobilenetv3", "mobilenetv3_small_050", {}, 32),
    ("regnet", "regnetx_002", {}, 32),
]


class RecordingUSKD(USKD):
    def __init__(self) -> None:
        super().__init__()
        self.values: list[Tensor] = []

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        self.values.append(value.detach())
        return value


@pytest.fixture(scope="module")
def teacher() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10, in_chans=1)


@pytest.mark.slow  # ~70 s of CPU for the ten families (mostly Trainer setup)
@pytest.mark.parametrize(("family", "model", "kwargs", "size"), FAMILIES, ids=[f[0] for f in FAMILIES])
def test_family_trains_with_distillation_uskd_and_lawn(
    teacher: nn.Module, family: str, model: Any, kwargs: dict[str, Any], size: int
) -> None:
    torch.manual_seed(0)
    student = Classifier(model(), num_classes=10) if callable(model) else Classifier(model, 10, in_chans=1, **kwargs)
    distill = TeacherDistillation(teacher, input_transform=ResizeInput(32))
    uskd = RecordingUSKD()
    lawn = LAWN(free_steps=1)  # constrained from the second step on
    x = torch.randn(4, 1, size, size)
    data = TensorDataModule(x, torch.tensor([0, 1, 2, 3]), batch_size=2)
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[distill, uskd, lawn])
    trainer.fit(student, datamodule=data)

    assert len(uskd.values) == 2 and all(torch.isfinite(v) for v in uskd.values), family
    head = aux_modules(student)["uskd"]
    assert head.out_features == 10 and head.in_features > 0
    for key in ("train/loss_nkd_epoch", "train/loss_uskd_epoch", "nkd/teacher_acc"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    state = lawn.state_dict()
    assert state["phase"] == "constrained" and state["param_names"], family
    params = dict(student.named_parameters())
    for name in state["param_names"]:  # held at the norms recorded when the free phase ended
        assert float(params[name].detach().norm()) == pytest.approx(state["norms"][name], rel=1e-4), name
    assert student(x[:2]).shape == (2, 10)  # the user's model is untouched

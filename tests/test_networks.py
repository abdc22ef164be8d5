"""Finding heads and layers in models from anywhere, and capturing what flows through them."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from lightning_logits.modules import Classifier
from lightning_logits.networks.heads import AUX_ATTRIBUTE, LogitTap, aux_modules, find_classifier, find_module
from tests.helpers import TinyMLP, TinyNet


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda: timm.create_model("resnet10t", num_classes=7), "fc"),
        (lambda: timm.create_model("convnext_atto", num_classes=7), "head.fc"),
        (lambda: timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=32, patch_size=8), "head"),
        (lambda: torchvision.models.resnet18(num_classes=7), "fc"),
        (lambda: torchvision.models.mobilenet_v3_small(num_classes=7), "classifier.3"),
        (lambda: torchvision.models.efficientnet_b0(num_classes=7), "classifier.1"),
        (lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 7)), "2"),
        (lambda: TinyMLP(num_classes=7), "head"),
    ],
    ids=["timm-resnet", "timm-convnext", "timm-vit", "tv-resnet", "tv-mobilenet", "tv-efficientnet", "seq", "mlp"],
)
def test_find_classifier_on_models_from_anywhere(factory, expected: str) -> None:
    model = factory()
    name, head = find_classifier(model)
    assert name == expected
    assert head.out_features == 7
    assert model.get_submodule(name) is head


def test_find_classifier_through_a_lightning_module_and_skips_aux_heads() -> None:
    module = Classifier(TinyNet(num_classes=10))
    aux_modules(module)["extra"] = nn.Linear(32, 10)  # registered later, so "last Linear" would pick it
    assert find_classifier(module)[0] == "model.fc"
    assert find_classifier(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))[0] == "1"
    seq = nn.Sequential()
    seq.add_module("body", nn.Linear(3, 4))
    aux_modules(seq)["aux"] = nn.Linear(4, 2)
    assert find_classifier(seq)[0] == "body"
    assert hasattr(seq, AUX_ATTRIBUTE)


def test_explicit_head_and_missing_head_errors() -> None:
    net = TinyNet()
    assert find_classifier(net, head="fc")[1] is net.fc
    with pytest.raises(LookupError, match=r"no module named 'fx'.*features"):
        find_classifier(net, head="fx")
    with pytest.raises(LookupError, match=r"no classifier head found in Sequential.*Conv2d.*head="):
        find_classifier(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))


def test_find_module_lists_what_exists() -> None:
    with pytest.raises(LookupError, match="its modules are: features"):
        find_module(TinyNet(), "blocks.3")


def test_logit_tap_records_only_inside_capture_and_removes_cleanly() -> None:
    net = TinyNet(num_classes=5)
    tap = LogitTap(net, layers=["features.1"])
    x = torch.randn(3, 1, 8, 8)
    net(x)
    assert tap.logits == []  # outside capture: nothing held
    with tap.capture():
        out = net(x)
        net(x[:2])
    assert len(tap.logits) == 2 and tap.logits[1].shape == (2, 5)
    torch.testing.assert_close(tap.logits[0], out)
    torch.testing.assert_close(net.fc(tap.features[0]), out)
    assert tap.outputs["features.1"][0].shape == (3, 8, 8, 8)
    tap.remove()
    assert not net.fc._forward_hooks and not net.features[1]._forward_hooks
    assert tap.logits == []


def test_logit_tap_keeps_gradients_of_captured_tensors() -> None:
    net = TinyMLP()
    tap = LogitTap(net)
    with tap.capture():
        net(torch.randn(4, 16))
    tap.logits[0].sum().backward()
    assert net.head.weight.grad is not None

"""The reduced ResNet18 of the online continual learning literature, registered with timm.

Lopez-Paz & Ranzato's GEM code introduced it, and the later online continual learning code
(``RaptorMai/online-continual-learning`` ``models/resnet.py``, mammoth's ``backbone/ResNet18.py``
with ``nf=20``, the UER author's PCR framework) kept it: a ResNet18 with BasicBlocks ``[2, 2, 2, 2]``
whose widths are ``nf, 2nf, 4nf, 8nf`` (``nf = 20``), a 3x3 stride-1 stem convolution with no
max-pool, average pooling of the last map and a linear head on the ``8 nf = 160``-d features. At
32x32 its last map is 4x4. Restated here from that description; the pooling is adaptive, so
other input sizes work too (at 32x32 it equals the original's ``avg_pool2d(out, 4)``).

Importing :mod:`lightning_logits.networks` registers ``reduced_resnet18`` with timm, so
``timm.create_model("reduced_resnet18", num_classes=10, in_chans=1)`` and
``Classifier("reduced_resnet18", num_classes=10)`` build it.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from timm.models import register_model
from torch import Tensor, nn

__all__ = ["ReducedResNet18", "reduced_resnet18"]


class _BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between and after the residual sum (1x1 conv shortcut when reshaping)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """ResNet18 reduced to width ``nf`` (20): 3x3 stem, no max-pool, ``8 nf``-d features, a linear ``fc`` head.

    Follows timm's model interface (``get_classifier``, ``reset_classifier``,
    ``forward_features``, ``forward_head``, ``num_classes``, ``num_features``), so the library's
    head search and feature tools find its parts.

    Args:
        num_classes: outputs of the head.
        in_chans: input channels.
        nf: base width (20 in the literature; 64 gives the usual widths).

    Example:
        >>> import torch
        >>> net = ReducedResNet18(num_classes=10)
        >>> net(torch.randn(2, 3, 32, 32)).shape, net.num_features
        (torch.Size([2, 10]), 160)
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, nf: int = 20) -> None:
        super().__init__()
        if num_classes < 1 or in_chans < 1 or nf < 1:
            raise ValueError(f"num_classes, in_chans and nf must be positive, got {num_classes}, {in_chans}, {nf}")
        self.num_classes = num_classes
        self.conv1 = nn.Conv2d(in_chans, nf, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        layers = []
        in_planes = nf
        for i, stride in enumerate((1, 2, 2, 2)):
            planes = nf * 2**i
            layers.append(nn.Sequential(_BasicBlock(in_planes, planes, stride), _BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.num_features = in_planes
        self.global_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Linear(in_planes, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Any = None) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()  # type: ignore[assignment]

    def forward_features(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(out))))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        features = self.global_pool(x)
        return features if pre_logits else self.fc(features)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def reduced_resnet18(pretrained: bool = False, **kwargs: Any) -> ReducedResNet18:
    """timm entry point: ``timm.create_model("reduced_resnet18", num_classes=10, in_chans=3)`` (no weights).

    Args:
        pretrained: must be ``False``: no pretrained weights exist.
        **kwargs: passed to :class:`ReducedResNet18` (``num_classes``, ``in_chans``, ``nf``).

    Example:
        >>> import timm, torch
        >>> net = timm.create_model("reduced_resnet18", num_classes=4, in_chans=1)
        >>> type(net).__name__, net(torch.randn(2, 1, 16, 16)).shape
        ('ReducedResNet18', torch.Size([2, 4]))
    """
    if pretrained:
        raise ValueError("reduced_resnet18 has no pretrained weights; create it with pretrained=False")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)
    return ReducedResNet18(**kwargs)

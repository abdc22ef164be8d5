"""DataModules: digits (embedded, no download) and CIFAR-10/100 (torchvision)."""

from lightning_logits.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_logits.data.digits import DigitsDataModule, load_digits_tensors

__all__ = ["CIFAR10DataModule", "CIFAR100DataModule", "DigitsDataModule", "load_digits_tensors"]

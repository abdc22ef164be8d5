"""Input checks shared by the functional losses.

Every loss in :mod:`lightning_logits.functional` validates its inputs with these helpers so that a
wrong shape, a wrong class count or a non-finite logit fails with the same kind of message: what
was seen, and what to pass instead. Checks that read tensor values on the host (finiteness, label
range) run only with ``validate_args=True``, as in torchmetrics: a training step passes it on its
first step and then ``False``, so the steady-state step never waits for the device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_logits(logits: Tensor, name: str = "logits", validate_args: bool = True) -> None:
    """Require a floating ``[N, C]`` tensor with ``C >= 2``, and finite values when ``validate_args``.

    The finiteness check reads a value on the host (a device sync); shape and dtype checks do not.
    """
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(
            f"{name} must have shape [N, C] (batch, classes), got shape {tuple(logits.shape)}; "
            "flatten extra dimensions before calling the loss"
        )
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got C={logits.shape[1]}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {logits.dtype}")
    if validate_args and not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(
            f"{name} contain {bad} non-finite value(s) (NaN or inf); check the model's forward pass "
            "and the learning rate"
        )


def check_same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    """Require two tensors of identical shape (e.g. student and teacher logits)."""
    if a.shape != b.shape:
        hint = ""
        if a.ndim == 2 and b.ndim == 2 and a.shape[0] == b.shape[0]:
            hint = (
                f": {name_a} has {a.shape[1]} classes and {name_b} has {b.shape[1]}; both must "
                "be trained on the same label set"
            )
        raise ValueError(f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}{hint}")


def check_target(target: Tensor, num_samples: int, num_classes: int, validate_args: bool = True) -> None:
    """Require int64 class indices ``[N]`` in ``[0, C)`` or float scores ``[N, C]``.

    The label range is read on the host only when ``validate_args``; shapes and dtypes always.
    """
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if target.shape != (num_samples, num_classes):
            raise ValueError(
                f"soft target must have shape [N, C] = {(num_samples, num_classes)}, got {tuple(target.shape)}"
            )
        return
    if target.ndim != 1 or target.shape[0] != num_samples:
        raise ValueError(
            f"target must be class indices of shape [N] = [{num_samples}] or soft scores of shape "
            f"[N, C], got shape {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"class-index target must be an integer tensor, got dtype {target.dtype}")
    if validate_args and target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target holds labels in [{int(target.min())}, {int(target.max())}] but the logits "
            f"have {num_classes} classes; labels must lie in [0, {num_classes - 1}]"
        )


def hard_target(target: Tensor) -> Tensor:
    """Class indices ``[N]`` from indices or soft scores (the argmax of soft scores)."""
    if target.is_floating_point():
        return target.argmax(dim=1)
    return target if target.dtype == torch.int64 else target.long()


def result_in_dtype(value: Tensor, dtype: torch.dtype, validate_args: bool = True, name: str = "logits") -> Tensor:
    """``value`` (computed in float32 or wider) cast to ``dtype``, the dtype of the input ``name``.

    A finite result too large for a half-precision ``dtype`` would become ``inf`` silently; with
    ``validate_args`` (it reads the value on the host) that is an error saying what to pass instead.
    """
    if value.dtype == dtype:
        return value
    out = value.to(dtype)
    half = dtype in (torch.float16, torch.bfloat16)
    if validate_args and half and bool(torch.isfinite(value).all()) and not bool(torch.isfinite(out).all()):
        largest = float(value.detach().abs().max())
        raise ValueError(
            f"the result ({largest:.4g}) overflows {dtype}, the dtype of {name} (largest finite value "
            f"{torch.finfo(dtype).max:.4g}); pass {name} in float32 (the computation is in float32 anyway) "
            "or bring the logits to a smaller scale"
        )
    return out

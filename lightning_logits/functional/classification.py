"""Cross-entropy for hard or soft targets, the task loss of :class:`~lightning_logits.modules.Classifier`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_logits.functional._checks import check_logits, check_target, result_in_dtype

__all__ = ["classification_loss"]


def classification_loss(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0, validate_args: bool = True
) -> Tensor:
    """Mean cross-entropy of ``logits`` against class indices or soft scores.

    Args:
        logits: ``[N, C]`` unnormalized scores.
        target: int64 ``[N]`` class indices, or float ``[N, C]`` scores that sum to one per row
            (what timm's ``Mixup``/``CutMix`` produce).
        label_smoothing: the smoothing of :func:`torch.nn.functional.cross_entropy`, in ``[0, 1)``.
        validate_args: check that the logits are finite and the labels in range (reads values
            on the host, a device sync); shapes and dtypes are checked either way. Default ``True``.

    Returns:
        A scalar tensor, computed in float32 and returned in the dtype of ``logits``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
        >>> round(classification_loss(logits, torch.tensor([0, 1])).item(), 4)
        0.1269
        >>> round(classification_loss(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item(), 4)
        0.1269
    """
    check_logits(logits, validate_args=validate_args)
    check_target(target, logits.shape[0], logits.shape[1], validate_args=validate_args)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    # Casts only where needed: a no-op cast still costs a dispatch, and this runs every step.
    if target.is_floating_point():
        target = target.float()
    elif target.dtype != torch.int64:
        target = target.long()
    loss = F.cross_entropy(
        logits if logits.dtype == torch.float32 else logits.float(), target, label_smoothing=label_smoothing
    )
    return result_in_dtype(loss, logits.dtype, validate_args)

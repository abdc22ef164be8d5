"""USKD: universal self-knowledge distillation, the loss without the teacher (Yang et al., ICCV 2023).

USKD builds the student's soft labels from the student itself. The target class keeps a label
derived from the student's own confidence, the non-target classes get Zipf-distributed labels
whose order comes from the student's logits and from a *weak* auxiliary head on an intermediate
feature, and the weak head is trained with label-smoothed cross-entropy. With student logits
``s``, ``p = softmax(s)``, weak logits ``u``, ``w = softmax(u)`` and the target classes ``y_k``
with values ``v_k`` (one class of value 1 for hard labels, the top-2 classes for mixup scores):

- target term: ``L_t = -(1/N) sum_n sum_k pt_nk log p[n, y_nk]`` with the detached weight
  ``pt_nk = p[n, y_nk]^2 + v_nk - mean_m p[m, y_mk]^2`` (zero where ``v_nk = 0``);
- non-target term: ``L_non = -(1/N) sum_n sum_{j not target} z_nj log softmax(s_n[not target])_j``
  where ``z`` are Zipf labels (:func:`uskd_zipf_labels`);
- weak term: ``L_weak = -(mu/N) sum_n sum_j (0.9 Y_nj + 0.1 / C) log softmax(u_n)_j``;
- ``L_uskd = alpha * L_t + beta * L_non + L_weak``, added to the ordinary cross-entropy.

The helpers :func:`uskd_target_classes`, :func:`uskd_soft_target_weight` and
:func:`uskd_zipf_labels` are the three steps, each usable and tested on its own.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_logits.functional._checks import check_logits, check_same_shape, check_target, result_in_dtype

__all__ = ["uskd_loss", "uskd_soft_target_weight", "uskd_target_classes", "uskd_zipf_labels"]

RANK_BY = ("log_prob", "prob")
_EPS = 1e-6  # the official code's guard in the ranking denominators
_WEAK_SMOOTHING = 0.1  # label smoothing of the weak head's cross-entropy (fixed by the method)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # float16/bfloat16 ties in the ranking are common; everything is computed in at least float32.
    return torch.promote_types(dtype, torch.float32)


def uskd_target_classes(target: Tensor, num_classes: int, validate_args: bool = True) -> tuple[Tensor, Tensor]:
    """The target classes of each sample and their values.

    Hard labels give one class per sample with value 1. Soft scores (mixup/cutmix) give the two
    highest-scoring classes and their scores, as the official implementation does; among tied
    scores the lower class index comes first.

    Args:
        target: int ``[N]`` class indices, or float ``[N, C]`` scores.
        num_classes: ``C``.
        validate_args: check the label range (a host read); shapes are checked either way.

    Returns:
        ``(labels, values)``: int64 ``[N, K]`` and ``[N, K]`` values (float32, or the dtype of
        ``target`` when wider), with ``K = 1`` for hard and ``K = 2`` for soft targets.

    Example:
        >>> import torch
        >>> labels, values = uskd_target_classes(torch.tensor([[0.1, 0.6, 0.3]]), 3)
        >>> labels.tolist(), [round(v, 2) for v in values[0].tolist()]
        ([[1, 2]], [0.6, 0.3])
    """
    check_target(target, target.shape[0] if target.ndim else 0, num_classes, validate_args=validate_args)
    if target.is_floating_point():
        # A stable sort, so that tied scores (label smoothing) pick the lowest class index, always.
        values, labels = target.to(_compute_dtype(target.dtype)).sort(dim=1, descending=True, stable=True)
        return labels[:, :2], values[:, :2]
    labels = target.long().unsqueeze(1)
    return labels, torch.ones(labels.shape, dtype=torch.float32, device=target.device)


def _check_labels(labels: Tensor, num_samples: int, num_classes: int, validate_args: bool) -> None:
    """int64 ``[N, K]`` target classes, ``1 <= K <= C``; the range in ``[0, C)`` only with ``validate_args``."""
    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        raise TypeError(f"labels must be an int64 tensor [N, K] (uskd_target_classes), got {labels!r:.80}")
    if labels.ndim != 2 or labels.shape[0] != num_samples or not 1 <= labels.shape[1] <= num_classes:
        raise ValueError(
            f"labels must have shape [N, K] = [{num_samples}, K] with 1 <= K <= C = {num_classes}, got "
            f"{tuple(labels.shape)}"
        )
    if validate_args and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels hold classes in [{int(labels.min())}, {int(labels.max())}] but there are {num_classes} classes"
        )


def uskd_soft_target_weight(probs: Tensor, labels: Tensor, values: Tensor, validate_args: bool = True) -> Tensor:
    """The detached soft label of each target class: ``p^2 + v - mean_batch(p^2)``, zero where ``v = 0``.

    The batch mean makes the weight depend on the batch (under DDP, the per-device batch); with
    ``N = 1`` it equals ``v``.

    Args:
        probs: ``[N, C]`` student probabilities ``softmax(s)``.
        labels: int64 ``[N, K]`` target classes (:func:`uskd_target_classes`).
        values: ``[N, K]`` their values.
        validate_args: check the label range (a host read); shapes are checked either way.

    Returns:
        ``[N, K]`` weights ``pt``, without gradient.

    Example:
        >>> import torch
        >>> probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
        >>> w = uskd_soft_target_weight(probs, torch.tensor([[0], [0]]), torch.ones(2, 1))
        >>> [round(x, 4) for x in w.flatten().tolist()]  # mean of p^2 is (0.25 + 0.81) / 2 = 0.53
        [0.72, 1.28]
    """
    if not isinstance(probs, Tensor) or probs.ndim != 2 or not probs.is_floating_point():
        raise ValueError(f"probs must be a floating point [N, C] tensor of probabilities, got {probs!r:.80}")
    _check_labels(labels, probs.shape[0], probs.shape[1], validate_args)
    if not isinstance(values, Tensor) or values.shape != labels.shape:
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        raise ValueError(f"values must have the shape of labels {tuple(labels.shape)}, got {shape}")
    with torch.no_grad():
        squared = probs.gather(1, labels).pow(2)
        weight = squared + values.to(squared.dtype) - squared.mean(dim=0, keepdim=True)
        return weight.masked_fill(values == 0, 0.0)


def uskd_zipf_labels(
    logits: Tensor, weak_logits: Tensor, labels: Tensor, rank_by: str = "log_prob", validate_args: bool = True
) -> Tensor:
    """Zipf soft labels of the non-target classes, ranked by the student and its weak head.

    Every class ``j`` gets the score ``w_nj / (1 - sum_k w[n, y_k] + 1e-6) + q_nj / (1 - sum_k
    q[n, y_k] + 1e-6)`` with ``w = softmax(weak_logits)`` and ``q = log_softmax(logits)``
    (``rank_by="log_prob"``, the official code now) or ``q = softmax(logits)`` (``"prob"``, its
    first release). Classes sorted by descending score get ``1 / (r + 1)`` at 0-based position
    ``r`` (targets included in the ranking), the target classes are dropped and the rest is
    renormalized to sum to one. Ties keep class order (a stable sort), so the labels are
    deterministic.

    Args:
        logits: ``[N, C]`` student logits.
        weak_logits: ``[N, C]`` weak-head logits.
        labels: int64 ``[N, K]`` distinct target classes per row.
        rank_by: ``"log_prob"`` or ``"prob"``.
        validate_args: check that the logits are finite and the labels in range (host reads);
            shapes are checked either way.

    Returns:
        ``[N, C - K]`` labels of the non-target classes, in class order, rows summing to one,
        without gradient.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]])
        >>> z = uskd_zipf_labels(logits, logits, torch.tensor([[0]]))
        >>> [round(x, 4) for x in z[0].tolist()]  # positions 1, 2, 3: (1/2, 1/3, 1/4) / (13/12)
        [0.4615, 0.3077, 0.2308]
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    check_logits(logits, validate_args=validate_args)
    check_logits(weak_logits, "weak_logits", validate_args=validate_args)
    check_same_shape(logits, weak_logits, "logits", "weak_logits")
    _check_labels(labels, logits.shape[0], logits.shape[1], validate_args)
    with torch.no_grad():
        n, c = logits.shape
        weak = weak_logits.softmax(dim=1)
        student = logits.log_softmax(dim=1) if rank_by == "log_prob" else logits.softmax(dim=1)
        score = weak / (1 - weak.gather(1, labels).sum(1, keepdim=True) + _EPS) + student / (
            1 - student.gather(1, labels).sum(1, keepdim=True) + _EPS
        )
        order = score.sort(dim=1, descending=True, stable=True).indices
        # position[n, order[n, r]] = r: the rank of each class, in class order.
        ranks = torch.arange(c, device=logits.device).expand(n, c)
        position = torch.empty_like(order).scatter_(1, order, ranks)
        zipf = 1.0 / (position + 1).to(logits.dtype)
        non_target = zipf.gather(1, _non_target_classes(labels, n, c))
        return non_target / non_target.sum(dim=1, keepdim=True)


def _non_target_classes(labels: Tensor, n: int, c: int) -> Tensor:
    """int64 ``[N, C - K]``: the classes of each row that are not among its ``K`` distinct targets, in order.

    A stable sort of the keep-mask instead of boolean indexing: boolean indexing must learn the
    output size on the host (a device sync); this is all on the device.
    """
    keep = torch.ones(n, c, dtype=torch.uint8, device=labels.device).scatter_(1, labels, 0)
    return keep.sort(dim=1, descending=True, stable=True).indices[:, : c - labels.shape[1]]


def uskd_loss(
    logits: Tensor,
    weak_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 0.1,
    mu: float = 0.005,
    rank_by: str = "log_prob",
    validate_args: bool = True,
) -> Tensor:
    """The USKD loss ``alpha * L_t + beta * L_non + L_weak`` (the ordinary cross-entropy excluded).

    See the module docstring for the three terms. The soft target weights, the Zipf labels and
    the ranking carry no gradient; ``L_t`` and ``L_non`` train the student, ``L_weak`` the weak
    head (and, through it, the layers below the intermediate feature).

    Args:
        logits: ``[N, C]`` student logits.
        weak_logits: ``[N, C]`` logits of the auxiliary head on the intermediate feature.
        target: int ``[N]`` class indices, or float ``[N, C]`` soft scores (mixup/cutmix: the top-2
            classes and their scores give the target term; the full scores give ``L_weak``).
        alpha: weight of the target term (default 1.0; 0.1 for the official CIFAR ResNet18).
        beta: weight of the non-target (Zipf) term (default 0.1).
        mu: weight of the weak head's cross-entropy, applied inside ``L_weak`` (default 0.005,
            ImageNet; 0.1 for CIFAR).
        rank_by: ``"log_prob"`` ranks non-target classes by the student's log-probabilities
            (the current official code), ``"prob"`` by its probabilities (the first release).
        validate_args: check that logits and soft targets are finite and labels in range (host
            reads, a device sync); the :class:`~lightning_logits.callbacks.USKD` callback passes it
            on its first step only. Shapes, dtypes and weights are checked either way.

    Returns:
        A scalar tensor in the dtype of ``logits``. Half-precision inputs are computed in float32;
        finite for logits up to ``1e4`` in magnitude.

    Raises:
        ValueError / TypeError: for logits that are not ``[N, C]``, differ in shape, or are not
            finite, targets that do not match them, non-finite weights or an unknown ``rank_by``.

    Example:
        >>> import torch
        >>> logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
        >>> weak = torch.zeros(2, 3)
        >>> loss = uskd_loss(logits, weak, torch.tensor([0, 1]))
        >>> round(loss.item(), 4)
        0.4002
    """
    check_logits(logits, validate_args=validate_args)
    check_logits(weak_logits, "weak_logits", validate_args=validate_args)
    check_same_shape(logits, weak_logits, "logits", "weak_logits")
    n, c = logits.shape
    check_target(target, n, c, validate_args=validate_args)
    if validate_args and target.is_floating_point() and not bool(torch.isfinite(target).all()):
        raise ValueError("soft target contains non-finite values; check the mixup/cutmix output")
    for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")

    dtype = _compute_dtype(logits.dtype)
    student = logits.to(dtype)
    weak = weak_logits.to(dtype)
    labels, values = uskd_target_classes(target, c, validate_args=False)  # checked above
    log_probs = student.log_softmax(dim=1)

    # Target term: the student's own confidence, shifted by the batch mean, is its target label.
    weight = uskd_soft_target_weight(log_probs.exp(), labels, values.to(dtype), validate_args=False)
    loss_target = -(weight * log_probs.gather(1, labels)).sum(dim=1).mean()

    # Weak head: cross-entropy with label smoothing 0.1 against the full target.
    full = target.to(dtype) if target.is_floating_point() else torch.zeros_like(student).scatter_(1, labels, 1.0)
    smoothed = (1 - _WEAK_SMOOTHING) * full + _WEAK_SMOOTHING / c
    loss_weak = -mu * (smoothed * weak.log_softmax(dim=1)).sum(dim=1).mean()

    # Non-target term: Zipf labels over the classes left after removing the targets.
    zipf = uskd_zipf_labels(student, weak, labels, rank_by, validate_args=False)
    non_target_logits = student.gather(1, _non_target_classes(labels, n, c))
    loss_non = -(zipf * non_target_logits.log_softmax(dim=1)).sum(dim=1).mean()

    loss = alpha * loss_target + beta * loss_non + loss_weak
    return result_in_dtype(loss, logits.dtype, validate_args)

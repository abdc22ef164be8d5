"""Logit distillation losses: Hinton's KD and normalized KD (NKD).

Both take the student's logits ``s`` ``[N, C]`` and the teacher's logits ``t`` ``[N, C]`` and
treat the teacher side as a constant (it is detached). They compute in float32 whatever the
input dtype, because ``T^2``- and ``gamma``-scaled terms overflow float16, and return the result
in the dtype of the student's logits. Only ``log_softmax`` is used (never ``log(softmax)``), so
they stay finite for logits up to 1e4 in magnitude. Neither includes the ordinary cross-entropy:
the training step adds it on top.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_logits.functional._checks import check_logits, check_same_shape, check_target, hard_target

__all__ = ["kd_loss", "nkd_loss"]


def _check_temperature(temperature: float) -> None:
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_pair(logits: Tensor, teacher_logits: Tensor) -> None:
    check_logits(logits, "logits")
    check_logits(teacher_logits, "teacher_logits")
    check_same_shape(logits, teacher_logits, "logits", "teacher_logits")


def kd_loss(logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    r"""Hinton's knowledge distillation loss.

    .. math::
        L_{kd} = T^2 \frac{1}{N} \sum_n \mathrm{KL}\big(\mathrm{softmax}(t_n / T) \,\|\,
        \mathrm{softmax}(s_n / T)\big)

    Args:
        logits: ``[N, C]`` student logits (with their graph).
        teacher_logits: ``[N, C]`` teacher logits; detached here, so no gradient reaches them.
        temperature: softmax temperature ``T > 0`` (default 4.0). The ``T^2`` factor keeps the
            gradient scale independent of ``T``.

    Returns:
        A scalar: the batch mean of the per-sample KL divergence, times ``T^2``, computed in
        float32 and returned in the dtype of ``logits``.

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, 0.0, -1.0]])
        >>> round(kd_loss(s, s, temperature=4.0).item(), 6)
        0.0
        >>> round(kd_loss(torch.zeros(1, 2), torch.tensor([[4.0, 0.0]]), temperature=4.0).item(), 4)
        1.7751
    """
    _check_pair(logits, teacher_logits)
    _check_temperature(temperature)
    log_p_student = F.log_softmax(logits.float() / temperature, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    # KL(p_t || p_s) = sum_j p_t (log p_t - log p_s); p_t underflowing to 0 gives 0 * finite = 0.
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return (kl.mean() * temperature**2).to(logits.dtype)


def nkd_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    gamma: float = 1.5,
) -> Tensor:
    r"""Normalized knowledge distillation (NKD, Yang et al. 2023).

    The target part, always at temperature 1, weights the student's target log-probability by
    the teacher's target probability; the non-target part drops the target column from both rows
    and matches the renormalized ``C - 1`` non-target distributions at temperature ``T``:

    .. math::
        L_t = -\frac{1}{N} \sum_n \mathrm{softmax}(t_n)_{y_n} \log \mathrm{softmax}(s_n)_{y_n}

        L_{nt} = -\gamma T^2 \frac{1}{N} \sum_n \sum_{j \ne y_n}
        \mathrm{softmax}(t_n^{\setminus y_n} / T)_j \log \mathrm{softmax}(s_n^{\setminus y_n} / T)_j

        L_{nkd} = L_t + L_{nt}

    The target column is removed by masking and reshaping to ``[N, C - 1]`` (never by
    subtracting a large constant, which breaks once ``|logits| / T`` reaches about 1e3, nor with
    ``-inf``, which gives ``0 * -inf = NaN``).

    Args:
        logits: ``[N, C]`` student logits (with their graph), ``C >= 2``.
        teacher_logits: ``[N, C]`` teacher logits; detached here.
        target: int ``[N]`` class indices in ``[0, C)``, or float ``[N, C]`` soft scores (after
            mixup/cutmix), whose argmax is the target class.
        temperature: temperature ``T > 0`` of the non-target part (default 1.0; 3.0 on CIFAR-100).
        gamma: weight of the non-target part (default 1.5; 1.0 for DeiT pairs, 3.5 on CIFAR-100).

    Returns:
        A scalar, computed in float32 and returned in the dtype of ``logits``.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
        >>> t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
        >>> round(nkd_loss(s, t, torch.tensor([0, 1])).item(), 4)
        1.191
    """
    _check_pair(logits, teacher_logits)
    num_samples, num_classes = logits.shape
    check_target(target, num_samples, num_classes)
    _check_temperature(temperature)
    if not (isinstance(gamma, int | float) and math.isfinite(gamma)):
        raise ValueError(f"gamma must be a finite number, got {gamma!r}")
    labels = hard_target(target).to(logits.device)
    student = logits.float()
    teacher = teacher_logits.detach().float()

    log_p_student = F.log_softmax(student, dim=1)
    p_teacher = F.softmax(teacher, dim=1)
    column = labels.unsqueeze(1)
    target_part = -(p_teacher.gather(1, column) * log_p_student.gather(1, column)).mean()

    keep = torch.ones_like(student, dtype=torch.bool).scatter_(1, column, False)
    student_rest = student[keep].view(num_samples, num_classes - 1)
    teacher_rest = teacher[keep].view(num_samples, num_classes - 1)
    log_q_student = F.log_softmax(student_rest / temperature, dim=1)
    q_teacher = F.softmax(teacher_rest / temperature, dim=1)
    non_target_part = -(q_teacher * log_q_student).sum(dim=1).mean() * (gamma * temperature**2)
    return (target_part + non_target_part).to(logits.dtype)

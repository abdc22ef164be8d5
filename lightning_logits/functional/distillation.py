r"""Logit distillation losses: KD, NKD, DKD, DIST, the dual-head (DHKD) logit-level loss, and the
token-level divergences language-model distillation compares (forward KL, reverse KL, generalized
JSD, skew KL, skew reverse KL, total variation).

Every loss takes the student's logits ``s`` and the teacher's logits ``t`` of shape ``[..., C]``
(``[N, C]`` for classification, ``[B, T, V]`` for a language model) and treats the teacher side as
a constant (it is detached). They compute in float32 whatever the input dtype (float64 inputs
stay in float64), because ``T^2``-
and weight-scaled terms overflow float16, and return the result in the dtype of the student's
logits. Only ``log_softmax``/``logsumexp``/``softplus`` are used (never ``log(softmax)``), so they
stay finite for logits up to 1e4 in magnitude. None includes the ordinary cross-entropy: the
training step adds it on top.

**Positions.** The leading dimensions ``[...]`` are flattened into positions. ``mask`` (bool,
shape ``[...]``) and/or integer ``target`` values equal to ``ignore_index`` (default -100, the
cross-entropy convention) exclude positions; every loss is the **mean over the valid positions**
(0 when there are none). Excluded positions may hold any finite or non-finite values: they are
replaced by zeros before any arithmetic, so they never reach the result or the gradient.

**Chunks.** ``chunk_size`` (every loss but DIST) computes the loss over that many positions at a
time and writes each chunk's gradient into one preallocated buffer during the forward pass, so
the float32 temporaries of a large vocabulary never exist for all positions at once: the peak
memory of KD then stays close to plain cross-entropy's. The value and gradient equal the
unchunked ones (up to float32 summation order). DIST's intra-class term correlates every
position with every other, so it has no chunked path.

**Logit standardization** (``standardize=True``, Sun et al., CVPR 2024; official code
``sunshangquan/logit-standardization-KD``, ``mdistiller/distillers/KD.py``/``DKD.py``): each row
of both logit tensors is replaced by its z-score (:func:`standardize_logits`) before the loss,
and ``temperature`` is then their *base temperature* (they use 2 with a KD weight of 9 on
CIFAR-100).

**Masked tokens** (the token-level divergences only). A logit of ``-inf`` marks a token a model
may not produce (a masked or padded vocabulary entry): it has probability 0. A token masked on
both sides contributes nothing, with finite gradients, exactly as if its column were absent. A
token masked on one side only is fine except where a KL divides by its zero probability: the
forward KL is ``+inf`` where the student masks a token the teacher allows, the reverse KL where the
teacher masks one the student allows (DistiLLM's code zeroes such entries instead). NaN and
``+inf`` stay errors, as does a row without any finite logit; ``standardize`` needs finite logits.

**Validation.** Shape and dtype checks always run. Checks that read tensor values on the host
(non-finite logits, label range) only run when ``validate_args=True`` (the default); a training
loop passes ``False`` after its first step to avoid a host-device synchronization per step.

The registry :data:`DISTILLATION_LOSSES` maps names to the losses and
:func:`get_distillation_loss` resolves a name or a user callable. Every loss can be called as
``loss(logits, teacher_logits, target=..., temperature=..., mask=..., validate_args=...,
**hyperparameters)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_logits.functional._checks import result_in_dtype

__all__ = [
    "DEFAULT_TEMPERATURE",
    "DISTILLATION_LOSSES",
    "DistillationLossName",
    "dhkd_loss",
    "dist_loss",
    "dkd_loss",
    "dkd_warmup",
    "forward_kl_loss",
    "get_distillation_loss",
    "jsd_loss",
    "kd_loss",
    "nkd_loss",
    "reverse_kl_loss",
    "skew_kl_loss",
    "skew_reverse_kl_loss",
    "standardize_logits",
    "tv_loss",
]

DistillationLossName = Literal[
    "kd", "nkd", "dkd", "dist", "dhkd", "forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"
]
"""The names of the built-in losses, the keys of :data:`DISTILLATION_LOSSES` (``TeacherDistillation(loss=...)``).

Example:
    >>> from typing import get_args
    >>> get_args(DistillationLossName) == tuple(DISTILLATION_LOSSES)
    True
"""

DEFAULT_TEMPERATURE: dict[str, float] = {
    "kd": 4.0,
    "nkd": 1.0,
    "dkd": 4.0,
    "dist": 1.0,
    "dhkd": 2.0,
    "forward_kl": 1.0,
    "reverse_kl": 1.0,
    "jsd": 1.0,
    "skew_kl": 1.0,
    "skew_reverse_kl": 1.0,
    "tv": 1.0,
}
"""Each loss's default temperature (KD 4, NKD 1, DKD 4 as mdistiller's CIFAR config, DIST 1, DHKD 2;
1 for the token-level divergences, as TRL's GKD and DistiLLM).

``TeacherDistillation`` uses it when ``temperature`` is not given.

Example:
    >>> DEFAULT_TEMPERATURE["kd"], DEFAULT_TEMPERATURE["jsd"]
    (4.0, 1.0)
"""

_STANDARDIZE_EPS = 1e-7  # the official repository's epsilon
_PEARSON_EPS = 1e-8  # DIST's epsilon


# --------------------------------------------------------------------------- checks
def _check_number(value: Any, name: str, positive: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        need = "a finite number > 0" if positive else "a finite number"
        raise ValueError(f"{name} must be {need}, got {value!r}")


def _check_fraction(value: Any, name: str, meaning: str) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0
    if not ok:
        raise ValueError(f"{name} must be a number in [0, 1] ({meaning}), got {value!r}")


def _check_temperature(temperature: float) -> None:
    _check_number(temperature, "temperature", positive=True)


def _check_logit_pair(logits: Tensor, teacher_logits: Tensor) -> None:
    for tensor, name in ((logits, "logits"), (teacher_logits, "teacher_logits")):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.ndim < 2:
            raise ValueError(
                f"{name} must have shape [..., C] with at least 2 dimensions ([N, C] or [B, T, C]), "
                f"got shape {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got dtype {tensor.dtype}")
    if logits.shape[-1] < 2:
        raise ValueError(f"logits must have at least 2 classes, got C={logits.shape[-1]}")
    if logits.shape != teacher_logits.shape:
        hint = ""
        if logits.shape[:-1] == teacher_logits.shape[:-1]:
            hint = (
                f": logits has {logits.shape[-1]} classes and teacher_logits has {teacher_logits.shape[-1]}; "
                "both must be trained on the same label set"
            )
        raise ValueError(
            f"logits has shape {tuple(logits.shape)} but teacher_logits has shape {tuple(teacher_logits.shape)}{hint}"
        )


def _valid_positions(
    logits: Tensor,
    target: Tensor | None,
    mask: Tensor | None,
    ignore_index: int,
    needs_target: bool,
    validate_args: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """``(labels [M] or None, valid [M] bool or None)`` over the flattened positions (``None``: all valid)."""
    lead = logits.shape[:-1]
    num_classes = logits.shape[-1]
    valid: Tensor | None = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor of shape [...] = {list(lead)}, got {mask!r:.80}")
        if mask.shape != lead:
            raise ValueError(
                f"mask must have the logits' leading shape {list(lead)} (one flag per position), got {list(mask.shape)}"
            )
        valid = mask.reshape(-1).to(logits.device)
    labels: Tensor | None = None
    if target is None:
        if needs_target:
            raise ValueError("this loss needs target (class indices [...] or soft scores [..., C])")
        return None, valid
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        if target.shape != logits.shape:
            raise ValueError(
                f"soft target must have shape [..., C] = {list(logits.shape)} like the logits, got {list(target.shape)}"
            )
        labels = target.reshape(-1, num_classes).argmax(dim=1).to(logits.device)
        return labels, valid
    if target.shape != lead:
        raise ValueError(
            f"target must be class indices of shape [...] = {list(lead)} or soft scores of shape "
            f"[..., C] = {list(logits.shape)}, got shape {list(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"class-index target must be an integer tensor, got dtype {target.dtype}")
    labels = target.reshape(-1).to(logits.device, torch.int64)
    kept = labels != ignore_index
    valid = kept if valid is None else valid & kept
    if validate_args:
        selected = labels[valid]
        if selected.numel() and (int(selected.min()) < 0 or int(selected.max()) >= num_classes):
            raise ValueError(
                f"target holds labels in [{int(selected.min())}, {int(selected.max())}] but the logits "
                f"have {num_classes} classes; labels must lie in [0, {num_classes - 1}] (or equal "
                f"ignore_index={ignore_index})"
            )
    labels = torch.where(valid, labels, torch.zeros_like(labels))
    return labels, valid


def _check_finite(tensor: Tensor, valid: Tensor | None, name: str, masked_vocab: bool = False) -> None:
    rows = tensor.reshape(-1, tensor.shape[-1])
    if masked_vocab:  # -inf marks a masked token; NaN, +inf and rows without any finite logit are errors
        finite = ~(torch.isnan(rows) | (rows == math.inf)).any(dim=1) & torch.isfinite(rows).any(dim=1)
    else:
        finite = torch.isfinite(rows).all(dim=1)
    if valid is not None:
        finite = finite | ~valid
    if not bool(finite.all()):
        bad = int((~finite).sum())
        allowed = " (-inf marks a masked token and is allowed, if a row keeps a finite logit)" if masked_vocab else ""
        raise ValueError(
            f"{name} contain non-finite value(s) (NaN or inf) at {bad} valid position(s){allowed}; check the "
            "model's forward pass and the learning rate"
        )


# --------------------------------------------------------------------------- building blocks
def standardize_logits(logits: Tensor, eps: float = _STANDARDIZE_EPS) -> Tensor:
    r"""Z-score each row of logits over the classes (logit standardization, Sun et al. 2024).

    .. math:: \mathcal{Z}(z) = \frac{z - \mathrm{mean}(z)}{\mathrm{std}(z) + \epsilon}

    with the unbiased standard deviation over the last dimension and ``eps = 1e-7``, as the
    official ``normalize`` (``sunshangquan/logit-standardization-KD``,
    ``mdistiller/distillers/KD.py``). Dividing the result by a temperature ``T`` gives their
    ``softmax(Z(z; T))``.

    Args:
        logits: ``[..., C]`` logits, ``C >= 2``.
        eps: added to the standard deviation (a constant row maps to zeros).

    Returns:
        ``[..., C]`` standardized logits in the input's dtype (computed in float32 or float64).

    Example:
        >>> import torch
        >>> z = standardize_logits(torch.tensor([[1.0, 2.0, 3.0]]))
        >>> [round(v, 4) for v in z[0].tolist()]
        [-1.0, 0.0, 1.0]
    """
    work = _work(logits)
    std, mean = torch.std_mean(work, dim=-1, keepdim=True)
    return ((work - mean) / (std + eps)).to(logits.dtype)


def dkd_warmup(epoch: float, warmup: float = 20.0) -> float:
    """DKD's linear warm-up factor ``min(epoch / warmup, 1)`` (epochs counted from 1 as in mdistiller).

    mdistiller (``mdistiller/distillers/DKD.py``) multiplies the whole DKD term by this factor,
    with ``warmup = 20`` epochs on CIFAR-100; its trainer numbers epochs from 1, so the first
    epoch trains with ``1 / warmup`` of the term. ``warmup <= 0`` disables the warm-up.

    Example:
        >>> dkd_warmup(1, 20), dkd_warmup(10, 20), dkd_warmup(40, 20), dkd_warmup(3, 0)
        (0.05, 0.5, 1.0, 1.0)
    """
    _check_number(epoch, "epoch")
    _check_number(warmup, "warmup")
    if warmup <= 0:
        return 1.0
    return float(min(epoch / warmup, 1.0))


def _work(x: Tensor) -> Tensor:
    """float32 (float64 inputs stay float64: never compute below float32, never downcast)."""
    return x if x.dtype == torch.float64 else x.float()


def _rest_index(labels: Tensor, num_classes: int) -> Tensor:
    """``[m, C - 1]`` column indices of each row's non-target classes (a reshape without a host sync)."""
    columns = torch.arange(num_classes - 1, device=labels.device).unsqueeze(0)
    return columns + (columns >= labels.unsqueeze(1)).long()


def _kd_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float) -> Tensor:
    log_ps = F.log_softmax(s / temperature, dim=1)
    log_pt = F.log_softmax(t / temperature, dim=1)
    # KL(p_t || p_s) = sum_j p_t (log p_t - log p_s); p_t underflowing to 0 gives 0 * finite = 0.
    return (log_pt.exp() * (log_pt - log_ps)).sum(dim=1) * temperature**2


def _shift_to_max(x: Tensor) -> Tensor:
    """``x`` minus its row maximum (the losses are shift-invariant per row).

    ``x - logsumexp(x)`` with logits of 1e4 subtracts two float32 numbers of that size, off by up to
    half an ulp of 1e4 (0.002): the probabilities ``exp`` of it are then off by 0.2%, which a KL of
    1e4 turns into an error of 20. Shifted, the log-sum-exp is at most ``log C`` and exact to float32.
    """
    return x - x.detach().amax(dim=1, keepdim=True)


def _nkd_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float, gamma: float) -> Tensor:
    assert labels is not None
    column = labels.unsqueeze(1)
    s, t = _shift_to_max(s), _shift_to_max(t)
    log_ps_y = s.gather(1, column).squeeze(1) - s.logsumexp(dim=1)
    pt_y = (t.gather(1, column).squeeze(1) - t.logsumexp(dim=1)).exp()
    target_part = -pt_y * log_ps_y
    rest = _rest_index(labels, s.shape[1])
    log_qs = F.log_softmax(s.gather(1, rest) / temperature, dim=1)
    qt = F.softmax(t.gather(1, rest) / temperature, dim=1)
    non_target = -(qt * log_qs).sum(dim=1) * (gamma * temperature**2)
    return target_part + non_target


def _dkd_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float, alpha: float, beta: float) -> Tensor:
    assert labels is not None
    column = labels.unsqueeze(1)
    rest = _rest_index(labels, s.shape[1])
    s, t = _shift_to_max(s / temperature), _shift_to_max(t / temperature)
    s_rest, t_rest = s.gather(1, rest), t.gather(1, rest)
    lse_s, lse_t = s.logsumexp(dim=1), t.logsumexp(dim=1)
    lse_s_rest, lse_t_rest = s_rest.logsumexp(dim=1), t_rest.logsumexp(dim=1)
    # binary (target, rest) log-probabilities: log p_y and log(1 - p_y) = lse(rest) - lse(all)
    log_bs_y, log_bs_n = s.gather(1, column).squeeze(1) - lse_s, lse_s_rest - lse_s
    log_bt_y, log_bt_n = t.gather(1, column).squeeze(1) - lse_t, lse_t_rest - lse_t
    tckd = log_bt_y.exp() * (log_bt_y - log_bs_y) + log_bt_n.exp() * (log_bt_n - log_bs_n)
    log_qs = s_rest - lse_s_rest.unsqueeze(1)
    log_qt = t_rest - lse_t_rest.unsqueeze(1)
    nckd = (log_qt.exp() * (log_qt - log_qs)).sum(dim=1)
    return (alpha * tckd + beta * nckd) * temperature**2


def _dhkd_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float) -> Tensor:
    # KL(Bernoulli(1/2) || Bernoulli(sigmoid(x))) summed with its mirror, per class:
    # 1/2 softplus(-x) + 1/2 softplus(x) - log 2 = |x|/2 + log1p(exp(-|x|)) - log 2 >= 0.
    x = ((s - t) / temperature).abs()
    per_class = 0.5 * x + torch.log1p(torch.exp(-x)) - math.log(2.0)
    return per_class.sum(dim=1) * temperature**2


class _ChunkedRows(torch.autograd.Function):
    """Sum of a per-position loss over chunks, each chunk's gradient written during the forward pass.

    Only one chunk's float32 temporaries exist at a time; the gradient buffer has the logits'
    shape and dtype (what autograd would allocate for the gradient anyway).
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, compute: Callable[[int, int, Tensor], Tensor], chunk_size: int) -> Tensor:
        needs_grad = bool(ctx.needs_input_grad[0])
        grad = torch.empty_like(logits) if needs_grad else None
        total = torch.zeros(
            (), dtype=torch.float64 if logits.dtype == torch.float64 else torch.float32, device=logits.device
        )
        num = logits.shape[0]
        for start in range(0, num, chunk_size):
            end = min(start + chunk_size, num)
            piece = logits[start:end].detach()
            if grad is not None:
                with torch.enable_grad():
                    piece.requires_grad_(True)
                    value = compute(start, end, piece)
                    (piece_grad,) = torch.autograd.grad(value, piece)
                grad[start:end] = piece_grad
            else:
                value = compute(start, end, piece)
            total = total + value.detach()
        ctx.save_for_backward(*([grad] if grad is not None else []))
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_total: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.saved_tensors:
            return None, None, None
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None


def _row_loss(
    rows: Callable[[Tensor, Tensor, Tensor | None], Tensor],
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    valid: Tensor | None,
    standardize: bool,
    chunk_size: int | None,
    validate_args: bool,
) -> Tensor:
    """Mean of ``rows`` over the valid positions, computed in float32, returned in the logits' dtype."""
    num_classes = logits.shape[-1]
    flat = logits.reshape(-1, num_classes)
    teacher = teacher_logits.detach().reshape(-1, num_classes)

    def compute(start: int, end: int, piece: Tensor) -> Tensor:
        s = _work(piece)
        t = _work(teacher[start:end])
        keep = None if valid is None else valid[start:end]
        if keep is not None:
            s = s.masked_fill(~keep.unsqueeze(1), 0.0)
            t = t.masked_fill(~keep.unsqueeze(1), 0.0)
        if standardize:
            s, t = standardize_logits(s), standardize_logits(t)
        value = rows(s, t, None if labels is None else labels[start:end])
        if keep is not None:
            value = value * keep
        return value.sum()

    if chunk_size is None or chunk_size >= flat.shape[0]:
        total = compute(0, flat.shape[0], flat)
    else:
        total = _ChunkedRows.apply(flat, compute, chunk_size)
    count = float(flat.shape[0]) if valid is None else valid.sum().clamp_min(1)
    return result_in_dtype(total / count, logits.dtype, validate_args)


def _prepare(
    logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor | None,
    mask: Tensor | None,
    ignore_index: int,
    temperature: float,
    chunk_size: int | None,
    validate_args: bool,
    needs_target: bool,
    masked_vocab: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    _check_logit_pair(logits, teacher_logits)
    _check_temperature(temperature)
    if chunk_size is not None and not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive number of positions or None, got {chunk_size!r}")
    labels, valid = _valid_positions(logits, target, mask, ignore_index, needs_target, validate_args)
    if validate_args:
        _check_finite(logits, valid, "logits", masked_vocab)
        _check_finite(teacher_logits, valid, "teacher_logits", masked_vocab)
    return labels, valid


# --------------------------------------------------------------------------- losses
def kd_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Hinton's knowledge distillation loss.

    .. math::
        L_{kd} = T^2 \frac{1}{N} \sum_n \mathrm{KL}\big(\mathrm{softmax}(t_n / T) \,\|\,
        \mathrm{softmax}(s_n / T)\big)

    With ``standardize=True`` both rows are z-scored first (logit-standardized KD, the official
    ``kd_loss(..., logit_stand=True)``).

    Args:
        logits: ``[..., C]`` student logits (with their graph).
        teacher_logits: ``[..., C]`` teacher logits; detached here, so no gradient reaches them.
        temperature: softmax temperature ``T > 0`` (default 4.0). The ``T^2`` factor keeps the
            gradient scale independent of ``T``.
        target: optional integer ``[...]`` targets, used only to skip positions equal to
            ``ignore_index`` (soft ``[..., C]`` scores are accepted and ignored).
        mask: optional bool ``[...]``: positions to include.
        ignore_index: target value of positions to skip (default -100).
        standardize: z-score the logits first (:func:`standardize_logits`).
        chunk_size: positions per chunk (``None``: all at once); see the module docstring.
        validate_args: run the checks that read tensor values (non-finite logits, label range).

    Returns:
        A scalar: the mean over valid positions of the KL divergence times ``T^2``, computed in
        float32 and returned in the dtype of ``logits``.

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, 0.0, -1.0]])
        >>> round(kd_loss(s, s, temperature=4.0).item(), 6)
        0.0
        >>> round(kd_loss(torch.zeros(1, 2), torch.tensor([[4.0, 0.0]]), temperature=4.0).item(), 4)
        1.7751
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, False
    )

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _kd_rows(s, t, y, temperature)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def nkd_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    gamma: float = 1.5,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
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

    The target column is removed by gathering the ``C - 1`` other columns (never by subtracting
    a large constant, which breaks once ``|logits| / T`` reaches about 1e3, nor with ``-inf``,
    which gives ``0 * -inf = NaN``). ``standardize=True`` z-scores both rows first (our
    extension: the logit-standardization paper does not evaluate NKD).

    Args:
        logits: ``[..., C]`` student logits (with their graph), ``C >= 2``.
        teacher_logits: ``[..., C]`` teacher logits; detached here.
        target: int ``[...]`` class indices in ``[0, C)`` (or ``ignore_index``), or float
            ``[..., C]`` soft scores (after mixup/cutmix), whose argmax is the target class.
        temperature: temperature ``T > 0`` of the non-target part (default 1.0; 3.0 on CIFAR-100).
        gamma: weight of the non-target part (default 1.5; 1.0 for DeiT pairs, 3.5 on CIFAR-100).
        mask: as in :func:`kd_loss`.
        ignore_index: as in :func:`kd_loss`.
        standardize: as in :func:`kd_loss`.
        chunk_size: as in :func:`kd_loss`.
        validate_args: as in :func:`kd_loss`.

    Returns:
        A scalar, computed in float32 and returned in the dtype of ``logits``.

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
        >>> t = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
        >>> round(nkd_loss(s, t, torch.tensor([0, 1])).item(), 4)
        1.191
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, True
    )
    _check_number(gamma, "gamma")

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _nkd_rows(s, t, y, temperature, gamma)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def dkd_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    *,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Decoupled knowledge distillation (DKD, Zhao et al., CVPR 2022).

    KD at temperature ``T`` split into a target-class part (TCKD: the binary distributions
    ``b = [p_y, 1 - p_y]``) and a non-target part (NCKD: the distributions over the ``C - 1``
    non-target classes, renormalized), weighted separately:

    .. math::
        L_{dkd} = T^2 \frac{1}{N} \sum_n \big(\alpha\,\mathrm{KL}(b^t_n \| b^s_n) +
        \beta\,\mathrm{KL}(\hat p^t_n \| \hat p^s_n)\big)

    This matches ``dkd_loss`` of ``megvii-research/mdistiller`` (``mdistiller/distillers/DKD.py``),
    computed stably: ``log(1 - p_y)`` is a log-sum-exp over the non-target logits (the official
    ``log(softmax)`` is ``-inf`` for saturated rows) and the target column is dropped by a gather
    (the official subtracts 1000, exact only while ``|logits| / T`` stays well below 1e3). The
    official warm-up factor is :func:`dkd_warmup`, applied by the caller (the callback does).
    ``standardize=True`` is the official ``logit_stand`` variant (their CIFAR-100 setting:
    ``T = 2``, ``alpha = 9``, ``beta = 72``).

    Args:
        logits: ``[..., C]`` student logits, ``C >= 2``.
        teacher_logits: ``[..., C]`` teacher logits; detached here.
        target: int ``[...]`` class indices (or ``ignore_index``) or float ``[..., C]`` soft scores
            (their argmax is used).
        temperature: ``T > 0`` (default 4.0, mdistiller's CIFAR-100 config; 1.0 on ImageNet).
        alpha: TCKD weight (default 1.0).
        beta: NCKD weight (default 8.0 on CIFAR-100; 0.5 for ImageNet ResNet34 -> ResNet18).
        mask: as in :func:`kd_loss`.
        ignore_index: as in :func:`kd_loss`.
        standardize: as in :func:`kd_loss`.
        chunk_size: as in :func:`kd_loss`.
        validate_args: as in :func:`kd_loss`.

    Returns:
        A scalar, computed in float32 and returned in the dtype of ``logits``.

    Example:
        >>> import torch
        >>> s, t = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 1.0]])
        >>> round(dkd_loss(s, t, torch.tensor([0]), temperature=1.0, alpha=1.0, beta=1.0).item(), 4)
        1.4021
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, True
    )
    _check_number(alpha, "alpha")
    _check_number(beta, "beta")

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _dkd_rows(s, t, y, temperature, alpha, beta)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def dhkd_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""The logit-level loss of dual-head knowledge distillation (DHKD, Yang et al. 2024), "BinaryKL-Norm".

    DHKD adds an auxiliary linear head on the features that feed the classifier: the main head
    keeps only the cross-entropy, and **this loss is applied to the auxiliary head's logits**
    (pass them as ``logits``); the auxiliary head is dropped for inference. Per class, the
    sigmoid of the scaled logit difference ``x = (s - t) / T`` is pulled to 1/2:

    .. math::
        L = T^2 \frac{1}{N} \sum_n \sum_c \Big[\mathrm{KL}\big(\tfrac12 \| \sigma(x_{nc})\big)
        + \mathrm{KL}\big(\tfrac12 \| 1 - \sigma(x_{nc})\big)\Big]
        = T^2 \frac{1}{N} \sum_n \sum_c \Big[\frac{|x_{nc}|}{2} + \log(1 + e^{-|x_{nc}|}) - \log 2\Big]

    which is zero exactly when the student's logits equal the teacher's (a logit-level match,
    not only a probability match). Official: ``penghui-yang/DHKD``,
    ``distiller_zoo/BinaryKLNorm.py`` (temperature 2; weight 1 on CIFAR-100, 0.1 on ImageNet).
    The official code clamps the sigmoid to ``[1e-8, 1 - 1e-8]``, which zeroes the gradient
    once ``|x| > 18.4``; here the exact form keeps a gradient of magnitude ``T / 2`` there.

    Args:
        logits: ``[..., C]`` logits of the student's auxiliary head.
        teacher_logits: ``[..., C]`` teacher logits; detached here.
        temperature: ``T > 0`` (default 2.0, the official ``--BinaryKL_T``).
        target: as in :func:`kd_loss`.
        mask: as in :func:`kd_loss`.
        ignore_index: as in :func:`kd_loss`.
        standardize: as in :func:`kd_loss`.
        chunk_size: as in :func:`kd_loss`.
        validate_args: as in :func:`kd_loss`.

    Returns:
        A scalar, computed in float32 and returned in the dtype of ``logits``.

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, -1.0]])
        >>> round(dhkd_loss(s, s).item(), 6)
        0.0
        >>> round(dhkd_loss(torch.tensor([[2.0, 0.0]]), torch.zeros(1, 2), temperature=1.0).item(), 4)
        0.4338
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, False
    )

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _dhkd_rows(s, t, y, temperature)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def _pearson_rows(a: Tensor, b: Tensor) -> Tensor:
    """DIST's Pearson correlation of each row of ``a`` with the same row of ``b`` (``eps`` in the denominator)."""
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(a, dim=1) * torch.linalg.vector_norm(b, dim=1)
    return (a * b).sum(dim=1) / (norms + _PEARSON_EPS)


def dist_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""DIST: distillation by correlation (Huang et al., "Knowledge Distillation from A Stronger Teacher", 2022).

    With ``Y^s = softmax(s / T)`` and ``Y^t = softmax(t / T)`` as ``[M, C]`` matrices over the
    valid positions, and ``rho`` the Pearson correlation (``eps = 1e-8`` added to the product of
    norms, as the official code):

    .. math::
        L_{inter} = 1 - \frac{1}{M} \sum_n \rho(Y^s_{n,:}, Y^t_{n,:}) \qquad
        L_{intra} = 1 - \frac{1}{C} \sum_c \rho(Y^s_{:,c}, Y^t_{:,c})

        L_{dist} = T^2 (\beta L_{inter} + \gamma L_{intra})

    Official: ``hunto/DIST_KD`` (``image_classification_sota``: ``lib/models/losses/dist_kd.py``;
    defaults ``beta = gamma = tau = 1``). The intra-class term correlates each class's
    probabilities across the *batch* (all valid positions together), so DIST depends on the
    batch composition and has no chunked path (``chunk_size`` must be ``None``).

    Args:
        logits: ``[..., C]`` student logits.
        teacher_logits: ``[..., C]`` teacher logits; detached here.
        temperature: ``T > 0`` (default 1.0).
        beta: weight of the inter-class (per-position) relation (default 1.0).
        gamma: weight of the intra-class (per-class, across positions) relation (default 1.0).
        target: as in :func:`kd_loss`.
        mask: as in :func:`kd_loss`.
        ignore_index: as in :func:`kd_loss`.
        standardize: as in :func:`kd_loss`.
        validate_args: as in :func:`kd_loss`.
        chunk_size: must be ``None``.

    Returns:
        A scalar, computed in float32 and returned in the dtype of ``logits`` (0 when no
        position is valid).

    Example:
        >>> import torch
        >>> s = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5]])
        >>> round(dist_loss(s, s).item(), 6)
        0.0
        >>> round(dist_loss(s, torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.0, 0.0]])).item(), 4)
        3.7178
    """
    if chunk_size is not None:
        raise ValueError(
            f"dist_loss has no chunked path (chunk_size={chunk_size!r}): its intra-class term correlates "
            "every position with every other; pass chunk_size=None"
        )
    _, valid = _prepare(logits, teacher_logits, target, mask, ignore_index, temperature, None, validate_args, False)
    _check_number(beta, "beta")
    _check_number(gamma, "gamma")
    num_classes = logits.shape[-1]
    s = _work(logits.reshape(-1, num_classes))
    t = _work(teacher_logits.detach().reshape(-1, num_classes))
    if valid is not None:
        s = s.masked_fill(~valid.unsqueeze(1), 0.0)
        t = t.masked_fill(~valid.unsqueeze(1), 0.0)
    if standardize:
        s, t = standardize_logits(s), standardize_logits(t)
    ys = F.softmax(s / temperature, dim=1)
    yt = F.softmax(t / temperature, dim=1)
    if valid is None:
        inter = 1 - _pearson_rows(ys, yt).mean()
        intra = 1 - _pearson_rows(ys.T, yt.T).mean()
        return result_in_dtype((beta * inter + gamma * intra) * temperature**2, logits.dtype, validate_args)
    weight = valid.to(ys.dtype)
    count = weight.sum()
    inter = 1 - (_pearson_rows(ys, yt) * weight).sum() / count.clamp_min(1)
    # column statistics over the valid rows only: centre by the valid mean, zero the others
    cs = (ys - (ys * weight[:, None]).sum(0) / count.clamp_min(1)) * weight[:, None]
    ct = (yt - (yt * weight[:, None]).sum(0) / count.clamp_min(1)) * weight[:, None]
    norms = torch.linalg.vector_norm(cs, dim=0) * torch.linalg.vector_norm(ct, dim=0)
    intra = 1 - ((cs * ct).sum(0) / (norms + _PEARSON_EPS)).mean()
    value = (beta * inter + gamma * intra) * temperature**2
    value = torch.where(count > 0, value, torch.zeros_like(value))
    return result_in_dtype(value, logits.dtype, validate_args)


# --------------------------------------------------------------------------- token-level divergences
# Per position, with P_s = softmax(s / T) and P_t = softmax(t / T) over the vocabulary. These are the
# divergences themselves, with no T^2 factor (as TRL's GKD and DistiLLM's losses); ``kd``
# is the T^2-scaled forward KL of Hinton et al.
def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``KL(p || q)`` per row from log-probabilities.

    Entries with ``p = 0`` contribute 0 (also where ``log p = -inf``, a masked token): the difference
    is replaced before the product, so neither the value nor the gradient meets ``0 * inf``. Where
    ``p > 0`` and ``q = 0`` the divergence is ``+inf``, as it should be.
    """
    p = log_p.exp()
    difference = torch.where(p > 0, log_p - log_q, 0.0)
    return (p * difference).sum(dim=1)


def _mixture_log(log_p: Tensor, log_q: Tensor, weight_p: float) -> Tensor:
    """``log(w p + (1 - w) q)`` per entry, ``0 < w < 1``, as a log-sum-exp (never ``log`` of a sum of probabilities).

    Where both are ``-inf`` (a token masked on both sides) the result is a finite placeholder: no
    KL term reads it (its weight is 0), and ``logaddexp(-inf, -inf)`` would give a NaN gradient.
    """
    both = (log_p == -math.inf) & (log_q == -math.inf)
    zero = torch.zeros_like(log_p)
    a = torch.where(both, zero, log_p) + math.log(weight_p)
    b = torch.where(both, zero, log_q) + math.log1p(-weight_p)
    return torch.logaddexp(a, b)


def _zero_rows(log_ps: Tensor) -> Tensor:
    """Zeros ``[m]`` kept on the student's graph (the chunked path differentiates every chunk); ``-inf`` safe."""
    return torch.nan_to_num(log_ps[:, 0], neginf=0.0) * 0.0


def _forward_kl_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float) -> Tensor:
    log_ps, log_pt = F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1)
    return _kl_rows(log_pt, log_ps)


def _reverse_kl_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float) -> Tensor:
    log_ps, log_pt = F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1)
    return _kl_rows(log_ps, log_pt)


def _jsd_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float, beta: float) -> Tensor:
    log_ps, log_pt = F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1)
    if beta == 0.0:  # TRL's end points: forward KL at beta = 0, reverse KL at beta = 1
        return _kl_rows(log_pt, log_ps)
    if beta == 1.0:
        return _kl_rows(log_ps, log_pt)
    log_m = _mixture_log(log_pt, log_ps, beta)  # M = beta P_t + (1 - beta) P_s
    return beta * _kl_rows(log_pt, log_m) + (1.0 - beta) * _kl_rows(log_ps, log_m)


def _skew_kl_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float, alpha: float) -> Tensor:
    log_ps, log_pt = F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1)
    if alpha == 0.0:
        return _kl_rows(log_pt, log_ps)
    if alpha == 1.0:
        return _zero_rows(log_ps)  # KL(P_t || P_t) = 0
    return _kl_rows(log_pt, _mixture_log(log_pt, log_ps, alpha))  # KL(P_t || a P_t + (1 - a) P_s)


def _skew_reverse_kl_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float, alpha: float) -> Tensor:
    log_ps, log_pt = F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1)
    if alpha == 0.0:
        return _kl_rows(log_ps, log_pt)
    if alpha == 1.0:
        return _zero_rows(log_ps)
    return _kl_rows(log_ps, _mixture_log(log_ps, log_pt, alpha))  # KL(P_s || a P_s + (1 - a) P_t)


def _tv_rows(s: Tensor, t: Tensor, labels: Tensor | None, temperature: float) -> Tensor:
    return 0.5 * (F.softmax(s / temperature, dim=1) - F.softmax(t / temperature, dim=1)).abs().sum(dim=1)


def forward_kl_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Forward KL divergence per token, the mode-covering distillation loss (no ``T^2`` factor).

    .. math::
        L = \frac{1}{M} \sum_n \mathrm{KL}(P_t \| P_s) = \frac{1}{M} \sum_n \sum_v P_t(v)
        \big(\log P_t(v) - \log P_s(v)\big), \quad P = \mathrm{softmax}(z / T)

    over the ``M`` valid positions. It is :func:`kd_loss` divided by ``T^2``, and TRL's GKD loss at
    ``beta = 0``. DistiLLM's ``forward_kl`` (``distillm/losses.py``) and torchtune's ``ForwardKLLoss``
    return the cross-entropy :math:`-\sum_v P_t \log P_s` instead (at ``T = 1``), which is larger by
    the teacher's entropy: the same gradient, another value.

    Args:
        logits: ``[..., V]`` student logits (``[N, C]`` or ``[B, T, V]``), with their graph.
        teacher_logits: ``[..., V]`` teacher logits; detached here.
        temperature: ``T > 0`` dividing both logit tensors (default 1.0).
        target: ``[...]`` labels; only used to skip the positions equal to ``ignore_index``.
        mask: as in :func:`kd_loss`.
        ignore_index: as in :func:`kd_loss`.
        standardize: as in :func:`kd_loss`.
        chunk_size: as in :func:`kd_loss`.
        validate_args: as in :func:`kd_loss`.

    Returns:
        A scalar: the mean over the valid positions, computed in float32 and returned in the dtype of
        ``logits``.

    Example:
        >>> import math, torch
        >>> s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # P_s (1/2, 1/2), P_t (3/4, 1/4)
        >>> round(forward_kl_loss(s, t).item(), 6), round(0.75 * math.log(1.5) + 0.25 * math.log(0.5), 6)
        (0.130812, 0.130812)
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, False, True
    )

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _forward_kl_rows(s, t, y, temperature)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def reverse_kl_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Reverse KL divergence per token, the mode-seeking loss of MiniLLM (Gu et al., ICLR 2024).

    .. math::
        L = \frac{1}{M} \sum_n \mathrm{KL}(P_s \| P_t) = \frac{1}{M} \sum_n \sum_v P_s(v)
        \big(\log P_s(v) - \log P_t(v)\big)

    computed on the given tokens (MiniLLM's policy-gradient training on sampled sequences is not part
    of this function); TRL's GKD with ``beta = 1``. The student puts little mass where the teacher
    has little, so a small student concentrates on the teacher's main modes instead of spreading
    over all of them.

    Args:
        logits: as in :func:`forward_kl_loss`.
        teacher_logits: as in :func:`forward_kl_loss`.
        temperature: as in :func:`forward_kl_loss`.
        target: as in :func:`forward_kl_loss`.
        mask: as in :func:`forward_kl_loss`.
        ignore_index: as in :func:`forward_kl_loss`.
        standardize: as in :func:`forward_kl_loss`.
        chunk_size: as in :func:`forward_kl_loss`.
        validate_args: as in :func:`forward_kl_loss`.

    Returns:
        A scalar: the mean over the valid positions (float32 inside, the dtype of ``logits`` out).

    Example:
        >>> import math, torch
        >>> s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
        >>> round(reverse_kl_loss(s, t).item(), 6), round(0.5 * math.log(2 / 3) + 0.5 * math.log(2.0), 6)
        (0.143841, 0.143841)
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, False, True
    )

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _reverse_kl_rows(s, t, y, temperature)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def jsd_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    beta: float = 0.5,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Generalized Jensen-Shannon divergence per token (GKD, Agarwal et al., ICLR 2024), as TRL computes it.

    With the mixture :math:`M_\beta = \beta P_t + (1 - \beta) P_s`:

    .. math::
        \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(P_t \| M_\beta) + (1 - \beta)\,\mathrm{KL}(P_s \| M_\beta),
        \qquad L = \frac{1}{M} \sum_n \mathrm{JSD}_\beta(n)

    **Which side ``beta`` weights**: the *teacher*, in the mixture and in the first term, as in TRL's
    ``GKDTrainer.generalized_jsd_loss`` (``trl.experimental.gkd``, TRL 1.16). So ``beta = 0.5`` is the
    symmetric JSD, and the end points follow TRL: ``beta = 0`` gives the **forward** KL
    :math:`\mathrm{KL}(P_t \| P_s)` and ``beta = 1`` the **reverse** KL :math:`\mathrm{KL}(P_s \| P_t)`.
    Those two are TRL's special cases, not the limits of the formula: :math:`\mathrm{JSD}_\beta \to 0`
    at both ends, while :math:`\mathrm{JSD}_\beta / \beta \to \mathrm{KL}(P_t \| P_s)` as
    :math:`\beta \to 0` and :math:`\mathrm{JSD}_\beta / (1 - \beta) \to \mathrm{KL}(P_s \| P_t)` as
    :math:`\beta \to 1`. Like TRL, logits are divided by ``T`` and there is no ``T^2`` factor; the
    value equals TRL's with ``labels`` given (mean over the tokens whose label is not -100).
    ``log M`` is a log-sum-exp of the two log-probabilities, never the log of a sum of probabilities.

    Args:
        logits: as in :func:`forward_kl_loss`.
        teacher_logits: as in :func:`forward_kl_loss`.
        temperature: as in :func:`forward_kl_loss`.
        target: as in :func:`forward_kl_loss`.
        mask: as in :func:`forward_kl_loss`.
        ignore_index: as in :func:`forward_kl_loss`.
        standardize: as in :func:`forward_kl_loss`.
        chunk_size: as in :func:`forward_kl_loss`.
        validate_args: as in :func:`forward_kl_loss`.
        beta: the teacher's weight in ``[0, 1]`` (default 0.5, symmetric; GKD's paper also uses 0.1
            and 0.9).

    Returns:
        A scalar: the mean over the valid positions (float32 inside, the dtype of ``logits`` out).

    Example:
        >>> import math, torch
        >>> s, t = torch.tensor([[20.0, 0.0]]), torch.tensor([[0.0, 20.0]])  # nearly disjoint supports
        >>> round(jsd_loss(s, t).item(), 5), round(math.log(2.0), 5)  # the JSD's maximum, log 2
        (0.69315, 0.69315)
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, False, True
    )
    _check_fraction(beta, "beta", "the teacher's weight in the mixture; 0: forward KL, 1: reverse KL")
    beta = float(beta)

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _jsd_rows(s, t, y, temperature, beta)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def skew_kl_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    alpha: float = 0.1,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Skew (forward) KL divergence per token (DistiLLM, Ko et al., ICML 2024).

    .. math::
        L = \frac{1}{M} \sum_n \mathrm{KL}\big(P_t \,\|\, \alpha P_t + (1 - \alpha) P_s\big)

    Mixing some of the teacher into the student's side bounds the divergence (by
    :math:`-\log \alpha`) and its gradient where the student gives a teacher token almost no mass,
    which makes early training steadier than plain forward KL. ``alpha = 0`` is the forward KL,
    ``alpha = 1`` gives 0. This is the divergence itself; DistiLLM's official code
    (``distillm/losses.py``) returns it as a cross-entropy :math:`-\sum P_t \log(\cdot)`, which is
    larger by the teacher's entropy (a constant: the same gradient).

    Args:
        logits: as in :func:`forward_kl_loss`.
        teacher_logits: as in :func:`forward_kl_loss`.
        temperature: as in :func:`forward_kl_loss`.
        target: as in :func:`forward_kl_loss`.
        mask: as in :func:`forward_kl_loss`.
        ignore_index: as in :func:`forward_kl_loss`.
        standardize: as in :func:`forward_kl_loss`.
        chunk_size: as in :func:`forward_kl_loss`.
        validate_args: as in :func:`forward_kl_loss`.
        alpha: the teacher's share of the mixture, in ``[0, 1]`` (default 0.1, the paper's).

    Returns:
        A scalar: the mean over the valid positions (float32 inside, the dtype of ``logits`` out).

    Example:
        >>> import torch
        >>> s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 30.0]])
        >>> round(skew_kl_loss(s, t, alpha=0.1).item(), 4)  # about -log(0.1 + 0.9 / 2)
        0.5978
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, False, True
    )
    _check_fraction(alpha, "alpha", "the teacher's share of the mixture; DistiLLM uses 0.1")
    alpha = float(alpha)

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _skew_kl_rows(s, t, y, temperature, alpha)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def skew_reverse_kl_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    alpha: float = 0.1,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Skew reverse KL divergence per token (DistiLLM, Ko et al., ICML 2024).

    .. math::
        L = \frac{1}{M} \sum_n \mathrm{KL}\big(P_s \,\|\, \alpha P_s + (1 - \alpha) P_t\big)

    The reverse KL with some of the student mixed into the teacher's side; ``alpha = 0`` is
    :func:`reverse_kl_loss`, ``alpha = 1`` gives 0.

    Args:
        logits: as in :func:`forward_kl_loss`.
        teacher_logits: as in :func:`forward_kl_loss`.
        temperature: as in :func:`forward_kl_loss`.
        target: as in :func:`forward_kl_loss`.
        mask: as in :func:`forward_kl_loss`.
        ignore_index: as in :func:`forward_kl_loss`.
        standardize: as in :func:`forward_kl_loss`.
        chunk_size: as in :func:`forward_kl_loss`.
        validate_args: as in :func:`forward_kl_loss`.
        alpha: the student's share of the mixture, in ``[0, 1]`` (default 0.1, the paper's).

    Returns:
        A scalar: the mean over the valid positions (float32 inside, the dtype of ``logits`` out).

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, -1.0, 0.5]])
        >>> round(skew_reverse_kl_loss(s, s).item(), 6)
        0.0
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, False, True
    )
    _check_fraction(alpha, "alpha", "the student's share of the mixture; DistiLLM uses 0.1")
    alpha = float(alpha)

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _skew_reverse_kl_rows(s, t, y, temperature, alpha)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


def tv_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    ignore_index: int = -100,
    standardize: bool = False,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    r"""Total variation distance per token, in ``[0, 1]`` (used for sequence-level KD by Wen et al., ACL 2023).

    .. math::
        L = \frac{1}{M} \sum_n \frac{1}{2} \sum_v \big|P_s(v) - P_t(v)\big|

    Bounded and symmetric; its gradient does not grow where the student gives a teacher token
    almost no mass (unlike forward KL), and it is 0 only when the two distributions are equal.

    Args:
        logits: as in :func:`forward_kl_loss`.
        teacher_logits: as in :func:`forward_kl_loss`.
        temperature: as in :func:`forward_kl_loss`.
        target: as in :func:`forward_kl_loss`.
        mask: as in :func:`forward_kl_loss`.
        ignore_index: as in :func:`forward_kl_loss`.
        standardize: as in :func:`forward_kl_loss`.
        chunk_size: as in :func:`forward_kl_loss`.
        validate_args: as in :func:`forward_kl_loss`.

    Returns:
        A scalar: the mean over the valid positions (float32 inside, the dtype of ``logits`` out).

    Example:
        >>> import math, torch
        >>> s, t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])  # (1/2, 1/2) vs (3/4, 1/4)
        >>> round(tv_loss(s, t).item(), 6)
        0.25
    """
    labels, valid = _prepare(
        logits, teacher_logits, target, mask, ignore_index, temperature, chunk_size, validate_args, False, True
    )

    def rows(s: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        return _tv_rows(s, t, y, temperature)

    return _row_loss(rows, logits, teacher_logits, labels, valid, standardize, chunk_size, validate_args)


# --------------------------------------------------------------------------- registry
DISTILLATION_LOSSES: dict[str, Callable[..., Tensor]] = {
    "kd": kd_loss,
    "nkd": nkd_loss,
    "dkd": dkd_loss,
    "dist": dist_loss,
    "dhkd": dhkd_loss,
    "forward_kl": forward_kl_loss,
    "reverse_kl": reverse_kl_loss,
    "jsd": jsd_loss,
    "skew_kl": skew_kl_loss,
    "skew_reverse_kl": skew_reverse_kl_loss,
    "tv": tv_loss,
}
"""The distillation losses by name: ``"kd"``, ``"nkd"``, ``"dkd"``, ``"dist"``, ``"dhkd"``, and the token-level
divergences ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"``, ``"skew_kl"``, ``"skew_reverse_kl"``, ``"tv"``.

``TeacherDistillation(loss=<name>)`` and :func:`get_distillation_loss` look names up here; every
value takes ``(logits [..., C], teacher_logits [..., C], target=..., temperature=..., mask=...,
validate_args=..., **hyperparameters)`` and returns a scalar.

Example:
    >>> import torch
    >>> sorted(DISTILLATION_LOSSES)
    ['dhkd', 'dist', 'dkd', 'forward_kl', 'jsd', 'kd', 'nkd', 'reverse_kl', 'skew_kl', 'skew_reverse_kl', 'tv']
    >>> z = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(DISTILLATION_LOSSES["kd"](z, z, temperature=4.0))
    0.0
"""


def get_distillation_loss(loss: str | Callable[..., Tensor]) -> Callable[..., Tensor]:
    """The loss function for a registry name (a key of :data:`DISTILLATION_LOSSES`, e.g. ``"jsd"``) or a callable.

    A user callable must accept ``(logits, teacher_logits, *, target, temperature, mask,
    validate_args, **hyperparameters)`` like the registered losses and return a scalar.

    Example:
        >>> get_distillation_loss("dkd") is dkd_loss
        True
    """
    if callable(loss):
        return loss
    if isinstance(loss, str) and loss in DISTILLATION_LOSSES:
        return DISTILLATION_LOSSES[loss]
    raise ValueError(
        f"loss must be one of {sorted(DISTILLATION_LOSSES)} or a callable with the same signature, got {loss!r}"
    )

"""Losses and summaries of online continual learning: cosine logits, UER, ER-ACE, accuracy-matrix metrics.

UER (unbiased experience replay) splits a bias-free linear head's logit
``z_c = <W_c, h> = ||W_c|| ||h|| cos(theta_c)`` in two: the incoming samples learn only from the
angle factor (cosine logits over a temperature), the replayed samples from the full dot product.
The norm factor, trained only by replay, then keeps remembering old classes.

ER-ACE (Caccia et al., "New Insights on Reducing Abrupt Representation Change in Online Continual
Learning", ICLR 2022) keeps the dot-product logits but restricts the incoming samples' softmax to
the classes present in the incoming batch (the asymmetric cross-entropy); replayed samples use the
full softmax.

The summaries read an accuracy matrix ``R`` (``[T, T]``, ``R[i, j]`` = accuracy on task ``j``
after training task ``i``, NaN where not measured) up to a row ``after`` (default: the last row).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_logits.functional._checks import check_target

__all__ = [
    "average_accuracy",
    "average_forgetting",
    "average_incremental_accuracy",
    "backward_transfer",
    "cosine_logits",
    "er_ace_loss",
    "final_average_accuracy",
    "learning_accuracy",
    "replay_cross_entropy",
    "uer_loss",
]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _check_matrix(value: Tensor, name: str, shape_hint: str, validate_args: bool = True) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must have shape {shape_hint}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {value.dtype}")
    if validate_args and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contain {bad} non-finite value(s) (NaN or inf); check the model's forward pass")


def _check_labels(target: Tensor, num_samples: int, num_classes: int, name: str, validate_args: bool) -> None:
    """Int class indices ``[N]``: shape and dtype always, the values in ``[0, C)`` only with ``validate_args``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        raise TypeError(f"{name} must hold int class indices, got dtype {target.dtype}")
    if validate_args:
        check_target(target, num_samples, num_classes)
        return
    if target.ndim != 1 or target.shape[0] != num_samples:
        raise ValueError(f"{name} must be class indices of shape [N] = [{num_samples}], got {tuple(target.shape)}")
    if target.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an integer tensor, got dtype {target.dtype}")


def _check_replay(
    replay_logits: Tensor, replay_target: Tensor, num_classes: int, reference: str, validate_args: bool
) -> None:
    """Check replayed ``[M, C]`` logits and their ``[M]`` labels against ``C`` classes.

    ``reference`` names what fixes ``C`` in the error message (the head's weight, the incoming logits).
    """
    _check_matrix(replay_logits, "replay_logits", "[M, C] (replayed batch, classes)", validate_args)
    if replay_logits.shape[1] != num_classes:
        raise ValueError(f"replay_logits have C={replay_logits.shape[1]} classes but {reference} C={num_classes}")
    _check_labels(replay_target, replay_logits.shape[0], num_classes, "replay_target", validate_args)


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy of ``[M, C]`` logits in float32 (or wider) against int ``[M]`` labels, unchecked.

    Casts only what needs it: a no-op ``.float()``/``.long()`` still costs a dispatch, and the
    replay losses run every step.
    """
    return F.cross_entropy(
        logits if logits.dtype == torch.float32 else logits.float(),
        target if target.dtype == torch.int64 else target.long(),
    )


_TINY = 1e-30  # a positive float32 (and float64) number: divides a zero <u, g> without a NaN


class _ScaledCosine(torch.autograd.Function):
    """``scale * cosine_logits(h, W)`` as one autograd node, with the closed-form backward.

    The row normalizations, the matrix product and the scale of :func:`cosine_logits` run as
    about a dozen operations forward and a dozen backward, instead of autograd's graph of some
    forty small operations (each norm, ``where``, division and their backward): on small steps
    the per-operation cost is what UER adds to ER.

    Each row is scaled by ``1 / (||x|| + eps)``. A zero row has no direction: its value is 0
    either way, but the formula's Jacobian there is ``I / eps`` (10^6 for the default eps), a
    gradient of arbitrary direction and huge size; its scale is set to 0 instead, which keeps the
    value and cuts that gradient to 0. Any other row's Jacobian has norm at most
    ``1 / (||x|| + eps) < 1 / eps``: the backward of ``x -> u = x / (||x|| + eps)`` applied to
    ``g`` is ``g / (||x|| + eps) - u <u, g> / ||x||``.
    """

    @staticmethod
    def forward(ctx: Any, features: Tensor, weight: Tensor, scale: float, eps: float) -> Tensor:
        norm_h = torch.linalg.vector_norm(features, dim=1, keepdim=True)  # [N, 1]
        norm_w = torch.linalg.vector_norm(weight, dim=1, keepdim=True)  # [C, 1]
        # 1 / (||x|| + eps), and 0 for a zero row: its unit row is 0 either way, its gradient is cut.
        inv_h = (norm_h + eps).reciprocal_().masked_fill_(norm_h == 0, 0.0)
        inv_w = (norm_w + eps).reciprocal_().masked_fill_(norm_w == 0, 0.0)
        if scale != 1.0:
            inv_w = inv_w.mul_(scale)
        unit_h = features * inv_h  # [N, D] unit rows
        scaled_w = weight * inv_w  # [C, D] unit rows times the scale
        ctx.save_for_backward(unit_h, scaled_w, inv_h, inv_w, norm_h, norm_w)
        ctx.scale = scale
        return F.linear(unit_h, scaled_w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        unit_h, scaled_w, inv_h, inv_w, norm_h, norm_w = ctx.saved_tensors
        grad_h = grad_w = None
        tiny = _TINY  # a zero row has <u, g> = 0: 0 / tiny = 0, not 0 / 0
        if ctx.needs_input_grad[0]:
            g_h = grad @ scaled_w  # [N, D]: the gradient at the unit rows
            along = (unit_h * g_h).sum(dim=1, keepdim=True).div_(norm_h.clamp_min(tiny))
            grad_h = torch.addcmul(g_h.mul_(inv_h), unit_h, along, value=-1.0)
        if ctx.needs_input_grad[1]:
            g_w = grad.t() @ unit_h  # [C, D]: the gradient at the scaled unit rows
            # u <u, s g> / ||W|| with u = scaled_w / s
            along = (scaled_w * g_w).sum(dim=1, keepdim=True).div_(norm_w.clamp_min(tiny) * ctx.scale)
            grad_w = torch.addcmul(g_w.mul_(inv_w), scaled_w, along, value=-1.0)
        return grad_h, grad_w, None, None


def _check_same_dim(features: Tensor, weight: Tensor) -> None:
    if features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features have D={features.shape[1]} but the head weight expects D={weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)}); pass the features that enter this head"
        )


def _scaled_cosine(features: Tensor, weight: Tensor, scale: float, eps: float) -> Tensor:
    """``scale * <h_n / (||h_n|| + eps), W_c / (||W_c|| + eps)>`` in the promoted float dtype (no checks)."""
    if features.dtype != torch.float32 or weight.dtype != torch.float32:
        dtype = torch.promote_types(torch.promote_types(features.dtype, weight.dtype), torch.float32)
        features, weight = features.to(dtype), weight.to(dtype)
    out: Tensor = _ScaledCosine.apply(features, weight, scale, eps)
    return out


def cosine_logits(features: Tensor, weight: Tensor, eps: float = 1e-6, validate_args: bool = True) -> Tensor:
    """Cosine similarity of every feature row with every class weight row.

    ``out[n, c] = <h_n / (||h_n|| + eps), W_c / (||W_c|| + eps)>``, computed in float32 (or the
    inputs' dtype when wider) and returned in the dtype of ``features``.

    Args:
        features: ``[N, D]`` features entering the classifier head.
        weight: ``[C, D]`` weight of a linear head (``nn.Linear.weight``).
        eps: added to each norm; keeps the division finite.
        validate_args: check the inputs are finite (reads values on the host: a device sync).

    Returns:
        ``[N, C]`` values in ``[-1, 1]``.

    A zero feature row (or a zero weight row) gives cosine 0 against every class, and no
    gradient flows into that row through the normalization (see ``_ScaledCosine``): no NaN, no
    ``1/eps`` blow-up. Its class scores still train through the other factor.

    Example:
        >>> import torch
        >>> h = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> cosine_logits(h, w).round(decimals=4)
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    _check_matrix(features, "features", "[N, D]", validate_args)
    _check_matrix(weight, "weight", "[C, D]", validate_args)
    _check_same_dim(features, weight)
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    out = _scaled_cosine(features, weight, 1.0, eps)
    return out if out.dtype == features.dtype else out.to(features.dtype)


def uer_loss(
    features: Tensor,
    target: Tensor,
    weight: Tensor,
    replay_features: Tensor | None = None,
    replay_target: Tensor | None = None,
    bias: Tensor | None = None,
    temperature: float = 0.09,
    logit_mask: Tensor | None = None,
    validate_args: bool = True,
    replay_logits: Tensor | None = None,
) -> Tensor:
    """The UER loss: angle-only cross-entropy on incoming samples, full cross-entropy on replayed ones.

    ``L = CE(cosine_logits(h, W) / τ, y) + CE(h_m W^T + b, y_m)``, each a mean over its own
    batch; the second term is 0 when there are no replayed samples (an empty buffer).

    Args:
        features: ``[N, D]`` features of the incoming batch (input of the linear head).
        target: ``[N]`` int class indices of the incoming batch.
        weight: ``[C, D]`` weight of the linear head.
        replay_features: ``[M, D]`` features of the replayed batch, or ``None``/``M = 0``.
        replay_target: ``[M]`` int class indices of the replayed batch (with ``replay_features``).
        bias: ``[C]`` bias of the head, used only in the replay term's dot-product logits.
        temperature: τ, the temperature of the cosine logits (0.09, the author's cosine-linear default).
        logit_mask: bool ``[C]``; when given, classes where it is ``False`` are left out of the
            incoming batch's softmax (e.g. classes not seen yet). Every incoming label must be
            in the mask. The replay term always uses all classes.
        validate_args: check values on the host (finite inputs, labels in range, labels inside
            the mask); a device sync. Shapes and dtypes are always checked. ``UER`` calls this
            function on its first step only, and the same computation without checks afterwards.
        replay_logits: ``[M, C]`` dot-product logits of the replayed batch when the head has
            already computed them (``replay_features @ weight.T + bias``); the replay term then
            uses them instead of recomputing them (pass ``replay_target`` with them, and leave
            ``replay_features`` out). ``None``: computed from ``replay_features``.

    Returns:
        A float32 scalar.

    Example:
        >>> import torch
        >>> h, w = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])
        >>> round(uer_loss(h, torch.tensor([0]), w, temperature=1.0).item(), 4)  # CE of logits [1, 0]
        0.3133
        >>> round(uer_loss(h, torch.tensor([0]), w, h, torch.tensor([1]), temperature=1.0).item(), 4)
        1.6265
    """
    _check_matrix(features, "features", "[N, D] (incoming batch, feature dimension)", validate_args)
    _check_matrix(weight, "weight", "[C, D] (classes, feature dimension)", validate_args)
    num_classes, dim = weight.shape
    if num_classes < 2:
        raise ValueError(
            f"the head has {num_classes} class(es) (weight shape {tuple(weight.shape)}); a "
            "classification head needs at least 2"
        )
    if features.shape[0] == 0:
        raise ValueError("features hold no incoming samples (N=0); the incoming batch must not be empty")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    _check_same_dim(features, weight)
    _check_labels(target, features.shape[0], num_classes, "target", validate_args)
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (num_classes,)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape [C] = [{num_classes}], got {shape}")

    if logit_mask is not None:
        if logit_mask.dtype != torch.bool or logit_mask.shape != (num_classes,):
            raise ValueError(
                f"logit_mask must be a bool tensor of shape [C] = [{num_classes}], got dtype "
                f"{logit_mask.dtype} and shape {tuple(logit_mask.shape)}"
            )
        if validate_args:
            outside = ~logit_mask[target]
            if bool(outside.any()):
                labels = sorted({int(v) for v in target[outside].tolist()})
                raise ValueError(
                    f"incoming labels {labels} are excluded by logit_mask; the mask must keep every "
                    "class present in the batch"
                )

    if replay_logits is not None and replay_features is not None:
        raise ValueError("pass replay_features or replay_logits, not both (the logits are computed from the features)")
    if replay_logits is not None and replay_target is None:
        raise ValueError("pass replay_target with replay_logits")
    if replay_logits is None:
        if (replay_features is None) != (replay_target is None):
            raise ValueError("pass replay_features and replay_target together (or neither)")
        if replay_features is not None:
            _check_matrix(
                replay_features, "replay_features", "[M, D] (replayed batch, feature dimension)", validate_args
            )
            if replay_features.shape[1] != dim:
                raise ValueError(
                    f"replay_features have D={replay_features.shape[1]} but the head weight expects D={dim}"
                )
            replay_logits = F.linear(replay_features.float(), weight.float(), None if bias is None else bias.float())
    if replay_logits is not None:
        assert replay_target is not None  # every path without it raised above
        _check_replay(replay_logits, replay_target, num_classes, "the head weight has", validate_args)
    return _uer_loss_unchecked(features, target, weight, 1.0 / temperature, logit_mask, replay_logits, replay_target)


def _uer_loss_unchecked(
    features: Tensor,
    target: Tensor,
    weight: Tensor,
    inverse_temperature: float,
    logit_mask: Tensor | None,
    replay_logits: Tensor | None,
    replay_target: Tensor | None,
) -> Tensor:
    """:func:`uer_loss` after its checks: the computation alone, for callers that checked the inputs once.

    :class:`~lightning_logits.callbacks.UER` calls :func:`uer_loss` on its first step and this
    afterwards: on small steps the checks (a dozen Python-level tests and no-op dtype
    conversions, about 10 us a step on a CPU) are a visible share of what UER adds to ER.
    ``uer_loss`` computes through this function too, so both paths give the same bits.

    Args: as :func:`uer_loss`, with ``inverse_temperature = 1 / τ``; ``replay_logits`` ``None``
    or ``[0, C]``: no replay term (``replay_target`` is then not read).
    """
    # The cosine logits over the temperature as one autograd node (see _ScaledCosine), in float32 or wider.
    logits = _scaled_cosine(features, weight, inverse_temperature, 1e-6)
    if logits.dtype != torch.float32:
        logits = logits.float()
    if logit_mask is not None:
        logits = logits.masked_fill(~logit_mask, float("-inf"))
    loss = _cross_entropy(logits, target)
    if replay_logits is None or replay_logits.shape[0] == 0:
        return loss
    assert replay_target is not None
    return loss + _cross_entropy(replay_logits, replay_target)


def replay_cross_entropy(logits: Tensor, target: Tensor, validate_args: bool = True) -> Tensor:
    """Mean cross-entropy of a replayed batch over all classes (plain ER's replay term), in float32.

    Args:
        logits: ``[M, C]`` logits of the replayed samples (``M = 0`` gives 0).
        target: ``[M]`` int class indices.
        validate_args: check values on the host (finite logits, labels in range); a device sync.

    Example:
        >>> import torch
        >>> round(replay_cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item(), 4)
        0.1269
    """
    _check_matrix(logits, "replay logits", "[M, C]", validate_args)
    _check_labels(target, logits.shape[0], logits.shape[1], "replay target", validate_args)
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return _cross_entropy(logits, target)


def er_ace_loss(
    logits: Tensor,
    target: Tensor,
    replay_logits: Tensor | None = None,
    replay_target: Tensor | None = None,
    validate_args: bool = True,
) -> Tensor:
    """The ER-ACE loss: asymmetric cross-entropy on incoming samples, full cross-entropy on replayed ones.

    ``L = CE_{P}(z, y) + CE(z_m, y_m)``, where ``CE_P`` is the cross-entropy whose softmax covers only
    the classes ``P`` present in the incoming batch (the other logits are set to ``-inf``), each
    term a mean over its own batch; the replay term is 0 without replayed samples.

    This is the loss as the paper states it (Caccia et al. 2022, eq. for ``L_ACE``). The official
    code (``pclucas14/AML``, ``methods/er_ace.py``) also keeps the logits of classes above the
    largest label seen so far (it assumes classes arrive in label order) and applies no mask on
    the first task; mammoth (``models/er_ace.py``) does the same. Neither is done here: with a
    shuffled class order those rules mask arbitrary classes.

    Args:
        logits: ``[N, C]`` dot-product logits of the incoming batch.
        target: ``[N]`` int class indices of the incoming batch.
        replay_logits: ``[M, C]`` logits of the replayed batch, or ``None``/``M = 0``.
        replay_target: ``[M]`` its class indices (with ``replay_logits``).
        validate_args: check values on the host (finite logits, labels in range); a device sync.

    Returns:
        A float32 scalar.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0, 5.0], [0.0, 2.0, 5.0]])
        >>> y = torch.tensor([0, 1])  # class 2 is absent from the batch: left out of its softmax
        >>> round(er_ace_loss(z, y).item(), 4)
        0.1269
        >>> round(er_ace_loss(z, y, replay_logits=z, replay_target=y).item(), 4)  # + the full CE
        3.1819
    """
    _check_matrix(logits, "logits", "[N, C] (incoming batch, classes)", validate_args)
    num_classes = logits.shape[1]
    if num_classes < 2:
        raise ValueError(f"logits have {num_classes} class(es); a classification head needs at least 2")
    if logits.shape[0] == 0:
        raise ValueError("logits hold no incoming samples (N=0); the incoming batch must not be empty")
    _check_labels(target, logits.shape[0], num_classes, "target", validate_args)
    present = torch.zeros(num_classes, dtype=torch.bool, device=logits.device)
    present[target.long()] = True
    loss = F.cross_entropy(logits.float().masked_fill(~present, float("-inf")), target.long())
    if (replay_logits is None) != (replay_target is None):
        raise ValueError("pass replay_logits and replay_target together (or neither)")
    if replay_logits is not None and replay_target is not None:
        _check_replay(replay_logits, replay_target, num_classes, "the incoming logits have", validate_args)
        if replay_logits.shape[0] > 0:
            loss = loss + _cross_entropy(replay_logits, replay_target)
    return loss


# ---------------------------------------------------------------------------------------------
# Summaries of an accuracy matrix


def _row(matrix: Tensor, after: int | None) -> int:
    if not isinstance(matrix, Tensor) or matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
        raise ValueError(f"the accuracy matrix must be a square [T, T] tensor, got {shape}")
    t = matrix.shape[0]
    i = t - 1 if after is None else int(after)
    if not 0 <= i < t:
        raise ValueError(f"after must be a task index in [0, {t - 1}], got {after}")
    # the entries the summaries read, R[k, j] for j <= k <= i, must have been measured
    measured = matrix[: i + 1, : i + 1][torch.ones(i + 1, i + 1, dtype=torch.bool, device=matrix.device).tril()]
    if not bool(torch.isfinite(measured).all()):
        raise ValueError(
            f"the accuracy matrix has NaN or inf among its measured entries R[k, j], j <= k <= {i}: "
            f"{matrix.tolist()}; evaluate every seen task after each task (NaN belongs above the diagonal only)"
        )
    return i


def average_accuracy(matrix: Tensor, after: int | None = None) -> float:
    """Mean accuracy over the tasks seen after task ``i``: ``mean_{j <= i} R[i, j]`` (``i`` = ``after``, default last).

    Example:
        >>> nan = float("nan")
        >>> average_accuracy(torch.tensor([[0.9, nan], [0.5, 0.8]]), after=0)
        0.9
    """
    i = _row(matrix, after)
    return round(float(matrix[i, : i + 1].double().mean()), 6)


def final_average_accuracy(matrix: Tensor) -> float:
    """Mean accuracy over all tasks after the last task: ``mean_j R[T-1, j]``.

    Example:
        >>> final_average_accuracy(torch.tensor([[0.9, float("nan")], [0.5, 0.8]]))
        0.65
    """
    return average_accuracy(matrix)


def average_incremental_accuracy(matrix: Tensor, after: int | None = None) -> float:
    """Mean of :func:`average_accuracy` over the rows ``0..i`` (Rebuffi et al.'s average incremental accuracy).

    Example:
        >>> average_incremental_accuracy(torch.tensor([[0.9, float("nan")], [0.5, 0.8]]))
        0.775
    """
    i = _row(matrix, after)
    # the mean of the unrounded row means, rounded once (rounding each row first is off by up to 1e-6)
    return round(sum(float(matrix[k, : k + 1].double().mean()) for k in range(i + 1)) / (i + 1), 6)


def average_forgetting(matrix: Tensor, after: int | None = None) -> float:
    """Mean over the tasks ``j < i`` of ``max_{l < i} R[l, j] - R[i, j]`` (Chaudhry et al.; 0 when ``i = 0``).

    Example:
        >>> average_forgetting(torch.tensor([[0.9, float("nan")], [0.5, 0.8]]))
        0.4
    """
    i = _row(matrix, after)
    if i < 1:
        return 0.0
    best = matrix[:i, :i].nan_to_num(float("-inf")).amax(dim=0)
    return round(float((best.double() - matrix[i, :i].double()).mean()), 6)


def backward_transfer(matrix: Tensor, after: int | None = None) -> float:
    """Mean over the tasks ``j < i`` of ``R[i, j] - R[j, j]`` (Lopez-Paz & Ranzato's BWT; 0 when ``i = 0``).

    Negative values are forgetting measured against the accuracy just after learning each task.

    Example:
        >>> backward_transfer(torch.tensor([[0.9, float("nan")], [0.5, 0.8]]))
        -0.4
    """
    i = _row(matrix, after)
    if i < 1:
        return 0.0
    diagonal = torch.diagonal(matrix)[:i].double()
    return round(float((matrix[i, :i].double() - diagonal).mean()), 6)


def learning_accuracy(matrix: Tensor, after: int | None = None) -> float:
    """Mean accuracy on each task just after learning it: ``mean_{j <= i} R[j, j]`` (Riemer et al.'s LA).

    Example:
        >>> learning_accuracy(torch.tensor([[0.9, float("nan")], [0.5, 0.8]]))
        0.85
    """
    i = _row(matrix, after)
    return round(float(torch.diagonal(matrix)[: i + 1].double().mean()), 6)

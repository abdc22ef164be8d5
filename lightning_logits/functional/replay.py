"""Losses of online continual learning: cosine logits and the UER loss.

UER (unbiased experience replay) splits a bias-free linear head's logit
``z_c = <W_c, h> = ||W_c|| ||h|| cos(theta_c)`` in two: the incoming samples learn only from the
angle factor (cosine logits over a temperature), the replayed samples from the full dot product.
The norm factor, trained only by replay, then keeps remembering old classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_logits.functional._checks import check_target

__all__ = ["average_forgetting", "cosine_logits", "final_average_accuracy", "uer_loss"]


def _check_matrix(value: Tensor, name: str, shape_hint: str) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2:
        raise ValueError(f"{name} must have shape {shape_hint}, got shape {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {value.dtype}")
    if not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name} contain {bad} non-finite value(s) (NaN or inf); check the model's forward pass")


def _unit_rows(x: Tensor, eps: float) -> Tensor:
    """``x / (||x|| + eps)`` row-wise, with no gradient through rows that are exactly zero.

    A zero row has no direction: its value is 0 either way, but the formula's Jacobian there is
    ``I / eps`` (10^6 for the default eps), a gradient of arbitrary direction and huge size. The
    ``where`` keeps the value and cuts that gradient to 0. Any other row's Jacobian has norm at
    most ``1 / (||x|| + eps) < 1 / eps``.
    """
    norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    unit = x / (norm + eps)
    return torch.where(norm > 0, unit, torch.zeros_like(unit))


def cosine_logits(features: Tensor, weight: Tensor, eps: float = 1e-6) -> Tensor:
    """Cosine similarity of every feature row with every class weight row.

    ``out[n, c] = <h_n / (||h_n|| + eps), W_c / (||W_c|| + eps)>``, computed in float32 (or the
    inputs' dtype when wider) and returned in the dtype of ``features``.

    Args:
        features: ``[N, D]`` features entering the classifier head.
        weight: ``[C, D]`` weight of a linear head (``nn.Linear.weight``).
        eps: added to each norm; keeps the division finite.

    Returns:
        ``[N, C]`` values in ``[-1, 1]``.

    A zero feature row (or a zero weight row) gives cosine 0 against every class, and no
    gradient flows into that row through the normalization (see ``_unit_rows``): no NaN, no
    ``1/eps`` blow-up. Its class scores still train through the other factor.

    Example:
        >>> import torch
        >>> h = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
        >>> cosine_logits(h, w).round(decimals=4)
        tensor([[0.6000, 0.8000],
                [0.0000, 0.0000]])
    """
    _check_matrix(features, "features", "[N, D]")
    _check_matrix(weight, "weight", "[C, D]")
    if features.shape[1] != weight.shape[1]:
        raise ValueError(
            f"features have D={features.shape[1]} but the head weight expects D={weight.shape[1]} "
            f"(weight shape {tuple(weight.shape)}); pass the features that enter this head"
        )
    if not eps > 0 or not math.isfinite(eps):
        raise ValueError(f"eps must be a positive finite number, got {eps}")
    dtype = torch.promote_types(torch.promote_types(features.dtype, weight.dtype), torch.float32)
    out = _unit_rows(features.to(dtype), eps) @ _unit_rows(weight.to(dtype), eps).T
    return out.to(features.dtype)


def uer_loss(
    features: Tensor,
    target: Tensor,
    weight: Tensor,
    replay_features: Tensor | None = None,
    replay_target: Tensor | None = None,
    bias: Tensor | None = None,
    temperature: float = 0.09,
    logit_mask: Tensor | None = None,
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
    _check_matrix(features, "features", "[N, D] (incoming batch, feature dimension)")
    _check_matrix(weight, "weight", "[C, D] (classes, feature dimension)")
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
    if target.is_floating_point():
        raise TypeError(f"target must hold int class indices, got dtype {target.dtype}")
    check_target(target, features.shape[0], num_classes)
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (num_classes,)):
        shape = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
        raise ValueError(f"bias must have shape [C] = [{num_classes}], got {shape}")

    logits = cosine_logits(features, weight).float() / temperature
    if logit_mask is not None:
        if logit_mask.dtype != torch.bool or logit_mask.shape != (num_classes,):
            raise ValueError(
                f"logit_mask must be a bool tensor of shape [C] = [{num_classes}], got dtype "
                f"{logit_mask.dtype} and shape {tuple(logit_mask.shape)}"
            )
        outside = ~logit_mask[target]
        if bool(outside.any()):
            labels = sorted({int(v) for v in target[outside].tolist()})
            raise ValueError(
                f"incoming labels {labels} are excluded by logit_mask; the mask must keep every "
                "class present in the batch"
            )
        logits = logits.masked_fill(~logit_mask, float("-inf"))
    loss = F.cross_entropy(logits, target.long())

    if (replay_features is None) != (replay_target is None):
        raise ValueError("pass replay_features and replay_target together (or neither)")
    if replay_features is not None and replay_target is not None:
        _check_matrix(replay_features, "replay_features", "[M, D] (replayed batch, feature dimension)")
        if replay_features.shape[1] != dim:
            raise ValueError(f"replay_features have D={replay_features.shape[1]} but the head weight expects D={dim}")
        if replay_target.is_floating_point():
            raise TypeError(f"replay_target must hold int class indices, got dtype {replay_target.dtype}")
        check_target(replay_target, replay_features.shape[0], num_classes)
        if replay_features.shape[0] > 0:
            replay_logits = F.linear(replay_features.float(), weight.float(), None if bias is None else bias.float())
            loss = loss + F.cross_entropy(replay_logits, replay_target.long())
    return loss


def final_average_accuracy(matrix: Tensor) -> float:
    """Mean accuracy over all tasks after the last task: ``mean_j R[T-1, j]``.

    Example:
        >>> final_average_accuracy(torch.tensor([[0.9, float("nan")], [0.5, 0.8]]))
        0.65
    """
    return round(float(matrix[-1].double().mean()), 6)


def average_forgetting(matrix: Tensor) -> float:
    """Mean over the first ``T-1`` tasks of ``max_{l < T-1} R[l, j] - R[T-1, j]`` (0 when ``T = 1``).

    Example:
        >>> average_forgetting(torch.tensor([[0.9, float("nan")], [0.5, 0.8]]))
        0.4
    """
    t = matrix.shape[0]
    if t < 2:
        return 0.0
    best = matrix[: t - 1, : t - 1].nan_to_num(float("-inf")).amax(dim=0)
    return round(float((best.double() - matrix[t - 1, : t - 1].double()).mean()), 6)

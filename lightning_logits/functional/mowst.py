"""Mowst: a weak expert (MLP on node features) and a strong expert (a GNN) mixed by a learned confidence.

Shapes: ``N`` nodes, ``K`` classes. ``weak_logits`` and ``strong_logits`` are ``[N, K]``; the
confidence ``C`` is ``[N]`` in ``[0, 1]`` (the weight of the weak expert, ``sigmoid`` of the gate).

* :func:`mowst_dispersion` turns the weak expert's logits into the gate's input, ``[N, 2]``.
* :func:`mowst_loss` (Mowst) and :func:`mowst_star_loss` (Mowst*) are the two training losses.
* :func:`mowst_expected_accuracy`, :func:`mowst_route` and :func:`mowst_predict` are inference:
  the exact expectation of random routing, one seeded random routing, and a deterministic rule.

Reference: Zeng et al., "Mixture of Weak and Strong Experts on Graphs" (ICLR 2024).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_logits.functional._checks import (
    check_logits,
    check_same_shape,
    check_target,
    hard_target,
    result_in_dtype,
)

__all__ = [
    "check_node_mask",
    "mowst_dispersion",
    "mowst_expected_accuracy",
    "mowst_loss",
    "mowst_predict",
    "mowst_route",
    "mowst_star_loss",
]


def _check_confidence(confidence: Tensor, num_nodes: int, check_range: bool = True) -> Tensor:
    """Validate ``confidence`` (``[N]`` or ``[N, 1]``) and return it as ``[N]``."""
    if not isinstance(confidence, Tensor):
        raise TypeError(f"confidence must be a torch.Tensor, got {type(confidence).__name__}")
    if confidence.ndim == 2 and confidence.shape[1] == 1:
        confidence = confidence[:, 0]
    if confidence.ndim != 1 or confidence.shape[0] != num_nodes:
        raise ValueError(
            f"confidence must have shape [N] = [{num_nodes}] (one weight per node), got {tuple(confidence.shape)}"
        )
    if not confidence.is_floating_point():
        raise TypeError(f"confidence must be a floating point tensor, got dtype {confidence.dtype}")
    if check_range and confidence.numel():
        low, high = float(confidence.detach().min()), float(confidence.detach().max())
        if not (low >= 0.0 and high <= 1.0):  # also catches NaN
            raise ValueError(f"confidence must lie in [0, 1], got values in [{low}, {high}]; pass sigmoid(gate output)")
    return confidence


def check_node_mask(mask: Tensor, num_nodes: int, name: str = "mask", allow_empty: bool = True) -> Tensor:
    """Check a node selection and return it as a boolean mask ``[N]``.

    Accepted: a boolean mask ``[N]``, or an int64 index tensor ``[M]`` with values in ``[0, N)``
    (turned into the boolean mask). Refused, with the fix in the message: a 0/1 integer tensor of
    length ``N`` (it would index nodes 0 and 1 over and over: pass ``mask.bool()``), a boolean
    mask of another length, other dtypes, out-of-range indices, and (``allow_empty=False``) a
    selection of no node. Reads the values on the host: call it where a sync is acceptable.

    Example:
        >>> import torch
        >>> check_node_mask(torch.tensor([2, 0]), 4)
        tensor([ True, False,  True, False])
        >>> try:
        ...     check_node_mask(torch.tensor([1, 0, 0, 1]), 4)
        ... except ValueError as err:
        ...     print(str(err)[-16:])
        pass mask.bool()
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (bool [N] or int64 indices), got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        if mask.shape != (num_nodes,):
            raise ValueError(f"{name} is a boolean mask of shape {tuple(mask.shape)}; it must be [N] = [{num_nodes}]")
        selected = mask
    elif mask.dtype == torch.int64:
        if mask.ndim != 1:
            raise ValueError(f"{name} as node indices must be 1-D, got shape {tuple(mask.shape)}")
        if mask.numel() == num_nodes and num_nodes > 0 and bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{name} is an integer tensor of 0/1 values with one entry per node ({num_nodes}): it looks like "
                f"a boolean mask stored as integers, which would index nodes 0 and 1 instead of selecting nodes; "
                f"pass {name}.bool()"
            )
        if mask.numel() and (int(mask.min()) < 0 or int(mask.max()) >= num_nodes):
            raise ValueError(
                f"{name} holds node indices in [{int(mask.min())}, {int(mask.max())}], outside [0, {num_nodes}): "
                "pass indices of existing nodes or a boolean mask [N]"
            )
        selected = torch.zeros(num_nodes, dtype=torch.bool, device=mask.device)
        selected[mask] = True
    else:
        raise TypeError(
            f"{name} must be a boolean mask [N] or an int64 index tensor, got dtype {mask.dtype}: "
            f"use {name}.bool() for a 0/1 mask or {name}.long() for indices"
        )
    if not allow_empty and not bool(selected.any()):
        raise ValueError(f"{name} selects no node (of {num_nodes}): the split is empty; give it at least one node")
    return selected


def _check_pair(weak_logits: Tensor, strong_logits: Tensor) -> None:
    check_logits(weak_logits, "weak_logits")
    check_logits(strong_logits, "strong_logits")
    check_same_shape(weak_logits, strong_logits, "weak_logits", "strong_logits")


@torch.no_grad()
def mowst_dispersion(weak_logits: Tensor) -> Tensor:
    r"""The two dispersion statistics of the weak expert's prediction, the gate's input.

    With :math:`p = \mathrm{softmax}(z)` over :math:`K` classes,

    .. math::
        D = \Big[\frac{\mathrm{Var}(p)}{\mathrm{Var}(e_1)},\; 1 - \frac{H(p)}{\log K}\Big],
        \qquad \mathrm{Var}(e_1) = \frac{K - 1}{K^2},

    where Var is the population variance over the K entries, :math:`e_1` a one-hot vector and
    :math:`H(p) = -\sum_k p_k \log p_k` (with :math:`0 \log 0 = 0`). Both columns are 0 for a
    uniform prediction and 1 for a one-hot one. Computed without gradient, in float32.

    Args:
        weak_logits: ``[N, K]`` logits of the weak expert, ``K >= 2``.

    Returns:
        ``[N, 2]`` float32 tensor in ``[0, 1]``: variance column, then negative-entropy column.

    Example:
        >>> import torch
        >>> mowst_dispersion(torch.tensor([[0.0, 0.0], [100.0, 0.0]]))
        tensor([[0., 0.],
                [1., 1.]])
    """
    check_logits(weak_logits, "weak_logits")
    num_classes = weak_logits.shape[1]
    logp = F.log_softmax(weak_logits.detach().float(), dim=1)
    p = logp.exp()
    variance = p.var(dim=1, unbiased=False) / ((num_classes - 1) / num_classes**2)
    entropy = -(p * logp).sum(dim=1)  # p * logp -> 0 where p underflows: logp stays finite for finite logits
    negentropy = 1.0 - entropy / math.log(num_classes)
    return torch.stack([variance, negentropy], dim=1).clamp_(0.0, 1.0)


def _per_node_ce(logits: Tensor, target: Tensor) -> Tensor:
    target = target.float() if target.is_floating_point() else target.long()
    return F.cross_entropy(logits.float(), target, reduction="none")


def mowst_loss(
    weak_logits: Tensor, strong_logits: Tensor, target: Tensor, confidence: Tensor, validate_args: bool = True
) -> Tensor:
    r"""The Mowst loss: each node's confidence-weighted pair of expert cross-entropies.

    .. math:: L = \frac{1}{N} \sum_v C_v\, \mathrm{CE}(z^{weak}_v, y_v) + (1 - C_v)\, \mathrm{CE}(z^{strong}_v, y_v)

    Args:
        weak_logits: ``[N, K]`` logits of the weak expert (MLP).
        strong_logits: ``[N, K]`` logits of the strong expert (GNN).
        target: int ``[N]`` class indices, or float ``[N, K]`` class probabilities.
        confidence: ``[N]`` (or ``[N, 1]``) weight of the weak expert, in ``[0, 1]``. Gradients
            flow into it: the loss is linear in ``C``, so the gate is pushed towards whichever
            expert has the lower loss on a node.
        validate_args: check the labels' range and that ``C`` lies in ``[0, 1]`` (reads values on the
            host); :class:`~lightning_logits.modules.mowst.Mowst` passes True on its first step only.
            Shapes and dtypes are always checked.

    Returns:
        Scalar mean over the ``N`` given nodes, computed in float32, in the dtype of ``weak_logits``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> round(mowst_loss(z, -z, torch.tensor([0]), torch.tensor([0.25])).item(), 4)
        1.6269
    """
    _check_pair(weak_logits, strong_logits)
    check_target(target, weak_logits.shape[0], weak_logits.shape[1], validate_args=validate_args)
    c = _check_confidence(confidence, weak_logits.shape[0], check_range=validate_args).float()
    per_node = c * _per_node_ce(weak_logits, target) + (1.0 - c) * _per_node_ce(strong_logits, target)
    return result_in_dtype(per_node.mean(), weak_logits.dtype, validate_args, "weak_logits")


def mowst_star_loss(
    weak_logits: Tensor, strong_logits: Tensor, target: Tensor, confidence: Tensor, validate_args: bool = True
) -> Tensor:
    r"""The Mowst* loss: cross-entropy of the confidence-mixed logits.

    .. math:: L = \frac{1}{N} \sum_v \mathrm{CE}\big(C_v z^{weak}_v + (1 - C_v) z^{strong}_v,\; y_v\big)

    Args:
        weak_logits: ``[N, K]`` logits of the weak expert.
        strong_logits: ``[N, K]`` logits of the strong expert.
        target: int ``[N]`` class indices, or float ``[N, K]`` class probabilities.
        confidence: ``[N]`` (or ``[N, 1]``) weight of the weak expert, in ``[0, 1]``.
        validate_args: check the labels' range and that ``C`` lies in ``[0, 1]`` (reads values on the
            host); :class:`~lightning_logits.modules.mowst.Mowst` passes True on its first step only.
            Shapes and dtypes are always checked.

    Returns:
        Scalar mean over the ``N`` nodes, computed in float32, in the dtype of ``weak_logits``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> round(mowst_star_loss(z, -z, torch.tensor([0]), torch.tensor([0.75])).item(), 4)
        0.3133
    """
    _check_pair(weak_logits, strong_logits)
    check_target(target, weak_logits.shape[0], weak_logits.shape[1], validate_args=validate_args)
    c = _check_confidence(confidence, weak_logits.shape[0], check_range=validate_args).float()[:, None]
    mixed = c * weak_logits.float() + (1.0 - c) * strong_logits.float()
    return result_in_dtype(_per_node_ce(mixed, target).mean(), weak_logits.dtype, validate_args, "weak_logits")


@torch.no_grad()
def mowst_expected_accuracy(weak_logits: Tensor, strong_logits: Tensor, target: Tensor, confidence: Tensor) -> Tensor:
    r"""Exact expected accuracy of random routing (node ``v`` goes to the weak expert with probability ``C_v``).

    .. math:: \mathrm{acc} = \frac{1}{N} \sum_v C_v\, 1[\hat y^{weak}_v = y_v] + (1 - C_v)\, 1[\hat y^{strong}_v = y_v]

    This is the limit of averaging :func:`mowst_route`'s accuracy over many draws (the official
    code averages 50 draws). Soft targets are compared by their argmax.

    Args:
        weak_logits: ``[N, K]``. strong_logits: ``[N, K]``.
        target: int ``[N]`` or float ``[N, K]``. confidence: ``[N]`` in ``[0, 1]``.

    Returns:
        Scalar float32 tensor in ``[0, 1]`` (``nan`` for ``N = 0``).

    Example:
        >>> import torch
        >>> weak = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> mowst_expected_accuracy(weak, -weak, torch.tensor([0, 1]), torch.tensor([0.9, 0.2]))
        tensor(0.8500)
    """
    _check_pair(weak_logits, strong_logits)
    check_target(target, weak_logits.shape[0], weak_logits.shape[1])
    c = _check_confidence(confidence, weak_logits.shape[0]).float()
    y = hard_target(target)
    weak_right = (weak_logits.argmax(dim=1) == y).float()
    strong_right = (strong_logits.argmax(dim=1) == y).float()
    return (c * weak_right + (1.0 - c) * strong_right).mean()


@torch.no_grad()
def mowst_route(
    weak_logits: Tensor, strong_logits: Tensor, confidence: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """One random routing: node ``v`` takes the weak expert's class when ``u_v < C_v``, ``u_v ~ U[0, 1)``.

    Args:
        weak_logits: ``[N, K]``. strong_logits: ``[N, K]``. confidence: ``[N]`` in ``[0, 1]``.
        generator: a :class:`torch.Generator` on the logits' device for a reproducible draw
            (``None``: the global RNG).

    Returns:
        ``(pred, to_weak)``: int64 ``[N]`` predicted classes and bool ``[N]``, True where the node
        was routed to the weak expert (``to_weak.float().mean()`` is the weak expert's share).

    Example:
        >>> import torch
        >>> weak = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
        >>> g = torch.Generator().manual_seed(0)
        >>> mowst_route(weak, -weak, torch.tensor([1.0, 0.0]), generator=g)
        (tensor([0, 1]), tensor([ True, False]))
    """
    _check_pair(weak_logits, strong_logits)
    c = _check_confidence(confidence, weak_logits.shape[0]).float()
    u = torch.rand(c.shape, generator=generator, device=c.device)
    to_weak = u < c
    pred = torch.where(to_weak, weak_logits.argmax(dim=1), strong_logits.argmax(dim=1))
    return pred, to_weak


@torch.no_grad()
def mowst_predict(weak_logits: Tensor, strong_logits: Tensor, confidence: Tensor, variant: str = "mowst") -> Tensor:
    r"""Deterministic prediction.

    ``variant="mowst"``: the weak expert's class where ``C >= 0.5``, else the strong expert's
    (the most likely outcome of :func:`mowst_route`). ``variant="mowst_star"``:
    :math:`\arg\max_k\, C\, p^{weak} + (1 - C)\, p^{strong}` with one softmax per expert.

    Args:
        weak_logits: ``[N, K]``. strong_logits: ``[N, K]``. confidence: ``[N]`` in ``[0, 1]``.
        variant: ``"mowst"`` (default) or ``"mowst_star"``.

    Returns:
        int64 ``[N]`` predicted classes.

    Example:
        >>> import torch
        >>> weak = torch.tensor([[3.0, 0.0], [3.0, 0.0]])
        >>> mowst_predict(weak, -weak, torch.tensor([0.6, 0.4]))
        tensor([0, 1])
        >>> mowst_predict(weak, -weak, torch.tensor([0.6, 0.4]), variant="mowst_star")
        tensor([0, 1])
    """
    _check_pair(weak_logits, strong_logits)
    c = _check_confidence(confidence, weak_logits.shape[0]).float()
    if variant == "mowst":
        return torch.where(c >= 0.5, weak_logits.argmax(dim=1), strong_logits.argmax(dim=1))
    if variant == "mowst_star":
        mixed = c[:, None] * weak_logits.float().softmax(dim=1) + (1.0 - c[:, None]) * strong_logits.float().softmax(1)
        return mixed.argmax(dim=1)
    raise ValueError(f"variant must be 'mowst' or 'mowst_star', got {variant!r}")

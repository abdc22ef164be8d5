"""The two operations of LAWN (logit attenuating weight normalization), as pure functions.

LAWN holds the Frobenius norm of each constrained weight ``W`` at a fixed value ``c`` once its free
phase is over. Each optimizer step it

1. projects the gradient onto the tangent space of the sphere ``{W : ||W||_F = c}`` at ``W``,

   .. math:: g \\leftarrow g - \\frac{\\langle g, W \\rangle}{\\langle W, W \\rangle} W,

   so that the step does not try to grow (or shrink) the weight, and
2. after the step, rescales the weight back onto the sphere, :math:`W \\leftarrow c\\, W / \\|W\\|_F`.
   For adaptive optimizers (Adam) the step is not along the projected gradient, so this rescale is
   what actually holds the constraint.

Inner products and norms are over all entries of the tensor (Frobenius), one number per tensor,
computed in at least float32 so that half-precision weights do not lose the constraint.

The callback :class:`lightning_logits.callbacks.lawn.LAWN` applies these to a LightningModule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["frobenius_norm", "project_to_tangent", "project_to_tangent_", "rescale_to_norm", "rescale_to_norm_"]


def _accumulate_dtype(tensor: Tensor) -> torch.dtype:
    # Sums of squares of fp16/bf16 tensors overflow or lose precision: accumulate in float32 at least.
    return torch.promote_types(tensor.dtype, torch.float32)


def _check_pair(grad: Tensor, weight: Tensor) -> None:
    if not isinstance(grad, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"grad and weight must be tensors, got {type(grad).__name__} and {type(weight).__name__}")
    if grad.shape != weight.shape:
        raise ValueError(
            f"grad has shape {tuple(grad.shape)} but weight has shape {tuple(weight.shape)}: pass the "
            "gradient of this very weight (param.grad for param)"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")


def _check_norm(norm: float | Tensor) -> None:
    if isinstance(norm, Tensor) and norm.numel() != 1:
        raise ValueError(f"norm must be one number, got a tensor of shape {tuple(norm.shape)}")
    value = float(norm)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"norm must be a finite number >= 0, got {value}")


def frobenius_norm(weight: Tensor) -> Tensor:
    """Frobenius norm of ``weight`` (any shape): ``sqrt(sum(weight**2))``, a 0-d tensor.

    Accumulated in at least float32; the result has that dtype.

    Example:
        >>> import torch
        >>> frobenius_norm(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        tensor(5.)
    """
    return torch.linalg.vector_norm(weight, dtype=_accumulate_dtype(weight))


def project_to_tangent(grad: Tensor, weight: Tensor, eps: float = 0.0) -> Tensor:
    """Remove from ``grad`` its component along ``weight``: ``g - <g, W> / <W, W> * W``.

    The result is orthogonal to ``weight`` (Frobenius inner product over all entries), so a small
    step along it leaves ``||W||_F`` unchanged to first order. A zero weight has no tangent space
    to speak of: the gradient is returned unchanged.

    Args:
        grad: gradient of ``weight``, same shape (any shape: ``[out, in]``, ``[out, in, k, k]``...).
        weight: the constrained weight.
        eps: added to ``<W, W>`` in the denominator (default ``0``: exact projection).

    Returns:
        A new tensor of ``grad``'s shape and dtype; the inputs are not modified.

    Example:
        >>> import torch
        >>> w = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
        >>> project_to_tangent(torch.tensor([[2.0, 3.0], [4.0, 5.0]]), w)
        tensor([[0., 3.],
                [4., 5.]])
    """
    _check_pair(grad, weight)
    dtype = _accumulate_dtype(weight)
    w = weight.detach().to(dtype)
    g = grad.to(dtype)
    w_dot_w = torch.dot(w.flatten(), w.flatten()) + eps
    # Branch-free (no host sync on accelerators): a zero weight gets coefficient 0.
    nonzero = w_dot_w > 0
    coefficient = torch.where(nonzero, torch.dot(g.flatten(), w.flatten()) / torch.where(nonzero, w_dot_w, 1.0), 0.0)
    return (g - coefficient * w).to(grad.dtype)


@torch.no_grad()
def project_to_tangent_(grads: Sequence[Tensor], weights: Sequence[Tensor], eps: float = 0.0) -> None:
    """In-place :func:`project_to_tangent` of each ``grads[i]`` against ``weights[i]``.

    What the LAWN callback calls on ``param.grad`` before each constrained optimizer step.

    Example:
        >>> import torch
        >>> w, g = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0])
        >>> project_to_tangent_([g], [w])
        >>> g, bool(torch.dot(g, w).abs() < 1e-6)
        (tensor([ 0.1600, -0.1200]), True)
    """
    if len(grads) != len(weights):
        raise ValueError(f"got {len(grads)} gradients for {len(weights)} weights: pass one gradient per weight")
    for grad, weight in zip(grads, weights, strict=True):
        grad.copy_(project_to_tangent(grad, weight, eps))


def rescale_to_norm(weight: Tensor, norm: float | Tensor) -> Tensor:
    """``weight`` scaled to Frobenius norm ``norm``: ``norm * W / ||W||_F``.

    A zero weight cannot be rescaled (it has no direction) and is returned as is.

    Args:
        weight: any-shaped floating-point tensor.
        norm: the target norm, a number ``>= 0`` (or a one-element tensor).

    Returns:
        A new tensor of ``weight``'s shape and dtype.

    Example:
        >>> import torch
        >>> rescale_to_norm(torch.tensor([[3.0, 0.0], [0.0, 4.0]]), 10.0)
        tensor([[6., 0.],
                [0., 8.]])
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {type(weight).__name__}")
    _check_norm(norm)
    current = frobenius_norm(weight.detach())
    target = torch.as_tensor(norm, dtype=current.dtype, device=weight.device)
    # Branch-free (no host sync on accelerators): a zero weight keeps scale 1.
    nonzero = current > 0
    scale = torch.where(nonzero, target / torch.where(nonzero, current, 1.0), 1.0)
    return (weight.to(current.dtype) * scale).to(weight.dtype)


@torch.no_grad()
def rescale_to_norm_(weights: Sequence[Tensor], norms: Sequence[float | Tensor]) -> None:
    """In-place :func:`rescale_to_norm` of each ``weights[i]`` to ``norms[i]``.

    What the LAWN callback calls on the constrained parameters after each optimizer step.

    Example:
        >>> import torch
        >>> w = torch.tensor([3.0, 4.0])
        >>> rescale_to_norm_([w], [1.0])
        >>> w
        tensor([0.6000, 0.8000])
    """
    if len(weights) != len(norms):
        raise ValueError(f"got {len(weights)} weights for {len(norms)} norms: pass one target norm per weight")
    for weight, norm in zip(weights, norms, strict=True):
        weight.copy_(rescale_to_norm(weight, norm))

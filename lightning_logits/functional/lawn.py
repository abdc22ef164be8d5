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

**Sharded weights.** A weight sharded with FSDP2 (a ``DTensor``, e.g. under Lightning's
``ModelParallelStrategy``) holds only a slice per rank. The functions that work on several tensors
(:func:`frobenius_norms`, :func:`project_to_tangent_`, :func:`rescale_to_norm_`) then sum the
squares and inner products of the local shards and reduce those sums over the mesh dimensions the
weight is sharded on (a ``Partial`` DTensor made whole: one all-reduce per call, on the device,
with no host synchronization), so every rank uses the norm of the whole tensor and updates its own
shard in place.

The callback :class:`lightning_logits.callbacks.lawn.LAWN` applies these to a LightningModule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "frobenius_norm",
    "frobenius_norms",
    "project_to_tangent",
    "project_to_tangent_",
    "rescale_to_norm",
    "rescale_to_norm_",
]


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
    if _is_dtensor(weight) and _reduction(grad) != _reduction(weight):
        raise ValueError(
            "grad and weight are sharded differently (or only one is a DTensor): pass the gradient of this very "
            "weight (param.grad for an FSDP2 param)"
        )


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0 (added to <W, W>), got {eps!r}")


def _check_finite(tensor: Tensor, name: str) -> None:
    """Reads values on the host: only the out-of-place functions (direct calls) do this, and only with validate_args."""
    if not bool(torch.isfinite(_local(tensor)).all()):
        raise ValueError(f"{name} contains NaN or inf; check the model's forward and backward pass")


def _check_norm(norm: float | Tensor) -> None:
    if isinstance(norm, Tensor) and norm.numel() != 1:
        raise ValueError(f"norm must be one number, got a tensor of shape {tuple(norm.shape)}")
    value = float(norm)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"norm must be a finite number >= 0, got {value}")


def frobenius_norm(weight: Tensor, validate_args: bool = True) -> Tensor:
    """Frobenius norm of ``weight`` (any shape): ``sqrt(sum(weight**2))``, a 0-d tensor.

    Accumulated in at least float32; the result has that dtype.

    Args:
        weight: any-shaped floating-point tensor.
        validate_args: check that ``weight`` is finite (reads values on the host).

    Example:
        >>> import torch
        >>> frobenius_norm(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))
        tensor(5.)
    """
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight!r:.80}")
    if validate_args:
        _check_finite(weight, "weight")
    return torch.linalg.vector_norm(weight, dtype=_accumulate_dtype(weight))


def project_to_tangent(grad: Tensor, weight: Tensor, eps: float = 0.0, validate_args: bool = True) -> Tensor:
    """Remove from ``grad`` its component along ``weight``: ``g - <g, W> / <W, W> * W``.

    The result is orthogonal to ``weight`` (Frobenius inner product over all entries), so a small
    step along it leaves ``||W||_F`` unchanged to first order. A zero weight has no tangent space
    to speak of: the gradient is returned unchanged.

    Args:
        grad: gradient of ``weight``, same shape (any shape: ``[out, in]``, ``[out, in, k, k]``...).
        weight: the constrained weight.
        eps: added to ``<W, W>`` in the denominator, ``>= 0`` (default ``0``: exact projection).
        validate_args: check that both tensors are finite (reads values on the host); the fused
            :func:`project_to_tangent_` of the training step does not.

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
    _check_eps(eps)
    if validate_args:
        _check_finite(grad, "grad")
        _check_finite(weight, "weight")
    dtype = _accumulate_dtype(weight)
    w = weight.detach().to(dtype)
    g = grad.to(dtype)
    w_dot_w = torch.dot(w.flatten(), w.flatten()) + eps
    # Branch-free (no host sync on accelerators): a zero weight gets coefficient 0.
    nonzero = w_dot_w > 0
    coefficient = torch.where(nonzero, torch.dot(g.flatten(), w.flatten()) / torch.where(nonzero, w_dot_w, 1.0), 0.0)
    return (g - coefficient * w).to(grad.dtype)


def _is_dtensor(tensor: Tensor) -> bool:
    return hasattr(tensor, "device_mesh") and hasattr(tensor, "to_local")


def _reduction(tensor: Tensor) -> Any:
    """What a per-tensor sum over ``tensor``'s entries must be reduced over: ``None`` for a plain tensor,
    else the DTensor's mesh and, per mesh dimension, whether the tensor is sharded along it."""
    if not _is_dtensor(tensor):
        return None
    placements = tuple(p.is_shard() for p in tensor.placements)  # type: ignore[attr-defined]
    if any(p.is_partial() for p in tensor.placements):  # type: ignore[attr-defined]
        raise ValueError("a weight with a Partial placement (pending reduction) has no norm yet: redistribute it first")
    return (tensor.device_mesh, placements)  # type: ignore[attr-defined]


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def _groups(tensors: Sequence[Tensor]) -> dict[Any, list[int]]:
    # foreach kernels and stacked per-tensor numbers need one device, and sharded tensors one way to
    # reduce their sums: group the indices by (device, reduction).
    groups: dict[Any, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, _reduction(tensor)), []).append(index)
    return groups


def _sum_over_shards(values: Tensor, reduction: Any) -> Tensor:
    """Sum per-shard partial sums ``values`` over the mesh dimensions the tensors are sharded on."""
    if reduction is None or not any(reduction[1]):
        return values
    from torch.distributed.tensor import DTensor, Partial, Replicate

    mesh, sharded = reduction
    placements = [Partial("sum") if is_shard else Replicate() for is_shard in sharded]
    partial = DTensor.from_local(values, device_mesh=mesh, placements=placements, run_check=False)
    return partial.full_tensor()


def _working_copies(tensors: list[Tensor]) -> tuple[list[Tensor], bool]:
    # fp16/bf16 tensors are worked on as float32 copies (written back afterwards); float32/64 in place.
    if all(t.dtype in (torch.float32, torch.float64) for t in tensors):
        return tensors, False
    return [t.to(_accumulate_dtype(t)) for t in tensors], True


def frobenius_norms(weights: Sequence[Tensor]) -> Tensor:
    """Frobenius norms of several tensors at once (one fused ``torch._foreach_norm``): a ``[k]`` tensor.

    Accumulated in at least float32. All tensors must be on one device.

    Example:
        >>> import torch
        >>> frobenius_norms([torch.tensor([3.0, 4.0]), torch.ones(2, 2)])
        tensor([5., 2.])
    """
    tensors = [w.detach() for w in weights]
    if not tensors:
        return torch.zeros(0)
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if not any(_is_dtensor(t) for t in tensors):
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))
    # Sharded: the squares of the local shards' norms, summed over the shards, per group.
    groups = _groups(tensors)
    out: list[Tensor | None] = [None] * len(tensors)
    for (_, reduction), indices in groups.items():
        local = [_local(tensors[i]) for i in indices]
        squares = torch.stack(torch._foreach_norm(local, 2, dtype=dtype)).square()
        norms = _sum_over_shards(squares, reduction).sqrt()
        for i, norm in zip(indices, norms.unbind(), strict=True):
            out[i] = norm
    if len({n.device for n in out if n is not None}) > 1:
        raise ValueError("frobenius_norms needs all weights on one device")
    return torch.stack([n for n in out if n is not None])


@torch.no_grad()
def project_to_tangent_(grads: Sequence[Tensor], weights: Sequence[Tensor], eps: float = 0.0) -> None:
    """In-place :func:`project_to_tangent` of each ``grads[i]`` against ``weights[i]``, fused.

    What the LAWN callback calls on ``param.grad`` before each constrained optimizer step. The
    norms are one ``torch._foreach_norm``, the inner products one ``torch.dot`` each, and the
    update one ``torch._foreach_addcmul_`` per device, with no host-device
    synchronization, so constraining every layer of a network stays cheap. For the same reason
    nothing reads the values: a NaN or inf in a gradient or weight spreads over that tensor's
    projection (and only that tensor's), where the optimizer step and Lightning's checks see it.

    Example:
        >>> import torch
        >>> w, g = torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0])
        >>> project_to_tangent_([g], [w])
        >>> g, bool(torch.dot(g, w).abs() < 1e-6)
        (tensor([ 0.1600, -0.1200]), True)
    """
    if len(grads) != len(weights):
        raise ValueError(f"got {len(grads)} gradients for {len(weights)} weights: pass one gradient per weight")
    _check_eps(eps)
    for grad, weight in zip(grads, weights, strict=True):
        _check_pair(grad, weight)
    for (_, reduction), indices in _groups(weights).items():
        local_grads = [_local(grads[i]) for i in indices]
        g_list, copied_g = _working_copies(local_grads)
        w_list, _ = _working_copies([_local(weights[i].detach()) for i in indices])
        if any(g.dtype != w.dtype for g, w in zip(g_list, w_list, strict=True)):
            g_list, copied_g = [g.to(w.dtype) for g, w in zip(g_list, w_list, strict=True)], True
        dots = [torch.dot(w.reshape(-1), w.reshape(-1)) for w in w_list]
        dots += [torch.dot(g.reshape(-1), w.reshape(-1)) for g, w in zip(g_list, w_list, strict=True)]
        # One reduction over the shards for both inner products (a no-op for plain tensors).
        w_dot_w, g_dot_w = _sum_over_shards(torch.stack(dots), reduction).chunk(2)
        w_dot_w = w_dot_w + eps
        # Branch-free (no host sync on accelerators): a zero weight gets coefficient 0.
        nonzero = w_dot_w > 0
        coefficient = torch.where(nonzero, g_dot_w / torch.where(nonzero, w_dot_w, 1.0), 0.0)
        # g -= c * W without a temporary the size of the weights.
        torch._foreach_addcmul_(g_list, w_list, list(coefficient.unbind()), value=-1)
        if copied_g:
            for local, g in zip(local_grads, g_list, strict=True):
                local.copy_(g)


def rescale_to_norm(weight: Tensor, norm: float | Tensor, validate_args: bool = True) -> Tensor:
    """``weight`` scaled to Frobenius norm ``norm``: ``norm * W / ||W||_F``.

    A zero weight cannot be rescaled (it has no direction) and is returned as is.

    Args:
        weight: any-shaped floating-point tensor.
        norm: the target norm, a number ``>= 0`` (or a one-element tensor).
        validate_args: check that ``weight`` is finite (reads values on the host).

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
    if validate_args:
        _check_finite(weight, "weight")
    current = frobenius_norm(weight.detach(), validate_args=False)
    target = torch.as_tensor(norm, dtype=current.dtype, device=weight.device)
    # Branch-free (no host sync on accelerators): a zero weight keeps scale 1.
    nonzero = current > 0
    scale = torch.where(nonzero, target / torch.where(nonzero, current, 1.0), 1.0)
    return (weight.to(current.dtype) * scale).to(weight.dtype)


@torch.no_grad()
def rescale_to_norm_(weights: Sequence[Tensor], norms: Sequence[float | Tensor] | Tensor) -> None:
    """In-place :func:`rescale_to_norm` of each ``weights[i]`` to ``norms[i]``, fused.

    What the LAWN callback calls on the constrained parameters after each optimizer step: one
    ``torch._foreach_norm`` and one ``torch._foreach_mul_`` per device. ``norms`` may be a ``[k]``
    tensor on the weights' device (what the callback passes: no host-device copy per step).
    Values are not read (no host sync): a weight holding NaN or inf comes out with NaN entries.

    Example:
        >>> import torch
        >>> w = torch.tensor([3.0, 4.0])
        >>> rescale_to_norm_([w], [1.0])
        >>> w
        tensor([0.6000, 0.8000])
    """
    if len(weights) != len(norms):
        raise ValueError(f"got {len(weights)} weights for {len(norms)} norms: pass one target norm per weight")
    for weight in weights:
        if not isinstance(weight, Tensor) or not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {type(weight).__name__}")
    if not isinstance(norms, Tensor):
        for norm in norms:
            _check_norm(norm)
    for (device, reduction), indices in _groups(weights).items():
        local_weights = [_local(weights[i]) for i in indices]
        w_list, copied = _working_copies(local_weights)
        if reduction is None:
            current = frobenius_norms(w_list)
        else:
            dtype = torch.float64 if any(w.dtype == torch.float64 for w in w_list) else torch.float32
            squares = torch.stack(torch._foreach_norm(w_list, 2, dtype=dtype)).square()
            current = _sum_over_shards(squares, reduction).sqrt()
        if isinstance(norms, Tensor):
            target = norms.to(device=device, dtype=current.dtype)
            if len(indices) != len(weights):
                target = target[torch.tensor(indices, device=device)]
        else:
            target = torch.stack([torch.as_tensor(norms[i], dtype=current.dtype, device=device) for i in indices])
        # Branch-free (no host sync on accelerators): a zero weight keeps scale 1.
        nonzero = current > 0
        scale = torch.where(nonzero, target / torch.where(nonzero, current, 1.0), 1.0)
        torch._foreach_mul_(w_list, list(scale.unbind()))
        if copied:
            for local, w in zip(local_weights, w_list, strict=True):
                local.copy_(w)

r"""A distillation loss fused with the language-model head: the full ``[N, V]`` logits never exist.

A language model's last layer maps hidden states ``h: [N, H]`` to logits ``z = h W^T + b`` over a
vocabulary of ``V`` tokens. With ``N = 4096`` tokens and ``V = 32000`` the float32 logits take
500 MiB, and their gradient as much again; cross-entropy and a distillation term on top add
float32 temporaries of the same size. :func:`fused_distillation_loss` takes ``h`` and the head's
weight instead of the logits and works through the tokens ``chunk_size`` rows at a time: for each
chunk it computes the chunk's logits, both losses, the gradient of the loss with respect to the
chunk's logits (in closed form), and from it the chunk's share of the gradients with respect to
``h``, ``W`` and ``b``, before moving on. Only one chunk's ``[chunk_size, V]`` temporaries exist at
a time; the gradients are computed during the forward pass and handed to autograd in the
backward pass (the idea of Liger Kernel's fused linear cross-entropy, written here in plain
PyTorch for any device).

**The loss.** With ``z_n = W h_n + b``, teacher logits ``t_n`` and temperature ``T``:

.. math::
    L = \frac{1}{M} \sum_{n \in \mathcal{V}} \Big[ w_{ce}\, \mathrm{CE}(z_n, y_n)
        + w_{kd}\, D\big(\mathrm{softmax}(t_n / T),\ \mathrm{softmax}(z_n / T)\big) \Big]

where :math:`\mathcal{V}` is the set of tokens whose target is not ``ignore_index`` and ``M``
their number: **both terms are means over the same valid tokens**, exactly as
``F.cross_entropy(z, y, ignore_index=-100)`` plus :func:`~lightning_logits.functional.kd_loss`
with ``target=y`` (which also averages over the tokens whose target is not ``ignore_index``, also
in chunks). The cross-entropy is at temperature 1. ``loss`` picks ``D``, with the names and the
scaling of the distillation registry (``TeacherDistillation(loss=...)``), with
:math:`p_s = \mathrm{softmax}(z / T)`, :math:`p_t = \mathrm{softmax}(t / T)`:

- ``"kd"`` (default): :math:`T^2\,\mathrm{KL}(p_t \| p_s)`, Hinton's KD, what ``kd_loss`` computes;
- ``"forward_kl"``: :math:`\mathrm{KL}(p_t \| p_s)` without the :math:`T^2` factor (as TRL's GKD
  and DistiLLM define the token divergences; equal to ``"kd"`` at ``T = 1``);
- ``"reverse_kl"``: :math:`\mathrm{KL}(p_s \| p_t)` (mode-seeking, as MiniLLM), no :math:`T^2`;
- ``"jsd"``: the generalized Jensen-Shannon divergence of GKD with ``beta``:
  :math:`\beta\,\mathrm{KL}(p_t \| m) + (1 - \beta)\,\mathrm{KL}(p_s \| m)` with
  :math:`m = \beta p_t + (1 - \beta) p_s` (TRL's ``GKDTrainer.generalized_jsd_loss`` convention,
  ``beta = 0`` is forward KL and ``beta = 1`` reverse KL), no :math:`T^2`.

With no valid token the loss is 0 (where ``F.cross_entropy`` gives NaN).

**Teacher.** Either full logits ``teacher_logits: [N, V]`` (any float dtype; read one chunk at a
time) or the top-k form a :class:`~lightning_logits.teacher_cache.TeacherLogitCache` stores:
``teacher_topk=(values [N, k], indices [N, k], rest [N])``. A top-k chunk is rebuilt on the fly
exactly as :func:`~lightning_logits.teacher_cache.reconstruct_logits` does (every other column
gets ``rest - log(V - k)``), so the result equals the unfused loss on the rebuilt logits.

**Precision.** Every chunk's loss arithmetic is float32 (float64 inputs stay float64). The chunk's
logits and the ``h`` gradient are matrix products in the inputs' dtype, as ``F.linear`` and its
backward would do; for half-precision inputs the ``W`` (and ``b``) gradient is accumulated over
the chunks in float32 and cast once at the end.

**Memory.** Beyond the gradients of ``h``, ``W`` and ``b`` (which autograd would allocate anyway)
the loss allocates, once per call, two float32 buffers of ``[chunk_size, V]`` for cross-entropy
alone and three with a teacher (the chunk's logits, the teacher's logits, one scratch buffer),
and reuses them for every chunk; every other temporary is per token or smaller. The default
``chunk_size`` makes one such buffer about as large as ``h`` in float32 (``ceil(N * H / V)``
rows, at least 64). ``benchmarks/memory_fused.py`` measures it.

**Backward once.** The gradients are scaled by the incoming gradient in place, so a graph built by
this loss can be backpropagated once (``retain_graph=True`` and a second backward raise
autograd's "modified by an inplace operation" error).

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> h = torch.randn(6, 4, requires_grad=True)
    >>> head = torch.nn.Linear(4, 10)
    >>> y = torch.tensor([1, 2, -100, 3, 4, 5])
    >>> teacher = torch.randn(6, 10)
    >>> loss = fused_distillation_loss(h, head.weight, y, teacher, bias=head.bias, chunk_size=4)
    >>> loss.backward()
    >>> from lightning_logits.functional import kd_loss
    >>> z = torch.nn.functional.linear(h, head.weight, head.bias)
    >>> plain = torch.nn.functional.cross_entropy(z, y) + kd_loss(z, teacher, temperature=1.0, target=y)
    >>> torch.allclose(loss, plain)
    True
"""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple, overload

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_logits.functional._checks import result_in_dtype

__all__ = [
    "FusedLossName",
    "FusedLossTerms",
    "default_chunk_size",
    "fused_distillation_loss",
    "fused_linear_cross_entropy",
]

FusedLossName = Literal["kd", "forward_kl", "reverse_kl", "jsd"]
"""The distillation terms :func:`fused_distillation_loss` computes (its ``loss`` argument).

The names are those of the distillation registry: ``"kd"`` is ``T^2``-scaled, the others are
the divergences themselves.

Example:
    >>> from typing import get_args
    >>> get_args(FusedLossName)
    ('kd', 'forward_kl', 'reverse_kl', 'jsd')
"""

_LOSSES = ("kd", "forward_kl", "reverse_kl", "jsd")
_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class FusedLossTerms(NamedTuple):
    """What :func:`fused_distillation_loss` returns with ``return_terms=True``.

    Attributes:
        loss: the differentiable total ``ce_weight * ce + kd_weight * kd``.
        ce: the cross-entropy mean over valid tokens (detached, for logging).
        kd: the distillation term's mean over valid tokens (``T^2``-scaled for ``"kd"``; detached).

    Example:
        >>> import torch
        >>> h, w = torch.zeros(2, 3), torch.zeros(4, 3)  # uniform student over V = 4
        >>> terms = fused_distillation_loss(h, w, torch.tensor([0, 1]), torch.zeros(2, 4), return_terms=True)
        >>> round(terms.ce.item(), 4), terms.kd.item()  # log 4, and the uniform teacher agrees
        (1.3863, 0.0)
    """

    loss: Tensor
    ce: Tensor
    kd: Tensor


def default_chunk_size(num_tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk so that one ``[chunk, V]`` buffer is about the size of ``h: [N, H]``.

    ``ceil(N * H / V)``, at least 64 and at most ``N``: then the loss's temporaries grow with the
    inputs, not with ``N * V``. The floor keeps each chunk's matrix products efficient: every
    chunk reads the whole ``[V, H]`` weight, and with a small hidden size ``N * H / V`` is a handful
    of rows (9 at N=1024, H=256, V=32000, where 9-row chunks made the loss 2.8x slower than
    64-row ones on one CPU thread).

    Example:
        >>> default_chunk_size(4096, 512, 32000), default_chunk_size(1024, 256, 32000)
        (66, 64)
        >>> default_chunk_size(10, 64, 50000)  # never more than N
        10
    """
    for value, name in ((num_tokens, "num_tokens"), (hidden, "hidden"), (vocab, "vocab")):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "vocab" else 0):
            need = ">= 1" if name == "vocab" else ">= 0"
            raise ValueError(f"{name} must be an int {need}, got {value!r}")
    return max(1, min(num_tokens, max(64, math.ceil(num_tokens * hidden / vocab))))


# --------------------------------------------------------------------------- checks
def _check_weight(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_inputs(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    target: Tensor,
    teacher_logits: Tensor | None,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None,
) -> None:
    for tensor, name in ((hidden, "hidden"), (weight, "weight")):
        if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating point torch.Tensor, got {tensor!r:.80}")
    if hidden.ndim < 1 or weight.ndim != 2:
        raise ValueError(
            f"hidden must be [..., H] and weight [V, H] (the LM head's weight, as nn.Linear stores it), got "
            f"hidden {list(hidden.shape)} and weight {list(weight.shape)}"
        )
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden has H={hidden.shape[-1]} features but weight is {list(weight.shape)} = [V, H]; pass the head's "
            "weight as nn.Linear stores it (out_features x in_features), not its transpose"
        )
    if weight.shape[0] < 2:
        raise ValueError(f"weight must have at least 2 rows (a vocabulary of V >= 2 tokens), got V={weight.shape[0]}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden is {hidden.dtype} but weight is {weight.dtype}: cast both to one dtype")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must be a [V] = [{weight.shape[0]}] tensor or None, got {bias!r:.80}")
    if not isinstance(target, Tensor) or target.dtype not in _INT_DTYPES:
        raise TypeError(f"target must be an integer tensor of token ids [...], got {target!r:.80}")
    if target.shape != hidden.shape[:-1]:
        raise ValueError(
            f"target must have hidden's leading shape {list(hidden.shape[:-1])} (one token id per position), "
            f"got {list(target.shape)}"
        )
    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("pass either teacher_logits or teacher_topk, not both")
    vocab = weight.shape[0]
    if teacher_logits is not None:
        if not isinstance(teacher_logits, Tensor) or not teacher_logits.is_floating_point():
            raise TypeError(f"teacher_logits must be a floating point tensor, got {teacher_logits!r:.80}")
        expected = (*hidden.shape[:-1], vocab)
        if teacher_logits.shape != expected:
            raise ValueError(
                f"teacher_logits must be [..., V] = {list(expected)} (the student's positions and vocabulary), "
                f"got {list(teacher_logits.shape)}"
            )
    if teacher_topk is not None:
        if not (isinstance(teacher_topk, tuple | list) and len(teacher_topk) == 3):
            raise TypeError("teacher_topk must be a tuple (values [..., k], indices [..., k], rest [...])")
        values, indices, rest = teacher_topk
        lead = tuple(hidden.shape[:-1])
        if values.ndim != len(lead) + 1 or tuple(values.shape[:-1]) != lead or indices.shape != values.shape:
            raise ValueError(
                f"teacher_topk values and indices must both be [..., k] with leading shape {list(lead)}, got "
                f"{list(values.shape)} and {list(indices.shape)}"
            )
        if tuple(rest.shape) != lead:
            raise ValueError(f"teacher_topk rest must have shape {list(lead)}, got {list(rest.shape)}")
        if values.shape[-1] > vocab:
            raise ValueError(f"teacher_topk holds k={values.shape[-1]} logits per token but V={vocab}")
        if not values.is_floating_point() or not rest.is_floating_point() or indices.dtype not in _INT_DTYPES:
            raise TypeError(
                f"teacher_topk must hold float values, integer indices and float rest, got {values.dtype}, "
                f"{indices.dtype} and {rest.dtype}"
            )


# --------------------------------------------------------------------------- the chunk loop
_COLUMN_BLOCK = 2048  # vocabulary columns per block where a row sum would otherwise need a [c, V] temporary


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(1)`` of two ``[c, V]`` tensors without a ``[c, V]`` temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_j exp(log_p) (log_p - log_q)`` per row, over column blocks (temporaries ``[c, block]``)."""
    out = log_p.new_zeros(log_p.shape[0])
    for start in range(0, log_p.shape[1], _COLUMN_BLOCK):
        a = log_p[:, start : start + _COLUMN_BLOCK]
        out += (a.exp() * (a - log_q[:, start : start + _COLUMN_BLOCK])).sum(1)
    return out


class _Options(NamedTuple):
    loss: str
    beta: float
    temperature: float
    ce_weight: float
    kd_weight: float
    chunk_size: int


def _logsumexp(x: Tensor, scratch: Tensor) -> Tensor:
    """Row-wise log-sum-exp of ``x: [c, V]`` with ``scratch`` (same shape) as its only temporary."""
    top = x.amax(dim=1, keepdim=True)
    total = torch.sub(x, top, out=scratch).exp_().sum(dim=1)
    return total.log_().add_(top.squeeze(1))


def _fill_teacher(
    out: Tensor,
    teacher_logits: Tensor | None,
    topk: tuple[Tensor, Tensor, Tensor] | None,
    start: int,
    end: int,
    drop: Tensor,
) -> None:
    """Write the chunk's teacher logits into ``out: [c, V]`` (working dtype), ignored rows zeroed."""
    if teacher_logits is not None:
        out.copy_(teacher_logits[start:end])
    else:
        assert topk is not None
        values, indices, rest = topk
        vocab, k = out.shape[1], values.shape[1]
        if k < vocab:  # every column not in the top k gets rest - log(V - k), as reconstruct_logits
            out.copy_((rest[start:end].float() - math.log(vocab - k)).unsqueeze(1).expand_as(out))
        # through float32 as reconstruct_logits, so float16 values round the same way
        out.scatter_(1, indices[start:end].long(), values[start:end].float().to(out.dtype))
    out.masked_fill_(drop, 0.0)


def _chunk_loss_and_grad(
    z: Tensor, labels: Tensor, teacher: Tensor | None, scratch: Tensor, opts: _Options
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row CE and distillation term of one chunk, and the gradient of the weighted sum w.r.t. ``z``.

    ``z`` holds the chunk's logits and ``teacher`` its teacher logits (``[c, V]``, working dtype);
    both and ``scratch`` are overwritten, and the returned gradient ``ce_weight * dCE/dz +
    kd_weight * dD/dz`` per row (not yet scaled by the row weights) lives in one of them.
    These three buffers are the only ``[c, V]`` tensors used (two without a teacher).
    """
    temperature, ce_weight = opts.temperature, opts.ce_weight
    column = labels.unsqueeze(1)
    lse = _logsumexp(z, scratch)
    ce_rows = lse - z.gather(1, column).squeeze(1)
    if teacher is None:  # cross-entropy only: softmax(z) - onehot(y)
        grad = z.sub_(lse.unsqueeze(1)).exp_().mul_(ce_weight)
        return ce_rows, torch.zeros_like(ce_rows), grad.scatter_add_(1, column, grad.new_full(column.shape, -ce_weight))
    if temperature != 1.0:
        z.div_(temperature)
        lse_s = _logsumexp(z, scratch)
    else:
        lse_s = lse
    log_ps = z.sub_(lse_s.unsqueeze(1))  # log softmax(z / T), in z's buffer
    log_pt = teacher
    if temperature != 1.0:
        log_pt.div_(temperature)
    log_pt.sub_(_logsumexp(log_pt, scratch).unsqueeze(1))
    # CE's softmax(z) = exp(T log_ps + T lse_s - lse) needs a buffer of its own only when T != 1
    # (at T = 1 it is p_s, and its term is folded into p_s's coefficient).
    separate_ce = ce_weight != 0.0 and temperature != 1.0
    fold = ce_weight if temperature == 1.0 else 0.0
    shift = (temperature * lse_s - lse).unsqueeze(1)
    p_ce: Tensor | None = None
    # "kd" is T^2 times the forward KL; the divergence's gradient w.r.t. z is 1/T times its gradient
    # w.r.t. s = z / T
    factor = temperature**2 if opts.loss == "kd" else 1.0
    scale = opts.kd_weight * factor / temperature
    divergence = opts.loss
    if divergence == "kd" or (divergence == "jsd" and opts.beta == 0.0):
        divergence = "forward_kl"
    elif divergence == "jsd" and opts.beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        # KL(p_t || p_s) = sum p_t (log p_t - log p_s); dD/ds = p_s - p_t
        log_ratio = torch.sub(log_pt, log_ps, out=scratch)
        pt = log_pt.exp_()
        kd_rows = _rowdot(pt, log_ratio)
        if separate_ce:
            p_ce = torch.mul(log_ps, temperature, out=scratch).add_(shift).exp_()
        grad = log_ps.exp_().mul_(scale + fold).sub_(pt, alpha=scale)
    elif divergence == "reverse_kl":
        # KL(p_s || p_t) = sum p_s d with d = log p_s - log p_t; dD/ds = p_s (d - KL)
        if separate_ce:
            p_ce = torch.mul(log_ps, temperature, out=scratch).add_(shift).exp_()
        d = log_pt.neg_().add_(log_ps)
        ps = log_ps.exp_()
        kd_rows = _rowdot(ps, d)
        grad = d.sub_(kd_rows.unsqueeze(1)).mul_(ps).mul_(scale)
        if fold:
            grad.add_(ps, alpha=fold)
    else:
        # m = beta p_t + (1 - beta) p_s, D = beta KL(p_t || m) + (1 - beta) KL(p_s || m);
        # dD/ds = (1 - beta) p_s (r - sum p_s r) with r = log p_s - log m
        beta = opts.beta
        log_m = torch.add(log_ps, math.log1p(-beta), out=scratch)
        log_pt.add_(math.log(beta))  # log(beta p_t)
        torch.logaddexp(log_m, log_pt, out=log_m)
        # sum beta p_t (log(beta p_t) - log m) = beta KL(p_t || m) + beta log(beta)
        teacher_part = _kl_rows(log_pt, log_m) - beta * math.log(beta)
        r = log_m.neg_().add_(log_ps)
        if separate_ce:  # the teacher's buffer is free now
            p_ce = torch.mul(log_ps, temperature, out=log_pt).add_(shift).exp_()
        ps = log_ps.exp_()
        student_part = _rowdot(ps, r)
        kd_rows = teacher_part + (1.0 - beta) * student_part
        grad = r.sub_(student_part.unsqueeze(1)).mul_(ps).mul_((1.0 - beta) * scale)
        if fold:
            grad.add_(ps, alpha=fold)
    if p_ce is not None:
        grad.add_(p_ce, alpha=ce_weight)
    if ce_weight != 0.0:
        grad.scatter_add_(1, column, grad.new_full(column.shape, -ce_weight))
    return ce_rows, kd_rows * factor, grad


class _FusedLinearLoss(torch.autograd.Function):
    """The chunk loop: the loss in the forward pass, its gradients computed there and returned in backward."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        valid: Tensor,
        teacher_logits: Tensor | None,
        topk_values: Tensor | None,
        topk_indices: Tensor | None,
        topk_rest: Tensor | None,
        opts: _Options,
    ) -> tuple[Tensor, Tensor, Tensor]:
        num, vocab = hidden.shape[0], weight.shape[0]
        work = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        need_h, need_w = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])
        need_b = bias is not None and bool(ctx.needs_input_grad[2])
        topk = None
        if topk_values is not None:
            assert topk_indices is not None and topk_rest is not None
            topk = (topk_values, topk_indices, topk_rest)
        count = valid.sum().clamp_min(1).to(work)
        row_weight = valid.to(work) / count  # no host sync: the count stays a tensor
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=work, device=weight.device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=work, device=weight.device) if need_b else None
        ce_total = torch.zeros((), dtype=work, device=hidden.device)
        kd_total = torch.zeros((), dtype=work, device=hidden.device)
        # the only [chunk, V] tensors: the logits, the teacher's logits and one scratch buffer, reused by every chunk
        rows = min(opts.chunk_size, num)
        z_buffer = torch.empty(rows, vocab, dtype=work, device=hidden.device)
        scratch_buffer = torch.empty_like(z_buffer)
        has_teacher = teacher_logits is not None or topk is not None
        t_buffer = torch.empty_like(z_buffer) if has_teacher else None
        for start in range(0, num, opts.chunk_size):
            end = min(start + opts.chunk_size, num)
            drop = ~valid[start:end].unsqueeze(1)
            h_chunk = hidden[start:end].masked_fill(drop, 0.0)  # ignored rows reach nothing, NaN or not
            z = z_buffer[: end - start]
            if hidden.dtype == work:
                if bias is None:
                    torch.mm(h_chunk, weight.t(), out=z)
                else:
                    torch.addmm(bias, h_chunk, weight.t(), out=z)
            else:  # half precision: the logits as F.linear gives them, then float32
                z.copy_(torch.nn.functional.linear(h_chunk, weight, bias))
            teacher = None
            if t_buffer is not None:
                teacher = t_buffer[: end - start]
                _fill_teacher(teacher, teacher_logits, topk, start, end, drop)
            ce_rows, kd_rows, grad = _chunk_loss_and_grad(
                z, labels[start:end], teacher, scratch_buffer[: end - start], opts
            )
            weights = row_weight[start:end]
            ce_total += torch.dot(ce_rows, weights)
            kd_total += torch.dot(kd_rows, weights)
            if need_h or need_w or need_b:
                grad.mul_(weights.unsqueeze(1))
                if grad_h is not None:
                    torch.mm(grad.to(hidden.dtype), weight, out=grad_h[start:end])
                if grad_w is not None:
                    grad_w.addmm_(grad.t(), h_chunk.to(work))
                if grad_b is not None:
                    grad_b += grad.sum(0)
        del z_buffer, scratch_buffer, t_buffer
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            assert bias is not None
            grad_b = grad_b.to(bias.dtype)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        loss = opts.ce_weight * ce_total + opts.kd_weight * kd_total
        ctx.mark_non_differentiable(ce_total, kd_total)
        return loss, ce_total, kd_total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # in place: these buffers are the gradients (a second backward trips autograd's version check)
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in (grad_h, grad_w, grad_b)]
        return (*grads, None, None, None, None, None, None, None)


# --------------------------------------------------------------------------- public functions
def _fused(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    teacher_logits: Tensor | None,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None,
    bias: Tensor | None,
    loss: str,
    beta: float,
    temperature: float,
    ce_weight: float,
    kd_weight: float,
    ignore_index: int,
    chunk_size: int | None,
    validate_args: bool,
) -> FusedLossTerms:
    _check_inputs(hidden, weight, bias, target, teacher_logits, teacher_topk)
    if loss not in _LOSSES:
        raise ValueError(
            f"loss must be one of {list(_LOSSES)}, got {loss!r} (the other registered losses need the full "
            "logits: use them with chunk_size instead)"
        )
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    _check_weight(temperature, "temperature")
    ce_weight, kd_weight = _check_weight(ce_weight, "ce_weight"), _check_weight(kd_weight, "kd_weight")
    if loss == "jsd" and (isinstance(beta, bool) or not isinstance(beta, int | float) or not 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must lie in [0, 1] for loss='jsd' (0: forward KL, 1: reverse KL), got {beta!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size!r}")
    num_hidden, vocab = weight.shape[1], weight.shape[0]
    flat_h = hidden.reshape(-1, num_hidden)
    num = flat_h.shape[0]
    labels = target.reshape(-1).to(hidden.device, torch.int64)
    valid = labels != ignore_index
    if validate_args:
        selected = labels[valid]
        if selected.numel() and (int(selected.min()) < 0 or int(selected.max()) >= vocab):
            raise ValueError(
                f"target holds token ids in [{int(selected.min())}, {int(selected.max())}] but the head has "
                f"V={vocab} outputs; ids must lie in [0, {vocab - 1}] (or equal ignore_index={ignore_index})"
            )
        if not bool(torch.isfinite(flat_h[valid]).all()) or not bool(torch.isfinite(weight).all()):
            raise ValueError("hidden (at valid positions) or weight contain NaN or inf; check the model's forward pass")
    labels = labels.masked_fill(~valid, 0)
    flat_t = None if teacher_logits is None else teacher_logits.detach().reshape(-1, vocab)
    topk: tuple[Tensor | None, Tensor | None, Tensor | None] = (None, None, None)
    if teacher_topk is not None:
        values, indices, rest = teacher_topk
        k = values.shape[-1]
        topk = (
            values.detach().reshape(-1, k),
            indices.detach().reshape(-1, k),
            rest.detach().reshape(-1),
        )
    if validate_args and teacher_topk is not None:
        values, indices, rest = (t for t in topk if t is not None)
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
            raise ValueError(
                f"teacher_topk indices lie in [{int(indices.min())}, {int(indices.max())}] but the head has V={vocab} "
                f"outputs; they must lie in [0, {vocab - 1}] (was the cache built for another vocabulary?)"
            )
        # rest is -inf when k = V (nothing outside the top k); with k < V it fills columns and must be finite
        rest_ok = torch.isfinite(rest) if values.shape[1] < vocab else ~torch.isnan(rest) & (rest != math.inf)
        if not bool((torch.isfinite(values).all(dim=1) & rest_ok | ~valid).all()):
            raise ValueError(
                "teacher_topk values or rest contain NaN or inf at a valid position (rest may be -inf only when "
                "k = V); check the cache or the teacher's forward pass"
            )
    if validate_args and flat_t is not None:
        step = max(1, 2**22 // vocab)  # the check reads the teacher in pieces, never a [N, V] mask
        for start in range(0, num, step):
            finite = torch.isfinite(flat_t[start : start + step]).all(dim=1) | ~valid[start : start + step]
            if not bool(finite.all()):
                raise ValueError(
                    "teacher_logits contain NaN or inf at a valid position; check the teacher's forward pass"
                )
    chunk = default_chunk_size(num, num_hidden, vocab) if chunk_size is None else min(chunk_size, max(num, 1))
    opts = _Options(loss, float(beta), float(temperature), ce_weight, kd_weight, chunk)
    total, ce, kd = _FusedLinearLoss.apply(flat_h, weight, bias, labels, valid, flat_t, *topk, opts)
    return FusedLossTerms(result_in_dtype(total, hidden.dtype, validate_args, "hidden"), ce, kd)


@overload
def fused_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    teacher_logits: Tensor | None = ...,
    *,
    bias: Tensor | None = ...,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None = ...,
    loss: FusedLossName = ...,
    beta: float = ...,
    temperature: float = ...,
    ce_weight: float = ...,
    kd_weight: float = ...,
    ignore_index: int = ...,
    chunk_size: int | None = ...,
    validate_args: bool = ...,
    return_terms: Literal[False] = ...,
) -> Tensor: ...


@overload
def fused_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    teacher_logits: Tensor | None = ...,
    *,
    bias: Tensor | None = ...,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None = ...,
    loss: FusedLossName = ...,
    beta: float = ...,
    temperature: float = ...,
    ce_weight: float = ...,
    kd_weight: float = ...,
    ignore_index: int = ...,
    chunk_size: int | None = ...,
    validate_args: bool = ...,
    return_terms: Literal[True],
) -> FusedLossTerms: ...


def fused_distillation_loss(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    teacher_logits: Tensor | None = None,
    *,
    bias: Tensor | None = None,
    teacher_topk: tuple[Tensor, Tensor, Tensor] | None = None,
    loss: FusedLossName = "kd",
    beta: float = 0.5,
    temperature: float = 1.0,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    validate_args: bool = True,
    return_terms: bool = False,
) -> Tensor | FusedLossTerms:
    r"""Cross-entropy plus distillation from the LM head's input, chunk by chunk (see the module docstring).

    Equals ``ce_weight * F.cross_entropy(z, y, ignore_index=...) + kd_weight * D`` with
    ``z = F.linear(hidden, weight, bias)`` and ``D`` the distillation term ``loss`` averaged over
    the same valid tokens (for ``"kd"`` exactly :func:`~lightning_logits.functional.kd_loss`
    ``(z, teacher_logits, temperature, target=y)``; the others are the registry's token losses of
    the same names), in value and in the gradients of ``hidden``, ``weight`` and ``bias``, without ever holding
    ``z`` for all tokens.

    Args:
        hidden: ``[..., H]`` the student's last hidden states (what enters the LM head), e.g.
            ``[B, T, H]`` already shifted to line up with ``target``.
        weight: ``[V, H]`` the LM head's weight (``nn.Linear(H, V).weight``, or the tied embedding).
        target: int ``[...]`` next-token ids; positions equal to ``ignore_index`` count in neither term.
        teacher_logits: ``[..., V]`` teacher logits (any float dtype, detached here).
        bias: optional ``[V]`` head bias.
        teacher_topk: instead of ``teacher_logits``, ``(values [..., k], indices [..., k],
            rest [...])`` as the teacher cache stores them; rebuilt chunk by chunk like
            :func:`~lightning_logits.teacher_cache.reconstruct_logits`.
        loss: ``"kd"`` (default, ``T^2``-scaled forward KL), ``"forward_kl"``, ``"reverse_kl"`` or
            ``"jsd"`` (see the module docstring).
        beta: the JSD's interpolation in ``[0, 1]`` (default 0.5; only for ``"jsd"``).
        temperature: softmax temperature ``T > 0`` of the distillation term (default 1.0, the
            usual choice for language models); the cross-entropy is always at ``T = 1``.
        ce_weight: weight of the cross-entropy (default 1.0; 0 for distillation alone).
        kd_weight: weight of the distillation term (default 1.0).
        ignore_index: target value of positions to skip (default -100).
        chunk_size: tokens per chunk (default :func:`default_chunk_size`).
        validate_args: check token ids and finiteness of the inputs (reads values on the host;
            pass ``False`` in a training loop after the first step).
        return_terms: return :class:`FusedLossTerms` ``(loss, ce, kd)`` instead of the loss alone.

    Returns:
        The scalar loss in ``hidden``'s dtype (computed in float32), 0 when no token is valid;
        or :class:`FusedLossTerms` with ``return_terms=True``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> h = torch.randn(2, 5, 8, generator=g, requires_grad=True)  # [B, T, H]
        >>> w = torch.randn(50, 8, generator=g, requires_grad=True)   # [V, H]
        >>> y = torch.randint(0, 50, (2, 5), generator=g)
        >>> t = torch.randn(2, 5, 50, generator=g)
        >>> terms = fused_distillation_loss(h, w, y, t, temperature=2.0, kd_weight=0.5, return_terms=True)
        >>> bool(torch.isclose(terms.loss, terms.ce + 0.5 * terms.kd))
        True
        >>> terms.loss.backward()
        >>> h.grad.shape, w.grad.shape
        (torch.Size([2, 5, 8]), torch.Size([50, 8]))
    """
    if teacher_logits is None and teacher_topk is None:
        raise ValueError(
            "fused_distillation_loss needs teacher_logits or teacher_topk; for cross-entropy alone use "
            "fused_linear_cross_entropy"
        )
    terms = _fused(
        hidden,
        weight,
        target,
        teacher_logits,
        teacher_topk,
        bias,
        loss,
        beta,
        temperature,
        ce_weight,
        kd_weight,
        ignore_index,
        chunk_size,
        validate_args,
    )
    return terms if return_terms else terms.loss


def fused_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    validate_args: bool = True,
) -> Tensor:
    """``F.cross_entropy(F.linear(hidden, weight, bias), target)`` without the full logits.

    The same chunk loop as :func:`fused_distillation_loss` with no teacher: the mean over tokens
    whose target is not ``ignore_index`` (0 when there are none, where ``F.cross_entropy`` gives NaN).

    Args:
        hidden: ``[..., H]`` hidden states entering the head.
        weight: ``[V, H]`` head weight.
        target: int ``[...]`` token ids.
        bias: as in :func:`fused_distillation_loss`.
        ignore_index: as in :func:`fused_distillation_loss`.
        chunk_size: as in :func:`fused_distillation_loss`.
        validate_args: as in :func:`fused_distillation_loss`.

    Returns:
        The scalar loss in ``hidden``'s dtype.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> h, w = torch.randn(7, 4, generator=g), torch.randn(30, 4, generator=g)
        >>> y = torch.randint(0, 30, (7,), generator=g)
        >>> plain = torch.nn.functional.cross_entropy(h @ w.T, y)
        >>> bool(torch.isclose(fused_linear_cross_entropy(h, w, y, chunk_size=3), plain))
        True
    """
    return _fused(
        hidden,
        weight,
        target,
        None,
        None,
        bias,
        "kd",
        0.5,
        1.0,
        1.0,
        0.0,
        ignore_index,
        chunk_size,
        validate_args,
    ).loss

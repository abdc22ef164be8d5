"""The fused head + distillation loss against the unfused loss on the full logits.

The references build ``z = F.linear(h, W, b)`` in full and let autograd differentiate:
forward KL is today's ``F.cross_entropy + kd_loss``; reverse KL and the generalized JSD are
written here from their definitions (the JSD's mixture in probability space, not in log space
as the implementation), in float64. The fused loss computes its gradients in closed form
during the forward pass, so agreement of the gradients checks those formulas.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lightning_logits.functional import (
    FusedLossTerms,
    default_chunk_size,
    fused_distillation_loss,
    fused_linear_cross_entropy,
    kd_loss,
)
from lightning_logits.teacher_cache import reconstruct_logits
from tests.sync_counter import HostReadCounter


def _inputs(
    n: int, hidden: int, vocab: int, *, seed: int = 0, dtype: torch.dtype = torch.float32, ignore: float = 0.2
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(vocab, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden) * 3).to(dtype)
    b = torch.randn(vocab, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore] = -100
    t = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3).to(dtype)
    return h, w, b, y, t


def _leaves(*tensors: Tensor) -> list[Tensor]:
    return [x.detach().clone().requires_grad_(True) for x in tensors]


def _divergence_rows(z: Tensor, t: Tensor, loss: str, temperature: float, beta: float) -> Tensor:
    """Per-row distillation term in float64, from the definitions ("kd" times T^2, the others not)."""
    log_ps = F.log_softmax(z.double() / temperature, dim=-1)
    log_pt = F.log_softmax(t.double() / temperature, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if loss in ("kd", "forward_kl"):
        rows = (pt * (log_pt - log_ps)).sum(-1)
    elif loss == "reverse_kl":
        rows = (ps * (log_ps - log_pt)).sum(-1)
    else:
        m = beta * pt + (1 - beta) * ps
        rows = beta * (pt * (log_pt - m.log())).sum(-1) + (1 - beta) * (ps * (log_ps - m.log())).sum(-1)
    return rows * temperature**2 if loss == "kd" else rows


def _reference(
    h: Tensor,
    w: Tensor,
    b: Tensor | None,
    y: Tensor,
    t: Tensor,
    *,
    loss: str = "kd",
    temperature: float = 1.0,
    beta: float = 0.5,
    ce_weight: float = 1.0,
    kd_weight: float = 1.0,
) -> Tensor:
    """The unfused loss: full logits, then the losses, differentiated by autograd."""
    z = F.linear(h, w, b)
    valid = y != -100
    if loss == "kd":
        kd = kd_loss(z, t, temperature, target=y)  # today's loss
    else:
        kd = (_divergence_rows(z, t, loss, temperature, beta) * valid).sum() / valid.sum().clamp_min(1)
    ce = F.cross_entropy(z, y, ignore_index=-100)
    return ce_weight * ce + kd_weight * kd


def _grads(loss: Tensor, leaves: list[Tensor]) -> list[Tensor]:
    return list(torch.autograd.grad(loss, leaves))


def _close(a: Tensor, b: Tensor, rtol: float, atol: float) -> None:
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- values and gradients
@pytest.mark.parametrize(
    ("n", "hidden", "vocab", "chunk"),
    [
        (13, 8, 40, 4),
        (13, 8, 40, 1),
        (13, 8, 40, 13),
        (13, 8, 40, 100),
        (64, 16, 300, 10),
        (7, 5, 2, 3),
        (33, 8, 40, None),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.5])
def test_forward_kl_and_ce_equal_linear_plus_todays_losses(
    n: int, hidden: int, vocab: int, chunk: int | None, temperature: float
) -> None:
    h, w, b, y, t = _inputs(n, hidden, vocab)
    leaves = _leaves(h, w, b)
    fused = fused_distillation_loss(
        leaves[0], leaves[1], y, t, bias=leaves[2], temperature=temperature, kd_weight=0.7, chunk_size=chunk
    )
    ref_leaves = _leaves(h, w, b)
    ref = _reference(*ref_leaves, y, t, temperature=temperature, kd_weight=0.7)
    _close(fused, ref, 1e-5, 1e-6)
    for got, want in zip(_grads(fused, leaves), _grads(ref, ref_leaves), strict=True):
        _close(got, want, 1e-4, 1e-6)


@pytest.mark.parametrize("divergence", ["kd", "forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize(("ce_weight", "kd_weight"), [(1.0, 1.0), (0.0, 1.0), (0.3, 2.0)])
def test_each_divergence_equals_its_definition_in_float64(
    divergence: str, temperature: float, ce_weight: float, kd_weight: float
) -> None:
    h, w, b, y, t = _inputs(29, 6, 50, seed=1, dtype=torch.float64)
    beta = 0.3
    leaves = _leaves(h, w, b)
    fused = fused_distillation_loss(
        *leaves[:2],
        y,
        t,
        bias=leaves[2],
        loss=divergence,  # type: ignore[arg-type]
        beta=beta,
        temperature=temperature,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
        chunk_size=8,
    )
    ref_leaves = _leaves(h, w, b)
    ref = _reference(
        *ref_leaves,
        y,
        t,
        loss=divergence,
        temperature=temperature,
        beta=beta,
        ce_weight=ce_weight,
        kd_weight=kd_weight,
    )
    assert fused.dtype == torch.float64
    _close(fused, ref, 1e-10, 1e-12)
    for got, want in zip(_grads(fused, leaves), _grads(ref, ref_leaves), strict=True):
        _close(got, want, 1e-9, 1e-12)


def test_jsd_hand_value_on_one_row() -> None:
    # one token, V = 2, W = I, no bias: z = h; p_s = softmax([0, 0]) = [1/2, 1/2],
    # p_t = softmax([log 3, 0]) = [3/4, 1/4]
    h, w, y = torch.zeros(1, 2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), torch.tensor([0])
    t = torch.tensor([[math.log(3.0), 0.0]], dtype=torch.float64)
    beta = 0.5  # m = [5/8, 3/8]
    expected = 0.5 * (0.75 * math.log(0.75 / 0.625) + 0.25 * math.log(0.25 / 0.375)) + 0.5 * (
        0.5 * math.log(0.5 / 0.625) + 0.5 * math.log(0.5 / 0.375)
    )
    got = fused_distillation_loss(h, w, y, t, loss="jsd", beta=beta, ce_weight=0.0)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    reverse = fused_distillation_loss(h, w, y, t, loss="reverse_kl", ce_weight=0.0)
    assert reverse.item() == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-12)
    ce_only = fused_distillation_loss(h, w, y, t, kd_weight=0.0)
    assert ce_only.item() == pytest.approx(math.log(2.0), rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 40),
    hidden=st.integers(1, 9),
    vocab=st.integers(2, 70),
    chunk=st.integers(1, 45),
    temperature=st.sampled_from([0.7, 1.0, 4.0]),
    divergence=st.sampled_from(["kd", "forward_kl", "reverse_kl", "jsd"]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_and_chunk_size_matches_the_reference(
    n: int, hidden: int, vocab: int, chunk: int, temperature: float, divergence: str, seed: int
) -> None:
    h, w, b, y, t = _inputs(n, hidden, vocab, seed=seed, dtype=torch.float64, ignore=0.3)
    leaves, ref_leaves = _leaves(h, w, b), _leaves(h, w, b)
    kwargs = dict(loss=divergence, temperature=temperature)
    fused = fused_distillation_loss(*leaves[:2], y, t, bias=leaves[2], chunk_size=chunk, **kwargs)  # type: ignore[arg-type]
    ref = _reference(*ref_leaves, y, t, **kwargs)  # type: ignore[arg-type]
    if not bool((y != -100).any()):
        ref = ref.nan_to_num(0.0)  # F.cross_entropy gives NaN with no valid token; the fused loss gives 0
    _close(fused, ref, 1e-9, 1e-12)
    for got, want in zip(_grads(fused, leaves), _grads(ref, ref_leaves), strict=True):
        _close(got, want.nan_to_num(0.0), 1e-8, 1e-12)


@pytest.mark.parametrize(("beta", "same_as"), [(0.0, "forward_kl"), (1.0, "reverse_kl")])
def test_jsd_end_points_are_the_two_kls_and_kd_is_t_squared_forward_kl(beta: float, same_as: str) -> None:
    h, w, b, y, t = _inputs(19, 5, 30, seed=16, dtype=torch.float64)
    leaves, other = _leaves(h, w, b), _leaves(h, w, b)
    jsd = fused_distillation_loss(*leaves[:2], y, t, bias=leaves[2], loss="jsd", beta=beta, temperature=2.0)
    kl = fused_distillation_loss(*other[:2], y, t, bias=other[2], loss=same_as, temperature=2.0)  # type: ignore[arg-type]
    _close(jsd, kl, 1e-12, 1e-12)
    for got, want in zip(_grads(jsd, leaves), _grads(kl, other), strict=True):
        _close(got, want, 1e-12, 1e-12)
    kd = fused_distillation_loss(h, w, y, t, bias=b, temperature=2.0, ce_weight=0.0)
    forward = fused_distillation_loss(h, w, y, t, bias=b, loss="forward_kl", temperature=2.0, ce_weight=0.0)
    _close(kd, 4.0 * forward, 1e-12, 1e-12)


def test_sequence_shapes_and_a_frozen_head_without_bias() -> None:
    h, w, _, y, t = _inputs(24, 8, 40, seed=2)
    h3, y2, t3 = h.reshape(3, 8, 8), y.reshape(3, 8), t.reshape(3, 8, 40)
    (leaf,) = _leaves(h3)
    fused = fused_distillation_loss(leaf, w, y2, t3, temperature=2.0, chunk_size=5)
    (ref_leaf,) = _leaves(h3)
    ref = _reference(ref_leaf.reshape(-1, 8), w, None, y2.reshape(-1), t3.reshape(-1, 40), temperature=2.0)
    _close(fused, ref, 1e-5, 1e-6)
    (got,) = _grads(fused, [leaf])
    (want,) = _grads(ref, [ref_leaf])
    assert got.shape == (3, 8, 8)
    _close(got, want, 1e-4, 1e-6)


def test_upstream_gradient_scales_the_gradients_and_no_grad_gives_the_value() -> None:
    h, w, b, y, t = _inputs(20, 6, 30, seed=3)
    leaves = _leaves(h, w, b)
    (3.0 * fused_distillation_loss(*leaves[:2], y, t, bias=leaves[2], chunk_size=6)).backward()
    ref_leaves = _leaves(h, w, b)
    (3.0 * _reference(*ref_leaves, y, t)).backward()
    for got, want in zip(leaves, ref_leaves, strict=True):
        assert got.grad is not None and want.grad is not None
        _close(got.grad, want.grad, 1e-4, 1e-6)
    with torch.no_grad():
        value = fused_distillation_loss(h, w, y, t, bias=b, chunk_size=6)
    _close(value, _reference(h, w, b, y, t), 1e-5, 1e-6)


def test_return_terms_gives_each_term_and_their_weighted_sum() -> None:
    h, w, b, y, t = _inputs(17, 6, 30, seed=4)
    terms = fused_distillation_loss(
        h, w, y, t, bias=b, temperature=2.0, ce_weight=0.4, kd_weight=3.0, chunk_size=5, return_terms=True
    )
    assert isinstance(terms, FusedLossTerms)
    z = F.linear(h, w, b)
    _close(terms.ce, F.cross_entropy(z, y), 1e-5, 1e-6)
    _close(terms.kd, kd_loss(z, t, 2.0, target=y), 1e-5, 1e-6)
    _close(terms.loss, 0.4 * terms.ce + 3.0 * terms.kd, 1e-6, 1e-6)
    assert not terms.ce.requires_grad and not terms.kd.requires_grad


def test_a_hugging_face_llama_with_tied_embeddings_gets_the_unfused_gradients() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 300, (2, 12))
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100
    teacher = torch.randn(2, 11, 300)
    z = model(ids).logits[:, :-1]
    unfused = F.cross_entropy(z.reshape(-1, 300), labels.reshape(-1)) + kd_loss(z, teacher, 2.0, target=labels)
    unfused.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    hidden = model.base_model(ids).last_hidden_state[:, :-1]  # after the final norm, what the head reads
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight  # tied: one weight, used twice
    fused = fused_distillation_loss(hidden, head.weight, labels, teacher, bias=head.bias, temperature=2.0, chunk_size=5)
    fused.backward()
    _close(fused, unfused, 1e-5, 1e-6)
    assert len(expected) == len(list(model.parameters()))
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        _close(param.grad, expected[name], 1e-4, 1e-6)


# --------------------------------------------------------------------------- ignored tokens
def test_all_ignored_chunks_and_non_finite_ignored_rows_reach_nothing() -> None:
    h, w, b, y, t = _inputs(20, 6, 30, seed=5, ignore=0.0)
    y[0:8] = -100  # chunks [0, 4) and [4, 8) hold no valid token
    y[13] = -100
    dirty_h, dirty_t = h.clone(), t.clone()
    dirty_h[y == -100] = float("nan")
    dirty_t[y == -100] = float("inf")
    leaves = _leaves(dirty_h, w, b)
    fused = fused_distillation_loss(*leaves[:2], y, dirty_t, bias=leaves[2], temperature=2.0, chunk_size=4)
    keep = y != -100
    ref_leaves = _leaves(h[keep], w, b)
    ref = _reference(*ref_leaves, y[keep], t[keep], temperature=2.0)
    _close(fused, ref, 1e-5, 1e-6)
    grad_h, grad_w, grad_b = _grads(fused, leaves)
    want_h, want_w, want_b = _grads(ref, ref_leaves)
    assert torch.equal(grad_h[~keep], torch.zeros_like(grad_h[~keep]))
    _close(grad_h[keep], want_h, 1e-4, 1e-6)
    _close(grad_w, want_w, 1e-4, 1e-6)
    _close(grad_b, want_b, 1e-4, 1e-6)


def test_no_valid_token_gives_zero_and_zero_gradients() -> None:
    h, w, b, _, t = _inputs(9, 4, 12, seed=6)
    y = torch.full((9,), -100)
    leaves = _leaves(h, w, b)
    loss = fused_distillation_loss(*leaves[:2], y, t, bias=leaves[2], chunk_size=4)
    assert loss.item() == 0.0
    for grad in _grads(loss, leaves):
        assert torch.equal(grad, torch.zeros_like(grad))


def test_custom_ignore_index() -> None:
    h, w, b, y, t = _inputs(15, 5, 20, seed=7, ignore=0.0)
    y[[2, 9]] = 19
    fused = fused_distillation_loss(h, w, y, t, bias=b, ignore_index=19, chunk_size=4)
    keep = y != 19
    _close(fused, _reference(h[keep], w, b, y[keep], t[keep]), 1e-5, 1e-6)


# --------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_match_the_unfused_loss(dtype: torch.dtype) -> None:
    h, w, b, y, t = _inputs(48, 16, 200, seed=8, dtype=dtype)
    leaves = _leaves(h, w, b)
    fused = fused_distillation_loss(*leaves[:2], y, t, bias=leaves[2], temperature=2.0, chunk_size=10)
    assert fused.dtype == dtype
    grads = _grads(fused, leaves)
    assert [g.dtype for g in grads] == [dtype] * 3
    # the unfused loss in the same dtype (logits rounded to it, as F.linear gives them) ...
    ref_leaves = _leaves(h, w, b)
    ref = _reference(*ref_leaves, y, t, temperature=2.0)
    ref_grads = _grads(ref, ref_leaves)
    # ... and the exact loss of the same (rounded) inputs in float64
    exact_leaves = _leaves(h.double(), w.double(), b.double())
    exact = _reference(*exact_leaves, y, t.double(), temperature=2.0)
    exact_grads = _grads(exact, exact_leaves)
    _close(fused, ref, 2e-2, 1e-2)
    _close(fused, exact, 2e-2, 1e-2)
    for got, want, best in zip(grads, ref_grads, exact_grads, strict=True):
        # relative error of the whole gradient: the fused one is no worse than the unfused one (+ slack)
        fused_err = float((got.double() - best).norm() / best.norm())
        unfused_err = float((want.double() - best).norm() / best.norm())
        assert fused_err < max(2 * unfused_err, 2e-2), (fused_err, unfused_err)


def test_float32_default_chunks_equal_a_single_chunk() -> None:
    h, w, b, y, t = _inputs(300, 4, 50, seed=9)
    assert default_chunk_size(300, 4, 50) == 64  # the floor: 5 chunks
    leaves, one = _leaves(h, w, b), _leaves(h, w, b)
    chunked = fused_distillation_loss(*leaves[:2], y, t, bias=leaves[2], loss="jsd")
    whole = fused_distillation_loss(*one[:2], y, t, bias=one[2], loss="jsd", chunk_size=300)
    _close(chunked, whole, 1e-6, 1e-7)
    for got, want in zip(_grads(chunked, leaves), _grads(whole, one), strict=True):
        _close(got, want, 1e-5, 1e-7)


# --------------------------------------------------------------------------- top-k teacher
@pytest.mark.parametrize(("k", "index_dtype"), [(5, torch.int16), (1, torch.int32), (40, torch.int16)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_teacher_equals_the_unfused_loss_on_reconstruct_logits(
    k: int, index_dtype: torch.dtype, temperature: float
) -> None:
    h, w, b, y, t = _inputs(21, 6, 40, seed=10)
    top, idx = t.topk(k, dim=1)
    rest = (
        t.scatter(1, idx, float("-inf")).logsumexp(dim=1) if k < 40 else torch.full((21,), float("-inf"))
    )  # as the cache stores it
    values, indices = top.half(), idx.to(index_dtype)
    leaves = _leaves(h, w, b)
    fused = fused_distillation_loss(
        *leaves[:2], y, bias=leaves[2], teacher_topk=(values, indices, rest), temperature=temperature, chunk_size=4
    )
    rebuilt = reconstruct_logits(values, indices, rest, 40)
    ref_leaves = _leaves(h, w, b)
    ref = _reference(*ref_leaves, y, rebuilt, temperature=temperature)
    _close(fused, ref, 1e-5, 1e-6)
    for got, want in zip(_grads(fused, leaves), _grads(ref, ref_leaves), strict=True):
        _close(got, want, 1e-4, 1e-6)


# --------------------------------------------------------------------------- plain fused cross-entropy
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_fused_linear_cross_entropy_equals_f_cross_entropy(chunk: int | None) -> None:
    h, w, b, y, _ = _inputs(23, 7, 60, seed=11)
    leaves = _leaves(h, w, b)
    fused = fused_linear_cross_entropy(leaves[0], leaves[1], y, bias=leaves[2], chunk_size=chunk)
    ref_leaves = _leaves(h, w, b)
    ref = F.cross_entropy(F.linear(*ref_leaves), y)
    _close(fused, ref, 1e-5, 1e-6)
    for got, want in zip(_grads(fused, leaves), _grads(ref, ref_leaves), strict=True):
        _close(got, want, 1e-4, 1e-6)


# --------------------------------------------------------------------------- memory and the hot path
class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any new tensor an operator returns (views are not new)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)}
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("teacher", ["full", "topk"])
def test_no_operator_returns_a_tensor_of_all_tokens_times_the_vocabulary(teacher: str) -> None:
    n, hidden, vocab, chunk = 256, 8, 500, 16
    h, w, b, y, t = _inputs(n, hidden, vocab, seed=12)
    top, idx = t.topk(8, dim=1)
    kwargs = {"teacher_logits": t} if teacher == "full" else {"teacher_topk": (top, idx, t[:, 0])}
    leaves = _leaves(h, w, b)
    with _LargestOutput() as mode:
        loss = fused_distillation_loss(
            *leaves[:2], y, bias=leaves[2], temperature=2.0, chunk_size=chunk, validate_args=False, **kwargs
        )
        loss.backward()
    assert mode.largest <= max(chunk * vocab, vocab * hidden)  # one chunk's logits or the weight's gradient
    with _LargestOutput() as unfused:
        _reference(*_leaves(h, w, b), y, t, temperature=2.0).backward()
    assert unfused.largest >= n * vocab  # the probe sees the full logits when they exist


def test_no_host_reads_with_validate_args_false() -> None:
    h, w, b, y, t = _inputs(30, 6, 40, seed=13)
    leaves = _leaves(h, w, b)
    with HostReadCounter() as counter:
        counter.active = True
        loss = fused_distillation_loss(*leaves[:2], y, t, bias=leaves[2], chunk_size=7, validate_args=False)
        loss.backward()
    assert counter.total == 0, dict(counter.by_kind)


def test_second_backward_is_refused() -> None:
    h, w, b, y, t = _inputs(10, 4, 12, seed=14)
    (leaf,) = _leaves(h)
    loss = fused_distillation_loss(leaf, w, y, t, bias=b)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()


# --------------------------------------------------------------------------- errors
def test_error_messages_name_the_problem() -> None:
    h, w, b, y, t = _inputs(6, 4, 10, seed=15)
    with pytest.raises(ValueError, match="transpose"):
        fused_distillation_loss(h, w.T, y, t)
    with pytest.raises(ValueError, match="needs teacher_logits or teacher_topk"):
        fused_distillation_loss(h, w, y)
    with pytest.raises(ValueError, match="either teacher_logits or teacher_topk"):
        fused_distillation_loss(h, w, y, t, teacher_topk=(t[:, :2], t[:, :2].long(), t[:, 0]))
    with pytest.raises(ValueError, match=r"teacher_logits must be \[..., V\] = \[6, 10\]"):
        fused_distillation_loss(h, w, y, t[:, :9])
    with pytest.raises(ValueError, match=r"token ids in \[.*\] but the head has V=10"):
        fused_distillation_loss(h, w, torch.full((6,), 10), t)
    with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
        fused_distillation_loss(h, w, y, t, loss="jsd", beta=1.5)
    with pytest.raises(ValueError, match="loss must be one of"):
        fused_distillation_loss(h, w, y, t, loss="tv")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature must be"):
        fused_distillation_loss(h, w, y, t, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be"):
        fused_distillation_loss(h, w, y, t, chunk_size=0)
    with pytest.raises(TypeError, match="cast both to one dtype"):
        fused_distillation_loss(h.double(), w, y, t)
    with pytest.raises(ValueError, match=r"target must have hidden's leading shape \[6\]"):
        fused_distillation_loss(h, w, y[:5], t)
    bad = t.clone()
    bad[int((y != -100).nonzero()[0])] = float("nan")
    with pytest.raises(ValueError, match="teacher_logits contain NaN"):
        fused_distillation_loss(h, w, y, bad)
    fused_distillation_loss(h, w, y, bad, validate_args=False)  # no check, no error
    with pytest.raises(ValueError, match="bias must be"):
        fused_distillation_loss(h, w, y, t, bias=b[:3])


# --------------------------------------------------------------------------- the benchmark, tiny
def test_memory_benchmark_runs_every_case_and_prints_the_ratios() -> None:
    import argparse

    from benchmarks.memory_fused import CASES, format_table, main, measure

    rows = {}
    threads = torch.get_num_threads()
    try:
        for case in CASES:
            result = measure(case, tokens=40, hidden=8, vocab=300, chunk=None, repeats=1)
            assert result["peak_mb"] >= result["inputs_mb"] and len(result["times"]) == 1
            rows[case] = {"loss_mb": max(result["loss_mb"], 1.0), "time_s": result["times"][0]}
    finally:
        torch.set_num_threads(threads)  # measure() runs on one thread
    args = argparse.Namespace(tokens=40, hidden=8, vocab=300, chunk=None)
    table = format_table(rows, args)
    assert "fused chunk = 40 tokens" in table  # default_chunk_size: the 64-row floor, capped at N = 40
    for case in CASES:
        assert f"| {case} |" in table
    with pytest.raises(SystemExit):
        main(["--cases", "nope"])

"""DKD, DIST, DHKD and logit standardization (and KD/NKD on sequences) against float64 restatements.

Every reference below is written from the papers' / official repositories' formulas in float64
numpy, one row at a time, independently of the implementation: DKD from mdistiller's
``dkd_loss`` (binary target/rest KL + non-target KL, T^2, batch mean), DIST from
``hunto/DIST_KD`` (1 - mean Pearson correlation over rows and over columns of the softmax
matrices), DHKD's BinaryKL-Norm from ``penghui-yang/DHKD`` (per-class KL of 1/2 to the sigmoid
of the scaled logit difference, both sides), logit standardization from
``sunshangquan/logit-standardization-KD`` (z-score with the unbiased std + 1e-7). The token-level
divergences (forward/reverse KL, generalized JSD, skew KL, TV) are restated from their definitions:
the KLs in log space, the mixtures (JSD, skew) and TV in probability space with scipy's ``rel_entr``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import rel_entr
from torch import Tensor

from lightning_logits.functional.distillation import (
    DEFAULT_TEMPERATURE,
    DISTILLATION_LOSSES,
    dhkd_loss,
    dist_loss,
    dkd_loss,
    dkd_warmup,
    get_distillation_loss,
    kd_loss,
    standardize_logits,
)


# --------------------------------------------------------------------------- float64 restatements
def _np(x: Tensor) -> np.ndarray:
    return x.detach().double().reshape(-1, x.shape[-1]).numpy()


def _lse(v: np.ndarray) -> float:
    top = float(np.max(v))
    return top + math.log(float(np.sum(np.exp(v - top))))


def _log_softmax(v: np.ndarray) -> np.ndarray:
    return v - _lse(v)


def _zscore(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / (v.std(ddof=1) + 1e-7)


def kd_ref(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    rows = []
    for srow, trow in zip(s, t, strict=True):
        log_ps, log_pt = _log_softmax(srow / temperature), _log_softmax(trow / temperature)
        rows.append(float(np.sum(np.exp(log_pt) * (log_pt - log_ps))))
    return temperature**2 * float(np.mean(rows))


def nkd_ref(s: np.ndarray, t: np.ndarray, y: list[int], temperature: float, gamma: float) -> float:
    rows = []
    for srow, trow, c in zip(s, t, y, strict=True):
        target = -math.exp(_log_softmax(trow)[c]) * _log_softmax(srow)[c]
        s_rest, t_rest = np.delete(srow, c), np.delete(trow, c)
        log_qs, log_qt = _log_softmax(s_rest / temperature), _log_softmax(t_rest / temperature)
        rows.append(target - gamma * temperature**2 * float(np.sum(np.exp(log_qt) * log_qs)))
    return float(np.mean(rows))


def dkd_ref(s: np.ndarray, t: np.ndarray, y: list[int], temperature: float, alpha: float, beta: float) -> float:
    rows = []
    for srow, trow, c in zip(s, t, y, strict=True):
        xs, xt = srow / temperature, trow / temperature
        # b = [p_target, p_rest]: the softmax mass of the target class and of all the others
        log_bs = np.array([xs[c] - _lse(xs), _lse(np.delete(xs, c)) - _lse(xs)])
        log_bt = np.array([xt[c] - _lse(xt), _lse(np.delete(xt, c)) - _lse(xt)])
        tckd = float(np.sum(np.exp(log_bt) * (log_bt - log_bs)))
        log_qs, log_qt = _log_softmax(np.delete(xs, c)), _log_softmax(np.delete(xt, c))
        nckd = float(np.sum(np.exp(log_qt) * (log_qt - log_qs)))
        rows.append(temperature**2 * (alpha * tckd + beta * nckd))
    return float(np.mean(rows))


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-8))


def dist_ref(s: np.ndarray, t: np.ndarray, temperature: float, beta: float, gamma: float) -> float:
    ys = np.stack([np.exp(_log_softmax(r / temperature)) for r in s])
    yt = np.stack([np.exp(_log_softmax(r / temperature)) for r in t])
    inter = 1 - np.mean([_pearson(ys[n], yt[n]) for n in range(ys.shape[0])])
    intra = 1 - np.mean([_pearson(ys[:, c], yt[:, c]) for c in range(ys.shape[1])])
    return temperature**2 * float(beta * inter + gamma * intra)


def dhkd_ref(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    total = 0.0
    for srow, trow in zip(s, t, strict=True):
        for x in (srow - trow) / temperature:
            log_sig, log_one_minus = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
            # KL(1/2 || sigma) + KL(1/2 || 1 - sigma), each over the two outcomes {x, not x}
            total += 0.5 * (math.log(0.5) - log_sig) + 0.5 * (math.log(0.5) - log_one_minus)
    return temperature**2 * total / s.shape[0]


def _probs(v: np.ndarray, temperature: float) -> np.ndarray:
    return np.exp(_log_softmax(v / temperature))


def forward_kl_ref(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    rows = []
    for srow, trow in zip(s, t, strict=True):
        log_ps, log_pt = _log_softmax(srow / temperature), _log_softmax(trow / temperature)
        rows.append(float(np.sum(np.exp(log_pt) * (log_pt - log_ps))))
    return float(np.mean(rows))


def reverse_kl_ref(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    return forward_kl_ref(t, s, temperature)  # KL(P_s || P_t): the roles swapped


def jsd_ref(s: np.ndarray, t: np.ndarray, temperature: float, beta: float) -> float:
    """GKD's generalized JSD, M = beta P_t + (1 - beta) P_s; TRL's end points (forward KL at 0, reverse at 1)."""
    if beta == 0.0:
        return forward_kl_ref(s, t, temperature)
    if beta == 1.0:
        return reverse_kl_ref(s, t, temperature)
    rows = []
    for srow, trow in zip(s, t, strict=True):
        ps, pt = _probs(srow, temperature), _probs(trow, temperature)
        m = beta * pt + (1 - beta) * ps
        rows.append(beta * float(np.sum(rel_entr(pt, m))) + (1 - beta) * float(np.sum(rel_entr(ps, m))))
    return float(np.mean(rows))


def skew_kl_ref(s: np.ndarray, t: np.ndarray, temperature: float, alpha: float, reverse: bool = False) -> float:
    """DistiLLM: KL(P_t || a P_t + (1 - a) P_s); reverse: KL(P_s || a P_s + (1 - a) P_t)."""
    rows = []
    for srow, trow in zip(s, t, strict=True):
        p, q = _probs(trow, temperature), _probs(srow, temperature)
        if reverse:
            p, q = q, p
        rows.append(float(np.sum(rel_entr(p, alpha * p + (1 - alpha) * q))))
    return float(np.mean(rows))


def tv_ref(s: np.ndarray, t: np.ndarray, temperature: float) -> float:
    rows = [
        0.5 * float(np.sum(np.abs(_probs(a, temperature) - _probs(b, temperature)))) for a, b in zip(s, t, strict=True)
    ]
    return float(np.mean(rows))


def reference(name: str, s: Tensor, t: Tensor, y: Tensor, temperature: float, standardize: bool = False) -> float:
    a, b = _np(s), _np(t)
    if standardize:
        a, b = np.stack([_zscore(r) for r in a]), np.stack([_zscore(r) for r in b])
    labels = y.reshape(-1).tolist()
    if name == "kd":
        return kd_ref(a, b, temperature)
    if name == "nkd":
        return nkd_ref(a, b, labels, temperature, 1.5)
    if name == "dkd":
        return dkd_ref(a, b, labels, temperature, 1.0, 8.0)
    if name == "dist":
        return dist_ref(a, b, temperature, 1.0, 1.0)
    if name == "forward_kl":
        return forward_kl_ref(a, b, temperature)
    if name == "reverse_kl":
        return reverse_kl_ref(a, b, temperature)
    if name == "jsd":
        return jsd_ref(a, b, temperature, 0.5)
    if name in ("skew_kl", "skew_reverse_kl"):
        return skew_kl_ref(a, b, temperature, 0.1, reverse=name == "skew_reverse_kl")
    if name == "tv":
        return tv_ref(a, b, temperature)
    return dhkd_ref(a, b, temperature)


def call(name: str, s: Tensor, t: Tensor, y: Tensor, temperature: float, **kwargs: object) -> Tensor:
    return DISTILLATION_LOSSES[name](s, t, target=y, temperature=temperature, **kwargs)


LM_NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"]  # token-level divergences
NAMES = ["kd", "nkd", "dkd", "dist", "dhkd", *LM_NAMES]
ROW_NAMES = ["kd", "nkd", "dkd", "dhkd", *LM_NAMES]  # the per-position losses (with a chunked path)


def _data(shape: tuple[int, ...], scale: float = 3.0, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * scale
    t = torch.randn(shape, generator=g) * scale
    y = torch.randint(0, shape[-1], shape[:-1], generator=g)
    return s, t, y


# --------------------------------------------------------------------------- values
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1, 2), (4, 5), (3, 17), (2, 3, 7)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_each_loss_matches_its_float64_restatement(name: str, shape: tuple[int, ...], temperature: float) -> None:
    s, t, y = _data(shape)
    got = call(name, s, t, y, temperature)
    assert got.dtype == torch.float32 and got.shape == ()
    assert got.item() == pytest.approx(reference(name, s, t, y, temperature), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_standardized_variants_equal_the_loss_on_z_scored_logits(name: str, temperature: float) -> None:
    s, t, y = _data((6, 9), scale=5.0, seed=3)
    s = s * 7 + 2  # a student with another scale and offset: standardization removes both
    got = call(name, s, t, y, temperature, standardize=True)
    assert got.item() == pytest.approx(reference(name, s, t, y, temperature, standardize=True), rel=1e-5, abs=1e-5)
    # invariance: z-scored logits do not see a per-row affine change of the student
    shifted = call(name, s * 3.0 - 11.0, t, y, temperature, standardize=True)
    torch.testing.assert_close(shifted, got, rtol=1e-4, atol=1e-5)


def test_standardize_logits_is_the_official_z_score() -> None:
    x = torch.tensor([[1.0, 2.0, 4.0, 9.0], [3.0, 3.0, 3.0, 3.0]])
    want = np.stack([_zscore(r) for r in x.double().numpy()])
    torch.testing.assert_close(standardize_logits(x).double(), torch.from_numpy(want), rtol=1e-6, atol=1e-6)
    assert standardize_logits(x.half()).dtype == torch.float16
    assert standardize_logits(torch.randn(2, 3, 5)).shape == (2, 3, 5)


def test_dkd_hand_values() -> None:
    # C = 2: the non-target distribution has one class (NCKD = 0) and TCKD is the binary KL of
    # the softmax: p_s = sigmoid(2), p_t = sigmoid(-1); alpha scales it, beta has no effect.
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    ps, pt = sig(2.0), sig(-1.0)
    want = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    s, t, y = torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 0.0]]), torch.tensor([0])
    assert dkd_loss(s, t, y, temperature=1.0, alpha=3.0, beta=99.0).item() == pytest.approx(3 * want, rel=1e-6)
    # KD = TCKD + (1 - p_t(target)) * NCKD (the paper's decomposition, Eq. 3) at alpha = 1, beta = 1 - p_t
    s, t, y = _data((1, 6), seed=5)
    p_t = torch.softmax(t / 2.0, 1)[0, int(y)].item()
    decoupled = dkd_loss(s, t, y, temperature=2.0, alpha=1.0, beta=1.0 - p_t)
    torch.testing.assert_close(decoupled, kd_loss(s, t, temperature=2.0), rtol=1e-5, atol=1e-6)


def test_dist_hand_values_and_batch_coupling() -> None:
    s, t, _ = _data((5, 6), seed=2)
    # identical probabilities: 0 up to the official eps (columns of tiny variance); beta, gamma weight the terms
    assert dist_loss(s, s).item() == pytest.approx(dist_ref(_np(s), _np(s), 1.0, 1.0, 1.0), abs=1e-6)
    assert dist_loss(s, s).item() < 1e-4
    inter = dist_loss(s, t, beta=1.0, gamma=0.0).item()
    intra = dist_loss(s, t, beta=0.0, gamma=1.0).item()
    assert dist_loss(s, t, beta=2.0, gamma=3.0).item() == pytest.approx(2 * inter + 3 * intra, rel=1e-5)
    # the intra-class term depends on the other rows of the batch; the inter-class one does not
    inter_half = (
        dist_loss(s[:3], t[:3], beta=1.0, gamma=0.0).item() * 3
        + dist_loss(s[3:], t[3:], beta=1.0, gamma=0.0).item() * 2
    )
    assert inter_half / 5 == pytest.approx(inter, rel=1e-5)


def test_dhkd_is_zero_only_at_equal_logits_and_sees_shifts_that_kd_ignores() -> None:
    s = torch.tensor([[2.0, 0.0, -1.0]])
    assert dhkd_loss(s, s).item() == pytest.approx(0.0, abs=1e-7)
    # a constant shift leaves the softmax (and KD) unchanged but not the logit-level loss
    assert kd_loss(s + 5.0, s).item() == pytest.approx(0.0, abs=1e-6)
    assert dhkd_loss(s + 5.0, s, temperature=2.0).item() == pytest.approx(dhkd_ref(_np(s + 5), _np(s), 2.0), rel=1e-6)
    assert dhkd_loss(s + 5.0, s).item() > 1.0


def test_dkd_warmup_is_linear_from_epoch_one() -> None:
    assert [dkd_warmup(e, 20) for e in (1, 10, 20, 21, 240)] == [0.05, 0.5, 1.0, 1.0, 1.0]
    assert dkd_warmup(5, 0) == 1.0


# --------------------------------------------------------------------------- extremes and gradients
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("scale", [1e3, 1e4])
def test_extreme_logits_finite_exact_with_finite_gradients(name: str, scale: float) -> None:
    s, t, y = _data((4, 5), scale=1.0, seed=7)
    s, t = (s.sign() * scale * torch.rand(4, 5)), (t.sign() * scale * torch.rand(4, 5))
    s.requires_grad_()
    value = call(name, s, t, y, 1.0)
    assert torch.isfinite(value)
    (grad,) = torch.autograd.grad(value, s)
    assert torch.isfinite(grad).all()
    want = reference(name, s, t, y, 1.0)
    # float32 logsumexp of values ~M carries an absolute error ~M * 2^-23 per term
    assert value.item() == pytest.approx(want, rel=1e-4, abs=4e-6 * scale * 5 * (8 if name == "dkd" else 1))


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name: str) -> None:
    s, t, y = _data((3, 4), scale=1.5, seed=11)
    s = s.double().requires_grad_()
    t = t.double()
    assert torch.autograd.gradcheck(lambda x: call(name, x, t, y, 2.0), (s,), eps=1e-6, atol=1e-6)
    mask = torch.tensor([True, False, True])
    assert torch.autograd.gradcheck(lambda x: call(name, x, t, y, 2.0, mask=mask), (s,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ROW_NAMES)
def test_gradcheck_float64_chunked(name: str) -> None:
    s, t, y = _data((2, 3, 4), scale=1.5, seed=12)
    s = s.double().requires_grad_()
    t = t.double()
    y[0, 1] = -100
    assert torch.autograd.gradcheck(
        lambda x: call(name, x, t, y, 2.0, chunk_size=2, standardize=True), (s,), eps=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("name", NAMES)
def test_teacher_side_is_constant(name: str) -> None:
    s, t, y = _data((4, 6))
    s.requires_grad_()
    t.requires_grad_()
    call(name, s, t, y, 2.0).backward()
    assert t.grad is None and s.grad is not None


# --------------------------------------------------------------------------- sequences and masks
@pytest.mark.parametrize("name", NAMES)
def test_mask_and_ignore_index_equal_the_loss_on_the_selected_rows(name: str) -> None:
    s, t, y = _data((3, 5, 7), seed=4)
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(9)) > 0.4
    mask[0, 0] = True
    rows_s, rows_t, rows_y = s[mask], t[mask], y[mask]
    want = reference(name, rows_s, rows_t, rows_y, 2.0)
    on_rows = call(name, rows_s, rows_t, rows_y, 2.0)
    by_mask = call(name, s, t, y, 2.0, mask=mask)
    ignored = y.masked_fill(~mask, -100)
    by_ignore = call(name, s, t, ignored, 2.0)
    for got in (on_rows, by_mask, by_ignore):
        assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    # what sits at excluded positions never matters, not even NaN, nor does it get a gradient
    junk_s = s.masked_fill(~mask.unsqueeze(-1), float("nan")).requires_grad_()
    junk_t = t.masked_fill(~mask.unsqueeze(-1), float("inf"))
    value = call(name, junk_s, junk_t, ignored, 2.0, validate_args=False)
    assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-5)
    (grad,) = torch.autograd.grad(value, junk_s)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    # a different ignore_index value
    custom = y.masked_fill(~mask, 7)
    assert call(name, s, t, custom, 2.0, ignore_index=7).item() == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_no_valid_position_gives_zero_and_zero_gradient(name: str) -> None:
    s, t, y = _data((2, 3, 4))
    s.requires_grad_()
    value = call(name, s, t, torch.full_like(y, -100), 1.0)
    assert value.item() == 0.0
    (grad,) = torch.autograd.grad(value, s)
    assert (grad == 0).all()


@pytest.mark.parametrize("name", ROW_NAMES)
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_chunked_equals_unchunked_values_and_gradients(name: str, chunk_size: int) -> None:
    s, t, y = _data((2, 9, 11), seed=8)
    y[1, 2:5] = -100
    a = s.clone().requires_grad_()
    b = s.clone().requires_grad_()
    whole = call(name, a, t, y, 2.0)
    chunked = call(name, b, t, y, 2.0, chunk_size=chunk_size)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)
    (3.0 * whole).backward()
    (3.0 * chunked).backward()
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ROW_NAMES)
def test_chunked_in_half_precision_and_without_grad(name: str) -> None:
    s, t, y = _data((4, 6, 10), seed=13)
    half = s.bfloat16().requires_grad_()
    value = call(name, half, t.bfloat16(), y, 2.0, chunk_size=5)
    assert value.dtype == torch.bfloat16
    want = call(name, s.bfloat16().float(), t.bfloat16().float(), y, 2.0)
    assert value.float().item() == pytest.approx(want.item(), rel=1e-2)
    value.backward()
    assert half.grad is not None and half.grad.dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(call(name, s, t, y, 2.0, chunk_size=5), call(name, s, t, y, 2.0))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_returned_in_input_dtype_and_finite_under_half_precision(name: str, dtype: torch.dtype) -> None:
    s, t, y = _data((4, 7), scale=20.0)
    value = call(name, s.to(dtype), t.to(dtype), y, 8.0)
    assert value.dtype == dtype and torch.isfinite(value)
    want = reference(name, s.to(dtype), t.to(dtype), y, 8.0)
    assert value.double().item() == pytest.approx(want, rel=1e-2 if dtype != torch.float64 else 1e-5, abs=1e-3)


def test_soft_targets_use_their_argmax() -> None:
    s, t, y = _data((5, 4), seed=6)
    soft = torch.full((5, 4), 0.1)
    soft[torch.arange(5), y] = 0.7
    for name in ("nkd", "dkd"):
        torch.testing.assert_close(call(name, s, t, soft, 2.0), call(name, s, t, y, 2.0))


# --------------------------------------------------------------------------- validation and registry
def test_validate_args_false_skips_the_value_checks() -> None:
    s, t, y = _data((3, 4))
    nan = torch.full_like(t, float("nan"))
    for name in NAMES:
        with pytest.raises(ValueError, match="non-finite"):
            call(name, s, nan, y, 1.0)
        assert torch.isnan(call(name, s, nan, y, 1.0, validate_args=False))
    with pytest.raises(ValueError, match=r"labels in \[0, 9\]"):
        dkd_loss(s, t, torch.tensor([0, 9, 1]))


def test_error_messages_name_the_problem() -> None:
    s, t, y = _data((2, 3, 5))
    with pytest.raises(ValueError, match=r"mask must have the logits' leading shape \[2, 3\]"):
        kd_loss(s, t, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        kd_loss(s, t, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"target must be class indices of shape \[...\] = \[2, 3\]"):
        dkd_loss(s, t, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="5 classes and teacher_logits has 4"):
        dkd_loss(s, t[..., :4], y)
    with pytest.raises(ValueError, match="no chunked path"):
        dist_loss(s, t, chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        kd_loss(s, t, chunk_size=0)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        dkd_loss(s, t, y, beta=float("nan"))
    with pytest.raises(ValueError, match="needs target"):
        DISTILLATION_LOSSES["dkd"](s, t, target=None)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        dhkd_loss(torch.randn(5), torch.randn(5))


def test_registry_and_user_callables() -> None:
    assert set(DISTILLATION_LOSSES) == set(DEFAULT_TEMPERATURE) == set(NAMES)
    for name, fn in DISTILLATION_LOSSES.items():
        assert get_distillation_loss(name) is fn

    def mine(logits: Tensor, teacher_logits: Tensor, **kwargs: object) -> Tensor:
        return (logits - teacher_logits).pow(2).mean()

    assert get_distillation_loss(mine) is mine
    with pytest.raises(ValueError, match="loss must be one of"):
        get_distillation_loss("rkd")


def test_registered_losses_share_the_keyword_calling_convention() -> None:
    s, t, y = _data((2, 4, 6))
    mask = torch.ones(2, 4, dtype=torch.bool)
    for name, fn in DISTILLATION_LOSSES.items():
        value = fn(s, t, target=y, temperature=DEFAULT_TEMPERATURE[name], mask=mask, validate_args=False)
        assert value.shape == () and torch.isfinite(value)


# --------------------------------------------------------------------------- sequence cache
def test_sequence_cache_stores_top_k_per_token_and_rebuilds_the_rows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lightning_logits.teacher_cache import TeacherLogitCache, build_teacher_cache

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Embedding(12, 8), torch.nn.Linear(8, 12))
    tokens = torch.randint(0, 12, (10, 6))
    batches = [(tokens[i : i + 4], tokens[i : i + 4], torch.arange(i, min(i + 4, 10))) for i in (0, 4, 8)]
    cache = build_teacher_cache(teacher, batches, tmp_path / "seq", k=3, num_samples=10)
    assert cache.positions == 6 and TeacherLogitCache(tmp_path / "seq").positions == 6
    values, indices, rest = cache.topk(torch.tensor([9, 2]))
    assert values.shape == (2, 6, 3) and indices.shape == (2, 6, 3) and rest.shape == (2, 6)
    full = teacher(tokens[[9, 2]]).detach()
    assert torch.equal(indices, full.topk(3, dim=-1).indices)
    rebuilt = cache.logits(torch.tensor([9, 2]))
    assert rebuilt.shape == (2, 6, 12)
    in_top = torch.zeros_like(full, dtype=torch.bool).scatter_(-1, indices, True)
    p_full, p_rebuilt = full.softmax(-1), rebuilt.softmax(-1)
    torch.testing.assert_close(p_rebuilt[in_top], p_full[in_top], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close((p_rebuilt * ~in_top).sum(-1), (p_full * ~in_top).sum(-1), rtol=2e-2, atol=1e-3)
    # exact (up to float16) with k = C; classification caches keep positions None
    exact = build_teacher_cache(teacher, batches, tmp_path / "exact", k=99, num_samples=10)
    torch.testing.assert_close(exact.logits(torch.arange(10)), teacher(tokens).detach(), rtol=1e-3, atol=1e-2)
    flat = build_teacher_cache(torch.nn.Linear(3, 4), [(torch.randn(2, 3), 0, torch.arange(2))], tmp_path / "f",
                               num_samples=2)  # fmt: skip
    assert flat.positions is None and flat.logits(torch.arange(2)).shape == (2, 4)
    ragged = [(tokens[:4, :6], 0, torch.arange(4)), (tokens[4:8, :5], 0, torch.arange(4, 8))]
    with pytest.raises(ValueError, match="same number of tokens"):
        build_teacher_cache(teacher, ragged, tmp_path / "ragged", k=3, num_samples=8)

"""Logit diagnostics against independent float64 numpy restatements and hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.special import logsumexp, softmax

from lightning_logits.functional import (
    atc_estimate,
    aurc,
    average_confidence,
    dual_focal_loss,
    energy_score,
    excess_aurc,
    expected_calibration_error,
    fit_atc_threshold,
    fit_temperature,
    fit_vim,
    fpr_at_tpr,
    logit_gap_score,
    mano_criterion,
    mano_score,
    max_logit_score,
    msp_score,
    normalized_logit_score,
    ood_auroc,
    risk_coverage_curve,
    select_logit_gap_top_n,
    vim_score,
)


def _rand(n: int, c: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, c)) * scale


# ------------------------------------------------------------------ simple scores


def test_msp_max_logit_energy_match_numpy() -> None:
    z = _rand(50, 7)
    t = torch.tensor(z, dtype=torch.float32)
    np.testing.assert_allclose(msp_score(t).numpy(), softmax(z, axis=1).max(1), rtol=1e-5)
    np.testing.assert_allclose(max_logit_score(t).numpy(), z.max(1), rtol=1e-6)
    np.testing.assert_allclose(energy_score(t).numpy(), logsumexp(z, axis=1), rtol=1e-5)
    np.testing.assert_allclose(energy_score(t, temperature=2.5).numpy(), 2.5 * logsumexp(z / 2.5, axis=1), rtol=1e-5)
    np.testing.assert_allclose(average_confidence(t).item(), softmax(z, axis=1).max(1).mean(), rtol=1e-5)


# ------------------------------------------------------------------ ViM


def _vim_numpy(train_x, w, b, test_x, test_logits, dim):
    """haoqiwang/vim benchmark.py, restated with sklearn's covariance and numpy's eig."""
    from sklearn.covariance import EmpiricalCovariance

    u = -np.matmul(np.linalg.pinv(w), b)
    ec = EmpiricalCovariance(assume_centered=True).fit(train_x - u)
    eig_vals, eig_vecs = np.linalg.eig(ec.covariance_)
    ns = np.ascontiguousarray((eig_vecs.T[np.argsort(eig_vals * -1)[dim:]]).T)
    vlogit_train = np.linalg.norm(np.matmul(train_x - u, ns), axis=-1)
    alpha = (train_x @ w.T + b).max(axis=-1).mean() / vlogit_train.mean()
    vlogit = np.linalg.norm(np.matmul(test_x - u, ns), axis=-1) * alpha
    return logsumexp(test_logits, axis=-1) - vlogit, alpha


def test_vim_matches_official_formula() -> None:
    rng = np.random.default_rng(1)
    d, c = 12, 4
    # ID features live mostly in a 5-dim subspace, plus small noise
    basis = rng.normal(size=(5, d))
    train_x = rng.normal(size=(300, 5)) @ basis + 0.1 * rng.normal(size=(300, d))
    w, b = rng.normal(size=(c, d)), rng.normal(size=c)
    test_x = np.concatenate([rng.normal(size=(20, 5)) @ basis, rng.normal(size=(20, d)) * 3])
    test_logits = test_x @ w.T + b
    want, want_alpha = _vim_numpy(train_x, w, b, test_x, test_logits, dim=6)
    sub = fit_vim(torch.tensor(train_x), torch.tensor(w), torch.tensor(b), dim=6)
    assert sub.alpha == pytest.approx(want_alpha, rel=1e-8)
    got = vim_score(torch.tensor(test_x), torch.tensor(test_logits), sub)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-7, atol=1e-8)
    # off-subspace (OOD) samples score lower than in-subspace ones
    assert got[:20].mean() > got[20:].mean()
    assert fit_vim(torch.tensor(train_x), torch.tensor(w), torch.tensor(b)).dim == d // 2  # official default


def test_vim_rejects_other_feature_size() -> None:
    sub = fit_vim(torch.randn(30, 8), torch.randn(3, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="fitted on features of size 8"):
        vim_score(torch.randn(5, 6), torch.randn(5, 3), sub)
    with pytest.raises(ValueError, match="feature size"):
        fit_vim(torch.randn(30, 8), torch.randn(3, 6), torch.zeros(3))


# ------------------------------------------------------------------ LogitGap


def _logit_gap_python(z: np.ndarray, top_n: int) -> np.ndarray:
    out = []
    for row in z:
        s = sorted(row.tolist(), reverse=True)
        out.append(sum(s[0] - s[j] for j in range(1, top_n + 1)) / top_n)
    return np.array(out)


def test_logit_gap_matches_official_formula() -> None:
    z = _rand(40, 9, seed=3)
    t = torch.tensor(z)
    for n in (1, 3, 8):
        np.testing.assert_allclose(logit_gap_score(t, top_n=n).numpy(), _logit_gap_python(z, n), rtol=1e-12)
    np.testing.assert_allclose(logit_gap_score(t).numpy(), _logit_gap_python(z, 8), rtol=1e-12)
    with pytest.raises(ValueError, match="top_n must be in"):
        logit_gap_score(t, top_n=9)


def test_select_logit_gap_top_n_finds_the_knee() -> None:
    # three informative runner-up logits, then a flat tail of six
    rows = torch.tensor([[10.0, 6.0, 5.0, 4.0, 0.3, 0.25, 0.2, 0.15, 0.1, 0.0]]).repeat(4, 1)
    assert select_logit_gap_top_n(rows) == 3
    assert select_logit_gap_top_n(torch.randn(5, 3)) == 2


# ------------------------------------------------------------------ OOD metrics


def test_ood_auroc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(4)
    ids = np.round(rng.normal(1.0, 1.0, 200), 1)  # rounding creates ties
    oods = np.round(rng.normal(0.0, 1.0, 150), 1)
    want = roc_auc_score(np.r_[np.ones(200), np.zeros(150)], np.r_[ids, oods])
    assert ood_auroc(torch.tensor(ids), torch.tensor(oods)).item() == pytest.approx(want, rel=1e-12)


def _fpr_recall_numpy(ind, ood, tpr):
    recall_num = int(np.floor(tpr * len(ind)))
    thresh = np.sort(ind)[-recall_num]
    return np.sum(ood >= thresh) / len(ood)


def test_fpr_at_tpr_matches_official_formula() -> None:
    rng = np.random.default_rng(5)
    ids, oods = rng.normal(1.0, 1.0, 333), rng.normal(0.0, 1.0, 101)
    for tpr in (0.95, 0.9, 0.5):
        want = _fpr_recall_numpy(ids, oods, tpr)
        assert fpr_at_tpr(torch.tensor(ids), torch.tensor(oods), tpr).item() == pytest.approx(want)
    # perfectly separated: AUROC 1, FPR 0
    assert ood_auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 1.0
    assert fpr_at_tpr(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 0.0


# ------------------------------------------------------------------ MaNo


def _mano_numpy(z: np.ndarray, p: float = 4.0, threshold: float = 5.0) -> float:
    n, c = z.shape
    logp = z - logsumexp(z, axis=1, keepdims=True)
    criterion = np.mean(-logp.mean(axis=1))
    if criterion > threshold:
        probs = np.exp(logp)
    else:
        v = 1 + z + z**2 / 2
        v = v - v.min(axis=1, keepdims=True)
        probs = v / np.maximum(np.abs(v).sum(axis=1, keepdims=True), 1e-12)
    return float((np.abs(probs) ** p).sum() ** (1 / p) / (n * c) ** (1 / p))


def test_mano_matches_official_formula_both_branches() -> None:
    small = _rand(64, 10, seed=6, scale=1.0)  # criterion ~2.8 -> Taylor
    large = _rand(64, 10, seed=6, scale=20.0)  # criterion >> 5 -> softmax
    for z, branch in ((small, "taylor"), (large, "softmax")):
        crit = mano_criterion(torch.tensor(z)).item()
        assert (crit > 5.0) == (branch == "softmax")
        assert mano_score(torch.tensor(z)).item() == pytest.approx(_mano_numpy(z), rel=1e-10)
        assert mano_score(torch.tensor(z), normalization=branch).item() == pytest.approx(_mano_numpy(z), rel=1e-10)
    # p = 2 on a hand case: P = [[1, 0], [0, 1]] -> sqrt(2) / sqrt(4)
    assert mano_score(torch.tensor([[0.0, 4.0], [4.0, 0.0]]), p=2).item() == pytest.approx(math.sqrt(0.5))


def test_mano_grows_with_confidence() -> None:
    base = torch.tensor(_rand(100, 10, seed=7, scale=1.0))
    assert mano_score(2 * base, normalization="softmax") > mano_score(base, normalization="softmax")


# ------------------------------------------------------------------ ATC


def test_atc_threshold_reproduces_validation_accuracy() -> None:
    rng = np.random.default_rng(8)
    scores = rng.uniform(size=500)
    correct = rng.uniform(size=500) < scores  # calibrated-ish
    t = fit_atc_threshold(torch.tensor(scores), torch.tensor(correct))
    assert np.mean(scores >= t) == pytest.approx(correct.mean())
    # the estimate on the validation set itself is its accuracy
    assert atc_estimate(torch.tensor(scores), t).item() == pytest.approx(correct.mean())
    # on a target set whose scores are halved, the estimate is the share of halved scores above t
    assert atc_estimate(torch.tensor(scores / 2), t).item() == pytest.approx(np.mean(scores / 2 >= t))
    assert fit_atc_threshold(torch.tensor([0.5, 0.6]), torch.tensor([False, False])) == math.inf


# ------------------------------------------------------------------ selective classification


def test_aurc_of_a_perfect_ranking() -> None:
    n, e = 10, 3
    scores = torch.arange(n, 0, -1, dtype=torch.float64)  # descending: the last e are the errors
    correct = torch.tensor([True] * (n - e) + [False] * e)
    want = sum((k - (n - e)) / k for k in range(n - e + 1, n + 1)) / n
    assert aurc(scores, correct).item() == pytest.approx(want)
    # the worst ranking (errors first) has a larger AURC
    assert aurc(-scores, correct).item() > want
    assert excess_aurc(scores, correct).item() == pytest.approx(0.0, abs=1e-12)
    assert excess_aurc(-scores, correct).item() == pytest.approx(aurc(-scores, correct).item() - want)


def test_risk_coverage_matches_numpy_and_handles_ties() -> None:
    rng = np.random.default_rng(9)
    scores = rng.normal(size=200)
    correct = rng.uniform(size=200) < 0.7
    order = np.argsort(-scores, kind="stable")
    risks = np.cumsum(~correct[order]) / np.arange(1, 201)
    cov, risk, _ = risk_coverage_curve(torch.tensor(scores), torch.tensor(correct))
    np.testing.assert_allclose(risk.numpy(), risks)
    np.testing.assert_allclose(cov.numpy(), np.arange(1, 201) / 200)
    assert aurc(torch.tensor(scores), torch.tensor(correct)).item() == pytest.approx(risks.mean())
    # ties are accepted together: scores [1, 1, 0] with correct [T, F, T]: risks 1/2 (k=1,2), 1/3
    tied = aurc(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([True, False, True])).item()
    assert tied == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)


def test_normalized_logit_score_matches_numpy() -> None:
    z = _rand(30, 6, seed=10)
    for p, center in ((2.0, False), (1.0, True), (3.0, False)):
        zz = z - z.mean(1, keepdims=True) if center else z
        want = zz.max(1) / (np.abs(zz) ** p).sum(1) ** (1 / p)
        got = normalized_logit_score(torch.tensor(z, dtype=torch.float32), p=p, center=center).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6)


# ------------------------------------------------------------------ calibration


def test_ece_known_toy_case() -> None:
    # confidences 0.9 (right), 0.8 (wrong), 0.55 (right), 0.6 (right) with 10 bins:
    # bin (0.8, 0.9] holds 0.9 (acc 1) -> |1-0.9|; bin (0.7, 0.8] holds 0.8 (acc 0) -> 0.8;
    # bin (0.5, 0.6] holds 0.55 and 0.6 (acc 1, conf 0.575) -> 2 * 0.425. ECE = (0.1 + 0.8 + 0.85) / 4
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.55, 0.45], [0.4, 0.6]], dtype=torch.float64)
    target = torch.tensor([0, 0, 0, 1])
    ece = expected_calibration_error(probs.log(), target, n_bins=10).item()
    assert ece == pytest.approx((0.1 + 0.8 + 0.85) / 4, abs=1e-6)


def test_ece_matches_numpy_binning() -> None:
    z = _rand(400, 5, seed=11)
    rng = np.random.default_rng(11)
    y = rng.integers(0, 5, 400)
    p = softmax(z, axis=1)
    conf, acc = p.max(1), (p.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, 16)
    want = 0.0
    for lo, hi in itertools.pairwise(edges):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            want += m.mean() * abs(acc[m].mean() - conf[m].mean())
    got = expected_calibration_error(torch.tensor(z), torch.tensor(y)).item()
    assert got == pytest.approx(want, abs=1e-6)


def test_fit_temperature_recovers_known_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20000, 10, generator=g, dtype=torch.float64) * 1.5
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)  # labels drawn from softmax(z)
    for temperature in (0.5, 2.5):
        fitted = fit_temperature(temperature * z, y)
        assert fitted == pytest.approx(temperature, rel=0.05)
    # temperature scaling lowers the ECE of over-confident logits
    assert expected_calibration_error(2.5 * z / fit_temperature(2.5 * z, y), y) < expected_calibration_error(2.5 * z, y)


def _dual_focal_python(z: np.ndarray, y: np.ndarray, gamma: float) -> float:
    losses = []
    for row, t in zip(z, y, strict=True):
        p = softmax(row)
        p_y = p[t]
        below = [q for q in p if q < p_y]
        p_j = max(below) if below else 0.0
        losses.append(-((1 - p_y + p_j) ** gamma) * math.log(p_y))
    return float(np.mean(losses))


def test_dual_focal_loss_matches_official_formula() -> None:
    z = _rand(32, 6, seed=12)
    y = np.random.default_rng(12).integers(0, 6, 32)
    for gamma in (0.0, 1.0, 5.0):
        got = dual_focal_loss(torch.tensor(z), torch.tensor(y), gamma=gamma).item()
        assert got == pytest.approx(_dual_focal_python(z, y, gamma), rel=1e-10)
    # gamma = 0 is cross-entropy
    ce = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(y)).item()
    assert dual_focal_loss(torch.tensor(z), torch.tensor(y), gamma=0.0).item() == pytest.approx(ce)
    # target not the argmax: p_j is the class just below the target, not the argmax
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    got = dual_focal_loss(probs.log(), torch.tensor([1]), gamma=1.0).item()
    assert got == pytest.approx(-(1 - 0.3 + 0.1) * math.log(0.3), rel=1e-6)


def test_dual_focal_loss_gradients_finite() -> None:
    z = (torch.randn(16, 5) * 30).requires_grad_(True)
    loss = dual_focal_loss(z, torch.randint(0, 5, (16,)))
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    half = torch.randn(4, 3, dtype=torch.bfloat16, requires_grad=True)
    dual_focal_loss(half, torch.tensor([0, 1, 2, 0])).backward()
    assert half.grad is not None and torch.isfinite(half.grad.float()).all()


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "fn",
    [msp_score, max_logit_score, energy_score, logit_gap_score, mano_score, normalized_logit_score],
)
def test_scores_reject_nan_and_empty(fn) -> None:
    z = torch.randn(4, 3)
    z[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        fn(z)
    fn(z, validate_args=False)  # no host check in the steady state
    with pytest.raises(ValueError, match="empty"):
        fn(torch.zeros(0, 3))


def test_labels_outside_class_range_are_rejected() -> None:
    z = torch.randn(4, 3)
    bad = torch.tensor([0, 1, 3, 2])
    for fn in (expected_calibration_error, fit_temperature, dual_focal_loss):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
            fn(z, bad)
    with pytest.raises(ValueError, match="empty"):
        aurc(torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    with pytest.raises(ValueError, match="must have shape"):
        aurc(torch.zeros(3), torch.zeros(2, dtype=torch.bool))


def test_fit_temperature_works_under_inference_mode() -> None:
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3000, 4, generator=g, dtype=torch.float64)
    y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    with torch.inference_mode():
        zz, yy = 2.0 * z, y.clone()
        assert fit_temperature(zz, yy) == pytest.approx(2.0, rel=0.1)

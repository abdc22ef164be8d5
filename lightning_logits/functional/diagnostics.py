"""Logit diagnostics: confidence and OOD scores, accuracy estimation, selective classification, calibration.

Pure PyTorch (no Lightning). Every score is "higher = more confident / more in-distribution".
Each function names the official formula it restates:

- :func:`msp_score` maximum softmax probability (Hendrycks & Gimpel, 2017);
- :func:`max_logit_score` maximum logit; :func:`energy_score` ``T * logsumexp(z / T)``
  (negative free energy, Liu et al., 2020);
- :func:`fit_vim` / :func:`vim_score`: ViM (Wang et al., CVPR 2022), as ``benchmark.py`` of
  github haoqiwang/vim computes it;
- :func:`logit_gap_score`: LogitGap (Liang et al., NeurIPS 2025), as ``compute_k_largest_diff_topn``
  in ``utils/compute_utils.py`` of github GIT-LJc/LogitGap; :func:`select_logit_gap_top_n` is our
  training-free choice of ``N`` (the official repository hard-codes ``N`` per data set);
- :func:`mano_score`: MaNo (Xie et al., NeurIPS 2024), as the ``MaNo`` class of github
  Renchunzi-Xie/MaNo (criterion, softmax or Taylor normalization, scaled entry-wise p-norm);
- :func:`average_confidence`, :func:`fit_atc_threshold`, :func:`atc_estimate`: the accuracy
  estimation baselines MaNo compares with (AC; ATC of Garg et al., ICLR 2022);
- :func:`risk_coverage_curve`, :func:`aurc`: selective classification (Geifman et al., 2019);
- :func:`normalized_logit_score`: the post-hoc logit normalization of Xia et al. (ICLR 2025,
  "Towards Understanding Why Label Smoothing Degrades Selective Classification and How to Fix
  It"), as ``norm_logits`` in ``torch_uncertainty_ls/utils.py`` of github
  ENSTA-U2IS-AI/Label-smoothing-Selective-classification-Code;
- :func:`expected_calibration_error` (torchmetrics), :func:`fit_temperature` (Guo et al., 2017),
  :func:`dual_focal_loss` (Tao et al., ICML 2023), as ``dual_focal_loss.py`` of github
  Linwei94/DualFocalLoss;
- :func:`ood_auroc`, :func:`fpr_at_tpr`: OOD detection metrics (FPR at 95% TPR as ``fpr_recall``
  in haoqiwang/vim).

Validation that reads tensor values (NaN checks, label ranges) runs only with
``validate_args=True`` (the default); shape checks always run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_logits.functional._checks import result_in_dtype

__all__ = [
    "ViMSubspace",
    "atc_estimate",
    "aurc",
    "average_confidence",
    "dual_focal_loss",
    "energy_score",
    "excess_aurc",
    "expected_calibration_error",
    "fit_atc_threshold",
    "fit_temperature",
    "fit_vim",
    "fpr_at_tpr",
    "logit_gap_score",
    "mano_criterion",
    "mano_normalize",
    "mano_select_normalization",
    "mano_score",
    "max_logit_score",
    "msp_score",
    "normalized_logit_score",
    "ood_auroc",
    "risk_coverage_curve",
    "select_logit_gap_top_n",
    "vim_score",
]

MaNoNormalization = Literal["auto", "softmax", "taylor"]


# ----------------------------------------------------------------------------------------------
# input checks
# ----------------------------------------------------------------------------------------------


def _check_logits(logits: Tensor, validate_args: bool, name: str = "logits", allow_empty: bool = False) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.ndim != 2:
        raise ValueError(f"{name} must have shape [N, C] (samples, classes), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes, got C={logits.shape[1]}")
    if not logits.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {logits.dtype}")
    if not allow_empty and logits.shape[0] == 0:
        raise ValueError(f"{name} is empty (N=0); pass at least one sample (is the data loader empty?)")
    if validate_args and not bool(torch.isfinite(logits).all()):
        bad = int((~torch.isfinite(logits)).sum())
        raise ValueError(
            f"{name} contain {bad} non-finite value(s) (NaN or inf); the scores need finite logits: "
            "check the model's forward pass (and its inputs) before computing diagnostics"
        )


def _check_scores(scores: Tensor, validate_args: bool, name: str) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.ndim != 1:
        raise ValueError(f"{name} must have shape [N], got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} is empty (N=0); pass at least one score (is the data loader empty?)")
    if validate_args and not bool(torch.isfinite(scores.float()).all()):
        raise ValueError(f"{name} contain NaN or inf; compute the scores from finite logits")


def _check_labels(target: Tensor, num_samples: int, num_classes: int, validate_args: bool) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.ndim != 1 or target.shape[0] != num_samples:
        raise ValueError(
            f"target must be class indices of shape [N] = [{num_samples}], got shape {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.dtype == torch.bool:
        raise TypeError(f"target must be an integer tensor of class indices, got dtype {target.dtype}")
    if validate_args and target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"target holds labels in [{int(target.min())}, {int(target.max())}] but the logits have "
            f"{num_classes} classes; labels must lie in [0, {num_classes - 1}] (an out-of-distribution "
            "set has no valid labels: score it as OOD, not as a labelled or shifted set)"
        )


def _check_correct(correct: Tensor, num_samples: int, name: str = "correct") -> None:
    if not isinstance(correct, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(correct).__name__}")
    if correct.shape != (num_samples,):
        raise ValueError(f"{name} must have shape [N] = [{num_samples}] like the scores, got {tuple(correct.shape)}")


def _wide(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


# ----------------------------------------------------------------------------------------------
# confidence / OOD scores
# ----------------------------------------------------------------------------------------------


def msp_score(logits: Tensor, validate_args: bool = True) -> Tensor:
    """Maximum softmax probability ``max_k softmax(z)_k`` (higher = more confident).

    Args:
        logits: ``[N, C]``.
        validate_args: check the logits are finite (a host sync).

    Returns:
        ``[N]`` scores in ``[1/C, 1]``.

    Example:
        >>> import torch
        >>> msp_score(torch.tensor([[0.0, 0.0], [2.0, 0.0]])).tolist()  # doctest: +ELLIPSIS
        [0.5, 0.880...]
    """
    _check_logits(logits, validate_args)
    return _wide(logits).softmax(dim=1).amax(dim=1)


def max_logit_score(logits: Tensor, validate_args: bool = True) -> Tensor:
    """Maximum logit ``max_k z_k`` (higher = more in-distribution).

    Example:
        >>> import torch
        >>> max_logit_score(torch.tensor([[1.0, 3.0, 2.0]])).tolist()
        [3.0]
    """
    _check_logits(logits, validate_args)
    return logits.amax(dim=1)


def energy_score(logits: Tensor, temperature: float = 1.0, validate_args: bool = True) -> Tensor:
    """Negative free energy ``T * logsumexp(z / T)`` (higher = more in-distribution).

    Args:
        logits: ``[N, C]``.
        temperature: ``T > 0`` (default 1, the energy paper's choice).

    Example:
        >>> import math, torch
        >>> s = energy_score(torch.tensor([[0.0, 0.0]]))
        >>> round(s.item(), 6) == round(math.log(2), 6)
        True
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    _check_logits(logits, validate_args)
    return temperature * torch.logsumexp(_wide(logits) / temperature, dim=1)


@dataclass
class ViMSubspace:
    """What :func:`fit_vim` fits: origin ``u``, residual basis ``null_space`` ``[D, D - dim]``, ``alpha``.

    Attributes:
        origin: ``[D]``, the point ``u = -pinv(W) b`` the features are centred on.
        null_space: ``[D, D - dim]``, the basis of the residual space (eigenvectors outside the
            principal space of the centred training features).
        alpha: scale matching the residual norm to the max logit on the training features.
        dim: dimension of the principal space.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> sub = fit_vim(torch.randn(64, 8, generator=g), torch.randn(3, 8, generator=g), torch.zeros(3))
        >>> isinstance(sub, ViMSubspace), sub.feature_dim, tuple(sub.origin.shape), tuple(sub.null_space.shape)
        (True, 8, (8,), (8, 4))
    """

    origin: Tensor
    null_space: Tensor
    alpha: float
    dim: int

    @property
    def feature_dim(self) -> int:
        return int(self.origin.shape[0])


def _vim_default_dim(feature_dim: int) -> int:
    # haoqiwang/vim benchmark.py: 1000 for D >= 2048, 512 for D >= 768, otherwise D // 2.
    if feature_dim >= 2048:
        return 1000
    if feature_dim >= 768:
        return 512
    return feature_dim // 2


def fit_vim(
    features: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    dim: int | None = None,
    validate_args: bool = True,
) -> ViMSubspace:
    """Fit ViM's principal subspace and ``alpha`` on in-distribution (training) features.

    As haoqiwang/vim ``benchmark.py``: the origin is ``u = -pinv(W) b``; the principal space is
    spanned by the ``dim`` leading eigenvectors of ``(X - u)^T (X - u) / N``; the residual of a
    feature is its norm in the complement; ``alpha = mean_n max_k z_nk / mean_n ||residual_n||``
    with ``z = X W^T + b``.

    Args:
        features: ``[N, D]`` penultimate features of in-distribution training samples.
        weight: ``[C, D]`` weight of the linear head.
        bias: ``[C]`` bias (``None`` for a head without bias: then ``u = 0``).
        dim: principal dimension; default as the official code (1000 for ``D >= 2048``, 512 for
            ``D >= 768``, otherwise ``D // 2``).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> sub = fit_vim(torch.randn(64, 8, generator=g), torch.randn(3, 8, generator=g), torch.zeros(3))
        >>> sub.dim, tuple(sub.null_space.shape)
        (4, (8, 4))
    """
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {tuple(features.shape)}")
    if features.shape[0] == 0:
        raise ValueError("features is empty (N=0); fit ViM on in-distribution training features")
    if validate_args and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf; fit ViM on finite in-distribution features")
    if weight.ndim != 2 or weight.shape[1] != features.shape[1]:
        raise ValueError(
            f"weight must have shape [C, D] with D = {features.shape[1]} (the feature size), got "
            f"{tuple(weight.shape)}; pass the weight of the head that reads these features"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [C] = [{weight.shape[0]}], got {tuple(bias.shape)}")
    d = features.shape[1]
    dim = _vim_default_dim(d) if dim is None else int(dim)
    if not 0 <= dim < d:
        raise ValueError(f"dim must be in [0, D) = [0, {d}) so that a residual space remains, got {dim}")
    x = features.detach().double()
    w = weight.detach().double().to(x.device)
    b = torch.zeros(w.shape[0], dtype=x.dtype, device=x.device) if bias is None else bias.detach().double().to(x.device)
    origin = -torch.linalg.pinv(w) @ b
    centered = x - origin
    cov = centered.T @ centered / x.shape[0]
    eigvals, eigvecs = torch.linalg.eigh(cov)
    order = torch.argsort(eigvals, descending=True)
    null_space = eigvecs[:, order[dim:]].contiguous()
    residual = torch.linalg.vector_norm(centered @ null_space, dim=1)
    logits = x @ w.T + b
    mean_residual = float(residual.mean())
    # roundoff leaves a residual of ~1e-16 of the features' size where there is none (e.g. N <= dim)
    if not mean_residual > 1e-9 * float(centered.abs().max()):
        raise ValueError(
            f"the ID features have no residual outside the principal space (mean residual norm {mean_residual:.3g}, "
            f"{x.shape[0]} samples of size {d}); lower dim (got {dim}) or fit on more samples"
        )
    alpha = float(logits.amax(dim=1).mean()) / mean_residual
    return ViMSubspace(origin=origin, null_space=null_space, alpha=alpha, dim=dim)


def vim_score(features: Tensor, logits: Tensor, subspace: ViMSubspace, validate_args: bool = True) -> Tensor:
    """ViM score ``logsumexp(z) - alpha * ||(x - u) P_residual||`` (higher = more in-distribution).

    The official code scores ``-vlogit + energy`` with ``vlogit = alpha * residual norm``, which
    orders samples as ``-log`` of the virtual logit's softmax probability does.

    Args:
        features: ``[N, D]`` penultimate features.
        logits: ``[N, C]`` logits of the same samples.
        subspace: from :func:`fit_vim` on in-distribution features of the same size ``D``.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> x, w = torch.randn(64, 8, generator=g), torch.randn(3, 8, generator=g)
        >>> sub = fit_vim(x, w, torch.zeros(3))
        >>> vim_score(x[:2], x[:2] @ w.T, sub).shape
        torch.Size([2])
    """
    _check_logits(logits, validate_args)
    if features.ndim != 2:
        raise ValueError(f"features must have shape [N, D], got {tuple(features.shape)}")
    if features.shape[1] != subspace.feature_dim:
        raise ValueError(
            f"features have size D={features.shape[1]} but the ViM subspace was fitted on features of "
            f"size {subspace.feature_dim}; fit it (fit_vim) on features from the same layer"
        )
    if features.shape[0] != logits.shape[0]:
        raise ValueError(f"features ({features.shape[0]} rows) and logits ({logits.shape[0]} rows) must match")
    if validate_args and not bool(torch.isfinite(features).all()):
        raise ValueError("features contain NaN or inf; check the model's forward pass")
    x = features.double()
    residual = torch.linalg.vector_norm((x - subspace.origin.to(x.device)) @ subspace.null_space.to(x.device), dim=1)
    energy = torch.logsumexp(logits.double(), dim=1)
    return (energy - subspace.alpha * residual).to(_wide(logits).dtype)


def logit_gap_score(logits: Tensor, top_n: int | None = None, validate_args: bool = True) -> Tensor:
    """LogitGap: mean gap between the maximum logit and the next ``N`` logits (higher = ID).

    ``S(z) = (1/N) sum_{j=2}^{N+1} (z'_1 - z'_j)`` with ``z'`` sorted in descending order, as
    ``compute_k_largest_diff_topn(k=1, topn=N)`` in GIT-LJc/LogitGap (which returns the negated
    value as an OOD score). ``top_n=None`` uses all ``C - 1`` other logits (the paper's base score).

    Example:
        >>> import torch
        >>> logit_gap_score(torch.tensor([[5.0, 1.0, 3.0, 0.0]]), top_n=2).tolist()  # (2 + 4) / 2
        [3.0]
    """
    _check_logits(logits, validate_args)
    c = logits.shape[1]
    n = c - 1 if top_n is None else int(top_n)
    if not 1 <= n <= c - 1:
        raise ValueError(f"top_n must be in [1, C-1] = [1, {c - 1}], got {top_n}")
    top = torch.topk(_wide(logits), n + 1, dim=1).values
    return top[:, 0] - top[:, 1:].mean(dim=1)


def select_logit_gap_top_n(id_logits: Tensor, validate_args: bool = True) -> int:
    """A training-free choice of LogitGap's ``N`` from in-distribution logits only (ours).

    The LogitGap repository fixes ``N`` per benchmark in its scripts and has no selection code,
    so this is our stand-in for the paper's "most informative logits": the knee of the mean
    descending-sorted ID logit curve ``m_2 >= ... >= m_C`` (positions after the maximum), i.e. the
    position farthest below the chord from ``m_2`` to ``m_C`` (Kneedle). The knee starts the
    flat, noisy tail; ``N`` counts the logits before it. Returns ``N`` in ``[1, C - 1]``.

    Example:
        >>> import torch
        >>> z = torch.tensor([[9.0, 5.0, 4.0, 0.2, 0.1, 0.0]])
        >>> select_logit_gap_top_n(z)  # 5 and 4 are informative; 0.2, 0.1, 0 are the tail
        2
    """
    _check_logits(id_logits, validate_args, "id_logits")
    c = id_logits.shape[1]
    if c <= 3:
        return c - 1
    curve = id_logits.double().sort(dim=1, descending=True).values.mean(dim=0)[1:]  # m_2 .. m_C
    k = curve.shape[0]
    pos = torch.arange(k, dtype=torch.float64, device=curve.device)
    chord = curve[0] + (curve[-1] - curve[0]) * pos / (k - 1)
    below = chord - curve  # convex decreasing curve: the knee is farthest below the chord
    # both ends lie on the chord by construction: roundoff must not make the last one "the knee" (it put
    # N at C - 2 instead of 1 for a concave curve, depending on the last bit)
    below[-1] = 0.0
    return max(1, int(torch.argmax(below)))


# ----------------------------------------------------------------------------------------------
# OOD metrics
# ----------------------------------------------------------------------------------------------


def ood_auroc(id_scores: Tensor, ood_scores: Tensor, validate_args: bool = True) -> Tensor:
    """AUROC of separating ID (positive) from OOD by a score where higher = more ID.

    The probability that a random ID sample scores above a random OOD one (ties count one half),
    computed from ranks. Returns a float64 scalar in ``[0, 1]``.

    Example:
        >>> import torch
        >>> ood_auroc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])).item()
        0.875
    """
    _check_scores(id_scores, validate_args, "id_scores")
    _check_scores(ood_scores, validate_args, "ood_scores")
    s = torch.cat([id_scores.double(), ood_scores.double().to(id_scores.device)])
    n_in, n_out = id_scores.numel(), ood_scores.numel()
    ranks = _average_ranks(s)
    return (ranks[:n_in].sum() - n_in * (n_in + 1) / 2) / (n_in * n_out)


def _average_ranks(s: Tensor) -> Tensor:
    """1-based ranks with ties given their average rank."""
    sorted_s, order = torch.sort(s, stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    avg = ends - (counts.double() - 1) / 2
    ranks = torch.empty_like(s, dtype=torch.float64)
    ranks[order] = avg[inverse]
    return ranks


def fpr_at_tpr(id_scores: Tensor, ood_scores: Tensor, tpr: float = 0.95, validate_args: bool = True) -> Tensor:
    """False-positive rate on OOD at the threshold that keeps ``tpr`` of the ID samples (FPR95).

    As ``fpr_recall`` in haoqiwang/vim: the threshold is the ``floor(tpr * N_id)``-th largest ID
    score, and the FPR is the share of OOD scores at or above it. Returns a float64 scalar.

    Example:
        >>> import torch
        >>> ids = torch.arange(1.0, 21.0)  # 20 ID scores; the 19th largest is 2.0
        >>> fpr_at_tpr(ids, torch.tensor([0.0, 1.5, 2.0, 30.0])).item()
        0.5
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    _check_scores(id_scores, validate_args, "id_scores")
    _check_scores(ood_scores, validate_args, "ood_scores")
    k = max(1, math.floor(tpr * id_scores.numel()))
    threshold = torch.sort(id_scores.double(), descending=True).values[k - 1]
    return (ood_scores.double().to(threshold.device) >= threshold).double().mean()


# ----------------------------------------------------------------------------------------------
# MaNo and accuracy-estimation baselines
# ----------------------------------------------------------------------------------------------


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or math.isnan(threshold):
        raise ValueError(f"threshold must be a number (MaNo's criterion threshold, officially 5), got {threshold!r}")


def mano_criterion(logits: Tensor, validate_args: bool = True) -> Tensor:
    """MaNo's dataset-level criterion: mean cross-entropy between the uniform distribution and softmax.

    ``(1/N) sum_n (1/C) sum_k -log softmax(z_n)_k``. Large when predictions are peaked
    (confident); MaNo uses softmax above its threshold and the Taylor normalization below.

    Args:
        logits: ``[N, C]`` logits of one data set.
        validate_args: check the logits are finite (a host sync).

    Returns:
        A scalar tensor, computed in at least float32 (float64 stays float64).

    Example:
        >>> import math, torch
        >>> round(mano_criterion(torch.zeros(2, 4)).item(), 6) == round(math.log(4), 6)
        True
    """
    _check_logits(logits, validate_args)
    return -_wide(logits).log_softmax(dim=1).mean(dim=1).mean()


def mano_select_normalization(
    logits: Tensor, threshold: float = 5.0, validate_args: bool = True
) -> Literal["softmax", "taylor"]:
    """MaNo's normalization: ``"softmax"`` when :func:`mano_criterion` exceeds ``threshold``, else ``"taylor"``.

    The official experiments (Renchunzi-Xie/MaNo ``main.py``) make this choice once, on the first
    shifted set, and reuse it for every set of the study, so that the scores of all sets are on
    one scale; do the same: choose once (e.g. on ID validation logits) and pass
    ``normalization=`` to :func:`mano_score` for every set.

    Args:
        logits: ``[N, C]`` logits of the set that decides (ID validation logits).
        threshold: the criterion's threshold (5, the official value).
        validate_args: check the logits are finite (a host sync).

    Example:
        >>> import torch
        >>> mano_select_normalization(torch.zeros(3, 4)), mano_select_normalization(20 * torch.eye(4))
        ('taylor', 'softmax')
    """
    _check_threshold(threshold)
    return "softmax" if float(mano_criterion(logits, validate_args)) > threshold else "taylor"


def mano_normalize(
    logits: Tensor,
    normalization: Literal["softmax", "taylor"] = "taylor",
    taylor_order: int = 2,
    validate_args: bool = True,
) -> Tensor:
    """MaNo's row normalization of logits onto the simplex.

    ``"softmax"``; or ``"taylor"``: ``v = 1 + sum_{i=1}^{order} z^i / i!`` (the Taylor expansion
    of ``exp``; the official code divides by ``i`` instead of ``i!``, identical for the default
    order 2), then ``v - min_k v`` and division by the row's L1 norm (rows of zeros stay zero).

    Args:
        logits: ``[N, C]`` logits (``N = 0`` gives an empty result).
        normalization: ``"taylor"`` (default) or ``"softmax"``.
        taylor_order: the order of the Taylor expansion, ``>= 1`` (default 2).
        validate_args: check the logits are finite (a host sync); shapes and dtype always.

    Example:
        >>> import torch
        >>> mano_normalize(torch.tensor([[0.0, 2.0]])).tolist()  # v = [1, 5] -> [0, 4] -> [0, 1]
        [[0.0, 1.0]]
    """
    _check_logits(logits, validate_args, allow_empty=True)
    z = _wide(logits)
    if normalization == "softmax":
        return z.softmax(dim=1)
    if normalization != "taylor":
        raise ValueError(f"normalization must be 'softmax' or 'taylor', got {normalization!r}")
    if taylor_order < 1:
        raise ValueError(f"taylor_order must be >= 1, got {taylor_order}")
    v = torch.ones_like(z)
    term = torch.ones_like(z)
    for i in range(1, taylor_order + 1):
        term = term * z / i
        v = v + term
    v = v - v.amin(dim=1, keepdim=True)
    return F.normalize(v, p=1, dim=1)


def mano_score(
    logits: Tensor,
    p: float = 4.0,
    normalization: MaNoNormalization = "auto",
    threshold: float = 5.0,
    taylor_order: int = 2,
    validate_args: bool = True,
) -> Tensor:
    """MaNo accuracy-estimation score ``||P||_p / (N C)^(1/p)`` of the normalized logits ``P``.

    ``normalization="auto"`` picks softmax when :func:`mano_criterion` of these logits exceeds
    ``threshold`` (default 5, the official value) and the Taylor normalization otherwise. To
    compare sets, choose once with :func:`mano_select_normalization` and pass the result (the
    official experiments fix the choice on the first set): otherwise sets on either side of the
    threshold get scores on different scales.
    The score is computed over all ``N`` rows at once (the official default, ``batch_size=None``).
    Higher = higher expected accuracy; it is a score to correlate with accuracy, not an accuracy.

    Args:
        logits: ``[N, C]`` logits on the (unlabelled) target set.
        p: norm order (default 4, the paper's).

    Example:
        >>> import torch
        >>> round(mano_score(torch.tensor([[0.0, 2.0], [2.0, 0.0]])).item(), 4)  # P = I: (2/4)^(1/4)
        0.8409
    """
    _check_logits(logits, validate_args)
    if not p >= 1:
        raise ValueError(f"p must be >= 1, got {p}")
    if normalization not in ("auto", "softmax", "taylor"):
        raise ValueError(f"normalization must be 'auto', 'softmax' or 'taylor', got {normalization!r}")
    _check_threshold(threshold)
    if normalization == "auto":
        normalization = "softmax" if float(mano_criterion(logits, validate_args=False)) > threshold else "taylor"
    probs = mano_normalize(logits, normalization, taylor_order, validate_args=False)  # checked above
    n, c = probs.shape
    return torch.linalg.vector_norm(probs.double().flatten(), ord=p) / (n * c) ** (1.0 / p)


def average_confidence(logits: Tensor, validate_args: bool = True) -> Tensor:
    """Average confidence (AC): the mean maximum softmax probability, an accuracy estimate.

    Example:
        >>> import torch
        >>> average_confidence(torch.tensor([[0.0, 0.0], [0.0, 0.0]])).item()
        0.5
    """
    return msp_score(logits, validate_args).mean()


def fit_atc_threshold(val_scores: Tensor, val_correct: Tensor, validate_args: bool = True) -> float:
    """ATC's threshold (Garg et al., 2022): the fraction of validation scores above it equals the accuracy.

    With ``E`` errors among ``N`` validation samples and the scores sorted ascending
    ``s_(0) <= ... <= s_(N-1)``, the threshold is ``s_(E)`` (so ``N - E`` scores are ``>=`` it when
    scores are distinct); ``+inf`` when every prediction is wrong. Any confidence score works
    (MSP, or negative entropy for ATC-NE).

    Args:
        val_scores: ``[N]`` confidence scores on labelled validation data.
        val_correct: ``[N]`` bool, whether each prediction is right.

    Example:
        >>> import torch
        >>> fit_atc_threshold(torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor([True, False, True, True]))
        0.4000000059604645
    """
    _check_scores(val_scores, validate_args, "val_scores")
    _check_correct(val_correct, val_scores.shape[0], "val_correct")
    errors = int((~val_correct.bool()).sum())
    if errors >= val_scores.numel():
        return math.inf
    return float(torch.sort(val_scores).values[errors])


def atc_estimate(target_scores: Tensor, threshold: float, validate_args: bool = True) -> Tensor:
    """ATC's accuracy estimate: the fraction of target scores at or above the fitted threshold.

    Example:
        >>> import torch
        >>> atc_estimate(torch.tensor([0.1, 0.5, 0.7, 0.3]), 0.4).item()
        0.5
    """
    _check_scores(target_scores, validate_args, "target_scores")
    if isinstance(threshold, bool) or math.isnan(float(threshold)):
        raise ValueError(
            "threshold must be a number (from fit_atc_threshold; +inf when every prediction was wrong), "
            f"got {threshold!r}"
        )
    return (target_scores.double() >= threshold).double().mean()


# ----------------------------------------------------------------------------------------------
# selective classification
# ----------------------------------------------------------------------------------------------


def risk_coverage_curve(scores: Tensor, correct: Tensor, validate_args: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Risk-coverage curve of selective classification by a confidence score.

    Accept the samples whose score is at least a threshold; at each distinct threshold (scores in
    descending order, tied scores accepted together) the coverage is the accepted share and the
    risk the error rate among them.

    Args:
        scores: ``[N]`` confidence, higher = more confident.
        correct: ``[N]`` bool, whether each prediction is right.

    Returns:
        ``(coverage, risk, thresholds)``, each ``[K]`` float64 for ``K`` distinct scores, coverage
        increasing to 1.

    Example:
        >>> import torch
        >>> cov, risk, thr = risk_coverage_curve(torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True]))
        >>> [round(r, 4) for r in risk.tolist()]
        [0.0, 0.5, 0.3333]
    """
    _check_scores(scores, validate_args, "scores")
    _check_correct(correct, scores.shape[0])
    sorted_scores, order = torch.sort(scores.double(), descending=True, stable=True)
    errors = (~correct.bool()[order]).double().cumsum(0)
    n = scores.numel()
    # the last position of every group of tied scores
    _, counts = torch.unique_consecutive(sorted_scores, return_counts=True)
    last = torch.cumsum(counts, 0) - 1
    accepted = (last + 1).double()
    return accepted / n, errors[last] / accepted, sorted_scores[last]


def aurc(scores: Tensor, correct: Tensor, validate_args: bool = True) -> Tensor:
    """Area under the risk-coverage curve: the mean over ``k = 1..N`` of the risk of the ``k`` most confident.

    ``AURC = (1/N) sum_k risk_k`` (Geifman et al., 2019), lower is better; tied scores share the
    risk of their group (accepted together). A perfect ranking with ``E`` errors has
    ``AURC = sum_{k=N-E+1}^{N} (k - N + E) / k / N``.

    Example:
        >>> import torch
        >>> scores, correct = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True])
        >>> round(aurc(scores, correct).item(), 4)  # (0 + 1/2 + 1/3) / 3
        0.2778
    """
    coverage, risk, _ = risk_coverage_curve(scores, correct, validate_args)
    counts = torch.diff(coverage, prepend=coverage.new_zeros(1)) * scores.numel()
    return (risk * counts).sum() / scores.numel()


def excess_aurc(scores: Tensor, correct: Tensor, validate_args: bool = True) -> Tensor:
    """E-AURC: :func:`aurc` minus the AURC of a perfect ranking with the same errors (Geifman et al., 2019).

    Separates the quality of the ranking from the error rate: 0 for a ranking that puts every
    error last; compare scores (or models) by it when their accuracies differ.

    Example:
        >>> import torch
        >>> scores, correct = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([True, False, True])
        >>> round(excess_aurc(scores, correct).item(), 4)  # (0 + 1/2 + 1/3) / 3 - (0 + 0 + 1/3) / 3
        0.1667
    """
    value = aurc(scores, correct, validate_args)
    n = scores.numel()
    errors = int((~correct.bool()).sum())
    k = torch.arange(n - errors + 1, n + 1, dtype=torch.float64, device=value.device)
    optimal = ((k - (n - errors)) / k).sum() / n
    return value - optimal


def normalized_logit_score(logits: Tensor, p: float = 2.0, center: bool = False, validate_args: bool = True) -> Tensor:
    """Selective-classification confidence from p-norm-normalized logits (the label-smoothing fix).

    ``max_k z_k / ||z||_p`` per sample (``center=True`` first subtracts the mean logit), computed
    in float64 as ``norm_logits`` followed by the max in Xia et al.'s code. It keeps the
    prediction and re-ranks samples, undoing the damage label smoothing does to the MSP ranking.

    Example:
        >>> import torch
        >>> normalized_logit_score(torch.tensor([[3.0, 4.0]])).tolist()
        [0.8]
    """
    if not p > 0:
        raise ValueError(f"p must be positive, got {p}")
    _check_logits(logits, validate_args)
    z = logits.double()
    if center:
        z = z - z.mean(dim=1, keepdim=True)
    norm = torch.linalg.vector_norm(z, ord=p, dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    return z.amax(dim=1) / norm


# ----------------------------------------------------------------------------------------------
# calibration
# ----------------------------------------------------------------------------------------------


def expected_calibration_error(
    logits: Tensor,
    target: Tensor,
    n_bins: int = 15,
    norm: Literal["l1", "l2", "max"] = "l1",
    validate_args: bool = True,
) -> Tensor:
    """Top-label expected calibration error, by ``torchmetrics.functional.classification.multiclass_calibration_error``.

    ``ECE = sum_b |B_b|/N |acc(B_b) - conf(B_b)|`` over ``n_bins`` equal-width confidence bins
    (default 15).

    Example:
        >>> import torch
        >>> logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
        >>> round(expected_calibration_error(logits, torch.tensor([0, 1])).item(), 4)  # (0.1 + 0.6) / 2
        0.35
    """
    from torchmetrics.functional.classification import multiclass_calibration_error

    _check_logits(logits, validate_args)
    _check_labels(target, logits.shape[0], logits.shape[1], validate_args)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    probs = _wide(logits).softmax(dim=1)
    return multiclass_calibration_error(
        probs, target.long(), num_classes=logits.shape[1], n_bins=n_bins, norm=norm, validate_args=False
    )


def fit_temperature(
    logits: Tensor, target: Tensor, max_iter: int = 100, init: float = 1.0, validate_args: bool = True
) -> float:
    """Temperature scaling: the ``T`` minimizing the NLL of ``softmax(z / T)`` on validation data.

    Optimizes ``log T`` with LBFGS (strong-Wolfe line search) in float64, so ``T > 0``.
    Divide test logits by the returned ``T`` before the softmax; predictions do not change.

    Args:
        logits: ``[N, C]`` validation logits.
        target: ``[N]`` int64 labels in ``[0, C)``.
        max_iter: LBFGS iterations.
        init: starting temperature.
        validate_args: check the logits are finite and the labels in range (a host sync).

    Returns:
        The temperature ``T > 0`` as a Python float.

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> z = torch.randn(2000, 5, generator=g) * 2
        >>> y = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
        >>> abs(fit_temperature(3 * z, y) - 3.0) < 0.3  # logits 3x too sharp
        True
    """
    _check_logits(logits, validate_args)
    _check_labels(target, logits.shape[0], logits.shape[1], validate_args)
    if not (init > 0 and math.isfinite(init)):
        raise ValueError(f"init must be a finite positive temperature, got {init}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1 (LBFGS iterations), got {max_iter!r}")
    # Callable at validation/test end, where Lightning runs under inference mode: the clones made
    # outside inference mode are ordinary tensors that autograd accepts.
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().clone().double()
        y = target.detach().clone().long().to(z.device)
        log_t = torch.tensor([math.log(init)], dtype=torch.float64, device=z.device, requires_grad=True)
        opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z / log_t.exp(), y)
            loss.backward()
            return loss

        opt.step(closure)
        t = float(log_t.detach().exp())
    if not math.isfinite(t):
        warnings.warn("temperature scaling diverged; returning T = 1", stacklevel=2)
        return 1.0
    return t


def dual_focal_loss(
    logits: Tensor,
    target: Tensor,
    gamma: float = 5.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
    validate_args: bool = True,
) -> Tensor:
    """Dual focal loss ``-(1 - p_y + p_j)^gamma log p_y`` (Tao et al., ICML 2023).

    ``p_j`` is the largest probability strictly below the target's ``p_y`` ("the highest logit
    ranked after the ground truth logit"), zero if none, as ``dual_focal_loss.py`` of
    Linwei94/DualFocalLoss: when the target is the argmax, ``p_j`` is the runner-up; when it is
    not, ``p_j`` is the next class below it (not the argmax). Gradients flow through ``p_y`` and
    ``p_j``. Float16/bfloat16 inputs are computed in float32.

    Args:
        logits: ``[N, C]``.
        target: int ``[N]`` class indices.
        gamma: focusing parameter (default 5.0; the official code's default 0 is cross-entropy,
            and the paper tunes gamma per data set and model).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"`` (``[N]``).

    Example:
        >>> import math, torch
        >>> logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
        >>> loss = dual_focal_loss(logits, torch.tensor([0]), gamma=1.0)
        >>> round(loss.item(), 4) == round(-(1 - 0.7 + 0.2) * math.log(0.7), 4)
        True
    """
    _check_logits(logits, validate_args)
    _check_labels(target, logits.shape[0], logits.shape[1], validate_args)
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    z = _wide(logits)
    log_probs = z.log_softmax(dim=1)
    probs = log_probs.exp()
    y = target.long().unsqueeze(1)
    log_py = log_probs.gather(1, y).squeeze(1)
    p_y = log_py.exp()
    below = probs < p_y.detach().unsqueeze(1)
    p_j = (probs * below).amax(dim=1)
    loss = -((1 - p_y + p_j).clamp_min(0) ** gamma) * log_py
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return result_in_dtype(loss, logits.dtype, validate_args)

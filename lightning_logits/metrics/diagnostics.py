"""Diagnostics metrics: OOD detection (AUROC, FPR at 95% TPR), AURC and the MaNo score.

Their states are lists concatenated across ranks (``dist_reduce_fx="cat"``) or sums, so under
DDP ``compute()`` sees the data of every rank and returns what one process would return on the
concatenated data.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_logits.functional.diagnostics import (
    MaNoNormalization,
    aurc,
    fpr_at_tpr,
    mano_normalize,
    ood_auroc,
)

__all__ = ["AURC", "MaNoScore", "OODDetection"]


class OODDetection(Metric):
    """AUROC and FPR at ``tpr`` (default 95%) TPR from in- and out-of-distribution scores.

    Higher score = more in-distribution (ID is the positive class). Call :meth:`update` with ID
    scores, OOD scores, or both; :meth:`compute` returns ``{"auroc": ..., "fpr": ...}``.

    Args:
        tpr: share of ID samples kept at the FPR threshold (default 0.95).

    Example:
        >>> import torch
        >>> metric = OODDetection()
        >>> metric.update(id_scores=torch.tensor([3.0, 2.0]), ood_scores=torch.tensor([1.0, 2.0]))
        >>> {k: round(v.item(), 3) for k, v in metric.compute().items()}
        {'auroc': 0.875, 'fpr': 0.0}
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    scores: list[Tensor]
    is_id: list[Tensor]

    def __init__(self, tpr: float = 0.95, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < tpr <= 1:
            raise ValueError(f"tpr must be in (0, 1], got {tpr}")
        self.tpr = tpr
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("is_id", default=[], dist_reduce_fx="cat")

    def update(self, id_scores: Tensor | None = None, ood_scores: Tensor | None = None) -> None:
        """Add ``[N]`` ID scores and/or ``[M]`` OOD scores."""
        for scores, flag in ((id_scores, True), (ood_scores, False)):
            if scores is None:
                continue
            if not isinstance(scores, Tensor):
                raise TypeError(f"scores must be a torch.Tensor [N], got {type(scores).__name__}")
            if scores.ndim != 1:
                raise ValueError(f"scores must have shape [N], got {tuple(scores.shape)}")
            self.scores.append(scores.detach().double())
            self.is_id.append(torch.full(scores.shape, flag, dtype=torch.bool, device=scores.device))

    def compute(self) -> dict[str, Tensor]:
        scores, is_id = dim_zero_cat(self.scores), dim_zero_cat(self.is_id).bool()
        if not bool(is_id.any()) or bool(is_id.all()):
            raise ValueError(
                f"OOD detection needs both in- and out-of-distribution scores; got {int(is_id.sum())} ID and "
                f"{int((~is_id).sum())} OOD (is the OOD loader empty?)"
            )
        return {
            "auroc": ood_auroc(scores[is_id], scores[~is_id]),
            "fpr": fpr_at_tpr(scores[is_id], scores[~is_id], self.tpr),
        }


class AURC(Metric):
    """Area under the risk-coverage curve of a confidence score (lower is better).

    Example:
        >>> import torch
        >>> metric = AURC()
        >>> metric.update(torch.tensor([0.9, 0.8]), torch.tensor([True, False]))
        >>> metric.update(torch.tensor([0.7]), torch.tensor([True]))
        >>> round(metric.compute().item(), 4)  # (0 + 1/2 + 1/3) / 3
        0.2778
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    scores: list[Tensor]
    correct: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, correct: Tensor) -> None:
        """Add ``[N]`` confidence scores and ``[N]`` bool correctness."""
        if scores.ndim != 1 or correct.shape != scores.shape:
            raise ValueError(
                f"scores and correct must both have shape [N], got {tuple(scores.shape)} and {tuple(correct.shape)}"
            )
        self.scores.append(scores.detach().double())
        self.correct.append(correct.detach().bool())

    def compute(self) -> Tensor:
        if isinstance(self.scores, list) and not self.scores:  # after a DDP sync the state is one tensor
            raise ValueError("AURC has no scores; call update(scores, correct) first (is the loader empty?)")
        return aurc(dim_zero_cat(self.scores), dim_zero_cat(self.correct).bool())


class MaNoScore(Metric):
    """The MaNo accuracy-estimation score over batches, as :func:`~lightning_logits.functional.mano_score`.

    Keeps sums only (of ``|softmax|^p``, of ``|taylor|^p``, of the per-sample criterion, and the
    entry count), so the dataset-level choice between softmax and the Taylor normalization and the
    final ``||P||_p / (N C)^(1/p)`` equal :func:`mano_score` on the concatenated logits.

    Example:
        >>> import torch
        >>> metric = MaNoScore()
        >>> metric.update(torch.tensor([[0.0, 2.0]]))
        >>> metric.update(torch.tensor([[2.0, 0.0]]))
        >>> round(metric.compute().item(), 4)
        0.8409
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    pow_softmax: Tensor
    pow_taylor: Tensor
    criterion_sum: Tensor
    num_samples: Tensor
    num_entries: Tensor

    def __init__(
        self,
        p: float = 4.0,
        normalization: MaNoNormalization = "auto",
        threshold: float = 5.0,
        taylor_order: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not p >= 1:
            raise ValueError(f"p must be >= 1, got {p}")
        if normalization not in ("auto", "softmax", "taylor"):
            raise ValueError(f"normalization must be 'auto', 'softmax' or 'taylor', got {normalization!r}")
        if taylor_order < 1:
            raise ValueError(f"taylor_order must be >= 1, got {taylor_order}")
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or math.isnan(threshold):
            raise ValueError(
                f"threshold must be a number (MaNo's criterion threshold, officially 5), got {threshold!r}"
            )
        self.p, self.normalization, self.threshold, self.taylor_order = p, normalization, threshold, taylor_order
        for name in ("pow_softmax", "pow_taylor", "criterion_sum", "num_samples", "num_entries"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor) -> None:
        """Add ``[N, C]`` logits of the (unlabelled) target set."""
        if logits.ndim != 2 or logits.shape[1] < 2:
            raise ValueError(f"logits must have shape [N, C] with C >= 2, got {tuple(logits.shape)}")
        z = logits.detach().double()
        # no host read per batch: non-finite logits turn the sums non-finite, which compute() refuses
        self.pow_softmax += mano_normalize(z, "softmax", validate_args=False).abs().pow(self.p).sum()
        self.pow_taylor += mano_normalize(z, "taylor", self.taylor_order, validate_args=False).abs().pow(self.p).sum()
        self.criterion_sum += -z.log_softmax(dim=1).mean(dim=1).sum()
        self.num_samples += z.shape[0]
        self.num_entries += z.numel()

    def compute(self) -> Tensor:
        if float(self.num_samples) == 0:
            raise ValueError("MaNoScore has no logits; is the shifted loader empty?")
        sums = torch.stack([self.pow_softmax, self.pow_taylor, self.criterion_sum])
        if not bool(torch.isfinite(sums).all()):
            raise ValueError(
                "MaNoScore was updated with non-finite logits (NaN or inf); check the model's forward pass "
                "on the shifted set"
            )
        normalization = self.normalization
        if normalization == "auto":
            criterion = float(self.criterion_sum / self.num_samples)
            normalization = "softmax" if criterion > self.threshold else "taylor"
        total = self.pow_softmax if normalization == "softmax" else self.pow_taylor
        return (total / self.num_entries) ** (1.0 / self.p)

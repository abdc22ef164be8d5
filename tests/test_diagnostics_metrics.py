"""Diagnostics metrics: accumulated values equal the functional ones on the concatenated data, one process and DDP."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_logits.functional import aurc, fpr_at_tpr, mano_score, msp_score, ood_auroc
from lightning_logits.metrics import AURC, MaNoScore, OODDetection
from tests.helpers import fast_trainer


def _data(n: int = 96, c: int = 5, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, c, (n,), generator=g)
    is_ood = torch.arange(n) % 3 == 0
    logits[is_ood] /= 4  # OOD samples are less confident
    return logits, labels, is_ood


def _expected(logits: Tensor, labels: Tensor, is_ood: Tensor) -> dict[str, float]:
    scores = msp_score(logits)
    ind = ~is_ood
    return {
        "auroc": ood_auroc(scores[ind], scores[is_ood]).item(),
        "fpr": fpr_at_tpr(scores[ind], scores[is_ood]).item(),
        "aurc": aurc(scores[ind], logits[ind].argmax(1) == labels[ind]).item(),
        "mano": mano_score(logits[ind]).item(),
    }


def _update(metrics: dict[str, Any], logits: Tensor, labels: Tensor, is_ood: Tensor) -> None:
    scores = msp_score(logits)
    ind = ~is_ood
    metrics["ood"].update(id_scores=scores[ind], ood_scores=scores[is_ood])
    metrics["aurc"].update(scores[ind], logits[ind].argmax(1) == labels[ind])
    metrics["mano"].update(logits[ind])


def _compute(metrics: dict[str, Any]) -> dict[str, float]:
    ood = metrics["ood"].compute()
    return {
        "auroc": ood["auroc"].item(),
        "fpr": ood["fpr"].item(),
        "aurc": metrics["aurc"].compute().item(),
        "mano": metrics["mano"].compute().item(),
    }


def test_metrics_over_batches_equal_functional_on_all_data() -> None:
    logits, labels, is_ood = _data()
    metrics = {"ood": OODDetection(), "aurc": AURC(), "mano": MaNoScore()}
    for chunk in torch.arange(len(labels)).split(10):
        _update(metrics, logits[chunk], labels[chunk], is_ood[chunk])
    got, want = _compute(metrics), _expected(logits, labels, is_ood)
    assert got == pytest.approx(want, rel=1e-12)
    assert 0.5 < got["auroc"] <= 1.0


def test_mano_metric_takes_both_branches() -> None:
    logits, _, _ = _data()
    for scale, branch in ((0.5, "taylor"), (30.0, "softmax")):
        metric = MaNoScore()
        for part in (logits * scale).split(7):
            metric.update(part)
        assert metric.compute().item() == pytest.approx(mano_score(logits * scale).item(), rel=1e-12)
        assert metric.compute().item() == pytest.approx(
            mano_score(logits * scale, normalization=branch).item(), rel=1e-12
        )


def test_ood_metric_needs_both_sets() -> None:
    metric = OODDetection()
    metric.update(id_scores=torch.rand(5))
    with pytest.raises(ValueError, match="0 OOD"):
        metric.compute()
    with pytest.raises(ValueError, match="tpr"):
        OODDetection(tpr=1.5)


class _MetricProbe(pl.LightningModule):
    """Feeds each rank's share of the validation data to the metrics; rank 0 writes the result."""

    def __init__(self, out_file: str) -> None:
        super().__init__()
        self.out_file = out_file
        self.layer = torch.nn.Linear(1, 1)  # DDP needs a parameter
        self.ood, self.aurc, self.mano = OODDetection(), AURC(), MaNoScore()

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        logits, labels, is_ood = batch
        _update({"ood": self.ood, "aurc": self.aurc, "mano": self.mano}, logits, labels, is_ood)

    def on_validation_epoch_end(self) -> None:
        result = _compute({"ood": self.ood, "aurc": self.aurc, "mano": self.mano})  # syncs across ranks
        result["world_size"] = self.trainer.world_size
        if self.trainer.is_global_zero:
            Path(self.out_file).write_text(json.dumps(result))

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(*_data()), batch_size=8)


@pytest.mark.ddp
def test_metrics_under_ddp_spawn_equal_one_process(ddp_env: int, tmp_path: Path) -> None:
    out = tmp_path / "ddp.json"
    trainer = fast_trainer(strategy="ddp_spawn", devices=2)
    trainer.validate(_MetricProbe(str(out)))
    got = json.loads(out.read_text())
    assert got.pop("world_size") == 2
    # 96 samples split evenly (no padding), so the reduced state is exactly the full data
    assert got == pytest.approx(_expected(*_data()), rel=1e-9)

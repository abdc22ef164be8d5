"""Mowst suite: the cost of a Mowst training epoch and of Mowst inference against one GNN alone.

One epoch is one full-batch optimizer step. ``gcn_alone`` trains the strong expert alone
(:class:`GNNClassifier`); the Mowst cases time a step of each turn (weak expert + gate with the
GNN frozen; GNN with the weak side frozen), the strong turn again without reusing the frozen side's
outputs (``cache_frozen=False``), and Mowst* (everything trained jointly). The paper claims a cost
comparable to one GNN: target at most 1.5. ``*_inference`` cases time an evaluation forward pass
(Mowst: both experts, the gate and a seeded random routing) inside a training step so the harness
can time it.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.harness import SpeedCase
from lightning_logits.data.graphs import CSBMConfig, GraphDataModule
from lightning_logits.functional.mowst import mowst_route
from lightning_logits.modules.mowst import GNNClassifier, Mowst


class InferenceStep(pl.LightningModule):
    """Times ``inner``'s inference as a "training step"; a dummy optimizer step advances ``global_step``."""

    def __init__(self, inner: pl.LightningModule) -> None:
        super().__init__()
        self.inner = inner
        self.dummy = nn.Parameter(torch.zeros(1))
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        self.inner.eval()
        with torch.no_grad():
            if isinstance(self.inner, Mowst):
                weak_logits, strong_logits, conf = self.inner(batch.x, batch.edge_index)
                generator = torch.Generator(device=conf.device).manual_seed(0)
                mowst_route(weak_logits, strong_logits, conf, generator=generator)
            else:
                self.inner(batch.x, batch.edge_index).argmax(dim=1)
        self.optimizers().step()  # type: ignore[union-attr]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.dummy], lr=0.0)


def speed_cases(smoke: bool) -> list[SpeedCase]:
    cfg = CSBMConfig(num_nodes=300 if smoke else 2000, num_classes=4, num_features=32, homophily=0.5, avg_degree=10)
    size = dict(num_features=cfg.num_features, num_classes=cfg.num_classes, hidden=64, num_layers=2, dropout=0.5)
    long_turn = 10**6  # keep one turn for the whole run

    def data() -> GraphDataModule:
        return GraphDataModule(csbm=cfg)

    def gnn() -> GNNClassifier:
        return GNNClassifier("gcn", **size)

    def mowst(**kwargs: Any) -> Mowst:
        return Mowst(strong="gcn", max_turn_epochs=long_turn, **size, **kwargs)

    def weak_turn() -> Mowst:
        return mowst()

    def strong_turn() -> Mowst:
        return mowst(first_turn="strong")

    def strong_turn_nocache() -> Mowst:
        return mowst(first_turn="strong", cache_frozen=False)

    def star() -> Mowst:
        return mowst(variant="mowst_star")

    def gnn_inference() -> InferenceStep:
        return InferenceStep(gnn())

    def mowst_inference() -> InferenceStep:
        return InferenceStep(mowst())

    return [
        SpeedCase("gcn_alone", gnn, data),
        SpeedCase("mowst_weak_turn", weak_turn, data, baseline="gcn_alone", target=1.5),
        SpeedCase("mowst_strong_turn", strong_turn, data, baseline="gcn_alone", target=1.5),
        SpeedCase("mowst_strong_turn_nocache", strong_turn_nocache, data, baseline="gcn_alone", target=1.5),
        SpeedCase("mowst_star", star, data, baseline="gcn_alone", target=1.5),
        SpeedCase("gcn_inference", gnn_inference, data),
        SpeedCase("mowst_inference", mowst_inference, data, baseline="gcn_inference", target=1.5),
    ]

"""Mowst suite: the cost of a Mowst training epoch and of Mowst inference against one GNN alone.

One epoch is one full-batch optimizer step. ``gcn_alone`` trains the strong expert alone
(:class:`GNNClassifier`); the Mowst cases time a step of each turn (weak expert + gate with the
GNN frozen; GNN with the weak side frozen), the strong turn again without reusing the frozen side's
outputs (``cache_frozen=False``), Mowst with a turn change at every epoch (``mowst_alternating``:
the frozen side is recomputed every step, the worst case), Mowst pretraining the GNN alone, and
Mowst* (everything trained jointly). The paper claims a cost comparable to one GNN: target at
most 1.5. ``*_inference`` cases time an evaluation forward pass (Mowst: both experts, the gate and
a seeded random routing) inside a training step so the harness can time it.

    python -m benchmarks.speed --suite mowst --steps 20 --warmup 3 --rounds 3

Scaling of an epoch's time with the number of edges (CSBM graphs of ``--nodes`` nodes whose mean
degree gives the requested number of directed edges; GCN alone, Mowst's two turns and Mowst*):

    python -m benchmarks.bench_mowst --scaling --edges 10000 100000 1000000 --nodes 10000
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.harness import SpeedCase, time_case
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

    def alternating() -> Mowst:
        # without validation no round improves: a huge round patience keeps it alternating
        return Mowst(strong="gcn", max_turn_epochs=1, round_patience=10**6, **size)

    def pretrain_strong() -> Mowst:
        return mowst(pretrain="strong", pretrain_epochs=long_turn)

    def gnn_inference() -> InferenceStep:
        return InferenceStep(gnn())

    def mowst_inference() -> InferenceStep:
        return InferenceStep(mowst())

    return [
        SpeedCase("gcn_alone", gnn, data),
        SpeedCase("mowst_weak_turn", weak_turn, data, baseline="gcn_alone", target=1.5),
        SpeedCase("mowst_strong_turn", strong_turn, data, baseline="gcn_alone", target=1.5),
        SpeedCase("mowst_strong_turn_nocache", strong_turn_nocache, data, baseline="gcn_alone", target=1.5),
        SpeedCase("mowst_alternating", alternating, data, baseline="gcn_alone", target=1.5),
        SpeedCase("mowst_pretrain_strong", pretrain_strong, data, baseline="gcn_alone", target=1.5),
        SpeedCase("mowst_star", star, data, baseline="gcn_alone", target=1.5),
        SpeedCase("gcn_inference", gnn_inference, data),
        SpeedCase("mowst_inference", mowst_inference, data, baseline="gcn_inference", target=1.5),
    ]


def scaling(edges: list[int], nodes: int, steps: int, warmup: int) -> str:
    """Median epoch time (ms) of GCN alone, Mowst's weak and strong turns and Mowst* against the edge count."""
    size = dict(num_features=32, num_classes=4, hidden=64, num_layers=2, dropout=0.5)
    long_turn = 10**6
    makers: dict[str, Any] = {
        "GCN": lambda: GNNClassifier("gcn", **size),
        "Mowst weak turn": lambda: Mowst(strong="gcn", max_turn_epochs=long_turn, **size),
        "Mowst strong turn": lambda: Mowst(strong="gcn", max_turn_epochs=long_turn, first_turn="strong", **size),
        "Mowst*": lambda: Mowst(strong="gcn", variant="mowst_star", **size),
    }
    lines = [
        f"### scaling: epoch time against the number of edges (CSBM, {nodes} nodes, hidden 64, "
        f"median of {steps} steps)",
        "",
        "| directed edges | " + " | ".join(f"{k} ms" for k in makers) + " | Mowst* / GCN | GCN µs per 1k edges |",
        "|---:|" + "---:|" * (len(makers) + 2),
    ]
    for target in edges:
        cfg = CSBMConfig(num_nodes=nodes, num_classes=4, num_features=32, homophily=0.5, avg_degree=target / nodes)
        data = GraphDataModule(csbm=cfg)
        realized = int(data.graph().edge_index.shape[1])
        medians = {}
        for name, make in makers.items():
            case = SpeedCase(name, make, lambda d=data: d)
            medians[name] = 1000 * statistics.median(time_case(case, steps, warmup, accelerator="cpu"))
        cells = " | ".join(f"{v:.1f}" for v in medians.values())
        per_k = 1000 * medians["GCN"] / (realized / 1000)
        lines.append(f"| {realized} | {cells} | {medians['Mowst*'] / medians['GCN']:.2f} | {per_k:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaling", action="store_true", help="time epochs against the number of edges")
    parser.add_argument("--edges", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    args = parser.parse_args(argv)
    if not args.scaling:
        parser.error("only --scaling runs here; the epoch ratios: python -m benchmarks.speed --suite mowst")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    start = time.time()
    table = scaling(args.edges, args.nodes, args.steps, args.warmup)
    print(table + f"\n\nTotal time: {time.time() - start:.0f} s.", flush=True)
    return table


if __name__ == "__main__":
    main()

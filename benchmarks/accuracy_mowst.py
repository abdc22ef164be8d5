"""Accuracy of MLP alone, GNN alone, Mowst and Mowst* on contextual SBM graphs.

Sweeps the edge homophily (strongly heterophilous to strongly homophilous) and the feature signal;
every cell is the mean ± std of the test accuracy over seeds (a new graph, split and
initialization per seed). Every method trains full-batch with AdamW and early stopping on
validation accuracy, restoring its best weights. Mowst reports the expected accuracy of random
routing, Mowst* its deterministic mixture.

    python -m benchmarks.accuracy_mowst            # the real run (~5-10 min of CPU)
    python -m benchmarks.accuracy_mowst --smoke    # checks the code runs (< 30 s)

Writes benchmarks/results/mowst_accuracy.md and mowst_accuracy.png (``--smoke``: *_smoke.*).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from benchmarks.harness import quiet_trainer
from lightning_logits.data.graphs import CSBMConfig, GraphDataModule, csbm_graph, edge_homophily
from lightning_logits.modules.mowst import GNNClassifier, Mowst

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("mlp", "gnn", "mowst", "mowst_star")
LABELS = {"mlp": "MLP", "gnn": "GNN", "mowst": "Mowst", "mowst_star": "Mowst*"}


def make_module(
    method: str, gnn: str, size: dict[str, Any], patience: int, turn_epochs: int, pretrain: int = 0
) -> pl.LightningModule:
    adamw = partial(torch.optim.AdamW, lr=0.01, weight_decay=5e-4)
    if method == "mlp":
        return GNNClassifier("mlp", patience=patience, optimizer=adamw, **size)
    if method == "gnn":
        return GNNClassifier(gnn, patience=patience, optimizer=adamw, **size)
    return Mowst(
        strong=gnn,
        variant=method,
        patience=patience if method == "mowst_star" else max(patience // 2, 1),
        max_turn_epochs=turn_epochs,
        round_patience=0,
        pretrain="joint" if pretrain else "none",
        pretrain_epochs=pretrain,
        weak_optimizer=adamw,
        strong_optimizer=adamw,
        joint_optimizer=adamw,
        **size,
    )


def run_one(
    method: str,
    cfg: CSBMConfig,
    gnn: str,
    seed: int,
    max_epochs: int,
    patience: int,
    turn_epochs: int,
    pretrain: int = 0,
) -> float:
    pl.seed_everything(seed, verbose=False)
    data = csbm_graph(cfg, seed=seed)
    size = dict(num_features=cfg.num_features, num_classes=cfg.num_classes, hidden=32, num_layers=2, dropout=0.5)
    module = make_module(method, gnn, size, patience, turn_epochs, pretrain)
    trainer = quiet_trainer(max_epochs=max_epochs)
    dm = GraphDataModule(data=data)
    trainer.fit(module, datamodule=dm)
    (result,) = trainer.test(module, datamodule=dm, verbose=False)
    return float(result["test/acc"])


def plot(rows: list[dict[str, Any]], signals: list[float], path: Path, gnn: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(signals), figsize=(5 * len(signals), 4), squeeze=False)
    for ax, signal in zip(axes[0], signals, strict=True):
        sub = [r for r in rows if r["signal"] == signal]
        hs = [r["homophily"] for r in sub]
        for method in METHODS:
            means = [r[method][0] for r in sub]
            stds = [r[method][1] for r in sub]
            label = LABELS[method] if method != "gnn" else gnn.upper()
            ax.errorbar(hs, means, yerr=stds, marker="o", capsize=3, label=label)
        ax.set_xlabel("edge homophily")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"CSBM, feature signal {signal}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="one tiny cell, one seed: checks the code runs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--gnn", default="gcn", choices=["gcn", "sage", "gat", "gin"])
    parser.add_argument("--homophily", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    parser.add_argument("--signal", type=float, nargs="+", default=[0.5, 1.5])
    parser.add_argument("--nodes", type=int, default=400)
    parser.add_argument(
        "--pretrain-epochs", type=int, default=20, help="Mowst/Mowst*: plain-CE epochs of both experts first"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.smoke:
        homophilies, signals, seeds, nodes = [0.2], [1.0], 1, 150
        max_epochs, patience, turn_epochs, pretrain = 12, 3, 4, 2
    else:
        homophilies, signals, seeds, nodes = args.homophily, args.signal, args.seeds, args.nodes
        max_epochs, patience, turn_epochs, pretrain = 120, 10, 20, args.pretrain_epochs
    start = time.time()
    rows: list[dict[str, Any]] = []
    for signal in signals:
        for h in homophilies:
            cfg = CSBMConfig(num_nodes=nodes, num_classes=4, homophily=h, num_features=32, feature_signal=signal)
            row: dict[str, Any] = {"homophily": h, "signal": signal}
            realized = [edge_homophily(g.edge_index, g.y) for g in (csbm_graph(cfg, seed=s) for s in range(seeds))]
            row["realized"] = statistics.mean(realized)
            for method in METHODS:
                accs = [
                    run_one(method, cfg, args.gnn, s, max_epochs, patience, turn_epochs, pretrain) for s in range(seeds)
                ]
                row[method] = (statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0)
            rows.append(row)
            print(f"done h={h} signal={signal} ({time.time() - start:.0f} s)", flush=True)
    gnn = args.gnn.upper()
    lines = [
        f"### accuracy: Mowst vs MLP and {gnn} on CSBM graphs ({nodes} nodes, 4 classes, 32 features)",
        "",
        f"Test accuracy, mean ± std over {seeds} seed(s); Mowst - {gnn} is the difference of means.",
        "",
        f"| feature signal | homophily (realized) | MLP | {gnn} | Mowst | Mowst* | Mowst - {gnn} |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[m][0]:.3f} ± {r[m][1]:.3f}" for m in METHODS)
        lines.append(
            f"| {r['signal']} | {r['homophily']} ({r['realized']:.2f}) | {cells} | {r['mowst'][0] - r['gnn'][0]:+.3f} |"
        )
    lines += ["", f"Total time: {time.time() - start:.0f} s."]
    table = "\n".join(lines)
    print(table, flush=True)
    suffix = "_smoke" if args.smoke else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"mowst_accuracy{suffix}.md").write_text(table + "\n")
    plot(rows, signals, args.out / f"mowst_accuracy{suffix}.png", args.gnn)
    return table


if __name__ == "__main__":
    main()

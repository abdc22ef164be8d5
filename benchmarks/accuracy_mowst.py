"""Accuracy of MLP alone, GNN alone, Mowst and Mowst* on contextual SBM graphs.

Sweeps the edge homophily (strongly heterophilous to strongly homophilous), the feature signal, the
graph size and the GNN. Every cell is the mean ± std of the test accuracy over seeds (a new graph,
split and initialization per seed); ``Mowst - GNN`` is the paired difference (same graph and
split per seed), mean ± std. Budgets as the Mowst authors run them: every method stops early on
validation accuracy with the same ``--patience`` and restores its best weights; Mowst pretrains
the GNN alone (``--pretrain strong``, early-stopped with the same patience), its turns end on
patience only and training stops after more than ``--round-patience`` rounds without a gain;
``--max-epochs`` is a safety net, and the table counts the runs that hit it (it should be 0).
Mowst reports the expected accuracy of random routing, Mowst* its deterministic mixture; both
report the mean confidence ``C`` and the share of test nodes routed to the MLP.

    python -m benchmarks.accuracy_mowst            # the full grid of the issue (hours on 2 CPU cores)
    python -m benchmarks.accuracy_mowst --nodes 400 --gnn gcn --homophily 0.1 0.5 0.9 --signal 1.5 --seeds 3
    python -m benchmarks.accuracy_mowst --smoke    # checks the code runs (< 1 min)

Writes benchmarks/results/mowst_accuracy.md and mowst_accuracy.png (``--smoke``: *_smoke.*;
``--tag NAME``: mowst_accuracy_NAME.*).
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


def make_module(method: str, gnn: str, size: dict[str, Any], args: argparse.Namespace) -> pl.LightningModule:
    adamw = partial(torch.optim.AdamW, lr=args.lr, weight_decay=5e-4)
    norm = None if args.norm == "none" else args.norm
    if method == "mlp":
        return GNNClassifier("mlp", patience=args.patience, optimizer=adamw, **size)
    if method == "gnn":
        return GNNClassifier(gnn, patience=args.patience, optimizer=adamw, norm=norm, **size)
    return Mowst(
        strong=gnn,
        variant=method,
        norm=norm,
        patience=args.patience,
        round_patience=args.round_patience,
        pretrain=args.pretrain,
        pretrain_patience=args.patience,
        pretrain_epochs=args.pretrain_epochs if args.pretrain == "joint" else 0,
        weak_optimizer=adamw,
        strong_optimizer=adamw,
        joint_optimizer=adamw,
        **size,
    )


def run_one(method: str, cfg: CSBMConfig, gnn: str, seed: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(seed, verbose=False)
    data = csbm_graph(cfg, seed=seed)
    size = dict(num_features=cfg.num_features, num_classes=cfg.num_classes, hidden=args.hidden, num_layers=2)
    module = make_module(method, gnn, dict(size, dropout=0.5), args)
    trainer = quiet_trainer(max_epochs=args.max_epochs)
    dm = GraphDataModule(data=data)
    trainer.fit(module, datamodule=dm)
    (result,) = trainer.test(module, datamodule=dm, verbose=False)
    out = {"acc": float(result["test/acc"]), "epochs": float(trainer.current_epoch)}
    out["hit_max"] = float(trainer.current_epoch >= args.max_epochs)
    if method in ("mowst", "mowst_star"):
        out["confidence"] = float(result["mowst/confidence"])
        out["weak_share"] = float(result["mowst/weak_share"])
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["model"], r["nodes"], r["signal"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    for ax, (gnn, nodes, signal) in zip(axes[0], panels, strict=True):
        sub = [r for r in rows if (r["model"], r["nodes"], r["signal"]) == (gnn, nodes, signal)]
        hs = [r["homophily"] for r in sub]
        for method in METHODS:
            label = LABELS[method] if method != "gnn" else gnn.upper()
            ax.errorbar(
                hs, [r[method][0] for r in sub], yerr=[r[method][1] for r in sub], marker="o", capsize=3, label=label
            )
        ax.set_xlabel("edge homophily")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"{gnn.upper()}, {nodes} nodes, signal {signal}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _suffix(args: argparse.Namespace) -> str:
    return "_smoke" if args.smoke else (f"_{args.tag}" if args.tag else "")


def write_table(rows: list[dict[str, Any]], args: argparse.Namespace, hit_max: int, seconds: float, final: bool) -> str:
    """The Markdown table of the rows so far, written to the results folder (after every cell)."""
    lines = [
        f"### accuracy: Mowst vs MLP and the GNN on CSBM graphs (4 classes, 32 features, hidden {args.hidden})",
        "",
        f"Test accuracy, mean ± std over {args.seeds} seed(s); Mowst - GNN is the paired difference per seed "
        f"(mean ± std). Budget: patience {args.patience} for every method, Mowst pretrain={args.pretrain!r}, "
        f"round patience {args.round_patience}, AdamW lr {args.lr}, GNN norm {args.norm}. "
        "C: mean confidence on test nodes; share: test nodes routed to the MLP; epochs: Mowst's mean epochs.",
        "",
        "| GNN | nodes | signal | homophily (realized) | MLP | GNN | Mowst | Mowst* | Mowst - GNN | Mowst* - GNN "
        "| Mowst C / share | Mowst* C / share | Mowst epochs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = " | ".join(f"{r[m][0]:.3f} ± {r[m][1]:.3f}" for m in METHODS)
        diffs = " | ".join(f"{r[f'{m}_diff'][0]:+.3f} ± {r[f'{m}_diff'][1]:.3f}" for m in ("mowst", "mowst_star"))
        gates = " | ".join(f"{r[f'{m}_conf']:.2f} / {r[f'{m}_share']:.2f}" for m in ("mowst", "mowst_star"))
        lines.append(
            f"| {r['model'].upper()} | {r['nodes']} | {r['signal']} | {r['homophily']} ({r['realized']:.2f}) | {cells} "
            f"| {diffs} | {gates} | {r['mowst_epochs']:.0f} |"
        )
    status = "" if final else " (partial: the run is still going)"
    lines += ["", f"Runs that hit max_epochs={args.max_epochs}: {hit_max}. Time: {seconds:.0f} s{status}."]
    table = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"mowst_accuracy{_suffix(args)}.md").write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--smoke", action="store_true", help="one tiny cell, one seed, tiny budgets: checks the code runs"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--gnn", nargs="+", default=["gcn", "sage"], choices=["gcn", "sage", "gat", "gin"])
    parser.add_argument("--homophily", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--signal", type=float, nargs="+", default=[0.5, 1.5])
    parser.add_argument("--nodes", type=int, nargs="+", default=[400, 5000])
    parser.add_argument("--pretrain", default="strong", choices=["none", "strong", "weak", "both", "joint"])
    parser.add_argument("--pretrain-epochs", type=int, default=20, help="only for --pretrain joint")
    parser.add_argument("--patience", type=int, default=100, help="every method's early stopping (authors: 100)")
    parser.add_argument("--round-patience", type=int, default=1, help="Mowst: rounds without a gain before stopping")
    parser.add_argument("--max-epochs", type=int, default=20000, help="safety net; runs that hit it are counted")
    parser.add_argument("--norm", default="none", choices=["none", "batch"], help="BatchNorm in the GNNs")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--tag", default="", help="suffix of the output files")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.smoke:
        args.homophily, args.signal, args.seeds, args.nodes, args.gnn = [0.2], [1.0], 1, [150], args.gnn[:1]
        args.patience, args.max_epochs = 3, 200
    if args.round_patience < 1 and not args.smoke:
        parser.error("--round-patience must be >= 1 (the authors stop after 11 rounds without a gain)")
    start = time.time()
    rows: list[dict[str, Any]] = []
    hit_max = 0
    for gnn in args.gnn:
        for nodes in args.nodes:
            for signal in args.signal:
                for h in args.homophily:
                    cfg = CSBMConfig(
                        num_nodes=nodes, num_classes=4, homophily=h, num_features=32, feature_signal=signal
                    )
                    row: dict[str, Any] = {"model": gnn, "nodes": nodes, "homophily": h, "signal": signal}
                    graphs = (csbm_graph(cfg, seed=s) for s in range(args.seeds))
                    row["realized"] = statistics.mean(edge_homophily(g.edge_index, g.y) for g in graphs)
                    runs = {m: [run_one(m, cfg, gnn, s, args) for s in range(args.seeds)] for m in METHODS}
                    for method, results in runs.items():
                        row[method] = _mean_std([r["acc"] for r in results])
                        hit_max += int(sum(r["hit_max"] for r in results))
                    for method in ("mowst", "mowst_star"):
                        diffs = [a["acc"] - b["acc"] for a, b in zip(runs[method], runs["gnn"], strict=True)]
                        row[f"{method}_diff"] = _mean_std(diffs)
                        row[f"{method}_conf"] = statistics.mean(r["confidence"] for r in runs[method])
                        row[f"{method}_share"] = statistics.mean(r["weak_share"] for r in runs[method])
                    row["mowst_epochs"] = statistics.mean(r["epochs"] for r in runs["mowst"])
                    rows.append(row)
                    print(f"done {gnn} N={nodes} signal={signal} h={h} ({time.time() - start:.0f} s)", flush=True)
                    write_table(rows, args, hit_max, time.time() - start, final=False)
    table = write_table(rows, args, hit_max, time.time() - start, final=True)
    print(table, flush=True)
    plot(rows, args.out / f"mowst_accuracy{_suffix(args)}.png")
    return table


if __name__ == "__main__":
    main()

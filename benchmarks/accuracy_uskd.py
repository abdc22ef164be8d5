"""Test accuracy with and without USKD on the embedded digits data, over several seeds.

The network is a small three-stage CNN on 8x8 digits (``stem`` 32 channels at 8x8, ``stage2`` 64 at
4x4, ``stage3`` 128 at 2x2, global average pool, ``Linear(128, 10)``); USKD's weak head reads the
pooled output of ``stage2``, the second-to-last stage, as in the official CNN configs. Training uses
half of the training split (about 540 images) so that there is something to regularize, AdamW with a
cosine schedule, and the official CIFAR weights (alpha 0.1, beta 0.1, mu 0.1). Each seed changes the
data split, the shuffling and the initialization; the baseline and USKD share every seed, so the
table also reports the paired difference. Accuracy and ECE are measured on the test split at the end
of training (no model selection).

    python -m benchmarks.accuracy_uskd            # the real run: 5 seeds x 3 configurations
    python -m benchmarks.accuracy_uskd --smoke    # seconds: 1 seed, 2 epochs

Writes ``benchmarks/results/uskd_accuracy.md``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.harness import quiet_trainer
from lightning_logits.callbacks.uskd import USKD
from lightning_logits.data import DigitsDataModule
from lightning_logits.modules import Classifier

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """``[N, 1, 8, 8] -> [N, 10]`` in three stages; ``stage2`` is the USKD layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = _block(1, 32, 1)
        self.stage2 = _block(32, 64, 2)
        self.stage3 = _block(64, 128, 2)
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage3(self.stage2(self.stem(x))).mean(dim=(2, 3)))


def _adamw(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=5e-4)


CONFIGS: dict[str, Callable[[], list[Callback]]] = {
    "baseline (CE)": lambda: [],
    "CE + USKD (rank by log-prob)": lambda: [USKD(feature_layer="stage2", alpha=0.1, beta=0.1, mu=0.1)],
    "CE + USKD (rank by prob)": lambda: [USKD(feature_layer="stage2", alpha=0.1, beta=0.1, mu=0.1, rank_by="prob")],
}


def run_one(config: str, seed: int, epochs: int) -> dict[str, float]:
    """Train one configuration with one seed; test accuracy and ECE at the end."""
    pl.seed_everything(seed, verbose=False)
    module = Classifier(
        SmallCNN(),
        num_classes=10,
        optimizer=_adamw,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs),
    )
    data = DigitsDataModule(batch_size=32, image_size=8, train_fraction=0.5, seed=seed)
    trainer = quiet_trainer(
        max_epochs=epochs,
        limit_val_batches=0,
        callbacks=CONFIGS[config](),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.test(module, datamodule=data, verbose=False)
    return {"acc": 100 * metrics["test/acc"], "ece": 100 * metrics["test/ece"], "seconds": seconds}


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def format_table(results: dict[str, list[dict[str, float]]], seeds: list[int], epochs: int) -> str:
    base = results["baseline (CE)"]
    lines = [
        f"### USKD accuracy: digits 8x8, small CNN, {epochs} epochs, seeds {seeds}",
        "",
        "| configuration | test acc (%) | paired diff vs baseline (pp) | test ECE (%) | train s/run |",
        "|---|---:|---:|---:|---:|",
    ]
    for config, runs in results.items():
        diffs = [r["acc"] - b["acc"] for r, b in zip(runs, base, strict=True)]
        diff = "" if runs is base else _mean_std(diffs)
        lines.append(
            f"| {config} | {_mean_std([r['acc'] for r in runs])} | {diff} | {_mean_std([r['ece'] for r in runs])} "
            f"| {statistics.mean(r['seconds'] for r in runs):.1f} |"
        )
    lines.append("")
    lines.append(
        "Mean ± sample standard deviation over seeds; the paired difference subtracts the baseline of the same seed."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 epochs: checks the code runs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS / "uskd_accuracy.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny model: threads cost more than they give on a shared CPU
    seeds = [0] if args.smoke else list(range(args.seeds))
    epochs = 2 if args.smoke else args.epochs
    results: dict[str, list[dict[str, float]]] = {config: [] for config in CONFIGS}
    for seed in seeds:  # seeds outermost: machine-load drift hits every configuration alike
        for config in CONFIGS:
            results[config].append(run_one(config, seed, epochs))
    table = format_table(results, seeds, epochs)
    print(table, flush=True)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()

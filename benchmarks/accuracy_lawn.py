"""Accuracy of Adam, AdamW, Adam-LAWN, SGD and SGD-LAWN at a small and a large batch size.

The data set is MNIST-1D (4000 training and 1000 test sequences of length 40, 10 classes), generated
offline by the ``mnist1d`` package from its default arguments (about 10 s the first time; cached in
the temporary folder). The network is an MLP with one BatchNorm,
``Linear(40, 256) - BatchNorm - ReLU - Linear(256, 256) - ReLU - Linear(256, 10)``, so LAWN's default
layer search constrains the last two Linear layers (the homogeneous part after the last norm).

Each configuration trains for a fixed number of epochs at a constant learning rate, with every
seed changing the initialization and the shuffling; the table reports the test accuracy at the end
of training (no early stopping, no model selection), mean and standard deviation over the seeds.
A second table gives the head's weight norm and the mean logit norm at the end, and the PNG plots
both over training (one panel per batch size), measured each epoch on a fixed probe of 512
training samples in eval mode.

    python -m benchmarks.accuracy_lawn            # the real run: 5 seeds, MNIST-1D (10-20 min)
    python -m benchmarks.accuracy_lawn --smoke    # seconds: 1 seed, digits, 2 epochs
    python -m benchmarks.accuracy_lawn --free-fraction 0.5 --out benchmarks/results/lawn_accuracy_free50.md \
        --plot benchmarks/results/lawn_norms_free50.png   # a longer free phase

Writes ``benchmarks/results/lawn_accuracy.md`` and ``benchmarks/results/lawn_norms.png``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from benchmarks.harness import quiet_trainer
from lightning_logits.callbacks.lawn import LAWN

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


# ----------------------------------------------------------------------------- data


def load_mnist1d() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D from the package's default arguments (seeded, so always the same), cached on disk."""
    cache = Path(tempfile.gettempdir()) / "lightning_logits_mnist1d_default.pt"
    if cache.exists():
        return torch.load(cache)
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    tensors = (
        torch.tensor(data["x"], dtype=torch.float32),
        torch.tensor(data["y"], dtype=torch.int64),
        torch.tensor(data["x_test"], dtype=torch.float32),
        torch.tensor(data["y_test"], dtype=torch.int64),
    )
    torch.save(tensors, cache)
    return tensors


def load_digits_flat() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, flattened to 64 features, a fixed 80/20 split (for the smoke run)."""
    from lightning_logits.data.digits import load_digits_tensors

    x, y = load_digits_tensors()
    x = x.flatten(1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


class ShuffledBatches:
    """Seeded shuffled mini-batches of in-memory tensors (no per-sample collation: fast at any batch size)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.y), generator=self.generator)
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]


# ----------------------------------------------------------------------------- model


def make_mlp(in_features: int, num_classes: int, hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


class MLPClassifier(pl.LightningModule):
    """Cross-entropy on an MLP; the optimizer is named, so runs differ only where they should."""

    def __init__(self, in_features: int, num_classes: int, optimizer: str, lr: float, weight_decay: float) -> None:
        super().__init__()
        self.net = make_mlp(in_features, num_classes)
        self.optimizer_name, self.lr, self.weight_decay = optimizer, lr, weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        raise ValueError(f"unknown optimizer '{self.optimizer_name}'")


class NormRecorder(Callback):
    """Each epoch: the head's weight norm and the mean L2 norm of the logits on a fixed probe set."""

    def __init__(self, probe: Tensor) -> None:
        self.probe = probe
        self.head_norm: list[float] = []
        self.logit_norm: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(self.probe)
        pl_module.train(was_training)
        self.head_norm.append(pl_module.net[-1].weight.norm().item())  # type: ignore[index]
        self.logit_norm.append(logits.norm(dim=1).mean().item())


# ----------------------------------------------------------------------------- runs


@dataclass
class Setting:
    """One batch-size regime: learning rates per optimizer family, epochs and LAWN's free epochs."""

    name: str
    batch_size: int
    epochs: int
    free_epochs: int
    adam_lr: float
    sgd_lr: float
    adamw_weight_decay: float


@dataclass
class RunResult:
    accuracy: float
    head_norm: list[float] = field(default_factory=list)
    logit_norm: list[float] = field(default_factory=list)
    seconds: float = 0.0


METHODS = ("Adam", "AdamW", "Adam-LAWN", "SGD", "SGD-LAWN")


def run_one(method: str, setting: Setting, data: tuple[Tensor, Tensor, Tensor, Tensor], seed: int) -> RunResult:
    x, y, x_test, y_test = data
    pl.seed_everything(seed, verbose=False)
    family = "sgd" if method.startswith("SGD") else ("adamw" if method == "AdamW" else "adam")
    lr = setting.sgd_lr if family == "sgd" else setting.adam_lr
    module = MLPClassifier(x.shape[1], int(y.max()) + 1, family, lr, setting.adamw_weight_decay)
    recorder = NormRecorder(x[:512])
    callbacks: list[Callback] = [recorder]
    if method.endswith("LAWN"):
        callbacks.append(LAWN(free_epochs=setting.free_epochs, log_norms=False))
    trainer = quiet_trainer(
        max_epochs=setting.epochs,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=ShuffledBatches(x, y, setting.batch_size, seed))
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        accuracy = (module(x_test).argmax(1) == y_test).float().mean().item()
    return RunResult(100.0 * accuracy, recorder.head_norm, recorder.logit_norm, seconds)


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def write_report(
    results: dict[tuple[str, str], list[RunResult]], settings: list[Setting], dataset: str, seeds: int, path: Path
) -> str:
    lines = [
        f"# LAWN accuracy: {dataset}, {seeds} seed(s), test accuracy (%) at the end of training, mean ± std",
        "",
        "| method | " + " | ".join(f"{s.name} (batch {s.batch_size}, {s.epochs} epochs)" for s in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for method in METHODS:
        cells = [_mean_std([r.accuracy for r in results[(method, s.name)]]) for s in settings]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Gain of LAWN over its base optimizer (difference of the means, percentage points):",
        "",
        "| | " + " | ".join(s.name for s in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for base in ("Adam", "SGD"):
        cells = []
        for s in settings:
            lawn = statistics.mean(r.accuracy for r in results[(f"{base}-LAWN", s.name)])
            plain = statistics.mean(r.accuracy for r in results[(base, s.name)])
            cells.append(f"{lawn - plain:+.2f}")
        lines.append(f"| {base}-LAWN minus {base} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Head weight norm / mean logit norm on the probe set at the end of training (mean over seeds):",
        "",
        "| method | " + " | ".join(s.name for s in settings) + " |",
        "|---|" + "---|" * len(settings),
    ]
    for method in METHODS:
        cells = []
        for s in settings:
            runs = results[(method, s.name)]
            head = statistics.mean(r.head_norm[-1] for r in runs)
            logit = statistics.mean(r.logit_norm[-1] for r in runs)
            cells.append(f"{head:.2f} / {logit:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += ["", "Settings:", ""]
    for s in settings:
        lines.append(
            f"- {s.name}: batch {s.batch_size}, {s.epochs} epochs, constant lr (Adam/AdamW {s.adam_lr}, "
            f"SGD {s.sgd_lr} with momentum 0.9), AdamW weight_decay {s.adamw_weight_decay}, "
            f"LAWN free_epochs {s.free_epochs}"
        )
    total = sum(r.seconds for runs in results.values() for r in runs)
    lines += ["", f"Total training time: {total:.0f} s on the CPU."]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def plot(results: dict[tuple[str, str], list[RunResult]], settings: list[Setting], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(settings), figsize=(6 * len(settings), 7), squeeze=False)
    colors = {"Adam": "C0", "AdamW": "C2", "Adam-LAWN": "C1", "SGD": "C4", "SGD-LAWN": "C3"}
    styles = {"Adam": "-", "AdamW": "-", "Adam-LAWN": "--", "SGD": "-", "SGD-LAWN": "--"}
    for column, s in enumerate(settings):
        for row, attr, label in ((0, "logit_norm", "mean logit norm"), (1, "head_norm", "head weight norm")):
            ax = axes[row][column]
            for method in METHODS:
                curves = torch.tensor([getattr(r, attr) for r in results[(method, s.name)]])
                mean = curves.mean(0)
                epochs = torch.arange(1, len(mean) + 1)
                ax.plot(epochs, mean, styles[method], color=colors[method], label=method)
                if len(curves) > 1:
                    std = curves.std(0)
                    ax.fill_between(epochs, mean - std, mean + std, color=colors[method], alpha=0.15)
            ax.axvline(s.free_epochs, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("epoch")
            ax.set_ylabel(label)
            ax.set_title(f"{s.name}: batch {s.batch_size}")
            ax.set_yscale("log")
            if row == 0 and column == 0:
                ax.legend(fontsize=8)
    fig.suptitle("LAWN: logit and head weight norms (mean ± std over seeds; dotted: end of LAWN's free phase)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long check: 1 seed, digits, 2 epochs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--free-fraction",
        type=float,
        default=0.2,
        help="LAWN's free phase as a fraction of the epochs (its hyperparameter; default 0.2)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "lawn_accuracy.md")
    parser.add_argument("--plot", type=Path, default=RESULTS / "lawn_norms.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead and noise
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if args.smoke:
        data, dataset, seeds = load_digits_flat(), "digits (smoke)", 1
        settings = [
            Setting("small batch", 64, 2, 1, 1e-3, 0.05, 0.1),
            Setting("large batch", 512, 2, 1, 3e-3, 0.2, 0.1),
        ]
        # The smoke run's files go to the temporary folder: they are not results.
        out = Path(tempfile.gettempdir()) / "lawn_accuracy_smoke.md"
        plot_path = Path(tempfile.gettempdir()) / "lawn_norms_smoke.png"
    else:
        data, dataset, seeds = load_mnist1d(), "MNIST-1D (4000 train / 1000 test)", args.seeds
        settings = [
            Setting("small batch", 64, 16, max(1, round(args.free_fraction * 16)), 1e-3, 0.02, 0.1),
            Setting("large batch", 1000, 64, max(1, round(args.free_fraction * 64)), 4e-3, 0.2, 0.1),
        ]
        out, plot_path = args.out, args.plot
    results: dict[tuple[str, str], list[RunResult]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in settings:
            for method in METHODS:
                results[(method, s.name)] = [run_one(method, s, data, seed) for seed in range(seeds)]
                accs = [r.accuracy for r in results[(method, s.name)]]
                print(f"{s.name:12s} {method:10s} {_mean_std(accs)}", flush=True)
    text = write_report(results, settings, dataset, seeds, out)
    plot(results, settings, plot_path)
    print(text)
    print(f"wrote {out} and {plot_path}")


if __name__ == "__main__":
    main()

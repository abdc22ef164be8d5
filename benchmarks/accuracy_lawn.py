"""The LAWN study: tuned baselines against Adam-LAWN and SGD-LAWN, both scopes, small and large batch.

What it compares (issue 15, item 3), on MNIST-1D (4000 training and 1000 test sequences of length
40, 10 classes; generated offline by the ``mnist1d`` package from its default arguments, see
``benchmarks/mnist1d.py``). The last 20 % of the training sequences are a validation split: every
learning rate and weight decay is chosen on it, never on the test set; the reported runs train on
the other 80 % and are scored on the test set.

Networks (``--models``):

- ``cnn``: a 1-D CNN with BatchNorm, ``(Conv1d-BN-ReLU) x3 - global average pooling - Linear``;
  LAWN ``scope="final"`` constrains the Linear, ``scope="all"`` the three convolutions too.
- ``mlp``: ``Linear(40, 256) - BN - ReLU - Linear(256, 256) - ReLU - Linear(256, 10)``; ``final``
  constrains the last two Linears, ``all`` the first one too.

Arms (``--arms``): ``Adam`` (no weight decay), ``Adam+L2`` (Adam's coupled ``weight_decay``, tuned),
``AdamW`` (decoupled, tuned), ``SGD`` (momentum 0.9, weight decay tuned), and ``Adam-LAWN`` /
``SGD-LAWN`` with ``scope`` ``final`` and ``all`` and each free phase of ``--free-fractions`` (no
weight decay anywhere, as the ICLR 2022 text describes it). Every arm: linear warm-up over the first
5 % of the steps, then cosine decay to zero, ``--epochs`` epochs, batch sizes ``--batch-sizes``.
Each arm's learning rate (and weight decay, where it has one) is the best point of a small grid by
final validation accuracy with seed 0; then ``--seeds`` seeds (1000, 1001, ...) train with it. The
LAWN arms have no weight decay to tune, and the free phase is the quantity under study, so the
learning rate of each (optimizer, scope) pair is tuned once, at the free phase ``--tune-free-fraction``
(10 %), and shared by every free phase of that pair.

Every finished run is appended to a JSON file (``--cache``; the first file is written, all are
read), so an interrupted study resumes where it stopped and several processes can each run some
columns and be merged: ``--report-only`` writes the report and plots from the cached runs alone,
with the seeds each cell has (shown as ``n=`` where a cell has fewer than the others). Seeds run
seed-major (every arm of a column with seed 1000, then 1001, ...), so a study stopped early has
the same number of seeds in every arm of a column, give or take one.

Reported (Markdown, ``--out``): test accuracy (mean ± std over seeds), final training loss (the
cross-entropy on the training split in eval mode), the chosen hyperparameters, LAWN's gain over its
base optimizer; and plots (``--plot``) of the mean logit norm and each layer's weight norm over the
epochs, measured on a fixed probe of 512 training sequences in eval mode.

    python -m benchmarks.accuracy_lawn          # the full study (hours on a CPU: 2 models x 2 batch
                                                # sizes x 20 arms x grid, 100 epochs, 5 seeds)
    python -m benchmarks.accuracy_lawn --smoke  # seconds: digits, 2 epochs, 1 seed, one grid point

A reduced run (fewer epochs, seeds, grid points, free phases) is one command line, for example
``--models mlp --epochs 30 --seeds 2 --grid-points 2 --free-fractions 0.1``; the report states
every setting it ran with. Two processes on two cores, merged:

    python -m benchmarks.accuracy_lawn --models cnn --batch-sizes 128 --cache a.json &
    python -m benchmarks.accuracy_lawn --models cnn --batch-sizes 2000 --cache b.json &
    wait; python -m benchmarks.accuracy_lawn --report-only --cache a.json b.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
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
from benchmarks.mnist1d import load_mnist1d
from lightning_logits.callbacks.lawn import LAWN

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

Data = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]  # train x/y, validation x/y, test x/y

# ----------------------------------------------------------------------------- data


def load_digits_flat() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """scikit-learn's digits, flattened to 64 features, a fixed 80/20 split (for the smoke run)."""
    from lightning_logits.data.digits import load_digits_tensors

    x, y = load_digits_tensors()
    x = x.flatten(1)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def with_validation(x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor, fraction: float = 0.2) -> Data:
    """Hold out the last ``fraction`` of the training data for tuning (the test set is never used for it)."""
    split = len(y) - int(fraction * len(y))
    return x[:split], y[:split], x[split:], y[split:], x_test, y_test


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


# ----------------------------------------------------------------------------- networks


def make_mlp(in_features: int, num_classes: int, hidden: int = 256) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def make_cnn(in_features: int, num_classes: int, width: int = 32) -> nn.Sequential:
    """``[N, L] -> [N, C]``: three Conv1d-BN-ReLU blocks (the last two with stride 2), mean over time, Linear."""
    layers: list[nn.Module] = [nn.Unflatten(1, (1, in_features))]
    channels = 1
    for stride in (1, 2, 2):
        layers += [nn.Conv1d(channels, width, 5, stride=stride, padding=2), nn.BatchNorm1d(width), nn.ReLU()]
        channels = width
    layers += [nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


MODELS = {"cnn": make_cnn, "mlp": make_mlp}


@dataclass(frozen=True)
class Arm:
    """One training recipe: optimizer family, weight-decay kind, and LAWN's scope/free phase (if any)."""

    name: str
    family: str  # "adam" | "sgd"
    decay: str = "none"  # "none" | "l2" (coupled) | "decoupled"
    scope: str | None = None  # LAWN scope, None: no LAWN
    free_fraction: float = 0.0

    @property
    def label(self) -> str:
        if self.scope is None:
            return self.name
        return f"{self.name} ({self.scope}, free {100 * self.free_fraction:g}%)"


def make_arms(names: list[str], free_fractions: list[float]) -> list[Arm]:
    arms: list[Arm] = []
    for name in names:
        if name == "Adam":
            arms.append(Arm("Adam", "adam"))
        elif name == "Adam+L2":
            arms.append(Arm("Adam+L2", "adam", "l2"))
        elif name == "AdamW":
            arms.append(Arm("AdamW", "adam", "decoupled"))
        elif name == "SGD":
            arms.append(Arm("SGD", "sgd", "l2"))
        elif name in ("Adam-LAWN", "SGD-LAWN"):
            family = "adam" if name.startswith("Adam") else "sgd"
            for scope, free in itertools.product(("final", "all"), free_fractions):
                arms.append(Arm(name, family, "none", scope, free))
        else:
            raise ValueError(f"unknown arm '{name}': choose from Adam, Adam+L2, AdamW, SGD, Adam-LAWN, SGD-LAWN")
    return arms


# Small grids; --grid-points k keeps k points of each, spread evenly (the middle ones first for k=1).
# The learning-rate grids reach higher than they first did: with 20 epochs every arm of both batch sizes
# chose the top of [3e-4 .. 1e-2] (Adam) and [0.01 .. 0.3] (SGD) on the validation split.
LR_GRID = {"adam": [1e-3, 3e-3, 1e-2, 3e-2], "sgd": [0.03, 0.1, 0.3, 1.0]}
WD_GRID = {"l2": [1e-5, 1e-4, 1e-3], "decoupled": [1e-3, 1e-2, 1e-1], "none": [0.0]}
SGD_WD_GRID = [1e-5, 1e-4, 5e-4]
LR_ABOVE = {"adam": 0.1, "sgd": 3.0}  # the next point of each grid's 1-3-10 progression (--lr-edge)


def thin(grid: list[float], points: int) -> list[float]:
    if points >= len(grid):
        return list(grid)
    if points == 1:
        return [grid[len(grid) // 2]]
    step = (len(grid) - 1) / (points - 1)
    return [grid[round(i * step)] for i in range(points)]


def grid_for(arm: Arm, points: int) -> list[tuple[float, float]]:
    lrs = thin(LR_GRID[arm.family], points)
    decays = thin(SGD_WD_GRID if arm.family == "sgd" and arm.decay == "l2" else WD_GRID[arm.decay], points)
    return list(itertools.product(lrs, decays))


class StudyModule(pl.LightningModule):
    """Cross-entropy on one of :data:`MODELS`; the optimizer and its warm-up + cosine schedule from ``arm``."""

    def __init__(
        self, model: str, in_features: int, num_classes: int, arm: Arm, lr: float, wd: float, total_steps: int
    ) -> None:
        super().__init__()
        self.net = MODELS[model](in_features, num_classes)
        self.arm, self.lr, self.wd, self.total_steps = arm, lr, wd, total_steps

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> object:
        optimizer: torch.optim.Optimizer
        if self.arm.family == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.wd)
        elif self.arm.decay == "decoupled":
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.wd)
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.wd)
        warmup = max(1, round(0.05 * self.total_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, self.total_steps - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def weight_names(net: nn.Module) -> list[str]:
    return [n for n, p in net.named_parameters() if p.ndim >= 2]


class NormRecorder(Callback):
    """Each epoch: every weight matrix's norm and the mean L2 norm of the logits on a fixed probe set."""

    def __init__(self, probe: Tensor) -> None:
        self.probe = probe
        self.weight_norm: dict[str, list[float]] = {}
        self.logit_norm: list[float] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            logits = pl_module(self.probe)
        pl_module.train(was_training)
        for name, param in pl_module.net.named_parameters():  # type: ignore[union-attr]
            if param.ndim >= 2:
                self.weight_norm.setdefault(name, []).append(param.detach().norm().item())
        self.logit_norm.append(logits.norm(dim=1).mean().item())


@dataclass
class RunResult:
    val_accuracy: float
    test_accuracy: float
    train_loss: float
    weight_norm: dict[str, list[float]] = field(default_factory=dict)
    logit_norm: list[float] = field(default_factory=list)
    seconds: float = 0.0


def accuracy(module: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return 100.0 * (module(x).argmax(1) == y).float().mean().item()


def run_one(
    model: str, arm: Arm, lr: float, wd: float, batch_size: int, epochs: int, data: Data, seed: int
) -> RunResult:
    x, y, x_val, y_val, x_test, y_test = data
    pl.seed_everything(seed, verbose=False)
    loader = ShuffledBatches(x, y, batch_size, seed)
    module = StudyModule(model, x.shape[1], int(y.max()) + 1, arm, lr, wd, epochs * len(loader))
    recorder = NormRecorder(x[:512])
    callbacks: list[Callback] = [recorder]
    if arm.scope is not None:
        free = max(1, round(arm.free_fraction * epochs))
        callbacks.append(LAWN(free_epochs=free, scope=arm.scope, log_norms=False))  # type: ignore[arg-type]
    trainer = quiet_trainer(max_epochs=epochs, limit_val_batches=0, callbacks=callbacks)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader)
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        train_loss = F.cross_entropy(module(x), y).item()
    return RunResult(
        accuracy(module, x_val, y_val),
        accuracy(module, x_test, y_test),
        train_loss,
        recorder.weight_norm,
        recorder.logit_norm,
        seconds,
    )


# ----------------------------------------------------------------------------- the study


class RunCache:
    """Finished runs in JSON files, keyed by everything that determines a run; the first file is written.

    Tuning runs keep only their scores; reported runs keep their norm curves too (4 significant
    digits), for the plots.
    """

    def __init__(self, paths: list[Path]) -> None:
        self.path = paths[0] if paths else None
        self.runs: dict[str, dict[str, object]] = {}
        for path in paths:
            if path.exists():
                self.runs.update(json.loads(path.read_text()))
        self._own: dict[str, dict[str, object]] = (
            json.loads(self.path.read_text()) if self.path is not None and self.path.exists() else {}
        )

    @staticmethod
    def key(dataset: str, model: str, batch: int, epochs: int, arm: Arm, lr: float, wd: float, seed: int) -> str:
        return f"{dataset}|{model}|{batch}|{epochs}|{arm.name}|{arm.scope}|{arm.free_fraction:g}|{lr:g}|{wd:g}|{seed}"

    def get(self, key: str) -> RunResult | None:
        entry = self.runs.get(key)
        if entry is None:
            return None
        return RunResult(**entry)  # type: ignore[arg-type]

    def put(self, key: str, result: RunResult, curves: bool) -> None:
        entry: dict[str, object] = {
            "val_accuracy": result.val_accuracy,
            "test_accuracy": result.test_accuracy,
            "train_loss": result.train_loss,
            "seconds": round(result.seconds, 2),
        }
        if curves:
            entry["weight_norm"] = {k: [float(f"{v:.4g}") for v in vs] for k, vs in result.weight_norm.items()}
            entry["logit_norm"] = [float(f"{v:.4g}") for v in result.logit_norm]
        self.runs[key] = entry
        self._own[key] = entry
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_suffix(".tmp")
            partial.write_text(json.dumps(self._own))
            partial.replace(self.path)  # atomic: a killed study never leaves a half-written cache


@dataclass
class Cell:
    """One (model, batch size, arm): the chosen hyperparameters, the tuning scores and the seeds' runs."""

    lr: float
    wd: float
    tuning: list[tuple[float, float, float]]  # (lr, wd, validation accuracy)
    runs: list[RunResult]


def tuning_arm(arm: Arm, tune_free_fraction: float) -> Arm:
    """The arm whose grid search sets ``arm``'s hyperparameters (LAWN arms share one per optimizer and scope)."""
    if arm.scope is None:
        return arm
    return Arm(arm.name, arm.family, arm.decay, arm.scope, tune_free_fraction)


def run_study(
    columns: list[tuple[str, int]],
    arms: list[Arm],
    *,
    data: Data,
    dataset: str,
    epochs: int,
    seeds: int,
    grid_points: int,
    tune_free_fraction: float,
    cache: RunCache,
    report_only: bool,
) -> dict[tuple[str, int, Arm], Cell]:
    """Tune every arm of each column on the validation split, then train ``seeds`` seeds seed-major.

    With ``report_only`` nothing is trained: cells whose tuning is complete get the cached seeds
    they have; the others are left out.
    """

    def run(model: str, batch: int, arm: Arm, lr: float, wd: float, seed: int, curves: bool) -> RunResult | None:
        key = RunCache.key(dataset, model, batch, epochs, arm, lr, wd, seed)
        cached = cache.get(key)
        if cached is not None or report_only:
            return cached
        cache.put(key, run_one(model, arm, lr, wd, batch, epochs, data, seed), curves)
        return cache.get(key)  # as stored (curves rounded), so a report from the cache alone is the same

    # Every column is tuned before any seed runs, and seeds run seed-major across columns: a study
    # stopped early has the same seeds, give or take one, in every arm of every column.
    chosen: dict[tuple[str, int, Arm], tuple[float, float, list[tuple[float, float, float]]]] = {}
    for (model, batch), arm in itertools.product(columns, arms):
        tuner = tuning_arm(arm, tune_free_fraction)
        if (model, batch, tuner) in chosen:
            continue
        grid = grid_for(tuner, grid_points)
        tuning = []
        for lr, wd in grid:
            result = run(model, batch, tuner, lr, wd, seed=0, curves=False)
            if result is not None:
                tuning.append((lr, wd, result.val_accuracy))
        if len(tuning) < len(grid):
            continue  # report-only and this arm's tuning is unfinished
        best_lr, best_wd, _ = max(tuning, key=lambda t: t[2])
        chosen[(model, batch, tuner)] = (best_lr, best_wd, tuning)
        print(f"{model} batch {batch:5d} {tuner.label:32s} tuned: lr {best_lr:g} wd {best_wd:g}", flush=True)
    runs: dict[tuple[str, int, Arm], list[RunResult]] = {}
    for seed, (model, batch), arm in itertools.product(range(1000, 1000 + seeds), columns, arms):
        setting = chosen.get((model, batch, tuning_arm(arm, tune_free_fraction)))
        if setting is None:
            continue
        result = run(model, batch, arm, setting[0], setting[1], seed, curves=True)
        if result is not None:
            runs.setdefault((model, batch, arm), []).append(result)
            if not report_only:
                print(
                    f"{model} batch {batch:5d} {arm.label:32s} seed {seed}: test {result.test_accuracy:.2f}", flush=True
                )
    cells: dict[tuple[str, int, Arm], Cell] = {}
    for (model, batch, arm), arm_runs in runs.items():
        lr, wd, tuning = chosen[(model, batch, tuning_arm(arm, tune_free_fraction))]
        cells[(model, batch, arm)] = Cell(lr, wd, tuning, arm_runs)
    return cells


def lr_edge_check(
    columns: list[tuple[str, int]],
    arms: list[Arm],
    *,
    data: Data,
    dataset: str,
    epochs: int,
    grid_points: int,
    tune_free_fraction: float,
    cache: RunCache,
    report_only: bool,
) -> list[str]:
    """Would the learning rate after the grid's top (:data:`LR_ABOVE`, at every weight decay) have won on validation?

    Seed 0 and the validation split only, as in the tuning; nothing reported changes. A run whose
    free phase diverges (LAWN refuses non-finite norms) counts as 0 %. Returns Markdown lines.
    """
    lines = [
        "",
        "Tuning check: the learning rate after the grid's top (Adam 0.1, SGD 3), seed 0, validation accuracy (%):",
        "",
        "| column | arm | grid's best (lr / wd: val) | above the grid (lr / best wd: val) | verdict |",
        "|---|---|---|---|---|",
    ]
    tuners = list(dict.fromkeys(tuning_arm(arm, tune_free_fraction) for arm in arms))
    for (model, batch), tuner in itertools.product(columns, tuners):
        grid = grid_for(tuner, grid_points)
        scores = [cache.get(RunCache.key(dataset, model, batch, epochs, tuner, lr, wd, 0)) for lr, wd in grid]
        if any(score is None for score in scores):
            continue  # this arm's tuning is unfinished
        best_lr, best_wd, best = max(
            ((lr, wd, r.val_accuracy) for (lr, wd), r in zip(grid, scores, strict=True) if r is not None),
            key=lambda t: t[2],
        )
        above = LR_ABOVE[tuner.family]
        tried = []
        for wd in sorted({wd for _, wd in grid}):
            key = RunCache.key(dataset, model, batch, epochs, tuner, above, wd, 0)
            if cache.get(key) is None and not report_only:
                try:
                    cache.put(key, run_one(model, tuner, above, wd, batch, epochs, data, seed=0), curves=False)
                except FloatingPointError:  # LAWN refuses the non-finite norms of a diverged free phase
                    cache.put(key, RunResult(0.0, 0.0, float("nan")), curves=False)
            result = cache.get(key)
            if result is not None:
                tried.append((wd, result.val_accuracy))
        if not tried:
            continue
        wd, val = max(tried, key=lambda t: t[1])
        verdict = "higher lr wins" if val > best else "grid holds"
        lines.append(
            f"| {model}, batch {batch} | {tuner.label} | {best_lr:g} / {best_wd:g}: {best:.2f} | "
            f"{above:g} / {wd:g}: {val:.2f} | {verdict} |"
        )
    return lines


def _mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def base_arm(arm: Arm, arms: list[Arm]) -> Arm | None:
    """The plain optimizer a LAWN arm is compared with: Adam for Adam-LAWN, SGD (tuned decay) for SGD-LAWN."""
    return next((a for a in arms if a.scope is None and a.name == {"adam": "Adam", "sgd": "SGD"}[arm.family]), None)


def write_report(
    cells: dict[tuple[str, int, Arm], Cell],
    columns: list[tuple[str, int]],
    arms: list[Arm],
    header: str,
    settings: list[str],
    path: Path,
    appendix: list[str] | None = None,
) -> str:
    """Markdown tables, one column per (model, batch size); a missing cell is "-", a short one says its ``n``."""
    head = "| arm | " + " | ".join(f"{m}, batch {b}" for m, b in columns) + " |"
    rule = "|---|" + "---|" * len(columns)
    most = {
        (m, b): max((len(c.runs) for (cm, cb, _), c in cells.items() if (cm, cb) == (m, b)), default=0)
        for m, b in columns
    }

    def row(arm: Arm, show: object) -> str:
        values = []
        for m, b in columns:
            cell = cells.get((m, b, arm))
            if cell is None:
                values.append("-")
                continue
            text = show(cell)  # type: ignore[operator]
            values.append(text if len(cell.runs) == most[(m, b)] else f"{text} (n={len(cell.runs)})")
        return f"| {arm.label} | " + " | ".join(values) + " |"

    lines = [header, "", "Test accuracy (%), mean ± std over seeds:", "", head, rule]
    lines += [row(arm, lambda c: _mean_std([r.test_accuracy for r in c.runs])) for arm in arms]
    lines += [
        "",
        "Validation accuracy (%) of the same runs, mean ± std (the split any choice between arms, such as a "
        "default scope or free phase, is made on):",
        "",
        head,
        rule,
    ]
    lines += [row(arm, lambda c: _mean_std([r.val_accuracy for r in c.runs])) for arm in arms]
    lines += [
        "",
        "LAWN minus its base optimizer, paired by seed (same data order and initialization), mean ± std of the "
        "differences in test accuracy (points):",
        "",
        head,
        rule,
    ]
    for arm in arms:
        base = base_arm(arm, arms) if arm.scope is not None else None
        if base is None:
            continue
        diffs = []
        for m, b in columns:
            lawn, plain = cells.get((m, b, arm)), cells.get((m, b, base))
            if lawn is None or plain is None:
                diffs.append("-")
                continue
            # both lists run from seed 1000 up (seed-major order): their common prefix pairs the seeds
            pairs = [x.test_accuracy - y.test_accuracy for x, y in zip(lawn.runs, plain.runs, strict=False)]
            text = f"{statistics.mean(pairs):+.2f}" + (f" ± {statistics.stdev(pairs):.2f}" if len(pairs) > 1 else "")
            diffs.append(text)
        lines.append(f"| {arm.label} minus {base.label} | " + " | ".join(diffs) + " |")
    lines += ["", "Final training loss (cross-entropy on the training split, eval mode), mean ± std:", "", head, rule]
    lines += [row(arm, lambda c: _mean_std([r.train_loss for r in c.runs], 4)) for arm in arms]
    lines += ["", "Mean logit norm on the probe at the end (mean over seeds):", "", head, rule]
    lines += [row(arm, lambda c: f"{statistics.mean(r.logit_norm[-1] for r in c.runs):.1f}") for arm in arms]
    lines += [
        "",
        "Chosen on the validation split, seed 0 (lr / weight decay; best validation accuracy):",
        "",
        head,
        rule,
    ]
    lines += [row(arm, lambda c: f"{c.lr:g} / {c.wd:g} ({max(t[2] for t in c.tuning):.1f})") for arm in arms]
    total = sum(r.seconds for cell in cells.values() for r in cell.runs)
    lines += [
        "",
        "Settings:",
        "",
        *[f"- {s}" for s in settings],
        f"- training time of the reported runs: {total:.0f} s",
        *(appendix or []),
    ]
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def plot(
    cells: dict[tuple[str, int, Arm], Cell], columns: list[tuple[str, int]], arms: list[Arm], epochs: int, path: Path
) -> None:
    """One row per (model, batch size): the logit norm, then each layer's weight norm, over the epochs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [(m, b) for m, b in columns if any((m, b, arm) in cells for arm in arms)]
    layers = {
        m: list(next(cells[(m, b, a)] for a in arms if (m, b, a) in cells).runs[0].weight_norm) for m, b in columns
    }
    width = 1 + max(len(v) for v in layers.values())
    fig, axes = plt.subplots(len(columns), width, figsize=(3.6 * width, 3.0 * len(columns)), squeeze=False)
    for row, (m, b) in enumerate(columns):
        panels = [("logit norm", None)] + [(f"‖{name}‖", name) for name in layers[m]]
        for column, (title, layer) in enumerate(panels):
            ax = axes[row][column]
            for index, arm in enumerate(arms):
                if (m, b, arm) not in cells:
                    continue
                runs = cells[(m, b, arm)].runs
                curves = torch.tensor([r.logit_norm if layer is None else r.weight_norm[layer] for r in runs])
                style = "-" if arm.scope is None else ("--" if arm.scope == "final" else ":")
                ax.plot(range(1, len(curves[0]) + 1), curves.mean(0), style, color=f"C{index % 10}", label=arm.label)
                if arm.scope is not None:
                    ax.axvline(max(1, round(arm.free_fraction * epochs)), color="grey", lw=0.5, ls=":")
            ax.set_yscale("log")
            ax.set_title(f"{m}, batch {b}: {title}", fontsize=8)
            ax.set_xlabel("epoch", fontsize=7)
            ax.tick_params(labelsize=6)
        for column in range(len(panels), width):
            axes[row][column].axis("off")
    axes[0][0].legend(fontsize=5)
    free = sorted({100 * a.free_fraction for a in arms if a.scope is not None})
    fig.suptitle(
        f"LAWN study: mean over seeds (solid: baselines, dashed: scope final, dotted: scope all; LAWN free phase "
        f"{', '.join(f'{f:g}%' for f in free)})",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="seconds-long check: digits, 2 epochs, 1 seed")
    parser.add_argument("--models", nargs="+", default=["cnn", "mlp"], choices=sorted(MODELS))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 2000])
    parser.add_argument(
        "--columns", nargs="+", default=None, help="model:batch pairs (e.g. cnn:128 mlp:2000) instead of the product"
    )
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--arms", nargs="+", default=["Adam", "Adam+L2", "AdamW", "SGD", "Adam-LAWN", "SGD-LAWN"], help="which arms"
    )
    parser.add_argument("--free-fractions", nargs="+", type=float, default=[0.02, 0.05, 0.1, 0.25])
    parser.add_argument("--grid-points", type=int, default=4, help="points kept of each lr / wd grid (1-4)")
    parser.add_argument(
        "--tune-free-fraction", type=float, default=0.1, help="free phase at which each LAWN pair's lr is tuned"
    )
    parser.add_argument(
        "--plot-free-fraction", type=float, default=0.1, help="free phase of the LAWN arms drawn in the plot"
    )
    parser.add_argument("--cache", nargs="+", type=Path, default=[], help="JSON run caches: the first is written")
    parser.add_argument("--report-only", action="store_true", help="train nothing: report the cached runs")
    parser.add_argument(
        "--lr-edge", action="store_true", help="also check one learning rate above each grid (seed 0, validation)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "lawn_study.md")
    parser.add_argument("--plot", type=Path, default=RESULTS / "lawn_study.png")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead and noise
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    tune_free, plot_free = args.tune_free_fraction, args.plot_free_fraction
    if args.smoke:
        data, dataset = with_validation(*load_digits_flat()), "digits (smoke)"
        models, batch_sizes, epochs, seeds, grid_points = ["mlp"], [64, 512], 2, 1, 1
        free_fractions, tune_free, plot_free = [0.5], 0.5, 0.5
        out = Path(tempfile.gettempdir()) / "lawn_accuracy_smoke.md"  # the smoke run's files are not results
        plot_path = Path(tempfile.gettempdir()) / "lawn_norms_smoke.png"
    else:
        data, dataset = with_validation(*load_mnist1d()), "MNIST-1D"
        models, batch_sizes, epochs, seeds = args.models, args.batch_sizes, args.epochs, args.seeds
        grid_points, free_fractions, out, plot_path = args.grid_points, args.free_fractions, args.out, args.plot
    arms = make_arms(args.arms, free_fractions)
    columns = list(itertools.product(models, batch_sizes))
    if args.columns and not args.smoke:
        columns = [(m, int(b)) for m, b in (c.split(":") for c in args.columns)]
        models, batch_sizes = sorted({m for m, _ in columns}), sorted({b for _, b in columns})
    cache = RunCache(args.cache)
    # what the study and its tuning check both need to find (or train) a run
    shared = dict(
        data=data,
        dataset=dataset,
        epochs=epochs,
        grid_points=grid_points,
        tune_free_fraction=tune_free,
        cache=cache,
        report_only=args.report_only,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cells = run_study(columns, arms, seeds=seeds, **shared)
    if not cells:
        raise SystemExit("no finished cell to report: run the study first (without --report-only), or pass its --cache")
    columns = [(m, b) for m, b in columns if any((m, b, arm) in cells for arm in arms)]
    fewest, most = min(len(c.runs) for c in cells.values()), max(len(c.runs) for c in cells.values())
    seeds_text = f"{seeds} seed(s)" if fewest == most == seeds else f"{fewest}-{most} of {seeds} seeds"
    _, y, x_val, _, x_test, _ = data
    header = (
        f"# LAWN study: {dataset} ({len(y)} train / {len(x_val)} validation / {len(x_test)} test), "
        f"{seeds_text}, {epochs} epochs"
    )
    settings = [
        f"models {models}, batch sizes {batch_sizes}, {epochs} epochs, {seeds_text} (1000...), free phases "
        f"{[f'{100 * f:g}%' for f in free_fractions]}, {grid_points} point(s) per lr / wd grid",
        f"lr grids {dict((k, thin(v, grid_points)) for k, v in LR_GRID.items())}; weight decay grids: Adam+L2 "
        f"{thin(WD_GRID['l2'], grid_points)}, AdamW {thin(WD_GRID['decoupled'], grid_points)}, SGD "
        f"{thin(SGD_WD_GRID, grid_points)}; LAWN arms: no weight decay, lr tuned per (optimizer, scope) at "
        f"free phase {100 * tune_free:g}% and shared by every free phase",
        "schedule: linear warm-up over 5 % of the steps, cosine to 0; SGD momentum 0.9; selection by final "
        "validation accuracy of seed 0",
    ]
    if args.lr_edge:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edge = lr_edge_check(columns, arms, **shared)
        settings.append("tuning check (--lr-edge): below the tables")
    text = write_report(cells, columns, arms, header, settings, out, edge if args.lr_edge else [])
    plotted = [arm for arm in arms if arm.scope is None or math.isclose(arm.free_fraction, plot_free)]
    plot(cells, columns, plotted, epochs, plot_path)
    print(text)
    print(f"wrote {out} and {plot_path}")


if __name__ == "__main__":
    main()

"""Does distillation help a small student? Student alone vs KD, NKD, DKD, DIST, DHKD (± logit standardization).

Two settings (``--data``), both offline and CPU-sized; for each seed a teacher trains on the whole
training split, then the students, which differ only in the callback:

- ``mnist1d`` (default; issue 18): MNIST-1D (``benchmarks/mnist1d.py``: 4000 training signals of
  40 samples, 20 % of them held out for validation by seed, the package's 1000 test signals).
  Teacher: a 1-D CNN (three Conv1d-BN-ReLU, width 32, flattened into a Linear). Student: the MLP of
  the MNIST-1D paper (40-100-100-10, ReLU) on the same training split: an MLP cannot see the
  signals' translation structure, which the teacher's soft labels carry.
- ``digits``: 8x8 digits with the library's seeded stratified splits; teacher a CNN of width 32,
  student a CNN of width 4 trained on ``--train-fraction`` of the split (about 100 images).

The students:

- ``student``: cross-entropy alone;
- ``+KD``: ``TeacherDistillation(loss="kd", temperature=4)``;
- ``+NKD``: ``TeacherDistillation(loss="nkd", temperature=1, gamma=1.5)`` (ImageNet defaults);
- ``+NKD T=3 g=3.5``: the official CIFAR-100 setting;
- ``+DKD``: mdistiller's CIFAR-100 setting (T=4, alpha=1, beta=8; warm-up 5 epochs: their 20 of
  240 scaled to this schedule);
- ``+DIST``: the official defaults (T=1, beta=gamma=1);
- ``+DHKD``: BinaryKL-Norm (T=2) on an auxiliary linear head; the main head keeps CE only;
- ``+...+LS``: the same after logit standardization (base temperature 2; KD weight 9 and DKD
  alpha 9, beta 72 as the official CIFAR-100 commands).

Every hyperparameter is the papers' (no tuning here, so nothing is tuned on the test set).
Reported: test accuracy (%) after the last epoch and at the epoch of best validation accuracy,
mean ± std over seeds, and each loss's paired difference against the student alone.

    python -m benchmarks.accuracy_distillation                # MNIST-1D, 5 seeds
    python -m benchmarks.accuracy_distillation --data digits  # digits, 5 seeds
    python -m benchmarks.accuracy_distillation --smoke        # 1 seed, 2 epochs: checks it runs
    python -m benchmarks.accuracy_distillation --only DKD DIST  # the student and those rows only
    python -m benchmarks.accuracy_distillation --seed-list 3 4  # some seeds (e.g. a second process);
                                                              # the table covers every seed on disk
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from benchmarks.harness import quiet_trainer
from benchmarks.mnist1d import MNIST1DDataModule
from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.data.digits import DigitsDataModule
from lightning_logits.modules.classifier import Classifier

ROOT = Path(__file__).resolve().parent.parent


class SmallCNN(nn.Module):
    """``[N, 1, 8, 8] -> [N, 10]``: conv-BN-ReLU twice, pooling, a linear head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(4 * width, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


class BestValTest(Callback):
    """Test accuracy at the epoch of best validation accuracy (evaluated on the test split each epoch)."""

    def __init__(self, datamodule: DigitsDataModule | MNIST1DDataModule) -> None:
        self.datamodule = datamodule
        self.best_val = -1.0
        self.test_at_best = 0.0

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        val = float(trainer.callback_metrics["val/acc"])
        if val > self.best_val:
            self.best_val = val
            self.test_at_best = test_accuracy(pl_module, self.datamodule)


def test_accuracy(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> float:
    x, y = datamodule.splits["test"]  # type: ignore[attr-defined]
    was_training = module.training
    module.eval()
    with torch.no_grad():
        predicted = module(x.to(module.device)).argmax(1).cpu()
    module.train(was_training)
    return 100.0 * float((predicted == y).float().mean())


def _trainer(epochs: int, callbacks: list[Callback]) -> pl.Trainer:
    return quiet_trainer(
        max_epochs=epochs,
        callbacks=callbacks,
    )


def _adamw(params: object) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-3, weight_decay=1e-2)  # type: ignore[arg-type]


class Conv1dNet(nn.Module):
    """``[N, 40] -> [N, 10]``: three Conv1d-BN-ReLU (the last two with stride 2), flattened into a Linear."""

    def __init__(self, width: int = 32, length: int = 40) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(width * (length // 4), 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x.unsqueeze(1)))


def mnist1d_mlp(hidden: int = 100) -> nn.Sequential:
    """The MNIST-1D paper's MLP: ``40 -> hidden -> hidden -> 10`` with ReLU."""
    return nn.Sequential(nn.Linear(40, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@dataclass(frozen=True)
class Setting:
    """One dataset with its teacher, its student and its schedule."""

    description: str
    teacher: Callable[[], nn.Module]
    student: Callable[[], nn.Module]
    data: Callable[[int, int, float], pl.LightningDataModule]  # (seed, batch size, train fraction)
    teacher_epochs: int
    epochs: int
    train_fraction: float
    student_batch: int


def _digits(seed: int, batch_size: int, train_fraction: float) -> pl.LightningDataModule:
    return DigitsDataModule(batch_size=batch_size, seed=seed, train_fraction=train_fraction)


def _mnist1d(seed: int, batch_size: int, train_fraction: float) -> pl.LightningDataModule:
    if train_fraction != 1.0:
        raise ValueError("--train-fraction applies to digits only; MNIST-1D students use the whole training split")
    return MNIST1DDataModule(batch_size=batch_size, seed=seed)


SETTINGS = {
    "mnist1d": Setting(
        "MNIST-1D. Teacher: 1-D CNN (3 x Conv1d-BN-ReLU, width 32) on the training split (3200 signals). "
        "Student: MLP 40-100-100-10 on the same split",
        teacher=Conv1dNet,
        student=mnist1d_mlp,
        data=_mnist1d,
        teacher_epochs=30,
        epochs=60,
        train_fraction=1.0,
        student_batch=64,
    ),
    "digits": Setting(
        "digits 8x8. Teacher: CNN width 32 on the full training split. Student: CNN width 4 "
        f"({sum(p.numel() for p in SmallCNN(4).parameters())} parameters vs "
        f"{sum(p.numel() for p in SmallCNN(32).parameters())}) on a share of the training split",
        teacher=lambda: SmallCNN(32),
        student=lambda: SmallCNN(4),
        data=_digits,
        teacher_epochs=15,
        epochs=40,
        train_fraction=0.1,
        student_batch=16,
    ),
}


def train_teacher(setting: Setting, seed: int, epochs: int) -> tuple[nn.Module, float]:
    pl.seed_everything(seed, verbose=False)
    datamodule = setting.data(seed, 64, 1.0)
    module = Classifier(setting.teacher(), optimizer=_adamw)
    _trainer(epochs, []).fit(module, datamodule=datamodule)
    return module.model, test_accuracy(module, datamodule)


def train_student(
    setting: Setting, seed: int, epochs: int, train_fraction: float, make_callbacks: Callable[[], list[Callback]]
) -> tuple[float, float]:
    pl.seed_everything(seed, verbose=False)
    datamodule = setting.data(seed, setting.student_batch, train_fraction)
    module = Classifier(setting.student(), optimizer=_adamw)
    best = BestValTest(datamodule)
    _trainer(epochs, [*make_callbacks(), best]).fit(module, datamodule=datamodule)
    return test_accuracy(module, datamodule), best.test_at_best


def student_configs(teacher: nn.Module, only: list[str] | None = None) -> dict[str, Callable[[], list[Callback]]]:
    """The student runs: name -> a factory of its callbacks (``only``: keep the names containing one of these)."""

    def distill(**kwargs: object) -> Callable[[], list[Callback]]:
        return lambda: [TeacherDistillation(teacher, **kwargs)]  # type: ignore[arg-type]

    configs: dict[str, Callable[[], list[Callback]]] = {
        "student": list,
        "+KD (T=4)": distill(loss="kd", temperature=4.0),
        "+NKD (T=1, gamma=1.5)": distill(loss="nkd"),
        "+NKD (T=3, gamma=3.5)": distill(loss="nkd", temperature=3.0, gamma=3.5),
        # DKD: mdistiller's CIFAR-100 config (T=4, alpha=1, beta=8); its 20 warm-up epochs of 240
        # scaled to 5 here
        "+DKD (T=4, alpha=1, beta=8)": distill(loss="dkd", temperature=4.0, alpha=1.0, beta=8.0, warmup_epochs=5),
        "+DIST (T=1, beta=1, gamma=1)": distill(loss="dist", temperature=1.0, beta=1.0, gamma=1.0),
        # dual-head KD: BinaryKL-Norm on an auxiliary linear head, the main head keeps CE only
        "+DHKD (T=2)": distill(loss="dhkd", temperature=2.0),
        # logit standardization: base temperature 2; KD weight 9 and DKD alpha 9, beta 72 as the
        # official CIFAR-100 commands; NKD and DIST (not in the paper) keep their weights
        "+KD+LS (T=2, weight 9)": distill(loss="kd", temperature=2.0, weight=9.0, standardize=True),
        "+NKD+LS (T=2)": distill(loss="nkd", temperature=2.0, standardize=True),
        "+DKD+LS (T=2, alpha=9, beta=72)": distill(
            loss="dkd", temperature=2.0, alpha=9.0, beta=72.0, standardize=True, warmup_epochs=5
        ),
        "+DIST+LS (T=2)": distill(loss="dist", temperature=2.0, standardize=True),
    }
    if only:
        configs = {k: v for k, v in configs.items() if k == "student" or any(o in k for o in only)}
    return configs


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def _paired(values: list[float], baseline: list[float]) -> str:
    return _mean_std([v - b for v, b in zip(values, baseline, strict=True)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", choices=sorted(SETTINGS), default="mnist1d")
    parser.add_argument("--seeds", type=int, default=5, help="run seeds 0 .. seeds-1")
    parser.add_argument("--seed-list", type=int, nargs="*", help="run these seeds instead of 0 .. seeds-1")
    parser.add_argument("--teacher-epochs", type=int, help="default: the setting's (MNIST-1D 30, digits 15)")
    parser.add_argument("--epochs", type=int, help="student epochs; default: the setting's (MNIST-1D 60, digits 40)")
    parser.add_argument("--train-fraction", type=float, help="digits only: the student's share of the split (0.1)")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 epochs: checks that it runs")
    parser.add_argument("--only", nargs="*", help="run only the students whose names contain one of these")
    parser.add_argument(
        "--out", type=Path, help="the table (default benchmarks/results/distillation_accuracy_<data>.md)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    setting = SETTINGS[args.data]
    teacher_epochs = args.teacher_epochs or setting.teacher_epochs
    epochs = args.epochs or setting.epochs
    train_fraction = setting.train_fraction if args.train_fraction is None else args.train_fraction
    seeds = list(range(args.seeds)) if args.seed_list is None else args.seed_list
    if args.smoke:
        seeds, teacher_epochs, epochs = [0], 2, 2
    out = args.out or ROOT / "benchmarks" / "results" / f"distillation_accuracy_{args.data}.md"
    # one file per seed, so an interrupted run resumes and several processes can share the seeds
    seed_dir = out.with_suffix("")
    settings = {"teacher_epochs": teacher_epochs, "epochs": epochs, "train_fraction": train_fraction, "only": args.only}

    def load(path: Path) -> dict[str, list[float]] | None:
        saved = json.loads(path.read_text())
        return saved["results"] if saved.get("settings") == settings else None

    started = time.perf_counter()
    per_seed: dict[int, dict[str, list[float]]] = {}  # seed -> config -> [last, best]
    for seed in seeds:
        path = seed_dir / f"seed_{seed}.json"
        if not args.smoke and path.is_file() and (saved := load(path)) is not None:
            per_seed[seed] = saved
            continue
        teacher, acc = train_teacher(setting, seed, teacher_epochs)
        results: dict[str, list[float]] = {"teacher": [acc, acc]}
        print(f"seed {seed} teacher: {acc:.2f}", flush=True)
        for name, make_callbacks in student_configs(teacher, args.only).items():
            last, best = train_student(setting, seed, epochs, train_fraction, make_callbacks)
            results[name] = [last, best]
            print(f"seed {seed} {name}: last {last:.2f} best-val {best:.2f}", flush=True)
        per_seed[seed] = results
        if not args.smoke:
            seed_dir.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"settings": settings, "results": results}, indent=1))
    if not args.smoke:  # the table covers every seed on disk that ran with these settings
        for path in sorted(seed_dir.glob("seed_*.json")):
            seed = int(path.stem.removeprefix("seed_"))
            if seed not in per_seed and (saved := load(path)) is not None:
                per_seed[seed] = saved

    runs = [per_seed[seed] for seed in sorted(per_seed)]
    teacher_acc = [results["teacher"][0] for results in runs]
    rows = {name: ([r[name][0] for r in runs], [r[name][1] for r in runs]) for name in runs[0] if name != "teacher"}
    minutes = (time.perf_counter() - started) / 60
    student_last = rows["student"][0]
    lines = [
        f"### accuracy: distillation ({args.data})",
        "",
        f"{setting.description}"
        + (f" ({train_fraction:.0%} of it)" if args.data == "digits" else "")
        + f"; {epochs} epochs, AdamW lr 3e-3, weight decay 1e-2. Teacher ({teacher_epochs} epochs): test accuracy "
        f"{_mean_std(teacher_acc)} %. Seeds {sorted(per_seed)}; test accuracy in %, mean ± std; the paired "
        f"difference is each seed's last-epoch accuracy minus the student alone's. This process: {minutes:.1f} min.",
        "",
        "| student | test acc, last epoch | test acc, best val epoch | paired diff vs student alone |",
        "|---|---:|---:|---:|",
    ]
    for name, (last, best) in rows.items():
        diff = "" if name == "student" else _paired(last, student_last)
        lines.append(f"| {name} | {_mean_std(last)} | {_mean_std(best)} | {diff} |")
    table = "\n".join(lines)
    print(table)
    if not args.smoke:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


if __name__ == "__main__":
    main()

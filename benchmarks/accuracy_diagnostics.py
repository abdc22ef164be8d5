"""Logit diagnostics on the embedded digits: does each paper's claim hold in direction here?

One small CNN (``[N, 1, 8, 8]``, three conv stages, global average pool to a 128-d feature,
``Linear(128, 8)``) is trained per seed and loss on digits 0-7 (digits 8 and 9 are held out as an
OOD set), with AdamW and a plain PyTorch loop (the diagnostics are post-hoc; Lightning adds nothing
to measure here). Per seed:

1. **OOD detection** (ViM, LogitGap vs MSP / max logit / energy): the cross-entropy model scores
   the ID test split against three OOD sets (uniform noise, random shapes, held-out digits 8-9);
   AUROC and FPR at 95% TPR, averaged over the OOD sets. ViM is fitted on the training features.
   LogitGap is reported with all ``C - 1`` gaps and with ``N`` from :func:`select_logit_gap_top_n`.
2. **Accuracy estimation** (MaNo vs average confidence and ATC): the CE model on the clean test
   split and its 20 corrupted copies (4 corruptions x 5 severities); Spearman and Pearson
   correlation of each score with the true accuracy over the 21 sets, and the mean absolute error
   of the two scores that are accuracy estimates (AC, ATC with an MSP threshold fitted on the
   validation split).
3. **Selective classification** (logit normalization vs MSP): AURC of a model trained with label
   smoothing 0.2, with the MSP and with ``max z / ||z||_2``; the CE model alongside.
4. **Calibration** (dual focal loss vs cross-entropy): test accuracy and 15-bin ECE; the CE model
   after temperature scaling (fitted on the validation split) alongside.

    python -m benchmarks.accuracy_diagnostics                      # the full run: 5 seeds, 40 epochs
    python -m benchmarks.accuracy_diagnostics --seeds 2 --epochs 20  # a reduced run
    python -m benchmarks.accuracy_diagnostics --smoke               # seconds: 1 seed, 2 epochs

Writes ``benchmarks/results/diagnostics_accuracy.md`` (not with ``--smoke``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_logits.data import DigitsShiftDataModule
from lightning_logits.functional import (
    atc_estimate,
    aurc,
    average_confidence,
    dual_focal_loss,
    energy_score,
    excess_aurc,
    expected_calibration_error,
    fit_atc_threshold,
    fit_temperature,
    fit_vim,
    fpr_at_tpr,
    logit_gap_score,
    mano_score,
    max_logit_score,
    msp_score,
    normalized_logit_score,
    ood_auroc,
    select_logit_gap_top_n,
    vim_score,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
HELD_OUT = (8, 9)
LABEL_SMOOTHING = 0.2
DUAL_FOCAL_GAMMA = 5.0


def _block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SmallCNN(nn.Module):
    """``[N, 1, 8, 8] -> [N, C]``; :meth:`embed` gives the 128-d feature entering ``fc``."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_block(1, 32, 1), _block(32, 64, 2), _block(64, 128, 2))
        self.fc = nn.Linear(128, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.embed(x))


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "ce": lambda z, y: F.cross_entropy(z, y),
    "ls": lambda z, y: F.cross_entropy(z, y, label_smoothing=LABEL_SMOOTHING),
    "dual_focal": lambda z, y: dual_focal_loss(z, y, gamma=DUAL_FOCAL_GAMMA),
}


def train(loss: str, dm: DigitsShiftDataModule, seed: int, epochs: int) -> SmallCNN:
    torch.manual_seed(seed)
    model = SmallCNN(dm.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    x, y = dm.splits["train"]
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(32):
            if len(idx) < 2:
                continue
            opt.zero_grad()
            LOSSES[loss](model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def outputs(model: SmallCNN, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(features [N, 128], logits [N, C])`` in float64."""
    feats = torch.cat([model.embed(part) for part in x.split(512)])
    return feats.double(), model.fc(feats).double()


def _loader_tensors(loaders: dict) -> dict[str, tuple[Tensor, Tensor]]:
    out = {}
    for name, loader in loaders.items():
        xs, ys = zip(*loader, strict=True)
        out[name] = (torch.cat(xs), torch.cat(ys))
    return out


def _ranks(v: Tensor) -> Tensor:
    return torch.argsort(torch.argsort(v)).double()


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def run_seed(seed: int, epochs: int) -> dict[str, dict[str, float]]:
    dm = DigitsShiftDataModule(held_out_classes=HELD_OUT, seed=seed, batch_size=256)
    dm.setup("fit")
    models = {loss: train(loss, dm, seed, epochs) for loss in LOSSES}
    ce = models["ce"]
    res: dict[str, dict[str, float]] = {}

    # 1. OOD detection
    train_f, train_z = outputs(ce, dm.splits["train"][0])
    test_x, test_y = dm.splits["test"]
    test_f, test_z = outputs(ce, test_x)
    sub = fit_vim(train_f, ce.fc.weight, ce.fc.bias)
    top_n = select_logit_gap_top_n(train_z)
    scorers: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
        "MSP": lambda f, z: msp_score(z),
        "max logit": lambda f, z: max_logit_score(z),
        "energy": lambda f, z: energy_score(z),
        "ViM": lambda f, z: vim_score(f, z, sub),
        "LogitGap (all C-1)": lambda f, z: logit_gap_score(z),
        "LogitGap (N selected)": lambda f, z: logit_gap_score(z, top_n=top_n),
    }
    ood = {name: outputs(ce, x) for name, (x, _) in _loader_tensors(dm.ood_dataloaders()).items()}
    for method, score in scorers.items():
        ids = score(test_f, test_z)
        aurocs = [float(ood_auroc(ids, score(f, z))) for f, z in ood.values()]
        fprs = [float(fpr_at_tpr(ids, score(f, z))) for f, z in ood.values()]
        row = {"auroc": 100 * statistics.mean(aurocs), "fpr95": 100 * statistics.mean(fprs)}
        row.update({f"auroc_{name}": 100 * a for name, a in zip(ood, aurocs, strict=True)})
        res[f"ood/{method}"] = row
    res["ood/meta"] = {"top_n": float(top_n)}

    # 2. accuracy estimation across corruption severities
    val_x, val_y = dm.splits["val"]
    _, val_z = outputs(ce, val_x)
    threshold = fit_atc_threshold(msp_score(val_z), val_z.argmax(1) == val_y)
    sets = {"clean": (test_x, test_y), **_loader_tensors(dm.shifted_dataloaders())}
    acc, est = [], {"MaNo": [], "AC": [], "ATC": []}
    for x, y in sets.values():
        _, z = outputs(ce, x)
        acc.append(float((z.argmax(1) == y).double().mean()))
        est["MaNo"].append(float(mano_score(z)))
        est["AC"].append(float(average_confidence(z)))
        est["ATC"].append(float(atc_estimate(msp_score(z), threshold)))
    acc_t = torch.tensor(acc, dtype=torch.float64)
    for method, values in est.items():
        v = torch.tensor(values, dtype=torch.float64)
        row = {"spearman": _pearson(_ranks(v), _ranks(acc_t)), "pearson": _pearson(v, acc_t)}
        if method != "MaNo":
            row["mae"] = 100 * float((v - acc_t).abs().mean())
        res[f"shift/{method}"] = row
    res["shift/meta"] = {"acc_min": 100 * min(acc), "acc_max": 100 * max(acc)}
    res["shift/points"] = {f"{k}_{i}": v for k, vals in {"acc": acc, **est}.items() for i, v in enumerate(vals)}

    # 3. selective classification and 4. calibration, on the ID test split and on the corrupted
    # copies at severity 3 (more errors to rank than the ~2% of the clean split)
    sev3 = [v for k, v in sets.items() if k.endswith("_3")]
    for loss, model in models.items():
        row: dict[str, float] = {}
        for suffix, evaluated in (("", [(test_x, test_y)]), ("_s3", sev3)):
            parts: dict[str, list[float]] = {}
            for x, y in evaluated:
                _, z = outputs(model, x)
                correct = z.argmax(1) == y
                conf = {"msp": msp_score(z), "norm": normalized_logit_score(z, p=2.0)}
                values = {
                    "acc": 100 * float(correct.double().mean()),
                    "ece": 100 * float(expected_calibration_error(z, y)),
                    **{f"aurc_{k}": 100 * float(aurc(v, correct)) for k, v in conf.items()},
                    **{f"eaurc_{k}": 100 * float(excess_aurc(v, correct)) for k, v in conf.items()},
                }
                for key, value in values.items():
                    parts.setdefault(key, []).append(value)
            row.update({f"{key}{suffix}": statistics.mean(v) for key, v in parts.items()})
        res[f"model/{loss}"] = row
    temperature = fit_temperature(val_z, val_y)
    res["model/ce"]["ece_ts"] = 100 * float(expected_calibration_error(test_z / temperature, test_y))
    return res


def _ms(values: list[float], digits: int = 2) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def format_tables(runs: list[dict[str, dict[str, float]]], seeds: list[int], epochs: int, seconds: float) -> str:
    def col(key: str, field: str) -> list[float]:
        return [r[key][field] for r in runs]

    ood_names = [k.removeprefix("auroc_") for k in runs[0]["ood/MSP"] if k.startswith("auroc_")]
    lines = [
        f"### Logit diagnostics: digits 0-7 (8, 9 held out), small CNN, {epochs} epochs, seeds {seeds}",
        "",
        "OOD detection (CE model; ID = test split of digits 0-7), mean over the OOD sets, then over seeds:",
        "",
        "| score | AUROC (%) ↑ | FPR95 (%) ↓ | " + " | ".join(f"AUROC {n}" for n in ood_names) + " |",
        "|---|---:|---:|" + "---:|" * len(ood_names),
    ]
    for key in [k for k in runs[0] if k.startswith("ood/") and k != "ood/meta"]:
        per_set = " | ".join(_ms(col(key, f"auroc_{n}"), 1) for n in ood_names)
        lines.append(f"| {key[4:]} | {_ms(col(key, 'auroc'))} | {_ms(col(key, 'fpr95'))} | {per_set} |")
    lines += [
        "",
        f"LogitGap's selected N per seed: {[int(r['ood/meta']['top_n']) for r in runs]} (of C-1 = 7).",
        "",
        "Accuracy estimation across the clean test split and 20 corrupted copies (CE model; true accuracy "
        f"{_ms(col('shift/meta', 'acc_min'), 1)} to {_ms(col('shift/meta', 'acc_max'), 1)} %):",
        "",
        "| score | Spearman rho ↑ | Pearson r ↑ | MAE vs true acc (pp) ↓ |",
        "|---|---:|---:|---:|",
    ]
    for method in ("MaNo", "AC", "ATC"):
        key = f"shift/{method}"
        mae = _ms(col(key, "mae")) if "mae" in runs[0][key] else "n/a (a score, not an accuracy)"
        lines.append(f"| {method} | {_ms(col(key, 'spearman'), 3)} | {_ms(col(key, 'pearson'), 3)} | {mae} |")
    lines += [
        "",
        "Calibration (ID test split, and s3: mean over the four corruptions at severity 3):",
        "",
        "| training loss | test acc (%) | ECE (%) ↓ | acc s3 (%) | ECE s3 (%) ↓ |",
        "|---|---:|---:|---:|---:|",
    ]
    names = {
        "ce": "cross-entropy",
        "ls": f"label smoothing {LABEL_SMOOTHING}",
        "dual_focal": f"dual focal (gamma {DUAL_FOCAL_GAMMA:g})",
    }
    for loss, name in names.items():
        key = f"model/{loss}"
        lines.append(
            f"| {name} | {_ms(col(key, 'acc'))} | {_ms(col(key, 'ece'))} | {_ms(col(key, 'acc_s3'))} "
            f"| {_ms(col(key, 'ece_s3'))} |"
        )
    lines += [
        "",
        "Selective classification: AURC and excess AURC (E-AURC: AURC minus that of a perfect ranking with the "
        "same errors), confidence = MSP or the logit normalization max z / ||z||_2, in % (lower is better):",
        "",
        "| training loss | AURC MSP | AURC norm | E-AURC MSP | E-AURC norm | AURC MSP s3 | AURC norm s3 "
        "| E-AURC MSP s3 | E-AURC norm s3 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for loss, name in names.items():
        key = f"model/{loss}"
        cells = [
            _ms(col(key, f"{metric}{suffix}"), 3 if suffix == "" else 2)
            for suffix in ("", "_s3")
            for metric in ("aurc_msp", "aurc_norm", "eaurc_msp", "eaurc_norm")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Cross-entropy after temperature scaling (fitted on the validation split): "
        f"ECE {_ms(col('model/ce', 'ece_ts'))} %.",
        "",
        f"Mean ± sample standard deviation over seeds; {seconds:.0f} s in all.",
    ]
    return "\n".join(lines)


def plot_shift(runs: list[dict[str, dict[str, float]]], path: Path) -> None:
    """Estimated vs true accuracy over the 21 sets of every seed (MaNo, AC, ATC)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), sharex=True)
    for ax, method in zip(axes, ("MaNo", "AC", "ATC"), strict=True):
        for seed, run in enumerate(runs):
            points = run["shift/points"]
            n = sum(1 for k in points if k.startswith("acc_"))
            ax.scatter(
                [points[f"acc_{i}"] for i in range(n)], [points[f"{method}_{i}"] for i in range(n)], s=10, label=seed
            )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(title=method, xlabel="true accuracy", ylabel="score" if method == "MaNo" else "estimated accuracy")
    axes[0].legend(title="seed", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 seed, 2 epochs: checks the code runs")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", type=Path, default=RESULTS / "diagnostics_accuracy.md")
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny model: threads cost more than they give on a shared CPU
    seeds = [0] if args.smoke else list(range(args.seeds))
    epochs = 2 if args.smoke else args.epochs
    start = time.perf_counter()
    runs = [run_seed(seed, epochs) for seed in seeds]
    table = format_tables(runs, seeds, epochs, time.perf_counter() - start)
    print(table, flush=True)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        plot_shift(runs, args.out.with_name("diagnostics_shift.png"))


if __name__ == "__main__":
    main()

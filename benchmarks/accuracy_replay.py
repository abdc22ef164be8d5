"""ER vs UER on split digits (5 tasks of 2 classes, online: one pass, batches of 10).

For each method and buffer size, several seeds (the seed sets the class order, the in-task order,
the model's initialization and the buffer's random stream) each train a small MLP through the
stream with a real ``Trainer`` and :class:`ContinualMetrics`; the table reports the mean and std
of the final average accuracy and the average forgetting, and a PNG shows the mean accuracy
matrices as heatmaps. ``finetune`` (no replay) is the lower bound.

    python -m benchmarks.accuracy_replay            # the real run (5 seeds, buffers 50/100/200)
    python -m benchmarks.accuracy_replay --smoke    # seconds: checks it runs
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.harness import quiet_trainer
from lightning_logits.callbacks import ContinualMetrics
from lightning_logits.callbacks.replay import UER, ExperienceReplay
from lightning_logits.data.streams import ClassIncrementalStream
from lightning_logits.modules.classifier import Classifier

ROOT = Path(__file__).resolve().parent.parent


class DigitsMLP(nn.Module):
    """64 -> 256 -> 256 -> 10 ReLU MLP on flattened 8x8 digits; ``fc`` is the linear head."""

    def __init__(self, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.flatten(1)))


def run_one(method: str, buffer_size: int, seed: int, limit_batches: int | None, lr: float = 0.1) -> torch.Tensor:
    """Train one stream; returns the ``[T, T]`` accuracy matrix.

    ``method``: ``"finetune"``, ``"er"``, ``"uer"`` (mask "all") or ``"uer-seen"`` (mask "seen").
    """
    pl.seed_everything(seed, verbose=False)
    module = Classifier(DigitsMLP(), num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=lr))
    callbacks: list[pl.Callback] = [ContinualMetrics(plot=False)]
    if method == "er":
        callbacks.append(ExperienceReplay(buffer_size, replay_batch_size=10, seed=seed))
    elif method in ("uer", "uer-seen"):
        mask = "seen" if method == "uer-seen" else "all"
        callbacks.append(UER(buffer_size, replay_batch_size=10, seed=seed, mask=mask))
    trainer = quiet_trainer(
        max_epochs=5,
        reload_dataloaders_every_n_epochs=1,
        limit_train_batches=limit_batches,
        callbacks=callbacks,
        default_root_dir=tempfile.mkdtemp(prefix="ll_replay_"),  # ContinualMetrics writes its matrix here
    )
    trainer.fit(
        module, datamodule=ClassIncrementalStream("digits", num_tasks=5, batch_size=10, seed=seed, flatten=True)
    )
    metrics = callbacks[0]
    assert isinstance(metrics, ContinualMetrics) and metrics.accuracy_matrix is not None
    return metrics.accuracy_matrix.clone()


def _forgetting(m: torch.Tensor) -> float:
    from lightning_logits.functional import average_forgetting

    return average_forgetting(m)


def _fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def plot_heatmaps(matrices: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(matrices)
    cols = 4
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, name in zip(axes.flat, names, strict=False):
        values = matrices[name].numpy()
        ax.axis("on")
        ax.imshow(values, vmin=0, vmax=1, cmap="viridis")
        t = values.shape[0]
        for i in range(t):
            for j in range(i + 1):
                ax.text(j, i, f"{100 * values[i, j]:.0f}", ha="center", va="center", fontsize=7, color="white")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("task j", fontsize=8)
        ax.set_ylabel("after task i", fontsize=8)
        ax.set_xticks(range(t))
        ax.set_yticks(range(t))
    fig.suptitle("split digits: mean accuracy matrix R[i, j] (%) over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 seed, buffer 50, 3 batches per task")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--buffers", type=int, nargs="+", default=[50, 100, 200])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # tiny model: one thread is fastest and steadiest
    seeds = list(range(1 if args.smoke else args.seeds))
    buffers = [50] if args.smoke else args.buffers
    limit = 3 if args.smoke else None
    methods = ("er", "uer") if args.smoke else ("er", "uer", "uer-seen")
    configs = [("finetune", 0)] + [(m, b) for b in buffers for m in methods]
    start = time.time()
    rows = []
    mean_matrices: dict[str, torch.Tensor] = {}
    for method, buffer_size in configs:
        matrices = [run_one(method, buffer_size, seed, limit) for seed in seeds]
        finals = [float(m[-1].mean()) for m in matrices]
        forgets = [_forgetting(m) for m in matrices]
        label = method if method == "finetune" else f"{method} M={buffer_size}"
        mean_matrices[label] = torch.stack(matrices).mean(dim=0)
        rows.append(f"| {method} | {buffer_size or '-'} | {_fmt(finals)} | {_fmt(forgets)} | {len(seeds)} |")
        print(rows[-1], flush=True)
    elapsed = time.time() - start
    table = "\n".join(
        [
            "### accuracy: replay (split digits, 5 tasks x 2 classes, online, batch 10, replay batch 10)",
            "",
            "| method | buffer | final avg acc (%) | avg forgetting (%) | seeds |",
            "|---|---:|---:|---:|---:|",
            *rows,
            "",
            "MLP 64-256-256-10, SGD lr 0.1, UER temperature 0.09 (uer: mask 'all', uer-seen: mask 'seen'); "
            f"mean ± std over seeds; {elapsed:.0f} s on the CPU"
            + (" (smoke: 3 batches per task)" if args.smoke else ""),
        ]
    )
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_smoke" if args.smoke else ""
    (args.out / f"replay_accuracy{suffix}.md").write_text(table + "\n")
    plot_heatmaps(mean_matrices, args.out / f"replay_heatmaps{suffix}.png")


if __name__ == "__main__":
    main()

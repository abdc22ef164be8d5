"""Replay methods on class-incremental streams: fine-tune, ER, ER-ACE and UER, across buffers, models and seeds.

Streams: split digits (scikit-learn's 8x8 digits, embedded) and split MNIST-1D (the ``mnist1d``
package's procedurally generated 40-sample signals, made offline and cached), each 5 tasks of 2
classes, seen once in batches of 10 with a replay batch of 10 (the online continual learning
protocol). Models: an MLP (in -> 256 -> 256 -> 10) and the reduced ResNet18 of the literature
(``reduced_resnet18``: width 20, 3x3 stem, no max-pool; digits as 1x16x16 images (upsampled:
at 8x8 its last stage's map is 1x1, too small for BatchNorm on a task's last batch of one sample),
MNIST-1D as 1x1x40). SGD lr 0.1 without momentum. Methods: ``finetune`` (no replay: the lower bound),
``er``, ``er_ace``, ``uer-all`` / ``uer-seen`` / ``uer-present`` (UER's incoming-softmax mask).
Evaluation: ``ContinualMetrics`` with ``eval_mask="all"`` (argmax over every class). The seed
sets the class order, the in-task order, the initialization and the buffer's random stream.

The table reports mean ± std over seeds of the final average accuracy, the average forgetting,
backward transfer and learning accuracy; one PNG per (stream, model) shows the mean accuracy
matrices as heatmaps.

    python -m benchmarks.accuracy_replay                     # full: 2 streams x 2 models x 4 buffers x 5 seeds
    python -m benchmarks.accuracy_replay --streams digits --models mlp --buffers 100 200 --seeds 3   # reduced
    python -m benchmarks.accuracy_replay --smoke             # seconds: checks it runs
    python -m benchmarks.accuracy_replay --streams mnist1d --models mlp --out runs/a   # one part...
    python -m benchmarks.accuracy_replay --merge runs/a/replay_accuracy.md runs/b/replay_accuracy.md
                                                             # ...and the parts joined into one report
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from benchmarks.harness import quiet_trainer
from benchmarks.mnist1d import MNIST1DDataModule
from lightning_logits.callbacks import ContinualMetrics
from lightning_logits.callbacks.replay import ERACE, UER, ExperienceReplay
from lightning_logits.data.streams import ClassIncrementalStream
from lightning_logits.functional.replay import average_forgetting, backward_transfer, learning_accuracy
from lightning_logits.modules.classifier import Classifier

ROOT = Path(__file__).resolve().parent.parent
STREAMS = ("digits", "mnist1d")
MODELS = ("mlp", "reduced_resnet18")
METHODS = ("finetune", "er", "er_ace", "uer-all", "uer-seen", "uer-present")


class MLP(nn.Module):
    """``in -> 256 -> 256 -> 10`` ReLU MLP on flattened inputs; ``fc`` is the linear head."""

    def __init__(self, in_features: int, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x.flatten(1)))


_MNIST1D: MNIST1DDataModule | None = None


def make_stream(stream: str, seed: int, model: str = "mlp") -> ClassIncrementalStream:
    if stream == "digits":
        # The ResNet sees 16x16 digits: its three stride-2 stages turn 8x8 into a 1x1 map, where a
        # task's last batch of one sample leaves BatchNorm a single value per channel (an error).
        size = 16 if model == "reduced_resnet18" else 8
        return ClassIncrementalStream("digits", num_tasks=5, batch_size=10, seed=seed, image_size=size)
    global _MNIST1D
    if _MNIST1D is None:  # generated once per process
        _MNIST1D = MNIST1DDataModule(val_fraction=0, shape=(1, 1, 40))  # one-row images: 2-D convs apply
        _MNIST1D.setup()
    return ClassIncrementalStream(_MNIST1D, num_tasks=5, batch_size=10, seed=seed)


def make_module(stream: str, model: str, lr: float = 0.1) -> Classifier:
    def sgd(params: Any) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr)

    if model == "mlp":
        return Classifier(MLP(64 if stream == "digits" else 40), num_classes=10, optimizer=sgd)
    return Classifier("reduced_resnet18", num_classes=10, in_chans=1, optimizer=sgd)


def make_replay(method: str, buffer_size: int, seed: int) -> pl.Callback | None:
    if method == "finetune":
        return None
    if method == "er":
        return ExperienceReplay(buffer_size, replay_batch_size=10, seed=seed)
    if method == "er_ace":
        return ERACE(buffer_size, replay_batch_size=10, seed=seed)
    mask = method.split("-", 1)[1]
    return UER(buffer_size, replay_batch_size=10, seed=seed, mask=mask)  # type: ignore[arg-type]


def run_one(stream: str, model: str, method: str, buffer_size: int, seed: int, limit: int | None) -> torch.Tensor:
    """Train one stream; returns the ``[T, T]`` accuracy matrix."""
    pl.seed_everything(seed, verbose=False)
    module = make_module(stream, model)
    callbacks: list[pl.Callback] = [ContinualMetrics(plot=False)]
    replay = make_replay(method, buffer_size, seed)
    if replay is not None:
        callbacks.append(replay)
    trainer = quiet_trainer(
        max_epochs=5,
        reload_dataloaders_every_n_epochs=1,
        limit_train_batches=limit,
        callbacks=callbacks,
        default_root_dir=tempfile.mkdtemp(prefix="ll_replay_"),  # ContinualMetrics writes its matrix here
    )
    trainer.fit(module, datamodule=make_stream(stream, seed, model))
    metrics = callbacks[0]
    assert isinstance(metrics, ContinualMetrics) and metrics.accuracy_matrix is not None
    return metrics.accuracy_matrix.clone()


def _fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def plot_heatmaps(matrices: dict[str, torch.Tensor], path: Path, title: str) -> None:
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
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


_HEADER = (
    "| stream | model | method | buffer | final avg acc (%) | forgetting (%) | BWT (%) | learning acc (%) | seeds |"
)


def summary(rows: list[str]) -> str:
    """Final average accuracy and forgetting by method and buffer, one block per (stream, model).

    ``rows`` are the full table's rows (``| stream | model | method | buffer | acc | forgetting | ...``).
    """
    cells: dict[tuple[str, str], dict[str, dict[str, tuple[str, str]]]] = {}
    buffers: dict[tuple[str, str], list[str]] = {}
    for row in rows:
        stream, model, method, buffer, acc, forgetting = (c.strip() for c in row.strip("|").split("|")[:6])
        cells.setdefault((stream, model), {}).setdefault(method, {})[buffer] = (acc, forgetting)
        if buffer != "-" and buffer not in buffers.setdefault((stream, model), []):
            buffers[(stream, model)].append(buffer)
    blocks = []
    for (stream, model), methods in cells.items():
        sizes = sorted(buffers.get((stream, model), []), key=int)
        lines = [
            f"split {stream}, {model}: final average accuracy (%) / forgetting (%), mean ± std over seeds",
            "",
            "| method | " + " | ".join(f"M={b}" for b in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        for method, by_buffer in methods.items():
            if "-" in by_buffer:  # no buffer (fine-tune): the same value in every column
                acc, forgetting = by_buffer["-"]
                lines.append(f"| {method} | " + " | ".join(f"{acc} / {forgetting}" for _ in sizes) + " |")
            else:
                values = [by_buffer.get(b) for b in sizes]
                lines.append(f"| {method} | " + " | ".join(f"{v[0]} / {v[1]}" if v else "" for v in values) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def report(rows: list[str], notes: list[str]) -> str:
    """The full table of ``rows``, the ``notes`` under it, then the :func:`summary`."""
    title = "### accuracy: replay (5 tasks x 2 classes, online, batch 10, replay batch 10, SGD lr 0.1)"
    return "\n".join(
        [title, "", _HEADER, "|---|---|---|---:|---:|---:|---:|---:|---:|", *rows, "", *notes, "", summary(rows)]
    )


def merge(paths: list[Path], out: Path) -> str:
    """Join the tables of separate runs (e.g. one process per stream and model) into one report."""
    rows: list[str] = []
    footers: list[str] = []
    for path in paths:
        lines = path.read_text().splitlines()
        start = lines.index(_HEADER) + 2  # the full table: after its header and separator, up to a blank line
        end = lines.index("", start) if "" in lines[start:] else len(lines)
        rows += lines[start:end]
        footers += [line for line in lines if line.startswith("UER temperature")]
    table = report(
        rows, [f"{path.parent.name}/{path.name}: {note}" for path, note in zip(paths, footers, strict=False)]
    )
    out.write_text(table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="digits, MLP, 1 seed, buffer 50, 3 batches per task")
    parser.add_argument("--streams", nargs="+", choices=STREAMS, default=list(STREAMS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--buffers", type=int, nargs="+", default=[50, 100, 200, 500])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--merge", type=Path, nargs="+", help="join these runs' replay_accuracy.md tables into --out/replay_accuracy.md"
    )
    args = parser.parse_args(argv)
    if args.merge:
        args.out.mkdir(parents=True, exist_ok=True)
        print(merge(args.merge, args.out / "replay_accuracy.md"))
        return
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)  # small models: one thread is fastest and steadiest on a shared CPU
    if args.smoke:
        args.streams, args.models, args.buffers, args.seeds = ["digits"], ["mlp"], [50], 1
        args.methods = ["finetune", "er", "er_ace", "uer-all"]
    seeds = list(range(args.seeds))
    limit = 3 if args.smoke else None
    start = time.time()
    rows = []
    for stream in args.streams:
        for model in args.models:
            configs = [(m, 0 if m == "finetune" else b) for m in args.methods for b in args.buffers]
            configs = list(dict.fromkeys(configs))  # finetune once
            mean_matrices: dict[str, torch.Tensor] = {}
            for method, buffer_size in configs:
                matrices = [run_one(stream, model, method, buffer_size, seed, limit) for seed in seeds]
                finals = [float(m[-1].mean()) for m in matrices]
                label = method if method == "finetune" else f"{method} M={buffer_size}"
                mean_matrices[label] = torch.stack(matrices).mean(dim=0)
                rows.append(
                    f"| {stream} | {model} | {method} | {buffer_size or '-'} | {_fmt(finals)} | "
                    f"{_fmt([average_forgetting(m) for m in matrices])} | "
                    f"{_fmt([backward_transfer(m) for m in matrices])} | "
                    f"{_fmt([learning_accuracy(m) for m in matrices])} | {len(seeds)} |"
                )
                print(rows[-1], flush=True)
            suffix = "_smoke" if args.smoke else ""
            args.out.mkdir(parents=True, exist_ok=True)
            plot_heatmaps(
                mean_matrices,
                args.out / f"replay_heatmaps_{stream}_{model}{suffix}.png",
                f"split {stream}, {model}: mean accuracy matrix R[i, j] (%) over {len(seeds)} seed(s)",
            )
    elapsed = time.time() - start
    note = "UER temperature 0.09; eval mask 'all'; mean ± std over seeds; " + f"{elapsed:.0f} s on the CPU"
    table = report(rows, [note + (" (smoke: 3 batches per task)" if args.smoke else "")])
    print(table)
    suffix = "_smoke" if args.smoke else ""
    (args.out / f"replay_accuracy{suffix}.md").write_text(table + "\n")


if __name__ == "__main__":
    main()

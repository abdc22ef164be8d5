"""Our online ER and ER-ACE beside Avalanche's, on the same split, model, seeds and budget.

Needs the optional ``peers`` extra (``pip install lightning-logits[peers]``: avalanche-lib); the
main test suite never does (its smoke test is skipped, with that reason, when the extra is
missing).

Protocol, identical for both libraries: split digits from
:class:`~lightning_logits.data.streams.ClassIncrementalStream` (5 tasks of 2 classes, the same
class order and in-task sample order for a given seed; Avalanche gets the very same tensors via
``tensors_benchmark`` and ``split_online_stream`` into experiences of 10 samples), the same MLP
(64-256-256-10) with the same initial weights, SGD lr 0.1, incoming batch 10, replay batch 10,
buffer ``M``, reservoir sampling. Avalanche's idiomatic online ER is ``Naive`` +
``ReplayPlugin(ReservoirSamplingBuffer)`` (it concatenates the incoming and the replayed batch in
one forward pass), its ER-ACE the ``ER_ACE`` strategy. Accuracy is measured the same way for both
(argmax over all classes on the test samples of every task seen, after each task). Throughput is
training samples per second of each task's training, evaluation excluded.

    python -m benchmarks.peers_replay                     # 5 seeds, buffers 100 and 200
    python -m benchmarks.peers_replay --seeds 3 --buffers 100
    python -m benchmarks.peers_replay --smoke             # seconds: checks it runs
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
from lightning.pytorch.callbacks import Callback
from torch import nn

from benchmarks.accuracy_replay import MLP
from benchmarks.harness import quiet_trainer
from lightning_logits.callbacks import ContinualMetrics
from lightning_logits.callbacks.replay import ERACE, ExperienceReplay
from lightning_logits.data.streams import ClassIncrementalStream
from lightning_logits.functional.replay import average_forgetting, final_average_accuracy
from lightning_logits.modules.classifier import Classifier

ROOT = Path(__file__).resolve().parent.parent
NUM_TASKS = 5


def _stack(dataset: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[dataset[i] for i in range(len(dataset))], strict=True)
    return torch.stack(xs).float(), torch.stack([torch.as_tensor(y) for y in ys]).long()


def task_tensors(seed: int) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The stream's per-task (train, test) tensors, flattened, in the stream's order."""
    stream = ClassIncrementalStream("digits", num_tasks=NUM_TASKS, batch_size=10, seed=seed, flatten=True)
    stream.setup()
    train = [_stack(stream.task_dataset(t, "train")) for t in range(NUM_TASKS)]
    test = [_stack(stream.task_dataset(t, "test")) for t in range(NUM_TASKS)]
    return train, test


@torch.no_grad()
def evaluate(model: nn.Module, test: list[tuple[torch.Tensor, torch.Tensor]], upto: int) -> list[float]:
    model.eval()
    accs = [float((model(x).argmax(1) == y).float().mean()) for x, y in test[: upto + 1]]
    model.train()
    return accs


class TaskTimer(Callback):
    """Wall time of each training epoch (one task), validation excluded."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def run_ours(method: str, buffer_size: int, seed: int, limit: int | None) -> tuple[torch.Tensor, list[float]]:
    pl.seed_everything(seed, verbose=False)
    net = MLP(64)
    module = Classifier(net, num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    replay = ExperienceReplay if method == "er" else ERACE
    timer = TaskTimer()
    metrics = ContinualMetrics(plot=False)
    trainer = quiet_trainer(
        max_epochs=NUM_TASKS,
        reload_dataloaders_every_n_epochs=1,
        limit_train_batches=limit,
        callbacks=[metrics, replay(buffer_size, replay_batch_size=10, seed=seed), timer],
        default_root_dir=tempfile.mkdtemp(prefix="ll_peers_"),
    )
    stream = ClassIncrementalStream("digits", num_tasks=NUM_TASKS, batch_size=10, seed=seed, flatten=True)
    trainer.fit(module, datamodule=stream)
    assert metrics.accuracy_matrix is not None
    return metrics.accuracy_matrix.clone(), timer.seconds


def run_avalanche(method: str, buffer_size: int, seed: int, limit: int | None) -> tuple[torch.Tensor, list[float]]:
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.benchmarks.scenarios.online import split_online_stream
    from avalanche.training import ER_ACE, Naive
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ReservoirSamplingBuffer

    pl.seed_everything(seed, verbose=False)
    net = MLP(64)  # same seed, same construction: the same initial weights as ours
    train, test = task_tensors(seed)
    if limit is not None:
        train = [(x[: 10 * limit], y[: 10 * limit]) for x, y in train]
    bench = tensors_benchmark(train_tensors=train, test_tensors=test, task_labels=[0] * NUM_TASKS)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    common: dict[str, Any] = dict(
        train_mb_size=10, train_epochs=1, eval_mb_size=256, device="cpu", evaluator=EvaluationPlugin(loggers=[])
    )
    if method == "er":
        policy = ReservoirSamplingBuffer(max_size=buffer_size)
        plugin = ReplayPlugin(mem_size=buffer_size, batch_size_mem=10, storage_policy=policy)
        strategy: Any = Naive(
            model=net, optimizer=optimizer, criterion=nn.CrossEntropyLoss(), plugins=[plugin], **common
        )
    else:
        strategy = ER_ACE(model=net, optimizer=optimizer, mem_size=buffer_size, batch_size_mem=10, **common)
    matrix = torch.full((NUM_TASKS, NUM_TASKS), float("nan"))
    seconds = []
    for t, experience in enumerate(bench.train_stream):
        online = split_online_stream([experience], experience_size=10, shuffle=False)
        start = time.perf_counter()
        for sub in online:
            strategy.train(sub)
        seconds.append(time.perf_counter() - start)
        matrix[t, : t + 1] = torch.tensor(evaluate(net, test, t))
    return matrix, seconds


def _fmt(values: list[float]) -> str:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="1 seed, buffer 50, 3 batches per task")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--buffers", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)
    try:
        import avalanche  # noqa: F401
    except ImportError as error:
        raise SystemExit(
            f"the peer benchmark needs avalanche-lib: pip install 'lightning-logits[peers]' ({error})"
        ) from None
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    seeds = list(range(1 if args.smoke else args.seeds))
    buffers = [50] if args.smoke else args.buffers
    limit = 3 if args.smoke else None
    start = time.time()
    rows, ratio_rows = [], []
    for buffer_size in buffers:
        for method in ("er", "er_ace"):
            results = {
                name: [fn(method, buffer_size, seed, limit) for seed in seeds]
                for name, fn in (("ours", run_ours), ("avalanche", run_avalanche))
            }
            throughput: dict[str, list[float]] = {}
            for name, runs in results.items():
                finals = [final_average_accuracy(m) for m, _ in runs]
                forgets = [average_forgetting(m) for m, _ in runs]
                per_task = [statistics.mean(s[t] for _, s in runs) for t in range(NUM_TASKS)]
                samples = 10 * limit if limit else None
                throughput[name] = [
                    (samples or n) / sec for sec, n in zip(per_task, _task_sizes(seeds[0]), strict=True)
                ]
                rows.append(
                    f"| {method} | {buffer_size} | {name} | {_fmt(finals)} | {_fmt(forgets)} | "
                    f"{statistics.mean(throughput[name]):.0f} | {len(seeds)} |"
                )
                print(rows[-1], flush=True)
            ratios = [a / b for a, b in zip(throughput["ours"], throughput["avalanche"], strict=True)]
            ratio_rows.append(f"| {method} | {buffer_size} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
    elapsed = time.time() - start
    table = "\n".join(
        [
            "### peers: replay (split digits, 5 tasks x 2 classes, online, batch 10, replay 10, MLP, SGD lr 0.1)",
            "",
            "| method | buffer | library | final avg acc (%) | forgetting (%) | samples/s | seeds |",
            "|---|---:|---|---:|---:|---:|---:|",
            *rows,
            "",
            "throughput ratio ours / Avalanche per task:",
            "",
            "| method | buffer | " + " | ".join(f"task {t}" for t in range(NUM_TASKS)) + " |",
            "|---|---:|" + "---:|" * NUM_TASKS,
            *ratio_rows,
            "",
            f"mean ± std over seeds; one CPU thread; {elapsed:.0f} s"
            + (" (smoke: 3 batches per task)" if args.smoke else ""),
        ]
    )
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"replay_peers{'_smoke' if args.smoke else ''}.md").write_text(table + "\n")


def _task_sizes(seed: int) -> list[int]:
    stream = ClassIncrementalStream("digits", num_tasks=NUM_TASKS, seed=seed)
    stream.setup()
    return [len(stream.task_dataset(t, "train")) for t in range(NUM_TASKS)]


if __name__ == "__main__":
    main()

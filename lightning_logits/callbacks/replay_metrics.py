"""Continual-learning metrics as a Callback: the accuracy matrix of a class-incremental stream, and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from typing_extensions import override

from lightning_logits.batch import batch_input, batch_target
from lightning_logits.data.streams import ClassIncrementalStream
from lightning_logits.functional.replay import average_forgetting, final_average_accuracy
from lightning_logits.loss_terms import check_state_version

__all__ = ["ContinualMetrics", "plot_accuracy_matrix"]


class ContinualMetrics(Callback):
    """Accuracy matrix, final average accuracy and average forgetting of a :class:`ClassIncrementalStream`.

    After training task ``i`` (the validation at the end of epoch ``i``), it counts correct
    predictions per task on the test samples seen so far, sums the counts over DDP ranks, and
    fills row ``i`` of ``accuracy_matrix`` (``[T, T]``, NaN above the diagonal). It logs
    ``continual/acc_task<j>`` and ``continual/avg_acc`` after every task; after the last one
    ``continual/final_avg_acc`` and ``continual/forgetting``. After every task, rank 0 (re)writes
    ``accuracy_matrix.png`` (a heatmap) and ``accuracy_matrix.pt`` (the tensor, NaN where not yet
    measured) to the logger's directory (or ``out_dir``).

    The predictions are the argmax of what the module's ``forward`` returns during validation
    (recorded with a forward hook), so any module whose forward gives ``[N, C]`` logits works.

    Args:
        out_dir: where to write the heatmap and tensor; default the trainer's ``log_dir``.
        plot: write the PNG (needs matplotlib).

    Example:
        >>> metrics = ContinualMetrics(plot=False)
        >>> metrics.accuracy_matrix is None  # [T, T] once fit starts
        True
    """

    STATE_VERSION = 1

    def __init__(self, out_dir: str | None = None, plot: bool = True) -> None:
        self.out_dir = out_dir
        self.plot = plot
        self.accuracy_matrix: Tensor | None = None
        self._correct: Tensor | None = None
        self._total: Tensor | None = None
        self._outputs: list[Tensor] = []
        self._hook: Any = None

    def _stream(self, trainer: pl.Trainer) -> ClassIncrementalStream:
        stream = getattr(trainer, "datamodule", None)
        if not isinstance(stream, ClassIncrementalStream):
            raise TypeError(
                f"ContinualMetrics needs a ClassIncrementalStream as the datamodule, got {type(stream).__name__}"
            )
        return stream

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        stream = self._stream(trainer)
        if self.accuracy_matrix is None or self.accuracy_matrix.shape[0] != stream.num_tasks:
            self.accuracy_matrix = torch.full((stream.num_tasks, stream.num_tasks), float("nan"))

        def record(_module: Any, _args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and not torch.is_grad_enabled():
                self._outputs.append(output.detach())

        self._hook = pl_module.register_forward_hook(record)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        t = self._stream(trainer).num_tasks
        self._correct = torch.zeros(t, dtype=torch.float64, device=pl_module.device)
        self._total = torch.zeros(t, dtype=torch.float64, device=pl_module.device)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._outputs.clear()

    @override
    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        target = batch_target(batch)
        logits = next((o for o in reversed(self._outputs) if o.ndim == 2 and o.shape[0] == target.shape[0]), None)
        if logits is None:  # the module's validation_step did not call forward: run it ourselves
            with torch.no_grad():
                logits = pl_module(batch_input(batch))
        self._outputs.clear()
        assert self._correct is not None and self._total is not None
        stream = self._stream(trainer)
        task = stream.task_of_class.to(target.device)[target.long()]
        hit = (logits.argmax(dim=1) == target).double()
        self._correct.index_add_(0, task, hit)
        self._total.index_add_(0, task, torch.ones_like(hit))

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._correct is None or self._total is None:
            return
        correct = trainer.strategy.reduce(self._correct, reduce_op="sum")
        total = trainer.strategy.reduce(self._total, reduce_op="sum")
        stream = self._stream(trainer)
        row = stream.current_task
        seen = row + 1
        accuracy = (correct / total.clamp(min=1)).float().cpu()
        assert self.accuracy_matrix is not None
        self.accuracy_matrix[row, :seen] = accuracy[:seen]
        for j in range(seen):
            pl_module.log(f"continual/acc_task{j}", float(accuracy[j]))
        pl_module.log("continual/avg_acc", float(accuracy[:seen].mean()))
        if row == stream.num_tasks - 1:
            pl_module.log("continual/final_avg_acc", self.final_average_accuracy)
            pl_module.log("continual/forgetting", self.average_forgetting)
        # On every rank: trainer.log_dir broadcasts under DDP, so it must not run on rank 0 alone.
        out = self.out_dir or trainer.log_dir or trainer.default_root_dir
        self._save(out)  # after every task: a stopped run still leaves its partial matrix

    @property
    def final_average_accuracy(self) -> float:
        """Mean accuracy over all tasks after the last task (NaN before the end)."""
        return final_average_accuracy(self.accuracy_matrix) if self.accuracy_matrix is not None else float("nan")

    @property
    def average_forgetting(self) -> float:
        """Mean drop from each old task's best accuracy to its final one (NaN before the end)."""
        return average_forgetting(self.accuracy_matrix) if self.accuracy_matrix is not None else float("nan")

    @rank_zero_only
    def _save(self, out: str) -> None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        assert self.accuracy_matrix is not None
        torch.save(self.accuracy_matrix.clone(), path / "accuracy_matrix.pt")
        if self.plot:
            plot_accuracy_matrix(self.accuracy_matrix, path / "accuracy_matrix.png")

    @override
    def state_dict(self) -> dict[str, Any]:
        matrix = None if self.accuracy_matrix is None else self.accuracy_matrix.clone()
        return {"version": self.STATE_VERSION, "accuracy_matrix": matrix}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, self.STATE_VERSION, "ContinualMetrics")
        matrix = state_dict["accuracy_matrix"]
        self.accuracy_matrix = None if matrix is None else matrix.clone()


def plot_accuracy_matrix(matrix: Tensor, path: str | Path, title: str | None = None) -> None:
    """Draw ``R[i, j]`` (rows: after task i; columns: task j) as an annotated heatmap PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = matrix.float().numpy()
    t = values.shape[0]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * t, 0.8 + 0.7 * t))
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(t):
        for j in range(t):
            if values[i, j] == values[i, j]:  # not NaN
                color = "black" if values[i, j] > 0.6 else "white"
                ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xlabel("evaluated on task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(t))
    ax.set_yticks(range(t))
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Continual-learning metrics as a Callback: the accuracy matrix of a class-incremental stream, and its plot.

The counting lives in :class:`~lightning_logits.metrics.AccuracyMatrix` (a torchmetrics
``Metric`` whose counts DDP reduces by sum); this callback feeds it the validation predictions
after each task, keeps the matrix, logs its summaries and draws it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_logits.batch import batch_input, batch_target
from lightning_logits.data.streams import ClassIncrementalStream
from lightning_logits.functional.replay import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    final_average_accuracy,
    learning_accuracy,
)
from lightning_logits.loss_terms import check_state_version
from lightning_logits.metrics.replay import AccuracyMatrix

__all__ = ["ContinualMetrics", "plot_accuracy_matrix"]

_NO_MATPLOTLIB = (
    "ContinualMetrics(plot=True) cannot draw accuracy_matrix.png: matplotlib is not importable ({error}). "
    "Install it (`pip install matplotlib`, a dependency of lightning-logits) or pass plot=False; "
    "the matrix is still written to accuracy_matrix.pt and logged."
)


class ContinualMetrics(Callback):
    """Accuracy matrix, average accuracy, forgetting, backward transfer and learning accuracy of a stream.

    After training task ``i`` (the validation at the end of epoch ``i``) it counts correct
    predictions per task on the test samples of the tasks seen so far in an
    :class:`~lightning_logits.metrics.AccuracyMatrix` (counts summed over DDP ranks) and fills row
    ``i`` of ``accuracy_matrix`` (``[T, T]``, NaN above the diagonal). It logs after every task
    ``continual/acc_task<j>``, ``continual/avg_acc`` (mean of row ``i``),
    ``continual/learning_acc`` (mean of the diagonal so far), and from the second task on
    ``continual/forgetting`` and ``continual/bwt`` (backward transfer); after the last task also
    ``continual/final_avg_acc``. The functions are in :mod:`lightning_logits.functional.replay`.
    After every task, rank 0 (re)writes ``accuracy_matrix.png`` (a heatmap) and
    ``accuracy_matrix.pt`` (the tensor) to the logger's directory (or ``out_dir``).

    The predictions are the argmax of what the module's ``forward`` returns during validation
    (recorded with a forward hook), so any module whose forward gives ``[N, C]`` logits works.

    The matrix is part of the checkpoint. A run resumed from a checkpoint written at a task's last
    training step (``ModelCheckpoint(every_n_train_steps=...)``), whose validation Lightning then
    skips, evaluates that task itself at its first step, so the row is not left empty.

    Args:
        out_dir: where to write the heatmap and tensor; default the trainer's ``log_dir``.
        plot: write the PNG (matplotlib, a dependency of the package; when it cannot be
            imported, a warning says so once and only the tensor is written).
        eval_mask: ``"all"`` (default) predicts over all classes, as the UER author's framework
            (``FelixHuiweiLin/PCR``, ``agents/base.py``) evaluates ER and every method but PCR;
            ``"seen"`` leaves the classes of tasks not trained yet out of the argmax, as that
            framework evaluates PCR/HPCR. Compare numbers only under the same choice.

    Example:
        >>> metrics = ContinualMetrics(plot=False, eval_mask="seen")
        >>> metrics.accuracy_matrix is None  # [T, T] once fit starts
        True
    """

    STATE_VERSION = 1

    def __init__(
        self, out_dir: str | None = None, plot: bool = True, eval_mask: Literal["all", "seen"] = "all"
    ) -> None:
        if eval_mask not in ("all", "seen"):
            raise ValueError(f"eval_mask must be 'all' or 'seen', got {eval_mask!r}")
        self.out_dir = out_dir
        self.plot = plot
        self.eval_mask = eval_mask
        self.accuracy_matrix: Tensor | None = None
        self.metric: AccuracyMatrix | None = None
        self._outputs: list[Tensor] = []
        self._hook: Any = None
        self._resumed = False

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
        self.metric = AccuracyMatrix(stream.task_of_class, eval_mask=self.eval_mask)

        def record(_module: Any, _args: Any, output: Any) -> None:
            if isinstance(output, Tensor) and not torch.is_grad_enabled():
                self._outputs.append(output.detach())

        self._hook = pl_module.register_forward_hook(record)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _active(self, trainer: pl.Trainer) -> bool:
        return self.metric is not None and not trainer.sanity_checking

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        assert self.metric is not None
        self.metric.to(pl_module.device)
        self.metric.reset_row(self._stream(trainer).current_task)  # a repeated validation counts afresh

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
        if not self._active(trainer):
            self._outputs.clear()
            return
        target = batch_target(batch)
        logits = next((o for o in reversed(self._outputs) if o.ndim == 2 and o.shape[0] == target.shape[0]), None)
        if logits is None:  # the module's validation_step did not call forward: run it ourselves
            with torch.no_grad():
                logits = pl_module(batch_input(batch))
        self._outputs.clear()
        assert self.metric is not None
        self.metric.update(logits, target, after_task=self._stream(trainer).current_task)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._active(trainer):
            return
        self._fill_row(trainer, pl_module, self._stream(trainer).current_task)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        # A run resumed from a checkpoint written at a task's last training step (before the
        # end-of-task validation, as ModelCheckpoint(every_n_train_steps=...) does) goes on with the
        # next task without validating (Lightning takes that validation as done, and calls no
        # epoch-start hook for the resumed epoch). The weights have not changed since, so at the
        # first step after the resume, evaluate the finished task instead of leaving its row empty.
        if not self._resumed:
            return
        self._resumed = False
        if self.metric is None or self.accuracy_matrix is None:
            return
        row = self._stream(trainer).current_task - 1
        if row < 0 or not bool(self.accuracy_matrix[row, : row + 1].isnan().all()) or not self._validated(trainer, row):
            return
        self.metric.to(pl_module.device)
        self.metric.reset_row(row)
        was_training = pl_module.training
        pl_module.eval()
        loader = self._stream(trainer).val_dataloader()  # every task seen so far: columns > row are not kept
        with torch.no_grad():
            for number, batch in enumerate(loader):
                if number >= self._val_batches(trainer, len(loader)):
                    break
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                self.metric.update(pl_module(batch_input(batch)), batch_target(batch), after_task=row)
        self._outputs.clear()
        pl_module.train(was_training)
        self._fill_row(trainer, pl_module, row)

    @staticmethod
    def _validated(trainer: pl.Trainer, epoch: int) -> bool:
        """Whether Lightning validates at the end of epoch ``epoch``."""
        every = trainer.check_val_every_n_epoch
        return trainer.limit_val_batches != 0 and (every is None or (epoch + 1) % every == 0)

    @staticmethod
    def _val_batches(trainer: pl.Trainer, available: int) -> int:
        """The number of validation batches Lightning would run (``limit_val_batches``: a count or a fraction)."""
        limit = trainer.limit_val_batches
        if limit is None:
            return available
        return min(available, int(limit)) if isinstance(limit, int) else int(available * limit)

    def _fill_row(self, trainer: pl.Trainer, pl_module: pl.LightningModule, row: int) -> None:
        """Row ``row`` (the task just trained) of the matrix from the counts of this evaluation; log and save."""
        assert self.metric is not None and self.accuracy_matrix is not None
        stream = self._stream(trainer)
        matrix = self.metric.compute().float().cpu()  # counts summed over ranks by torchmetrics
        self.accuracy_matrix[row, : row + 1] = matrix[row, : row + 1]
        values = {f"continual/acc_task{j}": float(self.accuracy_matrix[row, j]) for j in range(row + 1)}
        values["continual/avg_acc"] = average_accuracy(self.accuracy_matrix, row)
        values["continual/learning_acc"] = learning_accuracy(self.accuracy_matrix, row)
        if row >= 1:
            values["continual/forgetting"] = average_forgetting(self.accuracy_matrix, row)
            values["continual/bwt"] = backward_transfer(self.accuracy_matrix, row)
        if row == stream.num_tasks - 1:
            values["continual/final_avg_acc"] = self.final_average_accuracy
        for name, value in values.items():
            if not math.isnan(value):
                # The values are identical on every rank (computed from counts summed over ranks):
                # sync_dist averages equal numbers (a no-op) and tells Lightning they are reduced.
                pl_module.log(name, value, sync_dist=True)
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

    @property
    def backward_transfer(self) -> float:
        """Mean of ``R[T-1, j] - R[j, j]`` over the old tasks (NaN before the end)."""
        return backward_transfer(self.accuracy_matrix) if self.accuracy_matrix is not None else float("nan")

    @property
    def learning_accuracy(self) -> float:
        """Mean of the diagonal ``R[j, j]`` (NaN before the end)."""
        return learning_accuracy(self.accuracy_matrix) if self.accuracy_matrix is not None else float("nan")

    @rank_zero_only
    def _save(self, out: str) -> None:
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        assert self.accuracy_matrix is not None
        # whole or not at all: a run killed while writing leaves the previous matrix, not a cut-off file
        partial = path / "accuracy_matrix.pt.partial"
        torch.save(self.accuracy_matrix.clone(), partial)
        os.replace(partial, path / "accuracy_matrix.pt")
        if self.plot:
            try:
                plot_accuracy_matrix(self.accuracy_matrix, path / "accuracy_matrix.png")
            except ImportError as error:
                self.plot = False  # say it once, keep training
                rank_zero_warn(_NO_MATPLOTLIB.format(error=error))

    @override
    def state_dict(self) -> dict[str, Any]:
        matrix = None if self.accuracy_matrix is None else self.accuracy_matrix.clone()
        return {"version": self.STATE_VERSION, "accuracy_matrix": matrix}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, self.STATE_VERSION, "ContinualMetrics")
        matrix = state_dict["accuracy_matrix"]
        self.accuracy_matrix = None if matrix is None else matrix.clone()
        self._resumed = True


def plot_accuracy_matrix(matrix: Tensor, path: str | Path, title: str | None = None) -> None:
    """Draw ``R[i, j]`` (rows: after task i; columns: task j) as an annotated heatmap PNG.

    Raises ``ImportError`` when matplotlib cannot be imported.

    Args:
        matrix: ``[T, T]`` accuracies in ``[0, 1]`` (entries above the diagonal are not drawn).
        path: the PNG to write.
        title: the figure's title.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> matrix = torch.tensor([[0.9, 0.0], [0.7, 0.8]])
        >>> path = Path(tempfile.mkdtemp()) / "accuracy.png"
        >>> plot_accuracy_matrix(matrix, path, title="two tasks")
        >>> path.read_bytes()[1:4]
        b'PNG'
    """
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

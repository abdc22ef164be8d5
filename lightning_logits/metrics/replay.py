"""The accuracy matrix of a class-incremental stream as a torchmetrics ``Metric``."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["AccuracyMatrix"]


class AccuracyMatrix(Metric):
    """Counts correct predictions per (trained task, evaluated task): the accuracy matrix ``R[i, j]``.

    The state is two ``[T, T]`` float64 count tensors, ``correct`` and ``total``, reduced by sum
    over DDP ranks (``dist_reduce_fx="sum"``) when :meth:`compute` runs, so each rank may count a
    shard of the test set. ``update(logits, target, after_task=i)`` adds a batch evaluated after
    training task ``i`` to row ``i``; :meth:`compute` returns ``correct / total`` (NaN where
    nothing was counted, e.g. above the diagonal).

    Args:
        task_of_class: ``[C]`` int task index of every class (the stream's ``task_of_class``).
        eval_mask: ``"all"``: the prediction is the argmax over all classes (default; what the
            UER author's framework does for every method but PCR/HPCR, ``FelixHuiweiLin/PCR``
            ``agents/base.py`` ``evaluate``); ``"seen"``: classes of tasks after ``after_task`` are
            left out of the argmax (what that framework does for PCR/HPCR).
        validate_args: in :meth:`update`, check that the logits are finite and the labels in
            ``[0, C)`` (reads values on the host, once per evaluation batch; default ``True``, as
            torchmetrics' classification metrics). Shapes are checked either way.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> import torch
        >>> metric = AccuracyMatrix(torch.tensor([0, 0, 1, 1]))
        >>> logits = torch.tensor([[5.0, 0, 0, 0], [0, 0, 5.0, 0]])  # class 2 belongs to task 1
        >>> metric.update(logits, torch.tensor([0, 1]), after_task=0)
        >>> metric.compute()
        tensor([[0.5000,    nan],
                [   nan,    nan]], dtype=torch.float64)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    correct: Tensor
    total: Tensor
    task_of_class: Tensor

    def __init__(
        self,
        task_of_class: Tensor,
        eval_mask: Literal["all", "seen"] = "all",
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.validate_args = validate_args
        if eval_mask not in ("all", "seen"):
            raise ValueError(f"eval_mask must be 'all' or 'seen', got {eval_mask!r}")
        task_of_class = torch.as_tensor(task_of_class, dtype=torch.int64)
        if task_of_class.ndim != 1 or task_of_class.numel() == 0 or int(task_of_class.min()) < 0:
            raise ValueError(f"task_of_class must be a non-empty [C] tensor of task indices >= 0, got {task_of_class}")
        self.num_tasks = int(task_of_class.max()) + 1
        self.eval_mask = eval_mask
        self.register_buffer("task_of_class", task_of_class.clone(), persistent=False)
        t = self.num_tasks
        self.add_state("correct", torch.zeros(t, t, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(t, t, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor, after_task: int) -> None:
        """Count a batch evaluated after training task ``after_task``: ``logits [N, C]``, ``target [N]``."""
        if logits.ndim != 2 or logits.shape[1] != self.task_of_class.numel():
            raise ValueError(
                f"logits must have shape [N, C] with C = {self.task_of_class.numel()} classes, got "
                f"{tuple(logits.shape)}"
            )
        if target.shape != logits.shape[:1]:
            raise ValueError(f"target must have shape [N] = [{logits.shape[0]}], got {tuple(target.shape)}")
        if isinstance(after_task, bool) or not isinstance(after_task, int) or not 0 <= after_task < self.num_tasks:
            raise ValueError(f"after_task must be an int in [0, {self.num_tasks - 1}], got {after_task!r}")
        if target.is_floating_point() or target.dtype == torch.bool:
            raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
        if self.validate_args and target.numel():
            low, high = int(target.min()), int(target.max())
            if low < 0 or high >= logits.shape[1]:
                raise ValueError(
                    f"target holds labels in [{low}, {high}] but there are {logits.shape[1]} classes; labels must lie "
                    f"in [0, {logits.shape[1] - 1}]"
                )
            if not bool(torch.isfinite(logits).all()):
                raise ValueError(
                    "logits contain NaN or inf: their argmax means nothing; check the model's forward pass"
                )
        task_of_class = self.task_of_class.to(logits.device)
        if self.eval_mask == "seen":
            logits = logits.masked_fill(task_of_class > after_task, float("-inf"))
        target = target.long()
        hit = (logits.argmax(dim=1) == target).to(self.correct.dtype)
        task = task_of_class[target]
        self.correct[after_task].index_add_(0, task, hit)
        self.total[after_task].index_add_(0, task, torch.ones_like(hit))

    def reset_row(self, after_task: int) -> None:
        """Zero row ``after_task`` of the counts (before evaluating after that task again)."""
        self.correct[after_task] = 0
        self.total[after_task] = 0
        self._computed = None  # torchmetrics caches compute() until the next update

    def compute(self) -> Tensor:
        """``[T, T]`` float64 accuracies, NaN where nothing was counted."""
        return torch.where(self.total > 0, self.correct / self.total.clamp(min=1), float("nan"))

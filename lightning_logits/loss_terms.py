"""How a Callback adds a named loss term to any LightningModule's training loss.

The design, in one paragraph: the first :class:`LossTermCallback` set up on a module attaches a
:class:`LossTermHub` to it. The hub replaces the module's ``training_step`` *on the instance* with a
wrapper that (1) runs the original step inside a :class:`~lightning_logits.networks.heads.LogitTap` capture,
(2) reads the task loss from the returned tensor or ``{"loss": ...}`` dict, (3) asks each
registered callback for its term, given a :class:`StepContext` (batch, logits, features,
intermediate outputs, target), (4) keeps every term on the device for a deferred finiteness
check and for logging ``train/loss_<name>`` and ``train/loss_total`` (:class:`StepScalars`: no
host-device sync in a steady-state step), and (5) returns the same structure with the total as
``"loss"``. Lightning's DDP wrapper calls ``training_step`` by attribute lookup, so this works
unchanged under DDP; nothing is written into the module's ``state_dict``. The hub also wraps the
module's ``on_train_epoch_end`` (to check what is pending and log the epoch means). On teardown
the original ``training_step`` and ``on_train_epoch_end`` are restored and the hooks removed.

A module whose head the tap cannot find opts in with one line: return ``{"loss": loss,
"logits": logits}`` from ``training_step`` (and ``"target"`` if the batch is not
``(input, target)``), or set a ``classifier_head`` attribute to the head's dotted path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.data import extract_batch_size
from torch import Tensor
from typing_extensions import override

from lightning_logits.batch import batch_input, batch_target, module_reader
from lightning_logits.networks.heads import LogitTap

__all__ = [
    "DeferredTaskLoss",
    "FusedHead",
    "LossTermCallback",
    "LossTermHub",
    "StepContext",
    "check_finite_loss",
    "check_hyperparameter",
    "check_state_version",
    "StepScalars",
    "is_logging_step",
]


def check_finite_loss(name: str, value: Tensor, step: int) -> None:
    """Stop training with a clear message when loss ``name`` is NaN or infinite at ``step``.

    This reads the value on the host (a device sync); the training step uses :class:`StepScalars`
    instead, which checks on the device and reads one flag every ``log_every_n_steps`` steps.

    Args:
        name: the loss's name, for the message.
        value: a scalar tensor.
        step: the global step, for the message.

    Example:
        >>> import torch
        >>> check_finite_loss("kd", torch.tensor(0.5), step=3)  # finite: nothing happens
        >>> check_finite_loss("kd", torch.tensor(float("nan")), step=12)
        Traceback (most recent call last):
        ...
        FloatingPointError: loss term 'kd' is nan at global step 12: training stopped...
    """
    if not bool(torch.isfinite(value.detach()).all()):
        _raise_non_finite(name, float(value.detach().float().flatten()[0]), step, step)


def _raise_non_finite(name: str, value: float, step: int, checked_at: int) -> None:
    found = "" if checked_at == step else f" (found by the finiteness check at global step {checked_at})"
    raise FloatingPointError(
        f"loss term '{name}' is {value} at global step {step}{found}: training stopped. Lower the learning "
        "rate or this term's weight, or train in float32/bf16 instead of fp16."
    )


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether Lightning sends step metrics to the loggers after this training step (``log_every_n_steps``).

    Example:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_logits.modules import Classifier
        >>> class Record(pl.Callback):
        ...     seen = []
        ...     def on_train_batch_end(self, trainer, *args):
        ...         self.seen.append(is_logging_step(trainer))
        >>> trainer = pl.Trainer(max_steps=6, log_every_n_steps=3, logger=False, enable_checkpointing=False,
        ...                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        ...                      callbacks=[Record()])
        >>> data = DataLoader(TensorDataset(torch.randn(48, 4), torch.randint(0, 3, (48,))), batch_size=8)
        >>> trainer.fit(Classifier(torch.nn.Sequential(torch.nn.Linear(4, 3))), data)
        >>> Record.seen  # every third step
        [False, False, True, False, False, True]
    """
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def _training_step_position(trainer: pl.Trainer, module: pl.LightningModule) -> tuple[int, bool]:
    """``(trainer.global_step, is_logging_step(trainer))`` for a caller inside a training step, read directly.

    Lightning's properties walk a chain of a dozen properties to answer these (which loop is
    active, through a stage enum comparison; which optimization the module uses): microseconds,
    every step. Inside a training step under automatic optimization the loop is the fit loop, the
    global step is its optimizer-step count, and the step is logged when
    ``(batches_that_stepped + 1) % log_every_n_steps == 0`` or a stop was requested: read here
    directly. Anything else falls back to Lightning's properties.
    """
    every = getattr(trainer, "log_every_n_steps", None)
    epoch_loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    batches = getattr(epoch_loop, "_batches_that_stepped", None)
    progress = getattr(getattr(epoch_loop, "automatic_optimization", None), "optim_progress", None)
    step = getattr(progress, "optimizer_steps", None)
    if type(every) is not int or type(batches) is not int or type(step) is not int or not module.automatic_optimization:
        return trainer.global_step, is_logging_step(trainer)
    if every == 0:
        return step, False
    return step, (batches + 1) % every == 0 or bool(trainer.should_stop)


class StepScalars:
    """Scalars of every training step kept on the device: logged cheaply, averaged per epoch, checked lazily.

    Calling ``self.log`` for each value of each step costs more than a small model's whole step,
    and checking each value for NaN on the host stalls a GPU every step. This keeps the step's
    scalars on the device instead:

    - :meth:`update` (every step) keeps detached references to the values (no tensor operation)
      and, on a logging step (``trainer.log_every_n_steps``, and the last step), logs them with one
      ``log_dict`` call as ``<key>_step``;
    - on a logging step and at the epoch's end the pending steps are stacked into one ``[S, K]``
      tensor and checked for NaN/inf with a single host read; a non-finite value stops training
      with a ``FloatingPointError`` naming the term, its value and the global step where it first
      appeared. So a non-finite term is caught at most ``log_every_n_steps`` steps (50 by
      default) after it appears, or at the epoch's end;
    - :meth:`epoch_end` logs the batch-size weighted epoch means as ``<key>_epoch``, the last
      step's values as ``<key>_step`` and, for monitors, the means as ``<key>`` (not sent to
      loggers): the same keys and values as ``self.log(key, value, on_step=True, on_epoch=True)``
      every step.

    Lightning keeps a logged step value in its results until the epoch ends and, every step,
    converts each one logged with ``prog_bar=True`` to a Python number (a host read). The step
    after a logging step, :meth:`update` marks the values it logged as read, so Lightning stops
    revisiting them; ``trainer.callback_metrics`` and the progress bar keep showing them.

    Args:
        names: the name of each value in error messages (``"cross_entropy"``, a term's name).
        keys: the log key of each value, or ``None`` for a value that is only checked.
        prog_bar: show the step and epoch values in the progress bar.

    Example:
        >>> import torch
        >>> scalars = StepScalars(["ce"], ["train/loss"])
        >>> scalars.update(None, [torch.tensor(0.5)], batch_size=4)  # no module: kept, not logged
        >>> scalars.update(None, [torch.tensor(1.5)], batch_size=4)
        >>> scalars.flush(step=1)
        >>> scalars.epoch_means()
        {'train/loss': tensor(1.)}
    """

    def __init__(self, names: list[str], keys: list[str | None], prog_bar: bool = False) -> None:
        if len(names) != len(keys):
            raise ValueError(f"got {len(names)} names but {len(keys)} keys")
        self.names, self.keys, self.prog_bar = list(names), list(keys), prog_bar
        self._pending: list[list[Tensor]] = []  # detached values of each step since the last check
        self._pending_meta: list[tuple[int, int]] = []  # (global step, batch size)
        self._sum: Tensor | None = None  # [K] batch-size weighted sum over the epoch's checked steps
        self._count = 0
        self._last: list[Tensor] | None = None  # the latest step's values
        self._logged: tuple[str | None, set[str]] | None = None  # (hook, names) of the last log_dict call

    @torch.compiler.disable  # bookkeeping: never traced into a compiled training_step
    def update(self, module: pl.LightningModule | None, values: list[Tensor], batch_size: int) -> None:
        """Record one step's values (scalars); on a logging step check the pending ones and log these."""
        # Detached only: the cast to float32 0-d tensors waits for the logging step (few steps pay it).
        row = [v.detach() for v in values]
        trainer = module._trainer if module is not None else None
        if trainer is None or module is None:  # kept only: no step to log at
            step, logging_step = len(self._pending), False
        else:
            step, logging_step = _training_step_position(trainer, module)
        self._last = row
        self._pending.append(row)
        self._pending_meta.append((step, batch_size))
        if trainer is None or module is None:
            return
        if self._logged is not None:
            self._release_logged(trainer)
        if logging_step or len(self._pending) >= _MAX_PENDING:
            self.flush(step)
        if logging_step:
            self._log_step(module, row, batch_size)

    def _log_step(self, module: pl.LightningModule, row: list[Tensor], batch_size: int) -> None:
        logged = {f"{k}_step": _as_scalar(v) for k, v in zip(self.keys, row, strict=True) if k is not None}
        module.log_dict(logged, on_step=True, on_epoch=False, prog_bar=self.prog_bar, batch_size=batch_size)
        self._logged = (module._current_fx_name, set(logged))

    def _release_logged(self, trainer: pl.Trainer) -> None:
        # Lightning's results (a private structure, read defensively): a step-only value marked as
        # reset is no longer converted or collected each step; the next log call revives it.
        fx, names = self._logged or (None, set())
        self._logged = None
        results = getattr(trainer, "_results", None)
        if not isinstance(results, dict):
            return
        for item in results.values():
            meta = getattr(item, "meta", None)
            if meta is not None and meta.fx == fx and meta.name in names and not meta.on_epoch:
                item.has_reset = True

    def flush(self, step: int) -> None:
        """Check the pending steps for NaN/inf (one host read) and fold them into the epoch sum."""
        if not self._pending:
            return
        history = torch.stack([_as_scalar(v) for row in self._pending for v in row]).view(len(self._pending), -1)
        finite = torch.isfinite(history)
        if not bool(finite.all()):
            self._raise(history, finite, step)
        sizes = [size for _, size in self._pending_meta]
        if all(size == sizes[0] for size in sizes):
            total = history.sum(dim=0) * sizes[0]
        else:  # weigh each step by its batch size (a copy to the device that does not wait for it)
            weights = torch.tensor(sizes, dtype=history.dtype).to(history.device, non_blocking=True)
            total = (history * weights[:, None]).sum(dim=0)
        self._sum = total if self._sum is None else self._sum + total
        self._count += sum(sizes)
        self._pending.clear()
        self._pending_meta.clear()

    def _raise(self, history: Tensor, finite: Tensor, checked_at: int) -> None:
        for row, (step, _size) in enumerate(self._pending_meta):
            for column, name in enumerate(self.names):
                if not bool(finite[row, column]):
                    self._pending.clear()
                    self._pending_meta.clear()
                    _raise_non_finite(name, float(history[row, column]), step, checked_at)

    def epoch_means(self) -> dict[str, Tensor]:
        """The batch-size weighted means of the checked steps since the last :meth:`reset`, by key."""
        if self._sum is None or self._count == 0:
            return {}
        means = self._sum / self._count
        return {k: means[i] for i, k in enumerate(self.keys) if k is not None}

    def reset(self) -> None:
        self._pending.clear()
        self._pending_meta.clear()
        self._sum, self._count, self._last, self._logged = None, 0, None, None

    def epoch_end(self, module: pl.LightningModule) -> None:
        """Check what is pending, log the epoch means (``<key>_epoch``, and ``<key>`` for monitors), reset."""
        trainer = module._trainer
        self.flush(trainer.global_step if trainer is not None else 0)
        means, last = self.epoch_means(), self._last
        self.reset()
        if not means or trainer is None or last is None:
            return
        logged = {f"{k}_epoch": v for k, v in means.items()}
        # Lightning sends the epoch's last step values with the epoch values: so do we.
        logged.update({f"{k}_step": _as_scalar(last[i]) for i, k in enumerate(self.keys) if k is not None})
        # One reduction per epoch (not per step): the epoch means are averaged over DDP ranks.
        epoch = dict(on_step=False, on_epoch=True, batch_size=1, sync_dist=True)
        module.log_dict(logged, prog_bar=self.prog_bar, **epoch)  # type: ignore[arg-type]
        module.log_dict(means, logger=False, prog_bar=False, **epoch)  # type: ignore[arg-type]


def _as_scalar(value: Tensor) -> Tensor:
    """``value`` as a float32 0-d tensor (no copy when it is one already)."""
    if value.ndim == 0 and value.dtype == torch.float32:
        return value
    return value.reshape(()).float()


_MAX_PENDING = 1000  # bound on unchecked steps when log_every_n_steps is 0 or very large


def check_hyperparameter(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    low_inclusive: bool = True,
    integer: bool = False,
    owner: str = "",
    fix: str = "",
) -> None:
    """Refuse a hyperparameter that is not a finite real number (an ``int`` when ``integer``) at least ``low``.

    The ``ValueError`` names the parameter, the value seen and, with ``fix``, what to pass instead.
    ``bool`` is never taken for a number.

    Example:
        >>> check_hyperparameter("gamma", 1.5, low=0.0)
        >>> check_hyperparameter("gamma", -1, low=0.0, owner="TeacherDistillation")
        Traceback (most recent call last):
        ...
        ValueError: TeacherDistillation: gamma must be a finite number >= 0.0, got -1
    """
    kind = "an integer" if integer else "a finite number"
    bound = "" if low is None else f" {'>=' if low_inclusive else '>'} {low}"
    ok = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if not ok:
        prefix = f"{owner}: " if owner else ""
        suffix = f"; {fix}" if fix else ""
        raise ValueError(f"{prefix}{name} must be {kind}{bound}, got {value!r}{suffix}")


def check_state_version(state: Mapping[str, Any], current: int, owner: str) -> int:
    """The ``version`` of a callback's saved state (0 when absent: the format before versions existed).

    Every stateful callback of this library writes ``"version"`` into its ``state_dict``. A state
    from a newer format than this code reads is refused with what to do; older versions are
    returned so the caller can convert them.

    Example:
        >>> check_state_version({"version": 1}, current=1, owner="LAWN")
        1
        >>> check_state_version({}, current=1, owner="LAWN")
        0
    """
    version = state.get("version", 0)
    if not isinstance(version, int) or version < 0:
        raise ValueError(f"{owner}: the checkpoint's state has an unreadable version {version!r}")
    if version > current:
        raise ValueError(
            f"{owner}: the checkpoint's state has version {version}, but this lightning_logits reads versions up to "
            f"{current}; upgrade lightning_logits to resume this run"
        )
    return version


class FusedHead(NamedTuple):
    """The head of a language model whose step built no logits: what a fused loss computes them from.

    A module that computes its loss with a fused head loss (such as
    :class:`~lightning_logits.modules.CausalLM` with ``logits="fused"``) returns these from
    ``training_step`` as ``"hidden_states"``, ``"head_weight"`` and ``"head_bias"`` instead of
    ``"logits"``; :attr:`StepContext.fused_head` reads them. The logits would be
    ``F.linear(hidden, weight, bias)``.

    Attributes:
        hidden: ``[B, T, H]`` (or ``[N, H]``) last hidden states, with their graph.
        weight: ``[V, H]`` the head's weight (a parameter).
        bias: ``[V]`` the head's bias, or ``None``.

    Example:
        >>> import torch
        >>> head = FusedHead(torch.zeros(2, 5, 8), torch.zeros(100, 8), None)
        >>> head.hidden.shape[:-1], head.weight.shape[0]  # positions, vocabulary
        (torch.Size([2, 5]), 100)
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


class DeferredTaskLoss:
    """A module's task loss that is computed after the loss-term callbacks ran, unless one computes it first.

    A fused head loss computes the cross-entropy and a distillation term in one pass over the
    vocabulary (one set of chunk logits for both). For that, a module such as
    :class:`~lightning_logits.modules.CausalLM` (``logits="fused"``, with a loss-term callback attached)
    returns ``{"loss": DeferredTaskLoss(compute, record), ...}`` instead of computing its loss:

    - a callback that can compute the task loss together with its own term checks
      :attr:`StepContext.task_loss_pending` and hands its share over with
      :meth:`StepContext.provide_task_loss` (a tensor whose value is the task loss and whose graph
      carries the gradient of both);
    - otherwise the first read of :attr:`StepContext.task_loss` (by a callback, or by the hub after
      all callbacks) calls ``compute()``, the module's own computation.

    Either way ``record(value)`` is called once with the task loss, so the module logs it as if it
    had computed it in ``training_step``. The task loss is thus computed exactly once.

    Args:
        compute: the module's own computation of its task loss (a scalar with a graph).
        record: called with the resolved task loss (e.g. to log it); ``None``: nothing.

    Example:
        >>> import torch
        >>> deferred = DeferredTaskLoss(lambda: torch.tensor(2.0), record=lambda v: print("logged", v.item()))
        >>> deferred.pending
        True
        >>> deferred.resolve()  # nobody provided it: the module's own computation
        logged 2.0
        tensor(2.)
        >>> deferred.pending, deferred.resolve()  # resolved once
        (False, tensor(2.))
    """

    def __init__(self, compute: Callable[[], Tensor], record: Callable[[Tensor], None] | None = None) -> None:
        self._compute = compute
        self._record = record
        self._value: Tensor | None = None

    @property
    def pending(self) -> bool:
        """Whether nobody has computed or provided the task loss yet."""
        return self._value is None

    def resolve(self, provided: Tensor | None = None) -> Tensor:
        """The task loss: ``provided`` (by a callback, while pending), or the module's own computation.

        Once resolved, later calls return the same tensor; providing a value then is an error.
        """
        if self._value is not None:
            if provided is not None:
                raise RuntimeError(
                    "the task loss was already computed this step (a callback read context.task_loss or provided "
                    "it before); provide it only while context.task_loss_pending is True"
                )
            return self._value
        value = provided if provided is not None else self._compute()
        self._value = value
        if self._record is not None:
            self._record(value)
        return value


@dataclass
class StepContext:
    """What a loss term sees of one training step.

    Attributes:
        trainer: the running ``Trainer``.
        pl_module: the LightningModule being trained.
        batch: the batch as the dataloader gave it.
        batch_idx: its index in the epoch.
        output: what the module's ``training_step`` returned.
        task_loss: the module's own loss (the ``"loss"`` entry of ``output``); when the module
            returned a :class:`DeferredTaskLoss`, reading it computes it (see
            :meth:`provide_task_loss` for a callback that computes it in one pass with its term).
        tap: the hub's :class:`~lightning_logits.networks.heads.LogitTap`, holding the forward passes that
            ran inside ``training_step`` (``None`` when no registered callback needs it).

    Its properties read the step for a term: ``logits`` (``[N, C]``, or ``[B, T, V]`` for a
    sequence model), ``features`` (``[N, D]``, entering the head), ``target``, ``input`` and
    ``layer_output(name)``; each comes from ``training_step``'s output when it returns that key,
    otherwise from the tap or the batch. A language model trained with a fused head loss builds
    no logits; ``fused_head`` gives its hidden states and head weight instead.

    Example:
        >>> import torch
        >>> import lightning.pytorch as pl
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from lightning_logits.modules import Classifier
        >>> class Shapes(LossTermCallback):
        ...     seen = []
        ...     def loss_term(self, context):
        ...         shapes = context.logits.shape, context.features.shape, context.target.shape
        ...         self.seen.append(tuple(tuple(s) for s in shapes))
        ...         return context.logits.new_zeros(())
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        ...                      enable_model_summary=False, accelerator="cpu", callbacks=[Shapes("shapes")])
        >>> data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=16)
        >>> trainer.fit(Classifier(net), data)
        >>> Shapes.seen  # logits [N, C], features entering the head [N, D], target [N]
        [((16, 3), (16, 8), (16,))]
    """

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    batch: Any
    batch_idx: int
    output: Tensor | Mapping[str, Any]
    _task_loss: Tensor | DeferredTaskLoss
    tap: LogitTap | None
    terms: dict[str, Tensor] = field(default_factory=dict)

    @property
    def task_loss(self) -> Tensor:
        """The module's own loss; a deferred one (:class:`DeferredTaskLoss`) is computed on first read."""
        loss = self._task_loss
        return loss.resolve() if isinstance(loss, DeferredTaskLoss) else loss

    @property
    def task_loss_pending(self) -> bool:
        """Whether the module deferred its task loss and nobody has computed it yet this step."""
        return isinstance(self._task_loss, DeferredTaskLoss) and self._task_loss.pending

    def provide_task_loss(self, value: Tensor) -> None:
        """Give the hub the module's deferred task loss, computed by a callback (only while pending).

        ``value`` must equal the module's task loss in value; its graph may also carry the
        gradient of the callback's own term (a one-pass fused loss), which the callback then
        returns detached from :meth:`LossTermCallback.loss_term`.
        """
        if not self.task_loss_pending:
            raise RuntimeError(
                "provide_task_loss needs a pending deferred task loss (check context.task_loss_pending first)"
            )
        assert isinstance(self._task_loss, DeferredTaskLoss)
        self._task_loss.resolve(value)

    @property
    def fused_head(self) -> FusedHead | None:
        """The step's :class:`FusedHead` when ``training_step`` returned ``"hidden_states"`` and ``"head_weight"``."""
        hidden, weight = self._from_output("hidden_states"), self._from_output("head_weight")
        if hidden is None or weight is None:
            return None
        return FusedHead(hidden, weight, self._from_output("head_bias"))

    def _from_output(self, key: str) -> Tensor | None:
        output = self.output
        if isinstance(output, Tensor) or not isinstance(output, (dict, Mapping)):  # dict first: no ABC check
            return None
        value = output.get(key)
        return value if isinstance(value, Tensor) else None

    def _require_tap(self, what: str) -> LogitTap:
        if self.tap is None or (what != "outputs" and not self.tap.logits):
            found = self.tap is not None and self.tap.head is not None
            why = (
                "the classifier head did not run inside training_step"
                if found
                else f"no classifier head was found in {type(self.pl_module).__name__}"
            )
            raise RuntimeError(
                f"no {what} were captured in this training step: {why}. Return {{'loss': loss, 'logits': "
                "logits}} from training_step, or set `self.classifier_head = '<dotted path>'` on your module."
            )
        return self.tap

    @property
    def logits(self) -> Tensor:
        """``[N, C]`` logits of the step's (first) forward pass, with their graph."""
        value = self._from_output("logits")
        if value is not None:
            return value
        if self.fused_head is not None:
            raise RuntimeError(
                f"{type(self.pl_module).__name__} computed its loss with a fused head and built no [B, T, V] logits "
                "this step, but a loss term asked for them; train with logits='full', or use callbacks that read "
                "context.fused_head (TeacherDistillation with loss 'kd', 'forward_kl', 'reverse_kl' or 'jsd')"
            )
        return self._require_tap("logits").logits[0]

    @property
    def features(self) -> Tensor:
        """``[N, D]`` features entering the classifier head in the step's (first) forward pass."""
        value = self._from_output("features")
        if value is not None:
            return value
        return self._require_tap("features").features[0]

    @property
    def target(self) -> Tensor:
        """The step's target: ``output["target"]`` (soft after mixup), ``batch_target``, or the batch's."""
        value = self._from_output("target")
        if value is not None:
            return value
        custom = module_reader(self.pl_module, "batch_target")
        return custom(self.batch) if custom is not None else batch_target(self.batch)

    @property
    def input(self) -> Tensor:
        """The step's model input: ``output["input"]`` (e.g. after mixup), ``batch_input``, or the batch's."""
        value = self._from_output("input")
        if value is not None:
            return value
        custom = module_reader(self.pl_module, "batch_input")
        return custom(self.batch) if custom is not None else batch_input(self.batch)

    def layer_output(self, name: str) -> Any:
        """Output of the intermediate layer ``name`` (registered with ``LossTermHub.tap.add_layer``)."""
        tap = self._require_tap("outputs")
        values = tap.outputs.get(name)
        if not values:
            raise RuntimeError(
                f"layer '{name}' produced no output in this training step; registered layers: {sorted(tap.outputs)}"
            )
        return values[0]


class LossTermHub:
    """Wraps a LightningModule's ``training_step`` to add the terms of registered callbacks.

    Use :meth:`attach` rather than the constructor; one hub exists per module. Loss-term callbacks
    attach it in ``setup`` and detach it at ``teardown``; nothing of it enters the module's
    ``state_dict``.

    Example:
        >>> import torch
        >>> from lightning_logits.modules import Classifier
        >>> module = Classifier(torch.nn.Sequential(torch.nn.Linear(4, 3)))
        >>> hub = LossTermHub.attach(module)
        >>> LossTermHub.attach(module) is hub, "training_step" in vars(module)  # one hub; the step is wrapped
        (True, True)
        >>> hub.detach()
        >>> LossTermHub.get(module) is None, "training_step" in vars(module)  # the module's own step is back
        (True, False)
    """

    ATTRIBUTE = "_lightning_logits_hub"

    def __init__(self, pl_module: pl.LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                f"{type(pl_module).__name__} uses manual optimization; loss-term callbacks need "
                "automatic optimization (the callback's term is added to the loss that "
                "training_step returns)"
            )
        self.pl_module = pl_module
        self.callbacks: list[LossTermCallback] = []
        self.tap: LogitTap | None = None
        self.scalars: StepScalars | None = None
        self._replaced = False  # whether a callback replaces the task loss
        self._original_step = pl_module.training_step
        # Instance attribute: Lightning (and its DDP wrapper) look training_step up on the instance.
        pl_module.training_step = self._training_step  # type: ignore[method-assign]
        # Likewise the epoch-end hook, where the pending steps are checked and the epoch means logged.
        self._original_epoch_end = pl_module.on_train_epoch_end
        pl_module.on_train_epoch_end = self._on_train_epoch_end  # type: ignore[method-assign]

    @classmethod
    def attach(cls, pl_module: pl.LightningModule) -> LossTermHub:
        """The module's hub, created (and ``training_step`` wrapped) on first use."""
        hub = pl_module.__dict__.get(cls.ATTRIBUTE)
        if hub is None:
            hub = cls(pl_module)
            pl_module.__dict__[cls.ATTRIBUTE] = hub
        return hub

    @classmethod
    def get(cls, pl_module: pl.LightningModule) -> LossTermHub | None:
        """The module's hub, or ``None`` when no loss-term callback is attached."""
        return pl_module.__dict__.get(cls.ATTRIBUTE)

    def ensure_tap(self, require_head: bool = True) -> LogitTap:
        """The hub's logit tap on the module, created on first use.

        With ``require_head`` (the default) a module whose classifier head cannot be found is
        refused with a message that names the two ways to fix it; without it the tap still records
        intermediate layers, and the logits must come from ``training_step``'s output.
        """
        if self.tap is None:
            head = getattr(self.pl_module, "classifier_head", None)
            self.tap = LogitTap(self.pl_module, head=head if isinstance(head, str) else None, require_head=False)
        if require_head and self.tap.head is None:
            raise LookupError(self._no_head_message())
        return self.tap

    def _no_head_message(self) -> str:
        name = type(self.pl_module).__name__
        reason = str(self.tap.head_error) if self.tap is not None and self.tap.head_error else "no head found"
        return (
            f"{reason}. This method needs {name}'s classifier head (its weights or the features entering it): "
            f"set `self.classifier_head = '<dotted path of the head>'` in {name}.__init__ (for Classifier, pass "
            "head='...'). Methods that need only logits also accept them returned from training_step as "
            "{'loss': loss, 'logits': logits}."
        )

    def register(self, callback: LossTermCallback) -> None:
        names = [c.name for c in self.callbacks]
        if callback.name in names or callback.name in ("task", "total"):
            raise ValueError(
                f"a loss term named '{callback.name}' is already registered ({names}); give each callback its own name="
            )
        if callback.replaces_task_loss and any(c.replaces_task_loss for c in self.callbacks):
            raise ValueError("two callbacks both replace the task loss; use only one of them")
        if callback.needs_tap:
            # A head is optional here: terms that need only logits read them from the step's output.
            self.ensure_tap(require_head=False)
        self.callbacks.append(callback)
        self._callbacks_changed()

    def unregister(self, callback: LossTermCallback) -> None:
        if callback in self.callbacks:
            self.callbacks.remove(callback)
            self._callbacks_changed()
        if not self.callbacks:
            self.detach()

    def _callbacks_changed(self) -> None:
        # Read every step: worked out once per change of the callbacks, not per step.
        self._replaced = any(c.replaces_task_loss for c in self.callbacks)
        self.scalars = None

    def detach(self) -> None:
        """Restore the original ``training_step`` and remove all hooks."""
        self.pl_module.__dict__.pop("training_step", None)
        self.pl_module.__dict__.pop("on_train_epoch_end", None)
        self.pl_module.__dict__.pop(self.ATTRIBUTE, None)
        if self.tap is not None:
            self.tap.remove()
            self.tap = None

    def _training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
        tap = self.tap
        if tap is None:
            output = self._original_step(*args, **kwargs)
        else:
            with tap.capture():
                output = self._original_step(*args, **kwargs)
        if output is None:  # the module skipped this batch
            return None
        task_loss: Tensor | DeferredTaskLoss
        if isinstance(output, Tensor):
            task_loss = output
        elif (type(output) is dict or isinstance(output, Mapping)) and "loss" in output:  # dict first: no ABC check
            task_loss = output["loss"]
        else:
            raise TypeError(
                f"{type(self.pl_module).__name__}.training_step returned {type(output).__name__}; "
                "loss-term callbacks need a loss tensor or a dict with a 'loss' entry"
            )
        context = StepContext(self.pl_module.trainer, self.pl_module, batch, int(batch_idx), output, task_loss, tap)
        replaced = self._replaced
        terms = context.terms
        for callback in self.callbacks:
            term = callback.loss_term(context)
            terms[callback.name] = term if callback.weight == 1.0 else callback.weight * term
        # A deferred task loss is resolved here if no callback computed (or provided) it.
        task = context.task_loss
        total: Tensor | None = None if replaced else task
        for weighted in terms.values():
            total = weighted if total is None else total + weighted
        assert total is not None  # replaced implies a callback
        # No host read here: the values stay on the device, are logged on logging steps and checked
        # for NaN/inf there and at the epoch's end (StepScalars), naming the first bad term and step.
        # A replaced task loss is not optimized, so it is neither checked nor logged.
        values = [*terms.values(), total] if replaced else [task, *terms.values(), total]
        scalars = self.scalars
        if scalars is None:  # one per set of callbacks: register and unregister drop it
            names = ([] if replaced else ["task"]) + list(terms) + ["total"]
            keys: list[str | None] = [None if n == "task" else f"train/loss_{n}" for n in names]
            scalars = self.scalars = StepScalars(names, keys, prog_bar=True)
        scalars.update(self.pl_module, values, _batch_size(batch))
        if tap is not None:
            tap.clear()  # release the step's activations before backward
        if isinstance(output, Tensor):
            return total
        return {**output, "loss": total}

    def _on_train_epoch_end(self) -> None:
        self._original_epoch_end()
        if self.scalars is not None:  # check the pending steps, log the epoch means
            self.scalars.epoch_end(self.pl_module)


def _batch_size(batch: Any) -> int:
    # What Lightning's self.log would infer, so the epoch means weigh steps as before.
    if isinstance(batch, (list, tuple)) and batch:  # (input, target, ...) tensors of one length: the common case
        first = batch[0]
        if isinstance(first, Tensor) and first.ndim > 0:
            size = first.shape[0]
            if all(isinstance(t, Tensor) and t.ndim > 0 and t.shape[0] == size for t in batch):
                return size
    try:
        return extract_batch_size(batch)
    except Exception:
        return 1


class LossTermCallback(Callback):
    """Base class of callbacks that add a weighted, named term to the training loss.

    Subclasses implement :meth:`loss_term`; the hub adds ``weight * loss_term(context)`` to the
    module's own loss and logs it as ``train/loss_<name>`` (every ``log_every_n_steps`` steps, and
    the epoch mean). A loss whose checks read tensor values should get
    ``validate_args=self.should_validate()`` (first step of each fit only). Override :meth:`on_hub_attached` to
    register intermediate layers on ``hub.tap`` or modules on the LightningModule (it runs in
    ``setup``, before ``configure_optimizers``, so new parameters train and are checkpointed).

    Class attributes:
        needs_tap: whether the term reads logits/features from the logit tap (default ``True``).
        replaces_task_loss: when ``True`` the module's own loss is logged but not optimized; the
            terms are the whole loss (used by methods that redefine the task loss, like UER).

    Example:
        >>> import torch
        >>> class LogitPenalty(LossTermCallback):
        ...     def loss_term(self, context):
        ...         return context.logits.pow(2).mean()
        >>> callback = LogitPenalty(name="logit_l2", weight=1e-3)
        >>> callback.name, callback.weight
        ('logit_l2', 0.001)
    """

    needs_tap: bool = True
    replaces_task_loss: bool = False

    def __init__(self, name: str, weight: float = 1.0) -> None:
        if not name.isidentifier():
            raise ValueError(f"loss term name must be an identifier-like string, got {name!r}")
        check_hyperparameter(
            "weight",
            weight,
            low=0.0,
            owner=type(self).__name__,
            fix="it multiplies the term in the loss that is minimized (0 turns the term off)",
        )
        self.name = name
        self.weight = float(weight)
        self._hub: LossTermHub | None = None
        self._validated = False

    @property
    @override
    def state_key(self) -> str:
        # Keyed by name: two callbacks of one class (two USKD heads, two teachers) keep separate state.
        # Lightning reads it for every hook of every step: built once per name.
        cached = self.__dict__.get("_state_key")
        if cached is None or cached[0] != self.name:
            cached = (self.name, self._generate_state_key(name=self.name))
            self.__dict__["_state_key"] = cached
        return cached[1]

    def loss_term(self, context: StepContext) -> Tensor:
        """The unweighted term for one training step (a scalar with a graph)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss_term(context)")

    def on_hub_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hub: LossTermHub) -> None:
        """Hook for subclasses: prepare layers or modules once the hub exists."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._validated = False
        hub = LossTermHub.attach(pl_module)
        hub.register(self)
        self._hub = hub
        self.on_hub_attached(trainer, pl_module, hub)

    def should_validate(self) -> bool:
        """``True`` on the first call of each fit, then ``False``: pass it as a loss's ``validate_args``.

        Validation that reads tensor values on the host (finite logits, label ranges) then runs on
        the first training step only, and the steady-state step has no host-device sync.
        """
        first = not self._validated
        self._validated = True
        return first

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._hub is not None:
            self._hub.unregister(self)
            self._hub = None

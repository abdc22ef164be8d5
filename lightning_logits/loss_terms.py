"""How a Callback adds a named loss term to any LightningModule's training loss.

The design, in one paragraph: the first :class:`LossTermCallback` set up on a module attaches a
:class:`LossTermHub` to it. The hub replaces the module's ``training_step`` *on the instance* with a
wrapper that (1) runs the original step inside a :class:`~lightning_logits.networks.heads.LogitTap` capture,
(2) reads the task loss from the returned tensor or ``{"loss": ...}`` dict, (3) asks each
registered callback for its term, given a :class:`StepContext` (batch, logits, features,
intermediate outputs, target), (4) checks every term is finite, logs ``train/loss_<name>``,
``train/loss_task`` and ``train/loss_total``, and (5) returns the same structure with the total as
``"loss"``. Lightning's DDP wrapper calls ``training_step`` by attribute lookup, so this works
unchanged under DDP; nothing is written into the module's ``state_dict``. On teardown the original
``training_step`` is restored and the hooks removed.

A module whose head the tap cannot find opts in with one line: return ``{"loss": loss,
"logits": logits}`` from ``training_step`` (and ``"target"`` if the batch is not
``(input, target)``), or set a ``classifier_head`` attribute to the head's dotted path.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_logits.batch import batch_input, batch_target
from lightning_logits.networks.heads import LogitTap

__all__ = [
    "LossTermCallback",
    "LossTermHub",
    "StepContext",
    "check_finite_loss",
    "check_hyperparameter",
    "check_state_version",
]


def check_finite_loss(name: str, value: Tensor, step: int) -> None:
    """Stop training with a clear message when loss ``name`` is NaN or infinite at ``step``."""
    if not bool(torch.isfinite(value.detach()).all()):
        raise FloatingPointError(
            f"loss term '{name}' is {value.detach().float().flatten()[0].item()} at global step "
            f"{step}: training stopped. Lower the learning rate or this term's weight, or train "
            "in float32/bf16 instead of fp16."
        )


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


@dataclass
class StepContext:
    """What a loss term sees of one training step.

    Attributes:
        trainer: the running ``Trainer``.
        pl_module: the LightningModule being trained.
        batch: the batch as the dataloader gave it.
        batch_idx: its index in the epoch.
        output: what the module's ``training_step`` returned.
        task_loss: the module's own loss (the ``"loss"`` entry of ``output``).
        tap: the hub's :class:`~lightning_logits.networks.heads.LogitTap`, holding the forward passes that
            ran inside ``training_step`` (``None`` when no registered callback needs it).
    """

    trainer: pl.Trainer
    pl_module: pl.LightningModule
    batch: Any
    batch_idx: int
    output: Tensor | Mapping[str, Any]
    task_loss: Tensor
    tap: LogitTap | None
    terms: dict[str, Tensor] = field(default_factory=dict)

    def _from_output(self, key: str) -> Tensor | None:
        if isinstance(self.output, Mapping) and key in self.output:
            value = self.output[key]
            return value if isinstance(value, Tensor) else None
        return None

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
        custom: Callable[[Any], Tensor] | None = getattr(self.pl_module, "batch_target", None)
        return custom(self.batch) if callable(custom) else batch_target(self.batch)

    @property
    def input(self) -> Tensor:
        """The step's model input: ``output["input"]`` (e.g. after mixup), ``batch_input``, or the batch's."""
        value = self._from_output("input")
        if value is not None:
            return value
        custom: Callable[[Any], Tensor] | None = getattr(self.pl_module, "batch_input", None)
        return custom(self.batch) if callable(custom) else batch_input(self.batch)

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

    Use :meth:`attach` rather than the constructor; one hub exists per module.
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
        self._original_step = pl_module.training_step
        # Instance attribute: Lightning (and its DDP wrapper) look training_step up on the instance.
        pl_module.training_step = self._training_step  # type: ignore[method-assign]

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

    def unregister(self, callback: LossTermCallback) -> None:
        if callback in self.callbacks:
            self.callbacks.remove(callback)
        if not self.callbacks:
            self.detach()

    def detach(self) -> None:
        """Restore the original ``training_step`` and remove all hooks."""
        self.pl_module.__dict__.pop("training_step", None)
        self.pl_module.__dict__.pop(self.ATTRIBUTE, None)
        if self.tap is not None:
            self.tap.remove()
            self.tap = None

    def _training_step(self, *args: Any, **kwargs: Any) -> Any:
        batch = args[0] if args else kwargs.get("batch")
        batch_idx = args[1] if len(args) > 1 else kwargs.get("batch_idx", 0)
        capture = self.tap.capture() if self.tap is not None else contextlib.nullcontext()
        with capture:
            output = self._original_step(*args, **kwargs)
        if output is None:  # the module skipped this batch
            return None
        if isinstance(output, Tensor):
            task_loss = output
        elif isinstance(output, Mapping) and "loss" in output:
            task_loss = output["loss"]
        else:
            raise TypeError(
                f"{type(self.pl_module).__name__}.training_step returned {type(output).__name__}; "
                "loss-term callbacks need a loss tensor or a dict with a 'loss' entry"
            )
        trainer = self.pl_module.trainer
        context = StepContext(trainer, self.pl_module, batch, int(batch_idx), output, task_loss, self.tap)
        replaced = any(c.replaces_task_loss for c in self.callbacks)
        total = task_loss.new_zeros(()) if replaced else task_loss
        for callback in self.callbacks:
            weighted = callback.weight * callback.loss_term(context)
            context.terms[callback.name] = weighted
            total = total + weighted
        # One device sync per step: only a non-finite total is taken apart to name the bad term.
        if not bool(torch.isfinite(total.detach())):
            step = trainer.global_step
            check_finite_loss("task", task_loss, step)
            for name, value in context.terms.items():
                check_finite_loss(name, value, step)
            check_finite_loss("total", total, step)
        self._log("train/loss_task", task_loss)
        for name, value in context.terms.items():
            self._log(f"train/loss_{name}", value)
        self._log("train/loss_total", total, prog_bar=True)
        if self.tap is not None:
            self.tap.clear()  # release the step's activations before backward
        if isinstance(output, Tensor):
            return total
        return {**output, "loss": total}

    def _log(self, name: str, value: Tensor, prog_bar: bool = False) -> None:
        # Values are already checked finite; .detach() keeps the logger off the graph.
        self.pl_module.log(name, value.detach().float(), on_step=True, on_epoch=True, prog_bar=prog_bar)


class LossTermCallback(Callback):
    """Base class of callbacks that add a weighted, named term to the training loss.

    Subclasses implement :meth:`loss_term`; the hub adds ``weight * loss_term(context)`` to the
    module's own loss and logs it as ``train/loss_<name>``. Override :meth:`on_hub_attached` to
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

    @property
    @override
    def state_key(self) -> str:
        # Keyed by name: two callbacks of one class (two USKD heads, two teachers) keep separate state.
        return self._generate_state_key(name=self.name)

    def loss_term(self, context: StepContext) -> Tensor:
        """The unweighted term for one training step (a scalar with a graph)."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss_term(context)")

    def on_hub_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hub: LossTermHub) -> None:
        """Hook for subclasses: prepare layers or modules once the hub exists."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        hub = LossTermHub.attach(pl_module)
        hub.register(self)
        self._hub = hub
        self.on_hub_attached(trainer, pl_module, hub)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._hub is not None:
            self._hub.unregister(self)
            self._hub = None

"""LAWN (logit attenuating weight normalization) as a Callback that works with any torch optimizer.

Without weight decay, a classifier trained to a small loss grows its logits by growing its weights,
and then barely moves. LAWN (arXiv 2108.05839) trains freely for a while, then holds the Frobenius
norm of each constrained weight at a fixed value. The number of free epochs replaces weight decay as
the hyperparameter. Which weights are constrained is ``scope``: ``"all"`` (the default) takes every
trainable weight with two or more dimensions, the ones that feed normalization layers included (the
later texts' "layer-wise" form); ``"final"`` takes the layers after the last normalization layer
(arXiv v1's "final homogeneous sub-network", see :mod:`lightning_logits.networks.lawn`). The
default follows the MNIST-1D study in ``benchmarks/accuracy_lawn.py`` (docs/benchmarks.md, "LAWN"): ``"all"``
scored higher than ``"final"`` overall on the validation split (level on the CNN, higher on the MLP).

How it acts on a training step, in the constrained phase:

* ``on_before_optimizer_step`` (Lightning calls it after the backward pass, after AMP unscaling,
  only for real optimizer steps, so not for gradient-accumulation micro-batches): the gradient of
  each constrained weight is projected onto the tangent space of its sphere,
  :func:`~lightning_logits.functional.lawn.project_to_tangent_` (fused over all weights).
* a torch ``optimizer.register_step_post_hook``, which fires only when ``optimizer.step()`` ran
  (an AMP step skipped for inf/NaN gradients runs no hook): each constrained weight is rescaled to
  its target norm, :func:`~lightning_logits.functional.lawn.rescale_to_norm_` (fused). The hook acts only
  on the parameters of the optimizer that stepped, so several optimizers and parameter groups work.

At the switch (the first step of the constrained phase) the target norms are recorded (the norm
each weight has then, or ``target_norm``), the weights are rescaled to them, and, with
``on_switch="reset"``, the optimizer state of the constrained weights (Adam's moments and step
count, SGD's momentum buffer) is cleared so the optimizer starts afresh on the sphere.

Nothing is added to the loss.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_logits.functional.lawn import frobenius_norms, project_to_tangent_, rescale_to_norm_
from lightning_logits.loss_terms import check_state_version
from lightning_logits.networks.heads import find_classifier, is_aux
from lightning_logits.networks.lawn import (
    ExecutionTrace,
    constrained_parameter_names,
    match_layers,
    non_homogeneous_activations,
    record_execution,
    select_constrained_layers,
    weight_matrices,
)

__all__ = ["LAWN"]

FREE = "free"
CONSTRAINED = "constrained"
STATE_VERSION = 2

# Strategies whose sharded parameters are not one tensor per weight: FSDP1 flattens a unit's weights into
# one FlatParameter (sharded across ranks, weights cut at arbitrary offsets), DeepSpeed ZeRO-3 partitions
# them into its own flat buffers. Matched by class name so that DeepSpeed need not be installed to check.
# ModelParallelStrategy (FSDP2) keeps one DTensor per weight: functional.lawn reduces norms over its shards.
_UNSUPPORTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")


class LAWN(Callback):
    """Constrain the weight norms of a network's layers after a free phase (LAWN).

    Args:
        free_epochs: epochs of unconstrained training before the constraint starts (``0``: from
            the first step). Ignored when ``free_steps`` is given. Default ``5``.
        free_steps: optimizer steps of unconstrained training; overrides ``free_epochs``.
        scope: which weights to constrain when ``layers`` is not given. ``"all"`` (default): every
            trainable weight (a parameter named ``*weight``) with two or more dimensions that an
            optimizer updates, including those that feed normalization layers; position embeddings,
            class tokens and attention-bias tables stay free (under Adam without weight decay their norms grow, which
            shrinks their effective step; the later versions of the paper describe the constraint
            layer-wise). ``"final"``: the layers that run after the last normalization layer, found
            by tracing the first training step (for a network without normalization, every layer
            that runs; arXiv 2108.05839 v1). Biases and normalization parameters stay free in both.
            The default is the study's choice (docs/benchmarks.md, "LAWN"); checkpoints of version 1, made
            before the option existed, resume as ``"final"``.
        layers: module names or ``fnmatch`` patterns, relative to the LightningModule (for
            :class:`~lightning_logits.modules.Classifier`: ``["model.fc"]``, ``["model.head*"]``),
            whose weight matrices to constrain; overrides ``scope``. Default ``None``.
        on_switch: what happens to the optimizer state of the constrained weights at the switch:
            ``"keep"`` (default: the moments/momentum carry over) or ``"reset"`` (their state
            entries are deleted, so e.g. Adam restarts its moments and bias correction, SGD its
            momentum buffer; the free weights keep theirs).
        target_norm: the norm every constrained weight is held at. Default ``None``: each weight's
            own Frobenius norm at the switch. A number ``> 0``: all of them are rescaled to it at the
            switch and held there.
        project_gradients: project the gradients onto the tangent space before each step (the
            rescale after the step is always done). Default ``True``.
        on_weight_decay: what to do when a constrained weight sits in a parameter group with
            ``weight_decay > 0``: ``"warn"`` (default) or ``"error"``. Checked when the fit starts
            (the optimizers are known then) for ``scope="all"``, for ``layers=[...]`` and, with
            ``scope="final"``, for the classifier head; the other layers of the ``"final"`` search once
            the first forward pass has been traced, before the first backward pass. LAWN never changes
            the optimizer: the rescale after each step undoes decoupled decay (AdamW) on these
            weights, while coupled L2 decay (Adam, SGD) still enters the optimizer's momentum/moment
            estimates. LAWN is meant to replace weight decay on them: put them in a group with
            ``weight_decay=0`` (other parameters may keep theirs).
        log_norms: log ``lawn/weight_norm/<param>`` per constrained weight, ``lawn/logit_norm``
            (mean L2 norm of the logits of the training batch) and ``lawn/constrained`` (0 or 1),
            every ``log_every_n_steps``. Default ``True``.

    State (``phase``, constrained parameter names, their target norms, the step of the switch) is
    saved in the checkpoint (``version`` 2; version 1 states load): a run resumed in the
    constrained phase keeps exactly the same constraint, whatever the resumed callback's options.

    Example:
        >>> lawn = LAWN(free_epochs=2, scope="all", on_switch="reset")  # pl.Trainer(callbacks=[lawn])
        >>> lawn.state_dict()["phase"], lawn.state_dict()["version"]
        ('free', 2)
    """

    def __init__(
        self,
        free_epochs: int = 5,
        free_steps: int | None = None,
        scope: Literal["final", "all"] = "all",
        layers: list[str] | None = None,
        on_switch: Literal["keep", "reset"] = "keep",
        target_norm: float | None = None,
        project_gradients: bool = True,
        on_weight_decay: Literal["warn", "error"] = "warn",
        log_norms: bool = True,
    ) -> None:
        if not isinstance(free_epochs, int) or isinstance(free_epochs, bool) or free_epochs < 0:
            raise ValueError(f"free_epochs must be an integer >= 0, got {free_epochs!r}")
        if free_steps is not None and (
            not isinstance(free_steps, int) or isinstance(free_steps, bool) or free_steps < 0
        ):
            raise ValueError(f"free_steps must be None or an integer >= 0, got {free_steps!r}")
        if scope not in ("final", "all"):
            raise ValueError(
                f"scope must be 'final' (layers after the last normalization layer) or 'all' (every weight "
                f"matrix), got {scope!r}"
            )
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of names or patterns, got the string '{layers}': use ['{layers}']")
        if layers is not None and len(layers) == 0:
            raise ValueError("layers is an empty list: pass None to find the layers automatically, or name some")
        if on_switch not in ("keep", "reset"):
            raise ValueError(f"on_switch must be 'keep' or 'reset', got {on_switch!r}")
        if target_norm is not None and (
            isinstance(target_norm, bool)
            or not isinstance(target_norm, int | float)
            or not math.isfinite(target_norm)
            or target_norm <= 0
        ):
            raise ValueError(
                f"target_norm must be None (each weight's norm at the switch) or a finite number > 0, "
                f"got {target_norm!r}"
            )
        if on_weight_decay not in ("warn", "error"):
            raise ValueError(f"on_weight_decay must be 'warn' or 'error', got {on_weight_decay!r}")
        self.free_epochs = free_epochs
        self.free_steps = free_steps
        self.scope = scope
        self.layers = list(layers) if layers is not None else None
        self.on_switch = on_switch
        self.target_norm = float(target_norm) if target_norm is not None else None
        self.project_gradients = project_gradients
        self.on_weight_decay = on_weight_decay
        self.log_norms = log_norms

        # Saved state.
        self.phase: str = FREE
        self.param_names: list[str] = []
        self.norms: dict[str, float] = {}
        self.switch_step: int | None = None
        self._loaded_scope: str | None = None

        # Per-fit runtime.
        self._named_parameters: dict[str, nn.Parameter] = {}
        self._state_loaded_late = False
        self._params: dict[str, nn.Parameter] = {}
        # optimizer id -> (its constrained weights, their target norms as one tensor on their device)
        self._per_optimizer: dict[int, tuple[list[nn.Parameter], Tensor]] = {}
        self._handles: list[Any] = []
        self._trace: ExecutionTrace | None = None
        self._trace_stack: contextlib.ExitStack | None = None
        self._trace_pending = False
        self._measure = False
        self._logit_norm: Tensor | None = None

    # ------------------------------------------------------------------ extension points

    def should_constrain(self, trainer: pl.Trainer) -> bool:
        """Whether the step about to run belongs to the constrained phase (override for other schedules)."""
        if self.free_steps is not None:
            return trainer.global_step >= self.free_steps
        return trainer.current_epoch >= self.free_epochs

    # ------------------------------------------------------------------ setup and teardown

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        names = {cls.__name__ for cls in type(trainer.strategy).__mro__}
        if names.intersection(_UNSUPPORTED_STRATEGIES):
            raise RuntimeError(
                f"LAWN does not support {type(trainer.strategy).__name__}: it flattens the weights of a unit into "
                "buffers cut across ranks, so a layer's weight is no tensor whose norm can be held. Use "
                "ModelParallelStrategy (FSDP2: one sharded DTensor per weight, supported), strategy='ddp', or one "
                "device."
            )
        if self.layers is not None:
            match_layers(pl_module, self.layers)  # a pattern that matches nothing fails now, not at step 0

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The optimizers exist now (configure_optimizers ran): hooks, and every check that needs them.
        self._named_parameters = dict(pl_module.named_parameters())
        for optimizer in trainer.optimizers:
            register = getattr(optimizer, "register_step_post_hook", None)
            if not callable(register):
                raise TypeError(
                    f"LAWN needs a torch.optim.Optimizer (for register_step_post_hook), got "
                    f"{type(optimizer).__name__}: wrap or replace it with a torch optimizer"
                )
            self._handles.append(register(self._after_step))
        if self.log_norms:
            self._attach_logit_hook(pl_module)
        self._state_loaded_late = False
        if self.param_names:  # resumed from a checkpoint: the layers are known
            self._bind_resumed(trainer, pl_module)
            return
        # Trace the first training step's forward: to find the layers (scope "final") and, when the
        # layers are named, to check the activations between them.
        self._trace_pending = self.layers is not None or self.scope == "final"
        if self.layers is not None:
            self._set_param_names(trainer, constrained_parameter_names(pl_module, match_layers(pl_module, self.layers)))
        elif self.scope == "all":
            self._set_param_names(trainer, self._all_weight_names(trainer, pl_module))
        else:
            self._check_head_weight_decay(trainer, pl_module)
            return
        self._bind(trainer, pl_module)
        self._check_weight_decay(trainer)

    def _bind_resumed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded_scope is not None and self._loaded_scope != self.scope and self.layers is None:
            rank_zero_warn(
                f"LAWN: resuming a run made with scope='{self._loaded_scope}' under scope='{self.scope}': the "
                f"checkpoint's constrained weights ({len(self.param_names)}) are kept. Start a new run to change "
                "the scope."
            )
        self._bind(trainer, pl_module)
        self._check_weight_decay(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Strategies that restore a checkpoint after their setup (ModelParallelStrategy, FSDP) load this
        # callback's state after on_fit_start: bind the checkpoint's weights and targets now.
        if self._state_loaded_late:
            self._state_loaded_late = False
            self._stop_trace()
            self._trace, self._trace_pending = None, False
            self._bind_resumed(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop_trace()
        self._trace = None
        self._trace_pending = False
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._named_parameters = {}
        self._params.clear()
        self._per_optimizer.clear()

    def _attach_logit_hook(self, pl_module: pl.LightningModule) -> None:
        head_attr = getattr(pl_module, "classifier_head", None)
        try:
            _, head = find_classifier(pl_module, head_attr if isinstance(head_attr, str) else None)
        except LookupError:
            rank_zero_info("LAWN: no classifier head found, so lawn/logit_norm is not logged")
            return

        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            # Only the first forward of a measured training batch: one norm per logged step.
            if self._measure and self._logit_norm is None and isinstance(output, Tensor) and output.ndim >= 1:
                with torch.no_grad():
                    self._logit_norm = output.detach().float().flatten(1).norm(dim=-1).mean()

        self._handles.append(head.register_forward_hook(hook))

    # ------------------------------------------------------------------ finding the layers

    def _stop_trace(self) -> None:
        if self._trace_stack is not None:
            self._trace_stack.close()
            self._trace_stack = None

    @staticmethod
    def _all_weight_names(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[str]:
        """scope="all": every trainable weight with >= 2 dimensions that an optimizer updates.

        A weight is a parameter whose name ends in ``weight`` (``weight``, MultiheadAttention's
        ``in_proj_weight``): position embeddings, class tokens and attention-bias tables (LeViT's
        ``attention_biases`` start at zero, a norm no sphere has) are not layers' weights and stay free.
        """
        optimized = {id(p) for optimizer in trainer.optimizers for g in optimizer.param_groups for p in g["params"]}
        names = []
        for layer, module in pl_module.named_modules():
            if is_aux(layer):
                continue
            for name, param in weight_matrices(module):
                if id(param) in optimized and name.endswith("weight"):
                    names.append(f"{layer}.{name}" if layer else name)
        if not names:
            raise ValueError(
                f"LAWN(scope='all') found no trainable weight with two or more dimensions in the optimizers of "
                f"{type(pl_module).__name__}: nothing to constrain. Check configure_optimizers, or name the "
                "layers (layers=[...])"
            )
        return names

    def _set_param_names(self, trainer: pl.Trainer, names: list[str]) -> None:
        # Every rank sees the same model; rank 0's answer is the one all use.
        names = trainer.strategy.broadcast(names, src=0)
        self.param_names = list(names)
        shown = ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")
        rank_zero_info(f"LAWN constrains {len(names)} weight(s): {shown}")

    def _check_head_weight_decay(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Default search, before the trace: the classifier head runs after the last norm, so it is
        constrained for sure; weight decay on it is reported now, before any step."""
        head_attr = getattr(pl_module, "classifier_head", None)
        try:
            head_name, head = find_classifier(pl_module, head_attr if isinstance(head_attr, str) else None)
        except LookupError:
            return
        names = {id(p): f"{head_name}.{n}" if head_name else n for n, p in weight_matrices(head)}
        self._report_weight_decay(trainer, names)

    def _finish_trace(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """After the first forward: the layers of the default search, the activation check."""
        if not self._trace_pending or self._trace is None:
            return
        trace = self._trace
        self._stop_trace()
        self._trace = None
        self._trace_pending = False
        if self.layers is not None:
            layers = match_layers(pl_module, self.layers)
        else:
            layers = select_constrained_layers(pl_module, trace)
            self._set_param_names(trainer, constrained_parameter_names(pl_module, layers))
            self._bind(trainer, pl_module)
            self._check_weight_decay(trainer)
        activations = non_homogeneous_activations(pl_module, trace, layers)
        if activations:
            kinds = sorted({type(pl_module.get_submodule(a)).__name__ for a in activations})
            rank_zero_warn(
                f"LAWN: non-homogeneous activation(s) {', '.join(kinds)} run inside the constrained part "
                f"({', '.join(activations)}): the logits no longer scale with the weight norms, so holding the "
                "norms attenuates them less. Constrain only the layers after them (layers=[...]) or use "
                "ReLU/LeakyReLU there."
            )

    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The parameters as the optimizers hold them, recorded when the fit started: under FSDP2 a module
        # registers its gathered (temporary) parameters during its forward, when the trace binds them.
        parameters = self._named_parameters or dict(pl_module.named_parameters())
        missing = [n for n in self.param_names if n not in parameters]
        if missing:
            raise RuntimeError(
                f"LAWN's constrained weights {missing} are not parameters of {type(pl_module).__name__} (the "
                "checkpoint was made with another model?): resume with the same model, or start a new run"
            )
        self._params = {n: parameters[n] for n in self.param_names}
        self._per_optimizer.clear()
        if self.phase == CONSTRAINED:
            self._bind_optimizers(trainer)

    def _bind_optimizers(self, trainer: pl.Trainer) -> None:
        """Map each optimizer to the constrained weights it updates and their target norms."""
        self._per_optimizer.clear()
        seen: set[int] = set()
        for optimizer in trainer.optimizers:
            in_groups = {id(p) for group in optimizer.param_groups for p in group["params"]}
            names = [n for n, p in self._params.items() if id(p) in in_groups]
            if not names:
                continue
            params = [self._params[n] for n in names]
            # The targets live on the weights' device once, so the per-step rescale copies nothing.
            targets = torch.tensor([self.norms[n] for n in names], dtype=torch.float64, device=params[0].device)
            self._per_optimizer[id(optimizer)] = (params, targets)
            seen.update(id(p) for p in params)
        unused = [n for n, p in self._params.items() if id(p) not in seen]
        if unused:
            rank_zero_warn(f"LAWN: constrained weights {unused} are in no optimizer, so they are never rescaled")

    def _check_weight_decay(self, trainer: pl.Trainer) -> None:
        self._report_weight_decay(trainer, {id(p): n for n, p in self._params.items()})

    def _report_weight_decay(self, trainer: pl.Trainer, ids: dict[int, str]) -> None:
        offending = []
        for optimizer in trainer.optimizers:
            for index, group in enumerate(optimizer.param_groups):
                decay = group.get("weight_decay", 0.0) or 0.0
                names = [ids[id(p)] for p in group["params"] if id(p) in ids]
                if decay > 0 and names:
                    offending.append(f"{type(optimizer).__name__} group {index} (weight_decay={decay}): {names}")
        if not offending:
            return
        message = (
            "LAWN constrains weights that also have weight decay: " + "; ".join(offending) + ". LAWN replaces "
            "weight decay on these weights (the free phase's length is its hyperparameter); it does not change "
            "the optimizer. Put them in a parameter group with weight_decay=0."
        )
        if self.on_weight_decay == "error":
            raise ValueError(message + " (on_weight_decay='error'; pass 'warn' to go on anyway)")
        rank_zero_warn(message)

    # ------------------------------------------------------------------ the training step

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._trace_pending and self._trace_stack is None:
            self._trace_stack = contextlib.ExitStack()
            self._trace = self._trace_stack.enter_context(record_execution(pl_module))
        self._logit_norm = None
        self._measure = self.log_norms and bool(trainer._logger_connector.should_update_logs)

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # The first forward is over: the layers are known before any gradient or optimizer step.
        self._finish_trace(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self._finish_trace(trainer, pl_module)
        if not self.param_names:
            raise RuntimeError("LAWN could not trace a training step to find its layers; pass layers=[...]")
        if self.phase == FREE and self.should_constrain(trainer):
            self._switch(trainer)
        if self.phase == CONSTRAINED and self.project_gradients:
            params, _ = self._per_optimizer.get(id(optimizer), ([], None))
            pairs = [(p.grad, p) for p in params if p.grad is not None]
            if pairs:
                grads, weights = zip(*pairs, strict=True)
                project_to_tangent_(grads, weights)

    def _switch(self, trainer: pl.Trainer) -> None:
        names = list(self._params)
        if self.target_norm is None:
            values = frobenius_norms([self._params[n] for n in names]).tolist() if names else []
            norms = dict(zip(names, (float(v) for v in values), strict=True))
        else:
            norms = dict.fromkeys(names, self.target_norm)
        # DDP keeps replicas identical, but the norms must agree bit for bit: take rank 0's.
        self.norms = trainer.strategy.broadcast(norms, src=0)
        bad = {n: v for n, v in self.norms.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise FloatingPointError(
                f"LAWN cannot hold weights at norms {bad} recorded at step {trainer.global_step}: a norm must be "
                "finite and positive. Check the free phase for divergence (lower the learning rate)"
            )
        self.phase = CONSTRAINED
        self.switch_step = trainer.global_step
        self._bind_optimizers(trainer)
        for optimizer in trainer.optimizers:
            params, targets = self._per_optimizer.get(id(optimizer), ([], None))
            if targets is None:
                continue
            if self.target_norm is not None:
                rescale_to_norm_(params, targets)  # onto the sphere before the first constrained step
            if self.on_switch == "reset":
                for param in params:
                    optimizer.state.pop(param, None)
        rank_zero_info(
            f"LAWN: constrained phase from epoch {trainer.current_epoch}, step {trainer.global_step} "
            f"(optimizer state {'reset' if self.on_switch == 'reset' else 'kept'}); norms "
            + ", ".join(f"{n}={v:.4g}" for n, v in list(self.norms.items())[:12])
        )

    @torch.no_grad()
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.phase != CONSTRAINED:
            return
        entry = self._per_optimizer.get(id(optimizer))
        if entry is not None:
            rescale_to_norm_(*entry)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A step that returned no loss runs no backward: finish the trace here.
        self._finish_trace(trainer, pl_module)
        if not self._measure:
            return
        self._measure = False
        log = dict(on_step=True, on_epoch=False, batch_size=1)
        if self._params:
            norms = frobenius_norms(list(self._params.values()))
            for name, norm in zip(self._params, norms.unbind(), strict=True):
                pl_module.log(f"lawn/weight_norm/{name}", norm, **log)  # type: ignore[arg-type]
        if self._logit_norm is not None:
            pl_module.log("lawn/logit_norm", self._logit_norm, **log)  # type: ignore[arg-type]
        pl_module.log("lawn/constrained", float(self.phase == CONSTRAINED), **log)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ checkpointing

    def _scope_in_effect(self) -> str:
        # A resumed run constrains the checkpoint's weights, so the checkpoint's scope is the one in
        # effect (a version-1 state resumed under the default "all" still holds "final"'s weights).
        if self.param_names and self._loaded_scope is not None:
            return self._loaded_scope
        return self.scope if self.layers is None else "layers"

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "phase": self.phase,
            "param_names": list(self.param_names),
            "norms": dict(self.norms),
            "scope": self._scope_in_effect(),
            "on_switch": self.on_switch,
            "target_norm": self.target_norm,
            "switch_step": self.switch_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Version 1 (and unversioned) states have no scope/switch fields: their runs used scope="final".
        version = check_state_version(state_dict, STATE_VERSION, "LAWN")
        phase = state_dict.get("phase", FREE)
        if phase not in (FREE, CONSTRAINED):
            raise ValueError(f"LAWN checkpoint state has phase {phase!r}; expected '{FREE}' or '{CONSTRAINED}'")
        self.phase = phase
        self.param_names = list(state_dict.get("param_names", []))
        self.norms = {str(k): float(v) for k, v in state_dict.get("norms", {}).items()}
        if self.phase == CONSTRAINED and set(self.norms) != set(self.param_names):
            raise ValueError(
                f"LAWN checkpoint state is inconsistent: norms for {sorted(self.norms)} but weights "
                f"{self.param_names}; the checkpoint is damaged"
            )
        switch_step = state_dict.get("switch_step")
        self.switch_step = int(switch_step) if switch_step is not None else None
        scope = state_dict.get("scope", "final" if version < 2 else None)
        self._loaded_scope = scope if scope in ("final", "all") else None
        self._state_loaded_late = bool(self._named_parameters)  # the fit has started: rebind at on_train_start

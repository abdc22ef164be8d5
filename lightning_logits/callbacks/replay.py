"""Experience replay (ER), ER-ACE and unbiased experience replay (UER) for online continual learning.

All three keep a :class:`~lightning_logits.buffers.ReservoirBuffer` of past samples. For each
incoming batch the callback draws a replay batch from the buffer, runs it through the model in a
*separate* forward pass (concatenating the two batches would mix their BatchNorm statistics),
adds its loss to the step's loss, and after the optimizer step offers the incoming batch to the
buffer. One optimizer step per incoming batch covers both.

- :class:`ExperienceReplay`: dot-product cross-entropy on both batches (the module's own task
  loss on the incoming batch, plus the replay term).
- :class:`ERACE`: ER with the asymmetric cross-entropy of Caccia et al. (2022): the incoming
  batch's softmax covers only the classes present in that batch, the replayed batch's all classes
  (:func:`~lightning_logits.functional.replay.er_ace_loss`). It replaces the module's task loss.
- :class:`UER`: the incoming batch learns only from the angle between features and class
  weights (cosine logits over the temperature τ), the replayed batch from the full dot product
  (:func:`~lightning_logits.functional.replay.uer_loss`). It replaces the module's task loss.

The steady-state step reads no tensor on the host: the functional losses validate their
inputs' values (finite, labels in range) on the first step only (``validate_args``).

What a custom LightningModule must provide:

1. a linear classifier head (``nn.Linear``) that the logit tap finds
   (:func:`~lightning_logits.networks.heads.find_classifier`: timm's ``get_classifier()``, an ``fc``/
   ``classifier``/``head`` attribute, the last ``nn.Linear``, or a ``classifier_head`` attribute
   naming its dotted path); its input is taken as the features and its output as the logits;
2. a ``forward(x)`` that runs that head once on a batch of inputs (the replay pass calls
   ``pl_module(x)``), and a ``training_step`` that runs it on the incoming batch;
3. batches ``(input, target)`` with int class targets (or ``{"input": ..., "target": ...}``, or
   ``batch_input``/``batch_target`` methods on the module), and automatic optimization.

Buffers (``buffer=``): ``"reservoir"`` (:class:`~lightning_logits.buffers.ReservoirBuffer`, a
uniform sample of the stream, the default) or ``"balanced"``
(:class:`~lightning_logits.buffers.ClassBalancedBuffer`, classes kept equal in number).

Replay-time augmentation (``augment=``): a callable on a batch of input tensors, applied on the
device at every step to the incoming batch (before the module's ``training_step`` sees it) and to
the replayed batch; the buffer stores the un-augmented inputs. Without it (the default) the
inputs are used as the data module gives them, and a data module that augments stores augmented
samples. Under ``ddp_spawn`` the callable must be picklable (a module-level function or an
``nn.Module``).

DDP: every rank keeps its own buffer of the samples it was given, seeded ``seed + rank``, so the
ranks replay different samples and no step pays for a collective; the gradients of both terms are
averaged by DDP as usual. Checkpoints hold every rank's buffer (gathered when the checkpoint is
written), and each rank gets its own back on resume.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_logits.batch import batch_input, batch_target, module_reader
from lightning_logits.buffers import BUFFER_KINDS, ReservoirBuffer, make_buffer
from lightning_logits.functional.replay import _uer_loss_unchecked, er_ace_loss, replay_cross_entropy, uer_loss
from lightning_logits.loss_terms import LossTermCallback, LossTermHub, StepContext, check_state_version
from lightning_logits.networks.heads import LogitTap

__all__ = ["ERACE", "UER", "ExperienceReplay", "ReplayCallback"]

_CUSTOM_MODULE_HELP = (
    "A module used with ExperienceReplay/ERACE/UER must have an nn.Linear classifier head that the logit tap "
    "finds (timm get_classifier(), an fc/classifier/head attribute, the last nn.Linear, or a "
    "`classifier_head` attribute with its dotted path), a forward(x) that runs it once, and "
    "(input, target) batches with int class targets."
)


def _check_gathered(weight: Tensor) -> None:
    if hasattr(weight, "to_local"):
        raise RuntimeError(
            "UER reads the classifier head's whole weight after the forward, but FSDP2 has resharded it (the head "
            "sits in an FSDP unit created with reshard_after_forward=True). Keep the head in the root unit with "
            "FSDP's default (lightning_logits.networks.shard_model does: blocks reshard, the root keeps its weights "
            "until the backward), or use strategy='ddp'"
        )


class ReplayCallback(LossTermCallback):
    """Shared machinery of :class:`ExperienceReplay`, :class:`ERACE` and :class:`UER` (subclass to add a method).

    Subclasses implement :meth:`replay_loss`, given the step context, the replayed batch's
    features and logits (``None`` while the buffer is empty) and its targets, and read
    :attr:`validate_args` (``True`` on the first step only) for the functional losses.

    Args:
        buffer_size: samples kept in the buffer (per rank under DDP).
        replay_batch_size: samples drawn from it per incoming batch.
        seed: seed of the buffer's random stream; rank ``r`` uses ``seed + r``.
        name: the loss term's name (logged as ``train/loss_<name>``).
        weight: factor on the term (1.0).
        profile_buffer: measure the wall time of buffer operations (retrieval and update) in
            ``buffer_seconds`` (synchronizing CUDA around them; off by default).
        buffer: ``"reservoir"`` (default) or ``"balanced"`` (class-balanced).
        augment: a transform of input batches applied to the incoming and the replayed batch at
            every step (the buffer keeps un-augmented samples); ``None``: no replay-time augmentation.

    Attributes:
        buffer: the rank's buffer (:class:`~lightning_logits.buffers.ReservoirBuffer` or
            :class:`~lightning_logits.buffers.ClassBalancedBuffer`).
        buffer_seconds: time spent in buffer operations when ``profile_buffer`` is on.

    Example:
        A replay method of your own: cross-entropy on the replayed batch, added to the module's
        loss on the incoming batch (what :class:`ExperienceReplay` does), written as a subclass.

        >>> import torch.nn.functional as F
        >>> class MyReplay(ReplayCallback):
        ...     def replay_loss(self, context, features, logits, replay_target):
        ...         if logits is None:  # the buffer is still empty
        ...             return context.task_loss.new_zeros(())
        ...         return F.cross_entropy(logits, replay_target)
        >>> replay = MyReplay(buffer_size=50, replay_batch_size=10, name="my_replay")
        >>> replay.name, replay.buffer_size, type(replay.buffer).__name__
        ('my_replay', 50, 'ReservoirBuffer')
    """

    needs_tap = True
    STATE_VERSION = 2  # 2: each rank's buffer state names its kind (1: always a reservoir)

    def __init__(
        self,
        buffer_size: int,
        replay_batch_size: int = 10,
        seed: int = 0,
        name: str = "replay",
        weight: float = 1.0,
        profile_buffer: bool = False,
        buffer: Literal["reservoir", "balanced"] = "reservoir",
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(name=name, weight=weight)
        if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
            raise ValueError(f"buffer_size must be a positive int, got {buffer_size!r}")
        if isinstance(replay_batch_size, bool) or not isinstance(replay_batch_size, int) or replay_batch_size < 1:
            raise ValueError(f"replay_batch_size must be a positive int, got {replay_batch_size!r}")
        if buffer not in BUFFER_KINDS:
            raise ValueError(f"buffer must be one of {BUFFER_KINDS}, got {buffer!r}")
        if augment is not None and not callable(augment):
            raise TypeError(f"augment must be a callable on a batch of inputs (or None), got {type(augment).__name__}")
        self.buffer_size = buffer_size
        self.replay_batch_size = replay_batch_size
        self.seed = seed
        self.profile_buffer = profile_buffer
        self.buffer_kind = buffer
        self.augment = augment
        self.buffer_seconds = 0.0
        self.buffer: ReservoirBuffer = make_buffer(buffer, buffer_size, seed=seed)
        self._clean_input: Tensor | None = None
        self._head: nn.Linear | None = None
        self._rank = 0
        self._world_size = 1
        self._pending_states: list[dict[str, Any]] | None = None
        self._validated = False
        # The hub's tap records the replay forward too (after the incoming batch's records, which
        # stay first: what other loss terms read in this step).
        self._tap: LogitTap | None = None
        self._readers: tuple[Callable[[Any], Any] | None, Callable[[Any], Any] | None] = (None, None)

    @property
    def validate_args(self) -> bool:
        """``True`` until the first step's loss is computed: value checks that sync the device run once."""
        return not self._validated

    # -- setup ------------------------------------------------------------------------------

    @override
    def on_hub_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hub: LossTermHub) -> None:
        tap = hub.ensure_tap()
        if not isinstance(tap.head, nn.Linear):
            raise TypeError(
                f"the classifier head found at '{tap.head_name}' is a {type(tap.head).__name__}, not an "
                f"nn.Linear. {_CUSTOM_MODULE_HELP}"
            )
        self._head = tap.head
        self._tap = tap
        # The module's own batch readers, looked up once: methods of its class (or set in its __init__).
        self._readers = (module_reader(pl_module, "batch_input"), module_reader(pl_module, "batch_target"))
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        if self._pending_states is not None:
            self._restore()
        elif self.buffer.seen == 0:
            # Per-rank random streams: the same seed on every rank would replay the same slots.
            self.buffer = make_buffer(self.buffer_kind, self.buffer_size, seed=self.seed + self._rank)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._tap = None
        super().teardown(trainer, pl_module, stage)

    @property
    def head(self) -> nn.Linear:
        """The model's linear classifier head (found in ``setup``)."""
        if self._head is None:
            raise RuntimeError(f"{type(self).__name__} is not set up yet: it finds the head in Trainer.fit's setup")
        return self._head

    # -- the step ---------------------------------------------------------------------------

    def _timed(self, pl_module: pl.LightningModule) -> contextlib.AbstractContextManager[None]:
        if not self.profile_buffer:
            return contextlib.nullcontext()
        return self._timer(pl_module)

    @contextlib.contextmanager
    def _timer(self, pl_module: pl.LightningModule) -> Iterator[None]:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        start = time.perf_counter()
        yield
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.buffer_seconds += time.perf_counter() - start

    def replay_forward(self, pl_module: pl.LightningModule, inputs: Tensor) -> tuple[Tensor, Tensor]:
        """Run the replayed inputs through the module; returns the head's ``(features, logits)``."""
        tap = self._tap
        if tap is None:
            raise RuntimeError(f"{type(self).__name__} is not set up yet: it finds the head in Trainer.fit's setup")
        all_features, all_logits = tap.record_pass(lambda: pl_module(inputs))
        if not all_logits:
            raise RuntimeError(
                f"pl_module(x) did not run the classifier head on the replayed batch. {_CUSTOM_MODULE_HELP}"
            )
        features, logits = all_features[-1], all_logits[-1]
        if features.ndim != 2 or logits.ndim != 2:
            raise ValueError(
                f"the head's input/output have shapes {tuple(features.shape)}/{tuple(logits.shape)}; replay "
                f"needs [N, D] features and [N, C] logits. {_CUSTOM_MODULE_HELP}"
            )
        return features, logits

    @override
    def loss_term(self, context: StepContext) -> Tensor:
        target = context.target
        if target.is_floating_point():
            raise TypeError(
                f"{type(self).__name__} needs int class targets, got dtype {target.dtype} (soft targets, e.g. "
                "from mixup, are not supported)"
            )
        with self._timed(context.pl_module):
            replay = self.buffer.sample(self.replay_batch_size)
        replay_input, replay_target = replay["input"], replay["target"]
        features: Tensor | None = None
        logits: Tensor | None = None
        if replay_target.numel() > 0:
            if self.augment is not None:
                with torch.no_grad():
                    replay_input = self.augment(replay_input)
            features, logits = self.replay_forward(context.pl_module, replay_input)
        loss = self.replay_loss(context, features, logits, replay_target)
        self._validated = True
        return loss

    def replay_loss(
        self, context: StepContext, features: Tensor | None, logits: Tensor | None, replay_target: Tensor
    ) -> Tensor:
        """The term added to (or, with ``replaces_task_loss``, replacing) the module's loss."""
        raise NotImplementedError(f"{type(self).__name__} must implement replay_loss")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._clean_input = None
        if self.augment is None:
            return
        if self._readers[0] is not None:
            raise TypeError(
                f"{type(self).__name__}(augment=...) replaces the input inside the batch, but "
                f"{type(pl_module).__name__} reads it with its own batch_input(); use (input, target) list "
                "batches or {'input': ..., 'target': ...} dicts, or augment in the module"
            )
        clean = batch_input(batch)
        with torch.no_grad():
            augmented = self.augment(clean)
        if isinstance(batch, list) and batch and batch[0] is clean:
            batch[0] = augmented
        elif isinstance(batch, dict):
            key = next(k for k, v in batch.items() if v is clean)
            batch[key] = augmented
        else:
            raise TypeError(
                f"{type(self).__name__}(augment=...) needs a mutable batch (a list [input, target, ...] as "
                f"the default collate gives, or a dict) to put the augmented input in; got a {type(batch).__name__}"
            )
        self._clean_input = clean

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        clean, self._clean_input = self._clean_input, None
        if outputs is None:  # the module skipped this batch
            return
        custom_input, custom_target = self._readers
        inputs = custom_input(batch) if custom_input is not None else batch_input(batch)
        if clean is not None:  # the batch holds the augmented input: store the original
            inputs = clean
        target = custom_target(batch) if custom_target is not None else batch_target(batch)
        with self._timed(pl_module):
            self.buffer.add(inputs, target)

    # -- checkpointing ----------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        own = self.buffer.state_dict()
        own["extra"] = self.extra_state()
        if self._world_size > 1 and dist.is_available() and dist.is_initialized():
            # Checkpoints are written by rank 0 from its own callback state: gather every rank's
            # buffer here (state_dict runs on all ranks when a checkpoint is saved).
            cpu = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in own.items()}
            states: list[Any] = [None] * self._world_size
            dist.all_gather_object(states, cpu)
            return {"version": self.STATE_VERSION, "rank_states": states}
        return {"version": self.STATE_VERSION, "rank_states": [own]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, self.STATE_VERSION, type(self).__name__)  # v1 states hold reservoirs
        self._pending_states = list(state_dict["rank_states"])
        if self._head is not None:  # already set up (Lightning restores callbacks after setup)
            self._restore()

    def _restore(self) -> None:
        states = self._pending_states
        if not states:
            return
        if len(states) != self._world_size:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint holds {len(states)} rank buffer(s) but this run has "
                f"{self._world_size} rank(s); rank r resumes from saved buffer r mod {len(states)}"
            )
        state = dict(states[self._rank % len(states)])
        kind = state.get("kind", "reservoir")
        if kind != self.buffer_kind:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint holds a {kind!r} buffer but this callback has "
                f"buffer={self.buffer_kind!r}; resume with buffer={kind!r}"
            )
        self.load_extra_state(state.pop("extra", {}))
        self.buffer = make_buffer(kind, self.buffer_size, seed=int(state["seed"]))
        self.buffer.load_state_dict(state)
        self._pending_states = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.buffer.device is not None and self.buffer.device != pl_module.device:
            self.buffer.to(pl_module.device)

    def extra_state(self) -> dict[str, Any]:
        """Subclass state to checkpoint alongside the buffer (per rank)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`extra_state`."""


class ExperienceReplay(ReplayCallback):
    """Plain experience replay: cross-entropy on the incoming batch (the module's loss) and on a replayed one.

    ``L = CE(z, y) + CE(z_m, y_m)``, ``z = h W^T + b``, with a replay batch of
    ``replay_batch_size`` samples drawn without replacement from a reservoir of ``buffer_size``.
    See the module docstring for what a custom LightningModule must provide.

    Args:
        buffer_size: samples kept in the reservoir (per rank under DDP).
        replay_batch_size: samples replayed per incoming batch.
        seed: seed of the buffer's random stream (rank ``r``: ``seed + r``).
        name: logged as ``train/loss_<name>``.
        weight: factor on the term (1.0).
        profile_buffer: time buffer operations into ``buffer_seconds``.
        buffer: ``"reservoir"`` (default) or ``"balanced"`` (class-balanced buffer).
        augment: replay-time augmentation of the incoming and replayed batches (``None``: off).

    Example:
        >>> er = ExperienceReplay(buffer_size=200)
        >>> er.buffer.capacity, er.replay_batch_size, er.replaces_task_loss
        (200, 10, False)
    """

    replaces_task_loss = False

    def __init__(
        self,
        buffer_size: int,
        replay_batch_size: int = 10,
        seed: int = 0,
        name: str = "replay",
        weight: float = 1.0,
        profile_buffer: bool = False,
        buffer: Literal["reservoir", "balanced"] = "reservoir",
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(
            buffer_size,
            replay_batch_size,
            seed=seed,
            name=name,
            weight=weight,
            profile_buffer=profile_buffer,
            buffer=buffer,
            augment=augment,
        )

    @override
    def replay_loss(
        self, context: StepContext, features: Tensor | None, logits: Tensor | None, replay_target: Tensor
    ) -> Tensor:
        if logits is None:
            return context.task_loss.new_zeros(())
        return replay_cross_entropy(logits, replay_target, validate_args=self.validate_args)


class UER(ReplayCallback):
    """Unbiased experience replay: angle-only loss on incoming samples, dot-product loss on replayed ones.

    ``L = CE(cos(h, W) / τ, y) + CE(h_m W^T + b, y_m)``: the module's own loss is logged
    (by the module, e.g. ``train/loss`` for ``Classifier``) but not optimized
    (``replaces_task_loss``). Inference is unchanged: the plain dot-product logits. See the module
    docstring for what a custom LightningModule must provide. The first step computes the loss
    with :func:`~lightning_logits.functional.replay.uer_loss` and all its checks (values
    included); later steps run the same computation without them.

    Args:
        buffer_size: samples kept in the reservoir (per rank under DDP).
        replay_batch_size: samples replayed per incoming batch.
        temperature: τ, the temperature of the cosine logits (0.09).
        mask: classes in the incoming batch's softmax: ``"all"``, ``"seen"`` (classes of every
            batch seen so far, this one included; per rank, and checkpointed) or ``"present"``
            (classes in this batch).
        seed: seed of the buffer's random stream (rank ``r``: ``seed + r``).
        name: logged as ``train/loss_<name>``.
        weight: factor on the term (1.0).
        profile_buffer: time buffer operations into ``buffer_seconds``.
        buffer: ``"reservoir"`` (default) or ``"balanced"`` (class-balanced buffer).
        augment: replay-time augmentation of the incoming and replayed batches (``None``: off).

    Example:
        >>> uer = UER(buffer_size=200, mask="seen")
        >>> uer.temperature, uer.mask, uer.replaces_task_loss
        (0.09, 'seen', True)
    """

    replaces_task_loss = True

    def __init__(
        self,
        buffer_size: int,
        replay_batch_size: int = 10,
        temperature: float = 0.09,
        mask: Literal["all", "seen", "present"] = "all",
        seed: int = 0,
        name: str = "uer",
        weight: float = 1.0,
        profile_buffer: bool = False,
        buffer: Literal["reservoir", "balanced"] = "reservoir",
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(
            buffer_size,
            replay_batch_size,
            seed=seed,
            name=name,
            weight=weight,
            profile_buffer=profile_buffer,
            buffer=buffer,
            augment=augment,
        )
        if mask not in ("all", "seen", "present"):
            raise ValueError(f"mask must be 'all', 'seen' or 'present', got {mask!r}")
        if not 0 < temperature < math.inf:
            raise ValueError(f"temperature must be positive and finite, got {temperature}")
        self.temperature = float(temperature)
        self.mask = mask
        self.seen_classes: Tensor | None = None

    def _logit_mask(self, target: Tensor, num_classes: int) -> Tensor | None:
        if self.mask == "all":
            return None
        present = torch.zeros(num_classes, dtype=torch.bool, device=target.device)
        present[target.long()] = True
        if self.mask == "present":
            return present
        if self.seen_classes is None or self.seen_classes.numel() != num_classes:
            self.seen_classes = torch.zeros(num_classes, dtype=torch.bool, device=target.device)
        elif self.seen_classes.device != target.device:
            self.seen_classes = self.seen_classes.to(target.device)
        self.seen_classes |= present
        return self.seen_classes

    @override
    def replay_loss(
        self, context: StepContext, features: Tensor | None, logits: Tensor | None, replay_target: Tensor
    ) -> Tensor:
        current = context.features
        target = context.target
        if current.ndim != 2:
            raise ValueError(
                f"the head's input has shape {tuple(current.shape)}; UER needs [N, D]. {_CUSTOM_MODULE_HELP}"
            )
        head = self.head
        weight = head.weight
        _check_gathered(weight)
        mask = None if self.mask == "all" else self._logit_mask(target, weight.shape[0])
        if self.validate_args:
            loss = self._checked_loss(current, target, weight, mask, logits, replay_target)
        else:
            # After the first step: the same computation without uer_loss's checks, which the
            # first step ran on these same inputs (see _uer_loss_unchecked).
            loss = _uer_loss_unchecked(current, target, weight, 1.0 / self.temperature, mask, logits, replay_target)
        if logits is None and head.bias is not None:
            # The bias trains only through the replay term. With an empty buffer, a zero
            # multiple keeps it in the graph: DDP fails on parameters without a gradient.
            loss = loss + 0.0 * head.bias.sum()
        return loss

    def _checked_loss(
        self,
        current: Tensor,
        target: Tensor,
        weight: Tensor,
        mask: Tensor | None,
        logits: Tensor | None,
        replay_target: Tensor,
    ) -> Tensor:
        """The first step's loss: :func:`uer_loss` with its value checks (a host sync, once)."""
        if bool((current.detach().abs().amax(dim=1) == 0).any()):
            rank_zero_warn(
                "UER: some incoming samples have all-zero features; their cosine logits are 0 (a uniform "
                "softmax) and they get no gradient from the cosine term. Check for dead units before the head."
            )
        if logits is None:
            return uer_loss(current, target, weight, temperature=self.temperature, logit_mask=mask)
        # The head already computed the replayed logits in the replay forward: reuse them.
        return uer_loss(
            current,
            target,
            weight,
            replay_target=replay_target,
            replay_logits=logits,
            temperature=self.temperature,
            logit_mask=mask,
        )

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"seen_classes": None if self.seen_classes is None else self.seen_classes.cpu()}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.seen_classes = state.get("seen_classes")


class ERACE(ReplayCallback):
    """ER-ACE: experience replay whose incoming samples' softmax covers only the classes in their batch.

    ``L = CE_P(z, y) + CE(z_m, y_m)`` (Caccia et al., "New Insights on Reducing Abrupt
    Representation Change in Online Continual Learning", ICLR 2022): ``P`` is the set of classes
    present in the incoming batch, whose logits alone enter the incoming samples' softmax (the
    asymmetric cross-entropy), so new classes stop pushing the old classes' logits down; the
    replayed samples use the full softmax. Dot-product logits throughout; inference unchanged.
    The module's own loss is logged (by the module, e.g. ``train/loss`` for ``Classifier``) but
    not optimized (``replaces_task_loss``). See :func:`~lightning_logits.functional.replay.er_ace_loss` for how
    it relates to the official code, and the module docstring for what a custom LightningModule
    must provide.

    Args:
        buffer_size: samples kept in the buffer (per rank under DDP).
        replay_batch_size: samples replayed per incoming batch.
        seed: seed of the buffer's random stream (rank ``r``: ``seed + r``).
        name: logged as ``train/loss_<name>``.
        weight: factor on the term (1.0).
        profile_buffer: time buffer operations into ``buffer_seconds``.
        buffer: ``"reservoir"`` (default) or ``"balanced"`` (class-balanced buffer).
        augment: replay-time augmentation of the incoming and replayed batches (``None``: off).

    Example:
        >>> ace = ERACE(buffer_size=200)
        >>> ace.name, ace.replay_batch_size, ace.replaces_task_loss
        ('er_ace', 10, True)
    """

    replaces_task_loss = True

    def __init__(
        self,
        buffer_size: int,
        replay_batch_size: int = 10,
        seed: int = 0,
        name: str = "er_ace",
        weight: float = 1.0,
        profile_buffer: bool = False,
        buffer: Literal["reservoir", "balanced"] = "reservoir",
        augment: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__(
            buffer_size,
            replay_batch_size,
            seed=seed,
            name=name,
            weight=weight,
            profile_buffer=profile_buffer,
            buffer=buffer,
            augment=augment,
        )

    @override
    def replay_loss(
        self, context: StepContext, features: Tensor | None, logits: Tensor | None, replay_target: Tensor
    ) -> Tensor:
        incoming = context.logits
        if incoming.ndim != 2:
            raise ValueError(
                f"the step's logits have shape {tuple(incoming.shape)}; ERACE needs [N, C]. {_CUSTOM_MODULE_HELP}"
            )
        if logits is None:
            return er_ace_loss(incoming, context.target, validate_args=self.validate_args)
        return er_ace_loss(incoming, context.target, logits, replay_target, validate_args=self.validate_args)

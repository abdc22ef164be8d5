"""Distill a frozen teacher's logits into any classifier or language model, as a loss-term Callback.

Losses: KD, NKD, DKD, DIST, dual-head KD (DHKD), the token-level divergences (forward/reverse KL,
generalized JSD, skew KL, skew reverse KL, total variation), or a user's function.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast, get_args

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_logits.batch import batch_index
from lightning_logits.functional.distillation import (
    DEFAULT_TEMPERATURE,
    DISTILLATION_LOSSES,
    DistillationLossName,
    dkd_warmup,
    standardize_logits,
)
from lightning_logits.functional.distillation_fused import FusedLossName, fused_distillation_loss
from lightning_logits.loss_terms import (
    FusedHead,
    LossTermCallback,
    LossTermHub,
    StepContext,
    check_hyperparameter,
    check_state_version,
)
from lightning_logits.networks.causal_lm import causal_lm_logits
from lightning_logits.networks.factory import load_teacher, teacher_fingerprint
from lightning_logits.networks.heads import AUX_ATTRIBUTE, aux_modules, count_classes, find_classifier, first_tensor
from lightning_logits.networks.sharding import shard_model
from lightning_logits.parallel import sharding_mesh
from lightning_logits.teacher_cache import (
    TeacherLogitCache,
    TokenLogitCache,
    dataset_labels,
    label_fingerprint,
    open_teacher_cache,
    reconstruct_logits,
)

__all__ = ["ResizeInput", "TeacherDistillation"]

_LOSSES: tuple[str, ...] = get_args(DistillationLossName)
_FUSED_LOSSES: tuple[str, ...] = get_args(FusedLossName)  # what the fused head loss computes
# each loss's own hyperparameters and their defaults (mdistiller's CIFAR-100 DKD config, DIST's and NKD's)
_LOSS_PARAMETERS: dict[str, dict[str, float]] = {
    "kd": {},
    "nkd": {"gamma": 1.5},
    "dkd": {"alpha": 1.0, "beta": 8.0},
    "dist": {"beta": 1.0, "gamma": 1.0},
    "dhkd": {},
    "forward_kl": {},
    "reverse_kl": {},
    "jsd": {"beta": 0.5},  # the teacher's weight, as TRL's GKD
    "skew_kl": {"alpha": 0.1},  # DistiLLM's skew
    "skew_reverse_kl": {"alpha": 0.1},
    "tv": {},
}
_FRACTIONS = {"jsd": "beta", "skew_kl": "alpha", "skew_reverse_kl": "alpha"}  # hyperparameters in [0, 1]
_DEFAULT_WARMUP = {"dkd": 20.0}  # epochs; mdistiller's DKD.WARMUP
_PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None,
    "32-true": None,
    "bf16": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "16": torch.float16,
    "fp16": torch.float16,
    "16-true": torch.float16,
}


class ResizeInput:
    """A picklable teacher input transform: resize images to ``size`` (and optionally repeat channels).

    For heterogeneous pairs, e.g. a ViT teacher that wants 224x224 RGB with a 32x32 grayscale CNN
    student: ``ResizeInput(224, channels=3)``. In a YAML, give it as a ``class_path``.

    Args:
        size: the output side (int) or ``[height, width]``.
        mode: interpolation mode of :func:`torch.nn.functional.interpolate` (default ``"bilinear"``).
        channels: repeat a 1-channel input to this many channels (``None``: keep).

    Example:
        >>> import torch
        >>> ResizeInput(16, channels=3)(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 3, 16, 16])
    """

    def __init__(self, size: int | Sequence[int], mode: str = "bilinear", channels: int | None = None) -> None:
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mode = mode
        self.channels = channels

    def __call__(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.size:
            align = False if self.mode in ("bilinear", "bicubic") else None
            x = F.interpolate(x, size=self.size, mode=self.mode, align_corners=align)
        if self.channels is not None and x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ValueError(f"can only repeat a 1-channel input to {self.channels} channels, got {x.shape[1]}")
            x = x.expand(-1, self.channels, -1, -1)
        return x


class TeacherDistillation(LossTermCallback):
    """Add a distillation term from a frozen teacher to the training loss of any classifier or LM.

    The task loss stays; ``weight * loss(student_logits, teacher_logits)`` is added and logged as
    ``train/loss_<name>`` (``name`` defaults to the loss's name). The teacher sees
    ``context.input``, the student's actual input (after mixup/cutmix when the module applies
    them), and the target is ``context.target`` (soft after mixup: NKD and DKD use its argmax).

    **Losses** (:mod:`lightning_logits.functional.distillation`): ``"kd"`` (Hinton), ``"nkd"``
    (normalized KD), ``"dkd"`` (decoupled KD, with its linear warm-up over ``warmup_epochs``),
    ``"dist"`` (correlation-based DIST), ``"dhkd"`` (dual-head KD: the BinaryKL-Norm term on an
    auxiliary linear head, see below); for language models the token-level divergences
    ``"forward_kl"``, ``"reverse_kl"``, ``"jsd"`` (generalized JSD with ``beta``, TRL's GKD
    convention), ``"skew_kl"`` and ``"skew_reverse_kl"`` (DistiLLM, with ``alpha``) and ``"tv"``
    (total variation), which carry no ``T^2`` factor; or your own callable, called as ``loss(student_logits,
    teacher_logits, target=..., temperature=..., mask=..., validate_args=..., **loss_kwargs)``.
    ``standardize=True`` z-scores both logit rows first (logit standardization).

    **Dual-head KD** (``loss="dhkd"``): an ``nn.Linear`` with the classifier head's shape is put
    under ``aux_modules(pl_module)["dual_head"]`` (trained by the module's optimizer, saved in its
    checkpoints); it reads the features entering the classifier head and only its logits get the
    distillation term, so the main head keeps the cross-entropy alone. The auxiliary head is
    never used by ``forward``; :meth:`Classifier.load_from_checkpoint` drops it for inference.

    **Sequences** (causal language models): a module whose ``training_step`` returns
    ``{"loss", "logits": [B, T, V], "target": [B, T]}`` (``-100`` = ignored) gets the loss as the
    mean over the non-ignored tokens (an optional ``"mask"`` ``[B, T]`` bool entry also works);
    ``chunk_size`` computes every loss but DIST over that many tokens at a time, keeping the
    peak memory close to the cross-entropy's. The teacher is called on the token ids and must
    return ``[B, T, V]`` (a tensor, or an output with ``.logits`` as Hugging Face models give);
    when the step's output carries ``model_inputs`` (as
    :class:`~lightning_logits.modules.CausalLM`'s does), a teacher whose ``forward`` takes
    ``input_ids`` gets them by keyword, with the student's ``attention_mask``/``position_ids``
    (see :func:`~lightning_logits.networks.causal_lm.causal_lm_logits`). A sequence cache
    (:func:`~lightning_logits.teacher_cache.build_teacher_cache` on ``[N, T]`` rows) stores the
    top-k logits per token.

    **Fused head loss** (no ``[B, T, V]`` student logits): when the step returns the LM head's
    input instead of logits (``"hidden_states"`` ``[B, T, H]``, ``"head_weight"`` ``[V, H]``,
    optionally ``"head_bias"``, as :class:`~lightning_logits.modules.CausalLM` does with
    ``logits="fused"``), the term is computed by
    :func:`~lightning_logits.functional.fused_distillation_loss`, chunk by chunk over the tokens,
    from the online teacher's logits or straight from the cache's top-k rows (by sample index, or
    by ``token_index`` for a token-scale cache; never rebuilt to ``[B, T, V]``). Losses: ``"kd"``,
    ``"forward_kl"``, ``"reverse_kl"`` and ``"jsd"`` (any ``temperature`` and ``beta``,
    ``warmup_epochs``, ``chunk_size`` as the fused chunk); the others, a callable and
    ``standardize=True`` are refused at setup. When the module left its cross-entropy to be
    computed later (a :class:`~lightning_logits.loss_terms.DeferredTaskLoss`, as CausalLM does),
    this callback computes the cross-entropy and its term **in one pass** (``ce_weight=1``,
    ``kd_weight=weight``): it hands the module the cross-entropy, whose graph carries the
    gradient of both, and returns its term detached, so the total loss and every logged value
    equal the unfused run's and the head's chunk logits are computed once per step.
    A second fused distillation callback then computes its own term alone.

    The teacher lives on this callback, not on the LightningModule: Lightning never moves it to
    train mode, DDP never wraps it, and it is never written into the student's checkpoint. It is
    frozen (``requires_grad=False``), kept in eval mode (checked before each forward pass), run
    under ``torch.no_grad()`` on the student's device, optionally in bf16/fp16 and channels_last.
    The teacher's accuracy on the training batches is logged as ``<name>/teacher_acc`` (epoch
    mean, no host read per step); after the first epoch a warning says when it is near chance
    (below 1.5 / C): a weak or mismatched teacher (or cache) teaches the student little.
    The checkpoint records where the teacher came from (``teacher``, ``checkpoint``, ``cache``)
    and a fingerprint of its weights, so a resumed run reloads it, and warns if it differs. The
    loss checks that read tensor values (non-finite logits, label range) run on the first step
    only, so the steady-state step has no extra host-device synchronization.

    Args:
        teacher: an ``nn.Module`` (moved and cast in place, as Lightning moves a model); the path
            of a checkpoint of our :class:`~lightning_logits.modules.Classifier`; a timm model name (or
            ``"torchvision/<name>"``) with ``checkpoint``; or ``"hf:<name>"``, a Hugging Face causal LM
            (``from_pretrained``, with ``teacher_kwargs`` as its keyword arguments). ``None`` when
            ``cache`` is given, or on resume (the recorded source is loaded).
        loss: ``"nkd"`` (default), ``"kd"``, ``"dkd"``, ``"dist"``, ``"dhkd"``, ``"forward_kl"``,
            ``"reverse_kl"``, ``"jsd"``, ``"skew_kl"``, ``"skew_reverse_kl"``, ``"tv"``, or a callable.
        weight: weight of the term in the total loss (default 1.0).
        temperature: ``None`` for the loss's default (KD 4, NKD 1, DKD 4, DIST 1, DHKD 2; 1 for the
            token-level divergences and a callable).
        gamma: NKD's non-target weight (default 1.5) or DIST's intra-class weight (default 1.0).
        alpha: DKD's target-class (TCKD) weight (default 1.0), or the skew of ``"skew_kl"`` /
            ``"skew_reverse_kl"`` in ``[0, 1]`` (default 0.1).
        beta: DKD's non-target (NCKD) weight (default 8.0), DIST's inter-class weight (default 1.0),
            or the JSD's teacher weight in ``[0, 1]`` (default 0.5; 0: forward KL, 1: reverse KL).
            Hyperparameters a loss does not have are ignored.
        standardize: z-score student and teacher logits before the loss (logit standardization;
            the official CIFAR-100 setting uses ``temperature=2`` and a KD weight of 9).
        warmup_epochs: multiply the term by ``min((epoch + 1) / warmup_epochs, 1)`` (epoch counted
            from 0 here, from 1 in mdistiller); ``None``: 20 for DKD (the official warm-up), 0
            (off) for the others.
        chunk_size: positions per chunk for KD/NKD/DKD/DHKD on large vocabularies (``None``: all
            at once; DIST has no chunked path).
        loss_kwargs: extra keyword arguments for a callable ``loss``.
        cache: directory of a top-k teacher-logit cache
            (:mod:`lightning_logits.teacher_cache`); the batches must then carry sample indices
            (``(input, target, index)``), or, for a token-scale cache
            (:func:`~lightning_logits.teacher_cache.build_token_cache`), a ``token_index [B, T]``
            (see :meth:`token_cache_logits`); no teacher runs.
        checkpoint: weights of a teacher given by name.
        num_classes: classes of a teacher given by name (default: the student's ``num_classes``).
        teacher_kwargs: keyword arguments of the model factory for a teacher given by name
            (``{"in_chans": 1}``).
        precision: teacher weights and inputs in ``"bf16"`` or ``"16"``; ``None`` keeps float32.
            (Under ``precision="bf16-mixed"`` the teacher also runs under autocast.)
        channels_last: convert the teacher and its inputs to channels_last memory format.
        teacher_sharding: under Lightning's ``ModelParallelStrategy``: ``"replicated"`` (default: every
            rank holds the whole frozen teacher) or ``"full"`` (the teacher is sharded with FSDP2 over the
            student's mesh, block by block, and all-gathered one block at a time for its forward: about
            1/N of its memory per rank; it has no gradients and no optimizer state). A teacher given as an
            ``nn.Module`` is sharded in place. Under every other strategy the teacher is replicated.
        input_transform: a callable applied to the student's input before the teacher (e.g.
            :class:`ResizeInput` for a ViT/CNN pair with different input sizes).
        name: the loss term's name (default: the value of ``loss``, or ``"distill"`` for a callable).

    Example:
        >>> from torch import nn
        >>> callback = TeacherDistillation(nn.Linear(4, 3), loss="dkd", weight=0.5)
        >>> callback.name, callback.temperature, callback.loss_kwargs, callback.warmup_epochs
        ('dkd', 4.0, {'alpha': 1.0, 'beta': 8.0}, 20.0)
    """

    AUX_KEY = "dual_head"
    STATE_VERSION = 2  # 2: loss_kwargs, standardize, warmup_epochs

    def __init__(
        self,
        teacher: nn.Module | str | None = None,
        loss: DistillationLossName | Callable[..., Tensor] = "nkd",
        weight: float = 1.0,
        temperature: float | None = None,
        gamma: float | None = None,
        alpha: float | None = None,
        beta: float | None = None,
        standardize: bool = False,
        warmup_epochs: float | None = None,
        chunk_size: int | None = None,
        loss_kwargs: dict[str, Any] | None = None,
        cache: str | None = None,
        checkpoint: str | None = None,
        num_classes: int | None = None,
        teacher_kwargs: dict[str, Any] | None = None,
        precision: str | None = None,
        channels_last: bool = False,
        input_transform: Callable[[Tensor], Tensor] | None = None,
        name: str | None = None,
        teacher_sharding: Literal["replicated", "full"] = "replicated",
    ) -> None:
        loss_name: str
        if isinstance(loss, str):
            if loss not in _LOSSES:
                raise ValueError(f"loss must be one of {_LOSSES} or a callable, got {loss!r}")
            loss_name = loss
        elif callable(loss):
            loss_name = "distill"
        else:
            raise TypeError(f"loss must be one of {_LOSSES} or a callable, got {type(loss).__name__}")
        super().__init__(name=name or loss_name, weight=weight)
        if temperature is None:
            temperature = DEFAULT_TEMPERATURE.get(loss_name, 1.0)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"TeacherDistillation: temperature must be a finite number > 0.0, got {temperature}")
        _validate_arguments(teacher, temperature, gamma, cache, checkpoint, num_classes, teacher_kwargs, precision)
        given = {"gamma": gamma, "alpha": alpha, "beta": beta}
        for key, value in given.items():
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{key} must be a finite number, got {value}")
        fraction = given.get(_FRACTIONS.get(loss_name, ""))
        if fraction is not None and not 0.0 <= fraction <= 1.0:
            raise ValueError(f"{_FRACTIONS[loss_name]} of loss={loss_name!r} must lie in [0, 1], got {fraction}")
        if warmup_epochs is None:
            warmup_epochs = _DEFAULT_WARMUP.get(loss_name, 0.0)
        if not (math.isfinite(warmup_epochs) and warmup_epochs >= 0):
            raise ValueError(f"warmup_epochs must be a finite number >= 0 (0: no warm-up), got {warmup_epochs}")
        if chunk_size is not None and (chunk_size < 1 or loss_name == "dist"):
            raise ValueError(
                f"chunk_size must be None or a positive number of positions (and None for DIST), got {chunk_size} "
                f"with loss={loss_name!r}"
            )
        if teacher_sharding not in ("replicated", "full"):
            raise ValueError(
                f"teacher_sharding must be 'replicated' (whole teacher on every rank) or 'full' (FSDP2 shards under "
                f"ModelParallelStrategy), got {teacher_sharding!r}"
            )
        if teacher_sharding == "full" and cache is not None:
            raise ValueError("teacher_sharding='full' shards a teacher, but cache= runs none: drop one of the two")
        if not isinstance(channels_last, bool):
            raise ValueError(f"TeacherDistillation: channels_last must be True or False, got {channels_last!r}")
        if input_transform is not None and not callable(input_transform):
            raise ValueError(
                f"TeacherDistillation: input_transform must be a callable on the input tensor (e.g. ResizeInput(224)), "
                f"got {input_transform!r}"
            )
        self.loss = loss_name
        self.loss_fn: Callable[..., Tensor] = DISTILLATION_LOSSES[loss_name] if isinstance(loss, str) else loss
        self.temperature = float(temperature)
        if isinstance(loss, str):
            self.loss_kwargs: dict[str, Any] = {
                key: float(given[key]) if given[key] is not None else default  # type: ignore[arg-type]
                for key, default in _LOSS_PARAMETERS[loss_name].items()
            }
        else:
            self.loss_kwargs = dict(loss_kwargs or {})
        self.gamma = self.loss_kwargs.get("gamma", gamma)
        self.standardize = bool(standardize)
        self.warmup_epochs = float(warmup_epochs)
        self.chunk_size = chunk_size
        self.teacher_source = teacher
        self.cache_path = cache
        self.checkpoint = checkpoint
        self.num_classes = num_classes
        self.teacher_kwargs = dict(teacher_kwargs or {})
        self.precision = None if precision is None else str(precision)
        self.channels_last = channels_last
        self.input_transform = input_transform
        self.teacher_sharding = teacher_sharding
        self.teacher: nn.Module | None = None
        self.cache: TeacherLogitCache | TokenLogitCache | None = None
        # Absolute paths of the given files, recorded beside them: a resume from another directory finds them.
        self._abspaths = {
            key: _abspath(value) for key, value in (("teacher", teacher), ("checkpoint", checkpoint), ("cache", cache))
        }
        self.fingerprint: str | None = None
        self._dtype: torch.dtype | None = None
        self._restored: dict[str, Any] = {}
        self._validated = False
        # Teacher accuracy on the training batches: device-side sums, read on the host once (first epoch end).
        self._teacher_correct: Tensor | None = None
        self._teacher_seen = 0
        self._teacher_classes: int | None = None
        self._teacher_acc_checked = False

    @property
    @override
    def state_key(self) -> str:
        # Fixed class name, so a subclass (or the base class) resumes a checkpoint of the other.
        return f"TeacherDistillation{{'name': '{self.name}'}}"

    # ----------------------------------------------------------------- teacher
    def _source_record(self) -> dict[str, Any]:
        source = self.teacher_source
        return {
            "teacher": source if isinstance(source, str) else None,
            "teacher_abspath": self._abspaths.get("teacher"),
            "checkpoint_abspath": self._abspaths.get("checkpoint"),
            "cache_abspath": self._abspaths.get("cache"),
            "teacher_class": type(source).__qualname__ if isinstance(source, nn.Module) else None,
            "checkpoint": self.checkpoint,
            "num_classes": self.num_classes,
            "teacher_kwargs": self.teacher_kwargs,
            "cache": self.cache_path,
            "fingerprint": self.fingerprint,
            "loss": self.loss if self.loss != "distill" else getattr(self.loss_fn, "__qualname__", "callable"),
            "temperature": self.temperature,
            "gamma": self.gamma,
            "loss_kwargs": dict(self.loss_kwargs),
            "standardize": self.standardize,
            "warmup_epochs": self.warmup_epochs,
        }

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": self.STATE_VERSION, **self._source_record()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, self.STATE_VERSION, "TeacherDistillation")
        self._restored = dict(state_dict)
        # A callback created without a teacher (or cache) on resume takes the recorded one.
        if self.teacher_source is None and self.cache_path is None:
            self.teacher_source = _recorded_path(state_dict, "teacher")
            self.cache_path = _recorded_path(state_dict, "cache")
            self.checkpoint = _recorded_path(state_dict, "checkpoint")
            self._abspaths = {key: state_dict.get(f"{key}_abspath") for key in ("teacher", "checkpoint", "cache")}
            self.num_classes = state_dict.get("num_classes")
            self.teacher_kwargs = dict(state_dict.get("teacher_kwargs") or {})
            if self.teacher_source is None and self.cache_path is None:
                raise ValueError(
                    f"the checkpoint's {self.state_key} teacher was an nn.Module of class "
                    f"{state_dict.get('teacher_class')}, which cannot be reloaded from a path; pass "
                    "TeacherDistillation(teacher=<the same module>) when resuming"
                )
        # Loading happens in on_train_start, after Lightning restored this state.
        self.teacher = None
        self.cache = None

    def _student_classes(self, pl_module: pl.LightningModule) -> int | None:
        return count_classes(pl_module, getattr(pl_module, "classifier_head", None))

    def _prepare_teacher(self, pl_module: pl.LightningModule) -> None:
        student_classes = self._student_classes(pl_module)
        if self.cache_path is not None:
            self.cache = open_teacher_cache(self.cache_path)
            if student_classes is not None and self.cache.num_classes != student_classes:
                raise ValueError(
                    f"the teacher-logit cache '{self.cache_path}' has {self.cache.num_classes} classes but the "
                    f"student has {student_classes}: build the cache with a teacher trained on the same labels"
                )
            if getattr(pl_module, "mixup", None) is not None:
                rank_zero_warn(
                    "TeacherDistillation(cache=...) with mixup/cutmix: the cached logits belong to the "
                    "un-mixed samples, not to the mixed inputs the student sees"
                )
            self.fingerprint = f"cache:{self.cache.source}"
            self._check_same_teacher()
            return
        if self.teacher_source is None:
            raise ValueError(
                "TeacherDistillation needs a teacher (an nn.Module, a Classifier checkpoint path, or a "
                "model name with checkpoint=) or cache=<directory of cached teacher logits>"
            )
        num_classes = self.num_classes if self.num_classes is not None else student_classes
        teacher = load_teacher(self.teacher_source, self.checkpoint, num_classes, self.teacher_kwargs)
        teacher.requires_grad_(False)
        teacher.eval()
        dtype = _PRECISIONS[self.precision] if self.precision is not None else None
        teacher.to(device=pl_module.device, dtype=dtype)
        if self.channels_last:
            teacher.to(memory_format=torch.channels_last)
        teacher_classes = count_classes(teacher)
        if teacher_classes is not None and student_classes is not None and teacher_classes != student_classes:
            raise ValueError(
                f"the teacher has {teacher_classes} classes but the student has {student_classes}: pass a "
                "teacher trained on the same labels"
            )
        self.fingerprint = teacher_fingerprint(teacher)  # of the whole weights, before any sharding
        if self.teacher_sharding == "full":
            mesh = sharding_mesh(pl_module)
            if mesh is not None:
                # Frozen: no gradients, so no reduce-scatter and no optimizer state; each unit's gathered
                # weights are freed right after its forward.
                shard_model(teacher, mesh, requires_grad=False, reshard_after_forward=True, shard_root=True)
        self.teacher = teacher
        self._dtype = dtype
        self._check_same_teacher()

    def _check_same_teacher(self) -> None:
        recorded = self._restored.get("fingerprint")
        if recorded is not None and recorded != self.fingerprint:
            rank_zero_warn(
                f"resuming with a different teacher than the checkpoint's ({self.fingerprint} vs {recorded}, "
                f"recorded source {self._restored.get('teacher') or self._restored.get('cache')})"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Here rather than in setup: the student is on its device and a resumed state is loaded.
        self._validated = False
        if self.teacher is None and self.cache is None:
            self._prepare_teacher(pl_module)
            if self.cache is not None:
                self._check_cache_data(trainer)
        self._teacher_correct, self._teacher_seen, self._teacher_acc_checked = None, 0, False

    # ------------------------------------------------------------------ teacher accuracy
    def _track_teacher_accuracy(self, context: StepContext, teacher: Tensor) -> None:
        """Log ``<name>/teacher_acc`` (epoch mean) and sum the hits on the device, with no host read."""
        try:
            target = context.target
        except (TypeError, KeyError):  # a batch without a target (possible with KD): nothing to score
            return
        if target.ndim == 2 and target.shape == teacher.shape:
            target = target.argmax(dim=1)  # soft (mixup) targets: their dominant class
        elif target.ndim != 1 or target.shape[0] != teacher.shape[0] or target.is_floating_point():
            return
        hits = (teacher.detach().argmax(dim=1) == target).float()
        context.pl_module.log(
            f"{self.name}/teacher_acc",
            hits.mean(),
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=hits.shape[0],
        )
        if not self._teacher_acc_checked:
            total = hits.sum()
            self._teacher_correct = total if self._teacher_correct is None else self._teacher_correct + total
            self._teacher_seen += hits.shape[0]
            self._teacher_classes = teacher.shape[1]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One host read, after the first epoch: warn when the teacher is about as good as chance.
        if self._teacher_acc_checked or self._teacher_correct is None or not self._teacher_seen:
            return
        self._teacher_acc_checked = True
        accuracy = float(self._teacher_correct) / self._teacher_seen
        classes = self._teacher_classes or 1
        if accuracy < 1.5 / classes:
            source = self.cache_path if self.cache_path is not None else self.teacher_source
            rank_zero_warn(
                f"the teacher is only {accuracy:.1%} accurate on the training batches of epoch "
                f"{trainer.current_epoch} (chance with {classes} classes: {1 / classes:.1%}), so distilling from it "
                f"teaches the student little. Check the teacher ({source if isinstance(source, str) else 'module'}): "
                "trained long enough, on these labels, with the input transform it expects; for a cache, built on "
                "this data. Its accuracy is logged as "
                f"'{self.name}/teacher_acc'."
            )

    # ------------------------------------------------------------- cache vs. training data
    def _check_cache_data(self, trainer: pl.Trainer) -> None:
        """Refuse a cache built on other data than the training set (count and labels by index)."""
        cache = self.cache
        assert cache is not None
        if isinstance(cache, TokenLogitCache):
            return  # a token cache is checked against the token ids of the first batch (token_cache_logits)
        recorded = cache.data_fingerprint
        if recorded is None:
            rank_zero_warn(
                f"the teacher-logit cache '{cache.path}' records no fingerprint of the data it was built on "
                "(built by an older lightning_logits), so it cannot be checked against the training data; "
                f"rebuild it to have it checked: {_rebuild_command(cache, trainer)}"
            )
            return
        labels = _training_labels(trainer)
        if labels is None:
            rank_zero_warn(
                f"cannot read the training set's labels by index (no `targets`/`labels` attribute, no "
                f"TensorDataset), so the teacher-logit cache '{cache.path}' is not checked against them"
            )
            return
        current = label_fingerprint(labels)
        if (current["num_samples"], current["labels_sha1"]) != (recorded["num_samples"], recorded["labels_sha1"]):
            built_on = f" from {json.dumps(cache.data)}" if cache.data else ""
            raise ValueError(
                f"the teacher-logit cache '{cache.path}' was built on other data than this run trains on: its row i "
                f"would give the teacher logits of another sample. Cache{built_on}: {_describe(recorded)}; "
                f"training set: {_describe(current)}. Build the cache on the same split (same fractions and "
                f"seed): {_rebuild_command(cache, trainer)}"
            )

    # ----------------------------------------------------------------- dual head
    def build_dual_head(self, pl_module: pl.LightningModule) -> nn.Linear:
        """Put ``Linear(D, C)`` (the classifier head's shape) under ``aux_modules(pl_module)["dual_head"]``.

        Reused when it already exists with that shape (a second ``fit`` continues with it).
        """
        head_name, head = find_classifier(pl_module, getattr(pl_module, "classifier_head", None))
        in_features = getattr(head, "in_features", None)
        out_features = getattr(head, "out_features", None)
        if not (isinstance(in_features, int) and isinstance(out_features, int)):
            raise LookupError(
                f"dual-head KD needs an nn.Linear classifier head to copy its shape; '{head_name}' is a "
                f"{type(head).__name__}. Set `classifier_head` on your module to the Linear head's dotted path."
            )
        aux = aux_modules(pl_module)
        existing = aux[self.AUX_KEY] if self.AUX_KEY in aux else None  # noqa: SIM401 (ModuleDict has no get)
        if isinstance(existing, nn.Linear) and (existing.in_features, existing.out_features) == (
            in_features,
            out_features,
        ):
            return existing
        reference = next(pl_module.parameters(), None)
        dual = nn.Linear(in_features, out_features)
        if reference is not None:
            dual = dual.to(device=reference.device)
        aux[self.AUX_KEY] = dual
        return dual

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            # validate/test with ckpt_path restore the whole state_dict, the dual head included
            existing = getattr(pl_module, AUX_ATTRIBUTE, None)
            if self.loss == "dhkd" and not (isinstance(existing, nn.ModuleDict) and self.AUX_KEY in existing):
                try:
                    self.build_dual_head(pl_module)
                except LookupError as err:
                    rank_zero_warn(f"TeacherDistillation could not rebuild its dual head for '{stage}' ({err})")
            return
        super().setup(trainer, pl_module, stage)

    @override
    def on_hub_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hub: LossTermHub) -> None:
        if getattr(pl_module, "logits_mode", "full") == "fused":
            self._check_fusable(pl_module)
        if self.loss == "dhkd":
            self.build_dual_head(pl_module)

    def _check_fusable(self, pl_module: pl.LightningModule) -> None:
        """Refuse a loss the fused head loss cannot compute, naming the ones it can."""
        if self.loss in _FUSED_LOSSES and not self.standardize:
            return
        given = "a callable loss" if self.loss == "distill" else f"loss={self.loss!r}"
        if self.standardize:
            given += " with standardize=True"
        raise ValueError(
            f"{type(pl_module).__name__} computes its loss with a fused head and builds no [B, T, V] logits "
            f"(logits='fused'), and the fused distillation loss computes {list(_FUSED_LOSSES)} without "
            f"standardize; got {given}. Use one of those losses, or train with logits='full'"
        )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if stage == "fit":
            self.teacher = None  # free its memory; a new fit reloads it
            self.cache = None

    def teacher_logits(self, context: StepContext) -> Tensor:
        """The teacher's ``[N, C]`` (``[B, T, V]`` for an LM) logits for this step: cache or no-grad forward pass.

        Override to change how the teacher is called (e.g. a teacher with several inputs).
        """
        if isinstance(self.cache, TokenLogitCache):
            return self.token_cache_logits(context, self.cache)
        if self.cache is not None:
            index = batch_index(context.batch)
            if index is None:
                raise ValueError(
                    "TeacherDistillation(cache=...) needs batches that carry sample indices: yield "
                    "(input, target, index), e.g. DigitsDataModule(return_index=True)"
                )
            return self.cache.logits(index, device=context.logits.device)
        teacher = self.teacher
        if teacher is None:
            raise RuntimeError("the teacher is not loaded: TeacherDistillation runs inside Trainer.fit only")
        if teacher.training:  # someone called .train() on it: distill from the eval-mode teacher anyway
            teacher.eval()
        x = context.input.detach()
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self._dtype is not None and x.is_floating_point():
            x = x.to(self._dtype)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        inputs = context.output.get("model_inputs") if isinstance(context.output, Mapping) else None
        with torch.no_grad():
            if isinstance(inputs, Mapping) and self.input_transform is None:
                return causal_lm_logits(teacher, inputs)  # a language model: the student's keyword inputs
            return first_tensor(teacher(x))

    def token_cache_logits(self, context: StepContext, cache: TokenLogitCache) -> Tensor:
        """``[B, T, V]`` teacher logits rebuilt from a token-scale cache's rows (:meth:`token_cache_rows`)."""
        return reconstruct_logits(*self.token_cache_rows(context, cache), cache.num_classes)

    def token_cache_rows(self, context: StepContext, cache: TokenLogitCache) -> tuple[Tensor, Tensor, Tensor]:
        """The cached top-k rows at the batch's ``token_index [B, T]``: ``(values, indices, rest)``.

        ``values``/``indices`` ``[B, T, k]`` and ``rest`` ``[B, T]``, on the device of ``token_index``
        (see :meth:`~lightning_logits.teacher_cache.TokenLogitCache.topk`). The
        batch (a mapping) carries ``token_index``, each position's row of the cache (``-1``: none), as
        :func:`~lightning_logits.data.packing.pack_documents` gives with ``token_index=True``. On the
        first step, the batch's token ids are compared with the cached ones and every position that
        gets a loss must have a row; every step checks the rows' range (on the host copy of the index).
        """
        batch = context.batch
        token_index = batch.get("token_index") if isinstance(batch, Mapping) else None
        if not isinstance(token_index, Tensor):
            raise ValueError(
                f"the token cache '{cache.path}' is read by token: give batches (mappings) a 'token_index' [B, T] "
                "entry, e.g. pack_documents(documents, length, token_index=True) on the documents the cache was "
                "built on"
            )
        inputs = context.output.get("model_inputs") if isinstance(context.output, Mapping) else None
        input_ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else batch.get("input_ids")
        if isinstance(input_ids, Tensor) and tuple(token_index.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"token_index has shape {tuple(token_index.shape)} but input_ids {tuple(input_ids.shape)}: "
                "give one cache row per position [B, T]"
            )
        if not self._validated:  # first step only: these read batch values on the host
            if isinstance(input_ids, Tensor):
                cache.check_tokens(token_index, input_ids)
            try:
                target: Tensor | None = context.target
            except (TypeError, KeyError):
                target = None
            if target is not None and target.shape == token_index.shape:
                uncovered = int(((token_index < 0) & (target != -100)).sum())
                if uncovered:
                    raise ValueError(
                        f"{uncovered} positions of the first batch get a loss (target != -100) but have no row in "
                        f"the token cache '{cache.path}' (token_index -1): give every trained token its row"
                    )
        values, indices, rest = cache.topk(token_index)
        device = token_index.device
        return (
            values.to(device, non_blocking=True),
            indices.to(device, non_blocking=True),
            rest.to(device, non_blocking=True),
        )

    def student_logits(self, context: StepContext) -> Tensor:
        """The logits that get the term: the classifier's, or the auxiliary head's for dual-head KD."""
        if self.loss != "dhkd":
            return context.logits
        head = aux_modules(context.pl_module)[self.AUX_KEY]
        return head(context.features)

    def warmup_factor(self, epoch: int) -> float:
        """``min((epoch + 1) / warmup_epochs, 1)`` for the 0-based ``epoch`` (1 without a warm-up)."""
        return dkd_warmup(epoch + 1, self.warmup_epochs)

    def _fused_teacher(
        self, context: StepContext, head: FusedHead
    ) -> tuple[Tensor | None, tuple[Tensor, Tensor, Tensor] | None]:
        """``(teacher logits, None)`` from the online teacher, or ``(None, (values, indices, rest))`` from the cache.

        The cache's top-k rows (by sample index, or by ``token_index`` for a token-scale cache) go to
        the fused loss as they are: it rebuilds one chunk at a time.
        """
        device = head.hidden.device
        if isinstance(self.cache, TokenLogitCache):  # rows by token_index, checked as token_cache_logits checks them
            values, indices, rest = self.token_cache_rows(context, self.cache)
            return None, (values.to(device), indices.to(device), rest.to(device))
        if self.cache is None:
            teacher = self.teacher_logits(context)
            expected = (*head.hidden.shape[:-1], head.weight.shape[0])
            if tuple(teacher.shape) != expected:
                raise ValueError(
                    f"the teacher gave logits of shape {tuple(teacher.shape)} but the student's positions and "
                    f"vocabulary are {expected}: teacher {teacher.shape[-1]} tokens, student {expected[-1]}"
                )
            return teacher, None
        index = batch_index(context.batch)
        if index is None:
            raise ValueError(
                "TeacherDistillation(cache=...) needs batches that carry sample indices: yield "
                "(input, target, index), e.g. DigitsDataModule(return_index=True)"
            )
        values, indices, rest = (t.to(device, non_blocking=True) for t in self.cache.topk(index))
        return None, (values, indices, rest)

    def fused_loss_term(self, context: StepContext, head: FusedHead) -> Tensor:
        """The term from the LM head's input (no student logits); see "Fused head loss" above.

        While the module's task loss is pending (deferred), computes the cross-entropy in the same
        pass and provides it through :meth:`StepContext.provide_task_loss`; the returned term is then
        detached (its gradient is in the cross-entropy's graph).
        """
        self._check_fusable(context.pl_module)
        teacher, topk = self._fused_teacher(context, head)
        target = context.target
        mask = context._from_output("mask")
        if mask is not None:  # positions outside the mask count in no term: as ignored targets
            target = target.masked_fill(~mask.bool(), -100)
        validate = not self._validated
        self._validated = True
        factor = self.warmup_factor(context.trainer.current_epoch) if self.warmup_epochs > 0 else 1.0
        # one pass with the cross-entropy only when the module's task loss is still to compute (and means the same)
        joint = context.task_loss_pending and mask is None
        kd_weight = self.weight * factor if joint else 1.0
        with torch.autocast(head.hidden.device.type, enabled=False):  # float32 inside, as the module's own loss
            terms = fused_distillation_loss(
                head.hidden.to(head.weight.dtype),
                head.weight,
                target,
                teacher,
                bias=head.bias,
                teacher_topk=topk,
                loss=cast(FusedLossName, self.loss),  # checked by _check_fusable
                beta=self.loss_kwargs.get("beta", 0.5),
                temperature=self.temperature,
                ce_weight=1.0 if joint else 0.0,
                kd_weight=kd_weight,
                chunk_size=self.chunk_size,
                validate_args=validate,
                return_terms=True,
            )
        if not joint:
            return terms.loss * factor if factor != 1.0 else terms.loss
        # the hub adds weight * (returned term) to the task loss: the gradient of both lives in the task loss
        context.provide_task_loss(terms.loss - kd_weight * terms.kd)
        return terms.kd * factor if factor != 1.0 else terms.kd

    @override
    def loss_term(self, context: StepContext) -> Tensor:
        head = context.fused_head
        if head is not None and context._from_output("logits") is None:
            return self.fused_loss_term(context, head)
        student = self.student_logits(context)
        teacher = self.teacher_logits(context)
        if teacher.shape != student.shape:
            raise ValueError(
                f"the teacher gave logits of shape {tuple(teacher.shape)} but the student "
                f"{tuple(student.shape)}: teacher {teacher.shape[-1]} classes, student {student.shape[-1]}"
            )
        target: Tensor | None
        try:
            target = context.target
        except (TypeError, KeyError):
            if self.loss in ("nkd", "dkd"):
                raise
            target = None  # KD, DIST and DHKD only use the target to skip ignored positions
        self._track_teacher_accuracy(context, teacher)
        mask = context._from_output("mask")
        validate = not self._validated
        self._validated = True
        kwargs: dict[str, Any] = dict(self.loss_kwargs)
        if self.loss != "distill":
            kwargs.update(standardize=self.standardize, chunk_size=self.chunk_size)
        elif self.standardize:
            student, teacher = standardize_logits(student), standardize_logits(teacher)
        value = self.loss_fn(
            student,
            teacher,
            target=target,
            temperature=self.temperature,
            mask=mask,
            validate_args=validate,
            **kwargs,
        )
        factor = self.warmup_factor(context.trainer.current_epoch) if self.warmup_epochs > 0 else 1.0
        return value * factor if factor != 1.0 else value


def _training_labels(trainer: pl.Trainer) -> Tensor | None:
    """The training set's labels by index: ``datamodule.dataset("train")`` or the train dataloader's dataset."""
    dataset = None
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None and callable(getattr(datamodule, "dataset", None)):
        try:
            dataset = datamodule.dataset("train")
        except Exception:  # a DataModule whose dataset() means something else
            dataset = None
    if dataset is None:
        loader = trainer.train_dataloader
        dataset = getattr(loader, "dataset", None)
    return None if dataset is None else dataset_labels(dataset)


def _describe(fingerprint: dict[str, Any]) -> str:
    return (
        f"{fingerprint['num_samples']} samples, labels by index sha1 {fingerprint['labels_sha1']}, "
        f"class counts {fingerprint.get('class_counts')}"
    )


def _rebuild_command(cache: TeacherLogitCache, trainer: pl.Trainer) -> str:
    """The ``lightning-logits-cache`` command that rebuilds ``cache`` on this run's training data."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is not None:
        class_path = f"{type(datamodule).__module__}.{type(datamodule).__qualname__}"
        hparams = dict(getattr(datamodule, "hparams", {}) or {})
        hparams.pop("return_index", None)
        data = f"--data {class_path} --data-args '{json.dumps(hparams, default=str)}'"
    else:
        data = "--data <your DataModule class path> --data-args '<its JSON arguments>'"
    teacher = f"--teacher {cache.source}"
    args = cache.teacher_args
    if args.get("checkpoint"):
        teacher += f" --checkpoint {args['checkpoint']}"
    if args.get("num_classes") is not None:
        teacher += f" --num-classes {args['num_classes']}"
    if args.get("model_kwargs"):
        teacher += f" --model-kwargs '{json.dumps(args['model_kwargs'])}'"
    split = (cache.data or {}).get("split", "train")
    split_arg = f" --split {split}" if split != "train" else ""
    return f"`lightning-logits-cache {teacher} {data}{split_arg} --k {cache.k} --out {cache.path} --overwrite`"


def _validate_arguments(
    teacher: Any,
    temperature: Any,
    gamma: Any,
    cache: Any,
    checkpoint: Any,
    num_classes: Any,
    teacher_kwargs: Any,
    precision: Any,
) -> None:
    """TeacherDistillation's argument checks: each error names the argument, the value and the fix."""
    owner = "TeacherDistillation"
    check_hyperparameter("temperature", temperature, low=0.0, low_inclusive=False, owner=owner)
    if gamma is not None:
        check_hyperparameter(
            "gamma",
            gamma,
            low=0.0,
            owner=owner,
            fix="NKD's non-target weight (default 1.5) or DIST's intra-class weight",
        )
    if num_classes is not None:
        check_hyperparameter("num_classes", num_classes, low=2, integer=True, owner=owner)
    if precision is not None and str(precision) not in _PRECISIONS:
        raise ValueError(f"{owner}: precision must be one of {sorted(_PRECISIONS)} or None, got {precision!r}")
    if teacher is not None and not isinstance(teacher, nn.Module | str):
        raise TypeError(f"teacher must be an nn.Module, a name or a checkpoint path, got {type(teacher).__name__}")
    if teacher_kwargs is not None and not isinstance(teacher_kwargs, dict):
        raise ValueError(f"{owner}: teacher_kwargs must be a dict such as {{'in_chans': 1}}, got {teacher_kwargs!r}")
    if cache is not None and not isinstance(cache, str | os.PathLike):
        raise ValueError(f"{owner}: cache must be the path of a teacher-logit cache directory, got {cache!r}")
    if cache is not None and teacher is not None:
        raise ValueError(
            f"{owner}: got both teacher={teacher if isinstance(teacher, str) else type(teacher).__name__!r} and "
            f"cache={cache!r}; a cache replaces the teacher: pass one of them"
        )
    if checkpoint is not None and (cache is not None or isinstance(teacher, nn.Module)):
        given = "cache=" if cache is not None else "an nn.Module teacher"
        raise ValueError(
            f"{owner}: checkpoint={checkpoint!r} would be ignored with {given}: it gives the weights of a teacher "
            "given by model name (teacher='resnet18', checkpoint='weights.pt'); load a module's weights yourself"
        )


def _abspath(value: Any) -> str | None:
    """The absolute path of an existing file or directory given as a string; ``None`` for anything else."""
    if not isinstance(value, str | os.PathLike):
        return None
    path = Path(value)
    return str(path.resolve()) if path.exists() else None


def _recorded_path(state: dict[str, Any], key: str) -> Any:
    """A source recorded in the checkpoint: as given when it exists from here, else its recorded absolute path."""
    given = state.get(key)
    absolute = state.get(f"{key}_abspath")
    if not isinstance(given, str) or absolute is None or Path(given).exists():
        return given
    if Path(absolute).exists():
        return absolute
    raise FileNotFoundError(
        f"the checkpoint's TeacherDistillation {key} '{given}' is found neither from the working directory "
        f"'{Path.cwd()}' nor at its recorded absolute path '{absolute}'; pass it when resuming: "
        f"TeacherDistillation({'teacher' if key == 'teacher' else key}=<its path>)"
    )

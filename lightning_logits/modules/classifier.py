"""A LightningModule that trains any classifier: a timm name, a torchvision name, or an nn.Module."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCalibrationError
from typing_extensions import override

from lightning_logits.batch import batch_input, batch_target
from lightning_logits.functional import classification_loss, dual_focal_loss
from lightning_logits.functional._checks import check_target, hard_target
from lightning_logits.loss_terms import StepScalars
from lightning_logits.networks.factory import build_model
from lightning_logits.networks.heads import AUX_ATTRIBUTE, count_classes
from lightning_logits.networks.sharding import ShardingChoice, reshard, shard_model
from lightning_logits.parallel import sharding_mesh

_ACC_EVERY = 50
_KEEP_LOGITS_UP_TO = 32  # classes up to which train_acc's pending steps keep logits, not argmaxes


class Classifier(pl.LightningModule):
    """Train any classifier with cross-entropy, accuracy and calibration metrics.

    Args:
        model: a timm model name, ``"torchvision/<name>"``, or an ``nn.Module`` (in a YAML, a
            ``class_path``). Default ``"resnet18"`` (timm).
        num_classes: number of classes. Required for names; for a module it is read off its head.
        model_kwargs: keyword arguments for the model factory (``{"in_chans": 1}``). Extra keyword
            arguments of this constructor are merged into it, so ``Classifier("resnet18",
            num_classes=10, in_chans=1)`` works in Python.
        pretrained: load pretrained weights by name (needs internet; off by default).
        head: dotted path of the classifier head inside ``model`` when it cannot be found
            automatically (see :func:`lightning_logits.networks.heads.find_classifier`).
        label_smoothing: cross-entropy label smoothing.
        loss: the training loss: ``"cross_entropy"`` (default) or ``"dual_focal"``
            (:func:`~lightning_logits.functional.dual_focal_loss`, for calibration; hard labels
            only, so no label smoothing or mixup). Validation and test losses stay cross-entropy.
        focal_gamma: the dual focal loss's ``gamma`` (default 5.0).
        mixup_alpha: timm ``Mixup`` alpha; ``0`` disables mixup. Needs an even batch size.
        cutmix_alpha: timm ``CutMix`` alpha; ``0`` disables it.
        optimizer: a callable that takes the parameters and returns an optimizer (in a YAML, a
            ``class_path`` such as ``torch.optim.AdamW`` with ``init_args``). Default: AdamW, lr 1e-3.
        lr_scheduler: a callable that takes the optimizer and returns a scheduler, stepped each
            epoch (``ReduceLROnPlateau`` monitors ``val/loss``). Default: none.
        sharding: what FSDP2 shards under Lightning's ``ModelParallelStrategy`` (ignored under any
            other strategy): ``"auto"`` (default: the model's blocks, found by
            :func:`~lightning_logits.networks.sharding.find_blocks`, each its own unit, then the rest
            of the model and the auxiliary heads), dotted names / ``fnmatch`` patterns of the blocks
            (``["model.blocks.*"]``), ``"model"`` (the whole model as one unit) or ``"off"``
            (``ModelParallelStrategy`` then replicates nothing and is refused: use DDP).
        sharding_mixed_precision: FSDP2 mixed precision: bfloat16 parameters for compute, float32
            gradient reduction; the sharded weights and optimizer state stay float32. Default ``False``.
        reshard_after_forward: free each block's gathered parameters after its forward (default
            ``True``; ``False`` trades memory for less communication). The rest of the model keeps its
            gathered parameters until the backward (FSDP2's rule for the root).
        activation_checkpointing: recompute each block's activations in the backward (default ``False``).

    Under ``Trainer(strategy=ModelParallelStrategy(...))`` :meth:`configure_model` shards the model
    with FSDP2 (:func:`~lightning_logits.networks.sharding.shard_model`); under every other strategy
    the model is left as it is. ``ModelParallelStrategy(data_parallel_size=N, tensor_parallel_size=1)``
    splits the data over the N ranks as DDP does; with its defaults on one node
    (``data_parallel_size=1``) every rank sees the same batches and only memory is saved.

    Logged: ``train/loss`` (each step every ``log_every_n_steps``, and the epoch mean), ``train/acc``
    (epoch); ``val/loss``, ``val/acc``, ``val/acc_top5`` (more than 5
    classes), ``val/ece``; the same under ``test/``.

    Example:
        >>> import torch
        >>> module = Classifier("resnet18", num_classes=10, in_chans=1)
        >>> module(torch.randn(2, 1, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        model: str | nn.Module = "resnet18",
        num_classes: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: bool = False,
        head: str | None = None,
        label_smoothing: float = 0.0,
        loss: Literal["cross_entropy", "dual_focal"] = "cross_entropy",
        focal_gamma: float = 5.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        sharding: ShardingChoice | list[str] = "auto",
        sharding_mixed_precision: bool = False,
        reshard_after_forward: bool = True,
        activation_checkpointing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if loss not in ("cross_entropy", "dual_focal"):
            raise ValueError(f"loss must be 'cross_entropy' or 'dual_focal', got {loss!r}")
        if loss == "dual_focal" and (label_smoothing > 0 or mixup_alpha > 0 or cutmix_alpha > 0):
            raise ValueError(
                "loss='dual_focal' trains on hard labels: set label_smoothing, mixup_alpha and cutmix_alpha to 0 "
                f"(got {label_smoothing}, {mixup_alpha}, {cutmix_alpha})"
            )
        if not focal_gamma >= 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        ignored = ["optimizer", "lr_scheduler"] + (["model"] if isinstance(model, nn.Module) else [])
        self.save_hyperparameters(ignore=ignored)
        factory_kwargs = {**(model_kwargs or {}), **kwargs}
        # The merged factory kwargs, so a checkpoint alone rebuilds the network (networks.load_teacher).
        self.hparams["model_kwargs"] = factory_kwargs
        self.model = build_model(model, num_classes, pretrained=pretrained, **factory_kwargs)
        found = count_classes(self.model) if head is None else None
        if num_classes is None:
            if found is None:
                raise ValueError(f"cannot read the class count off {type(self.model).__name__}; pass num_classes")
            num_classes = found
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.head = head
        self.label_smoothing = label_smoothing
        self.loss = loss
        self.focal_gamma = focal_gamma
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        if isinstance(sharding, str) and sharding not in ("auto", "model", "off"):
            raise ValueError(
                f"sharding must be 'auto', 'model', 'off' or a list of module names/patterns, got {sharding!r}"
            )
        self.sharding = sharding
        self.sharding_mixed_precision = sharding_mixed_precision
        self.reshard_after_forward = reshard_after_forward
        self.activation_checkpointing = activation_checkpointing
        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            from timm.data import Mixup

            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        metrics: dict[str, Metric | MetricCollection] = {"acc": MulticlassAccuracy(num_classes, top_k=1)}
        if num_classes > 5:
            metrics["acc_top5"] = MulticlassAccuracy(num_classes, top_k=5)
        metrics["ece"] = MulticlassCalibrationError(num_classes, n_bins=15)
        base = MetricCollection(metrics)
        # Updated every step, computed once per epoch; its labels are checked by check_target on the
        # first step, so torchmetrics' own value checks (host reads) are off.
        self.train_acc = MulticlassAccuracy(num_classes, top_k=1, validate_args=False)
        self._train_scalars = StepScalars(["cross_entropy"], ["train/loss"], prog_bar=True)
        # (predicted, true) class indices of recent steps: train_acc is updated with them in one call
        # every _ACC_EVERY steps and at the epoch's end (a metric update per step costs more than a small step).
        self._acc_pending: list[tuple[Tensor, Tensor]] = []
        self._validated = False
        self.val_metrics = base.clone(prefix="val/")
        self.test_metrics = base.clone(prefix="test/")

    @property
    def classifier_head(self) -> str | None:
        """Dotted path of the head in this module when ``head`` was given, for the logit tap."""
        return f"model.{self.head}" if self.head is not None else None

    @override
    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _logits(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"batch input must be a tensor, got {type(x).__name__}")
        try:
            logits = self(x)
        except RuntimeError as err:
            raise RuntimeError(
                f"{type(self.model).__name__} failed on a batch of shape {tuple(x.shape)}: {err}. "
                "Check the data's channels and image size against the model "
                "(e.g. model_kwargs: {in_chans: 1} for grayscale)"
            ) from err
        except ValueError as err:
            if "more than 1 value per channel" not in str(err):
                raise
            raise ValueError(
                f"{type(self.model).__name__} failed on a training batch of shape {tuple(x.shape)}: {err}. "
                "A BatchNorm layer saw one value per channel: a batch of one sample whose feature map has "
                "shrunk to 1x1. Use larger inputs (e.g. image_size: 16 for digits with reduced_resnet18), "
                "or a loader with drop_last=True"
            ) from err
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the model returned logits of shape {tuple(logits.shape)} but num_classes is "
                f"{self.num_classes}; the model's head and num_classes must agree"
            )
        return logits

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_classes = getattr(datamodule, "num_classes", None)
        if isinstance(data_classes, int) and data_classes != self.num_classes:
            raise ValueError(
                f"the model has {self.num_classes} classes but {type(datamodule).__name__} has "
                f"{data_classes}: set num_classes: {data_classes} on the model"
            )

    @override
    def configure_model(self) -> None:
        """Shard the model with FSDP2 under ``ModelParallelStrategy``; do nothing under any other strategy."""
        mesh = sharding_mesh(self)
        if mesh is None:
            return
        if self.sharding == "off":
            raise ValueError(
                "Classifier(sharding='off') under ModelParallelStrategy: the strategy needs a sharded model. "
                "Use sharding='auto' (or 'model'), or strategy='ddp' to replicate the model"
            )
        shard_model(
            self,
            mesh,
            blocks=self.sharding,
            param_dtype=torch.bfloat16 if self.sharding_mixed_precision else None,
            reduce_dtype=torch.float32 if self.sharding_mixed_precision else None,
            reshard_after_forward=self.reshard_after_forward,
            activation_checkpointing=self.activation_checkpointing,
        )

    @override
    def on_train_start(self) -> None:
        self._validated = False  # value checks (labels, finite logits) run on the first step of each fit
        self._train_scalars.reset()
        self._acc_pending.clear()
        self.train_acc.reset()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, target = batch_input(batch), batch_target(batch)
        validate = not self._validated
        smoothing = self.label_smoothing
        if self.mixup is not None:
            # The loss checks the target too, but after mixup has turned the labels into scores.
            check_target(target, x.shape[0], self.num_classes, validate_args=validate)
            if x.shape[0] % 2:
                raise ValueError(
                    f"mixup/cutmix need an even batch size, got {x.shape[0]}; use an even "
                    "batch_size and drop_last=True for the training loader"
                )
            x, target = self.mixup(x, target)
            smoothing = 0.0  # already folded into the mixed targets
        logits = self._logits(x)
        if self.loss == "dual_focal":
            loss = dual_focal_loss(logits, target, gamma=self.focal_gamma, validate_args=validate)
        else:
            loss = classification_loss(logits, target, label_smoothing=smoothing, validate_args=validate)
        self._record_train_step(logits, target, loss)
        if validate:  # nn.Module.__setattr__ costs more than this check: set once per fit
            self._validated = True
        return {"loss": loss, "logits": logits, "target": target, "input": x}

    @torch.compiler.disable  # metrics and logging stay eager when the module is compiled
    def _record_train_step(self, logits: Tensor, target: Tensor, loss: Tensor) -> None:
        scores = logits.detach()
        # Few classes: keep the logits and take the argmax of many steps at once (an operation per
        # step costs more than a small model's step); many: keep only the predicted classes.
        predicted = scores if scores.shape[1] <= _KEEP_LOGITS_UP_TO else scores.argmax(dim=1)
        self._acc_pending.append((predicted, hard_target(target)))
        if len(self._acc_pending) >= _ACC_EVERY:
            self._update_train_acc()
        # One log_dict call on logging steps only; NaN/inf checked on the device (see StepScalars).
        self._train_scalars.update(self, [loss], logits.shape[0])

    def _update_train_acc(self) -> None:
        if self._acc_pending:
            kept, true = zip(*self._acc_pending, strict=True)
            predicted = torch.cat(kept)
            if predicted.ndim == 2:  # logits of steps with few classes
                predicted = predicted.argmax(dim=1)
            self.train_acc.update(predicted, torch.cat(true))
            self._acc_pending.clear()

    @override
    def on_train_epoch_end(self) -> None:
        self._train_scalars.epoch_end(self)
        self._update_train_acc()
        if self.train_acc.update_called:
            self.log("train/acc", self.train_acc.compute(), on_step=False, on_epoch=True, batch_size=1)
        self.train_acc.reset()

    def _evaluate(self, batch: Any, metrics: MetricCollection, prefix: str) -> None:
        x, target = batch_input(batch), batch_target(batch)
        check_target(target, x.shape[0], self.num_classes)
        logits = self._logits(x)
        self._record_eval_step(logits, target, metrics, prefix)

    @torch.compiler.disable  # metrics and logging stay eager when the module is compiled
    def _record_eval_step(self, logits: Tensor, target: Tensor, metrics: MetricCollection, prefix: str) -> None:
        loss = classification_loss(logits, target)
        metrics.update(logits.float().softmax(dim=1), hard_target(target))
        self.log(f"{prefix}/loss", loss, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=prefix == "val")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    @override
    def on_validation_end(self) -> None:
        reshard(self)  # FSDP2's root unit keeps its gathered weights after a forward with no backward

    @override
    def on_test_end(self) -> None:
        reshard(self)

    @override
    def on_predict_end(self) -> None:
        reshard(self)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Class probabilities ``[N, C]``."""
        return self._logits(batch_input(batch)).float().softmax(dim=1)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Auxiliary heads (USKD's, ...) are training-only: a module built without them (for
        # inference, or load_from_checkpoint) drops their weights instead of failing strict loading.
        # During a Trainer resume the callbacks have already recreated them, so the keys are kept.
        if AUX_ATTRIBUTE not in self._modules:
            state = checkpoint.get("state_dict", {})
            for key in [k for k in state if k.startswith(AUX_ATTRIBUTE + ".")]:
                del state[key]

    @override
    def configure_optimizers(self) -> Any:
        return optimizers_from_config(self, self.optimizer_factory, self.lr_scheduler_factory, "epoch")


def optimizers_from_config(
    module: nn.Module,
    optimizer: OptimizerCallable | None,
    lr_scheduler: LRSchedulerCallable | None,
    interval: str,
) -> Any:
    """``configure_optimizers``' answer for a module whose optimizer and scheduler come from the config.

    The optimizer (default AdamW, lr 1e-3) gets the trainable parameters; the scheduler, when given,
    steps every ``interval`` (``"epoch"`` or ``"step"``), ``ReduceLROnPlateau`` monitoring ``val/loss``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    built: torch.optim.Optimizer = torch.optim.AdamW(params, lr=1e-3) if optimizer is None else optimizer(params)
    if lr_scheduler is None:
        return built
    return {
        "optimizer": built,
        "lr_scheduler": {"scheduler": lr_scheduler(built), "interval": interval, "monitor": "val/loss"},
    }

"""USKD self-distillation as a Callback: a weak head on an intermediate feature, no teacher."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_logits.batch import batch_input
from lightning_logits.functional.uskd import RANK_BY, uskd_loss
from lightning_logits.loss_terms import LossTermCallback, LossTermHub, StepContext, check_state_version
from lightning_logits.networks.features import FeatureLayer, pool_feature, probe_feature_width, resolve_feature_layer
from lightning_logits.networks.heads import AUX_ATTRIBUTE, aux_modules, count_classes

__all__ = ["USKD"]


class USKD(LossTermCallback):
    """Universal self-knowledge distillation (USKD, Yang et al. 2023) for any classifier.

    Adds ``alpha * L_t + beta * L_non + L_weak`` (:func:`~lightning_logits.functional.uskd.uskd_loss`)
    to the module's loss: the student's own soft labels, no teacher. The weak logits come from
    an auxiliary ``nn.Linear(C_mid, C)`` on the pooled output of an intermediate layer. The head
    is created in ``setup`` (before ``configure_optimizers`` and before a checkpoint is restored),
    under ``lightning_logits_aux["uskd"]`` on the LightningModule, so the module's optimizer trains
    it and its checkpoints save and restore it; nothing of the user's model is changed or
    removed. It runs in training only; inference never touches the head. (Checkpoints therefore
    hold ``lightning_logits_aux.uskd.*`` weights: load them for inference without this callback
    with ``strict=False``; ``validate``/``test`` with this callback rebuild the head first.)

    The intermediate layer (:func:`lightning_logits.networks.default_feature_layer`): for timm CNNs the
    second-to-last stage in ``feature_info``, global-average pooled (ResNet18: ``layer3``, 256 channels); for
    ViT/DeiT the class token after block ``depth // 2 - 1``. ``feature_layer`` names another module
    by dotted path, looked up relative to the LightningModule first (``"model.layer2"`` in a
    :class:`~lightning_logits.modules.Classifier`) and, failing that, relative to the network
    that holds the classifier head (``"layer2"``). Its width ``C_mid`` comes from ``feature_info``
    when the layer is a timm stage or ViT block, otherwise from one forward pass (``no_grad``,
    eval mode, two samples) on ``example_input_array`` or the first training batch.

    Targets come from :attr:`StepContext.target`: class indices, or the soft scores that
    :class:`~lightning_logits.modules.Classifier` returns after timm's Mixup/CutMix. Under DDP the
    batch mean in ``L_t`` is taken over each device's batch, as in the official code.

    Args:
        feature_layer: dotted path of the intermediate module; ``None`` finds it for timm models
            and torchvision ResNets.
        alpha: weight of the target term (1.0; CIFAR ResNet18: 0.1).
        beta: weight of the Zipf non-target term (0.1).
        mu: weight of the weak head's cross-entropy (0.005 ImageNet; CIFAR: 0.1).
        rank_by: ``"log_prob"`` (current official code) or ``"prob"`` (first release).
        name: the term's name, logged as ``train/loss_<name>``; also the key of the weak head in
            ``lightning_logits_aux``, so two USKD callbacks (e.g. on two layers) can coexist.
        weight: factor on the whole term (1.0).

    Logged: ``train/loss_uskd``.

    Example:
        >>> callback = USKD(alpha=0.1, beta=0.1, mu=0.1)
        >>> callback.name, callback.alpha, callback.rank_by
        ('uskd', 0.1, 'log_prob')
    """

    STATE_VERSION = 1

    def __init__(
        self,
        feature_layer: str | None = None,
        alpha: float = 1.0,
        beta: float = 0.1,
        mu: float = 0.005,
        rank_by: Literal["log_prob", "prob"] = "log_prob",
        name: str = "uskd",
        weight: float = 1.0,
    ) -> None:
        super().__init__(name=name, weight=weight)
        if feature_layer is not None and not isinstance(feature_layer, str):
            raise ValueError(
                f"USKD: feature_layer must be a module's dotted path such as 'layer3' (or None), got {feature_layer!r}"
            )
        if rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
            if not value >= 0.0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite non-negative weight, got {value}")
        self.feature_layer = feature_layer
        self.alpha, self.beta, self.mu = float(alpha), float(beta), float(mu)
        self.rank_by = rank_by
        self._layer: FeatureLayer | None = None

    # ------------------------------------------------------------------------------------------
    # Finding the layer and building the head

    def resolve_layer(self, pl_module: pl.LightningModule) -> FeatureLayer:
        """The intermediate layer: ``feature_layer`` when given, else the network's default feature layer."""
        return resolve_feature_layer(pl_module, self.feature_layer, getattr(pl_module, "classifier_head", None))

    def _example_input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        example = getattr(pl_module, "example_input_array", None)
        if example is not None:
            return example
        loader = None
        try:  # the loader fit() will use, whether from a DataModule, the module or an argument
            loader = trainer.fit_loop._data_source.dataloader()
        except Exception:
            datamodule = getattr(trainer, "datamodule", None)
            if datamodule is not None:
                loader = datamodule.train_dataloader()
        if loader is None:
            raise RuntimeError(
                f"USKD needs one forward pass to measure the width of '{self._layer.name if self._layer else '?'}' "
                f"but found no training data; set example_input_array on {type(pl_module).__name__}"
            )
        batch = next(iter(loader))
        custom: Callable[[Any], Tensor] | None = getattr(pl_module, "batch_input", None)
        x = custom(batch) if callable(custom) else batch_input(batch)
        return x[:2] if isinstance(x, Tensor) else x

    def _measure(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer: FeatureLayer
    ) -> tuple[int, int | None]:
        """``(C_mid, C)`` from one no-grad, eval-mode forward pass; the model is left as it was."""
        # fork_rng: drawing a batch (a sampler's seed) must not shift the run's random stream.
        with torch.random.fork_rng(devices=[]):
            try:
                x = self._example_input(trainer, pl_module)
                return probe_feature_width(pl_module, layer, x)
            except (RuntimeError, TypeError) as err:  # a pooling ValueError names the layer itself
                raise RuntimeError(
                    f"USKD ran {type(pl_module).__name__} once to measure the width of '{layer.name}' and it "
                    f"failed: {err}. Set example_input_array on the module to an input its forward() accepts"
                ) from err

    def build_head(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Linear:
        """Find the layer and put ``Linear(C_mid, C)`` under ``aux_modules(pl_module)["uskd"]`` (reused if present)."""
        layer = self.resolve_layer(pl_module)
        self._layer = layer
        channels, classes = layer.channels, count_classes(pl_module, getattr(pl_module, "classifier_head", None))
        if channels is None or classes is None:
            measured, measured_classes = self._measure(trainer, pl_module, layer)
            channels = measured
            classes = classes if classes is not None else measured_classes
        if classes is None:
            raise LookupError(
                f"USKD cannot tell the number of classes of {type(pl_module).__name__}: no classifier head "
                "with out_features and no num_classes attribute"
            )
        layer.channels = channels
        aux = aux_modules(pl_module)
        existing = aux[self.name] if self.name in aux else None  # noqa: SIM401 (ModuleDict has no get)
        if isinstance(existing, nn.Linear) and (existing.in_features, existing.out_features) == (channels, classes):
            return existing  # a second fit() on the same module continues with the trained head
        reference = next(pl_module.parameters(), None)
        head = nn.Linear(channels, classes)
        if reference is not None:
            head = head.to(device=reference.device)
        aux[self.name] = head
        return head

    # ------------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            # validate/test/predict with ckpt_path restore the whole state_dict, the head included:
            # it must exist. Best effort: evaluating without a checkpoint does not need it.
            existing = getattr(pl_module, AUX_ATTRIBUTE, None)
            if isinstance(existing, nn.ModuleDict) and self.name in existing:
                return
            try:
                self.build_head(trainer, pl_module)
            except (LookupError, RuntimeError, ValueError) as err:
                rank_zero_warn(
                    f"USKD could not rebuild its head for '{stage}' ({err}); a checkpoint with it may not load"
                )
            return
        super().setup(trainer, pl_module, stage)

    @override
    def on_hub_attached(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hub: LossTermHub) -> None:
        self.build_head(trainer, pl_module)
        assert self._layer is not None
        hub.ensure_tap(require_head=False).add_layer(self._layer.name)

    @override
    def loss_term(self, context: StepContext) -> Tensor:
        layer = self._layer
        if layer is None:
            raise RuntimeError("USKD.loss_term ran before setup(); attach the callback to a Trainer")
        feature = pool_feature(context.layer_output(layer.name), layer.pool, layer.prefix_tokens, layer.name)
        head = aux_modules(context.pl_module)[self.name]
        weak_logits = head(feature)
        return uskd_loss(
            context.logits,
            weak_logits,
            context.target,
            alpha=self.alpha,
            beta=self.beta,
            mu=self.mu,
            rank_by=self.rank_by,
            validate_args=self.should_validate(),  # value checks on the first step of each fit only
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        layer = self._layer
        return {
            "version": self.STATE_VERSION,
            "feature_layer": layer.name if layer else None,
            "channels": layer.channels if layer else None,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_version(state_dict, self.STATE_VERSION, "USKD")
        saved = state_dict.get("feature_layer")
        if self._layer is not None and saved is not None and saved != self._layer.name:
            rank_zero_warn(
                f"USKD resumes on layer '{self._layer.name}' but the checkpoint trained its head on '{saved}'"
            )

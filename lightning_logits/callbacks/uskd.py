"""USKD self-distillation as a Callback: a weak head on an intermediate feature, no teacher."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_logits.batch import batch_input
from lightning_logits.functional.uskd import RANK_BY, uskd_loss
from lightning_logits.loss_terms import LossTermCallback, LossTermHub, StepContext
from lightning_logits.taps import AUX_ATTRIBUTE, aux_modules, find_classifier, find_module

__all__ = ["USKD"]

_POOLS = ("flat", "nchw", "nhwc", "cls", "tokens")


@dataclass
class _Layer:
    """Where the intermediate feature comes from and how it becomes ``[N, C_mid]``."""

    name: str  # dotted path relative to the LightningModule (what the tap hooks)
    pool: str | None  # one of _POOLS, or None: decided by the output's number of dimensions
    channels: int | None  # C_mid when known without running the model
    prefix_tokens: int = 0  # tokens skipped by "tokens" pooling (class/register tokens)


def _is_aux(name: str) -> bool:
    return AUX_ATTRIBUTE in name.split(".")


def _find_timm_model(pl_module: nn.Module) -> tuple[str, nn.Module] | None:
    """The first (outermost) timm model inside ``pl_module``: it has ``feature_info`` and ``forward_features``."""
    for name, module in pl_module.named_modules():
        if _is_aux(name):
            continue
        info = getattr(module, "feature_info", None)
        if isinstance(info, list) and info and callable(getattr(module, "forward_features", None)):
            return name, module
    return None


def _is_vit(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, (nn.Sequential, nn.ModuleList)) and hasattr(model, "patch_embed")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _vit_pool(model: nn.Module) -> tuple[str, int]:
    if getattr(model, "cls_token", None) is not None:
        return "cls", 0
    return "tokens", int(getattr(model, "num_prefix_tokens", 0))


def default_feature_layer(pl_module: nn.Module) -> _Layer:
    """The intermediate layer USKD uses by default, found from timm's ``feature_info``.

    - ViT/DeiT (a timm model with ``blocks`` and ``patch_embed``): the class token after block
      ``depth // 2 - 1`` (the mean of the patch tokens when the model has no class token).
    - CNNs and Swin: the second-to-last stage of ``feature_info``, global-average pooled. When the
      model's ``num_features`` differs from the last stage's channels a head convolution follows
      the last stage (MobileNetV2, EfficientNet): then the last stage is the one before the end,
      as in the official configs (MobileNetV2: 320 channels).
    - torchvision ResNets (``layer3``/``layer4`` attributes): ``layer3``.
    """
    found = _find_timm_model(pl_module)
    if found is not None:
        prefix, model = found
        if _is_vit(model):
            depth = len(model.blocks)  # type: ignore[arg-type]
            if depth < 2:
                raise LookupError(f"{type(model).__name__} has {depth} block(s); USKD needs at least 2")
            pool, prefix_tokens = _vit_pool(model)
            channels = getattr(model, "embed_dim", None)
            return _Layer(_join(prefix, f"blocks.{depth // 2 - 1}"), pool, channels, prefix_tokens)
        info: list[dict[str, Any]] = model.feature_info  # type: ignore[assignment]
        num_features = getattr(model, "num_features", None)
        if isinstance(num_features, int) and num_features != info[-1]["num_chs"]:
            stage = info[-1]
        elif len(info) >= 2:
            stage = info[-2]
        else:
            raise LookupError(f"{type(model).__name__}'s feature_info lists one stage; pass feature_layer='...'")
        pool = "nhwc" if getattr(model, "output_fmt", "NCHW") == "NHWC" else "nchw"
        return _Layer(_join(prefix, stage["module"]), pool, int(stage["num_chs"]))
    for name, module in pl_module.named_modules():
        if not _is_aux(name) and isinstance(getattr(module, "layer3", None), nn.Module) and hasattr(module, "layer4"):
            return _Layer(_join(name, "layer3"), "nchw", None)
    children = [name for name, _ in pl_module.named_children() if not _is_aux(name)]
    raise LookupError(
        f"USKD found no default intermediate layer in {type(pl_module).__name__}: no timm model (feature_info) "
        f"and no ResNet-style layer3 inside it (its children: {children}). Pass feature_layer='<dotted path>', "
        "e.g. the module after the second-to-last stage of your network."
    )


def pool_feature(output: Any, pool: str | None, prefix_tokens: int = 0, layer: str = "the layer") -> Tensor:
    """Turn a layer's output into ``[N, C_mid]``.

    ``pool``: ``"flat"`` (already ``[N, D]``), ``"nchw"``/``"nhwc"`` (spatial mean of a feature
    map), ``"cls"`` (token 0 of ``[N, T, D]``), ``"tokens"`` (mean of the tokens after
    ``prefix_tokens``), or ``None``: 2-D as is, 3-D as tokens (mean), 4-D or more as channels-first
    feature maps. A tuple or list output uses its first element.

    Example:
        >>> import torch
        >>> pool_feature(torch.ones(2, 8, 4, 4), "nchw").shape
        torch.Size([2, 8])
        >>> pool_feature(torch.arange(12.0).reshape(1, 3, 4), "cls").tolist()
        [[0.0, 1.0, 2.0, 3.0]]
    """
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        output = output[0]
    if not isinstance(output, Tensor) or not output.is_floating_point() or output.ndim < 2:
        what = (
            f"a tensor of shape {tuple(output.shape)} and dtype {output.dtype}"
            if isinstance(output, Tensor)
            else type(output).__name__
        )
        raise ValueError(
            f"USKD cannot pool the output of '{layer}': it is {what}; name a layer that outputs a float "
            "[N, C, H, W] feature map, [N, T, D] tokens or [N, D] features (feature_layer='...')"
        )
    ndim = output.ndim
    expected = {"flat": 2, "nchw": 4, "nhwc": 4, "cls": 3, "tokens": 3}
    if pool is not None and expected[pool] != ndim:
        raise ValueError(
            f"USKD expected a {expected[pool]}-D output from '{layer}' ({pool} pooling) but got shape "
            f"{tuple(output.shape)}; pass feature_layer='...' naming a layer with a feature map or tokens"
        )
    if ndim == 2:
        return output
    if pool == "cls":
        return output[:, 0]
    if pool == "tokens" or (pool is None and ndim == 3):
        return output[:, prefix_tokens:].mean(dim=1)
    if pool == "nhwc":
        return output.mean(dim=(1, 2))
    return output.flatten(2).mean(dim=2)


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

    The intermediate layer (see :func:`default_feature_layer`): for timm CNNs the second-to-last
    stage in ``feature_info``, global-average pooled (ResNet18: ``layer3``, 256 channels); for
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

    Logged: ``train/loss_uskd``.

    Example:
        >>> callback = USKD(alpha=0.1, beta=0.1, mu=0.1)
        >>> callback.name, callback.alpha, callback.rank_by
        ('uskd', 0.1, 'log_prob')
    """

    AUX_KEY = "uskd"

    def __init__(
        self,
        feature_layer: str | None = None,
        alpha: float = 1.0,
        beta: float = 0.1,
        mu: float = 0.005,
        rank_by: str = "log_prob",
    ) -> None:
        super().__init__(name="uskd", weight=1.0)
        if rank_by not in RANK_BY:
            raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
        for name, value in (("alpha", alpha), ("beta", beta), ("mu", mu)):
            if not value >= 0.0 or value == float("inf"):
                raise ValueError(f"{name} must be a finite non-negative weight, got {value}")
        self.feature_layer = feature_layer
        self.alpha, self.beta, self.mu = float(alpha), float(beta), float(mu)
        self.rank_by = rank_by
        self._layer: _Layer | None = None

    # ------------------------------------------------------------------------------------------
    # Finding the layer and building the head

    def resolve_layer(self, pl_module: pl.LightningModule) -> _Layer:
        """The intermediate layer: ``feature_layer`` when given, else :func:`default_feature_layer`."""
        if self.feature_layer is None:
            return default_feature_layer(pl_module)
        path = self.feature_layer
        candidates = [path]
        try:
            head_name, _ = find_classifier(pl_module, getattr(pl_module, "classifier_head", None))
            if "." in head_name:
                candidates.append(_join(head_name.split(".")[0], path))
        except LookupError:
            pass
        found = _find_timm_model(pl_module)
        if found is not None and found[0]:
            candidates.append(_join(found[0], path))
        for name in dict.fromkeys(candidates):
            try:
                pl_module.get_submodule(name)
            except AttributeError:
                continue
            return self._layer_hints(name, found)
        try:
            find_module(pl_module, path)  # raises with the list of modules
        except LookupError as err:
            raise LookupError(
                f"USKD feature_layer='{path}' was not found (tried {list(dict.fromkeys(candidates))}): {err}"
            ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _layer_hints(name: str, found: tuple[str, nn.Module] | None) -> _Layer:
        # Known widths and pooling when the layer is a timm stage or ViT block; otherwise measured.
        if found is None:
            return _Layer(name, None, None)
        prefix, model = found
        if prefix and not name.startswith(prefix + "."):
            return _Layer(name, None, None)
        local = name[len(prefix) + 1 :] if prefix else name
        if _is_vit(model) and local.startswith("blocks.") and local.count(".") == 1:
            pool, prefix_tokens = _vit_pool(model)
            return _Layer(name, pool, getattr(model, "embed_dim", None), prefix_tokens)
        channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        for stage in model.feature_info:  # type: ignore[union-attr]
            if stage.get("module") == local:
                return _Layer(name, "nhwc" if channels_last else "nchw", int(stage["num_chs"]))
        return _Layer(name, "nhwc" if channels_last else None, None)

    @staticmethod
    def _num_classes(pl_module: pl.LightningModule) -> int | None:
        try:
            _, head = find_classifier(pl_module, getattr(pl_module, "classifier_head", None))
        except LookupError:
            head = None
        for attr in ("out_features", "out_channels"):
            value = getattr(head, attr, None)
            if isinstance(value, int):
                return value
        value = getattr(pl_module, "num_classes", None)
        return value if isinstance(value, int) else None

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

    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, layer: _Layer) -> tuple[int, int | None]:
        """``(C_mid, C)`` from one no-grad, eval-mode forward pass; the model is left as it was."""
        captured: list[Any] = []
        module = pl_module.get_submodule(layer.name)
        handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
        modes = {m: m.training for m in pl_module.modules()}
        # fork_rng: drawing a batch (a sampler's seed) must not shift the run's random stream.
        with torch.random.fork_rng(devices=[]):
            try:
                x = self._example_input(trainer, pl_module)
                pl_module.eval()
                with torch.no_grad():
                    out = pl_module(x)
            except Exception as err:
                raise RuntimeError(
                    f"USKD ran {type(pl_module).__name__} once to measure the width of '{layer.name}' and it "
                    f"failed: {err}. Set example_input_array on the module to an input its forward() accepts"
                ) from err
            finally:
                handle.remove()
                for m, training in modes.items():
                    m.train(training)
        if not captured:
            raise RuntimeError(f"USKD: layer '{layer.name}' did not run in {type(pl_module).__name__}.forward")
        feature = pool_feature(captured[0], layer.pool, layer.prefix_tokens, layer.name)
        classes = out.shape[1] if isinstance(out, Tensor) and out.ndim == 2 else None
        return int(feature.shape[1]), classes

    def build_head(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> nn.Linear:
        """Find the layer and put ``Linear(C_mid, C)`` under ``aux_modules(pl_module)["uskd"]`` (reused if present)."""
        layer = self.resolve_layer(pl_module)
        self._layer = layer
        channels, classes = layer.channels, self._num_classes(pl_module)
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
        existing = aux[self.AUX_KEY] if self.AUX_KEY in aux else None  # noqa: SIM401 (ModuleDict has no get)
        if isinstance(existing, nn.Linear) and (existing.in_features, existing.out_features) == (channels, classes):
            return existing  # a second fit() on the same module continues with the trained head
        reference = next(pl_module.parameters(), None)
        head = nn.Linear(channels, classes)
        if reference is not None:
            head = head.to(device=reference.device)
        aux[self.AUX_KEY] = head
        return head

    # ------------------------------------------------------------------------------------------
    # Lightning hooks

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            # validate/test/predict with ckpt_path restore the whole state_dict, the head included:
            # it must exist. Best effort: evaluating without a checkpoint does not need it.
            existing = getattr(pl_module, AUX_ATTRIBUTE, None)
            if isinstance(existing, nn.ModuleDict) and self.AUX_KEY in existing:
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
        hub.ensure_tap().add_layer(self._layer.name)

    @override
    def loss_term(self, context: StepContext) -> Tensor:
        layer = self._layer
        if layer is None:
            raise RuntimeError("USKD.loss_term ran before setup(); attach the callback to a Trainer")
        feature = pool_feature(context.layer_output(layer.name), layer.pool, layer.prefix_tokens, layer.name)
        head = aux_modules(context.pl_module)[self.AUX_KEY]
        weak_logits = head(feature)
        return uskd_loss(
            context.logits,
            weak_logits,
            context.target,
            alpha=self.alpha,
            beta=self.beta,
            mu=self.mu,
            rank_by=self.rank_by,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        layer = self._layer
        return {"feature_layer": layer.name if layer else None, "channels": layer.channels if layer else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("feature_layer")
        if self._layer is not None and saved is not None and saved != self._layer.name:
            rank_zero_warn(
                f"USKD resumes on layer '{self._layer.name}' but the checkpoint trained its head on '{saved}'"
            )

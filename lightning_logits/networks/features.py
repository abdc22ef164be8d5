"""Intermediate features of any network: which layer to read by default and how to pool it to ``[N, D]``.

Methods that attach a head to an intermediate layer (USKD's weak head) ask this module where that
layer is and how to turn its output into ``[N, D]`` features: 4-D feature maps (channels first or,
for timm models with ``output_fmt == "NHWC"``, channels last), 3-D token outputs ``[N, L, D]``
(ViT/DeiT class token, MLP-Mixer and LeViT token means) and 2-D features. It reads timm's
``feature_info``, ``blocks``/``patch_embed`` and ``num_features`` rather than guessing from module
names, and never picks a module added by this library (:func:`~lightning_logits.networks.heads.is_aux`).

Pure PyTorch, no Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_logits.networks.heads import find_classifier, find_module, is_aux

__all__ = [
    "FeatureLayer",
    "PoolMode",
    "default_feature_layer",
    "find_timm_model",
    "pool_feature",
    "probe_feature_width",
    "resolve_feature_layer",
]

PoolMode = Literal["flat", "nchw", "nhwc", "cls", "tokens"]
"""How a layer's output becomes ``[N, D]``: see :func:`pool_feature`.

Example:
    >>> import torch
    >>> tokens = torch.randn(2, 5, 8)  # [N, L, D] with a class token first
    >>> pool_feature(tokens, "cls").shape, pool_feature(tokens, "tokens", prefix_tokens=1).shape
    (torch.Size([2, 8]), torch.Size([2, 8]))
"""


@dataclass
class FeatureLayer:
    """Where the intermediate feature comes from and how it becomes ``[N, C_mid]``.

    Attributes:
        name: dotted path of the module, relative to the LightningModule (what the tap hooks).
        pool: how its output becomes ``[N, C_mid]``: ``"nchw"`` / ``"nhwc"`` (average over a 4-D
            map), ``"cls"`` / ``"tokens"`` (class token or mean of ``[N, L, D]`` tokens), ``"flat"``
            (already ``[N, D]``), or ``None`` to decide from the output's number of dimensions.
        channels: ``C_mid`` when known without running the model.
        prefix_tokens: tokens skipped by ``"tokens"`` pooling (class and register tokens).

    Example:
        >>> import timm
        >>> layer = default_feature_layer(timm.create_model("resnet18", num_classes=10))
        >>> layer.name, layer.pool, layer.channels
        ('layer3', None, 256)
    """

    name: str  # dotted path relative to the LightningModule (what the tap hooks)
    pool: PoolMode | None  # None: decided by the output's number of dimensions
    channels: int | None  # C_mid when known without running the model
    prefix_tokens: int = 0  # tokens skipped by "tokens" pooling (class/register tokens)


def find_timm_model(pl_module: nn.Module) -> tuple[str, nn.Module] | None:
    """The first (outermost) timm model inside ``pl_module``: it has ``feature_info`` and ``forward_features``.

    Returns:
        ``(dotted name, module)``, or ``None`` when no module inside is a timm model.

    Example:
        >>> import timm, torch
        >>> wrapper = torch.nn.ModuleDict({"net": timm.create_model("resnet10t", num_classes=3)})
        >>> name, model = find_timm_model(wrapper)
        >>> name, type(model).__name__, find_timm_model(torch.nn.Linear(2, 2))
        ('net', 'ResNet', None)
    """
    for name, module in pl_module.named_modules():
        if is_aux(name):
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


def _vit_pool(model: nn.Module) -> tuple[PoolMode, int]:
    if getattr(model, "cls_token", None) is not None:
        return "cls", 0
    return "tokens", int(getattr(model, "num_prefix_tokens", 0))


def default_feature_layer(pl_module: nn.Module) -> FeatureLayer:
    """The default intermediate feature layer of a network (USKD's weak head reads it).

    - ViT/DeiT (a timm model with ``blocks`` and ``patch_embed``): the class token after block
      ``depth // 2 - 1`` (the mean of the patch tokens when the model has no class token).
    - CNNs and Swin: the second-to-last stage of ``feature_info``, global-average pooled. When the
      model's ``num_features`` differs from the last stage's channels a head convolution follows
      the last stage (MobileNetV2, EfficientNet): then the last stage is the one before the end,
      as in the official configs (MobileNetV2: 320 channels).
    - torchvision ResNets (``layer3``/``layer4`` attributes): ``layer3``.

    Args:
        pl_module: the LightningModule or the network (the path is relative to it).

    Returns:
        A :class:`FeatureLayer`: where to hook and how to pool the output to ``[N, C_mid]``.

    Example:
        >>> import timm
        >>> vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, num_classes=10)
        >>> layer = default_feature_layer(vit)
        >>> layer.name, layer.pool, layer.channels
        ('blocks.1', 'cls', 192)
    """
    found = find_timm_model(pl_module)
    if found is not None:
        prefix, model = found
        if _is_vit(model):
            depth = len(model.blocks)  # type: ignore[arg-type]
            if depth < 2:
                raise LookupError(
                    f"{type(model).__name__} has {depth} block(s); an intermediate block needs at least 2"
                )
            pool, prefix_tokens = _vit_pool(model)
            channels = getattr(model, "embed_dim", None)
            return FeatureLayer(_join(prefix, f"blocks.{depth // 2 - 1}"), pool, channels, prefix_tokens)
        info: list[dict[str, Any]] = model.feature_info  # type: ignore[assignment]
        num_features = getattr(model, "num_features", None)
        if isinstance(num_features, int) and num_features != info[-1]["num_chs"]:
            stage = info[-1]
        elif len(info) >= 2:
            stage = info[-2]
        else:
            raise LookupError(f"{type(model).__name__}'s feature_info lists one stage; pass feature_layer='...'")
        # None: decided by the output's rank (4-D maps, [N, L, D] tokens of MLP-Mixer/LeViT, 2-D).
        stage_pool: PoolMode | None = "nhwc" if getattr(model, "output_fmt", "NCHW") == "NHWC" else None
        return FeatureLayer(_join(prefix, stage["module"]), stage_pool, int(stage["num_chs"]))
    for name, module in pl_module.named_modules():
        if not is_aux(name) and isinstance(getattr(module, "layer3", None), nn.Module) and hasattr(module, "layer4"):
            return FeatureLayer(_join(name, "layer3"), "nchw", None)
    children = [name for name, _ in pl_module.named_children() if not is_aux(name)]
    raise LookupError(
        f"found no default intermediate feature layer in {type(pl_module).__name__}: no timm model (feature_info) "
        f"and no ResNet-style layer3 inside it (its children: {children}). Pass feature_layer='<dotted path>', "
        "e.g. the module after the second-to-last stage of your network."
    )


def pool_feature(output: Any, pool: PoolMode | None, prefix_tokens: int = 0, layer: str = "the layer") -> Tensor:
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
            f"cannot pool the output of '{layer}': it is {what}; name a layer that outputs a float "
            "[N, C, H, W] feature map, [N, T, D] tokens or [N, D] features (feature_layer='...')"
        )
    ndim = output.ndim
    expected = {"flat": 2, "nchw": 4, "nhwc": 4, "cls": 3, "tokens": 3}
    if pool is not None and expected[pool] != ndim:
        raise ValueError(
            f"expected a {expected[pool]}-D output from '{layer}' ({pool} pooling) but got shape "
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


def resolve_feature_layer(model: nn.Module, feature_layer: str | None = None, head: str | None = None) -> FeatureLayer:
    """The feature layer named ``feature_layer`` (or the default one) with its pooling and width when known.

    ``feature_layer`` is a dotted path looked up relative to ``model`` first (``"model.layer2"`` in
    a :class:`~lightning_logits.modules.Classifier`), then relative to the network that holds the
    classifier head, then relative to the outermost timm model inside ``model`` (``"layer2"``).

    Example:
        >>> import timm
        >>> net = timm.create_model("resnet10t", num_classes=10)
        >>> layer = resolve_feature_layer(net)
        >>> layer.name, layer.channels
        ('layer3', 256)
    """
    if feature_layer is None:
        return default_feature_layer(model)
    path = feature_layer
    candidates = [path]
    try:
        head_name, _ = find_classifier(model, head)
        if "." in head_name:
            candidates.append(_join(head_name.split(".")[0], path))
    except LookupError:
        pass
    found = find_timm_model(model)
    if found is not None and found[0]:
        candidates.append(_join(found[0], path))
    for name in dict.fromkeys(candidates):
        try:
            model.get_submodule(name)
        except AttributeError:
            continue
        return _layer_hints(name, found)
    try:
        find_module(model, path)  # raises with the list of modules
    except LookupError as err:
        raise LookupError(
            f"feature_layer='{path}' was not found (tried {list(dict.fromkeys(candidates))}): {err}"
        ) from None
    raise AssertionError("unreachable")  # pragma: no cover


def _layer_hints(name: str, found: tuple[str, nn.Module] | None) -> FeatureLayer:
    # Known widths and pooling when the layer is a timm stage or ViT block; otherwise measured.
    if found is None:
        return FeatureLayer(name, None, None)
    prefix, model = found
    if prefix and not name.startswith(prefix + "."):
        return FeatureLayer(name, None, None)
    local = name[len(prefix) + 1 :] if prefix else name
    if _is_vit(model) and local.startswith("blocks.") and local.count(".") == 1:
        pool, prefix_tokens = _vit_pool(model)
        return FeatureLayer(name, pool, getattr(model, "embed_dim", None), prefix_tokens)
    channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
    for stage in model.feature_info:  # type: ignore[union-attr]
        if stage.get("module") == local:
            return FeatureLayer(name, "nhwc" if channels_last else None, int(stage["num_chs"]))
    return FeatureLayer(name, "nhwc" if channels_last else None, None)


def probe_feature_width(model: nn.Module, layer: FeatureLayer, example_input: Any) -> tuple[int, int | None]:
    """``(D, C)``: the pooled width of ``layer`` and the model's output width, from one forward pass.

    The pass runs under ``no_grad`` in eval mode, inside ``torch.random.fork_rng``; train/eval
    modes, BatchNorm statistics and the global random stream are left as they were.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
        >>> probe_feature_width(net, FeatureLayer("0", None, None), torch.randn(2, 1, 5, 5))
        (4, 3)
    """
    captured: list[Any] = []
    module = model.get_submodule(layer.name)
    handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
    modes = {m: m.training for m in model.modules()}
    with torch.random.fork_rng(devices=[]):
        try:
            model.eval()
            with torch.no_grad():
                out = model(example_input)
        finally:
            handle.remove()
            for m, training in modes.items():
                m.train(training)
    if not captured:
        raise RuntimeError(f"layer '{layer.name}' did not run in {type(model).__name__}.forward")
    feature = pool_feature(captured[0], layer.pool, layer.prefix_tokens, layer.name)
    classes = out.shape[-1] if isinstance(out, Tensor) and out.ndim >= 2 else None
    return int(feature.shape[1]), classes

"""Shard a network with FSDP2 (``torch.distributed.fsdp.fully_shard``), block by block, root last.

Pure PyTorch. Lightning's ``ModelParallelStrategy`` asks the LightningModule to apply parallelism in
its ``configure_model`` hook; :class:`~lightning_logits.modules.Classifier` does it with
:func:`shard_model`, and a user's own LightningModule gets the same with one call::

    def configure_model(self):
        if self.device_mesh is not None:  # only under ModelParallelStrategy
            shard_model(self, fsdp_mesh(self.device_mesh))

**Blocks.** Each block becomes its own FSDP unit, so only one block's full parameters exist at a time
(all-gathered for its forward, freed after it): the memory saving of FSDP comes from this. The blocks
found by ``blocks="auto"`` (:func:`find_blocks`) are, in this order of preference:

- the children of the containers that timm, torchvision and Hugging Face models keep their repeated
  blocks in: ``blocks`` (ViT, MLP-Mixer, ConvNeXt stages' inner blocks), ``stages``, ``layers``
  (Swin, Llama's ``model.layers``), ``layer1``..``layer4`` (ResNet), ``h`` (GPT-2), ``encoder.layer``;
- ``nn.TransformerEncoderLayer`` / ``nn.TransformerDecoderLayer`` instances anywhere;
- for an ``nn.Sequential`` (a user's stack of layers), its children that hold parameters.

Then every direct child of ``module`` that still holds parameters (``model``, the auxiliary heads
under ``lightning_logits_aux``) is sharded as a unit (the "root" of its blocks), and ``module`` itself
last when it holds parameters of its own. A LightningModule is therefore never turned into an FSDP
module unless it owns parameters directly.

**Which mesh.** :func:`fsdp_mesh` picks the mesh FSDP shards over from Lightning's 2-D
``("data_parallel", "tensor_parallel")`` mesh; we apply no tensor-parallel plan.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["find_blocks", "fsdp_mesh", "is_sharded", "reshard", "shard_model", "sharded_bytes"]

# Containers of repeated blocks in timm, torchvision and Hugging Face models, by attribute name.
_BLOCK_CONTAINERS = ("blocks", "stages", "layers", "layer1", "layer2", "layer3", "layer4", "h", "layer")
_TRANSFORMER_LAYERS: tuple[type[nn.Module], ...] = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)

ShardingChoice = Literal["auto", "model", "off"]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was already applied to ``module`` (it is an FSDP2 module).

    Example:
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def reshard(module: nn.Module) -> int:
    """Free the gathered parameters of every FSDP2 unit in ``module`` (after an evaluation pass).

    A unit that keeps its gathered parameters until the backward (FSDP2's rule for the root) keeps
    them after a forward that has no backward (validation, test, predict); this frees them.
    Returns the number of units resharded (``0`` for a network that is not sharded).

    Example:
        >>> reshard(torch.nn.Linear(2, 2))
        0
    """
    units = [m for m in module.modules() if is_sharded(m)]
    for unit in units:
        unit.reshard()  # type: ignore[operator]
    return len(units)


def _owns_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def find_blocks(model: nn.Module, blocks: str | Sequence[str] = "auto") -> list[str]:
    """Dotted names of the modules of ``model`` to shard as separate FSDP units, outermost first.

    Args:
        model: any ``nn.Module`` (a timm/torchvision/Hugging Face model, a LightningModule, ...).
        blocks: ``"auto"`` (see the module docstring for the rule), or dotted names / ``fnmatch``
            patterns of the modules to shard (``["model.blocks.*"]``).

    Returns:
        The names, with no name inside another one that is listed (the outer one wins). Modules
        without parameters are left out. An explicit pattern that matches nothing raises ``ValueError``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> find_blocks(net)
        ['0', '2']
    """
    named = dict(model.named_modules())
    if isinstance(blocks, str) and blocks == "auto":
        found = _auto_blocks(model)
    else:
        patterns = [blocks] if isinstance(blocks, str) else list(blocks)
        found = []
        for pattern in patterns:
            matched = [n for n in named if n and fnmatch.fnmatchcase(n, pattern)]
            if not matched:
                sample = ", ".join([n for n in named if n][:15])
                raise ValueError(
                    f"sharding pattern {pattern!r} matches no module of {type(model).__name__} (modules: "
                    f"{sample} ...): pass dotted module names or fnmatch patterns, or 'auto'"
                )
            found.extend(matched)
    kept: list[str] = []
    for name in dict.fromkeys(found):  # ordered, unique
        if not _owns_parameters(named[name]):
            continue
        if any(name.startswith(outer + ".") for outer in kept):
            continue
        kept = [k for k in kept if not k.startswith(name + ".")] + [name]
    return kept


def _auto_blocks(model: nn.Module) -> list[str]:
    found: list[str] = []
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in _BLOCK_CONTAINERS and isinstance(module, nn.ModuleList | nn.Sequential):
            found.extend(f"{name}.{child}" for child, _ in module.named_children())
        elif isinstance(module, _TRANSFORMER_LAYERS):
            found.append(name)
    if found:
        return found
    # A user's stack of layers: its children. (A LightningModule's ``model`` child counts too.)
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and _owns_parameters(module):
            return [f"{name}.{child}" if name else child for child, _ in module.named_children()]
    return []


def fsdp_mesh(device_mesh: Any) -> Any:
    """The mesh to shard over, from Lightning ``ModelParallelStrategy``'s ``(data_parallel, tensor_parallel)`` mesh.

    We apply FSDP2 only (no tensor-parallel plan), so:

    - ``tensor_parallel`` of size 1: shard over ``data_parallel`` (plain FSDP, the data is split);
    - ``data_parallel`` of size 1 (``ModelParallelStrategy()``'s default on one node): shard over
      ``tensor_parallel``; every rank then sees the same batches (Lightning's sampler splits the data
      over ``data_parallel`` only), so the result equals one process's and only memory is saved;
    - both larger than 1: the 2-D mesh itself (HSDP: replicated over ``data_parallel``, sharded over
      ``tensor_parallel``).

    A 1-D mesh is returned as is.

    Example:
        >>> fsdp_mesh(None) is None  # no mesh: not under ModelParallelStrategy
        True
    """
    if device_mesh is None or device_mesh.ndim == 1:
        return device_mesh
    names = device_mesh.mesh_dim_names or ()
    if names != ("data_parallel", "tensor_parallel"):
        raise ValueError(
            f"expected Lightning's ('data_parallel', 'tensor_parallel') device mesh, got dimensions {names}: pass "
            "the 1-D mesh to shard over"
        )
    data, tensor = device_mesh["data_parallel"], device_mesh["tensor_parallel"]
    if tensor.size() == 1:
        return data
    if data.size() == 1:
        return tensor
    return device_mesh


def shard_model(
    module: nn.Module,
    mesh: Any,
    *,
    blocks: ShardingChoice | Sequence[str] = "auto",
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool | None = None,
    activation_checkpointing: bool = False,
    requires_grad: bool = True,
    shard_root: bool = False,
) -> list[str]:
    """Apply FSDP2 ``fully_shard`` to ``module`` in place: blocks first, then each parameter-holding child.

    Args:
        module: the network, or a LightningModule (its children are sharded, not the module itself
            unless it holds parameters directly).
        mesh: the 1-D (FSDP) or 2-D (HSDP) ``DeviceMesh`` to shard over; see :func:`fsdp_mesh`.
        blocks: ``"auto"`` (:func:`find_blocks`), dotted names / patterns, ``"model"`` (no blocks: each
            child of ``module`` is one unit) or ``"off"`` (nothing is sharded; returns ``[]``).
        param_dtype: dtype of the all-gathered parameters for compute (``torch.bfloat16`` for bf16
            mixed precision); ``None`` keeps the parameters' dtype. The sharded parameters, gradients
            and optimizer state stay in their own (float32) dtype.
        reduce_dtype: dtype of the gradient reduction (``torch.float32`` with bf16 parameters).
        reshard_after_forward: free each block's full parameters after its forward (all-gathered again
            in the backward); ``False`` keeps them until the backward (more memory, less communication).
            ``None`` (default) is ``True``. The units that are not blocks (the rest of the model, the
            auxiliary heads) follow FSDP2's root rule and keep their gathered parameters until the
            backward, so the classifier head's weight is whole after the forward; a frozen network
            (``requires_grad=False``) frees every unit's right after its forward.
        activation_checkpointing: recompute each block's activations in the backward instead of
            keeping them (``torch.utils.checkpoint`` per block).
        requires_grad: ``False`` for a frozen network (a teacher): its parameters get no gradient.
        shard_root: also make ``module`` itself an FSDP unit (the root of a plain network run on its
            own, such as a teacher); ``False`` (default) shards it only when it holds parameters directly.

    Returns:
        The dotted names of the FSDP units, in the order they were sharded (``""`` is ``module``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> shard_model(net, None, blocks="off")  # shards nothing: 'off' (or no mesh) is a no-op
        []
    """
    if isinstance(blocks, str) and blocks == "off":
        return []
    if mesh is None:
        raise ValueError(
            "shard_model needs the device mesh to shard over: under Lightning's ModelParallelStrategy pass "
            "fsdp_mesh(self.device_mesh) from configure_model, or blocks='off'"
        )
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not requires_grad:
        module.requires_grad_(False)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    block_options: dict[str, Any] = dict(
        mesh=mesh,
        mp_policy=policy,
        reshard_after_forward=True if reshard_after_forward is None else reshard_after_forward,
    )
    # The other units follow FSDP's root rule (keep the gathered weights from the forward to the backward),
    # which also lets a callback read the classifier head's whole weight after the forward (UER). A frozen
    # network has no backward to wait for: it frees them at once.
    options: dict[str, Any] = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=None if requires_grad else True)
    named = dict(module.named_modules())
    units = [] if isinstance(blocks, str) and blocks == "model" else find_blocks(module, blocks)
    sharded: list[str] = []
    for name in units:
        block = named[name]
        if is_sharded(block):
            continue
        if activation_checkpointing:
            from torch.distributed._composable import checkpoint

            checkpoint(block)
        fully_shard(block, **block_options)
        sharded.append(name)
    for name, child in module.named_children():
        # A container without forward (the auxiliary heads' ModuleDict) cannot be a unit: its members are.
        members = (
            [(f"{name}.{n}", c) for n, c in child.named_children()]
            if isinstance(child, nn.ModuleDict | nn.ModuleList)
            else [(name, child)]
        )
        for member_name, member in members:
            if not is_sharded(member) and _owns_parameters(member):
                fully_shard(member, **options)
                sharded.append(member_name)
    if (shard_root or any(p is not None for p in module._parameters.values())) and not is_sharded(module):
        fully_shard(module, **options)
        sharded.append("")
    return sharded


def sharded_bytes(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank holds for ``module``'s parameters, gradients and ``optimizer``'s state.

    Counted from the local shards (``DTensor.to_local()``) of sharded tensors, so for an FSDP2 model
    it is this rank's share; for a replicated model the whole size.

    Returns:
        ``{"parameters": ..., "gradients": ..., "optimizer": ..., "total": ...}``.

    Example:
        >>> sharded_bytes(torch.nn.Linear(3, 2))["parameters"]  # (3 * 2 + 2) float32
        32
    """

    def local_bytes(tensor: torch.Tensor) -> int:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        return local.numel() * local.element_size()

    params = list(module.parameters())
    counts = {
        "parameters": sum(local_bytes(p) for p in params),
        "gradients": sum(local_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": 0,
    }
    if optimizer is not None:
        owned = {id(p) for p in params}
        for param, state in optimizer.state.items():
            if id(param) in owned:
                counts["optimizer"] += sum(local_bytes(v) for v in state.values() if isinstance(v, torch.Tensor))
    counts["total"] = counts["parameters"] + counts["gradients"] + counts["optimizer"]
    return counts

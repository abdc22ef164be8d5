"""Read inputs, targets and sample indices out of a batch, whatever its container.

Batches in this library are ``(input, target)`` or ``(input, target, index)`` tuples, or mappings
with the keys ``"input"``, ``"target"`` and optionally ``"index"``. A user's LightningModule with
another layout can define ``batch_input(batch)`` / ``batch_target(batch)`` methods; the callbacks
call those first.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor

_INPUT_KEYS = ("input", "inputs", "x", "image", "images")
_TARGET_KEYS = ("target", "targets", "y", "label", "labels")
_INDEX_KEYS = ("index", "indices", "idx")
_PLAIN_SEQUENCES = (list, tuple)


def _from_mapping(batch: Mapping[str, Any], keys: Sequence[str], what: str) -> Any:
    for key in keys:
        if key in batch:
            return batch[key]
    raise KeyError(
        f"the batch is a mapping with keys {sorted(batch)} but none holds the {what}; use one of {list(keys)}"
    )


def batch_input(batch: Any) -> Tensor:
    """The model input of a batch: element 0 of a tuple, or ``batch["input"]``."""
    if type(batch) in _PLAIN_SEQUENCES and batch:  # the default collate's list: no ABC checks
        return batch[0]
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        return _from_mapping(batch, _INPUT_KEYS, "input")
    if isinstance(batch, Sequence) and len(batch) >= 1:
        return batch[0]
    if hasattr(batch, "x"):  # torch_geometric Data
        return batch.x
    raise TypeError(
        f"cannot find the input in a batch of type {type(batch).__name__}; yield (input, target) "
        "tuples or {'input': ..., 'target': ...} dicts, or define batch_input(batch) on your module"
    )


def batch_target(batch: Any) -> Tensor:
    """The target of a batch: element 1 of a tuple, or ``batch["target"]``."""
    if type(batch) in _PLAIN_SEQUENCES and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        return _from_mapping(batch, _TARGET_KEYS, "target")
    if isinstance(batch, Sequence) and not isinstance(batch, Tensor) and len(batch) >= 2:
        return batch[1]
    if hasattr(batch, "y"):  # torch_geometric Data
        return batch.y
    raise TypeError(
        f"cannot find the target in a batch of type {type(batch).__name__}; yield (input, target) "
        "tuples or {'input': ..., 'target': ...} dicts, or define batch_target(batch) on your module"
    )


def batch_index(batch: Any) -> Tensor | None:
    """Per-sample data set indices (element 2 of a tuple, or ``batch["index"]``), or ``None``."""
    if isinstance(batch, Mapping):
        for key in _INDEX_KEYS:
            if key in batch:
                return batch[key]
        return None
    if isinstance(batch, Sequence) and not isinstance(batch, Tensor) and len(batch) >= 3:
        return batch[2]
    return None


def module_reader(module: Any, name: str) -> Callable[[Any], Any] | None:
    """The module's own ``batch_input``/``batch_target`` (``name``) when it defines one, else ``None``.

    Looked up on the instance's ``__dict__`` and its class: a plain ``getattr`` of a missing name
    on an ``nn.Module`` goes through its ``__getattr__`` and an exception (microseconds, on every step).

    Example:
        >>> import torch
        >>> class Custom(torch.nn.Module):
        ...     def batch_input(self, batch):
        ...         return batch["pixels"]
        >>> module_reader(Custom(), "batch_input") is not None, module_reader(Custom(), "batch_target")
        (True, None)
    """
    value = getattr(module, "__dict__", {}).get(name)
    if value is None:
        if getattr(type(module), name, None) is None:
            return None
        value = getattr(module, name)
    return value if callable(value) else None

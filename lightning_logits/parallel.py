"""What our callbacks and modules need to know about Lightning's strategies (which one runs, its mesh).

Lightning does the distributed work; this module reads the strategy, so that every method
answers "am I sharded, and over which mesh?" the same way, and ends a finished run's process
group where Lightning does not (gloo).
"""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_logits.networks.sharding import fsdp_mesh

__all__ = ["end_process_group", "is_model_parallel", "sharding_mesh"]

_warned_replicated_data = False


def end_process_group() -> None:
    """End this process's process group, on every rank together; call it once the run is over (or in ``finally``).

    Lightning ends the group at exit for NCCL only. A gloo group left alive until the interpreter
    exits, or closed by one rank while another still talks to it, sometimes aborts a process after
    a good run ("terminate called without an active exception", SIGABRT). So: a barrier, then
    ``destroy_process_group``. While an exception is propagating (a call from ``finally``) the
    barrier is skipped: another rank may be stuck, and nobody waits for it. Does nothing without
    a process group.

    Example:
        >>> end_process_group()  # no process group in this process: nothing to end
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if sys.exc_info()[0] is None:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def is_model_parallel(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` runs Lightning's ``ModelParallelStrategy`` (FSDP2 / tensor parallel).

    Example:
        >>> import lightning.pytorch as pl
        >>> is_model_parallel(pl.Trainer(accelerator="cpu", devices=1, logger=False))
        False
    """
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(trainer.strategy, ModelParallelStrategy)


def sharding_mesh(pl_module: pl.LightningModule) -> Any:
    """The mesh FSDP2 shards ``pl_module`` over, or ``None`` when not under ``ModelParallelStrategy``.

    See :func:`~lightning_logits.networks.sharding.fsdp_mesh`. Warns once when the strategy's data
    parallel size is 1 while several ranks run (``ModelParallelStrategy()``'s default on one node):
    every rank then trains on the same batches.

    Example:
        >>> import torch
        >>> from lightning_logits.modules import Classifier
        >>> sharding_mesh(Classifier(torch.nn.Linear(4, 3), num_classes=3)) is None  # not under ModelParallelStrategy
        True
    """
    global _warned_replicated_data
    mesh = pl_module.device_mesh
    if mesh is None:
        return None
    chosen = fsdp_mesh(mesh)
    if mesh.ndim == 2 and mesh["tensor_parallel"].size() > 1 and not _warned_replicated_data:
        _warned_replicated_data = True
        rank_zero_warn(
            f"ModelParallelStrategy with tensor_parallel_size={mesh['tensor_parallel'].size()} and "
            f"data_parallel_size={mesh['data_parallel'].size()}: lightning_logits applies FSDP2 and no "
            "tensor-parallel plan, so the model is sharded over the tensor-parallel ranks too, but Lightning gives "
            "those ranks the same batches (only memory is saved). To split the data over every rank, pass "
            "ModelParallelStrategy(data_parallel_size=<world size>, tensor_parallel_size=1)"
        )
    return chosen

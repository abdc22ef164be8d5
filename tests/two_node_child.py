"""One node of a simulated 2-node job (run by tests/test_multinode.py, once with NODE_RANK=0 and once with 1).

``python tests/two_node_child.py PART OUT --devices 1 --num-nodes 2`` (as
:func:`tests.parallel.launch` starts it): PART is ``ddp`` or ``model_parallel`` (a short fit of
``Classifier`` on a class-incremental digits stream with ``LogitDiagnostics`` and
``ContinualMetrics``, a CSV logger, then a teacher-logit cache built by both nodes through the
running process group), or ``cache_cli`` (``lightning-logits-cache --devices 1 --num-nodes 2``).

Every path under OUT that this process opens for writing, renames to or removes (``sys.addaudithook``),
or saves with ``torch.save`` (which opens its file in C++, unseen by the hook) is recorded into
``OUT/writes_node<NODE_RANK>.json``, for the test to check who wrote what.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any


def _record_writes(root: Path, record: Path) -> None:
    """Record into ``record`` (at exit) every path under ``root`` opened for writing, renamed to or removed."""
    seen: set[str] = set()
    prefix = str(root.resolve())

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            )
        elif event in ("os.rename", "os.replace"):
            path, writing = args[1], True
        elif event == "os.remove":
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, str | bytes | os.PathLike) and not isinstance(path, int):
            full = os.path.abspath(os.fsdecode(path))
            if full.startswith(prefix):
                seen.add(os.path.relpath(full, prefix))

    sys.addaudithook(hook)
    import torch

    # torch.save opens its file in C++, where no audit event is raised: record its target here
    original_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, str | os.PathLike):
            hook("open", (os.fspath(f), "wb", 0))
        original_save(obj, f, *args, **kwargs)

    torch.save = save
    import atexit

    atexit.register(lambda: record.write_text(json.dumps(sorted(seen))))


def _fit_and_cache(part: str, out: Path) -> None:
    import torch
    from lightning.pytorch import Trainer
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader

    from lightning_logits.callbacks import LogitDiagnostics
    from lightning_logits.callbacks.replay_metrics import ContinualMetrics
    from lightning_logits.data import ClassIncrementalStream, DigitsDataModule
    from lightning_logits.modules import Classifier
    from lightning_logits.teacher_cache import build_teacher_cache
    from tests.helpers import TinyMLP

    torch.manual_seed(0)
    # Classifier.configure_model shards it under ModelParallelStrategy (data_parallel_size = 2 nodes)
    module = Classifier(TinyMLP(in_features=64, num_classes=10, hidden=16), num_classes=10)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        num_nodes=2,
        strategy=ModelParallelStrategy() if part == "model_parallel" else "ddp",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=2,
        reload_dataloaders_every_n_epochs=1,
        num_sanity_val_steps=0,
        logger=CSVLogger(str(out / "logs")),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[
            LogitDiagnostics(scores=("msp", "energy"), stages=("validate",), fit_on="eval", max_batches=2),
            ContinualMetrics(out_dir=str(out / "continual")),
        ],
    )
    trainer.fit(module, datamodule=ClassIncrementalStream("digits", num_tasks=2, batch_size=16, flatten=True))

    # The trainer's process group is still up: both nodes build one cache through it.
    digits = DigitsDataModule(return_index=True, train_fraction=0.2)
    digits.setup("fit")
    loader = DataLoader(digits.dataset("train"), batch_size=64)
    torch.manual_seed(1)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    build_teacher_cache(teacher, loader, out / "cache", k=3, source="linear")


def main() -> None:
    part, out = sys.argv[1], Path(sys.argv[2])
    if sys.argv[3:] != ["--devices", "1", "--num-nodes", "2"]:
        raise SystemExit(f"two_node_child runs as 2 nodes of 1 process, got {sys.argv[3:]}")
    node = int(os.environ["NODE_RANK"])
    _record_writes(out, out / f"writes_node{node}.json")
    if part == "cache_cli":
        from lightning_logits.cli import cache_main

        teacher = ["--teacher", "resnet10t", "--num-classes", "10", "--model-kwargs", '{"in_chans": 1}']
        data = ["--data-args", '{"train_fraction": 0.2}', "--k", "3", "--batch-size", "64"]
        nodes = ["--devices", "1", "--num-nodes", "2", "--device", "cpu"]
        cache_main([*teacher, *data, "--out", str(out / "cache"), *nodes])
        return
    _fit_and_cache(part, out)
    from lightning_logits.parallel import end_process_group

    # without it both processes abort at exit ("terminate called without an active exception"); the
    # barrier first, so that neither node tears down gloo while the other still has traffic in flight
    # (once in a full-suite run, node 1 of the ModelParallelStrategy case aborted at exit without it)
    end_process_group()


if __name__ == "__main__":
    main()

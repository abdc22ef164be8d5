"""Every command-line entry point: ``lightning-logits`` (Lightning's CLI) and ``lightning-logits-cache``.

``lightning-logits fit --config recipes/quickstart.yaml`` trains; ``--print_config`` shows the
full configuration; dotted overrides such as ``--trainer.max_epochs 3`` change one value, and a
method's parameters are reached through its own section: ``--uskd.alpha 0.2``.
Any LightningModule / LightningDataModule can be named by ``class_path``, ours or the user's.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import lightning_logits.callbacks
import lightning_logits.data
import lightning_logits.modules  # noqa: F401
from lightning_logits.callbacks import LAWN, USKD, LogitDiagnostics, ReplayCallback, TeacherDistillation
from lightning_logits.networks.factory import load_teacher
from lightning_logits.teacher_cache import build_teacher_cache

METHOD_SECTIONS: dict[str, type[Callback]] = {
    "distillation": TeacherDistillation,
    "uskd": USKD,
    "lawn": LAWN,
    "replay": ReplayCallback,
    "diagnostics": LogitDiagnostics,
}
"""Top-level config sections, one per method key, each holding one callback of that method.

A method in its own section has every parameter reachable with one flag,
``--<key>.<parameter> VALUE`` (e.g. ``--uskd.alpha 0.2``, ``--replay.buffer_size 500``,
``--lawn.free_epochs 2``), which ``--trainer.callbacks.<parameter>`` cannot offer: that flag
reaches only the last callback of the list. Recipes put their method callback here; other
callbacks (checkpoints, metrics, a second method of the same kind) stay in ``trainer.callbacks``.
"""


class LogitsCLI(LightningCLI):
    """Lightning's CLI with one optional config section per method key (:data:`METHOD_SECTIONS`)."""

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for key, callback_class in METHOD_SECTIONS.items():
            parser.add_lightning_class_args(callback_class, key, subclass_mode=True, required=False)

    @override
    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # Absent method sections are None: only the sections a config fills become callbacks.
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])


def build_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """The configured CLI (:class:`LogitsCLI`); ``args`` defaults to ``sys.argv[1:]``."""
    return LogitsCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-logits`` console script."""
    build_cli(args)


def _import(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"'{dotted}' is not a dotted class path such as lightning_logits.data.DigitsDataModule")
    return getattr(importlib.import_module(module_name), attr)


def cache_main(argv: list[str] | None = None) -> None:
    """The ``lightning-logits-cache`` command: build a cache from a teacher and a DataModule.

    The DataModule is built with ``return_index=True`` and the chosen split is read in order,
    without shuffling or dropping samples. Its arguments must match the student run's (same
    seed and fractions), so that index ``i`` names the same sample in both.
    """
    parser = argparse.ArgumentParser(
        prog="lightning-logits-cache",
        description="Run a teacher once over a data split and store its top-k logits by sample index.",
    )
    parser.add_argument(
        "--teacher", required=True, help="Classifier checkpoint (.ckpt), timm name or torchvision/<name>"
    )
    parser.add_argument("--checkpoint", help="weights for a teacher given by name (state_dict or Lightning ckpt)")
    parser.add_argument("--num-classes", type=int, help="classes of a teacher given by name")
    parser.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"in_chans\": 1}'")
    parser.add_argument("--data", default="lightning_logits.data.DigitsDataModule", help="DataModule class path")
    parser.add_argument(
        "--data-args", default="{}", help="JSON init args of the DataModule, e.g. '{\"image_size\": 32}'"
    )
    parser.add_argument("--split", default="train", help="split to cache (the DataModule's dataset(split))")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=10, help="logits kept per sample (default 10)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, help="cache directory to write")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    data_args = json.loads(args.data_args)
    datamodule = _import(args.data)(**{**data_args, "return_index": True})
    datamodule.setup("fit")
    if hasattr(datamodule, "dataset"):
        dataset = datamodule.dataset(args.split)
        loader: Iterable[Any] = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    else:
        loader = getattr(datamodule, f"{args.split}_dataloader")()
    teacher = load_teacher(args.teacher, args.checkpoint, args.num_classes, json.loads(args.model_kwargs))
    data = {"class_path": args.data, "init_args": data_args, "split": args.split}
    cache = build_teacher_cache(
        teacher,
        loader,
        args.out,
        k=args.k,
        device=args.device,
        source=args.teacher,
        overwrite=args.overwrite,
        data=data,
        teacher_args={
            "checkpoint": args.checkpoint,
            "num_classes": args.num_classes,
            "model_kwargs": json.loads(args.model_kwargs),
        },
    )
    print(f"wrote top-{cache.k} logits of {cache.num_samples} samples ({cache.num_classes} classes) to {cache.path}")


if __name__ == "__main__":
    main()


def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """Turn a sharded checkpoint folder (``ModelParallelStrategy``) into one ``.ckpt`` file.

    The folder holds each rank's shards (``*.distcp``, written by ``torch.distributed.checkpoint``) and
    ``meta.pt`` (the loops', callbacks' and hyperparameters' state). The file gets the whole weights
    under ``state_dict`` and everything in ``meta.pt``, so :meth:`Classifier.load_from_checkpoint`
    and ``TeacherDistillation(teacher="<file>")`` accept it. The optimizer states are left out: they
    are keyed by parameter name, not in the layout a single-device resume reads; resume a sharded run
    from the folder itself (``ckpt_path="<folder>"``). Runs in one process, without a process group.

    Command line: ``lightning-logits-consolidate <folder> <output.ckpt>``.

    Example:
        >>> consolidate_checkpoint("no/such/folder", "out.ckpt")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: no sharded checkpoint at 'no/such/folder' (a folder with meta.pt and *.distcp files, ...
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder, output = Path(folder), Path(output)
    if not (folder.is_dir() and (folder / "meta.pt").is_file() and any(folder.glob("*.distcp"))):
        raise FileNotFoundError(
            f"no sharded checkpoint at '{folder}' (a folder with meta.pt and *.distcp files, as "
            "ModelParallelStrategy writes)"
        )
    shards: dict[str, Any] = {}
    _load_state_dict(
        shards, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True
    )
    checkpoint: dict[str, Any] = torch.load(folder / "meta.pt", map_location="cpu", weights_only=False)
    checkpoint["state_dict"] = shards["state_dict"]
    checkpoint.pop("optimizer_states", None)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, output)
    return output


def consolidate_main(argv: list[str] | None = None) -> None:
    """``lightning-logits-consolidate FOLDER OUTPUT``: one file from a sharded checkpoint folder."""
    parser = argparse.ArgumentParser(
        prog="lightning-logits-consolidate",
        description="Turn a sharded checkpoint folder (ModelParallelStrategy) into one .ckpt file that "
        "Classifier.load_from_checkpoint and TeacherDistillation(teacher=...) accept.",
    )
    parser.add_argument("folder", help="the checkpoint folder (e.g. runs/x/checkpoints/last.ckpt)")
    parser.add_argument("output", help="the file to write (e.g. runs/x/last-consolidated.ckpt)")
    args = parser.parse_args(argv)
    path = consolidate_checkpoint(args.folder, args.output)
    print(f"wrote {path}")  # the command's output, not library logging

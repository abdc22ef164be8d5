"""Every command-line entry point: ``lightning-logits`` (Lightning's CLI) and ``lightning-logits-cache``.

``lightning-logits fit --config recipes/quickstart.yaml`` trains; ``--print_config`` shows the
full configuration; dotted overrides such as ``--trainer.max_epochs 3`` change one value, and a
method's parameters are reached through its own section: ``--uskd.alpha 0.2``.
Any LightningModule / LightningDataModule can be named by ``class_path``, ours or the user's.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric import Fabric
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from torch import nn
from typing_extensions import override

import lightning_logits.callbacks
import lightning_logits.data
import lightning_logits.modules  # noqa: F401
from lightning_logits.callbacks import LAWN, USKD, LogitDiagnostics, ReplayCallback, TeacherDistillation
from lightning_logits.networks.factory import check_checkpoint, load_teacher
from lightning_logits.parallel import end_process_group
from lightning_logits.teacher_cache import (
    TeacherLogitCache,
    TokenLogitCache,
    build_teacher_cache,
    build_token_cache,
    open_teacher_cache,
)

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
    def _parse_ckpt_path(self) -> None:
        # Lightning's CLI reads --ckpt_path here (for its hyperparameters), before any hook: refuse a
        # damaged file first, with its name and the checkpoints beside it (check_checkpoint).
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(str(ckpt_path)).is_file():
            check_checkpoint(str(ckpt_path))
        super()._parse_ckpt_path()

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
    """Entry point of the ``lightning-logits`` console script.

    Ends the process group the run started, if any: without it, the processes of two-node runs
    were seen to abort at exit after a good run ("terminate called without an active exception").
    """
    try:
        build_cli(args)
    finally:
        end_process_group()


def _import(dotted: str) -> Any:
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"'{dotted}' is not a dotted class path such as lightning_logits.data.DigitsDataModule")
    return getattr(importlib.import_module(module_name), attr)


def launch_teacher_cache(
    teacher: nn.Module,
    dataloader: Iterable[Any],
    path: str | Path,
    *,
    devices: int = 2,
    num_nodes: int = 1,
    accelerator: str = "cpu",
    strategy: Literal["ddp_spawn", "ddp"] = "ddp_spawn",
    layout: Literal["samples", "tokens"] = "samples",
    **build_kwargs: Any,
) -> TeacherLogitCache | TokenLogitCache:
    """Start ``devices`` processes per node with Lightning Fabric and build one cache with all of them.

    Every process runs :func:`~lightning_logits.teacher_cache.build_teacher_cache` on its share of
    ``dataloader``'s batches (see there); the teacher runs on each process's own device
    (``cuda:<local rank>`` with ``accelerator="cuda"``). ``"ddp_spawn"`` (default) starts the
    processes from this function and works in a notebook or under pytest (``teacher`` and
    ``dataloader`` are pickled to them); ``"ddp"`` re-runs the current script once per extra
    process, as Lightning's ``Trainer`` does. Under ``torchrun`` or SLURM, Fabric finds the
    processes already started and starts none. For two nodes, run the same script on each with
    ``num_nodes=2`` and ``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK`` set. Inside a process
    group that is already running (a ``Trainer``'s), call ``build_teacher_cache`` directly.

    With ``layout="tokens"``, ``dataloader`` is the list of token documents and every process runs
    :func:`~lightning_logits.teacher_cache.build_token_cache` instead (a flat, token-scale cache of a
    causal LM teacher), each on its share of the document batches.

    Args:
        teacher: as for ``build_teacher_cache``.
        dataloader: as for ``build_teacher_cache``; with ``layout="tokens"``, the documents.
        path: as for ``build_teacher_cache``.
        devices: processes per node.
        num_nodes: nodes of the job.
        accelerator: ``"cpu"`` (gloo) or ``"cuda"`` (NCCL), as Fabric takes it.
        strategy: how Fabric starts the processes.
        layout: ``"samples"`` (default: ``build_teacher_cache``, rows by sample index) or ``"tokens"``
            (``build_token_cache``, rows by token of variable-length documents).
        **build_kwargs: the other arguments of the builder (``k``, ``resume``, ...).

    Returns:
        The cache, opened for reading in this process.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = TensorDataset(torch.randn(6, 3), torch.zeros(6), torch.arange(6))
        >>> with tempfile.TemporaryDirectory() as tmp:  # doctest: +SKIP
        ...     cache = launch_teacher_cache(nn.Linear(3, 5), DataLoader(data, batch_size=2), tmp, k=2)
        ...     cache.num_samples
        6
    """
    if "device" in build_kwargs:
        raise TypeError("launch_teacher_cache places the teacher on each process's device: pass accelerator instead")
    if layout not in ("samples", "tokens"):
        raise ValueError(f"layout must be 'samples' or 'tokens', got {layout!r}")
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch(functools.partial(_build_on_every_rank, teacher, dataloader, str(path), build_kwargs, layout))
    return open_teacher_cache(path)


def _build_on_every_rank(
    teacher: nn.Module,
    dataloader: Any,
    path: str,
    build_kwargs: dict[str, Any],
    layout: str,
    fabric: Fabric,
) -> None:
    # module-level so that ddp_spawn can pickle it
    build = build_token_cache if layout == "tokens" else build_teacher_cache
    try:
        build(teacher, dataloader, path, device=fabric.device, **build_kwargs)
    finally:
        end_process_group()  # without it, the processes of a multi-node job abort at exit


def cache_main(argv: list[str] | None = None) -> None:
    """The ``lightning-logits-cache`` command: build a cache from a teacher and a DataModule.

    The DataModule is built with ``return_index=True`` and the chosen split is read in order,
    without shuffling or dropping samples. Its arguments must match the student run's (same
    seed and fractions), so that index ``i`` names the same sample in both.

    ``--devices N`` (and ``--num-nodes M``) build with ``N`` processes per node, started by
    Lightning Fabric (``--strategy ddp`` re-runs this command once per extra process; under
    ``torchrun``/SLURM the processes are already there): each takes every ``N*M``-th batch and
    writes its rows into the same files, global rank 0 writes ``meta.json``. ``--resume``
    continues a build that stopped, without asking the teacher again for rows already written.

    ``--layout tokens`` builds a token-scale cache of a causal LM teacher
    (:func:`~lightning_logits.teacher_cache.build_token_cache`) instead: the DataModule is built
    with ``--data-args`` as given and its ``documents(split)`` method gives the token documents
    (a sequence of token-id sequences, the same ones the student packs); ``--batch-size`` is then
    documents per teacher call (default 8) and ``--dtype`` the values' storage. The teacher is
    typically ``hf:<name or saved directory>``.
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
    parser.add_argument(
        "--batch-size", type=int, help="samples (default 256) or, with --layout tokens, documents (default 8) per call"
    )
    parser.add_argument("--k", type=int, default=10, help="logits kept per sample or token (default 10)")
    parser.add_argument(
        "--layout",
        choices=("samples", "tokens"),
        default="samples",
        help="rows by sample index (default), or by token of the DataModule's documents(split) (a causal LM)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        default="float16",
        help="storage of the values of a --layout tokens cache (default float16)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the teacher runs; with several processes, its type (cpu or cuda): each process takes its own",
    )
    parser.add_argument("--devices", type=int, default=1, help="processes per node that build (default 1)")
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes of the job (set NODE_RANK on each)")
    parser.add_argument(
        "--strategy",
        choices=("ddp", "ddp_spawn"),
        default="ddp",
        help="how Lightning Fabric starts the processes of --devices N (default ddp)",
    )
    parser.add_argument("--out", required=True, help="cache directory to write")
    parser.add_argument("--overwrite", action="store_true", help="replace a cache (complete or not) at --out")
    parser.add_argument(
        "--resume", action="store_true", help="continue a build that stopped: rows already written are kept"
    )
    args = parser.parse_args(argv)
    if args.devices < 1 or args.num_nodes < 1:
        parser.error(f"--devices and --num-nodes must be at least 1, got {args.devices} and {args.num_nodes}")
    if args.overwrite and args.resume:
        parser.error("pass --overwrite (start again) or --resume (continue a stopped build), not both")
    if args.layout == "samples" and args.dtype != "float16":
        parser.error(f"--dtype {args.dtype} is for --layout tokens; the per-sample cache stores float16")
    if args.batch_size is None:
        args.batch_size = 8 if args.layout == "tokens" else 256
    if args.devices * args.num_nodes == 1:
        _cache_command(args, None)
        return
    accelerator = torch.device(args.device).type
    fabric = Fabric(accelerator=accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy)
    fabric.launch(functools.partial(_cache_command, args))


def _cache_command(args: argparse.Namespace, fabric: Fabric | None) -> None:
    """One process of ``lightning-logits-cache`` (module-level so that ddp_spawn can pickle it)."""
    if getattr(args, "layout", "samples") == "tokens":
        _token_cache_command(args, fabric)
        return
    data_args = json.loads(args.data_args)
    datamodule = _import(args.data)(**{**data_args, "return_index": True})
    datamodule.setup("fit")
    if hasattr(datamodule, "dataset"):
        dataset = datamodule.dataset(args.split)
        loader: Iterable[Any] = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    else:
        loader = getattr(datamodule, f"{args.split}_dataloader")()
    # A teacher given by name without --checkpoint is randomly initialized: the same in every process.
    torch.manual_seed(0)
    teacher = load_teacher(args.teacher, args.checkpoint, args.num_classes, json.loads(args.model_kwargs))
    data = {"class_path": args.data, "init_args": data_args, "split": args.split}
    try:
        cache = build_teacher_cache(
            teacher,
            loader,
            args.out,
            k=args.k,
            device=args.device if fabric is None else fabric.device,
            source=args.teacher,
            overwrite=args.overwrite,
            resume=args.resume,
            data=data,
            teacher_args={
                "checkpoint": args.checkpoint,
                "num_classes": args.num_classes,
                "model_kwargs": json.loads(args.model_kwargs),
            },
        )
    finally:
        if fabric is not None:
            end_process_group()  # without it, the processes of a multi-node job abort at exit
    if fabric is None or fabric.global_rank == 0:
        print(
            f"wrote top-{cache.k} logits of {cache.num_samples} samples ({cache.num_classes} classes) to {cache.path}"
        )


def _token_cache_command(args: argparse.Namespace, fabric: Fabric | None) -> None:
    """``lightning-logits-cache --layout tokens``: a token-scale cache of the DataModule's documents."""
    data_args = json.loads(args.data_args)
    datamodule = _import(args.data)(**data_args)
    documents_of = getattr(datamodule, "documents", None)
    if not callable(documents_of):
        raise TypeError(
            f"--layout tokens needs a DataModule with a documents(split) method returning the token documents; "
            f"{args.data} has none"
        )
    if callable(getattr(datamodule, "setup", None)):
        datamodule.setup("fit")
    documents = documents_of(args.split)
    torch.manual_seed(0)  # a teacher given by name without weights is random: the same in every process
    teacher = load_teacher(args.teacher, args.checkpoint, args.num_classes, json.loads(args.model_kwargs))
    try:
        cache = build_token_cache(
            teacher,
            documents,
            args.out,
            k=args.k,
            batch_size=args.batch_size,
            dtype=args.dtype,
            device=args.device if fabric is None else fabric.device,
            source=args.teacher,
            overwrite=args.overwrite,
            resume=args.resume,
            data={"class_path": args.data, "init_args": data_args, "split": args.split},
            teacher_args={"checkpoint": args.checkpoint, "model_kwargs": json.loads(args.model_kwargs)},
        )
    finally:
        if fabric is not None:
            end_process_group()
    if fabric is None or fabric.global_rank == 0:
        print(
            f"wrote top-{cache.k} logits of {cache.num_tokens} tokens in {cache.num_documents} documents "
            f"({cache.num_classes} tokens of vocabulary, {cache.dtype}) to {cache.path}"
        )


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

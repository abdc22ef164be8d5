"""One rank of a multi-process test run: fits each named scenario and records what the test compares.

Started by ``tests/parallel.py`` (``launch``) once per rank with ``LOCAL_RANK``/``NODE_RANK``/``MASTER_*``
set, so Lightning sees processes launched externally (as under torchrun or SLURM); or called in
process with ``--strategy single`` for the one-process reference. Each scenario writes
``<out>/<scenario>.rank<r>.json``: the loss of every step on this rank, and per-scenario facts
(LAWN's held norms, which parameters are sharded, ...).

Usage: ``python tests/parallel_worker.py --strategy mps|ddp|single --out DIR --scenarios a,b,...
[--devices 2] [--num-nodes 1] [--batch-size 8] [--steps 20] [--cache DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.distributed._composable.contract import _get_registry  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset  # noqa: E402

from benchmarks.harness import ResumableLoader  # noqa: E402
from lightning_logits.callbacks import (  # noqa: E402
    ERACE,
    LAWN,
    UER,
    USKD,
    ExperienceReplay,
    LogitDiagnostics,
    TeacherDistillation,
)
from lightning_logits.modules import Classifier  # noqa: E402
from lightning_logits.networks.sharding import is_sharded  # noqa: E402
from lightning_logits.parallel import end_process_group  # noqa: E402
from tests.helpers import TinyMLP, blob_data  # noqa: E402

NUM_SAMPLES = 160
TEACHER_SEED = 7


class IndexedData(pl.LightningDataModule):
    """``(x, y, index)`` batches in a fixed order: rank r of W takes samples r, r + W, ... (no shuffle)."""

    num_classes = 4

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        x, y = blob_data(n=NUM_SAMPLES)
        self.dataset = TensorDataset(x, y, torch.arange(NUM_SAMPLES))

    def _loader(self) -> DataLoader[Any]:
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            # The strategy says how the data is split: over every rank (DDP, FSDP) or over the
            # data-parallel ranks only (ModelParallelStrategy's tensor-parallel ranks share batches).
            split = trainer.strategy.distributed_sampler_kwargs  # type: ignore[attr-defined]
            sampler = DistributedSampler(self.dataset, split["num_replicas"], split["rank"], shuffle=False)
            return ResumableLoader(self.dataset, batch_size=self.batch_size, sampler=sampler)
        return ResumableLoader(self.dataset, batch_size=self.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader()

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader()


class StepRecorder(pl.Callback):
    """The loss of every training step on this rank (host reads are fine in a test)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss.detach()))


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


def teacher() -> nn.Module:
    torch.manual_seed(TEACHER_SEED)
    return TinyMLP(hidden=20)


def scenario_callbacks(name: str, cache: str | None) -> list[pl.Callback]:
    """The method callbacks of a scenario (a fresh teacher each time: sharding changes it in place)."""
    kd = {"kd", "nkd", "dkd", "dist", "dhkd"}
    if name in kd:
        return [TeacherDistillation(teacher(), loss=name, warmup_epochs=0)]  # type: ignore[arg-type]
    if name == "kd_sharded_teacher":
        return [TeacherDistillation(teacher(), loss="kd", teacher_sharding="full")]
    if name == "kd_cache":
        assert cache is not None, "--cache is needed for kd_cache"
        return [TeacherDistillation(loss="kd", cache=cache)]
    if name == "uskd":
        return [USKD(feature_layer="model.body")]
    if name in ("lawn_all", "lawn_final"):
        return [LAWN(free_steps=5, scope=name.split("_")[1])]  # type: ignore[arg-type]
    if name == "erace":
        return [ERACE(buffer_size=32, replay_batch_size=8)]
    if name == "er":
        return [ExperienceReplay(buffer_size=32, replay_batch_size=8)]
    if name == "uer":
        return [UER(buffer_size=32, replay_batch_size=8)]
    if name == "diagnostics":
        return [LogitDiagnostics(scores=("msp", "energy"), stages=("validate",))]
    if name == "ce":
        return []
    raise ValueError(f"unknown scenario {name!r}")


def make_strategy(kind: str) -> Any:
    if kind == "mps":
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = int(os.environ.get("WORLD_SIZE_HINT", "2"))
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    if kind == "mps_default":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy()
    return {"ddp": "ddp", "single": "auto"}[kind]


def facts(name: str, module: Classifier, callbacks: list[pl.Callback]) -> dict[str, Any]:
    """What a scenario reports besides its losses."""
    out: dict[str, Any] = {
        "student_sharded": is_sharded(module.model),
        "param_dtypes": sorted({str(p.dtype) for p in module.parameters()}),
        "checkpointed": sorted(n for n, m in module.named_modules() if "checkpoint" in (_get_registry(m) or {})),
        "head_weight_type": type(module.model.head.weight).__name__,
    }
    aux = getattr(module, "lightning_logits_aux", None)
    if aux is not None:
        out["aux_sharded"] = {k: is_sharded(v) for k, v in aux.items()}
        out["aux_in_state_dict"] = sorted(k for k in module.state_dict() if k.startswith("lightning_logits_aux."))
    for callback in callbacks:
        if isinstance(callback, LAWN):
            params = dict(module.named_parameters())
            out["lawn_targets"] = callback.norms
            out["lawn_norms"] = {n: float(_full(params[n]).norm()) for n in callback.param_names}
        if isinstance(callback, TeacherDistillation) and callback.teacher_source is not None:
            out["teacher_sharding"] = callback.teacher_sharding
            out["teacher_param_types"] = sorted({type(p).__name__ for p in callback.teacher_source.parameters()})
            out["teacher_requires_grad"] = any(p.requires_grad for p in callback.teacher_source.parameters())
    return out


def _full(tensor: Tensor) -> Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach()


def rank_trainer(args: argparse.Namespace, **options: Any) -> pl.Trainer:
    """A quiet CPU ``Trainer`` for this rank, with the launch's devices, nodes and strategy, plus ``options``."""
    return pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=make_strategy(args.strategy),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **options,
    )


def mowst_refusal(args: argparse.Namespace) -> dict[str, Any]:
    """Mowst under ModelParallelStrategy: the error every rank raises (same on all: no rank hangs)."""
    from lightning_logits.data.graphs import GraphDataModule, csbm_graph
    from lightning_logits.modules import Mowst

    graph = csbm_graph(num_nodes=60, num_classes=3, num_features=6, homophily=0.7, feature_signal=1.5, seed=0)
    module = Mowst(num_features=6, num_classes=3, hidden=8)
    trainer = rank_trainer(
        args,
        max_epochs=1,
        enable_checkpointing=False,
    )
    try:
        trainer.fit(module, datamodule=GraphDataModule(data=graph))
    except RuntimeError as err:
        return {"error": str(err), "rank": trainer.global_rank}
    return {"error": None, "rank": trainer.global_rank}


class CrashAt(pl.Callback):
    """``kill -9`` of this rank when training reaches ``step`` (every rank reaches it: the job dies)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class GlobalStepRecorder(pl.Callback):
    """``{global step: loss}`` on this rank, so a resumed run can be lined up with an uninterrupted one."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses[trainer.global_step - 1] = float(loss.detach())


def run_resume(args: argparse.Namespace) -> None:
    """Stateful methods at once (``--methods``: dual-head KD, LAWN past its switch, ER's or UER's per-rank
    buffers, USKD's head), checkpointed every ``--every-n-steps`` steps.

    ``--crash-at S`` kills the job at step S; ``--resume`` continues from ``last.ckpt``. Writes each rank's
    losses and weights (``resume.rank<r>.json``) and its method callbacks' states (``resume_states.rank<r>.pt``).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = Classifier(TinyMLP(), optimizer=_adam)
    recorder = GlobalStepRecorder()
    methods: dict[str, pl.Callback] = {
        "dhkd": TeacherDistillation(teacher(), loss="dhkd"),
        "lawn": LAWN(free_steps=5),
        "er": ExperienceReplay(buffer_size=24, replay_batch_size=8),
        "uer": UER(buffer_size=24, replay_batch_size=8),
        "uskd": USKD(feature_layer="model.body"),
    }
    chosen = [methods[m] for m in args.methods.split(",") if m]
    callbacks: list[pl.Callback] = [
        *chosen,
        ModelCheckpoint(
            dirpath=args.ckpt_dir,
            save_last=True,
            save_top_k=-1 if args.every_n_steps > 1 else 0,
            every_n_train_steps=args.every_n_steps,
        ),
        recorder,
    ]
    if args.crash_at is not None:
        callbacks.append(CrashAt(args.crash_at))
    trainer = rank_trainer(
        args,
        max_steps=args.steps,
        limit_val_batches=0,
        use_distributed_sampler=False,
        default_root_dir=str(out),
        callbacks=callbacks,
    )
    trainer.fit(module, datamodule=IndexedData(args.batch_size), ckpt_path="last" if args.resume else None)
    params = {n: _full(p).tolist() for n, p in module.named_parameters()}
    lawn = methods["lawn"]
    states = {type(c).__name__: c.state_dict() for c in chosen}
    record = {"losses": recorder.losses, "params": params, "lawn_norms": lawn.norms}  # type: ignore[attr-defined]
    torch.save(states, out / f"resume_states.rank{trainer.global_rank}.pt")
    (out / f"resume.rank{trainer.global_rank}.json").write_text(json.dumps(record))


def run_timm_checkpoint(args: argparse.Namespace) -> None:
    """A timm resnet10t (sharded layer by layer) trained 3 steps on 16x16 images, saving ``last.ckpt``."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    images = torch.randn(48, 1, 16, 16)
    labels = torch.arange(48) % 4
    module = Classifier("resnet10t", num_classes=4, in_chans=1, optimizer=_sgd)
    trainer = rank_trainer(
        args,
        max_steps=3,
        limit_val_batches=0,
        default_root_dir=args.out,
        callbacks=[ModelCheckpoint(dirpath=args.ckpt_dir, save_last=True, save_top_k=0)],
    )
    trainer.fit(module, DataLoader(TensorDataset(images, labels), batch_size=8))
    blocks = sorted(n for n, m in module.named_modules() if is_sharded(m))
    params = {n: _full(p).tolist() for n, p in module.named_parameters()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"timm.rank{trainer.global_rank}.json").write_text(
        json.dumps({"units": blocks, "params": params})
    )


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.scenarios.split(","):
        if name == "mowst":
            record = mowst_refusal(args)
            (out / f"mowst.rank{record['rank']}.json").write_text(json.dumps(record))
            continue
        torch.manual_seed(0)
        # "ce_bf16_checkpointing": FSDP2's bf16 mixed precision and per-block activation checkpointing
        options = (
            dict(sharding_mixed_precision=True, activation_checkpointing=True)
            if name.endswith("_checkpointing")
            else {}
        )
        module = Classifier(TinyMLP(), optimizer=_adam if name.startswith("lawn") else _sgd, **options)
        recorder = StepRecorder()
        callbacks = [*scenario_callbacks(name.removesuffix("_bf16_checkpointing"), args.cache), recorder]
        trainer = rank_trainer(
            args,
            max_steps=args.steps,
            limit_val_batches=2 if name == "diagnostics" else 0,
            use_distributed_sampler=False,
            enable_checkpointing=False,
            num_sanity_val_steps=0,
            default_root_dir=str(out),
            callbacks=callbacks,
        )
        trainer.fit(module, datamodule=IndexedData(args.batch_size))
        record = {"losses": recorder.losses, "world_size": trainer.world_size, **facts(name, module, callbacks)}
        if name == "diagnostics":
            record["metrics"] = {
                k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("diagnostics/") or "val/" in k
            }
        path = out / f"{name}.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record, indent=1, sort_keys=True))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True, choices=["mps", "mps_default", "ddp", "single"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--scenarios", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--ckpt-dir", default=None)
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--methods", default="dhkd,lawn,er", help="the resume scenario's callbacks")
    parser.add_argument("--every-n-steps", type=int, default=5, help="the resume scenario's checkpoint interval")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    dump_after = float(os.environ.get("WORKER_DUMP_AFTER", "0"))
    if dump_after > 0:  # a hung rank prints where it waits before the launcher kills it
        import faulthandler

        faulthandler.dump_traceback_later(dump_after, exit=False)
    # seed_everything (a recipe's seed_everything, an earlier test in this process) leaves PL_GLOBAL_SEED,
    # and Lightning's distributed strategies then reseed at setup while one process does not: the
    # auxiliary heads created in setup would start from other weights. Every run here starts unseeded.
    global_seed = os.environ.pop("PL_GLOBAL_SEED", None)
    try:
        if args.scenarios == "resume":
            run_resume(args)
        elif args.scenarios == "timm_checkpoint":
            run_timm_checkpoint(args)
        else:
            run(args)
    finally:
        if global_seed is not None:
            os.environ["PL_GLOBAL_SEED"] = global_seed
    if args.strategy != "single":
        # Every rank ends the gloo group together: one rank closing its sockets while the other still
        # talks to it aborted that rank at exit (SIGABRT, "terminate called without an active exception").
        end_process_group()


if __name__ == "__main__":
    main()

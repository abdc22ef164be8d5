"""Per-rank bytes of a distillation run, replicated (DDP) vs sharded (ModelParallelStrategy / FSDP2).

For the student (parameters + gradients + optimizer state) and the frozen teacher (parameters),
counted exactly from each rank's local shards (:func:`lightning_logits.networks.sharded_bytes`)
after two AdamW steps, in three arms: DDP (everything replicated), FSDP2 student with the teacher
replicated (``TeacherDistillation``'s default), FSDP2 student and ``teacher_sharding="full"``.
The ratio column is sharded / replicated: about 1/N with N ranks (a block's shard is rounded up).

    python -m benchmarks.memory_sharded                  # 2 CPU processes (gloo), vit_tiny <- vit_small
    python -m benchmarks.memory_sharded --smoke          # tiny models (what CI runs)

Writes ``benchmarks/results/sharded_memory.md`` (``--out``) and prints the table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ARMS = {
    "ddp": ("ddp", "replicated"),
    "fsdp2": ("model_parallel", "replicated"),
    "fsdp2_teacher_full": ("model_parallel", "full"),
}


def _models(smoke: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    if smoke:
        student = dict(model_name="vit_tiny_patch16_224", depth=2, embed_dim=64, num_heads=2)
        teacher = dict(model_name="vit_tiny_patch16_224", depth=3, embed_dim=96, num_heads=2)
    else:
        student = dict(model_name="vit_tiny_patch16_224")
        teacher = dict(model_name="vit_small_patch16_224")
    for spec in (student, teacher):
        spec.update(img_size=32, patch_size=8, in_chans=1, num_classes=10)
    return student, teacher


def child(args: argparse.Namespace) -> None:
    """One rank: two steps of KD, then the bytes this rank holds, written to ``<out_dir>/<arm>.rank<r>.json``."""
    import lightning.pytorch as pl
    import timm
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_logits.callbacks import TeacherDistillation
    from lightning_logits.modules import Classifier
    from lightning_logits.networks import sharded_bytes
    from lightning_logits.parallel import end_process_group

    warnings.filterwarnings("ignore")
    strategy_name, teacher_sharding = ARMS[args.arm]
    student_spec, teacher_spec = _models(args.smoke)
    world = args.devices * args.num_nodes
    torch.manual_seed(0)
    teacher = timm.create_model(teacher_spec.pop("model_name"), **teacher_spec)
    name = student_spec.pop("model_name")
    module = Classifier(timm.create_model(name, **student_spec))
    distill = TeacherDistillation(teacher, loss="kd", teacher_sharding=teacher_sharding)  # type: ignore[arg-type]
    counts: dict[str, Any] = {}

    class Count(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *rest: Any) -> None:
            if trainer.global_step == 2:
                counts["student"] = sharded_bytes(pl_module, trainer.optimizers[0])
                counts["teacher"] = sharded_bytes(teacher)

    strategy = (
        ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if strategy_name != "ddp" else "ddp"
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=strategy,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[distill, Count()],
    )
    data = TensorDataset(torch.randn(64, 1, 32, 32), torch.arange(64) % 10)
    module.configure_optimizers = lambda: torch.optim.AdamW(module.parameters(), lr=1e-4)  # type: ignore[method-assign]
    trainer.fit(module, DataLoader(data, batch_size=8))
    out = Path(args.out_dir) / f"{args.arm}.rank{trainer.global_rank}.json"
    out.write_text(json.dumps(counts))
    end_process_group()


def _mib(value: float) -> str:
    return f"{value / 2**20:.2f}"


def report(folder: Path, world: int, smoke: bool) -> str:
    rows = {arm: [json.loads((folder / f"{arm}.rank{r}.json").read_text()) for r in range(world)] for arm in ARMS}
    student, teacher = _models(smoke)
    lines = [
        f"Per-rank memory, {world} CPU processes (gloo), after 2 AdamW steps: student `{student['model_name']}`"
        + (" (reduced)" if smoke else "")
        + f", teacher `{teacher['model_name']}`; MiB on rank 0 (max over ranks in brackets), ratio = arm / DDP.",
        "",
        "| arm | student params | grads | AdamW state | student total | ratio | teacher params | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = rows["ddp"][0]
    for arm, ranks in rows.items():
        s, t = ranks[0]["student"], ranks[0]["teacher"]
        s_max = max(r["student"]["total"] for r in ranks)
        t_max = max(r["teacher"]["total"] for r in ranks)
        lines.append(
            f"| {arm} | {_mib(s['parameters'])} | {_mib(s['gradients'])} | {_mib(s['optimizer'])} | "
            f"{_mib(s['total'])} ({_mib(s_max)}) | {s_max / base['student']['total']:.3f} | "
            f"{_mib(t['total'])} ({_mib(t_max)}) | {t_max / base['teacher']['total']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models (CI)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sharded_memory.md"))
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--arm", choices=list(ARMS), help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--num-nodes", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return
    from benchmarks.harness import launch_ranks

    with tempfile.TemporaryDirectory() as tmp:
        for arm in ARMS:
            command = [sys.executable, "-m", "benchmarks.memory_sharded", "--child", "--arm", arm, "--out-dir", tmp]
            if args.smoke:
                command.append("--smoke")
            launch_ranks(command, world_size=args.processes, timeout=600, cwd=ROOT)
        table = report(Path(tmp), args.processes, args.smoke)
    command = "python -m benchmarks.memory_sharded" + (" --smoke" if args.smoke else "")
    text = f"{table}\n\nCommand: `{command}`\n"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

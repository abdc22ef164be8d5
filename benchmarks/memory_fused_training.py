"""Peak memory of a whole training step: CausalLM + TeacherDistillation with full logits vs ``logits="fused"`` (CPU).

``python -m benchmarks.memory_fused_training [--batch 4 --seq 256 --vocab 32000 --hidden 256 --rounds 1]``

Every case trains a Hugging Face Llama student built from a config (2 layers, ``--hidden``,
vocabulary ``--vocab``; AdamW) with a real ``Trainer`` for two steps on random token ids,
``--batch`` x ``--seq`` per step, and reports the growth of the peak resident set during the
**second** step (the optimizer's state exists by then) above the resident set at its start:
forward, teacher, loss, backward and optimizer step, everything a step needs beyond the model,
the optimizer state, the teacher and the data. Cases, each in a fresh subprocess on one thread:

- ``ce_full`` / ``ce_fused``: ``CausalLM`` alone, ``logits="full"`` (``F.cross_entropy`` on the
  ``[B, T, V]`` logits) / ``"fused"`` (``fused_linear_cross_entropy``, no logits);
- ``kd_full`` / ``kd_fused``: plus ``TeacherDistillation(teacher, loss="kd")`` from an online
  teacher (a Llama with twice the student's width, same vocabulary); its ``[B, T, V]`` logits
  exist in both (the teacher computes them), the student's only in ``kd_full``; fused computes CE
  and KD in one pass;
- ``cache_full`` / ``cache_fused``: the same from a top-32 teacher cache built once by the parent
  (``cache_full`` rebuilds the ``[B, T, V]`` teacher logits from it, ``cache_fused`` reads the
  top-k rows chunk by chunk).

The table gives each case's peak above the step's start, its ratio to the matching full case,
and the median step time (the second step; ``--rounds`` interleaves repeated processes).
``--smoke`` runs every case once in this process at a tiny size (the code paths, not the memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.harness import _peak_resident_mb, _reset_peak_resident, _resident_mb, quiet_trainer, run_child

CASES = ["ce_full", "ce_fused", "kd_full", "kd_fused", "cache_full", "cache_fused"]
TOP_K = 32


def llama_config(hidden: int, vocab: int, seq: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
    )


def make_loader(batch: int, seq: int, vocab: int) -> DataLoader:
    ids = torch.randint(0, vocab, (2 * batch, seq), generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(ids, ids.clone(), torch.arange(2 * batch)), batch_size=batch)


def make_teacher(hidden: int, vocab: int, seq: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(llama_config(2 * hidden, vocab, seq)).eval()


class SecondStep(pl.Callback):
    """Peak resident set growth and time of the second training step (the first allocates the optimizer state)."""

    def __init__(self) -> None:
        self.start_mb = 0.0
        self.loss_mb = float("nan")
        self.time_s = float("nan")
        self._started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if idx == 1:
            self.start_mb = _resident_mb()
            _reset_peak_resident()
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == 2:
            self.time_s = time.perf_counter() - self._started
            self.loss_mb = _peak_resident_mb() - self.start_mb


def measure(case: str, args: argparse.Namespace, cache: str | None) -> dict[str, Any]:
    """Train one case for two steps in this process; its second step's memory (MiB) and time (s)."""
    from lightning_logits.callbacks import TeacherDistillation
    from lightning_logits.modules import CausalLM

    torch.manual_seed(0)
    mode = "fused" if case.endswith("_fused") else "full"
    callbacks: list[pl.Callback] = []
    if case.startswith("kd_"):
        callbacks.append(
            TeacherDistillation(make_teacher(args.hidden, args.vocab, args.seq), loss="kd", temperature=1.0)
        )
    elif case.startswith("cache_"):
        callbacks.append(TeacherDistillation(cache=cache, loss="kd", temperature=1.0))
    module = CausalLM(llama_config(args.hidden, args.vocab, args.seq), logits=mode)  # type: ignore[arg-type]
    probe = SecondStep()
    trainer = quiet_trainer(max_steps=2, limit_val_batches=0, callbacks=[*callbacks, probe])
    trainer.fit(module, train_dataloaders=make_loader(args.batch, args.seq, args.vocab))
    return {"case": case, "loss_mb": probe.loss_mb, "start_mb": probe.start_mb, "time_s": probe.time_s}


def build_cache(args: argparse.Namespace, out: Path) -> str:
    from lightning_logits.teacher_cache import build_teacher_cache

    teacher = make_teacher(args.hidden, args.vocab, args.seq)
    build_teacher_cache(teacher, make_loader(args.batch, args.seq, args.vocab), out, k=TOP_K)
    return str(out)


def _child(case: str, args: argparse.Namespace, cache: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory_fused_training", "--child", case, "--cache", cache]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)]
    cmd += ["--hidden", str(args.hidden)]
    return run_child(cmd, case)


def format_table(rows: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    """The Markdown table: each case's step peak, its ratio to the matching full case, its step time."""
    tokens = args.batch * args.seq
    logits_mb = tokens * args.vocab * 4 / 2**20
    lines = [
        f"### memory: a training step, CausalLM + TeacherDistillation, full vs fused logits (B={args.batch}, "
        f"T={args.seq}: {tokens} tokens; V={args.vocab}, student hidden {args.hidden}, teacher {2 * args.hidden}; "
        f"float32 [B, T, V] logits would be {logits_mb:.0f} MiB)",
        "",
        "| case | step peak above its start (MiB) | / full | step time (s) | time / full |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        base = rows.get(name.replace("_fused", "_full"))
        mem = f"{row['loss_mb'] / base['loss_mb']:.2f}" if base and base["loss_mb"] > 0 else "n/a"
        speed = f"{row['time_s'] / base['time_s']:.2f}" if base and base["time_s"] > 0 else "n/a"
        lines.append(f"| {name} | {row['loss_mb']:.0f} | {mem} | {row['time_s']:.2f} | {speed} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=1, help="processes per case, interleaved")
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, every case in this process")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        torch.set_num_threads(1)
        print("RESULT " + json.dumps(measure(args.child, args, args.cache)))
        return
    if args.smoke:
        args.batch, args.seq, args.vocab, args.hidden = 2, 16, 512, 32
    with tempfile.TemporaryDirectory() as tmp:
        needs_cache = any(case.startswith("cache_") for case in args.cases)
        cache = build_cache(args, Path(tmp) / "cache") if needs_cache else ""
        runs: dict[str, list[dict[str, Any]]] = {case: [] for case in args.cases}
        for _ in range(1 if args.smoke else args.rounds):
            for case in args.cases:
                runs[case].append(measure(case, args, cache) if args.smoke else _child(case, args, cache))
    rows = {
        case: {
            "loss_mb": statistics.median(r["loss_mb"] for r in results),
            "time_s": statistics.median(r["time_s"] for r in results),
        }
        for case, results in runs.items()
    }
    print(format_table(rows, args))


if __name__ == "__main__":
    main()

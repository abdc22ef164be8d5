"""Language-model distillation on a real offline corpus: the Python standard library's source.

Setting (offline, CPU-sized). :class:`~lightning_logits.data.StdlibCorpusDataModule`: the
standard library's ``.py`` files (no tests, no ``site-packages``), split by file into
train/val/test by a hash of the path, tokenized by a byte-level BPE trained on the training files
only, files packed into rows of ``--context`` tokens (per-file positions: no token attends or is
predicted across files).

- teacher: a Llama-style ``transformers`` model (hidden 128, 4 layers) built from a config dict
  and trained once by :class:`~lightning_logits.modules.CausalLM` on every training row;
- student: a smaller one (hidden 64, 2 layers) trained on ``--student-rows`` rows drawn from the
  training split, for ``--student-steps`` steps, with

  - ``CE alone``: next-token cross-entropy;
  - ``+ forward KL``, ``+ reverse KL``, ``+ JSD(0.5)``: ``TeacherDistillation(teacher, loss=...)``
    (the teacher runs on every step, on the same packed rows);
  - ``+ top-k cache KD``: ``loss="forward_kl"`` from a cache of the teacher's top-k logits per
    token over the student's training rows (:func:`cache_distillation`, one function so that the
    cache layout can be switched).

  Every KD term has temperature 1 and weight ``--kd-weight`` beside the cross-entropy.

Reported: test-split perplexity (exp of the mean next-token cross-entropy per target token) of the
student, mean ± std over seeds, and the teacher's. The learning rates (``--ce-lr`` for CE alone,
``--student-lr`` with KD) and the KD weight were chosen on the VALIDATION split only (``--sweep``
prints the validation perplexity of a small grid, one seed); the test split is read only for the
final table.

    python -m benchmarks.accuracy_distillation_corpus            # 3 seeds
    python -m benchmarks.accuracy_distillation_corpus --sweep    # validation grid, 1 seed (results/*_sweep.md)
    python -m benchmarks.accuracy_distillation_corpus --smoke    # a few files and steps: checks it runs
    python -m benchmarks.accuracy_distillation_corpus --runs cache --k 64 256 \
        --out benchmarks/results/distillation_corpus_topk.md      # only cache students, larger k

The trained teacher is kept under ``--work-dir`` (keyed by its settings), so a rerun or the sweep
reuses it; the tokenized corpus is cached under ``--data-dir``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.harness import quiet_trainer
from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.data.corpus import PackedRows, StdlibCorpusDataModule
from lightning_logits.modules.causal_lm import CausalLM, next_token_target
from lightning_logits.teacher_cache import build_teacher_cache

ROOT = Path(__file__).resolve().parent.parent


def llama_config(vocab: int, hidden: int, layers: int, heads: int, context: int) -> dict[str, Any]:
    """A Llama-style ``transformers`` config dict (SwiGLU MLP of ``8/3 * hidden``, 2 KV heads)."""
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 8 * hidden // 3 // 16 * 16,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 2,
        "max_position_embeddings": context,
        "tie_word_embeddings": True,
    }


def _optimizer(lr: float, steps: int) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """AdamW (weight decay 0.1) with a linear warm-up over 5% of the steps, then a cosine to 10% of ``lr``."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def optimizer(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.1, betas=(0.9, 0.95))

    def scheduler(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.LambdaLR(opt, factor)

    return optimizer, scheduler


def train(
    config: dict[str, Any], rows: PackedRows, steps: int, lr: float, batch_size: int, seed: int,
    callbacks: list[Callback],
) -> CausalLM:  # fmt: skip
    """A ``CausalLM`` trained for ``steps`` steps on shuffled ``rows`` (seeded init and order)."""
    pl.seed_everything(seed, verbose=False)
    optimizer, scheduler = _optimizer(lr, steps)
    module = CausalLM(config, optimizer=optimizer, lr_scheduler=scheduler)
    loader = DataLoader(rows, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = quiet_trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=loader)
    return module


@torch.no_grad()
def perplexity(model: nn.Module, rows: PackedRows, batch_size: int = 64, limit: int | None = None) -> float:
    """exp of the mean next-token cross-entropy over every target token of ``rows`` (token-weighted).

    ``limit``: only the first ``limit`` rows (smoke runs).
    """
    if limit is not None:
        rows = PackedRows({key: value[:limit] for key, value in rows.packed.items()})
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in DataLoader(rows, batch_size=batch_size):
        ids, positions = batch["input_ids"], batch["position_ids"]
        logits = model(input_ids=ids, position_ids=positions)
        logits = getattr(logits, "logits", logits)
        target = next_token_target(ids, batch["labels"], position_ids=positions)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), reduction="sum"))
        count += int((target != -100).sum())
    model.train(was_training)
    return math.exp(total / count)


class PackedTeacher(nn.Module):
    """Call a HF causal LM on ``[B, 2, T]`` (token ids stacked on position ids): the cache builder passes one tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, packed: Tensor) -> Tensor:
        return self.model(input_ids=packed[:, 0], position_ids=packed[:, 1]).logits


def cache_distillation(teacher: nn.Module, rows: PackedRows, path: Path, k: int, weight: float) -> TeacherDistillation:
    """Top-k cache KD: build the cache of ``teacher`` over ``rows`` (by row index) and the callback reading it.

    The fixed-length ``[M, T, k]`` layout: every packed row has ``T`` tokens. The teacher gets each
    row's per-file position ids, as the online teacher does.
    """
    batches = [
        (torch.stack([b["input_ids"], b["position_ids"]], dim=1), b["labels"], b["index"])
        for b in DataLoader(rows, batch_size=64)
    ]
    build_teacher_cache(PackedTeacher(teacher), batches, path, k=k, num_samples=len(rows))
    return TeacherDistillation(cache=str(path), loss="forward_kl", temperature=1.0, weight=weight)


def _teacher(args: argparse.Namespace, dm: StdlibCorpusDataModule, vocab: int) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher (trained here, or read back from ``--work-dir``) and its record (time, ppl)."""
    config = llama_config(vocab, args.teacher_hidden, args.teacher_layers, 4, args.context)
    key = json.dumps(
        [config, args.teacher_steps, args.teacher_lr, args.batch_size, args.max_files, dm.corpus.directory.name]
    )  # type: ignore[union-attr]
    path = args.work_dir / f"teacher-{hashlib.sha1(key.encode()).hexdigest()[:12]}"
    if (path / "record.json").is_file():
        record = {**json.loads((path / "record.json").read_text()), "reused": True}
        module = CausalLM(config)
        module.model.load_state_dict(torch.load(path / "weights.pt", map_location="cpu"))
        return module.model.eval(), record
    started = time.perf_counter()
    module = train(config, dm.dataset("train"), args.teacher_steps, args.teacher_lr, args.batch_size, 0, [])
    seconds = time.perf_counter() - started
    record = {
        "seconds": seconds,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "val_ppl": perplexity(module.model, dm.dataset("val"), limit=args.eval_rows),
        "test_ppl": perplexity(module.model, dm.dataset("test"), limit=args.eval_rows),
    }
    path.mkdir(parents=True, exist_ok=True)
    torch.save(module.model.state_dict(), path / "weights.pt")
    (path / "record.json").write_text(json.dumps(record))
    return module.model.eval(), record


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--teacher-hidden", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--teacher-lr", type=float, default=3e-3)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-rows", type=int, default=1024, help="training rows the student sees")
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--ce-lr", type=float, default=3e-3, help="learning rate of the student alone")
    parser.add_argument("--student-lr", type=float, default=1e-2, help="learning rate of the students with KD")
    parser.add_argument("--kd-weight", type=float, default=1.0)
    parser.add_argument(
        "--k", type=int, nargs="+", default=[16], help="top-k logits per token in the cache (one row each)"
    )
    students = ["ce", "forward_kl", "reverse_kl", "jsd", "cache"]
    parser.add_argument("--runs", nargs="+", default=students, choices=students, help="which students to train")
    parser.add_argument("--max-files", type=int, default=None, help="first files of each split only")
    parser.add_argument("--eval-rows", type=int, default=None, help="evaluate on the first rows only (smoke)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    parser.add_argument("--sweep", action="store_true", help="validation perplexity of a small grid, 1 seed")
    parser.add_argument("--smoke", action="store_true", help="a few files, 1 seed, a few steps: checks that it runs")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "runs" / "data")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench_corpus")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distillation_corpus.md")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.seeds, args.max_files, args.vocab, args.context = 1, 2, 300, 32
        args.teacher_steps, args.student_steps, args.student_rows = 4, 3, 32
        args.teacher_hidden, args.teacher_layers, args.student_hidden, args.student_layers, args.k = 32, 1, 16, 1, [4]
        args.batch_size, args.eval_rows = 8, 16

    started = time.perf_counter()
    dm = StdlibCorpusDataModule(
        str(args.data_dir), args.vocab, args.context, max_files=args.max_files, train_rows=args.student_rows
    )
    teacher_dm = StdlibCorpusDataModule(str(args.data_dir), args.vocab, args.context, max_files=args.max_files)
    stats, student_rows = teacher_dm.describe(), dm.dataset("train")
    vocab = teacher_dm.vocab_size
    teacher, record = _teacher(args, teacher_dm, vocab)
    reused = ", not counting the teacher (trained before, read back from `--work-dir`)" if record.get("reused") else ""
    student_config = llama_config(vocab, args.student_hidden, args.student_layers, 4, args.context)
    evaluate_on = "val" if args.sweep else "test"
    held_out = dm.dataset(evaluate_on)

    def online(loss: str, **kwargs: Any) -> Callable[[Path, float], list[Callback]]:
        return lambda tmp, weight: [TeacherDistillation(teacher, loss=loss, temperature=1.0, weight=weight, **kwargs)]  # type: ignore[arg-type]

    def cached(k: int) -> Callable[[Path, float], list[Callback]]:
        return lambda tmp, weight: [cache_distillation(teacher, student_rows, tmp / "cache", k, weight)]

    every: dict[str, tuple[str, Callable[[Path, float], list[Callback]]]] = {
        "ce": ("CE alone", lambda tmp, weight: []),
        "forward_kl": ("+ forward KL", online("forward_kl")),
        "reverse_kl": ("+ reverse KL", online("reverse_kl")),
        "jsd": ("+ JSD (beta 0.5)", online("jsd", beta=0.5)),
    }
    configs = {every[key][0]: every[key][1] for key in args.runs if key in every}
    if "cache" in args.runs:
        configs.update({f"+ top-{k} cache KD (forward KL)": cached(k) for k in args.k})
    grid: list[tuple[float, float]] = [(args.student_lr, args.kd_weight)]
    if args.sweep:  # the learning rate on CE alone and forward KL, the KD weight on forward KL
        grid = [(lr, w) for lr in (3e-3, 1e-2) for w in (0.5, 1.0)]
        configs = {name: configs[name] for name in ("CE alone", "+ forward KL")}
        args.seeds = 1
    rows: dict[str, list[float]] = {}
    run_seconds: dict[str, list[float]] = {}
    for lr, weight in grid:
        for seed in range(args.seeds):
            for name, make_callbacks in configs.items():
                if args.sweep and name == "CE alone" and weight != grid[0][1]:
                    continue  # the weight does not change CE alone
                label = f"lr {lr:g}, weight {weight:g}: {name}" if args.sweep else name
                with tempfile.TemporaryDirectory() as tmp:
                    begun = time.perf_counter()
                    callbacks = make_callbacks(Path(tmp), weight)
                    lr_used = args.ce_lr if name == "CE alone" and not args.sweep else lr
                    student = train(
                        student_config, student_rows, args.student_steps, lr_used, args.batch_size, seed, callbacks
                    )
                    run_seconds.setdefault(label, []).append(time.perf_counter() - begun)
                value = perplexity(student.model, held_out, limit=args.eval_rows)
                rows.setdefault(label, []).append(value)
                print(
                    f"seed {seed} {label}: {evaluate_on} ppl {value:.3f} ({run_seconds[label][-1]:.0f} s)", flush=True
                )
    minutes = (time.perf_counter() - started) / 60
    student_params = sum(p.numel() for p in student.model.parameters())
    split_text = ", ".join(
        f"{split} {s['files']} files / {s['bytes'] / 1e6:.2f} MB / {s['tokens'] / 1e6:.3f} M tokens / {s['rows']} rows"
        for split, s in stats.items()
    )
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python -m benchmarks.accuracy_distillation_corpus", *given])
    if args.sweep:
        settings = "AdamW learning rate and KD weight as each row says"
        chosen = "The validation sweep that chose the learning rates and the KD weight of the test table."
    else:
        settings = f"AdamW lr {args.ce_lr:g} alone, {args.student_lr:g} with KD, KD weight {args.kd_weight:g}"
        chosen = "The learning rates and the KD weight were chosen on the validation split (`--sweep`), never on test."
    lines = [
        "### accuracy: distillation, language model on a real corpus (Python standard library source)",
        "",
        f"Corpus: the `.py` files of this Python's standard library (no tests, no site-packages), split by "
        f"file: {split_text} of {args.context} tokens; byte-level BPE (vocabulary {vocab}) trained on the "
        f"training files only. Teacher: Llama-style, hidden {args.teacher_hidden}, {args.teacher_layers} layers, "
        f"{record['parameters'] / 1e6:.2f} M parameters, every training row, {args.teacher_steps} steps of "
        f"{args.batch_size} rows, AdamW lr {args.teacher_lr:g}; trained once in {record['seconds'] / 60:.1f} min: "
        f"val ppl {record['val_ppl']:.2f}, **test ppl {record['test_ppl']:.2f}**. Student: hidden "
        f"{args.student_hidden}, {args.student_layers} layers, {student_params / 1e6:.2f} M parameters, "
        f"{args.student_rows} training rows drawn once, {args.student_steps} steps of {args.batch_size} rows, AdamW "
        f"{settings} (warm-up, cosine to 10%); KD terms at temperature 1 beside the cross-entropy; cache "
        f"top-{', '.join(map(str, args.k))}. {chosen} {args.seeds} seed(s); {evaluate_on} perplexity, mean ± std "
        f"(lower is better). Wall time {minutes:.1f} min with {args.threads} torch thread(s) on a 2-core machine "
        f"shared with other jobs{reused}. Command: `{command}`.",
        "",
        f"| student | {evaluate_on} perplexity | s / run |",
        "|---|---:|---:|",
    ]
    for name, values in rows.items():
        lines.append(f"| {name} | {_mean_std(values)} | {statistics.mean(run_seconds[name]):.0f} |")
    table = "\n".join(lines)
    print(table)
    if not args.smoke:
        out = args.out.with_name(args.out.stem + "_sweep.md") if args.sweep else args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n")


if __name__ == "__main__":
    main()

"""Language-model distillation on generated sequences: student alone vs + KD, online and from the cache.

Setting (offline, CPU-sized). A synthetic grammar: each sequence starts with one of ``--topics``
topic tokens; every next token is drawn from a sparse distribution (4 successors with Dirichlet
weights) that depends on the previous token *and* the topic, so a model must look back to the
first token. The exact per-token negative log-likelihood of the generating process on the test
sequences is the floor no model can beat.

- teacher: a causal transformer (``d_model`` 64, 2 layers) trained on ``--teacher-sequences``;
- student: a smaller one (``d_model`` 16, 1 layer) trained on only ``--student-sequences``, with

  - ``student``: cross-entropy alone;
  - ``+KD online``: ``TeacherDistillation(teacher, loss="kd", temperature=1)``: the teacher runs
    on every step;
  - ``+KD cache top-k``: the same from a teacher-logit cache holding the top-k logits per token
    (:func:`~lightning_logits.teacher_cache.build_teacher_cache` on ``[N, T]`` rows);
  - ``+DKD online``: ``loss="dkd"`` (T = 1, alpha 1, beta 8, no warm-up).

Reported: test cross-entropy of the next token (nats/token, lower is better), mean ± std over
seeds, with the teacher's and the grammar's floor.

    python -m benchmarks.accuracy_distillation_lm            # 3 seeds
    python -m benchmarks.accuracy_distillation_lm --smoke    # 1 seed, few steps: checks it runs
"""

from __future__ import annotations

import argparse
import logging
import statistics
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
from torch.utils.data import DataLoader, Dataset

from benchmarks.harness import quiet_trainer
from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.teacher_cache import build_teacher_cache

ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- the grammar
class TopicGrammar:
    """A topic-conditioned first-order Markov chain over ``vocab`` tokens (the first ``topics`` are topic tokens).

    ``transition[topic, previous]`` is a distribution over the next token with ``branching``
    non-zero entries (Dirichlet(0.5) weights), fixed by ``seed``.
    """

    def __init__(self, vocab: int = 48, topics: int = 4, branching: int = 4, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.topics = vocab, topics
        table = torch.zeros(topics, vocab, vocab)
        for topic in range(topics):
            for prev in range(vocab):
                nxt = torch.randperm(vocab - topics, generator=g)[:branching] + topics
                # Dirichlet(1/2) from the seeded generator: Gamma(1/2) variables are Z^2 / 2, normalized
                weights = torch.randn(branching, generator=g).pow(2) / 2
                table[topic, prev, nxt] = weights / weights.sum()
        self.transition = table

    def sample(self, num: int, length: int, seed: int) -> Tensor:
        """``[num, length]`` int64 token sequences: a topic token, then ``length - 1`` chain steps."""
        g = torch.Generator().manual_seed(seed)
        tokens = torch.empty(num, length, dtype=torch.long)
        topic = torch.randint(0, self.topics, (num,), generator=g)
        tokens[:, 0] = topic
        for i in range(1, length):
            probs = self.transition[topic, tokens[:, i - 1]]
            tokens[:, i] = torch.multinomial(probs, 1, generator=g).squeeze(1)
        return tokens

    def nll(self, tokens: Tensor) -> float:
        """The generating process's mean negative log-likelihood of tokens ``1..T-1`` (nats/token)."""
        topic = tokens[:, :1].expand(-1, tokens.shape[1] - 1)
        probs = self.transition[topic, tokens[:, :-1], tokens[:, 1:]]
        return float(-probs.log().mean())


class SequenceDataset(Dataset):
    """``(input [T-1], target [T-1], index)`` next-token pairs of token sequences ``[N, T]``."""

    def __init__(self, tokens: Tensor) -> None:
        self.tokens = tokens

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        row = self.tokens[i]
        return row[:-1], row[1:], i


# --------------------------------------------------------------------------- the model
class TinyCausalLM(pl.LightningModule):
    """A small causal transformer LM, the kind of user module TeacherDistillation has to work with.

    ``forward(tokens [B, T]) -> logits [B, T, V]``; ``training_step`` returns ``{"loss", "logits",
    "target"}`` with ``target`` ``[B, T]`` (``-100`` positions ignored), which is all the
    distillation callback needs.
    """

    def __init__(self, vocab: int, d_model: int = 32, layers: int = 1, heads: int = 2, max_len: int = 64,
                 lr: float = 3e-3) -> None:  # fmt: skip
        super().__init__()
        self.lr = lr
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Embedding(max_len, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(length, device=tokens.device))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        return self.lm_head(self.norm(self.blocks(x, mask=causal, is_causal=True)))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        tokens, target = batch[0], batch[1]
        logits = self(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits, "target": target}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)


@torch.no_grad()
def test_loss(model: nn.Module, tokens: Tensor) -> float:
    """Mean next-token cross-entropy (nats/token) of ``model`` on sequences ``[N, T]``."""
    was_training = model.training
    model.eval()
    logits = model(tokens[:, :-1])
    model.train(was_training)
    return float(F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()))


# --------------------------------------------------------------------------- runs
def _fit(module: TinyCausalLM, tokens: Tensor, steps: int, batch_size: int, callbacks: list[Callback]) -> None:
    loader = DataLoader(SequenceDataset(tokens), batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    trainer = quiet_trainer(max_steps=steps, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=loader)


def train_teacher(grammar: TopicGrammar, seed: int, sequences: int, length: int, steps: int) -> TinyCausalLM:
    pl.seed_everything(seed, verbose=False)
    teacher = TinyCausalLM(grammar.vocab, d_model=64, layers=2, heads=4, max_len=length)
    _fit(teacher, grammar.sample(sequences, length, seed=1000 + seed), steps, 32, [])
    return teacher.eval()


def train_student(
    grammar: TopicGrammar, seed: int, tokens: Tensor, steps: int, make_callbacks: Callable[[], list[Callback]]
) -> TinyCausalLM:
    pl.seed_everything(seed, verbose=False)
    student = TinyCausalLM(grammar.vocab, d_model=16, layers=1, heads=2, max_len=tokens.shape[1])
    _fit(student, tokens, steps, 16, make_callbacks())
    return student


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--length", type=int, default=33, help="tokens per sequence (input + 1)")
    parser.add_argument("--teacher-sequences", type=int, default=4000)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--student-sequences", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=600)
    parser.add_argument("--k", type=int, default=8, help="top-k logits per token in the cache")
    parser.add_argument("--smoke", action="store_true", help="1 seed, a few steps: checks that it runs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "distillation_lm.md")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    if args.smoke:
        args.seeds, args.teacher_steps, args.student_steps, args.teacher_sequences = 1, 5, 5, 64

    started = time.perf_counter()
    grammar = TopicGrammar()
    test_tokens = grammar.sample(1000, args.length, seed=99)
    floor = grammar.nll(test_tokens)
    rows: dict[str, list[float]] = {}
    teacher_losses = []
    for seed in range(args.seeds):
        teacher = train_teacher(grammar, seed, args.teacher_sequences, args.length, args.teacher_steps)
        teacher_losses.append(test_loss(teacher, test_tokens))
        tokens = grammar.sample(args.student_sequences, args.length, seed=2000 + seed)
        with tempfile.TemporaryDirectory() as tmp:
            loader = DataLoader(SequenceDataset(tokens), batch_size=64)
            build_teacher_cache(teacher, loader, Path(tmp) / "cache", k=args.k)
            configs: dict[str, Callable[[], list[Callback]]] = {
                "student": list,
                "+KD online (T=1)": lambda teacher=teacher: [TeacherDistillation(teacher, loss="kd", temperature=1.0)],
                f"+KD cache top-{args.k} (T=1)": lambda: [
                    TeacherDistillation(cache=str(Path(tmp) / "cache"), loss="kd", temperature=1.0)
                ],
                "+DKD online (T=1, beta=8)": lambda teacher=teacher: [
                    TeacherDistillation(teacher, loss="dkd", temperature=1.0, warmup_epochs=0)
                ],
            }
            for name, make_callbacks in configs.items():
                student = train_student(grammar, seed, tokens, args.student_steps, make_callbacks)
                value = test_loss(student, test_tokens)
                rows.setdefault(name, []).append(value)
                print(f"seed {seed} {name}: test CE {value:.4f}", flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = [
        "### accuracy: distillation, language model (generated sequences)",
        "",
        f"Topic grammar: vocabulary {grammar.vocab}, {grammar.topics} topics, 4 successors per token; "
        f"sequences of {args.length} tokens. Floor (the grammar's own NLL on the test set): {floor:.3f} "
        f"nats/token. Teacher (d_model 64, 2 layers, {args.teacher_sequences} sequences, "
        f"{args.teacher_steps} steps): {_mean_std(teacher_losses)}. Student: d_model 16, 1 layer, "
        f"{args.student_sequences} sequences, {args.student_steps} steps, AdamW lr 3e-3. {args.seeds} seed(s); "
        f"test next-token cross-entropy in nats/token, mean ± std (lower is better). Wall time {minutes:.1f} min.",
        "",
        "| student | test CE (nats/token) |",
        "|---|---:|",
    ]
    for name, values in rows.items():
        lines.append(f"| {name} | {_mean_std(values)} |")
    table = "\n".join(lines)
    print(table)
    if not args.smoke:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()

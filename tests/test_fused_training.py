"""CausalLM(logits="fused") and TeacherDistillation's fused path: training without the [B, T, V] logits.

The reference of every comparison is the unfused run: the same student, data and optimizer with
``logits="full"`` (``F.cross_entropy`` on the built logits and the distillation losses of
``functional.distillation``), whose values the other test files check against independent
derivations. The teacher is made sharp so that its term is as large as the cross-entropy: a
fused path that dropped or mis-scaled the term's gradient would change the weight updates by far
more than the tolerance.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.loss_terms import FusedHead, LossTermCallback, StepContext
from lightning_logits.modules import CausalLM
from lightning_logits.teacher_cache import build_teacher_cache
from tests.helpers import fast_trainer
from tests.test_causal_lm import _fixed_length_loader, _reads, _sgd, hf_model, llama, packed_loader
from tests.test_distillation_losses import reference

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed: pip install -e '.[dev]'"
)

FUSED_LOSSES = ["kd", "forward_kl", "reverse_kl", "jsd"]


def sharp_teacher(seed: int = 10) -> nn.Module:
    """A teacher whose distributions are far from the untrained student's (its term is O(1), not O(1e-3))."""
    teacher = hf_model(llama(hidden=64), seed=seed).eval()
    with torch.no_grad():
        teacher.get_output_embeddings().weight.mul_(30.0)
    return teacher


class Steps(pl.Callback):
    """Records the step values every step logs (``log_every_n_steps=1``) and the weights before training."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.start: dict[str, Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        metrics = trainer.callback_metrics
        self.rows.append({k: float(v) for k, v in metrics.items() if k.endswith("_step")})


def run(
    mode: str,
    student: nn.Module,
    callbacks: list[pl.Callback],
    loader: Any,
    steps: int = 2,
    val: Any = None,
) -> tuple[Steps, CausalLM, pl.Trainer]:
    steps_cb = Steps()
    # 24-token chunks: the 64-token batches take three (the default chunk would be the whole batch here)
    module = CausalLM(copy.deepcopy(student), optimizer=_sgd, logits=mode, fused_chunk_size=24)  # type: ignore[arg-type]
    trainer = fast_trainer(
        max_epochs=1,
        limit_train_batches=steps,
        log_every_n_steps=1,
        limit_val_batches=0 if val is None else 2,
        callbacks=[*callbacks, steps_cb],
    )
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=val)
    return steps_cb, module, trainer


def assert_same_training(full: tuple[Steps, CausalLM, pl.Trainer], fused: tuple[Steps, CausalLM, pl.Trainer]) -> None:
    """Same logged step values, and the same weight updates (not only the same weights) after the run."""
    (a, module_a, _), (b, module_b, _) = full, fused
    assert len(a.rows) == len(b.rows) > 1
    for row_a, row_b in zip(a.rows, b.rows, strict=True):
        assert row_a.keys() == row_b.keys() and "train/loss_step" in row_a
        for key in row_a:
            assert row_b[key] == pytest.approx(row_a[key], rel=2e-5, abs=1e-6), key
    after_a, after_b = module_a.state_dict(), module_b.state_dict()
    moved = 0.0
    for key, before in a.start.items():
        delta_a, delta_b = after_a[key] - before, after_b[key] - b.start[key]
        torch.testing.assert_close(delta_b, delta_a, rtol=1e-4, atol=1e-6 * (1 + float(delta_a.abs().max())))
        moved = max(moved, float(delta_a.abs().max()))
    assert moved > 1e-3  # the steps did train


@pytest.fixture(autouse=True)
def _count_module_cross_entropy(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts CausalLM's own fused cross-entropy calls (a one-pass fused distillation step makes none)."""
    calls: list[int] = []
    original = CausalLM._fused_cross_entropy

    def counted(self: CausalLM, *args: Any, **kwargs: Any) -> Tensor:
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CausalLM, "_fused_cross_entropy", counted)
    return calls


# --------------------------------------------------------------------------- cross-entropy alone
def test_fused_cross_entropy_trains_as_the_full_logits(_count_module_cross_entropy: list[int]) -> None:
    student = hf_model(llama(), seed=0)
    val = packed_loader(seed=3)
    full = run("full", student, [], packed_loader(), val=val)
    fused = run("fused", student, [], packed_loader(), val=val)
    assert_same_training(full, fused)
    assert _count_module_cross_entropy  # the fused module computed its loss itself
    for key in ("val/loss", "val/ppl", "train/ppl"):
        assert float(fused[2].callback_metrics[key]) == pytest.approx(float(full[2].callback_metrics[key]), rel=1e-5)


def test_padded_and_packed_batches_give_the_full_loss() -> None:
    model = hf_model(llama(), seed=0)
    full, fused = CausalLM(model, logits="full"), CausalLM(model, logits="fused")
    ids = torch.randint(0, 256, (3, 10), generator=torch.Generator().manual_seed(1))
    left = torch.ones_like(ids)
    left[0, :9] = 0  # the first row's probe tokens are all padding
    left[1, :3] = 0
    packed = next(iter(packed_loader(batch_size=3)))
    for batch in ({"input_ids": ids, "attention_mask": left}, packed, {"input_ids": ids, "labels": ids}):
        want, got = full.training_step(batch, 0), fused.training_step(batch, 0)
        assert got["loss"].item() == pytest.approx(want["loss"].item(), rel=1e-5)
        assert torch.equal(got["target"], want["target"]) and "logits" not in got
        torch.testing.assert_close(F.linear(got["hidden_states"], got["head_weight"]), want["logits"])


# --------------------------------------------------------------------------- distillation
@pytest.mark.parametrize("loss", FUSED_LOSSES)
def test_online_teacher_fused_equals_unfused(loss: str, _count_module_cross_entropy: list[int]) -> None:
    student, teacher = hf_model(llama(), seed=0), sharp_teacher()
    kwargs: dict[str, Any] = {"temperature": 2.0, "weight": 0.7, "chunk_size": 24}
    if loss == "jsd":
        kwargs["beta"] = 0.3
    full = run("full", student, [TeacherDistillation(teacher, loss=loss, **kwargs)], packed_loader())
    assert full[0].rows[0][f"train/loss_{loss}_step"] > 0.04 * full[0].rows[0]["train/loss_step"]  # a material term
    _count_module_cross_entropy.clear()
    fused = run("fused", student, [TeacherDistillation(teacher, loss=loss, **kwargs)], packed_loader())
    assert_same_training(full, fused)
    # one pass: the callback computed the cross-entropy with its term, the module never did
    assert not _count_module_cross_entropy


def _cache_callbacks(path: str) -> list[pl.Callback]:
    # the first computes the cross-entropy in its pass, the three others their term alone
    return [
        TeacherDistillation(cache=path, loss="kd", temperature=2.0, weight=0.5, chunk_size=40),
        TeacherDistillation(cache=path, loss="forward_kl", weight=0.3),
        TeacherDistillation(cache=path, loss="reverse_kl", temperature=1.5, weight=0.4),
        TeacherDistillation(cache=path, loss="jsd", beta=0.7, weight=0.6),
    ]


def test_top_k_cache_fused_equals_unfused_for_every_loss(tmp_path: Path) -> None:
    loader = _fixed_length_loader(num=12, length=12)
    build_teacher_cache(sharp_teacher(seed=12), loader, tmp_path / "top8", k=8)
    student = hf_model(llama(), seed=0)
    full = run("full", student, _cache_callbacks(str(tmp_path / "top8")), loader)
    fused = run("fused", student, _cache_callbacks(str(tmp_path / "top8")), loader)
    assert {f"train/loss_{name}_step" for name in FUSED_LOSSES} <= full[0].rows[0].keys()
    assert_same_training(full, fused)


def test_token_cache_fused_equals_unfused(tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from lightning_logits.teacher_cache import build_token_cache
    from tests.test_token_cache import _rows, documents

    docs = documents(count=20)
    build_token_cache(sharp_teacher(seed=13), docs, tmp_path / "tok", k=8)
    loader = DataLoader(_rows(docs), batch_size=4)  # packed rows with token_index

    def callbacks() -> list[pl.Callback]:
        return [
            TeacherDistillation(cache=str(tmp_path / "tok"), loss="forward_kl", weight=0.5, chunk_size=24),
            TeacherDistillation(cache=str(tmp_path / "tok"), loss="jsd", beta=0.3, chunk_size=24),
        ]

    student = hf_model(llama(), seed=0)
    full, fused = run("full", student, callbacks(), loader), run("fused", student, callbacks(), loader)
    assert full[0].rows[0]["train/loss_jsd_step"] > 0.01
    assert_same_training(full, fused)


def test_unsupported_losses_are_refused_naming_the_supported_ones() -> None:
    teacher, loader = sharp_teacher(), packed_loader()
    for callback in (
        TeacherDistillation(teacher, loss="tv"),
        TeacherDistillation(teacher, loss="kd", standardize=True),
        TeacherDistillation(teacher, loss=lambda s, t, **kw: (s - t).pow(2).mean()),
    ):
        module = CausalLM(hf_model(llama(), seed=0), optimizer=_sgd, logits="fused")
        with pytest.raises(ValueError, match=r"\['kd', 'forward_kl', 'reverse_kl', 'jsd'\].*logits='full'"):
            fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback]).fit(module, train_dataloaders=loader)

    class ReadsLogits(LossTermCallback):
        def loss_term(self, context: StepContext) -> Tensor:
            return context.logits.mean()

    module = CausalLM(hf_model(llama(), seed=0), optimizer=_sgd, logits="fused")
    with pytest.raises(RuntimeError, match=r"built no \[B, T, V\] logits.*logits='full'"):
        fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[ReadsLogits("logit_mean")]).fit(
            module, train_dataloaders=loader
        )


def test_models_the_fused_head_cannot_serve_are_refused() -> None:
    ids = {"input_ids": torch.randint(0, 256, (2, 6))}
    with pytest.raises(ValueError, match="logits must be 'full'"):
        CausalLM(hf_model(llama(), seed=0), logits="chunked")  # type: ignore[arg-type]
    plain = CausalLM(nn.Sequential(nn.Embedding(256, 8), nn.Linear(8, 256)), logits="fused")
    with pytest.raises(LookupError, match=r"no base model.*logits='full'"):
        plain.training_step(ids, 0)

    class SoftCapped(transformers.LlamaForCausalLM):  # type: ignore[misc]
        def forward(self, *args: Any, **kwargs: Any) -> Any:
            out = super().forward(*args, **kwargs)
            out.logits = 5.0 * torch.tanh(out.logits / 5.0)
            return out

    torch.manual_seed(0)
    capped = CausalLM(SoftCapped(llama()), logits="fused")
    with torch.no_grad():
        capped.model.get_output_embeddings().weight.mul_(50.0)  # logits far beyond the cap
    with pytest.raises(ValueError, match=r"soft-capping or scaling.*logits='full'"):
        capped.training_step(ids, 0)


# --------------------------------------------------------------------------- no [B, T, V] tensor
class LargeTensors(TorchDispatchMode):
    """Records every tensor an operation returns with at least ``limit`` elements (views included).

    Not recorded: what the teacher's forward pass computes (``paused``) and views of the teacher's
    output (its storage in ``teacher_storage``): the teacher's logits are an input of the loss.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.paused = limit, False
        self.seen: list[tuple[str, tuple[int, ...]]] = []
        self.teacher_storage: set[int] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not self.paused:
            for value in tree_leaves(out):
                large = isinstance(value, Tensor) and value.numel() >= self.limit
                if large and value.untyped_storage().data_ptr() not in self.teacher_storage:
                    self.seen.append((str(func), tuple(value.shape)))
        return out


class WatchStep(pl.Callback):
    """Watches each training step from the batch's start to the end of backward (teacher forward passes excluded)."""

    def __init__(self, limit: int, teacher: nn.Module | None = None) -> None:
        self.mode = LargeTensors(limit)
        self.teacher = teacher
        self.watching = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.teacher is not None:  # the teacher's own [B, T, V] logits are an input of the loss, not the student's
            self.teacher.register_forward_pre_hook(lambda *_: setattr(self.mode, "paused", True))
            self.teacher.register_forward_hook(self._teacher_done)

    def _teacher_done(self, module: nn.Module, args: Any, output: Any) -> None:
        self.mode.paused = False
        self.mode.teacher_storage.add(output.logits.untyped_storage().data_ptr())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        # from the second step: the first one's argument checks read the teacher in pieces of 4M elements (all
        # of it at these tiny sizes); they are bounded, not [B, T, V]
        self.watching = idx > 0
        if self.watching:
            self.mode.__enter__()

    def on_before_optimizer_step(self, *args: Any) -> None:
        if self.watching:
            self.mode.__exit__(None, None, None)


def _largest(mode: str, callbacks: list[pl.Callback], loader: Any, watch: WatchStep) -> list[tuple[str, tuple]]:  # type: ignore[type-arg]
    # 16-token chunks: at these sizes the default chunk (at least 64 tokens) would be the whole batch
    module = CausalLM(hf_model(llama(), seed=0), optimizer=_sgd, logits=mode, fused_chunk_size=16)  # type: ignore[arg-type]
    fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[*callbacks, watch]).fit(module, train_dataloaders=loader)
    return watch.mode.seen


def test_the_fused_step_allocates_no_full_logits(tmp_path: Path) -> None:
    loader = _fixed_length_loader(num=8, length=16)  # batches of 4 x 16 = 64 tokens; V = 256, H = 32
    limit = 4 * 16 * 256  # a [B, T, V] tensor; the largest parameter (the embedding, V x H) has 8192 elements
    # the detector sees the logits of the full path (and nothing else that large)
    full = _largest("full", [], loader, WatchStep(limit))
    assert full and all(256 in shape for _, shape in full)  # the logits, their views and gradients
    assert _largest("fused", [], loader, WatchStep(limit)) == []
    teacher = sharp_teacher()
    callbacks = [TeacherDistillation(teacher, loss="jsd", temperature=2.0, chunk_size=16)]
    assert _largest("fused", callbacks, loader, WatchStep(limit, teacher)) == []
    build_teacher_cache(teacher, loader, tmp_path / "top8", k=8)
    callbacks = [TeacherDistillation(cache=str(tmp_path / "top8"), loss="reverse_kl", chunk_size=16)]
    assert _largest("fused", callbacks, loader, WatchStep(limit)) == []  # the top-k rows are never rebuilt


def test_the_fused_step_adds_no_host_reads() -> None:
    loader = _fixed_length_loader(num=32, length=8)
    teacher = sharp_teacher(seed=1)
    counts = {
        mode: _reads(
            CausalLM(hf_model(llama(), seed=0), optimizer=_sgd, logits=mode),  # type: ignore[arg-type]
            [TeacherDistillation(teacher, loss="jsd")],
            loader,
        )
        for mode in ("full", "fused")
    }
    assert counts["fused"].total == counts["full"].total, (dict(counts["fused"].sites), dict(counts["full"].sites))


# --------------------------------------------------------------------------- two processes
class RankChecked(TeacherDistillation):
    """Writes, per step, the fused term and the cross-entropy it provided beside the unfused values."""

    def __init__(self, teacher: nn.Module, out_dir: str) -> None:
        super().__init__(teacher, loss="jsd", beta=0.5, temperature=2.0)
        self.out_dir = out_dir

    def fused_loss_term(self, context: StepContext, head: FusedHead) -> Tensor:
        value = super().fused_loss_term(context, head)
        target = context.target
        keep = target != -100
        with torch.no_grad():
            logits = F.linear(head.hidden, head.weight, head.bias)[keep]
            want = reference("jsd", logits, self.teacher_logits(context)[keep], target[keep], 2.0)
            ce = F.cross_entropy(logits, target[keep])
        with (Path(self.out_dir) / f"rank{context.trainer.global_rank}.txt").open("a") as fh:
            fh.write(f"{value.item():.8f} {want:.8f} {context.task_loss.item():.8f} {ce.item():.8f}\n")
        return value


@pytest.mark.ddp
def test_ddp_spawn_two_ranks_train_fused(ddp_env: int, tmp_path: Path) -> None:
    callback = RankChecked(sharp_teacher(seed=14), str(tmp_path))
    torch.manual_seed(0)
    module = CausalLM(llama(), optimizer=_sgd, logits="fused")
    trainer = fast_trainer(strategy="ddp_spawn", devices=2, max_steps=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, train_dataloaders=packed_loader(batch_size=2))
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 2
        for line in lines:
            got, want, ce_got, ce_want = map(float, line.split())
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6) and got > 0.01
            assert ce_got == pytest.approx(ce_want, rel=1e-5)
    assert trainer.callback_metrics["train/loss_jsd_epoch"] > 0


# --------------------------------------------------------------------------- the benchmark
@pytest.mark.slow
def test_training_memory_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.memory_fused_training import main

    main(["--smoke"])  # in this process: every case once at a tiny size
    out = capsys.readouterr().out
    assert "### memory: a training step" in out
    for case in ("ce_full", "ce_fused", "kd_full", "kd_fused", "cache_full", "cache_fused"):
        assert f"| {case} |" in out

"""TeacherDistillation with DKD/DIST/DHKD/standardization/user losses on classifiers and a causal LM; cache; DDP."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from benchmarks.accuracy_distillation_lm import SequenceDataset, TinyCausalLM, TopicGrammar
from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.data.digits import DigitsDataModule
from lightning_logits.loss_terms import StepContext
from lightning_logits.modules.classifier import Classifier
from lightning_logits.networks import aux_modules
from lightning_logits.teacher_cache import build_teacher_cache
from tests.helpers import TensorDataModule, TinyMLP, TinyNet, blob_data, fast_trainer
from tests.test_distillation_losses import dhkd_ref, dist_ref, dkd_ref, kd_ref, nkd_ref


class Recording(TeacherDistillation):
    """Keeps (student logits, teacher logits, target, value, epoch) of every step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[tuple[Tensor, Tensor, Tensor, Tensor, int]] = []

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        student = self.student_logits(context).detach()
        self.records.append(
            (student, self.teacher_logits(context), context.target, value.detach(), context.trainer.current_epoch)
        )
        return value


def _np(x: Tensor) -> Any:
    return x.detach().double().reshape(-1, x.shape[-1]).numpy()


def _digits(**kwargs: Any) -> DigitsDataModule:
    return DigitsDataModule(**{"batch_size": 16, "train_fraction": 0.2, **kwargs})


# --------------------------------------------------------------------------- classifiers
@pytest.mark.parametrize(
    ("loss", "kwargs"),
    [
        ("dkd", {"temperature": 2.0, "alpha": 0.5, "beta": 4.0, "warmup_epochs": 2}),
        ("dist", {"temperature": 2.0, "beta": 2.0, "gamma": 0.5}),
        ("dhkd", {"temperature": 2.0}),
        ("kd", {"temperature": 2.0, "standardize": True}),
    ],
)
def test_trainer_run_adds_the_exact_term(loss: str, kwargs: dict[str, Any]) -> None:
    torch.manual_seed(0)
    callback = Recording(TinyNet(width=8), loss=loss, weight=0.7, **kwargs)
    module = Classifier(TinyNet(width=4))
    trainer = fast_trainer(max_epochs=2, limit_train_batches=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, datamodule=_digits())
    assert len(callback.records) == 4
    for student, teacher, target, value, epoch in callback.records:
        s, t = _np(student), _np(teacher)
        if loss == "dkd":
            # the warm-up factor min((epoch + 1) / 2, 1): 1/2 in the first epoch, then 1
            want = min((epoch + 1) / 2, 1.0) * dkd_ref(s, t, target.tolist(), 2.0, 0.5, 4.0)
        elif loss == "dist":
            want = dist_ref(s, t, 2.0, 2.0, 0.5)
        elif loss == "dhkd":
            want = dhkd_ref(s, t, 2.0)
        else:
            z = lambda a: (a - a.mean(1, keepdims=True)) / (a.std(1, ddof=1, keepdims=True) + 1e-7)  # noqa: E731
            want = kd_ref(z(s), z(t), 2.0)
        assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert f"train/loss_{loss}_epoch" in trainer.logged_metrics
    assert trainer.callback_metrics[f"train/loss_{loss}_epoch"] > 0


def test_dual_head_gets_the_term_and_the_main_head_keeps_only_cross_entropy(tmp_path: Path) -> None:
    torch.manual_seed(0)
    callback = TeacherDistillation(TinyNet(width=8), loss="dhkd", temperature=2.0)
    module = Classifier(TinyNet(width=4))
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, datamodule=_digits())
    head = aux_modules(module)["dual_head"]
    assert isinstance(head, nn.Linear) and (head.in_features, head.out_features) == (16, 10)
    assert any(key.startswith("lightning_logits_aux.dual_head.") for key in module.state_dict())
    # the term's gradient: on the auxiliary head and the backbone, none on the main head
    x = torch.randn(8, 1, 8, 8)
    features = module.model.features(x)
    teacher = TinyNet(width=8)(x).detach()
    term = callback.loss_fn(head(features), teacher, temperature=2.0)
    grads = torch.autograd.grad(term, [head.weight, module.model.fc.weight, module.model.features[0].weight],
                                allow_unused=True)  # fmt: skip
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None  # the main head is not on the term's path
    assert grads[2] is not None and grads[2].abs().sum() > 0
    # dropped for inference: the checkpoint loads into a plain Classifier, forward ignores the head
    path = tmp_path / "student.ckpt"
    trainer.save_checkpoint(path)
    loaded = Classifier.load_from_checkpoint(path, model=TinyNet(width=4))
    assert not any("dual_head" in key for key in loaded.state_dict())
    torch.testing.assert_close(loaded.eval()(x), module.cpu().eval()(x))


def test_user_callable_loss_with_the_same_signature() -> None:
    seen: list[dict[str, Any]] = []

    def l2_logits(logits: Tensor, teacher_logits: Tensor, **kwargs: Any) -> Tensor:
        seen.append(kwargs)
        return (logits - teacher_logits).pow(2).mean() * kwargs["scale"]

    torch.manual_seed(0)
    callback = Recording(TinyNet(width=8), loss=l2_logits, loss_kwargs={"scale": 3.0})
    assert callback.name == "distill" and callback.temperature == 1.0
    trainer = fast_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(Classifier(TinyNet(width=4)), datamodule=_digits())
    for student, teacher, _, value, _ in callback.records:
        assert value.item() == pytest.approx(3.0 * float((student - teacher).pow(2).mean()), rel=1e-5)
    # the value checks run on the first step only
    assert [kw["validate_args"] for kw in seen] == [True, False, False]
    assert set(seen[0]) == {"target", "temperature", "mask", "validate_args", "scale"}
    assert "train/loss_distill_epoch" in trainer.logged_metrics


def test_hyperparameter_validation_and_defaults() -> None:
    dkd = TeacherDistillation(TinyNet(), loss="dkd")
    assert (dkd.temperature, dkd.loss_kwargs, dkd.warmup_epochs) == (4.0, {"alpha": 1.0, "beta": 8.0}, 20.0)
    dist = TeacherDistillation(TinyNet(), loss="dist", gamma=2.0)
    assert dist.loss_kwargs == {"beta": 1.0, "gamma": 2.0} and dist.warmup_epochs == 0.0
    assert TeacherDistillation(TinyNet(), loss="dhkd").temperature == 2.0
    assert TeacherDistillation(TinyNet(), loss="kd", alpha=5.0).loss_kwargs == {}  # ignored by KD
    with pytest.raises(ValueError, match="loss must be one of"):
        TeacherDistillation(TinyNet(), loss="rkd")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="warmup_epochs must be"):
        TeacherDistillation(TinyNet(), loss="dkd", warmup_epochs=-1)
    with pytest.raises(ValueError, match="None for DIST"):
        TeacherDistillation(TinyNet(), loss="dist", chunk_size=64)
    with pytest.raises(ValueError, match="beta must be a finite number"):
        TeacherDistillation(TinyNet(), loss="dkd", beta=math.inf)
    state = TeacherDistillation(TinyNet(), loss="dkd", standardize=True).state_dict()
    assert state["version"] == 2 and state["loss_kwargs"] == {"alpha": 1.0, "beta": 8.0} and state["standardize"]


# --------------------------------------------------------------------------- causal language model
def _lm_data(num: int = 24, length: int = 9, vocab: int = 20) -> tuple[Tensor, DataLoader]:
    tokens = TopicGrammar(vocab=vocab, topics=2, seed=1).sample(num, length, seed=3)
    return tokens, DataLoader(SequenceDataset(tokens), batch_size=8, shuffle=False)


class PaddedLM(TinyCausalLM):
    """Marks the last two target tokens of every sequence as padding (-100)."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        tokens, target = batch[0], batch[1].clone()
        target[:, -2:] = -100
        return super().training_step((tokens, target), batch_idx)


@pytest.mark.parametrize("loss", ["kd", "nkd", "dkd", "dhkd"])
def test_causal_lm_distills_over_the_non_ignored_tokens_chunked(loss: str) -> None:
    _, loader = _lm_data()
    torch.manual_seed(0)
    teacher = TinyCausalLM(20, d_model=16, layers=1, heads=2).eval()
    runs = []
    for chunk_size in (None, 5):
        torch.manual_seed(1)
        student = PaddedLM(20, d_model=8, layers=1, heads=2)
        callback = Recording(teacher, loss=loss, temperature=2.0, chunk_size=chunk_size, warmup_epochs=0)
        fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(student, train_dataloaders=loader)
        runs.append(callback.records)
    for (s1, t1, y1, v1, _), (s2, _, _, v2, _) in zip(*runs, strict=True):
        assert s1.shape == (8, 8, 20) and y1.shape == (8, 8) and (y1[:, -2:] == -100).all()
        keep = y1 != -100
        s, t, y = _np(s1[keep]), _np(t1[keep]), y1[keep].tolist()
        if loss == "kd":
            want = kd_ref(s, t, 2.0)
        elif loss == "dkd":
            want = dkd_ref(s, t, y, 2.0, 1.0, 8.0)
        elif loss == "dhkd":
            want = dhkd_ref(s, t, 2.0)
        else:
            want = nkd_ref(s, t, y, 2.0, 1.5)
        assert v1.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
        torch.testing.assert_close(s2, s1, rtol=1e-4, atol=1e-5)  # chunked training took the same steps
        torch.testing.assert_close(v2, v1, rtol=1e-4, atol=1e-5)


def test_causal_lm_from_a_sequence_cache_matches_online(tmp_path: Path) -> None:
    _, loader = _lm_data()
    torch.manual_seed(0)
    teacher = TinyCausalLM(20, d_model=16, layers=1, heads=2).eval()
    build_teacher_cache(teacher, loader, tmp_path / "cache", k=20)  # k = V: exact up to float16
    records = []
    for callback in (
        Recording(teacher, loss="kd", temperature=1.0),
        Recording(cache=str(tmp_path / "cache"), loss="kd", temperature=1.0),
    ):
        torch.manual_seed(1)
        student = TinyCausalLM(20, d_model=8, layers=1, heads=2)
        fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(student, train_dataloaders=loader)
        records.append(callback.records)
    for (s1, t1, _, v1, _), (s2, t2, _, v2, _) in zip(*records, strict=True):
        torch.testing.assert_close(s2, s1, rtol=1e-3, atol=1e-3)  # the same student steps (fp16 cache)
        assert t2.shape == (8, 8, 20)
        torch.testing.assert_close(t2, t1, rtol=1e-3, atol=5e-3)
        torch.testing.assert_close(v2, v1, rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- DDP
class RankLogging(TeacherDistillation):
    def __init__(self, teacher: nn.Module, out_dir: str) -> None:
        super().__init__(teacher, loss="dkd", temperature=2.0, warmup_epochs=0)
        self.out_dir = out_dir

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        ref = dkd_ref(_np(context.logits), _np(self.teacher_logits(context)), context.target.tolist(), 2.0, 1.0, 8.0)
        with (Path(self.out_dir) / f"rank{context.trainer.global_rank}.txt").open("a") as fh:
            fh.write(f"{value.item():.7f} {ref:.7f}\n")
        return value


def _adamw(params):  # type: ignore[no-untyped-def]
    return torch.optim.AdamW(params, lr=0.01)


@pytest.mark.ddp
def test_ddp_spawn_two_ranks_with_dkd(ddp_env: int, tmp_path: Path) -> None:
    x, y = blob_data(n=64)
    torch.manual_seed(1)
    callback = RankLogging(TinyMLP(), str(tmp_path))
    torch.manual_seed(0)
    module = Classifier(TinyMLP(), optimizer=_adamw)
    trainer = fast_trainer(strategy="ddp_spawn", devices=2, max_steps=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, datamodule=TensorDataModule(x, y, batch_size=8))
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 2
        for line in lines:
            got, want = map(float, line.split())
            assert got == pytest.approx(want, rel=1e-5, abs=1e-6) and got > 0
    assert trainer.callback_metrics["train/loss_dkd_epoch"] > 0


# --------------------------------------------------------------------------- recipes
ROOT = Path(__file__).resolve().parent.parent
NEW_DIGITS_RECIPES = {"dkd": "beta: 8.0", "dist": "gamma: 1.0", "dhkd": "loss: dhkd", "kd_ls": "standardize: true"}


def test_new_recipes_parse(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_logits.cli import build_cli

    expected = {f"digits_student_{key}.yaml": value for key, value in NEW_DIGITS_RECIPES.items()}
    expected["cifar100_resnet34_resnet18_dkd.yaml"] = "warmup_epochs: 20.0"
    expected["cifar100_resnet34_resnet18_dhkd.yaml"] = "loss: dhkd"
    for name, needle in expected.items():
        with pytest.raises(SystemExit) as exit_info:
            build_cli(["fit", "--config", str(ROOT / "recipes/distillation" / name), "--print_config"])
        assert exit_info.value.code == 0
        printed = capsys.readouterr().out
        assert needle in printed, (name, printed[:2000])
        if "cifar100" in name:
            assert "weight_decay: 0.0005" in printed and "lr: 0.05" in printed and "max_epochs: 240" in printed


@pytest.mark.slow
def test_new_digits_recipes_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_logits.cli import build_cli

    monkeypatch.chdir(tmp_path)
    fast = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1"]
    torch.manual_seed(0)
    build_cli(["fit", "--config", str(ROOT / "recipes/distillation/digits_teacher.yaml"), *fast])
    teacher = tmp_path / "runs/distillation/teacher/teacher.ckpt"
    for key in NEW_DIGITS_RECIPES:
        recipe = ROOT / f"recipes/distillation/digits_student_{key}.yaml"
        cli = build_cli(["fit", "--config", str(recipe), *fast, "--distillation.teacher", str(teacher)])
        name = "kd" if key == "kd_ls" else key
        assert f"train/loss_{name}_epoch" in cli.trainer.callback_metrics

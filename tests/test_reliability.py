"""Nothing silently wrong (issue 12): wrong caches, weak teachers, bad hyperparameters, unreadable
checkpoints and moved working directories fail or warn with what to do."""

from __future__ import annotations

import json
import shlex
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.callbacks.lawn import LAWN
from lightning_logits.callbacks.replay import UER, ExperienceReplay
from lightning_logits.callbacks.uskd import USKD
from lightning_logits.cli import cache_main
from lightning_logits.data.digits import DigitsDataModule, IndexedTensorDataset
from lightning_logits.loss_terms import StepContext
from lightning_logits.modules.classifier import Classifier
from lightning_logits.networks.factory import load_teacher
from lightning_logits.teacher_cache import build_teacher_cache
from tests.helpers import TinyNet, fast_trainer
from tests.test_distillation import TINY, _teacher_checkpoint


class CountingDistillation(TeacherDistillation):
    """Counts the steps whose term it computed."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.steps = 0

    def loss_term(self, context: StepContext) -> Tensor:
        self.steps += 1
        return super().loss_term(context)


def _digits(**kwargs) -> DigitsDataModule:  # type: ignore[no-untyped-def]
    return DigitsDataModule(**{"batch_size": 16, **kwargs})


# --------------------------------------------------------------------------- 1. cache fingerprint
def _build_cache(out: Path, data_args: dict) -> None:
    teacher = ["--teacher", TINY, "--num-classes", "10", "--model-kwargs", '{"in_chans": 1}']
    cache_main([*teacher, "--k", "3", "--out", str(out), "--data-args", json.dumps(data_args), "--device", "cpu"])


def test_cache_records_what_it_was_built_on(tmp_path: Path) -> None:
    _build_cache(tmp_path / "cache", {"train_fraction": 0.25})
    meta = json.loads((tmp_path / "cache/meta.json").read_text())
    dm = DigitsDataModule(train_fraction=0.25)
    dm.setup("fit")
    labels = dm.splits["train"][1]
    fingerprint = meta["data_fingerprint"]
    assert fingerprint["num_samples"] == len(labels) == meta["num_samples"]
    assert fingerprint["class_counts"] == torch.bincount(labels).tolist()
    import hashlib

    assert fingerprint["labels_sha1"] == hashlib.sha1(labels.numpy().astype("int64").tobytes()).hexdigest()[:16]
    assert meta["data"] == {
        "class_path": "lightning_logits.data.DigitsDataModule",
        "init_args": {"train_fraction": 0.25},
        "split": "train",
    }


@pytest.mark.parametrize("other", [{"train_fraction": 0.1}, {"train_fraction": 0.25, "seed": 1}])
def test_cache_built_on_other_data_is_refused_before_the_first_step(tmp_path: Path, other: dict) -> None:
    out = tmp_path / "cache"
    _build_cache(out, {"train_fraction": 0.25})
    recorded = json.loads((out / "meta.json").read_text())["data_fingerprint"]["labels_sha1"]
    callback = CountingDistillation(cache=str(out))
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    student = _digits(return_index=True, **other)
    with pytest.raises(ValueError, match="was built on other data than this run trains on") as info:
        trainer.fit(Classifier(TinyNet()), datamodule=student)
    message = str(info.value)
    student.setup("fit")
    from lightning_logits.teacher_cache import label_fingerprint

    current = label_fingerprint(student.splits["train"][1])["labels_sha1"]
    assert recorded in message and current in message and recorded != current
    teacher = f"--teacher {TINY} --num-classes 10 --model-kwargs '{{\"in_chans\": 1}}'"
    assert f"lightning-logits-cache {teacher} --data lightning_logits.data.digits.DigitsDataModule" in message
    assert f'"train_fraction": {other["train_fraction"]}' in message and f"--out {out}" in message
    assert callback.steps == 0
    # the command in the message rebuilds a cache that this run accepts
    command = shlex.split(message.split("`")[1])
    assert command[0] == "lightning-logits-cache"
    cache_main([*command[1:], "--device", "cpu"])
    callback = CountingDistillation(cache=str(out))
    fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback]).fit(
        Classifier(TinyNet()), datamodule=_digits(return_index=True, **other)
    )
    assert callback.steps == 1


def test_cache_on_the_matching_split_trains_and_an_old_cache_warns(tmp_path: Path) -> None:
    out = tmp_path / "cache"
    _build_cache(out, {"train_fraction": 0.25})
    callback = CountingDistillation(cache=str(out))
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(Classifier(TinyNet()), datamodule=_digits(return_index=True, train_fraction=0.25))
    assert callback.steps == 2
    # a cache written before fingerprints existed: trains, with one warning that it is unchecked
    meta = json.loads((out / "meta.json").read_text())
    del meta["data_fingerprint"], meta["data"]
    (out / "meta.json").write_text(json.dumps(meta))
    callback = CountingDistillation(cache=str(out))
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback])
    with pytest.warns(UserWarning, match="records no fingerprint of the data") as record:
        trainer.fit(Classifier(TinyNet()), datamodule=_digits(return_index=True, train_fraction=0.1))
    assert callback.steps == 2
    assert sum("records no fingerprint" in str(w.message) for w in record) == 1


# --------------------------------------------------------------------------- 5. weak teacher
class TargetRecordingDistillation(CountingDistillation):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.targets: list[Tensor] = []

    def loss_term(self, context: StepContext) -> Tensor:
        self.targets.append(context.target.detach().clone())
        return super().loss_term(context)


def _always_class_zero() -> nn.Module:
    """A teacher that predicts class 0 for every input: right on exactly the class-0 samples."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([5.0] + [0.0] * 9))
    return net


def test_teacher_accuracy_is_logged_and_a_near_chance_teacher_warns_once() -> None:
    callback = TargetRecordingDistillation(_always_class_zero(), loss="kd")
    trainer = fast_trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, callbacks=[callback])
    with pytest.warns(UserWarning, match=r"the teacher is only .*% accurate .*chance with 10 classes: 10.0%") as record:
        trainer.fit(Classifier(TinyNet()), datamodule=_digits())
    assert sum("accurate on the training batches" in str(w.message) for w in record) == 1  # once, not per epoch
    last_epoch = torch.cat(callback.targets[3:])  # equal batches: the epoch mean is the mean over samples
    want = (last_epoch == 0).float().mean().item()
    assert trainer.callback_metrics["kd/teacher_acc"].item() == pytest.approx(want, abs=1e-6)
    assert want < 0.15


def test_an_accurate_teacher_does_not_warn(tmp_path: Path) -> None:
    # An oracle "teacher" through a cache: its logits are 5 * one_hot(label), built on the student's split.
    dm = _digits(return_index=True, train_fraction=0.3)
    dm.setup("fit")
    labels = dm.splits["train"][1]
    oracle = IndexedTensorDataset(5.0 * F.one_hot(labels, 10).float(), labels)
    build_teacher_cache(nn.Identity(), DataLoader(oracle, batch_size=64), tmp_path / "oracle", k=10)
    callback = CountingDistillation(cache=str(tmp_path / "oracle"), name="oracle")
    trainer = fast_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=0, callbacks=[callback])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", ".*(num_workers|LeafSpec|does not have many).*")
        trainer.fit(Classifier(TinyNet()), datamodule=_digits(return_index=True, train_fraction=0.3))
    assert trainer.callback_metrics["oracle/teacher_acc"].item() == 1.0


# --------------------------------------------------------------------------- 10. hyperparameters
NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gamma": -1}, "gamma must be a finite number >= 0.0, got -1"),
        ({"gamma": NAN}, "gamma must be a finite number >= 0.0, got nan"),
        ({"gamma": "1.5"}, "gamma must be a finite number >= 0.0, got '1.5'"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0.0, got 0.0"),
        ({"temperature": -2}, "temperature must be a finite number > 0.0, got -2"),
        ({"temperature": INF}, "temperature must be a finite number > 0.0, got inf"),
        ({"weight": NAN}, "weight must be a finite number >= 0.0, got nan"),
        ({"weight": INF}, "weight must be a finite number >= 0.0, got inf"),
        ({"weight": -0.5}, "weight must be a finite number >= 0.0, got -0.5"),
        ({"num_classes": 0}, "num_classes must be an integer >= 2, got 0"),
        ({"num_classes": 10.0}, "num_classes must be an integer >= 2, got 10.0"),
        ({"precision": "64"}, "precision must be one of .* got '64'"),
        ({"loss": "fitnet"}, "loss must be one of .* got 'fitnet'"),
        ({"teacher_kwargs": "in_chans=1"}, "teacher_kwargs must be a dict .* got 'in_chans=1'"),
        ({"channels_last": "yes"}, "channels_last must be True or False, got 'yes'"),
        ({"input_transform": 224}, "input_transform must be a callable .* got 224"),
        ({"cache": 5, "teacher": None}, "cache must be the path .* got 5"),
        ({"cache": "runs/cache"}, "got both teacher='resnet18' and cache='runs/cache'"),
        ({"name": "my kd"}, "name must be an identifier-like string, got 'my kd'"),
    ],
)
def test_teacher_distillation_refuses_bad_hyperparameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TeacherDistillation(**{"teacher": "resnet18", **kwargs})


def test_checkpoint_that_would_be_ignored_is_refused() -> None:
    with pytest.raises(ValueError, match=r"checkpoint='w\.pt' would be ignored with an nn\.Module teacher"):
        TeacherDistillation(nn.Linear(2, 2), checkpoint="w.pt")
    with pytest.raises(ValueError, match=r"checkpoint='w\.pt' would be ignored with cache="):
        TeacherDistillation(cache="runs/cache", checkpoint="w.pt")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": -1.0}, "alpha must be a finite non-negative weight, got -1.0"),
        ({"beta": INF}, "beta must be a finite non-negative weight, got inf"),
        ({"mu": NAN}, "mu must be a finite non-negative weight, got nan"),
        ({"weight": -1.0}, "weight must be a finite number >= 0.0, got -1.0"),
        ({"weight": NAN}, "weight must be a finite number >= 0.0, got nan"),
        ({"rank_by": "logit"}, "rank_by must be one of .* got 'logit'"),
        ({"feature_layer": 3}, "feature_layer must be a module's dotted path .* got 3"),
        ({"name": "uskd-2"}, "name must be an identifier-like string, got 'uskd-2'"),
    ],
)
def test_uskd_refuses_bad_hyperparameters(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        USKD(**kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: LAWN(free_epochs=-1), "free_epochs must be an integer >= 0, got -1"),
        (lambda: LAWN(free_epochs=1.5), "free_epochs must be an integer >= 0, got 1.5"),
        (lambda: LAWN(free_steps=-2), "free_steps must be None or an integer >= 0, got -2"),
        (lambda: LAWN(on_weight_decay="ignore"), "on_weight_decay must be 'warn' or 'error', got 'ignore'"),
        (lambda: ExperienceReplay(buffer_size=0), "buffer_size must be a positive int, got 0"),
        (lambda: ExperienceReplay(10, replay_batch_size=0), "replay_batch_size must be a positive int, got 0"),
        (lambda: ExperienceReplay(10, weight=-1.0), "weight must be a finite number >= 0.0, got -1.0"),
        (lambda: UER(10, temperature=0.0), "temperature must be positive and finite, got 0.0"),
        (lambda: UER(10, mask="old"), "mask must be 'all', 'seen' or 'present', got 'old'"),
        (lambda: UER(10, weight=INF), "weight must be a finite number >= 0.0, got inf"),
    ],
)
def test_lawn_and_replay_refuse_bad_hyperparameters(make, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match=message):
        make()


# --------------------------------------------------------------------------- 12. unreadable checkpoints
def _bad_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.ckpt"
    text.write_text("this is not a checkpoint\n")
    real = tmp_path / "real.pt"
    torch.save({"w": torch.zeros(256)}, real)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(real.read_bytes()[:200])
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    return {"text": text, "truncated": truncated, "empty": empty}


@pytest.mark.parametrize("kind", ["text", "truncated", "empty"])
def test_corrupt_checkpoint_says_it_is_not_readable(tmp_path: Path, kind: str) -> None:
    path = _bad_files(tmp_path)[kind]
    for load in (lambda: load_teacher(str(path)), lambda: load_teacher(TINY, str(path), 10, {"in_chans": 1})):
        with pytest.raises(ValueError, match="is not a readable checkpoint") as info:
            load()
        assert str(path) in str(info.value) and "weights_only" not in str(info.value)
    # through the callback: the same error, before any step
    for callback in (
        CountingDistillation(str(path)),
        CountingDistillation(TINY, checkpoint=str(path), teacher_kwargs={"in_chans": 1}),
    ):
        trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
        with pytest.raises(ValueError, match=f"'{path}' is not a readable checkpoint"):
            trainer.fit(Classifier(TinyNet()), datamodule=_digits())
        assert callback.steps == 0


@pytest.mark.parametrize("name", ["runs", "teacher.ckpt"])
def test_directory_as_teacher_says_it_is_a_directory(tmp_path: Path, name: str) -> None:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    for load in (lambda: load_teacher(str(folder)), lambda: load_teacher(TINY, str(folder), 10, {"in_chans": 1})):
        with pytest.raises(IsADirectoryError, match=f"'{folder}' is a directory, not a checkpoint file") as info:
            load()
        assert str(folder / "last.ckpt") in str(info.value)
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[CountingDistillation(str(folder))])
    with pytest.raises(IsADirectoryError, match="is a directory"):
        trainer.fit(Classifier(TinyNet()), datamodule=_digits())


# --------------------------------------------------------------------------- 13. resume elsewhere
def test_resume_from_another_working_directory_finds_the_teacher_and_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(start)
    _teacher_checkpoint(start).rename(start / "teacher.ckpt")
    data = {"return_index": True, "train_fraction": 0.2}
    dm = _digits(**data)
    dm.setup("fit")
    build_teacher_cache(TinyNet(), DataLoader(dm.dataset("train"), batch_size=64), start / "cache", k=3)
    runs = {}
    for key, callback in (
        ("teacher", TeacherDistillation("teacher.ckpt")),
        ("cache", TeacherDistillation(cache="cache")),
    ):
        trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
        trainer.fit(Classifier(TinyNet()), datamodule=_digits(**data))
        trainer.save_checkpoint(start / f"{key}_run.ckpt")
        state = callback.state_dict()
        assert state[key] == ("teacher.ckpt" if key == "teacher" else "cache")
        assert state[f"{key}_abspath"] == str(start / ("teacher.ckpt" if key == "teacher" else "cache"))
        runs[key] = state["fingerprint"]
    monkeypatch.chdir(elsewhere)
    for key, fingerprint in runs.items():
        resumed = CountingDistillation()
        trainer = fast_trainer(max_steps=2, max_epochs=3, limit_val_batches=0, callbacks=[resumed])
        trainer.fit(Classifier(TinyNet()), datamodule=_digits(**data), ckpt_path=str(start / f"{key}_run.ckpt"))
        assert resumed.steps == 1 and resumed.fingerprint == fingerprint
    # moved away entirely: the error names both places it looked
    (start / "teacher.ckpt").rename(tmp_path / "moved.ckpt")
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[CountingDistillation()])
    with pytest.raises(FileNotFoundError, match=r"found neither from the working directory .* recorded absolute path"):
        trainer.fit(Classifier(TinyNet()), datamodule=_digits(**data), ckpt_path=str(start / "teacher_run.ckpt"))

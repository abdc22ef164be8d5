"""The loss-term mechanism: a Callback adds a named term to any LightningModule's loss."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_logits.loss_terms import LossTermCallback, LossTermHub, StepContext
from lightning_logits.modules import Classifier
from tests.helpers import TensorDataModule, TinyMLP, blob_data, fast_trainer


class LogitL2(LossTermCallback):
    """Test term: mean squared logit, recording what it saw."""

    def __init__(self, weight: float = 0.5, name: str = "logit_l2") -> None:
        super().__init__(name=name, weight=weight)
        self.seen: list[dict[str, Any]] = []

    def loss_term(self, context: StepContext) -> Tensor:
        self.seen.append(
            {
                "logits": context.logits.detach().clone(),
                "features": context.features.detach().clone(),
                "target": context.target.clone(),
                "task": context.task_loss.detach().clone(),
            }
        )
        return context.logits.pow(2).mean()


class PlainModule(pl.LightningModule):
    """A user's own module: returns a bare loss tensor, or a dict when ``as_dict``."""

    def __init__(self, as_dict: bool = False) -> None:
        super().__init__()
        self.net = TinyMLP()
        self.as_dict = as_dict

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        return {"loss": loss} if self.as_dict else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _data() -> TensorDataModule:
    x, y = blob_data(n=32)
    return TensorDataModule(x, y, batch_size=8)


def _manual_sgd(net: nn.Module, x: Tensor, y: Tensor, weight: float, lr: float, steps: int) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    for i in range(steps):
        xb, yb = x[i * 8 : (i + 1) * 8], y[i * 8 : (i + 1) * 8]
        logits = net(xb)
        loss = F.cross_entropy(logits, yb) + weight * logits.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("as_dict", [False, True])
def test_term_is_added_to_a_users_module_loss(as_dict: bool) -> None:
    module = PlainModule(as_dict=as_dict)
    reference = copy.deepcopy(module.net)
    callback = LogitL2(weight=0.5)
    fast_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback]).fit(module, datamodule=_data())

    x, y = blob_data(n=32)
    _manual_sgd(reference, x, y, weight=0.5, lr=0.1, steps=4)
    for got, want in zip(module.net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert len(callback.seen) == 4
    # The tap saw the head's input (12 hidden units) and output (4 classes) of the training forward.
    assert callback.seen[0]["features"].shape == (8, 12)
    assert callback.seen[0]["logits"].shape == (8, 4)
    torch.testing.assert_close(callback.seen[0]["target"], y[:8])


def test_logs_each_term_and_total() -> None:
    module = Classifier(TinyMLP(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    first, second = LogitL2(weight=0.5), LogitL2(weight=2.0, name="other")
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, log_every_n_steps=1, callbacks=[first, second])
    trainer.fit(module, datamodule=_data())
    logged = trainer.callback_metrics
    for key in ("train/loss_logit_l2_step", "train/loss_other_step", "train/loss_total_step"):
        assert key in logged, sorted(logged)
    assert "train/loss_task_step" not in logged  # the module logs its own loss (train/loss)
    total = logged["train/loss_step"] + logged["train/loss_logit_l2_step"] + logged["train/loss_other_step"]
    torch.testing.assert_close(logged["train/loss_total_step"], total)
    # weighted terms: the second callback's weight is 4x the first's, same unweighted value
    torch.testing.assert_close(logged["train/loss_other_step"], 4 * logged["train/loss_logit_l2_step"])


def test_teardown_restores_training_step_and_removes_hooks() -> None:
    module = PlainModule()
    fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[LogitL2()]).fit(module, datamodule=_data())
    assert "training_step" not in module.__dict__
    assert LossTermHub.get(module) is None
    assert not module.net.head._forward_hooks


def test_non_finite_term_stops_with_name_and_step() -> None:
    class Bad(LossTermCallback):
        def loss_term(self, context: StepContext) -> Tensor:
            if context.trainer.global_step == 2:
                return context.logits.sum() * float("nan")
            return context.logits.sum() * 0

    with pytest.raises(FloatingPointError, match=r"'bad'.*global step 2"):
        fast_trainer(max_steps=5, limit_val_batches=0, callbacks=[Bad(name="bad")]).fit(
            PlainModule(), datamodule=_data()
        )


def test_duplicate_names_are_rejected() -> None:
    with pytest.raises(ValueError, match="already registered"):
        fast_trainer(max_steps=1, callbacks=[LogitL2(), LogitL2()]).fit(PlainModule(), datamodule=_data())


def test_manual_optimization_is_refused_clearly() -> None:
    class Manual(PlainModule):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

    with pytest.raises(RuntimeError, match="manual optimization"):
        fast_trainer(max_steps=1, callbacks=[LogitL2()]).fit(Manual(), datamodule=_data())


def test_module_without_head_can_opt_in_by_returning_logits() -> None:
    class NoLinear(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(16, 4) * 0.1)

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
            x, y = batch
            logits = x @ self.weight
            return {"loss": F.cross_entropy(logits, y), "logits": logits}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class NeedsLogitsOnly(LogitL2):
        needs_tap = False

        def loss_term(self, context: StepContext) -> Tensor:
            return context.logits.pow(2).mean()

    trainer = fast_trainer(max_steps=2, limit_val_batches=0, log_every_n_steps=1, callbacks=[NeedsLogitsOnly()])
    trainer.fit(NoLinear(), datamodule=_data())
    assert "train/loss_logit_l2_step" in trainer.callback_metrics


def test_replacing_callback_makes_terms_the_whole_loss() -> None:
    class Replace(LossTermCallback):
        replaces_task_loss = True

        def loss_term(self, context: StepContext) -> Tensor:
            return context.logits.pow(2).mean()

    module = Classifier(TinyMLP(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, log_every_n_steps=1, callbacks=[Replace(name="only")])
    trainer.fit(module, datamodule=_data())
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["train/loss_total_step"], logged["train/loss_only_step"])
    assert logged["train/loss_step"] != logged["train/loss_total_step"]  # the module's own loss, not optimized


def test_terms_work_under_bf16_autocast_on_cpu() -> None:
    callback = LogitL2(weight=0.1)
    module = Classifier(TinyMLP(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    trainer = fast_trainer(
        max_steps=3, limit_val_batches=0, precision="bf16-mixed", log_every_n_steps=1, callbacks=[callback]
    )
    trainer.fit(module, datamodule=_data())
    assert callback.seen[0]["logits"].dtype == torch.bfloat16  # the head ran under autocast
    assert torch.isfinite(trainer.callback_metrics["train/loss_total_step"])


class Recorder(pl.Callback):
    """Records, per training step, the callback metrics that end in ``_step`` and the log calls made."""

    def __init__(self) -> None:
        self.step_keys: list[set[str]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.step_keys.append({k for k in trainer.callback_metrics if k.endswith("_step")})


def test_step_values_logged_every_n_steps_and_epoch_means_of_every_step() -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    inside_dict = [False]

    class CountingClassifier(Classifier):
        def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if not inside_dict[0]:
                calls.append((name, kwargs))
            super().log(name, value, *args, **kwargs)

        def log_dict(self, dictionary: Any, *args: Any, **kwargs: Any) -> None:
            calls.append(("dict:" + ",".join(sorted(dictionary)), kwargs))
            inside_dict[0] = True
            try:
                super().log_dict(dictionary, *args, **kwargs)
            finally:
                inside_dict[0] = False

    callback = LogitL2(weight=0.5)
    module = CountingClassifier(TinyMLP(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    x, y = blob_data(n=48)
    data = TensorDataModule(x, y, batch_size=8)  # 6 steps per epoch
    trainer = fast_trainer(max_epochs=1, limit_val_batches=0, log_every_n_steps=3, callbacks=[callback])
    trainer.fit(module, datamodule=data)
    # top-level calls made in training steps (log_dict's own per-key log calls are not recorded)
    dict_calls = [c for c in calls if c[0].startswith("dict:") and c[1].get("on_step")]
    assert len(dict_calls) == 4, dict_calls  # steps 3 and 6 (1-based): one from Classifier, one from the hub
    assert all(c[0].startswith("dict:") for c in calls if c[1].get("on_step"))  # no per-value self.log
    # The epoch means weigh every step (not only the logged ones): recompute them from what the term saw.
    terms = torch.stack([0.5 * s["logits"].pow(2).mean() for s in callback.seen])
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["train/loss_logit_l2_epoch"], terms.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logged["train/loss_logit_l2"], terms.mean(), rtol=1e-4, atol=1e-6)
    tasks = torch.stack([s["task"] for s in callback.seen])
    torch.testing.assert_close(logged["train/loss_epoch"], tasks.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logged["train/loss_total_epoch"], (tasks + terms).mean(), rtol=1e-4, atol=1e-6)
    # the last logged step value is the 6th step's
    torch.testing.assert_close(logged["train/loss_logit_l2_step"], terms[5], rtol=1e-4, atol=1e-6)
    # train/acc: macro accuracy over every step of the epoch (torchmetrics' rule, restated: the mean
    # recall over classes that were predicted or present)
    predicted = torch.cat([s["logits"].argmax(dim=1) for s in callback.seen]).tolist()
    true = torch.cat([s["target"] for s in callback.seen]).tolist()
    recalls = []
    for c in set(predicted) | set(true):
        hits = sum(p == t == c for p, t in zip(predicted, true, strict=True))
        recalls.append(hits / true.count(c) if true.count(c) else 0.0)
    assert float(logged["train/acc"]) == pytest.approx(sum(recalls) / len(recalls), abs=1e-6)


def test_epoch_means_match_lightnings_own_aggregation_with_unequal_batches() -> None:
    """StepScalars' epoch mean is Lightning's batch-size weighted mean (last batch smaller)."""
    seen: list[tuple[float, int]] = []

    class Reference(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyMLP()

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("ref", loss, on_step=True, on_epoch=True)
            seen.append((float(loss.detach()), x.shape[0]))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class Term(LossTermCallback):
        needs_tap = False

        def loss_term(self, context: StepContext) -> Tensor:
            return context.task_loss

    x, y = blob_data(n=20)
    trainer = fast_trainer(max_epochs=1, limit_val_batches=0, callbacks=[Term(name="copy")])
    trainer.fit(Reference(), datamodule=TensorDataModule(x, y, batch_size=8))  # batches of 8, 8, 4
    logged = trainer.callback_metrics
    want = sum(v * n for v, n in seen) / sum(n for _, n in seen)
    assert float(logged["ref_epoch"]) == pytest.approx(want, rel=1e-5)
    assert float(logged["train/loss_copy_epoch"]) == pytest.approx(want, rel=1e-5)


def test_non_finite_task_loss_is_named_with_its_step() -> None:
    class NanAtTwo(PlainModule):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if self.global_step == 1 else loss

    with pytest.raises(FloatingPointError, match=r"'task' is nan at global step 1 \(found by .* global step 2\)"):
        fast_trainer(max_steps=5, limit_val_batches=0, log_every_n_steps=3, callbacks=[LogitL2()]).fit(
            NanAtTwo(), datamodule=_data()
        )


def test_step_scalars_name_the_first_bad_value() -> None:
    from lightning_logits.loss_terms import StepScalars

    scalars = StepScalars(["a", "b"], ["x", None])
    scalars.update(None, [torch.tensor(1.0), torch.tensor(2.0)], batch_size=2)
    scalars.update(None, [torch.tensor(1.0), torch.tensor(float("inf"))], batch_size=2)
    with pytest.raises(FloatingPointError, match=r"'b' is inf at global step 1 \(found by .* step 7\)"):
        scalars.flush(step=7)


@pytest.mark.parametrize(
    ("every", "accumulate", "stop_at"),
    [(3, 1, None), (1, 1, None), (4, 2, None), (0, 1, None), (5, 1, 2), (50, 1, None)],
)
def test_training_step_position_agrees_with_lightnings_properties(
    every: int, accumulate: int, stop_at: int | None
) -> None:
    """StepScalars reads the step and the logging decision from the fit loop: they must be Lightning's at every step."""
    from lightning_logits.loss_terms import _training_step_position

    seen: list[tuple[tuple[int, bool], tuple[int, bool]]] = []

    class Recording(Classifier):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            trainer = self.trainer
            if stop_at is not None and batch_idx == stop_at:
                trainer.should_stop = True  # e.g. EarlyStopping: Lightning logs this step
            lightning = (trainer.global_step, bool(trainer._logger_connector.should_update_logs))
            seen.append((_training_step_position(trainer, self), lightning))
            return super().training_step(batch, batch_idx)

    x, y = blob_data(n=96)
    trainer = fast_trainer(
        max_epochs=2,
        limit_val_batches=0,
        log_every_n_steps=every,
        accumulate_grad_batches=accumulate,
        callbacks=[LogitL2(weight=0.1)],
    )
    trainer.fit(Recording(TinyMLP()), datamodule=TensorDataModule(x, y, batch_size=8))
    assert len(seen) >= 3
    assert [ours for ours, _ in seen] == [lightning for _, lightning in seen]
    if every and len(seen) >= every:
        assert any(ours[1] for ours, _ in seen)  # the parametrization reaches logging steps
    assert seen[-1][0][0] > 0  # and optimizer steps

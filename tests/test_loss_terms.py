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


def test_logs_each_term_task_and_total() -> None:
    module = Classifier(TinyMLP(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    first, second = LogitL2(weight=0.5), LogitL2(weight=2.0, name="other")
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[first, second])
    trainer.fit(module, datamodule=_data())
    logged = trainer.callback_metrics
    for key in (
        "train/loss_task_step",
        "train/loss_logit_l2_step",
        "train/loss_other_step",
        "train/loss_total_step",
    ):
        assert key in logged, sorted(logged)
    total = logged["train/loss_task_step"] + logged["train/loss_logit_l2_step"] + logged["train/loss_other_step"]
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

    trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[NeedsLogitsOnly()])
    trainer.fit(NoLinear(), datamodule=_data())
    assert "train/loss_logit_l2_step" in trainer.callback_metrics


def test_replacing_callback_makes_terms_the_whole_loss() -> None:
    class Replace(LossTermCallback):
        replaces_task_loss = True

        def loss_term(self, context: StepContext) -> Tensor:
            return context.logits.pow(2).mean()

    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[Replace(name="only")])
    trainer.fit(PlainModule(), datamodule=_data())
    logged = trainer.callback_metrics
    torch.testing.assert_close(logged["train/loss_total_step"], logged["train/loss_only_step"])
    assert logged["train/loss_task_step"] != logged["train/loss_total_step"]


def test_terms_work_under_bf16_autocast_on_cpu() -> None:
    callback = LogitL2(weight=0.1)
    module = Classifier(TinyMLP(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    trainer = fast_trainer(max_steps=3, limit_val_batches=0, precision="bf16-mixed", callbacks=[callback])
    trainer.fit(module, datamodule=_data())
    assert callback.seen[0]["logits"].dtype == torch.bfloat16  # the head ran under autocast
    assert torch.isfinite(trainer.callback_metrics["train/loss_total_step"])

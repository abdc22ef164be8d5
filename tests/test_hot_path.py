"""No host-device sync added by the library in a steady-state training step.

Host reads of tensor values (``item``, ``bool``, ``int``, ``float``, ``tolist``, ``nonzero``) are
counted over training steps 5-15 of a fit (:mod:`tests.sync_counter`), once with a method and once
without it, on the same model and data; the difference must be zero. ``Classifier`` itself is
compared with a hand-written LightningModule that does the same cross-entropy step. Each counted
step is a whole loop iteration (from one ``on_train_batch_start`` to the next: Lightning's own
work after the step, where it collects logged values and converts the progress bar's to numbers,
included). Models: a tiny CNN, and timm ``resnet10t`` on 32x32 inputs (batch 16). On a logging
step the library reads one finiteness flag per set of step scalars (by design, every
``log_every_n_steps`` steps), and Lightning reads the progress bar's values; every other step
adds none. On CUDA the same fits run under ``torch.cuda.set_sync_debug_mode("error")``, which
raises on any synchronizing call in the counted steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_logits.callbacks import LAWN, UER, USKD, ExperienceReplay, TeacherDistillation
from lightning_logits.loss_terms import is_logging_step
from lightning_logits.modules import Classifier
from tests.helpers import TensorDataModule, TinyNet, fast_trainer
from tests.sync_counter import HostReadCounter, counting_callbacks

STEPS = 17  # steps 5..14 are counted; a few more so the window never touches the fit's end
BATCH = 8


def _data(size: int = 8, batch: int = BATCH) -> TensorDataModule:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * batch, 1, size, size, generator=g)
    y = torch.arange(STEPS * batch) % 10
    return TensorDataModule(x, y, batch_size=batch)


def _timm_data() -> TensorDataModule:
    return _data(size=32, batch=16)


def _teacher() -> TinyNet:
    torch.manual_seed(1)
    return TinyNet(width=8)


METHODS: dict[str, Callable[[], list[Callback]]] = {
    "kd": lambda: [TeacherDistillation(_teacher(), loss="kd")],
    "nkd": lambda: [TeacherDistillation(_teacher(), loss="nkd")],
    "uskd": lambda: [USKD(feature_layer="features.2", alpha=0.1, mu=0.1)],
    "lawn": lambda: [LAWN(free_steps=2)],
    "er": lambda: [ExperienceReplay(40, replay_batch_size=4)],
    "uer": lambda: [UER(40, replay_batch_size=4)],
}


class HandWritten(pl.LightningModule):
    """The floor: cross-entropy on a TinyNet, no checks, no logging."""

    def __init__(self) -> None:
        super().__init__()
        self.model = TinyNet()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _classifier() -> Classifier:
    return Classifier(TinyNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.01))


def _timm_classifier() -> Classifier:
    return Classifier("resnet10t", num_classes=10, in_chans=1, optimizer=lambda p: torch.optim.SGD(p, lr=0.01))


class _LoggingSteps(Callback):
    """Records the steps on which Lightning sends step metrics to the loggers."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.seen = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if is_logging_step(trainer):
            self.steps.append(self.seen)
        self.seen += 1


def count_reads(
    make_module: Callable[[], pl.LightningModule],
    callbacks: list[Callback],
    device: str = "cpu",
    make_data: Callable[[], TensorDataModule] = _data,
    **trainer_kwargs: Any,
) -> HostReadCounter:
    """Host reads during steps 5..14 (whole iterations) of a fit of ``make_module()`` with ``callbacks``."""
    torch.manual_seed(0)
    module = make_module()
    with HostReadCounter() as counter:
        start, end = counting_callbacks(counter, first=5, last=15, sync_debug=device == "cuda", whole_iterations=True)
        trainer = fast_trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            max_steps=STEPS,
            limit_val_batches=0,
            callbacks=[start, *callbacks, end],
            **trainer_kwargs,
        )
        trainer.fit(module, datamodule=make_data())
    assert counter.steps == 10, counter.steps
    return counter


def _report(counter: HostReadCounter) -> str:
    return f"{counter.total} reads over {counter.steps} steps: {dict(counter.by_kind)}; sites {dict(counter.sites)}"


@pytest.fixture(scope="module")
def classifier_reads() -> int:
    return count_reads(_classifier, []).total


def test_classifier_adds_no_reads_to_a_hand_written_step() -> None:
    floor = count_reads(HandWritten, [])
    ours = count_reads(_classifier, [])
    assert ours.total - floor.total == 0, f"Classifier: {_report(ours)}; hand-written: {_report(floor)}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_adds_no_host_reads_per_step(method: str, classifier_reads: int) -> None:
    counter = count_reads(_classifier, METHODS[method]())
    assert counter.total - classifier_reads == 0, f"{method}: {_report(counter)}; without: {classifier_reads}"


def test_every_method_adds_no_host_reads_per_step_on_timm_resnet10t() -> None:
    # The setting: timm resnet10t on 32x32 inputs, batch 16, USKD with its default feature
    # layer. Every method in one fit (reads only add up, so a total of 0 is 0 for each), to keep
    # the test short; on a failure the sites name the method's code.
    # Compared with the hand-written step directly: Classifier and every method together add 0.
    floor = count_reads(HandWritten, [], make_data=_timm_data)
    methods = [callback for key in sorted(METHODS) if key != "uskd" for callback in METHODS[key]()] + [USKD()]
    counter = count_reads(_timm_classifier, methods, make_data=_timm_data)
    assert counter.total - floor.total == 0, (
        f"Classifier + all methods: {_report(counter)}; hand-written: {_report(floor)}"
    )


@pytest.mark.parametrize("method", ["classifier", "uskd", "uer"])
def test_only_logging_steps_read_and_later_steps_do_not(method: str) -> None:
    # Logging every 5 steps (steps 4, 9 and 14): Lightning keeps a logged step value until the
    # epoch's end and converts each progress-bar value to a number on every later step unless it
    # is released; only the logging steps themselves may read.
    logging = _LoggingSteps()
    callbacks = [] if method == "classifier" else METHODS[method]()
    counter = count_reads(_classifier, [logging, *callbacks], log_every_n_steps=5)
    floor = count_reads(HandWritten, [], log_every_n_steps=5)
    assert logging.steps == [4, 9, 14]
    quiet = [step for step in range(5, 15) if step not in logging.steps]
    extra = {step: counter.by_step[step] - floor.by_step[step] for step in quiet}
    assert all(n == 0 for n in extra.values()), f"{method}: reads on non-logging steps {extra}; {_report(counter)}"
    assert counter.by_step[9] > 0  # the logging step's finiteness check (one read per set of step scalars)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["classifier", *sorted(METHODS)])
def test_no_sync_under_cuda_sync_debug_mode_error(method: str) -> None:
    # Any synchronizing CUDA call in steps 5..14 raises inside the fit; host reads are compared too.
    without = count_reads(_classifier, [], device="cuda")
    if method == "classifier":
        floor = count_reads(HandWritten, [], device="cuda")
        assert without.total - floor.total == 0, _report(without)
        return
    counter = count_reads(_classifier, METHODS[method](), device="cuda")
    assert counter.total - without.total == 0, f"{method}: {_report(counter)}; without: {_report(without)}"

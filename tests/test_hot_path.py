"""No host-device sync added by the library in a steady-state training step.

Host reads of tensor values (``item``, ``bool``, ``int``, ``float``, ``tolist``, ``nonzero``) are
counted over training steps 5-15 of a fit (:mod:`tests.sync_counter`), once with a method and once
without it, on the same tiny CNN and data; the difference must be zero. ``Classifier`` itself is
compared with a hand-written LightningModule that does the same cross-entropy step. On CUDA the
same fits run under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any synchronizing
call in the counted steps.
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
from lightning_logits.modules import Classifier
from tests.helpers import TensorDataModule, TinyNet, fast_trainer
from tests.sync_counter import HostReadCounter, counting_callbacks

STEPS = 17  # steps 5..14 are counted; a few more so the window never touches the fit's end
BATCH = 8


def _data() -> TensorDataModule:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * BATCH, 1, 8, 8, generator=g)
    y = torch.arange(STEPS * BATCH) % 10
    return TensorDataModule(x, y, batch_size=BATCH)


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


def count_reads(
    make_module: Callable[[], pl.LightningModule], callbacks: list[Callback], device: str = "cpu"
) -> HostReadCounter:
    """Host reads during steps 5..14 of a fit of ``make_module()`` with ``callbacks``."""
    torch.manual_seed(0)
    module = make_module()
    with HostReadCounter() as counter:
        start, end = counting_callbacks(counter, first=5, last=15, sync_debug=device == "cuda")
        trainer = fast_trainer(
            accelerator="gpu" if device == "cuda" else "cpu",
            max_steps=STEPS,
            limit_val_batches=0,
            callbacks=[start, *callbacks, end],
        )
        trainer.fit(module, datamodule=_data())
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

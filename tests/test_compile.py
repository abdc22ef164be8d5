"""Every method works when the user compiles the network the way Lightning documents it.

``trainer.fit(torch.compile(module))``: Lightning compiles the module's ``forward`` (inductor on the
CPU here); training_step, the loss-term hub, its logit tap and the callbacks run eagerly around it.
Each test trains a tiny CNN a few steps with a method, once eagerly and once compiled, from the
same initial weights and data, and requires the same weights after training: the method's term
was computed and applied the same way through the compiled forward.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_logits.callbacks import LAWN, USKD, ExperienceReplay, TeacherDistillation
from lightning_logits.modules import Classifier
from tests.helpers import TensorDataModule, TinyNet, fast_trainer

pytestmark = pytest.mark.slow  # inductor compiles a forward and a backward graph (tens of seconds on 2 cores)

STEPS = 4


def _data() -> TensorDataModule:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(STEPS * 8, 1, 8, 8, generator=g)
    return TensorDataModule(x, torch.arange(STEPS * 8) % 10, batch_size=8)


def _teacher() -> TinyNet:
    torch.manual_seed(1)
    return TinyNet(width=8)


METHODS: dict[str, Callable[[], list[Callback]]] = {
    "kd": lambda: [TeacherDistillation(_teacher(), loss="kd", weight=1.0)],
    # beta=0: no Zipf term, whose class ranking can flip on rounding-level differences at initialization
    # (near-uniform logits), so compiled and eager runs can be compared closely; large alpha, mu: a clear effect.
    "uskd": lambda: [USKD(feature_layer="features.2", alpha=1.0, beta=0.0, mu=1.0)],
    "lawn": lambda: [LAWN(free_steps=1)],
    "er": lambda: [ExperienceReplay(16, replay_batch_size=4)],
}


def _train(module: Classifier, method: str | None, compiled: bool) -> Classifier:
    if compiled:
        # A fresh process's state: dynamo does not guard on forward hooks (skip_nnmodule_hook_guards),
        # so a graph cached by an earlier test's model, without this method's layer hook, would be reused.
        torch._dynamo.reset()
    torch.manual_seed(0)  # USKD's weak head is initialized from the global random stream in setup
    callbacks = METHODS[method]() if method is not None else []
    trainer = fast_trainer(max_steps=STEPS, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(torch.compile(module) if compiled else module, datamodule=_data())  # type: ignore[arg-type]
    return module


def _flat(module: Classifier) -> torch.Tensor:
    return torch.cat([v.flatten().float() for v in module.model.state_dict().values()])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_the_same_with_a_compiled_network(method: str) -> None:
    torch.manual_seed(0)
    start = Classifier(TinyNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    eager = _flat(_train(copy.deepcopy(start), method, compiled=False))
    compiled = _flat(_train(copy.deepcopy(start), method, compiled=True))
    without = _flat(_train(copy.deepcopy(start), None, compiled=False))
    effect = (eager - without).norm()
    gap = (compiled - eager).norm()
    if method == "lawn":
        # 4 steps barely move LAWN's weights away from plain training; compiled must match eager closely.
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
        return
    # Compiled kernels round differently, so the weights differ a little; the method's own effect on
    # them is far larger, so a compiled run that lost the term (or applied it twice) fails.
    assert gap < 0.01 * effect

"""CUDA checks (skipped without a CUDA device; run by ``scripts/gpu_check.sh``).

bf16-mixed training with a loss term, a channels_last bf16 teacher, and 2-GPU DDP where two GPUs
exist. The no-sync check of every method under ``torch.cuda.set_sync_debug_mode("error")`` is in
``tests/test_hot_path.py`` (also marked ``cuda``).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_logits.callbacks import USKD, TeacherDistillation
from lightning_logits.modules import Classifier
from tests.helpers import TensorDataModule, TinyNet, fast_trainer

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]


def _data(n: int = 64) -> TensorDataModule:
    g = torch.Generator().manual_seed(0)
    return TensorDataModule(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10, batch_size=16)


def _gpu_trainer(**kwargs: Any) -> pl.Trainer:
    return fast_trainer(accelerator="gpu", devices=1, limit_val_batches=0, log_every_n_steps=1, **kwargs)


def test_bf16_mixed_kd_and_uskd_train_on_cuda() -> None:
    torch.manual_seed(0)
    module = Classifier(TinyNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    teacher = TinyNet(width=8)
    callbacks = [TeacherDistillation(teacher, loss="kd"), USKD(feature_layer="features.2", alpha=0.1, mu=0.1)]
    trainer = _gpu_trainer(max_steps=4, precision="bf16-mixed", callbacks=callbacks)
    trainer.fit(module, datamodule=_data())
    logged = trainer.callback_metrics
    for key in ("train/loss_kd_step", "train/loss_uskd_step", "train/loss_total_step"):
        assert torch.isfinite(logged[key]), key
    assert next(module.parameters()).device.type == "cuda"


def test_channels_last_bf16_teacher_gives_the_float32_teachers_term() -> None:
    torch.manual_seed(0)
    teacher = TinyNet(width=8).cuda().eval()
    x = torch.randn(16, 1, 8, 8, device="cuda")
    with torch.no_grad():
        want = teacher(x)
        got = teacher.to(memory_format=torch.channels_last, dtype=torch.bfloat16)(
            x.to(memory_format=torch.channels_last, dtype=torch.bfloat16)
        )
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
    callback = TeacherDistillation(TinyNet(width=8), loss="kd", precision="bf16", channels_last=True)
    module = Classifier(TinyNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    trainer = _gpu_trainer(max_steps=3, callbacks=[callback])
    trainer.fit(module, datamodule=_data())
    assert torch.isfinite(trainer.callback_metrics["train/loss_kd_step"])


@pytest.mark.ddp
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_gpu_ddp_with_a_loss_term(ddp_env: int) -> None:
    callback = USKD(feature_layer="features.2", alpha=0.1, mu=0.1)
    module = Classifier(TinyNet(), optimizer=lambda p: torch.optim.SGD(p, lr=0.05))
    trainer = fast_trainer(
        accelerator="gpu", devices=2, strategy="ddp_spawn", max_steps=3, limit_val_batches=0, callbacks=[callback]
    )
    trainer.fit(module, datamodule=_data())
    assert trainer.state.finished

"""Real 2-process DDP on the CPU (gloo) through Lightning's strategies."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightning_logits.loss_terms import LossTermCallback, StepContext
from lightning_logits.modules import Classifier
from tests.helpers import TensorDataModule, TinyMLP, blob_data, fast_trainer

pytestmark = pytest.mark.ddp


class RankRecordingL2(LossTermCallback):
    """Logit L2 term that writes one file per rank, proving both processes ran it."""

    def __init__(self, out_dir: str) -> None:
        super().__init__(name="logit_l2", weight=0.3)
        self.out_dir = out_dir

    def loss_term(self, context: StepContext) -> Tensor:
        rank = context.trainer.global_rank
        path = Path(self.out_dir) / f"rank{rank}.txt"
        with path.open("a") as fh:
            fh.write(f"{context.trainer.global_step} {tuple(context.logits.shape)}\n")
        return context.logits.pow(2).mean()


def _sgd(params):  # module-level so ddp_spawn can pickle it
    return torch.optim.SGD(params, lr=0.1)


def _fit(strategy: str, devices: int, batch_size: int, out_dir: Path) -> Classifier:
    x, y = blob_data(n=64)
    torch.manual_seed(0)
    module = Classifier(TinyMLP(), optimizer=_sgd)
    trainer = fast_trainer(
        strategy=strategy,
        devices=devices,
        max_steps=4,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[RankRecordingL2(str(out_dir))],
    )
    trainer.fit(module, datamodule=TensorDataModule(x, y, batch_size=batch_size))
    return module


def test_loss_term_under_ddp_spawn_matches_one_process(ddp_env: int, tmp_path: Path) -> None:
    # Two ranks with batch 8 each see the same 16 samples per step as one process with batch 16
    # (DistributedSampler without shuffle interleaves indices), and DDP averages gradients, so
    # with mean losses and no BatchNorm the weights must agree.
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    ddp = _fit("ddp_spawn", 2, 8, tmp_path / "ddp")
    single = _fit("auto", 1, 16, tmp_path / "one")
    for rank in (0, 1):
        lines = (tmp_path / "ddp" / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 4 and lines[0].endswith("(8, 4)"), lines
    for got, want in zip(ddp.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # and training actually moved the weights
    torch.manual_seed(0)
    untrained = Classifier(TinyMLP(), optimizer=_sgd)
    assert not torch.allclose(untrained.model.head.weight, single.model.head.weight)
    assert os.environ["MASTER_PORT"] == str(ddp_env)

"""Classifier: wraps any model, trains with CE, reports accuracy and calibration, fails clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_logits.data import DigitsDataModule
from lightning_logits.loss_terms import LossTermCallback, StepContext
from lightning_logits.modules import Classifier
from lightning_logits.networks import build_model
from tests.helpers import TensorDataModule, TinyNet, blob_data, fast_trainer


def test_builds_timm_torchvision_and_plain_modules() -> None:
    timm_net = Classifier("resnet10t", num_classes=4, in_chans=1)
    assert timm_net(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    tv = Classifier("torchvision/resnet18", num_classes=4)
    assert tv(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    plain = Classifier(TinyNet(num_classes=6))
    assert plain.num_classes == 6  # read off the head
    assert Classifier("resnet10t", num_classes=3, model_kwargs={"in_chans": 1}).model.conv1[0].in_channels == 1


def test_unknown_names_and_missing_class_count_fail_clearly() -> None:
    with pytest.raises(ValueError, match=r"'resnet_18' is not a timm model name.*similar"):
        build_model("resnet_18", num_classes=3)
    with pytest.raises(ValueError, match="num_classes is required"):
        Classifier("resnet10t")
    with pytest.raises(ValueError, match="cannot read the class count"):
        Classifier(nn.Sequential(nn.Conv2d(1, 3, 1), nn.Flatten()))


def test_class_count_mismatch_fails_at_setup_with_both_numbers() -> None:
    x, y = blob_data(n=16, in_features=64, num_classes=3)
    data = TensorDataModule(x.view(16, 1, 8, 8), y, num_classes=3)
    with pytest.raises(ValueError, match="model has 10 classes but TensorDataModule has 3"):
        fast_trainer(max_steps=1).fit(Classifier(TinyNet(num_classes=10)), datamodule=data)


def test_wrong_batch_shape_names_the_shape_and_the_fix() -> None:
    module = Classifier("resnet10t", num_classes=10, in_chans=1)
    with pytest.raises(RuntimeError, match=r"batch of shape \(2, 3, 32, 32\).*in_chans"):
        module.training_step((torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), 0)
    with pytest.raises(ValueError, match=r"labels in \[0, 12\].*10 classes"):
        module.training_step((torch.randn(2, 1, 32, 32), torch.tensor([0, 12])), 0)


def test_a_single_sample_batch_on_a_1x1_map_names_the_cause_and_the_fix() -> None:
    # reduced_resnet18 turns 8x8 digits into a 1x1 map: a task's last batch of one sample leaves
    # BatchNorm one value per channel
    module = Classifier("reduced_resnet18", num_classes=10, in_chans=1)
    with pytest.raises(ValueError, match=r"batch of shape \(1, 1, 8, 8\).*1x1.*image_size: 16.*drop_last"):
        module.training_step((torch.randn(1, 1, 8, 8), torch.tensor([3])), 0)
    loss = module.training_step((torch.randn(1, 1, 16, 16), torch.tensor([3])), 0)["loss"]  # 2x2: trains
    assert torch.isfinite(loss)


def test_head_and_num_classes_disagreement_is_reported() -> None:
    module = Classifier(TinyNet(num_classes=5), num_classes=7)
    with pytest.raises(ValueError, match=r"logits of shape \(2, 5\) but num_classes is 7"):
        module.training_step((torch.randn(2, 1, 8, 8), torch.tensor([0, 1])), 0)


@pytest.mark.slow
def test_learns_digits_and_logs_accuracy_and_calibration(tmp_path: Path) -> None:
    data = DigitsDataModule(batch_size=32)
    module = Classifier(TinyNet(num_classes=10, width=16), optimizer=lambda p: torch.optim.Adam(p, lr=0.01))
    trainer = fast_trainer(max_epochs=6, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=data)
    metrics = trainer.callback_metrics
    assert metrics["val/acc"] > 0.85
    assert metrics["val/acc_top5"] >= metrics["val/acc"]
    assert 0 <= metrics["val/ece"] < 0.5
    (test,) = trainer.test(module, datamodule=data, verbose=False)
    assert test["test/acc"] > 0.85
    probs = torch.cat(trainer.predict(module, datamodule=data))
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(len(probs)))


def test_mixup_gives_callbacks_soft_targets_and_needs_even_batches() -> None:
    seen: list[torch.Tensor] = []

    class Record(LossTermCallback):
        needs_tap = False

        def loss_term(self, context: StepContext) -> torch.Tensor:
            seen.append(context.target)
            assert context.input.shape == (8, 1, 8, 8)
            return context.logits.sum() * 0

    x, y = blob_data(n=16, in_features=64, num_classes=10)
    data = TensorDataModule(x.view(16, 1, 8, 8), y, batch_size=8)
    module = Classifier(TinyNet(num_classes=10), mixup_alpha=0.4, label_smoothing=0.1)
    fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[Record(name="rec")]).fit(module, datamodule=data)
    assert seen[0].shape == (8, 10) and seen[0].is_floating_point()
    torch.testing.assert_close(seen[0].sum(dim=1), torch.ones(8))
    with pytest.raises(ValueError, match="even batch size, got 3"):
        module.training_step((torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])), 0)


def test_optimizer_and_scheduler_factories_are_used() -> None:
    x, y = blob_data(n=16, in_features=64, num_classes=10)
    module = Classifier(
        TinyNet(num_classes=10),
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    )
    trainer = fast_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(module, datamodule=TensorDataModule(x.view(16, 1, 8, 8), y))
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)


def test_checkpoint_round_trip_by_name(tmp_path: Path) -> None:
    module = Classifier("resnet10t", num_classes=3, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    xs, ys = torch.randn(8, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer.fit(module, datamodule=TensorDataModule(xs, ys, batch_size=4))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    restored = Classifier.load_from_checkpoint(path)
    module.eval()
    restored.eval()
    torch.testing.assert_close(restored(x), module(x))


def test_checkpoint_with_auxiliary_heads_loads_into_a_plain_classifier(tmp_path: Path) -> None:
    from lightning_logits.networks.heads import aux_modules

    module = Classifier("resnet10t", num_classes=3, in_chans=1)
    aux_modules(module)["uskd"] = nn.Linear(4, 3)  # as a callback would add in setup
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, default_root_dir=tmp_path)
    xs, ys = torch.randn(8, 1, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    trainer.fit(module, datamodule=TensorDataModule(xs, ys, batch_size=4))
    path = tmp_path / "aux.ckpt"
    trainer.save_checkpoint(path)
    assert any(k.startswith("lightning_logits_aux.") for k in torch.load(path, weights_only=False)["state_dict"])
    restored = Classifier.load_from_checkpoint(path)  # strict load, without the training-only head
    assert not hasattr(restored, "lightning_logits_aux")
    torch.testing.assert_close(restored.model.fc.weight, module.model.fc.weight)

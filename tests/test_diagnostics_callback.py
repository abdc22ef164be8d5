"""LogitDiagnostics on Classifier and on a user's own LightningModule, one process and DDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_logits.callbacks.diagnostics import LogitDiagnostics
from lightning_logits.data import DigitsShiftDataModule
from lightning_logits.functional import (
    aurc,
    expected_calibration_error,
    fit_temperature,
    fpr_at_tpr,
    mano_score,
    mano_select_normalization,
    msp_score,
    ood_auroc,
)
from lightning_logits.modules import Classifier
from tests.helpers import TinyNet, blob_data, fast_trainer


def _adam(params):  # module-level so ddp_spawn can pickle it
    return torch.optim.Adam(params, lr=1e-2)


def test_classifier_on_digits_logs_every_diagnostic_and_plots(tmp_path: Path) -> None:
    dm = DigitsShiftDataModule(
        held_out_classes=(8, 9), corruptions=("contrast", "rotation"), severities=(1, 3, 5), batch_size=64
    )
    module = Classifier(TinyNet(num_classes=8), optimizer=_adam)
    callback = LogitDiagnostics(stages=("validate",))
    trainer = fast_trainer(max_epochs=1, limit_train_batches=5, callbacks=[callback], default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("diagnostics/")}

    # independent recomputation on the validation split
    module.eval()
    x, y = dm.splits["val"]
    with torch.no_grad():
        z = module(x).double()
    assert metrics["diagnostics/val/ece"] == pytest.approx(expected_calibration_error(z, y).item(), abs=1e-6)
    assert metrics["diagnostics/val/aurc/msp"] == pytest.approx(aurc(msp_score(z), z.argmax(1) == y).item(), abs=1e-6)
    ood_x = torch.cat([b[0] for b in dm.ood_dataloaders()["noise"]])
    with torch.no_grad():
        ood_z = module(ood_x).double()
    assert metrics["diagnostics/val/ood/noise/msp/auroc"] == pytest.approx(
        ood_auroc(msp_score(z), msp_score(ood_z)).item(), abs=1e-6
    )
    assert metrics["diagnostics/val/ood/noise/msp/fpr95"] == pytest.approx(
        fpr_at_tpr(msp_score(z), msp_score(ood_z)).item(), abs=1e-6
    )
    shifted_x, shifted_y = (torch.cat(t) for t in zip(*dm.shifted_dataloaders()["rotation_5"], strict=True))
    with torch.no_grad():
        shifted_z = module(shifted_x).double()
    normalization = mano_select_normalization(z)  # chosen once, on the ID data
    assert metrics["diagnostics/val/shift/mano_softmax"] == float(normalization == "softmax")
    assert metrics["diagnostics/val/shift/rotation_5/mano"] == pytest.approx(
        mano_score(shifted_z, normalization=normalization).item(), abs=1e-6
    )
    assert metrics["diagnostics/val/shift/rotation_5/acc"] == pytest.approx(
        (shifted_z.argmax(1) == shifted_y).double().mean().item(), abs=1e-6
    )
    for score in ("msp", "max_logit", "energy", "vim", "logit_gap"):
        for ood in ("noise", "shapes", "held_out"):
            assert 0.0 <= metrics[f"diagnostics/val/ood/{ood}/{score}/auroc"] <= 1.0
    assert "diagnostics/val/shift/spearman/mano" in metrics
    temperature = metrics["diagnostics/val/temperature"]
    assert temperature == pytest.approx(fit_temperature(z, y), rel=1e-4)
    assert metrics["diagnostics/val/ece_temperature_scaled"] == pytest.approx(
        expected_calibration_error(z / temperature, y).item(), abs=1e-6
    )
    plots = sorted(p.name for p in (tmp_path / "diagnostics").glob("*.png"))
    assert plots == [
        "val_epoch0_estimated_vs_true_accuracy.png",
        "val_epoch0_reliability.png",
        "val_epoch0_risk_coverage.png",
        "val_epoch0_score_histograms.png",
    ]
    assert callback.state_dict()["version"] == 1 and callback.calibration_temperature is not None


class OwnModule(pl.LightningModule):
    """A user's module: its own network, forward and steps; no Classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def test_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _own_setup() -> tuple[OwnModule, DataLoader, dict[str, DataLoader], dict[str, DataLoader]]:
    torch.manual_seed(0)
    module = OwnModule()
    x, y = blob_data(n=64)
    ood = {"wide": DataLoader(TensorDataset(torch.randn(40, 16) * 6, torch.full((40,), -1)), batch_size=16)}
    shifted = {
        f"noise{s}": DataLoader(TensorDataset(x + s * torch.randn_like(x), y), batch_size=16) for s in (0.5, 1.0, 2.0)
    }
    return module, DataLoader(TensorDataset(x, y), batch_size=8), ood, shifted


def _own_callback(ood: dict, shifted: dict) -> LogitDiagnostics:
    return LogitDiagnostics(ood_loaders=ood, shifted_loaders=shifted, fit_on="eval", plots=False, vim_dim=6)


def test_own_module_at_test_end() -> None:
    module, loader, ood, shifted = _own_setup()
    trainer = fast_trainer(callbacks=[_own_callback(ood, shifted)])
    trainer.test(module, dataloaders=loader, verbose=False)
    metrics = trainer.callback_metrics
    for score in ("msp", "max_logit", "energy", "vim", "logit_gap"):
        assert 0.0 <= float(metrics[f"diagnostics/test/ood/wide/{score}/auroc"]) <= 1.0
        assert float(metrics[f"diagnostics/test/aurc/{score}"]) >= 0.0
    for s in (0.5, 1.0, 2.0):
        assert 0.0 <= float(metrics[f"diagnostics/test/shift/noise{s}/atc"]) <= 1.0


def test_bad_loaders_fail_clearly() -> None:
    module, loader, ood, _ = _own_setup()
    x, _ = blob_data(n=16)
    wrong_labels = {"mislabelled": DataLoader(TensorDataset(x, torch.full((16,), 7)), batch_size=8)}
    trainer = fast_trainer(callbacks=[_own_callback(ood, wrong_labels)])
    with pytest.raises(ValueError, match=r"shifted set 'mislabelled' has labels in \[7, 7\].*4 classes"):
        trainer.test(module, dataloaders=loader, verbose=False)
    empty = {"empty": DataLoader(TensorDataset(torch.zeros(0, 16), torch.zeros(0, dtype=torch.long)), batch_size=8)}
    trainer = fast_trainer(callbacks=[_own_callback(ood, empty)])
    with pytest.raises(ValueError, match="shifted set 'empty' is empty"):
        trainer.test(module, dataloaders=loader, verbose=False)
    with pytest.raises(ValueError, match="scores must be a non-empty subset"):
        LogitDiagnostics(scores=("odin",))  # type: ignore[arg-type]


@pytest.mark.ddp
def test_ddp_spawn_matches_one_process(ddp_env: int) -> None:
    module, loader, ood, shifted = _own_setup()
    one = fast_trainer(callbacks=[_own_callback(ood, shifted)])
    one.validate(module, dataloaders=loader, verbose=False)
    want = {k: float(v) for k, v in one.callback_metrics.items() if k.startswith("diagnostics/")}
    ddp = fast_trainer(strategy="ddp_spawn", devices=2, callbacks=[_own_callback(ood, shifted)])
    ddp.validate(module, dataloaders=loader, verbose=False)
    got = {k: float(v) for k, v in ddp.callback_metrics.items() if k.startswith("diagnostics/")}
    assert set(got) == set(want) and len(want) > 20
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "diagnostics"


@pytest.mark.slow
def test_digits_recipe_runs_the_diagnostics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_logits.cli import build_cli

    monkeypatch.chdir(tmp_path)  # recipes write under runs/
    fast = [
        "--trainer.limit_test_batches=2",
        "--trainer.enable_progress_bar=false",
        "--model.init_args.model=resnet10t",
        "--data.init_args.corruptions=[contrast, rotation]",
        "--data.init_args.severities=[1, 3, 5]",
        "--data.init_args.image_size=16",
    ]
    cli = build_cli(["test", "--config", str(RECIPES / "digits_diagnostics.yaml"), *fast])
    metrics = cli.trainer.callback_metrics
    assert "diagnostics/test/ood/held_out/vim/auroc" in metrics
    assert "diagnostics/test/shift/spearman/mano" in metrics
    assert list(tmp_path.glob("runs/diagnostics/digits/version_0/diagnostics/test_epoch0_*.png"))


def test_recipes_parse(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_logits.cli import build_cli

    for name, expected in (
        ("digits_diagnostics.yaml", ["DigitsShiftDataModule", "held_out_classes:", "num_classes: 8"]),
        ("cifar10_resnet18_diagnostics.yaml", ["CIFAR10ShiftDataModule", "corruptions_dir: data/CIFAR-10-C"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            build_cli(["fit", "--config", str(RECIPES / name), "--print_config"])
        assert exit_info.value.code == 0
        printed = capsys.readouterr().out
        assert "lightning_logits.callbacks.diagnostics.LogitDiagnostics" in printed
        for text in expected:
            assert text in printed, text


class _RecordOutputs(pl.Callback):
    def __init__(self) -> None:
        self.outputs: list[dict[str, Tensor]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, *args: Any) -> None:
        self.outputs.append({k: v.detach().clone() for k, v in outputs.items()})


def test_classifier_trains_with_dual_focal_loss() -> None:
    import math

    from tests.helpers import TensorDataModule, TinyMLP

    x, y = blob_data(n=32)
    record = _RecordOutputs()
    module = Classifier(TinyMLP(), loss="dual_focal", focal_gamma=2.0, optimizer=_adam)
    fast_trainer(max_steps=3, limit_val_batches=0, callbacks=[record]).fit(module, datamodule=TensorDataModule(x, y))
    assert len(record.outputs) == 3
    for out in record.outputs:
        probs = out["logits"].double().softmax(1)
        want = 0.0
        for p, t in zip(probs.tolist(), out["target"].tolist(), strict=True):
            p_y = p[t]
            p_j = max([q for q in p if q < p_y], default=0.0)
            want += -((1 - p_y + p_j) ** 2.0) * math.log(p_y) / len(probs)
        assert out["loss"].item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="loss='dual_focal' trains on hard labels"):
        Classifier(TinyMLP(), loss="dual_focal", label_smoothing=0.1)
    with pytest.raises(ValueError, match="loss must be"):
        Classifier(TinyMLP(), loss="focal")  # type: ignore[arg-type]


def test_vim_is_skipped_with_a_warning_when_the_fit_has_no_residual_space() -> None:
    """64 fit samples of size 512 span ViM's 256-dim principal space: the residual would be roundoff."""
    from lightning_logits.callbacks.diagnostics import _Outputs

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(8, 512, generator=g, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    callback = LogitDiagnostics(scores=("msp", "vim"))
    few = _Outputs(
        torch.randn(64, 8, dtype=torch.float64), torch.randn(64, 512, generator=g, dtype=torch.float64), None
    )
    with pytest.warns(UserWarning, match="ViM skipped: fitted on 64 samples of size 512"):
        scorers = callback._scorers(few, weight, bias)
    assert set(scorers) == {"msp"}
    enough = _Outputs(
        torch.randn(300, 8, dtype=torch.float64), torch.randn(300, 512, generator=g, dtype=torch.float64), None
    )
    assert set(callback._scorers(enough, weight, bias)) == {"msp", "vim"}

"""The continual recipes and benchmarks run: digits recipes for real (briefly), CIFAR ones parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lightning_logits.callbacks import ContinualMetrics
from lightning_logits.callbacks.replay import UER, ExperienceReplay
from lightning_logits.cli import build_cli
from lightning_logits.data.streams import ClassIncrementalStream

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "replay"


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "callback"), [("uer_digits.yaml", UER), ("er_digits.yaml", ExperienceReplay)])
def test_digits_recipe_trains(recipe: str, callback: type, tmp_path: Path) -> None:
    cli = build_cli(
        [
            "fit",
            "--config",
            str(RECIPES / recipe),
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=4",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    replay = next(c for c in cli.trainer.callbacks if isinstance(c, callback))  # type: ignore[attr-defined]
    assert replay.buffer.seen == 2 * 4 * 10
    metrics = next(c for c in cli.trainer.callbacks if isinstance(c, ContinualMetrics))  # type: ignore[attr-defined]
    assert metrics.accuracy_matrix is not None and metrics.accuracy_matrix.shape == (5, 5)
    assert list(tmp_path.rglob("accuracy_matrix.png"))
    assert "continual/avg_acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("recipe", "source", "buffer", "tasks"),
    [("uer_cifar10.yaml", "cifar10", 200, 5), ("uer_cifar100.yaml", "cifar100", 1000, 10)],
)
def test_cifar_recipes_parse(recipe: str, source: str, buffer: int, tasks: int) -> None:
    cli = build_cli(["--config", str(RECIPES / recipe)], run=False)
    uer = next(c for c in cli.trainer.callbacks if isinstance(c, UER))  # type: ignore[attr-defined]
    assert uer.buffer_size == buffer and uer.replay_batch_size == 10
    assert isinstance(cli.datamodule, ClassIncrementalStream)
    assert cli.datamodule.source == source and cli.datamodule.num_tasks == tasks
    assert cli.trainer.max_epochs == tasks and cli.trainer.reload_dataloaders_every_n_epochs == 1


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_accuracy_benchmark_smoke(tmp_path: Path) -> None:
    proc = _run(["-m", "benchmarks.accuracy_replay", "--smoke", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| method | buffer | final avg acc (%) | avg forgetting (%) | seeds |" in proc.stdout
    assert "| uer | 50 |" in proc.stdout and "| er | 50 |" in proc.stdout
    assert (tmp_path / "replay_accuracy_smoke.md").exists() and (tmp_path / "replay_heatmaps_smoke.png").exists()


@pytest.mark.slow
def test_speed_benchmark_smoke() -> None:
    proc = _run(["-m", "benchmarks.speed", "--suite", "replay", "--smoke", "--no-memory"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### speed: replay" in proc.stdout and "| uer | er |" in proc.stdout
    assert "buffer share:" in proc.stdout

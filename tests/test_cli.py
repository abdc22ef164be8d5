"""The lightning-logits command: config printing, typo errors, a real fit, and DDP from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_logits.cli import build_cli

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_print_config_shows_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(QUICKSTART), "--trainer.max_epochs=3", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lightning_logits.modules.Classifier" in out
    assert "max_epochs: 3" in out and "in_chans: 1" in out


def test_yaml_typo_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("num_classes: 10", "num_clases: 10"))
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(bad)])
    assert exit_info.value.code != 0
    assert "num_clases" in capsys.readouterr().err


def test_wrong_type_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(QUICKSTART), "--data.init_args.batch_size=many"])
    assert "batch_size" in capsys.readouterr().err


def _run_cli(
    args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lightning_logits.cli", "fit", "--config", str(QUICKSTART), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


SMALL = [
    "--model.init_args.model=resnet10t",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.slow
def test_fit_writes_csv_logs_and_checkpoints(tmp_path: Path) -> None:
    proc = _run_cli(list(SMALL), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = list((tmp_path / "runs" / "quickstart").glob("version_*/metrics.csv"))
    assert metrics and "val/acc" in metrics[0].read_text().splitlines()[0]
    assert list((tmp_path / "runs" / "quickstart").glob("version_*/checkpoints/last.ckpt"))


@pytest.mark.ddp
@pytest.mark.slow
def test_cli_runs_two_process_ddp_on_cpu(tmp_path: Path, ddp_env: int) -> None:
    args = [*SMALL, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    proc = _run_cli(args, tmp_path, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ddp_env)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert list((tmp_path / "runs" / "quickstart").glob("version_*/checkpoints/last.ckpt"))

"""Smoke runs of the Mowst benchmarks and recipes (what CI runs), each in a subprocess or in-process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "mowst"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.slow
def test_speed_suite_smoke() -> None:
    proc = _run("-m", "benchmarks.speed", "--suite", "mowst", "--smoke", "--no-memory", "--steps", "2", "--rounds", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### speed: mowst" in proc.stdout and "| mowst_inference | gcn_inference |" in proc.stdout
    assert "| mowst_alternating | gcn_alone |" in proc.stdout and "| mowst_star | gcn_alone |" in proc.stdout


@pytest.mark.slow
def test_accuracy_smoke(tmp_path: Path) -> None:
    proc = _run("-m", "benchmarks.accuracy_mowst", "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = "| GNN | nodes | signal | homophily (realized) | MLP | GNN | Mowst | Mowst* | Mowst - GNN | Mowst* - GNN "
    assert header in proc.stdout and "Runs that hit max_epochs=200: 0." in proc.stdout
    assert (tmp_path / "mowst_accuracy_smoke.md").exists() and (tmp_path / "mowst_accuracy_smoke.png").exists()


@pytest.mark.slow
def test_scaling_smoke() -> None:
    from benchmarks.bench_mowst import scaling

    table = scaling([1000, 4000], nodes=300, steps=2, warmup=0)
    rows = [line for line in table.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 2 and "Mowst* / GCN" in table


def test_csbm_recipe_runs_one_epoch(tmp_path: Path) -> None:
    from lightning_logits.cli import build_cli

    cli = build_cli(
        [
            "fit",
            "--config",
            str(RECIPES / "mowst_sage_csbm.yaml"),
            "--trainer.max_epochs=1",
            "--trainer.logger=false",
            "--trainer.callbacks=null",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.csbm.num_nodes=120",
        ]
    )
    assert cli.trainer.current_epoch == 1
    assert cli.model.turn == "pretrain_strong" and cli.model.hparams.strong == "sage"


@pytest.mark.parametrize(
    "name",
    [
        "mowst_gcn_csbm",
        "mowst_star_gcn_csbm",
        "mowst_star_sage_csbm",
        "planetoid_cora_mowst_gcn",
        "ogbn_arxiv_mowst_sage",
    ],
)
def test_recipes_parse(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_logits.cli import build_cli

    with pytest.raises(SystemExit) as exc:
        build_cli(["fit", "--config", str(RECIPES / f"{name}.yaml"), "--print_config"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning_logits.modules.mowst.Mowst" in printed and "GraphDataModule" in printed

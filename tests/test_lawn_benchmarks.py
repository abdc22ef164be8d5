"""Smoke runs of LAWN's speed suite and accuracy benchmark, so neither can rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.mark.slow
def test_lawn_speed_smoke_prints_a_ratio_table() -> None:
    proc = _run("benchmarks.speed", "--suite", "lawn", "--smoke", "--no-memory")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### speed: lawn" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| resnet+lawn |"))
    assert float(row.split("|")[6]) > 0
    assert "| resnet+lawn_all | resnet |" in proc.stdout


@pytest.mark.slow
def test_lawn_accuracy_smoke_prints_the_tables(tmp_path: Path) -> None:
    cache = tmp_path / "runs.json"
    proc = _run("benchmarks.accuracy_lawn", "--smoke", "--lr-edge", "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# LAWN study: digits (smoke)" in proc.stdout and "1 seed(s), 2 epochs" in proc.stdout
    for row in (
        "| Adam |",
        "| Adam+L2 |",
        "| AdamW |",
        "| SGD |",
        "| Adam-LAWN (final, free 50%) |",
        "| Adam-LAWN (all, free 50%) |",
        "| SGD-LAWN (all, free 50%) |",
        "| Adam-LAWN (all, free 50%) minus Adam |",
        "Validation accuracy (%) of the same runs",
        "Final training loss",
        "Chosen on the validation split",
    ):
        assert row in proc.stdout, row
    assert "lawn_norms_smoke.png" in proc.stdout
    # the tuning check trained the learning rate after each grid's top, for every tuned arm of both columns
    edge = proc.stdout[proc.stdout.index("Tuning check") :].splitlines()
    assert len([line for line in edge if line.startswith("| mlp, batch ")]) == 2 * 8
    assert any(line.startswith("| mlp, batch 64 | Adam | 0.01 / 0: ") and "| 0.1 / 0: " in line for line in edge)
    # the cache holds every run: a report-only pass trains nothing and rebuilds the same tables
    report = _run("benchmarks.accuracy_lawn", "--smoke", "--report-only", "--lr-edge", "--cache", str(cache))
    assert report.returncode == 0, report.stderr[-3000:]
    assert "seed 1000: test" not in report.stdout  # nothing trained
    tables = proc.stdout[proc.stdout.index("# LAWN study") : proc.stdout.index("- training time")]
    assert tables in report.stdout
    assert proc.stdout[proc.stdout.index("Tuning check") :].split("wrote")[0] in report.stdout
    # a report with no cached run says so instead of writing an empty table
    empty = _run("benchmarks.accuracy_lawn", "--smoke", "--report-only", "--cache", str(tmp_path / "none.json"))
    assert empty.returncode != 0 and "no finished cell to report" in empty.stderr

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
def test_lawn_accuracy_smoke_prints_the_tables() -> None:
    proc = _run("benchmarks.accuracy_lawn", "--smoke")
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
        "Final training loss",
        "Chosen on the validation split",
    ):
        assert row in proc.stdout, row
    assert "lawn_norms_smoke.png" in proc.stdout

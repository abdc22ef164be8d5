"""Smoke runs of the USKD speed suite and accuracy benchmark, so that they cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_uskd_speed_smoke_prints_ratio_rows() -> None:
    # --no-memory: the peak-memory subprocesses are the harness's own code (tested with the
    # foundation suite) and would start four more interpreters here.
    proc = _run("benchmarks.speed", "--suite", "uskd", "--smoke", "--no-memory")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### speed: uskd" in proc.stdout
    for case, baseline in (("resnet10t+uskd", "resnet10t"), ("deit_tiny+uskd", "deit_tiny")):
        row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {case} |"))
        assert f"| {baseline} |" in row and float(row.split("|")[6]) > 0


def test_uskd_accuracy_smoke_prints_the_table() -> None:
    proc = _run("benchmarks.accuracy_uskd", "--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### USKD accuracy" in proc.stdout
    assert "| baseline (CE) |" in proc.stdout and "| CE + USKD (rank by log-prob) |" in proc.stdout

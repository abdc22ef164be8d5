"""Smoke run of the logit-diagnostics accuracy benchmark, so that it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def test_diagnostics_accuracy_smoke_prints_the_tables() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy_diagnostics", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "### Logit diagnostics" in out
    for row in ("| ViM |", "| LogitGap (all C-1) |", "| MaNo |", "| ATC |", "| dual focal (gamma 5) |"):
        assert row in out, row
    vim_auroc = float(next(line for line in out.splitlines() if line.startswith("| ViM |")).split("|")[2].split()[0])
    assert 0 <= vim_auroc <= 100

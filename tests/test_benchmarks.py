"""Smoke runs of the foundation and floor speed suites, so the harness cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_foundation_speed_smoke_prints_a_ratio_table() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--suite", "foundation", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| classifier+zero_term | classifier |" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| classifier+zero_term"))
    cells = [cell.strip() for cell in row.split("|")]
    assert float(cells[6]) > 0  # ratio
    assert float(cells[8]) >= 0  # peak memory (MiB)


def test_floor_speed_smoke_times_the_loop_bare_lightning_and_ours() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed", "--suite", "floor", "--smoke", "--no-memory"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for case, baseline in [
        ("lightning_er", "loop_er"),
        ("loop_uer", "loop_er"),
        ("classifier+er", "loop_er"),
        ("classifier+uer", "classifier+er"),
        ("resnet18_uer", "resnet18_er"),
    ]:
        cells = [cell.strip() for cell in rows[case].split("|")]
        assert cells[2] == baseline and float(cells[3]) > 0 and float(cells[6]) > 0  # baseline, median, ratio
    assert "1 (baseline)" in rows["loop_er"]

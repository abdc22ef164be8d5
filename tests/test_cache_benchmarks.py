"""Smoke run of the cache build benchmark (1 vs 2 processes), so it cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.ddp
def test_cache_build_benchmark_smoke_prints_the_ratio_and_equal_bytes() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_cache", "--smoke"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in proc.stdout.splitlines() if line.startswith("| ")}
    for processes in ("1", "2"):
        cells = [cell.strip() for cell in rows[processes].split("|")]
        assert float(cells[3]) > 0 and float(cells[4]) > 0 and float(cells[5]) > 0  # build s, wall s, ratio
        assert cells[6] == "yes"  # the 2-process cache has the 1-process bytes
    assert [cell.strip() for cell in rows["1"].split("|")][5] == "1.00"  # the baseline's own ratio

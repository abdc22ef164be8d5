"""The distillation benchmarks' smoke runs finish and print their tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_speed_suite_smoke() -> None:
    out = _run("benchmarks.speed", "--suite", "distillation", "--smoke")
    assert "### speed: distillation" in out
    for case in ("student+teacher_forward", "student+nkd", "student+nkd_cache"):
        assert f"| {case} |" in out


@pytest.mark.slow
def test_accuracy_smoke() -> None:
    out = _run("benchmarks.accuracy_distillation", "--smoke")
    assert "### accuracy: distillation" in out
    assert "| +NKD (T=1, gamma=1.5) |" in out and "| +KD (T=4) |" in out

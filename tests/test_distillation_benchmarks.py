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


@pytest.mark.slow
def test_lm_accuracy_smoke() -> None:
    out = _run("benchmarks.accuracy_distillation_lm", "--smoke")
    assert "### accuracy: distillation, language model" in out
    for row in ("| student |", "| +KD online (T=1) |", "| +KD cache top-8 (T=1) |", "| +DKD online (T=1, beta=8) |"):
        assert row in out


def test_memory_benchmark_measures_the_loss_above_its_inputs() -> None:
    from benchmarks.memory_distillation import main, measure

    result = measure("kd_chunked", batch=2, seq=8, vocab=50, chunk=4)
    assert set(result) == {"case", "loss_mb", "peak_mb", "inputs_mb"} and result["loss_mb"] >= 0
    assert result["peak_mb"] >= result["inputs_mb"]
    with pytest.raises(SystemExit):
        main(["--cases", "rkd"])

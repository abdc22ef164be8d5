"""scripts/gpu_check.sh on a machine without CUDA: a clear skip line and exit status 0, quickly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the script would run the GPU checks")
def test_gpu_check_skips_cleanly_without_cuda() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines() == [
        "no CUDA: skipped (scripts/gpu_check.sh needs a CUDA device; nothing was run)"
    ]

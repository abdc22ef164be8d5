"""Start every rank of a multi-process (or simulated multi-node) run as a separate process.

Lightning takes processes started from outside when ``LOCAL_RANK`` is set (as torchrun and SLURM
do), so a test can run 2 processes on one node, or 2 "nodes" of 1 process each on loopback
(``NODE_RANK`` 0 and 1, one ``MASTER_ADDR=127.0.0.1``/``MASTER_PORT``), the same way.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from benchmarks.harness import launch_ranks

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "parallel_worker.py"


def launch(
    args: list[str],
    world_size: int = 2,
    num_nodes: int = 1,
    timeout: float = 600,
    script: Path = WORKER,
    extra_env: dict[str, str] | None = None,
) -> list[str]:
    """Run ``script args`` as ``world_size`` ranks over ``num_nodes`` simulated nodes; return each rank's output.

    Raises ``AssertionError`` with every rank's output tail when a rank fails or the run times out.
    """
    env = {"PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    return launch_ranks([sys.executable, str(script), *args], world_size, num_nodes, timeout, env, cwd=ROOT)

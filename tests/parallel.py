"""Start every rank of a multi-process (or simulated multi-node) run as a separate process.

Lightning takes processes started from outside when ``LOCAL_RANK`` is set (as torchrun and SLURM
do), so a test can run 2 processes on one node, or 2 "nodes" of 1 process each on loopback
(``NODE_RANK`` 0 and 1, one ``MASTER_ADDR=127.0.0.1``/``MASTER_PORT``), the same way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lightning.fabric.plugins.environments.lightning import find_free_network_port

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
    per_node = world_size // num_nodes
    port = str(find_free_network_port())
    procs = []
    for rank in range(world_size):
        env = {
            **os.environ,
            **(extra_env or {}),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "NODE_RANK": str(rank // per_node),
            "LOCAL_RANK": str(rank % per_node),
            "WORLD_SIZE": str(world_size),
            "WORLD_SIZE_HINT": str(world_size),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1",
            "WORKER_DUMP_AFTER": str(max(timeout - 20, 5)),
        }
        command = [sys.executable, str(script), *args, "--devices", str(per_node), "--num-nodes", str(num_nodes)]
        procs.append(
            subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
    # A rank that fails leaves the others waiting in a collective: stop them soon after.
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now - failed_at > 15):
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.2)
    outputs = [p.communicate()[0] for p in procs]
    if time.monotonic() > deadline:
        outputs = [o + f"\n[timed out after {timeout} s]" for o in outputs]
    failed = any(p.returncode != 0 for p in procs)
    if failed:
        tails = "\n".join(
            f"--- rank {r} (exit {p.returncode}) ---\n{o[-12000:]}"
            for r, (p, o) in enumerate(zip(procs, outputs, strict=True))
        )
        raise AssertionError(f"a rank of {script.name} {' '.join(args)} failed:\n{tails}")
    return outputs

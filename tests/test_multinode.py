"""Two nodes of one process each, simulated on loopback: what is written once per job is written by
global rank 0 only.

Each test starts ``tests/two_node_child.py`` twice through :func:`tests.parallel.launch`, with
``NODE_RANK=0`` and ``1``, one shared ``MASTER_PORT`` and ``num_nodes=2, devices=1``: the second
process is local rank 0 of node 1, the process a ``local_rank == 0`` check would let write. The
child records every path it writes under the run's folder; the once-per-job files (cache
``meta.json``, diagnostics plots, the accuracy matrix and its plot, the logger's files) must appear
in node 0's record and in no other.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from lightning_logits.teacher_cache import TeacherLogitCache
from tests.parallel import ROOT, launch

pytestmark = pytest.mark.ddp

CHILD = ROOT / "tests" / "two_node_child.py"
# Written by every rank by design: the rows of the cache each rank computed (disjoint parts of shared files).
SHARED_BY_DESIGN = {f"cache/{name}.npy" for name in ("values", "indices", "rest", "written", "checksum")}


def _two_nodes(part: str, out: Path) -> tuple[list[str], list[str], float]:
    """Run both nodes of ``part``; returns the paths each wrote and the wall time."""
    start = time.perf_counter()
    launch(
        [part, str(out)], world_size=2, num_nodes=2, timeout=400, script=CHILD, extra_env={"PYTHONWARNINGS": "ignore"}
    )
    wall = time.perf_counter() - start
    writes = [json.loads((out / f"writes_node{node}.json").read_text()) for node in (0, 1)]
    print(f"{part}: 2 nodes x 1 process in {wall:.1f} s")
    return writes[0], writes[1], wall


def _once_per_job(paths: list[str]) -> set[str]:
    return {p for p in paths if p not in SHARED_BY_DESIGN and not p.startswith("writes_node")}


@pytest.mark.parametrize("part", ["ddp", "model_parallel"])
def test_two_nodes_fit_and_cache_write_job_files_from_global_rank_zero_only(part: str, tmp_path: Path) -> None:
    node0, node1, _ = _two_nodes(part, tmp_path)
    once = _once_per_job(node0)
    # the files this run must have produced, all from node 0
    expected = {
        "cache/meta.json",
        "cache/building.json",
        "continual/accuracy_matrix.pt",
        "continual/accuracy_matrix.png",
    }
    assert expected <= once, sorted(once)
    assert any(p.startswith("logs/") and p.endswith("metrics.csv") for p in once), sorted(once)
    assert any(p.startswith("logs/") and "/diagnostics/" in p and p.endswith(".png") for p in once), sorted(once)
    # node 1 (local rank 0 of its node) wrote its cache rows and nothing else
    assert set(node1) - SHARED_BY_DESIGN == set(), sorted(set(node1) - SHARED_BY_DESIGN)
    assert "cache/written.npy" in node1  # it did take part in the cache
    cache = TeacherLogitCache(tmp_path / "cache")
    assert cache.num_samples == len(np.asarray(cache.written)) and bool(np.asarray(cache.written).all())


def test_two_node_cache_command_writes_meta_once(tmp_path: Path) -> None:
    node0, node1, _ = _two_nodes("cache_cli", tmp_path)
    assert {"cache/meta.json", "cache/building.json"} <= _once_per_job(node0)
    assert set(node1) == SHARED_BY_DESIGN  # its rows, nothing written once per job
    cache = TeacherLogitCache(tmp_path / "cache")
    assert cache.k == 3 and cache.num_classes == 10 and cache.data_fingerprint is not None

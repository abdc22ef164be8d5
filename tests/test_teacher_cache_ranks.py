"""The teacher-logit cache built by several processes, and a stopped build resumed.

A build with N processes must give the very files one process gives (every ``.npy`` byte for
byte, and ``meta.json``), and a build that stopped must continue without asking the teacher again
for the rows already on disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from lightning_logits.cli import cache_main, launch_teacher_cache
from lightning_logits.networks.factory import build_model
from lightning_logits.teacher_cache import (
    BUILDING_FILE,
    TeacherLogitCache,
    build_teacher_cache,
    rank_batches,
)

ROOT = Path(__file__).resolve().parent.parent
CACHE_FILES = ("values.npy", "indices.npy", "rest.npy", "written.npy", "checksum.npy", "meta.json")


class CountingTeacher(nn.Module):
    """A fixed small MLP (``[..., 6] -> [..., 7]``) that appends one line per call to ``<log_dir>/calls_rank<r>``.

    With ``kill_rank``/``kill_at`` the process of that rank kills itself (SIGKILL) at that call,
    a crash that runs no cleanup code at all.
    """

    def __init__(self, log_dir: str, kill_rank: int | None = None, kill_at: int = 0) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 7))
        self.log_dir, self.kill_rank, self.kill_at = log_dir, kill_rank, kill_at
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.calls += 1
        if rank == self.kill_rank and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        with open(Path(self.log_dir) / f"calls_rank{rank}", "a") as log:
            log.write(f"{x.shape[0]}\n")
        return self.net(x)


class FailingTeacher(CountingTeacher):
    """Raises at call ``fail_at`` (an error in the middle of a build)."""

    def __init__(self, log_dir: str, fail_at: int) -> None:
        super().__init__(log_dir)
        self.fail_at = fail_at

    def forward(self, x: Tensor) -> Tensor:
        if self.calls + 1 == self.fail_at:
            raise RuntimeError("teacher crashed")
        return super().forward(x)


def _calls(log_dir: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in log_dir.glob("calls_rank*"))


def _loader(n: int = 50, batch_size: int = 8, positions: int | None = None) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(0)
    shape = (n, 6) if positions is None else (n, positions, 6)
    x = torch.randn(*shape, generator=g)
    y = torch.arange(n) % 7 if positions is None else torch.randint(0, 7, (n, positions), generator=g)
    return DataLoader(TensorDataset(x, y, torch.arange(n)), batch_size=batch_size, shuffle=False)


def _assert_same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(CACHE_FILES), list(a.iterdir())
    assert sorted(p.name for p in b.iterdir()) == sorted(CACHE_FILES), list(b.iterdir())
    for name in CACHE_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


class RecordingDataset(Dataset[tuple[Tensor, Tensor, Tensor]]):
    def __init__(self, n: int) -> None:
        self.n = n
        self.read: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        self.read.append(i)
        return torch.tensor([float(i)]), torch.tensor(0), torch.tensor(i)


@pytest.mark.parametrize("world", [2, 3])
def test_rank_batches_deal_whole_batches_once_and_load_only_their_own(world: int) -> None:
    dataset = RecordingDataset(23)
    loader = DataLoader(dataset, batch_size=4)
    one_process = [b[2].tolist() for b in loader]
    dealt: list[list[int]] = []
    for rank in range(world):
        dataset.read.clear()
        mine = [b[2].tolist() for b in rank_batches(loader, rank, world)]
        assert mine == one_process[rank::world]  # the same batches, unchanged, in order
        assert sorted(dataset.read) == sorted(i for b in mine for i in b)  # other ranks' samples never read
        assert len(rank_batches(loader, rank, world)) == len(mine)  # type: ignore[arg-type]
        dealt += mine
    assert sorted(i for b in dealt for i in b) == list(range(23))  # every sample once, none padded
    plain = [b for b in loader]  # any other iterable: read in full, other ranks' batches dropped
    assert [b[2].tolist() for b in rank_batches(iter(plain), 1, world)] == one_process[1::world]
    split = DataLoader(dataset, batch_size=4, sampler=DistributedSampler(dataset, world, 0, shuffle=False))
    with pytest.raises(ValueError, match="already has a DistributedSampler"):
        rank_batches(split, 0, world)


def test_a_stopped_build_resumes_without_asking_the_teacher_for_written_rows(tmp_path: Path) -> None:
    clean = build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), tmp_path / "clean", k=3, source="mlp")
    assert clean.k == 3 and _calls(tmp_path) == 7
    (tmp_path / "calls_rank0").unlink()

    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="teacher crashed"):
        build_teacher_cache(FailingTeacher(str(tmp_path), fail_at=4), _loader(), out, k=3, source="mlp")
    assert not (out / "meta.json").exists() and (out / BUILDING_FILE).exists()
    assert int(np.load(out / "written.npy").sum()) == 3 * 8  # the three batches before the crash
    with pytest.raises(FileNotFoundError, match=r"missing meta\.json"):
        TeacherLogitCache(out)  # not readable before it is finished
    with pytest.raises(FileExistsError, match="resume=True"):
        build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), out, k=3, source="mlp")
    with pytest.raises(ValueError, match="k 3"):
        build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), out, k=4, resume=True, source="mlp")
    with pytest.raises(ValueError, match="teacher 'mlp' \\(asked: 'another'\\)"):
        build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), out, k=3, resume=True, source="another")

    (tmp_path / "calls_rank0").unlink()
    cache = build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), out, k=3, resume=True, source="mlp")
    assert _calls(tmp_path) == 7 - 3  # only the batches never written
    assert cache.data_fingerprint == clean.data_fingerprint  # labels of the skipped batches counted too
    _assert_same_files(out, tmp_path / "clean")

    # resuming a finished cache asks nothing and changes nothing
    (tmp_path / "calls_rank0").unlink()
    build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), out, k=3, resume=True, source="mlp")
    assert _calls(tmp_path) == 0
    _assert_same_files(out, tmp_path / "clean")


@pytest.mark.ddp
def test_two_processes_killed_mid_build_resume_with_two_processes_to_the_one_process_bytes(
    ddp_env: int, tmp_path: Path
) -> None:
    one = build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), tmp_path / "one", k=3, source="mlp")
    assert one.num_samples == 50
    logs = tmp_path / "logs"
    logs.mkdir()
    out = tmp_path / "two"
    # rank 1 takes batches 1, 3, 5 of 7: it writes batch 1 and dies (SIGKILL) on batch 3
    with pytest.raises(Exception):  # noqa: B017 (the launcher reports the killed process)
        launch_teacher_cache(CountingTeacher(str(logs), kill_rank=1, kill_at=2), _loader(), out, k=3, source="mlp")
    assert not (out / "meta.json").exists() and (out / BUILDING_FILE).exists()
    written = np.load(out / "written.npy")
    batches_left = sum(not written[i : i + 8].all() for i in range(0, 50, 8))
    assert written[8:16].all() and 1 <= batches_left < 7, written.astype(int)

    for log in logs.iterdir():
        log.unlink()
    launch_teacher_cache(CountingTeacher(str(logs)), _loader(), out, k=3, resume=True, source="mlp")
    assert _calls(logs) == batches_left
    _assert_same_files(out, tmp_path / "one")


@pytest.mark.ddp
def test_a_sequence_cache_built_by_two_processes_equals_one_process(ddp_env: int, tmp_path: Path) -> None:
    loader = _loader(n=21, batch_size=4, positions=5)  # 6 batches, the last one of a single sample
    one = build_teacher_cache(CountingTeacher(str(tmp_path)), loader, tmp_path / "one", k=2, source="mlp")
    assert one.positions == 5 and one.values.shape == (21, 5, 2)
    (tmp_path / "calls_rank0").unlink()
    two = launch_teacher_cache(CountingTeacher(str(tmp_path)), loader, tmp_path / "two", k=2, devices=2, source="mlp")
    calls = {p.name: len(p.read_text().splitlines()) for p in tmp_path.glob("calls_rank*")}
    assert calls == {"calls_rank0": 3, "calls_rank1": 3}  # both ranks worked, each on its half
    assert two.positions == 5
    _assert_same_files(tmp_path / "one", tmp_path / "two")


@pytest.mark.ddp
def test_cache_command_with_two_devices_writes_the_one_process_files(ddp_env: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(build_model("resnet10t", 10, in_chans=1).state_dict(), tmp_path / "teacher.pt")
    args = ["--teacher", "resnet10t", "--checkpoint", str(tmp_path / "teacher.pt"), "--num-classes", "10"]
    args += ["--model-kwargs", '{"in_chans": 1}', "--k", "4", "--batch-size", "100"]
    args += ["--data-args", '{"train_fraction": 0.3}']
    cache_main([*args, "--out", str(tmp_path / "one")])
    # --strategy ddp re-runs the command for rank 1: run it as a user does, in its own process
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    command = Path(sys.executable).parent / "lightning-logits-cache"
    proc = subprocess.run(
        [str(command), *args, "--out", str(tmp_path / "two"), "--devices", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote top-4 logits of 323 samples") == 1, proc.stdout  # printed by rank 0 only
    _assert_same_files(tmp_path / "one", tmp_path / "two")
    assert json.loads((tmp_path / "two" / "meta.json").read_text())["data_fingerprint"]["num_samples"] == 323

"""Crashes at random steps (issue 29): ``kill -9`` a training of every stateful method at a seeded
step, resume from ``last.ckpt`` and compare with an uninterrupted run, bit for bit.

The suite runs one crash point per method (``benchmarks.crash``'s short profile; the long profile,
three points per method, is ``python -m benchmarks.crash``), and one 2-process DDP crash.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch

from benchmarks import crash
from tests.parallel import launch


def test_every_stateful_method_resumes_bit_identical_after_kill_9_at_a_seeded_step(tmp_path: Path) -> None:
    results = crash.run(points_per_method=1, workdir=tmp_path)
    assert [r.case for r in results] == list(crash.CASES)
    assert {r.where for r in results} == set(crash.WHERE)  # each place of the kill is tried
    for r in results:
        assert r.exit_code == -signal.SIGKILL, r
        low, high = crash.CASES[r.case].crash_steps
        assert low <= r.step <= high
        # killed while last.ckpt of step N was written: the previous one (step N - 1) is intact, and
        # the half-written temporary file Lightning renames into place is left behind
        assert r.checkpoint_step == (r.step - 1 if r.where == "checkpoint_write" else r.step), r
        temporary = (tmp_path / r.case / f"step{r.step}_{r.where}" / "tmp").iterdir()
        leftovers = [p for p in temporary if not p.name.endswith(".py")]  # torch_geometric writes modules there
        assert len(leftovers) == (r.where == "checkpoint_write"), leftovers
        assert r.differences == [], r
        assert r.survived
    # the kill points are drawn from a fixed seed: the same on every machine
    rng = random.Random(crash.SEED)
    assert [(r.step, r.where) for r in results] == [
        point for case in crash.CASES.values() for point in crash.crash_points(case, 1, rng)
    ]


def test_the_comparison_catches_a_resume_that_lost_a_callback_state(tmp_path: Path) -> None:
    # ER killed mid-task, resumed from a last.ckpt whose ExperienceReplay state was removed: the
    # resumed run starts with an empty buffer and ends elsewhere, which the comparison must report.
    case = crash.CASES["er"]
    shared, full_dir, run_dir = tmp_path / "shared", tmp_path / "full", tmp_path / "run"
    for folder in (shared, full_dir, run_dir):
        folder.mkdir()
    assert crash.in_child(crash.train, case, shared, full_dir, None, False) == 0
    assert crash.in_child(crash.train, case, shared, run_dir, (6, "step_start"), False) == -signal.SIGKILL
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("ExperienceReplay")]
    del checkpoint["callbacks"][key]
    torch.save(checkpoint, last)
    assert crash.in_child(crash.train, case, shared, run_dir, None, True) == 0
    found = crash.differences(
        torch.load(full_dir / "result.pt", weights_only=False), torch.load(run_dir / "result.pt", weights_only=False)
    )
    assert any(d.startswith(".callbacks.ExperienceReplay.") for d in found), found
    assert any(d.startswith(".module.model.") for d in found), found


def test_differences_compares_tensors_bit_for_bit_and_nan_as_equal() -> None:
    nan = float("nan")
    assert crash.differences({"a": torch.tensor([1.0, nan])}, {"a": torch.tensor([1.0, nan])}) == []
    assert crash.differences({"a": torch.tensor([1.0, nan])}, {"a": torch.tensor([1.0, 2.0])}) != []
    assert crash.differences([torch.tensor([1.0])], [torch.tensor([1.0 + 2**-20])]) == [
        "[0]: values differ (largest gap 9.54e-07)"
    ]
    assert crash.differences({"step": 3, "x": nan}, {"step": 4, "x": nan}) == [".step: 3 vs 4"]


def test_a_resume_from_the_last_step_of_a_task_still_evaluates_that_task(tmp_path: Path) -> None:
    # last.ckpt of step 4 is written at the last training step of task 0, before its validation;
    # Lightning does not validate again after the resume, ContinualMetrics evaluates the task itself.
    (result,) = crash.run_case(crash.CASES["er"], tmp_path, [(4, "step_start")])
    assert result.checkpoint_step == 4 and result.differences == []
    resumed = torch.load(tmp_path / "er" / "step4_step_start" / "result.pt", weights_only=False)
    matrix = resumed["callbacks"]["ContinualMetrics"]["accuracy_matrix"]
    assert not matrix[:3].diagonal().isnan().any() and matrix[3:].isnan().all()  # 3 tasks trained of 5


@pytest.mark.ddp
def test_kill_9_under_two_process_ddp_resumes_to_the_uninterrupted_weights_and_states(tmp_path: Path) -> None:
    # LAWN past its switch, UER's per-rank buffers (and their random generators), USKD's auxiliary
    # head: a checkpoint at every step, both ranks killed at the start of step 9.
    common = ["--strategy", "ddp", "--scenarios", "resume", "--steps", "12", "--methods", "lawn,uer,uskd"]
    common += ["--every-n-steps", "1"]
    launch([*common, "--out", str(tmp_path / "full"), "--ckpt-dir", str(tmp_path / "ck_full")])
    with pytest.raises(AssertionError, match="exit -9"):
        launch([*common, "--out", str(tmp_path / "crash"), "--ckpt-dir", str(tmp_path / "ck"), "--crash-at", "9"])
    last = torch.load(tmp_path / "ck" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 9
    launch([*common, "--out", str(tmp_path / "resumed"), "--ckpt-dir", str(tmp_path / "ck"), "--resume"])
    for rank in (0, 1):
        full = json.loads((tmp_path / "full" / f"resume.rank{rank}.json").read_text())
        resumed = json.loads((tmp_path / "resumed" / f"resume.rank{rank}.json").read_text())
        assert sorted(map(int, resumed["losses"])) == list(range(9, 12))
        assert {s: resumed["losses"][s] for s in resumed["losses"]} == {s: full["losses"][s] for s in resumed["losses"]}
        assert resumed["params"] == full["params"]  # bit for bit (JSON keeps every float64 digit)
        states = [
            torch.load(tmp_path / run / f"resume_states.rank{rank}.pt", weights_only=False)
            for run in ("full", "resumed")
        ]
        assert states[0]["LAWN"]["phase"] == "constrained"
        assert crash.differences(states[0], states[1]) == []


def test_the_benchmark_command_prints_both_tables(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "crash.md"
    crash.main(["--smoke", "--cases", "uskd", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| uskd | " in printed and "1 of 1 crashes survived over 1 methods." in printed
    assert "| checkpoint | flipped byte | 2 |" in printed and "0 read back changed without an error" in printed
    assert not out.exists()  # --smoke does not replace the long profile's results

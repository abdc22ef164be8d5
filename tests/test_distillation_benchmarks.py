"""The distillation benchmarks' smoke runs finish and print their tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
@pytest.mark.parametrize("data", ["mnist1d", "digits"])
def test_accuracy_smoke(data: str) -> None:
    out = _run("benchmarks.accuracy_distillation", "--smoke", "--data", data)
    assert f"### accuracy: distillation ({data})" in out
    for row in ("| +NKD (T=1, gamma=1.5) |", "| +KD (T=4) |", "| +DKD+LS (T=2, alpha=9, beta=72) |", "| +DIST+LS"):
        assert row in out


def test_mnist1d_splits_are_seeded_stratified_and_disjoint(tmp_path: Path) -> None:
    from benchmarks.mnist1d import MNIST1DDataModule

    x = torch.arange(200 * 40, dtype=torch.float32).reshape(200, 40)  # row i holds distinct values
    y = torch.arange(200) % 10
    torch.save({"x": x, "y": y, "x_test": x[:30] + 0.5, "y_test": y[:30]}, tmp_path / "m.pt")
    first = MNIST1DDataModule(seed=0, shape=(1, 40), cache=tmp_path / "m.pt")
    first.setup()
    train, val, test = (first.splits[k] for k in ("train", "val", "test"))
    assert train[0].shape == (160, 1, 40) and val[0].shape == (40, 1, 40) and test[0].shape == (30, 1, 40)
    assert torch.equal(val[1].bincount(minlength=10), torch.full((10,), 4))  # stratified: 4 of each class
    rows = torch.cat([train[0][:, 0, 0], val[0][:, 0, 0]]).long() // 40
    assert torch.equal(rows.sort().values, torch.arange(200))  # every training signal once: disjoint
    assert torch.equal(test[0][:, 0], x[:30] + 0.5)  # the test split is the package's, untouched
    again = MNIST1DDataModule(seed=0, shape=(1, 40), cache=tmp_path / "m.pt")
    again.setup()
    other = MNIST1DDataModule(seed=1, shape=(1, 40), cache=tmp_path / "m.pt")
    other.setup()
    assert torch.equal(again.splits["val"][0], val[0]) and not torch.equal(other.splits["val"][0], val[0])
    batch_x, batch_y = next(iter(first.train_dataloader()))
    assert batch_x.shape == (64, 1, 40) and batch_y.shape == (64,)


def test_accuracy_table_merges_the_seed_files_of_separate_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.accuracy_distillation as bench

    # stand-in training: the teacher scores 90 + seed, each student its name's length + seed
    monkeypatch.setattr(bench, "train_teacher", lambda setting, seed, epochs: (torch.nn.Linear(1, 1), 90.0 + seed))

    def fake_student(setting: object, seed: int, epochs: int, fraction: float, make: object) -> tuple[float, float]:
        fake_student.calls += 1  # type: ignore[attr-defined]
        return 50.0 + 10 * seed + fake_student.bonus, 40.0 + seed  # type: ignore[attr-defined]

    fake_student.calls, fake_student.bonus = 0, 0.0  # type: ignore[attr-defined]
    monkeypatch.setattr(bench, "train_student", fake_student)
    monkeypatch.setattr(bench, "student_configs", lambda teacher, only: {"student": list, "+KD": list})
    out = tmp_path / "table.md"
    bench.main(["--seed-list", "0", "--out", str(out)])
    fake_student.bonus = 1.0  # type: ignore[attr-defined]
    bench.main(["--seed-list", "1", "--out", str(out)])
    assert sorted(p.name for p in (tmp_path / "table").iterdir()) == ["seed_0.json", "seed_1.json"]
    table = out.read_text()
    assert "Seeds [0, 1]" in table and "test accuracy 90.50 ± 0.71 %" in table
    # last-epoch accuracies 50 and 61 for both rows: mean 55.5, std 7.78; the paired difference is 0
    assert "| student | 55.50 ± 7.78 | 40.50 ± 0.71 |  |" in table
    assert "| +KD | 55.50 ± 7.78 | 40.50 ± 0.71 | 0.00 ± 0.00 |" in table
    calls = fake_student.calls  # type: ignore[attr-defined]
    bench.main(["--seed-list", "0", "1", "--out", str(out)])  # both seeds on disk: nothing retrained
    assert fake_student.calls == calls  # type: ignore[attr-defined]
    bench.main(["--seed-list", "0", "--epochs", "3", "--out", str(out)])  # other settings: retrained
    assert fake_student.calls == calls + 2  # type: ignore[attr-defined]


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
    for case in ("reverse_kl_chunked", "jsd"):  # names with underscores: the loss is all but the suffix
        assert measure(case, batch=2, seq=8, vocab=50, chunk=4)["case"] == case
    with pytest.raises(SystemExit):
        main(["--cases", "rkd"])

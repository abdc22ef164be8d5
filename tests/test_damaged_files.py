"""Damaged files (issue 29): a cut-off or altered checkpoint, cache array, ``meta.json`` or accuracy
matrix, a cache folder that cannot be written, a full disk while the cache is written.

Each gives an error that names the file and says what to do, and a cache build stopped by any of
them resumes without asking the teacher again for the rows it had written.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import resource
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from benchmarks import crash
from lightning_logits.cli import build_cli
from lightning_logits.networks import check_checkpoint, load_teacher
from lightning_logits.teacher_cache import BUILDING_FILE, TeacherLogitCache, build_teacher_cache
from tests.helpers import fast_trainer
from tests.test_teacher_cache_ranks import CountingTeacher, _assert_same_files, _calls, _loader

ROOT = Path(__file__).resolve().parent.parent
ARRAYS = ("values.npy", "indices.npy", "rest.npy", "written.npy", "checksum.npy")
NOBODY = 65534
DATA = {"class_path": "tests.test_teacher_cache_ranks._loader", "init_args": {"n": 50}, "split": "train"}


# --------------------------------------------------------------------------- checkpoints
def _lightning_checkpoints(folder: Path) -> tuple[Path, Path]:
    """Two real checkpoints of a 2-step Classifier fit: ``step1.ckpt`` (older) and ``last.ckpt``."""
    torch.manual_seed(0)
    module = crash._classifier()
    trainer = fast_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=crash.BlobData())
    trainer.save_checkpoint(folder / "step1.ckpt")
    trainer = fast_trainer(max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=crash.BlobData(), ckpt_path=str(folder / "step1.ckpt"))
    trainer.save_checkpoint(folder / "last.ckpt")
    os.utime(folder / "step1.ckpt", (1, 1))  # older, whatever the file system's time resolution
    return folder / "step1.ckpt", folder / "last.ckpt"


def test_a_cut_off_or_altered_checkpoint_is_named_with_the_checkpoints_beside_it(tmp_path: Path) -> None:
    older, last = _lightning_checkpoints(tmp_path)
    assert check_checkpoint(last) == last and check_checkpoint(older) == older
    data = last.read_bytes()
    # cut off (a copy killed half-way): torch's own error names no file
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"is not a readable checkpoint \(truncated") as info:
        check_checkpoint(last)
    assert f"'{last}'" in str(info.value) and f"newest first: {older}" in str(info.value)
    # one weight changed on disk after it was written: torch.load takes it silently, the check does not
    weight = torch.load(older, weights_only=False)["state_dict"]["model.head.weight"]
    start = data.find(weight.numpy().tobytes())
    assert start > 0
    altered = bytearray(data)
    altered[start : start + 4] = np.float32(np.inf).tobytes()
    last.write_bytes(bytes(altered))
    silently = torch.load(last, weights_only=False)["state_dict"]["model.head.weight"]
    assert torch.isinf(silently).sum() == 1  # what a resume without the check would train on
    with pytest.raises(ValueError, match=r"Bad CRC-32 for file '[^']*/data/\d+'.*cannot be trusted") as info:
        check_checkpoint(last)
    assert f"'{last}'" in str(info.value) and str(older) in str(info.value)
    # the same check guards a teacher checkpoint and the command line's --ckpt_path
    with pytest.raises(ValueError, match="Bad CRC-32"):
        load_teacher(str(last))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"not a torch checkpoint: an empty file"):
        check_checkpoint(empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_checkpoint(tmp_path / "missing.ckpt")


def test_the_command_line_refuses_a_damaged_ckpt_path_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    damaged = tmp_path / "last.ckpt"
    damaged.write_bytes(b"PK\x03\x04 cut off")
    args = ["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--ckpt_path", str(damaged)]
    args += ["--trainer.logger=false", "--trainer.enable_checkpointing=false"]
    with pytest.raises(ValueError, match=f"'{damaged}' is not a readable checkpoint"):
        build_cli(args)


# --------------------------------------------------------------------------- cache files
def _cache(tmp_path: Path) -> Path:
    out = tmp_path / "cache"
    build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), out, k=3, source="mlp")
    return out


@pytest.mark.parametrize("name", ARRAYS)
def test_a_cut_off_or_overwritten_cache_array_is_named_with_the_rebuild_command(tmp_path: Path, name: str) -> None:
    out = _cache(tmp_path)
    data = (out / name).read_bytes()
    for damage in (
        data[: len(data) - 7],  # the last bytes never reached the disk
        data[:60],  # the header itself cut off
        b"\0" * len(data),  # zeros over the header (a lost block)
    ):
        (out / name).write_bytes(damage)
        with pytest.raises(ValueError, match="is damaged") as info:
            TeacherLogitCache(out)
        message = str(info.value)
        assert f"'{out / name}'" in message and f"--out {out} --overwrite" in message
    (out / name).unlink()
    with pytest.raises(FileNotFoundError, match=f"'{out / name}' is missing"):
        TeacherLogitCache(out)


@pytest.mark.parametrize("name", ["values.npy", "indices.npy", "rest.npy", "checksum.npy"])
def test_a_row_changed_after_the_build_fails_its_checksum_when_it_is_read(tmp_path: Path, name: str) -> None:
    out = _cache(tmp_path)
    clean = TeacherLogitCache(out).logits(torch.arange(50))
    array = np.load(out / name, mmap_mode="r+")
    row = 17
    raw = array.view(np.uint8).reshape(-1)
    raw[row * array[0:1].nbytes + 1] ^= 0x10  # one bit of one byte of row 17
    array.flush()
    del array, raw
    cache = TeacherLogitCache(out)  # opens: the headers and shapes are intact
    torch.testing.assert_close(cache.logits(torch.arange(17)), clean[:17], rtol=0, atol=0)  # other rows read fine
    with pytest.raises(ValueError, match=r"rows \[17\] fail their checksum") as info:
        cache.logits(torch.tensor([3, 17, 30]))
    assert f"'{out / name}'" in str(info.value) and f"--out {out} --overwrite" in str(info.value)


def test_a_cache_built_before_checksums_is_read_without_them(tmp_path: Path) -> None:
    out = _cache(tmp_path)
    meta = json.loads((out / "meta.json").read_text())
    del meta["checksum"]
    (out / "meta.json").write_text(json.dumps(meta))
    (out / "checksum.npy").unlink()
    cache = TeacherLogitCache(out)
    assert cache.checksum is None and cache.logits(torch.arange(50)).shape == (50, 7)


def test_an_array_of_another_shape_than_meta_json_says_is_refused(tmp_path: Path) -> None:
    out = _cache(tmp_path)
    np.save(out / "rest.npy", np.zeros(49, np.float32))  # one row short: a cache of another data set
    with pytest.raises(ValueError, match=r"rest\.npy' is damaged \(shape \(49,\), meta\.json says \(50,\)\)"):
        TeacherLogitCache(out)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda text: text[: len(text) // 2], "not valid JSON"),
        (lambda text: "", "not valid JSON"),
        (lambda text: "[1, 2]", "holds a list, not a JSON object"),
        (lambda text: text.replace('"num_samples"', '"num_sample"'), "KeyError"),
    ],
)
def test_a_damaged_meta_json_is_named_and_training_stops_before_the_first_step(
    tmp_path: Path, damage: Any, reason: str
) -> None:
    from lightning_logits.callbacks import TeacherDistillation

    out = _cache(tmp_path)
    meta = out / "meta.json"
    meta.write_text(damage(meta.read_text()))
    with pytest.raises(ValueError, match=f"'{meta}' is damaged .*{reason}.*--overwrite"):
        TeacherLogitCache(out)
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[TeacherDistillation(cache=str(out))])
    with pytest.raises(ValueError, match=f"'{meta}' is damaged"):
        trainer.fit(crash._classifier(), datamodule=crash.BlobData())
    assert trainer.global_step == 0


def test_a_damaged_building_json_is_named_when_a_build_resumes(tmp_path: Path) -> None:
    out = _cache(tmp_path)
    (out / "meta.json").unlink()  # as if stopped before its end
    (out / BUILDING_FILE).write_text('{"num_samples": 5')
    with pytest.raises(ValueError, match=f"'{out / BUILDING_FILE}' is damaged .*not valid JSON.*--overwrite"):
        build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), out, k=3, source="mlp", resume=True)


# --------------------------------------------------------------------------- stopped builds
def _in_child(function: Any, *args: Any) -> str:
    """Run ``function(*args)`` in a forked child; return the message of the error it raised ('' if none)."""
    queue = multiprocessing.get_context("fork").SimpleQueue()

    def body() -> None:
        try:
            function(*args)
            queue.put("")
        except Exception as error:
            queue.put(f"{type(error).__name__}: {error}")

    assert crash.in_child(body) == 0
    return str(queue.get())


def _build_with_file_limit(log_dir: Path, out: Path, limit: int) -> None:
    """A build in a child process whose files may not grow past ``limit`` bytes (``ulimit -f``), as on a full disk."""

    def build() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        build_teacher_cache(CountingTeacher(str(log_dir)), _loader(), out, k=3, source="mlp", data=DATA)

    message = _in_child(build)
    if message:
        raise OSError(message)


def test_a_full_disk_stops_the_build_with_the_file_named_and_resume_skips_the_written_rows(tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), clean, k=3, source="mlp", data=DATA)
    (tmp_path / "calls_rank0").unlink()
    sizes = {p.name: p.stat().st_size for p in clean.iterdir()}
    # room for every array but not for meta.json: the build stops at its very end
    limit = max(sizes[name] for name in ARRAYS) + 20
    assert sizes["meta.json"] > limit
    out = tmp_path / "full_disk"
    with pytest.raises(OSError, match=r"meta\.json") as info:
        _build_with_file_limit(tmp_path, out, limit)
    message = str(info.value)
    assert message.startswith("OSError: [Errno 27] could not write the teacher-logit cache file")  # EFBIG
    assert "File too large" in message and "disk is full or a file-size limit" in message and "resume=True" in message
    assert _calls(tmp_path) == 7 and not (out / "meta.json").exists() and not (out / "meta.json.partial").exists()
    (tmp_path / "calls_rank0").unlink()
    build_teacher_cache(CountingTeacher(str(tmp_path)), _loader(), out, k=3, source="mlp", data=DATA, resume=True)
    assert _calls(tmp_path) == 0  # every row was on disk: the teacher is not asked again
    _assert_same_files(out, clean)
    # too small for the arrays: the build stops when it creates them, before any row is stored
    (tmp_path / "calls_rank0").unlink(missing_ok=True)
    with pytest.raises(OSError, match=r"values\.npy' \(File too large\).*no row was stored yet"):
        _build_with_file_limit(tmp_path, tmp_path / "tiny_disk", 64)
    assert _calls(tmp_path) == 1  # the first batch, which gives the arrays their shape


def _as_nobody() -> None:
    """Run the rest of this (child) process as user ``nobody``, so that file permissions apply."""
    if os.geteuid() == 0:
        os.setgid(NOBODY)
        os.setuid(NOBODY)


class LockingTeacher(CountingTeacher):
    """Makes the cache folder read-only at its 3rd call (an administrator's chmod in the middle of a build)."""

    def __init__(self, log_dir: str, folder: Path) -> None:
        super().__init__(log_dir)
        self.folder = folder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calls == 2:
            self.folder.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
        return super().forward(x)


def test_a_folder_without_write_permission_is_named_and_resume_skips_the_written_rows(tmp_path: Path) -> None:
    # Root ignores file permissions: when the tests run as root, the builds run in a child process as
    # user nobody, in a folder outside pytest's private (0700) temporary folder.
    clean = _cache(tmp_path)
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        logs, out = base / "logs", base / "locked"
        for folder in (logs, out):
            folder.mkdir()
            if os.geteuid() == 0:
                os.chown(folder, NOBODY, NOBODY)

        def build(teacher: CountingTeacher, target: Path) -> None:
            _as_nobody()
            build_teacher_cache(teacher, _loader(), target, k=3, source="mlp")

        message = _in_child(build, LockingTeacher(str(logs), out), out)
        assert message.startswith("PermissionError: ")
        assert f"'{out / 'meta.json'}'" in message and "Permission denied" in message
        assert f"make '{out}' and its files writable by this user" in message and "resume=True" in message
        assert _calls(logs) == 7 and (out / BUILDING_FILE).exists()
        out.chmod(0o755)
        for log in logs.iterdir():
            log.unlink()
        build_teacher_cache(CountingTeacher(str(logs)), _loader(), out, k=3, source="mlp", resume=True)
        assert _calls(logs) == 0  # the rows written before the folder was locked are not computed again
        _assert_same_files(out, clean)
        # a folder that cannot be created at all: named before any row is stored
        locked_parent = base / "readonly"
        locked_parent.mkdir(mode=0o555)
        message = _in_child(build, CountingTeacher(str(logs)), locked_parent / "cache")
        assert message.startswith("PermissionError: ")
        assert f"could not write the teacher-logit cache file '{locked_parent / 'cache'}'" in message
        assert "no row was stored yet" in message
    finally:
        shutil.rmtree(base)


# --------------------------------------------------------------------------- the accuracy matrix
def test_the_accuracy_matrix_file_is_replaced_whole_and_a_damaged_one_is_rewritten(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lightning_logits.callbacks import ContinualMetrics

    metrics = ContinualMetrics(plot=False)
    metrics.accuracy_matrix = torch.tensor([[0.5, float("nan")], [0.25, 0.75]])
    metrics._save(str(tmp_path))
    saved = tmp_path / "accuracy_matrix.pt"
    assert torch.equal(torch.load(saved).nan_to_num(-1), metrics.accuracy_matrix.nan_to_num(-1))
    # killed between writing the new matrix and putting it in place: the previous file is intact
    metrics.accuracy_matrix = torch.ones(2, 2)

    def killed(*args: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics._save(str(tmp_path))
    monkeypatch.undo()
    assert torch.load(saved)[1, 0].item() == 0.25
    # a damaged file from an earlier run is rewritten whole at the next save
    saved.write_bytes(saved.read_bytes()[:40])
    metrics._save(str(tmp_path))
    assert torch.equal(torch.load(saved), torch.ones(2, 2)) and not (tmp_path / "accuracy_matrix.pt.partial").exists()


# --------------------------------------------------------------------------- the campaign
def test_the_damaged_file_campaign_finds_nothing_silently_changed_and_every_error_names_its_file(
    tmp_path: Path,
) -> None:
    # benchmarks.crash's campaign with 2 copies per (file, damage) pair; the long profile runs 20
    results = crash.damage_files(tmp_path, copies=2, rng=random.Random(crash.SEED))
    kinds = {r.kind for r in results}
    assert kinds == {"checkpoint", *(f"cache {n}" for n in (*ARRAYS, "meta.json"))}
    assert len(results) == len(kinds) * len(crash.DAMAGES) * 2
    assert [r for r in results if r.outcome in ("loads changed", "other error")] == []
    # every cut-off copy is refused (never "unchanged"), with its file named
    assert all(r.outcome == "refused, file named" for r in results if r.damage == "cut off")

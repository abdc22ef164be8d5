"""Crash at random points: ``kill -9`` a training, resume from ``last.ckpt``, compare with an uninterrupted run.

For every stateful method (distillation from a teacher-logit cache, USKD, LAWN around its switch,
ER / ER-ACE / UER mid-task, Mowst mid-turn, the logit diagnostics) this trains a tiny model three
ways, each in a child process forked from this one (so the imports are paid once):

1. uninterrupted, to the end;
2. with ``ModelCheckpoint(every_n_train_steps=1, save_last=True)``, killed with ``SIGKILL`` at a
   seeded random step ``N`` and at one of three places (:data:`WHERE`):

   - ``step_start``: at the start of step ``N`` (``trainer.global_step == N``), after ``last.ckpt``
     of the ``N`` finished steps was written;
   - ``before_optimizer_step``: inside step ``N``, after its backward pass and before its
     optimizer step (the gradients of step ``N`` are lost);
   - ``checkpoint_write``: while ``last.ckpt`` of step ``N`` is being written: half of its bytes
     are on disk when the process dies. Lightning writes the file into a temporary file and
     renames it into place, so ``last.ckpt`` still holds step ``N - 1``;
3. resumed from that ``last.ckpt`` to the end.

The resumed run's final weights (the module's whole ``state_dict``), optimizer states and method
callbacks' ``state_dict`` must equal the uninterrupted run's bit for bit: every run is on the CPU
with one thread and the same order of operations, so nothing but a lost or wrongly restored state
can make them differ. (The one 2-process DDP case lives in ``tests/test_crash.py``, launched with
``tests/parallel.py``.)

    python -m benchmarks.crash            # the long profile: 3 crash points per method
    python -m benchmarks.crash --smoke    # 1 crash point per method (what the test suite runs)

Prints a table (crash points survived per method) and, without ``--smoke``, writes
``benchmarks/results/crash.md``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import random
import signal
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

# imported here, once: the forked runs share them
from benchmarks.harness import ResumableLoader
from lightning_logits.callbacks import (
    ERACE,
    LAWN,
    UER,
    USKD,
    ContinualMetrics,
    ExperienceReplay,
    LogitDiagnostics,
    TeacherDistillation,
)
from lightning_logits.data import ClassIncrementalStream
from lightning_logits.data.graphs import GraphDataModule, csbm_graph
from lightning_logits.modules import Classifier, Mowst
from lightning_logits.teacher_cache import build_teacher_cache

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

Where = Literal["step_start", "before_optimizer_step", "checkpoint_write"]
WHERE: tuple[Where, ...] = ("step_start", "before_optimizer_step", "checkpoint_write")
SEED = 29  # issue 29: the crash points are drawn from random.Random(SEED)


# --------------------------------------------------------------------------- tiny models and data
class MLP(nn.Module):
    """``[N, D] -> [N, C]``: ``body`` (Linear + Tanh), then a linear ``head``. No dropout, no BatchNorm."""

    def __init__(self, in_features: int = 16, num_classes: int = 4, hidden: int = 12) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x.flatten(1)))


def blobs(n: int = 48, in_features: int = 16, num_classes: int = 4, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % num_classes
    x = (torch.randn(num_classes, in_features, generator=g) * 2)[y] + torch.randn(n, in_features, generator=g)
    return x, y


class BlobData(pl.LightningDataModule):
    """``(x, y, index)`` blobs in a fixed order, 8 per batch (6 steps per epoch); validation on the same samples."""

    num_classes = 4

    def __init__(self) -> None:
        super().__init__()
        x, y = blobs()
        self.dataset = TensorDataset(x, y, torch.arange(len(y)))

    def train_dataloader(self) -> DataLoader[Any]:
        return ResumableLoader(self.dataset, batch_size=8, shuffle=False)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.dataset, batch_size=16, shuffle=False)


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.01)


def _sgd(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def _teacher() -> nn.Module:
    torch.manual_seed(7)
    return MLP(hidden=20)


def build_cache(path: Path) -> Path:
    """The teacher-logit cache the ``kd_cache`` case distills from (top-3 of 4 classes of the blobs)."""

    if not (path / "meta.json").exists():
        with torch.random.fork_rng():  # the teacher's seed and the loader's draw leave the caller's state alone
            loader = DataLoader(BlobData().dataset, batch_size=16)
            build_teacher_cache(_teacher(), loader, path, k=3, source="crash-teacher")
    return path


# --------------------------------------------------------------------------- the cases
@dataclass
class Case:
    """One method: ``build(shared_dir)`` returns ``(module, datamodule, method callbacks, Trainer options)``."""

    name: str
    steps: int
    build: Callable[[Path], tuple[pl.LightningModule, pl.LightningDataModule, list[Callback], dict[str, Any]]]
    crash_steps: tuple[int, int]  # the step N is drawn from [low, high]
    what: str = ""
    options: dict[str, Any] = field(default_factory=dict)


def _classifier(optimizer: Any = _sgd, **kwargs: Any) -> pl.LightningModule:

    return Classifier(MLP(**kwargs), optimizer=optimizer)


def _kd_cache(shared: Path) -> Any:

    cache = build_cache(shared / "cache")
    return _classifier(), BlobData(), [TeacherDistillation(loss="kd", cache=str(cache))], {"max_steps": 12}


def _uskd(shared: Path) -> Any:

    return _classifier(), BlobData(), [USKD(feature_layer="model.body", alpha=0.5, mu=0.3)], {"max_steps": 12}


def _lawn(shared: Path) -> Any:

    return _classifier(_adam), BlobData(), [LAWN(free_steps=5)], {"max_steps": 12}


def _replay(kind: str) -> Callable[[Path], Any]:
    def build(shared: Path) -> Any:

        replay = {"er": ExperienceReplay, "er_ace": ERACE, "uer": UER}[kind](20, replay_batch_size=4)
        metrics = ContinualMetrics(plot=False, out_dir=str(shared / f"metrics_{kind}"))
        stream = ClassIncrementalStream("digits", num_tasks=5, flatten=True, batch_size=8)
        options = {"max_epochs": 3, "limit_train_batches": 4, "limit_val_batches": 1}
        options["reload_dataloaders_every_n_epochs"] = 1
        return _classifier(in_features=64, num_classes=10, hidden=16), stream, [replay, metrics], options

    return build


def _mowst(shared: Path) -> Any:

    graph = csbm_graph(num_nodes=60, num_classes=3, num_features=6, homophily=0.7, feature_signal=1.5, seed=0)
    module = Mowst(
        num_features=6,
        num_classes=3,
        hidden=8,
        dropout=0.0,
        max_turn_epochs=2,
        patience=1,
        pretrain="joint",
        pretrain_epochs=1,
    )
    return module, GraphDataModule(data=graph), [], {"max_epochs": 9}


def _diagnostics(shared: Path) -> Any:

    callback = LogitDiagnostics(scores=("msp", "energy"), stages=("validate",), plots=False)
    return _classifier(), BlobData(), [callback], {"max_steps": 12, "val_check_interval": 3}


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("kd_cache", 12, _kd_cache, (2, 10), "TeacherDistillation(cache=...), KD from stored top-3 logits"),
        Case("uskd", 12, _uskd, (2, 10), "USKD, its auxiliary head and momentum buffers"),
        Case("lawn", 12, _lawn, (3, 7), "LAWN(free_steps=5), killed around the switch"),
        Case("er", 12, _replay("er"), (2, 10), "ExperienceReplay mid-task (4 steps per task)"),
        Case("er_ace", 12, _replay("er_ace"), (2, 10), "ERACE mid-task"),
        Case("uer", 12, _replay("uer"), (2, 10), "UER mid-task"),
        Case("mowst", 9, _mowst, (2, 7), "Mowst mid-turn (1 step per epoch, turns of 2 epochs)"),
        Case("diagnostics", 12, _diagnostics, (2, 10), "LogitDiagnostics, validation every 3 steps"),
    )
}


# --------------------------------------------------------------------------- the child processes
class KillAt(Callback):
    """``SIGKILL`` of this process when training reaches step ``step``, at ``where`` (see the module docstring)."""

    def __init__(self, step: int, where: Where) -> None:
        self.step, self.where = step, where

    def _kill(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.where == "step_start" and trainer.global_step == self.step:
            self._kill()

    def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.where == "before_optimizer_step" and trainer.global_step == self.step:
            self._kill()

    def on_save_checkpoint(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.where == "checkpoint_write" and trainer.global_step == self.step:
            _kill_during_next_write(self._kill)


def _kill_during_next_write(kill: Callable[[], None]) -> None:
    """Make the next file write of a checkpoint put half of its bytes on disk, then die."""
    from fsspec.implementations.local import LocalFileOpener

    def write(self: Any, data: bytes) -> int:
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        kill()
        return 0  # never reached

    LocalFileOpener.write = write  # type: ignore[attr-defined]


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)


def train(case: Case, shared: Path, run_dir: Path, kill: tuple[int, Where] | None, resume: bool) -> None:
    """One run of ``case`` in this process; writes ``run_dir/result.pt`` (weights and states) at the end."""
    torch.set_num_threads(1)
    _quiet()
    # Lightning writes a checkpoint into a temporary file, then renames it: killed while writing, the
    # temporary file stays behind. Kept in the run's folder rather than the system's.
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(run_dir / "tmp")
    os.environ.pop("PL_GLOBAL_SEED", None)
    torch.manual_seed(0)
    module, datamodule, methods, options = case.build(shared)
    callbacks: list[Callback] = [*methods]
    checkpoint_dir = run_dir / "checkpoints"
    if kill is not None or resume:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=1, save_last=True, save_top_k=0))
    if kill is not None:
        callbacks.append(KillAt(*kill))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=kill is not None or resume,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(run_dir),
        deterministic=True,
        callbacks=callbacks,
        **{"limit_val_batches": 0, **options, **case.options},
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint_dir / "last.ckpt") if resume else None)
    torch.save(
        {
            "global_step": trainer.global_step,
            "module": module.state_dict(),
            "optimizers": [o.state_dict() for o in trainer.optimizers],
            "callbacks": {type(c).__name__: c.state_dict() for c in methods},
        },
        run_dir / "result.pt",
    )


def in_child(function: Callable[..., None], *args: Any, timeout: float = 300) -> int:
    """Run ``function(*args)`` in a forked child process; return its exit code (``-9`` when killed)."""
    process = multiprocessing.get_context("fork").Process(target=function, args=args)
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise TimeoutError(f"{function.__name__}{args} did not finish in {timeout} s")
    return int(process.exitcode)


# --------------------------------------------------------------------------- comparison
def differences(want: Any, got: Any, path: str = "") -> list[str]:
    """Where two nested states differ (tensors bit for bit, NaN equal to NaN); empty when they are equal."""
    if isinstance(want, Tensor) or isinstance(got, Tensor):
        if not (isinstance(want, Tensor) and isinstance(got, Tensor)):
            return [f"{path}: {type(want).__name__} vs {type(got).__name__}"]
        if want.shape != got.shape or want.dtype != got.dtype:
            return [f"{path}: {tuple(want.shape)} {want.dtype} vs {tuple(got.shape)} {got.dtype}"]
        if not torch.equal(want.nan_to_num(1234.5), got.nan_to_num(1234.5)) or not torch.equal(
            want.isnan(), got.isnan()
        ):
            gap = (want.double() - got.double()).abs().nan_to_num(0.0).max().item() if want.is_floating_point() else 0
            return [f"{path}: values differ (largest gap {gap:.3g})"]
        return []
    if isinstance(want, dict) and isinstance(got, dict):
        if set(want) != set(got):
            return [f"{path}: keys {sorted(map(str, set(want) ^ set(got)))} in one only"]
        return [d for key in want for d in differences(want[key], got[key], f"{path}.{key}")]
    if isinstance(want, list | tuple) and isinstance(got, list | tuple):
        if len(want) != len(got):
            return [f"{path}: length {len(want)} vs {len(got)}"]
        return [d for i, (a, b) in enumerate(zip(want, got, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(want, float) and isinstance(got, float) and want != want and got != got:
        return []  # both NaN
    return [] if want == got else [f"{path}: {want!r} vs {got!r}"]


@dataclass
class CrashResult:
    """One crash point of one method: where it was killed, what ``last.ckpt`` held, and the comparison."""

    case: str
    step: int
    where: Where
    exit_code: int
    checkpoint_step: int | None
    differences: list[str]
    seconds: float

    @property
    def survived(self) -> bool:
        return self.exit_code == -signal.SIGKILL and self.checkpoint_step is not None and not self.differences


def crash_points(case: Case, count: int, rng: random.Random) -> list[tuple[int, Where]]:
    """``count`` distinct ``(step, where)`` kill points of ``case``; the first ``len(WHERE)`` use every place once."""
    low, high = case.crash_steps
    places = list(WHERE)
    rng.shuffle(places)
    steps = rng.sample(range(low, high + 1), count)
    return [(step, places[i % len(places)]) for i, step in enumerate(steps)]


def run_case(case: Case, workdir: Path, points: list[tuple[int, Where]]) -> list[CrashResult]:
    """The uninterrupted run of ``case`` once, then for each point a killed run and its resumption."""
    shared = workdir / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    full_dir = workdir / case.name / "full"
    full_dir.mkdir(parents=True, exist_ok=True)
    code = in_child(train, case, shared, full_dir, None, False)
    if code != 0:
        raise RuntimeError(f"the uninterrupted {case.name} run failed with exit code {code}")
    full = torch.load(full_dir / "result.pt", weights_only=False)
    results = []
    for step, where in points:
        start = time.perf_counter()
        run_dir = workdir / case.name / f"step{step}_{where}"
        run_dir.mkdir(parents=True, exist_ok=True)
        code = in_child(train, case, shared, run_dir, (step, where), False)
        last = run_dir / "checkpoints" / "last.ckpt"
        checkpoint_step = torch.load(last, weights_only=False)["global_step"] if last.exists() else None
        found: list[str] = []
        if code == -signal.SIGKILL and checkpoint_step is not None:
            resumed_code = in_child(train, case, shared, run_dir, None, True)
            if resumed_code != 0:
                found = [f"the resumed run failed with exit code {resumed_code}"]
            else:
                found = differences(full, torch.load(run_dir / "result.pt", weights_only=False))
        results.append(CrashResult(case.name, step, where, code, checkpoint_step, found, time.perf_counter() - start))
    return results


def format_table(results: list[CrashResult], profile: str) -> str:
    lines = [
        f"### crash and resume ({profile} profile)",
        "",
        "| method | crash points (step: where, last.ckpt step) | survived | compared | result |",
        "|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r.case for r in results):
        rows = [r for r in results if r.case == name]
        points = ", ".join(f"{r.step}: {r.where} ({r.checkpoint_step})" for r in rows)
        survived = sum(r.survived for r in rows)
        problems = "; ".join(d for r in rows for d in r.differences[:3]) or "bit-identical"
        compared = "weights, optimizer, callback state"
        lines.append(f"| {name} | {points} | {survived}/{len(rows)} | {compared} | {problems} |")
    total = sum(r.survived for r in results)
    lines += ["", f"{total} of {len(results)} crashes survived over {len({r.case for r in results})} methods."]
    return "\n".join(lines)


def run(points_per_method: int, workdir: Path, cases: list[str] | None = None) -> list[CrashResult]:
    rng = random.Random(SEED)
    results: list[CrashResult] = []
    for name in cases or list(CASES):
        case = CASES[name]
        results += run_case(case, workdir, crash_points(case, points_per_method, rng))
    return results


# --------------------------------------------------------------------------- damaged files
Outcome = Literal["refused, file named", "loads unchanged", "loads changed", "other error"]
DAMAGES = ("cut off", "zeroed block", "flipped byte")


@dataclass
class FileResult:
    """One damaged copy of a file: what was done to it and what reading it gave."""

    kind: str
    damage: str
    outcome: Outcome
    message: str


def _damage(data: bytes, damage: str, rng: random.Random) -> bytes:
    """``data`` cut off at a random length, with a random 512-byte block zeroed, or with one random byte flipped."""
    if damage == "cut off":
        return data[: rng.randrange(len(data))]
    out = bytearray(data)
    if damage == "zeroed block":
        start = rng.randrange(len(data))
        out[start : start + 512] = bytes(len(out[start : start + 512]))
        return bytes(out) if bytes(out) != data else bytes(out[:-1])  # a block that was zeros already: cut one byte
    position = rng.randrange(len(data))
    out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


def _read_outcome(read: Callable[[], Any], original: Any, path: Path) -> tuple[Outcome, str]:
    try:
        value = read()
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        return ("refused, file named" if str(path) in str(error) else "other error"), message
    return ("loads unchanged" if not differences(original, value) else "loads changed"), ""


def damage_files(workdir: Path, copies: int, rng: random.Random) -> list[FileResult]:
    """Damage ``copies`` copies per (file, damage) pair and read each one back the way the library reads it.

    The files: a Lightning ``last.ckpt`` (read by :func:`~lightning_logits.networks.check_checkpoint`,
    then ``torch.load``), each array of a teacher-logit cache and its ``meta.json`` (read by
    :class:`~lightning_logits.teacher_cache.TeacherLogitCache` and all its rows rebuilt).
    """
    from lightning_logits.networks import check_checkpoint
    from lightning_logits.teacher_cache import TeacherLogitCache

    workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = _classifier()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=BlobData())
    checkpoint = workdir / "last.ckpt"
    trainer.save_checkpoint(checkpoint)
    cache = build_cache(workdir / "cache")
    rows = torch.arange(48)
    clean_logits = TeacherLogitCache(cache).logits(rows)
    files: dict[str, tuple[Path, Callable[[], Any], Any]] = {
        "checkpoint": (
            checkpoint,
            lambda: torch.load(check_checkpoint(checkpoint), weights_only=False)["state_dict"],
            module.state_dict(),
        ),
    }
    for name in ("values.npy", "indices.npy", "rest.npy", "written.npy", "checksum.npy", "meta.json"):
        files[f"cache {name}"] = (cache / name, lambda: TeacherLogitCache(cache).logits(rows), clean_logits)
    results = []
    for kind, (path, read, original) in files.items():
        clean = path.read_bytes()
        for damage in DAMAGES:
            for _ in range(copies):
                path.write_bytes(_damage(clean, damage, rng))
                outcome, message = _read_outcome(read, original, path)
                results.append(FileResult(kind, damage, outcome, message))
        path.write_bytes(clean)
    return results


def format_files_table(results: list[FileResult]) -> str:
    outcomes: tuple[Outcome, ...] = ("refused, file named", "loads unchanged", "loads changed", "other error")
    lines = [
        "### damaged files",
        "",
        "| file | damage | copies | " + " | ".join(outcomes) + " |",
        "|---|---|---|" + "---|" * len(outcomes),
    ]
    for kind in dict.fromkeys(r.kind for r in results):
        for damage in DAMAGES:
            rows = [r for r in results if r.kind == kind and r.damage == damage]
            counts = " | ".join(str(sum(r.outcome == o for r in rows)) for o in outcomes)
            lines.append(f"| {kind} | {damage} | {len(rows)} | {counts} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="1 crash point per method (the test suite's profile)")
    parser.add_argument("--cases", default=None, help="comma-separated subset of " + ",".join(CASES))
    parser.add_argument("--out", default=str(RESULTS / "crash.md"))
    args = parser.parse_args(argv)
    _quiet()
    cases = args.cases.split(",") if args.cases else None
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        results = run(1 if args.smoke else 3, Path(tmp), cases)
        files = damage_files(Path(tmp) / "files", 2 if args.smoke else 20, random.Random(SEED))
    profile = "smoke" if args.smoke else "long"
    table = format_table(results, profile) + "\n\n" + format_files_table(files)
    named = sum(r.outcome == "refused, file named" for r in files)
    harmless = sum(r.outcome == "loads unchanged" for r in files)
    table += f"\n\n{len(files)} damaged files: {named} refused with the file named, {harmless} read back unchanged, "
    table += f"{sum(r.outcome == 'loads changed' for r in files)} read back changed without an error, "
    table += f"{sum(r.outcome == 'other error' for r in files)} refused by an error that does not name the file."
    command = "python -m benchmarks.crash" + (" --smoke" if args.smoke else "")
    table += f"\n\nCPU, one thread per run, {time.perf_counter() - start:.0f} s in all (`{command}`)."
    print(table)
    if not args.smoke:
        Path(args.out).write_text(table + "\n")
    if not all(r.survived for r in results):
        raise SystemExit("some crashes were not survived")


if __name__ == "__main__":
    main()

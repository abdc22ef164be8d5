"""Time training steps of several configurations against a baseline measured in the same run.

A *suite* is a module ``benchmarks/bench_<name>.py`` with a function
``speed_cases(smoke: bool) -> list[SpeedCase]``. :func:`run_speed` trains every case with a real
``Trainer`` for ``warmup + steps`` steps, several rounds interleaved so that drift in machine load
hits all cases alike, and reports the median step time (from ``on_train_batch_start`` to
``on_train_batch_end``: forward, every callback, backward and optimizer step), the ratio to the
case's baseline, and the peak memory (CUDA: ``max_memory_allocated``; CPU: the peak resident set
growth of a fresh subprocess that runs only that case).
"""

from __future__ import annotations

import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

ROOT = Path(__file__).resolve().parent.parent

_CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
_clock: Callable[[], float] = time.perf_counter


def set_clock(kind: str) -> None:
    """Time steps by ``"wall"`` time (default) or by the training thread's ``"cpu"`` time.

    The CPU clock counts only the time the training thread ran, so other jobs on a shared
    machine, which take cores away, do not stretch the steps; it misses time spent waiting
    (on a GPU, on I/O), so it is for one-thread CPU runs, where every case's work is on that thread.
    """
    global _clock
    if kind not in _CLOCKS:
        raise ValueError(f"clock must be one of {sorted(_CLOCKS)}, got {kind!r}")
    _clock = _CLOCKS[kind]


def clock() -> float:
    """Seconds on the clock chosen with :func:`set_clock`."""
    return _clock()


@dataclass
class SpeedCase:
    """One configuration to time.

    Attributes:
        name: unique name within the suite (rows of the table).
        make_module: builds a fresh LightningModule.
        make_datamodule: builds the DataModule it trains on.
        make_callbacks: builds the callbacks under test (none for a baseline).
        baseline: name of the case whose median step time divides this one's (``None``: this is a
            baseline itself).
        target: the ratio the issue asks for, printed beside the measured one.
        full_iteration: time whole loop iterations (from one ``on_train_batch_start`` to the
            next: data loading and Lightning's own bookkeeping included) instead of the step alone;
            what a plain PyTorch loop is compared against.
        run: instead of a ``Trainer`` fit, a function ``run(steps, warmup, accelerator, compile)``
            that trains by itself and returns its per-iteration times in seconds (a plain loop).
        compile: whether ``--compile`` runs this case a second time with the network compiled.
        also_against: a second baseline whose ratio is printed under the table, with ``also_target``.
        also_target: the ratio asked for against ``also_against``.
    """

    name: str
    make_module: Callable[[], pl.LightningModule]
    make_datamodule: Callable[[], pl.LightningDataModule]
    make_callbacks: Callable[[], list[Callback]] = field(default=list)
    baseline: str | None = None
    target: float | None = None
    full_iteration: bool = False
    run: Callable[[int, int, str, bool], list[float]] | None = None
    compile: bool = True
    also_against: str | None = None
    also_target: float | None = None


@dataclass
class SpeedResult:
    name: str
    baseline: str | None
    median_ms: float
    iqr_ms: float
    steps: int
    ratio: float | None = None
    target: float | None = None
    peak_mb: float | None = None
    also: tuple[str, float, float | None] | None = None  # (second baseline, ratio, target)


class StepTimer(Callback):
    """Records the wall time of every training step after ``warmup`` steps.

    Place it first in the callback list and its :attr:`end` marker last, so the step's time
    includes every other callback's batch hooks (a teacher forward in ``on_train_batch_start``).
    """

    def __init__(self, warmup: int, full_iteration: bool = False) -> None:
        self.warmup = warmup
        self.full_iteration = full_iteration
        self.times: list[float] = []
        self._start = 0.0
        self._seen = 0
        self.end = _StepTimerEnd(self)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        _sync(pl_module)
        now = clock()
        if self.full_iteration and self._seen > self.warmup:
            self.times.append(now - self._start)  # the whole previous iteration
        self._start = now

    def stop(self, pl_module: pl.LightningModule) -> None:
        if self.full_iteration:
            self._seen += 1
            return
        _sync(pl_module)
        if self._seen >= self.warmup:
            self.times.append(clock() - self._start)
        self._seen += 1


class _StepTimerEnd(Callback):
    def __init__(self, timer: StepTimer) -> None:
        self.timer = timer

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.timer.stop(pl_module)


def _sync(pl_module: pl.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class OneThread(Callback):
    """Train on one CPU thread (restored afterwards), as a plain loop timed beside it does.

    Small steps time steadier on a shared machine this way.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._threads = torch.get_num_threads()
        if pl_module.device.type == "cpu":
            torch.set_num_threads(1)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        torch.set_num_threads(self._threads)


def quiet_trainer(**overrides: Any) -> pl.Trainer:
    """A one-device CPU ``Trainer`` with no logger, checkpoints, progress bar, summary or sanity check.

    Benchmarks measure training, not bookkeeping; ``overrides`` set or replace any argument.
    """
    kwargs: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def _trainer(steps: int, callbacks: list[Callback], accelerator: str) -> pl.Trainer:
    return quiet_trainer(accelerator=accelerator, max_steps=steps, limit_val_batches=0, callbacks=callbacks)


def compile_network(module: pl.LightningModule) -> pl.LightningModule:
    """Compile the network the way Lightning documents it: ``torch.compile`` on the LightningModule.

    The Trainer compiles the module's ``forward``; ``training_step``, callbacks and loss terms run
    eagerly around it.
    """
    return torch.compile(module)  # type: ignore[return-value]


def time_case(
    case: SpeedCase, steps: int, warmup: int, accelerator: str = "auto", compiled: bool = False
) -> list[float]:
    """Step times in seconds of one fresh run of ``case`` (after ``warmup`` steps)."""
    if case.run is not None:
        return case.run(steps, warmup, accelerator, compiled)
    timer = StepTimer(warmup, case.full_iteration)
    extra = 1 if case.full_iteration else 0  # n + 1 batch starts bound n iterations
    trainer = _trainer(warmup + steps + extra, [timer, *case.make_callbacks(), timer.end], accelerator)
    module = case.make_module()
    trainer.fit(compile_network(module) if compiled else module, datamodule=case.make_datamodule())
    return timer.times


def peak_memory_mb(case: SpeedCase, steps: int, accelerator: str = "auto") -> float:
    """Peak memory of training ``case`` for ``steps`` steps, in MiB, measured in this process.

    On CUDA this is ``max_memory_allocated``; on the CPU the growth of the peak resident set, which
    is only meaningful in a fresh process (see :func:`run_speed`).
    """
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        time_case(case, steps, 0, accelerator)
        return torch.cuda.max_memory_allocated() / 2**20
    module, datamodule, callbacks = case.make_module(), case.make_datamodule(), case.make_callbacks()
    before = _resident_mb()
    _reset_peak_resident()
    _trainer(steps, callbacks, accelerator).fit(module, datamodule=datamodule)
    return _peak_resident_mb() - before


def _status_mb(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _resident_mb() -> float:
    return _status_mb("VmRSS")


def _reset_peak_resident() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux >= 4.0), so import-time peaks do not mask training's.
    Path("/proc/self/clear_refs").write_text("5")


def _peak_resident_mb() -> float:
    return _status_mb("VmHWM")


def load_suite(name: str) -> Callable[[bool], list[SpeedCase]]:
    return importlib.import_module(f"benchmarks.bench_{name}").speed_cases


def available_suites() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in (ROOT / "benchmarks").glob("bench_*.py"))


def _memory_in_subprocess(suite: str, case: str, smoke: bool, steps: int) -> float | None:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.speed",
        "--suite",
        suite,
        "--memory-of",
        case,
        "--steps",
        str(steps),
    ]
    if smoke:
        cmd.append("--smoke")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_MB "):
            return float(line.split()[1])
    sys.stderr.write(proc.stderr[-2000:])
    return None


def _compiled_cases(cases: list[SpeedCase]) -> list[tuple[SpeedCase, bool]]:
    """Every case eager, then each compilable one again as ``<name>+compile`` against its eager run."""
    runs: list[tuple[SpeedCase, bool]] = [(case, False) for case in cases]
    for case in cases:
        if case.compile:
            twin = SpeedCase(
                f"{case.name}+compile",
                case.make_module,
                case.make_datamodule,
                case.make_callbacks,
                baseline=case.name,
                full_iteration=case.full_iteration,
                run=case.run,
            )
            runs.append((twin, True))
    return runs


def run_speed(
    suite: str,
    steps: int,
    warmup: int,
    rounds: int,
    smoke: bool,
    memory: bool,
    accelerator: str = "auto",
    compile: bool = False,
    only: list[str] | None = None,
) -> list[SpeedResult]:
    """Time every case of ``suite`` and compute ratios against each case's baseline.

    With ``compile`` every case also runs with its network compiled (:func:`compile_network`,
    inductor), as ``<name>+compile`` whose ratio is to the eager case; the compile itself happens
    in the warm-up steps and is not timed. ``only`` keeps the named cases (a baseline not kept
    leaves its cases without a ratio).
    """
    plain = load_suite(suite)(smoke)
    if only:  # a subset of cases (keep their baselines in it)
        plain = [case for case in plain if case.name in only]
    runs = _compiled_cases(plain) if compile else [(case, False) for case in plain]
    cases = [case for case, _ in runs]
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for _ in range(rounds):
        for case, compiled in runs:
            pl.seed_everything(0, verbose=False)
            samples[case.name].extend(time_case(case, steps, warmup, accelerator, compiled))
    results = []
    for case in cases:
        times = sorted(samples[case.name])
        q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
        results.append(
            SpeedResult(
                case.name,
                case.baseline,
                1e3 * statistics.median(times),
                1e3 * (q[2] - q[0]),
                len(times),
                target=case.target,
            )
        )
    by_name = {r.name: r for r in results}
    for result in results:
        if result.baseline is not None and result.baseline in by_name:
            result.ratio = result.median_ms / by_name[result.baseline].median_ms
    for case, _ in runs:
        other = by_name.get(case.also_against or "")
        if other is not None:
            by_name[case.name].also = (other.name, by_name[case.name].median_ms / other.median_ms, case.also_target)
    if memory:
        for (case, compiled), result in zip(runs, results, strict=True):
            if compiled or case.run is not None:
                continue  # n/a: memory is measured for eager Trainer runs
            on_cuda = torch.cuda.is_available() and accelerator != "cpu"
            if on_cuda or smoke:
                # Smoke runs only check that the code works: in-process is enough and saves a
                # process start per case.
                result.peak_mb = peak_memory_mb(case, steps, accelerator)
            else:
                result.peak_mb = _memory_in_subprocess(suite, case.name, smoke, steps)
    return results


def format_table(suite: str, results: list[SpeedResult]) -> str:
    """A Markdown table of results."""
    lines = [
        f"### speed: {suite}",
        "",
        "| case | baseline | median step (ms) | IQR (ms) | steps | ratio | target | peak mem (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = f"{r.ratio:.3f}" if r.ratio is not None else ("1 (baseline)" if r.baseline is None else "n/a")
        target = f"<= {r.target:.2f}" if r.target is not None else ""
        peak = f"{r.peak_mb:.0f}" if r.peak_mb is not None else "n/a"
        lines.append(
            f"| {r.name} | {r.baseline or ''} | {r.median_ms:.2f} | {r.iqr_ms:.2f} | {r.steps} "
            f"| {ratio} | {target} | {peak} |"
        )
    also = [r for r in results if r.also is not None]
    if also:
        lines.append("")
    for r in also:
        assert r.also is not None
        other, ratio_also, target_also = r.also
        wanted = f" (target <= {target_also:.2f})" if target_also is not None else ""
        lines.append(f"{r.name} / {other}: {ratio_also:.3f}{wanted}")
    return "\n".join(lines)


def save_results(suite: str, results: list[SpeedResult], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    path.write_text(json.dumps({"suite": suite, "device": device, "results": [asdict(r) for r in results]}, indent=2))


def launch_ranks(
    command: list[str],
    world_size: int = 2,
    num_nodes: int = 1,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: str | Path | None = None,
) -> list[str]:
    """Start ``command`` once per rank, as torchrun would: ``world_size`` ranks over ``num_nodes`` simulated nodes.

    Lightning takes processes started from outside when ``LOCAL_RANK`` is set, so the same command
    runs 2 processes on one node or 2 "nodes" of 1 process on loopback (``NODE_RANK`` 0 and 1, one
    ``MASTER_ADDR=127.0.0.1``/``MASTER_PORT``). ``--devices <per node> --num-nodes <nodes>`` is appended.
    Each rank runs one thread. A rank that fails leaves the others waiting in a collective, so they are
    stopped 15 s later. Returns every rank's output; raises ``AssertionError`` with their tails on a
    failure or a time-out.
    """
    from lightning.fabric.plugins.environments.lightning import find_free_network_port

    per_node = world_size // num_nodes
    port = str(find_free_network_port())
    procs = []
    for rank in range(world_size):
        rank_env = {
            **os.environ,
            **(env or {}),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "NODE_RANK": str(rank // per_node),
            "LOCAL_RANK": str(rank % per_node),
            "WORLD_SIZE": str(world_size),
            "WORLD_SIZE_HINT": str(world_size),
            "OMP_NUM_THREADS": "1",
            "WORKER_DUMP_AFTER": str(max(timeout - 20, 5)),
        }
        full = [*command, "--devices", str(per_node), "--num-nodes", str(num_nodes)]
        procs.append(
            subprocess.Popen(full, env=rank_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
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
    if any(p.returncode != 0 for p in procs):
        tails = "\n".join(
            f"--- rank {r} (exit {p.returncode}) ---\n{o[-12000:]}"
            for r, (p, o) in enumerate(zip(procs, outputs, strict=True))
        )
        raise AssertionError(f"a rank of {' '.join(command)} failed:\n{tails}")
    return outputs


def run_child(command: list[str], name: str) -> dict[str, Any]:
    """Run a benchmark child process (a fresh process, so its peak memory is its own) and return the JSON
    it prints on a ``RESULT `` line; exits with the child's error output when it printed none."""
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        sys.stderr.write(proc.stderr[-2000:])
        raise SystemExit(f"case {name} failed")
    return json.loads(lines[0][len("RESULT ") :])


class ResumableLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]
    """A DataLoader that Lightning checkpoints (``state_dict``): a run resumed mid-epoch continues with the
    next batch instead of the epoch's first (what torchdata's StatefulDataLoader does for real data).

    Used by the crash benchmark and the multi-process test worker, whose resumed runs must see the
    batches an uninterrupted run sees.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._yielded = 0
        self._skip = 0

    def __iter__(self) -> Any:
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for number, batch in enumerate(super().__iter__()):
            if number >= skip:
                self._yielded = number + 1
                yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["batches"])

"""Print speed ratio tables: ``python -m benchmarks.speed [--suite NAME ...] [--smoke]``.

Each suite compares its cases with a baseline measured in the same run (see ``harness.py``).
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

from benchmarks.harness import (
    ROOT,
    available_suites,
    format_table,
    load_suite,
    peak_memory_mb,
    run_speed,
    save_results,
    set_clock,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suite", action="append", choices=available_suites(), help="default: all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the code runs")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument(
        "--compile", action="store_true", help="also time every case with torch.compile (inductor): '<case>+compile'"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--case", action="append", help="only these cases (and name their baselines too)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="time steps by wall time (default) or by the training thread's CPU time (one-thread CPU runs on "
        "a shared machine: other jobs then do not stretch the steps)",
    )
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    set_clock(args.clock)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.smoke:
        args.steps, args.warmup, args.rounds = min(args.steps, 3), min(args.warmup, 1), 1
    if args.compile:
        args.warmup = max(args.warmup, 3)  # compilation (and a recompile) happens in the first steps

    if args.memory_of:  # child process of a CPU peak-memory measurement
        (suite,) = args.suite
        case = next(c for c in load_suite(suite)(args.smoke) if c.name == args.memory_of)
        print(f"PEAK_MB {peak_memory_mb(case, args.steps, args.accelerator):.1f}")
        return

    for suite in args.suite or available_suites():
        results = run_speed(
            suite,
            args.steps,
            args.warmup,
            args.rounds,
            args.smoke,
            not args.no_memory,
            args.accelerator,
            compile=args.compile,
            only=args.case,
        )
        print(format_table(suite, results), flush=True)
        if not args.smoke:
            save_results(suite, results, args.out / f"speed_{suite}.json")


if __name__ == "__main__":
    main()

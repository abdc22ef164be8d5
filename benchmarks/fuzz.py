"""Run the property tests of ``tests/test_fuzz.py`` under a hypothesis profile and count the cases per function.

``python -m benchmarks.fuzz`` runs the suite's ``short`` profile (derandomized, a few examples per
test); ``--profile long`` runs many examples per test (random, as hypothesis draws them). Every
case is a call of a public function of :mod:`lightning_logits.functional` or of a metric, either
on valid input (the result agreed with a float64 restatement) or on invalid input (a
``ValueError``/``TypeError`` naming the argument came back). The table printed counts both per
function; the counts are also written to ``benchmarks/results/fuzz_cases_<profile>.json``, and
``benchmarks/results/fuzz_cases.md`` is rebuilt from the profiles run so far.

The run fails (exit status 1) when any property test fails; pytest's report says which.

Example::

    python -m benchmarks.fuzz                  # short profile, about half a minute
    python -m benchmarks.fuzz --profile long   # many examples per test, several minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PROFILES = ("short", "long")


def run(profile: str, pytest_args: list[str]) -> tuple[dict[str, dict[str, int]], int, float]:
    """Run tests/test_fuzz.py under ``profile``; return (counts per function, pytest's exit status, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        counts_path = Path(tmp) / "counts.json"
        env = {
            **os.environ,
            "HYPOTHESIS_PROFILE": profile,
            "LIGHTNING_LOGITS_FUZZ_COUNTS": str(counts_path),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        command = [sys.executable, "-m", "pytest", "tests/test_fuzz.py", "-q", "-p", "no:cacheprovider", *pytest_args]
        start = time.perf_counter()
        status = subprocess.run(command, cwd=ROOT, env=env, check=False).returncode
        seconds = time.perf_counter() - start
        counts = json.loads(counts_path.read_text()) if counts_path.exists() else {}
    return counts, status, seconds


def table(columns: dict[str, dict[str, dict[str, int]]]) -> str:
    """A markdown table: one row per function, ``valid / invalid`` cases per profile."""
    names = sorted({name for counts in columns.values() for name in counts})
    header = "| function | " + " | ".join(f"{p}: valid | {p}: invalid | {p}: total" for p in columns) + " |"
    rule = "|---|" + "---:|---:|---:|" * len(columns)
    lines = [header, rule]
    for name in names:
        cells = []
        for counts in columns.values():
            c = counts.get(name, {})
            valid, invalid = c.get("valid", 0), c.get("invalid", 0)
            cells.append(f"{valid} | {invalid} | {valid + invalid}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    totals = []
    for counts in columns.values():
        valid = sum(c.get("valid", 0) for c in counts.values())
        invalid = sum(c.get("invalid", 0) for c in counts.values())
        totals.append(f"**{valid}** | **{invalid}** | **{valid + invalid}**")
    lines.append(f"| **all {len(names)} names** | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def public_names() -> set[str]:
    """The names of every ``__all__`` of ``lightning_logits.functional`` (and its modules) and of the metrics.

    Less the constants and type aliases, which have nothing to call (``CONSTANTS`` in tests/test_fuzz.py).
    """
    import importlib

    modules = ["lightning_logits.functional", "lightning_logits.metrics"]
    modules += [f"lightning_logits.functional.{m}" for m in FUNCTIONAL_MODULES]
    names = {name for module in modules for name in importlib.import_module(module).__all__}
    return names - {"DEFAULT_TEMPERATURE", "DistillationLossName", "FusedLossName"}


FUNCTIONAL_MODULES = (
    "classification",
    "diagnostics",
    "distillation",
    "distillation_fused",
    "lawn",
    "mowst",
    "replay",
    "uskd",
)


def write_markdown() -> Path:
    columns: dict[str, dict[str, dict[str, int]]] = {}
    notes = []
    for profile in PROFILES:
        path = RESULTS / f"fuzz_cases_{profile}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            columns[profile] = saved["counts"]
            notes.append(
                f"- `{profile}`: {saved['seconds']:.0f} s, pytest exit status {saved['status']} "
                f"(`{saved['command']}`, {saved['date']})"
            )
    counted = {name for counts in columns.values() for name in counts}
    inside = sorted(public_names() - counted)
    if inside:
        notes.append(
            "- exercised inside other names' cases, without a count of their own (see `COVERED` in "
            "tests/test_fuzz.py): " + ", ".join(f"`{name}`" for name in inside)
        )
    out = RESULTS / "fuzz_cases.md"
    out.write_text(
        "# Property-test cases per function (tests/test_fuzz.py)\n\n"
        "A *valid* case is a call on valid input whose result agreed with the float64 restatement; an "
        "*invalid* case is a call on bad input that raised ValueError/TypeError naming the argument. "
        "Written by `python -m benchmarks.fuzz [--profile long]`.\n\n"
        + "\n".join(notes)
        + "\n\n"
        + table(columns)
        + "\n"
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=PROFILES, default="short", help="hypothesis profile (default short)")
    parser.add_argument("--no-write", action="store_true", help="print the table only; write no results")
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments, e.g. -k distillation")
    args = parser.parse_args(argv)
    counts, status, seconds = run(args.profile, args.pytest_args)
    print(table({args.profile: counts}))
    total = sum(sum(c.values()) for c in counts.values())
    print(f"\n{total} cases over {len(counts)} names in {seconds:.0f} s (profile {args.profile}, pytest exit {status})")
    if not args.no_write and not args.pytest_args:
        RESULTS.mkdir(parents=True, exist_ok=True)
        saved = {
            "counts": counts,
            "status": status,
            "seconds": round(seconds, 1),
            "command": "python -m benchmarks.fuzz" + (" --profile long" if args.profile == "long" else ""),
            "date": time.strftime("%Y-%m-%d"),
        }
        (RESULTS / f"fuzz_cases_{args.profile}.json").write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
        print(f"wrote {write_markdown()}")
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

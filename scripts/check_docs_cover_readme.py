"""Check that no content of an old README was lost when it moved to the documentation site.

Every non-blank line of the README at a git revision (table rows, code lines, list items, prose)
must appear, whitespace-normalized, in a page under ``docs/`` (not in the README: it may shrink). Headings are
compared without their ``#`` marks (pages change their levels), and the links that had to change
with the move are compared in their new form. Prints the lines it cannot find and exits 1 if any.

    .venv/bin/python scripts/check_docs_cover_readme.py 9c6f576
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (old text, new text) pairs: links and paths that changed when sections became pages.
MOVED = [
    ("](#troubleshooting)", "](../troubleshooting.md)"),
    ("](#data-without-internet)", "](data.md)"),
    ("](benchmarks/results/", "](results/"),
    ('(see "Logit diagnostics")', "(see [Logit diagnostics](../guides/diagnostics.md))"),
    ("Every number in this README was measured on", "Every number on these pages was measured on"),
    (
        "The default is the one the study below supports:",
        "The default is the one the [study](../benchmarks.md#lawn) supports:",
    ),
    # examples that did not run as written, now runnable (tests/test_docs.py runs them):
    ("callbacks=[...]).fit(model", "callbacks=[USKD()]).fit(model"),
    (
        '# a causal LM: training_step returns {"loss": ce, "logits": logits, "target": target}, target -100 = padding',
        'return {"loss": loss, "logits": logits, "target": target}  # target -100 = padding',
    ),
    ("pl.Trainer(callbacks=[distill]).fit(my_lm,", "pl.Trainer(max_epochs=1, callbacks=[distill]).fit(my_lm,"),
    (
        "DigitsShiftDataModule(held_out_classes=(8, 9), image_size=32)",
        "DigitsShiftDataModule(held_out_classes=(8, 9), image_size=16)",
    ),
]


def normalize(line: str) -> str:
    line = re.sub(r"^#+\s+", "", line.strip())
    line = re.sub(r"\[(`[^`]+`)\](\[[\w.]+\]|\([\w./-]+\.md\))", r"\1", line)  # API names became links
    return re.sub(r"\s+", " ", line)


def main(revision: str) -> int:
    old = subprocess.run(
        ["git", "show", f"{revision}:README.md"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    pages = list((ROOT / "docs").rglob("*.md"))
    haystack = "\n".join(normalize(line) for page in pages for line in page.read_text().splitlines())
    missing = []
    lines = [line for line in old.splitlines() if line.strip()]
    for line in lines:
        for before, after in MOVED:
            line = line.replace(before, after)
        if normalize(line) not in haystack:
            missing.append(line)
    print(f"{len(lines) - len(missing)} of {len(lines)} non-blank lines of README.md at {revision} are in docs/")
    for line in missing:
        print(f"  missing: {line}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "HEAD"))

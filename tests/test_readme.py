"""The README's ``>>>`` examples (the "Adding a method" section) run as doctests."""

from __future__ import annotations

import doctest
import warnings
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run() -> None:
    text = README.read_text()
    assert ">>> class ConfidencePenalty(LossTermCallback):" in text, "the 'Adding a method' example is missing"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's tips about workers and logging on a toy run
        result = doctest.testfile(str(README), module_relative=False, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted >= 10
    assert result.failed == 0, f"{result.failed} README example(s) failed; run pytest -s to see them"

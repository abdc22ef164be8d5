"""Griffe extension: read our docstrings' ``Example:`` section as an examples section.

The package writes ``Example:`` (torchmetrics' spelling) above each doctest; griffe's Google-style
parser knows only ``Examples:`` and would render the doctest as an admonition of quoted text. This
extension renames the section header before the docstring is parsed, so the API reference shows
each example as highlighted Python. The source docstrings are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:`` on every loaded object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _HEADER.sub(r"\1Examples:", obj.docstring.value)

"""Griffe extension: read our reStructuredText-flavoured docstrings as the Markdown mkdocstrings renders.

The package's docstrings are Google style with a few Sphinx habits. Before a docstring is parsed, this
extension rewrites, for the API reference only (the source docstrings are not changed):

- ``Example:`` (torchmetrics' spelling) to ``Examples:``, the section name griffe's Google parser
  knows, so the doctest is shown as highlighted Python rather than as quoted text;
- cross-reference roles (``:func:`name```, ``:class:`~pkg.Name```, ``:math:`x```, ...) to code;
- ``.. math::`` blocks to fenced code blocks holding the formula's TeX (readable without MathJax,
  which a site built and read offline could not load).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE_HEADER = re.compile(r"^([ \t]*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc|math):`~?([^`]+)`")
_MATH_INLINE = re.compile(r"^([ \t]*)\.\. math::[ \t]+(\S.*)$", re.MULTILINE)


def _role(match: re.Match[str]) -> str:
    target = match.group(1)
    shown = target.rsplit(".", 1)[-1] if match.group(0).startswith(":") and "`~" in match.group(0) else target
    return f"`{shown}`"


def _math_blocks(text: str) -> str:
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == ".. math::":
            indent = line[: len(line) - len(line.lstrip())]
            body: list[str] = []
            i += 1
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
                body.append(lines[i])
                i += 1
            while body and not body[-1].strip():
                body.pop()
            width = min((len(b) - len(b.lstrip()) for b in body if b.strip()), default=0)
            out += [f"{indent}```tex", *(indent + b[width:] if b.strip() else "" for b in body), f"{indent}```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def rewrite(text: str) -> str:
    """The docstring ``text`` as the reference renders it."""
    text = _EXAMPLE_HEADER.sub(r"\1Examples:", text)
    text = _MATH_INLINE.sub(lambda m: f"{m.group(1)}```tex\n{m.group(1)}{m.group(2)}\n{m.group(1)}```", text)
    text = _math_blocks(text)
    return _ROLE.sub(_role, text)


class ExampleSections(griffe.Extension):
    """Apply :func:`rewrite` to the docstring of every loaded object."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)

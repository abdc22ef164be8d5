"""MkDocs hook: fail a strict build when the API reference leaves out a public name.

After the build, every name in the ``__all__`` of the package and of each part that has a page under
``reference/`` must have an anchor (``id="lightning_logits.<part>.<name>"``) on that page. The
``__all__`` lists are read from the source with ``ast`` (importing the package here would cost
seconds). A missing name is logged as a warning, which ``mkdocs build --strict`` turns into a failure.
"""

from __future__ import annotations

import ast
import logging
import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_logits"
log = logging.getLogger("mkdocs.hooks.reference_complete")


def exported_names(module: str) -> list[str]:
    """The ``__all__`` of ``lightning_logits[.<module>]``, read from its source."""
    parts = module.split(".")[1:]
    base = PACKAGE.joinpath(*parts)
    source = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return list(ast.literal_eval(node.value))
    return []


def on_post_build(*, config: Any) -> None:
    """Check each reference page's anchors against its module's ``__all__``."""
    site = Path(config["site_dir"])
    for page in sorted((Path(config["docs_dir"]) / "reference").glob("*.md")):
        match = re.search(r"^::: (lightning_logits(?:\.\w+)*)\s*$", page.read_text(), re.MULTILINE)
        if match is None:
            continue
        module = match.group(1)
        html = (site / "reference" / page.stem / "index.html").read_text()
        anchors = set(re.findall(r'id="([^"]+)"', html))
        for name in exported_names(module):
            if f"{module}.{name}" not in anchors:
                log.warning(f"the API reference page reference/{page.name} lacks {module}.{name} (in __all__)")

"""MkDocs hook: serve the plots in ``benchmarks/results/`` as ``results/<name>.png`` of the site.

The benchmarks write their plots next to their tables in ``benchmarks/results/``; this hook adds
each PNG there to the build as a generated file, so a page links to ``results/lawn_study.png``
(``../results/...`` from a subfolder), ``mkdocs build --strict`` checks those links like any other,
and no copy of the images is committed under ``docs/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def on_files(files: Files, *, config: Any) -> Files:
    """Add every ``benchmarks/results/*.png`` as ``results/<name>.png``."""
    for png in sorted(RESULTS.glob("*.png")):
        files.append(File.generated(config, f"results/{png.name}", abs_src_path=str(png)))
    return files

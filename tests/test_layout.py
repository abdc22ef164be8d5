"""The package's floors: imports point one way, and the pure floors import no Lightning."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lightning_logits"

# Lower number = lower floor. A module may import its own floor or a lower one, never a higher one.
FLOORS: dict[str, int] = {
    "functional": 0,
    "batch": 1,
    "networks": 1,
    "buffers": 2,
    "teacher_cache": 2,
    "metrics": 2,
    "loss_terms": 3,
    "parallel": 3,
    "callbacks": 4,
    "modules": 4,
    "data": 4,
    "cli": 5,
}
PURE = ("functional", "networks", "batch", "buffers", "teacher_cache")
METHOD_KEYS = ("distillation", "uskd", "lawn", "replay", "mowst")


def _room(module: str) -> str | None:
    """``lightning_logits.networks.heads`` -> ``networks``; the package root itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "lightning_logits" else None


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found.extend(f"{node.module}.{alias.name}" for alias in node.names if node.module == "lightning_logits")
    return found


def _source_files() -> list[tuple[str, Path]]:
    files = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        room = rel.parts[0].removesuffix(".py")
        if room != "__init__":
            files.append((room, path))
    return files


def test_every_room_has_a_floor() -> None:
    rooms = {room for room, _ in _source_files()}
    assert rooms <= set(FLOORS), f"new top-level modules need a floor in this test: {rooms - set(FLOORS)}"


@pytest.mark.parametrize(("room", "path"), _source_files(), ids=lambda v: str(v).rsplit("lightning_logits/", 1)[-1])
def test_imports_point_down(room: str, path: Path) -> None:
    for name in _imports(path):
        target = _room(name)
        if target is None or target == "__init__":
            continue
        assert target in FLOORS, f"{path.name} imports unknown room {name}"
        assert FLOORS[target] <= FLOORS[room], (
            f"{path.relative_to(PACKAGE.parent)} (floor {FLOORS[room]}: {room}) imports {name} "
            f"(floor {FLOORS[target]}: {target}): imports must point down"
        )
    if room in PURE:
        lightning = [n for n in _imports(path) if n.split(".")[0] in ("lightning", "pytorch_lightning")]
        assert not lightning, f"{path.name} is on a pure-PyTorch floor but imports {lightning}"


def test_the_checker_catches_an_upward_import(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from lightning_logits.modules.classifier import Classifier\nimport lightning.pytorch as pl\n")
    names = _imports(bad)
    assert "lightning_logits.modules.classifier" in names and "lightning.pytorch" in names
    assert FLOORS[_room(names[0]) or ""] > FLOORS["networks"]


def test_one_key_per_method_in_every_layer() -> None:
    root = PACKAGE.parent
    for key in METHOD_KEYS:
        assert (PACKAGE / "functional" / f"{key}.py").is_file(), f"functional/{key}.py missing"
        assert (PACKAGE / "callbacks" / f"{key}.py").is_file() or (PACKAGE / "modules" / f"{key}.py").is_file()
        assert any((root / "recipes" / key).glob("*.yaml")), f"recipes/{key}/ has no recipe"
        assert list((root / "tests").glob(f"test_{key}*.py")), f"tests/test_{key}*.py missing"
        assert list((root / "benchmarks").glob(f"*_{key}.py")), f"benchmarks/*_{key}.py missing"


def test_py_typed_marker_ships() -> None:
    assert (PACKAGE / "py.typed").is_file()

"""Every Python example of the documentation runs: the pages under ``docs/`` and the README.

Each page's fenced ``python`` blocks run in order in one namespace, as a reader would paste them:
a block with ``>>>`` prompts runs as a doctest (its outputs are checked), any other block is executed
as a script. ``bash`` blocks are not run (the pages say so). The blocks run in a temporary working
directory; a page that loads the digits teacher (``runs/distillation/teacher/teacher.ckpt``) gets one
made by a fixture. The examples keep their documented budgets (``max_epochs=8``, ...), which would take
minutes here: while they run, ``lightning.pytorch.Trainer`` is replaced by a subclass that caps the
budget at 1 epoch of 2 batches (fewer when the example asks for fewer), and ``LogitDiagnostics``,
which evaluates every OOD and shifted loader on its own, gets a cap of 1 batch per loader
unless the example sets one. Everything else (models, data, callbacks, arguments) runs exactly as
written, so a renamed argument, a wrong import or a changed API fails here.
"""

from __future__ import annotations

import doctest
import importlib
import importlib.util
import pkgutil
import re
import warnings
from pathlib import Path
from typing import Any

import griffe
import lightning.pytorch as pl
import pytest
import yaml

import lightning_logits
from lightning_logits.callbacks import LogitDiagnostics

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
TEACHER = Path("runs/distillation/teacher/teacher.ckpt")

_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_MAX_EPOCHS, _MAX_BATCHES, _MAX_STEPS = 1, 2, 4


def python_blocks(text: str) -> list[str]:
    """The fenced ``python`` blocks of a Markdown text, in order."""
    return [body for lang, body in _FENCE.findall(text) if lang == "python"]


class CappedTrainer(pl.Trainer):
    """``Trainer`` with the training budget capped (see the module docstring); all else as given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        epochs = kwargs.get("max_epochs")
        kwargs["max_epochs"] = _MAX_EPOCHS if epochs is None or epochs < 0 else min(epochs, _MAX_EPOCHS)
        steps = kwargs.get("max_steps", -1)
        kwargs["max_steps"] = _MAX_STEPS if steps is None or steps < 0 else min(steps, _MAX_STEPS)
        for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"):
            given = kwargs.get(key)
            kwargs[key] = given if isinstance(given, int) and 0 <= given < _MAX_BATCHES else _MAX_BATCHES
        kwargs.setdefault("accelerator", "cpu")
        kwargs.setdefault("enable_progress_bar", False)
        kwargs.setdefault("enable_model_summary", False)
        super().__init__(*args, **kwargs)


@pytest.fixture
def docs_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary working directory and the capped ``Trainer`` in place of Lightning's."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl, "Trainer", CappedTrainer)
    monkeypatch.setattr("lightning.Trainer", CappedTrainer)
    original_init = LogitDiagnostics.__init__

    def capped_init(self: LogitDiagnostics, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max_batches", 1)
        kwargs.setdefault("max_fit_batches", 1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(LogitDiagnostics, "__init__", capped_init)
    return tmp_path


def make_digits_teacher(path: Path) -> None:
    """A ``Classifier`` checkpoint like the teacher recipe's (resnet18 on 1-channel digits), one step trained."""
    from lightning_logits.data import DigitsDataModule
    from lightning_logits.modules import Classifier

    path.parent.mkdir(parents=True, exist_ok=True)
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False)
    trainer.fit(Classifier("resnet18", num_classes=10, in_chans=1), datamodule=DigitsDataModule(image_size=32))
    trainer.save_checkpoint(path)


def run_blocks(blocks: list[str], name: str) -> int:
    """Run ``blocks`` in one namespace (doctests for ``>>>`` blocks); return how many examples ran."""
    namespace: dict[str, Any] = {"__name__": f"docs:{name}"}
    ran = 0
    for index, block in enumerate(blocks):
        label = f"{name} python block {index + 1}"
        if re.search(r"^\s*>>> ", block, re.MULTILINE):
            test = doctest.DocTestParser().get_doctest(block, namespace, label, name, 0)
            runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
            runner.run(test, clear_globs=False)
            result = runner.summarize(verbose=False)
            assert result.failed == 0, f"{label}: {result.failed} of {result.attempted} doctest example(s) failed"
            ran += result.attempted
        else:
            try:
                exec(compile(block, label, "exec"), namespace)
            except Exception as error:  # name the block, keep the original traceback
                raise AssertionError(f"{label} failed: {type(error).__name__}: {error}\n{block}") from error
            ran += 1
    return ran


EXAMPLE_PAGES = [p for p in PAGES if python_blocks(p.read_text())]


def test_the_guides_have_examples() -> None:
    """Each method guide, Getting started and How it works carry Python examples (run below)."""
    with_blocks = {str(p.relative_to(DOCS)) for p in EXAMPLE_PAGES}
    want = {"getting-started.md", "how-it-works.md"} | {
        f"guides/{key}.md" for key in ("distillation", "uskd", "lawn", "replay", "mowst", "diagnostics")
    }
    assert want <= with_blocks, f"pages without a python example: {sorted(want - with_blocks)}"


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=[str(p.relative_to(DOCS)) for p in EXAMPLE_PAGES])
def test_page_examples_run(page: Path, docs_env: Path) -> None:
    blocks = python_blocks(page.read_text())
    if str(TEACHER) in "".join(blocks):
        make_digits_teacher(docs_env / TEACHER)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's tips about workers and logging on a toy run
        ran = run_blocks(blocks, str(page.relative_to(ROOT)))
    assert ran >= len(blocks)


def test_readme_example_runs(docs_env: Path) -> None:
    """The README's example (the landing page's 10 lines) runs like the pages' examples."""
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) == 1, "the README keeps exactly one python example"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_blocks(blocks, "README.md")


def test_capped_trainer_keeps_smaller_budgets() -> None:
    trainer = CappedTrainer(max_epochs=8, limit_train_batches=1, logger=False, enable_checkpointing=False)
    assert trainer.max_epochs == _MAX_EPOCHS
    assert trainer.limit_train_batches == 1
    assert trainer.limit_val_batches == _MAX_BATCHES
    assert CappedTrainer(max_steps=3, logger=False).max_steps == 3


def test_fences_are_found() -> None:
    text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python title\n>>> 1\n1\n```\n"
    assert python_blocks(text) == ["x = 1\n", ">>> 1\n1\n"]


# --------------------------------------------------------------------------- recipes page
def recipe_row(path: Path) -> str:
    """The row of ``docs/recipes.md``'s "Every recipe and its flags" table for one recipe YAML."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if v is None:
            return "null"
        if isinstance(v, list):
            return "'[" + ", ".join(map(str, v)) + "]'"
        return str(v)

    config = yaml.safe_load(path.read_text())
    trainer = config.get("trainer") or {}
    budget = f"{trainer['max_steps']} steps" if trainer.get("max_steps", -1) != -1 else trainer.get("max_epochs")
    sections = [k for k in ("distillation", "uskd", "lawn", "replay", "diagnostics") if k in config]
    if sections:
        key = sections[0]
        callback = config[key]
        args = callback.get("init_args") or {}
        owner = f"`{key}` (`{callback['class_path'].split('.')[-1]}`)"
    else:
        key = "model"
        args = {k: v for k, v in (config["model"].get("init_args") or {}).items() if not isinstance(v, dict | list)}
        owner = f"none (model `{config['model']['class_path'].split('.')[-1]}`)"
    flags = " ".join(f"`--{key}.{k} {value(v)}`" for k, v in args.items())
    return f"| `{path.relative_to(ROOT)}` | {owner} | {flags} | {budget} |"


@pytest.mark.parametrize("recipe", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_recipes_page_lists_every_recipe_with_its_flags(recipe: Path) -> None:
    row = recipe_row(recipe)
    assert row in (DOCS / "recipes.md").read_text().splitlines(), (
        f"docs/recipes.md lacks this row (or has an outdated one) for {recipe.relative_to(ROOT)}; put it in "
        f"the 'Every recipe and its flags' table:\n{row}"
    )


# --------------------------------------------------------------------------- public names
def public_names() -> list[tuple[str, str]]:
    """``(module, name)`` for every name in the ``__all__`` of every module of the package."""
    modules = [lightning_logits] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(lightning_logits.__path__, "lightning_logits.")
    ]
    return [(m.__name__, name) for m in modules for name in getattr(m, "__all__", [])]


PUBLIC = public_names()
_PACKAGE = griffe.load("lightning_logits", search_paths=[str(ROOT)], resolve_aliases=True)


def griffe_object(module: str, name: str) -> Any:
    """The documented object (alias resolved) as mkdocstrings sees it."""
    path = module[len("lightning_logits") :].lstrip(".")
    obj = _PACKAGE[f"{path}.{name}" if path else name]
    return obj.final_target if obj.is_alias else obj


def test_the_package_has_public_names() -> None:
    assert len(PUBLIC) > 150
    assert ("lightning_logits.callbacks", "TeacherDistillation") in PUBLIC


@pytest.mark.parametrize(("module", "name"), PUBLIC, ids=[f"{m}.{n}" for m, n in PUBLIC])
def test_public_name_has_a_docstring_with_an_example(module: str, name: str) -> None:
    """Every public name is documented with a runnable ``Example:`` (nothing is exempt).

    Functions and classes are run by pytest's ``--doctest-modules`` (``scripts/test.sh`` passes the
    package to pytest); constants and type aliases carry their docstring after the assignment,
    which only the documentation tools read, so their examples are run here.
    """
    obj = griffe_object(module, name)
    docstring = obj.docstring.value if obj.docstring else ""
    assert docstring.strip(), f"{module}.{name} has no docstring"
    assert re.search(r"^\s*Examples?:\s*$", docstring, re.MULTILINE), f"{module}.{name}'s docstring has no Example:"
    assert ">>> " in docstring, f"{module}.{name}'s Example has no doctest"
    if obj.kind in (griffe.Kind.ATTRIBUTE, griffe.Kind.TYPE_ALIAS):
        namespace = vars(importlib.import_module(obj.module.path)).copy()
        test = doctest.DocTestParser().get_doctest(docstring, namespace, f"{module}.{name}", module, 0)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
        runner.run(test)
        assert runner.summarize(verbose=False).failed == 0, f"{module}.{name}'s example fails"


# --------------------------------------------------------------------------- README and the reference's rewriting
def test_readme_links_point_at_files() -> None:
    """The README's relative links (to the pages, read on GitHub) name files that exist."""
    links = [link for link in re.findall(r"\]\(([^)#\s]+)", (ROOT / "README.md").read_text()) if "://" not in link]
    assert len(links) >= 10
    assert [link for link in links if not (ROOT / link).is_file()] == []


def test_reference_rewrites_sphinx_habits_to_markdown() -> None:
    spec = importlib.util.spec_from_file_location("griffe_examples", DOCS / "hooks" / "griffe_examples.py")
    assert spec is not None and spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    text = (
        "Sum.\n\n    .. math::\n        L = x^2\n\n"
        "    See :func:`kd_loss` and :class:`~a.b.LogitTap`.\n\nExample:\n    >>> 1\n    1"
    )
    assert hook.rewrite(text) == (
        "Sum.\n\n    ```tex\n    L = x^2\n    ```\n\n    See `kd_loss` and `LogitTap`.\n\nExamples:\n    >>> 1\n    1"
    )

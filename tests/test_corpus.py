"""The standard-library corpus (files, split, BPE, cache, packed rows), its LM recipes and its benchmark.

Small corpora are written to ``tmp_path`` (``root=``), so the expected token streams and splits are
known; the real standard library is read only where the test says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_logits.data import corpus as corpus_module
from lightning_logits.data.corpus import StdlibCorpus, StdlibCorpusDataModule, split_of, stdlib_files
from lightning_logits.modules.causal_lm import next_token_target

pytest.importorskip("tokenizers", reason="tokenizers is not installed: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parent.parent
LM_RECIPES = sorted((ROOT / "recipes" / "lm").glob("*.yaml"))


def _names_for_every_split(count: int = 3) -> dict[str, list[str]]:
    """``count`` file names that :func:`split_of` puts in each split."""
    names: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    i = 0
    while min(len(v) for v in names.values()) < count:
        name = f"mod_{i}.py"
        if len(names[split_of(name)]) < count:
            names[split_of(name)].append(name)
        i += 1
    return names


def _write_library(root: Path, rare_in_val: bool = False) -> dict[str, list[str]]:
    """A tiny library: 3 files per split, a package with tests (left out), an empty file; returns the texts."""
    names = _names_for_every_split()
    texts: dict[str, list[str]] = {}
    for split, files in names.items():
        texts[split] = []
        for number, name in enumerate(sorted(files)):  # the corpus reads files in sorted path order
            body = f"def {split}_{number}(x):\n    return x + {number}  # é\n" * (3 + number)
            if rare_in_val and split == "val":
                body += "zqxjvw = 1\n" * 60  # a word the training files never contain
            (root / name).write_text(body, encoding="utf-8")
            texts[split].append(body)
    (root / "pkg" / "tests").mkdir(parents=True)
    (root / "pkg" / "tests" / "mod_0.py").write_text("never = 'read'\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "other.py").write_text("never = 'read'\n")
    empty = next(f"empty_{i}.py" for i in range(1000) if split_of(f"empty_{i}.py") == "train")
    (root / empty).write_text("")
    return texts


def test_stdlib_files_are_sorted_and_leave_out_tests_and_installed_packages() -> None:
    files = stdlib_files()
    base = Path(__import__("sysconfig").get_paths()["stdlib"])
    relative = [path.relative_to(base).as_posix() for path in files]
    assert relative == sorted(relative) and len(relative) > 300
    assert "json/decoder.py" in relative and "os.py" in relative
    assert not [r for r in relative if {"test", "tests", "site-packages"} & set(r.split("/")[:-1])]


def test_split_is_a_fixed_hash_of_the_path_with_the_asked_shares() -> None:
    paths = [f"pkg_{i}/module_{i}.py" for i in range(4000)]
    splits = [split_of(p) for p in paths]
    assert splits == [split_of(p) for p in paths]  # deterministic
    assert 0.04 < splits.count("test") / 4000 < 0.06 and 0.04 < splits.count("val") / 4000 < 0.06
    wider = [split_of(p, val_percent=10, test_percent=20) for p in paths]
    assert 0.18 < wider.count("test") / 4000 < 0.22 and 0.08 < wider.count("val") / 4000 < 0.12
    # a path's test/val membership only grows with the share: the split depends on nothing else
    assert all(w == "test" for s, w in zip(splits, wider, strict=True) if s == "test")


def test_documents_decode_to_the_files_and_the_bpe_never_saw_val_or_test(tmp_path: Path) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    texts = _write_library(root, rare_in_val=True)
    corpus = StdlibCorpus.load(tmp_path / "data", vocab_size=400, root=root)
    tokenizer = corpus.tokenizer()
    for split in ("train", "val", "test"):
        decoded = [tokenizer.decode(doc.tolist()) for doc in corpus.documents[split]]
        assert decoded == texts[split]  # byte-level BPE is lossless; file order; the empty file left out
        assert corpus.stats[split]["tokens"] == sum(len(doc) for doc in corpus.documents[split])
        assert corpus.stats[split]["bytes"] == sum(len(t.encode()) for t in texts[split])
    assert corpus.stats["train"]["empty_files"] == 1 and corpus.stats["train"]["files"] == 3
    # trained on the training files only: the word repeated 180 times in val stays in small pieces
    assert len(tokenizer.encode(" zqxjvw").ids) >= 4
    assert len(tokenizer.encode(" return").ids) == 1  # a training-file word is one token
    rebuilt = StdlibCorpus.load(tmp_path / "other", vocab_size=400, root=root)  # same input: same result
    assert torch.equal(rebuilt.documents["val"][0], corpus.documents["val"][0])


def test_a_second_load_reads_the_cache_and_a_changed_file_rebuilds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    _write_library(root)
    first = StdlibCorpus.load(tmp_path / "data", vocab_size=300, root=root)
    built: list[Path] = []
    real_build = corpus_module._build
    monkeypatch.setattr(
        corpus_module, "_build", lambda directory, *a: built.append(directory) or real_build(directory, *a)
    )
    again = StdlibCorpus.load(tmp_path / "data", vocab_size=300, root=root)
    assert built == [] and again.directory == first.directory
    assert all(torch.equal(a, b) for a, b in zip(again.documents["train"], first.documents["train"], strict=True))
    changed = sorted(root.glob("mod_*.py"))[0]
    changed.write_text(changed.read_text() + "added = 2\n")
    third = StdlibCorpus.load(tmp_path / "data", vocab_size=300, root=root)
    assert built == [third.directory] and third.directory != first.directory
    StdlibCorpus.load(tmp_path / "data", vocab_size=320, root=root)  # another vocabulary: another build
    assert len(built) == 2
    # a folder left by a build that died (no meta.json) is replaced, and no staging folder stays behind
    stale = tmp_path / "other" / third.directory.name
    stale.mkdir(parents=True)
    (stale / "tokens.npy").write_bytes(b"half written")
    rebuilt = StdlibCorpus.load(tmp_path / "other", vocab_size=300, root=root)
    assert rebuilt.directory == stale and (stale / "meta.json").is_file()
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.documents["val"], third.documents["val"], strict=True))
    assert [p.name for p in (tmp_path / "other").iterdir()] == [stale.name]


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 257"):
        StdlibCorpus.load(tmp_path, vocab_size=100)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StdlibCorpus.load(tmp_path, root=tmp_path / "missing")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "only.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match="split"):
        StdlibCorpus.load(tmp_path, root=tmp_path / "lib")
    with pytest.raises(ValueError, match="context must be at least 2"):
        StdlibCorpusDataModule(str(tmp_path), context=1)


def test_packed_rows_hold_every_token_once_and_never_predict_across_files(tmp_path: Path) -> None:
    dm = StdlibCorpusDataModule(str(tmp_path), vocab_size=320, context=24, batch_size=5, max_files=2)
    dm.setup()
    documents = dm.corpus.documents  # type: ignore[union-attr]
    for split in ("train", "val", "test"):
        rows = dm.rows[split]
        kept = rows["labels"] != -100
        # the split's tokens in file order, each once (pieces of 24 tokens at most per document)
        assert torch.equal(rows["input_ids"][kept], torch.cat(documents[split]))
        starts = (rows["position_ids"] == 0) & kept
        assert int(starts.sum()) == sum((len(d) + 23) // 24 for d in documents[split])
        target = next_token_target(rows["input_ids"], rows["labels"], position_ids=rows["position_ids"])
        # a target is the next token of the same piece: never the first token of the next file
        assert not bool(((target != -100) & (torch.roll(rows["position_ids"], -1, 1) == 0)).any())
    batch = next(iter(dm.val_dataloader()))
    assert torch.equal(batch["index"], torch.arange(5)) and batch["input_ids"].shape == (5, 24)
    assert dm.describe()["val"]["rows"] == len(dm.dataset("val"))


def test_train_rows_is_a_seeded_subset_of_the_training_rows(tmp_path: Path) -> None:
    full = StdlibCorpusDataModule(str(tmp_path), vocab_size=320, context=16, max_files=2)
    part = StdlibCorpusDataModule(str(tmp_path), vocab_size=320, context=16, max_files=2, train_rows=10, seed=3)
    same = StdlibCorpusDataModule(str(tmp_path), vocab_size=320, context=16, max_files=2, train_rows=10, seed=3)
    full.setup(), part.setup(), same.setup()
    ids = part.rows["train"]["input_ids"]
    assert ids.shape[0] == 10 and torch.equal(ids, same.rows["train"]["input_ids"])
    all_rows = [tuple(r) for r in full.rows["train"]["input_ids"].tolist()]
    assert all(tuple(r) in all_rows for r in ids.tolist())
    assert torch.equal(part.rows["val"]["input_ids"], full.rows["val"]["input_ids"])  # held-out splits whole


def test_a_causal_lm_checkpoint_is_a_teacher(tmp_path: Path) -> None:
    from lightning_logits.modules import CausalLM
    from lightning_logits.networks.factory import load_teacher
    from tests.helpers import fast_trainer

    config = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
              "num_hidden_layers": 1, "num_attention_heads": 2}  # fmt: skip
    module = CausalLM(config, optimizer=lambda p: torch.optim.SGD(p, lr=0.5))
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    trainer = fast_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(ids, batch_size=4))
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    teacher = load_teacher(str(tmp_path / "lm.ckpt")).eval()
    assert type(teacher).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(teacher(ids).logits, module.model.eval()(ids).logits)


@pytest.mark.parametrize("recipe", LM_RECIPES, ids=lambda p: p.name)
def test_every_lm_recipe_parses(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_logits.cli import build_cli

    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_logits.modules.CausalLM" in printed
    assert "class_path: lightning_logits.data.StdlibCorpusDataModule" in printed
    if recipe.name.startswith("smollm2"):
        assert "model: HuggingFaceTB/SmolLM2-135M" in printed and "tokenizer: HuggingFaceTB/SmolLM2-135M" in printed
        assert "teacher: hf:HuggingFaceTB/SmolLM2-360M" in printed and "loss: jsd" in printed


@pytest.mark.slow
def test_lm_recipes_train_the_teacher_then_distill_a_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_logits.cli import build_cli

    monkeypatch.chdir(tmp_path)  # recipes write under runs/
    tiny = [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--data.max_files=2",
        "--data.context=16",
        "--data.batch_size=2",
    ]
    build_cli(["fit", "--config", str(ROOT / "recipes/lm/stdlib_teacher.yaml"), *tiny])
    teacher = tmp_path / "runs/lm/teacher/teacher.ckpt"
    assert teacher.is_file()
    recipe = ROOT / "recipes/lm/stdlib_student_jsd.yaml"
    cli = build_cli(
        ["fit", "--config", str(recipe), *tiny, "--data.train_rows=4", "--distillation.teacher", str(teacher)]
    )
    metrics = cli.trainer.callback_metrics
    assert float(metrics["train/loss_jsd_epoch"]) > 0 and "val/ppl" in metrics


@pytest.mark.slow
def test_corpus_benchmark_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.accuracy_distillation_corpus", "--smoke",
         "--data-dir", str(tmp_path / "data"), "--work-dir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### accuracy: distillation, language model on a real corpus" in proc.stdout
    for row in ("| CE alone |", "| + forward KL |", "| + reverse KL |", "| + JSD (beta 0.5) |", "| + top-4 cache KD"):
        assert row in proc.stdout

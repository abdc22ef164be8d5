"""An offline text corpus every machine has: the Python standard library's own source files.

Nobody here wrote it and nothing is downloaded: the ``.py`` files under
``sysconfig.get_paths()["stdlib"]`` (without test suites and ``site-packages``), split by file
into train/val/test by a hash of each file's relative path, tokenized by a byte-level BPE that
:mod:`tokenizers` trains on the training files only. Tokenizer and token ids are cached on disk,
so a second run reads them back in well under a second. Documents are files, packed into
fixed-length rows by :func:`~lightning_logits.data.packing.pack_documents`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_logits.data.packing import pack_documents

__all__ = ["StdlibCorpus", "StdlibCorpusDataModule", "split_of", "stdlib_files"]

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
EXCLUDED_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
PAD_TOKEN = "<|pad|>"  # id 0: the padding of packed rows (its labels are ignored)
FORMAT = 1


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path, without tests and installed packages.

    A file is left out when a directory on its relative path is ``test``, ``tests``, ``idle_test``,
    ``site-packages`` or ``__pycache__``.

    Args:
        root: the directory to read (default: this interpreter's ``sysconfig.get_paths()["stdlib"]``).

    Example:
        >>> files = stdlib_files()
        >>> len(files) > 100 and all(path.suffix == ".py" for path in files)
        True
        >>> any(part == "site-packages" for path in files for part in path.parts)
        False
    """
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise FileNotFoundError(f"the standard library directory '{base}' does not exist; pass root=<a directory>")
    found = [path for path in base.rglob("*.py") if not EXCLUDED_PARTS.intersection(path.relative_to(base).parts[:-1])]
    return sorted(found, key=lambda path: path.relative_to(base).as_posix())


def split_of(relative_path: str, val_percent: int = 5, test_percent: int = 5) -> Split:
    """The split of one file, fixed by the SHA-1 of its relative path (the same on every machine).

    The hash mod 100 is in ``[0, test_percent)`` for test, in the next ``val_percent`` for val, and
    train otherwise; a file's split does not depend on which other files exist.

    Args:
        relative_path: the file's path relative to the library root, with ``/`` separators.
        val_percent: share of files (in percent) for validation.
        test_percent: share of files (in percent) for testing.

    Example:
        >>> split_of("json/decoder.py"), split_of("asyncio/tasks.py")
        ('train', 'val')
        >>> sorted({split_of(f"file_{i}.py") for i in range(200)})
        ['test', 'train', 'val']
    """
    bucket = int(hashlib.sha1(relative_path.encode()).hexdigest(), 16) % 100
    if bucket < test_percent:
        return "test"
    if bucket < test_percent + val_percent:
        return "val"
    return "train"


@dataclass
class StdlibCorpus:
    """The tokenized standard-library corpus: token ids per file, per split, and the tokenizer.

    Build or read it with :meth:`load`. ``documents[split]`` holds one int64 tensor of token ids
    per non-empty file, in the sorted file order; ``stats[split]`` the counts of ``files`` (non-empty),
    ``empty_files`` (left out), ``bytes`` and ``tokens``.

    Args:
        directory: where the tokenizer (``tokenizer.json``), the ids (``tokens.npy``, ``offsets.npy``)
            and ``meta.json`` are stored.
        documents: ``{split: [tokens [L_i] int64, ...]}``.
        stats: ``{split: {"files", "empty_files", "bytes", "tokens"}}``.
        vocab_size: the tokenizer's vocabulary size.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     corpus = StdlibCorpus.load(tmp, vocab_size=300, max_files=3)
        ...     again = StdlibCorpus.load(tmp, vocab_size=300, max_files=3)  # read back from the cache
        >>> [corpus.stats[split]["files"] for split in ("train", "val", "test")]
        [3, 3, 3]
        >>> corpus.vocab_size, bool(torch.equal(corpus.documents["val"][0], again.documents["val"][0]))
        (300, True)
    """

    directory: Path
    documents: dict[str, list[Tensor]]
    stats: dict[str, dict[str, int]]
    vocab_size: int

    @classmethod
    def load(
        cls,
        data_dir: str | Path,
        vocab_size: int = 4096,
        max_files: int | None = None,
        root: str | Path | None = None,
        tokenizer: str | None = None,
    ) -> StdlibCorpus:
        """Read the corpus from ``data_dir``, building it there first when it is not cached yet.

        The cache lives in a subdirectory named after what determines it (the files' paths and
        contents, ``vocab_size``, ``max_files``, the ``tokenizers`` version): another Python version
        or vocabulary gets its own.

        Args:
            data_dir: the cache directory (created).
            vocab_size: size of the byte-level BPE vocabulary (at least 257: the 256 bytes and the pad token).
            max_files: keep only the first ``max_files`` files of each split (small runs and tests).
            root: the library directory to read (default: this interpreter's standard library).
            tokenizer: a Hugging Face tokenizer name or directory (``AutoTokenizer.from_pretrained``:
                needs it downloaded) to use instead of training a BPE, so that a pretrained model's
                own vocabulary is used; ``vocab_size`` is then ignored.
        """
        import tokenizers

        if not (isinstance(vocab_size, int) and vocab_size >= 257):
            raise ValueError(f"vocab_size must be an integer >= 257 (256 bytes and the pad token), got {vocab_size!r}")
        if max_files is not None and max_files < 1:
            raise ValueError(f"max_files must be None (every file) or at least 1, got {max_files!r}")
        base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
        files: dict[str, list[Path]] = {split: [] for split in SPLITS}
        for path in stdlib_files(base):
            files[split_of(path.relative_to(base).as_posix())].append(path)
        if max_files is not None:
            files = {split: paths[:max_files] for split, paths in files.items()}
        empty = [split for split in SPLITS if not files[split]]
        if empty:
            raise ValueError(f"no .py file of '{base}' falls in the {empty} split(s); pass a root with more files")
        texts = {split: [path.read_bytes() for path in paths] for split, paths in files.items()}
        digest = hashlib.sha1(f"{FORMAT} {vocab_size} {max_files} {tokenizer} {tokenizers.__version__}".encode())
        for split in SPLITS:
            for path, text in zip(files[split], texts[split], strict=True):
                digest.update(f"{split} {path.relative_to(base).as_posix()} {len(text)}\n".encode())
                digest.update(hashlib.sha1(text).digest())
        name = f"v{vocab_size}" if tokenizer is None else tokenizer.strip("/").replace("/", "--")
        directory = Path(data_dir) / f"stdlib-{name}-{digest.hexdigest()[:12]}"
        if not (directory / "meta.json").is_file():
            _build(directory, texts, vocab_size, tokenizer)
        meta = json.loads((directory / "meta.json").read_text())
        tokens = torch.from_numpy(np.load(directory / "tokens.npy").astype(np.int64))
        offsets = np.load(directory / "offsets.npy").tolist()
        documents: dict[str, list[Tensor]] = {}
        number = 0
        for split in SPLITS:
            count = meta["stats"][split]["files"]
            documents[split] = [tokens[offsets[i] : offsets[i + 1]] for i in range(number, number + count)]
            number += count
        return cls(directory, documents, meta["stats"], int(meta["vocab_size"]))

    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer`` of the ids (decode them with ``.decode(ids)``)."""
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(self.directory / "tokenizer.json"))


def _build(directory: Path, texts: dict[str, list[bytes]], vocab_size: int, name: str | None) -> None:
    """Train the BPE on the training texts (or load ``name``), encode every split, write the files.

    The files are written to a private folder renamed to ``directory`` at the end, so a cache
    folder with ``meta.json`` is complete.
    """
    from tokenizers import ByteLevelBPETokenizer, Tokenizer

    decoded = {split: [text.decode("utf-8", errors="replace") for text in items] for split, items in texts.items()}
    tokenizer: Any
    if name is None:
        tokenizer = ByteLevelBPETokenizer()
        tokenizer.train_from_iterator(
            decoded["train"], vocab_size=vocab_size, min_frequency=2, special_tokens=[PAD_TOKEN], show_progress=False
        )
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name).backend_tokenizer  # a tokenizers.Tokenizer
        if not isinstance(tokenizer, Tokenizer):  # pragma: no cover - every fast tokenizer has one
            raise TypeError(f"the tokenizer {name!r} has no fast backend (tokenizers.Tokenizer)")
    ids: list[list[int]] = []
    stats: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        encoded = [item.ids for item in tokenizer.encode_batch(decoded[split], add_special_tokens=False)]
        kept = [item for item in encoded if item]  # an empty file (many __init__.py) is no document
        ids.extend(kept)
        stats[split] = {
            "files": len(kept),
            "empty_files": len(encoded) - len(kept),
            "bytes": sum(len(text) for text in texts[split]),
            "tokens": sum(len(item) for item in kept),
        }
    # Written to a private folder, then renamed: processes that build at once never see half a cache.
    staging = directory.with_name(f"{directory.name}.building-{os.getpid()}")
    staging.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(staging / "tokenizer.json"))
    offsets = np.cumsum([0] + [len(item) for item in ids], dtype=np.int64)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65536 else np.int32
    np.save(staging / "tokens.npy", np.concatenate([np.asarray(item, dtype=dtype) for item in ids]))
    np.save(staging / "offsets.npy", offsets)
    meta = {"format": FORMAT, "vocab_size": tokenizer.get_vocab_size(), "stats": stats}
    (staging / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        staging.rename(directory)
    except OSError:  # another process finished first (or a stale incomplete folder is in the way)
        if not (directory / "meta.json").is_file():
            shutil.rmtree(directory, ignore_errors=True)
            staging.rename(directory)
            return
        shutil.rmtree(staging, ignore_errors=True)


class PackedRows(Dataset[dict[str, Tensor]]):
    """Packed rows as ``{"input_ids", "labels", "position_ids", "index"}`` items (``index``: the row number)."""

    def __init__(self, packed: dict[str, Tensor]) -> None:
        self.packed = packed

    def __len__(self) -> int:
        return int(self.packed["input_ids"].shape[0])

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = {key: value[index] for key, value in self.packed.items()}
        item["index"] = torch.tensor(index)
        return item


class StdlibCorpusDataModule(pl.LightningDataModule):
    """Language modeling on the Python standard library's source, packed into rows of ``context`` tokens.

    Each file is a document; the files of a split are packed in their sorted order by
    :func:`~lightning_logits.data.packing.pack_documents` (a file longer than ``context`` is cut
    into pieces). Batches are mappings ``{"input_ids", "labels", "position_ids", "index"}``, each
    ``[B, context]`` (``index`` ``[B]``: the row number, the key of a teacher-logit cache), ready
    for :class:`~lightning_logits.modules.CausalLM`, which then predicts no token across a file
    boundary. The model's ``vocab_size`` must be at least :attr:`vocab_size` (the tokenizer's).

    Args:
        data_dir: where the tokenizer and token ids are cached (see :meth:`StdlibCorpus.load`).
        vocab_size: size of the byte-level BPE vocabulary, trained on the training files only.
        context: tokens per packed row.
        batch_size: rows per batch.
        max_files: keep only the first ``max_files`` files of each split (small runs and tests).
        train_rows: train on a subset of this many training rows, drawn with ``seed`` (a student
            that sees less data than its teacher); ``None``: all of them.
        seed: seed of the ``train_rows`` draw and of the training shuffle.
        num_workers: dataloader workers (the rows are in memory: 0 is fastest here).
        tokenizer: a Hugging Face tokenizer name or directory to use instead of training a BPE
            (a pretrained model's own vocabulary; downloaded by ``transformers``); ``vocab_size`` is
            then ignored.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     dm = StdlibCorpusDataModule(tmp, vocab_size=300, context=32, batch_size=4, max_files=2)
        ...     dm.setup("fit")
        ...     batch = next(iter(dm.train_dataloader()))
        >>> sorted(batch), tuple(batch["input_ids"].shape), dm.vocab_size
        (['index', 'input_ids', 'labels', 'position_ids'], (4, 32), 300)
    """

    def __init__(
        self,
        data_dir: str = "runs/data",
        vocab_size: int = 4096,
        context: int = 128,
        batch_size: int = 16,
        max_files: int | None = None,
        train_rows: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        tokenizer: str | None = None,
    ) -> None:
        super().__init__()
        if not (isinstance(context, int) and context >= 2):
            raise ValueError(f"context must be at least 2 tokens per row (one to predict), got {context!r}")
        if train_rows is not None and train_rows < 1:
            raise ValueError(f"train_rows must be None (every row) or at least 1, got {train_rows!r}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.requested_vocab_size = vocab_size
        self.context = context
        self.batch_size = batch_size
        self.max_files = max_files
        self.train_rows = train_rows
        self.seed = seed
        self.num_workers = num_workers
        self.tokenizer = tokenizer
        self.corpus: StdlibCorpus | None = None
        self.rows: dict[str, dict[str, Tensor]] = {}

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size (after :meth:`setup`)."""
        if self.corpus is None:
            self.setup()
        assert self.corpus is not None
        return self.corpus.vocab_size

    @override
    def prepare_data(self) -> None:
        StdlibCorpus.load(self.data_dir, self.requested_vocab_size, self.max_files, tokenizer=self.tokenizer)

    @override
    def setup(self, stage: str | None = None) -> None:
        if self.corpus is not None:
            return
        self.corpus = StdlibCorpus.load(
            self.data_dir, self.requested_vocab_size, self.max_files, tokenizer=self.tokenizer
        )
        for split in SPLITS:
            self.rows[split] = pack_documents(self.corpus.documents[split], self.context, pad_id=0)
        total = self.rows["train"]["input_ids"].shape[0]
        if self.train_rows is not None and self.train_rows < total:
            keep = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))[: self.train_rows]
            keep = keep.sort().values
            self.rows["train"] = {key: value[keep] for key, value in self.rows["train"].items()}

    def dataset(self, split: Split) -> PackedRows:
        """The packed rows of ``"train"``, ``"val"`` or ``"test"`` (after :meth:`setup`)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.setup()
        return PackedRows(self.rows[split])

    def describe(self) -> dict[str, dict[str, int]]:
        """``{split: {"files", "bytes", "tokens", "rows"}}``: the corpus's counts and the packed rows used."""
        self.setup()
        assert self.corpus is not None
        return {
            split: {**self.corpus.stats[split], "rows": int(self.rows[split]["input_ids"].shape[0])} for split in SPLITS
        }

    def _loader(self, split: Split, shuffle: bool) -> DataLoader[dict[str, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
        )

    @override
    def train_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        return self._loader("train", shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        return self._loader("val", shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader[dict[str, Tensor]]:
        return self._loader("test", shuffle=False)

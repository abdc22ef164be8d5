"""Offline teacher logits: run a teacher once over a data set, store its top-k logits, read them back.

Distilling from a large teacher costs a teacher forward pass per student step and the teacher's
memory on every device. When the student's inputs are the same every epoch, the teacher's
logits can be computed once and read back by sample index instead.

**Layout.** A cache is a directory holding memory-mapped ``.npy`` arrays, one row per sample
index of the data set (row ``i`` is the sample the dataloader tags with index ``i``):

- ``values.npy``: float16 ``[M, k]``, the teacher's ``k`` largest logits, in descending order;
- ``indices.npy``: int16 (int32 beyond 32767 classes) ``[M, k]``, their class indices;
- ``rest.npy``: float32 ``[M]``, the log-sum-exp of the ``C - k`` other logits (``-inf`` when ``k = C``);
- ``written.npy``: bool ``[M]``, which rows were filled (reading an unfilled row is an error);
- ``checksum.npy``: uint32 ``[M]``, a checksum of each row's bytes in the three arrays above
  (:func:`row_checksums`), compared whenever rows are read: a row changed on disk after the build
  (a bad copy, a bad disk) is an error naming the files, not silently different teacher logits;
- ``meta.json``: ``num_samples``, ``num_classes``, ``k``, ``positions``, the teacher's source, the
  format version, and what the cache was built on: ``data_fingerprint`` (sample count, a SHA-1 of
  the labels by index, the class histogram; see :func:`label_fingerprint`) and ``data`` (the
  DataModule class path, its arguments and the split, when the command line built it).

**Sequences.** A teacher that returns per-token logits ``[N, T, C]`` (a language model) gets a
cache with ``T`` positions per row: ``values``/``indices`` ``[M, T, k]`` and ``rest`` ``[M, T]``
(``meta["positions"] = T``; every sample must have the same ``T``, pad shorter ones), and
:meth:`TeacherLogitCache.logits` returns ``[B, T, C]``. With a vocabulary of 32k and ``k = 32``
this stores about 1/500 of the full logits.

**Token-scale layout** (:func:`build_token_cache`, :class:`TokenLogitCache`). For a corpus of
variable-length documents packed into rows: one flat row per token, ``values``/``indices``
``[total_tokens, k]``, ``rest`` and the token ids ``[total_tokens]``, and ``offsets``
``[num_documents + 1]`` (document ``d`` is rows ``offsets[d]:offsets[d + 1]``); ``meta.json`` says
``"layout": "tokens"``. A packed batch names each position's row in a ``token_index [B, T]``
(``pack_documents(..., token_index=True)``), and ``TeacherDistillation(cache=...)`` reads either
layout (:func:`open_teacher_cache`). About ``4k + 6`` bytes per token with float16 values.

**Checked before training.** ``TeacherDistillation(cache=...)`` compares the training set's labels
by index with ``data_fingerprint`` before the first step and refuses a cache built on another
split (another ``train_fraction`` or ``seed``), whose rows would belong to other samples.

**Reconstruction of a full row** (:func:`reconstruct_logits`). The ``k`` stored logits are put
back in their columns and every other column gets the same fill value
``f = rest - log(C - k)``, so that ``(C - k) * exp(f) = exp(rest)``. Hence at temperature 1 the
softmax of the rebuilt row gives every top-k class exactly the teacher's probability (up to the
float16 rounding of the values) and the non-top-k classes together exactly their total teacher
mass, spread evenly among them. ``f`` is a log-mean-exp of the non-top-k logits, so it never
exceeds the k-th largest logit and the ranking is kept. At another temperature ``T`` the rebuilt
row is an approximation (the non-top-k classes are flattened to their mean); with ``k = C`` the
reconstruction is exact up to float16. For NKD, a target class outside the teacher's top-k gets
the fill value.

**Augmentation.** The cache holds the logits of whatever inputs the building dataloader yields.
Build it from a dataloader *without random augmentation and without shuffling* (e.g.
``DigitsDataModule(return_index=True).dataset("train")``): then the student, even when it trains
on randomly augmented views, distills toward the teacher's view of the clean sample, which is a
different (weaker) signal than online KD on the same augmented view. A fixed augmentation per
sample (seeded by the index) is the other consistent choice. Mixup/cutmix mix inputs inside the
step, so cached logits do not match the mixed input: the callback warns when both are used.

**Several processes.** In a running ``torch.distributed`` group (several GPUs, nodes, or CPU
processes), :func:`build_teacher_cache` deals whole batches to the ranks and they all write into
the same files; the result equals a one-process build byte for byte. A build that stopped resumes
with ``resume=True`` without recomputing the rows already written (see the function).

Command line: ``lightning-logits-cache --teacher runs/teacher.ckpt --out
cache/digits_top5 --k 5 --data-args '{"image_size": 32}' [--devices N] [--resume]`` (see
``lightning_logits.cli.cache_main``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_logits.batch import batch_index, batch_input, batch_target
from lightning_logits.networks.causal_lm import causal_lm_logits
from lightning_logits.networks.heads import first_tensor

__all__ = [
    "TeacherLogitCache",
    "TokenLogitCache",
    "build_teacher_cache",
    "build_token_cache",
    "dataset_labels",
    "label_fingerprint",
    "open_teacher_cache",
    "rank_batches",
    "reconstruct_logits",
    "token_bytes_per_token",
    "token_fingerprint",
    "row_checksums",
]

FORMAT_VERSION = 1
BUILDING_FILE = "building.json"
"""Written (by global rank 0) while a build runs: the arrays' shape and ``k``, to resume with."""


def reconstruct_logits(values: Tensor, indices: Tensor, rest: Tensor, num_classes: int) -> Tensor:
    """Rebuild full ``[..., C]`` logit rows from top-k logits and the log-sum-exp of the others.

    Every non-top-k column is filled with ``rest - log(C - k)``, which keeps the teacher's total
    softmax mass of the non-top-k classes at temperature 1 (see the module docstring).

    Args:
        values: ``[..., k]`` top-k logits (any float dtype): ``[B, k]``, or ``[B, T, k]`` per token.
        indices: ``[..., k]`` their class indices.
        rest: ``[...]`` log-sum-exp of the ``C - k`` other logits (ignored when ``k = C``).
        num_classes: ``C``.

    Returns:
        float32 ``[..., C]`` logits.

    Example:
        >>> import torch
        >>> full = torch.tensor([[3.0, 0.0, 1.0, -1.0]])
        >>> top, idx = full.topk(2, dim=1)
        >>> others = torch.tensor([[0.0, -1.0]]).logsumexp(dim=1)
        >>> rebuilt = reconstruct_logits(top, idx, others, 4)
        >>> torch.allclose(rebuilt.softmax(1)[0, [0, 2]], full.softmax(1)[0, [0, 2]])
        True
        >>> torch.allclose(rebuilt.softmax(1)[0, [1, 3]].sum(), full.softmax(1)[0, [1, 3]].sum())
        True
    """
    k = values.shape[-1]
    if k > num_classes:
        raise ValueError(f"k = {k} stored logits but only {num_classes} classes")
    if k == num_classes:
        out = torch.empty(*values.shape[:-1], num_classes, dtype=torch.float32, device=values.device)
    else:
        fill = rest.float() - math.log(num_classes - k)
        out = fill.unsqueeze(-1).expand(*fill.shape, num_classes).clone()
    return out.scatter_(-1, indices.long(), values.float())


def row_checksums(values: np.ndarray, indices: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """A uint32 checksum per row of a cache's arrays: ``[B]`` from ``values``/``indices`` ``[B, (T,) k]`` and ``rest``.

    An Adler-style pair of sums over the row's bytes (``s1``: their sum, ``s2``: their sum weighted
    by position, both modulo 65521) in one vectorized pass, cheap enough to check every row read in a
    training step: any single changed byte, and any block of bytes set to zero that were not all zero,
    changes it.

    Example:
        >>> import numpy as np
        >>> values, indices, rest = np.ones((2, 3), np.float16), np.zeros((2, 3), np.int16), np.zeros(2, np.float32)
        >>> a = row_checksums(values, indices, rest)
        >>> values[1, 2] = 2.0
        >>> b = row_checksums(values, indices, rest)
        >>> bool(a[0] == b[0]), bool(a[1] == b[1])
        (True, False)
    """
    rows = values.shape[0]
    data = np.concatenate(
        [np.ascontiguousarray(a).view(np.uint8).reshape(rows, -1) for a in (values, indices, rest)], axis=1
    ).astype(np.uint64)
    weights = np.arange(1, data.shape[1] + 1, dtype=np.uint64) % 65521
    s1 = data.sum(axis=1) % 65521
    s2 = (data * weights).sum(axis=1) % 65521
    return ((s2 << np.uint64(16)) | s1).astype(np.uint32)


def label_fingerprint(labels: Tensor | np.ndarray | Sequence[int]) -> dict[str, Any]:
    """What a data split looks like by index: ``num_samples``, ``labels_sha1`` and ``class_counts``.

    ``labels_sha1`` is the first 16 hex digits of the SHA-1 of the int64 labels in index order, so
    two splits with the same samples in the same order agree, and a split with other samples (or
    the same samples in another order) almost surely does not. Soft ``[N, C]`` labels use their argmax.

    Example:
        >>> fp = label_fingerprint([2, 0, 2])
        >>> fp["num_samples"], fp["class_counts"]
        (3, [1, 0, 2])
        >>> fp == label_fingerprint([0, 2, 2])
        False
    """
    array = torch.as_tensor(labels).detach().cpu()
    if array.ndim > 1:
        array = array.argmax(dim=-1)
    values = array.to(torch.int64).reshape(-1).numpy()
    counts = np.bincount(values[values >= 0]).tolist() if values.size else []
    return {
        "num_samples": int(values.size),
        "labels_sha1": hashlib.sha1(np.ascontiguousarray(values).tobytes()).hexdigest()[:16],
        "class_counts": [int(c) for c in counts],
    }


def dataset_labels(dataset: Any) -> Tensor | None:
    """The labels of a map-style data set in index order, read without running its transforms; ``None`` if unknown.

    Reads ``targets`` (torchvision, :class:`~lightning_logits.data.digits.IndexedTensorDataset`),
    ``labels`` or ``y`` attributes, the second tensor of a ``TensorDataset``, and follows
    ``torch.utils.data.Subset`` to its parent.

    Example:
        >>> import torch
        >>> from torch.utils.data import Subset, TensorDataset
        >>> data = TensorDataset(torch.zeros(4, 2), torch.tensor([3, 1, 2, 0]))
        >>> dataset_labels(Subset(data, [2, 0])).tolist()
        [2, 3]
    """
    if isinstance(dataset, torch.utils.data.Subset):
        parent = dataset_labels(dataset.dataset)
        return None if parent is None else parent[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    for attribute in ("targets", "labels", "y"):
        value = getattr(dataset, attribute, None)
        if isinstance(value, Tensor | np.ndarray | list) and len(value) == _length(dataset):
            try:
                return torch.as_tensor(np.asarray(value) if isinstance(value, list) else value)
            except (TypeError, ValueError):
                return None
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, tuple) and len(tensors) >= 2 and isinstance(tensors[1], Tensor):
        return tensors[1]
    return None


def _length(dataset: Any) -> int | None:
    try:
        return len(dataset)
    except TypeError:
        return None


class TeacherLogitCache:
    """Read-only access to a top-k teacher-logit cache on disk (memory-mapped).

    Args:
        path: the cache directory written by :func:`build_teacher_cache`.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> data = [(torch.randn(4, 3), torch.zeros(4), torch.arange(4))]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     cache = build_teacher_cache(nn.Linear(3, 5), data, tmp, k=2, num_samples=4)
        ...     cache.logits(torch.tensor([0, 3])).shape, cache.k, cache.num_classes
        (torch.Size([2, 5]), 2, 5)
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no teacher-logit cache at '{self.path}' (missing meta.json); build one with "
                "`lightning-logits-cache --teacher ... --out DIR` or build_teacher_cache()"
            )
        self.meta: dict[str, Any] = _read_cache_json(meta_path)
        if self.meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"cache '{meta_path}' has format {self.meta.get('format')!r}, this version reads format "
                f"{FORMAT_VERSION}; " + _REBUILD.format(folder=self.path)
            )
        try:
            self.num_samples = int(self.meta["num_samples"])
            self.num_classes = int(self.meta["num_classes"])
            self.k = int(self.meta["k"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(_damaged(meta_path, f"{type(err).__name__}: {err}")) from err
        positions = self.meta.get("positions")
        #: tokens per sample of a sequence cache (rows ``[T, k]``), ``None`` for classification rows
        self.positions: int | None = None if positions is None else int(positions)
        self.source: str = str(self.meta.get("teacher", ""))
        self.data_fingerprint: dict[str, Any] | None = self.meta.get("data_fingerprint")
        self.data: dict[str, Any] | None = self.meta.get("data")
        self.teacher_args: dict[str, Any] = dict(self.meta.get("teacher_args") or {})
        self._open()

    def _open(self) -> None:
        lead = (self.num_samples,) if self.positions is None else (self.num_samples, self.positions)
        shapes = {"values": (*lead, self.k), "indices": (*lead, self.k), "rest": lead, "written": (self.num_samples,)}
        if self.meta.get("checksum"):  # caches built before checksums existed have none
            shapes["checksum"] = (self.num_samples,)
        arrays = _open_arrays(self.path, "r", shapes)
        self.values, self.indices, self.rest, self.written = (
            arrays[n] for n in ("values", "indices", "rest", "written")
        )
        #: the per-row checksums (``None`` for a cache built without them)
        self.checksum: np.ndarray | None = arrays.get("checksum")
        missing = int((~np.asarray(self.written)).sum())
        if missing:
            raise ValueError(
                f"cache '{self.path}' is incomplete: {missing} of {self.num_samples} sample rows were never written "
                f"(so says '{self.path / 'written.npy'}': the building dataloader skipped them, use drop_last=False; "
                "or that file was damaged); rebuild it"
            )

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened in the receiving process (ddp_spawn pickles callbacks).
        return {"path": self.path}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __len__(self) -> int:
        return self.num_samples

    def _rows(self, index: Tensor | Sequence[int]) -> np.ndarray:
        rows = torch.as_tensor(index).detach().to("cpu", torch.int64).reshape(-1).numpy()
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_samples):
            raise IndexError(
                f"sample indices in [{rows.min()}, {rows.max()}] but the cache '{self.path}' holds "
                f"{self.num_samples} samples; build the cache on the same data split the student trains on"
            )
        return rows

    def topk(self, index: Tensor | Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """``(values [B, (T,) k] float16, indices [B, (T,) k] int64, rest [B, (T)] float32)`` of samples ``index``."""
        rows = self._rows(index)
        values_np = np.ascontiguousarray(self.values[rows])
        indices_np = np.ascontiguousarray(self.indices[rows])
        rest_np = np.ascontiguousarray(self.rest[rows])
        if self.checksum is not None:
            bad = np.flatnonzero(row_checksums(values_np, indices_np, rest_np) != self.checksum[rows])
            if bad.size:
                names = ("values.npy", "indices.npy", "rest.npy", "checksum.npy")
                files = ", ".join(f"'{self.path / n}'" for n in names)
                raise ValueError(
                    f"teacher-logit cache rows {rows[bad][:5].tolist()} fail their checksum: {files} changed after "
                    "the build (a bad copy or disk); " + _REBUILD.format(folder=self.path)
                )
        values = torch.from_numpy(values_np)
        indices = torch.from_numpy(indices_np.astype(np.int64))
        rest = torch.from_numpy(rest_np)
        return values, indices, rest

    def logits(self, index: Tensor | Sequence[int], device: torch.device | str | None = None) -> Tensor:
        """Reconstructed float32 teacher logits ``[B, C]`` (``[B, T, C]`` for sequences) of samples ``index``.

        See :func:`reconstruct_logits`.
        """
        values, indices, rest = self.topk(index)
        if device is not None:
            values, indices, rest = (t.to(device, non_blocking=True) for t in (values, indices, rest))
        return reconstruct_logits(values, indices, rest, self.num_classes)


def _rank_and_world() -> tuple[int, int]:
    """``(global rank, world size)`` of the initialized default process group, else ``(0, 1)``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _EveryNthBatch(torch.utils.data.Sampler[list[int]]):
    """The batches ``rank, rank + world, ...`` of another batch sampler: one rank's share, unchanged."""

    def __init__(self, batches: Iterable[list[int]], rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> Iterator[list[int]]:
        for number, batch in enumerate(self.batches):
            if number % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        total = len(self.batches)  # type: ignore[arg-type]
        return max(0, (total - self.rank + self.world - 1) // self.world)


def rank_batches(dataloader: Iterable[Any], rank: int, world: int) -> Iterable[Any]:
    """The batches of ``dataloader`` that rank ``rank`` of ``world`` takes: numbers ``rank, rank + world, ...``.

    Whole batches are dealt out, so every batch has the samples it has in a one-process pass
    and no sample is taken twice or padded. A ``DataLoader`` over a map-style data set is rebuilt
    with a batch sampler that yields only this rank's index lists (the other ranks' samples are
    never loaded); any other iterable is read in full and the other ranks' batches are dropped.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> loader = DataLoader(torch.arange(10), batch_size=3)
        >>> [b.tolist() for b in rank_batches(loader, 1, 2)]
        [[3, 4, 5], [9]]
    """
    if world == 1:
        return dataloader
    sampler = getattr(dataloader, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        raise ValueError(
            "the cache's dataloader already has a DistributedSampler, so each rank would see a part of a part; "
            "pass the whole in-order loader (e.g. DataLoader(dataset, batch_size=..., shuffle=False)): "
            "the ranks split its batches themselves"
        )
    if (
        isinstance(dataloader, torch.utils.data.DataLoader)
        and dataloader.batch_sampler is not None
        and not isinstance(dataloader.dataset, torch.utils.data.IterableDataset)
    ):
        options: dict[str, Any] = {
            "num_workers": dataloader.num_workers,
            "collate_fn": dataloader.collate_fn,
            "pin_memory": dataloader.pin_memory,
            "timeout": dataloader.timeout,
            "worker_init_fn": dataloader.worker_init_fn,
            "multiprocessing_context": dataloader.multiprocessing_context,
            "generator": dataloader.generator,
            "persistent_workers": dataloader.persistent_workers,
            "pin_memory_device": dataloader.pin_memory_device,
            "in_order": getattr(dataloader, "in_order", True),
        }
        if dataloader.num_workers > 0:
            options["prefetch_factor"] = dataloader.prefetch_factor
        return torch.utils.data.DataLoader(
            dataloader.dataset, batch_sampler=_EveryNthBatch(dataloader.batch_sampler, rank, world), **options
        )
    return (batch for number, batch in enumerate(dataloader) if number % world == rank)


@torch.no_grad()
def build_teacher_cache(
    teacher: nn.Module,
    dataloader: Iterable[Any],
    path: str | Path,
    k: int = 10,
    num_samples: int | None = None,
    device: torch.device | str | None = None,
    input_transform: Callable[[Tensor], Tensor] | None = None,
    source: str | None = None,
    overwrite: bool = False,
    data: dict[str, Any] | None = None,
    teacher_args: dict[str, Any] | None = None,
    resume: bool = False,
) -> TeacherLogitCache:
    """Run ``teacher`` once over ``dataloader`` and store its top-k logits by sample index.

    Args:
        teacher: the teacher network (put in eval mode here; no gradients are computed).
        dataloader: yields ``(input, target, index)`` batches (or dicts with ``"input"`` and
            ``"index"``), e.g. ``DataLoader(DigitsDataModule(return_index=True).dataset("train"))``.
            Use no random augmentation, no shuffling and no ``drop_last``.
        path: the directory to write (created).
        k: logits kept per sample (clipped to the class count; ``k = C`` stores every logit).
        num_samples: rows of the cache (the largest index + 1 at least); default
            ``len(dataloader.dataset)``.
        device: where the teacher runs (default: where its parameters are).
        input_transform: applied to each input before the teacher (e.g. a resize).
        source: what built the teacher (a name or a path), recorded in ``meta.json``.
        overwrite: replace an existing cache (complete or not) at ``path``.
        data: how to rebuild the data, recorded in ``meta.json`` (the command line writes
            ``{"class_path": ..., "init_args": {...}, "split": "train"}``).
        teacher_args: how to rebuild the teacher (``checkpoint``, ``num_classes``,
            ``model_kwargs`` of a teacher given by name), recorded in ``meta.json``.
        resume: continue a build that stopped (a crash, a killed job): batches whose rows are all
            written are not given to the teacher again (a batch with only some rows written is
            recomputed and only its missing rows are written). The same ``k``, ``num_samples``
            and ``source`` as the first try are required; any number of processes may resume.
            Without a partial cache at ``path`` it builds from scratch; on a complete cache it
            returns it.

    The labels of the batches (element 1, or ``"target"``) are recorded by index as
    ``data_fingerprint`` (:func:`label_fingerprint`), so that training on other data is caught.

    **Every rank builds.** Called in every process of an initialized ``torch.distributed`` process
    group (a Lightning ``Trainer`` or ``Fabric`` under DDP, ``torchrun``, SLURM;
    ``lightning_logits.cli.launch_teacher_cache`` starts one), each rank takes the batches
    ``rank, rank + world, ...`` of the same ``dataloader`` (:func:`rank_batches`) and writes their
    rows into the same memory-mapped arrays, which global rank 0 creates before a barrier.
    Global rank 0 writes ``meta.json`` after a barrier at the end. Since every batch holds the
    samples it holds in one process, the files equal a one-process build byte for byte when the
    teacher's output for a batch does not depend on the process (deterministic kernels). ``path``
    must be one directory that every rank sees, on a file system where processes (and nodes) can
    write disjoint parts of one file (a local disk; Lustre or GPFS across nodes; not NFS).

    While a build runs, ``path`` holds ``building.json`` (the shape and ``k`` of the arrays, to
    resume with); it is removed when ``meta.json`` is written.

    Returns:
        The cache, opened for reading (on every rank).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> teacher = nn.Linear(3, 6)
        >>> batches = [(torch.randn(4, 3), torch.tensor([0, 1, 2, 3]), torch.arange(4))]  # (input, target, index)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     cache = build_teacher_cache(teacher, batches, tmp, k=6, num_samples=4)  # k = C: exact
        ...     torch.allclose(cache.logits(torch.arange(4)), teacher(batches[0][0]).detach(), atol=1e-2)
        True
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if overwrite and resume:
        raise ValueError("pass overwrite=True (start again) or resume=True (continue a stopped build), not both")
    rank, world = _rank_and_world()
    out = Path(path)
    name = source or type(teacher).__name__
    if num_samples is None:
        dataset = getattr(dataloader, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ValueError("pass num_samples: the dataloader has no sized .dataset to count the samples")
        num_samples = len(dataset)
    building = _read_json(out / BUILDING_FILE)
    if (out / "meta.json").exists() and not overwrite:
        if not resume:
            raise FileExistsError(f"a teacher-logit cache already exists at '{out}'; pass overwrite=True to replace it")
        cache = TeacherLogitCache(out)
        found = {
            "num_samples": cache.num_samples,
            "k": cache.k,
            "num_classes": cache.num_classes,
            "teacher": cache.source,
        }
        _check_resumable(out, found, k, num_samples, name)
        return cache
    if building is not None and not (resume or overwrite):
        raise FileExistsError(
            f"'{out}' holds a cache whose build stopped before the end ({BUILDING_FILE} without meta.json); "
            "pass resume=True (--resume) to continue it or overwrite=True (--overwrite) to start again"
        )
    if building is not None and resume:
        _check_resumable(out, building, k, num_samples, name)
    else:
        building = None  # a fresh build
    if device is None:
        param = next(teacher.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    teacher = teacher.to(device).eval()

    def run(batch: Any) -> tuple[np.ndarray, Tensor]:
        index = batch_index(batch)
        if index is None:
            raise ValueError(
                "the dataloader's batches carry no sample index; yield (input, target, index) "
                "(e.g. DigitsDataModule(return_index=True)) so cached rows can be found again"
            )
        rows = torch.as_tensor(index).to("cpu", torch.int64).reshape(-1).numpy()
        if rows.size and (rows.min() < 0 or rows.max() >= num_samples):
            raise IndexError(f"sample index {rows.max()} out of range for num_samples={num_samples}")
        x = batch_input(batch).to(device)
        if input_transform is not None:
            x = input_transform(x)
        logits = first_tensor(teacher(x)).float()
        if logits.ndim not in (2, 3):
            raise ValueError(
                f"the teacher returned logits of shape {tuple(logits.shape)}, expected [N, C] or [N, T, C] (per token)"
            )
        return rows, logits

    labels = np.full(num_samples, -1, dtype=np.int64)
    labels_known = True
    batches = iter(rank_batches(dataloader, rank, world))
    first: tuple[Any, np.ndarray, Tensor] | None = None
    if building is None:
        # The arrays' shape is the teacher's: every rank runs its first batch, rank 0 creates the
        # files from the first shape any rank saw, and the others open them after a barrier.
        report: dict[str, Any] = {}
        failure: Exception | None = None
        batch = next(batches, None)
        if batch is not None:
            try:
                rows, logits = run(batch)
                first = (batch, rows, logits)
                report["shape"] = (logits.shape[-1], logits.shape[1] if logits.ndim == 3 else None)
            except Exception as error:  # raised on every rank below, so that no rank waits forever
                failure = error
                report["error"] = f"{type(error).__name__}: {error}"
        reports = _all_gather(report, world)
        errors = [f"rank {r}: {report_r['error']}" for r, report_r in enumerate(reports) if "error" in report_r]
        if failure is not None:
            raise failure
        if errors:
            raise RuntimeError(f"another rank failed on its first batch ({errors[0]})")
        shapes = [r["shape"] for r in reports if "shape" in r]
        if not shapes:
            raise ValueError("the dataloader yielded no batches")
        num_classes, positions = shapes[0]
        building = {
            "format": FORMAT_VERSION,
            "num_samples": num_samples,
            "num_classes": num_classes,
            "k": min(k, num_classes),
            "positions": positions,
            "teacher": name,
            "checksum": True,
        }

        def create() -> None:
            try:
                out.mkdir(parents=True, exist_ok=True)
                (out / "meta.json").unlink(missing_ok=True)
                (out / BUILDING_FILE).unlink(missing_ok=True)
            except OSError as err:
                raise _write_failure(Path(err.filename or out), err, resumable=False) from err
            _create_arrays(out, building)
            # building.json last: its presence says the arrays exist and can be resumed
            _write_json(out / BUILDING_FILE, building, resumable=False)

        _on_rank_zero(create, rank, world)
    num_classes, positions, k = int(building["num_classes"]), building["positions"], int(building["k"])
    checksum = bool(building.get("checksum"))  # a build begun before checksums existed goes on without
    arrays = _open_arrays(out, "r+", {"checksum": None} if checksum else None)
    written = arrays["written"]

    def store(rows: np.ndarray, logits: Tensor) -> None:
        if logits.shape[-1] != num_classes:
            raise ValueError(f"the teacher returned {logits.shape[-1]} classes, the cache holds {num_classes}")
        if (logits.shape[1] if logits.ndim == 3 else None) != positions:
            raise ValueError(
                f"the teacher returned logits of shape {tuple(logits.shape)}, the cache holds rows of {positions} "
                "positions: a sequence cache needs the same number of tokens in every sample (pad them)"
            )
        values, top = logits.topk(k, dim=-1)
        if k < num_classes:
            rest = logits.scatter(-1, top, float("-inf")).logsumexp(dim=-1)
        else:
            rest = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
        if bool((values.abs() > torch.finfo(torch.float16).max).any()):
            raise ValueError(
                f"teacher logits reach {values.abs().max().item():.3g}, beyond float16's range; they cannot be cached"
            )
        missing = ~np.asarray(written[rows])
        if not missing.all():  # resumed: rows already on disk are not written again
            rows, keep = rows[missing], torch.from_numpy(missing).to(values.device)
            values, top, rest = values[keep], top[keep], rest[keep]
        values_np = values.to(torch.float16).cpu().numpy()
        indices_np = top.cpu().numpy().astype(arrays["indices"].dtype)
        rest_np = rest.cpu().numpy()
        arrays["values"][rows] = values_np
        arrays["indices"][rows] = indices_np
        arrays["rest"][rows] = rest_np
        if checksum:
            arrays["checksum"][rows] = row_checksums(values_np, indices_np, rest_np)
        written[rows] = True  # last: a row marked written is complete

    if first is not None:
        batch, rows, logits = first
        store(rows, logits)
        labels_known = _record_labels(batch, rows, labels)
    for batch in batches:
        index = batch_index(batch)
        if index is not None:
            rows = torch.as_tensor(index).to("cpu", torch.int64).reshape(-1).numpy()
            if rows.size and rows.min() >= 0 and rows.max() < num_samples and bool(np.asarray(written[rows]).all()):
                labels_known = _record_labels(batch, rows, labels) and labels_known
                continue  # resumed: every row of this batch is on disk, the teacher is not asked again
        rows, logits = run(batch)
        store(rows, logits)
        labels_known = _record_labels(batch, rows, labels) and labels_known
    for array in arrays.values():
        array.flush()
    if world > 1:  # rank 0 receives the labels each rank read (and waits until every rank is done)
        own = np.flatnonzero(labels >= 0)
        parts = _gather_to_zero((own, labels[own], labels_known), rank, world)
        if parts is not None:
            for rows_seen, labels_seen, known in parts:
                labels[rows_seen] = labels_seen
                labels_known = labels_known and known

    def finish() -> None:
        meta = {
            "format": FORMAT_VERSION,
            "num_samples": num_samples,
            "num_classes": num_classes,
            "k": k,
            "positions": positions,
            "teacher": name,
            "data_fingerprint": label_fingerprint(labels) if labels_known else None,
            "data": data,
            "teacher_args": teacher_args,
            "checksum": checksum,
            "reconstruction": "non-top-k columns = rest - log(C - k) (keeps their softmax mass at T=1)",
        }
        # meta.json last: its presence marks a complete cache.
        _write_json(out / "meta.json", meta)
        (out / BUILDING_FILE).unlink(missing_ok=True)

    _on_rank_zero(finish, rank, world)
    return TeacherLogitCache(out)


def _on_rank_zero(step: Callable[[], None], rank: int, world: int) -> None:
    """Run ``step`` on global rank 0 while the others wait; its error is raised on every rank (none waits forever)."""
    failure: Exception | None = None
    if rank == 0:
        try:
            step()
        except Exception as error:
            failure = error
    reports = _all_gather(None if failure is None else f"{type(failure).__name__}: {failure}", world)
    if failure is not None:
        raise failure
    if reports[0] is not None:
        raise RuntimeError(f"rank 0 failed to write the teacher-logit cache: {reports[0]}")


_REBUILD = (
    "rebuild the cache: `lightning-logits-cache ... --out {folder} --overwrite` "
    "(or build_teacher_cache(..., overwrite=True))"
)


def _damaged(path: Path, reason: str) -> str:
    """The message for a cache file that cannot be read: which file, what is wrong, what to do."""
    return f"teacher-logit cache file '{path}' is damaged ({reason}); " + _REBUILD.format(folder=path.parent)


def _read_cache_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(_damaged(path, f"not valid JSON: {err}")) from err
    if not isinstance(content, dict):
        raise ValueError(_damaged(path, f"holds a {type(content).__name__}, not a JSON object"))
    return content


def _read_json(path: Path) -> dict[str, Any] | None:
    return _read_cache_json(path) if path.is_file() else None


def _write_failure(path: Path, err: OSError, resumable: bool) -> OSError:
    """``err`` (of the same class) with a message naming the file, the likely cause and what to do."""
    reason = err.strerror or str(err)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = f"make '{path.parent}' and its files writable by this user, or build elsewhere (another --out)"
    elif err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        cause = "the disk is full or a file-size limit (`ulimit -f`) was reached: free space or build elsewhere"
    else:
        cause = "fix the cause"
    then = (
        "then rerun with resume=True (--resume): the rows already written are kept and not computed again"
        if resumable
        else "then run the build again (no row was stored yet)"
    )
    return type(err)(err.errno, f"could not write the teacher-logit cache file '{path}' ({reason}): {cause}, {then}")


def _write_json(path: Path, content: dict[str, Any], resumable: bool = True) -> None:
    """Write ``content`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(content, indent=2))
        os.replace(partial, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)  # what a full disk let through
        raise _write_failure(path, err, resumable) from err


def _check_resumable(out: Path, found: dict[str, Any], k: int, num_samples: int, name: str) -> None:
    """Refuse to resume a cache begun with another ``num_samples``, ``k`` or teacher."""
    stored_k = int(found["k"])
    wanted_k = min(k, int(found["num_classes"]))  # k is clipped to the class count when stored
    mismatches = [
        f"{what} {have!r} (asked: {want!r})"
        for what, have, want in (
            ("num_samples", int(found["num_samples"]), num_samples),
            ("k", stored_k, wanted_k),
            ("teacher", found.get("teacher"), name),
        )
        if have != want
    ]
    if mismatches:
        raise ValueError(
            f"cannot resume the cache at '{out}': it was begun with "
            + ", ".join(mismatches)
            + "; resume with the first build's arguments, or pass overwrite=True to start again"
        )


def _all_gather(obj: Any, world: int) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group)."""
    if world == 1:
        return [obj]
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered


def _gather_to_zero(obj: Any, rank: int, world: int) -> list[Any] | None:
    """``obj`` of every rank, in rank order, on rank 0 (``None`` on the others)."""
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, gathered, dst=0)
    return gathered


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _create_arrays(out: Path, building: dict[str, Any]) -> None:
    """Create the cache's ``.npy`` files, zero-filled (no row written), from ``building.json``'s shape."""
    num_samples, positions, k = int(building["num_samples"]), building["positions"], int(building["k"])
    index_dtype = np.int16 if int(building["num_classes"]) <= np.iinfo(np.int16).max else np.int32
    lead = (num_samples,) if positions is None else (num_samples, int(positions))
    fmt = np.lib.format
    for file, dtype, shape in (
        ("values.npy", np.float16, (*lead, k)),
        ("indices.npy", index_dtype, (*lead, k)),
        ("rest.npy", np.float32, lead),
        ("written.npy", np.bool_, (num_samples,)),
        ("checksum.npy", np.uint32, (num_samples,)),
    ):
        try:
            array = fmt.open_memmap(out / file, "w+", dtype, shape)
            array.flush()
            del array
            _allocate(out / file)
        except OSError as err:
            raise _write_failure(out / file, err, resumable=False) from err


def _allocate(path: Path) -> None:
    """Reserve the disk blocks of a (sparse) array file now.

    A memory-mapped write into a hole of a sparse file on a full disk kills the process with
    SIGBUS, no message; reserved up front, a full disk fails here with ENOSPC, before the teacher runs.
    """
    with open(path, "r+b") as file:
        try:
            os.posix_fallocate(file.fileno(), 0, os.fstat(file.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def _open_arrays(
    out: Path, mode: Literal["r", "r+"] = "r+", shapes: Mapping[str, tuple[Any, ...] | None] | None = None
) -> dict[str, np.memmap]:
    """The cache's arrays, memory-mapped; a missing, truncated or malformed file is named in the error."""
    arrays = {}
    names = ["values", "indices", "rest", "written"] + [n for n in (shapes or {}) if n == "checksum"]
    for name in names:
        path = out / f"{name}.npy"
        if not path.is_file():
            raise FileNotFoundError(_damaged(path, "missing").replace("is damaged (missing)", "is missing"))
        try:
            arrays[name] = np.load(path, mmap_mode=mode)
        except PermissionError as err:
            raise PermissionError(
                err.errno,
                f"cannot open the teacher-logit cache file '{path}' ({err.strerror}): make it readable "
                f"(and writable, to resume a build) by this user",
            ) from err
        except Exception as err:  # a bad header (numpy raises ValueError, EOFError, SyntaxError, ...), a short file
            raise ValueError(_damaged(path, f"{type(err).__name__}: {err}")) from err
        want = None if shapes is None else shapes.get(name)
        if want is not None and tuple(arrays[name].shape) != tuple(want):
            raise ValueError(_damaged(path, f"shape {tuple(arrays[name].shape)}, meta.json says {tuple(want)}"))
    if (shapes is None or None in shapes.values()) and len({int(a.shape[0]) for a in arrays.values()}) != 1:
        sizes = {n: int(a.shape[0]) for n, a in arrays.items()}
        raise ValueError(_damaged(out / "written.npy", f"the arrays disagree on the number of rows: {sizes}"))
    return arrays


def _record_labels(batch: Any, rows: np.ndarray, labels: np.ndarray) -> bool:
    """Write the batch's class labels into ``labels[rows]``; ``False`` when the batch has none."""
    try:
        target = batch_target(batch)
    except (TypeError, KeyError):
        return False
    if not isinstance(target, Tensor) or target.shape[:1] != (rows.size,):
        return False
    if target.ndim > 1:
        if not target.is_floating_point():
            return False  # per-token targets of a sequence: no single label per row to fingerprint
        target = target.argmax(dim=-1)  # soft targets: their dominant class
    labels[rows] = target.detach().to("cpu", torch.int64).numpy()
    return True


# =====================================================================================================
# Token-scale cache: variable-length documents, one flat row per token
# =====================================================================================================

TOKEN_LAYOUT = "tokens"
TOKEN_FORMAT_VERSION = 1
ValueDtype = Literal["float16", "bfloat16", "float32"]
_VALUE_DTYPES: dict[str, tuple[type[np.generic], int]] = {
    # name -> (numpy storage dtype, bytes); bfloat16 is stored as its 16 raw bits (numpy has no bfloat16)
    "float16": (np.float16, 2),
    "bfloat16": (np.int16, 2),
    "float32": (np.float32, 4),
}
_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_TOKEN_ARRAYS = ("values", "indices", "rest", "tokens", "offsets", "written")


def _index_dtype(vocab_size: int) -> type[np.generic]:
    """``uint16`` for vocabularies up to 65,536 tokens (GPT-2's, Llama 2's), ``int32`` beyond."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def token_bytes_per_token(k: int, vocab_size: int, dtype: ValueDtype = "float16") -> int:
    """Bytes a token-scale cache stores per token: ``k * (value + index) + 4 (rest) + token id``.

    Values take 2 bytes (float16, bfloat16) or 4 (float32); indices and the token id 2 bytes for a
    vocabulary of at most 65,536 tokens, 4 beyond. Each document adds 9 bytes more (its offset and
    its ``written`` flag).

    Example:
        >>> token_bytes_per_token(32, 32000), token_bytes_per_token(32, 128256, "float32")
        (134, 264)
    """
    if dtype not in _VALUE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_VALUE_DTYPES)}, got {dtype!r}")
    index = np.dtype(_index_dtype(vocab_size)).itemsize
    return k * (_VALUE_DTYPES[dtype][1] + index) + 4 + index


def _scan_documents(documents: Sequence[Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """``(lengths, token_fingerprint)`` of ``documents`` in one pass over them."""
    digest = hashlib.sha1()
    lengths = np.empty(len(documents), dtype=np.int64)
    for number in range(len(documents)):
        ids = torch.as_tensor(documents[number]).detach().to("cpu", torch.int64).reshape(-1).numpy()
        digest.update(np.ascontiguousarray(ids).tobytes())
        lengths[number] = ids.size
    digest.update(lengths.tobytes())
    fingerprint = {
        "num_documents": int(lengths.size),
        "num_tokens": int(lengths.sum()),
        "tokens_sha1": digest.hexdigest()[:16],
    }
    return lengths, fingerprint


def token_fingerprint(documents: Sequence[Tensor | Sequence[int]]) -> dict[str, Any]:
    """What a list of token documents looks like: ``num_documents``, ``num_tokens``, ``tokens_sha1``.

    ``tokens_sha1`` is the first 16 hex digits of the SHA-1 of the int64 token ids of all documents
    in order, followed by the int64 document lengths: the same documents in the same order agree,
    other documents, another order or other boundaries almost surely do not. A token-scale cache
    records it in ``meta.json`` (``data_fingerprint``).

    Example:
        >>> token_fingerprint([[1, 2], [3]]) == token_fingerprint([[1, 2], [3]])
        True
        >>> token_fingerprint([[1, 2], [3]]) == token_fingerprint([[1], [2, 3]])  # other boundaries
        False
    """
    return _scan_documents(documents)[1]


def _fingerprint_of_arrays(tokens: np.ndarray, offsets: np.ndarray) -> dict[str, Any]:
    """:func:`token_fingerprint` of the documents stored in a cache, read in chunks."""
    digest = hashlib.sha1()
    chunk = 1 << 22
    for start in range(0, tokens.shape[0], chunk):
        digest.update(np.asarray(tokens[start : start + chunk]).astype(np.int64).tobytes())
    lengths = np.diff(np.asarray(offsets)).astype(np.int64)
    digest.update(lengths.tobytes())
    return {
        "num_documents": int(lengths.size),
        "num_tokens": int(tokens.shape[0]),
        "tokens_sha1": digest.hexdigest()[:16],
    }


class TokenLogitCache:
    """Read-only access to a token-scale teacher-logit cache (variable-length documents, memory-mapped).

    **Layout** (written by :func:`build_token_cache`): one row per token of the documents laid end
    to end, ``offsets[d]:offsets[d + 1]`` being document ``d``'s rows.

    - ``values.npy`` ``[total_tokens, k]``: the teacher's ``k`` largest logits, descending (float16 by
      default; float32, or bfloat16 stored as its raw 16 bits: ``meta["dtype"]`` says which);
    - ``indices.npy`` ``[total_tokens, k]``: their token ids (uint16 up to 65,536 tokens, else int32);
    - ``rest.npy`` float32 ``[total_tokens]``: log-sum-exp of the other ``V - k`` logits;
    - ``tokens.npy`` ``[total_tokens]``: the input token ids themselves (to check a batch against);
    - ``offsets.npy`` int64 ``[num_documents + 1]``; ``written.npy`` bool ``[num_documents]``;
    - ``meta.json``: ``layout: "tokens"``, ``format``, ``k``, ``num_classes`` (the vocabulary),
      ``dtype``, ``num_documents``, ``num_tokens``, the teacher, and ``data_fingerprint``
      (:func:`token_fingerprint` of the documents).

    Bytes per token: :func:`token_bytes_per_token` (``k * 4 + 6`` with float16 values and a vocabulary
    of at most 65,536). The rows of position ``t`` of a document are the teacher's logits at ``t``
    (they predict token ``t + 1``), computed on the document alone, as the student sees it in a
    packed row with per-document ``position_ids``.

    Args:
        path: the cache directory.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> teacher = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     cache = build_token_cache(teacher, [[1, 2, 3], [4, 5]], tmp, k=3)
        ...     values, indices, rest = cache.document(1)
        ...     cache.num_tokens, cache.offsets.tolist(), tuple(values.shape)
        (5, [0, 3, 5], (2, 3))
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no teacher-logit cache at '{self.path}' (missing meta.json); build one with build_token_cache()"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("layout") != TOKEN_LAYOUT:
            raise ValueError(
                f"cache '{self.path}' has layout {self.meta.get('layout')!r}, not {TOKEN_LAYOUT!r}: open it with "
                "TeacherLogitCache (or open_teacher_cache, which opens either)"
            )
        if self.meta.get("format") != TOKEN_FORMAT_VERSION:
            raise ValueError(
                f"token cache '{self.path}' has format {self.meta.get('format')}, expected {TOKEN_FORMAT_VERSION}"
            )
        self.k = int(self.meta["k"])
        self.num_classes = int(self.meta["num_classes"])
        self.num_documents = int(self.meta["num_documents"])
        self.num_tokens = int(self.meta["num_tokens"])
        self.dtype: str = str(self.meta["dtype"])
        self.source: str = str(self.meta.get("teacher", ""))
        self.data_fingerprint: dict[str, Any] | None = self.meta.get("data_fingerprint")
        self.data: dict[str, Any] | None = self.meta.get("data")
        self.teacher_args: dict[str, Any] = dict(self.meta.get("teacher_args") or {})
        for name in _TOKEN_ARRAYS:
            setattr(self, name, np.load(self.path / f"{name}.npy", mmap_mode="r"))
        self.values: np.ndarray
        self.indices: np.ndarray
        self.rest: np.ndarray
        self.tokens: np.ndarray
        self.offsets: np.ndarray
        self.written: np.ndarray
        missing = int((~np.asarray(self.written)).sum())
        if missing:
            raise ValueError(f"token cache '{self.path}' is incomplete: {missing} documents never written; rebuild it")

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}  # memory maps are reopened in the receiving process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"])  # type: ignore[misc]

    def __len__(self) -> int:
        return self.num_documents

    def _values(self, array: np.ndarray) -> Tensor:
        """``array`` (an in-memory copy, not the read-only memory map) as a tensor of the stored dtype."""
        values = torch.from_numpy(array)
        return values.view(torch.bfloat16) if self.dtype == "bfloat16" else values

    def document(self, number: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(values [L, k], indices [L, k] int64, rest [L] float32)`` of document ``number`` (``L`` tokens)."""
        if not 0 <= number < self.num_documents:
            raise IndexError(f"document {number} out of range: the cache '{self.path}' holds {self.num_documents}")
        start, end = int(self.offsets[number]), int(self.offsets[number + 1])
        indices = torch.from_numpy(np.asarray(self.indices[start:end]).astype(np.int64))
        values = self._values(np.array(self.values[start:end]))
        return values, indices, torch.from_numpy(np.array(self.rest[start:end]))

    def _flat(self, token_index: Tensor | np.ndarray | Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """``(rows, valid)``: the flat rows to read (``-1`` -> 0) and where a row exists; range-checked."""
        index = token_index.detach().to("cpu", torch.int64) if isinstance(token_index, Tensor) else token_index
        flat = np.asarray(index, dtype=np.int64)
        valid = flat >= 0
        if flat.size and (flat.min() < -1 or flat.max() >= self.num_tokens):
            raise IndexError(
                f"token_index holds values in [{flat.min()}, {flat.max()}] but the token cache '{self.path}' has "
                f"{self.num_tokens} token rows (use -1 where there is no row): pack the same documents the cache "
                "was built on, with pack_documents(..., token_index=True)"
            )
        return np.where(valid, flat, 0), valid

    def topk(self, token_index: Tensor | np.ndarray | Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
        """The stored rows at ``token_index`` (any shape ``S``, ``-1`` where there is none).

        Returns ``(values [*S, k] in the stored dtype, indices [*S, k] int64, rest [*S] float32)``; a
        position without a row gets values 0, indices ``0..k-1`` and rest 0 (a finite, flat teacher row:
        give such positions no loss, e.g. a target of -100).
        """
        rows, valid = self._flat(token_index)
        shape = rows.shape
        rows, valid = rows.reshape(-1), valid.reshape(-1)
        values = np.asarray(self.values[rows])  # fancy indexing copies: writable, in memory
        indices = self.indices[rows].astype(np.int64)
        rest = np.asarray(self.rest[rows])
        if not valid.all():
            values[~valid] = 0
            indices[~valid] = np.arange(self.k)
            rest[~valid] = 0.0
        return (
            self._values(values).reshape(*shape, self.k),
            torch.from_numpy(indices).reshape(*shape, self.k),
            torch.from_numpy(rest).reshape(shape),
        )

    def logits(
        self, token_index: Tensor | np.ndarray | Sequence[int], device: torch.device | str | None = None
    ) -> Tensor:
        """Reconstructed float32 teacher logits ``[*S, V]`` at ``token_index`` ``S`` (e.g. ``[B, T]``).

        See :func:`reconstruct_logits`; positions without a row (``-1``) get a flat row.
        """
        values, indices, rest = self.topk(token_index)
        if device is not None:
            values, indices, rest = (t.to(device, non_blocking=True) for t in (values, indices, rest))
        return reconstruct_logits(values, indices, rest, self.num_classes)

    def check_tokens(self, token_index: Tensor | np.ndarray | Sequence[int], input_ids: Tensor) -> None:
        """Raise if the token ids of a batch differ from the cached ones at the same rows.

        Args:
            token_index: ``[B, T]`` flat rows (``-1`` where there is none).
            input_ids: ``[B, T]`` the batch's token ids (read on the host: call it on a first step only).
        """
        rows, valid = self._flat(token_index)
        ids = input_ids.detach().to("cpu", torch.int64).numpy()
        if ids.shape != rows.shape:
            raise ValueError(f"token_index has shape {rows.shape} but input_ids {ids.shape}: give one row per token")
        cached = np.asarray(self.tokens[rows[valid]]).astype(np.int64)
        wrong = np.flatnonzero(cached != ids[valid])
        if wrong.size:
            first = int(rows[valid][wrong[0]])
            raise ValueError(
                f"the batch's token ids differ from those the token cache '{self.path}' was built on at "
                f"{wrong.size} of {int(valid.sum())} positions (first: cache row {first} holds token "
                f"{int(cached[wrong[0]])}, the batch has {int(ids[valid][wrong[0]])}): the cached teacher logits "
                "belong to other text. Build the cache on the documents you pack, in the same order "
                f"(cache: {self.data_fingerprint})"
            )


def open_teacher_cache(path: str | Path) -> TeacherLogitCache | TokenLogitCache:
    """Open a teacher-logit cache of either layout: :class:`TokenLogitCache` or :class:`TeacherLogitCache`.

    ``meta.json``'s ``layout`` says which: ``"tokens"`` for the flat token layout, absent for the
    per-sample layouts (``[M, k]`` classification rows, ``[M, T, k]`` fixed-length sequences).

    Example:
        >>> open_teacher_cache("no/such/cache")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: no teacher-logit cache at 'no/such/cache' (missing meta.json); ...
    """
    meta = _read_json(Path(path) / "meta.json")
    if meta is not None and meta.get("layout") == TOKEN_LAYOUT:
        return TokenLogitCache(path)
    return TeacherLogitCache(path)


def _top_rows(logits: Tensor, mask: Tensor, k: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k values (in the storage type), their ids and the log-sum-exp of the others, on the host.

    ``logits``: float32 ``[B, L, V]``; ``mask``: ``[B, L]``, the real (not padding) positions, whose
    values must fit float16 when that is the storage.
    """
    values, top = logits.topk(k, dim=-1)
    if k < logits.shape[-1]:
        rest = logits.scatter(-1, top, float("-inf")).logsumexp(dim=-1)
    else:
        rest = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
    if dtype == "float16":
        largest = values.abs().amax(dim=-1)[mask.to(values.device).bool()].max()
        if bool(largest > torch.finfo(torch.float16).max):
            raise ValueError(
                f"teacher logits reach {largest.item():.3g}, beyond float16's range: build with "
                "dtype='bfloat16' or 'float32'"
            )
    stored = values.to(torch.bfloat16).view(torch.int16) if dtype == "bfloat16" else values.to(_TORCH_DTYPES[dtype])
    return stored.cpu().numpy(), top.cpu().numpy(), rest.cpu().numpy()


@torch.no_grad()
def build_token_cache(
    teacher: nn.Module,
    documents: Sequence[Tensor | Sequence[int]],
    path: str | Path,
    k: int = 32,
    batch_size: int = 8,
    dtype: ValueDtype = "float16",
    device: torch.device | str | None = None,
    source: str | None = None,
    overwrite: bool = False,
    resume: bool = False,
    data: dict[str, Any] | None = None,
    teacher_args: dict[str, Any] | None = None,
) -> TokenLogitCache:
    """Run a causal LM teacher over variable-length token documents; store its top-k logits per token.

    The documents are taken in order, ``batch_size`` at a time, right-padded to the longest of the
    batch (with an ``attention_mask`` for a model that takes one,
    :func:`~lightning_logits.networks.causal_lm.causal_lm_logits`); a causal teacher's logits at a
    document's tokens do not depend on the padding after them. Each document's rows are written at
    ``offsets[d]:offsets[d + 1]`` (see :class:`TokenLogitCache`). To distill from it, pack the same
    documents with :func:`~lightning_logits.data.packing.pack_documents` (``token_index=True``) and
    give ``TeacherDistillation(cache=path)`` batches carrying that ``token_index``. A document longer
    than the packed rows is cut there into pieces that the student sees alone, while the cache holds
    the teacher's logits on the whole document (more context): cut long documents to the row length
    before both steps if you want the teacher to see exactly what the student sees.

    **Every rank builds.** In an initialized ``torch.distributed`` process group (started by
    ``lightning_logits.cli.launch_teacher_cache(..., layout="tokens")``, a ``Trainer``,
    ``torchrun``), rank ``r`` of ``W`` takes the batches ``r, r + W, ...``: each batch holds the
    documents it holds in one process, so the files equal a one-process build byte for byte when
    the teacher is deterministic. Global rank 0 creates the arrays (after a first batch tells the
    vocabulary) and writes ``meta.json`` last. ``path`` must be one directory every rank sees.

    **Resume.** A build that stopped leaves ``building.json`` and the ``written`` flags per document;
    ``resume=True`` skips every batch whose documents are all written (with any number of
    processes). The same documents (by :func:`token_fingerprint`), ``k``, ``dtype`` and teacher name
    are required.

    Args:
        teacher: a causal LM: maps ``input_ids [B, L]`` to ``[B, L, V]`` logits (a tensor, or an
            output with ``.logits`` as Hugging Face models return).
        documents: a sequence (list, map-style data set) of token-id documents (1-D tensors or lists),
            each with at least one token; every rank must see the same sequence.
        path: the directory to write (created).
        k: logits kept per token (clipped to the vocabulary; ``k = V`` keeps every logit).
        batch_size: documents per teacher call.
        dtype: storage of the values: ``"float16"`` (default, as the per-sample cache; the build
            refuses logits beyond its range), ``"bfloat16"`` (float32's range, 8 bits of mantissa) or
            ``"float32"`` (exact, twice the bytes).
        device: where the teacher runs (default: where its parameters are).
        source: what built the teacher (a name or a path), recorded in ``meta.json``.
        overwrite: replace an existing cache (complete or not) at ``path``.
        resume: continue a build that stopped (see above).
        data: how to rebuild the documents, recorded in ``meta.json``.
        teacher_args: how to rebuild the teacher, recorded in ``meta.json``.

    Returns:
        The cache, opened for reading (on every rank).

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> teacher = nn.Sequential(nn.Embedding(16, 8), nn.Linear(8, 16))
        >>> docs = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     cache = build_token_cache(teacher, docs, tmp, k=16, dtype="float32")  # k = V: exact
        ...     torch.allclose(cache.logits(torch.tensor([[3, 4, -1]]))[0, :2], teacher(docs[1]), atol=1e-6)
        True
    """
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be a positive number of logits per token, got {k!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be a positive number of documents, got {batch_size!r}")
    if dtype not in _VALUE_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_VALUE_DTYPES)}, got {dtype!r}")
    if overwrite and resume:
        raise ValueError("pass overwrite=True (start again) or resume=True (continue a stopped build), not both")
    rank, world = _rank_and_world()
    out = Path(path)
    name = source or type(teacher).__name__
    lengths, fingerprint = _scan_documents(documents)
    if lengths.size == 0:
        raise ValueError("no documents to cache")
    if (lengths < 1).any():
        raise ValueError(f"document {int(np.argmin(lengths))} is empty; drop empty documents before caching")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    seen = _all_gather(fingerprint, world)
    if any(other != fingerprint for other in seen):
        raise ValueError(
            f"the ranks were given different documents ({', '.join(str(f) for f in seen)}): every rank must "
            "be given the same documents in the same order (each takes its own share of them)"
        )
    wanted = {"fingerprint": fingerprint, "k": k, "dtype": dtype, "teacher": name}

    def check_resumable(found: dict[str, Any]) -> None:
        have = {
            "fingerprint": found.get("data_fingerprint") or found.get("fingerprint"),
            "k": int(found["k"]),
            "dtype": found.get("dtype"),
            "teacher": found.get("teacher"),
        }
        asked = {**wanted, "k": min(k, int(found["num_classes"]))}
        mismatches = [f"{key} {have[key]!r} (asked: {asked[key]!r})" for key in have if have[key] != asked[key]]
        if mismatches:
            raise ValueError(
                f"cannot resume the token cache at '{out}': it was begun with "
                + ", ".join(mismatches)
                + "; resume with the first build's documents and arguments, or pass overwrite=True to start again"
            )

    building = _read_json(out / BUILDING_FILE)
    if (out / "meta.json").exists() and not overwrite:
        if not resume:
            raise FileExistsError(f"a teacher-logit cache already exists at '{out}'; pass overwrite=True to replace it")
        cache = open_teacher_cache(out)
        if not isinstance(cache, TokenLogitCache):
            raise ValueError(f"'{out}' holds a per-sample teacher-logit cache, not a token cache; pick another path")
        check_resumable(cache.meta)
        return cache
    if building is not None and not (resume or overwrite):
        raise FileExistsError(
            f"'{out}' holds a cache whose build stopped before the end ({BUILDING_FILE} without meta.json); "
            "pass resume=True to continue it or overwrite=True to start again"
        )
    if building is not None and resume:
        if building.get("layout") != TOKEN_LAYOUT:
            raise ValueError(f"'{out}' holds a stopped per-sample cache build, not a token cache; pick another path")
        check_resumable(building)
    else:
        building = None
    if device is None:
        param = next(teacher.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    teacher = teacher.to(device).eval()
    num_batches = (len(documents) + batch_size - 1) // batch_size
    mine = range(rank, num_batches, world)

    def run(number: int) -> tuple[range, Tensor, Tensor, Tensor]:
        docs = range(number * batch_size, min((number + 1) * batch_size, len(documents)))
        longest = int(lengths[docs.start : docs.stop].max())
        ids = torch.zeros(len(docs), longest, dtype=torch.long)
        mask = torch.zeros(len(docs), longest, dtype=torch.long)
        for row, d in enumerate(docs):
            ids[row, : lengths[d]] = torch.as_tensor(documents[d], dtype=torch.long).reshape(-1)
            mask[row, : lengths[d]] = 1
        logits = causal_lm_logits(teacher, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        if logits.ndim != 3 or logits.shape[:2] != ids.shape:
            raise ValueError(
                f"the teacher returned logits of shape {tuple(logits.shape)} for input_ids {tuple(ids.shape)}; "
                "a token cache needs a causal LM returning [B, L, V]"
            )
        return docs, ids, mask, logits.float()

    first: tuple[range, Tensor, Tensor, Tensor] | None = None
    if building is None:
        # The vocabulary is the teacher's: every rank runs its first batch, rank 0 creates the arrays.
        report: dict[str, Any] = {}
        failure: Exception | None = None
        if len(mine):
            try:
                first = run(mine[0])
                report["vocab"] = int(first[3].shape[-1])
            except Exception as error:  # raised on every rank below, so that no rank waits forever
                failure = error
                report["error"] = f"{type(error).__name__}: {error}"
        reports = _all_gather(report, world)
        if failure is not None:
            raise failure
        errors = [f"rank {r}: {rep['error']}" for r, rep in enumerate(reports) if "error" in rep]
        if errors:
            raise RuntimeError(f"another rank failed on its first batch ({errors[0]})")
        vocab = int(next(rep["vocab"] for rep in reports if "vocab" in rep))
        building = {
            "layout": TOKEN_LAYOUT,
            "format": TOKEN_FORMAT_VERSION,
            "num_classes": vocab,
            "k": min(k, vocab),
            "dtype": dtype,
            "teacher": name,
            "fingerprint": fingerprint,
        }
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "meta.json").unlink(missing_ok=True)
            (out / BUILDING_FILE).unlink(missing_ok=True)
            _create_token_arrays(out, building, offsets)
            _write_json(out / BUILDING_FILE, building)  # last: its presence says the arrays exist
        _barrier(world)
    vocab, k = int(building["num_classes"]), int(building["k"])
    arrays = {n: np.load(out / f"{n}.npy", mmap_mode="r+") for n in _TOKEN_ARRAYS}
    written = arrays["written"]

    def store(docs: range, ids: Tensor, mask: Tensor, logits: Tensor) -> None:
        if logits.shape[-1] != vocab:
            raise ValueError(f"the teacher returned {logits.shape[-1]} logits per token, the cache holds {vocab}")
        values, top, rest = _top_rows(logits, mask, k, dtype)  # the whole batch at once, then one copy per document
        tokens = ids.numpy()
        for row, d in enumerate(docs):
            if written[d]:
                continue  # resumed: already on disk
            length, start, end = int(lengths[d]), int(offsets[d]), int(offsets[d + 1])
            arrays["values"][start:end] = values[row, :length]
            arrays["indices"][start:end] = top[row, :length].astype(arrays["indices"].dtype)
            arrays["rest"][start:end] = rest[row, :length]
            arrays["tokens"][start:end] = tokens[row, :length].astype(arrays["tokens"].dtype)
        for d in docs:
            written[d] = True  # last: a document marked written is complete

    if first is not None:
        store(*first)
    for number in mine:
        if first is not None and number == mine[0]:
            continue
        start, stop = number * batch_size, min((number + 1) * batch_size, len(documents))
        if bool(np.asarray(written[start:stop]).all()):
            continue  # resumed: the teacher is not asked again
        store(*run(number))
    for array in arrays.values():
        array.flush()
    _barrier(world)  # every rank's rows are on disk
    if rank == 0:
        stored_fingerprint = _fingerprint_of_arrays(arrays["tokens"], arrays["offsets"])
        if stored_fingerprint != fingerprint:  # pragma: no cover - a rank saw other documents
            raise RuntimeError(
                f"the token ids written to '{out}' ({stored_fingerprint}) are not the documents given "
                f"({fingerprint}): every rank must be given the same documents in the same order"
            )
        meta = {
            "layout": TOKEN_LAYOUT,
            "format": TOKEN_FORMAT_VERSION,
            "num_documents": int(lengths.size),
            "num_tokens": int(offsets[-1]),
            "num_classes": vocab,
            "k": k,
            "dtype": dtype,
            "teacher": name,
            "data_fingerprint": fingerprint,
            "data": data,
            "teacher_args": teacher_args,
            "bytes_per_token": token_bytes_per_token(k, vocab, dtype),
            "reconstruction": "non-top-k columns = rest - log(V - k) (keeps their softmax mass at T=1)",
        }
        _write_json(out / "meta.json", meta)  # last: its presence marks a complete cache
        (out / BUILDING_FILE).unlink(missing_ok=True)
    _barrier(world)
    return TokenLogitCache(out)


def _create_token_arrays(out: Path, building: dict[str, Any], offsets: np.ndarray) -> None:
    """Create a token cache's ``.npy`` files (zero-filled, nothing written) and its offsets."""
    total, num_documents, k = int(offsets[-1]), offsets.size - 1, int(building["k"])
    index_dtype = _index_dtype(int(building["num_classes"]))
    fmt = np.lib.format
    for file, dtype, shape in (
        ("values.npy", _VALUE_DTYPES[building["dtype"]][0], (total, k)),
        ("indices.npy", index_dtype, (total, k)),
        ("rest.npy", np.float32, (total,)),
        ("tokens.npy", index_dtype, (total,)),
        ("offsets.npy", np.int64, (num_documents + 1,)),
        ("written.npy", np.bool_, (num_documents,)),
    ):
        array = fmt.open_memmap(out / file, "w+", dtype, shape)
        if file == "offsets.npy":
            array[:] = offsets
        array.flush()
        del array

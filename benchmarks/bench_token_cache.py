"""Token-scale teacher-logit cache: bytes per token and read throughput: ``python -m benchmarks.bench_token_cache``.

**Bytes per token.** For each ``k`` (default 8, 32, 64), :func:`~lightning_logits.teacher_cache.build_token_cache`
runs a cheap causal teacher (an embedding and a linear head over a vocabulary of ``--vocab``
tokens, random weights) over ``--size-tokens`` tokens of variable-length documents, and the cache
directory's files are measured on disk: their sum divided by the token count, beside the formula
``k * (value bytes + index bytes) + 4 (rest, float32) + token-id bytes`` (float16 values, uint16
indices and token ids up to 65,536 tokens of vocabulary; each document adds 9 bytes: its int64
offset and its ``written`` flag, and each ``.npy`` file a 128-byte header).

**Read throughput.** For each ``k``, a cache of ``--read-tokens`` tokens (same layout, random rows:
reading does not depend on the values) is read back the way ``TeacherDistillation`` reads it:
:meth:`~lightning_logits.teacher_cache.TokenLogitCache.topk` at the ``token_index [B, T]`` of
packed batches (``pack_documents(..., token_index=True)``, rows of ``--length`` tokens, ``--batch``
rows per batch), in packing order (``sequential``: consecutive file regions) and with the packed
rows shuffled (``random``: ``B`` scattered regions per batch, what a shuffling loader does). The
baseline, measured in the same run, is the same random batches gathered from arrays held in
memory (``np.load`` without memory-mapping). Tokens/s counts the non-padding positions. The files
were just written, so they are in the page cache: this is the memory-mapped gather's speed, not a
cold disk's.

``--smoke`` runs tiny sizes to check the code runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_logits.data.packing import pack_documents
from lightning_logits.teacher_cache import (
    TOKEN_FORMAT_VERSION,
    TOKEN_LAYOUT,
    TokenLogitCache,
    _create_token_arrays,
    _fingerprint_of_arrays,
    _write_json,
    build_token_cache,
    token_bytes_per_token,
)


class CheapTeacher(nn.Module):
    """Per-token logits ``[B, L, V]`` from an embedding and a linear head (causal: no mixing across tokens)."""

    def __init__(self, vocab: int, hidden: int = 16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(vocab, hidden), nn.Linear(hidden, vocab)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.embed(input_ids)) * 4


def document_lengths(total: int, low: int, high: int, seed: int = 0) -> list[int]:
    """Log-uniform document lengths in ``[low, high]`` summing to ``total`` (the last one cut)."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    while sum(lengths) < total:
        lengths.append(int(np.exp(rng.uniform(np.log(low), np.log(high)))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def directory_bytes(path: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(path.iterdir())}


def measure_size(k: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    docs = [torch.from_numpy(rng.integers(0, args.vocab, n)) for n in document_lengths(args.size_tokens, 16, 512)]
    start = time.perf_counter()
    cache = build_token_cache(CheapTeacher(args.vocab), docs, out, k=k, batch_size=4)
    seconds = time.perf_counter() - start
    files = directory_bytes(out)
    arrays = sum(size for name, size in files.items() if name.endswith(".npy"))
    return {
        "k": k,
        "tokens": cache.num_tokens,
        "documents": cache.num_documents,
        "formula": token_bytes_per_token(k, args.vocab),
        "measured": arrays / cache.num_tokens,
        "files": files,
        "build_tokens_per_s": cache.num_tokens / seconds,
    }


def synthetic_cache(out: Path, k: int, lengths: Sequence[int], vocab: int) -> TokenLogitCache:
    """A complete token cache of random rows in the layout ``build_token_cache`` writes (no teacher run)."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    building = {"layout": TOKEN_LAYOUT, "num_classes": vocab, "k": k, "dtype": "float16"}
    out.mkdir(parents=True)
    _create_token_arrays(out, building, offsets)
    rng = np.random.default_rng(2)
    arrays = {name: np.load(out / f"{name}.npy", mmap_mode="r+") for name in ("values", "indices", "rest", "tokens")}
    chunk = 1 << 18
    for start in range(0, int(offsets[-1]), chunk):
        end = min(start + chunk, int(offsets[-1]))
        arrays["values"][start:end] = -np.sort(-rng.standard_normal((end - start, k)).astype(np.float16), axis=1)
        arrays["indices"][start:end] = rng.integers(0, vocab, (end - start, k))
        arrays["rest"][start:end] = rng.standard_normal(end - start)
        arrays["tokens"][start:end] = rng.integers(0, vocab, end - start)
    written = np.load(out / "written.npy", mmap_mode="r+")
    written[:] = True
    for array in (*arrays.values(), written):
        array.flush()
    meta = {
        "layout": TOKEN_LAYOUT,
        "format": TOKEN_FORMAT_VERSION,
        "num_documents": len(lengths),
        "num_tokens": int(offsets[-1]),
        "num_classes": vocab,
        "k": k,
        "dtype": "float16",
        "teacher": "synthetic",
        "data_fingerprint": _fingerprint_of_arrays(arrays["tokens"], offsets),
    }
    _write_json(out / "meta.json", meta)
    return TokenLogitCache(out)


def _batches(token_index: Tensor, batch: int, order: np.ndarray) -> list[Tensor]:
    rows = token_index[torch.from_numpy(order)]
    return [rows[i : i + batch] for i in range(0, rows.shape[0] - batch + 1, batch)]


def _tokens_per_s(read: Any, batches: list[Tensor], rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        tokens, start = 0, time.perf_counter()
        for index in batches:
            read(index)
            tokens += int((index >= 0).sum())
        best = max(best, tokens / (time.perf_counter() - start))
    return best


def measure_reads(k: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    lengths = document_lengths(args.read_tokens, 16, 4 * args.length)
    cache = synthetic_cache(out, k, lengths, args.vocab)
    token_index = pack_documents([torch.zeros(n, dtype=torch.long) for n in lengths], args.length, token_index=True)[
        "token_index"
    ]
    rows = token_index.shape[0]
    sequential = _batches(token_index, args.batch, np.arange(rows))[: args.max_batches]
    random = _batches(token_index, args.batch, np.random.default_rng(3).permutation(rows))[: args.max_batches]
    in_memory = {name: np.load(out / f"{name}.npy") for name in ("values", "indices", "rest")}

    def from_memory(index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        flat = index.reshape(-1).numpy()
        rows_ = np.where(flat >= 0, flat, 0)
        values = torch.from_numpy(in_memory["values"][rows_])
        indices = torch.from_numpy(in_memory["indices"][rows_].astype(np.int64))
        return values, indices, torch.from_numpy(in_memory["rest"][rows_])

    result = {
        "k": k,
        "tokens": cache.num_tokens,
        "file_mb": sum(directory_bytes(out).values()) / 2**20,
        "sequential": _tokens_per_s(cache.topk, sequential, args.rounds),
        "random": _tokens_per_s(cache.topk, random, args.rounds),
        "in_memory_random": _tokens_per_s(from_memory, random, args.rounds),
        "batches": len(random),
    }
    in_memory.clear()
    del cache
    shutil.rmtree(out)
    return result


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--size-tokens", type=int, default=20_000, help="tokens of the built caches (file sizes)")
    parser.add_argument("--read-tokens", type=int, default=2_000_000, help="tokens of the caches read back")
    parser.add_argument("--length", type=int, default=2048, help="tokens per packed row")
    parser.add_argument("--batch", type=int, default=8, help="packed rows per batch")
    parser.add_argument("--max-batches", type=int, default=100, help="batches read per pattern")
    parser.add_argument("--rounds", type=int, default=3, help="passes per pattern (the best is reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (reads are single-threaded numpy)")
    parser.add_argument("--out", type=Path, help="write the tables here (e.g. benchmarks/results/token_cache.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the code runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.vocab, args.size_tokens, args.read_tokens, args.length = 1000, 600, 6000, 64
        args.batch, args.max_batches, args.rounds = 4, 5, 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        sizes = [measure_size(k, args, Path(tmp) / f"size_k{k}") for k in args.k]
        reads = [measure_reads(k, args, Path(tmp) / f"read_k{k}") for k in args.k]
    lines = [
        f"Vocabulary {args.vocab}, float16 values, {sizes[0]['tokens']} tokens in {sizes[0]['documents']} documents "
        f"(bytes); reads: {reads[0]['tokens']} tokens, packed rows of {args.length}, {args.batch} rows per batch, "
        f"{reads[0]['batches']} batches per pattern, best of {args.rounds}, {args.threads} thread(s), "
        f"{os.cpu_count()} cores.",
        "",
        "| k | formula B/token | measured B/token (all .npy files) | values | indices | rest | tokens "
        "| offsets+written |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sizes:
        f, n = row["files"], row["tokens"]
        lines.append(
            f"| {row['k']} | {row['formula']} | {row['measured']:.2f} | {f['values.npy'] / n:.2f} "
            f"| {f['indices.npy'] / n:.2f} | {f['rest.npy'] / n:.2f} | {f['tokens.npy'] / n:.2f} "
            f"| {(f['offsets.npy'] + f['written.npy']) / n:.3f} |"
        )
    lines += [
        "",
        "| k | cache MiB | sequential tokens/s | random tokens/s | in-memory random tokens/s (baseline) "
        "| random / in-memory |",
        "|---|---|---|---|---|---|",
    ]
    for row in reads:
        lines.append(
            f"| {row['k']} | {row['file_mb']:.0f} | {row['sequential']:.3g} | {row['random']:.3g} "
            f"| {row['in_memory_random']:.3g} | {row['random'] / row['in_memory_random']:.2f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return table


if __name__ == "__main__":
    main()

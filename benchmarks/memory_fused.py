"""Peak memory and time of the fused head + distillation loss vs fused CE and today's chunked KD (CPU).

``python -m benchmarks.memory_fused [--tokens 4096 --hidden 512 --vocab 32000 --rounds 1 --repeats 3]``

Every case computes a loss from the student's last hidden states ``h: [N, H]`` (float32,
``requires_grad``) and an LM head weight ``W: [V, H]`` (``requires_grad``), with targets of which
10% are ``-100``, and runs its backward pass:

- ``fused_ce``: :func:`~lightning_logits.functional.fused_linear_cross_entropy` (our chunked
  linear cross-entropy, the floor the distillation loss is compared with);
- ``fused_kd``: :func:`~lightning_logits.functional.fused_distillation_loss`, CE + forward KL at
  ``T = 1`` from full teacher logits ``[N, V]``; ``fused_kd_t2`` the same at ``T = 2`` (one more
  buffer per chunk); ``fused_kd_topk`` at ``T = 1`` from a top-32 teacher (float16 values, int16
  indices, float32 rest, as the cache stores them);
- ``chunked_kd``: today's path: ``z = F.linear(h, W)`` for all tokens, then ``F.cross_entropy``
  and ``kd_loss(..., chunk_size=1024)``;
- ``linear_ce``: ``F.linear`` + ``F.cross_entropy`` (unfused cross-entropy alone, for scale).

Each case runs in a fresh subprocess on one thread: it builds its inputs (the teacher's logits are
an input, as an online teacher's output or the cache's rows are), resets the peak resident set
(``/proc/self/clear_refs``) and reports the growth of the peak above the inputs during the first
forward + backward (the memory the loss needs, ``W``'s and ``h``'s gradients included), then times
``--repeats`` more iterations. ``--rounds`` repeats the whole set of processes, interleaved, and
the table gives the median time. The targets (issue 27): ``fused_kd`` peak <= 1.2x ``fused_ce``
and <= 0.5x ``chunked_kd``; time <= 1.3x ``chunked_kd``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import _peak_resident_mb, _reset_peak_resident, _resident_mb, run_child
from lightning_logits.functional import fused_distillation_loss, fused_linear_cross_entropy, kd_loss

CASES = ["fused_ce", "fused_kd", "fused_kd_t2", "fused_kd_topk", "chunked_kd", "linear_ce"]
TOP_K = 32
KD_CHUNK = 1024  # today's chunked KD, positions per chunk


def _loss(
    case: str, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, teacher: Any, chunk: int | None
) -> torch.Tensor:
    if case == "fused_ce":
        return fused_linear_cross_entropy(h, w, y, chunk_size=chunk, validate_args=False)
    if case in ("fused_kd", "fused_kd_t2"):
        temperature = 2.0 if case == "fused_kd_t2" else 1.0
        return fused_distillation_loss(h, w, y, teacher, temperature=temperature, chunk_size=chunk, validate_args=False)
    if case == "fused_kd_topk":
        return fused_distillation_loss(h, w, y, teacher_topk=teacher, chunk_size=chunk, validate_args=False)
    z = F.linear(h, w)
    ce = F.cross_entropy(z, y, ignore_index=-100)
    if case == "linear_ce":
        return ce
    return ce + kd_loss(z, teacher, 1.0, target=y, chunk_size=KD_CHUNK, validate_args=False)


def measure(case: str, tokens: int, hidden: int, vocab: int, chunk: int | None, repeats: int) -> dict[str, Any]:
    """Run one case in this process: its memory in MiB and its times in seconds."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_(True)
    y = torch.randint(0, vocab, (tokens,))
    y[torch.rand(tokens) < 0.1] = -100
    teacher: Any = None
    if case not in ("fused_ce", "linear_ce"):
        full = torch.randn(tokens, vocab) * 2
        if case == "fused_kd_topk":
            values, indices = full.topk(TOP_K, dim=1)
            rest = full.scatter(1, indices, float("-inf")).logsumexp(dim=1)
            teacher = (values.half(), indices.to(torch.int16 if vocab <= 32767 else torch.int32), rest)
            del full, values, indices
        else:
            teacher = full
    inputs_mb = _resident_mb()
    _reset_peak_resident()
    start = time.perf_counter()
    _loss(case, h, w, y, teacher, chunk).backward()
    first_s = time.perf_counter() - start
    peak = _peak_resident_mb()
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        start = time.perf_counter()
        _loss(case, h, w, y, teacher, chunk).backward()
        times.append(time.perf_counter() - start)
    return {
        "case": case,
        "loss_mb": peak - inputs_mb,
        "peak_mb": peak,
        "inputs_mb": inputs_mb,
        "times": times or [first_s],
    }


def _run_child(case: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory_fused", "--child", case, "--repeats", str(args.repeats)]
    cmd += ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
    if args.chunk is not None:
        cmd += ["--chunk", str(args.chunk)]
    return run_child(cmd, case)


def format_table(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown table: memory above the inputs and median time, with the ratios the issue targets."""
    from lightning_logits.functional import default_chunk_size

    chunk = args.chunk if args.chunk is not None else default_chunk_size(args.tokens, args.hidden, args.vocab)
    logits_mb = args.tokens * args.vocab * 4 / 2**20
    lines = [
        f"### memory: fused distillation (N={args.tokens} tokens, H={args.hidden}, V={args.vocab}; "
        f"float32 logits would be {logits_mb:.0f} MiB; fused chunk = {chunk} tokens, chunked KD = {KD_CHUNK})",
        "",
        "| case | peak above inputs (MiB) | / fused_ce | / chunked_kd | median time (s) | time / chunked_kd |",
        "|---|---:|---:|---:|---:|---:|",
    ]

    def ratio(a: dict[str, Any], key: str, base: str) -> str:
        if base not in rows or rows[base][key] <= 0:
            return "n/a"
        return f"{a[key] / rows[base][key]:.2f}"

    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['loss_mb']:.0f} | {ratio(r, 'loss_mb', 'fused_ce')} | {ratio(r, 'loss_mb', 'chunked_kd')} "
            f"| {r['time_s']:.2f} | {ratio(r, 'time_s', 'chunked_kd')} |"
        )
    lines.append("")
    lines.append("Targets: fused_kd peak <= 1.2x fused_ce and <= 0.5x chunked_kd; time <= 1.3x chunked_kd.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=None, help="fused chunk size (default: default_chunk_size)")
    parser.add_argument("--rounds", type=int, default=1, help="processes per case, interleaved")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per process after the first")
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = measure(args.child, args.tokens, args.hidden, args.vocab, args.chunk, args.repeats)
        print("RESULT " + json.dumps(result))
        return
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in args.cases}
    for _ in range(args.rounds):
        for case in args.cases:
            runs[case].append(_run_child(case, args))
    rows = {
        case: {
            "loss_mb": statistics.median(r["loss_mb"] for r in results),
            "time_s": statistics.median(t for r in results for t in r["times"]),
        }
        for case, results in runs.items()
    }
    print(format_table(rows, args))


if __name__ == "__main__":
    main()

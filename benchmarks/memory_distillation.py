"""Peak memory of a distillation loss vs plain cross-entropy on language-model-sized logits (CPU).

``python -m benchmarks.memory_distillation [--batch 8 --seq 512 --vocab 32000 --chunk 1024]``

Each case runs in a fresh subprocess: it creates the inputs (student logits ``[B, T, V]`` float32
with ``requires_grad``, the targets with 10% of positions set to ``-100``, and for distillation the
teacher logits), resets the peak resident set (``/proc/self/clear_refs``), computes the loss and
its backward pass, and reports the growth of the peak resident set above the inputs
(``VmHWM - VmRSS`` before the loss): the memory the loss itself needs. The issue's target is
chunked KD <= 1.3x cross-entropy. The teacher logits are an input here (an online teacher or the
top-k cache rebuilds them once per step either way); the table also gives the absolute peaks.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.harness import _peak_resident_mb, _reset_peak_resident, _resident_mb, run_child
from lightning_logits.functional.distillation import DEFAULT_TEMPERATURE, DISTILLATION_LOSSES

CASES = ["ce", "kd", "kd_chunked", "nkd_chunked", "dkd_chunked", "dhkd_chunked"]
# the token-level divergences (issue 27): each unchunked and chunked
TOKEN_LOSSES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"]
CASES += [case for name in TOKEN_LOSSES for case in (name, f"{name}_chunked")]


def measure(case: str, batch: int, seq: int, vocab: int, chunk: int) -> dict[str, Any]:
    """Run one case in this process and return its memory numbers in MiB."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    logits = torch.randn(batch, seq, vocab, requires_grad=True)
    target = torch.randint(0, vocab, (batch, seq))
    target[torch.rand(batch, seq) < 0.1] = -100
    teacher = torch.randn(batch, seq, vocab) if case != "ce" else None
    inputs_mb = _resident_mb()
    _reset_peak_resident()
    if case == "ce":
        loss = F.cross_entropy(logits.view(-1, vocab), target.view(-1), ignore_index=-100)
    else:
        name = case.removesuffix("_chunked")
        loss = DISTILLATION_LOSSES[name](
            logits,
            teacher,
            target=target,
            temperature=DEFAULT_TEMPERATURE[name],
            chunk_size=chunk if case.endswith("_chunked") else None,
            validate_args=False,
        )
    loss.backward()
    peak = _peak_resident_mb()
    return {"case": case, "loss_mb": peak - inputs_mb, "peak_mb": peak, "inputs_mb": inputs_mb}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=1024, help="positions per chunk")
    parser.add_argument("--cases", nargs="*", default=CASES, choices=CASES)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.batch, args.seq, args.vocab, args.chunk)))
        return
    rows = []
    for case in args.cases:
        cmd = [sys.executable, "-m", "benchmarks.memory_distillation", "--child", case]
        cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab)]
        cmd += ["--chunk", str(args.chunk)]
        rows.append(run_child(cmd, case))
    ce = next((r["loss_mb"] for r in rows if r["case"] == "ce"), None)
    size_mb = args.batch * args.seq * args.vocab * 4 / 2**20
    print(
        f"logits [{args.batch}, {args.seq}, {args.vocab}] float32 = {size_mb:.0f} MiB; chunk = {args.chunk} positions"
    )
    print("| case | loss peak above inputs (MiB) | ratio to CE | absolute peak RSS (MiB) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        ratio = f"{r['loss_mb'] / ce:.2f}" if ce else "n/a"
        print(f"| {r['case']} | {r['loss_mb']:.0f} | {ratio} | {r['peak_mb']:.0f} |")


if __name__ == "__main__":
    main()

"""Build time of the teacher-logit cache with 1 and with N processes: ``python -m benchmarks.bench_cache``.

Each build runs in processes started by Lightning Fabric (``ddp_spawn``, ``accelerator="cpu"``;
Lightning gives each of N processes ``cores // N`` threads, ``--threads`` fixes the count), over
the digits training split upsampled to ``--image-size`` and repeated ``--repeat`` times, with a
timm teacher (random weights, the same in every process). Two times per build: ``build`` from a barrier before
:func:`~lightning_logits.teacher_cache.build_teacher_cache` to its return on the slowest rank
(what more processes can speed up), and ``wall`` for the whole launch (process start, imports,
teacher and data set-up included). Every N-process cache is checked byte for byte against the
1-process one. The ratio column is ``build(1) / build(N)``, measured in the same run.

``--smoke`` runs a tiny teacher on 96 samples, to check the code runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric import Fabric
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from lightning_logits.data.digits import DigitsDataModule
from lightning_logits.networks.factory import build_model
from lightning_logits.parallel import end_process_group
from lightning_logits.teacher_cache import build_teacher_cache

CACHE_FILES = ("values.npy", "indices.npy", "rest.npy", "written.npy", "meta.json")


class _Renumbered(Dataset[Any]):
    """Copy ``copy`` of a ``(x, y, index)`` data set, with indices shifted past the earlier copies."""

    def __init__(self, dataset: Any, copy: int) -> None:
        self.dataset, self.offset = dataset, copy * len(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        x, y, index = self.dataset[i]
        return x, y, int(index) + self.offset


def _data(image_size: int, repeat: int, smoke: bool) -> Dataset[Any]:
    digits = DigitsDataModule(return_index=True, image_size=image_size, train_fraction=0.15 if smoke else 1.0)
    digits.setup("fit")
    train = digits.dataset("train")
    return ConcatDataset([_Renumbered(train, copy) for copy in range(repeat)])


def _teacher(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, in_chans=1)


def _build(fabric: Fabric, args: argparse.Namespace, out: str) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher, dataset = _teacher(args.teacher), _data(args.image_size, args.repeat, args.smoke)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False)
    fabric.barrier()
    start = time.perf_counter()
    build_teacher_cache(teacher, loader, out, k=args.k, source=args.teacher, device=fabric.device)
    mine = time.perf_counter() - start
    slowest = max(fabric.all_gather(torch.tensor(mine)).reshape(-1).tolist())
    threads = torch.get_num_threads()
    end_process_group()
    return {"build_s": slowest, "threads": threads, "samples": len(dataset)}


def _run(processes: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    start = time.perf_counter()
    fabric = Fabric(accelerator="cpu", devices=processes, strategy="ddp_spawn")
    result = fabric.launch(_build, args, str(out))
    result["wall_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts (first: baseline)")
    parser.add_argument("--teacher", default="resnet18", help="timm model name")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=2, help="copies of the digits training split")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="builds per process count (median reported)")
    parser.add_argument(
        "--threads", type=int, help="threads per process (default: Lightning's choice, cores // processes)"
    )
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.teacher, args.image_size, args.repeat, args.rounds, args.batch_size = "resnet10t", 8, 1, 1, 16

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            runs = []
            for round_ in range(args.rounds):
                port = _free_port()
                os.environ["MASTER_PORT"] = str(port)
                runs.append(_run(processes, args, Path(tmp) / f"p{processes}_r{round_}"))
            reference, built = Path(tmp) / f"p{args.processes[0]}_r0", Path(tmp) / f"p{processes}_r0"
            same = all((reference / f).read_bytes() == (built / f).read_bytes() for f in CACHE_FILES)
            if not same:
                raise SystemExit(f"the {processes}-process cache differs from the {args.processes[0]}-process one")
            rows.append(
                {
                    "processes": processes,
                    "threads": runs[0]["threads"],
                    "samples": runs[0]["samples"],
                    "build_s": statistics.median(r["build_s"] for r in runs),
                    "wall_s": statistics.median(r["wall_s"] for r in runs),
                    "identical": same,
                }
            )
    base = rows[0]["build_s"]
    print(f"teacher {args.teacher} at {args.image_size}x{args.image_size}, {rows[0]['samples']} samples, ", end="")
    print(f"batch {args.batch_size}, k {args.k}, median of {args.rounds} builds, {os.cpu_count()} cores")
    print("| processes | threads each | build s | wall s | build(1) / build(N) | bytes equal 1-process |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        row["ratio"] = base / row["build_s"]
        print(
            f"| {row['processes']} | {row['threads']} | {row['build_s']:.2f} | {row['wall_s']:.1f} "
            f"| {row['ratio']:.2f} | {'yes' if row['identical'] else 'no'} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2))


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()

"""Floor suite: our online ER against the same ER written as a plain PyTorch loop, and UER against ER.

The floor (``loop_er``, the baseline): an MLP 64-256-256-10 trained online on random 64-d inputs
(10 classes), batch 10, SGD lr 0.1, with experience replay from a reservoir of 200 samples:
each step draws a replay batch of 10 distinct stored samples, runs it in a second forward pass,
minimizes ``CE(incoming) + CE(replayed)``, and offers the incoming batch to the reservoir
(Vitter's algorithm R). No Lightning, no checks, no logging: a hand-written ``for`` loop over a
``DataLoader``. ``classifier+er`` is the same model, data, optimizer and method as
:class:`~lightning_logits.modules.Classifier` + :class:`~lightning_logits.callbacks.ExperienceReplay`
in a ``Trainer``; ``classifier+uer`` swaps in :class:`~lightning_logits.callbacks.UER`.
``loop_uer`` is UER in the same hand-written loop (cosine logits at temperature 0.09 for the
incoming batch, plain cross-entropy for the replayed one): its extra time over ``loop_er`` is what
the method itself costs, to set against ``classifier+uer`` over ``classifier+er``.
``lightning_er`` is the loop's ER written as the smallest ``LightningModule`` (no code of ours,
nothing logged): Lightning's own cost per iteration, so ``classifier+er`` / ``lightning_er`` is what
the library adds. ``resnet18_er`` / ``resnet18_uer``: the same pair on timm resnet18 (digits-like 1x32x32 random
inputs; smoke: resnet10t at 16x16).

Every case is timed over whole loop iterations (data loading and all of the framework's own
work included; set-up excluded), on one CPU thread, in the same run. Targets: ``classifier+er``
at most 1/0.85 = 1.18x the loop's iteration time (a throughput of at least 0.85x the loop's) and
at most 1.10x ``lightning_er``'s (printed under the table); UER at most 1.05x ER. On a machine
shared with other jobs, ``--clock cpu`` times the training thread's CPU time instead of wall time.

    python -m benchmarks.speed --suite floor [--smoke] [--compile] [--clock cpu]
"""

from __future__ import annotations

import random
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.harness import OneThread, SpeedCase, clock
from lightning_logits.callbacks.replay import UER, ExperienceReplay
from lightning_logits.modules.classifier import Classifier

BATCH, REPLAY, BUFFER, LR = 10, 10, 200, 0.1
UER_TEMPERATURE = 0.09
THROUGHPUT_TARGET = 0.85
LIGHTNING_TARGET = 1.10  # classifier+er over lightning_er: what the library adds to Lightning's own step


def mlp() -> nn.Module:
    """MLP 64-256-256-10 with a linear ``fc`` head."""
    net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
    return nn.Sequential(net, nn.Linear(256, 10))


def _stream(samples: int, shape: tuple[int, ...], seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(samples, *shape, generator=g), torch.randint(0, 10, (samples,), generator=g))


class StreamData(pl.LightningDataModule):
    """An online stream of random inputs (no shuffling, one pass), batch 10."""

    def __init__(self, shape: tuple[int, ...], samples: int = 20_000) -> None:
        super().__init__()
        self.shape, self.samples = shape, samples

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(_stream(self.samples, self.shape), batch_size=BATCH, shuffle=False)


class Reservoir:
    """A plain reservoir buffer (algorithm R) with uniform sampling without replacement."""

    def __init__(self, capacity: int, shape: tuple[int, ...], device: torch.device, seed: int = 0) -> None:
        self.inputs = torch.empty(capacity, *shape, device=device)
        self.labels = torch.empty(capacity, dtype=torch.int64, device=device)
        self.capacity, self.seen, self.rng = capacity, 0, random.Random(seed)

    def add(self, x: Tensor, y: Tensor) -> None:
        slots, rows = [], []
        for row in range(x.shape[0]):
            slot = self.seen if self.seen < self.capacity else self.rng.randrange(self.seen + 1)
            self.seen += 1
            if slot < self.capacity:
                slots.append(slot)
                rows.append(row)
        if slots:
            index, take = torch.tensor(slots, device=x.device), torch.tensor(rows, device=x.device)
            self.inputs.index_copy_(0, index, x.index_select(0, take))
            self.labels.index_copy_(0, index, y.index_select(0, take))

    def sample(self, k: int) -> tuple[Tensor, Tensor] | None:
        filled = min(self.seen, self.capacity)
        if filled == 0:
            return None
        index = torch.tensor(self.rng.sample(range(filled), min(k, filled)), device=self.inputs.device)
        return self.inputs.index_select(0, index), self.labels.index_select(0, index)


def plain_loop(make_net: Any, shape: tuple[int, ...], method: Literal["er", "uer"] = "er") -> Any:
    """``run(steps, warmup, accelerator, compile)``: ER or UER as a hand-written loop; per-iteration times.

    ``method="uer"``: the incoming batch's loss is the cross-entropy of its cosine logits at
    temperature 0.09 (``F.normalize`` on the features and on the head's weight; ``make_net`` must
    return ``nn.Sequential(body, head)``), the replayed batch's is the plain cross-entropy: the least
    a user's own loop would compute for UER, so ``loop_uer`` minus ``loop_er`` is the method's own cost.
    """

    def run(steps: int, warmup: int, accelerator: str, compiled: bool) -> list[float]:
        use_cuda = torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda")
        device = torch.device("cuda" if use_cuda else "cpu")
        threads = torch.get_num_threads()
        if device.type == "cpu":
            torch.set_num_threads(1)
        try:
            net = make_net().to(device)
            model = torch.compile(net) if compiled else net
            if method == "uer":  # only UER needs the head's input: ER runs any network
                body, head = net[0], net[-1]
                if compiled:
                    body = torch.compile(body)
            optimizer = torch.optim.SGD(net.parameters(), lr=LR)
            buffer = Reservoir(BUFFER, shape, device)
            loader = DataLoader(_stream(20_000, shape), batch_size=BATCH, shuffle=False)
            times: list[float] = []
            start = clock()
            for i, (x, y) in enumerate(loader):
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if method == "uer":
                    cosine = F.normalize(body(x), dim=1) @ F.normalize(head.weight, dim=1).T
                    loss = F.cross_entropy(cosine / UER_TEMPERATURE, y)
                else:
                    loss = F.cross_entropy(model(x), y)
                replay = buffer.sample(REPLAY)
                if replay is not None:
                    loss = loss + F.cross_entropy(model(replay[0]), replay[1])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                buffer.add(x, y)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = clock()
                if i >= warmup:
                    times.append(now - start)
                start = now
                if len(times) >= steps:
                    break
            return times
        finally:
            torch.set_num_threads(threads)

    return run


class HandWrittenER(pl.LightningModule):
    """The plain loop's ER as the smallest ``LightningModule`` (no lightning_logits code, nothing logged).

    Lightning's own per-step cost: ``classifier+er`` over this case is what the library adds on top.
    """

    def __init__(self, make_net: Any, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.net = make_net()
        self.shape = shape
        self.buffer: Reservoir | None = None

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        if self.buffer is None:
            self.buffer = Reservoir(BUFFER, self.shape, x.device)
        loss = F.cross_entropy(self.net(x), y)
        replay = self.buffer.sample(REPLAY)
        if replay is not None:
            loss = loss + F.cross_entropy(self.net(replay[0]), replay[1])
        self.buffer.add(x, y)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def speed_cases(smoke: bool) -> list[SpeedCase]:
    def mlp_module() -> Classifier:
        return Classifier(mlp(), num_classes=10, optimizer=lambda p: torch.optim.SGD(p, lr=LR))

    def resnet_module() -> Classifier:
        name = "resnet10t" if smoke else "resnet18"
        return Classifier(name, num_classes=10, in_chans=1, optimizer=lambda p: torch.optim.SGD(p, lr=LR))

    image = (1, 16, 16) if smoke else (1, 32, 32)

    def er() -> list[Callback]:
        return [ExperienceReplay(BUFFER, replay_batch_size=REPLAY), OneThread()]

    def uer() -> list[Callback]:
        return [UER(BUFFER, replay_batch_size=REPLAY), OneThread()]

    def vectors() -> StreamData:
        return StreamData((64,))

    def images() -> StreamData:
        return StreamData(image, samples=2_000)

    return [
        SpeedCase("loop_er", mlp_module, vectors, run=plain_loop(mlp, (64,))),
        SpeedCase("loop_uer", mlp_module, vectors, run=plain_loop(mlp, (64,), "uer"), baseline="loop_er"),
        SpeedCase(
            "lightning_er",
            lambda: HandWrittenER(mlp, (64,)),
            vectors,
            lambda: [OneThread()],
            baseline="loop_er",
            full_iteration=True,
        ),
        SpeedCase(
            "classifier+er",
            mlp_module,
            vectors,
            er,
            baseline="loop_er",
            target=round(1 / THROUGHPUT_TARGET, 2),
            full_iteration=True,
            also_against="lightning_er",
            also_target=LIGHTNING_TARGET,
        ),
        SpeedCase(
            "classifier+uer", mlp_module, vectors, uer, baseline="classifier+er", target=1.05, full_iteration=True
        ),
        SpeedCase("resnet18_er", resnet_module, images, er, full_iteration=True),
        SpeedCase("resnet18_uer", resnet_module, images, uer, baseline="resnet18_er", target=1.05, full_iteration=True),
    ]

"""Count host-side reads of tensor values (what forces a host-device sync on a GPU) per training step.

:class:`HostReadCounter` wraps ``Tensor.item``, ``__bool__``, ``__int__``, ``__float__``,
``tolist`` and ``nonzero`` while it is installed, and counts their calls only while counting is on.
:func:`counting_callbacks` returns two callbacks that switch counting on at the start of training
step ``first`` and off at the end of step ``last - 1``; put the first one first in the Trainer's
callback list and the second one last, so the window holds every other callback's batch hooks,
the forward, the loss terms, backward and the optimizer step.

Example:
    >>> import torch
    >>> with HostReadCounter() as counter:
    ...     counter.active = True
    ...     _ = bool(torch.ones(()) > 0) and torch.ones(2).sum().item()
    >>> counter.total, dict(counter.by_kind)
    (2, {'__bool__': 1, 'item': 1})
"""

from __future__ import annotations

import functools
import traceback
from collections import Counter
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

READS = ("item", "__bool__", "__int__", "__float__", "tolist", "nonzero")


class HostReadCounter:
    """Context manager that counts calls of the host-reading ``Tensor`` methods in :data:`READS`.

    Attributes:
        active: count only while ``True`` (the window is toggled by the callbacks).
        total: calls counted.
        by_kind: calls per method name.
        sites: calls per ``file:line`` of the caller (to find where a read comes from).
        by_step: calls per training step (0-based index in the fit).
        steps: number of training steps the window covered.
    """

    def __init__(self) -> None:
        self.active = False
        self.total = 0
        self.steps = 0
        self.step = 0
        self.by_kind: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self.by_step: Counter[int] = Counter()
        self._saved: dict[str, Any] = {}

    def _wrap(self, kind: str, original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                self.active = False  # reads made while recording the site are not counted
                try:
                    self.total += 1
                    self.by_kind[kind] += 1
                    self.by_step[self.step] += 1
                    frame = traceback.extract_stack(limit=2)[0]
                    self.sites[f"{frame.filename}:{frame.lineno}"] += 1
                finally:
                    self.active = True
            return original(*args, **kwargs)

        return wrapper

    def __enter__(self) -> HostReadCounter:
        for kind in READS:
            original = torch.Tensor.__dict__.get(kind, getattr(torch.Tensor, kind))
            self._saved[kind] = torch.Tensor.__dict__.get(kind)
            setattr(torch.Tensor, kind, self._wrap(kind, original))
        return self

    def __exit__(self, *exc: object) -> None:
        for kind, saved in self._saved.items():
            if saved is None:
                delattr(torch.Tensor, kind)
            else:
                setattr(torch.Tensor, kind, saved)
        self._saved.clear()
        self.active = False

    @property
    def per_step(self) -> float:
        """Reads per counted training step."""
        return self.total / max(self.steps, 1)


class _Start(Callback):
    def __init__(self, counter: HostReadCounter, first: int, last: int, sync_debug: bool, whole: bool) -> None:
        self.counter, self.first, self.last, self.sync_debug = counter, first, last, sync_debug
        self.whole = whole
        self.seen = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.whole:
            if self.counter.active:  # the previous iteration ends where this one starts
                self.stop()
            self.seen += 1
        step = self.seen - 1 if self.whole else self.seen
        if self.first <= step < self.last:
            self.counter.step = step
            self.counter.active = True
            if self.sync_debug:
                torch.cuda.set_sync_debug_mode("error")

    def stop(self) -> None:
        self.counter.active = False
        if self.sync_debug:
            torch.cuda.set_sync_debug_mode(0)
        self.counter.steps += 1


class _End(Callback):
    def __init__(self, start: _Start) -> None:
        self.start = start

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.start.whole:
            return
        if self.start.counter.active:
            self.start.stop()
        self.start.seen += 1


def counting_callbacks(
    counter: HostReadCounter, first: int = 5, last: int = 15, sync_debug: bool = False, whole_iterations: bool = False
) -> tuple[Callback, Callback]:
    """``(start, end)`` callbacks that count during training steps ``first .. last - 1`` (0-based).

    With ``sync_debug`` (CUDA only) the same window also runs under
    ``torch.cuda.set_sync_debug_mode("error")``: any synchronizing CUDA call in it raises.
    With ``whole_iterations`` a step's window runs from its ``on_train_batch_start`` to the next
    step's, so it also holds what Lightning does after the callbacks' ``on_train_batch_end``
    (collecting the logged values, converting the progress bar's to numbers) and the data
    loading; the fit must then run at least one step past ``last - 1``.
    """
    start = _Start(counter, first, last, sync_debug, whole_iterations)
    return start, _End(start)

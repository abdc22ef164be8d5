"""Replay buffers for online continual learning.

:class:`ReservoirBuffer` keeps a uniform sample of everything it was offered;
:class:`ClassBalancedBuffer` keeps the classes as equal in number as it can. Both keep tensors
preallocated once on the training device. Offering a batch and drawing a replay batch each cost
O(batch): a few random numbers from the buffer's own CPU ``torch.Generator`` (drawn ahead in
blocks of 1024: the same stream as drawn batch by batch) and one indexed copy on the device.
Nothing rebuilds a data set or a loader (the slowness Avalanche users report), and no
device-to-host synchronization is needed for the reservoir (the random decisions are made on the
CPU). The balanced buffer's decisions depend on the labels: it copies each batch's labels to
the host (one small copy per step).

Under DDP the replay callbacks keep one buffer *per rank*, seeded ``seed + rank``: each rank
samples from the shard of the stream it sees, so the union of the buffers is a stratified
reservoir of the whole stream and no step pays for a collective. See
:class:`~lightning_logits.callbacks.replay.ExperienceReplay`.
"""

from __future__ import annotations

from array import array
from typing import Any

import torch
from torch import Tensor
from typing_extensions import override

__all__ = ["BUFFER_KINDS", "ClassBalancedBuffer", "ReservoirBuffer", "make_buffer"]

BUFFER_KINDS = ("reservoir", "balanced")
"""The replay buffer kinds :func:`make_buffer` and the replay callbacks' ``buffer=`` accept.

Example:
    >>> BUFFER_KINDS
    ('reservoir', 'balanced')
    >>> type(make_buffer(BUFFER_KINDS[1], capacity=10)).__name__
    'ClassBalancedBuffer'
"""

_FIELDS = ("inputs", "labels", "logits", "task_ids")
_POOL = 1024  # uniforms drawn ahead from a buffer's generator in one call


def _on(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``: a copy that does not wait, only across devices (a no-op ``to`` still dispatches)."""
    return tensor if tensor.device == device else tensor.to(device, non_blocking=True)


def _index_tensor(values: list[int]) -> Tensor:
    """A CPU int64 tensor of ``values``.

    ``torch.tensor(list)`` converts element by element (about 3 us for ten ints); reading a
    packed ``array`` costs a third of that, and a step builds up to three of these.
    """
    if not values:
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(array("q", values), dtype=torch.int64)


def _slots_and_positions(written: dict[int, int]) -> tuple[Tensor, Tensor]:
    """``(slots, positions)`` index tensors, by slot, from ``{slot: position in the batch}``."""
    slots = sorted(written)
    return _index_tensor(slots), _index_tensor([written[k] for k in slots])


class ReservoirBuffer:
    """A fixed-size reservoir sample of a stream of labelled samples, stored as tensors.

    Offering sample number ``n`` (counting from 0 over the whole stream) stores it in slot ``n``
    while ``n < capacity``; after that it replaces slot ``j``, ``j`` uniform in ``[0, n]``, when
    ``j < capacity`` (Vitter's algorithm R, decided per sample, in order, in exact integer
    arithmetic). Every sample offered so far is then in the buffer with probability
    ``capacity / seen``.

    The tensors are allocated on the first :meth:`add`, with the shape, dtype and device of that
    batch (so the buffer lives on the training device). Retrieval draws distinct slots (without
    replacement) with Floyd's algorithm.

    Args:
        capacity: number of samples kept (``M``).
        seed: seed of the buffer's own ``torch.Generator`` (independent of the global RNG).
        store_logits: also keep a ``[M, C]`` float tensor of logits per sample (offer them in
            :meth:`add`), for methods that replay logits.
        store_task_ids: also keep the int64 task id of each sample.

    The whole state (tensors, ``seen`` count, generator state) is in :meth:`state_dict`, so a
    resumed run continues with the same buffer and the same random stream.

    Example:
        >>> import torch
        >>> buffer = ReservoirBuffer(capacity=4, seed=0)
        >>> buffer.add(torch.randn(10, 3), torch.arange(10))
        >>> len(buffer), buffer.seen
        (4, 10)
        >>> batch = buffer.sample(3)
        >>> batch["input"].shape, batch["target"].shape
        (torch.Size([3, 3]), torch.Size([3]))
    """

    kind = "reservoir"

    def __init__(self, capacity: int, seed: int = 0, store_logits: bool = False, store_task_ids: bool = False) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.seed = int(seed)
        self.store_logits = store_logits
        self.store_task_ids = store_task_ids
        self.seen = 0
        self._generator = torch.Generator().manual_seed(self.seed)
        # Uniforms drawn ahead (one generator call per _POOL numbers instead of two per step): the
        # same numbers in the same order as drawing them one batch at a time. _pool_state is the
        # generator's state before _pool was drawn, so ``generator`` can rewind to what was used.
        self._pool: list[float] = []
        self._pool_pos = 0
        self._pool_state: Tensor | None = None
        self.inputs: Tensor | None = None
        self.labels: Tensor | None = None
        self.logits: Tensor | None = None
        self.task_ids: Tensor | None = None

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    @property
    def generator(self) -> torch.Generator:
        """The buffer's own random stream, positioned after the last number the buffer used.

        The buffer draws its uniforms ahead in blocks; reading this property rewinds the generator
        to the numbers actually used (and drops the rest), so its state is the one a buffer
        drawing batch by batch would have: what checkpoints save and resumed runs compare.
        """
        if self._pool_state is not None:
            if self._pool_pos < len(self._pool):  # unused numbers were drawn: rewind past them
                self._generator.set_state(self._pool_state)
                if self._pool_pos:
                    torch.rand(self._pool_pos, generator=self._generator, dtype=torch.float64)
            self._pool, self._pool_pos, self._pool_state = [], 0, None
        return self._generator

    @generator.setter
    def generator(self, value: torch.Generator) -> None:
        self._generator = value
        self._pool, self._pool_pos, self._pool_state = [], 0, None

    def _uniforms(self, count: int) -> list[float]:
        """The next ``count`` uniforms in [0, 1) of the buffer's stream (float64), from the block drawn ahead."""
        end = self._pool_pos + count
        if end <= len(self._pool):
            out = self._pool[self._pool_pos : end]
            self._pool_pos = end
            return out
        left = self._pool[self._pool_pos :]
        need = count - len(left)
        # The CPU generator's float64 stream is the same drawn in one call or in several.
        self._pool_state = self._generator.get_state()
        self._pool = torch.rand(max(_POOL, need), generator=self._generator, dtype=torch.float64).tolist()
        self._pool_pos = need
        return left + self._pool[:need]

    @property
    def device(self) -> torch.device | None:
        """Where the tensors live (``None`` before the first :meth:`add`)."""
        return None if self.inputs is None else self.inputs.device

    def _allocate(self, inputs: Tensor, labels: Tensor, logits: Tensor | None) -> None:
        m = self.capacity
        self.inputs = inputs.new_zeros((m, *inputs.shape[1:]))
        self.labels = labels.new_zeros((m, *labels.shape[1:]))
        if self.store_logits:
            assert logits is not None
            self.logits = logits.new_zeros((m, *logits.shape[1:]))
        if self.store_task_ids:
            self.task_ids = torch.zeros(m, dtype=torch.int64, device=inputs.device)

    def _check_batch(
        self, inputs: Tensor, labels: Tensor, logits: Tensor | None, task_ids: Tensor | int | None
    ) -> None:
        if not isinstance(inputs, Tensor) or not isinstance(labels, Tensor):
            raise TypeError(
                f"inputs and labels must be tensors, got {type(inputs).__name__} and {type(labels).__name__}"
            )
        if inputs.ndim == 0 or labels.ndim == 0 or inputs.shape[0] != labels.shape[0]:
            raise ValueError(
                f"inputs {tuple(inputs.shape)} and labels {tuple(labels.shape)} must share their first "
                "(batch) dimension"
            )
        if self.store_logits and logits is None:
            raise ValueError("this buffer stores logits (store_logits=True): pass logits= to add()")
        if self.store_task_ids and task_ids is None:
            raise ValueError("this buffer stores task ids (store_task_ids=True): pass task_ids= to add()")
        if (
            self.inputs is not None
            and self.labels is not None
            and (inputs.shape[1:] != self.inputs.shape[1:] or labels.shape[1:] != self.labels.shape[1:])
        ):
            raise ValueError(
                f"the buffer holds inputs of shape [*, {', '.join(map(str, self.inputs.shape[1:]))}]; "
                f"got a batch of shape {tuple(inputs.shape)}: every sample must have the same shape"
            )

    def slots_for(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Reservoir decisions for the next ``batch_size`` samples, and advance ``seen``.

        Returns ``(slots, positions)``: CPU int64 tensors, the buffer slot each kept sample goes
        to and its position in the batch. When two samples of one batch draw the same slot, only
        the later one is returned (as if they had been stored one after the other).
        """
        # A batch is a handful of numbers: plain Python costs less than a tensor or numpy op per number.
        uniforms = self._uniforms(batch_size)
        seen, capacity = self.seen, self.capacity
        written: dict[int, int] = {}  # slot -> position of the last sample written there
        for position, u in enumerate(uniforms):
            n = seen + position
            if n < capacity:
                written[n] = position
                continue
            # j uniform in [0, n]: an exact draw in float64 for n < 2**50.
            slot = min(int(u * (n + 1)), n)
            if slot < capacity:
                written[slot] = position
        self.seen += batch_size
        return _slots_and_positions(written)

    def _decide(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Where the samples of a batch go: ``(slots, positions)`` (see :meth:`slots_for`)."""
        return self.slots_for(labels.shape[0])

    @torch.no_grad()
    def add(
        self,
        inputs: Tensor,
        labels: Tensor,
        logits: Tensor | None = None,
        task_ids: Tensor | int | None = None,
    ) -> None:
        """Offer a batch to the reservoir (inputs ``[B, ...]``, labels ``[B]``; detached copies are kept).

        Args:
            inputs: the batch's model inputs.
            labels: its class indices.
            logits: ``[B, C]`` logits to keep (only with ``store_logits=True``).
            task_ids: ``[B]`` task ids or one int for the whole batch (only with ``store_task_ids=True``).
        """
        self._check_batch(inputs, labels, logits, task_ids)
        batch_size = inputs.shape[0]
        if batch_size == 0:
            return
        if self.inputs is None:
            self._allocate(inputs, labels, logits)
        assert self.inputs is not None and self.labels is not None
        slots, positions = self._decide(labels)
        if slots.numel() == 0:
            return
        # Under no_grad: the selected rows carry no graph (no detach needed). Moves only across devices.
        device = self.inputs.device
        slots_d = _on(slots, device)
        positions_d = _on(positions, inputs.device)
        self.inputs.index_copy_(0, slots_d, _on(inputs.index_select(0, positions_d), device))
        self.labels.index_copy_(0, slots_d, _on(labels.index_select(0, _on(positions_d, labels.device)), device))
        if self.logits is not None and logits is not None:
            chosen = logits.index_select(0, _on(positions_d, logits.device))
            self.logits.index_copy_(0, slots_d, chosen.to(device, self.logits.dtype))
        if self.task_ids is not None and task_ids is not None:
            if isinstance(task_ids, int):
                self.task_ids.index_fill_(0, slots_d, task_ids)
            else:
                chosen = task_ids.index_select(0, _on(positions_d, task_ids.device))
                self.task_ids.index_copy_(0, slots_d, chosen.to(device, torch.int64))

    def sample_indices(self, batch_size: int) -> Tensor:
        """``min(batch_size, len(self))`` distinct slot indices (CPU int64), drawn uniformly.

        Floyd's algorithm: O(batch_size) random numbers, whatever the buffer size.
        """
        size = len(self)
        k = min(int(batch_size), size)
        if k <= 0:
            return torch.empty(0, dtype=torch.int64)
        # The draws come from the buffer's CPU generator: reading them is no device sync.
        u = self._uniforms(k)
        chosen: dict[int, None] = {}  # insertion-ordered set
        for i, j in enumerate(range(size - k, size)):
            t = min(int(u[i] * (j + 1)), j)
            chosen[j if t in chosen else t] = None
        return _index_tensor(list(chosen))

    def sample(self, batch_size: int) -> dict[str, Tensor]:
        """A replay batch of ``min(batch_size, len(self))`` distinct stored samples.

        Returns:
            ``{"input": [k, ...], "target": [k]}`` plus ``"logits"`` / ``"task_id"`` when stored,
            on the buffer's device. Empty (``k = 0``) tensors before the first :meth:`add`.
        """
        if self.inputs is None or self.labels is None:
            empty = torch.empty(0)
            return {"input": empty, "target": empty.long()}
        index = _on(self.sample_indices(batch_size), self.inputs.device)
        batch = {"input": self.inputs.index_select(0, index), "target": self.labels.index_select(0, index)}
        if self.logits is not None:
            batch["logits"] = self.logits.index_select(0, index)
        if self.task_ids is not None:
            batch["task_id"] = self.task_ids.index_select(0, index)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue: settings, ``seen``, the generator state and the filled rows."""
        state: dict[str, Any] = {
            "kind": self.kind,
            "capacity": self.capacity,
            "seed": self.seed,
            "store_logits": self.store_logits,
            "store_task_ids": self.store_task_ids,
            "seen": self.seen,
            "generator": self.generator.get_state(),
        }
        for name in _FIELDS:
            value = getattr(self, name)
            # The full preallocated tensor: its shape and dtype restore the allocation exactly.
            state[name] = None if value is None else value.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; tensors go to this buffer's device when it has one."""
        if int(state["capacity"]) != self.capacity:
            raise ValueError(
                f"the saved buffer has capacity {state['capacity']} but this one {self.capacity}; "
                "resume with the same buffer_size"
            )
        kind = state.get("kind", "reservoir")
        if kind != self.kind:
            raise ValueError(
                f"the saved buffer is a {kind!r} buffer but this one is {self.kind!r}; resume with the same kind"
            )
        device = self.device
        self.seed = int(state["seed"])
        self.store_logits = bool(state["store_logits"])
        self.store_task_ids = bool(state["store_task_ids"])
        self.seen = int(state["seen"])
        self.generator.set_state(state["generator"].cpu())
        for name in _FIELDS:
            value = state.get(name)
            setattr(self, name, None if value is None else value.to(device if device is not None else value.device))

    def __getstate__(self) -> dict[str, Any]:
        # A torch.Generator does not survive torch.multiprocessing's spawn pickling (ddp_spawn
        # sends the callbacks to each process): carry its state as plain bytes instead.
        generator = self.generator  # rewound to the numbers used: the drawn-ahead block is not sent
        state = self.__dict__.copy()
        state["_generator"] = generator.get_state().numpy().tobytes()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["_generator"]), dtype=torch.uint8))
        self.__dict__.update({**state, "_generator": generator})

    def to(self, device: torch.device | str) -> ReservoirBuffer:
        """Move the stored tensors to ``device`` (the generator stays on the CPU)."""
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self


class ClassBalancedBuffer(ReservoirBuffer):
    """A fixed-size buffer that keeps the classes as balanced as the stream allows (class-balanced reservoir).

    While it is not full, every sample is stored. Once full, sample ``x`` of class ``c``
    (Chrysakis & Moens, "Online Continual Learning from Imbalanced Data", ICML 2020, CBRS):

    - if ``c`` is not among the largest classes in the buffer, it replaces a uniformly drawn
      stored sample of a largest class (one of them, drawn uniformly when several tie);
    - otherwise it replaces a uniformly drawn stored sample of its own class with probability
      ``m_c / n_c`` (``m_c``: stored samples of ``c``, ``n_c``: samples of ``c`` offered so far),
      a reservoir sample within the class.

    The decisions are made per sample, in order, on the CPU from the buffer's own generator (two
    uniforms per sample, so the random stream advances the same way whatever is decided); the
    tensors are preallocated on the first :meth:`add` like :class:`ReservoirBuffer`'s, and a
    batch costs O(batch x classes) host work plus one indexed copy on the device. The labels of
    each batch are copied to the host. Retrieval is uniform over the stored samples, as in the
    reservoir. The whole state (per-class slot lists included) is in :meth:`state_dict`.

    Args:
        capacity: number of samples kept.
        seed: seed of the buffer's own ``torch.Generator``.
        store_logits: also keep logits (see :class:`ReservoirBuffer`).
        store_task_ids: also keep task ids.

    Example:
        >>> import torch
        >>> buffer = ClassBalancedBuffer(capacity=6, seed=0)
        >>> buffer.add(torch.randn(12, 3), torch.zeros(12, dtype=torch.long))  # class 0 fills it
        >>> buffer.add(torch.randn(6, 3), torch.tensor([1, 1, 1, 2, 2, 2]))
        >>> sorted(buffer.class_counts().items())
        [(0, 2), (1, 2), (2, 2)]
    """

    kind = "balanced"

    def __init__(self, capacity: int, seed: int = 0, store_logits: bool = False, store_task_ids: bool = False) -> None:
        super().__init__(capacity, seed=seed, store_logits=store_logits, store_task_ids=store_task_ids)
        self.class_slots: dict[int, list[int]] = {}  # class -> its slots (unordered; swap-removed)
        self.slot_class: list[int] = []  # the class stored in each filled slot
        self.slot_position: list[int] = []  # where each slot sits in its class's list
        self.offered: dict[int, int] = {}  # class -> samples offered so far (n_c)

    def class_counts(self) -> dict[int, int]:
        """Stored samples per class (``m_c``)."""
        return {c: len(slots) for c, slots in self.class_slots.items() if slots}

    def _move(self, slot: int, new_class: int) -> None:
        old = self.slot_class[slot]
        slots = self.class_slots[old]
        position = self.slot_position[slot]
        last = slots.pop()
        if last != slot:  # swap-remove: the last slot of the list takes the freed position
            slots[position] = last
            self.slot_position[last] = position
        self._append(slot, new_class)

    def _append(self, slot: int, label: int) -> None:
        slots = self.class_slots.setdefault(label, [])
        self.slot_class[slot] = label
        self.slot_position[slot] = len(slots)
        slots.append(slot)

    @override
    def _decide(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        if labels.ndim != 1 or labels.is_floating_point():
            raise ValueError(
                f"ClassBalancedBuffer needs int class labels of shape [B], got dtype {labels.dtype} and shape "
                f"{tuple(labels.shape)}"
            )
        values = labels.detach().cpu().tolist()
        uniforms = self._uniforms(2 * len(values))
        written: dict[int, int] = {}  # slot -> position of the last sample written there
        for position, label in enumerate(values):
            u_choose, u_slot = uniforms[2 * position], uniforms[2 * position + 1]
            self.offered[label] = self.offered.get(label, 0) + 1
            filled = len(self.slot_class)
            if filled < self.capacity:
                self.slot_class.append(label)
                self.slot_position.append(0)
                self._append(filled, label)
                written[filled] = position
                continue
            counts = {c: len(s) for c, s in self.class_slots.items() if s}
            largest = max(counts.values())
            own = counts.get(label, 0)
            if own < largest:
                candidates = sorted(c for c, m in counts.items() if m == largest)
                victim_class = candidates[min(int(u_choose * len(candidates)), len(candidates) - 1)]
            elif u_choose * self.offered[label] < own:  # keep with probability m_c / n_c
                victim_class = label
            else:
                continue
            victims = self.class_slots[victim_class]
            slot = victims[min(int(u_slot * len(victims)), len(victims) - 1)]
            self._move(slot, label)
            written[slot] = position
        self.seen += len(values)
        return _slots_and_positions(written)

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["class_slots"] = {c: list(v) for c, v in self.class_slots.items()}
        state["slot_class"] = list(self.slot_class)
        state["slot_position"] = list(self.slot_position)
        state["offered"] = dict(self.offered)
        return state

    @override
    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.class_slots = {int(c): list(v) for c, v in state["class_slots"].items()}
        self.slot_class = list(state["slot_class"])
        self.slot_position = list(state["slot_position"])
        self.offered = {int(c): int(n) for c, n in state["offered"].items()}


def make_buffer(
    kind: str, capacity: int, seed: int = 0, store_logits: bool = False, store_task_ids: bool = False
) -> ReservoirBuffer:
    """A buffer by name: ``"reservoir"`` (:class:`ReservoirBuffer`) or ``"balanced"`` (:class:`ClassBalancedBuffer`).

    Example:
        >>> type(make_buffer("balanced", 10)).__name__
        'ClassBalancedBuffer'
    """
    if kind == "reservoir":
        return ReservoirBuffer(capacity, seed=seed, store_logits=store_logits, store_task_ids=store_task_ids)
    if kind == "balanced":
        return ClassBalancedBuffer(capacity, seed=seed, store_logits=store_logits, store_task_ids=store_task_ids)
    raise ValueError(f"buffer must be one of {BUFFER_KINDS}, got {kind!r}")

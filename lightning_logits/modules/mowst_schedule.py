"""Mowst's training schedule: pretraining phases, alternating turns, early stopping and rounds.

Pure bookkeeping (no tensors, no Lightning): :class:`~lightning_logits.modules.mowst.Mowst` asks it
which phase to train, tells it each validation score, and applies the weight restores it reports.
"""

from __future__ import annotations

from typing import Any, Literal

__all__ = ["Phase", "Plateau", "MowstSchedule"]

Phase = Literal["pretrain_strong", "pretrain_weak", "pretrain_joint", "weak", "strong", "joint"]
"""The phases of a Mowst run: pretraining (strong, weak or joint), then weak and strong turns (Mowst)
or joint training (Mowst*); :attr:`MowstSchedule.phase` is one of them.

Example:
    >>> from typing import get_args
    >>> get_args(Phase)[3:]
    ('weak', 'strong', 'joint')
"""
Pretrain = Literal["none", "strong", "weak", "both", "joint"]
PRETRAIN_PHASES: dict[str, list[Phase]] = {
    "none": [],
    "strong": ["pretrain_strong"],
    "weak": ["pretrain_weak"],
    "both": ["pretrain_strong", "pretrain_weak"],
    "joint": ["pretrain_joint"],
}
# numeric code of each phase, logged as ``mowst/turn`` (0-3 kept from earlier releases)
PHASE_CODE: dict[str, int] = {
    "pretrain_joint": 0,
    "weak": 1,
    "strong": 2,
    "joint": 3,
    "pretrain_strong": 4,
    "pretrain_weak": 5,
}
DESCRIPTION: dict[str, str] = {
    "pretrain_strong": "pretraining of the strong expert alone",
    "pretrain_weak": "pretraining of the weak expert alone",
    "pretrain_joint": "joint warm-up of both experts",
    "weak": "weak turn (weak expert + gate)",
    "strong": "strong turn (strong expert)",
    "joint": "Mowst* joint training",
}


class Plateau:
    """Early stopping on a score that should rise (the one rule every phase and baseline uses).

    ``update(score)`` returns whether the score beat the best so far; ``exhausted`` is true once
    ``patience`` scores in a row did not.

    Example:
        >>> p = Plateau(patience=2)
        >>> [p.update(s) for s in (0.5, 0.4, 0.6, 0.6, 0.55)], p.exhausted, p.best
        ([True, False, True, False, False], True, 0.6)
    """

    def __init__(self, patience: int) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1 (validations without improvement), got {patience}")
        self.patience = patience
        self.best = -1.0
        self.bad = 0

    def update(self, score: float) -> bool:
        if score > self.best:
            self.best, self.bad = score, 0
            return True
        self.bad += 1
        return False

    @property
    def exhausted(self) -> bool:
        return self.bad >= self.patience

    def reset(self) -> None:
        self.best, self.bad = -1.0, 0


class MowstSchedule:
    """Which phase Mowst trains, when it ends, and when training stops.

    Phases run in order: the pretraining phases of ``pretrain`` (``"strong"``: the strong expert
    alone; ``"weak"``: the weak expert alone; ``"both"``: strong then weak; each early-stopped on its
    own validation accuracy; ``"joint"``: both experts on plain cross-entropy for ``pretrain_epochs``
    epochs), then turns: ``weak``/``strong`` alternating from ``first_turn`` (Mowst) or one ``joint``
    phase (Mowst*). A phase ends after ``patience`` validations without a better score (pretraining:
    ``pretrain_patience``) or, when set, ``max_turn_epochs`` epochs (early-stopped pretraining:
    ``pretrain_epochs`` when > 0). A round is a weak turn and a strong turn; training stops when more
    than ``round_patience`` rounds in a row leave the best validation score unchanged, or when the
    Mowst* phase ends.

    The best validation score :attr:`best_val` covers every phase but the joint warm-up: an
    early-stopped pretraining phase competes with the turns (its model is one expert alone), so
    the first round counts as a gain only if a turn beats the pretrained expert.

    The module calls :meth:`record` with each validation score (it returns what to snapshot),
    :meth:`step_done` after each training epoch and :meth:`advance` to apply a pending transition
    (it returns the phase that ended, whose best weights the module restores).

    Example:
        >>> s = MowstSchedule("mowst", pretrain="strong", patience=1, pretrain_patience=1)
        >>> s.phase
        'pretrain_strong'
        >>> s.record(0.7), s.record(0.6), s.advance(), s.phase
        ((True, True), (False, False), 'pretrain_strong', 'weak')
        >>> s.record(0.65), s.best_val  # a weak turn below the pretrained expert is no new best
        ((True, False), 0.7)
    """

    VERSION = 1

    def __init__(
        self,
        variant: Literal["mowst", "mowst_star"] = "mowst",
        pretrain: Pretrain = "none",
        first_turn: Literal["weak", "strong"] = "weak",
        patience: int = 20,
        max_turn_epochs: int | None = None,
        round_patience: int = 1,
        pretrain_epochs: int = 0,
        pretrain_patience: int | None = None,
    ) -> None:
        if pretrain not in PRETRAIN_PHASES:
            raise ValueError(f"pretrain must be one of {tuple(PRETRAIN_PHASES)}, got {pretrain!r}")
        if pretrain == "joint" and pretrain_epochs < 1:
            raise ValueError(
                f"pretrain='joint' runs a fixed number of epochs: set pretrain_epochs >= 1, got {pretrain_epochs}"
            )
        if pretrain_epochs < 0 or round_patience < 0 or (max_turn_epochs is not None and max_turn_epochs < 1):
            raise ValueError(
                "need pretrain_epochs >= 0, round_patience >= 0 and max_turn_epochs >= 1 (or None: no cap); got "
                f"{pretrain_epochs}, {round_patience}, {max_turn_epochs}"
            )
        self.variant, self.first_turn = variant, first_turn
        self.patience = patience
        self.pretrain_patience = patience if pretrain_patience is None else pretrain_patience
        Plateau(self.patience), Plateau(self.pretrain_patience)  # validates both
        self.max_turn_epochs, self.round_patience, self.pretrain_epochs = (
            max_turn_epochs,
            round_patience,
            pretrain_epochs,
        )
        self.pending: list[Phase] = list(PRETRAIN_PHASES[pretrain])
        self.phase: Phase = self.pending.pop(0) if self.pending else self._first()
        self.plateau = Plateau(self.pretrain_patience if self.pretraining else self.patience)
        self.turn_id = 0
        self.epochs_in_turn = 0
        self.best_val = -1.0
        self.round_start_best = -1.0
        self.rounds_bad = 0
        self.stopped = False
        self.stop_reason = ""
        self.history: list[dict[str, Any]] = []

    def _first(self) -> Phase:
        return "joint" if self.variant == "mowst_star" else self.first_turn

    @property
    def pretraining(self) -> bool:
        return self.phase.startswith("pretrain")

    # ------------------------------------------------------------------ events
    def step_done(self) -> None:
        """One training epoch of the current phase is over."""
        self.epochs_in_turn += 1

    def record(self, score: float) -> tuple[bool, bool]:
        """Take one validation score of the current phase.

        Returns ``(phase_improved, best_improved)``: whether the score beat the current phase's
        best (a pretraining phase then snapshots the expert it trains) and whether it beat the best
        score of every phase so far, pretraining included (snapshot the whole model). Joint
        warm-up epochs and a stopped schedule record nothing: ``(False, False)``.
        """
        if self.stopped or self.phase == "pretrain_joint":
            return False, False
        improved = self.plateau.update(score)
        if score > self.best_val:
            self.best_val = score
            return improved, True
        return improved, False

    def phase_done(self) -> bool:
        if self.stopped:
            return False
        if self.phase == "pretrain_joint":
            return self.epochs_in_turn >= self.pretrain_epochs
        if self.pretraining:
            capped = self.pretrain_epochs > 0 and self.epochs_in_turn >= self.pretrain_epochs
            return self.plateau.exhausted or capped
        capped = (
            self.phase != "joint" and self.max_turn_epochs is not None and self.epochs_in_turn >= self.max_turn_epochs
        )
        return self.plateau.exhausted or capped

    def advance(self) -> Phase | None:
        """Apply a pending transition; return the phase that just ended (``None``: nothing ended)."""
        if not self.phase_done():
            return None
        ended = self.phase
        best = None if ended == "pretrain_joint" else self.plateau.best
        self.history.append({"turn": ended, "epochs": self.epochs_in_turn, "best_val_acc": best})
        if self.pretraining:
            self._start(self.pending.pop(0) if self.pending else self._first())
            # the first round must beat the pretrained expert(s) to count as a gain
            self.round_start_best = self.best_val
            return ended
        if ended == "joint":
            self._stop(f"Mowst* stopped: {self.patience} validations without a better val/acc")
            return ended
        if ended != self._first():  # the second turn of a round ends the round
            self.rounds_bad = 0 if self.best_val > self.round_start_best else self.rounds_bad + 1
            self.round_start_best = self.best_val
            if self.rounds_bad > self.round_patience:
                self._stop(
                    f"Mowst stopped: {self.rounds_bad} round(s) in a row without a better val/acc "
                    f"(round_patience={self.round_patience}); best val/acc {self.best_val:.4f}"
                )
                return ended
        self._start("strong" if ended == "weak" else "weak")
        return ended

    def _start(self, phase: Phase) -> None:
        self.phase = phase
        self.turn_id += 1
        self.epochs_in_turn = 0
        self.plateau = Plateau(self.pretrain_patience if self.pretraining else self.patience)

    def _stop(self, reason: str) -> None:
        self.stopped, self.stop_reason = True, reason

    def summary(self) -> str:
        """A table of the finished phases: turn, epochs, best validation accuracy."""
        lines = ["| # | turn | epochs | best val acc |", "|---:|---|---:|---:|"]
        for i, row in enumerate(self.history):
            acc = "-" if row["best_val_acc"] is None else f"{row['best_val_acc']:.4f}"
            lines.append(f"| {i} | {row['turn']} | {row['epochs']} | {acc} |")
        if not self.stopped:
            acc = "-" if self.phase == "pretrain_joint" else f"{self.plateau.best:.4f}"
            lines.append(f"| {len(self.history)} | {self.phase} (unfinished) | {self.epochs_in_turn} | {acc} |")
        return "\n".join(lines)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "phase": self.phase,
            "pending": list(self.pending),
            "turn_id": self.turn_id,
            "epochs_in_turn": self.epochs_in_turn,
            "plateau_best": self.plateau.best,
            "plateau_bad": self.plateau.bad,
            "best_val": self.best_val,
            "round_start_best": self.round_start_best,
            "rounds_bad": self.rounds_bad,
            "stopped": self.stopped,
            "stop_reason": self.stop_reason,
            "history": [dict(row) for row in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` output; also the unversioned dict of releases before version 1."""
        version = state.get("version", 0)
        if version > self.VERSION:
            raise ValueError(
                f"this Mowst schedule state has version {version}, newer than this library's {self.VERSION}: "
                "upgrade lightning_logits to load it"
            )
        if version == 0:  # the earlier dict with string keys
            turn = "pretrain_joint" if state["turn"] == "pretrain" else state["turn"]
            state = {
                "phase": turn,
                "pending": [],
                "turn_id": state["turn_id"],
                "epochs_in_turn": state["epochs_in_turn"],
                "plateau_best": state["turn_best"],
                "plateau_bad": state["turn_bad"] + (self.patience if state.get("turn_done") else 0),
                "best_val": state["best_val"],
                "round_start_best": state["round_start_best"],
                "rounds_bad": state["rounds_bad"],
                "stopped": state["stopped"],
                "stop_reason": "",
                "history": [],
            }
        self.phase, self.pending = state["phase"], list(state["pending"])
        self.turn_id, self.epochs_in_turn = state["turn_id"], state["epochs_in_turn"]
        self.plateau = Plateau(self.pretrain_patience if self.pretraining else self.patience)
        self.plateau.best, self.plateau.bad = state["plateau_best"], state["plateau_bad"]
        self.best_val, self.round_start_best = state["best_val"], state["round_start_best"]
        self.rounds_bad, self.stopped, self.stop_reason = state["rounds_bad"], state["stopped"], state["stop_reason"]
        self.history = [dict(row) for row in state["history"]]

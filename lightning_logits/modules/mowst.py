"""Mowst: a weak MLP expert and a strong GNN expert mixed by a learned confidence gate (full-batch).

:class:`Mowst` trains both experts and the gate on one graph (one full-batch step per epoch) and
:class:`GNNClassifier` trains one expert alone, the baseline Mowst is compared with. The losses
and the inference rules live in :mod:`lightning_logits.functional.mowst`; the turn schedule in
:mod:`lightning_logits.modules.mowst_schedule`.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_logits.functional.mowst import (
    check_node_mask,
    mowst_dispersion,
    mowst_expected_accuracy,
    mowst_loss,
    mowst_predict,
    mowst_route,
    mowst_star_loss,
)
from lightning_logits.modules.mowst_schedule import DESCRIPTION, PHASE_CODE, MowstSchedule, Plateau, Pretrain
from lightning_logits.networks.factory import build_expert

__all__ = ["GNNClassifier", "Mowst", "MowstSchedule"]

GNNName = Literal["gcn", "sage", "gat", "gin"]
GNN_NAMES = ("gcn", "sage", "gat", "gin")
VARIANTS = ("mowst", "mowst_star")
GATE_INPUTS = ("dispersion", "dispersion_features")
INFERENCE = ("expected", "random", "deterministic")
PRETRAIN = ("none", "strong", "weak", "both", "joint")
CHECKPOINT_VERSION = 1


def _default_adamw(params: Any) -> torch.optim.Optimizer:
    """The default optimizer of every Mowst/baseline parameter group: AdamW, lr 1e-3, weight decay 5e-4."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=5e-4)


def _train_share(mask: Tensor, trainer: pl.Trainer | None) -> tuple[Tensor, float]:
    """This rank's training nodes and the factor that makes DDP's gradient average the all-node mean.

    Rank ``r`` of ``W`` takes training nodes ``r, r + W, ...``; its mean loss times
    ``n_r * W / n_train`` averaged over ranks equals the mean over all training nodes exactly.
    """
    nodes = mask.nonzero().flatten()
    world = trainer.world_size if trainer is not None else 1
    if world <= 1:
        return nodes, 1.0
    share = nodes[trainer.global_rank :: world]  # type: ignore[union-attr]
    return share, share.numel() * world / max(nodes.numel(), 1)


class _TrainShares:
    """:func:`_train_share` computed once per mask: ``nonzero`` reads the mask on the host (a device sync).

    A full-batch graph hands the same mask tensor to every step (Lightning's batch transfer calls
    PyG's ``Data.to``, which moves the graph's tensors in place, once), so the indices are reused
    while the tensor object, its version counter (bumped by any in-place edit), the world size and
    the rank are unchanged; a new or edited mask is read again.
    """

    def __init__(self) -> None:
        self._key: tuple[Tensor, int, int, int] | None = None
        self._value: tuple[Tensor, float] | None = None

    def __call__(self, mask: Tensor, trainer: pl.Trainer | None) -> tuple[Tensor, float]:
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        key = self._key
        if key is not None and self._value is not None and key[0] is mask and key[1:] == (mask._version, world, rank):
            return self._value
        self._value = _train_share(mask, trainer)
        # The key holds the mask itself: its memory cannot be reused by another tensor meanwhile.
        self._key = (mask, mask._version, world, rank)
        return self._value

    def __getstate__(self) -> dict[str, Any]:  # pickled (ddp_spawn, deepcopy) without the cached tensors
        return {"_key": None, "_value": None}


def _touch(modules: list[nn.Module]) -> Tensor | float:
    """A zero that depends on every parameter: DDP's reducer then sees a gradient for each one."""
    total: Tensor | float = 0.0
    for module in modules:
        for p in module.parameters():
            if p.requires_grad:
                total = total + p.sum() * 0.0
    return total


def _snapshot(modules: dict[str, nn.Module]) -> dict[str, dict[str, Tensor]]:
    return {k: {n: t.detach().clone() for n, t in m.state_dict().items()} for k, m in modules.items()}


def _apply_snapshot_to_checkpoint(checkpoint: dict[str, Any], best: dict[str, dict[str, Tensor]]) -> None:
    """Overwrite a checkpoint's weights with a snapshot (``{"weak": state_dict, ...}``) before they are loaded."""
    state = checkpoint.get("state_dict")
    if state is None:
        return
    for prefix, module_state in best.items():
        for key, value in module_state.items():
            state[f"{prefix}.{key}"] = value


def _loading_for_evaluation(module: pl.LightningModule) -> bool:
    """True unless a trainer is resuming ``fit`` (``load_from_checkpoint``, ``trainer.test(ckpt_path=...)``, ...)."""
    trainer = module._trainer
    return trainer is None or trainer.state.fn != TrainerFn.FITTING


def _log_histogram(module: pl.LightningModule, tag: str, values: Tensor) -> None:
    """Histogram through the logger's experiment when it has ``add_histogram`` (TensorBoard), else nothing."""
    if module._trainer is None or not module.trainer.is_global_zero:
        return
    for logger in module.loggers:
        experiment = getattr(logger, "experiment", None)
        add = getattr(experiment, "add_histogram", None)
        if callable(add):
            add(tag, values.detach().float().cpu(), module.global_step)


Routing = Literal["gate", "strong", "weak"]
# C = keep * sigmoid(gate(.)) + force: (1, 0) the gate's confidence, (0, 0) C = 0, (0, 1) C = 1
_ROUTING_CODE: dict[Routing, tuple[float, float]] = {"gate": (1.0, 0.0), "strong": (0.0, 0.0), "weak": (0.0, 1.0)}


class _Routing(nn.Module):
    """Which expert a :class:`Mowst` model uses: the gate's confidence, or one expert alone.

    Holds the buffer ``code = (keep, force)`` and maps the gate's confidence ``c`` to
    ``keep * c + force``: exactly ``c``, ``0`` or ``1``, without a host-device sync. A buffer, so
    it travels with the weights (``state_dict``, checkpoints, best-weights snapshots).
    """

    code: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("code", torch.tensor(_ROUTING_CODE["gate"]))

    def forward(self, confidence: Tensor) -> Tensor:
        code = self.code.to(confidence.dtype)
        return code[0] * confidence + code[1]

    @property
    def mode(self) -> Routing:
        code = tuple(float(v) for v in self.code.tolist())  # reads the buffer: call outside the hot path
        return next((k for k, v in _ROUTING_CODE.items() if v == code), "gate")

    def set(self, mode: Routing) -> None:
        with torch.no_grad():
            self.code.copy_(torch.tensor(_ROUTING_CODE[mode], dtype=self.code.dtype))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # weights saved before the routing existed: their model is the gate's mixture
        state_dict.setdefault(prefix + "code", torch.tensor(_ROUTING_CODE["gate"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


class Mowst(pl.LightningModule):
    """Mixture of a weak expert (MLP on node features) and a strong expert (GNN), full-batch.

    The gate maps the weak expert's dispersion (:func:`~lightning_logits.functional.mowst.mowst_dispersion`),
    optionally concatenated with the node features, to the confidence ``C = sigmoid(gate(.))``, the
    weight of the weak expert.

    * ``variant="mowst"``: loss :func:`~lightning_logits.functional.mowst.mowst_loss`. Training
      alternates turns: the weak expert and the gate (strong expert frozen, in eval mode), then the
      strong expert (weak expert and gate frozen, in eval mode), each with its own optimizer and its
      own early stopping on ``val/acc``: a turn ends after ``patience`` validations without
      improvement (or ``max_turn_epochs`` epochs when set), and then the best weights seen so far
      are restored. Training stops when more than ``round_patience`` consecutive rounds (weak turn +
      strong turn) leave the best ``val/acc`` unchanged.
    * ``variant="mowst_star"``: one optimizer over everything, loss
      :func:`~lightning_logits.functional.mowst.mowst_star_loss`, stops after ``patience``
      validations without improvement.
    * ``pretrain`` runs before the turns: ``"strong"`` trains the GNN alone with cross-entropy,
      early-stopped on its own validation accuracy (``pretrain_patience``), and restores its best
      weights (the authors' setting for Mowst-GCN, ``--submethod pretrain_model2``; what the recipes
      and the benchmark use); ``"weak"`` the same for the MLP; ``"both"`` the GNN then the MLP;
      ``"joint"`` both experts together for exactly ``pretrain_epochs`` epochs (the warm-up of earlier
      releases); ``"none"`` starts with the turns.
    * The best weights cover every phase, pretraining included. An early-stopped pretraining
      phase routes every node to the expert it trains (:attr:`routing` ``"strong"``: ``C = 0``;
      ``"weak"``: ``C = 1``), so its ``val/acc`` is that expert's and its best weights are a
      candidate like any turn's; the turns must beat it. The first weak turn starts from the
      gate as initialized (``C`` about 0.5 on every node, as in the official code) and its
      weights are kept only if the mixture beats the pretrained expert on validation: otherwise
      the turn ends on the pretrained expert alone and the next strong turn trains it alone.
      So the model ``fit`` ends with, ``last.ckpt`` and the best checkpoint are never worse on
      validation than the best phase so far; a Mowst whose turns never beat its pretrained GNN
      ends as that GNN (``routing == "strong"``). Rounds count a gain only over this best, so
      ``round_patience + 1`` rounds that never beat the pretraining stop training.

    The schedule (:class:`~lightning_logits.modules.mowst_schedule.MowstSchedule`, in
    :attr:`schedule`) is saved in checkpoints: a run resumed during pretraining or a turn continues
    it. When Mowst stops itself, the best weights are restored before the last checkpoint is
    written; a checkpoint loaded for evaluation (``load_from_checkpoint``, ``trainer.test(ckpt_path=...)``)
    gets the best weights it holds, so it evaluates the model ``fit`` ends with even when
    ``max_epochs`` ended the run. At the end of ``fit`` the reason for stopping and a table of the
    turns (turn, epochs, best validation accuracy) go to the ``lightning.pytorch`` logger (INFO).

    One epoch is one full-batch optimizer step. Each step trains on the graph's ``train_mask``;
    under DDP every rank holds the whole graph and trains on its share of the training nodes
    (gradients are averaged exactly as one process would compute them).

    Deliberate differences from the official code (facebookresearch/mowst-gnn), all measured
    side by side on the same graphs: the frozen expert runs in eval mode (no dropout, fixed
    BatchNorm) and its outputs are cached within a turn (official: train mode, dropout on); the
    gate is saved and restored with the experts when the best weights are restored (official:
    never); pretraining competes with the turns for the best weights (official: its validation
    accuracy is discarded, the turns are compared only with each other, so a weak turn below the
    pretrained GNN is kept); ``inference="expected"`` reports the exact expectation of random routing (official: the
    average of 50 draws); Mowst* stops early and applies softmax once before the dispersion
    (official: no early stopping, and softmax twice at test time).

    Args:
        weak: the weak expert, any ``nn.Module`` mapping ``x [N, F]`` to ``[N, K]`` (default: an MLP
            with BatchNorm of ``hidden`` width and ``num_layers`` layers).
        strong: ``"gcn"``, ``"sage"``, ``"gat"``, ``"gin"`` (torch-geometric models of the same width
            and depth) or any module called as ``strong(x, edge_index) -> [N, K]``.
        variant: ``"mowst"`` or ``"mowst_star"``.
        gate_input: ``"dispersion"`` (``[N, 2]``) or ``"dispersion_features"`` (``[N, 2 + F]``).
        num_features: input feature width; read off the DataModule (``num_features``) when ``None``.
        num_classes: class count; read off the DataModule (``num_classes``) when ``None``.
        hidden: hidden width of the default experts and of the gate MLP.
        num_layers: layer count of the default experts and of the gate MLP.
        dropout: dropout of the default experts and of the gate MLP.
        batch_norm: BatchNorm in the default weak MLP and in the gate (the official ``no_batch_norm``
            flag turns it off).
        norm: ``"batch"`` adds a BatchNorm after each hidden layer of a named GNN expert (as the
            authors' GCN); default ``None``.
        weak_optimizer: callable taking the weak expert's and the gate's parameters and returning
            their optimizer (in a YAML: ``class_path: torch.optim.AdamW`` with ``init_args``).
            Default: AdamW, lr 1e-3, weight decay 5e-4.
        strong_optimizer: the same for the strong expert (Mowst). Same default.
        joint_optimizer: the same for every parameter at once (Mowst*). Same default.
        patience: validations without improvement that end a turn (Mowst) or training (Mowst*).
        max_turn_epochs: longest turn in epochs (Mowst); ``None`` (default): turns end on
            ``patience`` only. Needed when no validation runs (it then alternates the turns).
        round_patience: rounds without improvement tolerated before stopping (Mowst).
        pretrain: ``"none"`` (default), ``"strong"``, ``"weak"``, ``"both"`` or ``"joint"`` (above).
        pretrain_epochs: ``"joint"``: its number of epochs (required); the early-stopped phases: a
            cap on their length (0: none).
        pretrain_patience: validations without improvement that end an early-stopped pretraining
            phase (default: ``patience``).
        first_turn: ``"weak"`` (as the paper) or ``"strong"``.
        inference: what ``val/acc`` and ``test/acc`` report: ``"expected"`` (exact expected accuracy
            of random routing; the Mowst default), ``"random"`` (one routing drawn with
            ``route_seed``) or ``"deterministic"`` (route by ``C >= 0.5``; for Mowst* the mixture of
            probabilities: the Mowst* default). All three are logged under their own names too.
        route_seed: seed of the random routing at evaluation.
        cache_frozen: reuse the frozen expert's outputs within a turn.
        restore_best: restore the best weights at the end of each turn, pretraining phase and run
            (the best over every phase, pretraining included, with its :attr:`routing`).

    Logged: ``train/loss``, ``mowst/turn`` (0 joint warm-up, 1 weak, 2 strong, 3 Mowst* joint,
    4 strong pretraining, 5 weak pretraining; also in the progress bar), ``val/acc``,
    ``val/acc_expected``, ``val/acc_random``, ``val/acc_deterministic``, ``val/acc_weak``,
    ``val/acc_strong``, ``mowst/weak_share`` (share of the evaluated nodes the random routing sent to
    the weak expert) and ``mowst/confidence`` (mean ``C``); under ``test/`` and the same
    ``mowst/*`` keys in ``trainer.test``. During an early-stopped pretraining phase ``val/acc`` is
    the trained expert's accuracy (the model routes every node to it). A histogram of ``C`` goes to
    loggers whose experiment has ``add_histogram`` (TensorBoard); the last ``C`` is kept in
    :attr:`last_confidence`.

    Example:
        >>> from lightning_logits.data.graphs import csbm_graph
        >>> data = csbm_graph(num_nodes=60, num_classes=3, num_features=8)
        >>> model = Mowst(strong="gcn", num_features=8, num_classes=3, hidden=16, pretrain="strong")
        >>> weak_logits, strong_logits, confidence = model(data.x, data.edge_index)
        >>> weak_logits.shape, confidence.shape, model.turn, model.routing  # fit starts routing to the GNN
        (torch.Size([60, 3]), torch.Size([60]), 'pretrain_strong', 'gate')
    """

    def __init__(
        self,
        weak: nn.Module | None = None,
        strong: GNNName | nn.Module = "gcn",
        variant: Literal["mowst", "mowst_star"] = "mowst",
        gate_input: Literal["dispersion", "dispersion_features"] = "dispersion",
        num_features: int | None = None,
        num_classes: int | None = None,
        hidden: int = 64,
        num_layers: int = 2,
        dropout: float = 0.5,
        batch_norm: bool = True,
        norm: Literal["batch"] | None = None,
        weak_optimizer: OptimizerCallable | None = None,
        strong_optimizer: OptimizerCallable | None = None,
        joint_optimizer: OptimizerCallable | None = None,
        patience: int = 20,
        max_turn_epochs: int | None = None,
        round_patience: int = 1,
        pretrain: Pretrain = "none",
        pretrain_epochs: int = 0,
        pretrain_patience: int | None = None,
        first_turn: Literal["weak", "strong"] = "weak",
        inference: Literal["expected", "random", "deterministic"] | None = None,
        route_seed: int = 0,
        cache_frozen: bool = True,
        restore_best: bool = True,
    ) -> None:
        super().__init__()
        _check_choice("variant", variant, VARIANTS)
        _check_choice("gate_input", gate_input, GATE_INPUTS)
        _check_choice("inference", inference, (*INFERENCE, None))
        _check_choice("first_turn", first_turn, ("weak", "strong"))
        _check_choice("pretrain", pretrain, PRETRAIN)
        _check_choice("norm", norm, ("batch", None))
        if isinstance(strong, str) and strong not in GNN_NAMES:
            raise ValueError(
                f"strong must be one of {GNN_NAMES} or an nn.Module taking (x, edge_index), got {strong!r}"
            )
        if pretrain == "none" and pretrain_epochs > 0:
            raise ValueError(
                f"pretrain_epochs={pretrain_epochs} with pretrain='none': set pretrain='joint' for a fixed joint "
                "warm-up of both experts (what pretrain_epochs alone meant before), or pretrain='strong' for the "
                "early-stopped GNN pretraining the authors use"
            )
        # validates patience, round_patience, max_turn_epochs, pretrain_epochs with messages naming them
        MowstSchedule(
            variant, pretrain, first_turn, patience, max_turn_epochs, round_patience, pretrain_epochs, pretrain_patience
        )
        ignore = ["weak_optimizer", "strong_optimizer", "joint_optimizer"]
        ignore += [name for name, value in (("weak", weak), ("strong", strong)) if isinstance(value, nn.Module)]
        self.save_hyperparameters(ignore=ignore)
        self.weak_optimizer, self.strong_optimizer, self.joint_optimizer = (
            weak_optimizer,
            strong_optimizer,
            joint_optimizer,
        )
        self.automatic_optimization = False
        self.variant, self.gate_input = variant, gate_input
        self.inference = inference or ("expected" if variant == "mowst" else "deterministic")
        self._weak_arg, self._strong_arg = weak, strong
        self.weak: nn.Module
        self.strong: nn.Module
        self.gate: nn.Module
        self._built = False
        self._routing = _Routing()
        if num_features is not None and num_classes is not None:
            self._build(num_features, num_classes)
        self.last_confidence: Tensor | None = None
        self.schedule = self._fresh_schedule()
        self._best_state: dict[str, dict[str, Tensor]] | None = None
        self._phase_best: dict[str, dict[str, Tensor]] | None = None
        self._cache: tuple[tuple[Any, ...], tuple[Tensor, ...]] | None = None
        self._version = 0  # bumped whenever weights are loaded, so cached frozen outputs are dropped
        self._last_val: dict[str, float] | None = None
        self._train_mask_checked = False
        self._train_shares = _TrainShares()

    # ----------------------------------------------------------------- building
    def _build(self, num_features: int, num_classes: int) -> None:
        hp = self.hparams
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_features, self.num_classes = num_features, num_classes
        size = (hp["hidden"], hp["num_layers"], hp["dropout"])
        self.weak = (
            self._weak_arg
            if self._weak_arg is not None
            else build_expert("mlp", num_features, num_classes, *size, hp["batch_norm"])
        )
        if isinstance(self._strong_arg, nn.Module):
            self.strong = self._strong_arg
        else:
            self.strong = build_expert(self._strong_arg, num_features, num_classes, *size, norm=hp["norm"])
        gate_in = 2 + (num_features if self.gate_input == "dispersion_features" else 0)
        self.gate = build_expert("mlp", gate_in, 1, *size, hp["batch_norm"])
        self._built = True

    @override
    def configure_model(self) -> None:
        """Refuse ``ModelParallelStrategy``: Mowst trains full-batch on one graph (see the class docstring)."""
        if self.device_mesh is not None:
            raise RuntimeError(
                "Mowst does not run under ModelParallelStrategy: it trains full-batch on one whole graph, whose "
                "experts are small next to the graph, so sharding their weights saves nothing while every rank "
                "still holds the graph. Use strategy='ddp' (each rank trains on its share of the training nodes) "
                "or one device"
            )

    @override
    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        found = (getattr(datamodule, "num_features", None), getattr(datamodule, "num_classes", None))
        if not self._built:
            num_features = self.hparams["num_features"] or found[0]
            num_classes = self.hparams["num_classes"] or found[1]
            if not isinstance(num_features, int) or not isinstance(num_classes, int):
                raise ValueError(
                    "Mowst needs num_features and num_classes: pass them, or use a DataModule that has "
                    f"num_features/num_classes attributes (got {type(datamodule).__name__})"
                )
            self._build(num_features, num_classes)
            # so that load_from_checkpoint can rebuild the experts before loading their weights
            self.hparams["num_features"], self.hparams["num_classes"] = num_features, num_classes
        elif isinstance(found[1], int) and found[1] != self.num_classes:
            raise ValueError(
                f"the model has {self.num_classes} classes but {type(datamodule).__name__} has {found[1]}: "
                f"set num_classes: {found[1]}"
            )

    @override
    def on_fit_start(self) -> None:
        schedule = self.schedule
        if schedule.turn_id == 0 and schedule.epochs_in_turn == 0 and not schedule.stopped:
            self._enter_phase(schedule.phase)  # a fresh run (or one resumed before its first epoch)
        if self.hparams["max_turn_epochs"] is None and self.variant == "mowst" and not self.trainer.limit_val_batches:
            rank_zero_warn(
                "Mowst runs without validation and max_turn_epochs=None: turns end on validation patience only, so "
                "the first turn never ends; set max_turn_epochs or enable validation"
            )

    def _require_built(self) -> None:
        if not self._built:
            raise RuntimeError("Mowst is not built yet: pass num_features and num_classes, or fit it with a DataModule")

    # ----------------------------------------------------------------- forward pieces
    def confidence(self, weak_logits: Tensor, x: Tensor) -> Tensor:
        """``C = sigmoid(gate(dispersion))`` (or of ``[dispersion, x]``): ``[N]`` in ``[0, 1]``."""
        gate_in = mowst_dispersion(weak_logits)
        if self.gate_input == "dispersion_features":
            gate_in = torch.cat([gate_in, x.float()], dim=1)
        if self.gate.training and self.hparams["batch_norm"] and gate_in.shape[0] < 2:
            raise ValueError(
                "the gate's BatchNorm needs at least 2 nodes in training mode, got 1: train full-batch "
                "or call model.eval() for single-node inference"
            )
        confidence = torch.sigmoid(self.gate(gate_in.to(x.dtype if x.is_floating_point() else torch.float32)))
        return self._routing(confidence.view(-1))

    def _strong_logits(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.strong(x, edge_index)

    @override
    def forward(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(weak_logits [N, K], strong_logits [N, K], confidence [N])`` for every node."""
        self._require_built()
        weak_logits = self.weak(x)
        return weak_logits, self._strong_logits(x, edge_index), self.confidence(weak_logits, x)

    # ----------------------------------------------------------------- schedule
    def _fresh_schedule(self) -> MowstSchedule:
        hp = self.hparams
        return MowstSchedule(
            self.variant,
            hp["pretrain"],
            hp["first_turn"],
            hp["patience"],
            hp["max_turn_epochs"],
            hp["round_patience"],
            hp["pretrain_epochs"],
            hp["pretrain_patience"],
        )

    @property
    def turn(self) -> str:
        """The current phase: ``"pretrain_strong"``, ``"pretrain_weak"``, ``"pretrain_joint"``,
        ``"weak"``, ``"strong"`` (Mowst) or ``"joint"`` (Mowst*)."""
        return str(self.schedule.phase)

    @property
    def routing(self) -> Routing:
        """How the model routes nodes: ``"gate"`` (the gate's confidence ``C``), ``"strong"`` (``C = 0``:
        every node to the strong expert) or ``"weak"`` (``C = 1``).

        Each pretraining phase routes to the expert it trains, so its validation accuracy is the
        model's and its best weights compete with the turns'; weak turns and Mowst* use the gate.
        A model whose best validation accuracy is its pretrained strong expert ends ``fit`` with
        ``routing == "strong"``. Saved in ``state_dict`` (buffer ``_routing.code``).
        """
        return self._routing.mode

    def _set_routing(self, mode: Routing) -> None:
        self._routing.set(mode)
        self._version += 1  # cached frozen outputs hold the confidence
        self._cache = None

    def _enter_phase(self, phase: str) -> None:
        """Set the routing a phase starts with: pretraining phases use the expert they train, weak turns
        and Mowst* the gate (they train it); a strong turn keeps the routing it inherits (the gate, or
        the strong expert alone when the best model so far is the pretrained strong expert), except
        ``"weak"``, under which the strong expert would get no gradient."""
        if phase == "pretrain_strong":
            self._set_routing("strong")
        elif phase == "pretrain_weak":
            self._set_routing("weak")
        elif phase != "strong" or self.routing == "weak":
            self._set_routing("gate")

    def _experts(self) -> dict[str, nn.Module]:
        """Everything a snapshot holds: the experts, the gate and the routing."""
        return {"weak": self.weak, "strong": self.strong, "gate": self.gate, "_routing": self._routing}

    def _load_snapshot(self, snapshot: dict[str, dict[str, Tensor]] | None) -> None:
        if snapshot is None:
            return
        modules = self._experts()
        for key, state in snapshot.items():
            modules[key].load_state_dict(state)
        self._version += 1
        self._cache = None

    def _load_best(self) -> None:
        self._load_snapshot(self._best_state)

    def _advance(self) -> None:
        """Apply the transition the schedule has pending: restore the ended phase's best weights,
        report it, and stop the trainer when the schedule stopped."""
        schedule = self.schedule
        ended = schedule.advance()
        if ended is None:
            return
        if self.hparams["restore_best"]:
            if ended in ("pretrain_strong", "pretrain_weak"):
                self._load_snapshot(self._phase_best)
            elif ended != "pretrain_joint":
                self._load_best()
        self._phase_best = None
        self._cache = None
        if not schedule.stopped:
            self._enter_phase(schedule.phase)
        row = schedule.history[-1]
        best = "" if row["best_val_acc"] is None else f", best val acc {row['best_val_acc']:.4f}"
        nxt = schedule.stop_reason if schedule.stopped else f"next: {DESCRIPTION[schedule.phase]}"
        rank_zero_info(f"Mowst: {DESCRIPTION[ended]} ended after {row['epochs']} epochs{best}; {nxt}")
        if schedule.stopped and self._trainer is not None:
            self.trainer.should_stop = True

    # ----------------------------------------------------------------- training
    def _frozen(self, which: str, x: Tensor, edge_index: Tensor) -> tuple[Tensor, ...]:
        """Outputs of the frozen side, computed in eval mode without gradient, cached within a turn."""
        key = (self.schedule.turn_id, which, self._version, x.data_ptr(), tuple(x.shape), edge_index.data_ptr())
        if self.hparams["cache_frozen"] and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        with torch.no_grad():
            if which == "strong":
                out: tuple[Tensor, ...] = (self._strong_logits(x, edge_index),)
            else:
                weak_logits = self.weak(x)
                out = (weak_logits, self.confidence(weak_logits, x))
        if self.hparams["cache_frozen"]:
            self._cache = (key, out)
        return out

    def _set_modes(self, phase: str) -> None:
        """Train mode for what this phase trains, eval mode (no dropout, fixed BatchNorm) for the frozen side."""
        self.weak.train(phase in ("weak", "joint", "pretrain_weak", "pretrain_joint"))
        self.gate.train(phase in ("weak", "joint", "pretrain_joint"))
        self.strong.train(phase in ("strong", "joint", "pretrain_strong", "pretrain_joint"))

    def _train_mask(self, batch: Any) -> Tensor:
        mask = batch.train_mask
        if not self._train_mask_checked or mask.dtype != torch.bool:
            mask = check_node_mask(mask, batch.num_nodes, "train_mask", allow_empty=False)
            self._train_mask_checked = True
        return mask

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._require_built()
        self._advance()
        if self.schedule.stopped:
            self.trainer.should_stop = True
            return None
        x, edge_index, y = batch.x, batch.edge_index, batch.y
        first = not self._train_mask_checked  # value checks (host syncs) on the first step only
        idx, scale = self._train_shares(self._train_mask(batch), self.trainer)
        opts = self.optimizers()
        optimizers = opts if isinstance(opts, list) else [opts]
        weak_opt, strong_opt = (optimizers[0], optimizers[-1])
        phase = self.schedule.phase
        ddp = self.trainer.world_size > 1
        extra: Tensor | float = 0.0
        # set every mode explicitly: without validation Lightning never calls train() between epochs
        self._set_modes(phase)
        if phase == "pretrain_joint":
            weak_logits, strong_logits = self.weak(x), self._strong_logits(x, edge_index)
            loss = F.cross_entropy(weak_logits[idx], y[idx]) + F.cross_entropy(strong_logits[idx], y[idx])
            stepping, untouched = optimizers, [self.gate]
            computed = weak_logits.sum() + strong_logits.sum()
        elif phase == "pretrain_strong":
            strong_logits = self._strong_logits(x, edge_index)
            loss = F.cross_entropy(strong_logits[idx], y[idx])
            stepping, untouched = [strong_opt], [self.weak, self.gate]
            computed = strong_logits.sum()
        elif phase == "pretrain_weak":
            weak_logits = self.weak(x)
            loss = F.cross_entropy(weak_logits[idx], y[idx])
            stepping, untouched = [weak_opt], [self.strong, self.gate]
            computed = weak_logits.sum()
        elif phase == "weak":
            (strong_logits,) = self._frozen("strong", x, edge_index)
            weak_logits = self.weak(x)
            conf = self.confidence(weak_logits, x)
            loss = mowst_loss(weak_logits[idx], strong_logits[idx], y[idx], conf[idx], validate_args=first)
            stepping, untouched = [weak_opt], [self.strong]
            computed = weak_logits.sum() + conf.sum()
        elif phase == "strong":
            weak_logits, conf = self._frozen("weak", x, edge_index)
            strong_logits = self._strong_logits(x, edge_index)
            loss = mowst_loss(weak_logits[idx], strong_logits[idx], y[idx], conf[idx], validate_args=first)
            stepping, untouched = [strong_opt], [self.weak, self.gate]
            computed = strong_logits.sum()
        else:
            weak_logits, strong_logits = self.weak(x), self._strong_logits(x, edge_index)
            conf = self.confidence(weak_logits, x)
            loss = mowst_star_loss(weak_logits[idx], strong_logits[idx], y[idx], conf[idx], validate_args=first)
            stepping, untouched = optimizers, []
            computed = weak_logits.sum() + strong_logits.sum() + conf.sum()
        if ddp and untouched:
            extra = _touch(untouched)
        if idx.numel() == 0:  # this rank has no training node: contribute zero gradients
            loss = computed * 0.0
        for optimizer in stepping:
            optimizer.zero_grad()
        self.manual_backward(loss * scale + extra)
        for optimizer in stepping:
            optimizer.step()
        self.schedule.step_done()
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=1)
        self.log("mowst/turn", float(PHASE_CODE[phase]), on_step=False, on_epoch=True, prog_bar=True, batch_size=1)
        return None

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batch: Any, mask: Tensor) -> dict[str, Tensor]:
        """Every accuracy on the nodes of ``mask`` (current mode of the modules: call ``eval()`` first).

        ``mask``: a boolean mask ``[N]`` or an int64 index tensor (validated by
        :func:`~lightning_logits.functional.mowst.check_node_mask`: a 0/1 integer mask is refused).
        Returns ``acc`` (per ``inference``), ``acc_expected``, ``acc_random``, ``acc_deterministic``,
        ``acc_weak``, ``acc_strong``, ``weak_share`` and ``confidence`` (mean ``C``), plus the
        per-node ``C`` under ``"C"`` (``[N_mask]``).
        """
        weak_logits, strong_logits, conf = self(batch.x, batch.edge_index)
        m = check_node_mask(mask, weak_logits.shape[0], "mask", allow_empty=False)
        y = batch.y
        generator = torch.Generator(device=conf.device).manual_seed(self.hparams["route_seed"])
        # draw for every node, so a node's draw does not depend on which mask is evaluated
        routed, to_weak = mowst_route(weak_logits, strong_logits, conf, generator=generator)
        det = mowst_predict(weak_logits, strong_logits, conf, variant=self.variant)
        out = {
            "acc_expected": mowst_expected_accuracy(weak_logits[m], strong_logits[m], y[m], conf[m]),
            "acc_random": (routed[m] == y[m]).float().mean(),
            "acc_deterministic": (det[m] == y[m]).float().mean(),
            "acc_weak": (weak_logits[m].argmax(1) == y[m]).float().mean(),
            "acc_strong": (strong_logits[m].argmax(1) == y[m]).float().mean(),
            "weak_share": to_weak[m].float().mean(),
            "confidence": conf[m].float().mean(),
        }
        out["acc"] = out[f"acc_{self.inference}"]
        out["C"] = conf[m]
        return out

    def _evaluate_and_log(self, batch: Any, prefix: str) -> dict[str, float]:
        self._require_built()
        mask = getattr(batch, f"{prefix}_mask", None)
        if mask is None:
            raise ValueError(f"the graph has no {prefix}_mask: Mowst evaluates the nodes of batch.{prefix}_mask")
        try:
            results = self.evaluate(batch, mask)
        except ValueError as err:
            raise ValueError(f"{prefix}_mask: {err}") from err
        conf = results.pop("C")
        self.last_confidence = conf.detach().cpu()
        # every rank evaluates the whole graph, so the values agree across ranks: no sync needed
        self.log(f"{prefix}/acc", results["acc"], prog_bar=True, batch_size=1)
        for key in ("acc_expected", "acc_random", "acc_deterministic", "acc_weak", "acc_strong"):
            self.log(f"{prefix}/{key}", results[key], batch_size=1)
        self.log("mowst/weak_share", results["weak_share"], batch_size=1)
        self.log("mowst/confidence", results["confidence"], batch_size=1)
        if not self.trainer.sanity_checking:
            _log_histogram(self, f"{prefix}/confidence_hist", conf)
        return {k: float(results[k]) for k in ("acc", "acc_weak", "acc_strong")}

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._last_val = self._evaluate_and_log(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        scores, self._last_val = self._last_val, None
        if self.trainer.sanity_checking or scores is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        self._take_validation(scores)

    def _take_validation(self, scores: dict[str, float]) -> None:
        """Give one validation's accuracies (``acc``, ``acc_weak``, ``acc_strong``) to the schedule,
        snapshot what improved, and apply the transition (before ModelCheckpoint writes the checkpoint)."""
        phase = self.schedule.phase
        score = {"pretrain_strong": scores["acc_strong"], "pretrain_weak": scores["acc_weak"]}.get(phase, scores["acc"])
        phase_improved, best_improved = self.schedule.record(score)
        if phase_improved and phase in ("pretrain_strong", "pretrain_weak"):
            expert = "strong" if phase == "pretrain_strong" else "weak"
            self._phase_best = _snapshot({expert: self._experts()[expert]})
        if best_improved:  # any phase, pretraining included: the model with its routing
            self._best_state = _snapshot(self._experts())
        self._advance()

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate_and_log(batch, "test")

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        """Per node: ``pred`` (random routing with ``route_seed``, or deterministic when
        ``inference="deterministic"``), ``confidence`` ``[N]`` and ``to_weak`` (bool ``[N]``)."""
        self._require_built()
        weak_logits, strong_logits, conf = self(batch.x, batch.edge_index)
        generator = torch.Generator(device=conf.device).manual_seed(self.hparams["route_seed"])
        pred, to_weak = mowst_route(weak_logits, strong_logits, conf, generator=generator)
        if self.inference == "deterministic":
            pred = mowst_predict(weak_logits, strong_logits, conf, variant=self.variant)
            to_weak = conf >= 0.5
        return {"pred": pred, "confidence": conf, "to_weak": to_weak}

    @override
    def on_train_end(self) -> None:
        schedule = self.schedule
        if self.hparams["restore_best"]:  # the best of every phase so far, pretraining included
            self._load_best()
        reason = schedule.stop_reason or (
            f"Mowst: the trainer ended the run (max_epochs, max_steps or another callback) during the "
            f"{DESCRIPTION[schedule.phase]}; best val/acc {schedule.best_val:.4f}"
        )
        rank_zero_info(f"{reason}\nMowst turns:\n{schedule.summary()}")

    @override
    def configure_optimizers(self) -> Any:
        self._require_built()
        if self.variant == "mowst_star":
            joint = self.joint_optimizer or _default_adamw
            return joint([*self.weak.parameters(), *self.gate.parameters(), *self.strong.parameters()])
        weak = self.weak_optimizer or _default_adamw
        strong = self.strong_optimizer or _default_adamw
        return [weak([*self.weak.parameters(), *self.gate.parameters()]), strong(list(self.strong.parameters()))]

    # ----------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mowst"] = {
            "version": CHECKPOINT_VERSION,
            "schedule": self.schedule.state_dict(),
            "best": copy.deepcopy(self._best_state),
            "phase_best": copy.deepcopy(self._phase_best),
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("mowst")
        if saved is not None:
            if saved.get("version", 0) > CHECKPOINT_VERSION:
                raise ValueError(
                    f"this Mowst checkpoint has version {saved['version']}, newer than this library's "
                    f"{CHECKPOINT_VERSION}: upgrade lightning_logits to load it"
                )
            self.schedule.load_state_dict(saved["schedule"])
            self._best_state, self._phase_best = saved["best"], saved.get("phase_best")
        elif "mowst_state" in checkpoint:  # unversioned checkpoints of earlier releases
            self.schedule.load_state_dict(checkpoint["mowst_state"]["state"])
            self._best_state, self._phase_best = checkpoint["mowst_state"]["best"], None
        if self.hparams["restore_best"] and _loading_for_evaluation(self) and self._best_state is not None:
            # evaluate the model fit ends with: its best weights (fit resumes from the raw ones)
            _apply_snapshot_to_checkpoint(checkpoint, self._best_state)
        self._cache = None
        self._version += 1


class GNNClassifier(pl.LightningModule):
    """One expert trained alone, full-batch, with the same split-across-ranks loss as :class:`Mowst`:
    the baseline of the Mowst benchmarks (``"gcn"``, ``"sage"``, ``"gat"``, ``"gin"`` or ``"mlp"``).

    Stops after ``patience`` validations without a better ``val/acc`` (the rule of Mowst's turns,
    :class:`~lightning_logits.modules.mowst_schedule.Plateau`) and restores the best weights
    (``restore_best``) before the last checkpoint is written; a checkpoint loaded for evaluation
    gets the best weights it holds. Logged: ``train/loss``, ``val/acc``, ``test/acc``.

    Args:
        model: expert name or any module (called ``model(x, edge_index)``, or ``model(x)`` for ``"mlp"``).
        norm: ``"batch"``: BatchNorm after each hidden GNN layer (the MLP always has one).
        optimizer: callable taking the parameters and returning the optimizer. Default: AdamW,
            lr 1e-3, weight decay 5e-4.

    Example:
        >>> from lightning_logits.data.graphs import csbm_graph
        >>> data = csbm_graph(num_nodes=60, num_classes=3, num_features=8)
        >>> GNNClassifier("gcn", num_features=8, num_classes=3, norm="batch")(data.x, data.edge_index).shape
        torch.Size([60, 3])
    """

    def __init__(
        self,
        model: Literal["gcn", "sage", "gat", "gin", "mlp"] | nn.Module = "gcn",
        num_features: int | None = None,
        num_classes: int | None = None,
        hidden: int = 64,
        num_layers: int = 2,
        dropout: float = 0.5,
        norm: Literal["batch"] | None = None,
        optimizer: OptimizerCallable | None = None,
        patience: int = 20,
        restore_best: bool = True,
    ) -> None:
        super().__init__()
        _check_choice("norm", norm, ("batch", None))
        if isinstance(model, str):
            _check_choice("model", model, (*GNN_NAMES, "mlp"))
        Plateau(patience)
        self.save_hyperparameters(ignore=["optimizer", *(["model"] if isinstance(model, nn.Module) else [])])
        self.optimizer_factory = optimizer
        self._model_arg = model
        self.model: nn.Module
        self._built = False
        if num_features is not None and num_classes is not None:
            self._build(num_features, num_classes)
        self.plateau = Plateau(patience)
        self._train_shares = _TrainShares()
        self._best_state: dict[str, dict[str, Tensor]] | None = None
        self._last_val_acc: float | None = None
        self.stop_reason = ""

    def _build(self, num_features: int, num_classes: int) -> None:
        hp = self.hparams
        if isinstance(self._model_arg, nn.Module):
            self.model = self._model_arg
        else:
            self.model = build_expert(
                self._model_arg,
                num_features,
                num_classes,
                hp["hidden"],
                hp["num_layers"],
                hp["dropout"],
                norm=hp["norm"],
            )
        self.uses_graph = self._model_arg != "mlp"
        self._built = True

    @override
    def setup(self, stage: str) -> None:
        if not self._built:
            dm = getattr(self.trainer, "datamodule", None)
            num_features = self.hparams["num_features"] or getattr(dm, "num_features", None)
            num_classes = self.hparams["num_classes"] or getattr(dm, "num_classes", None)
            if not isinstance(num_features, int) or not isinstance(num_classes, int):
                raise ValueError("GNNClassifier needs num_features and num_classes, or a DataModule that has them")
            self._build(num_features, num_classes)
            self.hparams["num_features"], self.hparams["num_classes"] = num_features, num_classes

    @override
    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.model(x, edge_index) if self.uses_graph else self.model(x)

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        mask = batch.train_mask
        if mask.dtype != torch.bool or self.global_step == 0:
            mask = check_node_mask(mask, batch.num_nodes, "train_mask", allow_empty=False)
        idx, scale = self._train_shares(mask, self.trainer)
        logits = self(batch.x, batch.edge_index)
        loss = F.cross_entropy(logits[idx], batch.y[idx]) if idx.numel() else logits.sum() * 0.0
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=1)
        return loss * scale

    def _acc(self, batch: Any, prefix: str) -> float:
        mask = check_node_mask(getattr(batch, f"{prefix}_mask"), batch.num_nodes, f"{prefix}_mask", allow_empty=False)
        acc = (self(batch.x, batch.edge_index)[mask].argmax(1) == batch.y[mask]).float().mean()
        self.log(f"{prefix}/acc", acc, prog_bar=True, batch_size=1)
        return float(acc)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._last_val_acc = self._acc(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._last_val_acc is None or self.trainer.state.fn != TrainerFn.FITTING:
            return
        acc, self._last_val_acc = self._last_val_acc, None
        if self.plateau.update(acc):
            self._best_state = _snapshot({"model": self.model})
        elif self.plateau.exhausted and not self.stop_reason:
            self.stop_reason = (
                f"GNNClassifier stopped: {self.plateau.patience} validations without a better val/acc; "
                f"best {self.plateau.best:.4f}"
            )
            rank_zero_info(self.stop_reason)
            if self.hparams["restore_best"]:  # before ModelCheckpoint writes the last checkpoint
                self._restore()
            self.trainer.should_stop = True

    def _restore(self) -> None:
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state["model"])

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._acc(batch, "test")

    @override
    def on_train_end(self) -> None:
        if self.hparams["restore_best"]:
            self._restore()

    @override
    def configure_optimizers(self) -> Any:
        return (self.optimizer_factory or _default_adamw)(self.model.parameters())

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gnn_classifier"] = {
            "version": CHECKPOINT_VERSION,
            "best": self.plateau.best,
            "bad": self.plateau.bad,
            "state": copy.deepcopy(self._best_state),
            "stop_reason": self.stop_reason,
        }

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("gnn_classifier")
        if saved is None and "gnn_best" in checkpoint:  # earlier releases
            old = checkpoint["gnn_best"]
            saved = {"best": old["acc"], "bad": old["bad"], "state": old["state"], "stop_reason": ""}
        if saved is None:
            return
        self.plateau.best, self.plateau.bad = saved["best"], saved["bad"]
        self._best_state, self.stop_reason = saved["state"], saved["stop_reason"]
        if self.hparams["restore_best"] and _loading_for_evaluation(self) and self._best_state is not None:
            _apply_snapshot_to_checkpoint(checkpoint, self._best_state)

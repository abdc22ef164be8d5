"""Mowst: a weak MLP expert and a strong GNN expert mixed by a learned confidence gate (full-batch).

:class:`Mowst` trains both experts and the gate on one graph (one full-batch step per epoch) and
:class:`GNNClassifier` trains one expert alone, the baseline Mowst is compared with. The losses
and the inference rules live in :mod:`lightning_logits.functional.mowst`.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

from lightning_logits.functional.mowst import (
    mowst_dispersion,
    mowst_expected_accuracy,
    mowst_loss,
    mowst_predict,
    mowst_route,
    mowst_star_loss,
)
from lightning_logits.networks.factory import build_expert

__all__ = ["GNNClassifier", "Mowst"]

GNN_NAMES = ("gcn", "sage", "gat", "gin")
VARIANTS = ("mowst", "mowst_star")
GATE_INPUTS = ("dispersion", "dispersion_features")
INFERENCE = ("expected", "random", "deterministic")
_TURN_CODE = {"pretrain": 0, "weak": 1, "strong": 2, "joint": 3}


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


def _log_histogram(module: pl.LightningModule, tag: str, values: Tensor) -> None:
    """Histogram through the logger's experiment when it has ``add_histogram`` (TensorBoard), else nothing."""
    if module._trainer is None or not module.trainer.is_global_zero:
        return
    for logger in module.loggers:
        experiment = getattr(logger, "experiment", None)
        add = getattr(experiment, "add_histogram", None)
        if callable(add):
            add(tag, values.detach().float().cpu(), module.global_step)


class Mowst(pl.LightningModule):
    """Mixture of a weak expert (MLP on node features) and a strong expert (GNN), full-batch.

    The gate maps the weak expert's dispersion (:func:`~lightning_logits.functional.mowst.mowst_dispersion`),
    optionally concatenated with the node features, to the confidence ``C = sigmoid(gate(.))``, the
    weight of the weak expert.

    * ``variant="mowst"``: loss :func:`~lightning_logits.functional.mowst.mowst_loss`. Training
      alternates turns: the weak expert and the gate (strong expert frozen, in eval mode), then the
      strong expert (weak expert and gate frozen, in eval mode), each with its own AdamW and its own
      early stopping on ``val/acc``: a turn ends after ``patience`` validations without improvement
      or ``max_turn_epochs`` epochs, and then the best weights seen so far are restored. Training
      stops when ``round_patience`` + 1 consecutive rounds (weak turn + strong turn) do not improve.
      Manual optimization: the frozen expert's outputs are computed once per turn when
      ``cache_frozen`` (exact: it is deterministic in eval mode).
    * ``variant="mowst_star"``: one AdamW over everything, loss
      :func:`~lightning_logits.functional.mowst.mowst_star_loss`, stops after ``patience``
      validations without improvement.

    One epoch is one full-batch optimizer step. Each step trains on the graph's ``train_mask``;
    under DDP every rank holds the whole graph and trains on its share of the training nodes
    (gradients are averaged exactly as one process would compute them).

    Args:
        weak: the weak expert, any ``nn.Module`` mapping ``x [N, F]`` to ``[N, K]`` (default: an MLP
            with BatchNorm of ``hidden`` width and ``num_layers`` layers).
        strong: ``"gcn"``, ``"sage"``, ``"gat"``, ``"gin"`` (torch-geometric models of the same width
            and depth) or any module called as ``strong(x, edge_index) -> [N, K]``.
        variant: ``"mowst"`` or ``"mowst_star"``.
        gate_input: ``"dispersion"`` (``[N, 2]``) or ``"dispersion_features"`` (``[N, 2 + F]``).
        num_features, num_classes: read off the DataModule (``num_features``/``num_classes``) when
            ``None``.
        hidden, num_layers, dropout: size of the default experts and of the gate MLP.
        batch_norm: BatchNorm in the default weak MLP and in the gate (the official ``no_batch_norm``
            flag turns it off).
        lr, weight_decay: AdamW of every optimizer.
        patience: validations without improvement that end a turn (Mowst) or training (Mowst*).
        max_turn_epochs: longest turn in epochs (Mowst); also what alternates turns when no
            validation runs.
        round_patience: rounds without improvement tolerated before stopping (Mowst).
        pretrain_epochs: epochs of plain cross-entropy training of both experts before the first turn
            (no early stopping). Recommended (e.g. 20): starting from an untrained GNN, the first
            weak turn tends to saturate the gate at ``C ~ 1`` (the loss is linear in ``C``), and the
            GNN then learns little from its ``(1 - C)``-weighted loss (seen on homophilous CSBM graphs).
        first_turn: ``"weak"`` (as the paper) or ``"strong"``.
        inference: what ``val/acc`` and ``test/acc`` report: ``"expected"`` (exact expected accuracy
            of random routing; the Mowst default), ``"random"`` (one routing drawn with
            ``route_seed``) or ``"deterministic"`` (route by ``C >= 0.5``; for Mowst* the mixture of
            probabilities: the Mowst* default). All three are logged under their own names too.
        route_seed: seed of the random routing at evaluation.
        cache_frozen: reuse the frozen expert's outputs within a turn.
        restore_best: load the weights with the best ``val/acc`` when training ends.

    Logged: ``train/loss``, ``train/turn`` (0 pretrain, 1 weak, 2 strong, 3 joint),
    ``val/acc``, ``val/acc_expected``, ``val/acc_random``, ``val/acc_deterministic``,
    ``val/acc_weak``, ``val/acc_strong``, ``val/weak_share`` (share of nodes the random routing sent
    to the weak expert), ``val/confidence``; the same under ``test/``. A histogram of ``C`` goes to
    loggers whose experiment has ``add_histogram`` (TensorBoard); the last ``C`` is kept in
    :attr:`last_confidence`.

    Example:
        >>> from lightning_logits.data.graphs import csbm_graph
        >>> data = csbm_graph(num_nodes=60, num_classes=3, num_features=8)
        >>> model = Mowst(strong="gcn", num_features=8, num_classes=3, hidden=16)
        >>> weak_logits, strong_logits, confidence = model(data.x, data.edge_index)
        >>> weak_logits.shape, confidence.shape
        (torch.Size([60, 3]), torch.Size([60]))
    """

    def __init__(
        self,
        weak: nn.Module | None = None,
        strong: str | nn.Module = "gcn",
        variant: str = "mowst",
        gate_input: str = "dispersion",
        num_features: int | None = None,
        num_classes: int | None = None,
        hidden: int = 64,
        num_layers: int = 2,
        dropout: float = 0.5,
        batch_norm: bool = True,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        patience: int = 20,
        max_turn_epochs: int = 200,
        round_patience: int = 1,
        pretrain_epochs: int = 0,
        first_turn: str = "weak",
        inference: str | None = None,
        route_seed: int = 0,
        cache_frozen: bool = True,
        restore_best: bool = True,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        if inference is not None and inference not in INFERENCE:
            raise ValueError(f"inference must be one of {INFERENCE} or None, got {inference!r}")
        if first_turn not in ("weak", "strong"):
            raise ValueError(f"first_turn must be 'weak' or 'strong', got {first_turn!r}")
        if isinstance(strong, str) and strong not in GNN_NAMES:
            raise ValueError(
                f"strong must be one of {GNN_NAMES} or an nn.Module taking (x, edge_index), got {strong!r}"
            )
        if min(patience, max_turn_epochs, round_patience + 1, pretrain_epochs + 1) < 1 or max_turn_epochs < 1:
            raise ValueError(
                f"need patience >= 1, max_turn_epochs >= 1, round_patience >= 0, pretrain_epochs >= 0; got "
                f"{patience}, {max_turn_epochs}, {round_patience}, {pretrain_epochs}"
            )
        ignore = [name for name, value in (("weak", weak), ("strong", strong)) if isinstance(value, nn.Module)]
        self.save_hyperparameters(ignore=ignore)
        self.automatic_optimization = False
        self.variant, self.gate_input = variant, gate_input
        self.inference = inference or ("expected" if variant == "mowst" else "deterministic")
        self._weak_arg, self._strong_arg = weak, strong
        self.weak: nn.Module
        self.strong: nn.Module
        self.gate: nn.Module
        self._built = False
        if num_features is not None and num_classes is not None:
            self._build(num_features, num_classes)
        self.last_confidence: Tensor | None = None
        self._state = self._fresh_state()
        self._best_state: dict[str, dict[str, Tensor]] | None = None
        self._cache: tuple[tuple[Any, ...], tuple[Tensor, ...]] | None = None
        self._version = 0  # bumped whenever weights are loaded, so cached frozen outputs are dropped
        self._last_val_acc: float | None = None

    # ----------------------------------------------------------------- building
    def _build(self, num_features: int, num_classes: int) -> None:
        hp = self.hparams
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_features, self.num_classes = num_features, num_classes
        self.weak = (
            self._weak_arg
            if self._weak_arg is not None
            else build_expert(
                "mlp", num_features, num_classes, hp["hidden"], hp["num_layers"], hp["dropout"], hp["batch_norm"]
            )
        )
        if isinstance(self._strong_arg, nn.Module):
            self.strong = self._strong_arg
        else:
            self.strong = build_expert(
                self._strong_arg, num_features, num_classes, hp["hidden"], hp["num_layers"], hp["dropout"]
            )
        gate_in = 2 + (num_features if self.gate_input == "dispersion_features" else 0)
        self.gate = build_expert("mlp", gate_in, 1, hp["hidden"], hp["num_layers"], hp["dropout"], hp["batch_norm"])
        self._built = True

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
        return torch.sigmoid(self.gate(gate_in.to(x.dtype if x.is_floating_point() else torch.float32))).view(-1)

    def _strong_logits(self, x: Tensor, edge_index: Tensor) -> Tensor:
        return self.strong(x, edge_index)

    @override
    def forward(self, x: Tensor, edge_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(weak_logits [N, K], strong_logits [N, K], confidence [N])`` for every node."""
        self._require_built()
        weak_logits = self.weak(x)
        return weak_logits, self._strong_logits(x, edge_index), self.confidence(weak_logits, x)

    # ----------------------------------------------------------------- turn state
    def _fresh_state(self) -> dict[str, Any]:
        first = "pretrain" if self.hparams["pretrain_epochs"] > 0 else self._first_turn()
        return {
            "turn": first,
            "turn_id": 0,
            "epochs_in_turn": 0,
            "turn_best": -1.0,
            "turn_bad": 0,
            "turn_done": False,
            "best_val": -1.0,
            "round_start_best": -1.0,
            "rounds_bad": 0,
            "stopped": False,
        }

    def _first_turn(self) -> str:
        return "joint" if self.variant == "mowst_star" else self.hparams["first_turn"]

    @property
    def turn(self) -> str:
        """The current phase: ``"pretrain"``, ``"weak"``, ``"strong"`` (Mowst) or ``"joint"`` (Mowst*)."""
        return str(self._state["turn"])

    def _experts(self) -> dict[str, nn.Module]:
        return {"weak": self.weak, "strong": self.strong, "gate": self.gate}

    def _load_best(self) -> None:
        if self._best_state is None:
            return
        for key, module in self._experts().items():
            module.load_state_dict(self._best_state[key])
        self._version += 1

    def _start_turn(self, turn: str) -> None:
        self._state.update(turn=turn, turn_id=self._state["turn_id"] + 1, epochs_in_turn=0)
        self._state.update(turn_best=-1.0, turn_bad=0, turn_done=False)
        self._cache = None

    def _advance(self) -> None:
        """Apply the transition the last epoch asked for (run at the start of a step, so a
        checkpoint taken between epochs resumes into the same transition)."""
        s, hp = self._state, self.hparams
        if s["stopped"]:
            return
        if s["turn"] == "pretrain":
            if s["epochs_in_turn"] >= hp["pretrain_epochs"]:
                self._start_turn(self._first_turn())
            return
        limit_hit = s["epochs_in_turn"] >= hp["max_turn_epochs"] and s["turn"] != "joint"
        if not (s["turn_done"] or limit_hit):
            return
        if hp["restore_best"]:
            self._load_best()
        if s["turn"] == "joint":
            s["stopped"] = True
            return
        if s["turn"] != self._first_turn():  # the second turn of a round ends the round
            s["rounds_bad"] = 0 if s["best_val"] > s["round_start_best"] else s["rounds_bad"] + 1
            s["round_start_best"] = s["best_val"]
            if s["rounds_bad"] > hp["round_patience"]:
                s["stopped"] = True
                return
        self._start_turn("strong" if s["turn"] == "weak" else "weak")

    def _record_validation(self, acc: float) -> None:
        s = self._state
        if s["turn"] == "pretrain" or s["stopped"]:
            return
        if acc > s["turn_best"]:
            s["turn_best"], s["turn_bad"] = acc, 0
        else:
            s["turn_bad"] += 1
        if acc > s["best_val"]:
            s["best_val"] = acc
            self._best_state = _snapshot(self._experts())
        if s["turn_bad"] >= self.hparams["patience"]:
            s["turn_done"] = True

    # ----------------------------------------------------------------- training
    def _frozen(self, which: str, x: Tensor, edge_index: Tensor) -> tuple[Tensor, ...]:
        """Outputs of the frozen side, computed in eval mode without gradient, cached within a turn."""
        key = (self._state["turn_id"], which, self._version, x.data_ptr(), tuple(x.shape), edge_index.data_ptr())
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

    def _set_modes(self, turn: str) -> None:
        """Train mode for what this turn trains, eval mode (no dropout, fixed BatchNorm) for the frozen side."""
        self.weak.train(turn != "strong")
        self.gate.train(turn != "strong")
        self.strong.train(turn != "weak")

    @override
    def training_step(self, batch: Any, batch_idx: int) -> None:
        self._require_built()
        self._advance()
        if self._state["stopped"]:
            self.trainer.should_stop = True
            return None
        x, edge_index, y = batch.x, batch.edge_index, batch.y
        idx, scale = _train_share(batch.train_mask, self.trainer)
        opts = self.optimizers()
        optimizers = opts if isinstance(opts, list) else [opts]
        turn = self._state["turn"]
        ddp = self.trainer.world_size > 1
        extra: Tensor | float = 0.0
        # set every mode explicitly: without validation Lightning never calls train() between epochs
        self._set_modes(turn)
        if turn == "pretrain":
            weak_logits, strong_logits = self.weak(x), self._strong_logits(x, edge_index)
            loss = F.cross_entropy(weak_logits[idx], y[idx]) + F.cross_entropy(strong_logits[idx], y[idx])
            stepping = optimizers
            if ddp:
                extra = _touch([self.gate])
        elif turn == "weak":
            (strong_logits,) = self._frozen("strong", x, edge_index)
            weak_logits = self.weak(x)
            conf = self.confidence(weak_logits, x)
            loss = mowst_loss(weak_logits[idx], strong_logits[idx], y[idx], conf[idx])
            stepping = optimizers[:1]
            if ddp:
                extra = _touch([self.strong])
        elif turn == "strong":
            weak_logits, conf = self._frozen("weak", x, edge_index)
            strong_logits = self._strong_logits(x, edge_index)
            loss = mowst_loss(weak_logits[idx], strong_logits[idx], y[idx], conf[idx])
            stepping = optimizers[1:]
            if ddp:
                extra = _touch([self.weak, self.gate])
        else:
            weak_logits, strong_logits = self.weak(x), self._strong_logits(x, edge_index)
            conf = self.confidence(weak_logits, x)
            loss = mowst_star_loss(weak_logits[idx], strong_logits[idx], y[idx], conf[idx])
            stepping = optimizers
        if idx.numel() == 0:  # this rank has no training node: contribute zero gradients
            loss = (weak_logits.sum() + strong_logits.sum()) * 0.0
        for optimizer in stepping:
            optimizer.zero_grad()
        self.manual_backward(loss * scale + extra)
        for optimizer in stepping:
            optimizer.step()
        self._state["epochs_in_turn"] += 1
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=1)
        self.log("train/turn", float(_TURN_CODE[turn]), on_step=False, on_epoch=True, batch_size=1)
        return None

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batch: Any, mask: Tensor) -> dict[str, Tensor]:
        """Every accuracy on the nodes of ``mask`` (current mode of the modules: call ``eval()`` first).

        Returns ``acc`` (per ``inference``), ``acc_expected``, ``acc_random``, ``acc_deterministic``,
        ``acc_weak``, ``acc_strong``, ``weak_share`` and ``confidence`` (mean ``C``), plus the
        per-node ``C`` under ``"C"`` (``[N_mask]``).
        """
        weak_logits, strong_logits, conf = self(batch.x, batch.edge_index)
        y = batch.y
        generator = torch.Generator(device=conf.device).manual_seed(self.hparams["route_seed"])
        # draw for every node, so a node's draw does not depend on which mask is evaluated
        routed, to_weak = mowst_route(weak_logits, strong_logits, conf, generator=generator)
        det = mowst_predict(weak_logits, strong_logits, conf, variant=self.variant)
        m = mask
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

    def _evaluate_and_log(self, batch: Any, prefix: str) -> float:
        self._require_built()
        results = self.evaluate(batch, getattr(batch, f"{prefix}_mask"))
        conf = results.pop("C")
        self.last_confidence = conf.detach().cpu()
        # every rank evaluates the whole graph, so the values agree across ranks: no sync needed
        acc = results.pop("acc")
        self.log(f"{prefix}/acc", acc, prog_bar=True, batch_size=1)
        self.log_dict({f"{prefix}/{k}": v for k, v in results.items()}, batch_size=1)
        if not self.trainer.sanity_checking:
            _log_histogram(self, f"{prefix}/confidence_hist", conf)
        return float(acc)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._last_val_acc = self._evaluate_and_log(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._last_val_acc is None:
            return
        if self.trainer.state.fn == "fit":
            self._record_validation(self._last_val_acc)
        self._last_val_acc = None

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
        if self.hparams["restore_best"]:
            self._load_best()

    @override
    def configure_optimizers(self) -> Any:
        self._require_built()
        hp = self.hparams

        def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
            return torch.optim.AdamW(params, lr=hp["lr"], weight_decay=hp["weight_decay"])

        if self.variant == "mowst_star":
            return adamw([*self.weak.parameters(), *self.gate.parameters(), *self.strong.parameters()])
        return [adamw([*self.weak.parameters(), *self.gate.parameters()]), adamw(list(self.strong.parameters()))]

    # ----------------------------------------------------------------- checkpoints
    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["mowst_state"] = {"state": dict(self._state), "best": copy.deepcopy(self._best_state)}

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("mowst_state")
        if saved is not None:
            self._state = dict(saved["state"])
            self._best_state = saved["best"]
        self._cache = None
        self._version += 1


class GNNClassifier(pl.LightningModule):
    """One expert trained alone, full-batch, with the same split-across-ranks loss as :class:`Mowst`:
    the baseline of the Mowst benchmarks (``"gcn"``, ``"sage"``, ``"gat"``, ``"gin"`` or ``"mlp"``).

    Stops after ``patience`` validations without a better ``val/acc`` and restores the best weights
    (``restore_best``). Logged: ``train/loss``, ``val/acc``, ``test/acc``.

    Example:
        >>> from lightning_logits.data.graphs import csbm_graph
        >>> data = csbm_graph(num_nodes=60, num_classes=3, num_features=8)
        >>> GNNClassifier("gcn", num_features=8, num_classes=3)(data.x, data.edge_index).shape
        torch.Size([60, 3])
    """

    def __init__(
        self,
        model: str | nn.Module = "gcn",
        num_features: int | None = None,
        num_classes: int | None = None,
        hidden: int = 64,
        num_layers: int = 2,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 5e-4,
        patience: int = 20,
        restore_best: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"] if isinstance(model, nn.Module) else [])
        self._model_arg = model
        self.model: nn.Module
        self._built = False
        if num_features is not None and num_classes is not None:
            self._build(num_features, num_classes)
        self._best: dict[str, Any] = {"acc": -1.0, "bad": 0, "state": None}
        self._last_val_acc: float | None = None

    def _build(self, num_features: int, num_classes: int) -> None:
        hp = self.hparams
        if isinstance(self._model_arg, nn.Module):
            self.model = self._model_arg
        else:
            self.model = build_expert(
                self._model_arg, num_features, num_classes, hp["hidden"], hp["num_layers"], hp["dropout"]
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
        idx, scale = _train_share(batch.train_mask, self.trainer)
        logits = self(batch.x, batch.edge_index)
        loss = F.cross_entropy(logits[idx], batch.y[idx]) if idx.numel() else logits.sum() * 0.0
        self.log("train/loss", loss.detach(), on_step=False, on_epoch=True, prog_bar=True, batch_size=1)
        return loss * scale

    def _acc(self, batch: Any, prefix: str) -> float:
        mask = getattr(batch, f"{prefix}_mask")
        acc = (self(batch.x, batch.edge_index)[mask].argmax(1) == batch.y[mask]).float().mean()
        self.log(f"{prefix}/acc", acc, prog_bar=True, batch_size=1)
        return float(acc)

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._last_val_acc = self._acc(batch, "val")

    @override
    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or self._last_val_acc is None or self.trainer.state.fn != "fit":
            return
        acc, self._last_val_acc = self._last_val_acc, None
        if acc > self._best["acc"]:
            self._best.update(acc=acc, bad=0, state=_snapshot({"model": self.model}))
        else:
            self._best["bad"] += 1
            if self._best["bad"] >= self.hparams["patience"]:
                self.trainer.should_stop = True

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._acc(batch, "test")

    @override
    def on_train_end(self) -> None:
        if self.hparams["restore_best"] and self._best["state"] is not None:
            self.model.load_state_dict(self._best["state"]["model"])

    @override
    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(
            self.model.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
        )

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["gnn_best"] = copy.deepcopy(self._best)

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "gnn_best" in checkpoint:
            self._best = checkpoint["gnn_best"]

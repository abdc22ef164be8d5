"""A LightningModule that trains a causal language model (a Hugging Face model, a config, or a name)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_logits.functional.distillation_fused import fused_linear_cross_entropy
from lightning_logits.loss_terms import DeferredTaskLoss, LossTermHub, StepScalars
from lightning_logits.modules.classifier import optimizers_from_config
from lightning_logits.networks.causal_lm import build_causal_lm, causal_lm_hidden_states, causal_lm_logits
from lightning_logits.networks.heads import count_classes

__all__ = ["CausalLM", "TokenMeanLoss", "next_token_target"]

IGNORE = -100  # the ignored label in what training_step returns, whatever the batch used


def next_token_target(
    input_ids: Tensor,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    position_ids: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """``[B, T]`` next-token targets aligned with the logits: ``target[:, t]`` is the token after position ``t``.

    ``labels`` (default ``input_ids``) follow the Hugging Face convention: not shifted, ``ignore_index``
    where no loss is wanted. Position ``t`` gets ``labels[:, t + 1]``, or ``-100`` (always -100 in the
    result) where

    - ``t`` is the last position (nothing follows it),
    - ``labels[:, t + 1] == ignore_index``,
    - ``attention_mask`` is 0 at ``t`` or at ``t + 1`` (padding, left or right),
    - ``position_ids[:, t + 1] == 0``: a new packed document starts at ``t + 1``, so the last token
      of one document never predicts the first token of the next.

    Keeping all ``T`` positions (rather than slicing the logits to ``T - 1``) means the student's
    and a teacher's ``[B, T, V]`` logits line up without a copy.

    Example:
        >>> ids = torch.tensor([[5, 6, 7, 8, 9]])
        >>> next_token_target(ids).tolist()
        [[6, 7, 8, 9, -100]]
        >>> next_token_target(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1]])).tolist()  # two documents
        [[6, 7, -100, 9, -100]]
    """
    if labels is None:
        labels = input_ids
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"labels must have the shape of input_ids {list(input_ids.shape)} (not shifted: the module shifts "
            f"them), got {list(labels.shape)}"
        )
    following = labels[:, 1:]
    drop = following == ignore_index
    if attention_mask is not None:
        keep = attention_mask.bool()
        drop = drop | ~keep[:, 1:] | ~keep[:, :-1]
    if position_ids is not None:
        drop = drop | (position_ids[:, 1:] == 0)
    shifted = torch.where(drop, torch.full_like(following, IGNORE), following)
    last = torch.full_like(labels[:, :1], IGNORE)
    return torch.cat([shifted, last], dim=1)


class TokenMeanLoss(Metric):
    """Token-weighted mean of per-batch mean losses, summed across processes; no host read in ``update``.

    (torchmetrics' ``MeanMetric`` drops the weights when its NaN check is disabled, and the check
    reads a value on the host every update.)

    Example:
        >>> metric = TokenMeanLoss()
        >>> metric.update(torch.tensor(1.0), torch.tensor(3))
        >>> metric.update(torch.tensor(2.0), torch.tensor(1))
        >>> metric.compute()
        tensor(1.2500)
    """

    full_state_update = False
    total: Tensor
    count: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, loss: Tensor, count: Tensor) -> None:
        """Add a batch whose mean loss over ``count`` tokens is ``loss``."""
        self.total += loss.detach().double() * count
        self.count += count

    def compute(self) -> Tensor:
        """The mean loss per token (0 before any token)."""
        return (self.total / self.count.clamp_min(1)).float()


class CausalLM(pl.LightningModule):
    """Train a causal language model with next-token cross-entropy; log loss and perplexity.

    The model is a Hugging Face ``AutoModelForCausalLM`` (or any module that maps token ids
    ``[B, T]`` to logits ``[B, T, V]``): pass the instance, a ``transformers`` config (object, or a
    dict with ``model_type``: built with ``from_config``, random weights, nothing downloaded), or a
    model name (``from_pretrained``: needs internet or a local copy). Distillation callbacks such
    as :class:`~lightning_logits.callbacks.TeacherDistillation` work on it unchanged: the training
    step returns ``{"loss", "logits": [B, T, V], "target": [B, T]}`` with ``-100`` at the positions
    that get no loss, and the teacher is called on the same keyword inputs (``model_inputs``), so
    a Hugging Face teacher sees the student's padding and packing.

    **Fused head loss** (``logits="fused"``): the ``[B, T, V]`` logits are never built, in training,
    validation or test. The step takes the last hidden states ``[B, T, H]`` from the model's base
    (``model.base_model``) and the head's weight (``model.get_output_embeddings()``), and computes
    the cross-entropy with :func:`~lightning_logits.functional.fused_linear_cross_entropy`, a
    chunk of tokens at a time (``fused_chunk_size``): at a 32k vocabulary the logits and their
    gradient are most of a small model's activation memory. The training step then returns
    ``{"loss", "hidden_states": [B, T, H], "head_weight": [V, H], "head_bias", "target", ...}``
    (no ``"logits"``), which :class:`~lightning_logits.callbacks.TeacherDistillation` distills
    from with the fused distillation loss. With a loss-term callback attached, ``"loss"`` is a
    :class:`~lightning_logits.loss_terms.DeferredTaskLoss`: a distillation callback computes the
    cross-entropy and its own term in the same pass over the vocabulary, and the module's
    cross-entropy is computed by the module only when no callback did (never twice). Either way
    ``train/loss`` and ``train/ppl`` are logged as in the full mode. It needs a Hugging Face
    causal LM whose logits are ``F.linear(last hidden state, head)`` (checked on the first step:
    a model with logit soft-capping or scaling is refused), and loss-term callbacks that read
    logits (other than TeacherDistillation's fused losses) raise a clear error.

    **Batches**: a mapping with ``input_ids`` ``[B, T]`` and optionally ``labels`` (not shifted,
    ``ignore_index`` where no loss is wanted; default: ``input_ids``), ``attention_mask`` (padded
    batches) or ``position_ids`` (packed batches: per-document positions restarting at 0, see
    :func:`~lightning_logits.data.packing.pack_documents`; give no ``attention_mask`` then, so
    ``transformers`` keeps the documents apart), and ``index`` (sample indices, for a teacher-logit
    cache); or a tuple ``(input_ids, labels[, index])``; or a tensor of token ids. Targets are
    built by :func:`next_token_target`.

    Args:
        model: an ``nn.Module``, a ``transformers.PretrainedConfig``, a config dict with
            ``model_type``, or a model name (see :func:`~lightning_logits.networks.causal_lm.build_causal_lm`).
        model_kwargs: keyword arguments of ``from_config``/``from_pretrained``.
        ignore_index: the label value that means "no loss here" in the batches (default -100).
        optimizer: a callable that takes the parameters and returns an optimizer (in a YAML, a
            ``class_path`` such as ``torch.optim.AdamW`` with ``init_args``). Default: AdamW, lr 1e-3.
        lr_scheduler: a callable that takes the optimizer and returns a scheduler. Default: none.
        lr_scheduler_interval: step the scheduler every ``"step"`` (default, as LM warm-up/cosine
            schedules expect) or every ``"epoch"``.
        logits: ``"full"`` (default): build the ``[B, T, V]`` logits and take ``F.cross_entropy``;
            ``"fused"``: never build them (see above).
        fused_chunk_size: tokens per chunk of the fused loss (``None``: its default, about
            ``N * H / V`` tokens, so one chunk of logits is as large as the hidden states).

    Logged: ``train/loss`` (the mean cross-entropy over the step's target tokens, per step every
    ``log_every_n_steps`` and its epoch mean), ``train/ppl`` (the exponential of the epoch's
    token-weighted mean cross-entropy), ``val/loss`` and ``val/ppl`` (token-weighted over the
    validation set, synchronized across processes); the same under ``test/``.

    Example:
        >>> lm = CausalLM({"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        ...                "num_hidden_layers": 1, "num_attention_heads": 2})
        >>> out = lm.training_step({"input_ids": torch.randint(0, 64, (2, 5))}, 0)
        >>> out["logits"].shape, out["target"].shape, bool(out["loss"] > 0)
        (torch.Size([2, 5, 64]), torch.Size([2, 5]), True)
        >>> fused = CausalLM(lm.model, logits="fused")  # the same model, no [B, T, V] logits
        >>> out = fused.training_step({"input_ids": torch.randint(0, 64, (2, 5))}, 0)
        >>> "logits" in out, out["hidden_states"].shape, out["head_weight"].shape
        (False, torch.Size([2, 5, 16]), torch.Size([64, 16]))
    """

    def __init__(
        self,
        model: str | dict[str, Any] | nn.Module,
        model_kwargs: dict[str, Any] | None = None,
        ignore_index: int = -100,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_scheduler_interval: Literal["step", "epoch"] = "step",
        logits: Literal["full", "fused"] = "full",
        fused_chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(f"lr_scheduler_interval must be 'step' or 'epoch', got {lr_scheduler_interval!r}")
        if logits not in ("full", "fused"):
            raise ValueError(
                f"logits must be 'full' (build the [B, T, V] logits) or 'fused' (never build them), got {logits!r}"
            )
        if fused_chunk_size is not None and (
            isinstance(fused_chunk_size, bool) or not isinstance(fused_chunk_size, int) or fused_chunk_size < 1
        ):
            raise ValueError(f"fused_chunk_size must be a positive number of tokens or None, got {fused_chunk_size!r}")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an integer label value, got {ignore_index!r}")
        source = model
        if not isinstance(model, str | Mapping | nn.Module) and callable(getattr(model, "to_dict", None)):
            model = model.to_dict()  # a transformers config is recorded as a dict: a checkpoint alone rebuilds it
        ignored = ["optimizer", "lr_scheduler"] + (["model"] if isinstance(model, nn.Module) else [])
        self.save_hyperparameters(ignore=ignored)
        self.model = build_causal_lm(source, model_kwargs)
        self.ignore_index = ignore_index
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.lr_scheduler_interval = lr_scheduler_interval
        #: ``"full"`` or ``"fused"`` (the ``logits`` argument)
        self.logits_mode = logits
        self.fused_chunk_size = fused_chunk_size
        vocab = count_classes(self.model)
        self.vocab_size: int | None = vocab
        self._train_scalars = StepScalars(["cross_entropy"], ["train/loss"], prog_bar=True)
        self.train_nll = TokenMeanLoss()
        self.val_nll = TokenMeanLoss()
        self.test_nll = TokenMeanLoss()
        self._validated = False
        self._head_checked = False

    @override
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None
    ) -> Tensor:
        """``[B, T, V]`` logits for token ids ``[B, T]`` (``attention_mask``/``position_ids`` as in a batch)."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        return causal_lm_logits(self.model, inputs)

    # ------------------------------------------------------------------ batches
    def unpack_batch(self, batch: Any) -> tuple[dict[str, Tensor], Tensor | None]:
        """``(model inputs, labels or None)`` of a batch; override for another batch layout."""
        labels: Tensor | None = None
        if isinstance(batch, Tensor):
            inputs = {"input_ids": batch}
        elif isinstance(batch, Mapping):
            if "input_ids" not in batch:
                raise KeyError(
                    f"a CausalLM batch mapping needs 'input_ids' [B, T] (and optionally 'labels', 'attention_mask', "
                    f"'position_ids', 'index'), got keys {sorted(batch)}"
                )
            inputs = {key: batch[key] for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
            labels = batch.get("labels")
        elif isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
            inputs = {"input_ids": batch[0]}
            if len(batch) >= 2 and isinstance(batch[1], Tensor):
                labels = batch[1]
        else:
            raise TypeError(
                f"cannot read token ids from a batch of type {type(batch).__name__}: yield {{'input_ids': ..., "
                "'labels': ...}} mappings, (input_ids, labels[, index]) tuples or token-id tensors"
            )
        ids = inputs["input_ids"]
        if not isinstance(ids, Tensor) or ids.ndim != 2 or ids.is_floating_point():
            raise ValueError(f"input_ids must be an integer tensor [B, T], got {ids!r:.80}")
        for key, value in inputs.items():
            if value.shape != ids.shape:
                raise ValueError(f"{key} must have the shape of input_ids {list(ids.shape)}, got {list(value.shape)}")
        return inputs, labels

    def _target(self, batch: Any) -> tuple[dict[str, Tensor], Tensor]:
        inputs, labels = self.unpack_batch(batch)
        ids = inputs["input_ids"]
        target = next_token_target(
            ids, labels, inputs.get("attention_mask"), inputs.get("position_ids"), self.ignore_index
        )
        return inputs, target

    def _check_target(self, target: Tensor, vocab: int) -> None:
        chosen = target[target != IGNORE]
        if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= vocab):
            raise ValueError(
                f"labels hold token ids in [{int(chosen.min())}, {int(chosen.max())}] but the model has a "
                f"vocabulary of {vocab}; use the model's tokenizer, or mark positions to skip with "
                f"ignore_index={self.ignore_index}"
            )

    def _fused_parts(self, inputs: dict[str, Tensor], target: Tensor, validate: bool) -> tuple[Tensor, nn.Linear]:
        """The last hidden states ``[B, T, H]`` and the LM head, checked on a validating step."""
        check = validate and not self._head_checked  # the probe of the head runs once per module
        hidden, head = causal_lm_hidden_states(self.model, inputs, check=check)
        self._head_checked = self._head_checked or check
        ids = inputs["input_ids"]
        if hidden.shape[:2] != ids.shape:
            raise ValueError(
                f"{type(self.model).__name__}'s base model returned hidden states of shape {tuple(hidden.shape)} for "
                f"input_ids {tuple(ids.shape)}; the fused loss needs [B, T, H]"
            )
        if validate:
            self._check_target(target, head.weight.shape[0])
        return hidden, head

    def _fused_cross_entropy(self, hidden: Tensor, head: nn.Linear, target: Tensor, validate: bool) -> Tensor:
        # autocast off: the chunk products run in the head weight's dtype (float32 under mixed precision),
        # the loss arithmetic in float32, whatever autocast the Trainer's precision set
        with torch.autocast(hidden.device.type, enabled=False):
            return fused_linear_cross_entropy(
                hidden.to(head.weight.dtype),
                head.weight,
                target,
                bias=head.bias,
                ignore_index=IGNORE,
                chunk_size=self.fused_chunk_size,
                validate_args=validate,
            )

    def _step(self, batch: Any, validate: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]:
        inputs, target = self._target(batch)
        ids = inputs["input_ids"]
        if self.logits_mode == "fused":
            hidden, head = self._fused_parts(inputs, target, validate)
            loss = self._fused_cross_entropy(hidden, head, target, validate)
            return loss, hidden, target, (target != IGNORE).sum(), inputs
        logits = self(**inputs)
        if logits.shape[:2] != ids.shape:
            raise ValueError(
                f"{type(self.model).__name__} returned logits of shape {tuple(logits.shape)} for input_ids "
                f"{tuple(ids.shape)}; a causal LM must return [B, T, V]"
            )
        vocab = logits.shape[-1]
        if validate:
            self._check_target(target, vocab)
        flat = logits.reshape(-1, vocab)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()  # the log-sum-exp over a large vocabulary in float32
        total = F.cross_entropy(flat, target.reshape(-1), ignore_index=IGNORE, reduction="sum")
        count = (target != IGNORE).sum()
        loss = total / count.clamp_min(1)  # 0, not NaN, for a batch without a target token
        return loss, logits, target, count, inputs

    # ------------------------------------------------------------------ training
    @override
    def on_train_start(self) -> None:
        self._validated = False
        self._train_scalars.reset()
        self.train_nll.reset()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        if self.logits_mode == "fused":
            out = self._fused_training_step(batch, validate=not self._validated)
            self._validated = True
            return out
        loss, logits, target, count, inputs = self._step(batch, validate=not self._validated)
        self._validated = True
        self._record_train_step(loss, count, target.shape[0])
        return {"loss": loss, "logits": logits, "target": target, "input": inputs["input_ids"], "model_inputs": inputs}

    def _fused_training_step(self, batch: Any, validate: bool) -> dict[str, Any]:
        """The step without logits: the hidden states and the head for callbacks, the loss now or deferred.

        With a loss-term callback attached (a hub on this module) the cross-entropy is left to the
        hub as a :class:`~lightning_logits.loss_terms.DeferredTaskLoss`: a fused distillation
        callback computes it in the same pass as its own term; otherwise the hub calls
        :meth:`_fused_cross_entropy` after the callbacks. It is logged once either way.
        """
        inputs, target = self._target(batch)
        hidden, head = self._fused_parts(inputs, target, validate)
        count = (target != IGNORE).sum()
        batch_size = target.shape[0]

        def compute() -> Tensor:
            return self._fused_cross_entropy(hidden, head, target, validate)

        def record(value: Tensor) -> None:
            self._record_train_step(value, count, batch_size)

        loss: Tensor | DeferredTaskLoss
        if LossTermHub.get(self) is not None:
            loss = DeferredTaskLoss(compute, record)
        else:
            loss = compute()
            record(loss)
        out: dict[str, Any] = {"loss": loss, "hidden_states": hidden, "head_weight": head.weight}
        if head.bias is not None:
            out["head_bias"] = head.bias
        out.update(target=target, input=inputs["input_ids"], model_inputs=inputs)
        return out

    @torch.compiler.disable  # metrics and logging stay eager when the module is compiled
    def _record_train_step(self, loss: Tensor, count: Tensor, batch_size: int) -> None:
        self.train_nll.update(loss.detach(), count)
        self._train_scalars.update(self, [loss], batch_size)

    @override
    def on_train_epoch_end(self) -> None:
        self._train_scalars.epoch_end(self)
        if self.train_nll.update_called:
            self.log("train/ppl", torch.exp(self.train_nll.compute()), on_step=False, on_epoch=True, batch_size=1)
        self.train_nll.reset()

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: Any, metric: TokenMeanLoss) -> None:
        loss, _, _, count, _ = self._step(batch, validate=True)
        metric.update(loss.detach(), count)

    def _log_evaluation(self, metric: TokenMeanLoss, prefix: str) -> None:
        # compute() sums over all processes: the token-weighted mean of the whole evaluation set
        if metric.update_called:
            nll = metric.compute()
            values = {f"{prefix}/loss": nll, f"{prefix}/ppl": torch.exp(nll)}
            self.log_dict(values, prog_bar=prefix == "val", batch_size=1)
        metric.reset()

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_nll)

    @override
    def on_validation_epoch_end(self) -> None:
        self._log_evaluation(self.val_nll, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_nll)

    @override
    def on_test_epoch_end(self) -> None:
        self._log_evaluation(self.test_nll, "test")

    # ------------------------------------------------------------------ optimizers
    @override
    def configure_optimizers(self) -> Any:
        return optimizers_from_config(
            self, self.optimizer_factory, self.lr_scheduler_factory, self.lr_scheduler_interval
        )

"""``LogitDiagnostics``: calibration, OOD detection, selective classification and accuracy under shift.

At the end of validation and/or test the callback runs the model over the in-distribution (ID)
evaluation data and over optional out-of-distribution (OOD) and shifted (labelled, corrupted)
loaders, reads the logits and the features entering the head with a
:class:`~lightning_logits.networks.LogitTap` (so it works on any LightningModule whose forward runs
the model), and reports with the functions of :mod:`lightning_logits.functional.diagnostics`:

- ``<name>/<stage>/ece`` and ``ece_temperature_scaled`` (and the fitted ``temperature``);
- ``<name>/<stage>/aurc/<score>`` for every confidence score and the logit-normalization fix;
- ``<name>/<stage>/ood/<set>/<score>/auroc`` and ``.../fpr95`` for every OOD set and score;
- ``<name>/<stage>/shift/<set>/acc``, ``mano``, ``avg_conf``, ``atc`` for every shifted set (MaNo's
  normalization chosen once on the ID data, ``shift/mano_softmax`` 1 or 0), and
  the Spearman correlation of each estimate with the true accuracy over the sets
  (``shift/spearman/<estimate>``, with 3 sets or more);

and writes plots into ``trainer.log_dir/<name>/`` (reliability diagram, ID vs OOD score
histograms, risk-coverage curves, estimated vs true accuracy). ``<stage>`` is ``val`` or ``test``.

OOD and shifted loaders are given to the constructor or come from the datamodule's
``ood_dataloaders()`` / ``shifted_dataloaders()`` (as :class:`~lightning_logits.data.ood.DigitsShiftDataModule`
provides). Under DDP the ID evaluation data (sharded by Lightning) is gathered from every rank,
each rank runs the whole OOD/shifted loaders, every rank computes the same numbers, and rank 0
draws the plots. Lightning's ``DistributedSampler`` pads a split that does not divide by the
world size with a few repeated samples; those repeats are counted like any other sample.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_logits.batch import batch_input, batch_target
from lightning_logits.functional.diagnostics import (
    ViMSubspace,
    _vim_default_dim,
    atc_estimate,
    aurc,
    average_confidence,
    energy_score,
    expected_calibration_error,
    fit_atc_threshold,
    fit_temperature,
    fit_vim,
    fpr_at_tpr,
    logit_gap_score,
    mano_score,
    mano_select_normalization,
    max_logit_score,
    msp_score,
    normalized_logit_score,
    ood_auroc,
    risk_coverage_curve,
    select_logit_gap_top_n,
    vim_score,
)
from lightning_logits.networks import LogitTap

__all__ = ["LogitDiagnostics", "plot_diagnostics"]

Score = Literal["msp", "max_logit", "energy", "vim", "logit_gap"]
Stage = Literal["validate", "test"]
SCORES: tuple[str, ...] = ("msp", "max_logit", "energy", "vim", "logit_gap")
STATE_VERSION = 1


@dataclass
class _Outputs:
    logits: Tensor  # [N, C] float64, cpu
    features: Tensor  # [N, D] float64, cpu
    labels: Tensor | None  # [N] int64, cpu


@dataclass
class DiagnosticsReport:
    """Everything one evaluation computed: logged numbers and the arrays behind the plots."""

    stage: str
    metrics: dict[str, float] = field(default_factory=dict)
    id_scores: dict[str, Tensor] = field(default_factory=dict)
    ood_scores: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    confidences: Tensor | None = None
    calibrated_confidences: Tensor | None = None
    correct: Tensor | None = None
    shift: dict[str, dict[str, float]] = field(default_factory=dict)


def _whole(tensor: Tensor) -> Tensor:
    """The whole tensor of a parameter sharded with FSDP2 (a DTensor: gathered from every rank), else itself."""
    full = getattr(tensor, "full_tensor", None)
    return (full() if callable(full) else tensor).detach()


class LogitDiagnostics(Callback):
    """Diagnose a classifier from its logits at validation and/or test end.

    Args:
        scores: OOD / confidence scores to compute (``"msp"``, ``"max_logit"``, ``"energy"``,
            ``"vim"``, ``"logit_gap"``; default all).
        ood_loaders: ``{name: loader}`` of OOD data (labels, if any, are ignored).
        shifted_loaders: ``{name: loader}`` of labelled shifted data (true accuracy vs MaNo, AC, ATC).
        stages: when to run: ``"validate"`` and/or ``"test"`` (default both).
        every_n_epochs: run at every n-th validation epoch (tests always run).
        use_datamodule_loaders: also use the datamodule's ``ood_dataloaders()`` and
            ``shifted_dataloaders()`` when it has them.
        head: dotted path of the classifier head when it cannot be found automatically
            (default: the module's ``classifier_head`` attribute, then the usual search).
        temperature: the energy score's temperature (default 1).
        vim_dim: ViM's principal dimension (default as the official code, ``D // 2`` for small ``D``).
        logit_gap_top_n: LogitGap's ``N``: an int, ``"all"`` (``C - 1``) or ``"auto"``
            (:func:`~lightning_logits.functional.select_logit_gap_top_n` on the fit data).
        fit_on: data that ViM and LogitGap's ``N`` are fitted on: ``"train"`` (the datamodule's
            training loader, as the papers; falls back to the evaluation data with a warning) or
            ``"eval"``.
        max_batches: at most this many batches from every evaluation, OOD and shifted loader
            (``None``: all).
        max_fit_batches: at most this many training batches for the ViM/LogitGap fit (``None``: all).
        n_bins: calibration bins (default 15).
        plots: write plots into ``trainer.log_dir/<name>/`` (needs matplotlib).
        name: log prefix and plot folder (default ``"diagnostics"``).

    Example:
        >>> callback = LogitDiagnostics(scores=("msp", "energy"), stages=("test",))
        >>> callback.scores
        ('msp', 'energy')
    """

    def __init__(
        self,
        scores: Sequence[Score] = ("msp", "max_logit", "energy", "vim", "logit_gap"),
        ood_loaders: Mapping[str, Iterable[Any]] | None = None,
        shifted_loaders: Mapping[str, Iterable[Any]] | None = None,
        stages: Sequence[Stage] = ("validate", "test"),
        every_n_epochs: int = 1,
        use_datamodule_loaders: bool = True,
        head: str | None = None,
        temperature: float = 1.0,
        vim_dim: int | None = None,
        logit_gap_top_n: int | Literal["auto", "all"] = "auto",
        fit_on: Literal["train", "eval"] = "train",
        max_batches: int | None = None,
        max_fit_batches: int | None = None,
        n_bins: int = 15,
        plots: bool = True,
        name: str = "diagnostics",
    ) -> None:
        super().__init__()
        scores = tuple(scores)
        unknown = [s for s in scores if s not in SCORES]
        if unknown or not scores:
            raise ValueError(f"scores must be a non-empty subset of {SCORES}, got {list(scores)}")
        bad_stages = [s for s in stages if s not in ("validate", "test")]
        if bad_stages or not stages:
            raise ValueError(f"stages must be a non-empty subset of ('validate', 'test'), got {list(stages)}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if isinstance(logit_gap_top_n, str) and logit_gap_top_n not in ("auto", "all"):
            raise ValueError(f"logit_gap_top_n must be an int, 'auto' or 'all', got {logit_gap_top_n!r}")
        if isinstance(logit_gap_top_n, int) and logit_gap_top_n < 1:
            raise ValueError(f"logit_gap_top_n must be >= 1, got {logit_gap_top_n}")
        if fit_on not in ("train", "eval"):
            raise ValueError(f"fit_on must be 'train' or 'eval', got {fit_on!r}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        if max_fit_batches is not None and max_fit_batches < 1:
            raise ValueError(f"max_fit_batches must be >= 1 or None, got {max_fit_batches}")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.scores = scores
        self.ood_loaders = dict(ood_loaders or {})
        self.shifted_loaders = dict(shifted_loaders or {})
        self.stages = tuple(stages)
        self.every_n_epochs = every_n_epochs
        self.use_datamodule_loaders = use_datamodule_loaders
        self.head = head
        self.temperature = temperature
        self.vim_dim = vim_dim
        self.logit_gap_top_n = logit_gap_top_n
        self.fit_on = fit_on
        self.max_batches = max_batches
        self.max_fit_batches = max_fit_batches
        self.n_bins = n_bins
        self.plots = plots
        self.name = name
        self.calibration_temperature: float | None = None
        self.last_report: DiagnosticsReport | None = None
        self._tap: LogitTap | None = None

    # ------------------------------------------------------------------ lifecycle

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._tap is None:
            head = self.head if self.head is not None else getattr(pl_module, "classifier_head", None)
            self._tap = LogitTap(pl_module, head=head)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._tap is not None:
            self._tap.remove()
            self._tap = None

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "validate" not in self.stages or trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._run(trainer, pl_module, "val", trainer.val_dataloaders)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._run(trainer, pl_module, "test", trainer.test_dataloaders)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "calibration_temperature": self.calibration_temperature}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version = state_dict.get("version")
        if version != STATE_VERSION:
            raise ValueError(f"LogitDiagnostics state has version {version!r}, expected {STATE_VERSION}")
        self.calibration_temperature = state_dict.get("calibration_temperature")

    # ------------------------------------------------------------------ data

    def _loaders(self, trainer: pl.Trainer, kind: str) -> dict[str, Iterable[Any]]:
        loaders = dict(self.ood_loaders if kind == "ood" else self.shifted_loaders)
        datamodule = getattr(trainer, "datamodule", None)
        method = getattr(datamodule, f"{kind}_dataloaders", None)
        if self.use_datamodule_loaders and callable(method):
            for key, loader in method().items():
                loaders.setdefault(key, loader)
        return loaders

    @torch.no_grad()
    def _collect(
        self, pl_module: pl.LightningModule, loaders: Any, what: str, labels: bool, max_batches: int | None = -1
    ) -> _Outputs:
        assert self._tap is not None
        if loaders is None:
            raise ValueError(f"{what}: no data loader to diagnose")
        loader_list = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        if max_batches == -1:
            max_batches = self.max_batches
        logits, features, targets = [], [], []
        for loader in loader_list:
            for i, batch in enumerate(loader):
                if max_batches is not None and i >= max_batches:
                    break
                x = batch_input(batch) if not isinstance(batch, Tensor) else batch
                with self._tap.capture():
                    pl_module(x.to(pl_module.device))
                if not self._tap.logits:
                    raise RuntimeError(
                        f"{what}: the classifier head {self._tap.head_name!r} did not run in "
                        f"{type(pl_module).__name__}.forward; the module's forward(x) must run the model "
                        "(or pass head='<dotted path>')"
                    )
                z, f = self._tap.logits[-1], self._tap.features[-1]
                logits.append(z.detach().double().cpu())
                features.append(f.detach().flatten(1).double().cpu())
                if labels:
                    targets.append(batch_target(batch).detach().long().cpu())
        if not logits or sum(z.shape[0] for z in logits) == 0:
            raise ValueError(f"{what} is empty: its loader yielded no samples; pass a non-empty loader or drop it")
        z = torch.cat(logits)
        y = torch.cat(targets) if labels else None
        if y is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= z.shape[1]):
            raise ValueError(
                f"{what} has labels in [{int(y.min())}, {int(y.max())}] but the model has {z.shape[1]} classes; "
                f"labelled data needs labels in [0, {z.shape[1] - 1}] (give out-of-distribution data as an OOD "
                "loader, whose labels are ignored)"
            )
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"{what}: the model produced NaN or inf logits; check the model and its inputs")
        return _Outputs(z, torch.cat(features), y)

    def _gather(self, trainer: pl.Trainer, out: _Outputs) -> _Outputs:
        if trainer.world_size <= 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return out
        from torchmetrics.utilities.distributed import gather_all_tensors

        def cat(t: Tensor) -> Tensor:
            return torch.cat([g.cpu() for g in gather_all_tensors(t.to(trainer.strategy.root_device))])

        return _Outputs(cat(out.logits), cat(out.features), None if out.labels is None else cat(out.labels))

    # ------------------------------------------------------------------ computation

    def _scorers(self, fit: _Outputs, weight: Tensor | None, bias: Tensor | None) -> dict[str, Any]:
        scorers: dict[str, Any] = {}
        for score in self.scores:
            if score == "msp":
                scorers[score] = lambda o: msp_score(o.logits)
            elif score == "max_logit":
                scorers[score] = lambda o: max_logit_score(o.logits)
            elif score == "energy":
                scorers[score] = lambda o: energy_score(o.logits, self.temperature)
            elif score == "logit_gap":
                c = fit.logits.shape[1]
                if self.logit_gap_top_n == "auto":
                    top_n = select_logit_gap_top_n(fit.logits)
                elif self.logit_gap_top_n == "all":
                    top_n = c - 1
                else:
                    top_n = min(int(self.logit_gap_top_n), c - 1)
                scorers[score] = lambda o, n=top_n: logit_gap_score(o.logits, top_n=n)
            elif score == "vim":
                if weight is None:
                    raise ValueError(
                        f"ViM needs the weight of the classifier head, but {self._tap.head_name if self._tap else '?'} "
                        "has no 2-d weight; drop 'vim' from scores"
                    )
                n, d = fit.features.shape
                dim = _vim_default_dim(d) if self.vim_dim is None else self.vim_dim
                if n <= dim:  # the fit samples span the principal space: no residual to score by
                    rank_zero_warn(
                        f"LogitDiagnostics: ViM skipped: fitted on {n} samples of size {d}, not more than its "
                        f"principal dimension {dim}, so the residual is roundoff; fit on more samples "
                        "(max_fit_batches, fit_on='train') or pass vim_dim below the number of samples"
                    )
                    continue
                subspace: ViMSubspace = fit_vim(fit.features, weight, bias, dim=dim)
                scorers[score] = lambda o, s=subspace: vim_score(o.features, o.logits, s)
        return scorers

    def _head_params(self) -> tuple[Tensor | None, Tensor | None]:
        assert self._tap is not None
        weight = getattr(self._tap.head, "weight", None)
        bias = getattr(self._tap.head, "bias", None)
        if not isinstance(weight, Tensor) or weight.ndim != 2:
            return None, None
        w = _whole(weight).double().cpu()
        b = _whole(bias).double().cpu() if isinstance(bias, Tensor) else None
        return w, b

    def _fit_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule, eval_out: _Outputs) -> _Outputs:
        if self.fit_on == "eval" or not any(s in self.scores for s in ("vim", "logit_gap")):
            return eval_out
        datamodule = getattr(trainer, "datamodule", None)
        train_loader = getattr(datamodule, "train_dataloader", None)
        if callable(train_loader):
            try:
                return self._collect(
                    pl_module,
                    train_loader(),
                    "the training data (ViM/LogitGap fit)",
                    labels=False,
                    max_batches=self.max_fit_batches,
                )
            except MisconfigurationException:  # a datamodule without a training loader
                pass
        rank_zero_warn(
            "LogitDiagnostics: no training loader on the datamodule; ViM and LogitGap are fitted on the "
            "evaluation data itself (set fit_on='eval' to silence this)"
        )
        return eval_out

    def _eval_cap(self, trainer: pl.Trainer, stage: str) -> int | None:
        """Batches of the evaluation data: the trainer's limit (``limit_val_batches``...) and ``max_batches``."""
        counts = trainer.num_val_batches if stage == "val" else trainer.num_test_batches
        finite = [int(c) for c in counts if c != float("inf")]
        cap = max(finite) if finite and len(finite) == len(counts) else None
        if self.max_batches is not None:
            cap = self.max_batches if cap is None else min(cap, self.max_batches)
        return cap

    def _calibration_temperature(self, stage: str, eval_out: _Outputs) -> float:
        assert eval_out.labels is not None
        if stage == "test" and self.calibration_temperature is not None:
            return self.calibration_temperature  # fitted on the validation data
        temperature = fit_temperature(eval_out.logits, eval_out.labels)
        if stage == "val":
            self.calibration_temperature = temperature
        return temperature

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, eval_loaders: Any) -> None:
        was_training = pl_module.training
        pl_module.eval()
        try:
            report = self.compute(trainer, pl_module, stage, eval_loaders)
        finally:
            pl_module.train(was_training)
        self.last_report = report
        for key, value in report.metrics.items():
            pl_module.log(f"{self.name}/{stage}/{key}", value, sync_dist=False)
        # Trainer.log_dir broadcasts from rank 0 under a distributed strategy: every rank must ask.
        log_dir = (trainer.log_dir or trainer.default_root_dir) if self.plots else None
        if log_dir is not None and trainer.is_global_zero:
            plot_diagnostics(report, Path(log_dir) / self.name, prefix=f"{stage}_epoch{trainer.current_epoch}")

    def compute(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str, eval_loaders: Any
    ) -> DiagnosticsReport:
        """Run every diagnostic on ``eval_loaders`` (ID, labelled) and the OOD/shifted loaders."""
        ident = self._gather(
            trainer,
            self._collect(
                pl_module, eval_loaders, f"the {stage} data", labels=True, max_batches=self._eval_cap(trainer, stage)
            ),
        )
        assert ident.labels is not None
        fit = self._fit_data(trainer, pl_module, ident)
        weight, bias = self._head_params()
        scorers = self._scorers(fit, weight, bias)
        report = DiagnosticsReport(stage=stage)
        m = report.metrics

        # calibration
        correct = ident.logits.argmax(1) == ident.labels
        temperature = self._calibration_temperature(stage, ident)
        m["acc"] = float(correct.double().mean())
        m["ece"] = float(expected_calibration_error(ident.logits, ident.labels, n_bins=self.n_bins))
        m["ece_temperature_scaled"] = float(
            expected_calibration_error(ident.logits / temperature, ident.labels, n_bins=self.n_bins)
        )
        m["temperature"] = temperature
        report.correct = correct
        report.confidences = msp_score(ident.logits)
        report.calibrated_confidences = msp_score(ident.logits / temperature)

        # selective classification
        report.id_scores = {name: fn(ident) for name, fn in scorers.items()}
        for name, values in report.id_scores.items():
            m[f"aurc/{name}"] = float(aurc(values, correct))
        m["aurc/logit_norm"] = float(aurc(normalized_logit_score(ident.logits), correct))

        # OOD detection
        for set_name, loader in self._loaders(trainer, "ood").items():
            out = self._collect(pl_module, loader, f"OOD set {set_name!r}", labels=False)
            report.ood_scores[set_name] = {}
            for name, fn in scorers.items():
                values = fn(out)
                report.ood_scores[set_name][name] = values
                m[f"ood/{set_name}/{name}/auroc"] = float(ood_auroc(report.id_scores[name], values))
                m[f"ood/{set_name}/{name}/fpr95"] = float(fpr_at_tpr(report.id_scores[name], values))

        # accuracy estimation under shift
        shifted = self._loaders(trainer, "shifted")
        if shifted:
            threshold = fit_atc_threshold(report.confidences, correct)
            # MaNo's normalization is chosen once, on the ID data, so every set's score is on one scale
            # (the official experiments choose it once, on the first shifted set).
            normalization = mano_select_normalization(ident.logits)
            m["shift/mano_softmax"] = float(normalization == "softmax")
            for set_name, loader in shifted.items():
                out = self._collect(pl_module, loader, f"shifted set {set_name!r}", labels=True)
                assert out.labels is not None
                row = {
                    "acc": float((out.logits.argmax(1) == out.labels).double().mean()),
                    "mano": float(mano_score(out.logits, normalization=normalization)),
                    "avg_conf": float(average_confidence(out.logits)),
                    "atc": float(atc_estimate(msp_score(out.logits), threshold)),
                }
                report.shift[set_name] = row
                for key, value in row.items():
                    m[f"shift/{set_name}/{key}"] = value
            if len(report.shift) >= 3:
                acc = torch.tensor([r["acc"] for r in report.shift.values()], dtype=torch.float64)
                for est in ("mano", "avg_conf", "atc"):
                    values = torch.tensor([r[est] for r in report.shift.values()], dtype=torch.float64)
                    m[f"shift/spearman/{est}"] = _spearman(values, acc)
        return report


def _spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else math.nan


def plot_diagnostics(report: DiagnosticsReport, out_dir: Path, prefix: str = "") -> list[Path]:
    """Write the diagnostics plots of ``report`` as PNG files into ``out_dir``; returns their paths.

    Reliability diagram (before/after temperature scaling), ID vs OOD score histograms (one panel
    per score, when there are OOD sets), risk-coverage curves (one per score), and estimated vs
    true accuracy on the shifted sets (when there are any). Needs matplotlib.

    Args:
        report: what one evaluation computed (:class:`LogitDiagnostics` keeps the last one per stage).
        out_dir: the folder to write into (created).
        prefix: put before each file name (``"<prefix>_reliability.png"``).

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> g = torch.Generator().manual_seed(0)
        >>> confidence = torch.rand(200, generator=g, dtype=torch.float64)
        >>> correct = torch.rand(200, generator=g, dtype=torch.float64) < confidence
        >>> report = DiagnosticsReport("test", confidences=confidence, correct=correct,
        ...                            id_scores={"msp": confidence}, ood_scores={"noise": {"msp": confidence / 2}})
        >>> paths = plot_diagnostics(report, Path(tempfile.mkdtemp()), prefix="test")
        >>> [p.name for p in paths]
        ['test_reliability.png', 'test_score_histograms.png', 'test_risk_coverage.png']
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "LogitDiagnostics' plots need matplotlib: pip install matplotlib, or pass plots=False"
        ) from err
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}_" if prefix else ""
    written: list[Path] = []

    def save(fig: Any, name: str) -> None:
        path = out_dir / f"{stem}{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)

    assert report.correct is not None and report.confidences is not None
    correct = report.correct.double()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    for label, conf in (("raw", report.confidences), ("temperature scaled", report.calibrated_confidences)):
        if conf is None:
            continue
        bins = torch.bucketize(conf, edges[1:-1])
        xs, ys = [], []
        for b in range(10):
            mask = bins == b
            if mask.any():
                xs.append(float(conf[mask].mean()))
                ys.append(float(correct[mask].mean()))
        ax.plot(xs, ys, marker="o", label=label)
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlabel="confidence (MSP)", ylabel="accuracy", title="reliability diagram")
    ax.legend()
    save(fig, "reliability")

    if report.ood_scores:
        names = list(report.id_scores)
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3), squeeze=False)
        for ax, name in zip(axes[0], names, strict=True):
            ax.hist(report.id_scores[name].numpy(), bins=30, alpha=0.6, density=True, label="ID")
            for set_name, scores in report.ood_scores.items():
                ax.hist(scores[name].numpy(), bins=30, alpha=0.4, density=True, label=set_name)
            ax.set_title(name)
        axes[0][0].legend(fontsize=7)
        save(fig, "score_histograms")

    fig, ax = plt.subplots(figsize=(4.5, 4))
    for name, id_scores in report.id_scores.items():
        coverage, risk, _ = risk_coverage_curve(id_scores, report.correct)
        ax.plot(coverage.numpy(), risk.numpy(), label=name)
    ax.set(xlabel="coverage", ylabel="risk (error rate)", title="risk-coverage")
    ax.legend(fontsize=7)
    save(fig, "risk_coverage")

    if report.shift:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        acc = [r["acc"] for r in report.shift.values()]
        for est in ("mano", "avg_conf", "atc"):
            ax.scatter(acc, [r[est] for r in report.shift.values()], label=est, s=14)
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set(xlabel="true accuracy", ylabel="estimate / score", title="accuracy under shift")
        ax.legend(fontsize=7)
        save(fig, "estimated_vs_true_accuracy")
    return written

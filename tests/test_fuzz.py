"""Property tests over every public function of ``lightning_logits.functional`` and every metric (issue 29, item 1).

Each test draws inputs with hypothesis: shapes (a batch of one, one class, a few vocabularies of
tens of thousands of entries), dtypes (float16, bfloat16, float32, float64), extremes (logits of
1e4, ``-inf`` in masked positions, all-masked rows, NaN), on the CPU. A drawn case is either
*valid*, and the call must return finite values that agree with a float64 numpy restatement
written here (the tolerance is stated per dtype in :data:`RTOL` / :func:`atol`), or *invalid* with
a known culprit, and the call must raise ``ValueError``/``TypeError`` whose message names that
argument. Any other exception (a bare ``RuntimeError`` or ``IndexError`` from deep inside PyTorch)
fails the test, and so does a NaN in a result.

Profiles (registered in ``tests/conftest.py``): ``short`` (the suite's default: derandomized, few
examples) and ``long`` (``HYPOTHESIS_PROFILE=long``), which ``python -m benchmarks.fuzz`` runs and
reports as the number of cases per function. :func:`test_every_public_name_has_a_property_test`
fails when a name is added to an ``__all__`` without a test here.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor

import lightning_logits.functional as LF
import lightning_logits.metrics as LM
from lightning_logits.functional import (
    classification,
    diagnostics,
    distillation,
    distillation_fused,
    lawn,
    mowst,
    replay,
    uskd,
)

# --------------------------------------------------------------------------- case counting
COUNTS_ENV = "LIGHTNING_LOGITS_FUZZ_COUNTS"
"""When set, the per-function case counts are written to this JSON file at the end of the module."""

CASES: defaultdict[str, Counter[str]] = defaultdict(Counter)


@pytest.fixture(scope="module", autouse=True)
def _write_counts() -> Iterator[None]:
    yield
    path = os.environ.get(COUNTS_ENV)
    if path:
        Path(path).write_text(json.dumps({name: dict(c) for name, c in sorted(CASES.items())}, indent=1))


def valid(name: str, call: Callable[[], Any]) -> Any:
    """Run a call on valid input: it must not raise; the caller compares the result."""
    CASES[name]["valid"] += 1
    return call()


def invalid(name: str, call: Callable[[], Any], argument: str) -> None:
    """Run a call on invalid input: it must raise ValueError/TypeError naming ``argument``."""
    CASES[name]["invalid"] += 1
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert argument in str(info.value), f"{name}: the error should name {argument!r}: {info.value}"


# --------------------------------------------------------------------------- tolerances
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
EPS_COMPUTE = {torch.float16: 2**-23, torch.bfloat16: 2**-23, torch.float32: 2**-23, torch.float64: 2**-52}
"""Unit roundoff of the arithmetic: half inputs are computed in float32, float64 stays float64."""
RTOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-10}
"""Relative tolerance of a result: the output's rounding (float16 2^-11, bfloat16 2^-8) with margin."""


def atol(dtype: torch.dtype, magnitude: float, factor: float = 1.0) -> float:
    """Absolute tolerance: roundoff of the compute dtype times the size of the numbers involved."""
    return 256 * EPS_COMPUTE[dtype] * (1.0 + magnitude) * factor + 1e-12


def assert_close(name: str, got: Tensor | float, want: np.ndarray | float, dtype: torch.dtype, tol: float) -> None:
    got_np = np.asarray(got.detach().double().cpu().numpy() if isinstance(got, Tensor) else got, dtype=np.float64)
    want_np = np.asarray(want, dtype=np.float64)
    assert got_np.shape == want_np.shape, f"{name}: shape {got_np.shape} != reference {want_np.shape}"
    assert not np.isnan(got_np).any(), f"{name}: NaN in the result {got_np}"
    same_inf = np.isinf(want_np) & (got_np == want_np)
    diff = np.where(same_inf, 0.0, np.abs(got_np - want_np))
    bound = tol + RTOL[dtype] * np.abs(np.where(np.isinf(want_np), 0.0, want_np))
    worst = float(np.max(diff - bound)) if diff.size else -1.0
    assert worst <= 0, f"{name}: got {got_np} want {want_np} (tolerance {tol:g} + {RTOL[dtype]:g} rel)"


def overflows(value: float | np.ndarray, dtype: torch.dtype) -> bool:
    """Whether a finite float64 result is too large for ``dtype`` (a half-precision output)."""
    finite = np.asarray(value)[np.isfinite(value)]
    return bool(finite.size) and float(np.abs(finite).max()) > torch.finfo(dtype).max * (1 - RTOL[dtype])


# --------------------------------------------------------------------------- strategies
SEEDS = st.integers(0, 2**31 - 1)
DTYPE = st.sampled_from(DTYPES)
SCALE = st.sampled_from((1e-3, 1.0, 8.0, 1e4))
CLASSES = st.one_of(st.integers(2, 9), st.sampled_from((2, 3, 50)))
HUGE_VOCAB = 32_000


def rand(shape: tuple[int, ...], seed: int, scale: float, dtype: torch.dtype) -> Tensor:
    """Normal values times ``scale``, rounded to ``dtype`` (kept inside float16's range)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    return x.clamp(-3e4, 3e4).to(dtype)


def f64(x: Tensor) -> np.ndarray:
    return x.detach().double().cpu().numpy()


def log_softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (rows may hold -inf, not only -inf)."""
    top = np.max(z, axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        return z - (top + np.log(np.sum(np.exp(z - top), axis=-1, keepdims=True)))


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    out = np.zeros((len(labels), num_classes))
    out[np.arange(len(labels)), labels] = 1.0
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    return np.exp(log_softmax(z))


def kl_rows(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row; 0 log 0 = 0, p > 0 = q gives +inf."""
    p = np.exp(log_p)
    with np.errstate(invalid="ignore"):
        terms = np.where(p > 0, p * (log_p - log_q), 0.0)
    return terms.sum(axis=-1)


def mix_log(log_p: np.ndarray, log_q: np.ndarray, w: float) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.logaddexp(log_p + math.log(w), log_q + math.log1p(-w))


# =========================================================================== distillation losses
def _zscore(z: np.ndarray) -> np.ndarray:
    return (z - z.mean(axis=1, keepdims=True)) / (z.std(axis=1, ddof=1, keepdims=True) + 1e-7)


def _drop_column(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    keep = np.ones(z.shape, dtype=bool)
    keep[np.arange(z.shape[0]), y] = False
    return z[keep].reshape(z.shape[0], z.shape[1] - 1)


def _lse(z: np.ndarray) -> np.ndarray:
    top = z.max(axis=1)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1))


def distillation_reference(name: str, s: np.ndarray, t: np.ndarray, y: np.ndarray, temp: float, **hp: float) -> float:
    """The mean over rows of the loss, restated in float64 from the papers' definitions."""
    if s.shape[0] == 0:
        return 0.0
    rows = np.arange(s.shape[0])
    if name == "kd":
        per = temp**2 * kl_rows(log_softmax(t / temp), log_softmax(s / temp))
    elif name == "nkd":
        target = -np.exp(log_softmax(t)[rows, y]) * log_softmax(s)[rows, y]
        qt = softmax(_drop_column(t, y) / temp)
        log_qs = log_softmax(_drop_column(s, y) / temp)
        per = target - hp["gamma"] * temp**2 * (qt * log_qs).sum(axis=1)
    elif name == "dkd":
        xs, xt = s / temp, t / temp
        bs = np.stack([xs[rows, y] - _lse(xs), _lse(_drop_column(xs, y)) - _lse(xs)], axis=1)
        bt = np.stack([xt[rows, y] - _lse(xt), _lse(_drop_column(xt, y)) - _lse(xt)], axis=1)
        nckd = kl_rows(log_softmax(_drop_column(xt, y)), log_softmax(_drop_column(xs, y)))
        per = temp**2 * (hp["alpha"] * kl_rows(bt, bs) + hp["beta"] * nckd)
    elif name == "dhkd":  # per class KL(Bernoulli(1/2) || Bernoulli(sigmoid(x))), official BinaryKLNorm
        x = (s - t) / temp
        log_sig, log_one_minus = -np.logaddexp(0.0, -x), -np.logaddexp(0.0, x)
        per = temp**2 * (0.5 * (math.log(0.5) - log_sig) + 0.5 * (math.log(0.5) - log_one_minus)).sum(axis=1)
    elif name == "dist":
        ys, yt = softmax(s / temp), softmax(t / temp)

        def pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # along axis 1
            a = a - a.mean(axis=1, keepdims=True)
            b = b - b.mean(axis=1, keepdims=True)
            return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-8)

        inter, intra = 1 - pearson(ys, yt).mean(), 1 - pearson(ys.T, yt.T).mean()
        return float(temp**2 * (hp["beta"] * inter + hp["gamma"] * intra))
    else:
        log_ps, log_pt = log_softmax(s / temp), log_softmax(t / temp)
        if name == "forward_kl":
            per = kl_rows(log_pt, log_ps)
        elif name == "reverse_kl":
            per = kl_rows(log_ps, log_pt)
        elif name == "jsd":
            b = hp["beta"]
            if b == 0.0:
                per = kl_rows(log_pt, log_ps)
            elif b == 1.0:
                per = kl_rows(log_ps, log_pt)
            else:
                log_m = mix_log(log_pt, log_ps, b)
                per = b * kl_rows(log_pt, log_m) + (1 - b) * kl_rows(log_ps, log_m)
        elif name == "skew_kl":
            a = hp["alpha"]
            per = np.zeros(len(s)) if a == 1.0 else kl_rows(log_pt, mix_log(log_pt, log_ps, a) if a else log_ps)
        elif name == "skew_reverse_kl":
            a = hp["alpha"]
            per = np.zeros(len(s)) if a == 1.0 else kl_rows(log_ps, mix_log(log_ps, log_pt, a) if a else log_pt)
        elif name == "tv":
            per = 0.5 * np.abs(np.exp(log_ps) - np.exp(log_pt)).sum(axis=1)
        else:
            raise AssertionError(name)
    return float(per.mean())


def _dist_condition(s: np.ndarray, t: np.ndarray, temp: float, dtype: torch.dtype) -> float:
    """Roundoff of DIST's correlations relative to 1: unit roundoff over the smallest spread of a softmax
    row or column about its mean (a Pearson correlation of a nearly constant vector magnifies roundoff)."""
    if s.shape[0] == 0:
        return 0.0
    spread = [
        np.linalg.norm(p - p.mean(axis=axis, keepdims=True), axis=axis).min()
        for p in (softmax(s / temp), softmax(t / temp))
        for axis in (0, 1)
    ]
    return EPS_COMPUTE[dtype] * math.sqrt(s.size) / max(min(spread), 1e-300)


DISTILLATION_NAMES = tuple(distillation.DISTILLATION_LOSSES)
TOKEN_LEVEL = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")
NEEDS_TARGET = ("nkd", "dkd")
T_SQUARED = ("kd", "nkd", "dkd", "dhkd", "dist")


HYPER_KEYS = {"nkd": ("gamma",), "dkd": ("alpha", "beta"), "dist": ("beta", "gamma"), "jsd": ("beta",)}
HYPER_KEYS |= {"skew_kl": ("alpha",), "skew_reverse_kl": ("alpha",)}


def _hyper(name: str, draw: st.DrawFn) -> dict[str, float]:
    fraction = st.sampled_from((0.0, 0.1, 0.5, 0.9, 1.0))
    weight = st.sampled_from((0.0, 0.5, 1.0, 8.0))
    if name == "nkd":
        return {"gamma": draw(weight)}
    if name == "dkd":
        return {"alpha": draw(weight), "beta": draw(weight)}
    if name == "dist":
        return {"beta": draw(weight), "gamma": draw(weight)}
    if name == "jsd":
        return {"beta": draw(fraction)}
    if name in ("skew_kl", "skew_reverse_kl"):
        return {"alpha": draw(fraction)}
    return {}


@st.composite
def distillation_case(draw: st.DrawFn, name: str) -> dict[str, Any]:
    """A valid case: logits [..., C] (C may be huge), optional mask/ignored targets with garbage there."""
    huge = draw(st.booleans()) if name != "dist" else False
    num_classes = HUGE_VOCAB if huge and draw(st.integers(0, 3)) == 0 else draw(CLASSES)
    lead = (draw(st.integers(1, 2)),) if num_classes == HUGE_VOCAB else draw(st.sampled_from(((1,), (5,), (2, 3))))
    dtype, scale, seed = draw(DTYPE), draw(SCALE), draw(SEEDS)
    s = rand((*lead, num_classes), seed, scale, dtype)
    t = rand((*lead, num_classes), seed + 1, scale, dtype) if not draw(st.booleans()) else s.clone()
    g = torch.Generator().manual_seed(seed + 2)
    y = torch.randint(0, num_classes, lead, generator=g)
    selection = draw(st.sampled_from(("all", "mask", "ignore", "none_valid")))
    keep = torch.ones(lead, dtype=torch.bool)
    mask = None
    if selection != "all":
        keep = torch.rand(lead, generator=g) < 0.6 if selection != "none_valid" else torch.zeros(lead, dtype=torch.bool)
        garbage = draw(st.sampled_from((math.nan, -math.inf, math.inf)))
        s = s.masked_fill(~keep.unsqueeze(-1), garbage)  # excluded positions may hold anything
        if selection == "mask" or selection == "none_valid":
            mask = keep
        if selection == "ignore" or selection == "none_valid":
            y = y.masked_fill(~keep, -100)
    masked_vocab = name in TOKEN_LEVEL and num_classes > 2 and draw(st.booleans())
    if masked_vocab:  # a padded vocabulary entry: -inf on both sides
        s[..., -1] = -math.inf
        t[..., -1] = -math.inf
    soft = name in NEEDS_TARGET and selection == "all" and draw(st.booleans())
    target: Tensor | None = y
    if soft:
        target = torch.rand((*lead, num_classes), generator=g).to(dtype)
        y = target.float().argmax(-1)
    elif name not in NEEDS_TARGET and selection not in ("ignore", "none_valid") and draw(st.booleans()):
        target = None
    return {
        "s": s,
        "t": t,
        "target": target,
        "labels": y,
        "keep": keep,
        "mask": mask,
        "temperature": draw(st.sampled_from((0.5, 1.0, 4.0))),
        "standardize": draw(st.booleans()) and not masked_vocab,
        "chunk_size": None if name == "dist" else draw(st.sampled_from((None, 1, 2))),
        "hyper": _hyper(name, draw),
        "dtype": dtype,
    }


def _call_distillation(name: str, case: dict[str, Any], **changes: Any) -> Tensor:
    kwargs = {
        "temperature": case["temperature"],
        "mask": case["mask"],
        "standardize": case["standardize"],
        "chunk_size": case["chunk_size"],
        **case["hyper"],
    }
    kwargs["target"] = case["target"]
    kwargs.update(changes)
    fn = distillation.get_distillation_loss(name)
    s = kwargs.pop("s", case["s"])
    t = kwargs.pop("t", case["t"])
    return fn(s, t, **kwargs)


@pytest.mark.parametrize("name", DISTILLATION_NAMES)
@given(data=st.data())
def test_distillation_losses_agree_with_float64(name: str, data: st.DataObject) -> None:
    case = data.draw(distillation_case(name))
    dtype, temp = case["dtype"], case["temperature"]
    keep = case["keep"].reshape(-1)
    c = case["s"].shape[-1]
    s64, t64 = f64(case["s"]).reshape(-1, c)[keep.numpy()], f64(case["t"]).reshape(-1, c)[keep.numpy()]
    if case["standardize"]:
        s64, t64 = _zscore(s64), _zscore(t64)
    y = case["labels"].reshape(-1)[keep].numpy()
    want = distillation_reference(name, s64, t64, y, temp, **case["hyper"])
    s = case["s"].clone().requires_grad_(dtype in (torch.float32, torch.float64))
    if overflows(want, dtype):  # a loss too large for float16: an error, never a silent inf
        invalid(name + "_loss", lambda: _call_distillation(name, case, s=s), "logits")
        return
    out = valid(name + "_loss", lambda: _call_distillation(name, case, s=s))
    assert out.dtype == dtype and out.shape == ()
    condition = _dist_condition(s64, t64, temp, dtype) if name == "dist" else 0.0
    if condition > 1e-4:
        # a Pearson correlation of a row or column that is constant up to roundoff is roundoff itself
        # (the float64 value is no better): only the bounds hold, 1 - rho in [0, 2] for both terms
        bound = temp**2 * 2 * (abs(case["hyper"]["beta"]) + abs(case["hyper"]["gamma"]))
        assert torch.isfinite(out) and -1e-3 <= float(out) <= bound * (1 + RTOL[dtype]) + 1e-3
        return
    finite = lambda x: np.abs(x[np.isfinite(x)]).max(initial=0.0)  # noqa: E731
    magnitude = float(finite(s64) + finite(t64))
    weight = max([1.0, *case["hyper"].values()])
    factor = weight * (temp**2 if name in T_SQUARED else 1.0) * (1 + magnitude / temp)
    tol = atol(dtype, 0.0, factor * (c if name in ("dhkd", "dist") else 1)) + 64 * factor * condition
    assert_close(name, out, want, dtype, tol)
    if s.requires_grad:
        (grad,) = torch.autograd.grad(out, s)
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"
        assert (grad.reshape(-1, c)[~keep] == 0).all(), f"{name}: gradient reached an excluded position"


BAD_DISTILLATION = (
    "nan_student",
    "nan_teacher",
    "inf_student",
    "row_all_masked",
    "class_mismatch",
    "one_class",
    "int_logits",
    "vector",
    "label_range",
    "target_shape",
    "mask_shape",
    "mask_dtype",
    "temperature",
    "chunk_size",
    "hyperparameter",
    "not_a_tensor",
)


@pytest.mark.parametrize("name", DISTILLATION_NAMES)
@given(data=st.data(), bad=st.sampled_from(BAD_DISTILLATION))
def test_distillation_losses_reject_bad_input(name: str, data: st.DataObject, bad: str) -> None:
    _check_bad_distillation(name, data.draw(distillation_case(name)), bad)


@pytest.mark.parametrize("name", DISTILLATION_NAMES)
@pytest.mark.parametrize("bad", BAD_DISTILLATION)
def test_distillation_losses_reject_every_bad_kind(name: str, bad: str) -> None:
    _check_bad_distillation(name, _fixed_case(name), bad)


def _fixed_case(name: str) -> dict[str, Any]:
    s = rand((4, 5), 0, 2.0, torch.float32)
    return {
        "s": s,
        "t": rand((4, 5), 1, 2.0, torch.float32),
        "target": torch.tensor([0, 1, 2, 3]),
        "labels": torch.tensor([0, 1, 2, 3]),
        "keep": torch.ones(4, dtype=torch.bool),
        "mask": None,
        "temperature": 2.0,
        "standardize": False,
        "chunk_size": None,
        "hyper": {},
        "dtype": torch.float32,
    }


def _check_bad_distillation(name: str, case: dict[str, Any], kind: str) -> None:
    s, t = case["s"].clone(), case["t"].clone()
    lead, c = s.shape[:-1], s.shape[-1]
    keep = case["keep"]
    if kind not in ("nan_student", "nan_teacher", "inf_student", "row_all_masked"):  # only the bad part is bad
        case = {**case, "s": s.nan_to_num(0.0, 0.0, 0.0), "t": t.nan_to_num(0.0, 0.0, 0.0), "mask": None}
        case["target"] = None if name not in NEEDS_TARGET else torch.randint(0, c, lead)
        s, t = case["s"], case["t"]
    call = lambda **changes: lambda: _call_distillation(name, case, **changes)  # noqa: E731
    full_target = case["target"]
    fn = name + "_loss"
    if kind in ("nan_student", "nan_teacher", "inf_student"):
        if not keep.any():
            return
        first = tuple(int(i) for i in keep.nonzero()[0])
        bad_value = math.nan if kind != "inf_student" else math.inf
        which = s if kind != "nan_teacher" else t
        which[(*first, 0)] = bad_value
        argument = "teacher_logits" if kind == "nan_teacher" else "logits"
        invalid(fn, call(s=s, t=t), argument)
    elif kind == "row_all_masked":
        if not keep.any():
            return
        first = tuple(int(i) for i in keep.nonzero()[0])
        s[first] = -math.inf
        invalid(fn, call(s=s), "logits")
    elif kind == "class_mismatch":
        invalid(fn, call(t=torch.zeros(*lead, c + 1, dtype=t.dtype)), "teacher_logits")
    elif kind == "one_class":
        one = torch.zeros(*lead, 1)
        invalid(fn, call(s=one, t=one, target=torch.zeros(lead, dtype=torch.long), mask=None), "logits")
    elif kind == "int_logits":
        invalid(fn, call(s=torch.zeros(s.shape, dtype=torch.long)), "logits")
    elif kind == "vector":
        invalid(fn, call(s=s.reshape(-1), t=t.reshape(-1), target=None, mask=None), "logits")
    elif kind == "label_range":
        invalid(fn, call(target=torch.full(lead, c, dtype=torch.long), mask=None), "target")
    elif kind == "target_shape":
        invalid(fn, call(target=torch.zeros(*lead, 2, 2, dtype=torch.long), mask=None), "target")
    elif kind == "mask_shape":
        invalid(fn, call(mask=torch.ones(*lead, 2, dtype=torch.bool), target=full_target), "mask")
    elif kind == "mask_dtype":
        invalid(fn, call(mask=torch.ones(lead), target=full_target), "mask")
    elif kind == "temperature":
        for value in (0.0, -1.0, math.nan, math.inf):
            invalid(fn, call(temperature=value, target=full_target, mask=None), "temperature")
    elif kind == "chunk_size":
        invalid(fn, call(chunk_size=0, target=full_target, mask=None), "chunk_size")
    elif kind == "hyperparameter":
        for key in HYPER_KEYS.get(name, ()):
            invalid(fn, call(**{key: math.nan}, target=full_target, mask=None), key)
    elif kind == "not_a_tensor":
        invalid(fn, call(s=s.tolist(), target=full_target, mask=None), "logits")


# =========================================================================== fused LM-head losses
def fused_reference(
    h: np.ndarray, w: np.ndarray, b: np.ndarray | None, y: np.ndarray, teacher: np.ndarray | None, opts: dict[str, Any]
) -> tuple[float, float, float]:
    """(loss, ce, kd) of the fused loss in float64: z = h W^T + b, means over tokens with y != -100."""
    keep = y != -100
    if not keep.any():
        return 0.0, 0.0, 0.0
    z = h[keep] @ w.T + (0.0 if b is None else b)
    labels = y[keep]
    ce = float((-log_softmax(z)[np.arange(len(labels)), labels]).mean())
    if teacher is None:
        return ce, ce, 0.0
    temp, loss = opts["temperature"], opts["loss"]
    log_ps, log_pt = log_softmax(z / temp), log_softmax(teacher[keep] / temp)
    if loss in ("kd", "forward_kl") or (loss == "jsd" and opts["beta"] == 0.0):
        kd = kl_rows(log_pt, log_ps) * (temp**2 if loss == "kd" else 1.0)
    elif loss == "reverse_kl" or (loss == "jsd" and opts["beta"] == 1.0):
        kd = kl_rows(log_ps, log_pt)
    else:
        b_ = opts["beta"]
        log_m = mix_log(log_pt, log_ps, b_)
        kd = b_ * kl_rows(log_pt, log_m) + (1 - b_) * kl_rows(log_ps, log_m)
    kd_mean = float(kd.mean())
    return opts["ce_weight"] * ce + opts["kd_weight"] * kd_mean, ce, kd_mean


EPS_INPUT = {torch.float16: 2**-11, torch.bfloat16: 2**-8, torch.float32: 2**-24, torch.float64: 2**-53}


@st.composite
def fused_case(draw: st.DrawFn, with_teacher: bool) -> dict[str, Any]:
    huge = draw(st.integers(0, 5)) == 0
    vocab = HUGE_VOCAB if huge else draw(st.sampled_from((2, 3, 7, 40)))
    lead = (draw(st.integers(1, 2)),) if huge else draw(st.sampled_from(((1,), (6,), (2, 3))))
    hidden_size = draw(st.sampled_from((1, 4, 16)))
    dtype, seed = draw(DTYPE), draw(SEEDS)
    scale = draw(st.sampled_from((1e-3, 1.0, 10.0)))
    h = rand((*lead, hidden_size), seed, scale, dtype)
    w = rand((vocab, hidden_size), seed + 1, scale, dtype)
    b = rand((vocab,), seed + 2, scale, dtype) if draw(st.booleans()) else None
    g = torch.Generator().manual_seed(seed + 3)
    y = torch.randint(0, vocab, lead, generator=g)
    drop = draw(st.sampled_from(("none", "some", "all")))
    if drop != "none":
        ignored = torch.rand(lead, generator=g) < 0.5 if drop == "some" else torch.ones(lead, dtype=torch.bool)
        y = y.masked_fill(ignored, -100)
        h = h.masked_fill(ignored.unsqueeze(-1), draw(st.sampled_from((math.nan, math.inf))))  # ignored: anything
    opts = {
        "loss": draw(st.sampled_from(("kd", "forward_kl", "reverse_kl", "jsd"))),
        "beta": draw(st.sampled_from((0.0, 0.5, 0.9, 1.0))),
        "temperature": draw(st.sampled_from((0.5, 1.0, 2.0))),
        "ce_weight": draw(st.sampled_from((0.0, 1.0, 0.5))),
        "kd_weight": draw(st.sampled_from((0.0, 1.0, 2.0))),
    }
    teacher = topk = None
    if with_teacher:
        teacher = rand((*lead, vocab), seed + 4, draw(SCALE), draw(DTYPE))
        if draw(st.booleans()):  # the cache's top-k form, rebuilt as reconstruct_logits does
            k = draw(st.integers(1, vocab))
            values, indices = teacher.float().topk(k, dim=-1)
            rest = torch.logsumexp(teacher.float(), dim=-1) - 1.0
            topk = (values.to(teacher.dtype), indices, rest)
            rebuilt = torch.full((*lead, vocab), 0.0, dtype=torch.float64)
            if k < vocab:  # the fill is computed in float32, as reconstruct_logits documents
                rebuilt += (rest.float() - math.log(vocab - k)).double().unsqueeze(-1)
            teacher = rebuilt.scatter(-1, indices, values.to(teacher.dtype).double())
    return {
        "h": h,
        "w": w,
        "b": b,
        "y": y,
        "teacher": teacher,
        "topk": topk,
        "opts": opts,
        "chunk_size": draw(st.sampled_from((None, 1, 4))),
        "dtype": dtype,
    }


def _fused_tolerance(case: dict[str, Any]) -> float:
    """Roundoff of the logits (a product in the inputs' dtype) plus that of the float32 loss arithmetic."""
    h, w, b, dtype = case["h"], case["w"], case["b"], case["dtype"]
    keep = (case["y"] != -100).reshape(-1)
    habs = f64(h).reshape(-1, h.shape[-1])[keep.numpy()]
    bound = float((np.abs(habs) @ np.abs(f64(w)).T).max(initial=0.0) + (0 if b is None else np.abs(f64(b)).max()))
    opts = case["opts"]
    temp = opts["temperature"]
    sensitivity = abs(opts["ce_weight"]) * 2 + abs(opts["kd_weight"]) * 2 * (temp if opts["loss"] == "kd" else 1 / temp)
    logit_error = 4 * h.shape[-1] * EPS_INPUT[dtype] * bound
    teacher = 0.0 if case["teacher"] is None else float(np.abs(f64(case["teacher"])).max())
    return sensitivity * logit_error + atol(dtype, bound / min(temp, 1.0) + teacher, sensitivity)


@given(data=st.data(), with_teacher=st.booleans(), return_terms=st.booleans())
def test_fused_losses_agree_with_float64(data: st.DataObject, with_teacher: bool, return_terms: bool) -> None:
    case = data.draw(fused_case(with_teacher))
    h, w, b, y, dtype, opts = case["h"], case["w"], case["b"], case["y"], case["dtype"], case["opts"]
    teacher = None if case["teacher"] is None else f64(case["teacher"]).reshape(-1, w.shape[0])
    want, ce, kd = fused_reference(
        f64(h).reshape(-1, h.shape[-1]), f64(w), None if b is None else f64(b), y.reshape(-1).numpy(), teacher, opts
    )
    if not with_teacher:
        want = ce
    name = "fused_distillation_loss" if with_teacher else "fused_linear_cross_entropy"
    hg = h.clone().requires_grad_(dtype != torch.bfloat16)

    def call() -> Any:
        if not with_teacher:
            return LF.fused_linear_cross_entropy(hg, w, y, bias=b, chunk_size=case["chunk_size"])
        teacher_arg = (
            {"teacher_topk": case["topk"]} if case["topk"] is not None else {"teacher_logits": case["teacher"]}
        )
        return LF.fused_distillation_loss(
            hg, w, y, **teacher_arg, bias=b, chunk_size=case["chunk_size"], return_terms=return_terms, **opts
        )

    if overflows(want, dtype):
        invalid(name, call, "hidden")
        return
    out = valid(name, call)
    tol = _fused_tolerance(case)
    if isinstance(out, LF.FusedLossTerms):
        CASES["FusedLossTerms"]["valid"] += 1
        work = torch.float64 if dtype == torch.float64 else torch.float32
        unit = _fused_tolerance({**case, "opts": {**opts, "ce_weight": 1.0, "kd_weight": 1.0}})  # whatever the weights
        assert_close("FusedLossTerms.ce", out.ce, ce, work, unit)
        assert_close("FusedLossTerms.kd", out.kd, kd, work, unit)
        out = out.loss
    assert out.dtype == dtype
    assert_close(name, out, want, dtype, tol)
    if hg.requires_grad:
        (grad,) = torch.autograd.grad(out, hg)
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient"


BAD_FUSED = (
    "nan_hidden",
    "nan_weight",
    "nan_teacher",
    "nan_topk",
    "topk_index",
    "transposed_weight",
    "one_token",
    "dtype_mismatch",
    "bias_shape",
    "float_target",
    "target_shape",
    "label_range",
    "teacher_shape",
    "both_teachers",
    "no_teacher",
    "loss_name",
    "temperature",
    "weights",
    "beta",
    "chunk_size",
    "topk_shape",
)


def _check_bad_fused(kind: str) -> None:
    h, w = rand((2, 3, 4), 0, 1.0, torch.float32), rand((7, 4), 1, 1.0, torch.float32)
    y, teacher = torch.randint(0, 7, (2, 3)), rand((2, 3, 7), 2, 1.0, torch.float32)
    values, indices = teacher.topk(3, dim=-1)
    topk = (values, indices, torch.zeros(2, 3))
    name = "fused_distillation_loss"

    def call(**changes: Any) -> Callable[[], Any]:
        kwargs: dict[str, Any] = {"hidden": h, "weight": w, "target": y, "teacher_logits": teacher, **changes}
        return lambda: LF.fused_distillation_loss(**kwargs)

    nan_h, nan_w, nan_t = h.clone(), w.clone(), teacher.clone()
    nan_h[0, 0, 0] = nan_w[0, 0] = nan_t[0, 0, 0] = math.nan
    cases: dict[str, tuple[Callable[[], Any], str]] = {
        "nan_hidden": (call(hidden=nan_h), "hidden"),
        "nan_weight": (call(weight=nan_w), "weight"),
        "nan_teacher": (call(teacher_logits=nan_t), "teacher_logits"),
        "nan_topk": (
            call(teacher_logits=None, teacher_topk=(values.masked_fill(values > -9, math.nan), *topk[1:])),
            "teacher_topk",
        ),
        "topk_index": (call(teacher_logits=None, teacher_topk=(values, indices + 7, topk[2])), "teacher_topk"),
        "transposed_weight": (call(weight=w.T.contiguous()), "weight"),
        "one_token": (call(weight=w[:1], teacher_logits=teacher[..., :1], target=torch.zeros_like(y)), "weight"),
        "dtype_mismatch": (call(weight=w.half()), "weight"),
        "bias_shape": (call(bias=torch.zeros(6)), "bias"),
        "float_target": (call(target=y.float()), "target"),
        "target_shape": (call(target=y.reshape(-1)), "target"),
        "label_range": (call(target=y + 7), "target"),
        "teacher_shape": (call(teacher_logits=teacher[..., :6]), "teacher_logits"),
        "both_teachers": (call(teacher_topk=topk), "teacher_topk"),
        "no_teacher": (call(teacher_logits=None), "teacher_logits"),
        "loss_name": (call(loss="dkd"), "loss"),
        "temperature": (call(temperature=math.nan), "temperature"),
        "weights": (call(kd_weight=math.inf), "kd_weight"),
        "beta": (call(loss="jsd", beta=1.5), "beta"),
        "chunk_size": (call(chunk_size=0), "chunk_size"),
        "topk_shape": (call(teacher_logits=None, teacher_topk=(values, indices[..., :2], topk[2])), "teacher_topk"),
    }
    fn, argument = cases[kind]
    invalid(name, fn, argument)
    if kind in ("nan_hidden", "nan_weight", "dtype_mismatch", "label_range", "chunk_size", "target_shape"):
        kwargs = {"hidden": nan_h if kind == "nan_hidden" else h, "weight": nan_w if kind == "nan_weight" else w}
        kwargs["weight"] = w.half() if kind == "dtype_mismatch" else kwargs["weight"]
        target = y + 7 if kind == "label_range" else (y.reshape(-1) if kind == "target_shape" else y)
        chunk = 0 if kind == "chunk_size" else None
        invalid(
            "fused_linear_cross_entropy",
            lambda: LF.fused_linear_cross_entropy(kwargs["hidden"], kwargs["weight"], target, chunk_size=chunk),
            argument,
        )


@pytest.mark.parametrize("kind", BAD_FUSED)
def test_fused_losses_reject_bad_input(kind: str) -> None:
    _check_bad_fused(kind)


@given(tokens=st.integers(0, 10**6), hidden=st.integers(0, 10**5), vocab=st.integers(1, 10**6))
def test_default_chunk_size_is_a_positive_row_count(tokens: int, hidden: int, vocab: int) -> None:
    got = valid("default_chunk_size", lambda: LF.default_chunk_size(tokens, hidden, vocab))
    want = max(1, min(tokens, max(8, -(-tokens * hidden // vocab))))  # ceil(N H / V), clipped to [8, N], at least 1
    assert got == want and isinstance(got, int)
    for bad, argument in (((-1, hidden, vocab), "num_tokens"), ((tokens, hidden, 0), "vocab")):
        invalid("default_chunk_size", lambda bad=bad: LF.default_chunk_size(*bad), argument)


# =========================================================================== classification_loss
@st.composite
def classification_case(draw: st.DrawFn) -> tuple[Tensor, Tensor, float]:
    huge = draw(st.integers(0, 7)) == 0
    n, c = (draw(st.integers(1, 2)), HUGE_VOCAB) if huge else (draw(st.integers(1, 9)), draw(CLASSES))
    dtype, seed = draw(DTYPE), draw(SEEDS)
    z = rand((n, c), seed, draw(SCALE), dtype)
    g = torch.Generator().manual_seed(seed)
    if draw(st.booleans()):
        target = torch.randint(0, c, (n,), generator=g)
    else:
        target = torch.rand(n, c, generator=g, dtype=torch.float64).softmax(1).to(dtype)
    return z, target, draw(st.sampled_from((0.0, 0.1, 0.9)))


@given(case=classification_case())
def test_classification_loss_agrees_with_float64(case: tuple[Tensor, Tensor, float]) -> None:
    z, target, smoothing = case
    c = z.shape[1]
    q = one_hot(target.numpy(), c) if not target.is_floating_point() else f64(target)
    q = (1 - smoothing) * q + smoothing / c
    want = float(-(q * log_softmax(f64(z))).sum(1).mean())
    if overflows(want, z.dtype):
        invalid("classification_loss", lambda: LF.classification_loss(z, target, smoothing), "logits")
        return
    out = valid("classification_loss", lambda: LF.classification_loss(z, target, smoothing))
    rounding = torch.float32 if z.dtype == torch.float64 else z.dtype  # documented: computed in float32
    assert_close("classification_loss", out, want, rounding, atol(torch.float32, float(np.abs(f64(z)).max()), 4))


@given(
    case=classification_case(),
    bad=st.sampled_from(("nan", "inf", "one_class", "label", "shape", "dtype", "smoothing", "list")),
)
def test_classification_loss_rejects_bad_input(case: tuple[Tensor, Tensor, float], bad: str) -> None:
    z, target, _ = case
    n, c = z.shape
    fn = lambda z=z, target=target, s=0.0: lambda: LF.classification_loss(z, target, s)  # noqa: E731
    if bad in ("nan", "inf"):
        z = z.clone()
        z[-1, 0] = math.nan if bad == "nan" else -math.inf
        invalid("classification_loss", fn(z), "logits")
    elif bad == "one_class":
        invalid("classification_loss", fn(z[:, :1], torch.zeros(n, dtype=torch.long)), "logits")
    elif bad == "label":
        invalid("classification_loss", fn(target=torch.full((n,), c)), "target")
    elif bad == "shape":
        invalid("classification_loss", fn(target=torch.zeros(n + 1, dtype=torch.long)), "target")
    elif bad == "dtype":
        invalid("classification_loss", fn(target=torch.zeros(n, dtype=torch.bool)), "target")
    elif bad == "smoothing":
        invalid("classification_loss", fn(s=1.0), "label_smoothing")
    else:
        invalid("classification_loss", fn(z.tolist()), "logits")


# =========================================================================== diagnostics: logit scores
@st.composite
def logit_matrix(draw: st.DrawFn, min_rows: int = 1) -> Tensor:
    """``[N, C]`` logits: N from 1, C from 2 (a few huge), any dtype, scales up to 1e4, sometimes all tied."""
    huge = draw(st.integers(0, 9)) == 0
    n, c = (draw(st.integers(min_rows, 2)), HUGE_VOCAB) if huge else (draw(st.integers(min_rows, 9)), draw(CLASSES))
    z = rand((n, c), draw(SEEDS), draw(SCALE), draw(DTYPE))
    pattern = draw(st.sampled_from(("plain", "plain", "rounded", "constant", "one_hot")))
    if pattern == "rounded":  # many ties
        z = z.round()
    elif pattern == "constant":
        z = torch.full_like(z, float(z[0, 0]))
    elif pattern == "one_hot":
        z = torch.zeros_like(z)
        z[:, 0] = 1e4 if z.dtype != torch.float16 else 3e4
    return z


def _mano_normalize_ref(z: np.ndarray, normalization: str, order: int) -> tuple[np.ndarray, float]:
    """(P, the size of the largest term relative to each row's L1 norm: how much roundoff can matter)."""
    if normalization == "softmax":
        return softmax(z), 1.0
    terms = [np.ones_like(z)]
    for i in range(1, order + 1):
        terms.append(terms[-1] * z / i)
    v = np.sum(terms, axis=0)
    v = v - v.min(axis=1, keepdims=True)
    l1 = np.abs(v).sum(axis=1, keepdims=True)
    largest = np.max(np.abs(terms), axis=(0, 2))[:, None]
    ratio = float(np.max(np.where(l1 > 0, largest / np.maximum(l1, 1e-300), largest / 1e-12)))
    return v / np.maximum(l1, 1e-12), ratio


def _gap_ref(z: np.ndarray, top_n: int | None) -> np.ndarray:
    top = -np.sort(-z, axis=1)
    n = z.shape[1] - 1 if top_n is None else top_n
    return top[:, 0] - top[:, 1 : n + 1].mean(axis=1)


def _normalized_ref(z: np.ndarray, p: float, center: bool) -> np.ndarray:
    if center:
        z = z - z.mean(axis=1, keepdims=True)
    norm = np.sum(np.abs(z) ** p, axis=1) ** (1 / p) if np.isfinite(p) else np.abs(z).max(axis=1)
    return z.max(axis=1) / np.maximum(norm, np.finfo(np.float64).tiny)


SCORE_FUNCTIONS = (
    "msp_score",
    "max_logit_score",
    "energy_score",
    "average_confidence",
    "mano_criterion",
    "logit_gap_score",
    "normalized_logit_score",
    "mano_normalize",
    "mano_score",
    "mano_select_normalization",
    "select_logit_gap_top_n",
)


@pytest.mark.parametrize("name", SCORE_FUNCTIONS)
@given(z=logit_matrix(), data=st.data())
def test_logit_scores_agree_with_float64(name: str, z: Tensor, data: st.DataObject) -> None:
    x = f64(z)
    n, c = x.shape
    dtype = z.dtype
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # scores are computed in float32 or wider
    big = float(np.abs(x).max())
    fn = getattr(LF, name)
    if name == "msp_score":
        assert_close(name, valid(name, lambda: fn(z)), softmax(x).max(1), out_dtype, atol(dtype, big))
    elif name == "max_logit_score":
        out = valid(name, lambda: fn(z))
        assert out.dtype == dtype
        assert_close(name, out, x.max(1), dtype, 0.0)
    elif name == "energy_score":
        temp = data.draw(st.sampled_from((0.1, 1.0, 1000.0)))
        want = temp * (np.log(np.exp(x / temp - (x / temp).max(1, keepdims=True)).sum(1)) + (x / temp).max(1))
        assert_close(name, valid(name, lambda: fn(z, temperature=temp)), want, out_dtype, atol(dtype, big, 4))
    elif name == "average_confidence":
        assert_close(name, valid(name, lambda: fn(z)), softmax(x).max(1).mean(), out_dtype, atol(dtype, big))
    elif name == "mano_criterion":
        want = (-log_softmax(x)).mean()
        assert_close(name, valid(name, lambda: fn(z)), want, out_dtype, atol(dtype, big, 4))
    elif name == "logit_gap_score":
        top_n = data.draw(st.one_of(st.none(), st.integers(1, c - 1)))
        assert_close(name, valid(name, lambda: fn(z, top_n=top_n)), _gap_ref(x, top_n), out_dtype, atol(dtype, big))
    elif name == "normalized_logit_score":
        p, center = data.draw(st.sampled_from((0.5, 1.0, 2.0, 3.0))), data.draw(st.booleans())
        want = _normalized_ref(x, p, center)
        got = valid(name, lambda: fn(z, p=p, center=center))
        assert (got.abs() <= 1 + 1e-12).all()  # |max z| <= ||z||_p for every p > 0
        if center:  # a constant row centred is roundoff, whose direction means nothing: only the bound holds
            spread = np.abs(x - x.mean(1, keepdims=True)).max(1)
            well_posed = spread > 1e3 * EPS_COMPUTE[torch.float64] * np.abs(x).max(1)
            got, want = got[torch.from_numpy(well_posed)], want[well_posed]
        assert_close(name, got, want, torch.float64, 1e-9 * c)
    elif name == "mano_normalize":
        normalization = data.draw(st.sampled_from(("softmax", "taylor")))
        order = data.draw(st.integers(1, 4))
        want, ratio = _mano_normalize_ref(x, normalization, order)
        out = valid(name, lambda: fn(z, normalization, order))
        assert_close(name, out, want, out_dtype, atol(dtype, big if normalization == "softmax" else c * ratio))
    elif name in ("mano_score", "mano_select_normalization"):
        threshold = data.draw(st.sampled_from((0.0, 1.0, 5.0, 1e3)))
        criterion = float((-log_softmax(x)).mean())
        near = abs(criterion - threshold) <= atol(dtype, big, 4) + 1e-6 * criterion  # either choice is right
        choice = "softmax" if criterion > threshold else "taylor"
        if name == "mano_select_normalization":
            got = valid(name, lambda: fn(z, threshold=threshold))
            assert got == choice or near, f"{name}: {got} (criterion {criterion}, threshold {threshold})"
            return
        p = data.draw(st.sampled_from((1.0, 2.0, 4.0)))
        normalization = data.draw(st.sampled_from(("auto", "softmax", "taylor")))
        order = data.draw(st.integers(1, 3))
        out = valid(name, lambda: fn(z, p=p, normalization=normalization, threshold=threshold, taylor_order=order))
        choices = [normalization] if normalization != "auto" else ([choice] if not near else ["softmax", "taylor"])
        wants = []
        for option in choices:
            probs, ratio = _mano_normalize_ref(x, option, order)
            wants.append((np.sum(np.abs(probs) ** p) / (n * c)) ** (1 / p))
        tol = atol(dtype, big if choices == ["softmax"] else c * ratio, c)
        assert any(abs(float(out) - w) <= tol + RTOL[out_dtype] * w for w in wants), (out, wants)
    elif name == "select_logit_gap_top_n":
        got = valid(name, lambda: fn(z))
        assert isinstance(got, int) and 1 <= got <= c - 1
        if c > 3:  # the knee: the point of the mean sorted curve farthest below its chord (up to roundoff)
            curve = (-np.sort(-x, axis=1)).mean(0)[1:]
            chord = curve[0] + (curve[-1] - curve[0]) * np.arange(len(curve)) / (len(curve) - 1)
            below = chord - curve
            below[-1] = 0.0  # on the chord by construction (roundoff aside): never the knee
            assert below[got] >= below.max() - 1e-9 * (1 + big) or (got == 1 and below.argmax() == 0)
        else:
            assert got == c - 1
    else:
        raise AssertionError(name)


BAD_LOGITS = ("nan", "inf", "empty", "one_class", "vector", "int", "list")


@pytest.mark.parametrize("name", SCORE_FUNCTIONS)
@given(z=logit_matrix(), bad=st.sampled_from(BAD_LOGITS))
def test_logit_scores_reject_bad_logits(name: str, z: Tensor, bad: str) -> None:
    fn = getattr(LF, name)
    argument = "id_logits" if name == "select_logit_gap_top_n" else "logits"
    if bad in ("nan", "inf"):
        z = z.clone()
        z[-1, -1] = math.nan if bad == "nan" else math.inf
    else:
        z = {
            "empty": z[:0],
            "one_class": z[:, :1],
            "vector": z[0],
            "int": z.long(),
            "list": z.tolist(),
        }[bad]
    if name == "mano_normalize" and bad == "empty":
        return  # an empty batch is normalized to an empty result (MaNoScore.update may see one)
    invalid(name, lambda: fn(z), argument)


SCORE_PARAMETERS: dict[str, list[tuple[dict[str, Any], str]]] = {
    "energy_score": [({"temperature": 0.0}, "temperature"), ({"temperature": math.nan}, "temperature")],
    "logit_gap_score": [({"top_n": 0}, "top_n"), ({"top_n": 10**6}, "top_n")],
    "normalized_logit_score": [({"p": 0.0}, "p"), ({"p": math.nan}, "p")],
    "mano_normalize": [({"normalization": "l2"}, "normalization"), ({"taylor_order": 0}, "taylor_order")],
    "mano_score": [
        ({"p": 0.5}, "p"),
        ({"normalization": "l2"}, "normalization"),
        ({"taylor_order": 0}, "taylor_order"),
        ({"threshold": math.nan}, "threshold"),
    ],
    "mano_select_normalization": [({"threshold": math.nan}, "threshold")],
}


@pytest.mark.parametrize(
    ("name", "kwargs", "argument"), [(n, k, a) for n, cases in SCORE_PARAMETERS.items() for k, a in cases]
)
def test_logit_scores_reject_bad_parameters(name: str, kwargs: dict[str, Any], argument: str) -> None:
    invalid(name, lambda: getattr(LF, name)(torch.randn(4, 5), **kwargs), argument)


# =========================================================================== diagnostics: score vectors
@st.composite
def score_vector(draw: st.DrawFn, min_size: int = 1) -> Tensor:
    n = draw(st.sampled_from((min_size, 2, 7, 20)))
    x = rand((n,), draw(SEEDS), draw(SCALE), draw(DTYPE))
    if draw(st.booleans()):
        x = (x * 2).round() / 2  # ties
    return x


def _auroc_ref(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a[:, None] > b[None, :]) + 0.5 * (a[:, None] == b[None, :])).mean())


def _risk_coverage_ref(s: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    thresholds = np.unique(s)[::-1]
    accepted = np.array([(s >= th).sum() for th in thresholds], dtype=np.float64)
    errors = np.array([((s >= th) & ~correct).sum() for th in thresholds], dtype=np.float64)
    return accepted / len(s), errors / accepted, thresholds


def _aurc_ref(s: np.ndarray, correct: np.ndarray) -> float:
    # every k = 1..N takes the risk of the group of tied scores the k-th most confident belongs to
    risks = [((s >= th) & ~correct).sum() / (s >= th).sum() for th in -np.sort(-s)]
    return float(np.mean(risks))


VECTOR_FUNCTIONS = (
    "ood_auroc",
    "fpr_at_tpr",
    "fit_atc_threshold",
    "atc_estimate",
    "risk_coverage_curve",
    "aurc",
    "excess_aurc",
)


@pytest.mark.parametrize("name", VECTOR_FUNCTIONS)
@given(a=score_vector(), b=score_vector(), seed=SEEDS, data=st.data())
def test_score_vector_functions_agree_with_float64(
    name: str, a: Tensor, b: Tensor, seed: int, data: st.DataObject
) -> None:
    x, y = f64(a), f64(b)
    correct = torch.rand(a.shape, generator=torch.Generator().manual_seed(seed)) < data.draw(
        st.sampled_from((0.0, 0.5, 1.0))
    )
    ok = correct.numpy()
    fn = getattr(LF, name)
    if name == "ood_auroc":
        assert_close(name, valid(name, lambda: fn(a, b)), _auroc_ref(x, y), torch.float64, 1e-12)
    elif name == "fpr_at_tpr":
        tpr = data.draw(st.sampled_from((0.01, 0.5, 0.95, 1.0)))
        k = max(1, math.floor(tpr * len(x)))
        want = float((y >= np.sort(x)[::-1][k - 1]).mean())
        assert_close(name, valid(name, lambda: fn(a, b, tpr)), want, torch.float64, 1e-12)
    elif name == "fit_atc_threshold":
        errors = int((~ok).sum())
        want = math.inf if errors == len(x) else float(np.sort(x)[errors])
        got = valid(name, lambda: fn(a, correct))
        assert got == want, (got, want)
    elif name == "atc_estimate":
        threshold = data.draw(st.sampled_from((-math.inf, 0.0, 0.5, math.inf)))
        want = float((x >= threshold).mean())
        assert_close(name, valid(name, lambda: fn(a, threshold)), want, torch.float64, 1e-12)
    elif name == "risk_coverage_curve":
        got = valid(name, lambda: fn(a, correct))
        for part, want in zip(got, _risk_coverage_ref(x, ok), strict=True):
            assert_close(name, part, want, torch.float64, 1e-12)
    elif name == "aurc":
        assert_close(name, valid(name, lambda: fn(a, correct)), _aurc_ref(x, ok), torch.float64, 1e-12)
    elif name == "excess_aurc":
        n, errors = len(x), int((~ok).sum())
        best = sum((k - (n - errors)) / k for k in range(n - errors + 1, n + 1)) / n
        want = _aurc_ref(x, ok) - best
        assert_close(name, valid(name, lambda: fn(a, correct)), want, torch.float64, 1e-12)
        assert float(fn(a, correct)) >= -1e-12  # no ranking beats the perfect one
    else:
        raise AssertionError(name)


@pytest.mark.parametrize("name", VECTOR_FUNCTIONS)
@given(a=score_vector(), bad=st.sampled_from(("nan", "inf", "empty", "matrix", "list", "correct_shape", "parameter")))
def test_score_vector_functions_reject_bad_input(name: str, a: Tensor, bad: str) -> None:
    fn = getattr(LF, name)
    first = {"ood_auroc": "id_scores", "fpr_at_tpr": "id_scores", "fit_atc_threshold": "val_scores"}
    first |= {"atc_estimate": "target_scores"}
    argument = first.get(name, "scores")
    correct = torch.ones(a.shape, dtype=torch.bool)

    def call(x: Any, second: Any = None, **kwargs: Any) -> Callable[[], Any]:
        if name in ("ood_auroc", "fpr_at_tpr"):
            return lambda: fn(x, a if second is None else second, **kwargs)
        if name == "atc_estimate":
            return lambda: fn(x, kwargs.get("threshold", 0.5))
        return lambda: fn(x, correct if second is None else second)

    if bad in ("nan", "inf"):
        x = a.clone()
        x[0] = math.nan if bad == "nan" else -math.inf
        invalid(name, call(x), argument)
        if name in ("ood_auroc", "fpr_at_tpr"):
            invalid(name, call(a, x), "ood_scores")
    elif bad == "empty":
        invalid(name, call(a[:0], a[:0] if name in ("ood_auroc", "fpr_at_tpr") else correct[:0]), argument)
    elif bad == "matrix":
        invalid(name, call(a.reshape(1, -1)), argument)
    elif bad == "list":
        invalid(name, call(a.tolist()), argument)
    elif bad == "correct_shape" and name not in ("ood_auroc", "fpr_at_tpr", "atc_estimate"):
        invalid(name, call(a, torch.ones(len(a) + 1, dtype=torch.bool)), "correct")
    elif bad == "parameter" and name == "fpr_at_tpr":
        invalid(name, call(a, tpr=0.0), "tpr")
    elif bad == "parameter" and name == "atc_estimate":
        invalid(name, call(a, threshold=math.nan), "threshold")


# =========================================================================== diagnostics: ViM
@given(
    n=st.sampled_from((1, 3, 40)),
    d=st.sampled_from((1, 2, 6)),
    c=st.sampled_from((2, 5)),
    dtype=DTYPE,
    seed=SEEDS,
    scale=st.sampled_from((1e-3, 1.0, 100.0)),
    with_bias=st.booleans(),
    data=st.data(),
)
def test_vim_agrees_with_float64(
    n: int, d: int, c: int, dtype: torch.dtype, seed: int, scale: float, with_bias: bool, data: st.DataObject
) -> None:
    x = rand((n, d), seed, scale, dtype)
    w, b = rand((c, d), seed + 1, 1.0, dtype), rand((c,), seed + 2, 1.0, dtype) if with_bias else None
    dim = data.draw(st.integers(0, d - 1)) if d > 1 else 0
    x64, w64 = f64(x), f64(w)
    b64 = np.zeros(c) if b is None else f64(b)
    origin = -np.linalg.pinv(w64) @ b64
    centred = x64 - origin
    eigvals, eigvecs = np.linalg.eigh(centred.T @ centred / n)
    order = np.argsort(-eigvals, kind="stable")
    residual_basis = eigvecs[:, order[dim:]]
    mean_residual = float(np.linalg.norm(centred @ residual_basis, axis=1).mean())
    if mean_residual <= 1e-9 * np.abs(centred).max():  # no residual beyond roundoff: an error naming dim
        invalid("fit_vim", lambda: LF.fit_vim(x, w, b, dim=dim), "dim")
        return
    sub = valid("fit_vim", lambda: LF.fit_vim(x, w, b, dim=dim))
    CASES["ViMSubspace"]["valid"] += 1
    assert isinstance(sub, LF.ViMSubspace) and sub.dim == dim and sub.feature_dim == d
    assert_close("fit_vim origin", sub.origin, origin, torch.float64, 1e-8 * (1 + np.abs(origin).max()))
    gap = np.sort(eigvals)[::-1]
    if dim == 0 or gap[dim - 1] - gap[dim] > 1e-6 * (1 + gap[0]):  # a well-defined residual space
        projector = sub.null_space @ sub.null_space.T
        want = residual_basis @ residual_basis.T
        assert_close("fit_vim null space", projector, want, torch.float64, 1e-6)
        alpha = float((x64 @ w64.T + b64).max(1).mean()) / mean_residual
        assert_close("fit_vim alpha", sub.alpha, alpha, torch.float64, 1e-6 * (1 + abs(alpha)))
        logits = rand((n, c), seed + 3, 10.0, dtype)
        z64 = f64(logits)
        energy = z64.max(1) + np.log(np.exp(z64 - z64.max(1, keepdims=True)).sum(1))
        want_score = energy - sub.alpha * np.linalg.norm(centred @ residual_basis, axis=1)
        got = valid("vim_score", lambda: LF.vim_score(x, logits, sub))
        out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        assert_close("vim_score", got, want_score, out_dtype, atol(out_dtype, float(np.abs(want_score).max()), 16))


@pytest.mark.parametrize(
    "bad",
    (
        "nan_features",
        "features_shape",
        "weight_shape",
        "bias_shape",
        "dim",
        "empty",
        "score_nan",
        "score_size",
        "score_rows",
    ),
)
def test_vim_rejects_bad_input(bad: str) -> None:
    x, w, b = torch.randn(30, 6), torch.randn(3, 6), torch.randn(3)
    sub = LF.fit_vim(x, w, b)
    nan_x = x.clone()
    nan_x[0, 0] = math.nan
    cases: dict[str, tuple[str, Callable[[], Any], str]] = {
        "nan_features": ("fit_vim", lambda: LF.fit_vim(nan_x, w, b), "features"),
        "features_shape": ("fit_vim", lambda: LF.fit_vim(x[0], w, b), "features"),
        "weight_shape": ("fit_vim", lambda: LF.fit_vim(x, w[:, :5], b), "weight"),
        "bias_shape": ("fit_vim", lambda: LF.fit_vim(x, w, b[:2]), "bias"),
        "dim": ("fit_vim", lambda: LF.fit_vim(x, w, b, dim=6), "dim"),
        "empty": ("fit_vim", lambda: LF.fit_vim(x[:0], w, b), "features"),
        "score_nan": ("vim_score", lambda: LF.vim_score(nan_x, x @ w.T, sub), "features"),
        "score_size": ("vim_score", lambda: LF.vim_score(x[:, :5], x @ w.T, sub), "features"),
        "score_rows": ("vim_score", lambda: LF.vim_score(x[:3], x @ w.T, sub), "features"),
    }
    name, call, argument = cases[bad]
    invalid(name, call, argument)


# =========================================================================== diagnostics: labelled
@st.composite
def labelled_logits(draw: st.DrawFn) -> tuple[Tensor, Tensor]:
    z = draw(logit_matrix())
    y = torch.randint(0, z.shape[1], (z.shape[0],), generator=torch.Generator().manual_seed(draw(SEEDS)))
    return z, y


def _ece_ref(z: np.ndarray, y: np.ndarray, n_bins: int, norm: str) -> tuple[float, float]:
    """(ECE, distance of the nearest confidence to a bin edge): equal-width bins [k/n, (k+1)/n)."""
    p = softmax(z)
    conf, right = p.max(1), (p.argmax(1) == y).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    bins = np.searchsorted(edges, conf, side="right") - 1
    gaps, weights = [], []
    for k in np.unique(bins):
        sel = bins == k
        gaps.append(abs(right[sel].mean() - conf[sel].mean()))
        weights.append(sel.mean())
    gaps_a, weights_a = np.array(gaps), np.array(weights)
    value = {"l1": (gaps_a * weights_a).sum(), "l2": math.sqrt((gaps_a**2 * weights_a).sum()), "max": gaps_a.max()}[
        norm
    ]
    return float(value), float(np.abs(conf[:, None] - edges[None, :]).min())


def _dual_focal_ref(z: np.ndarray, y: np.ndarray, gamma: float) -> np.ndarray:
    log_p = log_softmax(z)
    p = np.exp(log_p)
    rows = np.arange(len(y))
    p_y = p[rows, y]
    below = np.where(p < p_y[:, None], p, 0.0).max(1)
    return -(np.clip(1 - p_y + below, 0, None) ** gamma) * log_p[rows, y]


@pytest.mark.parametrize("name", ("expected_calibration_error", "fit_temperature", "dual_focal_loss"))
@given(case=labelled_logits(), data=st.data())
def test_labelled_diagnostics_agree_with_float64(name: str, case: tuple[Tensor, Tensor], data: st.DataObject) -> None:
    z, y = case
    x, labels = f64(z), y.numpy()
    dtype = z.dtype
    big = float(np.abs(x).max())
    if name == "expected_calibration_error":
        n_bins, norm = data.draw(st.sampled_from((1, 3, 15))), data.draw(st.sampled_from(("l1", "l2", "max")))
        want, edge_distance = _ece_ref(x, labels, n_bins, norm)
        got = valid(name, lambda: LF.expected_calibration_error(z, y, n_bins=n_bins, norm=norm))
        # torchmetrics bins float32 confidences whatever the input dtype
        if edge_distance > atol(torch.float32, big):  # no confidence on a bin edge up to roundoff: the same bins
            assert_close(name, got, want, torch.float32, atol(torch.float32, big + len(labels), 4))
        assert 0.0 <= float(got) <= 1.0
    elif name == "fit_temperature":
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            temp = valid(name, lambda: LF.fit_temperature(z, y, max_iter=data.draw(st.sampled_from((1, 20)))))
        assert isinstance(temp, float) and math.isfinite(temp) and temp > 0

        def nll(t: float) -> float:
            return float(-log_softmax(x / t)[np.arange(len(labels)), labels].mean())

        # LBFGS starts at T = 1 and only accepts steps that lower the float64 NLL
        assert nll(temp) <= nll(1.0) + 1e-9 * (1 + abs(nll(1.0)))
    else:
        gamma = data.draw(st.sampled_from((0.0, 1.0, 5.0)))
        reduction = data.draw(st.sampled_from(("mean", "sum", "none")))
        per = _dual_focal_ref(x, labels, gamma)
        want = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
        if overflows(want, dtype):
            invalid(name, lambda: LF.dual_focal_loss(z, y, gamma, reduction), "logits")
            return
        got = valid(name, lambda: LF.dual_focal_loss(z, y, gamma, reduction))
        assert got.dtype == dtype
        scale = 2.0**gamma * len(labels) if reduction == "sum" else 2.0**gamma
        assert_close(name, got, want, dtype, atol(dtype, big, scale * 4))


LABELLED_BAD = ("nan", "label_range", "label_shape", "label_dtype", "parameter", "empty")


@pytest.mark.parametrize("name", ("expected_calibration_error", "fit_temperature", "dual_focal_loss"))
@pytest.mark.parametrize("bad", LABELLED_BAD)
def test_labelled_diagnostics_reject_bad_input(name: str, bad: str) -> None:
    z, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    fn = getattr(LF, name)
    nan_z = z.clone()
    nan_z[2, 1] = math.nan
    parameter = {
        "expected_calibration_error": ({"n_bins": 0}, "n_bins"),
        "fit_temperature": ({"init": 0.0}, "init"),
        "dual_focal_loss": ({"gamma": -1.0}, "gamma"),
    }[name]
    cases: dict[str, tuple[Callable[[], Any], str]] = {
        "nan": (lambda: fn(nan_z, y), "logits"),
        "label_range": (lambda: fn(z, y + 4), "target"),
        "label_shape": (lambda: fn(z, y[:5]), "target"),
        "label_dtype": (lambda: fn(z, y.float()), "target"),
        "parameter": (lambda: fn(z, y, **parameter[0]), parameter[1]),
        "empty": (lambda: fn(z[:0], y[:0]), "logits"),
    }
    call, argument = cases[bad]
    invalid(name, call, argument)
    extra = {
        "expected_calibration_error": [({"norm": "l3"}, "norm")],
        "fit_temperature": [({"max_iter": 0}, "max_iter"), ({"init": math.inf}, "init")],
        "dual_focal_loss": [({"reduction": "avg"}, "reduction"), ({"gamma": math.nan}, "gamma")],
    }[name]
    if bad == "parameter":
        for kwargs, arg in extra:
            invalid(name, lambda kwargs=kwargs: fn(z, y, **kwargs), arg)


# =========================================================================== LAWN
SHAPES = st.sampled_from(((), (0,), (1,), (5,), (3, 4), (2, 3, 2), (64, 300)))


@given(shape=SHAPES, dtype=DTYPE, seed=SEEDS, scale=SCALE, zero=st.booleans(), data=st.data())
def test_lawn_functions_agree_with_float64(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, scale: float, zero: bool, data: st.DataObject
) -> None:
    w = torch.zeros(shape, dtype=dtype) if zero else rand(shape, seed, scale, dtype)
    g = rand(shape, seed + 1, data.draw(SCALE), dtype)
    w64, g64 = f64(w).ravel(), f64(g).ravel()
    eps = data.draw(st.sampled_from((0.0, 1e-8, 1.0)))
    target = data.draw(st.sampled_from((0.0, 1.0, 1e3)))
    work = torch.float64 if dtype == torch.float64 else torch.float32
    norm = math.sqrt(float(w64 @ w64))
    size = max(1, w.numel())
    got = valid("frobenius_norm", lambda: LF.frobenius_norm(w))
    assert got.dtype == work
    assert_close("frobenius_norm", got, norm, work, atol(dtype, norm, size))
    ww = float(w64 @ w64) + eps
    coefficient = float(g64 @ w64) / ww if ww > 0 else 0.0
    want = (g64 - coefficient * w64).reshape(shape)
    magnitude = float(np.abs(g64).max(initial=0) + abs(coefficient) * np.abs(w64).max(initial=0))
    got = valid("project_to_tangent", lambda: LF.project_to_tangent(g, w, eps))
    assert got.dtype == dtype
    assert_close("project_to_tangent", got, want, dtype, atol(dtype, magnitude, size))
    rescaled = (w64 * (target / norm) if norm > 0 else w64).reshape(shape)
    got = valid("rescale_to_norm", lambda: LF.rescale_to_norm(w, target))
    assert_close("rescale_to_norm", got, rescaled, dtype, atol(dtype, target + np.abs(w64).max(initial=0), size))
    # the fused in-place versions, on a list holding this pair and a second, float32 pair
    w2, g2 = rand((3, 3), seed + 2, 1.0, torch.float32), rand((3, 3), seed + 3, 1.0, torch.float32)
    grads, weights = [g.clone(), g2.clone()], [w, w2]
    valid("project_to_tangent_", lambda: LF.project_to_tangent_(grads, weights, eps))
    assert_close("project_to_tangent_", grads[0], want, dtype, atol(dtype, magnitude, size))
    assert_close(
        "project_to_tangent_", grads[1], LF.project_to_tangent(g2, w2, eps), torch.float32, atol(torch.float32, 10, 9)
    )
    copies = [w.clone(), w2.clone()]
    valid("rescale_to_norm_", lambda: LF.rescale_to_norm_(copies, [target, 2.0]))
    assert_close("rescale_to_norm_", copies[0], rescaled, dtype, atol(dtype, target + np.abs(w64).max(initial=0), size))
    norms = valid("frobenius_norms", lambda: lawn.frobenius_norms([w, w2]))
    assert_close(
        "frobenius_norms", norms, [norm, math.sqrt(float((f64(w2) ** 2).sum()))], work, atol(dtype, norm + 10, size)
    )


@given(
    shape=SHAPES.filter(lambda s: math.prod(s) > 0), dtype=DTYPE, seed=SEEDS, bad=st.sampled_from((math.nan, math.inf))
)
def test_lawn_functions_reject_or_show_non_finite_values(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, bad: float
) -> None:
    w, g = rand(shape, seed, 1.0, dtype), rand(shape, seed + 1, 1.0, dtype)
    bad_w, bad_g = w.clone(), g.clone()
    bad_w.view(-1)[0] = bad
    bad_g.view(-1)[-1] = bad
    invalid("frobenius_norm", lambda: LF.frobenius_norm(bad_w), "weight")
    invalid("project_to_tangent", lambda: LF.project_to_tangent(bad_g, w), "grad")
    invalid("project_to_tangent", lambda: LF.project_to_tangent(g, bad_w), "weight")
    invalid("rescale_to_norm", lambda: LF.rescale_to_norm(bad_w, 1.0), "weight")
    # the fused versions of the training step read no values: the non-finite value shows in the result
    grads = [bad_g.clone()]
    valid("project_to_tangent_", lambda: LF.project_to_tangent_(grads, [w]))
    assert not torch.isfinite(grads[0]).all()
    weights = [bad_w.clone()]
    valid("rescale_to_norm_", lambda: LF.rescale_to_norm_(weights, [1.0]))
    assert not torch.isfinite(weights[0]).all()
    assert not torch.isfinite(valid("frobenius_norms", lambda: lawn.frobenius_norms([bad_w]))).all()


@pytest.mark.parametrize(
    "bad",
    ("shape", "int", "list", "eps", "norm", "norm_tensor", "counts_grads", "counts_norms", "int_weight", "eps_fused"),
)
def test_lawn_functions_reject_bad_arguments(bad: str) -> None:
    w, g = torch.randn(3, 4), torch.randn(3, 4)
    cases: dict[str, tuple[str, Callable[[], Any], str]] = {
        "shape": ("project_to_tangent", lambda: LF.project_to_tangent(g.T, w), "grad"),
        "int": ("frobenius_norm", lambda: LF.frobenius_norm(w.long()), "weight"),
        "list": ("project_to_tangent", lambda: LF.project_to_tangent(g.tolist(), w), "grad"),
        "eps": ("project_to_tangent", lambda: LF.project_to_tangent(g, w, eps=-1.0), "eps"),
        "norm": ("rescale_to_norm", lambda: LF.rescale_to_norm(w, math.nan), "norm"),
        "norm_tensor": ("rescale_to_norm", lambda: LF.rescale_to_norm(w, torch.ones(2)), "norm"),
        "counts_grads": ("project_to_tangent_", lambda: LF.project_to_tangent_([g], [w, w]), "gradient"),
        "counts_norms": ("rescale_to_norm_", lambda: LF.rescale_to_norm_([w], [1.0, 2.0]), "norm"),
        "int_weight": ("rescale_to_norm_", lambda: LF.rescale_to_norm_([w.long()], [1.0]), "weight"),
        "eps_fused": ("project_to_tangent_", lambda: LF.project_to_tangent_([g], [w], eps=math.nan), "eps"),
    }
    name, call, argument = cases[bad]
    invalid(name, call, argument)


# =========================================================================== Mowst
@st.composite
def mowst_case(draw: st.DrawFn) -> dict[str, Any]:
    z = draw(logit_matrix())
    n, c = z.shape
    seed = draw(SEEDS)
    strong = rand((n, c), seed, draw(SCALE), z.dtype)
    g = torch.Generator().manual_seed(seed + 1)
    if draw(st.booleans()):
        target = torch.randint(0, c, (n,), generator=g)
    else:
        target = torch.rand(n, c, generator=g, dtype=torch.float64).softmax(1).to(z.dtype)
    confidence = draw(st.sampled_from(("random", "zeros", "ones", "half")))
    conf = {
        "random": torch.rand(n, generator=g),
        "zeros": torch.zeros(n),
        "ones": torch.ones(n),
        "half": torch.full((n,), 0.5),
    }[confidence].to(draw(st.sampled_from((torch.float32, torch.float64, z.dtype))))
    if draw(st.booleans()):
        conf = conf[:, None]  # [N, 1] is accepted too
    return {"weak": z, "strong": strong, "target": target, "confidence": conf, "seed": seed}


def _ce_rows(z: np.ndarray, target: Tensor) -> np.ndarray:
    q = f64(target) if target.is_floating_point() else one_hot(target.numpy(), z.shape[1])
    return -(q * log_softmax(z)).sum(1)


MOWST_FUNCTIONS = (
    "mowst_dispersion",
    "mowst_loss",
    "mowst_star_loss",
    "mowst_expected_accuracy",
    "mowst_route",
    "mowst_predict",
)


@pytest.mark.parametrize("name", MOWST_FUNCTIONS)
@given(case=mowst_case(), data=st.data())
def test_mowst_functions_agree_with_float64(name: str, case: dict[str, Any], data: st.DataObject) -> None:
    weak, strong, target, conf = case["weak"], case["strong"], case["target"], case["confidence"]
    w64, s64 = f64(weak), f64(strong)
    c64 = f64(conf).reshape(-1)
    n, k = w64.shape
    dtype = weak.dtype
    big = float(np.abs(w64).max() + np.abs(s64).max())
    labels = target.float().argmax(1).numpy() if target.is_floating_point() else target.numpy()
    if name == "mowst_dispersion":
        p = softmax(w64)
        variance = p.var(1) / ((k - 1) / k**2)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
        want = np.clip(np.stack([variance, 1 - entropy / math.log(k)], 1), 0, 1)
        got = valid(name, lambda: LF.mowst_dispersion(weak))
        assert got.dtype == torch.float32
        assert_close(name, got, want, torch.float32, atol(torch.float32, big, k))
    elif name in ("mowst_loss", "mowst_star_loss"):
        if name == "mowst_loss":
            want = float((c64 * _ce_rows(w64, target) + (1 - c64) * _ce_rows(s64, target)).mean())
        else:
            want = float(_ce_rows(c64[:, None] * w64 + (1 - c64[:, None]) * s64, target).mean())
        fn = getattr(LF, name)
        validate = data.draw(st.booleans())
        if overflows(want, dtype):
            invalid(name, lambda: fn(weak, strong, target, conf), "logits")
            return
        got = valid(name, lambda: fn(weak, strong, target, conf, validate_args=validate))
        assert got.dtype == dtype
        # documented: computed in float32 whatever the input dtype
        rounding = torch.float32 if dtype == torch.float64 else dtype
        assert_close(name, got, want, rounding, atol(torch.float32, big, 8))
    elif name == "mowst_expected_accuracy":
        want = float((c64 * (w64.argmax(1) == labels) + (1 - c64) * (s64.argmax(1) == labels)).mean())
        assert_close(
            name, valid(name, lambda: LF.mowst_expected_accuracy(weak, strong, target, conf)), want, torch.float32, 1e-6
        )
    elif name == "mowst_route":
        pred, to_weak = valid(
            name, lambda: LF.mowst_route(weak, strong, conf, torch.Generator().manual_seed(case["seed"]))
        )
        u = torch.rand(n, generator=torch.Generator().manual_seed(case["seed"])).numpy()
        assert (to_weak.numpy() == (u < c64.astype(np.float32))).all()
        assert (pred.numpy() == np.where(to_weak.numpy(), w64.argmax(1), s64.argmax(1))).all()
    elif name == "mowst_predict":
        variant = data.draw(st.sampled_from(("mowst", "mowst_star")))
        got = valid(name, lambda: LF.mowst_predict(weak, strong, conf, variant)).numpy()
        if variant == "mowst":
            assert (got == np.where(c64.astype(np.float32) >= 0.5, w64.argmax(1), s64.argmax(1))).all()
        else:  # the chosen class has the largest mixed probability, up to float32 roundoff
            mixed = c64[:, None] * softmax(w64) + (1 - c64[:, None]) * softmax(s64)
            chosen = mixed[np.arange(n), got]
            assert (chosen >= mixed.max(1) - atol(torch.float32, big, 4)).all()
    else:
        raise AssertionError(name)


MOWST_BAD = (
    "nan_weak",
    "nan_strong",
    "shape",
    "one_class",
    "confidence_range",
    "confidence_nan",
    "confidence_shape",
    "confidence_int",
    "label_range",
    "target_shape",
    "variant",
)


@pytest.mark.parametrize("name", MOWST_FUNCTIONS)
@pytest.mark.parametrize("bad", MOWST_BAD)
@pytest.mark.parametrize("validate_args", [True, False])
def test_mowst_functions_reject_bad_input(name: str, bad: str, validate_args: bool) -> None:
    weak, strong = torch.randn(5, 3), torch.randn(5, 3)
    target, conf = torch.randint(0, 3, (5,)), torch.rand(5)
    nan = weak.clone()
    nan[1, 1] = math.nan
    changes, argument = {
        "nan_weak": ({"weak": nan}, "weak_logits"),
        "nan_strong": ({"strong": nan}, "strong_logits"),
        "shape": ({"strong": strong[:, :2]}, "strong_logits"),
        "one_class": ({"weak": weak[:, :1], "strong": strong[:, :1]}, "weak_logits"),
        "confidence_range": ({"confidence": conf + 1.5}, "confidence"),
        "confidence_nan": ({"confidence": conf.masked_fill(conf > -1, math.nan)}, "confidence"),
        "confidence_shape": ({"confidence": conf[:4]}, "confidence"),
        "confidence_int": ({"confidence": torch.ones(5, dtype=torch.long)}, "confidence"),
        "label_range": ({"target": target + 3}, "target"),
        "target_shape": ({"target": target[:4]}, "target"),
        "variant": ({"variant": "moe"}, "variant"),
    }[bad]
    args = {"weak": weak, "strong": strong, "target": target, "confidence": conf, **changes}
    takes = inspect.signature(getattr(LF, name)).parameters
    if "validate_args" not in takes and not validate_args:
        return  # this function always validates
    if "variant" in changes and "variant" not in takes:
        return
    if "target" in changes and "target" not in takes:
        return
    if name == "mowst_dispersion" and bad not in ("nan_weak", "one_class"):
        return
    value_check = bad in ("nan_weak", "nan_strong", "confidence_range", "confidence_nan", "label_range")
    if value_check and not validate_args:
        return  # value checks read the host: validate_args=False skips them by design
    kwargs: dict[str, Any] = {
        "weak_logits": args["weak"],
        "strong_logits": args["strong"],
        "target": args["target"],
        "confidence": args["confidence"],
        "variant": args.get("variant", "mowst"),
        "validate_args": validate_args,
    }
    call_kwargs = {key: value for key, value in kwargs.items() if key in takes}
    invalid(name, lambda: getattr(LF, name)(**call_kwargs), argument)


@given(
    n=st.integers(0, 6),
    seed=SEEDS,
    kind=st.sampled_from(("bool", "indices", "zero_one", "bad_length", "range", "float", "empty")),
)
def test_check_node_mask(n: int, seed: int, kind: str) -> None:
    g = torch.Generator().manual_seed(seed)
    name = "check_node_mask"
    if kind == "bool":
        mask = torch.rand(n, generator=g) < 0.5
        assert (valid(name, lambda: mowst.check_node_mask(mask, n)) == mask).all()
    elif kind == "indices" and n > 2:
        idx = torch.randperm(n, generator=g)[: n - 1]
        want = np.zeros(n, dtype=bool)
        want[idx.numpy()] = True
        assert (valid(name, lambda: mowst.check_node_mask(idx, n)).numpy() == want).all()
    elif kind == "zero_one" and n > 0:
        invalid(name, lambda: mowst.check_node_mask(torch.ones(n, dtype=torch.long), n), "mask")
    elif kind == "bad_length":
        invalid(name, lambda: mowst.check_node_mask(torch.ones(n + 1, dtype=torch.bool), n), "mask")
    elif kind == "range":
        invalid(name, lambda: mowst.check_node_mask(torch.tensor([n]), n), "mask")
    elif kind == "float":
        invalid(name, lambda: mowst.check_node_mask(torch.ones(n), n), "mask")
    elif kind == "empty":
        invalid(name, lambda: mowst.check_node_mask(torch.zeros(n, dtype=torch.bool), n, allow_empty=False), "mask")


# ================================================================ replay (UER, ER-ACE) and the accuracy matrix
def _unit(x: np.ndarray, eps: float) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.where(norm > 0, x / (norm + eps), 0.0)


@st.composite
def replay_case(draw: st.DrawFn) -> dict[str, Any]:
    n, m = draw(st.sampled_from((1, 4))), draw(st.sampled_from((0, 1, 3)))
    c, d = draw(CLASSES), draw(st.sampled_from((1, 3, 8)))
    dtype, seed = draw(DTYPE), draw(SEEDS)
    scale = draw(SCALE)
    h = rand((n, d), seed, scale, dtype)
    if draw(st.booleans()):
        h[0] = 0.0  # a zero feature row: cosine 0, no NaN
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(c, generator=g) < 0.7 if draw(st.booleans()) else None
    allowed = torch.arange(c) if mask is None or not mask.any() else mask.nonzero()[:, 0]
    if mask is not None and not mask.any():
        mask = None
    y = allowed[torch.randint(0, len(allowed), (n,), generator=g)]
    return {
        "h": h,
        "y": y,
        "w": rand((c, d), seed + 1, draw(SCALE), dtype),
        "b": rand((c,), seed + 2, 1.0, dtype) if draw(st.booleans()) else None,
        "hm": rand((m, d), seed + 3, scale, dtype),
        "ym": torch.randint(0, c, (m,), generator=g),
        "mask": mask,
        "temperature": draw(st.sampled_from((0.09, 1.0))),
        "replay_form": draw(st.sampled_from(("none", "features", "logits"))),
        "eps": draw(st.sampled_from((1e-6, 1e-2))),
    }


def _ce(z: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(z)[np.arange(len(y)), y].mean()) if len(y) else 0.0


REPLAY_LOSSES = ("cosine_logits", "uer_loss", "er_ace_loss", "replay_cross_entropy")


@pytest.mark.parametrize("name", REPLAY_LOSSES)
@given(case=replay_case())
def test_replay_losses_agree_with_float64(name: str, case: dict[str, Any]) -> None:
    h, y, w, b, hm, ym = case["h"], case["y"], case["w"], case["b"], case["hm"], case["ym"]
    h64, w64, hm64 = f64(h), f64(w), f64(hm)
    b64 = np.zeros(w.shape[0]) if b is None else f64(b)
    dtype = h.dtype
    work = torch.float32  # documented: these losses are float32 scalars whatever the input dtype
    replay_logits64 = hm64 @ w64.T + b64
    if dtype == torch.float16:  # logits given as float16 must be representable
        hm64 = hm64 * min(1.0, 3e4 / (np.abs(replay_logits64).max(initial=0) + 1))
        hm = torch.from_numpy(hm64).to(dtype)
        hm64 = f64(hm)
        replay_logits64 = hm64 @ w64.T + b64
    big = float(np.abs(replay_logits64).max(initial=0))
    if name == "cosine_logits":
        want = _unit(h64, case["eps"]) @ _unit(w64, case["eps"]).T
        got = valid(name, lambda: LF.cosine_logits(h, w, case["eps"]))
        assert got.dtype == dtype
        assert_close(name, got, want, dtype, atol(dtype, 1.0, h.shape[1]))
    elif name == "uer_loss":
        cos = _unit(h64, 1e-6) @ _unit(w64, 1e-6).T / case["temperature"]
        if case["mask"] is not None:
            cos = np.where(case["mask"].numpy(), cos, -np.inf)
        form = case["replay_form"]
        want = _ce(cos, y.numpy()) + (_ce(replay_logits64, ym.numpy()) if form != "none" else 0.0)
        kwargs: dict[str, Any] = {"bias": b, "temperature": case["temperature"], "logit_mask": case["mask"]}
        if form == "features":
            kwargs |= {"replay_features": hm, "replay_target": ym}
        elif form == "logits":
            kwargs |= {"replay_logits": torch.from_numpy(replay_logits64).to(dtype), "replay_target": ym}
        got = valid(name, lambda: LF.uer_loss(h, y, w, **kwargs))
        assert got.dtype == torch.float32
        rounding = 4 * EPS_INPUT[dtype] * h.shape[1] * big if form == "features" else 0.0  # logits of a product
        half = EPS_INPUT[dtype] * (big + 1) if form == "logits" else 0.0  # logits rounded to dtype
        assert_close(name, got, want, work, atol(work, big + 1 / case["temperature"], 8) + 2 * (rounding + half))
    elif name == "er_ace_loss":
        z = rand((len(y), w.shape[0]), int(y.sum()) + 7, 8.0, dtype)
        z64 = f64(z)
        present = np.zeros(z.shape[1], dtype=bool)
        present[y.numpy()] = True
        want = _ce(np.where(present, z64, -np.inf), y.numpy())
        args: dict[str, Any] = {}
        if case["replay_form"] != "none":
            args = {"replay_logits": torch.from_numpy(replay_logits64).to(dtype), "replay_target": ym}
            want += _ce(f64(args["replay_logits"]), ym.numpy())
        got = valid(name, lambda: LF.er_ace_loss(z, y, **args))
        assert_close(name, got, want, work, atol(work, big + 100, 8))
    elif name == "replay_cross_entropy":
        z = torch.from_numpy(replay_logits64).to(dtype)
        got = valid(name, lambda: LF.replay_cross_entropy(z, ym))
        assert got.dtype == torch.float32 and got.shape == ()
        assert_close(name, got, _ce(f64(z), ym.numpy()), work, atol(work, big, 8))
    else:
        raise AssertionError(name)


REPLAY_BAD = (
    "nan",
    "shape",
    "label_range",
    "label_dtype",
    "empty_batch",
    "one_class",
    "temperature",
    "mask",
    "pairing",
    "list",
)


@pytest.mark.parametrize("name", REPLAY_LOSSES)
@pytest.mark.parametrize("bad", REPLAY_BAD)
def test_replay_losses_reject_bad_input(name: str, bad: str) -> None:
    h, w, y = torch.randn(4, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 1])
    z = torch.randn(4, 5)
    nan_h = h.clone()
    nan_h[1, 2] = math.nan
    table: dict[str, dict[str, tuple[Callable[[], Any], str]]] = {
        "cosine_logits": {
            "nan": (lambda: LF.cosine_logits(nan_h, w), "features"),
            "shape": (lambda: LF.cosine_logits(h, w[:, :2]), "features"),
            "list": (lambda: LF.cosine_logits(h.tolist(), w), "features"),
            "one_class": (lambda: LF.cosine_logits(h, w[:, 0]), "weight"),
            "temperature": (lambda: LF.cosine_logits(h, w, eps=0.0), "eps"),
        },
        "uer_loss": {
            "nan": (lambda: LF.uer_loss(nan_h, y, w), "features"),
            "shape": (lambda: LF.uer_loss(h, y, w[:, :2]), "features"),
            "label_range": (lambda: LF.uer_loss(h, y + 4, w), "target"),
            "label_dtype": (lambda: LF.uer_loss(h, y.float(), w), "target"),
            "empty_batch": (lambda: LF.uer_loss(h[:0], y[:0], w), "features"),
            "one_class": (lambda: LF.uer_loss(h, y * 0, w[:1]), "class"),
            "temperature": (lambda: LF.uer_loss(h, y, w, temperature=0.0), "temperature"),
            "mask": (
                lambda: LF.uer_loss(h, y, w, logit_mask=torch.tensor([True, False, True, True, True])),
                "logit_mask",
            ),
            "pairing": (lambda: LF.uer_loss(h, y, w, replay_features=h), "replay_target"),
            "list": (lambda: LF.uer_loss(h, y.tolist(), w), "target"),
        },
        "er_ace_loss": {
            "nan": (lambda: LF.er_ace_loss(z, y, nan_h @ w.T, y), "replay_logits"),
            "shape": (lambda: LF.er_ace_loss(z, y, z[:, :4], y), "replay_logits"),
            "label_range": (lambda: LF.er_ace_loss(z, y + 4), "target"),
            "label_dtype": (lambda: LF.er_ace_loss(z, y.float()), "target"),
            "empty_batch": (lambda: LF.er_ace_loss(z[:0], y[:0]), "logits"),
            "one_class": (lambda: LF.er_ace_loss(z[:, :1], y * 0), "logits"),
            "pairing": (lambda: LF.er_ace_loss(z, y, replay_logits=z), "replay_target"),
            "list": (lambda: LF.er_ace_loss(z.tolist(), y), "logits"),
        },
        "replay_cross_entropy": {
            "nan": (lambda: LF.replay_cross_entropy(nan_h, y[:4] % 3), "logits"),
            "shape": (lambda: LF.replay_cross_entropy(z, y[:3]), "target"),
            "label_range": (lambda: LF.replay_cross_entropy(z, y + 4), "target"),
            "label_dtype": (lambda: LF.replay_cross_entropy(z, y.float()), "target"),
            "list": (lambda: LF.replay_cross_entropy(z.tolist(), y), "logits"),
        },
    }
    if bad in table[name]:
        call, argument = table[name][bad]
        invalid(name, call, argument)


SUMMARIES = (
    "average_accuracy",
    "final_average_accuracy",
    "average_incremental_accuracy",
    "average_forgetting",
    "backward_transfer",
    "learning_accuracy",
)


def _summary_ref(name: str, r: np.ndarray, i: int) -> float:
    if name in ("average_accuracy", "final_average_accuracy"):
        return float(r[i, : i + 1].mean())
    if name == "average_incremental_accuracy":
        return float(np.mean([r[k, : k + 1].mean() for k in range(i + 1)]))
    if name == "average_forgetting":
        return 0.0 if i == 0 else float(np.mean([max(r[row, j] for row in range(j, i)) - r[i, j] for j in range(i)]))
    if name == "backward_transfer":
        return 0.0 if i == 0 else float(np.mean([r[i, j] - r[j, j] for j in range(i)]))
    return float(np.mean([r[j, j] for j in range(i + 1)]))


@pytest.mark.parametrize("name", SUMMARIES)
@given(t=st.integers(1, 6), seed=SEEDS, dtype=DTYPE, data=st.data())
def test_accuracy_matrix_summaries_agree_with_float64(
    name: str, t: int, seed: int, dtype: torch.dtype, data: st.DataObject
) -> None:
    r = torch.rand(t, t, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    r = r.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), math.nan)  # not measured yet
    after = None if name == "final_average_accuracy" else data.draw(st.one_of(st.none(), st.integers(0, t - 1)))
    i = t - 1 if after is None else after
    fn = getattr(LF, name)
    got = valid(name, lambda: fn(r) if after is None else fn(r, after))
    assert isinstance(got, float)
    assert abs(got - _summary_ref(name, f64(r), i)) <= 5e-7 + 1e-12, (
        got,
        _summary_ref(name, f64(r), i),
    )  # rounded to 6 places


@pytest.mark.parametrize("name", SUMMARIES)
@pytest.mark.parametrize("bad", ("nan_measured", "not_square", "after", "list"))
def test_accuracy_matrix_summaries_reject_bad_input(name: str, bad: str) -> None:
    r = torch.tensor([[0.9, math.nan, math.nan], [0.5, 0.8, math.nan], [0.4, 0.6, 0.7]])
    fn = getattr(LF, name)
    if bad == "nan_measured":
        broken = r.clone()
        broken[2, 0] = math.nan  # a measured entry lost
        invalid(name, lambda: fn(broken), "matrix")
    elif bad == "not_square":
        invalid(name, lambda: fn(r[:2]), "matrix")
    elif bad == "after" and name != "final_average_accuracy":
        invalid(name, lambda: fn(r, 3), "after")
    elif bad == "list":
        invalid(name, lambda: fn(r.tolist()), "matrix")


# =========================================================================== USKD
def _zipf_ref(s: np.ndarray, u: np.ndarray, labels: np.ndarray, rank_by: str) -> tuple[np.ndarray, float]:
    """(Zipf labels of the non-target classes, the smallest gap between distinct scores of a row)."""
    weak = softmax(u)
    student = log_softmax(s) if rank_by == "log_prob" else softmax(s)
    rows = np.arange(len(s))[:, None]
    score = weak / (1 - weak[rows, labels].sum(1, keepdims=True) + 1e-6)
    score = score + student / (1 - student[rows, labels].sum(1, keepdims=True) + 1e-6)
    out, gap = [], math.inf
    for row, targets in zip(score, labels, strict=True):
        order = np.argsort(-row, kind="stable")
        rank = np.empty(len(row))
        rank[order] = np.arange(len(row))
        kept = np.delete(1.0 / (rank + 1), targets)
        out.append(kept / kept.sum())
        distinct = np.diff(np.unique(row))
        gap = min(gap, float(distinct.min(initial=math.inf)))
    return np.array(out), gap


@st.composite
def uskd_case(draw: st.DrawFn) -> dict[str, Any]:
    z = draw(logit_matrix())
    n, c = z.shape
    seed = draw(SEEDS)
    weak = rand((n, c), seed, draw(SCALE), z.dtype)
    g = torch.Generator().manual_seed(seed)
    soft = draw(st.booleans())
    target = (
        torch.rand(n, c, generator=g, dtype=torch.float64).softmax(1).to(z.dtype)
        if soft
        else torch.randint(0, c, (n,), generator=g)
    )
    return {"s": z, "u": weak, "target": target, "rank_by": draw(st.sampled_from(uskd.RANK_BY))}


USKD_FUNCTIONS = ("uskd_target_classes", "uskd_soft_target_weight", "uskd_zipf_labels", "uskd_loss")


@pytest.mark.parametrize("name", USKD_FUNCTIONS)
@given(case=uskd_case(), data=st.data())
def test_uskd_functions_agree_with_float64(name: str, case: dict[str, Any], data: st.DataObject) -> None:
    s, u, target, rank_by = case["s"], case["u"], case["target"], case["rank_by"]
    s64, u64 = f64(s), f64(u)
    n, c = s64.shape
    dtype = s.dtype
    big = float(np.abs(s64).max() + np.abs(u64).max())
    if target.is_floating_point():
        t64 = f64(target)
        labels = np.argsort(-t64, axis=1, kind="stable")[:, :2]
        values = np.take_along_axis(t64, labels, 1)
    else:
        labels, values = target.numpy()[:, None], np.ones((n, 1))
    if name == "uskd_target_classes":
        got_labels, got_values = valid(name, lambda: LF.uskd_target_classes(target, c))
        assert (got_labels.numpy() == labels).all()
        assert_close(name, got_values, values, torch.float64, 0.0)
        return
    p = softmax(s64)
    rows = np.arange(n)[:, None]
    squared = p[rows, labels] ** 2
    weight = np.where(values == 0, 0.0, squared + values - squared.mean(0, keepdims=True))
    if name == "uskd_soft_target_weight":
        probs = torch.from_numpy(p)
        got = valid(name, lambda: LF.uskd_soft_target_weight(probs, torch.from_numpy(labels), torch.from_numpy(values)))
        assert_close(name, got, weight, torch.float64, 1e-12)
        return
    zipf, gap = _zipf_ref(s64, u64, labels, rank_by)
    tol = atol(dtype, big, 16)
    separated = gap > 4 * tol  # else float32 may order near-ties differently: then the order is checked, not the values
    got_zipf = LF.uskd_zipf_labels(
        s.double() if dtype == torch.float64 else s.float(),
        u.double() if dtype == torch.float64 else u.float(),
        torch.from_numpy(labels),
        rank_by,
    )
    if name == "uskd_zipf_labels":
        CASES[name]["valid"] += 1
        assert got_zipf.shape == (n, c - labels.shape[1])
        if c > labels.shape[1]:  # every row a distribution over its non-target classes
            assert_close(name, got_zipf.sum(1), np.ones(n), torch.float32, 1e-5)
        if separated:
            assert_close(name, got_zipf, zipf, torch.float32, 1e-6)
        return
    if not separated:
        zipf = f64(got_zipf)
    log_p = log_softmax(s64)
    keep = np.ones((n, c), dtype=bool)
    keep[rows, labels] = False
    non_target = s64[keep].reshape(n, c - labels.shape[1])
    full = f64(target) if target.is_floating_point() else one_hot(labels[:, 0], c)
    smoothed = 0.9 * full + 0.1 / c
    non_target_term = -(zipf * log_softmax(non_target)).sum(1).mean() if non_target.shape[1] else 0.0
    alpha, beta, mu = (data.draw(st.sampled_from(v)) for v in ((0.1, 1.0), (0.0, 0.1, 2.0), (0.005, 1.0)))
    want = (
        alpha * -(weight * log_p[rows, labels]).sum(1).mean()
        + beta * non_target_term
        - mu * (smoothed * log_softmax(u64)).sum(1).mean()
    )
    call = lambda: LF.uskd_loss(s, u, target, alpha, beta, mu, rank_by)  # noqa: E731
    if overflows(want, dtype):
        invalid(name, call, "logits")
        return
    got = valid(name, call)
    assert got.dtype == dtype
    assert_close(name, got, want, dtype, atol(dtype, big, 8 * max(alpha, beta, mu)))


USKD_BAD = (
    "nan",
    "nan_weak",
    "shape",
    "one_class",
    "label_range",
    "soft_nan",
    "weights",
    "rank_by",
    "labels_shape",
    "labels_range",
    "values_shape",
)


@pytest.mark.parametrize("name", USKD_FUNCTIONS)
@pytest.mark.parametrize("bad", USKD_BAD)
def test_uskd_functions_reject_bad_input(name: str, bad: str) -> None:
    s, u, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 4, 2])
    labels, values = y[:, None], torch.ones(4, 1)
    probs = s.softmax(1)
    nan = s.clone()
    nan[0, 0] = math.nan
    soft = torch.rand(4, 5)
    soft[1, 1] = math.nan
    table: dict[str, dict[str, tuple[Callable[[], Any], str]]] = {
        "uskd_loss": {
            "nan": (lambda: LF.uskd_loss(nan, u, y), "logits"),
            "nan_weak": (lambda: LF.uskd_loss(s, nan, y), "weak_logits"),
            "shape": (lambda: LF.uskd_loss(s, u[:, :4], y), "weak_logits"),
            "one_class": (lambda: LF.uskd_loss(s[:, :1], u[:, :1], y * 0), "logits"),
            "label_range": (lambda: LF.uskd_loss(s, u, y + 5), "target"),
            "soft_nan": (lambda: LF.uskd_loss(s, u, soft), "target"),
            "weights": (lambda: LF.uskd_loss(s, u, y, alpha=math.nan), "alpha"),
            "rank_by": (lambda: LF.uskd_loss(s, u, y, rank_by="rank"), "rank_by"),
        },
        "uskd_target_classes": {
            "label_range": (lambda: LF.uskd_target_classes(y + 5, 5), "target"),
            "shape": (lambda: LF.uskd_target_classes(soft[:, :4], 5), "target"),
            "one_class": (lambda: LF.uskd_target_classes(y.float(), 5), "target"),
        },
        "uskd_soft_target_weight": {
            "shape": (lambda: LF.uskd_soft_target_weight(probs[0], labels, values), "probs"),
            "labels_shape": (lambda: LF.uskd_soft_target_weight(probs, labels[:3], values), "labels"),
            "labels_range": (lambda: LF.uskd_soft_target_weight(probs, labels + 5, values), "labels"),
            "values_shape": (lambda: LF.uskd_soft_target_weight(probs, labels, values[:2]), "values"),
        },
        "uskd_zipf_labels": {
            "shape": (lambda: LF.uskd_zipf_labels(s, u[:, :4], labels), "weak_logits"),
            "labels_shape": (lambda: LF.uskd_zipf_labels(s, u, labels[:3]), "labels"),
            "labels_range": (lambda: LF.uskd_zipf_labels(s, u, labels + 5), "labels"),
            "rank_by": (lambda: LF.uskd_zipf_labels(s, u, labels, rank_by="rank"), "rank_by"),
            "nan": (lambda: LF.uskd_zipf_labels(nan, u, labels), "logits"),
            "one_class": (lambda: LF.uskd_zipf_labels(s, u, torch.zeros(4, 6, dtype=torch.long)), "labels"),
        },
    }
    if bad in table[name]:
        call, argument = table[name][bad]
        invalid(name, call, argument)


# =========================================================================== metrics
def _batches(x: Tensor, cuts: list[int]) -> list[Tensor]:
    bounds = [0, *sorted({min(c, len(x)) for c in cuts}), len(x)]
    return [x[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("name", LM.__all__)
@given(data=st.data(), cuts=st.lists(st.integers(0, 20), max_size=3))
def test_metrics_agree_with_float64_over_batches(name: str, data: st.DataObject, cuts: list[int]) -> None:
    """Updates over several batches (some empty) compute what the functional form gives on all the data."""
    if name == "OODDetection":
        a, b = data.draw(score_vector()), data.draw(score_vector())
        tpr = data.draw(st.sampled_from((0.5, 0.95, 1.0)))
        metric = LM.OODDetection(tpr=tpr)
        for part in _batches(a, cuts):
            metric.update(id_scores=part)
        metric.update(ood_scores=b)
        got = valid(name, metric.compute)
        x, y = f64(a), f64(b)
        k = max(1, math.floor(tpr * len(x)))
        assert_close(name, got["auroc"], _auroc_ref(x, y), torch.float64, 1e-12)
        assert_close(name, got["fpr"], float((y >= np.sort(x)[::-1][k - 1]).mean()), torch.float64, 1e-12)
    elif name == "AURC":
        a = data.draw(score_vector())
        correct = torch.rand(a.shape, generator=torch.Generator().manual_seed(len(cuts))) < 0.5
        metric = LM.AURC()
        for part, right in zip(_batches(a, cuts), _batches(correct, cuts), strict=True):
            metric.update(part, right)
        assert_close(name, valid(name, metric.compute), _aurc_ref(f64(a), correct.numpy()), torch.float64, 1e-12)
    elif name == "MaNoScore":
        z = data.draw(logit_matrix())
        p, threshold = data.draw(st.sampled_from((1.0, 4.0))), data.draw(st.sampled_from((0.0, 5.0, 1e3)))
        normalization = data.draw(st.sampled_from(("auto", "softmax", "taylor")))
        metric = LM.MaNoScore(p=p, normalization=normalization, threshold=threshold)
        for part in _batches(z, cuts):
            metric.update(part)
        got = float(valid(name, metric.compute))
        x = f64(z)
        criterion = float((-log_softmax(x)).mean())
        near = abs(criterion - threshold) <= 1e-9 * (1 + criterion)
        choices = (
            [normalization]
            if normalization != "auto"
            else (["softmax", "taylor"] if near else ["softmax" if criterion > threshold else "taylor"])
        )
        wants = []
        for option in choices:
            probs, ratio = _mano_normalize_ref(x, option, 2)
            wants.append((np.sum(np.abs(probs) ** p) / x.size) ** (1 / p))
        tol = atol(torch.float64, x.shape[1] * ratio, x.shape[1])
        assert any(abs(got - w) <= tol + 1e-9 * w for w in wants), (got, wants)
    elif name == "AccuracyMatrix":
        t = data.draw(st.integers(1, 4))
        z = data.draw(logit_matrix())
        c = z.shape[1]
        g = torch.Generator().manual_seed(c)
        task_of_class = torch.sort(torch.randint(0, t, (c,), generator=g)).values
        task_of_class[-1] = t - 1
        eval_mask = data.draw(st.sampled_from(("all", "seen")))
        y = torch.randint(0, c, (z.shape[0],), generator=g)
        after = data.draw(st.integers(0, int(task_of_class.max())))
        metric = LM.AccuracyMatrix(task_of_class, eval_mask=eval_mask)
        for part, labels in zip(_batches(z, cuts), _batches(y, cuts), strict=True):
            metric.update(part, labels, after_task=after)
        got = valid(name, metric.compute)
        x = f64(z)
        tasks = task_of_class.numpy()
        if eval_mask == "seen":
            x = np.where(tasks[None, :] > after, -np.inf, x)
        hit = x.argmax(1) == y.numpy()
        want = np.full((t, t), np.nan)
        for task in range(t):
            sel = tasks[y.numpy()] == task
            if sel.any():
                want[after, task] = hit[sel].mean()
        got_np = f64(got)
        assert ((np.isnan(got_np) == np.isnan(want)) & (np.isnan(want) | (np.abs(got_np - want) < 1e-12))).all()
    else:
        raise AssertionError(f"{name} has no property test: add one here")


METRIC_BAD: dict[str, list[tuple[Callable[[], Any], str]]] = {
    "OODDetection": [
        (lambda: LM.OODDetection(tpr=0.0), "tpr"),
        (lambda: LM.OODDetection().update(id_scores=torch.ones(2, 2)), "scores"),
        (
            lambda: _computed(LM.OODDetection(), id_scores=torch.tensor([1.0, math.nan]), ood_scores=torch.zeros(2)),
            "id_scores",
        ),
        (lambda: _computed(LM.OODDetection(), id_scores=torch.ones(3)), "scores"),
        (lambda: LM.OODDetection().update(id_scores=[1.0]), "scores"),
    ],
    "AURC": [
        (lambda: LM.AURC().update(torch.ones(3), torch.ones(2, dtype=torch.bool)), "correct"),
        (lambda: _computed(LM.AURC(), torch.tensor([math.inf, 1.0]), torch.ones(2, dtype=torch.bool)), "scores"),
        (lambda: LM.AURC().compute(), "scores"),
    ],
    "MaNoScore": [
        (lambda: LM.MaNoScore(p=0.5), "p"),
        (lambda: LM.MaNoScore(normalization="l2"), "normalization"),  # type: ignore[arg-type]
        (lambda: LM.MaNoScore(taylor_order=0), "taylor_order"),
        (lambda: LM.MaNoScore(threshold=math.nan), "threshold"),
        (lambda: LM.MaNoScore().update(torch.ones(3)), "logits"),
        (lambda: _computed(LM.MaNoScore(), torch.tensor([[0.0, math.nan]])), "logits"),
        (lambda: _computed(LM.MaNoScore(), torch.tensor([[0.0, -math.inf]])), "logits"),
        (lambda: LM.MaNoScore().compute(), "logits"),
    ],
    "AccuracyMatrix": [
        (lambda: LM.AccuracyMatrix(torch.tensor([0, -1])), "task_of_class"),
        (lambda: LM.AccuracyMatrix(torch.tensor([0, 1]), eval_mask="old"), "eval_mask"),  # type: ignore[arg-type]
        (lambda: LM.AccuracyMatrix(torch.tensor([0, 1])).update(torch.zeros(2, 3), torch.zeros(2), 0), "logits"),
        (lambda: LM.AccuracyMatrix(torch.tensor([0, 1])).update(torch.zeros(2, 2), torch.zeros(3), 0), "target"),
        (lambda: LM.AccuracyMatrix(torch.tensor([0, 1])).update(torch.zeros(2, 2), torch.zeros(2), 2), "after_task"),
        (lambda: LM.AccuracyMatrix(torch.tensor([0, 1])).update(torch.zeros(2, 2), torch.tensor([0, 2]), 0), "target"),
        (lambda: LM.AccuracyMatrix(torch.tensor([0, 1])).update(torch.zeros(2, 2), torch.tensor([0, -1]), 0), "target"),
        (
            lambda: LM.AccuracyMatrix(torch.tensor([0, 1])).update(
                torch.tensor([[0.0, math.nan]] * 2), torch.zeros(2, dtype=torch.long), 0
            ),
            "logits",
        ),
        (
            lambda: LM.AccuracyMatrix(torch.tensor([0, 1])).update(
                torch.zeros(2, 2), torch.zeros(2, dtype=torch.long), 0.5
            ),
            "after_task",
        ),
        (lambda: LM.AccuracyMatrix(torch.tensor([0, 1])).update(torch.zeros(2, 2), torch.zeros(2), 0), "target"),
    ],
}


def _computed(metric: Any, *args: Any, **kwargs: Any) -> Any:
    metric.update(*args, **kwargs)
    return metric.compute()


@pytest.mark.parametrize(("name", "index"), [(n, i) for n, cases in METRIC_BAD.items() for i in range(len(cases))])
def test_metrics_reject_bad_input(name: str, index: int) -> None:
    call, argument = METRIC_BAD[name][index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchmetrics warns about compute() before update()
        invalid(name, call, argument)


# =========================================================================== coverage
COVERED: dict[str, str] = {
    **{name + "_loss": "test_distillation_losses_agree_with_float64" for name in DISTILLATION_NAMES},
    "DISTILLATION_LOSSES": "test_distillation_losses_agree_with_float64 (every entry, through get_distillation_loss)",
    "get_distillation_loss": "test_distillation_losses_agree_with_float64",
    "standardize_logits": "test_distillation_losses_agree_with_float64 (standardize=True)",
    "dkd_warmup": "test_dkd_warmup",
    "fused_distillation_loss": "test_fused_losses_agree_with_float64",
    "fused_linear_cross_entropy": "test_fused_losses_agree_with_float64",
    "FusedLossTerms": "test_fused_losses_agree_with_float64 (return_terms=True)",
    "default_chunk_size": "test_default_chunk_size_is_a_positive_row_count",
    "classification_loss": "test_classification_loss_agrees_with_float64",
    **{name: "test_logit_scores_agree_with_float64" for name in SCORE_FUNCTIONS},
    **{name: "test_score_vector_functions_agree_with_float64" for name in VECTOR_FUNCTIONS},
    "fit_vim": "test_vim_agrees_with_float64",
    "vim_score": "test_vim_agrees_with_float64",
    "ViMSubspace": "test_vim_agrees_with_float64",
    **{
        name: "test_labelled_diagnostics_agree_with_float64"
        for name in ("expected_calibration_error", "fit_temperature", "dual_focal_loss")
    },
    **{name: "test_lawn_functions_agree_with_float64" for name in lawn.__all__},
    **{name: "test_mowst_functions_agree_with_float64" for name in MOWST_FUNCTIONS},
    "check_node_mask": "test_check_node_mask",
    **{name: "test_replay_losses_agree_with_float64" for name in REPLAY_LOSSES},
    **{name: "test_accuracy_matrix_summaries_agree_with_float64" for name in SUMMARIES},
    **{name: "test_uskd_functions_agree_with_float64" for name in USKD_FUNCTIONS},
    **{
        name: "test_metrics_agree_with_float64_over_batches"
        for name in ("OODDetection", "AURC", "MaNoScore", "AccuracyMatrix")
    },
}
"""Every public name and the property test that covers it."""

CONSTANTS = {
    "DEFAULT_TEMPERATURE": "a dict of numbers (each loss's default temperature)",
    "DistillationLossName": "a Literal type alias",
    "FusedLossName": "a Literal type alias",
}
"""Public names that are not functions or classes, with what they are: nothing to call."""

MODULES = (classification, diagnostics, distillation, distillation_fused, lawn, mowst, replay, uskd)


def test_every_public_name_has_a_property_test() -> None:
    """A name added to any ``__all__`` of ``functional`` or ``metrics`` without a property test here fails."""
    public = set(LF.__all__) | set(LM.__all__) | {name for module in MODULES for name in module.__all__}
    missing = sorted(public - set(COVERED) - set(CONSTANTS))
    assert not missing, f"public names without a property test in tests/test_fuzz.py: {missing}"
    assert not sorted(set(COVERED) - public), "COVERED lists names that are no longer public"
    tests = {name for name, value in globals().items() if name.startswith("test_") and callable(value)}
    for name, test in COVERED.items():
        assert test.split(" ")[0] in tests, f"{name}: {test} is not a test in this file"
    for name in CONSTANTS:
        module = next(m for m in (LF, *MODULES) if hasattr(m, name))
        value = getattr(module, name)
        assert not (inspect.isfunction(value) or inspect.isclass(value)), f"{name} is callable: give it a test"


@given(
    epoch=st.one_of(st.integers(-5, 100), st.floats(-5, 100)), warmup=st.one_of(st.integers(-2, 50), st.floats(-2, 50))
)
def test_dkd_warmup(epoch: float, warmup: float) -> None:
    got = valid("dkd_warmup", lambda: LF.dkd_warmup(epoch, warmup))
    want = 1.0 if warmup <= 0 else min(epoch / warmup, 1.0)
    assert isinstance(got, float) and got == pytest.approx(want, rel=1e-12, abs=1e-12)
    for bad, argument in (((math.nan, 20.0), "epoch"), ((1.0, math.nan), "warmup")):
        invalid("dkd_warmup", lambda bad=bad: LF.dkd_warmup(*bad), argument)

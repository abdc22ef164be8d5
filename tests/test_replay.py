"""UER / ER: the functional core, the reservoir buffer, the class-incremental stream and the callbacks."""

from __future__ import annotations

import copy
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor, nn

from lightning_logits.buffers import ClassBalancedBuffer, ReservoirBuffer, make_buffer
from lightning_logits.callbacks.replay import ERACE, UER, ExperienceReplay, ReplayCallback
from lightning_logits.callbacks.replay_metrics import ContinualMetrics
from lightning_logits.data.streams import ClassIncrementalStream
from lightning_logits.functional.replay import (
    _uer_loss_unchecked,
    average_accuracy,
    average_forgetting,
    average_incremental_accuracy,
    backward_transfer,
    cosine_logits,
    er_ace_loss,
    final_average_accuracy,
    learning_accuracy,
    uer_loss,
)
from lightning_logits.metrics import AccuracyMatrix
from lightning_logits.modules.classifier import Classifier
from tests.helpers import TensorDataModule, TinyMLP, TinyNet, blob_data, fast_trainer


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    # The tiny models here run fastest (and least disturbed by other processes) on one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Independent float64 restatements, element by element, from the formulas in the issue.


def ref_cosine(h: Tensor, w: Tensor, eps: float = 1e-6) -> Tensor:
    h, w = h.double(), w.double()
    out = torch.empty(h.shape[0], w.shape[0], dtype=torch.float64)
    for n in range(h.shape[0]):
        hn = math.sqrt(sum(float(v) ** 2 for v in h[n]))
        for c in range(w.shape[0]):
            wn = math.sqrt(sum(float(v) ** 2 for v in w[c]))
            out[n, c] = sum(float(a) * float(b) for a, b in zip(h[n], w[c], strict=True)) / ((hn + eps) * (wn + eps))
    return out


def ref_ce(logits: Tensor, target: Tensor, mask: Tensor | None = None) -> float:
    total = 0.0
    for n in range(logits.shape[0]):
        keep = [c for c in range(logits.shape[1]) if mask is None or bool(mask[c])]
        z = [float(logits[n, c]) for c in keep]
        top = max(z)
        lse = top + math.log(sum(math.exp(v - top) for v in z))
        total += lse - float(logits[n, int(target[n])])
    return total / logits.shape[0]


def ref_uer(h, y, w, hm=None, ym=None, b=None, tau=0.09, mask=None) -> float:
    loss = ref_ce(ref_cosine(h, w) / tau, y, mask)
    if hm is not None and hm.shape[0] > 0:
        z = hm.double() @ w.double().T + (0 if b is None else b.double())
        loss += ref_ce(z, ym)
    return loss


# ---------------------------------------------------------------------------------------------
# cosine_logits and uer_loss


def test_cosine_logits_hand_case() -> None:
    h = torch.tensor([[3.0, 4.0], [-1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    s = 1 / math.sqrt(2)
    want = torch.tensor([[0.6, 0.8, 0.7 * 2 * s], [-1.0, 0.0, -s]])
    torch.testing.assert_close(cosine_logits(h, w), want, atol=1e-5, rtol=0)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(2, 7),
    d=st.integers(1, 9),
    scale=st.sampled_from([1e-12, 1e-3, 1.0, 1e4, 1e15]),
    seed=st.integers(0, 10_000),
)
def test_cosine_logits_matches_reference(n: int, c: int, d: int, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, d, generator=g) * scale, torch.randn(c, d, generator=g)
    got = cosine_logits(h, w)
    assert got.shape == (n, c) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref_cosine(h, w), atol=2e-6, rtol=1e-5)
    assert bool((got.abs() <= 1 + 1e-6).all())


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 5),
    m=st.integers(0, 5),
    c=st.integers(2, 6),
    d=st.integers(1, 7),
    tau=st.sampled_from([0.01, 0.09, 1.0, 10.0]),
    use_bias=st.booleans(),
    use_mask=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_uer_loss_matches_reference(
    n: int, m: int, c: int, d: int, tau: float, use_bias: bool, use_mask: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    h, w = torch.randn(n, d, generator=g) * 3, torch.randn(c, d, generator=g)
    y = torch.randint(0, c, (n,), generator=g)
    hm, ym = torch.randn(m, d, generator=g), torch.randint(0, c, (m,), generator=g)
    b = torch.randn(c, generator=g) if use_bias else None
    mask = None
    if use_mask:
        mask = torch.rand(c, generator=g) < 0.5
        mask[y] = True
    got = uer_loss(h, y, w, hm, ym, bias=b, temperature=tau, logit_mask=mask)
    want = ref_uer(h, y, w, hm, ym, b, tau, mask)
    assert math.isclose(float(got), want, rel_tol=1e-4, abs_tol=1e-4)


def ref_er_ace(z, y, zm=None, ym=None) -> float:
    """ER-ACE from the paper's definition: incoming softmax over the classes in the batch, replay over all."""
    present = torch.zeros(z.shape[1], dtype=torch.bool)
    for label in y.tolist():
        present[label] = True
    loss = ref_ce(z.double(), y, present)
    if zm is not None and zm.shape[0] > 0:
        loss += ref_ce(zm.double(), ym)
    return loss


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    m=st.integers(0, 5),
    c=st.integers(2, 7),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
    validate=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_er_ace_loss_matches_reference(n: int, m: int, c: int, scale: float, validate: bool, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    z, zm = torch.randn(n, c, generator=g) * scale, torch.randn(m, c, generator=g) * scale
    y, ym = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (m,), generator=g)
    got = er_ace_loss(z, y, zm, ym, validate_args=validate)
    assert got.dtype == torch.float32
    assert math.isclose(float(got), ref_er_ace(z, y, zm, ym), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(float(er_ace_loss(z, y)), ref_er_ace(z, y), rel_tol=1e-4, abs_tol=1e-5)


def test_er_ace_absent_classes_get_no_gradient_from_incoming_samples() -> None:
    z = torch.tensor([[1.0, 2.0, 9.0, -3.0], [0.5, 0.0, 9.0, 1.0]], requires_grad=True)
    loss = er_ace_loss(z, torch.tensor([0, 1]))
    # two classes present: CE of [1, 2] and [0.5, 0]; class 2's large logit plays no part
    want = (math.log(math.exp(1) + math.exp(2)) - 1 + math.log(math.exp(0.5) + math.exp(0)) - 0) / 2
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    assert z.grad is not None and bool((z.grad[:, 2:] == 0).all()) and bool((z.grad[:, :2] != 0).all())
    # a replayed sample's softmax covers every class: class 2 gets its gradient there
    zm = torch.tensor([[0.0, 0.0, 3.0, 0.0]], requires_grad=True)
    er_ace_loss(z.detach(), torch.tensor([0, 1]), zm, torch.tensor([0])).backward()
    assert zm.grad is not None and bool((zm.grad != 0).all())
    with pytest.raises(ValueError, match="together"):
        er_ace_loss(z, torch.tensor([0, 1]), zm)
    with pytest.raises(ValueError, match="labels must lie"):
        er_ace_loss(z, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="C=3"):
        er_ace_loss(z, torch.tensor([0, 1]), torch.zeros(1, 3), torch.tensor([0]))
    with pytest.raises(ValueError, match="non-finite"):
        er_ace_loss(torch.full((2, 4), float("nan")), torch.tensor([0, 1]))
    # validate_args=False skips the value reads (no error for the NaN here), shapes are still checked
    assert torch.isnan(er_ace_loss(torch.full((2, 4), float("nan")), torch.tensor([0, 1]), validate_args=False))
    with pytest.raises(ValueError, match="shape"):
        er_ace_loss(z, torch.tensor([0, 1, 2]), validate_args=False)


def test_uer_loss_replay_term_is_plain_cross_entropy_and_zero_without_replay() -> None:
    g = torch.Generator().manual_seed(1)
    h, w, b = torch.randn(4, 5, generator=g), torch.randn(3, 5, generator=g), torch.randn(3, generator=g)
    y, hm, ym = torch.tensor([0, 1, 2, 0]), torch.randn(6, 5, generator=g), torch.tensor([2, 2, 1, 0, 1, 0])
    alone = uer_loss(h, y, w, temperature=0.5)
    assert math.isclose(float(alone), ref_ce(ref_cosine(h, w) / 0.5, y), rel_tol=1e-5)
    assert float(uer_loss(h, y, w, hm[:0], ym[:0], temperature=0.5)) == pytest.approx(float(alone))
    both = uer_loss(h, y, w, hm, ym, bias=b, temperature=0.5)
    z = hm @ w.T + b
    assert float(both - alone) == pytest.approx(float(torch.nn.functional.cross_entropy(z, ym)), rel=1e-5)
    # the bias only enters the replay term
    assert float(uer_loss(h, y, w, bias=b, temperature=0.5)) == pytest.approx(float(alone))


def test_uer_loss_with_replay_logits_equals_recomputing_them() -> None:
    # The callback hands over the logits the head already computed; value and every gradient must
    # be those of the path that recomputes them from the replayed features.
    g = torch.Generator().manual_seed(3)
    w0, b0 = torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    h0, hm0 = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)
    y, ym = torch.tensor([0, 1, 2, 3, 0]), torch.tensor([3, 1, 1])
    grads = []
    for reuse in (False, True):
        w, b, h, hm = (t.clone().requires_grad_(True) for t in (w0, b0, h0, hm0))
        if reuse:
            loss = uer_loss(h, y, w, replay_target=ym, replay_logits=torch.nn.functional.linear(hm, w, b))
        else:
            loss = uer_loss(h, y, w, hm, ym, bias=b)
        loss.backward()
        grads.append([float(loss)] + [t.grad for t in (w, b, h, hm)])
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b_ in zip(grads[0][1:], grads[1][1:], strict=True):
        torch.testing.assert_close(a, b_)
    h, w = h0, w0
    with pytest.raises(ValueError, match="not both"):
        uer_loss(h, y, w, hm0, ym, replay_logits=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="replay_target with replay_logits"):
        uer_loss(h, y, w, replay_logits=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="C=5"):
        uer_loss(h, y, w, replay_target=ym, replay_logits=torch.zeros(3, 5))
    with pytest.raises(ValueError, match="shape"):
        uer_loss(h, y, w, replay_target=ym[:2], replay_logits=torch.zeros(3, 4))
    assert float(uer_loss(h, y, w, replay_target=ym[:0], replay_logits=torch.zeros(0, 4))) == pytest.approx(
        float(uer_loss(h, y, w))
    )


def test_uer_loss_mask_excludes_classes_from_softmax_and_their_gradient() -> None:
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    mask = torch.tensor([True, True, False, False])
    loss = uer_loss(h, y, w, temperature=1.0, logit_mask=mask)
    # with only classes 0 and 1 the logits are [1, 0] and [0, 1] (up to eps): CE = log(1 + e^-1)
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-5)
    loss.backward()
    assert w.grad is not None and bool((w.grad[2:] == 0).all()) and bool((w.grad[:2] != 0).any())


def test_zero_feature_row_gives_uniform_softmax_finite_bounded_gradient() -> None:
    h = torch.zeros(3, 4)
    h[1] = torch.tensor([1.0, 2.0, 0.0, -1.0])
    h.requires_grad_(True)
    w = torch.randn(5, 4, requires_grad=True)
    y = torch.tensor([0, 3, 4])
    hm, ym = torch.zeros(2, 4, requires_grad=True), torch.tensor([1, 2])
    loss = uer_loss(h, y, w, hm, ym)
    assert torch.isfinite(loss)
    assert torch.allclose(cosine_logits(h.detach(), w.detach())[0], torch.zeros(5))
    loss.backward()
    assert h.grad is not None and w.grad is not None and hm.grad is not None
    for grad in (h.grad, w.grad, hm.grad):
        assert bool(torch.isfinite(grad).all())
    # the zero rows get no gradient from the cosine (their direction is undefined) ...
    assert bool((h.grad[0] == 0).all()) and bool((h.grad[2] == 0).all())
    # ... and the non-zero row's gradient is of ordinary size (the 1/eps Jacobian is cut)
    assert float(h.grad.abs().max()) < 1e3
    # a zero weight row (a class never trained) is handled the same way
    w0 = w.detach().clone()
    w0[2] = 0
    w0.requires_grad_(True)
    uer_loss(h.detach(), y, w0).backward()
    assert w0.grad is not None and bool(torch.isfinite(w0.grad).all()) and bool((w0.grad[2] == 0).all())


def test_tiny_feature_row_gradient_is_bounded_by_one_over_norm() -> None:
    h = (torch.tensor([[1e-9, -2e-9, 3e-9]])).requires_grad_(True)
    w = torch.randn(4, 3)
    out = cosine_logits(h, w)
    out.sum().backward()
    assert h.grad is not None and bool(torch.isfinite(h.grad).all())
    # ||d unit / dh|| <= 1 / (||h|| + eps) <= 1e6, times ||sum_c W_c / ||W_c|| || <= C
    assert float(h.grad.norm()) <= 4 * 1e6 + 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("replayed", [None, 0, 3])
def test_unchecked_uer_loss_gives_the_same_bits_as_uer_loss(
    dtype: torch.dtype, masked: bool, replayed: int | None
) -> None:
    # The callback's path after its first step must compute exactly what uer_loss computes.
    g = torch.Generator().manual_seed(3)
    h0 = torch.randn(5, 6, generator=g, dtype=dtype)
    h0[2] = 0.0  # a zero feature row: no gradient through the cosine on either path
    w0 = torch.randn(4, 6, generator=g, dtype=dtype)
    w0[3] = 0.0  # a zero weight row too
    z0 = None if replayed is None else torch.randn(replayed, 4, generator=g, dtype=dtype)
    y, ym = torch.tensor([0, 1, 2, 1, 0]), torch.tensor([3, 0, 2])[: replayed or 0]
    mask = torch.tensor([True, True, True, False]) if masked else None
    results = []
    for checked in (True, False):
        h, w = h0.clone().requires_grad_(True), w0.clone().requires_grad_(True)
        z = None if z0 is None else z0.clone().requires_grad_(True)
        if checked:
            loss = uer_loss(
                h, y, w, replay_target=None if z is None else ym, replay_logits=z, temperature=0.2, logit_mask=mask
            )
        else:
            loss = _uer_loss_unchecked(h, y, w, 1.0 / 0.2, mask, z, None if z is None else ym)
        leaves = [h, w] if not replayed else [h, w, z]  # an empty replay batch is not in the graph
        results.append((loss.detach(), torch.autograd.grad(loss, leaves)))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b.dtype == torch.float32 and torch.equal(loss_a, loss_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.equal(a, b)
    assert bool((grads_b[0][2] == 0).all()) and bool((grads_b[1][3] == 0).all())
    assert float(loss_b) == pytest.approx(
        ref_uer(h0, y, w0, tau=0.2, mask=mask) + (0.0 if not replayed else ref_ce(z0, ym)), rel=1e-5
    )


@pytest.mark.parametrize("mask", ["all", "present", "seen"])
def test_uer_checks_on_its_first_step_only_and_every_step_matches_the_reference(
    mask: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning_logits.callbacks.replay as replay_module

    checked_calls: list[bool] = []
    unchecked = replay_module._uer_loss_unchecked
    checked = replay_module.uer_loss

    def spy_checked(*args: Any, **kwargs: Any) -> Tensor:
        checked_calls.append(True)
        return checked(*args, **kwargs)

    def spy_unchecked(features, target, weight, inverse_temperature, logit_mask, logits, replay_target):  # type: ignore[no-untyped-def]
        checked_calls.append(False)
        got = unchecked(features, target, weight, inverse_temperature, logit_mask, logits, replay_target)
        # the value of the float64 restatement, with the mask the callback built
        want = ref_uer(features.detach(), target, weight.detach(), tau=1.0 / inverse_temperature, mask=logit_mask)
        if logits is not None:
            want += ref_ce(logits.detach(), replay_target)
        assert float(got) == pytest.approx(want, rel=1e-5)
        return got

    monkeypatch.setattr(replay_module, "uer_loss", spy_checked)
    monkeypatch.setattr(replay_module, "_uer_loss_unchecked", spy_unchecked)
    x, y = blob_data(n=48)
    order = torch.argsort(y, stable=True)  # sorted by class: batches hold one or two of the 4 classes
    x, y = x[order], y[order]
    torch.manual_seed(0)
    module = Classifier(TinyMLP(), optimizer=_sgd)
    fast_trainer(max_epochs=1, limit_val_batches=0, callbacks=[UER(12, replay_batch_size=4, mask=mask)]).fit(  # type: ignore[arg-type]
        module, datamodule=TensorDataModule(x, y, batch_size=8)
    )
    assert checked_calls == [True] + [False] * 5
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype: torch.dtype) -> None:
    h, w = torch.randn(4, 6).to(dtype), torch.randn(3, 6).to(dtype)
    assert cosine_logits(h, w).dtype == dtype
    loss = uer_loss(h, torch.tensor([0, 1, 2, 0]), w)
    assert loss.dtype in (torch.float32, torch.float64) and torch.isfinite(loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": torch.randn(0, 4)}, "at least 2"),
        ({"weight": torch.randn(1, 4)}, "at least 2"),
        ({"weight": torch.randn(3, 5)}, "D=4"),
        ({"features": torch.randn(3, 4, 1)}, r"\[N, D\]"),
        ({"features": torch.randn(0, 4), "target": torch.zeros(0, dtype=torch.long)}, "N=0"),
        ({"target": torch.tensor([0, 1, 3])}, r"labels in \[0, 3\].*3 classes"),
        ({"target": torch.tensor([0, -1, 1])}, "labels must lie"),
        ({"target": torch.tensor([0.0, 1.0, 1.0])}, "int class indices"),
        ({"target": torch.tensor([0, 1])}, "shape"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"logit_mask": torch.tensor([True, False, True])}, r"labels \[1\] are excluded"),
        ({"logit_mask": torch.tensor([1, 1, 1])}, "bool tensor"),
        ({"replay_features": torch.randn(2, 4)}, "together"),
        ({"replay_features": torch.randn(2, 5), "replay_target": torch.tensor([0, 1])}, "D=5"),
        ({"replay_features": torch.randn(2, 4), "replay_target": torch.tensor([0, 7])}, "labels"),
        ({"bias": torch.randn(4)}, "bias must have shape"),
        ({"features": torch.full((3, 4), float("nan"))}, "non-finite"),
    ],
)
def test_uer_loss_errors(kwargs: dict[str, Any], match: str) -> None:
    args: dict[str, Any] = {
        "features": torch.randn(3, 4),
        "target": torch.tensor([0, 1, 2]),
        "weight": torch.randn(3, 4),
    }
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        uer_loss(**args)


def test_cosine_logits_errors() -> None:
    with pytest.raises(ValueError, match="D=3"):
        cosine_logits(torch.randn(2, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="eps"):
        cosine_logits(torch.randn(2, 3), torch.randn(4, 3), eps=0.0)
    with pytest.raises(TypeError, match="floating"):
        cosine_logits(torch.ones(2, 3, dtype=torch.long), torch.randn(4, 3))


# ---------------------------------------------------------------------------------------------
# ReservoirBuffer


def sequential_reservoir(capacity: int, draws: list[float], stream: list[int]) -> list[int]:
    """Algorithm R one sample at a time, j = floor(u * (n + 1)) from the given uniforms."""
    slots: list[int] = []
    for n, (item, u) in enumerate(zip(stream, draws, strict=True)):
        if n < capacity:
            slots.append(item)
        else:
            j = min(int(u * (n + 1)), n)
            if j < capacity:
                slots[j] = item
    return slots


@settings(max_examples=20, deadline=None)
@given(capacity=st.integers(1, 12), sizes=st.lists(st.integers(0, 9), min_size=1, max_size=12), seed=st.integers(0, 99))
def test_reservoir_equals_sequential_algorithm_r(capacity: int, sizes: list[int], seed: int) -> None:
    buffer = ReservoirBuffer(capacity, seed=seed)
    mirror = torch.Generator().manual_seed(seed)
    draws: list[float] = []
    item = 0
    for size in sizes:
        labels = torch.arange(item, item + size)
        buffer.add(labels.float().unsqueeze(1), labels)
        if size and buffer.labels is not None:
            draws += torch.rand(size, generator=mirror, dtype=torch.float64).tolist()
        item += size
    want = sequential_reservoir(capacity, draws, list(range(len(draws))))
    assert buffer.seen == item and len(buffer) == min(item, capacity)
    if want:
        assert buffer.labels is not None and buffer.inputs is not None
        assert buffer.labels[: len(want)].tolist() == want
        assert buffer.inputs[: len(want), 0].tolist() == [float(v) for v in want]


def test_reservoir_inclusion_is_uniform() -> None:
    # 20 items in batches of 7, 7, 6 into 5 slots: each item is kept with probability 1/4.
    counts = torch.zeros(20)
    trials = 2000
    for trial in range(trials):
        buffer = ReservoirBuffer(5, seed=trial)
        for lo, hi in ((0, 7), (7, 14), (14, 20)):
            labels = torch.arange(lo, hi)
            buffer.add(labels.unsqueeze(1), labels)
        assert buffer.labels is not None and len(set(buffer.labels.tolist())) == 5
        counts[buffer.labels] += 1
    freq = counts / trials
    # binomial std = sqrt(.25 * .75 / 2000) = 0.0097; 4 sigma
    assert bool(((freq - 0.25).abs() < 0.04).all()), freq


def test_sample_without_replacement_and_uniform() -> None:
    buffer = ReservoirBuffer(8, seed=3)
    buffer.add(torch.arange(8).float().unsqueeze(1), torch.arange(8))
    counts = torch.zeros(8)
    for _ in range(2000):
        batch = buffer.sample(3)
        labels = batch["target"].tolist()
        assert len(labels) == 3 and len(set(labels)) == 3
        assert batch["input"][:, 0].tolist() == [float(v) for v in labels]
        counts[batch["target"]] += 1
    assert bool(((counts / 2000 - 3 / 8).abs() < 0.05).all()), counts
    assert sorted(buffer.sample(50)["target"].tolist()) == list(range(8))  # capped at the size
    empty = ReservoirBuffer(4).sample(10)
    assert empty["input"].numel() == 0 and empty["target"].numel() == 0


def test_buffer_preallocates_on_the_batch_device_and_dtype_with_logits_and_task_ids() -> None:
    buffer = ReservoirBuffer(6, seed=0, store_logits=True, store_task_ids=True)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    buffer.add(x, torch.tensor([3, 1, 2, 0]), logits=torch.randn(4, 10), task_ids=2)
    assert buffer.inputs is not None and buffer.inputs.shape == (6, 1, 8, 8) and buffer.inputs.dtype == torch.float64
    assert buffer.logits is not None and buffer.logits.shape == (6, 10)
    assert buffer.task_ids is not None and buffer.task_ids[:4].tolist() == [2, 2, 2, 2]
    batch = buffer.sample(4)
    assert set(batch) == {"input", "target", "logits", "task_id"}
    allocated = buffer.inputs.data_ptr()
    buffer.add(x, torch.tensor([3, 1, 2, 0]), logits=torch.randn(4, 10), task_ids=torch.tensor([5, 5, 6, 6]))
    assert buffer.inputs.data_ptr() == allocated  # no reallocation
    with pytest.raises(ValueError, match="pass logits"):
        buffer.add(x, torch.tensor([0, 1, 2, 3]), task_ids=1)
    with pytest.raises(ValueError, match="same shape"):
        buffer.add(torch.randn(2, 1, 4, 4), torch.tensor([0, 1]), logits=torch.randn(2, 10), task_ids=1)
    with pytest.raises(ValueError, match="first"):
        buffer.add(torch.randn(3, 1, 8, 8), torch.tensor([0, 1]), logits=torch.randn(3, 10), task_ids=1)
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(0)


def test_buffer_state_dict_continues_identically() -> None:
    a = ReservoirBuffer(5, seed=7)
    for i in range(3):
        a.add(torch.randn(4, 2), torch.arange(4) + 4 * i)
    b = ReservoirBuffer(5, seed=123)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for i in range(3, 6):
        x, y = torch.randn(4, 2), torch.arange(4) + 4 * i
        a.add(x, y)
        b.add(x, y)
        assert torch.equal(a.sample(3)["target"], b.sample(3)["target"])
    assert a.seen == b.seen == 24
    assert a.labels is not None and b.labels is not None and torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="capacity 5"):
        ReservoirBuffer(6).load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------
# ClassIncrementalStream and metrics


def test_stream_tasks_are_disjoint_seeded_and_each_sample_is_seen_once() -> None:
    stream = ClassIncrementalStream("digits", num_tasks=5, seed=3)
    stream.setup("fit")
    classes = [c for task in stream.tasks for c in task]
    assert sorted(classes) == list(range(10)) and all(len(t) == 2 for t in stream.tasks)
    other = ClassIncrementalStream("digits", num_tasks=5, seed=3)
    other.setup("fit")
    assert other.tasks == stream.tasks
    reordered = ClassIncrementalStream("digits", num_tasks=5, seed=4)
    reordered.setup("fit")
    assert reordered.tasks != stream.tasks
    seen: list[Tensor] = []
    total = 0
    for t in range(5):
        loader = stream.train_dataloader() if t == 0 else None
        dataset = stream.task_dataset(t)
        total += len(dataset)
        ys = torch.stack([dataset[i][1] for i in range(len(dataset))])
        assert set(ys.tolist()) == set(stream.tasks[t])
        xs = torch.stack([dataset[i][0] for i in range(len(dataset))])
        seen.append(xs.flatten(1))
        if loader is not None:
            assert all(x.shape[0] <= 10 for x, _ in loader)
    flat = torch.cat(seen)
    assert (
        total == len(stream._train)
        and torch.unique(flat, dim=0).shape[0]
        == torch.unique(  # type: ignore[arg-type]
            torch.stack([stream._train[i][0].flatten() for i in range(len(stream._train))]),  # type: ignore[arg-type]
            dim=0,
        ).shape[0]
    )
    explicit = ClassIncrementalStream("digits", num_tasks=2, class_order=list(range(9, -1, -1)), flatten=True)
    explicit.setup()
    assert explicit.tasks == [[9, 8, 7, 6, 5], [4, 3, 2, 1, 0]]
    assert explicit.task_dataset(0)[0][0].shape == (64,)


def test_stream_errors() -> None:
    with pytest.raises(ValueError, match="source"):
        ClassIncrementalStream("mnist")
    with pytest.raises(ValueError, match="do not split into 3 tasks"):
        ClassIncrementalStream("digits", num_tasks=3).setup()
    with pytest.raises(ValueError, match="permutation"):
        ClassIncrementalStream("digits", class_order=[0, 1, 2]).setup()
    module = Classifier(TinyNet(), num_classes=10)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs=1"):
        fast_trainer(max_epochs=5).fit(module, datamodule=ClassIncrementalStream())
    with pytest.raises(ValueError, match="max_epochs to at most 5"):
        fast_trainer(max_epochs=6, reload_dataloaders_every_n_epochs=1).fit(module, datamodule=ClassIncrementalStream())


def test_final_accuracy_and_forgetting_by_hand() -> None:
    nan = float("nan")
    r = torch.tensor([[0.9, nan, nan], [0.6, 0.8, nan], [0.5, 0.4, 0.7]])
    assert final_average_accuracy(r) == pytest.approx((0.5 + 0.4 + 0.7) / 3)
    assert average_forgetting(r) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.4)) / 2)
    assert average_forgetting(torch.tensor([[0.7]])) == 0.0


def test_matrix_summaries_by_hand_after_every_task() -> None:
    nan = float("nan")
    r = torch.tensor([[0.9, nan, nan], [0.6, 0.8, nan], [0.5, 0.4, 0.7]])
    # after task 1: row 1 only
    assert average_accuracy(r, after=1) == pytest.approx((0.6 + 0.8) / 2)
    assert average_forgetting(r, after=1) == pytest.approx(0.9 - 0.6)
    assert backward_transfer(r, after=1) == pytest.approx(0.6 - 0.9)
    assert learning_accuracy(r, after=1) == pytest.approx((0.9 + 0.8) / 2)
    # after the last task
    assert average_accuracy(r) == pytest.approx((0.5 + 0.4 + 0.7) / 3)
    assert backward_transfer(r) == pytest.approx(((0.5 - 0.9) + (0.4 - 0.8)) / 2)
    assert learning_accuracy(r) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    assert average_incremental_accuracy(r) == pytest.approx((0.9 + 0.7 + (0.5 + 0.4 + 0.7) / 3) / 3)
    # forgetting takes the best earlier row, not the diagonal: task 0 peaks after task 1 here
    r2 = torch.tensor([[0.5, nan, nan], [0.9, 0.8, nan], [0.2, 0.8, 0.6]])
    assert average_forgetting(r2) == pytest.approx(((0.9 - 0.2) + (0.8 - 0.8)) / 2)
    assert backward_transfer(r2) == pytest.approx(((0.2 - 0.5) + (0.8 - 0.8)) / 2)
    for fn in (average_accuracy, average_forgetting, backward_transfer, learning_accuracy):
        assert fn(r, after=0) == pytest.approx(0.9 if fn in (average_accuracy, learning_accuracy) else 0.0)
        with pytest.raises(ValueError, match="after must be"):
            fn(r, after=3)
    with pytest.raises(ValueError, match="square"):
        average_accuracy(torch.zeros(2, 3))


def test_accuracy_matrix_metric_counts_per_task_and_masks_unseen_classes() -> None:
    task_of_class = torch.tensor([1, 0, 0, 1])  # classes 1, 2: task 0; classes 0, 3: task 1
    logits = torch.tensor([[0.0, 5.0, 0.0, 0.0], [0.0, 1.0, 0.0, 3.0], [0.0, 0.0, 2.0, 0.0]])
    target = torch.tensor([1, 2, 2])
    plain = AccuracyMatrix(task_of_class)
    plain.update(logits, target, after_task=0)
    got = plain.compute()
    # sample 2 is predicted as class 3 (task 1) unmasked: 2 of 3 right
    assert got[0, 0].item() == pytest.approx(2 / 3) and bool(torch.isnan(got[0, 1])) and bool(torch.isnan(got[1]).all())
    masked = AccuracyMatrix(task_of_class, eval_mask="seen")
    masked.update(logits, target, after_task=0)
    # with task 1's classes out of the argmax, sample 2's best class is 1: still wrong (target 2)
    assert masked.compute()[0, 0].item() == pytest.approx(2 / 3)
    masked.update(torch.tensor([[9.0, 0.0, 1.0, 0.0]]), torch.tensor([2]), after_task=0)
    assert masked.compute()[0, 0].item() == pytest.approx(3 / 4)  # class 0 (task 1) was masked out
    masked.update(torch.tensor([[9.0, 0.0, 1.0, 0.0]]), torch.tensor([2]), after_task=1)
    assert masked.compute()[1, 0].item() == 0.0  # after task 1, class 0 is seen: predicted, wrong
    masked.reset_row(0)
    assert bool(torch.isnan(masked.compute()[0]).all())
    with pytest.raises(ValueError, match="eval_mask"):
        AccuracyMatrix(task_of_class, eval_mask="old")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="C = 4"):
        plain.update(torch.zeros(2, 3), torch.tensor([0, 1]), after_task=0)


def test_plot_without_matplotlib_warns_once_and_keeps_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    module = Classifier(TinyMLP(in_features=64, num_classes=10, hidden=8), optimizer=_sgd)
    metrics = ContinualMetrics(out_dir=str(tmp_path), plot=True)
    trainer = fast_trainer(
        max_epochs=3, reload_dataloaders_every_n_epochs=1, limit_train_batches=2, callbacks=[metrics]
    )
    with pytest.warns(UserWarning, match=r"matplotlib is not importable.*pip install matplotlib.*plot=False") as caught:
        trainer.fit(module, datamodule=ClassIncrementalStream("digits", num_tasks=5, flatten=True))
    assert sum("matplotlib" in str(w.message) for w in caught) == 1  # once, not after every task
    assert metrics.plot is False and not (tmp_path / "accuracy_matrix.png").exists()
    saved = torch.load(tmp_path / "accuracy_matrix.pt")
    assert bool(torch.isfinite(saved[2, :3]).all())  # all three tasks were still measured


# ---------------------------------------------------------------------------------------------
# The callbacks on a real Trainer


def _sgd(params: Any) -> torch.optim.Optimizer:  # module level: picklable for ddp_spawn
    return torch.optim.SGD(params, lr=0.1)


class Snapshot(Callback):
    """Before each step: the parameters and the replay callback's buffer state."""

    def __init__(self, replay: ReplayCallback) -> None:
        self.replay = replay
        self.before: list[tuple[dict[str, Tensor], dict[str, Any], Any]] = []
        self.after: list[dict[str, Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *args: Any) -> None:
        params = {k: v.detach().clone() for k, v in pl_module.named_parameters()}
        self.before.append((params, copy.deepcopy(self.replay.buffer.state_dict()), batch))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.after.append({k: v.detach().clone() for k, v in pl_module.named_parameters()})


def _manual_step(method: str, params: dict[str, Tensor], buffer_state: dict[str, Any], batch: Any) -> dict[str, Tensor]:
    """One SGD step of ER/UER on TinyMLP restated by hand (float64, our own forward pass)."""
    p = {k: v.double().clone().requires_grad_(True) for k, v in params.items()}

    def forward(x: Tensor) -> tuple[Tensor, Tensor]:
        h = torch.tanh(x.double() @ p["model.body.0.weight"].T + p["model.body.0.bias"])
        return h, h @ p["model.head.weight"].T + p["model.head.bias"]

    def ce(z: Tensor, y: Tensor) -> Tensor:
        return (torch.logsumexp(z, dim=1) - z.gather(1, y.unsqueeze(1)).squeeze(1)).mean()

    x, y = batch
    buffer = ReservoirBuffer(buffer_state["capacity"])
    buffer.load_state_dict(copy.deepcopy(buffer_state))
    replay = buffer.sample(4)
    h, z = forward(x)
    w = p["model.head.weight"]
    if method == "er":
        loss = ce(z, y)
    elif method == "er_ace":
        absent = torch.ones(z.shape[1], dtype=torch.bool)
        absent[y] = False
        loss = ce(z.masked_fill(absent, -1e30), y)
    else:
        hn = h / (h.norm(dim=1, keepdim=True) + 1e-6)
        wn = w / (w.norm(dim=1, keepdim=True) + 1e-6)
        loss = ce(hn @ wn.T / 0.09, y)
    if replay["target"].numel():
        loss = loss + ce(forward(replay["input"])[1], replay["target"])
    loss.backward()
    # the head's bias gets no gradient from UER's cosine term alone (first step, empty buffer)
    return {k: (v - 0.1 * (v.grad if v.grad is not None else torch.zeros_like(v))).detach() for k, v in p.items()}


_METHODS = {"er": ExperienceReplay, "er_ace": ERACE, "uer": UER}


@pytest.mark.parametrize("method", ["er", "er_ace", "uer"])
def test_callback_step_equals_hand_written_step(method: str) -> None:
    x, y = blob_data(n=48)
    if method == "er_ace":  # sorted by class: most batches lack some classes, as in a stream
        order = torch.argsort(y, stable=True)
        x, y = x[order], y[order]
    torch.manual_seed(0)
    module = Classifier(TinyMLP(), optimizer=_sgd)
    replay = _METHODS[method](12, replay_batch_size=4)
    snap = Snapshot(replay)
    fast_trainer(max_epochs=1, limit_val_batches=0, callbacks=[replay, snap]).fit(
        module, datamodule=TensorDataModule(x, y, batch_size=8)
    )
    assert replay.buffer.seen == 48 and len(replay.buffer) == 12
    for (params, state, batch), after in zip(snap.before, snap.after, strict=True):
        want = _manual_step(method, params, state, batch)
        for name, value in after.items():
            torch.testing.assert_close(value.double(), want[name], rtol=1e-4, atol=1e-5)


class CountForwards(nn.Module):
    """TinyNet that records the batch size of every forward call (BatchNorm in the model)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet(num_classes=10)
        self.fc = self.net.fc
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled():
            self.sizes.append(x.shape[0])
        return self.net(x)


def test_uer_on_stream_separate_forward_passes_and_metrics(tmp_path: Path) -> None:
    net = CountForwards()
    module = Classifier(net, num_classes=10, optimizer=_sgd)
    uer = UER(buffer_size=30, replay_batch_size=5, mask="seen")
    metrics = ContinualMetrics(out_dir=str(tmp_path))
    stream = ClassIncrementalStream("digits", num_tasks=5, batch_size=10)
    trainer = fast_trainer(
        max_epochs=5, reload_dataloaders_every_n_epochs=1, limit_train_batches=6, callbacks=[uer, metrics]
    )
    trainer.fit(module, datamodule=stream)
    # one forward of 10 incoming samples, then a separate one of 5 replayed (none on the first step)
    assert net.sizes[0] == 10 and net.sizes[1:5] == [10, 5, 10, 5]
    assert uer.buffer.seen == 5 * 6 * 10
    assert uer.buffer.labels is not None and len(set(uer.buffer.labels.tolist())) == 10
    r = metrics.accuracy_matrix
    assert r.shape == (5, 5)
    assert bool(torch.isfinite(r.tril()).all()) and bool(torch.isnan(r.triu(1)[r.triu(1) != 0]).all())
    assert (tmp_path / "accuracy_matrix.png").stat().st_size > 1000
    torch.testing.assert_close(torch.load(tmp_path / "accuracy_matrix.pt"), r, equal_nan=True)
    logged = trainer.callback_metrics
    assert float(logged["continual/final_avg_acc"]) == pytest.approx(metrics.final_average_accuracy, abs=1e-6)
    assert "continual/forgetting" in logged and "train/loss_uer" in logged
    assert uer.seen_classes is not None and bool(uer.seen_classes.all())
    # the last row equals the accuracy of the final model, task by task, computed here
    module.eval()
    with torch.no_grad():
        for j in range(5):
            test_set = stream.task_dataset(j, "test")
            xs, ys = zip(*[test_set[i] for i in range(len(test_set))], strict=True)
            acc = (module(torch.stack(xs)).argmax(1) == torch.stack(ys)).float().mean()
            assert float(r[4, j]) == pytest.approx(float(acc), abs=1e-6)


def test_uer_masks() -> None:
    uer = UER(10, mask="all")
    assert uer._logit_mask(torch.tensor([1, 2]), 5) is None
    uer = UER(10, mask="present")
    assert uer._logit_mask(torch.tensor([1, 2, 1]), 5).tolist() == [False, True, True, False, False]  # type: ignore[union-attr]
    assert uer._logit_mask(torch.tensor([4]), 5).tolist() == [False, False, False, False, True]  # type: ignore[union-attr]
    uer = UER(10, mask="seen")
    uer._logit_mask(torch.tensor([1, 2, 1]), 5)
    assert uer._logit_mask(torch.tensor([4]), 5).tolist() == [False, True, True, False, True]  # type: ignore[union-attr]
    assert uer.extra_state()["seen_classes"].tolist() == [False, True, True, False, True]


def test_uer_replaces_the_task_loss_and_er_keeps_it() -> None:
    assert UER.replaces_task_loss and ERACE.replaces_task_loss and not ExperienceReplay.replaces_task_loss
    with pytest.raises(ValueError, match="mask"):
        UER(10, mask="old")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="buffer_size"):
        ExperienceReplay(0)
    with pytest.raises(ValueError, match="replay_batch_size"):
        ExperienceReplay(10, replay_batch_size=0)


class ConvHeadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(1, 4, 3, padding=1)
        self.classifier = nn.Conv2d(4, 10, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.body(x)).mean(dim=(2, 3))


def test_custom_module_without_linear_head_gets_a_clear_error() -> None:
    module = Classifier(ConvHeadNet(), num_classes=10)
    stream = ClassIncrementalStream("digits")
    trainer = fast_trainer(max_epochs=1, reload_dataloaders_every_n_epochs=1, callbacks=[UER(20)])
    with pytest.raises(TypeError, match=r"not an nn.Linear.*must have an nn.Linear classifier head"):
        trainer.fit(module, datamodule=stream)


def _resume_run(tmp_path: Path, ckpt: str | None, method: str) -> tuple[Classifier, ReplayCallback]:
    torch.manual_seed(0)
    module = Classifier(TinyMLP(in_features=64, num_classes=10, hidden=16), optimizer=_sgd)
    replay: ReplayCallback
    if method == "uer":
        replay = UER(25, replay_batch_size=5, mask="seen")
    elif method == "er_ace-balanced":
        replay = ERACE(25, replay_batch_size=5, buffer="balanced")
    else:
        replay = ExperienceReplay(25, replay_batch_size=5)
    callbacks: list[Callback] = [replay, ContinualMetrics(plot=False)]
    if ckpt is None:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}"))
    trainer = fast_trainer(
        max_epochs=2,
        reload_dataloaders_every_n_epochs=1,
        limit_train_batches=12,
        enable_checkpointing=ckpt is None,
        callbacks=callbacks,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=ClassIncrementalStream("digits", num_tasks=5, flatten=True), ckpt_path=ckpt)
    return module, replay


@pytest.mark.slow
@pytest.mark.parametrize("method", ["uer", "er", "er_ace-balanced"])
def test_resume_mid_task_continues_with_the_same_buffer_and_random_state(tmp_path: Path, method: str) -> None:
    full_module, full = _resume_run(tmp_path, None, method)
    # step 15 is inside the second task (12 batches per task)
    ckpt = tmp_path / "step=15.ckpt"
    assert ckpt.exists(), sorted(p.name for p in tmp_path.iterdir())
    state = torch.load(ckpt, weights_only=False)
    assert state["epoch"] == 1
    resumed_module, resumed = _resume_run(tmp_path, str(ckpt), method)
    a, b = full.buffer, resumed.buffer
    assert a.seen == b.seen
    assert a.labels is not None and b.labels is not None and a.inputs is not None and b.inputs is not None
    assert torch.equal(a.labels, b.labels) and torch.equal(a.inputs, b.inputs)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    if isinstance(a, ClassBalancedBuffer):
        assert isinstance(b, ClassBalancedBuffer) and a.class_slots == b.class_slots and a.offered == b.offered
    for got, want in zip(resumed_module.parameters(), full_module.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    if method == "uer":
        assert isinstance(full, UER) and isinstance(resumed, UER)
        assert full.seen_classes is not None and resumed.seen_classes is not None
        assert torch.equal(full.seen_classes, resumed.seen_classes)


# ---------------------------------------------------------------------------------------------
# DDP: per-rank buffers, synchronized metrics, every rank's buffer in the checkpoint


class DumpRankState(Callback):
    """Each rank writes its buffer and accuracy matrix to ``rank<r>.pt`` at the end of fit."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        replay = next(c for c in trainer.callbacks if isinstance(c, UER))  # type: ignore[attr-defined]
        metrics = next(c for c in trainer.callbacks if isinstance(c, ContinualMetrics))  # type: ignore[attr-defined]
        state = replay.buffer.state_dict()
        state["matrix"] = metrics.accuracy_matrix.clone()
        torch.save(state, Path(self.out_dir) / f"rank{trainer.global_rank}.pt")


class RecordWarnings(Callback):
    """Each rank records every warning raised between setup and teardown into ``warnings<r>.txt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._context = warnings.catch_warnings(record=True)
        self._caught = self._context.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._context.__exit__(None, None, None)
        lines = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in self._caught]
        (Path(self.out_dir) / f"warnings{trainer.global_rank}.txt").write_text("\n".join(lines))


@pytest.mark.ddp
def test_ddp_per_rank_buffers_synced_metrics_and_checkpoint(ddp_env: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = Classifier(TinyMLP(in_features=64, num_classes=10, hidden=16), optimizer=_sgd)
    stream = ClassIncrementalStream("digits", num_tasks=5, flatten=True)
    trainer = fast_trainer(
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        limit_train_batches=4,
        reload_dataloaders_every_n_epochs=1,
        enable_checkpointing=True,
        default_root_dir=str(tmp_path),
        callbacks=[
            UER(buffer_size=30, replay_batch_size=5, seed=10),
            ContinualMetrics(plot=False),
            DumpRankState(str(tmp_path)),
            ModelCheckpoint(dirpath=tmp_path, filename="last"),
            RecordWarnings(str(tmp_path)),
        ],
    )
    trainer.fit(module, datamodule=stream)
    # no warning of ContinualMetrics' making: no "use sync_dist=True" for a continual/ key (there
    # were 7 per run) and none raised from lightning_logits (Lightning warns on rank 0 only; both
    # ranks are read). The hub's train/loss_* keys are outside this callback's scope.
    for rank in (0, 1):
        caught = (tmp_path / f"warnings{rank}.txt").read_text().splitlines()
        assert not [w for w in caught if "sync_dist" in w and "'continual/" in w], caught
        assert not [w for w in caught if w.startswith(str(Path(__file__).parent.parent / "lightning_logits"))], caught
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    # per-rank buffers: own seeds, own samples (each rank saw 2 tasks x 4 batches x 10)
    assert [s["seed"] for s in ranks] == [10, 11]
    assert all(s["seen"] == 80 for s in ranks)
    assert not torch.equal(ranks[0]["inputs"], ranks[1]["inputs"])
    stream.setup()  # the main process of ddp_spawn did not set it up
    allowed = set(stream.tasks[0] + stream.tasks[1])
    assert all(set(s["labels"].tolist()) <= allowed for s in ranks)
    # the metrics are summed over ranks: identical matrices, and the last row is the final
    # model's accuracy on every test sample of the seen tasks, computed here in one process
    torch.testing.assert_close(ranks[0]["matrix"], ranks[1]["matrix"], equal_nan=True)
    module.eval()
    with torch.no_grad():
        for j in range(2):
            test_set = stream.task_dataset(j, "test")
            xs, ys = zip(*[test_set[i] for i in range(len(test_set))], strict=True)
            acc = (module(torch.stack(xs)).argmax(1) == torch.stack(ys)).float().mean()
            assert float(ranks[0]["matrix"][1, j]) == pytest.approx(float(acc), abs=1e-6)
    # the checkpoint (written by rank 0) holds both ranks' buffers; each rank gets its own back
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("UER"))["rank_states"]
    assert len(saved) == 2
    for rank in (0, 1):
        assert torch.equal(saved[rank]["labels"], ranks[rank]["labels"])
        restored = UER(buffer_size=30, replay_batch_size=5, seed=10)
        restored._rank, restored._world_size, restored._head = rank, 2, nn.Linear(2, 2)
        restored.load_state_dict(saved and {"rank_states": saved})
        assert restored.buffer.seed == 10 + rank and restored.buffer.seen == 80
        assert torch.equal(restored.buffer.generator.get_state(), ranks[rank]["generator"])


def test_uer_warns_once_about_all_zero_features() -> None:
    torch.manual_seed(0)
    net = TinyMLP()
    with torch.no_grad():
        net.body[0].weight.zero_()
        net.body[0].bias.zero_()  # tanh(0) = 0: every feature row is zero
    module = Classifier(net, optimizer=_sgd)
    x, y = blob_data(n=16)
    with pytest.warns(UserWarning, match="all-zero features"):
        fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[UER(8, replay_batch_size=4)]).fit(
            module, datamodule=TensorDataModule(x, y, batch_size=8)
        )
    assert all(bool(torch.isfinite(p).all()) for p in module.parameters())


# ---------------------------------------------------------------------------------------------
# The class-balanced buffer, the buffer choice, replay-time augmentation


def test_balanced_buffer_evens_out_an_imbalanced_stream() -> None:
    balanced, reservoir = ClassBalancedBuffer(30, seed=1), ReservoirBuffer(30, seed=1)
    stream = [0] * 100 + [1] * 30 + [2] * 10  # class 0 floods the buffer first
    for lo in range(0, len(stream), 10):
        labels = torch.tensor(stream[lo : lo + 10])
        for buffer in (balanced, reservoir):
            buffer.add(labels.float().unsqueeze(1) + 0.5, labels)
    # CBRS by hand: class 1 takes slots from class 0 until both hold 15, class 2 (10 samples) then
    # always evicts from the largest class: 10 / 10 / 10, every sample of class 2 kept
    assert balanced.class_counts() == {0: 10, 1: 10, 2: 10}
    assert balanced.labels is not None and balanced.inputs is not None
    assert torch.bincount(balanced.labels, minlength=3).tolist() == [10, 10, 10]
    assert torch.equal(balanced.inputs[:, 0], balanced.labels.float() + 0.5)  # inputs follow labels
    assert reservoir.labels is not None and int((reservoir.labels == 2).sum()) < 10  # ~2 expected
    assert balanced.seen == 140 and len(balanced) == 30
    # the bookkeeping matches the stored labels slot by slot
    for label, slots in balanced.class_slots.items():
        assert all(int(balanced.labels[s]) == label for s in slots)


def test_balanced_buffer_keeps_a_reservoir_sample_within_a_class() -> None:
    # one class only: the balanced buffer is a reservoir over it (each of 40 kept w.p. 10/40)
    counts = torch.zeros(40)
    for trial in range(600):
        buffer = ClassBalancedBuffer(10, seed=trial)
        for lo in range(0, 40, 10):
            buffer.add(torch.arange(lo, lo + 10).float().unsqueeze(1), torch.zeros(10, dtype=torch.long))
        assert buffer.inputs is not None
        counts[buffer.inputs[:, 0].long()] += 1
    freq = counts / 600
    assert bool(((freq - 0.25).abs() < 0.08).all()), freq  # 4.5 sigma of a binomial(600, 1/4)


def test_balanced_buffer_state_dict_continues_identically() -> None:
    g = torch.Generator().manual_seed(0)
    a = ClassBalancedBuffer(12, seed=5)
    for _ in range(4):
        a.add(torch.randn(6, 2, generator=g), torch.randint(0, 3, (6,), generator=g))
    b = make_buffer("balanced", 12, seed=99)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for _ in range(5):
        x, y = torch.randn(6, 2, generator=g), torch.randint(0, 5, (6,), generator=g)
        a.add(x, y)
        b.add(x, y)
        assert torch.equal(a.sample(4)["input"], b.sample(4)["input"])
    assert a.labels is not None and b.labels is not None and torch.equal(a.labels, b.labels)
    assert a.class_slots == b.class_slots and a.offered == b.offered
    with pytest.raises(ValueError, match="'reservoir' buffer but this one is 'balanced'"):
        ClassBalancedBuffer(12).load_state_dict(ReservoirBuffer(12).state_dict())
    with pytest.raises(ValueError, match="buffer must be one of"):
        make_buffer("fifo", 3)
    with pytest.raises(ValueError, match="int class labels"):
        ClassBalancedBuffer(3).add(torch.randn(2, 2), torch.rand(2))


class AddHundred:
    """A picklable replay-time augmentation that records the batch sizes it saw."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        return x + 100.0


class MaxInput(Callback):
    """Records the largest training input the module's forward received."""

    def __init__(self) -> None:
        self.largest: list[float] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            if torch.is_grad_enabled():
                self.largest.append(float(args[0].max()))

        pl_module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("method", ["er", "er_ace", "uer"])
@pytest.mark.parametrize("kind", ["reservoir", "balanced"])
def test_augment_runs_on_both_batches_and_the_buffer_stores_clean_samples(method: str, kind: str) -> None:
    x, y = blob_data(n=40)
    augment = AddHundred()
    replay = _METHODS[method](16, replay_batch_size=4, buffer=kind, augment=augment)
    seen = MaxInput()
    module = Classifier(TinyMLP(), optimizer=_sgd)
    fast_trainer(max_epochs=1, limit_val_batches=0, callbacks=[replay, seen]).fit(
        module, datamodule=TensorDataModule(x, y, batch_size=8)
    )
    assert type(replay.buffer) is (ClassBalancedBuffer if kind == "balanced" else ReservoirBuffer)
    # 5 incoming batches of 8; a replay batch of 4 on every step but the first (empty buffer)
    assert augment.sizes == [8, 8, 4, 8, 4, 8, 4, 8, 4]
    assert seen.largest and min(seen.largest) > 50  # the model trained on augmented inputs only
    stored = replay.buffer.inputs
    assert stored is not None and float(stored.abs().max()) < 50  # the buffer holds the originals
    originals = {tuple(row.tolist()) for row in x}
    assert all(tuple(row.tolist()) in originals for row in stored)


def test_augment_and_buffer_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="buffer must be one of"):
        ExperienceReplay(10, buffer="fifo")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="augment must be a callable"):
        UER(10, augment=3)  # type: ignore[arg-type]
    er = ERACE(10, buffer="balanced")
    assert isinstance(er.buffer, ClassBalancedBuffer) and er.buffer_kind == "balanced"
    er._rank, er._world_size, er._head = 0, 1, nn.Linear(2, 2)
    with pytest.raises(ValueError, match="resume with buffer='reservoir'"):
        er.load_state_dict({"version": 1, "rank_states": [ReservoirBuffer(10).state_dict()]})


@pytest.mark.ddp
def test_ddp_balanced_buffer_with_augmentation_per_rank(ddp_env: int, tmp_path: Path) -> None:
    module = Classifier(TinyMLP(in_features=64, num_classes=10, hidden=16), optimizer=_sgd)
    trainer = fast_trainer(
        strategy="ddp_spawn",
        devices=2,
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        reload_dataloaders_every_n_epochs=1,
        enable_checkpointing=True,
        default_root_dir=str(tmp_path),
        callbacks=[
            ERACE(buffer_size=12, replay_batch_size=4, seed=3, buffer="balanced", augment=AddHundred()),
            ModelCheckpoint(dirpath=tmp_path, filename="last"),
        ],
    )
    trainer.fit(module, datamodule=ClassIncrementalStream("digits", num_tasks=5, flatten=True))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=False)
    saved = next(v for k, v in ckpt["callbacks"].items() if k.startswith("ERACE"))["rank_states"]
    assert len(saved) == 2 and [s["kind"] for s in saved] == ["balanced", "balanced"]
    assert [s["seed"] for s in saved] == [3, 4] and all(s["seen"] == 2 * 3 * 10 for s in saved)
    assert not torch.equal(saved[0]["inputs"], saved[1]["inputs"])  # each rank buffers its own shard
    for state in saved:
        assert float(state["inputs"].abs().max()) < 50  # un-augmented (digits pixels are at most 16)
        counts = torch.bincount(state["labels"], minlength=10)
        assert int(counts.max() - counts[counts > 0].min()) <= 1  # 4 classes seen: 3 slots each
    # each rank gets its own balanced buffer back
    restored = ERACE(buffer_size=12, replay_batch_size=4, seed=3, buffer="balanced")
    restored._rank, restored._world_size, restored._head = 1, 2, nn.Linear(2, 2)
    restored.load_state_dict({"version": 2, "rank_states": saved})
    assert isinstance(restored.buffer, ClassBalancedBuffer) and restored.buffer.seed == 4
    assert restored.buffer.labels is not None and torch.equal(restored.buffer.labels, saved[1]["labels"])

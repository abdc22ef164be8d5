"""The token-level divergences (forward/reverse KL, generalized JSD, skew KL, TV): hand values, identities, TRL.

The shared mechanics (masks, -100 targets, chunks, extremes, dtypes, gradcheck, validation) are
checked for these losses with every other loss in ``tests/test_distillation_losses.py`` against
float64 restatements of the definitions. Here: values computed by hand on two-class rows, the
identities these divergences satisfy (limits, symmetries, bounds, Pinsker's inequality), and TRL's
own ``GKDTrainer.generalized_jsd_loss`` run side by side on the same random logits.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_logits.functional.distillation import (
    DISTILLATION_LOSSES,
    forward_kl_loss,
    jsd_loss,
    kd_loss,
    reverse_kl_loss,
    skew_kl_loss,
    skew_reverse_kl_loss,
    tv_loss,
)
from tests.test_distillation_losses import LM_NAMES, _data, reference, skew_kl_ref

# --------------------------------------------------------------------------- hand values
# Student logits (0, 0) give P_s = (1/2, 1/2); teacher logits (T log 3, 0) at temperature T give P_t = (3/4, 1/4).
PS, PT = (0.5, 0.5), (0.75, 0.25)


def _kl(p: tuple[float, ...], q: tuple[float, ...]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _mix(w: float, p: tuple[float, ...], q: tuple[float, ...]) -> tuple[float, ...]:
    return tuple(w * a + (1 - w) * b for a, b in zip(p, q, strict=True))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_hand_values_on_two_classes(temperature: float) -> None:
    s = torch.tensor([[0.0, 0.0]], dtype=torch.float64)  # float64 stays float64: checks the formula exactly
    t = torch.tensor([[temperature * math.log(3.0), 0.0]], dtype=torch.float64)
    m = _mix(0.5, PT, PS)  # (5/8, 3/8)
    want = {
        "forward_kl": 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5),
        "reverse_kl": 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25),
        "jsd": 0.5 * _kl(PT, m) + 0.5 * _kl(PS, m),
        "skew_kl": 0.75 * math.log(0.75 / 0.525) + 0.25 * math.log(0.25 / 0.475),  # M = 0.1 P_t + 0.9 P_s
        "skew_reverse_kl": 0.5 * math.log(0.5 / 0.725) + 0.5 * math.log(0.5 / 0.275),  # M = 0.1 P_s + 0.9 P_t
        "tv": 0.25,
    }
    assert set(want) == set(LM_NAMES)
    for name, value in want.items():
        got = DISTILLATION_LOSSES[name](s, t, temperature=temperature)
        assert got.item() == pytest.approx(value, rel=1e-12), name
        assert DISTILLATION_LOSSES[name](s.float(), t.float(), temperature=temperature).item() == pytest.approx(
            value, rel=1e-5
        ), name
    # the generalized JSD at beta = 0.9: the mixture leans to the teacher
    m9 = _mix(0.9, PT, PS)
    want9 = 0.9 * _kl(PT, m9) + 0.1 * _kl(PS, m9)
    assert jsd_loss(s, t, temperature=temperature, beta=0.9).item() == pytest.approx(want9, rel=1e-12)


def test_disjoint_supports_reach_the_bounds() -> None:
    # P_s and P_t put (almost) all their mass on different tokens
    s, t = torch.tensor([[40.0, 0.0, 0.0]]), torch.tensor([[0.0, 40.0, 0.0]])
    assert tv_loss(s, t).item() == pytest.approx(1.0, abs=1e-6)
    assert jsd_loss(s, t).item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert forward_kl_loss(s, t).item() == pytest.approx(40.0, rel=1e-4)  # log(P_t / P_s) at the teacher's token
    # the skew keeps the divergence below -log(alpha) however small the student's mass gets
    for alpha in (0.1, 0.3):
        value = skew_kl_loss(s, t, alpha=alpha).item()
        assert value == pytest.approx(-math.log(alpha), rel=1e-5) and value <= -math.log(alpha) + 1e-6


# --------------------------------------------------------------------------- identities
def test_equal_distributions_give_zero_for_every_divergence() -> None:
    s, _, _ = _data((3, 4, 11), seed=1)
    for name in LM_NAMES:
        fn = DISTILLATION_LOSSES[name]
        assert fn(s, s).item() == pytest.approx(0.0, abs=1e-6), name
        assert fn(s + 7.5, s).item() == pytest.approx(0.0, abs=1e-5), name  # a shift leaves the softmax
        assert fn(s, s, temperature=3.0).item() == pytest.approx(0.0, abs=1e-6), name


def test_jsd_end_points_limits_and_symmetry() -> None:
    s, t, _ = _data((5, 13), seed=2)
    s, t = s.double(), t.double()
    forward, reverse = forward_kl_loss(s, t), reverse_kl_loss(s, t)
    # TRL's end points
    torch.testing.assert_close(jsd_loss(s, t, beta=0.0), forward)
    torch.testing.assert_close(jsd_loss(s, t, beta=1.0), reverse)
    # the formula's limits: JSD_beta / beta -> KL(P_t || P_s), JSD_beta / (1 - beta) -> KL(P_s || P_t)
    # (the gap closes once beta is small against min P_s / P_t: slowly for these peaked rows)
    gaps = []
    for eps in (1e-2, 1e-4, 1e-6, 1e-8):
        low = (jsd_loss(s, t, beta=eps) / eps).item()
        high = (jsd_loss(s, t, beta=1 - eps) / eps).item()
        gaps.append((abs(low / forward.item() - 1), abs(high / reverse.item() - 1)))
    assert all(a[0] > b[0] and a[1] > b[1] for a, b in itertools.pairwise(gaps)), gaps
    assert max(gaps[-1]) < 1e-4, gaps
    # swapping student and teacher swaps beta and 1 - beta; beta = 0.5 is symmetric
    for beta in (0.1, 0.5, 0.8):
        torch.testing.assert_close(jsd_loss(t, s, beta=1 - beta), jsd_loss(s, t, beta=beta))
    # reverse KL is forward KL with the roles swapped; skew reverse likewise
    torch.testing.assert_close(reverse_kl_loss(s, t), forward_kl_loss(t, s))
    torch.testing.assert_close(skew_reverse_kl_loss(s, t, alpha=0.2), skew_kl_loss(t, s, alpha=0.2))


def test_skew_end_points_and_kd_relation() -> None:
    s, t, _ = _data((4, 9), seed=3)
    torch.testing.assert_close(skew_kl_loss(s, t, alpha=0.0), forward_kl_loss(s, t))
    torch.testing.assert_close(skew_reverse_kl_loss(s, t, alpha=0.0), reverse_kl_loss(s, t))
    assert skew_kl_loss(s, t, alpha=1.0).item() == 0.0 and skew_reverse_kl_loss(s, t, alpha=1.0).item() == 0.0
    # more skew, less divergence (the mixture moves toward the first argument)
    values = [skew_kl_loss(s, t, alpha=a).item() for a in (0.0, 0.1, 0.5, 0.9)]
    assert values == sorted(values, reverse=True)
    # Hinton's KD is the forward KL times T^2
    for temperature in (1.0, 2.0, 4.0):
        torch.testing.assert_close(
            kd_loss(s, t, temperature=temperature), forward_kl_loss(s, t, temperature=temperature) * temperature**2
        )


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4),
    vocab=st.integers(2, 40),
    scale=st.floats(0.01, 60.0),
    seed=st.integers(0, 10_000),
    beta=st.floats(0.0, 1.0),
    temperature=st.floats(0.25, 4.0),
)
def test_bounds_on_random_rows(rows: int, vocab: int, scale: float, seed: int, beta: float, temperature: float) -> None:
    s, t, _ = _data((rows, vocab), scale=scale, seed=seed)
    s, t = s.double(), t.double()
    for i in range(rows):  # per position, not only on the mean
        a, b = s[i : i + 1], t[i : i + 1]
        forward, reverse = forward_kl_loss(a, b, temperature).item(), reverse_kl_loss(a, b, temperature).item()
        tv = tv_loss(a, b, temperature).item()
        jsd = jsd_loss(a, b, temperature, beta=beta).item()
        assert forward >= -1e-12 and reverse >= -1e-12 and jsd >= -1e-12
        assert -1e-12 <= tv <= 1 + 1e-12
        assert tv == pytest.approx(tv_loss(b, a, temperature).item(), abs=1e-12)  # symmetric
        assert tv <= math.sqrt(max(forward, 0) / 2) + 1e-9 and tv <= math.sqrt(max(reverse, 0) / 2) + 1e-9  # Pinsker
        assert jsd_loss(a, b, temperature).item() <= math.log(2.0) + 1e-12
        # JSD_beta <= beta (1 - beta) (KL(P_t||P_s) + KL(P_s||P_t)) by convexity of KL in its second argument
        if 0.0 < beta < 1.0:
            assert jsd <= beta * (1 - beta) * (forward + reverse) + 1e-9


# --------------------------------------------------------------------------- masked tokens (-inf logits)
@pytest.mark.parametrize("name", LM_NAMES)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_a_token_masked_on_both_sides_is_as_if_its_column_were_absent(name: str, chunk_size: int | None) -> None:
    s, t, y = _data((2, 4, 9), seed=5)
    keep = torch.ones(9, dtype=torch.bool)
    keep[[2, 7]] = False  # two vocabulary entries masked by both models
    y[0, 1] = -100
    masked_s = s.masked_fill(~keep, -math.inf).requires_grad_()
    masked_t = t.masked_fill(~keep, -math.inf)
    fn = DISTILLATION_LOSSES[name]
    value = fn(masked_s, masked_t, temperature=2.0, target=y, chunk_size=chunk_size)  # validation passes -inf
    narrow_s = s[..., keep].clone().requires_grad_()
    want = fn(narrow_s, t[..., keep], temperature=2.0, target=y)
    torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-7)
    (grad,) = torch.autograd.grad(value, masked_s)
    (want_grad,) = torch.autograd.grad(want, narrow_s)
    assert torch.isfinite(grad).all() and (grad[..., ~keep] == 0).all()
    torch.testing.assert_close(grad[..., keep], want_grad, rtol=1e-5, atol=1e-7)


def test_a_token_masked_on_one_side_follows_the_definitions() -> None:
    s, t, _ = _data((3, 6), seed=6)
    t_masked = t.clone()
    t_masked[:, 4] = -math.inf  # the teacher forbids token 4, the student does not
    a, b = s.double(), t_masked.double()
    # P_t(4) = 0: forward KL, JSD, skew KL and TV stay finite and match the restatements
    forward = skew_kl_ref(a.numpy(), b.numpy(), 1.0, 0.0)  # alpha = 0: KL(P_t || P_s) in probability space
    assert forward_kl_loss(s, t_masked).item() == pytest.approx(forward, rel=1e-5)
    for name in ("jsd", "skew_kl", "skew_reverse_kl", "tv"):
        got = DISTILLATION_LOSSES[name](s, t_masked)
        assert torch.isfinite(got) and got.item() == pytest.approx(reference(name, a, b, torch.zeros(3), 1.0), rel=1e-5)
    # the reverse KL divides by P_t(4) = 0 where the student puts mass: +inf, as the definition says
    assert reverse_kl_loss(s, t_masked).item() == math.inf
    # skew KL with the student masking what the teacher allows stays bounded by -log(alpha)
    s_masked = s.clone()
    s_masked[:, 0] = -math.inf
    assert forward_kl_loss(s_masked, t).item() == math.inf
    assert skew_kl_loss(s_masked, t, alpha=0.1).item() <= -math.log(0.1)
    # alpha = 1 (no divergence left) stays 0 with masked tokens, also chunked, with a zero gradient
    for fn in (skew_kl_loss, skew_reverse_kl_loss):
        x = s_masked.clone().requires_grad_()
        value = fn(x, t_masked, alpha=1.0, chunk_size=2)
        (grad,) = torch.autograd.grad(value, x)
        assert value.item() == 0.0 and (grad == 0).all()


def test_nan_plus_inf_and_fully_masked_rows_are_still_errors() -> None:
    s, t, _ = _data((2, 5), seed=7)
    for bad_value in (math.nan, math.inf):
        bad = t.clone()
        bad[1, 3] = bad_value
        with pytest.raises(ValueError, match="-inf marks a masked token"):
            jsd_loss(s, bad)
    empty = t.clone()
    empty[0] = -math.inf
    with pytest.raises(ValueError, match="non-finite value"):
        tv_loss(s, empty)
    with pytest.raises(ValueError, match="non-finite value"):  # kd keeps refusing any non-finite logit
        kd_loss(s, t.masked_fill(torch.arange(5) == 2, -math.inf))


# --------------------------------------------------------------------------- TRL side by side
@pytest.fixture(scope="module")
def trl_jsd():  # type: ignore[no-untyped-def]
    gkd = pytest.importorskip(
        "trl.experimental.gkd", reason="TRL is not installed: pip install -e '.[dev]' (trl>=1.0) to compare with it"
    )
    return gkd.GKDTrainer.generalized_jsd_loss


def _sequences(dtype: torch.dtype, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    s, t, labels = _data((3, 7, 50), scale=3.0, seed=seed)
    labels[0, :2] = -100
    labels[2, 5:] = -100
    return s.to(dtype), t.to(dtype), labels


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_equals_trl_on_token_logits_values_and_gradients(trl_jsd, beta: float, temperature: float) -> None:  # type: ignore[no-untyped-def]
    s, t, labels = _sequences(torch.float64)
    ours_in = s.clone().requires_grad_()
    trl_in = s.clone().requires_grad_()
    ours = jsd_loss(ours_in, t, temperature, beta=beta, target=labels)
    theirs = trl_jsd(trl_in, t, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_in.grad, trl_in.grad, rtol=1e-9, atol=1e-12)
    # float32 (our float32 inside, theirs in the input dtype), and the named end points
    s32, t32 = s.float(), t.float()
    theirs32 = trl_jsd(s32, t32, labels=labels, beta=beta, temperature=temperature)
    torch.testing.assert_close(
        jsd_loss(s32, t32, temperature, beta=beta, target=labels), theirs32, rtol=1e-5, atol=1e-6
    )
    if beta in (0.0, 1.0):
        named = forward_kl_loss if beta == 0.0 else reverse_kl_loss
        torch.testing.assert_close(named(s, t, temperature, target=labels), theirs, rtol=1e-10, atol=1e-12)


def test_jsd_equals_trl_on_flat_rows_and_with_a_mask(trl_jsd) -> None:  # type: ignore[no-untyped-def]
    s, t, labels = _sequences(torch.float64, seed=4)
    # [N, V] rows without labels: TRL's batchmean divides by N, our mean over the positions
    flat_s, flat_t = s.reshape(-1, 50), t.reshape(-1, 50)
    torch.testing.assert_close(
        jsd_loss(flat_s, flat_t, beta=0.3), trl_jsd(flat_s, flat_t, beta=0.3), rtol=1e-10, atol=0
    )
    # our bool mask selects the same tokens as TRL's labels != -100
    mask = labels != -100
    torch.testing.assert_close(jsd_loss(s, t, mask=mask), trl_jsd(s, t, labels=labels), rtol=1e-10, atol=0)

"""classification_loss against a float64 restatement of cross-entropy."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_logits.functional import classification_loss


def reference_ce(logits: torch.Tensor, probs: torch.Tensor, smoothing: float) -> float:
    """Cross-entropy written out per element in float64 with a max-shifted log-sum-exp."""
    n, c = logits.shape
    total = 0.0
    for i in range(n):
        row = [float(v) for v in logits[i]]
        top = max(row)
        lse = top + math.log(sum(math.exp(v - top) for v in row))
        for j in range(c):
            q = (1 - smoothing) * float(probs[i, j]) + smoothing / c
            total -= q * (row[j] - lse)
    return total / n


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(2, 7),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e4]),
    smoothing=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 10_000),
)
def test_matches_reference_for_hard_and_soft_targets(n: int, c: int, scale: float, smoothing: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * scale
    hard = torch.randint(0, c, (n,), generator=g)
    soft = torch.softmax(torch.randn(n, c, generator=g), dim=1)
    onehot = torch.nn.functional.one_hot(hard, c).double()
    got_hard = classification_loss(logits, hard, label_smoothing=smoothing)
    got_soft = classification_loss(logits, soft, label_smoothing=smoothing)
    assert torch.isfinite(got_hard) and torch.isfinite(got_soft)
    assert got_hard.item() == pytest.approx(reference_ce(logits, onehot, smoothing), rel=1e-4, abs=1e-4)
    assert got_soft.item() == pytest.approx(reference_ce(logits, soft, smoothing), rel=1e-4, abs=1e-4)


def test_half_precision_input_is_computed_in_float32_and_returned_in_input_dtype() -> None:
    logits = torch.tensor([[60000.0, -60000.0], [0.0, 1.0]], dtype=torch.float16)
    loss = classification_loss(logits, torch.tensor([1, 1]))
    assert loss.dtype == torch.float16
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("logits", "target", "message"),
    [
        (torch.zeros(4), torch.zeros(4, dtype=torch.long), r"shape \[N, C\]"),
        (torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), "at least 2 classes"),
        (torch.tensor([[0.0, float("nan")]]), torch.tensor([0]), "non-finite"),
        (torch.zeros(2, 3), torch.tensor([0, 3]), r"labels in \[0, 3\].*3 classes"),
        (torch.zeros(2, 3), torch.tensor([0, 1, 2]), r"shape \[N\] = \[2\]"),
        (torch.zeros(2, 3), torch.zeros(2, 4), r"soft target must have shape"),
    ],
)
def test_bad_input_names_the_problem(logits: torch.Tensor, target: torch.Tensor, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        classification_loss(logits, target)

"""USKD: the functional loss against a pure-Python restatement, and the callback in real Trainers."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from lightning_logits.callbacks.uskd import USKD
from lightning_logits.functional.uskd import (
    uskd_loss,
    uskd_soft_target_weight,
    uskd_target_classes,
    uskd_zipf_labels,
)
from lightning_logits.loss_terms import StepContext
from lightning_logits.modules.classifier import Classifier
from lightning_logits.networks.features import default_feature_layer, pool_feature
from lightning_logits.networks.heads import aux_modules
from tests.helpers import TensorDataModule, TinyMLP, TinyNet, blob_data, fast_trainer

# ----------------------------------------------------------------------------------------------
# An independent restatement of the method notes, element by element, in Python floats (float64).


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    total = sum(e)
    return [x / total for x in e]


def _log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _targets(target: list, c: int) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
    """Per row: target classes, their values and the full target distribution Y."""
    labels, values, full = [], [], []
    for row in target:
        if isinstance(row, int):
            labels.append([row])
            values.append([1.0])
            full.append([1.0 if j == row else 0.0 for j in range(c)])
        else:
            order = sorted(range(c), key=lambda j: (-row[j], j))[:2]
            labels.append(order)
            values.append([row[j] for j in order])
            full.append(list(row))
    return labels, values, full


def reference_parts(s: list, u: list, target: list, rank_by: str = "log_prob") -> dict[str, object]:
    n, c = len(s), len(s[0])
    labels, values, full = _targets(target, c)
    p = [_softmax(r) for r in s]
    logp = [_log_softmax(r) for r in s]
    w = [_softmax(r) for r in u]
    logw = [_log_softmax(r) for r in u]
    k_count = len(labels[0])
    # 1. soft target weight with the batch mean of p^2 per target slot k
    means = [sum(p[m][labels[m][k]] ** 2 for m in range(n)) / n for k in range(k_count)]
    pt = [
        [0.0 if values[i][k] == 0 else p[i][labels[i][k]] ** 2 + values[i][k] - means[k] for k in range(k_count)]
        for i in range(n)
    ]
    loss_t = -sum(pt[i][k] * logp[i][labels[i][k]] for i in range(n) for k in range(k_count)) / n
    # 2. weak head, label smoothing 0.1
    loss_weak_unit = -sum((0.9 * full[i][j] + 0.1 / c) * logw[i][j] for i in range(n) for j in range(c)) / n
    # 3. Zipf labels of the non-target classes
    zipf_rows = []
    loss_non = 0.0
    for i in range(n):
        q = logp[i] if rank_by == "log_prob" else p[i]
        wt = sum(w[i][y] for y in labels[i])
        qt = sum(q[y] for y in labels[i])
        score = [w[i][j] / (1 - wt + 1e-6) + q[j] / (1 - qt + 1e-6) for j in range(c)]
        order = sorted(range(c), key=lambda j: (-score[j], j))
        position = {cls: r for r, cls in enumerate(order)}
        rest = [j for j in range(c) if j not in labels[i]]
        raw = [1.0 / (position[j] + 1) for j in rest]
        zipf = [z / sum(raw) for z in raw]
        zipf_rows.append(zipf)
        log_rest = _log_softmax([s[i][j] for j in rest]) if rest else []
        loss_non -= sum(z * lr for z, lr in zip(zipf, log_rest, strict=True))
    loss_non /= n
    return {"pt": pt, "loss_t": loss_t, "loss_weak_unit": loss_weak_unit, "loss_non": loss_non, "zipf": zipf_rows}


def reference_uskd(s, u, target, alpha=1.0, beta=0.1, mu=0.005, rank_by="log_prob") -> float:
    parts = reference_parts(s, u, target, rank_by)
    return alpha * parts["loss_t"] + beta * parts["loss_non"] + mu * parts["loss_weak_unit"]  # type: ignore[operator]


def _as_list_target(target: Tensor) -> list:
    return [int(t) for t in target] if not target.is_floating_point() else target.double().tolist()


def _random_case(n: int, c: int, soft: bool, seed: int, scale: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    u = torch.randn(n, c, generator=g, dtype=torch.float64) * scale
    if soft:
        # mixup-like: two classes mixed with lam, plus label smoothing
        a, b = torch.randint(0, c, (n,), generator=g), torch.randint(0, c, (n,), generator=g)
        lam = torch.rand(n, 1, generator=g, dtype=torch.float64)
        target = 0.1 / c + 0.9 * (lam * torch.eye(c, dtype=torch.float64)[a] + (1 - lam) * torch.eye(c)[b])
    else:
        target = torch.randint(0, c, (n,), generator=g)
    return s, u, target


# ----------------------------------------------------------------------------------------------
# The functional core


def test_hand_computed_two_class_case() -> None:
    # C = 2, one sample, hard label 0: pt = v = 1 (N = 1), the single non-target class gets Zipf
    # label 1 and log_softmax over one logit is 0, so L_non = 0.
    s = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    u = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    loss = uskd_loss(s, u, torch.tensor([0]), alpha=1.0, beta=0.1, mu=0.5)
    log_p0 = 1.0 - math.log(math.exp(1.0) + 1.0)
    weak = -0.5 * ((0.9 + 0.05) * math.log(0.5) + 0.05 * math.log(0.5))
    assert loss.item() == pytest.approx(-log_p0 + weak, abs=1e-12)


def test_docstring_value_matches_reference() -> None:
    s = [[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
    u = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    want = reference_uskd(s, u, [0, 1])
    got = uskd_loss(torch.tensor(s), torch.tensor(u), torch.tensor([0, 1])).item()
    assert got == pytest.approx(want, abs=1e-6)
    assert round(want, 4) == 0.4002


@pytest.mark.parametrize("rank_by", ["log_prob", "prob"])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(("n", "c"), [(1, 2), (1, 5), (2, 2), (3, 3), (8, 10), (16, 100), (5, 1000)])
def test_matches_reference(n: int, c: int, soft: bool, rank_by: str) -> None:
    s, u, target = _random_case(n, c, soft, seed=n * 1000 + c)
    alpha, beta, mu = 0.7, 0.3, 0.2
    want = reference_uskd(s.tolist(), u.tolist(), _as_list_target(target), alpha, beta, mu, rank_by)
    got = uskd_loss(s, u, target, alpha=alpha, beta=beta, mu=mu, rank_by=rank_by)
    assert got.dtype == torch.float64
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    c=st.integers(2, 12),
    soft=st.booleans(),
    rank_by=st.sampled_from(["log_prob", "prob"]),
    scale=st.sampled_from([0.0, 1e-3, 1.0, 10.0, 100.0]),
    integer_logits=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_matches_reference_hypothesis(
    n: int, c: int, soft: bool, rank_by: str, scale: float, integer_logits: bool, seed: int
) -> None:
    s, u, target = _random_case(n, c, soft, seed, scale)
    if integer_logits:  # exact ties in the ranking: both sides put the lower class index first
        s, u = s.round(), u.round()
    parts = reference_parts(s.tolist(), u.tolist(), _as_list_target(target), rank_by)
    labels, values = uskd_target_classes(target, c)
    pt = uskd_soft_target_weight(s.softmax(1), labels, values)
    torch.testing.assert_close(pt, torch.tensor(parts["pt"], dtype=torch.float64))
    zipf = uskd_zipf_labels(s, u, labels, rank_by)
    torch.testing.assert_close(zipf, torch.tensor(parts["zipf"], dtype=torch.float64).reshape(zipf.shape))
    want = parts["loss_t"] + 0.1 * parts["loss_non"] + 0.005 * parts["loss_weak_unit"]  # type: ignore[operator]
    assert uskd_loss(s, u, target, rank_by=rank_by).item() == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_target_classes_hard_and_soft() -> None:
    labels, values = uskd_target_classes(torch.tensor([2, 0]), 3)
    assert labels.tolist() == [[2], [0]] and values.tolist() == [[1.0], [1.0]]
    # ties (label smoothing) resolve to the lower class index
    soft = torch.tensor([[0.1, 0.1, 0.8], [0.45, 0.1, 0.45]])
    labels, values = uskd_target_classes(soft, 3)
    assert labels.tolist() == [[2, 0], [0, 2]]
    torch.testing.assert_close(values, torch.tensor([[0.8, 0.1], [0.45, 0.45]]))


def test_soft_target_weight_zero_value_and_single_sample() -> None:
    probs = torch.tensor([[0.7, 0.2, 0.1]])
    weight = uskd_soft_target_weight(probs, torch.tensor([[0, 1]]), torch.tensor([[1.0, 0.0]]))
    assert weight.tolist() == [[1.0, 0.0]]  # N = 1: pt = v; v = 0 gives 0


def test_zipf_labels_hand_case() -> None:
    # With the weak head uniform, the ranking is the student's: class 3 > 1 > 2 > 0; target 1.
    s = torch.tensor([[0.0, 2.0, 1.0, 3.0]])
    z = uskd_zipf_labels(s, torch.zeros(1, 4), torch.tensor([[1]]))
    raw = torch.tensor([1 / 4, 1 / 3, 1 / 1])  # classes 0, 2, 3 at positions 3, 2, 0
    torch.testing.assert_close(z, (raw / raw.sum()).unsqueeze(0))


def test_rank_by_prob_can_differ_from_log_prob() -> None:
    # The student prefers class 2 over 1 by one logit, the weak head class 1 by two. With
    # log-probabilities the student's gap (~1 / 1.03) beats the weak head's (~0.69); with
    # probabilities the student's gap (~0.35 after dividing by 1 - p_t) does not.
    s = torch.tensor([[5.0, 0.0, 1.0, 0.0]])
    u = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    labels = torch.tensor([[0]])
    raw = torch.tensor([1 / 3, 1 / 2, 1 / 4])  # positions 2, 1, 3 for classes 1, 2, 3
    torch.testing.assert_close(uskd_zipf_labels(s, u, labels, "log_prob")[0], raw / raw.sum())
    raw = torch.tensor([1 / 2, 1 / 3, 1 / 4])
    torch.testing.assert_close(uskd_zipf_labels(s, u, labels, "prob")[0], raw / raw.sum())


def test_gradients_flow_only_through_log_probabilities() -> None:
    # Detached pt, Zipf labels and ranking give closed-form gradients:
    #   L_t:    d/ds_n = -(1/N) sum_k pt_nk (e_{y_nk} - p_n)
    #   L_non:  d/ds_n[rest] = -(1/N) (zipf_n - softmax(s_n[rest])), 0 on the target
    #   L_weak: d/du_n = -(mu/N) (smoothed_n - softmax(u_n)), and nothing reaches s
    n, c = 6, 7
    s, u, target = _random_case(n, c, soft=False, seed=3)
    s.requires_grad_(True)
    u.requires_grad_(True)
    labels, values = uskd_target_classes(target, c)
    p = s.detach().softmax(1)
    onehot = torch.nn.functional.one_hot(target, c).double()

    (g_s,) = torch.autograd.grad(uskd_loss(s, u, target, alpha=1.0, beta=0.0, mu=0.0), s)
    pt = uskd_soft_target_weight(p, labels, values)
    torch.testing.assert_close(g_s, -(pt * (onehot - p)) / n)

    g_s, g_u = torch.autograd.grad(uskd_loss(s, u, target, alpha=0.0, beta=1.0, mu=0.0), (s, u), allow_unused=True)
    assert g_u is None or torch.count_nonzero(g_u) == 0
    zipf = uskd_zipf_labels(s.detach(), u.detach(), labels)
    rest = ~onehot.bool()
    s_rest = s.detach()[rest].reshape(n, c - 1)
    want = torch.zeros(n, c, dtype=torch.float64)
    want[rest] = (-(zipf - s_rest.softmax(1)) / n).flatten()
    torch.testing.assert_close(g_s, want)

    g_s, g_u = torch.autograd.grad(uskd_loss(s, u, target, alpha=0.0, beta=0.0, mu=0.3), (s, u), allow_unused=True)
    assert g_s is None or torch.count_nonzero(g_s) == 0
    smoothed = 0.9 * onehot + 0.1 / c
    torch.testing.assert_close(g_u, -0.3 * (smoothed - u.detach().softmax(1)) / n)


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("rank_by", ["log_prob", "prob"])
def test_finite_for_extreme_logits(soft: bool, rank_by: str) -> None:
    s, u, target = _random_case(16, 10, soft, seed=1)
    for scale in (1e-8, 1.0, 1e3, 1e4):
        sf = (s / s.abs().max() * scale).float().requires_grad_(True)
        uf = (u / u.abs().max() * scale).float().requires_grad_(True)
        loss = uskd_loss(sf, uf, target.float() if soft else target, rank_by=rank_by)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(sf.grad).all() and torch.isfinite(uf.grad).all()  # type: ignore[arg-type]
    # and the value at 1e4 still agrees with the float64 reference
    big_s, big_u = s / s.abs().max() * 1e4, u / u.abs().max() * 1e4
    want = reference_uskd(big_s.tolist(), big_u.tolist(), _as_list_target(target), rank_by=rank_by)
    assert uskd_loss(big_s, big_u, target, rank_by=rank_by).item() == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype: torch.dtype) -> None:
    s, u, target = _random_case(8, 10, soft=False, seed=2)
    s_half, u_half = s.to(dtype), u.to(dtype)
    loss = uskd_loss(s_half, u_half, target)
    assert loss.dtype == dtype
    want = uskd_loss(s_half.float(), u_half.float(), target)
    assert loss.float().item() == pytest.approx(want.item(), rel=1e-2)


def test_soft_targets_with_two_classes_have_no_non_target_term() -> None:
    s = torch.tensor([[1.0, -1.0], [0.5, 0.0]], dtype=torch.float64)
    target = torch.tensor([[0.7, 0.3], [0.4, 0.6]], dtype=torch.float64)
    with_beta = uskd_loss(s, s, target, beta=5.0)
    without = uskd_loss(s, s, target, beta=0.0)
    assert torch.isfinite(with_beta) and with_beta.item() == pytest.approx(without.item())


def test_one_hot_soft_target_equals_hard_target_in_target_and_weak_terms() -> None:
    # A one-hot float target has a second "target" of value 0: its pt is 0, so L_t and L_weak
    # equal the hard-label ones (L_non differs: that class leaves the non-target set).
    s, u, target = _random_case(5, 6, soft=False, seed=4)
    onehot = torch.nn.functional.one_hot(target, 6).double()
    hard = uskd_loss(s, u, target, beta=0.0)
    soft = uskd_loss(s, u, onehot, beta=0.0)
    assert soft.item() == pytest.approx(hard.item(), rel=1e-12)


@pytest.mark.parametrize(
    ("logits", "weak", "target", "kwargs", "match"),
    [
        (torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.long), {}, r"shape \[N, C\]"),
        (torch.zeros(4, 3), torch.zeros(4, 5), torch.zeros(4, dtype=torch.long), {}, "weak_logits has shape"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), {}, r"labels must lie in \[0, 2\]"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(3, dtype=torch.long), {}, r"shape \[N\] = \[4\]"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, 2), {}, r"soft target must have shape"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {"rank_by": "rank"}, "rank_by"),
        (torch.zeros(4, 3), torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), {"mu": math.nan}, "mu must be"),
        (torch.full((2, 3), math.inf), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), {}, "non-finite"),
        (torch.zeros(2, 3), torch.zeros(2, 3), torch.full((2, 3), math.nan), {}, "soft target contains"),
    ],
)
def test_clear_errors(logits: Tensor, weak: Tensor, target: Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        uskd_loss(logits, weak, target, **kwargs)


# ----------------------------------------------------------------------------------------------
# The callback: finding the layer, building the head


def _sgd(params):  # module-level so ddp_spawn can pickle it
    return torch.optim.SGD(params, lr=0.1)


def _sgd_momentum(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


class UserModule(pl.LightningModule):
    """A user's own module: a TinyNet under ``net``, a bare loss tensor from training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = TinyNet(num_classes=10)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordingUSKD(USKD):
    """USKD that records what each step saw (module-level: picklable)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seen: list[dict[str, Tensor]] = []

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        self.seen.append({"target": context.target.detach().clone(), "value": value.detach().clone()})
        return value


def _image_data(n: int = 32, size: int = 8, num_classes: int = 10, seed: int = 0) -> TensorDataModule:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    y = torch.arange(n) % num_classes
    return TensorDataModule(x, y, batch_size=8)


@pytest.mark.parametrize(
    ("model", "kwargs", "name", "pool", "channels"),
    [
        ("resnet18", {"in_chans": 1}, "model.layer3", None, 256),  # None: pooled by the output's rank
        ("vit_tiny_patch16_224", {"in_chans": 1, "img_size": 32, "patch_size": 4}, "model.blocks.5", "cls", 192),
        ("mobilenetv2_100", {}, "model.blocks.6", None, 320),  # a conv head follows the last stage
    ],
)
def test_default_layer_for_timm_models(model: str, kwargs: dict, name: str, pool: str | None, channels: int) -> None:
    layer = default_feature_layer(Classifier(model, num_classes=10, **kwargs))
    assert (layer.name, layer.pool, layer.channels) == (name, pool, channels)


def test_default_layer_for_torchvision_resnet_and_error_for_unknown_models() -> None:
    import torchvision

    layer = default_feature_layer(Classifier(torchvision.models.resnet18(num_classes=10)))
    assert layer.name == "model.layer3"
    with pytest.raises(LookupError, match=r"no default intermediate feature layer in Classifier.*feature_layer="):
        default_feature_layer(Classifier(TinyNet()))


def test_feature_layer_override_resolves_against_module_then_network() -> None:
    module = Classifier("resnet18", num_classes=10, in_chans=1)
    for path in ("model.layer2", "layer2"):
        layer = USKD(feature_layer=path).resolve_layer(module)
        assert (layer.name, layer.pool, layer.channels) == ("model.layer2", None, 128)
    with pytest.raises(LookupError, match=r"feature_layer='layer9' was not found.*its modules are: .*layer1"):
        USKD(feature_layer="layer9").resolve_layer(module)


def test_dry_run_measures_width_and_leaves_the_model_as_it_was() -> None:
    module = UserModule()
    module.example_input_array = torch.randn(4, 1, 8, 8)
    module.train()
    bn = module.net.features[1]
    before = (bn.running_mean.clone(), int(bn.num_batches_tracked))
    callback = USKD(feature_layer="features.2")  # relative to the network that holds the head
    head = callback.build_head(fast_trainer(), module)
    assert callback._layer is not None and callback._layer.name == "net.features.2"
    assert (head.in_features, head.out_features) == (8, 10)
    assert module.training and bn.training
    assert torch.equal(bn.running_mean, before[0]) and int(bn.num_batches_tracked) == before[1]
    assert aux_modules(module)["uskd"] is head
    assert callback.build_head(fast_trainer(), module) is head  # reused, not re-initialized


class _Quantize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return (x * 4).long()


class _ToFloat(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.float()


def test_unpoolable_layer_error_says_what_was_found() -> None:
    module = Classifier(nn.Sequential(nn.Flatten(), _Quantize(), _ToFloat(), nn.Linear(64, 10)))
    module.example_input_array = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"cannot pool the output of 'model.1'.*shape \(2, 64\) and dtype torch.int64"):
        USKD(feature_layer="1").build_head(fast_trainer(), module)
    # a declared pooling that does not fit the output's rank is named too
    with pytest.raises(ValueError, match=r"expected a 4-D output from 'x' \(nchw pooling\) but got shape \(2, 5\)"):
        pool_feature(torch.zeros(2, 5, 1)[..., 0], "nchw", layer="x")
    torch.testing.assert_close(pool_feature(torch.ones(2, 3, 3, 7), "nhwc"), torch.ones(2, 7))
    torch.testing.assert_close(
        pool_feature(torch.arange(6.0).reshape(1, 3, 2), "tokens", 1), torch.tensor([[3.0, 4.0]])
    )


# ----------------------------------------------------------------------------------------------
# The callback in real Trainers


def _manual_uskd_sgd(
    net: nn.Module, head: nn.Linear, x: Tensor, y: Tensor, steps: int, batch: int, ranks: int = 1, **kw: Any
) -> None:
    """Plain-PyTorch training: CE + USKD, each rank's loss on its interleaved share of the batch."""
    opt = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.1)
    for i in range(steps):
        xb, yb = x[i * batch : (i + 1) * batch], y[i * batch : (i + 1) * batch]
        loss = torch.zeros(())
        for r in range(ranks):  # DDP averages the ranks' gradients
            xr, yr = xb[r::ranks], yb[r::ranks]
            logits = net(xr)
            weak = head(net.body(xr))
            loss = loss + (F.cross_entropy(logits, yr) + uskd_loss(logits, weak, yr, **kw)) / ranks
        opt.zero_grad()
        loss.backward()
        opt.step()


def _mlp_with_head(seed: int = 0) -> tuple[Classifier, nn.Linear]:
    torch.manual_seed(seed)
    module = Classifier(TinyMLP(), optimizer=_sgd)
    head = nn.Linear(12, 4)
    aux_modules(module)["uskd"] = head  # pre-built so the reference starts from the same weights
    return module, head


def test_trainer_run_matches_manual_training() -> None:
    module, head = _mlp_with_head()
    net_ref, head_ref = copy.deepcopy(module.model), copy.deepcopy(head)
    callback = USKD(feature_layer="body", alpha=0.5, beta=0.3, mu=0.2)
    x, y = blob_data(n=32)
    fast_trainer(max_steps=4, limit_val_batches=0, callbacks=[callback]).fit(
        module, datamodule=TensorDataModule(x, y, batch_size=8)
    )
    _manual_uskd_sgd(net_ref, head_ref, x, y, steps=4, batch=8, alpha=0.5, beta=0.3, mu=0.2)
    assert aux_modules(module)["uskd"] is head  # the same head, trained in place
    for got, want in zip(
        [*module.model.parameters(), *head.parameters()], [*net_ref.parameters(), *head_ref.parameters()], strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert "model.body.0.weight" in module.state_dict() and "lightning_logits_aux.uskd.weight" in module.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "kwargs", "width"),
    [
        ("resnet10t", {"in_chans": 1}, 256),
        ("vit_tiny_patch16_224", {"in_chans": 1, "img_size": 16, "patch_size": 4, "depth": 4}, 192),
    ],
)
def test_timm_models_train_their_weak_head(model: str, kwargs: dict, width: int) -> None:
    torch.manual_seed(0)
    module = Classifier(model, num_classes=10, **kwargs)
    keys = set(module.state_dict())
    callback = RecordingUSKD()
    fast_trainer(max_steps=2, limit_val_batches=1, callbacks=[callback]).fit(module, datamodule=_image_data(size=16))
    head = aux_modules(module)["uskd"]
    assert (head.in_features, head.out_features) == (width, 10)
    assert set(module.state_dict()) - keys == {"lightning_logits_aux.uskd.weight", "lightning_logits_aux.uskd.bias"}
    assert len(callback.seen) == 2 and all(torch.isfinite(s["value"]) for s in callback.seen)
    assert module.model(torch.randn(2, 1, 16, 16)).shape == (2, 10)  # the user's model is untouched


def test_users_own_module_and_mixup_soft_targets() -> None:
    torch.manual_seed(0)
    callback = RecordingUSKD(feature_layer="features.2")  # relative to the network under `net`
    fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(UserModule(), datamodule=_image_data())
    assert [s["target"].dtype for s in callback.seen] == [torch.int64, torch.int64]

    mixed = RecordingUSKD(feature_layer="model.features.2")
    module = Classifier(TinyNet(num_classes=10), mixup_alpha=0.8, label_smoothing=0.1)
    fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[mixed]).fit(module, datamodule=_image_data())
    for seen in mixed.seen:
        assert seen["target"].shape == (8, 10) and seen["target"].is_floating_point()
        assert torch.isfinite(seen["value"])
        # the mixed target has (at least) two non-zero classes: the top-2 path ran
        assert int((seen["target"] > 0.1 / 10 + 1e-6).sum(1).min()) >= 1


def _resume_fit(
    max_epochs: int, seed: int, tmp_path: Path, ckpt_path: str | None = None, save: str | None = None
) -> Classifier:
    torch.manual_seed(seed)
    module = Classifier(TinyMLP(), optimizer=_sgd_momentum)
    x, y = blob_data(n=32)
    trainer = fast_trainer(
        max_epochs=max_epochs,
        limit_val_batches=0,
        callbacks=[USKD(feature_layer="body", alpha=0.5, mu=0.3)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=TensorDataModule(x, y, batch_size=8), ckpt_path=ckpt_path)
    if save is not None:
        trainer.save_checkpoint(save)
    return module


def test_resume_from_checkpoint_continues_exactly(tmp_path: Path) -> None:
    full = _resume_fit(4, seed=0, tmp_path=tmp_path)
    ckpt = str(tmp_path / "half.ckpt")
    _resume_fit(2, seed=0, tmp_path=tmp_path, save=ckpt)
    saved = torch.load(ckpt, weights_only=False)
    assert "lightning_logits_aux.uskd.weight" in saved["state_dict"]
    momentum = saved["optimizer_states"][0]["state"]
    assert len(momentum) == len(list(full.parameters()))  # the head's momentum buffers are saved too
    assert saved["callbacks"]["USKD{'name': 'uskd'}"]["feature_layer"] == "model.body"
    # a different seed: everything the resumed run gets right comes from the checkpoint
    resumed = _resume_fit(4, seed=1, tmp_path=tmp_path, ckpt_path=ckpt)
    for (name, got), want in zip(resumed.named_parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
    # evaluating from the checkpoint in a fresh process-like setting: the head is rebuilt first
    torch.manual_seed(2)
    fresh = Classifier(TinyMLP())
    x, y = blob_data(n=32)
    fast_trainer(callbacks=[USKD(feature_layer="body")]).validate(
        fresh, datamodule=TensorDataModule(x, y, batch_size=8), ckpt_path=ckpt
    )


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_spawn_matches_per_rank_losses(ddp_env: int) -> None:
    # Each rank computes USKD on its own 8 samples (the batch mean in L_t is per device), DDP
    # averages the gradients: the reference averages the two ranks' losses, same samples.
    module, head = _mlp_with_head()
    net_ref, head_ref = copy.deepcopy(module.model), copy.deepcopy(head)
    initial = head.weight.detach().clone()
    x, y = blob_data(n=64)
    trainer = fast_trainer(
        strategy="ddp_spawn",
        devices=2,
        max_steps=4,
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[USKD(feature_layer="body", beta=0.5, mu=0.3)],
    )
    trainer.fit(module, datamodule=TensorDataModule(x, y, batch_size=8))
    _manual_uskd_sgd(net_ref, head_ref, x, y, steps=4, batch=16, ranks=2, beta=0.5, mu=0.3)
    trained = [*module.model.parameters(), *aux_modules(module)["uskd"].parameters()]
    for got, want in zip(trained, [*net_ref.parameters(), *head_ref.parameters()], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(initial, trained[-2])  # the head trained (weights came back from rank 0)


# ----------------------------------------------------------------------------------------------
# Recipes

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "uskd"


@pytest.mark.slow
def test_digits_recipe_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_logits.cli import build_cli

    monkeypatch.chdir(tmp_path)  # recipes write under runs/
    fast = ["--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"]
    cli = build_cli(["fit", "--config", str(RECIPES / "digits_resnet18_uskd.yaml"), *fast])
    assert "train/loss_uskd_epoch" in cli.trainer.callback_metrics
    head = aux_modules(cli.model)["uskd"]
    assert (head.in_features, head.out_features) == (256, 10)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("digits_vit_tiny_uskd.yaml", ["vit_tiny_patch16_224", "patch_size: 4", "depth: 6"]),
        ("cifar100_resnet18_uskd.yaml", ["alpha: 0.1", "beta: 0.1", "mu: 0.1", "num_classes: 100"]),
        ("imagenet_style_resnet18_uskd.yaml", ["alpha: 1.0", "mu: 0.005", "strategy: ddp"]),
        ("imagenet_style_deit_tiny_uskd.yaml", ["deit_tiny_patch16_224", "mixup_alpha: 0.8", "mu: 0.005"]),
    ],
)
def test_recipes_parse(name: str, expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_logits.cli import build_cli

    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(RECIPES / name), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning_logits.callbacks.uskd.USKD" in printed
    for text in expected:
        assert text in printed, text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank_by": "probability"}, "rank_by must be one of"),
        ({"alpha": -1.0}, "alpha must be a finite non-negative weight, got -1.0"),
        ({"mu": math.nan}, "mu must be a finite"),
        ({"beta": math.inf}, "beta must be a finite"),
    ],
)
def test_callback_argument_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        USKD(**kwargs)

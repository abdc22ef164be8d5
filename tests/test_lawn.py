"""LAWN: the functional core, the layer tracer, and the callback on real Trainers (resume, DDP)."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import FSDPStrategy, SingleDeviceStrategy
from torch import Tensor, nn

from lightning_logits.callbacks.lawn import LAWN
from lightning_logits.functional.lawn import (
    frobenius_norm,
    frobenius_norms,
    project_to_tangent,
    project_to_tangent_,
    rescale_to_norm,
    rescale_to_norm_,
)
from lightning_logits.modules.classifier import Classifier
from lightning_logits.networks.heads import AUX_ATTRIBUTE, aux_modules
from lightning_logits.networks.lawn import (
    ExecutionTrace,
    constrained_parameter_names,
    find_constrained_layers,
    is_non_homogeneous_activation,
    is_norm_layer,
    match_layers,
    non_homogeneous_activations,
    record_execution,
    select_constrained_layers,
)
from tests.helpers import TensorDataModule, TinyMLP, TinyNet, blob_data, fast_trainer

# ----------------------------------------------------------------------------- functional core


def _project_reference(g: Tensor, w: Tensor) -> Tensor:
    """float64 restatement, entry by entry: g - (sum_i g_i w_i) / (sum_i w_i^2) * w."""
    gf, wf = g.double().flatten().tolist(), w.double().flatten().tolist()
    dot = math.fsum(a * b for a, b in zip(gf, wf, strict=True))
    ww = math.fsum(b * b for b in wf)
    out = [a - dot / ww * b for a, b in zip(gf, wf, strict=True)] if ww > 0 else gf
    return torch.tensor(out, dtype=torch.float64).reshape(g.shape)


shapes = st.sampled_from([(1,), (3,), (4, 5), (10, 1), (2, 3, 3, 3), (7, 16), (1, 1, 1, 1)])
scales = st.sampled_from([1e-6, 1e-3, 1.0, 1e3, 1e6])


@settings(max_examples=40, deadline=None)
@given(shape=shapes, g_scale=scales, w_scale=scales, seed=st.integers(0, 2**16))
def test_project_to_tangent_matches_float64_reference(
    shape: tuple[int, ...], g_scale: float, w_scale: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen) * g_scale
    w = torch.randn(shape, generator=gen) * w_scale
    got = project_to_tangent(g, w)
    want = _project_reference(g, w)
    assert got.dtype == g.dtype and got.shape == g.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    # orthogonal to w (relative to the sizes involved), and projecting twice changes nothing
    assert abs(torch.dot(got.double().flatten(), w.double().flatten())) <= 1e-5 * g.norm() * w.norm() + 1e-30
    torch.testing.assert_close(project_to_tangent(got, w), got, rtol=1e-4, atol=1e-5 * g.abs().max().item())


def test_project_to_tangent_hand_cases() -> None:
    w = torch.tensor([[3.0, 4.0]])
    # along w: removed entirely; orthogonal to w: kept
    torch.testing.assert_close(project_to_tangent(2 * w, w), torch.zeros(1, 2))
    torch.testing.assert_close(project_to_tangent(torch.tensor([[4.0, -3.0]]), w), torch.tensor([[4.0, -3.0]]))
    # g = [1, 1]: <g,w> = 7, <w,w> = 25 -> g - 0.28 w = [0.16, -0.12]
    torch.testing.assert_close(project_to_tangent(torch.ones(1, 2), w), torch.tensor([[0.16, -0.12]]))
    # zero weight: gradient unchanged, inputs untouched
    g = torch.tensor([1.0, 2.0])
    out = project_to_tangent(g, torch.zeros(2))
    torch.testing.assert_close(out, g)
    assert out is not g


def test_project_keeps_norm_to_first_order() -> None:
    torch.manual_seed(0)
    w, g = torch.randn(8, 8, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    for lr in (1e-2, 1e-3):
        moved_plain = (w - lr * g).norm() - w.norm()
        moved_proj = (w - lr * project_to_tangent(g, w)).norm() - w.norm()
        assert abs(moved_proj) < lr**2 * g.norm() ** 2 / w.norm()  # second order only
        assert abs(moved_plain) > 10 * abs(moved_proj)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    w = (torch.randn(16, 16) * 30).to(dtype)  # sum of squares ~ 2e5: fine, but 1e4 entries^2 would overflow fp16
    g = torch.randn(16, 16).to(dtype)
    p = project_to_tangent(g, w)
    assert p.dtype == dtype and torch.isfinite(p).all()
    torch.testing.assert_close(p.double(), _project_reference(g, w), rtol=2e-2, atol=2e-2)
    r = rescale_to_norm(w, 5.0)
    assert r.dtype == dtype
    assert frobenius_norm(r).item() == pytest.approx(5.0, rel=1e-2 if dtype != torch.float64 else 1e-12)
    assert frobenius_norm(w).dtype == torch.promote_types(dtype, torch.float32)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, w_scale=scales, target=st.sampled_from([1e-4, 0.5, 1.0, 7.3, 1e4]), seed=st.integers(0, 999))
def test_rescale_to_norm(shape: tuple[int, ...], w_scale: float, target: float, seed: int) -> None:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * w_scale
    out = rescale_to_norm(w, target)
    norm64 = math.sqrt(math.fsum(v * v for v in out.double().flatten().tolist()))
    assert norm64 == pytest.approx(target, rel=1e-5)
    # same direction: cosine 1
    cos = torch.dot(out.double().flatten(), w.double().flatten()) / (out.double().norm() * w.double().norm())
    assert cos.item() == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(rescale_to_norm(w, torch.tensor(target)), out)


def test_rescale_zero_weight_and_zero_norm() -> None:
    torch.testing.assert_close(rescale_to_norm(torch.zeros(3, 3), 2.0), torch.zeros(3, 3))
    torch.testing.assert_close(rescale_to_norm(torch.ones(2, 2), 0.0), torch.zeros(2, 2))


def test_in_place_versions() -> None:
    torch.manual_seed(0)
    ws = [torch.randn(4, 3), torch.randn(2, 2, 3, 3)]
    gs = [torch.randn(4, 3), torch.randn(2, 2, 3, 3)]
    want = [project_to_tangent(g, w) for g, w in zip(gs, ws, strict=True)]
    project_to_tangent_(gs, ws)
    for got, exp in zip(gs, want, strict=True):
        torch.testing.assert_close(got, exp)
    rescale_to_norm_(ws, [2.0, 3.0])
    assert [round(frobenius_norm(w).item(), 5) for w in ws] == [2.0, 3.0]
    # on a leaf Parameter that requires grad (what the callback does)
    p = nn.Parameter(torch.ones(2, 2))
    rescale_to_norm_([p], [1.0])
    torch.testing.assert_close(p.detach(), torch.full((2, 2), 0.5))


def test_fused_in_place_versions_match_float64_reference() -> None:
    # Many tensors of mixed shapes, layouts and dtypes in one call (what scope="all" passes).
    torch.manual_seed(1)
    shapes = [(7, 5), (3, 2, 3, 3), (10, 1), (4, 4, 1, 1), (6, 8)]
    ws = [torch.randn(s) * scale for s, scale in zip(shapes, (1e-3, 1.0, 10.0, 0.3, 2.0), strict=True)]
    ws[1] = ws[1].to(memory_format=torch.channels_last)  # non-contiguous view order
    ws.append(torch.zeros(3, 3))  # a zero weight keeps its gradient
    ws.append(torch.randn(5, 5).bfloat16())
    gs = [torch.randn(w.shape, dtype=w.dtype) for w in ws]
    want = [_project_reference(g.double(), w.double()) for g, w in zip(gs, ws, strict=True)]
    project_to_tangent_(gs, ws)
    for got, exp in zip(gs[:-1], want[:-1], strict=True):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gs[-1].double(), want[-1], rtol=2e-2, atol=2e-2)  # bf16 storage
    targets = [0.5, 2.0, 3.0, 1e-3, 7.0]
    fp32 = ws[:5]
    rescale_to_norm_(fp32, torch.tensor(targets))  # the callback passes one tensor of targets
    got_norms = [math.sqrt(math.fsum(v * v for v in w.double().flatten().tolist())) for w in fp32]
    assert got_norms == pytest.approx(targets, rel=1e-6)
    rescale_to_norm_(ws[5:], [1.0, 1.0])
    assert torch.equal(ws[5], torch.zeros(3, 3)) and frobenius_norm(ws[6]).item() == pytest.approx(1.0, rel=1e-2)
    assert frobenius_norms(fp32).tolist() == pytest.approx(targets, rel=1e-6)


def test_functional_errors() -> None:
    with pytest.raises(ValueError, match=r"grad has shape \(2, 3\) but weight has shape \(3, 2\)"):
        project_to_tangent(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(TypeError, match="floating-point"):
        project_to_tangent(torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))
    with pytest.raises(TypeError, match="must be tensors"):
        project_to_tangent([1.0], torch.zeros(1))  # type: ignore[arg-type]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            rescale_to_norm(torch.ones(2), bad)
    with pytest.raises(ValueError, match="one number"):
        rescale_to_norm(torch.ones(2), torch.ones(2))
    with pytest.raises(TypeError, match="floating-point"):
        rescale_to_norm(torch.ones(2, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="one gradient per weight"):
        project_to_tangent_([torch.ones(2)], [])
    with pytest.raises(ValueError, match="one target norm per weight"):
        rescale_to_norm_([torch.ones(2)], [1.0, 2.0])


# ----------------------------------------------------------------------------- which layers


class NormInContainer(nn.Module):
    """A module with its own weight that contains a LayerNorm: never 'after' the norm."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4, 4))
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.norm(x @ self.scale))


class AttentionTail(nn.Module):
    """LayerNorm, then attention (in_proj_weight) and a GELU MLP head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(self.embed(tokens))
        h, _ = self.attn(h, h, h)
        return self.mlp(h.mean(1))


def test_trace_picks_layers_after_last_norm() -> None:
    assert find_constrained_layers(TinyNet(), torch.randn(2, 1, 8, 8)) == ["fc"]
    assert find_constrained_layers(TinyMLP(), torch.randn(2, 16)) == ["body.0", "head"]
    assert find_constrained_layers(NormInContainer(), torch.randn(2, 4)) == ["out"]
    model = AttentionTail()
    assert find_constrained_layers(model, torch.randint(0, 10, (2, 5))) == ["attn", "attn.out_proj", "mlp.0", "mlp.2"]
    assert constrained_parameter_names(model, ["attn", "mlp.0"]) == ["attn.in_proj_weight", "mlp.0.weight"]


def test_trace_uses_execution_order_not_definition_order() -> None:
    class Reordered(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(4, 3)  # defined first, runs last
            self.norm = nn.BatchNorm1d(4)
            self.stem = nn.Linear(5, 4)

        def forward(self, x: Tensor) -> Tensor:
            return self.head(torch.relu(self.norm(self.stem(x))))

    assert find_constrained_layers(Reordered(), torch.randn(3, 5)) == ["head"]


def test_trace_restores_mode_and_batchnorm_stats() -> None:
    net = TinyNet().train()
    before = net.features[1].running_mean.clone()
    find_constrained_layers(net, torch.randn(4, 1, 8, 8) + 3)
    assert net.training and net.features[1].training
    torch.testing.assert_close(net.features[1].running_mean, before)


def test_trace_timm_models() -> None:
    timm = pytest.importorskip("timm")
    resnet = timm.create_model("resnet10t", num_classes=5)
    assert find_constrained_layers(resnet, torch.randn(1, 3, 32, 32)) == ["fc"]
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, depth=2)
    assert find_constrained_layers(vit, torch.randn(1, 3, 32, 32)) == ["head"]


def test_trace_ending_in_norm_is_an_error() -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match=r"no layer .* runs after the last normalization layer \('1'\)"):
        find_constrained_layers(net, torch.randn(2, 4))
    with pytest.raises(ValueError, match="no forward pass"):
        select_constrained_layers(net, ExecutionTrace())


def test_trace_skips_aux_modules() -> None:
    module = nn.Module()
    module.body = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))
    aux_modules(module)["probe"] = nn.Linear(4, 2)

    def forward(x: Tensor) -> Tensor:
        out = module.body(x)
        getattr(module, AUX_ATTRIBUTE)["probe"](x)  # an aux head that runs last
        return out

    module.forward = forward  # type: ignore[method-assign]
    assert find_constrained_layers(module, torch.randn(3, 4)) == ["body.3"]


def test_activation_and_norm_classification() -> None:
    for act in (nn.Tanh(), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.ELU(), nn.ReLU6(), nn.Hardswish()):
        assert is_non_homogeneous_activation(act), act
    for act in (nn.ReLU(), nn.LeakyReLU(), nn.PReLU(), nn.Identity(), nn.Dropout(), nn.MaxPool1d(2)):
        assert not is_non_homogeneous_activation(act), act
    timm = pytest.importorskip("timm")
    from timm.layers import RmsNorm

    assert is_non_homogeneous_activation(timm.layers.activations.GELU())
    for norm in (nn.BatchNorm2d(2), nn.InstanceNorm1d(2), nn.GroupNorm(1, 2), nn.RMSNorm(2), RmsNorm(2)):
        assert is_norm_layer(norm), norm
    model = AttentionTail()
    with record_execution(model) as trace:
        model(torch.randint(0, 10, (2, 5)))
    assert non_homogeneous_activations(model, trace, ["mlp.0", "mlp.2"]) == ["mlp.1"]
    assert non_homogeneous_activations(model, trace, ["mlp.2"]) == []


def test_match_layers() -> None:
    net = TinyNet()
    assert match_layers(net, ["fc"]) == ["fc"]
    assert match_layers(net, ["features.*"]) == ["features.0"]  # the BatchNorm is never a candidate
    assert match_layers(net, ["*", "fc"]) == ["features.0", "fc"]
    with pytest.raises(ValueError, match=r"'features.1' matches no layer .* can be constrained: features.0, fc"):
        match_layers(net, ["features.1"])
    with pytest.raises(TypeError, match=r"use \['fc'\]"):
        match_layers(net, "fc")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- the callback


def _adam(params: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=0.05)


def _sgd_momentum(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def _mlp_module(optimizer: Any = _adam) -> Classifier:
    torch.manual_seed(0)
    return Classifier(TinyMLP(), optimizer=optimizer)


def _blobs(batch_size: int = 8) -> TensorDataModule:
    x, y = blob_data(n=64)
    return TensorDataModule(x, y, batch_size=batch_size)


def _fit(
    module: pl.LightningModule,
    callbacks: list[Any],
    datamodule: pl.LightningDataModule | None = None,
    quiet: bool = True,
    **kwargs: Any,
) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    trainer = fast_trainer(limit_val_batches=0, callbacks=callbacks, **kwargs)
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=datamodule or _blobs())
    return trainer


def _reference_run(
    free_steps: int,
    steps: int,
    accumulate: int = 1,
    project: bool = True,
    optimizer: Any = None,
    reset: bool = False,
    target: float | None = None,
) -> nn.Module:
    """LAWN on a plain torch loop, written from the method's description (float64 projection/rescale)."""
    torch.manual_seed(0)
    net = TinyMLP()
    opt = (optimizer or _adam)(net.parameters())
    x, y = blob_data(n=64)
    batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 64, 8)]
    constrained = [net.body[0].weight, net.head.weight]
    norms: list[float] = []
    micro = 0
    for step in range(steps):
        for _ in range(accumulate):
            xb, yb = batches[micro % len(batches)]
            micro += 1
            (F.cross_entropy(net(xb), yb) / accumulate).backward()
        if step == free_steps:
            norms = [w.detach().double().norm().item() if target is None else target for w in constrained]
            with torch.no_grad():
                for w, c in zip(constrained, norms, strict=True):
                    w.copy_(w.double() * (c / w.double().norm()))
            if reset:  # a fresh optimizer state for the constrained weights only
                for w in constrained:
                    del opt.state[w]
        if step >= free_steps and project:
            for w in constrained:
                g, wd = w.grad.double(), w.detach().double()  # type: ignore[union-attr]
                w.grad.copy_(g - (g * wd).sum() / (wd * wd).sum() * wd)  # type: ignore[union-attr]
        opt.step()
        opt.zero_grad()
        if step >= free_steps:
            with torch.no_grad():
                for w, c in zip(constrained, norms, strict=True):
                    w.copy_(w.double() * (c / w.double().norm()))
    return net


@pytest.mark.parametrize(
    ("accumulate", "project", "optimizer", "on_switch", "target"),
    [
        (1, True, _adam, "keep", None),
        (2, True, _adam, "keep", None),
        (1, False, _adam, "keep", None),
        (1, True, _adam, "reset", None),
        (2, True, _adam, "reset", 1.5),  # gradient accumulation, fresh Adam moments, a given norm
        (1, True, _sgd_momentum, "reset", None),  # momentum buffers cleared
        (1, True, _sgd_momentum, "keep", 2.0),
    ],
)
def test_callback_matches_reference_loop(
    accumulate: int, project: bool, optimizer: Any, on_switch: Any, target: float | None
) -> None:
    free_steps, epochs = 5, 2
    steps = epochs * 8 // accumulate
    module = _mlp_module(optimizer)
    lawn = LAWN(free_steps=free_steps, project_gradients=project, on_switch=on_switch, target_norm=target)
    trainer = _fit(module, [lawn], max_epochs=epochs, accumulate_grad_batches=accumulate)
    assert trainer.global_step == steps
    reference = _reference_run(free_steps, steps, accumulate, project, optimizer, on_switch == "reset", target)
    for (name, got), want in zip(module.model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6, msg=name)
    assert lawn.param_names == ["model.body.0.weight", "model.head.weight"]
    held = [frobenius_norm(module.model.body[0].weight).item(), frobenius_norm(module.model.head.weight).item()]
    assert held == pytest.approx([lawn.norms[n] for n in lawn.param_names], rel=1e-6)
    if target is not None:
        assert held == pytest.approx([target, target], rel=1e-6)
    assert lawn.switch_step == free_steps


@pytest.mark.parametrize("scope", ["final", "all"])
def test_reset_clears_only_the_constrained_state(scope: Any) -> None:
    # Adam's step count tells whose state was cleared: 8 steps in all, the switch at step 3.
    counts = {}
    for on_switch in ("keep", "reset"):
        module = _cnn_module()
        lawn = LAWN(free_steps=3, scope=scope, on_switch=on_switch)
        trainer = _fit(module, [lawn], datamodule=_images(), max_epochs=2)
        state = trainer.optimizers[0].state
        counts[on_switch] = {n: int(state[p]["step"]) for n, p in module.named_parameters()}
        assert set(lawn.param_names) == (
            {"model.fc.weight"} | ({"model.features.0.weight"} if scope == "all" else set())
        )
    assert set(counts["keep"].values()) == {8}
    for name, count in counts["reset"].items():
        assert count == (5 if name in lawn.param_names else 8), name


@pytest.mark.parametrize("scope", ["final", "all"])
def test_bf16_mixed_precision_holds_the_norms(scope: Any) -> None:
    module = _cnn_module()
    lawn = LAWN(free_steps=2, scope=scope, on_switch="reset")
    _fit(module, [lawn], datamodule=_images(), max_epochs=2, precision="bf16-mixed")
    assert lawn.phase == "constrained" and len(lawn.param_names) == (2 if scope == "all" else 1)
    params = dict(module.named_parameters())
    for name in lawn.param_names:
        assert params[name].dtype == torch.float32
        assert frobenius_norm(params[name]).item() == pytest.approx(lawn.norms[name], rel=1e-6)


def test_free_phase_is_untouched() -> None:
    plain, with_lawn = _mlp_module(), _mlp_module()
    _fit(plain, [], max_epochs=2)
    lawn = LAWN(free_epochs=5)
    _fit(with_lawn, [lawn], max_epochs=2)
    assert lawn.phase == "free" and lawn.norms == {}
    for got, want in zip(with_lawn.parameters(), plain.parameters(), strict=True):
        assert torch.equal(got, want)


def test_switch_records_norms_at_the_end_of_the_free_phase() -> None:
    # Two free epochs of plain training give the weights whose norms LAWN must record.
    plain = _mlp_module()
    _fit(plain, [], max_epochs=2)
    module = _mlp_module()
    lawn = LAWN(free_epochs=2)
    _fit(module, [lawn], max_epochs=4)
    assert lawn.phase == "constrained"
    assert lawn.norms["model.head.weight"] == pytest.approx(frobenius_norm(plain.model.head.weight).item(), rel=1e-6)
    assert lawn.norms["model.body.0.weight"] == pytest.approx(frobenius_norm(plain.model.body[0].weight).item())
    # biases are free to move and did
    assert not torch.allclose(module.model.head.bias, plain.model.head.bias)


class TwoGroups(Classifier):
    """SGD with momentum, body and head in separate parameter groups with different learning rates."""

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            [
                {"params": self.model.body.parameters(), "lr": 0.05},
                {"params": self.model.head.parameters(), "lr": 0.5},
            ],
            momentum=0.9,
        )


def test_param_groups_and_sgd_hold_the_norms() -> None:
    torch.manual_seed(0)
    module = TwoGroups(TinyMLP())
    lawn = LAWN(free_steps=2, layers=["model.head"])
    _fit(module, [lawn], max_epochs=3)
    assert lawn.param_names == ["model.head.weight"]
    assert frobenius_norm(module.model.head.weight).item() == pytest.approx(lawn.norms["model.head.weight"], rel=1e-6)


def test_only_the_stepping_optimizer_is_rescaled() -> None:
    lawn = LAWN(free_steps=0)
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    opt_a, opt_b = torch.optim.SGD([a], lr=0.0), torch.optim.SGD([b], lr=0.0)
    lawn.phase = "constrained"
    lawn._per_optimizer = {id(opt_a): ([a], torch.tensor([1.0])), id(opt_b): ([b], torch.tensor([4.0]))}
    for opt in (opt_a, opt_b):
        opt.register_step_post_hook(lawn._after_step)
    a.grad, b.grad = torch.zeros(2, 2), torch.zeros(2, 2)
    opt_a.step()
    assert frobenius_norm(a).item() == pytest.approx(1.0) and frobenius_norm(b).item() == pytest.approx(2.0)
    opt_b.step()
    assert frobenius_norm(b).item() == pytest.approx(4.0)


def test_skipped_amp_step_does_not_rescale() -> None:
    # GradScaler skips optimizer.step() when a gradient is inf: the post hook must not fire then.
    lawn = LAWN(free_steps=0)
    w = nn.Parameter(torch.ones(2, 2))  # norm 2
    opt = torch.optim.Adam([w], lr=0.1)
    lawn.phase = "constrained"
    lawn._per_optimizer = {id(opt): ([w], torch.tensor([1.0]))}
    opt.register_step_post_hook(lawn._after_step)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    scaler.scale((w * float("inf")).sum()).backward()  # inf gradients
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w.detach(), torch.ones(2, 2))
    opt.zero_grad()
    scaler.scale(w.sum()).backward()
    scaler.step(opt)
    assert frobenius_norm(w).item() == pytest.approx(1.0)


def test_default_scope_is_every_weight() -> None:
    # The study's choice (docs/benchmarks.md, LAWN): on a BatchNorm CNN the conv that feeds the norm is constrained too.
    assert LAWN().scope == "all"
    module = _cnn_module()
    lawn = LAWN(free_steps=1)
    _fit(module, [lawn], datamodule=_images(), max_epochs=1)
    assert lawn.param_names == ["model.features.0.weight", "model.fc.weight"]
    for name, param in module.named_parameters():
        if name in lawn.param_names:
            assert frobenius_norm(param).item() == pytest.approx(lawn.norms[name], rel=1e-6)


class TokenNet(nn.Module):
    """A position embedding, a class token and a zero attention-bias table beside two Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 4, 8) * 0.02)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8) * 1e-6)
        self.attention_biases = nn.Parameter(torch.zeros(2, 4))  # LeViT starts these at zero
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), x.view(len(x), 3, 8)], 1) + self.pos_embed
        return self.head(torch.relu(self.body(tokens)).mean(1)) + self.attention_biases[:, :3].sum(0)  # per class


def test_all_scope_constrains_weights_not_embeddings_tokens_or_bias_tables() -> None:
    torch.manual_seed(0)
    module = Classifier(TokenNet(), num_classes=3, optimizer=_adam)
    data = TensorDataModule(torch.randn(16, 24), torch.arange(16) % 3, batch_size=4)
    lawn = LAWN(free_steps=1)  # the zero bias table would have no norm to hold
    _fit(module, [lawn], datamodule=data, max_epochs=1)
    assert lawn.param_names == ["model.body.weight", "model.head.weight"]
    params = dict(module.named_parameters())
    for name in lawn.param_names:
        assert frobenius_norm(params[name]).item() == pytest.approx(lawn.norms[name], rel=1e-6)
    assert params["model.attention_biases"].abs().sum() > 0  # free, and it moved


def test_final_scope_layers_on_a_normalized_cnn() -> None:
    torch.manual_seed(0)
    module = Classifier(TinyNet(num_classes=4), optimizer=_adam)
    x, y = torch.randn(32, 1, 8, 8), torch.arange(32) % 4
    lawn = LAWN(free_steps=1, scope="final")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fast_trainer(max_epochs=2, limit_val_batches=0, callbacks=[lawn])
        trainer.fit(module, datamodule=TensorDataModule(x, y, batch_size=8))
    assert lawn.param_names == ["model.fc.weight"]  # not the conv, the BatchNorm or any bias
    assert not [w for w in caught if "non-homogeneous" in str(w.message)]
    assert frobenius_norm(module.model.fc.weight).item() == pytest.approx(lawn.norms["model.fc.weight"], rel=1e-6)


def _cnn_module(optimizer: Any = _adam) -> Classifier:
    torch.manual_seed(0)
    return Classifier(TinyNet(num_classes=4), optimizer=optimizer)


def _images(batch_size: int = 8) -> TensorDataModule:
    g = torch.Generator().manual_seed(0)
    return TensorDataModule(torch.randn(32, 1, 8, 8, generator=g), torch.arange(32) % 4, batch_size=batch_size)


@pytest.mark.parametrize(
    ("scope", "layers", "want"),
    [
        ("final", None, ["model.fc.weight"]),
        ("all", None, ["model.features.0.weight", "model.fc.weight"]),  # the conv that feeds the BatchNorm too
        ("all", ["model.fc"], ["model.fc.weight"]),  # layers= overrides the scope
    ],
)
def test_scope_picks_the_weights_and_holds_every_norm(scope: Any, layers: list[str] | None, want: list[str]) -> None:
    plain = _cnn_module()
    _fit(plain, [], datamodule=_images(), max_epochs=1)  # 4 steps: the weights at the switch
    module = _cnn_module()
    lawn = LAWN(free_steps=4, scope=scope, layers=layers)
    _fit(module, [lawn], datamodule=_images(), max_epochs=3)
    assert lawn.param_names == want
    params = dict(module.named_parameters())
    plain_params = dict(plain.named_parameters())
    for name in want:
        assert lawn.norms[name] == pytest.approx(frobenius_norm(plain_params[name]).item(), rel=1e-6)
        assert frobenius_norm(params[name]).item() == pytest.approx(lawn.norms[name], rel=1e-6)
    # biases and the BatchNorm's parameters stay free (and moved)
    for name in ("model.features.1.weight", "model.features.1.bias", "model.fc.bias", "model.features.0.bias"):
        assert name not in lawn.param_names
        assert not torch.allclose(params[name], plain_params[name])


def test_warns_on_non_homogeneous_activation() -> None:
    # The check belongs to the "final" search (the homogeneous sub-network after the last norm layer).
    with pytest.warns(UserWarning, match=r"non-homogeneous activation\(s\) Tanh .*model.body.1"):
        _fit(_mlp_module(), [LAWN(free_steps=1, scope="final")], max_epochs=1, quiet=False)


def test_weight_decay_warns_or_errors() -> None:
    def adamw(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)

    with pytest.warns(UserWarning, match=r"AdamW group 0 \(weight_decay=0.1\).*model.head.weight.*weight_decay=0"):
        _fit(_mlp_module(adamw), [LAWN(free_steps=1, layers=["model.head"])], max_epochs=1, quiet=False)
    with pytest.raises(ValueError, match="on_weight_decay='error'"):
        _fit(_mlp_module(adamw), [LAWN(free_steps=1, layers=["model.head"], on_weight_decay="error")], max_epochs=1)
    # weight decay only on layers LAWN leaves alone is fine
    module = _mlp_module()
    module.configure_optimizers = lambda: torch.optim.AdamW(  # type: ignore[method-assign]
        [
            {"params": module.model.body.parameters(), "weight_decay": 0.1},
            {"params": module.model.head.parameters(), "weight_decay": 0.0},
        ]
    )
    _fit(module, [LAWN(free_steps=1, layers=["model.head"], on_weight_decay="error")], max_epochs=1)


class _FirstBatch(Exception):
    pass


class StopAtFirstBatch(pl.Callback):
    """Raises when the first training batch starts: anything seen before it was seen before any step."""

    def on_train_batch_start(self, *args: Any) -> None:
        raise _FirstBatch


def _adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


@pytest.mark.parametrize(
    "options",
    [{"scope": "all"}, {"layers": ["model.fc"]}, {"scope": "final"}],  # final: weight decay on the head
    ids=["all", "layers", "final-head"],
)
def test_weight_decay_is_caught_when_the_fit_starts(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=r"AdamW group 0 \(weight_decay=0.1\).*model.fc.weight"):
        _fit(_cnn_module(_adamw), [LAWN(on_weight_decay="error", **options), StopAtFirstBatch()], _images())
    warned = pytest.warns(UserWarning, match=r"AdamW group 0 \(weight_decay=0.1\).*model.fc.weight")
    with warned, pytest.raises(_FirstBatch):  # the warning came before the first batch
        _fit(_cnn_module(_adamw), [LAWN(**options), StopAtFirstBatch()], _images(), quiet=False)


def test_weight_decay_off_the_head_is_caught_before_the_first_backward() -> None:
    # No normalization: the "final" search constrains the body too, known once the first forward ran.
    module = _mlp_module()
    module.configure_optimizers = lambda: torch.optim.AdamW(  # type: ignore[method-assign]
        [
            {"params": module.model.body.parameters(), "weight_decay": 0.1},
            {"params": module.model.head.parameters(), "weight_decay": 0.0},
        ]
    )
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ValueError, match=r"group 0 \(weight_decay=0.1\).*model.body.0.weight"):
        lawn = LAWN(scope="final", on_weight_decay="error")
        trainer = fast_trainer(max_epochs=1, limit_val_batches=0, callbacks=[lawn])
        trainer.fit(module, datamodule=_blobs())
    assert trainer.global_step == 0
    assert all(p.grad is None for p in module.parameters())  # no backward ran
    for got, want in zip(module.parameters(), before, strict=True):
        assert torch.equal(got, want)


def test_constructor_and_layer_errors() -> None:
    with pytest.raises(ValueError, match="free_epochs must be an integer >= 0, got -1"):
        LAWN(free_epochs=-1)
    with pytest.raises(ValueError, match=r"free_steps must be None or an integer >= 0, got 2\.5"):
        LAWN(free_steps=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"use \['model.head'\]"):
        LAWN(layers="model.head")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty list"):
        LAWN(layers=[])
    with pytest.raises(ValueError, match="'warn' or 'error'"):
        LAWN(on_weight_decay="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"scope must be 'final' .* or 'all' .*, got 'every'"):
        LAWN(scope="every")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"'model\.nope' matches no layer"):
        _fit(_mlp_module(), [LAWN(layers=["model.nope"])], max_epochs=1)


def test_refuses_strategies_that_flatten_weights_and_accepts_model_parallel() -> None:
    from lightning.pytorch.strategies import ModelParallelStrategy

    module = _mlp_module()
    with pytest.raises(RuntimeError, match=r"does not support FSDPStrategy.*ModelParallelStrategy"):
        LAWN().setup(SimpleNamespace(strategy=FSDPStrategy()), module, "fit")  # type: ignore[arg-type]

    class DeepSpeedStrategy(SingleDeviceStrategy):  # stands in for the real one (deepspeed not installed)
        pass

    with pytest.raises(RuntimeError, match="does not support DeepSpeedStrategy"):
        LAWN().setup(SimpleNamespace(strategy=DeepSpeedStrategy("cpu")), module, "fit")  # type: ignore[arg-type]
    LAWN().setup(SimpleNamespace(strategy=SingleDeviceStrategy("cpu")), module, "fit")  # type: ignore[arg-type]
    # FSDP2 keeps one DTensor per weight: supported (the 2-process run is in tests/test_sharded.py)
    LAWN().setup(SimpleNamespace(strategy=ModelParallelStrategy()), module, "fit")  # type: ignore[arg-type]


class KeepsLogits(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        out = super().training_step(batch, batch_idx)
        self.last_logits = out["logits"].detach()
        return out


def test_logs_weight_and_logit_norms(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = KeepsLogits(TinyMLP(), optimizer=_adam)
    lawn = LAWN(free_steps=3)
    trainer = _fit(
        module, [lawn], max_epochs=2, log_every_n_steps=1, logger=CSVLogger(tmp_path, name="lawn", version=0)
    )
    metrics = trainer.callback_metrics
    want = module.last_logits.norm(dim=1).mean()
    torch.testing.assert_close(metrics["lawn/logit_norm"], want)
    assert metrics["lawn/constrained"].item() == 1.0
    torch.testing.assert_close(metrics["lawn/weight_norm/model.head.weight"], frobenius_norm(module.model.head.weight))
    header = (tmp_path / "lawn" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for column in ("lawn/logit_norm", "lawn/weight_norm/model.head.weight", "lawn/weight_norm/model.body.0.weight"):
        assert column in header


# ----------------------------------------------------------------------------- checkpoint and resume


def _resume_run(tmp_path: Path, stop_at: int | None, epochs: int, lawn: LAWN, cnn: bool) -> Classifier:
    module = _cnn_module() if cnn else _mlp_module()
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = fast_trainer(
        max_epochs=stop_at or epochs, limit_val_batches=0, callbacks=[lawn, checkpoint], enable_checkpointing=True
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=_images() if cnn else _blobs())
    return module


@pytest.mark.parametrize(
    ("scope", "on_switch", "target", "cnn"),
    [("final", "keep", None, False), ("all", "reset", None, True), ("final", "reset", 2.0, True)],
)
def test_resume_in_constrained_phase_matches_uninterrupted(
    tmp_path: Path, scope: Any, on_switch: Any, target: float | None, cnn: bool
) -> None:
    options = dict(free_epochs=2, scope=scope, on_switch=on_switch, target_norm=target)
    full = _resume_run(tmp_path / "full", None, 5, LAWN(**options), cnn)  # type: ignore[arg-type]
    first = LAWN(**options)  # type: ignore[arg-type]
    _resume_run(tmp_path / "part", 3, 5, first, cnn)
    assert first.phase == "constrained"
    saved = torch.load(tmp_path / "part" / "last.ckpt", weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if k.startswith("LAWN")]
    assert state["phase"] == "constrained" and state["norms"] == first.norms and state["version"] == 2
    assert state["scope"] == scope and state["on_switch"] == on_switch and state["target_norm"] == target

    # The resumed run is told a different schedule: the checkpoint's phase and norms must win.
    resumed_lawn = LAWN(free_epochs=100, scope=scope)
    module = _cnn_module() if cnn else _mlp_module()
    trainer = fast_trainer(max_epochs=5, limit_val_batches=0, callbacks=[resumed_lawn])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=_images() if cnn else _blobs(), ckpt_path=tmp_path / "part" / "last.ckpt")
    assert resumed_lawn.phase == "constrained" and resumed_lawn.norms == first.norms
    assert resumed_lawn.param_names == first.param_names
    for got, want in zip(module.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    params = dict(module.named_parameters())
    for name in first.param_names:
        assert frobenius_norm(params[name]).item() == pytest.approx(first.norms[name], rel=1e-6)
    if target is not None:
        assert set(first.norms.values()) == {target}


def test_resume_under_another_scope_keeps_the_checkpoint_weights() -> None:
    lawn = LAWN(scope="all")
    lawn.load_state_dict({"version": 1, "phase": "free", "param_names": ["model.fc.weight"], "norms": {}})
    module = _cnn_module()
    with pytest.warns(UserWarning, match="scope='final' under scope='all'.*kept"):
        _fit(module, [lawn], datamodule=_images(), max_epochs=1, quiet=False)
    assert lawn.param_names == ["model.fc.weight"]


def test_load_state_dict_validates() -> None:
    lawn = LAWN()
    with pytest.raises(ValueError, match="phase 'wrong'"):
        lawn.load_state_dict({"phase": "wrong"})
    with pytest.raises(ValueError, match="inconsistent"):
        lawn.load_state_dict({"phase": "constrained", "param_names": ["a"], "norms": {}})
    with pytest.raises(ValueError, match="version 3"):
        lawn.load_state_dict({"version": 3, "phase": "free"})
    # a version-1 state (before scope/on_switch existed) loads, and is written back as version 2
    state = {"version": 1, "phase": "constrained", "param_names": ["a"], "norms": {"a": 2.0}}
    lawn.load_state_dict(state)
    assert lawn.state_dict() == {
        **state,
        "version": 2,
        "scope": "final",
        "on_switch": "keep",
        "target_norm": None,
        "switch_step": None,
    }
    assert lawn._loaded_scope == "final"


# ----------------------------------------------------------------------------- DDP


class RankRecordingLAWN(LAWN):
    """Writes the norms it holds, the weights' norms and Adam's step counts on each rank at the end."""

    def __init__(self, out_dir: str, **kwargs: Any) -> None:
        super().__init__(free_steps=2, **kwargs)
        self.out_dir = out_dir

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = dict(pl_module.named_parameters())
        state = trainer.optimizers[0].state
        record = {
            "recorded": self.norms,
            "held": {n: frobenius_norm(params[n]).item() for n in self.param_names},
            "phase": self.phase,
            "steps": {n: int(state[p]["step"]) for n, p in params.items()},
            "weights": {n: p.detach().flatten().tolist() for n, p in params.items()},
        }
        (Path(self.out_dir) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def _ddp_fit(strategy: str, devices: int, batch_size: int, out_dir: Path, cnn: bool, **kwargs: Any) -> Classifier:
    module = _cnn_module() if cnn else _mlp_module()
    trainer = fast_trainer(
        strategy=strategy,
        devices=devices,
        max_steps=6,
        max_epochs=3 if cnn else 1,  # the CNN's 32 images give 2 steps per epoch and rank
        limit_val_batches=0,
        use_distributed_sampler=False,
        callbacks=[RankRecordingLAWN(str(out_dir), **kwargs)],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=_images(batch_size) if cnn else _blobs(batch_size))
    return module


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_spawn_ranks_hold_the_same_norms(ddp_env: int, tmp_path: Path) -> None:
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    ddp = _ddp_fit("ddp_spawn", 2, 8, tmp_path / "ddp", cnn=False)
    single = _ddp_fit("auto", 1, 16, tmp_path / "one", cnn=False)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["phase"] == ranks[1]["phase"] == "constrained"
    assert ranks[0]["recorded"] == ranks[1]["recorded"]  # bit for bit
    assert set(ranks[0]["recorded"]) == {"model.body.0.weight", "model.head.weight"}
    for rank in ranks:
        assert rank["held"] == pytest.approx(rank["recorded"], rel=1e-6)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    assert ranks[0]["recorded"] == pytest.approx(one["recorded"], rel=1e-5)
    for got, want in zip(ddp.parameters(), single.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_spawn_scope_all_with_reset(ddp_env: int, tmp_path: Path) -> None:
    # A BatchNorm CNN, every weight constrained, optimizer state reset at the switch, on 2 processes.
    _ddp_fit("ddp_spawn", 2, 8, tmp_path, cnn=True, scope="all", on_switch="reset")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["recorded"] == ranks[1]["recorded"]  # bit for bit
    assert set(ranks[0]["recorded"]) == {"model.features.0.weight", "model.fc.weight"}
    for rank in ranks:
        assert rank["phase"] == "constrained"
        assert rank["held"] == pytest.approx(rank["recorded"], rel=1e-6)
        assert rank["steps"] == {n: 4 if n in rank["recorded"] else 6 for n in rank["steps"]}
    assert ranks[0]["weights"] == ranks[1]["weights"]  # the replicas stay identical


# ----------------------------------------------------------------------------- recipes

RECIPES = Path(__file__).resolve().parent.parent / "recipes" / "lawn"


@pytest.mark.slow
def test_digits_recipe_trains_into_the_constrained_phase(tmp_path: Path) -> None:
    from lightning_logits.cli import build_cli

    overrides = [
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.default_root_dir={tmp_path}",
        "--data.init_args.batch_size=16",
    ]
    cli = build_cli(["--config", str(RECIPES / "digits_resnet10t_adam_lawn.yaml"), *overrides], run=False)
    (lawn,) = [c for c in cli.trainer.callbacks if isinstance(c, LAWN)]  # type: ignore[attr-defined]
    assert lawn.free_epochs == 4 and lawn.on_weight_decay == "error"
    lawn.free_epochs = 1  # reach the constrained phase within the short run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert lawn.phase == "constrained" and lawn.scope == "all"
    assert "model.fc.weight" in lawn.param_names and "model.conv1.0.weight" in lawn.param_names
    params = dict(cli.model.named_parameters())
    for name in lawn.param_names:  # float32 norms of conv weights with millions of entries: rel 1e-5
        assert frobenius_norm(params[name]).item() == pytest.approx(lawn.norms[name], rel=1e-5)
    metrics = (tmp_path / "digits_adam_lawn" / "version_0" / "metrics.csv").read_text()
    assert "lawn/logit_norm" in metrics and "lawn/weight_norm/model.fc.weight" in metrics


def test_imagenet_style_recipe_parses(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_logits.cli import build_cli

    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(RECIPES / "imagenet_style_resnet50_adam_lawn.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lightning_logits.callbacks.lawn.LAWN" in out
    assert "free_epochs: 10" in out and "weight_decay: 0.0" in out and "strategy: ddp" in out

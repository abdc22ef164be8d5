"""KD/NKD losses against a float64 restatement, the teacher-logit cache, and TeacherDistillation in real runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.models import register_model
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_logits.callbacks.distillation import ResizeInput, TeacherDistillation
from lightning_logits.cli import cache_main as main
from lightning_logits.data.digits import DigitsDataModule, IndexedTensorDataset
from lightning_logits.functional.distillation import kd_loss, nkd_loss
from lightning_logits.loss_terms import StepContext
from lightning_logits.modules.classifier import Classifier
from lightning_logits.networks.factory import load_teacher, teacher_fingerprint
from lightning_logits.teacher_cache import TeacherLogitCache, build_teacher_cache, reconstruct_logits
from tests.helpers import TensorDataModule, TinyMLP, TinyNet, blob_data, fast_trainer

ROOT = Path(__file__).resolve().parent.parent
TINY = "lightning_logits_test_tinynet"


def _tiny_timm_model(pretrained: bool = False, num_classes: int = 10, in_chans: int = 1, **kwargs) -> nn.Module:  # type: ignore[no-untyped-def]
    return TinyNet(num_classes=num_classes)


# A tiny CNN in timm's registry, so "teacher by name" and Classifier checkpoints stay cheap in tests.
if not timm.is_model(TINY):
    _tiny_timm_model.__name__ = TINY
    register_model(_tiny_timm_model)


# --------------------------------------------------------------------------- float64 restatement
def _log_softmax64(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    lse = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - lse for v in scaled]


def kd_reference(s: Tensor, t: Tensor, temperature: float) -> float:
    total = 0.0
    for srow, trow in zip(s.double().tolist(), t.double().tolist(), strict=True):
        log_ps, log_pt = _log_softmax64(srow, temperature), _log_softmax64(trow, temperature)
        total += sum(math.exp(a) * (a - b) for a, b in zip(log_pt, log_ps, strict=True))
    return temperature**2 * total / s.shape[0]


def nkd_reference(s: Tensor, t: Tensor, y: list[int], temperature: float, gamma: float) -> float:
    total = 0.0
    for srow, trow, c in zip(s.double().tolist(), t.double().tolist(), y, strict=True):
        total -= math.exp(_log_softmax64(trow)[c]) * _log_softmax64(srow)[c]
        s_rest = [v for j, v in enumerate(srow) if j != c]
        t_rest = [v for j, v in enumerate(trow) if j != c]
        log_qs, log_qt = _log_softmax64(s_rest, temperature), _log_softmax64(t_rest, temperature)
        total -= gamma * temperature**2 * sum(math.exp(a) * b for a, b in zip(log_qt, log_qs, strict=True))
    return total / s.shape[0]


def _tolerance(*tensors: Tensor) -> float:
    # float32 log_softmax of values ~M carries an absolute error ~M * 2^-23 per term.
    scale = max(float(x.abs().max()) for x in tensors)
    return 1e-5 + 4e-6 * scale * tensors[0].shape[1]


# --------------------------------------------------------------------------- functional
@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (8, 10), (2, 100)])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_kd_matches_float64_restatement(shape: tuple[int, int], temperature: float) -> None:
    s, t = torch.randn(shape) * 3, torch.randn(shape) * 3
    got = kd_loss(s, t, temperature=temperature)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(kd_reference(s, t, temperature), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (8, 10), (2, 100)])
@pytest.mark.parametrize(("temperature", "gamma"), [(1.0, 1.5), (3.0, 3.5), (0.5, 1.0)])
def test_nkd_matches_float64_restatement(shape: tuple[int, int], temperature: float, gamma: float) -> None:
    s, t = torch.randn(shape) * 3, torch.randn(shape) * 3
    y = torch.randint(0, shape[1], (shape[0],))
    got = nkd_loss(s, t, y, temperature=temperature, gamma=gamma)
    want = nkd_reference(s, t, y.tolist(), temperature, gamma)
    assert got.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_nkd_hand_computed_two_classes() -> None:
    # C = 2: the non-target row has one logit, its softmax is 1 and its log 0, so only L_t remains:
    # -softmax(t)[y] * log_softmax(s)[y] = -sigmoid(2) * log(sigmoid(1)).
    got = nkd_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([0]), gamma=7.0)
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    assert got.item() == pytest.approx(-sig(2.0) * math.log(sig(1.0)), rel=1e-6)


def test_nkd_is_not_plain_kd() -> None:
    # A mask built wrong (the 2023 official bug) keeps the target column and computes KD-like values.
    s, t, y = torch.tensor([[3.0, 1.0, 0.0]]), torch.tensor([[0.0, 2.0, 1.0]]), torch.tensor([0])
    nkd = nkd_loss(s, t, y, temperature=1.0, gamma=1.0).item()
    p_t = torch.softmax(t, 1)
    # with the target column kept, the non-target term would be the full cross-entropy
    buggy = -(p_t[0, 0] * torch.log_softmax(s, 1)[0, 0]) - (p_t * torch.log_softmax(s, 1)).sum()
    assert nkd == pytest.approx(nkd_reference(s, t, [0], 1.0, 1.0), rel=1e-6)
    assert abs(nkd - buggy.item()) > 0.1


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    c=st.integers(2, 12),
    scale=st.sampled_from([1e-3, 1.0, 30.0, 1e3, 1e4]),
    temperature=st.sampled_from([0.25, 1.0, 3.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_losses_finite_and_exact_over_shapes_and_extremes(
    n: int, c: int, scale: float, temperature: float, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    s = (torch.rand(n, c, generator=g) * 2 - 1) * scale
    t = (torch.rand(n, c, generator=g) * 2 - 1) * scale
    y = torch.randint(0, c, (n,), generator=g)
    kd = kd_loss(s, t, temperature=temperature)
    nkd = nkd_loss(s, t, y, temperature=temperature, gamma=1.5)
    assert torch.isfinite(kd) and torch.isfinite(nkd)
    tol = _tolerance(s, t) * max(1.0, temperature)
    assert kd.item() == pytest.approx(kd_reference(s, t, temperature), rel=1e-4, abs=tol)
    assert nkd.item() == pytest.approx(nkd_reference(s, t, y.tolist(), temperature, 1.5), rel=1e-4, abs=tol)


def test_extreme_logits_stay_finite_with_finite_gradients() -> None:
    s = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 5e3]], requires_grad=True)
    t = torch.tensor([[-1e4, 1e4, 0.0], [1e4, -1e4, -5e3]])
    for loss in (kd_loss(s, t, 1.0), nkd_loss(s, t, torch.tensor([0, 2]), temperature=1.0)):
        assert torch.isfinite(loss)
        (grad,) = torch.autograd.grad(loss, s)
        assert torch.isfinite(grad).all()


def test_teacher_side_is_constant() -> None:
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6, requires_grad=True)
    y = torch.randint(0, 6, (4,))
    (kd_loss(s, t) + nkd_loss(s, t, y)).backward()
    assert t.grad is None and s.grad is not None


def test_kd_gradient_is_t_times_probability_gap() -> None:
    # d/ds [T^2 KL(p_t || p_s)] = T (p_s - p_t) / N, with p at temperature T.
    s = torch.randn(3, 5, dtype=torch.float64)
    t = torch.randn(3, 5, dtype=torch.float64)
    s32 = s.float().requires_grad_()
    kd_loss(s32, t.float(), temperature=2.0).backward()
    want = 2.0 * (torch.softmax(s / 2, 1) - torch.softmax(t / 2, 1)) / 3
    torch.testing.assert_close(s32.grad.double(), want, rtol=1e-4, atol=1e-6)


def test_soft_target_uses_its_argmax() -> None:
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 2, 3])
    soft = torch.full((5, 4), 0.1)
    soft[torch.arange(5), y] = 0.7
    torch.testing.assert_close(nkd_loss(s, t, soft), nkd_loss(s, t, y))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_computed_in_float32_returned_in_input_dtype(dtype: torch.dtype) -> None:
    s, t = torch.randn(4, 7) * 20, torch.randn(4, 7) * 20
    y = torch.randint(0, 7, (4,))
    kd = kd_loss(s.to(dtype), t.to(dtype), temperature=8.0)
    nkd = nkd_loss(s.to(dtype), t.to(dtype), y, temperature=8.0, gamma=3.5)
    assert kd.dtype == dtype and nkd.dtype == dtype and torch.isfinite(kd) and torch.isfinite(nkd)
    # the inputs are rounded to dtype first; the float32 computation on those is what we get
    want = nkd_reference(s.to(dtype), t.to(dtype), y.tolist(), 8.0, 3.5)
    assert nkd.double().item() == pytest.approx(want, rel=1e-2 if dtype != torch.float64 else 1e-5)


def test_half_precision_large_scaled_term_does_not_overflow() -> None:
    # gamma * T^2 * (cross-entropy ~ 1e3) ~ 1e6 > float16's max: the sum is taken in float32.
    s = torch.tensor([[500.0, -500.0, 0.0, 10.0]], dtype=torch.float16)
    t = torch.tensor([[-500.0, 500.0, 0.0, -10.0]], dtype=torch.float16)
    value = nkd_loss(s.float(), t.float(), torch.tensor([2]), temperature=1.0, gamma=3.5)
    assert value.item() > 1e3  # the float32 value is large but finite


def test_error_messages() -> None:
    s = torch.randn(4, 5)
    with pytest.raises(ValueError, match="5 classes and teacher_logits has 3"):
        kd_loss(s, torch.randn(4, 3))
    with pytest.raises(ValueError, match="at least 2 classes"):
        nkd_loss(torch.randn(4, 1), torch.randn(4, 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels in \[0, 7\].*\[0, 4\]"):
        nkd_loss(s, s, torch.tensor([0, 1, 2, 7]))
    with pytest.raises(ValueError, match="temperature must be"):
        kd_loss(s, s, temperature=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        kd_loss(s, torch.full((4, 5), float("nan")))
    with pytest.raises(ValueError, match="soft target must have shape"):
        nkd_loss(s, s, torch.rand(4, 3))


# --------------------------------------------------------------------------- the cache
def _linear_teacher(classes: int = 7, features: int = 6) -> nn.Module:
    torch.manual_seed(3)
    net = nn.Linear(features, classes)
    with torch.no_grad():
        net.weight.mul_(4)
    return net


def _indexed_loader(n: int = 20, features: int = 6, shuffle: bool = True) -> DataLoader:
    x = torch.randn(n, features, generator=torch.Generator().manual_seed(1))
    data = IndexedTensorDataset(x, torch.zeros(n, dtype=torch.long))
    return DataLoader(data, batch_size=6, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def test_cache_rows_are_keyed_by_sample_index_and_exact_with_k_equal_c(tmp_path: Path) -> None:
    teacher = _linear_teacher()
    loader = _indexed_loader(shuffle=True)  # rows must land by index, not by order
    cache = build_teacher_cache(teacher, loader, tmp_path / "c", k=100)
    assert cache.k == 7 and cache.num_samples == 20 and cache.num_classes == 7
    x = loader.dataset.inputs
    index = torch.tensor([19, 0, 7, 7])
    want = teacher(x[index]).detach()
    torch.testing.assert_close(cache.logits(index), want, rtol=1e-3, atol=1e-2)  # float16 rounding


def test_cache_top_k_reconstruction_keeps_probabilities_and_rest_mass(tmp_path: Path) -> None:
    teacher = _linear_teacher()
    loader = _indexed_loader(shuffle=False)
    cache = build_teacher_cache(teacher, loader, tmp_path / "c", k=3)
    values, indices, _rest = cache.topk(torch.arange(20))
    assert values.dtype == torch.float16 and values.shape == (20, 3)
    full = teacher(loader.dataset.inputs).detach()
    rebuilt = cache.logits(torch.arange(20))
    p_full, p_rebuilt = full.softmax(1), rebuilt.softmax(1)
    in_top = torch.zeros_like(full, dtype=torch.bool).scatter_(1, indices, True)
    torch.testing.assert_close(p_rebuilt[in_top], p_full[in_top], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close((p_rebuilt * ~in_top).sum(1), (p_full * ~in_top).sum(1), rtol=2e-2, atol=1e-3)
    # the fill never outranks the k-th stored logit; the non-top-k classes are flat
    fill = rebuilt.masked_fill(in_top, float("-inf")).amax(1)
    assert (fill <= values.float().amin(1) + 1e-3).all()
    torch.testing.assert_close(rebuilt.masked_fill(in_top, 0).sum(1), fill * 4)


def test_reconstruct_logits_hand_case() -> None:
    rebuilt = reconstruct_logits(
        torch.tensor([[5.0]]), torch.tensor([[2]]), torch.tensor([math.log(3 * math.exp(1.0))]), 4
    )
    torch.testing.assert_close(rebuilt, torch.tensor([[1.0, 1.0, 5.0, 1.0]]))


def test_cache_errors(tmp_path: Path) -> None:
    teacher = _linear_teacher()
    cache = build_teacher_cache(teacher, _indexed_loader(), tmp_path / "c", k=2)
    with pytest.raises(IndexError, match="holds 20 samples"):
        cache.logits(torch.tensor([20]))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        build_teacher_cache(teacher, _indexed_loader(), tmp_path / "c", k=2)
    with pytest.raises(ValueError, match="incomplete: 5 of 25"):
        build_teacher_cache(teacher, _indexed_loader(), tmp_path / "d", k=2, num_samples=25)
    with pytest.raises(ValueError, match="carry no sample index"):
        build_teacher_cache(teacher, [(torch.randn(2, 6), torch.zeros(2))], tmp_path / "e", num_samples=2)
    with pytest.raises(FileNotFoundError, match="no teacher-logit cache"):
        TeacherLogitCache(tmp_path / "nowhere")


def test_cache_command_builds_from_a_classifier_checkpoint(tmp_path: Path) -> None:
    ckpt = _teacher_checkpoint(tmp_path)
    out = tmp_path / "cache"
    main(["--teacher", str(ckpt), "--out", str(out), "--k", "4", "--data-args", '{"train_fraction": 0.2}'])
    cache = TeacherLogitCache(out)
    dm = DigitsDataModule(train_fraction=0.2, return_index=True)
    dm.setup("fit")
    assert cache.num_samples == len(dm.dataset("train")) and cache.k == 4 and cache.source == str(ckpt)
    x = dm.splits["train"][0][:5]
    teacher = load_teacher(str(ckpt)).eval()
    want_top = teacher(x).detach().topk(4, dim=1).indices
    assert torch.equal(cache.topk(torch.arange(5))[1], want_top)


# --------------------------------------------------------------------------- the callback
def _teacher_checkpoint(tmp_path: Path, model: str = TINY) -> Path:
    """A tiny Classifier built by (timm) name, trained for a step on 8x8 digits, saved as a Lightning checkpoint."""
    path = tmp_path / f"teacher_{model}.ckpt"
    if path.exists():
        return path
    torch.manual_seed(0)
    module = Classifier(model, num_classes=10, in_chans=1)
    trainer = fast_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    trainer.save_checkpoint(path)
    return path


class RecordingDistillation(TeacherDistillation):
    """Keeps the inputs and value of each term, to compare with the functional loss."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.records: list[tuple[Tensor, Tensor, Tensor, Tensor, bool]] = []

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        teacher = self.teacher_logits(context)
        training = self.teacher.training if self.teacher is not None else False
        self.records.append((context.logits.detach(), teacher, context.target, value.detach(), training))
        return value


class TrainModeMeddler(RecordingDistillation):
    """Calls teacher.train() before every step, as a careless user callback might."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        if self.teacher is not None:
            self.teacher.train()


def _digits(**kwargs) -> DigitsDataModule:  # type: ignore[no-untyped-def]
    return DigitsDataModule(**{"batch_size": 16, **kwargs})


@pytest.mark.parametrize("loss", ["kd", "nkd"])
def test_trainer_run_adds_the_exact_term_and_keeps_teacher_frozen(loss: str) -> None:
    torch.manual_seed(0)
    teacher = TinyNet(width=8)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    callback = TrainModeMeddler(teacher, loss=loss, weight=0.7, temperature=2.0, gamma=2.5)
    module = Classifier(TinyNet(width=4))
    trainer = fast_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, datamodule=_digits())
    assert len(callback.records) == 3
    for student, t, target, value, teacher_training in callback.records:
        assert not teacher_training
        want = kd_reference(student, t, 2.0) if loss == "kd" else nkd_reference(student, t, target.tolist(), 2.0, 2.5)
        assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # eval mode: BatchNorm running stats untouched; frozen: weights untouched and no grads
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    metrics = trainer.logged_metrics
    assert f"train/loss_{loss}_step" in metrics or f"train/loss_{loss}" in metrics
    # never part of the student
    assert not any(p is q for p in module.parameters() for q in teacher.parameters())
    assert set(module.state_dict()) == set(Classifier(TinyNet(width=4)).state_dict())


def test_teacher_class_count_mismatch_fails_before_training_with_both_numbers() -> None:
    callback = TeacherDistillation(TinyNet(num_classes=5))
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    with pytest.raises(ValueError, match="teacher has 5 classes but the student has 10"):
        trainer.fit(Classifier(TinyNet()), datamodule=_digits())


def test_missing_teacher_is_a_clear_error() -> None:
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[TeacherDistillation()])
    with pytest.raises(ValueError, match="needs a teacher"):
        trainer.fit(Classifier(TinyNet()), datamodule=_digits())
    with pytest.raises(ValueError, match="loss must be one of"):
        TeacherDistillation(TinyNet(), loss="rkd")


def test_teacher_by_name_and_weights_and_by_classifier_checkpoint(tmp_path: Path) -> None:
    ckpt = _teacher_checkpoint(tmp_path)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    weights = tmp_path / "weights.pt"
    torch.save({k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}, weights)
    by_name = load_teacher(TINY, str(weights), 10, {"in_chans": 1})
    by_ckpt = load_teacher(str(ckpt))
    by_lightning_ckpt = load_teacher(TINY, str(ckpt), 10, {"in_chans": 1})
    assert teacher_fingerprint(by_name) == teacher_fingerprint(by_ckpt) == teacher_fingerprint(by_lightning_ckpt)
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        load_teacher(str(tmp_path / "missing.ckpt"))
    callback = RecordingDistillation(TINY, checkpoint=str(weights), teacher_kwargs={"in_chans": 1})
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(Classifier(TinyNet()), datamodule=_digits())
    assert callback.state_dict()["teacher"] == TINY
    assert callback.state_dict()["fingerprint"] == teacher_fingerprint(by_ckpt)


@pytest.mark.parametrize("vit_side", ["student", "teacher"])
def test_heterogeneous_cnn_vit_pairs_with_input_transform(vit_side: str) -> None:
    # The student sees 16x16 digits; the teacher gets them resized to 8x8 by the input transform.
    vit = {"in_chans": 1, "num_classes": 10, "patch_size": 4}
    torch.manual_seed(0)
    if vit_side == "student":
        teacher: nn.Module = TinyNet()
        student = Classifier("test_vit", img_size=16, **vit)
    else:
        teacher = load_teacher("test_vit", None, 10, {"in_chans": 1, "img_size": 8, "patch_size": 4})
        student = Classifier(TinyNet())
    callback = RecordingDistillation(teacher, input_transform=ResizeInput(8), loss="kd")
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(student, datamodule=_digits(image_size=16, batch_size=8))
    assert len(callback.records) == 1 and torch.isfinite(callback.records[0][3])


def test_cache_replaces_the_teacher_and_matches_online_distillation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = TinyNet().eval()
    dm = _digits(return_index=True, train_fraction=0.3)
    dm.setup("fit")
    loader = DataLoader(dm.dataset("train"), batch_size=64)
    build_teacher_cache(teacher, loader, tmp_path / "cache", k=10)
    cached = RecordingDistillation(cache=str(tmp_path / "cache"), loss="nkd", gamma=2.0)
    online = RecordingDistillation(teacher, loss="nkd", gamma=2.0)
    for callback in (cached, online):
        torch.manual_seed(1)
        trainer = fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback])
        trainer.fit(Classifier(TinyNet(width=4)), datamodule=_digits(return_index=True, train_fraction=0.3))
    for (s1, t1, _, v1, _), (s2, t2, _, v2, _) in zip(cached.records, online.records, strict=True):
        torch.testing.assert_close(s1, s2)
        torch.testing.assert_close(t1, t2, rtol=1e-3, atol=5e-3)  # float16 storage
        torch.testing.assert_close(v1, v2, rtol=1e-3, atol=1e-3)
    assert cached.teacher is None
    # batches without indices cannot use a cache
    trainer = fast_trainer(
        max_steps=1, limit_val_batches=0, callbacks=[TeacherDistillation(cache=str(tmp_path / "cache"))]
    )
    with pytest.raises(ValueError, match="carry sample indices"):
        trainer.fit(Classifier(TinyNet()), datamodule=_digits(train_fraction=0.3))


def test_bf16_mixed_precision_with_bf16_channels_last_teacher() -> None:
    callback = RecordingDistillation(TinyNet(), loss="nkd", precision="bf16", channels_last=True)
    trainer = fast_trainer(max_steps=2, limit_val_batches=0, precision="bf16-mixed", callbacks=[callback])
    trainer.fit(Classifier(TinyNet(width=4)), datamodule=_digits())
    assert callback.teacher is None  # released at teardown
    for _, teacher_logits, _, value, _ in callback.records:
        assert teacher_logits.dtype == torch.bfloat16 and torch.isfinite(value)


def _adamw(params):  # type: ignore[no-untyped-def]  # module level: picklable
    return torch.optim.AdamW(params, lr=0.01)


def _blob_module() -> Classifier:
    torch.manual_seed(0)
    return Classifier(TinyMLP(), optimizer=_adamw)


def test_resume_mid_training_reloads_the_same_teacher_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # The teacher is a Classifier built by name (so its checkpoint reloads by path), in eval mode.
    x, y = blob_data(n=32)
    images = x.view(32, 1, 4, 4).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # [32, 1, 8, 8]
    torch.manual_seed(5)
    named = Classifier(TINY, num_classes=4, in_chans=1)
    trainer = fast_trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(named, datamodule=TensorDataModule(images, y))
    teacher_ckpt = tmp_path / "teacher.ckpt"
    trainer.save_checkpoint(teacher_ckpt)

    def make_student() -> Classifier:
        torch.manual_seed(0)  # no BatchNorm, no dropout: the runs are deterministic
        return Classifier(TinyMLP(in_features=64), optimizer=_adamw)

    data = TensorDataModule(images, y, batch_size=8)  # 4 steps per epoch
    full = make_student()
    full_cb = TeacherDistillation(str(teacher_ckpt), loss="nkd", name="nkd")
    fast_trainer(max_epochs=2, limit_val_batches=0, callbacks=[full_cb]).fit(full, datamodule=data)

    first = make_student()
    first_trainer = fast_trainer(
        max_epochs=1, limit_val_batches=0, callbacks=[TeacherDistillation(str(teacher_ckpt), loss="nkd")]
    )
    first_trainer.fit(first, datamodule=data)
    mid = tmp_path / "mid.ckpt"
    first_trainer.save_checkpoint(mid)
    saved = torch.load(mid, map_location="cpu", weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if "TeacherDistillation" in k]
    assert state["teacher"] == str(teacher_ckpt) and state["fingerprint"]
    assert not any("teacher" in k for k in saved["state_dict"])  # the teacher is not in the student checkpoint

    resumed_cb = RecordingDistillation(None, loss="nkd")  # no teacher given: the checkpoint's is reloaded
    resumed = make_student()
    fast_trainer(max_epochs=2, limit_val_batches=0, callbacks=[resumed_cb]).fit(
        resumed, datamodule=data, ckpt_path=str(mid)
    )
    assert resumed_cb.teacher_source == str(teacher_ckpt) and resumed_cb.fingerprint == state["fingerprint"]
    assert len(resumed_cb.records) == 4
    for got, want in zip(resumed.parameters(), full.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class RankLoggingDistillation(TeacherDistillation):
    """Writes each rank's term value and where its teacher lives."""

    def __init__(self, teacher: nn.Module, out_dir: str) -> None:
        super().__init__(teacher, loss="kd", weight=0.5)
        self.out_dir = out_dir

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        model = context.trainer.strategy.model
        wrapped_params = {id(p) for p in model.parameters()} if model is not None else set()
        assert self.teacher is not None
        in_ddp = any(id(p) in wrapped_params for p in self.teacher.parameters())
        path = Path(self.out_dir) / f"rank{context.trainer.global_rank}.txt"
        with path.open("a") as fh:
            fh.write(f"{value.item():.6f} {type(model).__name__} {in_ddp} {self.teacher.training}\n")
        return value


@pytest.mark.ddp
def test_ddp_spawn_two_ranks_each_with_a_teacher(ddp_env: int, tmp_path: Path) -> None:
    x, y = blob_data(n=64)
    torch.manual_seed(1)
    teacher = TinyMLP()
    callback = RankLoggingDistillation(teacher, str(tmp_path))
    trainer = fast_trainer(strategy="ddp_spawn", devices=2, max_steps=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(_blob_module(), datamodule=TensorDataModule(x, y, batch_size=8))
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 3, lines
        for line in lines:
            value, wrapper, in_ddp, training = line.split()
            assert math.isfinite(float(value)) and float(value) > 0
            assert wrapper == "DistributedDataParallel" and in_ddp == "False" and training == "False"
    assert trainer.callback_metrics["train/loss_kd_epoch"] > 0


# --------------------------------------------------------------------------- recipes
@pytest.mark.slow
def test_digits_recipes_teacher_then_students(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_logits.cli import build_cli

    monkeypatch.chdir(tmp_path)  # recipes write under runs/
    fast = [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
    ]
    build_cli(["fit", "--config", str(ROOT / "recipes/distillation/digits_teacher.yaml"), *fast])
    teacher = tmp_path / "runs/distillation/teacher/teacher.ckpt"
    assert teacher.is_file()
    for loss in ("kd", "nkd"):
        recipe = ROOT / f"recipes/distillation/digits_student_{loss}.yaml"
        cli = build_cli(["fit", "--config", str(recipe), *fast, "--distillation.teacher", str(teacher)])
        assert f"train/loss_{loss}_epoch" in cli.trainer.callback_metrics


def test_cifar100_recipes_parse(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_logits.cli import build_cli

    for name in ("cifar100_resnet34_teacher.yaml", "cifar100_resnet34_resnet18_nkd.yaml"):
        with pytest.raises(SystemExit) as exit_info:
            build_cli(["fit", "--config", str(ROOT / "recipes/distillation" / name), "--print_config"])
        assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "gamma: 3.5" in printed and "temperature: 3.0" in printed and "resnet34" in printed

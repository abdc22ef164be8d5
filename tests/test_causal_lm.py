"""CausalLM on tiny Hugging Face Llama/GPT-2/Qwen2 models built from configs, and TeacherDistillation on it.

References are independent of our code: the cross-entropy is checked against the Hugging Face
model's own ``loss`` (its shift and -100 handling), packed rows against each document run alone,
and every distillation step against the float64 restatements of ``tests/test_distillation_losses``.
"""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.data.packing import pack_documents
from lightning_logits.loss_terms import StepContext
from lightning_logits.modules import CausalLM
from lightning_logits.modules.causal_lm import next_token_target
from lightning_logits.networks.causal_lm import build_causal_lm, causal_lm_logits
from lightning_logits.teacher_cache import build_teacher_cache
from tests.helpers import fast_trainer
from tests.sync_counter import HostReadCounter, counting_callbacks
from tests.test_distillation_losses import LM_NAMES, _np, jsd_ref, reference, skew_kl_ref

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed: pip install -e '.[dev]'"
)

VOCAB = 256


def llama(hidden: int = 32, vocab: int = VOCAB) -> Any:
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip


def gpt2(hidden: int = 32, vocab: int = VOCAB) -> Any:
    return transformers.GPT2Config(
        vocab_size=vocab, n_embd=hidden, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0
    )


def qwen2(hidden: int = 32, vocab: int = VOCAB) -> Any:
    return transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip


CONFIGS = {"llama": llama, "gpt2": gpt2, "qwen2": qwen2}


def hf_model(config: Any, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config)


def documents(count: int, seed: int, low: int = 3, high: int = 13) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


class PackedRows(Dataset):
    """``pack_documents`` rows as ``{"input_ids", "labels", "position_ids", "index"}`` samples."""

    def __init__(self, packed: dict[str, Tensor]) -> None:
        self.packed = packed

    def __len__(self) -> int:
        return self.packed["input_ids"].shape[0]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**{key: value[i] for key, value in self.packed.items()}, "index": i}


def packed_loader(batch_size: int = 4, seed: int = 0, length: int = 16) -> DataLoader:
    return DataLoader(PackedRows(pack_documents(documents(24, seed), length)), batch_size=batch_size)


def _sgd(params):  # type: ignore[no-untyped-def]  # module level: ddp_spawn pickles it
    return torch.optim.SGD(params, lr=0.05)


# --------------------------------------------------------------------------- targets and packing
def test_next_token_target_by_hand() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    assert next_token_target(ids).tolist() == [[2, 3, 4, 5, 6, -100]]
    labels = torch.tensor([[1, 2, -100, -100, 5, 6]])  # a prompt-masked span
    assert next_token_target(ids, labels).tolist() == [[2, -100, -100, 5, 6, -100]]
    right = torch.tensor([[1, 1, 1, 1, 0, 0]])  # right padding: nothing predicts or is predicted from a pad
    assert next_token_target(ids, attention_mask=right).tolist() == [[2, 3, 4, -100, -100, -100]]
    left = torch.tensor([[0, 0, 1, 1, 1, 1]])  # left padding: the first real token is not predicted from a pad
    assert next_token_target(ids, attention_mask=left).tolist() == [[-100, -100, 4, 5, 6, -100]]
    positions = torch.tensor([[0, 1, 0, 1, 2, 0]])  # three packed documents
    assert next_token_target(ids, position_ids=positions).tolist() == [[2, -100, 4, 5, -100, -100]]
    custom = torch.tensor([[1, 2, 3, -1, 5, 6]])
    assert next_token_target(ids, custom, ignore_index=-1).tolist() == [[2, 3, -100, 5, 6, -100]]
    with pytest.raises(ValueError, match="shape of input_ids"):
        next_token_target(ids, ids[:, :-1])


def test_pack_documents_by_hand_and_long_documents() -> None:
    packed = pack_documents([[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]], length=4)
    # the long document is cut at 4 tokens; [10, 11, 12] does not fit beside [8, 9] and starts a row
    assert packed["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 0], [8, 9, 0, 0], [10, 11, 12, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1, 0, 1], [0, 1, 2, 0]]
    assert packed["labels"].tolist() == [[1, 2, 3, 4], [5, 6, 7, -100], [8, 9, -100, -100], [10, 11, 12, -100]]
    fits = pack_documents([[1, 2], [3], [4]], length=4)  # several documents share a row
    assert fits["input_ids"].tolist() == [[1, 2, 3, 4]] and fits["position_ids"].tolist() == [[0, 1, 0, 0]]
    with pytest.raises(ValueError, match="document 1 is empty"):
        pack_documents([[1], []], length=4)
    with pytest.raises(ValueError, match="length must be a positive"):
        pack_documents([[1]], length=0)


# --------------------------------------------------------------------------- building
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_built_from_a_config_object_a_dict_or_an_instance(arch: str) -> None:
    config = CONFIGS[arch]()
    torch.manual_seed(0)
    from_object = CausalLM(config)
    assert type(from_object.model).__name__.endswith("ForCausalLM") or arch == "gpt2"
    assert from_object.hparams["model"]["model_type"] == config.model_type  # a dict: checkpoints rebuild it
    from_dict = CausalLM(config.to_dict())
    assert type(from_dict.model) is type(from_object.model)
    assert from_dict.model.config.hidden_size == config.hidden_size
    instance = hf_model(config, seed=0)
    assert CausalLM(instance).model is instance
    with pytest.raises(ValueError, match="needs its 'model_type'"):
        build_causal_lm({"hidden_size": 32})


def test_a_model_name_goes_to_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def fake_from_pretrained(name: str, **kwargs: Any) -> nn.Module:
        seen.append((name, kwargs))
        return hf_model(llama(), seed=0)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    module = CausalLM("Qwen/Qwen2.5-0.5B", model_kwargs={"dtype": "bfloat16"})
    assert seen == [("Qwen/Qwen2.5-0.5B", {"dtype": "bfloat16"})]
    assert module.hparams["model"] == "Qwen/Qwen2.5-0.5B"


def test_the_cli_parses_model_and_teacher_names(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_logits.cli import build_cli

    args = ["fit", "--model", "lightning_logits.modules.CausalLM", "--model.model", "HuggingFaceTB/SmolLM2-135M",
            "--model.optimizer", "torch.optim.AdamW", "--model.optimizer.lr", "3e-4",
            "--distillation", "lightning_logits.callbacks.distillation.TeacherDistillation",
            "--distillation.teacher", "hf:HuggingFaceTB/SmolLM2-360M", "--distillation.loss", "jsd",
            "--distillation.beta", "0.9", "--distillation.teacher_kwargs", '{"dtype": "bfloat16"}',
            "--data", "lightning_logits.data.DigitsDataModule", "--print_config"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        build_cli(args)
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: lightning_logits.modules.CausalLM" in printed
    assert "model: HuggingFaceTB/SmolLM2-135M" in printed and "lr: 0.0003" in printed
    assert "teacher: hf:HuggingFaceTB/SmolLM2-360M" in printed and "loss: jsd" in printed and "beta: 0.9" in printed


def test_a_teacher_given_as_hf_name_is_loaded_with_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    def fake_from_pretrained(name: str, **kwargs: Any) -> nn.Module:
        seen.append((name, kwargs))
        return hf_model(llama(hidden=64), seed=16)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    callback = Recording("hf:org/teacher", loss="reverse_kl", teacher_kwargs={"attn_implementation": "eager"})
    torch.manual_seed(0)
    trainer = fast_trainer(max_steps=1, limit_val_batches=0, callbacks=[callback])
    trainer.fit(CausalLM(llama(), optimizer=_sgd), train_dataloaders=packed_loader())
    assert seen == [("org/teacher", {"attn_implementation": "eager"})]
    assert callback.state_dict()["teacher"] == "hf:org/teacher"  # a resume reloads it by name
    _check_records(callback.records, "reverse_kl", 1.0)
    with pytest.raises(ValueError, match="loads its weights with from_pretrained"):
        from lightning_logits.networks import load_teacher

        load_teacher("hf:org/teacher", checkpoint="weights.pt")


# --------------------------------------------------------------------------- the cross-entropy
@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_loss_equals_the_hf_models_own_loss(arch: str) -> None:
    module = CausalLM(hf_model(CONFIGS[arch](), seed=1)).eval()  # GPT-2 has dropout
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    out = module.training_step({"input_ids": ids, "labels": labels}, 0)
    want = module.model(input_ids=ids, labels=labels, use_cache=False).loss
    torch.testing.assert_close(out["loss"], want, rtol=1e-5, atol=1e-6)
    assert out["logits"].shape == (3, 10, VOCAB) and out["target"].shape == (3, 10)
    assert (out["target"] != -100).sum() == 3 * 9 - 3  # labels 1..3 of row 0 are masked
    # a tuple batch (input_ids, labels) and a tensor of ids are read the same way
    torch.testing.assert_close(module.training_step((ids, labels), 0)["loss"], want, rtol=1e-5, atol=1e-6)
    plain = module.model(input_ids=ids, labels=ids, use_cache=False).loss
    torch.testing.assert_close(module.training_step(ids, 0)["loss"], plain, rtol=1e-5, atol=1e-6)


def _per_document_reference(model: nn.Module, docs: list[Tensor]) -> float:
    """Token-weighted mean of the HF loss of each document run alone (n - 1 predicted tokens each)."""
    total, count = 0.0, 0
    for doc in docs:
        if doc.numel() < 2:
            continue
        loss = model(input_ids=doc[None], labels=doc[None], use_cache=False).loss
        total += float(loss) * (doc.numel() - 1)
        count += doc.numel() - 1
    return total / count


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_packed_rows_equal_each_document_alone(arch: str) -> None:
    module = CausalLM(hf_model(CONFIGS[arch](), seed=3)).eval()
    docs = documents(6, seed=4)
    packed = pack_documents(docs, length=20)
    with torch.no_grad():
        out = module.training_step(dict(packed), 0)
        logits = out["logits"]
        row, start = 0, 0
        for doc in docs:  # the packing order: a document that does not fit starts the next row
            if start + doc.numel() > 20:
                row, start = row + 1, 0
            alone = module(doc[None])
            torch.testing.assert_close(logits[row, start : start + doc.numel()], alone[0], rtol=1e-4, atol=1e-5)
            start += doc.numel()
        assert out["loss"].item() == pytest.approx(_per_document_reference(module.model, docs), rel=1e-5)


def test_padded_batch_with_attention_mask_equals_each_sequence_alone() -> None:
    module = CausalLM(hf_model(llama(), seed=5)).eval()
    seqs = documents(3, seed=6, low=4, high=9)
    length = max(s.numel() for s in seqs)
    ids = torch.zeros(3, length, dtype=torch.long)
    mask = torch.zeros(3, length, dtype=torch.long)
    for i, s in enumerate(seqs):  # right padding
        ids[i, : s.numel()], mask[i, : s.numel()] = s, 1
    with torch.no_grad():
        loss = module.training_step({"input_ids": ids, "attention_mask": mask}, 0)["loss"]
        assert loss.item() == pytest.approx(_per_document_reference(module.model, seqs), rel=1e-5)


def test_batch_errors_name_the_problem() -> None:
    module = CausalLM(hf_model(llama(), seed=0))
    with pytest.raises(KeyError, match="needs 'input_ids'"):
        module.training_step({"tokens": torch.zeros(2, 3, dtype=torch.long)}, 0)
    with pytest.raises(ValueError, match="integer tensor"):
        module.training_step({"input_ids": torch.zeros(2, 3)}, 0)
    with pytest.raises(ValueError, match=r"vocabulary of 256"):
        bad = {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.tensor([[0, 300, 1]])}
        module.training_step(bad, 0)
    with pytest.raises(ValueError, match="lr_scheduler_interval"):
        CausalLM(llama(), lr_scheduler_interval="batch")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- training, logging, optimizer
def test_fit_logs_loss_and_perplexity_token_weighted_and_uses_the_configured_optimizer(tmp_path: Path) -> None:
    train, val = packed_loader(seed=0), packed_loader(seed=1)
    torch.manual_seed(0)
    module = CausalLM(llama(), optimizer=_sgd)
    before = [p.detach().clone() for p in module.parameters()]
    steps: list[tuple[float, int]] = []

    class Steps(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
            steps.append((float(outputs["loss"]), int((outputs["target"] != -100).sum())))

    trainer = fast_trainer(max_epochs=1, limit_train_batches=3, log_every_n_steps=1, callbacks=[Steps()])
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD) and trainer.optimizers[0].param_groups[0]["lr"] == 0.05
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    metrics = trainer.callback_metrics
    assert metrics["val/ppl"].item() == pytest.approx(math.exp(metrics["val/loss"].item()), rel=1e-5)
    assert "train/loss_step" in trainer.logged_metrics
    # train/ppl: exp of the epoch's mean over target tokens; train/loss: the mean of the step means
    token_mean = sum(loss * n for loss, n in steps) / sum(n for _, n in steps)
    assert metrics["train/ppl"].item() == pytest.approx(math.exp(token_mean), rel=1e-5)
    assert metrics["train/loss_epoch"].item() == pytest.approx(sum(loss for loss, _ in steps) / 3, rel=1e-5)
    # val/loss is the mean over all validation target tokens (not the mean of the batch means)
    module.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in val:
            ids, positions = batch["input_ids"], batch["position_ids"]
            target = next_token_target(ids, batch["labels"], position_ids=positions)
            logits = module(ids, position_ids=positions)
            total += F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum").item()
            count += int((target != -100).sum())
    assert metrics["val/loss"].item() == pytest.approx(total / count, rel=1e-5)
    # the checkpoint alone rebuilds the model (its config is recorded as a dict) with the trained weights
    trainer.save_checkpoint(tmp_path / "lm.ckpt")
    loaded = CausalLM.load_from_checkpoint(tmp_path / "lm.ckpt").eval()
    ids = batch["input_ids"]
    torch.testing.assert_close(loaded(ids), module(ids))


def test_scheduler_steps_every_step_by_default() -> None:
    torch.manual_seed(0)
    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    module = CausalLM(llama(), optimizer=_sgd, lr_scheduler=scheduler)
    trainer = fast_trainer(max_steps=3, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=packed_loader())
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**3)


# --------------------------------------------------------------------------- distillation
class Recording(TeacherDistillation):
    """Keeps (student logits, teacher logits, target, value, model inputs) of every step."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Tensor]]] = []

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        inputs = dict(context.output.get("model_inputs", {})) if isinstance(context.output, dict) else {}
        self.records.append(
            (context.logits.detach(), self.teacher_logits(context), context.target, value.detach(), inputs)
        )
        return value


def _check_records(records: list, name: str, temperature: float) -> None:  # type: ignore[type-arg]
    assert records
    for student, teacher, target, value, _ in records:
        keep = target != -100
        assert keep.any() and (~keep).any()  # packing leaves boundaries and padding out
        want = reference(name, student[keep], teacher[keep], target[keep], temperature)
        assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-6), name


@pytest.mark.parametrize("name", LM_NAMES)
def test_hf_student_distills_from_a_hf_teacher_with_each_token_loss(name: str) -> None:
    teacher = hf_model(llama(hidden=64), seed=10).eval()
    callback = Recording(teacher, loss=name, temperature=2.0, weight=0.5)
    torch.manual_seed(0)
    module = CausalLM(llama(), optimizer=_sgd)
    trainer = fast_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, train_dataloaders=packed_loader())
    assert len(callback.records) == 3
    _check_records(callback.records, name, 2.0)
    assert trainer.callback_metrics[f"train/loss_{name}_epoch"] >= 0
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_teacher_sees_the_students_packing_for_each_architecture(arch: str) -> None:
    teacher = hf_model(CONFIGS[arch](hidden=64), seed=11).eval()
    callback = Recording(teacher, loss="jsd", beta=0.9, chunk_size=7)
    torch.manual_seed(0)
    module = CausalLM(CONFIGS[arch](), optimizer=_sgd)
    fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(
        module, train_dataloaders=packed_loader(length=20)
    )
    _, teacher_logits, _, value, inputs = callback.records[0]
    # the teacher's logits on a packed row equal those of each of its documents alone
    ids, positions = inputs["input_ids"][0], inputs["position_ids"][0]
    starts = [*(positions == 0).nonzero().flatten().tolist(), ids.numel()]
    with torch.no_grad():
        for a, b in itertools.pairwise(starts):
            alone = teacher(input_ids=ids[None, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(teacher_logits[0, a:b], alone, rtol=1e-4, atol=1e-5)
    student, _, target, _, _ = callback.records[0]
    keep = target != -100
    want = jsd_ref(_np(student[keep]), _np(teacher_logits[keep]), 1.0, 0.9)
    assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_bf16_teacher_chunked() -> None:
    teacher = hf_model(llama(hidden=64), seed=15).eval()
    callback = Recording(teacher, loss="forward_kl", precision="bf16", chunk_size=16)
    torch.manual_seed(0)
    fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(
        CausalLM(llama(), optimizer=_sgd), train_dataloaders=packed_loader()
    )
    assert next(teacher.parameters()).dtype == torch.bfloat16
    for _, teacher_logits, _, _, _ in callback.records:
        assert teacher_logits.dtype == torch.bfloat16
    _check_records(callback.records, "forward_kl", 1.0)  # float32 inside on the bf16 teacher logits


def _fixed_length_loader(num: int = 12, length: int = 10) -> DataLoader:
    ids = torch.randint(0, VOCAB, (num, length), generator=torch.Generator().manual_seed(7))
    return DataLoader(TensorDataset(ids, ids.clone(), torch.arange(num)), batch_size=4)


def test_distills_from_a_top_k_cache_of_a_hf_teacher(tmp_path: Path) -> None:
    teacher = hf_model(llama(hidden=64), seed=12).eval()
    loader = _fixed_length_loader()
    cache = build_teacher_cache(teacher, loader, tmp_path / "top8", k=8)
    callback = Recording(cache=str(tmp_path / "top8"), loss="reverse_kl")
    torch.manual_seed(0)
    module = CausalLM(llama(), optimizer=_sgd)
    fast_trainer(max_steps=3, limit_val_batches=0, callbacks=[callback]).fit(module, train_dataloaders=loader)
    for step, (student, teacher_logits, target, value, _) in enumerate(callback.records):
        # the teacher side is the top-8 reconstruction of the cached rows of this batch
        index = torch.arange(4 * step, 4 * step + 4)
        torch.testing.assert_close(teacher_logits, cache.logits(index))
        keep = target != -100
        want = reference("reverse_kl", student[keep], teacher_logits[keep], target[keep], 1.0)
        assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    # with k = V the cache gives the online teacher's logits up to float16
    full = build_teacher_cache(teacher, loader, tmp_path / "full", k=VOCAB)
    ids = loader.dataset.tensors[0][:4]
    torch.testing.assert_close(full.logits(torch.arange(4)), teacher(ids).logits, rtol=1e-3, atol=1e-2)


def test_a_users_own_lightning_module_around_a_hf_model() -> None:
    class Mine(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = hf_model(llama(), seed=0)

        def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
            ids = batch[0]
            out = self.net(input_ids=ids, labels=ids, use_cache=False)
            target = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            return {"loss": out.loss, "logits": out.logits, "target": target}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    teacher = hf_model(llama(hidden=64), seed=13).eval()
    callback = Recording(teacher, loss="skew_kl", alpha=0.2)
    fast_trainer(max_steps=2, limit_val_batches=0, callbacks=[callback]).fit(
        Mine(), train_dataloaders=_fixed_length_loader()
    )
    for student, teacher_logits, target, value, _ in callback.records:
        keep = target != -100
        want = skew_kl_ref(_np(student[keep]), _np(teacher_logits[keep]), 1.0, 0.2)
        assert value.item() == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_token_loss_names_and_hyperparameters_on_the_callback() -> None:
    teacher = nn.Linear(2, 2)
    jsd = TeacherDistillation(teacher, loss="jsd")
    assert (jsd.name, jsd.temperature, jsd.loss_kwargs) == ("jsd", 1.0, {"beta": 0.5})
    assert TeacherDistillation(teacher, loss="skew_reverse_kl", alpha=0.3).loss_kwargs == {"alpha": 0.3}
    assert TeacherDistillation(teacher, loss="tv", beta=0.3).loss_kwargs == {}  # TV has no beta
    with pytest.raises(ValueError, match=r"beta of loss='jsd' must lie in \[0, 1\]"):
        TeacherDistillation(teacher, loss="jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"alpha of loss='skew_kl' must lie in \[0, 1\]"):
        TeacherDistillation(teacher, loss="skew_kl", alpha=-0.1)
    x = torch.randn(3, 4, 2)
    assert causal_lm_logits(nn.Linear(2, 5), {"input_ids": x}).shape == (3, 4, 5)  # a module without input_ids


def test_keyword_inputs_reach_a_compiled_models_original_forward() -> None:
    class Compiled(nn.Module):  # what torch.compile returns: forward(*args, **kwargs) around _orig_mod
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return self._orig_mod(*args, **kwargs)

    model = hf_model(llama(), seed=0).eval()
    packed = pack_documents(documents(4, seed=1), length=24)
    inputs = {"input_ids": packed["input_ids"], "position_ids": packed["position_ids"]}
    with torch.no_grad():
        want = model(**inputs, use_cache=False).logits
        torch.testing.assert_close(causal_lm_logits(Compiled(model), inputs), want)


# --------------------------------------------------------------------------- no host reads per step
def _reads(module: Any, callbacks: list, loader: DataLoader) -> HostReadCounter:  # type: ignore[type-arg]
    with HostReadCounter() as counter:
        start, end = counting_callbacks(counter, first=2, last=6)
        trainer = fast_trainer(max_steps=8, limit_val_batches=0, callbacks=[start, *callbacks, end])
        trainer.fit(module, train_dataloaders=loader)
    assert counter.steps == 4
    return counter


def test_causal_lm_and_token_distillation_add_no_host_reads_per_step() -> None:
    class Plain(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = hf_model(llama(), seed=0)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            logits = self.net(input_ids=batch[0], use_cache=False).logits
            return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[1][:, 1:].flatten())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def outside_transformers(counter: HostReadCounter) -> int:
        return sum(n for site, n in counter.sites.items() if "/transformers/" not in site)

    loader = _fixed_length_loader(num=32, length=8)
    floor = _reads(Plain(), [], loader)
    ours = _reads(CausalLM(hf_model(llama(), seed=0), optimizer=_sgd), [], loader)
    assert ours.total == floor.total, (dict(ours.sites), dict(floor.sites))
    teacher = hf_model(llama(hidden=64), seed=1).eval()
    distilled = _reads(
        CausalLM(hf_model(llama(), seed=0), optimizer=_sgd), [TeacherDistillation(teacher, loss="jsd")], loader
    )
    # transformers itself reads one value per forward pass (its mask/packing check): the teacher's pass adds
    # that one read per step, and our code none
    assert outside_transformers(distilled) == outside_transformers(floor), dict(distilled.sites)
    assert distilled.total - floor.total == floor.total - outside_transformers(floor) == distilled.steps


# --------------------------------------------------------------------------- the guide
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "guides" / "language-models.md"


def test_the_language_model_guide_examples_run(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.DOTALL)
    assert len(blocks) == 4  # the losses, the distillation example, the token-scale cache, the stdlib corpus
    for block in blocks:
        exec(compile(block, str(GUIDE), "exec"), {"__name__": "guide"})
    assert "train/loss_jsd_epoch" in capsys.readouterr().out


# --------------------------------------------------------------------------- two processes
class RankLogging(TeacherDistillation):
    def __init__(self, teacher: nn.Module, out_dir: str) -> None:
        super().__init__(teacher, loss="jsd", beta=0.5)
        self.out_dir = out_dir

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        target = context.target
        keep = target != -100
        want = reference("jsd", context.logits[keep], self.teacher_logits(context)[keep], target[keep], 1.0)
        with (Path(self.out_dir) / f"rank{context.trainer.global_rank}.txt").open("a") as fh:
            fh.write(f"{value.item():.8f} {want:.8f} {int(context.batch['index'][0])}\n")
        return value


@pytest.mark.ddp
def test_ddp_spawn_two_ranks_distill_a_hf_student(ddp_env: int, tmp_path: Path) -> None:
    teacher = hf_model(llama(hidden=64), seed=14).eval()
    callback = RankLogging(teacher, str(tmp_path))
    torch.manual_seed(0)
    module = CausalLM(llama(), optimizer=_sgd)
    trainer = fast_trainer(strategy="ddp_spawn", devices=2, max_steps=2, limit_val_batches=0, callbacks=[callback])
    trainer.fit(module, train_dataloaders=packed_loader(batch_size=2))
    first_samples = set()
    for rank in (0, 1):
        lines = (tmp_path / f"rank{rank}.txt").read_text().splitlines()
        assert len(lines) == 2
        for line in lines:
            got, want, first = line.split()
            assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6) and float(got) > 0
            first_samples.add(int(first))
    assert len(first_samples) == 4  # the two ranks saw different rows
    assert trainer.callback_metrics["train/loss_jsd_epoch"] > 0

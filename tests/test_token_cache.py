"""The token-scale teacher-logit cache: variable-length documents stored flat, read for packed rows.

References are independent of the cache: each document's rows are checked against the teacher run
on that document alone (``topk`` and the log-sum-exp of the other logits computed here), packed
reading against per-document reading, and the distillation term against the float64 restatements
of ``tests/test_distillation_losses`` on the logits the callback saw.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_logits.callbacks.distillation import TeacherDistillation
from lightning_logits.cli import cache_main, launch_teacher_cache
from lightning_logits.data.packing import pack_documents
from lightning_logits.loss_terms import StepContext
from lightning_logits.modules import CausalLM
from lightning_logits.teacher_cache import (
    BUILDING_FILE,
    TeacherLogitCache,
    TokenLogitCache,
    build_teacher_cache,
    build_token_cache,
    open_teacher_cache,
    token_bytes_per_token,
    token_fingerprint,
)
from tests.conftest import find_free_port
from tests.helpers import fast_trainer
from tests.sync_counter import HostReadCounter, counting_callbacks
from tests.test_distillation_losses import LM_NAMES, reference

transformers = pytest.importorskip(
    "transformers", reason="Hugging Face transformers is not installed: pip install -e '.[dev]'"
)

VOCAB = 256
TOKEN_FILES = ("values.npy", "indices.npy", "rest.npy", "tokens.npy", "offsets.npy", "written.npy", "meta.json")


def llama(hidden: int) -> Any:
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip


def hf_teacher(seed: int = 21) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(llama(hidden=48)).eval()


def documents(count: int = 14, seed: int = 0, low: int = 2, high: int = 20) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=g).tolist()
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


class CountingTeacher(nn.Module):
    """A small deterministic causal LM (an embedding and a causal running mean), counting its calls per rank.

    ``fail_at``: raise at that call (a build that stops in the middle).
    """

    def __init__(self, log_dir: str, fail_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.embed = nn.Embedding(VOCAB, 16)
        self.head = nn.Linear(16, VOCAB)
        self.log_dir, self.fail_at, self.calls = log_dir, fail_at, 0

    def forward(self, input_ids: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("teacher crashed")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(Path(self.log_dir) / f"calls_rank{rank}", "a") as log:
            log.write(f"{input_ids.shape[0]}\n")
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1)
        return self.head(torch.tanh(h)) * 3


def _calls(log_dir: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in log_dir.glob("calls_rank*"))


def _same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(TOKEN_FILES)
    for name in TOKEN_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), f"{name} differs between {a} and {b}"


def _direct_rows(teacher: nn.Module, doc: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher on the document alone: top-k logits, their ids, log-sum-exp of the others (float64)."""
    with torch.no_grad():
        logits = teacher(input_ids=doc[None], use_cache=False).logits[0].double()
    values, ids = logits.topk(k, dim=-1)
    others = logits.clone()
    others.scatter_(-1, ids, float("-inf"))
    return values, ids, others.logsumexp(-1)


# --------------------------------------------------------------------------- layout and round trip
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_each_documents_rows_equal_a_direct_teacher_pass(tmp_path: Path, dtype: str) -> None:
    teacher, docs = hf_teacher(), documents()
    cache = build_token_cache(teacher, docs, tmp_path / "c", k=8, batch_size=4, dtype=dtype)  # type: ignore[arg-type]
    lengths = [d.numel() for d in docs]
    assert cache.offsets.tolist() == np.concatenate([[0], np.cumsum(lengths)]).tolist()
    assert cache.num_tokens == sum(lengths) and cache.num_documents == len(docs) == len(cache)
    assert cache.values.shape == (sum(lengths), 8) and cache.indices.dtype == np.uint16
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["layout"] == "tokens" and meta["dtype"] == dtype and meta["num_classes"] == VOCAB
    assert meta["data_fingerprint"] == token_fingerprint(docs)
    assert meta["bytes_per_token"] == 8 * ({"float32": 4}.get(dtype, 2) + 2) + 4 + 2
    storage = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    for number, doc in enumerate(docs):
        values, ids, rest = cache.document(number)
        want_values, want_ids, want_rest = _direct_rows(teacher, doc, 8)
        assert values.dtype == storage and values.shape == (doc.numel(), 8)
        assert torch.equal(ids, want_ids)  # the same tokens, in the same (descending) order
        # stored values: the direct pass rounded to the storage type (padding changes float32 at ~1e-6)
        torch.testing.assert_close(values.double(), want_values.to(storage).double(), rtol=0, atol=2e-2)
        torch.testing.assert_close(rest.double(), want_rest, rtol=1e-5, atol=1e-5)
        tokens = np.array(cache.tokens[cache.offsets[number] : cache.offsets[number + 1]], dtype=np.int64)
        assert torch.equal(torch.from_numpy(tokens), doc)
    with pytest.raises(IndexError, match="document 14 out of range"):
        cache.document(14)


def test_with_k_equal_to_the_vocabulary_packed_logits_are_the_online_teachers(tmp_path: Path) -> None:
    teacher, docs = hf_teacher(), documents()
    cache = build_token_cache(teacher, docs, tmp_path / "full", k=VOCAB, dtype="float32")
    packed = pack_documents(docs, length=24, token_index=True)
    with torch.no_grad():  # the teacher on the packed rows, documents kept apart by their position ids
        online = teacher(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    got = cache.logits(packed["token_index"])
    real = packed["token_index"] >= 0
    torch.testing.assert_close(got[real], online[real], rtol=1e-4, atol=1e-4)


def test_bytes_per_token_formula() -> None:
    assert [token_bytes_per_token(k, 32000) for k in (8, 32, 64)] == [38, 134, 262]  # k*(2+2) + 4 + 2
    assert token_bytes_per_token(8, 128256) == 8 * (2 + 4) + 4 + 4  # int32 ids beyond 65,536 tokens
    assert token_bytes_per_token(8, 32000, "float32") == 8 * (4 + 2) + 4 + 2
    with pytest.raises(ValueError, match="dtype must be one of"):
        token_bytes_per_token(8, 100, "float64")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- packed reading
def test_packed_reading_equals_per_document_reading(tmp_path: Path) -> None:
    docs = documents(count=10, high=30)  # some longer than a row: cut into pieces
    cache = build_token_cache(CountingTeacher(str(tmp_path)), docs, tmp_path / "c", k=5, batch_size=3)
    packed = pack_documents(docs, length=16, token_index=True)
    index = packed["token_index"]
    real = index >= 0
    # the token ids at each flat row are the documents laid end to end, and padding has no row
    assert torch.equal(packed["input_ids"][real], torch.cat(docs)[index[real]])
    assert (packed["labels"][~real] == -100).all()
    values, ids, rest = cache.topk(index)
    assert values.shape == (*index.shape, 5) and ids.shape == (*index.shape, 5) and rest.shape == index.shape
    per_document = [cache.document(d) for d in range(len(docs))]
    flat_values, flat_ids, flat_rest = (torch.cat([part[i] for part in per_document]) for i in range(3))
    assert torch.equal(values[real], flat_values[index[real]])
    assert torch.equal(ids[real], flat_ids[index[real]]) and torch.equal(rest[real], flat_rest[index[real]])
    logits = cache.logits(index)
    assert logits.shape == (*index.shape, VOCAB) and torch.isfinite(logits).all()  # padding: a flat, finite row
    cache.check_tokens(index, packed["input_ids"])  # the packed tokens are the cached ones
    with pytest.raises(IndexError, match=r"token_index holds values in \[-1, \d+\] but the token cache"):
        cache.topk(torch.where(real, index + cache.num_tokens, index))
    other = packed["input_ids"].clone()
    other[0, 3] = (other[0, 3] + 1) % VOCAB
    with pytest.raises(ValueError, match=r"differ from those the token cache .* at 1 of"):
        cache.check_tokens(index, other)


# --------------------------------------------------------------------------- build errors and resume
def test_an_interrupted_build_resumes_without_asking_the_teacher_again(tmp_path: Path) -> None:
    docs = documents(count=13)
    clean = build_token_cache(CountingTeacher(str(tmp_path)), docs, tmp_path / "clean", k=4, batch_size=3, source="m")
    assert _calls(tmp_path) == 5 and clean.k == 4  # 13 documents, 3 per batch
    (tmp_path / "calls_rank0").unlink()
    out = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="teacher crashed"):
        build_token_cache(CountingTeacher(str(tmp_path), fail_at=3), docs, out, k=4, batch_size=3, source="m")
    assert (out / BUILDING_FILE).exists() and not (out / "meta.json").exists()
    assert np.load(out / "written.npy").tolist() == [True] * 6 + [False] * 7  # two batches written
    with pytest.raises(FileNotFoundError, match=r"missing meta\.json"):
        open_teacher_cache(out)
    with pytest.raises(FileExistsError, match="resume=True"):
        build_token_cache(CountingTeacher(str(tmp_path)), docs, out, k=4, batch_size=3, source="m")
    with pytest.raises(ValueError, match=r"cannot resume the token cache .* fingerprint"):
        build_token_cache(CountingTeacher(str(tmp_path)), docs[:-1], out, k=4, batch_size=3, source="m", resume=True)
    with pytest.raises(ValueError, match="dtype 'float16' \\(asked: 'float32'\\)"):
        build_token_cache(CountingTeacher(str(tmp_path)), docs, out, k=4, dtype="float32", source="m", resume=True)
    (tmp_path / "calls_rank0").unlink()
    resumed = build_token_cache(CountingTeacher(str(tmp_path)), docs, out, k=4, batch_size=3, source="m", resume=True)
    assert _calls(tmp_path) == 3  # only the batches never written
    assert resumed.data_fingerprint == clean.data_fingerprint
    _same_files(out, tmp_path / "clean")
    with pytest.raises(ValueError, match="document 1 is empty"):
        build_token_cache(CountingTeacher(str(tmp_path)), [[1], []], tmp_path / "e", k=2)


class ToyDocuments:
    """A DataModule-like class with ``documents(split)``, for ``lightning-logits-cache --layout tokens``."""

    def __init__(self, count: int = 9, seed: int = 0) -> None:
        self.count, self.seed = count, seed

    def documents(self, split: str) -> list[Tensor]:
        return documents(count=self.count, seed=self.seed if split == "train" else self.seed + 1)


def test_the_cache_command_builds_a_token_cache_from_a_saved_hf_teacher(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = hf_teacher()
    teacher.save_pretrained(tmp_path / "teacher")
    args = ["--teacher", f"hf:{tmp_path / 'teacher'}", "--data", "tests.test_token_cache.ToyDocuments"]
    args += ["--data-args", '{"count": 9}', "--layout", "tokens", "--k", "6", "--dtype", "bfloat16", "--device", "cpu"]
    cache_main([*args, "--out", str(tmp_path / "cli")])
    assert "wrote top-6 logits of" in capsys.readouterr().out
    build_token_cache(teacher, ToyDocuments(9).documents("train"), tmp_path / "direct", k=6, dtype="bfloat16")
    for name in TOKEN_FILES[:-1]:  # the arrays; meta.json records another source
        assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name
    meta = json.loads((tmp_path / "cli" / "meta.json").read_text())
    assert meta["data"]["class_path"] == "tests.test_token_cache.ToyDocuments" and meta["dtype"] == "bfloat16"
    with pytest.raises(SystemExit):
        cache_main(["--teacher", "x", "--out", str(tmp_path / "y"), "--dtype", "float32"])  # tokens only
    assert "--dtype float32 is for --layout tokens" in capsys.readouterr().err


def test_logits_beyond_float16_need_another_dtype(tmp_path: Path) -> None:
    class Loud(nn.Module):
        def forward(self, input_ids: Tensor) -> Tensor:
            return F.one_hot(input_ids, 8).float() * 1e6  # the real tokens' logits: 1e6, beyond float16

    with pytest.raises(ValueError, match=r"reach 1e\+06, beyond float16's range: build with dtype='bfloat16'"):
        build_token_cache(Loud(), [[1, 2], [3]], tmp_path / "a", k=2)
    cache = build_token_cache(Loud(), [[1, 2], [3]], tmp_path / "b", k=2, dtype="bfloat16")
    values, ids, _ = cache.document(0)
    assert values[:, 0].tolist() == [torch.tensor(1e6).to(torch.bfloat16).item()] * 2  # bfloat16 keeps the range
    assert ids[:, 0].tolist() == [1, 2]


def test_the_old_layouts_still_open(tmp_path: Path) -> None:
    rows = [(torch.randn(4, 3), torch.arange(4), torch.arange(4))]
    classes = open_teacher_cache(build_teacher_cache(nn.Linear(3, 5), rows, tmp_path / "rows", k=2, num_samples=4).path)
    assert isinstance(classes, TeacherLogitCache) and classes.values.shape == (4, 2) and classes.positions is None
    seqs = DataLoader([(torch.randint(0, VOCAB, (6,)), torch.zeros(6, dtype=torch.long), i) for i in range(3)])
    fixed = open_teacher_cache(build_teacher_cache(hf_teacher(), seqs, tmp_path / "seq", k=3).path)
    assert isinstance(fixed, TeacherLogitCache) and fixed.values.shape == (3, 6, 3) and fixed.positions == 6
    with pytest.raises(ValueError, match="layout None, not 'tokens'"):
        TokenLogitCache(tmp_path / "rows")


# --------------------------------------------------------------------------- distilling from it
class Checked(TeacherDistillation):
    """Writes each step's (value, independent reference, first token row) to ``<out_dir>/<name>_rank<r>.txt``."""

    def __init__(self, cache: str, loss: str, out_dir: str) -> None:
        super().__init__(cache=cache, loss=loss, name=f"c_{loss}")
        self.out_dir = out_dir

    def loss_term(self, context: StepContext) -> Tensor:
        value = super().loss_term(context)
        teacher = self.teacher_logits(context)
        token_index = context.batch["token_index"]
        reread = TokenLogitCache(self.cache_path).logits(token_index)  # type: ignore[arg-type]
        assert torch.equal(teacher, reread)  # the rows at the batch's token_index, rebuilt
        keep = context.target != -100
        want = reference(self.loss, context.logits[keep], teacher[keep], context.target[keep], self.temperature)
        line = f"{value.item():.8f} {want:.8f} {int(token_index.max())}\n"
        with (Path(self.out_dir) / f"{self.name}_rank{context.trainer.global_rank}.txt").open("a") as fh:
            fh.write(line)
        return value


def _rows(docs: list[Tensor], length: int = 16) -> list[dict[str, Tensor]]:
    packed = pack_documents(docs, length=length, token_index=True)
    return [{key: value[i] for key, value in packed.items()} for i in range(packed["input_ids"].shape[0])]


def _sgd(params):  # type: ignore[no-untyped-def]  # module level: ddp_spawn pickles it
    return torch.optim.SGD(params, lr=0.05)


def _check_logs(out_dir: Path, ranks: int, steps: int, losses: tuple[str, ...] = ("forward_kl", "jsd")) -> set[int]:
    seen = set()
    for loss in losses:
        for rank in range(ranks):
            lines = (out_dir / f"c_{loss}_rank{rank}.txt").read_text().splitlines()
            assert len(lines) == steps, (loss, rank, lines)
            for line in lines:
                got, want, last_row = line.split()
                assert float(got) == pytest.approx(float(want), rel=1e-5, abs=1e-6) and float(got) > 0
                seen.add(int(last_row))
    return seen


TOKEN_LOSSES = ("kd", *LM_NAMES)


def test_a_hf_causal_lm_distills_from_the_flat_cache_with_every_token_loss(tmp_path: Path) -> None:
    docs = documents(count=20)
    build_token_cache(hf_teacher(), docs, tmp_path / "c", k=8)
    callbacks = [Checked(str(tmp_path / "c"), loss, str(tmp_path)) for loss in TOKEN_LOSSES]
    torch.manual_seed(0)
    module = CausalLM(llama(hidden=32), optimizer=_sgd)
    with HostReadCounter() as counter:  # steps 1 and 2: after the first step's checks
        start, end = counting_callbacks(counter, first=1, last=3)
        trainer = fast_trainer(max_steps=3, limit_val_batches=0, callbacks=[start, *callbacks, end])
        trainer.fit(module, train_dataloaders=DataLoader(_rows(docs), batch_size=4))
    assert len(_check_logs(tmp_path, ranks=1, steps=3, losses=TOKEN_LOSSES)) == 3  # three different batches
    assert counter.steps == 2 and not [site for site in counter.sites if "/lightning_logits/" in site], counter.sites
    assert trainer.callback_metrics["train/loss_c_jsd_epoch"] > 0

    # other text than the cache's: refused on the first step
    other = TeacherDistillation(cache=str(tmp_path / "c"), loss="forward_kl")
    with pytest.raises(ValueError, match="token ids differ from those the token cache"):
        fast_trainer(max_steps=1, callbacks=[other]).fit(
            CausalLM(llama(hidden=32)), train_dataloaders=DataLoader(_rows(documents(count=20, seed=9)), batch_size=4)
        )
    # batches without token_index
    plain = [{k: v for k, v in row.items() if k != "token_index"} for row in _rows(docs)]
    with pytest.raises(ValueError, match=r"give batches .* a 'token_index'"):
        fast_trainer(max_steps=1, callbacks=[TeacherDistillation(cache=str(tmp_path / "c"), loss="jsd")]).fit(
            CausalLM(llama(hidden=32)), train_dataloaders=DataLoader(plain, batch_size=4)
        )


@pytest.mark.ddp
def test_two_ranks_build_the_one_rank_bytes_and_two_ranks_distill_from_it(ddp_env: int, tmp_path: Path) -> None:
    docs = documents(count=20)
    one = build_token_cache(CountingTeacher(str(tmp_path)), docs, tmp_path / "one", k=8, batch_size=3)
    (tmp_path / "calls_rank0").unlink()
    teacher = CountingTeacher(str(tmp_path))
    two = launch_teacher_cache(teacher, docs, tmp_path / "two", devices=2, layout="tokens", k=8, batch_size=3)
    assert isinstance(two, TokenLogitCache) and two.num_tokens == one.num_tokens
    calls = {p.name: len(p.read_text().splitlines()) for p in tmp_path.glob("calls_rank*")}
    assert calls == {"calls_rank0": 4, "calls_rank1": 3}  # 7 batches dealt 0, 2, 4, 6 / 1, 3, 5
    _same_files(tmp_path / "one", tmp_path / "two")

    logs = tmp_path / "logs"
    logs.mkdir()
    callbacks = [Checked(str(tmp_path / "two"), loss, str(logs)) for loss in ("forward_kl", "jsd")]
    torch.manual_seed(0)
    module = CausalLM(llama(hidden=32), optimizer=_sgd)
    os.environ["MASTER_PORT"] = str(find_free_port())  # not the launcher's port, which may still be closing
    trainer = fast_trainer(strategy="ddp_spawn", devices=2, max_steps=2, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, train_dataloaders=DataLoader(_rows(docs), batch_size=2))
    assert len(_check_logs(logs, ranks=2, steps=2)) == 4  # the two ranks read different rows


# --------------------------------------------------------------------------- the benchmark
def test_the_token_cache_benchmark_smoke_measures_the_formulas_bytes_and_reads() -> None:
    from benchmarks.bench_token_cache import main

    table = main(["--smoke", "--k", "8", "32"])
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]
    sizes = [r for r in rows if len(r) == 8 and r[0].isdigit()]
    reads = [r for r in rows if len(r) == 6 and r[0].isdigit()]
    assert [r[0] for r in sizes] == ["8", "32"] and [r[0] for r in reads] == ["8", "32"]
    for k, formula, measured, values, indices, rest, tokens, _ in sizes:
        assert int(formula) == int(k) * 4 + 6  # float16 values, uint16 ids (vocabulary 1000)
        # the files hold the formula's bytes plus the per-document arrays and the .npy headers
        assert int(formula) < float(measured) < int(formula) + 2
        assert float(values) == pytest.approx(2 * int(k), abs=0.5) and float(indices) == pytest.approx(
            2 * int(k), abs=0.5
        )
        assert float(rest) == pytest.approx(4, abs=0.5) and float(tokens) == pytest.approx(2, abs=0.5)
    for _, _, sequential, random, in_memory, _ in reads:
        assert float(sequential) > 0 and float(random) > 0 and float(in_memory) > 0

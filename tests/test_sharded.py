"""Every method under Lightning's ModelParallelStrategy (FSDP2), 2 CPU processes with gloo.

The equivalence check follows Lightning's and torchtune's FSDP tests: the same method, the same
global batch of 16, run as 2 sharded processes (ModelParallelStrategy), 2 replicated processes
(DDP) and 1 process, must give the same loss trajectory over 20 steps. Rank r of 2 takes samples
r, r + 2, ... in order, so with mean losses and no BatchNorm the global mean loss of a step is the
mean of the two ranks' losses. Tolerances: 1e-6 between FSDP2 and DDP (the same arithmetic on
other memory layouts), 1e-5 against one process (gradients are averaged in another order).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_logits.networks.sharding import find_blocks, fsdp_mesh, shard_model, sharded_bytes
from lightning_logits.teacher_cache import build_teacher_cache
from tests import parallel_worker
from tests.parallel import launch

pytestmark = pytest.mark.ddp

SCENARIOS = [
    "ce", "kd", "nkd", "dkd", "dist", "dhkd", "kd_sharded_teacher", "kd_cache",
    "uskd", "lawn_all", "lawn_final", "er", "erace", "uer", "diagnostics",
]  # fmt: skip
# Methods whose loss is a mean of per-sample terms: one process with the global batch is the reference.
# DIST correlates over the batch, USKD normalizes its weak logits over the batch, and the replay
# buffers are per rank, so for those the reference is DDP.
PER_SAMPLE = [
    "ce",
    "kd",
    "nkd",
    "dkd",
    "dhkd",
    "kd_sharded_teacher",
    "kd_cache",
    "lawn_all",
    "lawn_final",
    "diagnostics",
]


def _read(folder: Path, scenario: str, rank: int) -> dict[str, Any]:
    return json.loads((folder / f"{scenario}.rank{rank}.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sharded")
    cache = root / "cache"
    dataset = parallel_worker.IndexedData(16).dataset
    build_teacher_cache(parallel_worker.teacher(), DataLoader(dataset, batch_size=32), cache, k=4)
    common = ["--scenarios", ",".join(SCENARIOS), "--cache", str(cache)]
    folders = {kind: root / kind for kind in ("mps", "ddp", "one")}
    launch(
        [
            "--strategy",
            "mps",
            "--out",
            str(folders["mps"]),
            *common,
            "--scenarios",
            ",".join([*SCENARIOS, "mowst", "ce_bf16_checkpointing"]),
        ]
    )
    launch(["--strategy", "ddp", "--out", str(folders["ddp"]), *common])
    parallel_worker.main(["--strategy", "single", "--out", str(folders["one"]), *common, "--batch-size", "16"])
    return folders


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_run_matches_ddp_and_one_process(runs: dict[str, Path], scenario: str) -> None:
    sharded = [_read(runs["mps"], scenario, r) for r in (0, 1)]
    replicated = [_read(runs["ddp"], scenario, r) for r in (0, 1)]
    for s, d in zip(sharded, replicated, strict=True):
        assert s["world_size"] == d["world_size"] == 2
        assert len(s["losses"]) == 20
        torch.testing.assert_close(torch.tensor(s["losses"]), torch.tensor(d["losses"]), rtol=0, atol=1e-6)
        # FSDP2 really sharded the student (DDP did not), and training moved the loss
        assert s["student_sharded"] and s["head_weight_type"] == "DTensor"
        assert not d["student_sharded"] and d["head_weight_type"] == "Parameter"
        assert s["losses"][-1] < s["losses"][0]
    if scenario in PER_SAMPLE:
        one = _read(runs["one"], scenario, 0)["losses"]
        mean = (torch.tensor(sharded[0]["losses"]) + torch.tensor(sharded[1]["losses"])) / 2
        torch.testing.assert_close(mean, torch.tensor(one), rtol=0, atol=1e-5)


@pytest.mark.parametrize("scenario", ["dhkd", "uskd"])
def test_auxiliary_heads_are_sharded_trained_and_saved(runs: dict[str, Path], scenario: str) -> None:
    head = {"dhkd": "dual_head", "uskd": "uskd"}[scenario]
    for rank in (0, 1):
        facts = _read(runs["mps"], scenario, rank)
        assert facts["aux_sharded"] == {head: True}
        assert facts["aux_in_state_dict"] == [
            f"lightning_logits_aux.{head}.bias",
            f"lightning_logits_aux.{head}.weight",
        ]
        assert _read(runs["ddp"], scenario, rank)["aux_sharded"] == {head: False}


def test_teacher_sharding_full_shards_the_frozen_teacher(runs: dict[str, Path]) -> None:
    for rank in (0, 1):
        sharded = _read(runs["mps"], "kd_sharded_teacher", rank)
        assert sharded["teacher_param_types"] == ["DTensor"] and not sharded["teacher_requires_grad"]
        assert _read(runs["mps"], "kd", rank)["teacher_param_types"] == ["Parameter"]  # replicated by default
        assert _read(runs["ddp"], "kd_sharded_teacher", rank)["teacher_param_types"] == ["Parameter"]


@pytest.mark.parametrize("scenario", ["lawn_all", "lawn_final"])
def test_lawn_holds_whole_tensor_norms_across_shards(runs: dict[str, Path], scenario: str) -> None:
    reference = _read(runs["ddp"], scenario, 0)
    for rank in (0, 1):
        sharded = _read(runs["mps"], scenario, rank)
        assert sharded["lawn_targets"].keys() == reference["lawn_targets"].keys() and sharded["lawn_targets"]
        for name, target in sharded["lawn_targets"].items():
            # held at the target, which is the whole weight's norm at the switch (the DDP run's)
            assert sharded["lawn_norms"][name] == pytest.approx(target, rel=1e-5)
            assert target == pytest.approx(reference["lawn_targets"][name], rel=1e-6)


def test_diagnostics_agree_under_sharding(runs: dict[str, Path]) -> None:
    sharded, replicated = (
        _read(runs["mps"], "diagnostics", 0)["metrics"],
        _read(runs["ddp"], "diagnostics", 0)["metrics"],
    )
    assert "diagnostics/val/ece" in sharded
    assert sharded.keys() == replicated.keys()
    for key, value in sharded.items():
        assert value == pytest.approx(replicated[key], rel=1e-5, abs=1e-6), key


def test_bf16_mixed_precision_and_activation_checkpointing_train_under_sharding(runs: dict[str, Path]) -> None:
    for rank in (0, 1):
        full = _read(runs["mps"], "ce", rank)
        mixed = _read(runs["mps"], "ce_bf16_checkpointing", rank)
        assert mixed["student_sharded"] and mixed["param_dtypes"] == ["torch.float32"]  # sharded weights stay fp32
        assert mixed["checkpointed"] == ["model.body.0"] and full["checkpointed"] == []  # the block is recomputed
        got, want = torch.tensor(mixed["losses"]), torch.tensor(full["losses"])
        assert not torch.equal(got, want)  # bf16 compute changed the numbers...
        torch.testing.assert_close(got, want, rtol=0, atol=0.02)  # ...by bf16 rounding only
        assert got[-1] < got[0]


def test_mowst_refuses_model_parallel_with_the_strategy_to_use(runs: dict[str, Path]) -> None:
    for rank in (0, 1):
        error = _read(runs["mps"], "mowst", rank)["error"]
        assert error is not None and "Mowst does not run under ModelParallelStrategy" in error
        assert "strategy='ddp'" in error


@pytest.mark.parametrize("scenarios", [["ce", "kd_sharded_teacher", "uskd", "lawn_all", "diagnostics"]])
def test_default_model_parallel_strategy_trains_with_the_same_batches_on_every_rank(
    tmp_path: Path, scenarios: list[str]
) -> None:
    # The issue's own call: ModelParallelStrategy() with devices=2 and nothing but the callbacks. On one
    # node its data_parallel_size is 1, so both ranks get every batch; we shard over the tensor-parallel
    # ranks (memory) and each rank's run equals one process with the per-rank batch. (Replay is left
    # out here: each rank draws from its own buffer, so identical batches still give different steps.)
    names = ",".join(scenarios)
    launch(["--strategy", "mps_default", "--out", str(tmp_path / "mps"), "--scenarios", names])
    parallel_worker.main(["--strategy", "single", "--out", str(tmp_path / "one"), "--scenarios", names])
    for scenario in scenarios:
        one = torch.tensor(_read(tmp_path / "one", scenario, 0)["losses"])
        for rank in (0, 1):
            facts = _read(tmp_path / "mps", scenario, rank)
            assert facts["student_sharded"], scenario
            torch.testing.assert_close(torch.tensor(facts["losses"]), one, rtol=0, atol=1e-5, msg=scenario)


# --------------------------------------------------------------------------- pure helpers, no processes


def test_find_blocks_on_timm_torch_and_sequential_models() -> None:
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=4, depth=3)
    assert find_blocks(vit) == ["blocks.0", "blocks.1", "blocks.2"]
    resnet = timm.create_model("resnet18", num_classes=4)
    assert find_blocks(resnet)[:2] == ["layer1.0", "layer1.1"] and len(find_blocks(resnet)) == 8
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True), num_layers=2)
    assert find_blocks(encoder) == ["layers.0", "layers.1"]
    stack = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_blocks(stack) == ["0", "2"]  # the ReLU holds nothing
    assert find_blocks(vit, ["blocks.1", "blocks.1.attn"]) == ["blocks.1"]  # the outer unit wins
    with pytest.raises(ValueError, match=r"pattern 'blocks\.9' matches no module"):
        find_blocks(vit, ["blocks.9"])


def test_shard_model_off_needs_no_mesh_and_on_refuses_a_missing_one() -> None:
    stack = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert shard_model(stack, None, blocks="off") == []
    with pytest.raises(ValueError, match="needs the device mesh"):
        shard_model(stack, None)
    assert fsdp_mesh(None) is None


def test_sharded_bytes_counts_parameters_gradients_and_optimizer_state() -> None:
    layer = nn.Linear(3, 2)
    optimizer = torch.optim.Adam(layer.parameters())
    assert sharded_bytes(layer, optimizer) == {"parameters": 32, "gradients": 0, "optimizer": 0, "total": 32}
    layer(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    counts = sharded_bytes(layer, optimizer)
    # Adam: exp_avg and exp_avg_sq per parameter (32 bytes each) and a float32 step per parameter
    assert counts["gradients"] == 32 and counts["optimizer"] == 2 * 32 + 2 * 4
    assert counts["total"] == 32 + 32 + 72


# --------------------------------------------------------------------------- checkpoints


def test_kill_9_and_resume_from_the_sharded_checkpoint_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    # dual-head KD (an auxiliary head), LAWN past its switch (targets) and ER (per-rank buffers) at once
    common = ["--strategy", "mps", "--scenarios", "resume", "--steps", "30", "--methods", "dhkd,lawn,er"]
    launch([*common, "--out", str(tmp_path / "full"), "--ckpt-dir", str(tmp_path / "ck_full")])
    with pytest.raises(AssertionError, match="exit -9"):
        launch([*common, "--out", str(tmp_path / "crash"), "--ckpt-dir", str(tmp_path / "ck"), "--crash-at", "17"])
    last = tmp_path / "ck" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2 and (last / "meta.pt").is_file()
    meta = torch.load(last / "meta.pt", weights_only=False)
    assert meta["global_step"] == 15
    states = {key.split("{")[0]: value for key, value in meta["callbacks"].items()}
    assert states["LAWN"]["phase"] == "constrained" and len(states["ExperienceReplay"]["rank_states"]) == 2
    launch([*common, "--out", str(tmp_path / "resumed"), "--ckpt-dir", str(tmp_path / "ck"), "--resume"])
    for rank in (0, 1):
        full = _read(tmp_path / "full", "resume", rank)
        resumed = _read(tmp_path / "resumed", "resume", rank)
        assert sorted(map(int, resumed["losses"])) == list(range(15, 30))
        for step, loss in resumed["losses"].items():
            assert loss == pytest.approx(full["losses"][step], abs=1e-6), step
        for name, value in full["params"].items():
            torch.testing.assert_close(torch.tensor(resumed["params"][name]), torch.tensor(value), rtol=0, atol=1e-6)
        assert resumed["lawn_norms"] == full["lawn_norms"]


def test_consolidated_checkpoint_loads_as_a_classifier_and_as_a_teacher(tmp_path: Path) -> None:
    from lightning_logits.cli import consolidate_checkpoint, consolidate_main
    from lightning_logits.modules import Classifier
    from lightning_logits.networks import load_teacher

    launch(["--strategy", "mps", "--scenarios", "timm_checkpoint", "--out", str(tmp_path), "--ckpt-dir", str(tmp_path)])
    trained = _read(tmp_path, "timm", 0)
    assert "model.layer1.0" in trained["units"] and "model" in trained["units"]  # blocks, then the root
    consolidate_main([str(tmp_path / "last.ckpt"), str(tmp_path / "one.ckpt")])
    module = Classifier.load_from_checkpoint(tmp_path / "one.ckpt")
    for name, param in module.named_parameters():
        torch.testing.assert_close(param.detach(), torch.tensor(trained["params"][name]), rtol=0, atol=0)
    teacher = load_teacher(str(tmp_path / "one.ckpt"))  # what TeacherDistillation(teacher="<file>") calls
    torch.testing.assert_close(teacher.fc.weight.detach(), torch.tensor(trained["params"]["model.fc.weight"]))
    with pytest.raises(FileNotFoundError, match="no sharded checkpoint"):
        consolidate_checkpoint(tmp_path / "one.ckpt", tmp_path / "again.ckpt")


def test_memory_benchmark_smoke_shows_one_nth_per_rank(tmp_path: Path) -> None:
    from benchmarks import memory_sharded

    out = tmp_path / "memory.md"
    memory_sharded.main(["--smoke", "--out", str(out)])
    rows = {
        line.split("|")[1].strip(): line.split("|") for line in out.read_text().splitlines() if line.startswith("| ")
    }
    # student total ratio (column 6) and teacher ratio (column 8), sharded over 2 ranks: about 1/2
    assert float(rows["ddp"][6]) == 1.0 and float(rows["ddp"][8]) == 1.0
    assert 0.49 < float(rows["fsdp2"][6]) < 0.56 and float(rows["fsdp2"][8]) == 1.0
    assert 0.49 < float(rows["fsdp2_teacher_full"][6]) < 0.56 and 0.49 < float(rows["fsdp2_teacher_full"][8]) < 0.56

"""The continual recipes and benchmarks run: digits recipes for real (briefly), CIFAR ones parse."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_logits.callbacks import ContinualMetrics
from lightning_logits.callbacks.replay import ERACE, UER, ExperienceReplay, ReplayCallback
from lightning_logits.cli import build_cli
from lightning_logits.data.streams import ClassIncrementalStream
from lightning_logits.modules.classifier import Classifier
from lightning_logits.networks import ReducedResNet18

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes" / "replay"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "callback"),
    [("uer_digits.yaml", UER), ("er_digits.yaml", ExperienceReplay), ("er_ace_digits.yaml", ERACE)],
)
def test_digits_recipe_trains(recipe: str, callback: type, tmp_path: Path) -> None:
    cli = build_cli(
        [
            "fit",
            "--config",
            str(RECIPES / recipe),
            "--trainer.max_epochs=2",
            "--trainer.limit_train_batches=4",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    replay = next(c for c in cli.trainer.callbacks if isinstance(c, callback))  # type: ignore[attr-defined]
    assert replay.buffer.seen == 2 * 4 * 10
    metrics = next(c for c in cli.trainer.callbacks if isinstance(c, ContinualMetrics))  # type: ignore[attr-defined]
    assert metrics.accuracy_matrix is not None and metrics.accuracy_matrix.shape == (5, 5)
    assert list(tmp_path.rglob("accuracy_matrix.png"))
    assert "continual/avg_acc" in cli.trainer.callback_metrics


@pytest.mark.parametrize(
    ("recipe", "source", "buffer", "tasks"),
    [("uer_cifar10.yaml", "cifar10", 200, 5), ("uer_cifar100.yaml", "cifar100", 1000, 10)],
)
def test_cifar_recipes_parse(recipe: str, source: str, buffer: int, tasks: int) -> None:
    cli = build_cli(["--config", str(RECIPES / recipe)], run=False)
    uer = next(c for c in cli.trainer.callbacks if isinstance(c, UER))  # type: ignore[attr-defined]
    assert uer.buffer_size == buffer and uer.replay_batch_size == 10 and uer.augment is None
    assert isinstance(cli.datamodule, ClassIncrementalStream)
    assert cli.datamodule.source == source and cli.datamodule.num_tasks == tasks
    assert cli.datamodule.data_augmentation is False  # the ER/UER protocol: no augmentation
    assert cli.trainer.max_epochs == tasks and cli.trainer.reload_dataloaders_every_n_epochs == 1
    # the literature's reduced ResNet18, 160-d features into the head
    assert isinstance(cli.model.model, ReducedResNet18)  # type: ignore[attr-defined]
    assert cli.model.model.fc.in_features == 160  # type: ignore[attr-defined]


def test_reduced_resnet18_is_found_by_name_everywhere() -> None:
    import timm
    import torch

    net = timm.create_model("reduced_resnet18", num_classes=100, in_chans=1)
    assert isinstance(net, ReducedResNet18) and net.get_classifier().out_features == 100
    assert net.forward_head(net.forward_features(torch.randn(2, 1, 32, 32)), pre_logits=True).shape == (2, 160)
    assert net.layer4[0].conv1.stride == (2, 2) and net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    # ~1.1M parameters at nf=20 with 100 classes (the literature reports 1.09M)
    assert 1.0e6 < sum(p.numel() for p in net.parameters()) < 1.2e6
    classifier = Classifier("reduced_resnet18", num_classes=10, in_chans=3)
    assert isinstance(classifier.model, ReducedResNet18) and classifier(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("reduced_resnet18", pretrained=True)
    # a fresh process: importing only the factory module registers the name before timm.is_model
    code = "from lightning_logits.networks.factory import build_model; print(type(build_model('reduced_resnet18', 10)))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ReducedResNet18" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES.glob("*.yaml")))
def test_every_recipe_builds_the_reduced_resnet18(recipe: str) -> None:
    in_chans = ['--model.init_args.model_kwargs={"in_chans": 1}', "--data.init_args.flatten=false"]
    extra = in_chans if "digits" in recipe else []
    cli = build_cli(["--config", str(RECIPES / recipe), "--model.init_args.model=reduced_resnet18", *extra], run=False)
    assert isinstance(cli.model.model, ReducedResNet18)  # type: ignore[attr-defined]
    assert any(isinstance(c, ReplayCallback) for c in cli.trainer.callbacks)  # type: ignore[attr-defined]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["uer_digits.yaml", "er_digits.yaml", "er_ace_digits.yaml"])
def test_digits_recipes_train_the_reduced_resnet18(recipe: str, tmp_path: Path) -> None:
    cli = build_cli(
        [
            "fit",
            "--config",
            str(RECIPES / recipe),
            "--model.init_args.model=reduced_resnet18",
            '--model.init_args.model_kwargs={"in_chans": 1}',
            "--data.init_args.flatten=false",
            "--data.init_args.image_size=16",  # at 8x8 its last map is 1x1: see the classifier's error
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert isinstance(cli.model.model, ReducedResNet18)  # type: ignore[attr-defined]
    replay = next(c for c in cli.trainer.callbacks if isinstance(c, ReplayCallback))  # type: ignore[attr-defined]
    stream = cli.datamodule  # type: ignore[attr-defined]
    seen = len(stream._train_index[0])  # every sample of the first task, its last (short) batch too
    assert replay.buffer.seen == seen and replay.buffer.inputs is not None
    assert tuple(replay.buffer.inputs.shape[1:]) == (1, 16, 16)  # images, not flattened vectors
    assert cli.trainer.global_step == -(-seen // 10)


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_accuracy_benchmark_smoke(tmp_path: Path) -> None:
    proc = _run(["-m", "benchmarks.accuracy_replay", "--smoke", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = (
        "| stream | model | method | buffer | final avg acc (%) | forgetting (%) | BWT (%) | learning acc (%) | seeds |"
    )
    assert header in proc.stdout
    for method in ("finetune | -", "er | 50", "er_ace | 50", "uer-all | 50"):
        assert f"| digits | mlp | {method} |" in proc.stdout, proc.stdout
    assert (tmp_path / "replay_accuracy_smoke.md").exists()
    assert (tmp_path / "replay_heatmaps_digits_mlp_smoke.png").exists()
    assert "split digits, mlp: final average accuracy" in proc.stdout and "| method | M=50 |" in proc.stdout


def test_merged_report_pivots_every_run_by_method_and_buffer(tmp_path: Path) -> None:
    from benchmarks.accuracy_replay import _HEADER, merge

    def table(rows: list[str], seconds: int) -> str:
        return "\n".join(["### t", "", _HEADER, "|---|", *rows, "", f"UER temperature 0.09; {seconds} s"])

    (tmp_path / "a.md").write_text(
        table(
            [
                "| digits | mlp | finetune | - | 17.0 ± 1.0 | 90.0 ± 2.0 | -90.0 ± 2.0 | 88.0 ± 1.0 | 5 |",
                "| digits | mlp | er | 50 | 70.0 ± 3.0 | 20.0 ± 4.0 | -20.0 ± 4.0 | 90.0 ± 1.0 | 5 |",
                "| digits | mlp | er | 200 | 80.0 ± 3.0 | 10.0 ± 4.0 | -10.0 ± 4.0 | 90.0 ± 1.0 | 5 |",
            ],
            11,
        )
    )
    (tmp_path / "b.md").write_text(
        table(["| mnist1d | mlp | er | 100 | 30.0 ± 3.0 | 50.0 ± 4.0 | -50.0 ± 4.0 | 70.0 ± 1.0 | 5 |"], 22)
    )
    report = merge([tmp_path / "a.md", tmp_path / "b.md"], tmp_path / "all.md")
    assert (tmp_path / "all.md").read_text().strip() == report.strip()
    assert merge([tmp_path / "all.md"], tmp_path / "again.md").count("| digits | mlp |") == 3  # summaries not rows
    assert report.count("| digits | mlp |") == 3 and "| mnist1d | mlp | er | 100 |" in report
    assert (
        f"{tmp_path.name}/a.md: UER temperature 0.09; 11 s" in report and "/b.md: UER temperature 0.09; 22 s" in report
    )
    digits = report[report.index("split digits, mlp") :]
    assert "| method | M=50 | M=200 |" in digits  # buffers sorted as numbers
    assert "| finetune | 17.0 ± 1.0 / 90.0 ± 2.0 | 17.0 ± 1.0 / 90.0 ± 2.0 |" in digits
    assert "| er | 70.0 ± 3.0 / 20.0 ± 4.0 | 80.0 ± 3.0 / 10.0 ± 4.0 |" in digits
    assert "split mnist1d, mlp" in report and "| er | 30.0 ± 3.0 / 50.0 ± 4.0 |" in report


def test_mnist1d_stream_is_class_incremental(tmp_path: Path) -> None:
    from benchmarks.mnist1d import MNIST1DDataModule

    # a tiny stand-in cache (the real one is generated by the mnist1d package on first use)
    x, y = torch.randn(60, 40), torch.arange(60) % 10
    torch.save({"x": x, "y": y, "x_test": x[:20], "y_test": y[:20]}, tmp_path / "mnist1d.pt")
    source = MNIST1DDataModule(val_fraction=0, shape=(1, 1, 40), cache=tmp_path / "mnist1d.pt")
    stream = ClassIncrementalStream(source, num_tasks=5, batch_size=10, seed=0)
    stream.setup("fit")
    inputs, labels = next(iter(stream.train_dataloader()))
    assert tuple(inputs.shape[1:]) == (1, 1, 40) and set(labels.tolist()) <= set(stream.tasks[0])


@pytest.mark.slow
def test_speed_benchmark_smoke() -> None:
    proc = _run(["-m", "benchmarks.speed", "--suite", "replay", "--smoke", "--no-memory"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "### speed: replay" in proc.stdout and "| uer | er |" in proc.stdout
    assert "buffer share:" in proc.stdout


@pytest.mark.slow
def test_peers_benchmark_smoke(tmp_path: Path) -> None:
    # The optional `peers` extra (avalanche-lib): never needed by the main suite.
    pytest.importorskip("avalanche", reason="the peer benchmark needs the optional 'peers' extra (avalanche-lib)")
    proc = _run(["-m", "benchmarks.peers_replay", "--smoke", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in (
        "| er | 50 | ours |",
        "| er | 50 | avalanche |",
        "| er_ace | 50 | ours |",
        "| er_ace | 50 | avalanche |",
    ):
        assert row in proc.stdout, proc.stdout
    assert "throughput ratio ours / Avalanche per task" in proc.stdout
    assert (tmp_path / "replay_peers_smoke.md").exists()

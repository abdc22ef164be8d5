"""The lightning-logits command: config printing, typo errors, a real fit, and DDP from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_logits.cli import build_cli

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def test_print_config_shows_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(QUICKSTART), "--trainer.max_epochs=3", "--print_config"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "class_path: lightning_logits.modules.Classifier" in out
    assert "max_epochs: 3" in out and "in_chans: 1" in out


def test_yaml_typo_names_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICKSTART.read_text().replace("num_classes: 10", "num_clases: 10"))
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(bad)])
    assert exit_info.value.code != 0
    assert "num_clases" in capsys.readouterr().err


def test_wrong_type_names_the_key(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(QUICKSTART), "--data.init_args.batch_size=many"])
    assert "batch_size" in capsys.readouterr().err


def _run_cli(
    args: list[str], tmp_path: Path, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lightning_logits.cli", "fit", "--config", str(QUICKSTART), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)


SMALL = [
    "--model.init_args.model=resnet10t",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
]


@pytest.mark.slow
def test_fit_writes_csv_logs_and_checkpoints(tmp_path: Path) -> None:
    proc = _run_cli(list(SMALL), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = list((tmp_path / "runs" / "quickstart").glob("version_*/metrics.csv"))
    assert metrics and "val/acc" in metrics[0].read_text().splitlines()[0]
    assert list((tmp_path / "runs" / "quickstart").glob("version_*/checkpoints/last.ckpt"))


@pytest.mark.ddp
@pytest.mark.slow
def test_cli_runs_two_process_ddp_on_cpu(tmp_path: Path, ddp_env: int) -> None:
    args = [*SMALL, "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    proc = _run_cli(args, tmp_path, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(ddp_env)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in log and "GLOBAL_RANK: 1, MEMBER: 2/2" in log
    assert list((tmp_path / "runs" / "quickstart").glob("version_*/checkpoints/last.ckpt"))


# ----------------------------------------------------------------------------------------------
# Every method parameter of every recipe can be overridden with one flag: --<method key>.<parameter>

RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))


def _method_sections(recipe: Path) -> dict[str, dict]:
    import yaml

    from lightning_logits.cli import METHOD_SECTIONS

    config = yaml.safe_load(recipe.read_text()) or {}
    return {key: config[key] for key in METHOD_SECTIONS if isinstance(config.get(key), dict)}


def _flag_value(value: object) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def test_method_callbacks_live_in_their_own_sections() -> None:
    # A method callback in trainer.callbacks could not be reached by --<key>.<parameter>.
    for recipe in RECIPES:
        text = recipe.read_text()
        for name in ("TeacherDistillation", "USKD", "LAWN", "UER", "ExperienceReplay", "ERACE"):
            in_list = [line for line in text.splitlines() if line.strip().startswith("- class_path") and name in line]
            assert not in_list, f"{recipe.name}: put {name} in its method section, not in trainer.callbacks"


@pytest.mark.parametrize("recipe", [r for r in RECIPES if _method_sections(r)], ids=lambda p: p.name)
def test_every_method_parameter_of_every_recipe_is_overridable(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import inspect

    import yaml

    from lightning_logits.cli import METHOD_SECTIONS

    flags: list[str] = []
    expected: dict[tuple[str, str], object] = {}
    for key, section in _method_sections(recipe).items():
        module_name, _, class_name = section["class_path"].rpartition(".")
        callback_class = getattr(__import__(module_name, fromlist=[class_name]), class_name)
        assert issubclass(callback_class, METHOD_SECTIONS[key])
        init_args = section.get("init_args") or {}
        for name, parameter in inspect.signature(callback_class.__init__).parameters.items():
            if name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            value = init_args.get(name, None if parameter.default is inspect.Parameter.empty else parameter.default)
            if callable(value) or isinstance(value, tuple):
                continue  # not expressible as a flag value; still reachable as a YAML mapping
            if isinstance(value, bool) or value is None or isinstance(value, (str, list, dict)):
                new = value
            elif isinstance(value, int):
                new = value + 1
            elif isinstance(value, float):
                new = value * 0.5 if value else 0.25
            flags.append(f"--{key}.{name}={_flag_value(new)}")
            expected[(key, name)] = new
    assert flags, f"{recipe.name} has a method section but no parameters"
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(recipe), *flags, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err[-2000:]
    printed = yaml.safe_load(capsys.readouterr().out)
    for (key, name), value in expected.items():
        got = printed[key]["init_args"][name]
        if isinstance(value, float):
            assert got == pytest.approx(value), f"--{key}.{name} did not reach the callback"
        else:
            assert got == value, f"--{key}.{name} did not reach the callback"


def test_a_method_flag_reaches_the_instantiated_callback() -> None:
    recipe = ROOT / "recipes" / "uskd" / "digits_resnet18_uskd.yaml"
    cli = build_cli(["--config", str(recipe), "--uskd.alpha=0.37", "--trainer.logger=false"], run=False)
    (uskd,) = [c for c in cli.trainer.callbacks if type(c).__name__ == "USKD"]  # type: ignore[attr-defined]
    assert uskd.alpha == pytest.approx(0.37)

"""Config merging, the promised error messages, batch/LR scaling and `phenoscale config`."""

from __future__ import annotations

import dataclasses
import inspect
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
from omegaconf import OmegaConf

from phenoscale.cli import main
from phenoscale.config import (
    OWNED_TRAINER_ARGS,
    TRAINER_PASSTHROUGH,
    ConfigError,
    TrainerConfig,
    load_config,
    plan_batch,
    save_config,
)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT_FILES = sorted(
    [*(REPO / "configs" / "experiments").glob("*.yaml"), *(REPO / "configs" / "paper").glob("*.yaml")]
)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def test_merge_order_defaults_then_yaml_then_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer:\n  max_steps: 7\n  log_every_n_steps: 3\nrun:\n  name: a\n")
    cfg = load_config(path, ["trainer.max_steps=9"])
    assert cfg.trainer.max_steps == 9  # override beats YAML
    assert cfg.trainer.log_every_n_steps == 3  # YAML beats default
    assert cfg.trainer.accumulate_grad_batches == 1  # default
    assert cfg.run.run_dir == "runs/a"  # interpolation of run.name


def test_unknown_key_in_yaml_names_file_key_and_allowed_keys(tmp_path: Path) -> None:
    path = write(tmp_path, "trainer:\n  max_step: 7\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message
    assert "unknown key 'trainer.max_step'" in message
    assert "Allowed keys of section 'trainer'" in message
    assert "max_steps: int = 1000" in message and "checkpoint_every_n_steps" in message


def test_unknown_top_level_key_lists_sections() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trainr.max_steps=3"])
    message = str(info.value)
    assert "override 'trainr.max_steps=3'" in message and "unknown key" in message
    for section in ("data:", "model:", "optim:", "eval:", "trainer:", "scaling:", "run:"):
        assert section in message


def test_wrong_type_names_key_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["trainer.max_steps=ten"])
    message = str(info.value)
    assert "bad value for 'trainer.max_steps'" in message and "'ten'" in message
    assert "max_steps: int = 1000" in message


def test_enum_lists_allowed_values() -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, ["scaling.lr_rule=cubic"])
    message = str(info.value)
    assert "scaling.lr_rule" in message and "cubic" in message
    assert "one of none, linear, sqrt" in message


def test_package_checks_run_before_anything_starts() -> None:
    # ModelConfig.__post_init__ validates the family; it must fire at load, not at build time
    with pytest.raises(ConfigError, match="unknown model.family"):
        load_config(None, ["model.family=resnet"])
    with pytest.raises(ConfigError, match="trainer.precision='fp8'"):
        load_config(None, ["trainer.precision=fp8"])
    with pytest.raises(ConfigError, match="override 'max_steps'"):
        load_config(None, ["max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_trainer_passthrough_names_trainer_config_fields_lightning_takes() -> None:
    accepted = set(inspect.signature(pl.Trainer.__init__).parameters)
    own = {f.name for f in dataclasses.fields(TrainerConfig)}
    assert set(TRAINER_PASSTHROUGH) <= accepted & own & set(OWNED_TRAINER_ARGS)


@pytest.mark.parametrize(("rule", "factor"), [("none", 1.0), ("linear", 2.0), ("sqrt", math.sqrt(2))])
def test_batch_plan(rule: str, factor: float) -> None:
    overrides = [
        "trainer.accumulate_grad_batches=4",
        "optim.lr=1e-4",
        f"scaling.lr_rule={rule}",
        "scaling.base_batch_size=64",
    ]
    at_base = plan_batch(load_config(None, overrides), per_device=8, devices=2, num_nodes=1)
    assert at_base.effective == 64 and at_base.lr == pytest.approx(1e-4)  # base batch: lr as tuned
    cfg = load_config(None, overrides)
    plan = plan_batch(cfg, per_device=8, devices=2, num_nodes=2)
    assert plan.effective == 128
    assert plan.lr == pytest.approx(1e-4 * factor)
    assert cfg.scaling.effective_batch_size == 128 and cfg.scaling.lr == pytest.approx(plan.lr)
    assert "128 = 8 per device x 2 devices x 2 nodes x 4 accumulation" in plan.describe()


def test_saved_config_round_trips_with_derived_values(tmp_path: Path) -> None:
    cfg = load_config(None, ["run.name=x", "scaling.lr_rule=linear", "scaling.base_batch_size=16"])
    plan_batch(cfg, per_device=4, devices=2, num_nodes=1)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(cfg, resolve=True)
    assert again.scaling.effective_batch_size == 8 and again.run.run_dir == "runs/x"
    # reused on another topology: derived values are recomputed, with a warning
    with pytest.warns(UserWarning) as record:
        plan_batch(again, per_device=4, devices=4, num_nodes=1)
    messages = sorted(str(w.message).split(";")[0] for w in record)
    assert messages == [
        "scaling.effective_batch_size=8 is derived, not an input",
        "scaling.lr=5e-05 is derived, not an input",
    ]
    assert again.scaling.effective_batch_size == 16


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_config_loads_and_prints(path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["config", str(path)]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert set(printed) == {"data", "model", "optim", "eval", "trainer", "scaling", "run"}


def test_config_command_reports_errors(capsys: pytest.CaptureFixture) -> None:
    assert main(["config"]) == 0
    assert "max_steps: 1000" in capsys.readouterr().out
    assert main(["config", "--section", "trainer", "trainer.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("max_steps: 5") and "data:" not in out
    assert main(["config", str(EXPERIMENT_FILES[0]), "trainer.bogus=1"]) == 2
    assert "unknown key 'trainer.bogus'" in capsys.readouterr().err


def test_config_files_layer_in_order(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = tmp_path / "model.yaml"
    model.write_text("model:\n  family: wsl\n  drop_path: 0.3\noptim:\n  lr: 3.0e-5\n")
    site = tmp_path / "site.yaml"
    site.write_text("model:\n  drop_path: 0.0\ntrainer:\n  max_steps: 50\n")
    assert main(["config", str(model), str(site), "optim.lr=1e-4", "--section", "model"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert (printed.family, printed.drop_path) == ("wsl", 0.0)  # the later file wins
    cfg = load_config([model, site], ["optim.lr=1e-4"])
    assert (cfg.optim.lr, cfg.trainer.max_steps, cfg.model.family) == (1e-4, 50, "wsl")
    assert main(["config", str(model), "nonexistent.yaml"]) == 2
    assert "'nonexistent.yaml' is neither a config file nor a key=value override" in capsys.readouterr().err

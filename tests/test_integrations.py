"""The tools ML engineers already run: loggers, callbacks and Trainer options by config, MFU, quiet output."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import polars as pl
import pytest
from omegaconf import OmegaConf

from phenoscale.config import ConfigError, load_config
from phenoscale.fitting import fit
from run_helpers import TINY, run_cli, train_cmd

RECALL_ONLY = ["trainer.evaluate=true", "eval.clusters=null", "eval.benchmarks=[recall]"]


def tiny(screen: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={screen / 'shards'}", f"run.run_dir={run_dir}", "data.num_workers=0", *extra]


def wandb_records(path: Path) -> list:
    """Records of an offline W&B run file (wandb's LevelDB-style log: 7-byte header, 32 KiB blocks,
    records split into chunks of type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, chunk, out = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero padding to the block end
            pos += left
            continue
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def wandb_run(run_dir: Path) -> dict:
    """Per offline W&B run directory: its run id, history rows and config keys."""
    runs = {}
    for directory in sorted((run_dir / "logs" / "wandb").glob("offline-run-*")):
        records = wandb_records(next(directory.glob("run-*.wandb")))
        run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
        history = [
            {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records
            if r.WhichOneof("record_type") == "history"
        ]
        config = {u.key for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
        images = sorted(p.name.rsplit("_", 2)[0] for p in directory.glob("files/media/images/eval/*.png"))
        runs[directory.name] = {"id": run_id, "history": history, "config": config, "images": images}
    return runs


def test_csv_mlflow_wandb_get_metrics_config_and_figures_and_a_resume_appends(
    screen: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")  # so that teardown removes what fit sets
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")
    run_dir = tmp_path / "run"
    common = [
        *RECALL_ONLY,
        f"eval.annotations=[{screen / 'truth' / 'relationships.csv'}]",
        "trainer.loggers=[csv,mlflow,wandb]",
        "trainer.wandb.offline=true",
        "trainer.checkpoint_every_n_steps=4",
    ]
    fit(load_config(TINY, tiny(screen, run_dir, "trainer.max_steps=4", *common)))  # epoch 1, EFAAR at step 4
    ids = json.loads((run_dir / "logs" / "logger_ids.json").read_text())
    result = fit(load_config(TINY, tiny(screen, run_dir, "trainer.max_steps=8", *common)))  # resumed: epoch 2
    assert result.resumed_from is not None and result.global_step == 8
    assert json.loads((run_dir / "logs" / "logger_ids.json").read_text()) == ids

    # csv: one attempt per launch, the resolved config as hparams
    hparams = OmegaConf.load(run_dir / "logs" / "csv" / "attempt_1" / "hparams.yaml")
    assert hparams.trainer.loggers == ["csv", "mlflow", "wandb"] and hparams.effective_batch_size == 8
    assert (
        pl.read_csv(run_dir / "logs" / "csv" / "attempt_1" / "metrics.csv")["eval/recall_mean"].drop_nulls().len() == 1
    )

    # mlflow (file store in the run dir): one run, its metrics over both launches, config, figures
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run_dir / "logs" / "mlflow").as_uri())
    experiment = client.get_experiment_by_name("phenoscale")
    assert [r.info.run_id for r in client.search_runs([experiment.experiment_id])] == [ids["mlflow"]]
    loss_steps = [m.step for m in client.get_metric_history(ids["mlflow"], "train/loss")]
    assert min(loss_steps) < 4 <= max(loss_steps)  # both launches' steps in the same run
    assert len(client.get_metric_history(ids["mlflow"], "eval/recall_relationships")) == 2
    params = client.get_run(ids["mlflow"]).data.params
    assert params["model/family"] == "camae" and params["effective_batch_size"] == "8"
    figures = {
        a.path
        for step in ("step=00000004", "step=00000008")
        for a in client.list_artifacts(ids["mlflow"], f"figures/{step}")
    }
    assert {"figures/step=00000004/recall.png", "figures/step=00000008/recall.png"} <= figures

    # wandb (offline): two launches, one run id; metrics, config and figures in each
    runs = wandb_run(run_dir)
    assert len(runs) == 2 and {r["id"] for r in runs.values()} == {ids["wandb"]}
    for run in runs.values():
        assert any("train/loss" in row for row in run["history"])
        assert sum("eval/recall_relationships" in row for row in run["history"]) == 1
        assert {"model", "trainer", "effective_batch_size"} <= run["config"]
        assert "recall" in run["images"]
    # and the reports behind the figures, in the run directory
    assert (run_dir / "reports" / "step=00000008" / "report.md").is_file()


def test_user_callback_trainer_extra_and_mfu(screen: Path, tmp_path: Path) -> None:
    run_dir, record = tmp_path / "run", tmp_path / "steps.tsv"
    callback = f"{{class_path: run_helpers.StepRecorder, init_args: {{path: '{record}', label: yaml}}}}"
    cfg = load_config(
        TINY,
        tiny(
            screen,
            run_dir,
            "trainer.max_steps=6",
            "trainer.loggers=[csv]",
            f"trainer.callbacks=[{callback}]",
            "trainer.extra={profiler: simple}",
            "trainer.peak_flops=1e10",
        ),
    )
    assert fit(cfg).global_step == 6
    rows = [line.split("\t") for line in record.read_text().splitlines()]
    assert rows == [["yaml", str(step), "SimpleProfiler"] for step in range(1, 7)]

    metrics = pl.read_csv(run_dir / "logs" / "csv" / "attempt_0" / "metrics.csv")
    flops_per_crop = OmegaConf.load(run_dir / "logs" / "csv" / "attempt_0" / "hparams.yaml").flops_per_crop
    assert flops_per_crop > 1e6  # counted (a 2-block ViT on 32 x 32 crops), not a placeholder
    rates = metrics.drop_nulls("train/device/mfu")
    assert rates.height >= 2  # every log interval once the window (one interval) is full
    assert rates["train/device/flops_per_sec"].to_list() == pytest.approx(
        [crops * flops_per_crop for crops in rates["train/device/samples_per_sec"]]
    )
    assert rates["train/device/mfu"].to_list() == pytest.approx([f / 1e10 for f in rates["train/device/flops_per_sec"]])
    assert metrics["train/samples"].drop_nulls().to_list() == [16.0, 32.0, 48.0]  # crops, every 2 steps


def test_no_mfu_on_cpu_without_a_peak(screen: Path, tmp_path: Path) -> None:
    fit(load_config(TINY, tiny(screen, tmp_path / "run", "trainer.max_steps=4", "trainer.loggers=[csv]")))
    metrics = pl.read_csv(tmp_path / "run" / "logs" / "csv" / "attempt_0" / "metrics.csv")
    assert "train/device/flops_per_sec" in metrics.columns and "train/device/mfu" not in metrics.columns


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "trainer.extra={val_chek_interval: 0.5}",
            r"trainer.extra.val_chek_interval: not an argument of "
            r"lightning.Trainer .*\nAllowed keys of trainer.extra: .*val_check_interval",
        ),
        ("trainer.extra={max_steps: 3}", r"trainer.extra.max_steps: set trainer.max_steps instead"),
        ("trainer.extra={logger: false}", r"trainer.extra.logger: phenoscale sets it itself"),
        (
            "trainer.loggers=[csv,neptune]",
            r"trainer.loggers=\['csv', 'neptune'\]: each at most once, of csv, tensorboard",
        ),
    ],
)
def test_bad_trainer_options_fail_at_config_time(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [override])


def test_bad_callback_fails_before_anything_starts(screen: Path, tmp_path: Path) -> None:
    for spec, message in (
        ("{class_path: run_helpers.NoSuchCallback}", "cannot import it"),
        ("{class_path: run_helpers.free_port}", "not a lightning.pytorch.Callback class"),
        ("{class_path: run_helpers.StepRecorder, init_args: {pth: x}}", "bad init_args"),
    ):
        cfg = load_config(TINY, tiny(screen, tmp_path / "run", f"trainer.callbacks=[{spec}]"))
        with pytest.raises(ConfigError, match=rf"trainer.callbacks\[0\] .*{message}"):
            fit(cfg)
        assert not (tmp_path / "run").exists()


WARNING_LOCATION = re.compile(r"^(\S+\.py):\d+: ", re.MULTILINE)


@pytest.mark.slow
def test_a_tiny_fit_prints_no_warning_of_ours(screen: Path, tmp_path: Path) -> None:
    """stdout is a pipe here: no progress bar, log lines instead; stderr has no warning that
    phenoscale's code raises or causes, no advertisement and no FLOP-less model summary."""
    done = run_cli(
        train_cmd(
            *tiny(
                screen, tmp_path / "run", *RECALL_ONLY, f"eval.annotations=[{screen / 'truth' / 'relationships.csv'}]"
            )
        )
    )
    assert done.returncode == 0, done.stderr[-3000:]
    err = done.stderr
    # none at all: Lightning's LeafSpec deprecation, the one third-party warning, is filtered by the fit
    assert not WARNING_LOCATION.findall(err), err
    for noise in ("Warning", "💡", "validation_step", "Total estimated model params", "weights_only", "it/s]"):
        assert noise not in err + done.stdout, noise
    assert "[phenoscale] step 4/8 epoch 0 train/loss" in err and "GFLOPs per training crop" in err

    quiet = run_cli([*train_cmd(*tiny(screen, tmp_path / "quiet")), "-q"])
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    assert "[phenoscale]" not in quiet.stderr and "Seed set" not in quiet.stderr
    assert quiet.stdout.strip().startswith("[phenoscale] finished at step 8")

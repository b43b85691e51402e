"""Trackers (``ltdist.train.tracking``): a tiny in-process training run logs to W&B in offline
mode and to a local MLflow store under its output folder, without a network, and what they
stored is read back with the trackers' own formats and client; plus the config's checks."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path

import pytest

from ltdist.config import ConfigError, load_config
from ltdist.train import loop
from ltdist.train.accel import TrainingError
from ltdist.train.config import TrainConfig
from ltdist.train.tracking import hparams, plan_tracking

from .conftest import TINY

STEPS = 3


def _config(demo: Path, out: Path, *extra: str) -> TrainConfig:
    overrides = [f"data.location={demo}", f"output_dir={out}", f"max_steps={STEPS}"]
    overrides += ["data.eval_limit=32", *extra]
    return load_config(TrainConfig, TINY, overrides)


def _wandb_records(path: Path):
    """The records of a W&B run file (``run-<id>.wandb``): a 7-byte header (":W&B", 0xBEE1,
    version 0), then LevelDB's log format (32 KiB blocks; each chunk a CRC-32 of its type
    byte and data, a length, a type: 1 full, 2 first, 3 middle, 4 last) of protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    assert struct.unpack("<4sHB", raw[:7]) == (b":W&B", 0xBEE1, 0)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        data = raw[pos + 7 : pos + 7 + length]
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"corrupt chunk at {pos}"
        pos += 7 + length
        pending += data
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _train_losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "metrics.json").read_text())["history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.fixture
def no_tracker_env(monkeypatch, tmp_path):
    """No tracker settings from the machine; W&B's own folders in the test's temp folder."""
    for var in ("WANDB_MODE", "WANDB_DIR", "WANDB_API_KEY", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


@pytest.mark.slow
def test_wandb_offline_run_holds_the_training_metrics(demo, tmp_path, no_tracker_env):
    out = tmp_path / "run"
    result = loop.train(
        _config(demo, out, "tracker=wandb", "tracker_init_kwargs.wandb.tags=[tiny]")
    )
    import wandb

    # W&B's service process writes the run file and may still hold part of it when the run's
    # finish returns; it closes the file when it stops (at exit, or here)
    wandb.teardown()
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, run, kinds = {}, {}, None, []
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "run":
            run = record.run
            config.update({u.key: json.loads(u.value_json) for u in run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in record.config.update})
        elif kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            history.setdefault(row["_step"], {}).update(row)
    assert run is not None, f"{run_file} holds no run record: {kinds}"
    assert run.project == "ltdist" and run.display_name == "run" and list(run.tags) == ["tiny"]
    assert config["task"] == "pretrain" and config["loader.batch_size"] == 8
    # the resolved image preprocessing (the tiny tower: OpenAI's), lists as text
    assert config["loader.mean"] == "0.48145466,0.4578275,0.40821073"
    losses = _train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, loss in losses.items():
        assert history[step]["train/loss"] == pytest.approx(loss, rel=1e-9)
        assert "train/lr" in history[step] and "train/samples_per_s" in history[step]
    assert history[STEPS]["eval/map_all"] == pytest.approx(result["map"]["all"], rel=1e-9)


@pytest.mark.slow
def test_mlflow_local_store_run_holds_the_training_metrics(demo, tmp_path, no_tracker_env, caplog):
    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="ltdist.train.loop"):
        result = loop.train(_config(demo, out, "tracker=mlflow", "tracker_project=tiny-exp"))
    store = out / "mlflow" / "mlflow.db"
    assert store.is_file()
    client = MlflowClient(f"sqlite:///{store}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny-exp").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["task"] == "pretrain" and run.data.params["loader.batch_size"] == "8"
    logged = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert logged == pytest.approx(_train_losses(out), rel=1e-6)
    assert sorted(logged) == list(range(1, STEPS + 1))
    assert run.data.metrics["eval/map_all"] == pytest.approx(result["map"]["all"], rel=1e-6)
    # FLOPs per sample (counted once, split), achieved TFLOP/s per record; no MFU on a CPU
    flops = result["flops"]
    parts = ("frozen_forward", "trainable_forward", "trainable_backward")
    assert flops["per_sample"] == pytest.approx(sum(flops[k] for k in parts))
    assert flops["frozen_forward"] > 0 and flops["frozen_modules"] == ["model.image_tower"]
    assert flops["trainable_backward"] > flops["trainable_forward"] > 0
    for rec in (h for h in result["history"] if "loss" in h):
        assert rec["tflops"] == pytest.approx(rec["samples_per_s"] * flops["per_sample"] / 1e12)
        assert rec["tflops_per_device"] == rec["tflops"] and "mfu" not in rec
    tflops = client.get_metric_history(run.info.run_id, "train/tflops")
    assert sorted(m.step for m in tflops) == list(range(1, STEPS + 1))
    speed = result["throughput"]
    assert speed["tflops"] == pytest.approx(speed["samples_per_s"] * flops["per_sample"] / 1e12)
    assert "mfu" not in speed and speed["peak_tflops"] is None
    lines = [r.getMessage() for r in caplog.records if "TFLOP/s" in r.getMessage()]
    assert len(lines) == STEPS and lines[-1].startswith(f"step {STEPS}/{STEPS}: loss ")
    # the run's image preprocessing, recorded where the export and metrics.json keep the config
    exported = json.loads((out / "export" / "config.json").read_text())["loader"]
    recorded = json.loads((out / "metrics.json").read_text())["provenance"]["config"]["loader"]
    for loader in (exported, recorded):
        assert loader["std"] == [0.26862954, 0.26130258, 0.27577711]
        assert (loader["interpolation"], loader["resize_mode"]) == ("bicubic", "shortest")


def test_an_unknown_tracker_is_refused_naming_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"tracker: 'wandbb' is not one of .*'mlflow'.*wandb"):
        load_config(TrainConfig, TINY, ["tracker=wandbb"])


def test_init_kwargs_for_another_tracker_are_refused():
    with pytest.raises(ConfigError, match=r"tracker_init_kwargs has keys \['wandb'\].*mlflow"):
        load_config(TrainConfig, TINY, ["tracker=mlflow", "tracker_init_kwargs.wandb.tags=[a]"])


def test_a_tracker_whose_package_is_missing_is_refused(tmp_path):
    pytest.importorskip("accelerate")
    cfg = load_config(TrainConfig, TINY, ["tracker=aim"])  # aim is not installed here
    with pytest.raises(TrainingError, match="tracker=aim: its package is not installed"):
        plan_tracking(cfg, str(tmp_path))


def test_default_locations_stay_under_the_run_and_offline(tmp_path, monkeypatch, no_tracker_env):
    out = str(tmp_path / "runs" / "exp1")
    wandb = plan_tracking(
        load_config(TrainConfig, TINY, ["tracker=wandb", f"output_dir={out}"]), out
    )
    assert wandb.init_kwargs == {"wandb": {"name": "exp1", "dir": out, "mode": "offline"}}
    mlflow = plan_tracking(
        load_config(TrainConfig, TINY, ["tracker=mlflow", f"output_dir={out}"]), out
    )
    assert mlflow.mlflow_uri == f"sqlite:///{out}/mlflow/mlflow.db"
    assert mlflow.init_kwargs["mlflow"]["logging_dir"] == f"{out}/mlflow/artifacts"
    tb = plan_tracking(load_config(TrainConfig, TINY, ["tracker=tensorboard"]), out)
    assert (tb.log_with, tb.logging_dir, tb.init_kwargs) == (
        "tensorboard",
        f"{out}/tb",
        {"tensorboard": {}},
    )
    # what the user configured wins
    monkeypatch.setenv("WANDB_MODE", "online")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    cfg = load_config(TrainConfig, TINY, ["tracker=wandb", "tracker_init_kwargs.wandb.name=mine"])
    assert plan_tracking(cfg, out).init_kwargs["wandb"] == {"name": "mine", "dir": out}
    cfg = load_config(TrainConfig, TINY, ["tracker=mlflow"])
    assert plan_tracking(cfg, out).mlflow_uri == ""


def test_hparams_are_flat_scalars_without_the_tracker_credentials():
    cfg = load_config(
        TrainConfig, TINY, ["tracker=wandb", "tracker_init_kwargs.wandb.settings.api_key=secret"]
    )
    flat = hparams(cfg)
    assert all(isinstance(v, (int, float, str, bool)) for v in flat.values())
    assert flat["model.clip.image_size"] == 32 and flat["tracker"] == "wandb"
    assert not any("secret" in str(v) or k.startswith("tracker_init") for k, v in flat.items())

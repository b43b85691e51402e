"""`ltdist rehearse --plan`: every shipped config's plan at its shape and at cluster shapes."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltdist.cli import main
from ltdist.rehearsal import CLUSTER_SHAPES, Shape, own_shape, plan_config, shipped_configs

PAPER = [c for c in shipped_configs() if "demo" not in c]


SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="module")
def splits() -> str:
    if not (SHARED / "coco_lt" / "coco_lt_train.txt").is_file():
        pytest.fail(f"the benchmark split files are not under {SHARED}")
    return str(SHARED)


@pytest.mark.parametrize("path", shipped_configs())
def test_every_shipped_config_passes_at_its_own_shape(path, splits):
    result = plan_config(path, splits_dir=splits)
    assert result.ok, result.render()
    assert result.changes == []  # its own shape: nothing rescaled


@pytest.mark.parametrize("shape", [Shape(*s) for s in CLUSTER_SHAPES], ids=str)
@pytest.mark.parametrize("path", shipped_configs())
def test_every_shipped_config_plans_at_cluster_shapes(path, shape, splits):
    result = plan_config(path, shape, splits_dir=splits)
    # a pass, or a refusal that names the key and says why
    for problem in result.problems:
        assert problem.key and problem.message, result.render()
    if path in PAPER and shape == Shape(1, 8):
        assert result.ok, result.render()  # every paper config runs on one 8-GPU node


def test_paper_configs_state_their_shape():
    for path in PAPER:
        assert own_shape(path).world_size >= 1
    assert own_shape("configs/pretrain/coco_lt.yaml") == Shape(1, 1)
    assert own_shape("configs/pretrain/coco_lt_cluster.yaml") == Shape(1, 8)


def test_the_one_gpu_pretraining_config_keeps_the_papers_schedule(splits):
    result = plan_config("configs/pretrain/coco_lt.yaml", splits_dir=splits)
    assert "1909" in result.table and "3570" in result.table and "2000 steps" in result.table


def test_the_cluster_config_is_the_one_gpu_schedule_scaled(splits):
    one = plan_config("configs/pretrain/coco_lt.yaml", Shape(1, 8), splits_dir=splits)
    cluster = plan_config("configs/pretrain/coco_lt_cluster.yaml", splits_dir=splits)
    line = [x for x in cluster.table.splitlines() if "total steps" in x]
    assert line and line[0] in one.table


def test_an_impossible_schedule_fails_naming_the_key(tmp_path, splits, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "task: pretrain\n"
        "data: {dataset: coco_lt, location: shards/none}\n"
        "loader: {batch_size: 64}\n"
        "optim: {warmup_steps: 2000}\n"
        "epochs: 30\n"
        "checkpoint: {every_steps: 10}\n"
    )
    rc = main(
        [
            "rehearse",
            str(path),
            "--plan",
            "--nodes",
            "1",
            "--gpus-per-node",
            "8",
            "--splits-dir",
            splits,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1
    assert "REFUSED optim.warmup_steps: warmup (2000 steps) >= total steps (90)" in out


def test_an_unknown_pretrained_tag_is_refused(splits):
    result = plan_config(
        "configs/finetune/coco_lt_cprfl_official.yaml",
        overrides=["model.clip.pretrained=openaii"],
        splits_dir=splits,
    )
    assert [p.key for p in result.problems] == ["model.clip.pretrained"]
    assert result.problems[0].suggestion  # a tag the model has


def test_cli_plans_every_shape_and_passes(splits, capsys):
    rc = main(
        [
            "rehearse",
            "configs/finetune/voc_lt_cprfl_official.yaml",
            "--plan",
            "--shapes",
            "1x8,8x8",
            "--splits-dir",
            splits,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and out.count("PASS") == 3 and "every config passes" in out


def test_refusals_at_extra_shapes_are_reported_not_failures(splits, capsys):
    # COCO-LT's 1,909 images are less than one global batch of 32 x 64 processes
    rc = main(
        [
            "rehearse",
            "configs/finetune/coco_lt_dpvlpa.yaml",
            "--plan",
            "--shapes",
            "8x8",
            "--splits-dir",
            splits,
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "REFUSED loader.batch_size" in out and "1 refusal(s) at the extra" in out


def test_unsized_data_is_a_clear_error(tmp_path, splits):
    path = tmp_path / "own.yaml"
    path.write_text("task: cprfl\ndata: {location: shards/nowhere}\n")
    with pytest.raises(ValueError, match="cannot size the plan.*data.dataset"):
        plan_config(str(path), splits_dir=splits)


def test_a_selection_without_periodic_evaluations_is_refused(splits):
    """The rehearsal agrees with the loop: checkpoint.select needs an evaluation before the
    end (the plan) and eval_every_steps at all (the config, at load)."""
    select = ["checkpoint.select=val", "data.val_split=val"]
    result = plan_config(
        "configs/finetune/coco_lt_cprfl_official.yaml",
        overrides=[*select, "eval_every_steps=1000000"],
        splits_dir=splits,
    )
    refused = [str(p) for p in result.problems if p.key == "eval_every_steps"]
    assert len(refused) == 1 and "checkpoint.select=val picks among the periodic" in refused[0]
    with pytest.raises(ValueError, match="checkpoint.select=val .* eval_every_steps=0"):
        plan_config(
            "configs/finetune/coco_lt_cprfl_official.yaml",
            overrides=[*select, "eval_every_steps=0"],
            splits_dir=splits,
        )

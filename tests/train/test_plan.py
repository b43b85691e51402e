"""The run plan: steps, warmup, evaluations and checkpoints at a cluster shape, and rescaling."""

from __future__ import annotations

import math

import pytest

from ltdist.config import load_config
from ltdist.train.config import TrainConfig
from ltdist.train.plan import plan_training, rescale


def config(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, ["data.location=shards/x", *overrides])


def keys(plan) -> list[str]:
    return [p.key for p in plan.problems]


def test_steps_follow_the_loader_rule():
    # floor(N / (batch x processes)) micro-batches, every grad_accum of them one step
    cfg = config(
        "loader.batch_size=16", "optim.grad_accum=2", "epochs=3", "checkpoint.every_steps=10"
    )
    _, plan = plan_training(cfg, 1909, world_size=4)
    micro = 1909 // (16 * 4)
    assert plan.steps_per_epoch == micro // 2 == 14
    assert plan.total_steps == 3 * 14
    assert plan.global_batch == 16 * 2 * 4
    assert plan.dropped_per_epoch == 1909 - micro * 64
    assert plan.samples_seen == plan.total_steps * plan.global_batch
    assert plan.checkpoint_steps == [10, 20, 30, 40] and plan.ok


def test_the_papers_warmup_at_eight_gpus_is_refused_naming_the_key():
    # The old configs/pretrain/coco_lt.yaml: 64 per process on 8 processes for 30 epochs.
    cfg = config(
        "loader.batch_size=64",
        "epochs=30",
        "optim.warmup_steps=2000",
        "eval_every_steps=500",
        "checkpoint.every_steps=1000",
    )
    _, plan = plan_training(cfg, 1909, world_size=8)
    assert plan.total_steps == 90
    assert keys(plan) == ["optim.warmup_steps", "eval_every_steps", "checkpoint.every_steps"]
    warmup = plan.problems[0]
    assert warmup.fatal and "2000 steps) >= total steps (90)" in warmup.message
    assert int(warmup.suggestion) < 90  # a value that works
    assert not plan.problems[1].fatal and not plan.problems[2].fatal


def test_warmup_ratio_refusal_suggests_a_ratio():
    _, plan = plan_training(config("optim.warmup_ratio=0.99", "max_steps=1"), 100, 1)
    assert keys(plan) == ["optim.warmup_ratio"] and plan.problems[0].suggestion == "0.1"


def test_a_batch_larger_than_the_data_set_makes_no_step():
    _, plan = plan_training(config("loader.batch_size=32"), 1200, world_size=64)
    assert plan.total_steps == 0 and keys(plan) == ["loader.batch_size"]
    assert int(plan.problems[0].suggestion) * 64 <= 1200


def test_no_checkpoint_before_the_end_is_a_warning_for_the_loop():
    _, plan = plan_training(config("max_steps=50"), 1000, 1)
    assert keys(plan) == ["checkpoint.every_steps"] and not plan.problems[0].fatal
    _, one_step = plan_training(config("max_steps=1"), 1000, 1)
    assert one_step.ok  # nothing to lose


def test_periodic_evaluation_needs_a_split():
    _, plan = plan_training(
        config("data.eval_split=", "eval_every_steps=5", "checkpoint.every_steps=5"), 1000, 1
    )
    assert keys(plan) == ["data.eval_split"]


def test_eval_limit_caps_the_evaluated_samples():
    _, plan = plan_training(config("data.eval_limit=1000", "max_steps=1"), 100, 1, num_eval=5000)
    assert plan.num_eval == 1000


def test_no_stated_shape_runs_as_written():
    cfg = config("optim.warmup_steps=100", "max_steps=1000")
    run, changes, problems = rescale(cfg, 8)
    assert run is cfg and changes == [] and problems == []


@pytest.mark.parametrize("rule, factor", [("none", 1.0), ("linear", 8.0), ("sqrt", math.sqrt(8))])
def test_per_device_batch_rescaling_keeps_samples(rule, factor):
    cfg = config(
        "cluster.nodes=1",
        "cluster.gpus_per_node=1",
        f"cluster.lr_scaling={rule}",
        "optim.lr=1e-4",
        "optim.warmup_steps=2000",
        "eval_every_steps=500",
        "checkpoint.every_steps=500",
        "loader.batch_size=16",
        "epochs=30",
    )
    run, plan = plan_training(cfg, 1909, world_size=8)
    assert run.loader.batch_size == 16 and plan.global_batch == 128
    assert (run.optim.warmup_steps, run.eval_every_steps, run.checkpoint.every_steps) == (
        250,
        62,
        62,
    )
    assert run.optim.lr == pytest.approx(1e-4 * factor)
    assert any(c.startswith("optim.warmup_steps: 2000 -> 250") for c in plan.changes)
    assert plan.ok and plan.total_steps == 30 * (1909 // 128)


def test_global_batch_rescaling_divides_the_batch_or_refuses():
    base = (
        "cluster.nodes=1",
        "cluster.gpus_per_node=1",
        "cluster.rescale=global_batch",
        "loader.batch_size=16",
        "optim.warmup_steps=100",
        "epochs=30",
        "checkpoint.every_steps=50",
    )
    run, plan = plan_training(config(*base), 1909, world_size=8)
    assert run.loader.batch_size == 2 and plan.global_batch == 16
    assert run.optim.warmup_steps == 100 and plan.total_steps == 30 * (1909 // 16)
    _, bad = plan_training(config(*base), 1909, world_size=3)
    assert keys(bad) == ["loader.batch_size"] and "does not divide" in bad.problems[0].message


def test_refuse_rule_names_the_shape():
    cfg = config(
        "cluster.nodes=1",
        "cluster.gpus_per_node=8",
        "cluster.rescale=refuse",
        "checkpoint.every_steps=1",
    )
    _, plan = plan_training(cfg, 1909, world_size=16)
    assert keys(plan) == ["cluster.rescale"] and "1 x 8" in plan.problems[0].message
    _, same = plan_training(cfg, 1909, world_size=8)
    assert same.ok


def test_a_selection_with_no_periodic_evaluation_before_the_end_is_refused():
    """A periodic evaluation that never fires only warns; a selection among none is refused
    (fatal in the loop, as in the rehearsal, which refuses every problem)."""
    common = ["data.val_split=val", "max_steps=50", "checkpoint.every_steps=10"]
    _, logs = plan_training(config(*common, "eval_every_steps=50"), 1000, 1)
    assert keys(logs) == ["eval_every_steps"] and not logs.problems[0].fatal
    common.append("checkpoint.select=val")
    _, selects = plan_training(config(*common, "eval_every_steps=50"), 1000, 1)
    assert keys(selects) == ["eval_every_steps"] and selects.problems[0].fatal
    assert "checkpoint.select=val" in str(selects.problems[0])
    _, fires = plan_training(config(*common, "eval_every_steps=10"), 1000, 1)
    assert fires.ok and fires.eval_steps == [10, 20, 30, 40]

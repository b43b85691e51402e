"""The training loop with real processes: 2-process DDP and DeepSpeed ZeRO-2 runs of the
launchers, the pretraining -> fine-tuning hand-off, 2 ranks == 1 rank, optimizer-state
partitioning, exact resume after SIGKILL, and resuming with another number of processes."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
import torch

from ltdist.config import load_config
from ltdist.data.loader import ShardLoader
from ltdist.data.shards import load_index, read_shard
from ltdist.rehearsal.run import kill_after_first_checkpoint
from ltdist.train import loop
from ltdist.train.checkpoint import complete_steps
from ltdist.train.config import TrainConfig
from ltdist.train.export import load_export, read_export_config, read_export_weights
from ltdist.train.optim import build_optimizer, build_scheduler
from ltdist.train.tasks import build_task

from .conftest import BIN, ROOT, TINY, assert_world, launch, launch_command, metrics, rank_files

pytestmark = pytest.mark.slow


def test_pretraining_with_two_processes(pretrained):
    assert_world(pretrained, 2, "MULTI_CPU")
    m = metrics(pretrained)
    assert (m["status"], m["steps"], m["world_size"]) == ("completed", 4, 2)
    train = [h for h in m["history"] if "loss" in h]
    assert [h["step"] for h in train] == [1, 2, 3, 4]
    for h in train:
        assert math.isfinite(h["loss"]) and h["loss"] == pytest.approx(h["gcl"] + h["qcl"])
        assert h["samples_per_s"] > 0 and h["lr"] >= 0
    assert set(m["map"]) == {"all", "head", "medium", "tail"}
    assert m["history"][-1] == {"step": 4, "eval_map": m["map"]}  # the final evaluation
    assert m["provenance"]["config"]["task"] == "pretrain"
    assert m["provenance"]["packages"]["accelerate"]
    assert complete_steps(str(pretrained / "checkpoints")) == [2, 4]
    assert (pretrained / "curves.png").stat().st_size > 0
    assert list((pretrained / "tb").rglob("events.out.tfevents.*"))  # TensorBoard scalars
    assert (pretrained / "report").is_dir()

    exported = load_export(str(pretrained / "export"))
    assert exported.config.task == "pretrain" and exported.meta["weights"] == "raw"
    assert exported.thresholds == [0.5] * exported.label_space.num_classes
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert exported.module.logits(images).shape == (3, exported.label_space.num_classes)
        # open vocabulary: any names through the Q-Former's text side
        assert exported.module.logits_for(images, ["zebra", "red kite"]).shape == (3, 2)


@pytest.mark.parametrize("task", ["dpvlpa", "cprfl"])
def test_finetuning_from_the_pretraining_export(pretrained, demo, tmp_path, task):
    out = tmp_path / task
    overrides = [
        f"task={task}",
        f"output_dir={out}",
        f"model.init_from={pretrained / 'export'}",
        "max_steps=3",
        "data.eval_limit=32",
        "data.val_split=test",  # thresholds picked on a split (the demo has no val split)
        "ema_decay=0.9",
        # a fine-tuning config's own model settings give way to the export's (offline, this
        # hub id could not even load)
        "model.text_tokenizer=bert-base-uncased",
    ]
    if task == "cprfl":
        overrides += ["model.backbone.kind=qformer", "model.cprfl.prompt_init=clip"]
        # LMPT's scoring, in the periodic and the final evaluation; the papers' checkpoint
        # selection (the best on test), with 2 ranks taking part in the best's export
        overrides += ["eval.scoring=softmax", "eval_every_steps=2", "checkpoint.select=test"]
    proc = launch("finetune.py", overrides, demo)
    log = proc.stdout + proc.stderr
    assert "initialised from" in log
    # every setting the export overrides is said: its fields, and its learned temperatures
    source_model = read_export_config(str(pretrained / "export")).model
    assert f"model.text_tokenizer: 'bert-base-uncased' -> {source_model.text_tokenizer!r}" in log
    if task == "dpvlpa":
        assert "model.gcl.logit_scale: temperature " in log and "from the export" in log
    assert_world(out, 2, "MULTI_CPU")
    m = metrics(out)
    assert (m["status"], m["steps"]) == ("completed", 3)
    assert m["f1"]["macro_f1"]["all"] is not None
    if task == "dpvlpa":  # the training log holds the DQR weights' range per group
        for h in (h for h in m["history"] if "loss" in h):
            groups = [k[6:-4] for k in h if k.startswith("dqr_w_") and k.endswith("_max")]
            assert "tail" in groups, h
            for g in groups:
                assert 1 <= h[f"dqr_w_{g}_min"] <= h[f"dqr_w_{g}_mean"] <= h[f"dqr_w_{g}_max"]
            assert h["dqr_w_tail_max"] > 1
    scoring = "softmax" if task == "cprfl" else "sigmoid"
    selection = "test" if task == "cprfl" else "last"
    assert (m["scoring"], m["checkpoint_selection"]) == (scoring, selection)
    assert m["table"].startswith(f"AP scores: {scoring} (")
    if task == "cprfl":
        # step 2's periodic evaluation scored test once, for the log and the selection; the
        # final weights (step 3) were a candidate; the selected step is the argmax
        assert [h["step"] for h in m["history"] if "eval_map" in h] == [2]
        at = {h["step"]: h for h in m["history"] if "select_map" in h}
        assert sorted(at) == [2, 3] and at[2]["select_map"] == at[2]["eval_map"]["all"]
        scored = {step: h["select_map"] for step, h in at.items()}
        best = max(scored, key=lambda s: (scored[s], -s))
        assert m["selection"] == {"by": "test", "split": "test", "step": best, "map": scored[best]}
    assert m["splits"] == {"map": "test", "f1": "test", "thresholds": "test"}
    exported = load_export(str(out / "export"))
    assert exported.meta["weights"] == "ema"
    assert (exported.meta["scoring"], exported.checkpoint_selection) == (scoring, selection)
    assert exported.meta["step"] == (m["selection"]["step"] if task == "cprfl" else 3)
    assert len(exported.thresholds) == exported.label_space.num_classes
    assert exported.meta["threshold_split"] == "test"
    # the export records the settings it was built with (the pretraining's tokenizer and
    # towers), whatever the fine-tuning config said: evaluate / predict rebuild from it
    source = read_export_config(str(pretrained / "export")).model
    assert exported.config.model.text_tokenizer == source.text_tokenizer
    assert exported.config.model.qformer.num_layers == source.qformer.num_layers
    assert exported.config.model.clip == source.clip
    assert exported.config.model.dpvlpa.text_pool == source.dpvlpa.text_pool

    # The fine-tuned model started from the pretrained Q-Former: 3 Adam steps at lr <= 1e-3
    # move each query-token value by < 5e-3, while a fresh initialisation (std 0.02) differs
    # by several times that.
    before = read_export_weights(str(pretrained / "export"))["model.qformer.query_tokens"]
    key = "model.qformer.query_tokens"
    if task == "cprfl":
        key = "backbone.source.qformer.query_tokens"
    after = read_export_weights(str(out / "export"))[key]
    assert not torch.equal(before, after)
    assert (after - before).abs().max() < 5e-3 < 0.02 < before.abs().max()


def test_finetuning_learns_well_above_the_shuffled_label_control(demo, tmp_path):
    """CPRFL on frozen tiny-CLIP tokens, 2 processes: group mAP against the same run with each
    batch's labels permuted across its images (the learnability control)."""
    common = [
        "task=cprfl",
        "max_steps=0",
        "epochs=6",
        "loader.batch_size=16",
        "loader.image_size=64",
        "model.clip.image_size=64",
        "model.clip.tiny_width=64",
        "model.backbone.kind=clip",
        "model.backbone.proj_dim=64",
        "optim.lr=3e-3",
        "log_every_steps=25",
    ]
    results = {}
    for control in (False, True):
        out = tmp_path / f"control_{control}"
        launch(
            "finetune.py", [*common, f"output_dir={out}", f"data.shuffle_labels={control}"], demo
        )
        assert_world(out, 2, "MULTI_CPU")
        results[control] = metrics(out)["map"]
    learned, control = results[False], results[True]
    print(f"\nCPRFL, 2 processes, 6 epochs: learned {learned}, shuffled-label control {control}")
    assert learned["all"] > control["all"] + 0.07, results
    assert learned["head"] > control["head"] + 0.2, results


def _batch(cfg: TrainConfig, task, keys: list[str]) -> dict:
    """The samples with ``keys``, prepared and collated as the training loader does."""
    loader = ShardLoader(cfg.data.location, "train", cfg.loader, tokenizer=task.tokenizer)
    wanted, found = set(keys), {}
    for info in load_index(cfg.data.location, "train").ordered():
        for sample in read_shard(str(Path(cfg.data.location) / info.name)):
            if sample.key in wanted:
                found[sample.key] = loader.prepare(sample, epoch=0)
    return loader.collate([found[k] for k in keys])


def test_two_ranks_equal_one_rank_on_the_same_global_batch(demo, tmp_path):
    """One DDP step of pretraining (GCL + QCL gather features across ranks) with 2 x 4 samples
    gives the weights of one process stepping on the 8 samples."""
    from accelerate.utils import set_seed

    out = tmp_path / "ddp"
    overrides = [
        f"output_dir={out}",
        "max_steps=1",
        "optim.warmup_steps=0",
        "loader.batch_size=4",
        "audit_batches=true",
        "data.eval_split=",
    ]
    launch("pretrain.py", overrides, demo)
    assert_world(out, 2, "MULTI_CPU")
    keys = []
    for rank in (0, 1):
        lines = (out / "batches" / f"rank{rank}.jsonl").read_text().splitlines()
        assert len(lines) == 1
        keys += json.loads(lines[0])["keys"]
    assert len(set(keys)) == 8

    cfg = load_config(TrainConfig, TINY, [f"data.location={demo}", *overrides[1:]])
    set_seed(cfg.seed)
    task = build_task(
        "pretrain", cfg.model, ShardLoader(str(demo), "train", cfg.loader).label_space
    )
    initial = {k: v.clone() for k, v in task.state_dict().items()}
    optimizer = build_optimizer(task, cfg.optim, task.backbone_prefixes, task.no_decay_names)
    build_scheduler(optimizer, cfg.optim, 1)
    task.train()
    task(_batch(cfg, task, keys))["loss"].backward()
    torch.nn.utils.clip_grad_norm_([p for p in task.parameters() if p.requires_grad], 1.0)
    optimizer.step()

    ddp = read_export_weights(str(out / "export"))
    single = task.state_dict()
    assert set(ddp) == set(single)
    moved = [k for k in single if not torch.equal(single[k], initial[k])]
    assert len(moved) > 10  # the step changed the trainable weights ...
    for k in single:  # ... exactly as the 2-rank step did
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-4, atol=2e-6, msg=k)


def _trainable_numel(cfg: TrainConfig) -> tuple[int, int]:
    space = ShardLoader(cfg.data.location, "train", cfg.loader).label_space
    task = build_task(cfg.task, cfg.model, space)
    params = list(task.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def test_zero2_partitions_the_optimizer_state_of_trainable_parameters_only(demo, tmp_path):
    out = tmp_path / "zero2"
    overrides = [f"output_dir={out}", "max_steps=3", "mixed_precision=bf16", "data.eval_split="]
    launch(
        "pretrain.py",
        overrides,
        demo,
        deepspeed="configs/deepspeed/zero2.json",
        mixed_precision="bf16",
    )
    assert_world(out, 2, "DEEPSPEED")
    assert {r["zero_stage"] for r in rank_files(out)} == {2}
    m = metrics(out)
    assert (m["zero_stage"], m["mixed_precision"], m["steps"]) == (2, "bf16", 3)

    folder = out / "checkpoints" / "step-00000003" / "state" / "pytorch_model"
    parts = sorted(folder.glob("*zero_pp_rank_*_optim_states.pt"))
    assert len(parts) == 2, list(folder.iterdir())
    per_rank = []
    for path in parts:
        # DeepSpeed's own resume files (this run's output): only readable with pickle
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        fp32 = state["single_partition_of_fp32_groups"]  # this rank's master weights
        moments = state["base_optimizer_state"]["state"]
        for g, flat in enumerate(fp32):  # Adam's moments cover the same slice (+ alignment)
            padding = state["group_paddings"][g]
            assert moments[g]["exp_avg"].numel() == flat.numel() + padding
        per_rank.append([t.numel() for t in fp32])
    cfg = load_config(TrainConfig, TINY, [f"data.location={demo}", *overrides])
    trainable, total = _trainable_numel(cfg)
    assert trainable < total  # the frozen CLIP tower is out of the optimizer
    assert sum(map(sum, per_rank)) == trainable  # each trainable weight on exactly one rank
    sizes = [sum(n) for n in per_rank]
    assert abs(sizes[0] - sizes[1]) <= 2 * len(per_rank[0])  # an even split (up to alignment)


def _read_audit(out: Path, rank: int) -> dict[int, list[str]]:
    """micro-batch index -> keys; a step repeated after a resume keeps its last occurrence."""
    batches = {}
    for line in (out / "batches" / f"rank{rank}.jsonl").read_text().splitlines():
        rec = json.loads(line)
        batches[rec["micro"]] = rec["keys"]
    return batches


def test_resume_after_sigkill_is_exact_with_zero2_and_ema(demo, tmp_path):
    """2N steps straight == N steps, SIGKILL, resume: same batches, losses and weights."""
    n = 2
    common = [
        f"max_steps={2 * n + 4}",
        f"checkpoint.every_steps={n}",
        "checkpoint.keep_last=1",
        "ema_decay=0.9",
        "audit_batches=true",
        "mixed_precision=bf16",
        "data.eval_split=",
        "loader.num_workers=1",  # the data position includes the worker interleaving
        "loader.augment=true",
    ]
    ds = {"deepspeed": "configs/deepspeed/zero2.json", "mixed_precision": "bf16"}
    straight = tmp_path / "straight"
    launch("pretrain.py", [*common, f"output_dir={straight}"], demo, **ds)

    resumed = tmp_path / "resumed"
    cmd, env = launch_command("pretrain.py", [*common, f"output_dir={resumed}"], demo, **ds)
    _sigkill_after_a_checkpoint(cmd, env, resumed)
    launch("pretrain.py", [*common, f"output_dir={resumed}"], demo, **ds)

    a, b = metrics(straight), metrics(resumed)
    assert b["steps"] == a["steps"] == 2 * n + 4
    assert [h["step"] for h in b["history"]] == [h["step"] for h in a["history"]]
    for x, y in zip(a["history"], b["history"]):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5, abs=1e-6), (x, y)
    for rank in (0, 1):
        assert _read_audit(resumed, rank) == _read_audit(straight, rank)
    wa, wb = (
        read_export_weights(str(straight / "export")),
        read_export_weights(str(resumed / "export")),
    )
    for k in wa:  # the EMA weights (the export holds them)
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=k)


def test_resuming_with_another_number_of_processes(demo, tmp_path):
    """Refused (clear message) for the exact data order; allowed in resampled mode."""
    exact = tmp_path / "exact"
    launch(
        "pretrain.py",
        [f"output_dir={exact}", "max_steps=2", "optim.warmup_steps=1", "data.eval_split="],
        demo,
    )
    single = [str(BIN / "python"), str(ROOT / "launchers" / "pretrain.py"), "--config", str(TINY)]
    single.append(f"data.location={demo}")
    proc = subprocess.run(
        [*single, f"output_dir={exact}", "max_steps=4", "optim.warmup_steps=1", "data.eval_split="],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "checkpoint saved by 2 processes, now 1" in proc.stderr
    assert "loader.resampled=true" in proc.stderr

    sampled = tmp_path / "resampled"
    resampled = ["loader.resampled=true", "loader.samples_per_epoch=64", "data.eval_split="]
    resampled.append("optim.warmup_steps=1")
    launch("pretrain.py", [f"output_dir={sampled}", "max_steps=2", *resampled], demo)
    proc = subprocess.run(
        [*single, f"output_dir={sampled}", "max_steps=4", *resampled],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from step 2" in proc.stdout + proc.stderr
    m = metrics(sampled)
    assert (m["steps"], m["world_size"]) == (4, 1)
    assert [h["step"] for h in m["history"]] == [1, 2, 3, 4]


def test_a_launcher_precision_that_disagrees_with_the_config_is_refused(demo, tmp_path):
    # `accelerate launch --mixed_precision bf16` with a config that says "no": once silently
    # overridden by the config, now an error that names both values, before any model is built.
    cmd, env = launch_command(
        "pretrain.py",
        [f"output_dir={tmp_path / 'run'}", "max_steps=1"],
        demo,
        mixed_precision="bf16",
    )
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "asks for mixed precision 'bf16'" in proc.stderr and "for 'no'" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def _sigkill_after_a_checkpoint(cmd, env, out: Path) -> None:
    """SIGKILL every process of the run's tree once a checkpoint is complete (with keep_last=1
    whichever step it is); the rehearsal's helper refuses a run that finished first."""
    kill_after_first_checkpoint(cmd, env, str(out / "checkpoints"), timeout_s=400)
    assert complete_steps(str(out / "checkpoints")), "the run never completed a checkpoint"


def test_resume_after_sigkill_is_bitwise_with_loader_workers_and_dropout(demo, tmp_path):
    """DDP in fp32 with a loader worker and dropout: the resumed run's losses and weights are
    bitwise those of the straight run (the loader's workers once drew their base seed from the
    model's RNG, at another point of its stream after a resume, and changed the dropout masks)."""
    common = [
        "max_steps=8",
        "checkpoint.every_steps=2",
        "checkpoint.keep_last=1",
        "model.qformer.dropout=0.1",
        "loader.num_workers=1",
        "loader.augment=true",
        "data.eval_split=",
        "log_every_steps=1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch("pretrain.py", [*common, f"output_dir={straight}"], demo)
    cmd, env = launch_command("pretrain.py", [*common, f"output_dir={resumed}"], demo)
    _sigkill_after_a_checkpoint(cmd, env, resumed)
    launch("pretrain.py", [*common, f"output_dir={resumed}"], demo)

    a, b = metrics(straight), metrics(resumed)
    assert (
        [h["step"] for h in b["history"]] == [h["step"] for h in a["history"]] == list(range(1, 9))
    )
    assert [h["loss"] for h in b["history"]] == [h["loss"] for h in a["history"]]
    wa = read_export_weights(str(straight / "export"))
    wb = read_export_weights(str(resumed / "export"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_non_finite_loss_stops_the_run_at_its_step(demo, tmp_path):
    # lr 1e30 blows the weights up after the first update: once trained on NaN until the
    # final evaluation, now stopped at the first non-finite loss with its step and value
    cmd, env = launch_command(
        "pretrain.py",
        [
            f"output_dir={tmp_path / 'run'}",
            "max_steps=6",
            "optim.lr=1e30",
            "optim.grad_clip=0",
            "data.eval_split=",
        ],
        demo,
    )
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "non-finite loss" in proc.stderr and "step " in proc.stderr
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("grad_clip", [0.0, 1.0])
def test_a_non_finite_gradient_stops_the_run_at_its_step(demo, tmp_path, monkeypatch, grad_clip):
    """A finite loss with a NaN gradient (a hook on one weight poisons the 3rd backward pass),
    one process: the run stops at step 3 naming the gradient norm; with max_nonfinite_steps=1
    that update is dropped, not taken, and the run ends with finite weights."""

    real, backwards = loop.build_task, []

    def poisoned(*args, **kwargs):
        task = real(*args, **kwargs)
        weight = next(p for p in task.parameters() if p.requires_grad)
        backwards.clear()

        def hook(grad):
            backwards.append(1)
            return grad * float("nan") if len(backwards) == 3 else grad

        weight.register_hook(hook)
        return task

    monkeypatch.setattr(loop, "build_task", poisoned)
    count_flops = loop._count_flops

    def training_backwards_only(*args, **kwargs):  # the FLOP count's backward passes are not
        counted = count_flops(*args, **kwargs)  # training steps: the hook counts those only
        backwards.clear()
        return counted

    monkeypatch.setattr(loop, "_count_flops", training_backwards_only)

    def config(name: str, *extra: str) -> TrainConfig:
        overrides = [f"data.location={demo}", f"output_dir={tmp_path / name}", "max_steps=5"]
        overrides += ["data.eval_split=", f"optim.grad_clip={grad_clip}", *extra]
        return load_config(TrainConfig, TINY, overrides)

    with pytest.raises(loop.TrainingError, match=r"step 3: non-finite gradient norm .*nan"):
        loop.train(config("stops"))
    assert not (tmp_path / "stops" / "export").exists()

    result = loop.train(config("skips", "max_nonfinite_steps=1"))
    assert result["status"] == "completed" and len(backwards) == 6  # 5 steps + the dropped one
    weights = read_export_weights(str(tmp_path / "skips" / "export"))
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def test_resuming_from_checkpoints_another_run_wrote_is_refused_unless_trusted(demo, tmp_path):
    # resume unpickles Accelerate / DeepSpeed files (weights_only=False): a checkpoint.dir
    # that another run wrote is refused, naming the switch
    first = tmp_path / "first"
    common = ["max_steps=3", "checkpoint.every_steps=1", "data.eval_split="]
    launch("pretrain.py", [*common, f"output_dir={first}"], demo)
    assert json.loads((first / "checkpoints" / "OWNER.json").read_text())["output_dir"] == str(
        first
    )
    foreign = [
        *common,
        "max_steps=4",
        f"output_dir={tmp_path / 'second'}",
        f"checkpoint.dir={first / 'checkpoints'}",
    ]
    cmd, env = launch_command("pretrain.py", foreign, demo)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "were written by the run at" in proc.stderr and "checkpoint.trusted=true" in proc.stderr
    launch("pretrain.py", [*foreign, "checkpoint.trusted=true"], demo)
    assert metrics(tmp_path / "second")["steps"] == 4

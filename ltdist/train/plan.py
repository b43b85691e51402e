"""The run plan: what a training config will do at a cluster shape, before any model is built.

A config states the shape it is written for (``cluster``: nodes x GPUs per node; the papers'
one GPU). At another shape it is rescaled by the rule it names, and the loop and the rehearsal
(``ltdist rehearse``) both take the schedule from :func:`plan_training`, so a config that
cannot finish as configured (a warmup that never ends, no optimizer step, a periodic checkpoint
or evaluation that never fires, a batch that does not divide) is refused here, with the key to
change and a value that works, instead of hours into a cluster job.

Rescaling (``cluster.rescale``) when the run has W' processes and the config was written for W:

- ``per_device_batch``: ``loader.batch_size`` stays (it is what fits a GPU); the global batch
  grows by W'/W, so the step counts of the schedule (``optim.warmup_steps``, ``max_steps``,
  ``eval_every_steps``, ``checkpoint.every_steps``) shrink by W/W' (the same samples seen), and
  the peak lr scales by ``cluster.lr_scaling`` (none, linear or sqrt in the batch ratio).
- ``global_batch``: the global batch stays, so the per-process batch is global / (W' x
  grad_accum) and must divide; the schedule and the lr are unchanged.
- ``refuse``: the config runs only at its own shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from ltdist.train.config import TrainConfig


@dataclass
class ClusterConfig:
    """The cluster shape a config is written for, and how it runs at another one."""

    nodes: int = 0  # 0 = not stated: the config runs as written at any shape (no rescaling)
    gpus_per_node: int = 1
    rescale: Literal["per_device_batch", "global_batch", "refuse"] = "per_device_batch"
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"  # per_device_batch: lr vs batch

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        if self.nodes < 0 or self.gpus_per_node < 1:
            raise ValueError(
                f"cluster.nodes must be >= 0 and cluster.gpus_per_node >= 1, got "
                f"{self.nodes} x {self.gpus_per_node}"
            )


@dataclass
class Problem:
    """Why a config cannot finish as configured: the key, what is wrong, a value that works.

    ``fatal`` problems stop the loop itself; the others (a periodic checkpoint or evaluation
    that never fires) are warnings in the loop, where a short experiment may want them, and
    refusals in the rehearsal, which vets the long runs the shipped configs describe.
    """

    key: str
    message: str
    suggestion: str = ""
    fatal: bool = True

    def __str__(self) -> str:
        hint = f"; try {self.key}={self.suggestion}" if self.suggestion else ""
        return f"{self.key}: {self.message}{hint}"


@dataclass
class TrainingPlan:
    world_size: int
    per_device_batch: int
    grad_accum: int
    global_batch: int
    num_train: int
    num_eval: int | None
    steps_per_epoch: int  # optimizer steps
    epochs: float  # epochs the run covers (max_steps may end it mid-epoch)
    total_steps: int
    warmup_steps: int
    eval_steps: list[int]  # periodic evaluations (the final one comes on top)
    checkpoint_steps: list[int]  # periodic checkpoints (the final one comes on top)
    samples_seen: int
    dropped_per_epoch: int  # samples past the last full global batch of an epoch
    peak_lr: float
    image_tokens: int  # visual tokens per image the model reads (0 = unknown)
    text_tokens: int  # text tokens per sample (padded), 0 = the task reads no text
    changes: list[str] = field(default_factory=list)  # what rescaling changed
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def table(self) -> str:
        def steps(xs: list[int]) -> str:
            if not xs:
                return "none"
            shown = ", ".join(map(str, xs[:4])) + (", ..." if len(xs) > 5 else "")
            tail = f", {xs[-1]}" if len(xs) > 4 else ""
            return f"{len(xs)} at {shown}{tail}"

        rows = [
            ("processes", f"{self.world_size}"),
            (
                "global batch",
                f"{self.global_batch} = {self.per_device_batch} per process x "
                f"{self.grad_accum} accumulation x {self.world_size}",
            ),
            ("training samples", f"{self.num_train}"),
            (
                "steps per epoch",
                f"{self.steps_per_epoch} ({self.dropped_per_epoch} samples roll "
                "into the next epoch)",
            ),
            ("total steps", f"{self.total_steps} ({self.epochs:.2f} epochs)"),
            ("warmup", f"{self.warmup_steps} steps"),
            ("peak lr", f"{self.peak_lr:.3g}"),
            (
                "evaluations",
                steps(self.eval_steps)
                + " + the final one"
                + (f" on {self.num_eval} samples" if self.num_eval is not None else ""),
            ),
            ("checkpoints", steps(self.checkpoint_steps) + " + the final one"),
            ("samples seen", f"{self.samples_seen:,}"),
        ]
        if self.image_tokens:
            rows.append(("image tokens seen", f"{self.samples_seen * self.image_tokens:,}"))
        if self.text_tokens:
            rows.append(("text tokens seen", f"{self.samples_seen * self.text_tokens:,} (padded)"))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def rescale(cfg: TrainConfig, world_size: int) -> tuple[TrainConfig, list[str], list[Problem]]:
    """``cfg`` as it runs on ``world_size`` processes, what changed, and why it cannot."""
    shape = cfg.cluster
    if not shape.nodes or shape.world_size == world_size:
        return cfg, [], []
    written = f"{shape.nodes} x {shape.gpus_per_node}"
    if shape.rescale == "refuse":
        return (
            cfg,
            [],
            [
                Problem(
                    "cluster.rescale",
                    f"this config is written for {written} processes and refuses to run on "
                    f"{world_size}",
                    "per_device_batch",
                )
            ],
        )
    accum = cfg.optim.grad_accum
    old_global = cfg.loader.batch_size * accum * shape.world_size
    if shape.rescale == "global_batch":
        per_device, rest = divmod(old_global, world_size * accum)
        if rest or per_device < 1:
            divisors = [w for w in range(1, old_global + 1) if old_global % (w * accum) == 0]
            return (
                cfg,
                [],
                [
                    Problem(
                        "loader.batch_size",
                        f"the global batch {old_global} of the {written} shape does not divide "
                        f"over {world_size} processes x {accum} accumulation steps (process counts "
                        f"that divide it: {divisors[:8]})",
                        "a per-device batch with cluster.rescale=per_device_batch",
                    )
                ],
            )
        new = replace(cfg, loader=replace(cfg.loader, batch_size=per_device))
        return (
            new,
            [
                f"loader.batch_size: {cfg.loader.batch_size} -> {per_device} (global "
                f"batch {old_global} kept)"
            ],
            [],
        )

    ratio = world_size / shape.world_size  # new global batch / old global batch
    changes: list[str] = []

    def steps(key: str, value: int) -> int:
        if not value:
            return value
        new_value = max(1, round(value / ratio))
        if new_value != value:
            changes.append(f"{key}: {value} -> {new_value} (same samples at {ratio:g}x batch)")
        return new_value

    lr = cfg.optim.lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[shape.lr_scaling]
    if lr != cfg.optim.lr:
        changes.append(f"optim.lr: {cfg.optim.lr:g} -> {lr:g} ({shape.lr_scaling} scaling)")
    new = replace(
        cfg,
        optim=replace(
            cfg.optim, lr=lr, warmup_steps=steps("optim.warmup_steps", cfg.optim.warmup_steps)
        ),
        max_steps=steps("max_steps", cfg.max_steps),
        eval_every_steps=steps("eval_every_steps", cfg.eval_every_steps),
        checkpoint=replace(
            cfg.checkpoint,
            every_steps=steps("checkpoint.every_steps", cfg.checkpoint.every_steps),
        ),
    )
    return new, changes, []


def plan_training(
    cfg: TrainConfig,
    num_train: int,
    world_size: int,
    num_eval: int | None = None,
    image_tokens: int = 0,
) -> tuple[TrainConfig, TrainingPlan]:
    """The config as it runs on ``world_size`` processes and its plan (with its problems).

    Steps per epoch follow the loader: floor(N / (batch x processes)) micro-batches, of which
    every ``grad_accum`` make an optimizer step (docs/design.md, "equal steps on every rank").
    """
    run, changes, problems = rescale(cfg, world_size)
    if num_eval is not None and run.data.eval_limit:
        num_eval = min(num_eval, run.data.eval_limit)
    batch, accum = run.loader.batch_size, run.optim.grad_accum
    global_batch = batch * accum * world_size
    epoch_samples = run.loader.samples_per_epoch if run.loader.resampled else num_train
    micro_per_epoch = epoch_samples // (batch * world_size)
    steps_per_epoch = micro_per_epoch // accum
    total = run.max_steps or run.epochs * steps_per_epoch
    if total < 1:
        largest = max(1, epoch_samples // (accum * world_size))
        problems.append(
            Problem(
                "loader.batch_size",
                f"{epoch_samples} samples per epoch make no optimizer step at a global batch of "
                f"{global_batch} ({batch} x {accum} x {world_size} processes)",
                str(min(batch - 1, largest)) if batch > 1 else "",
            )
        )
    warmup = run.optim.warmup_steps
    if not warmup and run.optim.warmup_ratio and total:
        warmup = max(1, round(run.optim.warmup_ratio * total))
    if total and warmup >= total:
        key = "optim.warmup_steps" if run.optim.warmup_steps else "optim.warmup_ratio"
        value = str(max(1, total // 10)) if run.optim.warmup_steps else "0.1"
        problems.append(
            Problem(
                key, f"warmup ({warmup} steps) >= total steps ({total}): the lr never decays", value
            )
        )
    every_eval, every_ckpt = run.eval_every_steps, run.checkpoint.every_steps
    eval_steps = list(range(every_eval, total, every_eval)) if every_eval else []
    ckpt_steps = list(range(every_ckpt, total, every_ckpt)) if every_ckpt else []
    suggestion = str(max(1, total // 10))
    if run.checkpoint.select != "last" and total and not eval_steps:
        # a selection among no candidates: fatal, unlike a periodic evaluation that only logs
        problems.append(
            Problem(
                "eval_every_steps",
                f"checkpoint.select={run.checkpoint.select} picks among the periodic "
                f"evaluations, and eval_every_steps={every_eval} makes none before the end "
                f"({total} steps)",
                suggestion,
            )
        )
    elif every_eval and total and not eval_steps:
        problems.append(
            Problem(
                "eval_every_steps",
                f"{every_eval} >= total steps ({total}): the periodic "
                "evaluation never runs (0 = at the end only)",
                suggestion,
                fatal=False,
            )
        )
    if every_eval and not run.data.eval_split:
        problems.append(
            Problem(
                "data.eval_split", f"eval_every_steps={every_eval} but no evaluation split", "test"
            )
        )
    if total > 1 and not ckpt_steps:
        what = f"{every_ckpt} >= total steps ({total})" if every_ckpt else "0 (only at the end)"
        problems.append(
            Problem(
                "checkpoint.every_steps",
                f"{what}: no checkpoint before the end, a run killed near its end loses everything",
                suggestion,
                fatal=False,
            )
        )
    text_tokens = run.model.max_text_tokens if _reads_text(run) else 0
    plan = TrainingPlan(
        world_size=world_size,
        per_device_batch=batch,
        grad_accum=accum,
        global_batch=global_batch,
        num_train=num_train,
        num_eval=num_eval,
        steps_per_epoch=steps_per_epoch,
        epochs=total / steps_per_epoch if steps_per_epoch else 0.0,
        total_steps=total,
        warmup_steps=warmup,
        eval_steps=eval_steps,
        checkpoint_steps=ckpt_steps,
        samples_seen=total * global_batch,
        dropped_per_epoch=epoch_samples - micro_per_epoch * batch * world_size,
        peak_lr=run.optim.lr,
        image_tokens=image_tokens,
        text_tokens=text_tokens,
        changes=changes,
        problems=problems,
    )
    return run, plan


def _reads_text(cfg: TrainConfig) -> bool:
    return cfg.task == "pretrain" or (cfg.task == "dpvlpa" and bool(cfg.model.dpvlpa.lambda1))

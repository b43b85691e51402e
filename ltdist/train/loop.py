"""The one training loop: pretraining and fine-tuning differ only in the task module.

Accelerate owns the processes (DDP, or DeepSpeed ZeRO from ``accelerate launch`` configs) and
mixed precision; the streaming loader is not wrapped by Accelerate: it shards by the rank and
world size given here and keeps its exact position, which travels in each checkpoint. One
optimizer step = ``optim.grad_accum`` micro-batches; the schedule, EMA, logging, evaluation
and checkpoints count optimizer steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import tempfile
import time

import numpy as np
import torch

from ltdist import storage
from ltdist.config import to_dict
from ltdist.data.loader import ShardLoader
from ltdist.data.shards import load_label_space
from ltdist.eval import format_summary
from ltdist.eval.metrics import map_from_logits
from ltdist.eval.report import plot_curves
from ltdist.losses.contrastive import LogitScale
from ltdist.provenance import git_commit, package_versions
from ltdist.train.accel import (
    TrainingError,
    agree,
    configure_deepspeed,
    input_dtype,
    is_deepspeed,
    make_accelerator,
    sync_buffers,
    to_device,
    write_rank_info,
    zero_stage,
)
from ltdist.train.checkpoint import Checkpointer
from ltdist.train.config import TrainConfig
from ltdist.train.ema import EMA
from ltdist.train.evaluation import evaluate_and_report, evaluate_split
from ltdist.train.export import read_export_weights, save_export
from ltdist.train.flops import Peak, StepFlops, count_run_flops, run_peak, throughput
from ltdist.train.optim import build_optimizer, build_scheduler
from ltdist.train.resolve import resolve_config
from ltdist.train.selection import BestWeights
from ltdist.train.tasks import build_task
from ltdist.train.token_cache import frozen_source, open_token_cache, uses_token_cache
from ltdist.train.tracking import plan_tracking, start_tracking

log = logging.getLogger(__name__)

PACKAGES = {
    "torch": ("torch",),
    "accelerate": ("accelerate",),
    "deepspeed": ("deepspeed",),
    "open_clip": ("open_clip_torch",),
    "transformers": ("transformers",),
    "ltdist": ("ltdist",),
}


# -- set-up -----------------------------------------------------------------------------------


class _StopRequest:
    """SIGUSR1 / SIGTERM or the preempt file ask the run to checkpoint and stop."""

    def __init__(self, preempt_file: str):
        self.preempt_file, self.signalled = preempt_file, False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        log.warning("received signal %d: checkpointing at the next step, then stopping", signum)
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or bool(self.preempt_file and os.path.exists(self.preempt_file))


# -- the loop ---------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> dict:
    """Train as configured (resuming when a checkpoint exists); return the final metrics."""
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    local_out = storage.is_local(cfg.output_dir)
    local_dir = cfg.output_dir if local_out else tempfile.mkdtemp(prefix="ltdist-track-")
    tracking = plan_tracking(cfg, local_dir)
    acc = make_accelerator(cfg, local_dir, tracking.log_with, tracking.logging_dir)
    cfg, plan = _resolve(cfg, acc)
    if is_deepspeed(acc):
        configure_deepspeed(acc, cfg)
    if cfg.ema_decay and zero_stage(acc) == 3:
        raise TrainingError(
            "EMA with ZeRO-3 is not supported: ZeRO-3 partitions the weights the average reads; "
            "use ZeRO-1/2 or ema_decay=0"
        )
    if cfg.checkpoint.select != "last" and zero_stage(acc) == 3:
        raise TrainingError(
            f"checkpoint.select={cfg.checkpoint.select} with ZeRO-3 is not supported: the "
            "selected weights are loaded back into the module, whose weights ZeRO-3 "
            "partitions; use ZeRO-1/2 or checkpoint.select=last"
        )
    write_rank_info(cfg, acc)

    from accelerate.utils import set_seed

    set_seed(cfg.seed)  # the same initial weights on every rank
    space = load_label_space(cfg.data.location)
    task = _build_task(cfg, space, acc)
    set_seed(cfg.seed, device_specific=True)  # dropout differs per rank
    flops, peak = _count_flops(cfg, task, space, acc)
    flops_per_sample = flops.per_sample(cfg.loader.batch_size).total

    location, token_cache = cfg.data.location, None
    eval_caches: dict = {}  # split -> (location, manifest): evaluation from cached tokens too
    if uses_token_cache(cfg):  # the frozen source's tokens, computed once (built if missing)
        where = {
            "rank": acc.process_index,
            "world_size": acc.num_processes,
            "device": acc.device,
            "barrier": acc.wait_for_everyone,
        }
        source = frozen_source(task)
        location, token_cache = open_token_cache(cfg, source, **where)
        acc.print(f"training on cached image tokens: {location}")
        for split in dict.fromkeys((cfg.data.eval_split, cfg.data.val_split)):
            if split:  # the deterministic view, whatever views training reads
                eval_caches[split] = open_token_cache(cfg, source, split=split, views=1, **where)
        if eval_caches:
            acc.print(f"evaluating on cached image tokens: {sorted(eval_caches)}")
    loader = ShardLoader(
        location,
        cfg.data.train_split,
        cfg.loader,
        rank=acc.process_index,
        world_size=acc.num_processes,
        tokenizer=task.tokenizer if getattr(task, "needs_text", False) else None,
        token_cache=token_cache,
    )
    if loader.steps_per_epoch // cfg.optim.grad_accum != plan.steps_per_epoch:
        raise RuntimeError(
            f"the loader makes {loader.steps_per_epoch} batches per epoch, the plan "
            f"{plan.steps_per_epoch} optimizer steps x {cfg.optim.grad_accum}"
        )
    total = plan.total_steps
    optimizer = build_optimizer(task, cfg.optim, task.backbone_prefixes, task.no_decay_names)
    scheduler = build_scheduler(optimizer, cfg.optim, total)
    model, optimizer = acc.prepare(task, optimizer)
    module = acc.unwrap_model(model)
    ema = EMA(module, cfg.ema_decay) if cfg.ema_decay else None

    ckpt = Checkpointer(
        acc,
        cfg.checkpoint.dir or storage.join(cfg.output_dir, "checkpoints"),
        cfg.checkpoint.keep_last,
        cfg.checkpoint.staging_dir,
    )
    step, history = _resume(cfg, acc, ckpt, loader, optimizer, scheduler, ema)
    first_step = step
    best = _best_weights(cfg, acc, step, history)

    start_tracking(acc, cfg, tracking)
    audit = _batch_audit(cfg, acc)
    dtype = input_dtype(acc)
    global_batch = cfg.loader.batch_size * acc.num_processes * cfg.optim.grad_accum
    from tqdm import tqdm

    bar = tqdm(
        total=total, initial=step, desc=cfg.task, disable=not (acc.is_main_process and cfg.progress)
    )
    parts: dict[str, list[float]] = {}
    nonfinite = 0  # steps whose loss was not finite on some rank
    started = time.perf_counter()
    since = (started, step)  # the last log record's time and step
    status = "completed"

    ckpt.claim(cfg.output_dir)

    def save() -> None:
        trainer_state = {
            "step": step,
            "loader": loader.state_dict(),
            "scheduler": {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"},
            "history": history,
            "world_size": acc.num_processes,
            "zero_stage": zero_stage(acc),
            "task": cfg.task,
        }
        files = {
            "classes.json": space.to_json().encode(),
            "config.json": json.dumps(to_dict(cfg), indent=1).encode(),
        }
        where = ckpt.save(step, trainer_state, ema.state_dict() if ema is not None else None, files)
        acc.print(f"checkpoint: {where}")

    from tqdm.contrib.logging import logging_redirect_tqdm

    with _StopRequest(cfg.preempt_file) as stop, logging_redirect_tqdm():
        model.train()
        while step < total and status == "completed":
            for batch in loader:
                if audit is not None:
                    audit.write(
                        json.dumps(
                            {
                                "micro": loader.epoch * loader.steps_per_epoch + loader.step,
                                "keys": batch["key"],
                            }
                        )
                        + "\n"
                    )
                if cfg.data.shuffle_labels:
                    batch["labels"] = _shuffled(batch["labels"], cfg.seed, loader, acc)
                batch = to_device(batch, acc.device, dtype)
                with acc.accumulate(model):
                    out = model(batch)
                    if agree(acc, not bool(torch.isfinite(out["loss"].detach()))):
                        nonfinite += 1
                        _nonfinite(acc, cfg, out, step + 1, nonfinite)
                        optimizer.zero_grad(set_to_none=True)  # this update is dropped
                        continue
                    acc.backward(out["loss"])
                    if acc.sync_gradients and not is_deepspeed(acc):
                        norm = _grad_norm(acc, model, cfg.optim.grad_clip)
                        # fp16's loss scaler skips an overflowed step itself
                        if acc.scaler is None and agree(acc, not math.isfinite(norm)):
                            nonfinite += 1
                            grads = {**out, "grad_norm": torch.tensor(norm)}
                            _nonfinite(acc, cfg, grads, step + 1, nonfinite, "gradient norm")
                            optimizer.zero_grad(set_to_none=True)
                            continue
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for k, v in out.items():
                    parts.setdefault(k, []).append(float(v.detach()))
                if not acc.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                if ema is not None:
                    ema.update(module)
                bar.update(1)
                if step % cfg.log_every_steps == 0 or step == total:
                    record = _log_step(
                        acc, parts, step, scheduler, since, global_batch, flops_per_sample, peak
                    )
                    since = (time.perf_counter(), step)
                    history.append(record)
                    bar.set_postfix(
                        loss=f"{record['loss']:.4f}", sps=f"{record['samples_per_s']:.1f}"
                    )
                    if acc.is_main_process:
                        log.info("%s", _step_line(record, total, peak))
                    parts = {}
                periodic = cfg.eval_every_steps and step % cfg.eval_every_steps == 0
                # with a selection, the final weights are a candidate too
                if (periodic and step < total) or (best is not None and step == total):
                    history.append(
                        _periodic_eval(
                            acc, cfg, model, module, ema, space, step, best, total, eval_caches
                        )
                    )
                    model.train()
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    save()
                if agree(acc, stop.requested()):
                    status = "preempted"
                    break
                if step >= total:
                    break
        bar.close()
        if audit is not None:
            audit.close()
        if status == "preempted":
            if not (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
                save()
            acc.print(f"stopped at step {step} on request; rerun the same command to resume")
            acc.end_training()
            return {"status": status, "step": step}
        if not (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
            save()
    seconds = time.perf_counter() - started
    samples_per_s = (step - first_step) * global_batch / max(seconds, 1e-9)
    cost = {
        "flops": flops.record(cfg.loader.batch_size),
        "throughput": {
            "samples_per_s": samples_per_s,
            **throughput(flops_per_sample, samples_per_s, acc.num_processes, peak),
            "peak_tflops": peak.tflops,
            "peak": peak.source,
            "measured_over": "the training loop's wall time (evaluations, checkpoints included)",
        },
    }
    result = _finish(
        acc, cfg, model, module, ema, space, history, step, best, seconds, cost, eval_caches
    )
    acc.end_training()
    return result


def _grad_norm(acc, model, clip: float) -> float:
    """The global gradient norm of this update (clipped to ``clip`` when set): DDP has reduced
    the gradients, so every rank reads the same value."""
    if clip:
        return float(acc.clip_grad_norm_(model.parameters(), clip))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def _build_task(cfg: TrainConfig, space, acc):
    """The task module, with an ``init_from`` export's weights; each temperature the export
    brings (replacing the config's initial value) is said."""
    task = build_task(cfg.task, cfg.model, space)
    if cfg.model.init_from:
        unused = task.load_pretrained(read_export_weights(cfg.model.init_from))
        acc.print(f"initialised from {cfg.model.init_from} ({len(unused)} export tensors unused)")
        for name, module in task.named_modules():
            if isinstance(module, LogitScale) and module.loaded_from_weights:
                acc.print(
                    f"{name}: temperature {module.temperature:.4g} from the export (the "
                    f"config's initial {module.init_temperature} is not used)"
                )
    return task


def _count_flops(cfg: TrainConfig, task, space, acc) -> tuple[StepFlops, Peak]:
    """The task's FLOPs per micro-step (counted on the training device, before it is wrapped)
    and the peak MFU is measured against; both said once."""
    task.to(acc.device)
    flops = count_run_flops(cfg, task, len(space.names), acc.device)
    peak = run_peak(acc.device, acc.mixed_precision, cfg.peak_tflops)
    acc.print(f"FLOPs: {flops.describe(cfg.loader.batch_size)} (counted in {flops.seconds:.1f} s)")
    if peak.tflops:
        acc.print(f"MFU against {peak.source}: {peak.tflops:g} TFLOP/s per device")
    else:
        acc.print(f"MFU not reported ({peak.source}): TFLOP/s only")
    return flops, peak


def _resume(cfg: TrainConfig, acc, ckpt, loader, optimizer, scheduler, ema) -> tuple[int, list]:
    """(step, history) of the latest complete checkpoint, with the model, optimizer, loader,
    schedule and EMA restored from it; (0, []) for a fresh run."""
    latest = ckpt.latest() if cfg.checkpoint.resume else None
    if latest is None:
        return 0, []
    try:
        ckpt.check_owner(cfg.output_dir, cfg.checkpoint.trusted)
    except PermissionError as e:
        raise TrainingError(str(e)) from None
    _check_resumable(ckpt.read_trainer_state(latest), cfg, acc)
    state, ema_state = ckpt.load(latest)
    loader.load_state_dict(state["loader"])
    scheduler.load_state_dict(
        {**state["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)}
    )
    if ema is not None:
        if ema_state is None:
            raise TrainingError(f"checkpoint step {latest} has no EMA state but ema_decay is set")
        ema.load_state_dict(ema_state)
    acc.print(f"resumed from step {latest} (epoch {loader.epoch}, batch {loader.step})")
    return int(state["step"]), state["history"]


def _nonfinite(acc, cfg: TrainConfig, out: dict, step: int, count: int, what: str = "loss") -> None:
    """A loss or gradient norm that is NaN or infinite on some rank: stop naming the step and
    the values, or, within ``max_nonfinite_steps``, drop this update and say so. (DeepSpeed
    checks its own gradients; a non-finite update there shows as the next step's loss.)"""
    values = {k: float(v.detach()) for k, v in out.items()}
    what = f"step {step}: non-finite {what} on rank {acc.process_index}: {values}"
    if count > cfg.max_nonfinite_steps:
        raise TrainingError(
            f"{what} (or on another rank). Nothing after it is trained on; the last checkpoint "
            "is intact. Check optim.lr, the data, mixed precision; max_nonfinite_steps allows "
            f"skipping a few such steps ({cfg.max_nonfinite_steps} now)"
        )
    log.warning("%s: update dropped (%d of %d allowed)", what, count, cfg.max_nonfinite_steps)


def _resolve(cfg: TrainConfig, acc) -> tuple[TrainConfig, object]:
    """The config as it runs (:func:`ltdist.train.resolve.resolve_config`: at this world size,
    with an init_from export's settings), every change printed, and its plan; a plan that
    cannot finish is refused before any model is built."""
    resolved = resolve_config(cfg, acc.num_processes)
    for change in resolved.changes:
        acc.print(change)
    cfg, plan = resolved.config, resolved.plan
    fatal = [p for p in plan.problems if p.fatal]
    if fatal:
        raise TrainingError("this run cannot finish as configured: " + "; ".join(map(str, fatal)))
    for problem in plan.problems:
        if acc.is_main_process:
            log.warning("%s", problem)
    return cfg, plan


def _shuffled(labels: torch.Tensor, seed: int, loader: ShardLoader, acc) -> torch.Tensor:
    """Label rows permuted across the batch, seeded by the data position (resumes exactly)."""
    position = (seed, loader.epoch, loader.step, acc.process_index)
    gen = torch.Generator().manual_seed(hash(position) & 0x7FFFFFFF)
    return labels[torch.randperm(len(labels), generator=gen)]


def _check_resumable(state: dict, cfg: TrainConfig, acc) -> None:
    if state["task"] != cfg.task:
        raise TrainingError(
            f"the checkpoints under {cfg.checkpoint.dir or cfg.output_dir} are of task "
            f"{state['task']!r}, this run is {cfg.task!r}: use another output_dir"
        )
    if state["world_size"] == acc.num_processes:
        return
    if zero_stage(acc) or state.get("zero_stage"):
        raise TrainingError(
            f"checkpoint saved by {state['world_size']} processes with DeepSpeed ZeRO, now "
            f"{acc.num_processes}: ZeRO partitions the optimizer state per rank; resume with "
            f"{state['world_size']} processes"
        )
    if not cfg.loader.resampled:
        raise TrainingError(
            f"checkpoint saved by {state['world_size']} processes, now {acc.num_processes}: the "
            "exact data position needs the same layout. Resume with the same number of "
            "processes, or train in resampled mode (loader.resampled=true)"
        )


def _log_step(
    acc,
    parts,
    step,
    scheduler,
    since: tuple[float, int],
    global_batch,
    flops_per_sample: float = 0.0,
    peak: Peak | None = None,
) -> dict:
    """Losses averaged over the window and the ranks, except that a part named ``*_min`` /
    ``*_max`` (a range, e.g. DP-VLPA's DQR weights) keeps its minimum / maximum; samples/s
    over the window since the last record (``since`` = its time and step), and with
    ``flops_per_sample`` the achieved TFLOP/s (all devices and per device) and MFU against
    ``peak`` where it is known."""
    names = sorted(parts)
    reduce = {
        k: np.min if k.endswith("_min") else np.max if k.endswith("_max") else np.mean
        for k in names
    }
    local = torch.tensor([float(reduce[k](parts[k])) for k in names], device=acc.device)
    ranks = acc.gather(local[None]) if acc.num_processes > 1 else local[None]  # (world, n)
    values = [float(reduce[k](column)) for k, column in zip(names, ranks.cpu().numpy().T)]
    seconds = max(time.perf_counter() - since[0], 1e-9)
    record = {"step": step, **dict(zip(names, values))}
    record["lr"] = float(scheduler.get_last_lr()[0])
    record["samples_per_s"] = (step - since[1]) * global_batch / seconds
    if flops_per_sample:
        peak = peak or Peak(None, "")
        record |= throughput(flops_per_sample, record["samples_per_s"], acc.num_processes, peak)
    acc.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
    return record


def _step_line(record: dict, total: int, peak: Peak) -> str:
    """One log line per record: loss, samples/s, TFLOP/s, MFU."""
    line = f"step {record['step']}/{total}: loss {record['loss']:.4f}, "
    line += f"{record['samples_per_s']:.2f} samples/s"
    if "tflops" in record:
        line += f", {record['tflops']:.3g} TFLOP/s ({record['tflops_per_device']:.3g} per device)"
    if "mfu" in record:
        line += f", MFU {100 * record['mfu']:.1f}% of {peak.tflops:g} ({peak.source})"
    return line


def _best_weights(cfg: TrainConfig, acc, step: int, history: list) -> BestWeights | None:
    """The selection's best so far: none for a fresh run (a previous run's best/ goes), the
    killed run's pointer for a resumed one."""
    select = cfg.checkpoint.select
    if select == "last":
        return None
    split = cfg.data.val_split if select == "val" else cfg.data.eval_split
    best = BestWeights(storage.join(cfg.output_dir, "best"), select, split)
    if not step:
        best.clear(acc)
        return best
    try:
        best.load()
    except ValueError as e:
        raise TrainingError(str(e)) from None
    scored = [h["select_map"] for h in history if h.get("select_map") is not None]
    if scored and best.step is None:
        raise TrainingError(
            f"the checkpoint records selection scores up to step {step} but {best.root} holds "
            "no best weights (removed?): the selection cannot go on; use another output_dir"
        )
    if best.step is not None:
        acc.print(f"selection: the best so far is step {best.step} ({split} mAP {best.map:.4f})")
    return best


def _periodic_eval(
    acc, cfg: TrainConfig, model, module, ema, space, step: int, best, total: int, caches: dict
) -> dict:
    """mAP on the evaluation split (not at the last step: the final evaluation follows) and,
    with a selection, on its split, keeping these weights when they beat the best so far;
    a split in ``caches`` is scored from its token cache."""
    eval_split = cfg.data.eval_split if step < total else ""
    splits = [s for s in dict.fromkeys((eval_split, best.split if best else "")) if s]
    if not splits:
        return {"step": step}
    record: dict = {"step": step}
    with ema.swapped(module) if ema is not None else contextlib.nullcontext():
        sync_buffers(acc, module)
        results = {}
        for split in splits:  # the selection split scored once when it is the eval split
            logits, targets = evaluate_split(
                acc,
                module,
                cfg.data.location,
                split,
                cfg.data.eval_batch_size,
                cfg.loader.image_size,
                cfg.data.eval_limit,
                cfg.loader.transform,
                cfg.loader.clip_preprocess(),
                caches,
            )
            results[split] = map_from_logits(logits, targets, space, cfg.eval.scoring)
        if best is not None:
            score = results[best.split].summary()["all"]
            record["select_map"] = score
            meta = {"weights": "ema" if ema is not None else "raw", "scoring": cfg.eval.scoring}
            meta["checkpoint_selection"] = best.selection
            if best.offer(
                acc, step, score, lambda: _weights(acc, model, module, ema), space, cfg, meta
            ):
                acc.print(f"step {step}: the best so far on {best.split} (mAP {score:.4f})")
    if eval_split:
        summary = results[eval_split].summary()
        acc.log({f"eval/map_{k}": v for k, v in summary.items() if v is not None}, step=step)
        acc.print(f"step {step}: {format_summary(results[eval_split])}")
        record["eval_map"] = summary
    if best is not None and record["select_map"] is not None:
        acc.log({f"select/map_all_{best.split}": record["select_map"]}, step=step)
    return record


def _weights(acc, model, module, ema) -> dict | None:
    """The weights ``module`` is evaluated with, for an export (inside the EMA swap): the
    float32 averages with EMA; gathered from ZeRO-3 (every rank takes part); None on the
    other ranks."""
    state = acc.get_state_dict(model) if zero_stage(acc) == 3 else None
    if state is None and acc.is_main_process:
        state = module.state_dict()
        if ema is not None:  # the float32 averages, not their bf16 copies in the module
            state.update({k: v for k, v in ema.state_dict().items() if k in state})
    return state


def _batch_audit(cfg: TrainConfig, acc):
    """With ``audit_batches``, each rank appends the keys of every batch it trains on."""
    if not cfg.audit_batches or not storage.is_local(cfg.output_dir):
        return None
    folder = os.path.join(cfg.output_dir, "batches")
    os.makedirs(folder, exist_ok=True)
    return open(os.path.join(folder, f"rank{acc.process_index}.jsonl"), "a", buffering=1)


def _finish(
    acc, cfg, model, module, ema, space, history, step, best, seconds, cost, caches
) -> dict:
    """Final evaluation, thresholds, report, plots, export, metrics.json: of the selected
    weights (loaded back from their export) with a selection, else of the last ones; ``cost``
    (FLOPs per sample, achieved TFLOP/s and MFU) goes into metrics.json as it is; a split in
    ``caches`` is scored from its token cache."""
    out = cfg.output_dir
    metrics: dict = {"status": "completed", "task": cfg.task, "steps": step}
    kind = "EMA" if ema is not None else "final"
    selected = best.record() if best is not None else None
    if best is not None and selected is None:
        log.warning("checkpoint.select: no evaluation scored a finite mAP; the last weights stand")
    selection = selected["by"] if selected else "last"
    swap = ema.swapped(module) if ema is not None and not selected else contextlib.nullcontext()
    with swap:
        if selected:
            state = read_export_weights(best.folder)
            module.load_state_dict(state)
            state = state if acc.is_main_process else None
            title = (
                f"{cfg.task} ({kind} weights of step {best.step} of {step}, the best on "
                f"{best.split}: mAP {100 * best.map:.2f})"
            )
        else:
            state = _weights(acc, model, module, ema)
            title = f"{cfg.task} ({kind} weights, step {step})"
        evaluation = {}
        if cfg.data.eval_split:
            sync_buffers(acc, module)
            evaluation = evaluate_and_report(
                acc,
                module,
                space,
                cfg.data.location,
                cfg.data.eval_split,
                storage.join(out, "report"),
                title,
                cfg.data.eval_batch_size,
                cfg.loader.image_size,
                val_split=cfg.data.val_split,
                transform=cfg.loader.transform,
                preprocess=cfg.loader.clip_preprocess(),
                scoring=cfg.eval.scoring,
                checkpoint_selection=selection,
                caches=caches,
            )
    if acc.is_main_process:
        meta = {
            "step": best.step if selected else step,
            "weights": "ema" if ema is not None else "raw",
            "checkpoint_selection": selection,
            "global_threshold": 0.5,
        }
        if selected:  # which step was picked, on which split, with which mAP
            metrics["selection"] = meta["selection"] = selected
            meta["steps_trained"] = step
        if evaluation:
            final = {f"eval/map_{k}": v for k, v in evaluation["map"].items() if v is not None}
            acc.log(final, step=step)
            metrics["map"] = meta["map"] = evaluation["map"]
            metrics["scoring"] = meta["scoring"] = evaluation["scoring"]
            metrics["checkpoint_selection"] = evaluation["checkpoint_selection"]
            metrics["coverage"] = evaluation["coverage"]
            metrics["table"] = evaluation["table"]
            metrics["f1"] = evaluation["f1"]
            metrics["splits"] = evaluation["splits"]
            metrics["report"] = evaluation["report"]
            if not selected:  # the selected step's weights are not the last step's
                history.append({"step": step, "eval_map": evaluation["map"]})
            if cfg.data.val_split:  # per-class thresholds picked on it
                meta["thresholds"] = evaluation["thresholds"]
                meta["threshold_split"] = cfg.data.val_split
        save_export(storage.join(out, "export"), state, space, cfg, meta)
        series: dict[str, list[tuple[int, float]]] = {}
        for rec in history:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    series.setdefault(k, []).append((rec["step"], float(v)))
            for k, v in (rec.get("eval_map") or {}).items():
                if v is not None:
                    series.setdefault(f"eval map_{k}", []).append((rec["step"], float(v)))
        if series:
            storage.write_bytes_atomic(
                storage.join(out, "curves.png"), plot_curves(series, title=cfg.task)
            )
        metrics.update(
            train_seconds=round(seconds, 1),
            **cost,
            world_size=acc.num_processes,
            distributed_type=str(acc.distributed_type),
            zero_stage=zero_stage(acc),
            mixed_precision=acc.mixed_precision,
            history=history,
            export=storage.join(out, "export"),
            provenance={
                "packages": package_versions(PACKAGES),
                "git_commit": git_commit(),
                "config": to_dict(cfg),
            },
        )
        storage.write_bytes_atomic(
            storage.join(out, "metrics.json"), json.dumps(metrics, indent=1).encode()
        )
        if "table" in metrics:
            acc.print(metrics["table"])
            acc.print(metrics["coverage"]["text"])
    acc.wait_for_everyone()
    return metrics

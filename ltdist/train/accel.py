"""The Accelerate / DeepSpeed glue of the training loop: the accelerator and its process
group, who owns the precision, the DeepSpeed config the trainer fills in, the ZeRO stage, the
dtype of inputs, and the collectives every rank must take together."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping
from datetime import timedelta

import torch

from ltdist import storage
from ltdist.entry import UserError
from ltdist.train.config import TrainConfig


class TrainingError(UserError, RuntimeError):
    """A run that cannot start or continue as configured (the message says why)."""


def make_accelerator(cfg: TrainConfig, project_dir: str, log_with: str | None, logging_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, ProjectConfiguration

    pg = InitProcessGroupKwargs(
        timeout=timedelta(seconds=cfg.collective_timeout_s), backend=_backend()
    )
    return Accelerator(
        mixed_precision=mixed_precision(cfg),
        gradient_accumulation_steps=cfg.optim.grad_accum,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=logging_dir),
        kwargs_handlers=[pg],
        step_scheduler_with_optimizer=False,  # stepped here once per optimizer step
    )


def _backend() -> str | None:
    """CPU processes talk over gloo; a lone process (no launcher) needs no process group."""
    launched = (
        int(os.environ.get("WORLD_SIZE", "1")) > 1 or "ACCELERATE_USE_DEEPSPEED" in os.environ
    )
    return "gloo" if launched and not torch.cuda.is_available() else None


def command_state():
    """The process's place in a launch (``accelerate launch`` / ``torchrun``; one process
    without) for a command that is not a training run, e.g. ``ltdist features cache``: an
    Accelerate ``PartialState`` (rank, world, device) and a barrier across its processes."""
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState(backend=_backend())

    def barrier() -> None:  # PartialState's own is a no-op for CPU processes
        if dist.is_available() and dist.is_initialized():
            dist.barrier()

    return state, barrier


def mixed_precision(cfg: TrainConfig) -> str:
    """The training config owns the precision; a launcher that asks for another is an error.

    ``accelerate launch`` passes its ``--mixed_precision`` (or its config file's) to the process
    as ``ACCELERATE_MIXED_PRECISION``, and "no" both when asked and when not given at all: so
    "no" defers to the config, and any other value must agree with it.
    """
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if launcher not in ("", "no") and launcher != cfg.mixed_precision:
        raise TrainingError(
            f"accelerate launch asks for mixed precision {launcher!r} (its --mixed_precision or "
            f"its config file), the training config for {cfg.mixed_precision!r}: make them agree "
            f"(the training config owns it: override mixed_precision={launcher}, or drop the "
            "launcher's setting)"
        )
    return cfg.mixed_precision


def is_deepspeed(acc) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def zero_stage(acc) -> int:
    if not is_deepspeed(acc):
        return 0
    return int(
        acc.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    )


def configure_deepspeed(acc, cfg: TrainConfig) -> None:
    """Batch size and clipping come from the training config (the JSON says "auto")."""
    ds = acc.state.deepspeed_plugin.deepspeed_config
    if "optimizer" in ds:
        raise TrainingError(
            "the DeepSpeed config has an 'optimizer' block: remove it, the trainer passes torch's "
            "AdamW with its parameter groups (and DeepSpeed's compiled optimizers may not build)"
        )
    ds["train_micro_batch_size_per_gpu"] = cfg.loader.batch_size
    ds["train_batch_size"] = cfg.loader.batch_size * cfg.optim.grad_accum * acc.num_processes
    ds["gradient_accumulation_steps"] = cfg.optim.grad_accum
    ds["gradient_clipping"] = cfg.optim.grad_clip
    if zero_stage(acc) == 3:  # the export gathers the partitioned weights
        ds.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


def write_rank_info(cfg: TrainConfig, acc) -> None:
    """Who this process is: one small file per rank (multi-node launches are checked by it)."""
    if not storage.is_local(cfg.output_dir):
        return
    info = {
        "rank": acc.process_index,
        "local_rank": acc.local_process_index,
        "world_size": acc.num_processes,
        "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0))),
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "distributed_type": str(acc.distributed_type),
        "zero_stage": zero_stage(acc),
        "mixed_precision": acc.mixed_precision,
    }
    folder = os.path.join(cfg.output_dir, "ranks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"rank{acc.process_index}.json"), "w") as f:
        json.dump(info, f)


def to_device(batch: Mapping, device, float_dtype=None) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device, non_blocking=True)
            if float_dtype is not None and v.is_floating_point():
                v = v.to(float_dtype)
        elif isinstance(v, Mapping):
            v = to_device(v, device, float_dtype)
        out[k] = v
    return out


def input_dtype(acc) -> torch.dtype | None:
    """DeepSpeed bf16/fp16 casts the module itself, so its float inputs must be cast too."""
    if is_deepspeed(acc) and acc.mixed_precision in ("bf16", "fp16"):
        return torch.bfloat16 if acc.mixed_precision == "bf16" else torch.float16
    return None


def agree(acc, flag: bool) -> bool:
    """True on every rank when any rank asks (a stop must be taken at the same step)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def sync_buffers(acc, module) -> None:
    """Give every rank rank 0's buffers before an evaluation. DDP broadcasts them only at the
    start of a training forward, so after the last step each rank holds its own BatchNorm
    statistics (and its own EMA of them): ranks would score their share of the evaluation with
    other weights than the export's."""
    if acc.num_processes > 1 and torch.distributed.is_initialized():
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)

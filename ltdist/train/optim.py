"""AdamW with decoupled weight decay on the right parameters, and the learning-rate schedules.

Parameter groups: only trainable parameters enter the optimizer (frozen towers cost no optimizer
state); vectors and scalars (biases, norm weights, temperatures) and named embeddings such as
``query_tokens`` get no weight decay; parameters under a backbone prefix train at
``lr * backbone_lr_mult``.

Schedules are per optimizer step (0-based; the scheduler steps once per optimizer step, i.e.
once every ``grad_accum`` micro-batches) and multiply each group's peak lr:

- ``cosine``: linear warmup ``(step + 1) / warmup``, then cosine from 1 to ``min_lr_ratio``.
- ``constant``: the same warmup, then 1.
- ``onecycle``: torch's ``OneCycleLR`` (cos annealing, div_factor 25, final_div_factor 1e4,
  ``pct_start = warmup / total``), CPRFL's schedule: cosine from 1/25 up to 1 over the warmup,
  then cosine down to 1/(25 * 1e4).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = [
    "OptimConfig",
    "ScheduleFactor",
    "build_optimizer",
    "build_scheduler",
    "lr_factor",
    "param_group_names",
    "param_groups",
]

Schedule = Literal["cosine", "onecycle", "constant"]

# OneCycleLR's defaults, which CPRFL's official code keeps.
ONECYCLE_DIV_FACTOR = 25.0
ONECYCLE_FINAL_DIV_FACTOR = 1e4

GROUP_ORDER = ("backbone/decay", "backbone/no_decay", "rest/decay", "rest/no_decay")


@dataclass
class OptimConfig:
    lr: float = 1e-4  # peak lr of the trainable non-backbone parts
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    backbone_lr_mult: float = 0.1  # lr multiplier under the task's backbone prefixes
    schedule: Schedule = "cosine"
    warmup_steps: int = 0  # optimizer steps; onecycle: the rising phase (pct_start * total)
    warmup_ratio: float = 0.0  # alternative to warmup_steps: a fraction of the total steps
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    grad_accum: int = 1  # micro-batches per optimizer step
    # torch's fused AdamW: one kernel over all parameters (CPU and CUDA) instead of a loop
    # over them; the update is the same to float rounding (ltdist/train/optim.py)
    fused: bool = True

    def validate(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"OptimConfig.lr must be finite and > 0, got {self.lr}")
        if not math.isfinite(self.weight_decay) or not math.isfinite(self.grad_clip):
            raise ValueError(
                f"OptimConfig: weight_decay and grad_clip must be finite, got "
                f"{self.weight_decay}, {self.grad_clip}"
            )
        if self.weight_decay < 0 or self.eps <= 0 or self.backbone_lr_mult < 0:
            raise ValueError(
                "OptimConfig: weight_decay and backbone_lr_mult must be >= 0 and eps > 0, got "
                f"{self.weight_decay}, {self.backbone_lr_mult}, {self.eps}"
            )
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"OptimConfig.betas must be two values in [0, 1), got {self.betas}")
        if self.schedule not in typing.get_args(Schedule):
            raise ValueError(
                f"OptimConfig.schedule {self.schedule!r} is not one of {typing.get_args(Schedule)}"
            )
        if self.warmup_steps < 0:
            raise ValueError(f"OptimConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        for name in ("warmup_ratio", "min_lr_ratio"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"OptimConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(
                "OptimConfig: set warmup_steps or warmup_ratio, not both "
                f"(got {self.warmup_steps} and {self.warmup_ratio})"
            )
        if self.grad_clip < 0:
            raise ValueError(f"OptimConfig.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")
        if self.grad_accum < 1:
            raise ValueError(f"OptimConfig.grad_accum must be >= 1, got {self.grad_accum}")

    def warmup_for(self, total_steps: int) -> int:
        """The warmup in optimizer steps: ``warmup_steps``, else ``warmup_ratio`` of the total
        rounded to the nearest step (at least 1 when the ratio is set). A warmup that does not
        end before the run does is an error, not a schedule that never decays."""
        if total_steps < 1:
            raise ValueError(f"total steps must be >= 1, got {total_steps}")
        warmup = self.warmup_steps
        if not warmup and self.warmup_ratio:
            warmup = max(1, round(self.warmup_ratio * total_steps))
        if warmup >= total_steps:
            raise ValueError(f"warmup ({warmup} steps) >= total steps ({total_steps})")
        return warmup


def _matches_prefix(name: str, prefix: str) -> bool:
    """Prefixes match whole module paths: "image_tower" covers "image_tower.x", not
    "image_tower_proj.x"."""
    prefix = prefix.rstrip(".")
    return name == prefix or name.startswith(prefix + ".")


def _assign_groups(
    model: nn.Module, backbone_prefixes: Sequence[str], no_decay_names: Sequence[str]
) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Trainable (name, parameter) pairs by group name, non-empty groups in ``GROUP_ORDER``."""
    named = list(model.named_parameters())
    unmatched = [p for p in backbone_prefixes if not any(_matches_prefix(n, p) for n, _ in named)]
    if unmatched:
        raise ValueError(f"backbone prefixes {unmatched} match no parameter of the model")
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {name: [] for name in GROUP_ORDER}
    for name, param in named:
        if not param.requires_grad:
            continue
        part = "backbone" if any(_matches_prefix(name, p) for p in backbone_prefixes) else "rest"
        no_decay = param.ndim <= 1 or any(key in name for key in no_decay_names)
        groups[f"{part}/{'no_decay' if no_decay else 'decay'}"].append((name, param))
    groups = {name: members for name, members in groups.items() if members}
    if not groups:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    return groups


def param_groups(
    model: nn.Module,
    cfg: OptimConfig,
    backbone_prefixes: Sequence[str] = (),
    no_decay_names: Sequence[str] = (),
) -> list[dict]:
    """Optimizer parameter groups (``params``, ``lr``, ``weight_decay``, ``name``) of the
    trainable parameters: up to four, backbone/rest x decay/no_decay, empty ones left out."""
    groups = []
    for name, members in _assign_groups(model, backbone_prefixes, no_decay_names).items():
        lr_mult = cfg.backbone_lr_mult if name.startswith("backbone/") else 1.0
        groups.append(
            {
                "params": [param for _, param in members],
                "lr": cfg.lr * lr_mult,
                "weight_decay": cfg.weight_decay if name.endswith("/decay") else 0.0,
                "name": name,
            }
        )
    return groups


def param_group_names(
    model: nn.Module, backbone_prefixes: Sequence[str] = (), no_decay_names: Sequence[str] = ()
) -> dict[str, list[str]]:
    """The parameter names of each group of :func:`param_groups`, in the same order (for logs
    and checks; torch param groups carry tensors only)."""
    assigned = _assign_groups(model, backbone_prefixes, no_decay_names)
    return {group: [name for name, _ in members] for group, members in assigned.items()}


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    backbone_prefixes: Sequence[str] = (),
    no_decay_names: Sequence[str] = (),
) -> torch.optim.AdamW:
    cfg.validate()
    groups = param_groups(model, cfg, backbone_prefixes, no_decay_names)
    return torch.optim.AdamW(
        groups,
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        fused=cfg.fused or None,  # None: torch's default, a loop (CPU) or for-each (CUDA)
    )


class ScheduleFactor:
    """The lr multiplier as a function of the optimizer step, for ``LambdaLR``. A class with
    plain attributes rather than a closure: ``LambdaLR.state_dict`` saves its ``__dict__``, and
    ints, floats and strings load with ``torch.load(weights_only=True)``."""

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        self.schedule = cfg.schedule
        self.total_steps = total_steps
        self.warmup_steps = cfg.warmup_for(total_steps)
        self.min_lr_ratio = cfg.min_lr_ratio

    def __call__(self, step: int) -> float:
        if self.schedule == "onecycle":
            return self._onecycle(step)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine

    def _onecycle(self, step: int) -> float:
        """``OneCycleLR``'s two phases with max_lr 1: the rising one ends at step
        ``warmup - 1``, the falling one at ``total - 1`` (held there after). A one-step rise
        (which torch divides by zero on) is the peak."""
        initial = 1.0 / ONECYCLE_DIV_FACTOR
        final = initial / ONECYCLE_FINAL_DIV_FACTOR
        rise_end = self.warmup_steps - 1
        if step <= rise_end:
            pct = step / rise_end if rise_end > 0 else 1.0
            start, end = initial, 1.0
        else:
            pct = min((step - rise_end) / (self.total_steps - 1 - rise_end), 1.0)
            start, end = 1.0, final
        return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The multiplier of every group's peak lr at optimizer step ``step`` (0-based)."""
    return ScheduleFactor(cfg, total_steps)(step)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over every group: step it once per optimizer step."""
    cfg.validate()
    return torch.optim.lr_scheduler.LambdaLR(optimizer, ScheduleFactor(cfg, total_steps))

"""An exponential moving average of the trained weights, for evaluation and export.

Only what training changes is tracked: the parameters that require grad when the EMA is built
(a frozen CLIP tower is not duplicated in memory) and the persistent buffers (BatchNorm running
statistics are averaged, integer counters copied). Non-persistent buffers are constants rebuilt
outside checkpoints (e.g. DP-VLPA's class frequencies) and are left alone.

The shadow is float32 whatever the model's dtype: with DeepSpeed bf16 the module parameters are
bf16, and ``(1 - decay) * param`` at decay 0.9999 is below bf16's resolution of the average.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["EMA"]

NUM_UPDATES_KEY = "__num_updates__"


class EMA:
    """Exponential moving average of a model's trainable parameters and float buffers, in
    float32.

    Each :meth:`update` does ``shadow = d * shadow + (1 - d) * value`` with ``d = decay``. With
    ``warmup_steps > 0`` the first ``warmup_steps`` updates use ``d = min(decay, (1 + n) /
    (10 + n))``, n = the updates done before this one, so the average is not dominated by the
    initial weights early in training (d = 0.1, 0.18, 0.25, ... rising towards ``decay``).
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps must be >= 0, got {warmup_steps}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self._num_updates = 0
        persistent = set(model.state_dict(keep_vars=True))
        tracked = {n: p for n, p in model.named_parameters() if p.requires_grad}
        tracked.update({n: b for n, b in model.named_buffers() if n in persistent})
        if not tracked:
            raise ValueError(f"{type(model).__name__} has no trainable parameters or buffers")
        self.shadow: dict[str, torch.Tensor] = {
            name: t.detach().to(torch.float32 if t.is_floating_point() else t.dtype, copy=True)
            for name, t in tracked.items()
        }

    @property
    def num_updates(self) -> int:
        return self._num_updates

    def current_decay(self) -> float:
        """The d the next :meth:`update` uses."""
        n = self._num_updates
        if n < self.warmup_steps:
            return min(self.decay, (1 + n) / (10 + n))
        return self.decay

    def _model_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's tensors under the tracked names; a name the model lacks is an error (a
        wrapped model, e.g. DDP's ``module.`` prefix, must be unwrapped first)."""
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        missing = [name for name in self.shadow if name not in tensors]
        if missing:
            raise ValueError(f"model has none of the EMA's tensors {missing[:5]} ({len(missing)})")
        return {name: tensors[name] for name in self.shadow}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        for name, value in self._model_tensors(model).items():
            shadow = self.shadow[name]
            if shadow.is_floating_point():
                # lerp: shadow + (1 - d) (value - shadow), exact when value == shadow
                shadow.lerp_(value.detach().to(shadow.device, torch.float32), weight)
            else:
                shadow.copy_(value)
        self._num_updates += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The shadow tensors by name plus ``__num_updates__`` (int64 scalar): a flat dict that
        ``safetensors.torch.save_file`` takes. The tensors are the live shadow (as
        ``nn.Module.state_dict``): save or copy them before the next update."""
        return {**self.shadow, NUM_UPDATES_KEY: torch.tensor(self._num_updates, dtype=torch.int64)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.shadow) | {NUM_UPDATES_KEY}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"EMA state: missing keys {missing}, unexpected keys {unexpected}")
        mismatched = [
            f"{name}: {tuple(state[name].shape)} vs {tuple(shadow.shape)}"
            for name, shadow in self.shadow.items()
            if state[name].shape != shadow.shape
        ]
        if mismatched:
            raise ValueError(f"EMA state: shape mismatches (saved vs model) {mismatched}")
        for name, shadow in self.shadow.items():
            shadow.copy_(state[name])
        self._num_updates = int(state[NUM_UPDATES_KEY])

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averages into the model, each cast to its tensor's dtype."""
        for name, target in self._model_tensors(model).items():
            target.copy_(self.shadow[name])

    @contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """The model with the EMA weights inside the block (evaluation, export), its own weights
        restored on exit, also when the block raises."""
        targets = self._model_tensors(model)
        with torch.no_grad():
            saved = {name: t.detach().clone() for name, t in targets.items()}
        try:
            self.copy_to(model)
            yield model
        finally:
            with torch.no_grad():
                for name, target in targets.items():
                    target.copy_(saved[name])

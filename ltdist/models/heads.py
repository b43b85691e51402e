"""Baseline heads on visual tokens."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltdist.losses.contrastive import full_precision


class LinearHead(nn.Module):
    """The ERM baseline: pool the tokens (B, N, D), then Linear(D, C) -> logits (B, C).

    ``pool='mean'`` averages all N tokens given (a CLIP class token included, if present);
    ``pool='cls'`` takes token 0 (a CLIP tower's class token).
    """

    def __init__(self, token_dim: int, num_classes: int, pool: Literal["mean", "cls"] = "mean"):
        super().__init__()
        if pool not in ("mean", "cls"):
            raise ValueError(f"LinearHead pool must be 'mean' or 'cls', got {pool!r}")
        self.pool = pool
        self.fc = nn.Linear(token_dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Pooling and logits in float32 with autocast off: bf16 logits keep 8 significant
        # bits, which ties and reorders the samples AP ranks.
        dtype = torch.promote_types(tokens.dtype, torch.float32)
        with full_precision(tokens):
            tokens = tokens.to(dtype)
            pooled = tokens.mean(dim=1) if self.pool == "mean" else tokens[:, 0]  # (B, D)
            return F.linear(pooled, self.fc.weight.to(dtype), self.fc.bias.to(dtype))  # (B, C)

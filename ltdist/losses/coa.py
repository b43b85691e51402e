"""DP-VLPA's co-occurrence alignment loss COA (Eq. 5): beta * ||Q_co - Q Q^T||_F^2.

Readings (the paper leaves both Q and Q_co open):

- Q_co (``target``): the symmetric normalised co-occurrence of the training split,
  ``co[i, j] / sqrt(n_i n_j)`` (``"cosine"``, default). It is exactly the cosine similarity of
  the label columns of classes i and j over the training images, so its diagonal is 1 and it
  is the value Q Q^T takes when Q holds the L2-normalised label columns: the target is
  reachable, and a perfect predictor has COA = 0. Alternatives: ``"conditional"``, the
  symmetrised conditional (P(j|i) + P(i|j)) / 2 (the benchmark appendix stores P(j|i)), and
  ``"jaccard"``, co / (n_i + n_j - co). Classes never seen in training get a row of 0 with a 1
  on the diagonal.
- Q (``source``): ``"predictions"`` (default): Q[c] = the L2-normalised column of class c's
  predicted probabilities (sigmoid of the logits) over the batch, (C, B); Q Q^T is then the
  batch estimate of the predicted co-occurrence cosine, matched against Q_co. With
  ``gather=True`` (default) the predictions of all ranks are gathered with gradient, so the
  batch is the global batch and a 2-rank run equals a 1-rank run: every rank returns the same
  value, and the gather's summed backward plus DDP's average give the 1-process gradient.
  ``"prototypes"``: Q = the L2-normalised class prototype features (C, D) (e.g. the class
  text embeddings E_class), aligning the geometry of the class embeddings with co-occurrence;
  no batch statistics, nothing gathered.
- ``reduction="mean"`` (default) divides the squared Frobenius norm by C^2, i.e. Eq. 5 with
  beta' = beta / C^2, so beta does not depend on the number of classes (80 on COCO-LT: the
  sum starts in the thousands and would swamp L_CLS); ``"sum"`` is Eq. 5 literally.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ltdist.distributed import gather_with_grad

__all__ = ["CooccurrenceLoss", "normalized_cooccurrence"]


def normalized_cooccurrence(
    cooccurrence: np.ndarray | torch.Tensor,
    frequency: np.ndarray | torch.Tensor | None = None,
    target: Literal["cosine", "conditional", "jaccard"] = "cosine",
) -> torch.Tensor:
    """Q_co (C, C) float64 from co-occurrence counts (diagonal = frequency when not given)."""
    co = torch.as_tensor(np.asarray(cooccurrence), dtype=torch.float64)
    if co.dim() != 2 or co.shape[0] != co.shape[1]:
        raise ValueError(f"co-occurrence must be (C, C), got {tuple(co.shape)}")
    if not torch.equal(co, co.T):
        raise ValueError("co-occurrence counts must be symmetric (co[i, j] == co[j, i])")
    freq = co.diagonal().clone() if frequency is None else torch.as_tensor(np.asarray(frequency))
    freq = freq.to(torch.float64)
    n_i, n_j = freq[:, None], freq[None, :]
    if target == "cosine":
        denom = (n_i * n_j).sqrt()
    elif target == "conditional":
        # (P(j|i) + P(i|j)) / 2 = co * (n_i + n_j) / (2 n_i n_j)
        denom = 2 * n_i * n_j / (n_i + n_j).clamp_min(1e-12)
    elif target == "jaccard":
        denom = n_i + n_j - co
    else:
        raise ValueError(f"unknown Q_co target {target!r}; cosine, conditional or jaccard")
    q_co = torch.where(denom > 0, co / denom.clamp_min(1e-12), torch.zeros_like(co))
    q_co.fill_diagonal_(1.0)
    return q_co


class CooccurrenceLoss(nn.Module):
    """COA (Eq. 5): ``beta * ||Q_co - Q Q^T||_F^2`` (readings in the module docstring).

    ``forward(x)``: with ``source="predictions"`` x is (b, C) logits (``activation="sigmoid"``)
    or probabilities (``activation="none"``); with ``source="prototypes"`` x is (C, D).
    """

    def __init__(
        self,
        cooccurrence: np.ndarray | torch.Tensor,
        frequency: np.ndarray | torch.Tensor | None = None,
        beta: float = 1.0,
        target: Literal["cosine", "conditional", "jaccard"] = "cosine",
        source: Literal["predictions", "prototypes"] = "predictions",
        activation: Literal["sigmoid", "none"] = "sigmoid",
        reduction: Literal["mean", "sum"] = "mean",
        gather: bool = True,
    ) -> None:
        super().__init__()
        if source not in ("predictions", "prototypes"):
            raise ValueError(f"unknown COA source {source!r}; 'predictions' or 'prototypes'")
        if activation not in ("sigmoid", "none") or reduction not in ("mean", "sum"):
            raise ValueError(f"bad COA activation {activation!r} or reduction {reduction!r}")
        # Derived from the label space, which travels with checkpoints: not saved again.
        self.register_buffer(
            "q_co", normalized_cooccurrence(cooccurrence, frequency, target), persistent=False
        )
        self.beta, self.source, self.activation = beta, source, activation
        self.reduction, self.gather = reduction, gather

    @classmethod
    def from_label_space(cls, label_space, **kwargs) -> CooccurrenceLoss:
        """From a :class:`ltdist.labels.LabelSpace` (``.cooccurrence``, ``.frequency``)."""
        return cls(label_space.cooccurrence, label_space.frequency, **kwargs)

    def class_features(self, x: torch.Tensor) -> torch.Tensor:
        """Q (C, .) with unit rows, from predictions (b, C) or prototypes (C, D)."""
        x = x if x.dtype in (torch.float32, torch.float64) else x.float()
        c = self.q_co.shape[0]
        if self.source == "prototypes":
            if x.shape[0] != c:
                raise ValueError(f"prototypes {tuple(x.shape)}: expected ({c}, D)")
            return F.normalize(x, dim=-1)
        if x.dim() != 2 or x.shape[1] != c:
            raise ValueError(f"predictions {tuple(x.shape)}: expected (b, {c})")
        probs = torch.sigmoid(x) if self.activation == "sigmoid" else x
        if self.gather:
            probs, _, _ = gather_with_grad(probs)  # (B, C): the global batch
        return F.normalize(probs.T, dim=-1)  # (C, B): class c's predictions over the batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = self.class_features(x)
            q_co = self.q_co.to(q.dtype)
            # Eq. 5: L_COA = beta * ||Q_co - Q Q^T||_F^2
            sq = (q_co - q @ q.T).pow(2)
        return self.beta * (sq.mean() if self.reduction == "mean" else sq.sum())

"""DP-VLPA's co-occurrence alignment loss COA (Eq. 5): beta * ||Q_co - Q Q^T||_F^2.

The paper's form (the defaults): Q holds the visual queries, Q_co the training split's
co-occurrence probabilities.

- Q (``source="queries"``): per image i, row c of Q_i (C, D) is the L2-normalised query
  feature assigned to class c, the query k* = argmax_k cos(q_k^i, E_c) most similar to the
  class (the largest term of class c's score, ``DPVLPA.class_logits``). The assignment is hard:
  Eq. 5 names queries, not mixtures of them. The argmax has no gradient, so COA trains the
  queries (and what produces them), never the class embeddings E_class. All C x C entries of
  Q_i Q_i^T are compared with Q_co, as Eq. 5 is written (not only the pairs of classes present
  in the image: every class has an assigned query). Two classes assigned the same query give
  Q_i Q_i^T = 1 there, a constant.
- Q_co (``target``): ``"conditional"`` (default), the paper's co-occurrence probabilities:
  P(j|i) = co[i, j] / n_i from the training split (the benchmark appendix stores this matrix).
  P(j|i) is asymmetric and Q Q^T is symmetric, so only its symmetric part can be matched: the
  target is (P(j|i) + P(i|j)) / 2 (the antisymmetric part adds a constant to the loss, no
  gradient); diagonal 1 = P(i|i). Alternatives: ``"cosine"``, co[i, j] / sqrt(n_i n_j), the
  cosine of the label columns (a Gram matrix, so reachable: the target of the batch-column
  readings below), and ``"jaccard"``, co / (n_i + n_j - co). Classes never seen in training get
  a row of 0 with a 1 on the diagonal.
- Reduction (``reduction="sum"``, default): the squared Frobenius norm as written, a sum over
  the C^2 entries per image, averaged over the images of the global batch so that the loss
  does not grow with the batch size. ``"mean"`` divides each image's sum by C^2 (beta' =
  beta / C^2). Nothing is gathered: rank r returns world * (its images' sum) / N_global, with
  N_global the image count summed over ranks (one tiny gather of the count), so the mean over
  ranks is the 1-process loss and DDP's gradient average is the 1-process gradient, even when
  ranks hold different numbers of images. ``gather=False`` averages over the local images.

Other readings of Q (named options, numbers as before):

- ``"predictions"``: Q[c] = the L2-normalised column of class c's predicted probabilities
  (sigmoid of the logits) over the batch, (C, B); Q Q^T is then the batch estimate of the
  predicted co-occurrence cosine. With ``gather=True`` the predictions of all ranks are
  gathered with gradient, so the batch is the global batch and a 2-rank run equals a 1-rank
  run: every rank returns the same value, and the gather's summed backward plus DDP's average
  give the 1-process gradient.
- ``"prototypes"``: Q = the L2-normalised class prototype features (C, D) (e.g. E_class),
  aligning the geometry of the class embeddings with co-occurrence; nothing is gathered.

For these two a batch gives one C x C matrix: ``"mean"`` is the mean over its C^2 entries and
``"sum"`` the sum. Today's configuration of them was ``target="cosine", reduction="mean"``.
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
    target: Literal["conditional", "cosine", "jaccard"] = "conditional",
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
        # symmetric part of P(j|i) = co / n_i: (P(j|i) + P(i|j)) / 2 = co (n_i + n_j) / (2 n_i n_j)
        denom = 2 * n_i * n_j / (n_i + n_j).clamp_min(1e-12)
    elif target == "jaccard":
        denom = n_i + n_j - co
    else:
        raise ValueError(f"unknown Q_co target {target!r}; conditional, cosine or jaccard")
    q_co = torch.where(denom > 0, co / denom.clamp_min(1e-12), torch.zeros_like(co))
    q_co.fill_diagonal_(1.0)
    return q_co


class CooccurrenceLoss(nn.Module):
    """COA (Eq. 5): ``beta * ||Q_co - Q Q^T||_F^2`` (readings in the module docstring).

    ``forward(x, class_embeddings=None)``: with ``source="queries"`` x is the query features
    (b, K, D) and ``class_embeddings`` E_class (C, D); with ``source="predictions"`` x is (b, C)
    logits (``activation="sigmoid"``) or probabilities (``activation="none"``); with
    ``source="prototypes"`` x is (C, D).
    """

    def __init__(
        self,
        cooccurrence: np.ndarray | torch.Tensor,
        frequency: np.ndarray | torch.Tensor | None = None,
        beta: float = 1.0,
        target: Literal["conditional", "cosine", "jaccard"] = "conditional",
        source: Literal["queries", "predictions", "prototypes"] = "queries",
        activation: Literal["sigmoid", "none"] = "sigmoid",
        reduction: Literal["sum", "mean"] = "sum",
        gather: bool = True,
    ) -> None:
        super().__init__()
        if source not in ("queries", "predictions", "prototypes"):
            raise ValueError(
                f"unknown COA source {source!r}; 'queries', 'predictions' or 'prototypes'"
            )
        if activation not in ("sigmoid", "none") or reduction not in ("sum", "mean"):
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

    def assigned_queries(
        self, queries: torch.Tensor, class_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """Q_i (b, C, D): per image, the unit query with the highest cosine to each E_c."""
        c = self.q_co.shape[0]
        if queries.dim() != 3 or class_embeddings.shape != (c, queries.shape[-1]):
            raise ValueError(
                f"queries {tuple(queries.shape)} and class embeddings "
                f"{tuple(class_embeddings.shape)}: expected (b, K, D) and ({c}, D)"
            )
        q = F.normalize(_float(queries), dim=-1)  # (b, K, D)
        with torch.no_grad():  # the most similar query per class: no gradient
            e = F.normalize(class_embeddings.to(q.dtype), dim=-1)  # (C, D)
            assigned = torch.einsum("bkd,cd->bkc", q, e).argmax(dim=1)  # (b, C)
        return torch.gather(q, 1, assigned[..., None].expand(-1, -1, q.shape[-1]))

    def class_features(self, x: torch.Tensor) -> torch.Tensor:
        """Q (C, .) with unit rows, from predictions (b, C) or prototypes (C, D)."""
        x = _float(x)
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

    def forward(
        self, x: torch.Tensor, class_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.source == "queries":
                if class_embeddings is None:
                    raise ValueError("COA source 'queries' needs the class embeddings E_class")
                return self._per_image(self.assigned_queries(x, class_embeddings))
            q = self.class_features(x)
            # Eq. 5: L_COA = beta * ||Q_co - Q Q^T||_F^2
            sq = (self.q_co.to(q.dtype) - q @ q.T).pow(2)
        return self.beta * (sq.mean() if self.reduction == "mean" else sq.sum())

    def _per_image(self, q: torch.Tensor) -> torch.Tensor:
        """This rank's share of beta * mean over the global batch's images of Eq. 5."""
        # Eq. 5 per image: ||Q_co - Q_i Q_i^T||_F^2, (b, C, C) -> (b,)
        sq = (self.q_co.to(q.dtype) - q @ q.transpose(1, 2)).pow(2)
        per_image = sq.mean((1, 2)) if self.reduction == "mean" else sq.sum((1, 2))
        counts, world = q.new_tensor([q.shape[0]]), 1
        if self.gather:  # the image count of every rank (a (1,) tensor: shapes always agree)
            counts, _, world = gather_with_grad(counts, check_shapes=False)
        # mean over ranks == mean over all images of the global batch
        return self.beta * per_image.sum() * world / counts.sum().clamp_min(1)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()

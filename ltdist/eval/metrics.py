"""Average precision and head / medium / tail mAP for multi-label classification.

AP follows scikit-learn's ``average_precision_score`` exactly (step-wise, no interpolation,
tied scores form one threshold) but runs on the whole (N, C) score matrix at once: one sort per
block of classes and cumulative sums, instead of a Python loop over classes. The benchmark in
``benchmarks/eval_speed.py`` compares the two.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from ltdist.labels import GROUPS

log = logging.getLogger(__name__)

# How AP ranks the samples of a class: "sigmoid" ranks by the class's own logit (per-class
# sigmoid probabilities); "softmax" first takes a softmax over each image's class logits
# (LMPT's protocol), which divides every score of an image by the same sum over its classes,
# so an image's rank within a class also depends on its other classes' logits.
Scoring = Literal["sigmoid", "softmax"]
SCORING_TEXT = {
    "sigmoid": "per-class sigmoid of the logits",
    "softmax": "softmax over each image's classes (LMPT's protocol)",
}

# Classes are processed in blocks of about this many matrix cells: the (B, N) temporaries then
# stay in the CPU cache, which measured 1.6x faster than one (C, N) pass on 5,000 x 80.
_BLOCK_CELLS = 1 << 16


class _HasGroups(Protocol):
    names: list[str]

    @property
    def groups(self) -> list[str]: ...


def as_numpy(x: Any) -> np.ndarray:
    """An ndarray from an array-like or a torch tensor (any device, grad or not, any float).

    torch is not imported: the eval modules must load in environments without it.
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu()
        if x.dtype.is_floating_point and x.element_size() < 4:  # bf16 / fp16 have no numpy twin
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def class_scores(logits: Any, scoring: Scoring = "sigmoid") -> np.ndarray:
    """(N, C) float64 scores from (N, C) logits under ``scoring`` (see ``Scoring``).

    float64: the float32 sigmoid is exactly 1 above a logit of about 16.6 and would tie
    samples that the float32 logits still order (float64 ties only beyond about 36.7).
    """
    if scoring not in SCORING_TEXT:
        raise ValueError(f"unknown scoring {scoring!r}; expected one of {list(SCORING_TEXT)}")
    z = as_numpy(logits).astype(np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {z.shape}")
    if scoring == "sigmoid":
        out = np.empty_like(z)
        pos = z >= 0  # both branches in exp(-|z|) form: no overflow warnings
        out[pos] = 1 / (1 + np.exp(-z[pos]))
        e = np.exp(z[~pos])
        out[~pos] = e / (1 + e)
        return out
    e = np.exp(z - z.max(axis=1, keepdims=True))  # softmax_c(z_ic), shifted: no overflow
    return e / e.sum(axis=1, keepdims=True)


def _check_inputs(scores: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) float scores and bool targets; float32 scores stay float32 (sorting is faster
    and widening to float64 is exact, so ties and order are the same)."""
    s = as_numpy(scores)
    t = as_numpy(targets)
    if s.ndim == 1:
        s = s[:, None]
    if t.ndim == 1:
        t = t[:, None]
    if s.ndim != 2 or s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and targets {t.shape} must be equal (N, C) shapes")
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float64)
    if np.isnan(s).any():
        rows, cols = np.nonzero(np.isnan(s))
        raise ValueError(
            f"scores contain {rows.size} NaN values (first at sample {rows[0]}, class {cols[0]})"
        )
    if t.dtype != bool:
        bad = (t != 0) & (t != 1)
        if bad.any():
            vals = np.unique(t[bad])[:5].tolist()
            raise ValueError(f"targets must be 0/1, found values {vals}")
        t = t != 0
    return s, t


def average_precision(scores: Any, targets: Any) -> np.ndarray:
    """Per-class AP of an (N, C) score matrix against (N, C) 0/1 targets; (C,) float64.

    Equals ``sklearn.metrics.average_precision_score(targets[:, c], scores[:, c])`` for every
    class c with at least one positive. A class with no positive has no defined AP and gets NaN
    here; ``group_map`` turns that into an explicit exclusion. 1-D inputs count as one class.
    """
    s, t = _check_inputs(scores, targets)
    n, c = s.shape
    ap = np.full(c, np.nan)
    if n == 0:
        return ap
    if s.dtype == np.float64 and np.array_equal(s.astype(np.float32), s):
        s = s.astype(np.float32)  # exact: take the faster float32 path (see _sorted_rows)
    block = max(1, _BLOCK_CELLS // n)
    for lo in range(0, c, block):
        # (B, N): one class per contiguous row, so the sort and the scans run along memory.
        s_block = np.ascontiguousarray(s[:, lo : lo + block].T)
        t_block = np.ascontiguousarray(t[:, lo : lo + block].T)
        ap[lo : lo + block] = _ap_rows(*_sorted_rows(s_block, t_block))
    return ap


def _sorted_rows(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's targets in descending score order, and where each run of tied scores ends.

    float32 scores are mapped to order-preserving uint32 codes and packed with the target bit
    into one uint64 key, so a single value sort (much faster than argsort + two gathers) orders
    both. The target bit only reorders samples inside a tie, which AP does not see.
    """
    if s.dtype == np.float32:
        bits = (s + np.float32(0)).view(np.uint32)  # + 0 turns -0.0 into 0.0: they tie
        # Negative floats: flip every bit (larger magnitude sorts lower); others: the sign bit.
        flip = (np.uint32(0) - (bits >> np.uint32(31))) | np.uint32(1 << 31)
        keys = (bits ^ flip).astype(np.uint64)
        keys <<= np.uint64(1)
        keys |= t
        keys.sort(axis=1)
        keys = keys[:, ::-1]
        t_sorted = (keys & np.uint64(1)).astype(bool)
        ranked = keys >> np.uint64(1)
    else:
        order = np.argsort(s, axis=1)[:, ::-1]
        t_sorted = np.take_along_axis(t, order, axis=1)
        ranked = np.take_along_axis(s, order, axis=1)
    run_end = np.empty(s.shape, dtype=bool)
    np.not_equal(ranked[:, :-1], ranked[:, 1:], out=run_end[:, :-1])
    run_end[:, -1] = True
    return t_sorted, run_end


def _ap_rows(t_sorted: np.ndarray, run_end: np.ndarray) -> np.ndarray:
    """AP of each row from its sorted targets and the ends of its runs of tied scores.

    sklearn's AP is sum_k (R_k - R_{k-1}) P_k over distinct thresholds k, scores descending,
    where k is the end of a run of ties. With tp_k the true positives in the top k,
    R_k - R_{k-1} = (tp_k - tp_{k-1}) / P and P_k = tp_k / k.
    """
    b, n = t_sorted.shape
    # One running count over the flattened (B, N) block: the run end before a row's first run
    # is the previous row's last sample, so differences across rows stay right.
    tp_flat = np.cumsum(t_sorted.ravel(), dtype=np.int64)
    ends = np.flatnonzero(run_end)
    tp_end = tp_flat[ends]
    new_tp = np.diff(tp_end, prepend=0)  # tp_k - tp_{k-1}
    row = ends // n
    rank = ends - row * n + 1  # k: samples at or above the threshold
    row_total = tp_flat[n - 1 :: n]
    before_row = np.concatenate(([0], row_total[:-1]))
    positives = row_total - before_row  # P per row
    precision = (tp_end - before_row[row]) / rank
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.bincount(row, weights=new_tp * precision, minlength=b) / positives
    ap[positives == 0] = np.nan
    return ap


@dataclass
class MapResult:
    """Per-class AP and the group summaries of one evaluation.

    ``ap`` is NaN exactly where ``valid`` is False (no positive in the test set); every summary
    (``map_*``) is a plain float or None, never NaN, so it serialises and compares safely.
    """

    names: list[str]
    groups: list[str]
    ap: np.ndarray  # (C,) float64, NaN for excluded classes
    valid: np.ndarray  # (C,) bool: at least one positive in the test set
    positives: np.ndarray  # (C,) int64: test-set positives per class
    num_samples: int
    map_all: float | None
    map_head: float | None
    map_medium: float | None
    map_tail: float | None
    excluded: list[str] = field(default_factory=list)
    # How the scores came from logits (``map_from_logits``); None when scores were given.
    scoring: Scoring | None = None

    def map_of(self, group: str) -> float | None:
        """mAP of 'all', 'head', 'medium' or 'tail'."""
        if group != "all" and group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; expected 'all' or one of {GROUPS}")
        return getattr(self, f"map_{group}")

    def counts(self) -> dict[str, dict[str, int]]:
        """Classes per group and how many of them were evaluated (had a test positive)."""
        out = {"all": {"classes": len(self.names), "evaluated": int(self.valid.sum())}}
        groups = np.asarray(self.groups)
        for g in GROUPS:
            in_group = groups == g
            out[g] = {"classes": int(in_group.sum()), "evaluated": int(self.valid[in_group].sum())}
        return out

    def summary(self) -> dict[str, float | None]:
        return {g: self.map_of(g) for g in ("all", *GROUPS)}


def _names_and_groups(
    classes: _HasGroups | tuple[Sequence[str], Sequence[str]], c: int
) -> tuple[list[str], list[str]]:
    if isinstance(classes, tuple):
        names, groups = (list(x) for x in classes)
    else:
        names, groups = list(classes.names), list(classes.groups)
    if len(names) != c or len(groups) != c:
        raise ValueError(
            f"scores have {c} classes but got {len(names)} names, {len(groups)} groups"
        )
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown groups {unknown}; expected {GROUPS}")
    return names, groups


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(values.mean()) if values.size else None


def group_map(
    scores: Any,
    targets: Any,
    classes: _HasGroups | tuple[Sequence[str], Sequence[str]],
) -> MapResult:
    """AP per class and mAP over all / head / medium / tail classes.

    ``classes`` is a ``LabelSpace`` (groups from its training frequencies) or an explicit
    ``(names, groups)`` pair. Classes without a positive in the test set have no AP: they are
    listed in ``excluded`` and left out of every mean, and a group with no evaluated class has
    mAP None.
    """
    s, t = _check_inputs(scores, targets)
    names, groups = _names_and_groups(classes, s.shape[1])
    ap = average_precision(s, t)
    positives = t.sum(axis=0, dtype=np.int64)
    valid = positives > 0
    excluded = [n for n, v in zip(names, valid, strict=True) if not v]
    if excluded:
        log.warning(
            "%d classes have no positive in the test set, excluded: %s", len(excluded), excluded
        )
    garr = np.asarray(groups)
    per_group = {g: _mean_or_none(ap[valid & (garr == g)]) for g in GROUPS}
    return MapResult(
        names=names,
        groups=groups,
        ap=ap,
        valid=valid,
        positives=positives,
        num_samples=int(s.shape[0]),
        map_all=_mean_or_none(ap[valid]),
        map_head=per_group["head"],
        map_medium=per_group["medium"],
        map_tail=per_group["tail"],
        excluded=excluded,
    )


def map_from_logits(
    logits: Any,
    targets: Any,
    classes: _HasGroups | tuple[Sequence[str], Sequence[str]],
    scoring: Scoring = "sigmoid",
) -> MapResult:
    """``group_map`` of ``class_scores(logits, scoring)``; the result records its scoring, so
    a report made from it names the protocol its numbers used."""
    result = group_map(class_scores(logits, scoring), targets, classes)
    result.scoring = scoring
    return result

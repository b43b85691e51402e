"""Decision thresholds that maximise F1, and precision / recall / F1 at given thresholds.

mAP only ranks; a deployed classifier has to decide. The thresholds are picked on validation
scores, and ``f1_report`` measures them on test scores over all / head / medium / tail classes.
Everywhere here a sample is predicted positive for a class when its score >= the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ltdist.eval.metrics import (
    _check_inputs,
    _HasGroups,
    _mean_or_none,
    _names_and_groups,
    as_numpy,
)
from ltdist.labels import GROUPS


def _best_f1_rows(s: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The F1-maximising threshold of each row of (R, M) scores and bool targets, and its F1.

    With a row's scores in descending order, a threshold at the end of a run of tied scores
    predicts the top k samples, so F1 = 2 tp_k / (k + P): one sort and one cumulative sum cover
    every distinct threshold. Equally good thresholds resolve to the highest (fewest predicted).
    Any threshold between the chosen score and the next lower distinct score makes the same
    predictions here; the midpoint is returned so that new scores near either edge are not
    decided by a hair (-inf when every sample is predicted). A row without positives has no
    F1: threshold +inf (never predicted) and F1 NaN.
    """
    r, m = s.shape
    if m == 0:
        return np.full(r, np.inf), np.full(r, np.nan)
    order = np.argsort(s, axis=1)[:, ::-1]
    ranked = np.take_along_axis(s, order, axis=1)
    tp = np.cumsum(np.take_along_axis(t, order, axis=1), axis=1, dtype=np.int64)
    positives = tp[:, -1]
    f1 = 2 * tp / (np.arange(1, m + 1) + positives[:, None])
    inside_tie = np.zeros((r, m), dtype=bool)
    np.equal(ranked[:, :-1], ranked[:, 1:], out=inside_tie[:, :-1])
    f1[inside_tie] = -1.0  # not a threshold: the tie's lower members would be cut off
    best = np.argmax(f1, axis=1)  # the first maximum is the highest threshold
    rows = np.arange(r)
    chosen = ranked[rows, best].astype(np.float64)
    has_lower = best < m - 1
    lower = np.full(r, -np.inf)
    lower[has_lower] = ranked[rows[has_lower], best[has_lower] + 1]
    # Halves first: no overflow near the float limits. Adjacent floats can round the midpoint
    # onto the lower score, which would then be predicted; the chosen score is exact there.
    mid = chosen / 2 + lower / 2
    mid = np.where((mid > lower) & (mid <= chosen), mid, chosen)
    threshold = np.where(has_lower, mid, -np.inf)
    best_f1 = f1[rows, best]
    threshold[positives == 0] = np.inf
    best_f1[positives == 0] = np.nan
    return threshold, best_f1


def best_f1_thresholds(
    scores: Any, targets: Any, fallback: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class thresholds that maximise each class's F1 on (validation) scores, and that F1.

    Exact: every distinct score of a class is tried. Returns two (C,) float64 arrays. The
    threshold is the midpoint between the lowest predicted score and the next lower distinct
    score (-inf when predicting every sample is best); among equally good thresholds the
    highest wins. A class without a positive has no F1 (NaN); its threshold is +inf (never
    predicted), or ``fallback`` when given, e.g. from ``best_global_threshold``.
    """
    if fallback is not None and math.isnan(fallback):
        raise ValueError("fallback threshold is NaN")
    s, t = _check_inputs(scores, targets)
    thresholds, f1 = _best_f1_rows(np.ascontiguousarray(s.T), np.ascontiguousarray(t.T))
    if fallback is not None:
        thresholds[np.isnan(f1)] = fallback
    return thresholds, f1


def best_global_threshold(scores: Any, targets: Any) -> tuple[float, float]:
    """One threshold for every class that maximises micro-F1, and that micro-F1.

    Micro-F1 pools all (sample, class) decisions: 2 TP / (predicted + positives), so frequent
    classes weigh most. Exact over every distinct score, with the same midpoint and
    highest-wins rules as ``best_f1_thresholds``; (+inf, NaN) when no target is positive.
    """
    s, t = _check_inputs(scores, targets)
    threshold, f1 = _best_f1_rows(s.reshape(1, -1), t.reshape(1, -1))
    return float(threshold[0]), float(f1[0])


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den, NaN where den is 0 (the metric is undefined there)."""
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _float_or_none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def f1_report(
    scores: Any,
    targets: Any,
    thresholds: Any,
    label_space: _HasGroups | tuple[Sequence[str], Sequence[str]] | None = None,
) -> dict[str, Any]:
    """Precision, recall and F1 per class at ``thresholds``, macro-F1 per group and micro-F1.

    ``thresholds`` is one value for all classes or one per class. ``label_space`` (a
    ``LabelSpace`` or a ``(names, groups)`` pair) adds head / medium / tail macro-F1 and class
    names; without it classes are named by id. A class with neither a positive nor a
    prediction has no F1: it is listed in ``excluded`` and left out of every macro mean, like
    sklearn's ``zero_division=np.nan`` (its default counts such a class as 0). A class with
    predictions but no positive has F1 0 and counts. The result is JSON-ready: undefined
    values (precision with no prediction, recall with no positive, empty groups) are None.
    """
    s, t = _check_inputs(scores, targets)
    n, c = s.shape
    thr = as_numpy(thresholds).astype(np.float64)
    if thr.ndim == 0:
        thr = np.full(c, thr)
    if thr.shape != (c,):
        raise ValueError(f"thresholds {thr.shape} must be a scalar or one per class ({c},)")
    if np.isnan(thr).any():
        first = np.flatnonzero(np.isnan(thr))[0]
        raise ValueError(f"thresholds contain NaN (first at class {first})")
    if label_space is None:
        names, groups = [str(i) for i in range(c)], None
    else:
        names, groups = _names_and_groups(label_space, c)

    predicted_positive = s >= thr
    tp = (predicted_positive & t).sum(axis=0, dtype=np.int64)
    predicted = predicted_positive.sum(axis=0, dtype=np.int64)
    positives = t.sum(axis=0, dtype=np.int64)
    precision = _ratio(tp, predicted)
    recall = _ratio(tp, positives)
    f1 = _ratio(2 * tp, predicted + positives)
    defined = ~np.isnan(f1)

    macro = {"all": _mean_or_none(f1[defined])}
    counts = {"all": {"classes": c, "evaluated": int(defined.sum())}}
    if groups is not None:
        garr = np.asarray(groups)
        for g in GROUPS:
            in_group = garr == g
            macro[g] = _mean_or_none(f1[defined & in_group])
            counts[g] = {"classes": int(in_group.sum()), "evaluated": int(defined[in_group].sum())}
    total_tp, total_predicted, total_positives = tp.sum(), predicted.sum(), positives.sum()
    micro = {
        "precision": _float_or_none(_ratio(total_tp, total_predicted)),
        "recall": _float_or_none(_ratio(total_tp, total_positives)),
        "f1": _float_or_none(_ratio(2 * total_tp, total_predicted + total_positives)),
    }
    classes = [
        {
            "id": i,
            "name": names[i],
            "group": None if groups is None else groups[i],
            "positives": int(positives[i]),
            "predicted": int(predicted[i]),
            "true_positives": int(tp[i]),
            "precision": _float_or_none(precision[i]),
            "recall": _float_or_none(recall[i]),
            "f1": _float_or_none(f1[i]),
        }
        for i in range(c)
    ]
    return {
        "num_samples": n,
        "macro_f1": macro,
        "micro": micro,
        "counts": counts,
        "excluded": [names[i] for i in np.flatnonzero(~defined)],
        "classes": classes,
    }

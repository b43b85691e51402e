"""F1-maximising thresholds and the F1 report against scikit-learn and brute force."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ltdist.eval.thresholds import best_f1_thresholds, best_global_threshold, f1_report
from ltdist.labels import LabelSpace

# Shared modules: these tests run in both environments (see tests/test_environments.py).
pytestmark = pytest.mark.both_envs

sklearn_metrics = pytest.importorskip("sklearn.metrics")
UndefinedMetricWarning = pytest.importorskip("sklearn.exceptions").UndefinedMetricWarning


def _validation_set(dtype=np.float64, decimals: int | None = 2, seed: int = 0):
    """Correlated scores (so F1 is far from 0 and 1); rounding makes heavy ties."""
    rng = np.random.default_rng(seed)
    n, c = 300, 12
    targets = rng.random((n, c)) < rng.uniform(0.02, 0.5, size=c)
    scores = rng.random((n, c)) + 0.4 * targets
    if decimals is not None:
        scores = np.round(scores, decimals)
    targets[:, 3] = False  # no positive
    targets[:, 4] = True  # all positive
    scores[:, 5] = 0.5  # a single threshold for the whole column
    return scores.astype(dtype), targets


def _brute_force_best_f1(scores: np.ndarray, targets: np.ndarray) -> float:
    """Max F1 over every precision-recall point of one class (undefined points count 0)."""
    precision, recall, _ = sklearn_metrics.precision_recall_curve(targets, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return float(f1.max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_per_class_f1_matches_sklearn_and_is_the_maximum(dtype, decimals):
    scores, targets = _validation_set(dtype, decimals)
    thresholds, f1 = best_f1_thresholds(scores, targets)
    assert thresholds.shape == f1.shape == (12,)
    for c in range(12):
        if not targets[:, c].any():
            continue
        predicted = scores[:, c] >= thresholds[c]
        assert f1[c] == pytest.approx(sklearn_metrics.f1_score(targets[:, c], predicted), abs=1e-12)
        assert f1[c] == pytest.approx(_brute_force_best_f1(scores[:, c], targets[:, c]), abs=1e-12)


def test_threshold_is_midpoint_below_lowest_predicted_score():
    scores, targets = _validation_set(decimals=2)
    thresholds, _ = best_f1_thresholds(scores, targets)
    for c in np.flatnonzero(targets.any(axis=0)):
        predicted = scores[:, c] >= thresholds[c]
        lowest_in = scores[predicted, c].min()
        if predicted.all():
            assert thresholds[c] == -np.inf
        else:
            highest_out = scores[~predicted, c].max()
            assert thresholds[c] == pytest.approx((lowest_in + highest_out) / 2, abs=1e-12)


def test_ties_count_as_one_threshold_and_equal_f1_keeps_the_highest():
    # Thresholds 0.9 (F1 2/3), 0.7 (the tied pair both in: tp 2 of 3 predicted, F1 4/5) and 0.2
    # (F1 2/3). The threshold lies halfway between 0.7 and 0.2, whatever the order in the tie.
    for targets in ([1, 1, 0, 0], [1, 0, 1, 0]):
        thresholds, f1 = best_f1_thresholds([0.9, 0.7, 0.7, 0.2], targets)
        assert thresholds[0] == pytest.approx(0.45) and f1[0] == pytest.approx(0.8)
    # 0.9 alone and all four predicted both give F1 2/3: the higher threshold wins.
    thresholds, f1 = best_f1_thresholds([0.9, 0.6, 0.5, 0.3], [1, 0, 0, 1])
    assert thresholds[0] == pytest.approx(0.75) and f1[0] == pytest.approx(2 / 3)


def test_midpoint_between_adjacent_floats_still_separates_them():
    for dtype in (np.float32, np.float64):
        high = dtype(1.0)
        low = np.nextafter(high, dtype(0))
        scores = np.array([high, low], dtype=dtype)
        thresholds, f1 = best_f1_thresholds(scores, [1, 0])
        assert (scores >= thresholds[0]).tolist() == [True, False] and f1[0] == 1.0


def test_class_without_positives_is_never_predicted_or_takes_the_fallback():
    scores, targets = _validation_set()
    thresholds, f1 = best_f1_thresholds(scores, targets)
    assert thresholds[3] == np.inf and math.isnan(f1[3])
    assert not np.isnan(np.delete(f1, 3)).any()
    with_fallback, f1_fallback = best_f1_thresholds(scores, targets, fallback=0.3)
    assert with_fallback[3] == 0.3 and math.isnan(f1_fallback[3])
    np.testing.assert_array_equal(np.delete(with_fallback, 3), np.delete(thresholds, 3))
    with pytest.raises(ValueError, match="NaN"):
        best_f1_thresholds(scores, targets, fallback=float("nan"))


def test_single_sample():
    thresholds, f1 = best_f1_thresholds(np.array([[0.3, 0.7]]), np.array([[1, 0]]))
    assert thresholds[0] == -np.inf and f1[0] == 1.0  # predicting it is the only good choice
    assert thresholds[1] == np.inf and math.isnan(f1[1])
    report = f1_report(np.array([[0.3, 0.7]]), np.array([[1, 0]]), thresholds)
    assert report["macro_f1"]["all"] == 1.0 and report["excluded"] == ["1"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_global_threshold_matches_brute_force(dtype):
    scores, targets = _validation_set(dtype, decimals=2)
    threshold, micro_f1 = best_global_threshold(scores, targets)
    candidates = np.append(np.unique(scores), np.inf)
    predicted = scores.ravel()[None, :] >= candidates[:, None]
    tp = (predicted & targets.ravel()).sum(axis=1)
    brute = 2 * tp / (predicted.sum(axis=1) + targets.sum())
    assert micro_f1 == pytest.approx(brute.max(), abs=1e-12)
    reference = sklearn_metrics.f1_score(targets, scores >= threshold, average="micro")
    assert micro_f1 == pytest.approx(reference, abs=1e-12)
    assert np.unique(scores).min() < threshold < np.inf


def test_global_threshold_without_positives():
    threshold, micro_f1 = best_global_threshold(np.zeros((3, 2)), np.zeros((3, 2)))
    assert threshold == np.inf and math.isnan(micro_f1)


def test_report_matches_sklearn_on_classes_with_positives():
    scores, targets = _validation_set(decimals=2)
    thresholds, _ = best_f1_thresholds(scores, targets, fallback=0.8)
    predicted = scores >= thresholds
    report = f1_report(scores, targets, thresholds)

    rows = report["classes"]
    for key, metric in (
        ("precision", sklearn_metrics.precision_score),
        ("recall", sklearn_metrics.recall_score),
        ("f1", sklearn_metrics.f1_score),
    ):
        ours = np.array([r[key] for r in rows], dtype=float)  # None -> NaN
        ref = metric(targets, predicted, average=None, zero_division=np.nan)
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)

    # Class 3 has no positive but the fallback predicts some: F1 0, counted by both.
    assert report["classes"][3]["predicted"] > 0 and report["excluded"] == []
    macro = sklearn_metrics.f1_score(targets, predicted, average="macro")
    assert report["macro_f1"]["all"] == pytest.approx(macro, abs=1e-12)
    has_pos = targets.any(axis=0)
    macro_pos = sklearn_metrics.f1_score(
        targets[:, has_pos], predicted[:, has_pos], average="macro"
    )
    report_pos = f1_report(scores[:, has_pos], targets[:, has_pos], thresholds[has_pos])
    assert report_pos["macro_f1"]["all"] == pytest.approx(macro_pos, abs=1e-12)
    micro = sklearn_metrics.f1_score(targets, predicted, average="micro")
    assert report["micro"]["f1"] == pytest.approx(micro, abs=1e-12)
    assert report["micro"]["precision"] == pytest.approx(
        sklearn_metrics.precision_score(targets, predicted, average="micro"), abs=1e-12
    )
    assert report["micro"]["recall"] == pytest.approx(
        sklearn_metrics.recall_score(targets, predicted, average="micro"), abs=1e-12
    )
    json.dumps(report, allow_nan=False)  # JSON-ready: no NaN or inf anywhere


def test_undefined_f1_is_excluded_where_sklearn_default_counts_zero():
    # Class 0: positives, perfect. Class 1: no positive, nothing predicted: F1 undefined.
    # Class 2: no positive but predicted: F1 0, which every convention counts.
    targets = np.array([[1, 0, 0], [0, 0, 0], [1, 0, 0]])
    scores = np.array([[0.9, 0.1, 0.8], [0.2, 0.1, 0.1], [0.8, 0.2, 0.1]])
    report = f1_report(scores, targets, 0.5)
    predicted = scores >= 0.5
    assert report["macro_f1"]["all"] == pytest.approx(0.5)  # mean of 1 and 0
    assert report["excluded"] == ["1"]
    assert report["counts"]["all"] == {"classes": 3, "evaluated": 2}
    assert report["classes"][1]["f1"] is None and report["classes"][2]["f1"] == 0.0
    assert report["classes"][2]["recall"] is None  # no positive to recall
    assert sklearn_metrics.f1_score(
        targets, predicted, average="macro", zero_division=np.nan
    ) == pytest.approx(0.5)
    with pytest.warns(UndefinedMetricWarning):
        default = sklearn_metrics.f1_score(targets, predicted, average="macro")
    assert default == pytest.approx(1 / 3)  # undefined class counted as 0


def test_report_groups_from_label_space():
    scores, targets = _validation_set(decimals=None, seed=1)
    freq = np.array([900, 400, 150, 120, 90, 60, 40, 25, 19, 10, 5, 1])  # 4 / 4 / 4
    ls = LabelSpace([f"class {i}" for i in range(12)], freq, np.diag(freq))
    thresholds, _ = best_f1_thresholds(scores, targets)
    report = f1_report(scores, targets, thresholds, ls)
    predicted = scores >= thresholds
    groups = np.asarray(ls.groups)
    for g in ("head", "medium", "tail"):
        cols = (groups == g) & targets.any(axis=0)
        ref = sklearn_metrics.f1_score(targets[:, cols], predicted[:, cols], average="macro")
        assert report["macro_f1"][g] == pytest.approx(ref, abs=1e-12)
    assert report["excluded"] == ["class 3"]  # head, no positive, never predicted (+inf)
    assert report["counts"]["head"] == {"classes": 4, "evaluated": 3}
    assert [r["group"] for r in report["classes"]] == ls.groups


def test_report_scalar_threshold_equals_repeated_one():
    scores, targets = _validation_set()
    assert f1_report(scores, targets, 0.6) == f1_report(scores, targets, np.full(12, 0.6))


def test_report_group_without_evaluated_class_is_none():
    report = f1_report(np.array([[0.9], [0.1]]), np.array([[1], [0]]), 0.5, (["a"], ["head"]))
    assert report["macro_f1"] == {"all": 1.0, "head": 1.0, "medium": None, "tail": None}


@pytest.mark.parametrize(
    "call",
    [
        lambda s, t: best_f1_thresholds(s, t),
        lambda s, t: best_global_threshold(s, t),
        lambda s, t: f1_report(s, t, 0.5),
    ],
)
def test_nan_scores_are_errors(call):
    with pytest.raises(ValueError, match="NaN values"):
        call(np.array([[0.2], [np.nan]]), np.array([[1], [0]]))


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [(np.zeros(3), r"one per class \(2,\)"), (np.array([0.5, np.nan]), "NaN .*class 1")],
)
def test_report_rejects_bad_thresholds(thresholds, message):
    with pytest.raises(ValueError, match=message):
        f1_report(np.zeros((4, 2)), np.zeros((4, 2)), thresholds)


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    scores, targets = _validation_set(np.float32)
    ref_thresholds, ref_f1 = best_f1_thresholds(scores, targets)
    scores_t = torch.tensor(scores, requires_grad=True)
    targets_t = torch.tensor(targets, dtype=torch.float32)
    thresholds, f1 = best_f1_thresholds(scores_t, targets_t)
    np.testing.assert_array_equal(thresholds, ref_thresholds)
    np.testing.assert_array_equal(f1, ref_f1)
    assert best_global_threshold(scores_t, targets_t) == best_global_threshold(scores, targets)
    report = f1_report(scores_t, targets_t, torch.tensor(thresholds))
    assert report == f1_report(scores, targets, thresholds)

"""AP and group mAP against scikit-learn and against hand-worked values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ltdist.eval.metrics import average_precision, class_scores, group_map, map_from_logits
from ltdist.labels import LabelSpace

# Shared modules: these tests run in both environments (see tests/test_environments.py).
pytestmark = pytest.mark.both_envs


sklearn_metrics = pytest.importorskip("sklearn.metrics")


def _sklearn_ap(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.array(
        [
            sklearn_metrics.average_precision_score(targets[:, c], scores[:, c])
            for c in range(scores.shape[1])
        ]
    )


def _label_space(freq: list[int]) -> LabelSpace:
    freq_arr = np.asarray(freq)
    names = [f"class{i}" for i in range(len(freq))]
    return LabelSpace(names, freq_arr, np.diag(freq_arr))


# float32 scores take the packed-key sort, float64 ones the argsort path: test both.
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_matches_sklearn_random_with_ties(decimals, dtype):
    rng = np.random.default_rng(0 if decimals is None else decimals)
    n, c = 400, 30
    targets = (rng.random((n, c)) < rng.uniform(0.01, 0.5, size=c)).astype(np.int64)
    # Correlated scores so AP is far from both 0 and 1; rounding makes heavy ties.
    scores = rng.random((n, c)) + 0.5 * targets
    if decimals is not None:
        scores = np.round(scores, decimals)
    scores = scores.astype(dtype)
    targets[:, 0] = 0
    targets[7, 0] = 1  # a single positive
    targets[:, 1] = 1  # all positive
    scores[:, 2] = 0.5  # one threshold for the whole column
    np.testing.assert_allclose(
        average_precision(scores, targets), _sklearn_ap(scores, targets), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_sklearn_signs_zeros_and_infinities(dtype):
    """Negative scores, -0.0 tied with 0.0, and infinite logits order as sklearn orders them."""
    rng = np.random.default_rng(4)
    values = np.array([-np.inf, -3.5, -1.0, -0.0, 0.0, 1e-30, 0.25, 2.0, np.inf], dtype=dtype)
    scores = rng.choice(values, size=(200, 8))
    targets = rng.random((200, 8)) < 0.3
    targets[0] = True
    ap = average_precision(scores, targets)
    # sklearn refuses infinities; AP depends only on order and ties, so the reference gets
    # finite stand-ins beyond every other score.
    finite = np.clip(scores, -1e6, 1e6)
    np.testing.assert_allclose(ap, _sklearn_ap(finite, targets), rtol=0, atol=1e-9)


def test_float64_scores_exact_in_float32_match_sklearn():
    rng = np.random.default_rng(6)
    scores = np.round(rng.random((300, 5)), 2).astype(np.float32).astype(np.float64)
    targets = rng.random((300, 5)) < 0.3
    np.testing.assert_allclose(
        average_precision(scores, targets), _sklearn_ap(scores, targets), rtol=0, atol=1e-9
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_sklearn_across_blocks(monkeypatch, dtype):
    """Column blocking must not change values (force blocks of 4 classes)."""
    import ltdist.eval.metrics as m

    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=(300, 17)), 1).astype(dtype)
    targets = rng.random((300, 17)) < 0.2
    targets[:, 9] = False  # a class without positives inside a block
    ref = _sklearn_ap(scores[:, targets.any(0)], targets[:, targets.any(0)])
    monkeypatch.setattr(m, "_BLOCK_CELLS", 300 * 4)
    got = m.average_precision(scores, targets)
    assert np.isnan(got[9])
    np.testing.assert_allclose(np.delete(got, 9), ref, rtol=0, atol=1e-9)


def test_hand_worked_examples():
    # Distinct scores 0.9, 0.8, 0.7, 0.6 with labels 1, 0, 1, 0: the positives sit at ranks 1
    # and 3, precision there 1/1 and 2/3, each recall step 1/2: AP = (1 + 2/3) / 2 = 5/6.
    ap = average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))
    assert ap.shape == (1,)
    assert ap[0] == pytest.approx(5 / 6, abs=1e-12)

    # Ties: scores 0.9, 0.8, 0.8, 0.1 with labels 0, 1, 0, 1. Thresholds: 0.9 (0 tp, recall 0),
    # 0.8 (1 tp of 3 predicted: precision 1/3, recall 1/2), 0.1 (2 of 4: precision 1/2,
    # recall 1). AP = 1/2 * 1/3 + 1/2 * 1/2 = 5/12. Ranking the tied positive first would
    # give 1/2; the order of samples inside a tie must not matter (second case).
    ap = average_precision(np.array([[0.9], [0.8], [0.8], [0.1]]), np.array([[0], [1], [0], [1]]))
    assert ap[0] == pytest.approx(5 / 12, abs=1e-12)
    ap_swapped = average_precision(np.array([0.9, 0.8, 0.8, 0.1]), np.array([0, 0, 1, 1]))
    assert ap_swapped[0] == pytest.approx(5 / 12, abs=1e-12)


def test_no_positive_is_nan_in_raw_ap():
    ap = average_precision(np.array([[0.3, 0.2], [0.1, 0.9]]), np.array([[0, 1], [0, 0]]))
    # Column 1: its one positive is ranked second (0.2 < 0.9), precision there 1/2.
    assert math.isnan(ap[0]) and ap[1] == pytest.approx(0.5, abs=1e-12)


def test_group_map_excludes_classes_without_positives():
    rng = np.random.default_rng(1)
    freq = [500, 300, 150, 60, 40, 25, 10, 5, 1]  # 3 head, 3 medium, 3 tail
    ls = _label_space(freq)
    scores = rng.random((200, 9))
    targets = (rng.random((200, 9)) < 0.3).astype(int)
    targets[:, 4] = 0  # a medium class without test positives
    targets[:, 6:] = 0  # every tail class without test positives
    res = group_map(scores, targets, ls)

    assert res.excluded == ["class4", "class6", "class7", "class8"]
    assert res.valid.tolist() == [True] * 4 + [False] + [True] + [False] * 3
    assert res.map_tail is None  # no evaluated tail class: None, never NaN
    for value in (res.map_all, res.map_head, res.map_medium):
        assert isinstance(value, float) and not math.isnan(value)

    evaluated = [0, 1, 2, 3, 5]
    ref_ap = _sklearn_ap(scores[:, evaluated], targets[:, evaluated])
    ref = dict(zip(evaluated, ref_ap, strict=True))
    assert res.map_all == pytest.approx(np.mean(list(ref.values())), abs=1e-12)
    assert res.map_head == pytest.approx(np.mean([ref[0], ref[1], ref[2]]), abs=1e-12)
    assert res.map_medium == pytest.approx(np.mean([ref[3], ref[5]]), abs=1e-12)
    assert res.counts()["medium"] == {"classes": 3, "evaluated": 2}
    assert res.positives.tolist() == targets.sum(axis=0).tolist()


def test_group_means_equal_numpy_means_with_explicit_groups():
    rng = np.random.default_rng(2)
    c = 12
    groups = ["head"] * 4 + ["medium"] * 5 + ["tail"] * 3
    names = [f"c{i}" for i in range(c)]
    scores = rng.normal(size=(150, c))
    targets = rng.random((150, c)) < 0.25
    res = group_map(scores, targets, (names, groups))
    ap = average_precision(scores, targets)
    g = np.asarray(groups)
    assert res.map_all == pytest.approx(ap.mean(), abs=1e-15)
    for name in ("head", "medium", "tail"):
        assert res.map_of(name) == pytest.approx(ap[g == name].mean(), abs=1e-15)
    assert res.excluded == []


def test_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    scores = rng.random((50, 4))
    targets = rng.random((50, 4)) < 0.4
    ref = average_precision(scores, targets)
    got = average_precision(
        torch.tensor(scores, requires_grad=True), torch.tensor(targets, dtype=torch.float32)
    )
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)
    res = group_map(
        torch.tensor(scores).bfloat16(), torch.tensor(targets), (list("abcd"), ["head"] * 4)
    )
    assert res.ap.shape == (4,)


@pytest.mark.parametrize(
    ("scores", "targets", "message"),
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), "shapes"),
        (np.array([[np.nan], [0.1]]), np.array([[1], [0]]), "NaN"),
        (np.zeros((2, 1)), np.array([[2], [0]]), "0/1"),
    ],
)
def test_bad_inputs_are_errors(scores, targets, message):
    with pytest.raises(ValueError, match=message):
        average_precision(scores, targets)


def test_group_map_checks_class_count():
    with pytest.raises(ValueError, match="3 classes"):
        group_map(np.zeros((2, 3)), np.zeros((2, 3)), (["a", "b"], ["head", "tail"]))


def _logits_and_targets(seed: int = 0, n: int = 300, c: int = 12):
    """float32 logits whose per-image spread differs a lot: the softmax then reorders."""
    rng = np.random.default_rng(seed)
    targets = rng.random((n, c)) < np.linspace(0.5, 0.03, c)
    targets[0] = True  # every class has a positive
    offset = rng.normal(0, 3, size=(n, 1))  # image-level shift: sigmoid sees it, softmax not
    logits = offset + rng.normal(0, 1.5, size=(n, c)) + 2.0 * targets
    return logits.astype(np.float32), targets


def test_softmax_scoring_is_lmpts_softmax_then_sklearn_ap():
    """LMPT's protocol: softmax over each image's classes (float64, scipy), then AP per class."""
    special = pytest.importorskip("scipy.special")
    logits, targets = _logits_and_targets()
    freq = [500, 300, 150, 100, 90, 50, 30, 20, 15, 8, 3, 1]
    result = map_from_logits(logits, targets, _label_space(freq), scoring="softmax")
    direct = _sklearn_ap(special.softmax(logits.astype(np.float64), axis=1), targets)
    np.testing.assert_allclose(result.ap, direct, rtol=0, atol=1e-12)
    assert result.scoring == "softmax"
    groups = np.array(_label_space(freq).groups)
    for g in ("head", "medium", "tail"):
        assert result.map_of(g) == pytest.approx(direct[groups == g].mean(), abs=1e-12)
    assert result.map_all == pytest.approx(direct.mean(), abs=1e-12)
    # The softmax changes per-class rankings: the per-class AP is not the sigmoid one.
    sigmoid = map_from_logits(logits, targets, _label_space(freq))
    assert np.abs(sigmoid.ap - result.ap).max() > 0.05


def test_default_scoring_is_the_per_class_sigmoid():
    special = pytest.importorskip("scipy.special")
    logits, targets = _logits_and_targets(1)
    names = [f"c{i}" for i in range(12)]
    result = map_from_logits(logits, targets, (names, ["head"] * 12))
    assert result.scoring == "sigmoid"
    direct = _sklearn_ap(special.expit(logits.astype(np.float64)), targets)
    np.testing.assert_allclose(result.ap, direct, rtol=0, atol=1e-12)
    # a monotone map of each class's logits: AP is the AP of the logits themselves
    np.testing.assert_allclose(result.ap, _sklearn_ap(logits, targets), rtol=0, atol=1e-12)
    scores = class_scores(logits)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, special.expit(logits.astype(np.float64)), rtol=1e-15)


def test_sigmoid_scores_keep_the_order_of_large_logits():
    """float32 sigmoid is 1.0 from a logit of ~16.6 up: it would tie these four samples."""
    logits = np.array([[17.0], [18.0], [19.0], [20.0]], dtype=np.float32)
    targets = np.array([[0], [0], [1], [1]])
    assert (1 / (1 + np.exp(-logits)) == 1).all()  # the float32 sigmoid ties them
    assert map_from_logits(logits, targets, (["a"], ["head"])).map_all == 1.0


def test_unknown_scoring_is_an_error():
    with pytest.raises(ValueError, match="unknown scoring 'softmx'"):
        class_scores(np.zeros((2, 3)), "softmx")

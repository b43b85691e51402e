"""Tests for ltdist/losses/multilabel.py: independent float64 references, hand-worked 2 x 2 cases,
finite-difference gradients and bf16 autocast."""

import math

import numpy as np
import pytest
import torch

from ltdist.losses.multilabel import (
    DB_OFFICIAL_SETTINGS,
    AsymmetricLoss,
    BCELoss,
    ClassBalancedFocalLoss,
    DistributionBalancedLoss,
    FocalLoss,
    MultiLabelSoftMarginLoss,
)

LN2, LN3 = math.log(2), math.log(3)
CLASS_FREQ = [40, 9, 3, 17, 1]  # C = 5
NUM_IMAGES = 60


# --- Independent float64 references: one element at a time, straight from the papers.


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _log1p_exp(x: float) -> float:  # log(1 + e^x), without overflow
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _elementwise(fn, z: np.ndarray, y: np.ndarray) -> np.ndarray:
    b, c = z.shape
    return np.array([[fn(z[k, i], y[k, i], i, k) for i in range(c)] for k in range(b)])


def ref_bce(z, y):
    def f(zi, yi, i, k):
        return -math.log(_sigmoid(zi)) if yi else -math.log(_sigmoid(-zi))  # log(1 - p)

    return _elementwise(f, z, y)


def ref_mls(z, y):  # torch's MultiLabelSoftMarginLoss, per element (its 1/C is the mean's)
    def f(zi, yi, i, k):
        return -(yi * math.log(_sigmoid(zi)) + (1 - yi) * math.log(_sigmoid(-zi)))

    return _elementwise(f, z, y)


def ref_focal(z, y, gamma=2.0, class_weights=None):
    def f(zi, yi, i, k):
        p_t = _sigmoid(zi) if yi else _sigmoid(-zi)  # sigmoid(-z) = 1 - p
        w = 1.0 if class_weights is None else class_weights[i]
        return -w * (1 - p_t) ** gamma * math.log(p_t)

    return _elementwise(f, z, y)


def ref_cb_weights(class_freq, beta):
    w = [(1 - beta) / (1 - beta**n) for n in class_freq]
    return [wi * len(w) / sum(w) for wi in w]


def ref_db(z, y, n, N, alpha=0.1, beta=10.0, mu=0.2, lam=5.0, kappa=0.05, focal=True, gamma=2.0):
    C = len(n)

    def f(zi, yi, i, k):
        p_inst = sum(1 / n[j] for j in range(C) if y[k, j]) / C  # P^I(x)
        p_class = (1 / C) * (1 / n[i])  # P^C_i
        r_hat = alpha + (_sigmoid(beta * (p_class / p_inst - mu)) if p_inst > 0 else 1.0)
        b_hat = -math.log(1 / (n[i] / N) - 1)
        x = zi - (-kappa * b_hat)  # z - nu
        if yi:
            loss = _log1p_exp(-x) * ((1 - _sigmoid(x)) ** gamma if focal else 1.0)
        else:
            loss = _log1p_exp(lam * x) / lam * (_sigmoid(lam * x) ** gamma if focal else 1.0)
        return r_hat * loss

    return _elementwise(f, z, y)


def ref_asl(z, y, gamma_neg=4.0, gamma_pos=0.0, clip=0.05, eps=1e-8):
    def f(zi, yi, i, k):
        p = _sigmoid(zi)
        if yi:
            return -((1 - p) ** gamma_pos) * math.log(max(p, eps))
        p_m = max(p - clip, 0.0)
        return -(p_m**gamma_neg) * math.log(max(1 - p_m, eps))

    return _elementwise(f, z, y)


# Each case: (name, module factory taking reduction, reference (z, y) -> (B, C) float64 array)
CASES = [
    ("bce", lambda r: BCELoss(reduction=r), ref_bce),
    ("mls", lambda r: MultiLabelSoftMarginLoss(reduction=r), ref_mls),
    ("focal", lambda r: FocalLoss(gamma=2.0, reduction=r), ref_focal),
    ("focal_g1.5", lambda r: FocalLoss(gamma=1.5, reduction=r), lambda z, y: ref_focal(z, y, 1.5)),
    (
        "cb_focal",
        lambda r: ClassBalancedFocalLoss(CLASS_FREQ, beta=0.99, reduction=r),
        lambda z, y: ref_focal(z, y, 2.0, ref_cb_weights(CLASS_FREQ, 0.99)),
    ),
    (
        "db_focal",
        lambda r: DistributionBalancedLoss(CLASS_FREQ, NUM_IMAGES, reduction=r),
        lambda z, y: ref_db(z, y, CLASS_FREQ, NUM_IMAGES),
    ),
    (
        "db_nofocal_coco",
        lambda r: DistributionBalancedLoss(
            CLASS_FREQ, NUM_IMAGES, focal=False, **DB_OFFICIAL_SETTINGS["coco-lt"], reduction=r
        ),
        lambda z, y: ref_db(
            z, y, CLASS_FREQ, NUM_IMAGES, focal=False, **DB_OFFICIAL_SETTINGS["coco-lt"]
        ),
    ),
    (
        "db_nofocal",
        lambda r: DistributionBalancedLoss(CLASS_FREQ, NUM_IMAGES, focal=False, reduction=r),
        lambda z, y: ref_db(z, y, CLASS_FREQ, NUM_IMAGES, focal=False),
    ),
    ("asl", lambda r: AsymmetricLoss(reduction=r), ref_asl),
    (
        "asl_gpos1_grad",
        lambda r: AsymmetricLoss(gamma_pos=1.0, focal_weight_grad=True, reduction=r),
        lambda z, y: ref_asl(z, y, gamma_pos=1.0),
    ),
]
IDS = [c[0] for c in CASES]


def _random_inputs(seed: int, b: int = 7, c: int = 5):
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 4, size=(b, c))
    z[rng.random((b, c)) < 0.25] = 20.0
    z[rng.random((b, c)) < 0.25] = -20.0
    y = (rng.random((b, c)) < 0.35).astype(np.float64)
    y[0] = 0.0  # an image with no positive label
    y[1, :2] = 1.0
    return z, y


# --- Against the float64 references.


@pytest.mark.parametrize("name, make, ref", CASES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_float64_reference(name, make, ref, seed):
    z, y = _random_inputs(seed)
    expected = ref(z, y)  # (B, C)
    b = len(z)
    wanted = {"mean": expected.mean(), "sum": expected.sum(), "batch": expected.sum() / b}
    for reduction, value in wanted.items():
        loss = make(reduction)
        got32 = loss(torch.tensor(z, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
        assert got32.dtype == torch.float32
        assert got32.item() == pytest.approx(value, rel=1e-6), reduction
        got64 = loss(torch.tensor(z), torch.tensor(y))
        assert got64.dtype == torch.float64
        assert got64.item() == pytest.approx(value, rel=1e-10), reduction
    per_element = make("none")(torch.tensor(z, dtype=torch.float32), torch.tensor(y))
    np.testing.assert_allclose(per_element.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_mls_is_torchs_multilabel_soft_margin_loss_and_bce_under_the_mean():
    z, y = _random_inputs(3)
    zt, yt = torch.tensor(z), torch.tensor(y)
    expected = torch.nn.MultiLabelSoftMarginLoss()(zt, yt)  # float64
    got = MultiLabelSoftMarginLoss()(zt.float(), yt.float())
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert got.item() == pytest.approx(BCELoss()(zt.float(), yt.float()).item(), rel=1e-6)
    # torch's per-image values (reduction none) are our per-element losses' row means
    per_image = torch.nn.MultiLabelSoftMarginLoss(reduction="none")(zt, yt)
    mine = MultiLabelSoftMarginLoss(reduction="none")(zt, yt).mean(1)
    torch.testing.assert_close(mine, per_image, rtol=1e-10, atol=0)


# --- Hand-worked 2 x 2 cases.

# logits [[0, ln 3], [-ln 3, 0]] give sigmoids [[1/2, 3/4], [1/4, 1/2]]; targets [[1, 0], [0, 1]].
Z_HAND = torch.tensor([[0.0, LN3], [-LN3, 0.0]])
Y_HAND = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_bce_by_hand():
    # -log(1/2) + -log(1 - 3/4) + -log(1 - 1/4) + -log(1/2) = ln2 + 2 ln2 + (2 ln2 - ln3) + ln2
    total = 6 * LN2 - LN3
    for reduction, value in [("sum", total), ("mean", total / 4), ("batch", total / 2)]:
        got = BCELoss(reduction=reduction)(Z_HAND, Y_HAND).item()
        assert got == pytest.approx(value, rel=1e-6)


def test_focal_by_hand():
    # gamma 2: positives (1 - 1/2)^2 ln2 twice = ln2 / 2; negative p = 3/4: (9/16)(2 ln2);
    # negative p = 1/4: (1/16)(2 ln2 - ln3). Sum = 7/4 ln2 - ln3 / 16.
    total = 7 / 4 * LN2 - LN3 / 16
    assert FocalLoss(reduction="sum")(Z_HAND, Y_HAND).item() == pytest.approx(total, rel=1e-6)
    assert FocalLoss(reduction="mean")(Z_HAND, Y_HAND).item() == pytest.approx(total / 4, rel=1e-6)


def test_class_balanced_focal_by_hand():
    # class_freq [1, 2], beta 1/2: raw weights (1/2)/(1/2) = 1 and (1/2)/(3/4) = 2/3, sum 5/3,
    # normalised to sum 2: [6/5, 4/5]. Class 0 focal terms: ln2/4 + (2 ln2 - ln3)/16;
    # class 1: 9 ln2 / 8 + ln2 / 4. Sum = 6/5 (6 ln2 - ln3)/16 + 4/5 (11 ln2 / 8)
    # = (124 ln2 - 6 ln3) / 80.
    loss = ClassBalancedFocalLoss([1, 2], beta=0.5, reduction="sum")
    assert loss.class_weights.tolist() == pytest.approx([6 / 5, 4 / 5], rel=1e-7)
    assert loss(Z_HAND, Y_HAND).item() == pytest.approx((124 * LN2 - 6 * LN3) / 80, rel=1e-6)


def test_asl_by_hand_with_clip():
    # logits [[0, ln 3], [-ln 99, 0]]: sigmoids [[1/2, 3/4], [1/100, 1/2]].
    # targets [[1, 0], [0, 1]].
    z = torch.tensor([[0.0, LN3], [-math.log(99), 0.0]])
    # gamma_pos 0: positives -log(1/2) = ln2 each. Negative p = 3/4: p_m = 0.70, weight 0.7^4,
    # -log(1 - 0.7) = ln(10/3). Negative p = 1/100 < clip: p_m = 0, contributes exactly 0.
    per_element = AsymmetricLoss(reduction="none")(z, Y_HAND)
    assert per_element[1, 0].item() == 0.0
    expected = [[LN2, 0.7**4 * math.log(10 / 3)], [0.0, LN2]]
    np.testing.assert_allclose(per_element.numpy(), expected, rtol=1e-6)
    total = 2 * LN2 + 0.7**4 * math.log(10 / 3)
    assert AsymmetricLoss()(z, Y_HAND).item() == pytest.approx(total / 4, rel=1e-6)
    assert AsymmetricLoss(reduction="sum")(z, Y_HAND).item() == pytest.approx(total, rel=1e-6)
    # gamma_pos 1: each positive is weighted by 1 - p = 1/2.
    total_gpos1 = LN2 + 0.7**4 * math.log(10 / 3)
    got = AsymmetricLoss(gamma_pos=1.0, reduction="sum")(z, Y_HAND).item()
    assert got == pytest.approx(total_gpos1, rel=1e-6)


def test_db_rebalance_weights_by_hand():
    # n = [1, 3]. Image 0 positive for both: C P^I = 1 + 1/3 = 4/3, r = [3/4, 1/4].
    # Image 1 positive for class 1 only: C P^I = 1/3, r = [3, 1]. Image 2 has no positive.
    targets = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])
    # Paper smoothing (alpha 0.1, beta 10, mu 0.2): r_hat = 0.1 + sigmoid(10 (r - 0.2)).
    default = DistributionBalancedLoss([1, 3], num_train_images=4)
    s = _sigmoid
    expected = [[0.1 + s(5.5), 0.1 + s(0.5)], [0.1 + s(28.0), 0.1 + s(8.0)], [1.1, 1.1]]
    np.testing.assert_allclose(default.rebalance_weights(targets).numpy(), expected, rtol=1e-6)
    # Chosen for round numbers: beta 4 ln3, mu 3/4, so beta (r - mu) = [0, -2 ln3], [9 ln3, ln3]
    # and r_hat = 0.1 + [1/2, 1/10], 0.1 + [3^9 / (3^9 + 1), 3/4].
    loss = DistributionBalancedLoss([1, 3], 4, alpha=0.1, beta=4 * LN3, mu=0.75)
    expected = [[0.6, 0.2], [0.1 + 19683 / 19684, 0.85], [1.1, 1.1]]
    np.testing.assert_allclose(loss.rebalance_weights(targets).numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("focal", [False, True])
def test_db_loss_by_hand(focal):
    # n = [1, 3], N = 4: priors [1/4, 3/4], b_hat = -log(1/p - 1) = [-ln3, ln3]. kappa 1 so
    # z - nu = z + b_hat. logits [[ln3, 0], [3 ln3 / 2, -ln3]] -> z - nu = [[0, ln3], [ln3/2, 0]].
    # targets [[1, 1], [0, 1]], weights r_hat = [[0.6, 0.2], [w10, 0.85]] (previous test).
    loss = DistributionBalancedLoss(
        [1, 3], 4, alpha=0.1, beta=4 * LN3, mu=0.75, lam=2.0, kappa=1.0, focal=focal, gamma=2.0,
        reduction="sum",
    )  # fmt: skip
    z = torch.tensor([[LN3, 0.0], [1.5 * LN3, -LN3]])
    y = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    w10 = 0.1 + 19683 / 19684
    # Positives log(1 + e^-x): x = 0 -> ln2, x = ln3 -> ln(4/3). The negative, lam = 2:
    # (1/2) log(1 + e^(2 ln3 / 2)) = (1/2) ln 4 = ln2.
    terms = [(0.6, LN2), (0.2, math.log(4 / 3)), (w10, LN2), (0.85, LN2)]
    if focal:  # (1 - sigmoid(x))^2 = 1/4, 1/16; negative sigmoid(lam x)^2 = (3/4)^2; last 1/4
        terms = [(w, t * f) for (w, t), f in zip(terms, [1 / 4, 1 / 16, 9 / 16, 1 / 4])]
    expected = sum(w * t for w, t in terms)
    assert loss(z, y).item() == pytest.approx(expected, rel=1e-6)


# --- Gradients.


@pytest.mark.parametrize("name, make, ref", CASES, ids=IDS)
def test_gradcheck(name, make, ref):
    gen = torch.Generator().manual_seed(0)
    z = (torch.randn(4, 5, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    y = (torch.rand(4, 5, generator=gen) < 0.4).double()
    loss = make("mean")
    if isinstance(loss, AsymmetricLoss) and not loss.focal_weight_grad:
        loss = AsymmetricLoss(loss.gamma_neg, loss.gamma_pos, focal_weight_grad=True)
    assert torch.autograd.gradcheck(lambda x: loss(x, y), (z,), eps=1e-6, atol=1e-7)


def test_asl_detached_focal_weight_gradient():
    # focal_weight_grad=False: the gradient treats the weights as constants. By hand:
    # positive d/dz[-w log p] = -w (1 - p); negative with p > clip:
    # d/dz[-w log(1 - p + clip)] = w p (1 - p) / (1 - p + clip); p <= clip: 0.
    z, y = _random_inputs(3)
    z = np.clip(z, -6, 6)
    gamma_neg, gamma_pos, clip = 4.0, 1.0, 0.05
    p = 1 / (1 + np.exp(-z))
    p_m = np.maximum(p - clip, 0)
    grad_pos = -((1 - p) ** gamma_pos) * (1 - p)
    grad_neg = np.where(p > clip, p_m**gamma_neg * p * (1 - p) / (1 - p + clip), 0.0)
    expected = (y * grad_pos + (1 - y) * grad_neg) / z.size
    logits = torch.tensor(z, requires_grad=True)
    loss = AsymmetricLoss(gamma_neg, gamma_pos, clip, focal_weight_grad=False)
    loss(logits, torch.tensor(y)).backward()
    assert torch.is_grad_enabled()  # the local no_grad did not leak
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-10, atol=1e-14)
    # ... and it differs from the full derivative.
    full = torch.tensor(z, requires_grad=True)
    full_loss = AsymmetricLoss(gamma_neg, gamma_pos, clip, focal_weight_grad=True)
    full_loss(full, torch.tensor(y)).backward()
    assert not torch.allclose(full.grad, logits.grad)


# --- bf16 and autocast.


@pytest.mark.parametrize("name, make, ref", CASES, ids=IDS)
def test_bf16_autocast(name, make, ref):
    gen = torch.Generator().manual_seed(1)
    logits32 = torch.randn(8, 5, generator=gen) * 3
    targets = (torch.rand(8, 5, generator=gen) < 0.4).float()
    loss = make("mean")
    logits16 = logits32.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(logits16, targets)
    assert got.dtype == torch.float32
    # Same value as float32 math on the same (bf16-rounded) numbers, and close to the float32 run.
    assert got.item() == pytest.approx(loss(logits16.float(), targets).item(), rel=1e-6)
    assert got.item() == pytest.approx(loss(logits32, targets).item(), rel=3e-2)

    extreme = torch.tensor([[100.0, -100.0, 100.0, -100.0, 0.0]] * 2, dtype=torch.bfloat16)
    extreme.requires_grad_()
    extreme_targets = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss(extreme, extreme_targets)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert torch.isfinite(extreme.grad.float()).all()


def test_constants_survive_module_cast():
    loss = DistributionBalancedLoss(CLASS_FREQ, NUM_IMAGES)
    nu = loss.nu.clone()
    loss = loss.to(torch.bfloat16)
    assert loss.nu.dtype == torch.float32 and torch.equal(loss.nu, nu)
    assert loss.state_dict() == {}  # derived from the constructor arguments, not saved
    cb = ClassBalancedFocalLoss(CLASS_FREQ).half()
    assert cb.class_weights.dtype == torch.float32
    assert cb.class_weights.sum().item() == pytest.approx(len(CLASS_FREQ), rel=1e-6)


# --- Argument checks.


def test_argument_errors():
    with pytest.raises(ValueError, match="reduction"):
        BCELoss(reduction="avg")
    with pytest.raises(ValueError, match="no positive training image"):
        ClassBalancedFocalLoss([3, 0, 1])
    with pytest.raises(ValueError, match="num_train_images"):
        DistributionBalancedLoss([3, 5], num_train_images=5)
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        FocalLoss()(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="built for 5 classes"):
        DistributionBalancedLoss(CLASS_FREQ, NUM_IMAGES)(torch.zeros(2, 3), torch.zeros(2, 3))

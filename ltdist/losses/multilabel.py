"""Multi-label losses: BCE, MLS, focal, class-balanced focal, distribution-balanced, asymmetric.

Every loss takes logits (B, C) and multi-hot targets (B, C) and returns a scalar, or the (B, C)
element losses with ``reduction="none"``. Shared conventions:

- Precision: computed in float32 whatever the logits' dtype (bf16 / fp16 are upcast; float64 is
  kept, so ``torch.autograd.gradcheck`` works), with autocast switched off inside, so a loss is
  safe under ``torch.autocast(..., dtype=torch.bfloat16)``. The result is float32 (float64 for
  float64 logits).
- Reduction (a constructor argument): ``"mean"`` over all B*C elements, ``"sum"``, ``"batch"``
  (sum / B, i.e. the per-image sum over classes averaged over images) or ``"none"``. Every loss
  defaults to ``"mean"``: it is what CPRFL's ASL (``-mean``), DB's official code (mmcv ``mean``)
  and ``nn.BCEWithLogitsLoss`` use, it keeps the loss scale independent of batch size and class
  count, and one default for all losses lets a loss ablation share one learning rate.
  (Upstream ASL returns ``-sum``: ``reduction="sum"`` reproduces it.)
- Targets are 0/1. Each element loss is ``y * positive_term + (1 - y) * negative_term``, so soft
  targets interpolate between the two terms.
- Constants derived from class frequencies are non-persistent float32 buffers: they follow
  ``.to(device)``, stay float32 (rebuilt from a float64 copy) if the module is cast to bf16, and
  are not in the state dict (the constructor arguments define them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ltdist.entry import InputError

__all__ = [
    "DB_OFFICIAL_SETTINGS",
    "REDUCTIONS",
    "AsymmetricLoss",
    "BCELoss",
    "ClassBalancedFocalLoss",
    "DistributionBalancedLoss",
    "FocalLoss",
    "LossConfig",
    "MultiLabelSoftMarginLoss",
    "build_loss",
]

REDUCTIONS = ("mean", "sum", "batch", "none")

#: Per-dataset settings of DB's official configs (wutong16/DistributionBalancedLoss,
#: configs/{coco,voc}/LT_resnet50_pfc_DB.py; CPRFL's comparison reuses them), in this module's
#: parametrisation. The official code adds init_bias * b_hat / neg_scale to the logits with
#: init_bias 0.05, i.e. kappa = 0.05 / lam here. Its alpha 0.1 and beta 10 are the defaults.
DB_OFFICIAL_SETTINGS: dict[str, dict[str, float]] = {
    "coco-lt": {"lam": 2.0, "mu": 0.2, "kappa": 0.025},
    "voc-lt": {"lam": 5.0, "mu": 0.3, "kappa": 0.01},
}


def _class_counts(class_freq: Sequence[float] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Positive-image count per class as a float64 CPU vector (C,), each count > 0."""
    if isinstance(class_freq, torch.Tensor):
        counts = class_freq.detach().to("cpu", torch.float64)
    else:
        counts = torch.as_tensor(np.asarray(class_freq, dtype=np.float64))
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_freq must be a 1-D vector, got shape {tuple(counts.shape)}")
    bad = torch.nonzero(~(counts > 0)).flatten().tolist()
    if bad:
        raise ValueError(
            f"class_freq: classes {bad} have no positive training image (counts "
            f"{counts[bad].tolist()}); the re-weighting needs n_c > 0 - drop those classes or "
            "use a loss without class frequencies"
        )
    return counts


class _MultiLabelLoss(nn.Module):
    """Shared plumbing: shape checks, float32 math with autocast off, reduction, constants."""

    def __init__(self, reduction: str) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.num_classes: int | None = None
        self._sources: dict[str, torch.Tensor] = {}  # float64 CPU originals of the buffers

    def _register_constant(self, name: str, value: torch.Tensor) -> None:
        self._sources[name] = value
        self.num_classes = value.shape[-1]
        self.register_buffer(name, value.float(), persistent=False)

    def _constant(self, name: str, like: torch.Tensor) -> torch.Tensor:
        if like.dtype == torch.float64:
            return self._sources[name].to(like.device)
        return getattr(self, name).to(device=like.device, dtype=like.dtype)

    def _apply(self, fn, *args, **kwargs):
        # .to(device) moves the constants; a dtype cast (module.bfloat16()) must not round them.
        super()._apply(fn, *args, **kwargs)
        for name, source in self._sources.items():
            setattr(self, name, source.to(getattr(self, name).device, torch.float32))
        return self

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape != targets.shape:
            raise ValueError(
                f"{type(self).__name__}: logits and targets must both be (B, C), got "
                f"{tuple(logits.shape)} and {tuple(targets.shape)}"
            )
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"{type(self).__name__}: built for {self.num_classes} classes (class_freq), "
                f"got logits with {logits.shape[1]}"
            )
        dtype = torch.promote_types(logits.dtype, torch.float32)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            loss = self.element_loss(logits.to(dtype), targets.to(dtype))  # (B, C)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        if self.reduction == "batch":
            return loss.sum() / loss.shape[0]
        return loss

    def element_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-element loss (B, C) from logits and targets already in the compute dtype."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


def _focal_terms(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    # Lin et al. Eq. 4, -(1 - p_t)^gamma log p_t, written per target value. 1 - p is
    # sigmoid(-z) (not 1 - sigmoid(z)) and -log p is softplus(-z), exact for large |z|.
    pos = torch.sigmoid(-logits).pow(gamma) * F.softplus(-logits)  # (1 - p)^g * -log p
    neg = torch.sigmoid(logits).pow(gamma) * F.softplus(logits)  # p^g * -log(1 - p)
    return targets * pos + (1 - targets) * neg


class BCELoss(_MultiLabelLoss):
    """Binary cross-entropy with logits, one independent sigmoid per class."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction)

    def element_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # -[y log p + (1 - y) log(1 - p)] = y softplus(-z) + (1 - y) softplus(z): unlike
        # F.binary_cross_entropy_with_logits, exact for the small terms at large |z|
        return targets * F.softplus(-logits) + (1 - targets) * F.softplus(logits)


class MultiLabelSoftMarginLoss(_MultiLabelLoss):
    """PyTorch's ``MultiLabelSoftMarginLoss`` (the "MLS" row of CPRFL's loss ablation).

    Per image -(1/C) sum_i [y_i log sigmoid(z_i) + (1 - y_i) log sigmoid(-z_i)], averaged over
    images: the BCE element loss, so under the default ``"mean"`` it equals :class:`BCELoss`
    (CPRFL's BCE 59.62 vs MLS 59.91 on COCO-LT compare one objective across two runs). Its own
    class so the ablation names what it ran; torch's ``reduction="sum"`` is our ``"sum"`` / C.
    """

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__(reduction)

    def element_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # torch's formula: -(y log sigmoid(z) + (1 - y) log sigmoid(-z)), per (image, class)
        return -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits))


class FocalLoss(_MultiLabelLoss):
    """Sigmoid focal loss (Lin et al., ICCV 2017, Eq. 4) applied to each class independently.

    Choices: no alpha-balancing term (the multi-label long-tail baselines, DB's and CPRFL's "FL",
    use none); the gradient flows through the modulating factor (1 - p_t)^gamma, as in Lin et al.
    """

    def __init__(self, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__(reduction)
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def element_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return _focal_terms(logits, targets, self.gamma)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, {super().extra_repr()}"


class ClassBalancedFocalLoss(_MultiLabelLoss):
    """Class-balanced focal loss (Cui et al., CVPR 2019): class weight (1 - beta) / (1 - beta^n_c).

    Choices: the weight of class c multiplies both its positive and its negative terms (as in
    Cui et al.'s sigmoid formulation and DB's "by_class" mode); weights are normalised to sum to
    C, as in Cui et al. CPRFL's "CB focal" row instead used DB's code with beta 0.9, no
    normalisation, a loss weight of 10 and DB's negative-tolerant logit shift on top.
    """

    def __init__(
        self,
        class_freq: Sequence[float] | np.ndarray | torch.Tensor,
        beta: float = 0.9999,
        gamma: float = 2.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        if not 0 <= beta < 1:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.beta, self.gamma = beta, gamma
        counts = _class_counts(class_freq)
        weights = (1 - beta) / (1 - beta**counts)  # 1 / effective number of samples
        self._register_constant("class_weights", weights * len(counts) / weights.sum())  # (C,)

    def element_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weights = self._constant("class_weights", logits)
        return weights * _focal_terms(logits, targets, self.gamma)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, {super().extra_repr()}"


class DistributionBalancedLoss(_MultiLabelLoss):
    """Distribution-Balanced loss (Wu et al., ECCV 2020): re-balanced weights x negative-tolerant.

    Re-balanced weighting: r = P^C_i / P^I(x) with P^C_i = (1/C)(1/n_i) and
    P^I(x) = (1/C) sum over the image's positive classes of 1/n_j (the 1/C cancels), smoothed to
    r_hat = alpha + sigmoid(beta (r - mu)); one weight per (image, class), applied to the
    positive and the negative term alike, computed from the targets without gradient. An image
    with no positive label gets the r -> inf limit, alpha + 1.
    Negative-tolerant regularisation: with z' = z - nu_i, positives cost log(1 + exp(-z')) and
    negatives (1/lam) log(1 + exp(lam z')); nu_i = -kappa b_hat_i, b_hat_i = -log(1/p_i - 1),
    p_i = n_i / N. b_hat_i (the log-odds of the class prior, negative for rare classes) is the bias
    that would fit the prior, so z' = z + kappa b_hat_i: the sign the official code uses.
    focal=True ("DB focal", the variant CPRFL compares) multiplies positives by
    (1 - sigmoid(z'))^gamma and negatives by sigmoid(lam z')^gamma, gradient through both.

    Choices: defaults alpha 0.1, beta 10, mu 0.2 (the official COCO-LT config), lam 5, kappa 0.05
    in the formula above. The official code differs in two ways: its logit shift is
    kappa b_hat / lam (so ``DB_OFFICIAL_SETTINGS`` sets kappa = 0.05 / lam) and its focal variant
    multiplies the loss by 2 (balance_param, omitted here: a constant scale).
    """

    def __init__(
        self,
        class_freq: Sequence[float] | np.ndarray | torch.Tensor,
        num_train_images: int,
        alpha: float = 0.1,
        beta: float = 10.0,
        mu: float = 0.2,
        lam: float = 5.0,
        kappa: float = 0.05,
        focal: bool = True,
        gamma: float = 2.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        counts = _class_counts(class_freq)
        if not num_train_images > counts.max().item():
            raise ValueError(
                f"num_train_images ({num_train_images}) must exceed every class count (max "
                f"{counts.max().item():g}): the class prior n_i / N must be below 1"
            )
        if beta <= 0 or lam <= 0 or gamma < 0:
            raise ValueError(f"need beta > 0, lam > 0, gamma >= 0; got {beta}, {lam}, {gamma}")
        self.alpha, self.beta, self.mu = alpha, beta, mu
        self.lam, self.kappa, self.focal, self.gamma = lam, kappa, focal, gamma
        self.num_train_images = num_train_images
        prior = counts / num_train_images  # p_i
        b_hat = -torch.log(1 / prior - 1)  # estimated class bias, log(p_i / (1 - p_i))
        self._register_constant("inv_freq", 1 / counts)  # (C,)
        self._register_constant("nu", -kappa * b_hat)  # (C,) class-specific bias

    def rebalance_weights(self, targets: torch.Tensor) -> torch.Tensor:
        """The smoothed re-balancing weights r_hat (B, C) for multi-hot targets (B, C)."""
        dtype = torch.promote_types(targets.dtype, torch.float32)
        targets = targets.to(dtype)
        inv_freq = self._constant("inv_freq", targets)
        with torch.no_grad():
            p_instance = (targets * inv_freq).sum(dim=1, keepdim=True)  # C * P^I(x), (B, 1)
            r = inv_freq / p_instance  # P^C / P^I, (B, C); inf for an image with no positive
            r_hat = self.alpha + torch.sigmoid(self.beta * (r - self.mu))
            return torch.where(p_instance > 0, r_hat, torch.full_like(r_hat, self.alpha + 1))

    def element_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        z = logits - self._constant("nu", logits)  # z - nu
        pos = F.softplus(-z)  # log(1 + exp(-(z - nu)))
        neg = F.softplus(self.lam * z) / self.lam  # (1/lam) log(1 + exp(lam (z - nu)))
        if self.focal:
            # (1 - q)^gamma with q = sigmoid(z - nu); q^gamma with q = sigmoid(lam (z - nu))
            pos = torch.sigmoid(-z).pow(self.gamma) * pos
            neg = torch.sigmoid(self.lam * z).pow(self.gamma) * neg
        return self.rebalance_weights(targets) * (targets * pos + (1 - targets) * neg)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_train_images={self.num_train_images}, "
            f"alpha={self.alpha}, beta={self.beta}, mu={self.mu}, lam={self.lam}, "
            f"kappa={self.kappa}, focal={self.focal}, gamma={self.gamma}, {super().extra_repr()}"
        )


class AsymmetricLoss(_MultiLabelLoss):
    """ASL (Ridnik et al., ICCV 2021): (1-p)^g+ log p; p_m^g- log(1-p_m), p_m = max(p-clip, 0).

    Choices: defaults are CPRFL's (gamma_pos 0, upstream ASL's default is 1) with its mean
    reduction (upstream returns -sum). log p and log(1 - p_m) are clamped at eps as upstream, so
    a positive with p < eps has zero gradient. focal_weight_grad=False computes the asymmetric
    focusing weights under a local ``torch.no_grad()``: CPRFL trains its reported ASL model that
    way (disable_torch_grad_focal_loss=True) and upstream ASL's AsymmetricLoss defaults to it;
    upstream toggles the global grad mode, a local context cannot leak. True lets the gradient
    flow through the weights (the exact derivative of the loss).
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        clip: float = 0.05,
        eps: float = 1e-8,
        focal_weight_grad: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction)
        if gamma_neg < 0 or gamma_pos < 0 or not 0 <= clip < 1 or not 0 < eps < 1:
            raise ValueError(
                "need gamma_neg, gamma_pos >= 0, 0 <= clip < 1, 0 < eps < 1; got "
                f"{gamma_neg}, {gamma_pos}, {clip}, {eps}"
            )
        self.gamma_neg, self.gamma_pos, self.clip, self.eps = gamma_neg, gamma_pos, clip, eps
        self.focal_weight_grad = focal_weight_grad

    def element_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        p_m = (p - self.clip).clamp(min=0)  # probability shifting, exactly 0 when p <= clip
        # 1 - p_m from sigmoid(-z) rather than 1 - p: exact for large positive z
        log_p = F.logsigmoid(logits).clamp(min=math.log(self.eps))  # log(max(p, eps))
        log_1m_pm = (torch.sigmoid(-logits) + self.clip).clamp(max=1, min=self.eps).log()
        grad_mode = contextlib.nullcontext() if self.focal_weight_grad else torch.no_grad()
        with grad_mode:
            w_pos = torch.sigmoid(-logits).pow(self.gamma_pos)  # (1 - p)^gamma_pos
            w_neg = p_m.pow(self.gamma_neg)  # p_m^gamma_neg
        return -(targets * w_pos * log_p + (1 - targets) * w_neg * log_1m_pm)

    def extra_repr(self) -> str:
        return (
            f"gamma_neg={self.gamma_neg}, gamma_pos={self.gamma_pos}, clip={self.clip}, "
            f"eps={self.eps}, focal_weight_grad={self.focal_weight_grad}, "
            f"{super().extra_repr()}"
        )


# -- the configured classification loss ---------------------------------------------------


@dataclass
class LossConfig:
    """The classification loss (the ``cprfl`` task's head, DP-VLPA's L_CLS).

    ``cbfocal`` (class-balanced focal), ``dbfocal`` (distribution-balanced focal) and ``db``
    (distribution-balanced without the focal factor, CPRFL's "DB no-focal" row) weight classes
    by their training frequencies, taken from the data's label space (``classes.json``:
    per-class frequency and the number of training images). ``mls`` is PyTorch's
    MultiLabelSoftMarginLoss (equal to ``bce`` under the mean reduction).
    """

    kind: Literal["bce", "mls", "focal", "asl", "cbfocal", "dbfocal", "db"] = "asl"
    gamma: float = 2.0  # focal, cbfocal, dbfocal
    gamma_neg: float = 4.0  # asl (CPRFL's settings)
    gamma_pos: float = 0.0
    clip: float = 0.05
    cb_beta: float = 0.9999  # cbfocal: class weight (1 - beta) / (1 - beta^n_c)
    # dbfocal, db: "default" = DistributionBalancedLoss's defaults; "coco-lt" / "voc-lt" = DB's
    # official per-dataset settings (ltdist.losses.multilabel.DB_OFFICIAL_SETTINGS).
    db_settings: Literal["default", "coco-lt", "voc-lt"] = "default"


def build_loss(cfg: LossConfig, label_space) -> nn.Module:
    """The classification loss; ``cbfocal`` / ``dbfocal`` / ``db`` take the class frequencies
    and the number of training images from ``label_space`` (the training split's statistics)."""
    if cfg.kind == "bce":
        return BCELoss()
    if cfg.kind == "mls":
        return MultiLabelSoftMarginLoss()
    if cfg.kind == "focal":
        return FocalLoss(cfg.gamma)
    if cfg.kind == "asl":
        return AsymmetricLoss(cfg.gamma_neg, cfg.gamma_pos, cfg.clip)
    if cfg.kind == "cbfocal":
        return ClassBalancedFocalLoss(label_space.frequency, beta=cfg.cb_beta, gamma=cfg.gamma)
    if cfg.kind in ("dbfocal", "db"):
        if not label_space.num_train_images:
            raise InputError(
                f"model.loss.kind={cfg.kind} needs the number of training images, and the label "
                "space (classes.json) does not record it (num_train_images is 0): re-pack the "
                "shards (the packer records it), or use another loss kind"
            )
        settings = DB_OFFICIAL_SETTINGS.get(cfg.db_settings, {})
        return DistributionBalancedLoss(
            label_space.frequency,
            label_space.num_train_images,
            focal=cfg.kind == "dbfocal",
            gamma=cfg.gamma,
            **settings,
        )
    raise ValueError(f"unknown loss kind {cfg.kind!r}")

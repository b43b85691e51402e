"""DP-VLPA's contrastive losses: GCL (Eq. 1), QCL (Eq. 2-3) and the DQR-weighted GCL (Eq. 4).

All three see the global batch and compute only this rank's rows (open_clip's
``gather_with_grad`` + ``local_loss`` idea): features are gathered from every rank with
gradient (:func:`ltdist.distributed.gather_with_grad`), the local rows are scored against all
columns, and the labels are offset by ``rank * b``. Memory is linear in the global batch and
the numbers are those of the 1-process loss on the global batch:

- Loss value: rank r returns its share ``L_r`` with ``mean_r L_r == L`` (the 1-process loss).
  For GCL every rank has b rows, so ``L_r`` is the mean over its rows. For QCL the number of
  valid words (captions with words) differs between ranks, so ``L_r = world * (sum of its
  rows, or of its caption means) / N_global`` (torchtitan's rule: normalise by the global count
  of valid items). QCL's default per-caption form (SPARC's) gathers only that count.
- Gradients: the gather's backward all-reduces (sums) the gradient, so a rank's local
  features receive ``world * dL/dx``; DDP's averaging over ranks gives exactly ``dL/dtheta``.
  A parameter that lives in the loss (the temperature) receives ``dL_r/dtau`` on each rank and
  DDP's average is again ``dL/dtau``.

Features are L2-normalised here (the losses work on cosine similarities) and computed in at
least float32 with autocast off (fp16/bf16 inputs are upcast; float64 stays float64).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltdist.distributed import gather_with_grad

__all__ = [
    "GlobalContrastiveLoss",
    "DQR_ALPHA",
    "LogitScale",
    "QueryContrastiveLoss",
    "dqr_weights",
    "full_precision",
    "class_dqr_weights",
    "query_max_similarity",
    "reduce_queries",
]


def _float(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def full_precision(x: torch.Tensor) -> torch.autocast:
    """A context that turns autocast off on ``x``'s device: similarities scaled by up to 100
    are computed in float32 (bf16 cosines are only good to about 1e-2)."""
    return torch.autocast(device_type=x.device.type, enabled=False)


class LogitScale(nn.Module):
    """A temperature held as CLIP holds it: ``log_scale = log(1 / tau)``, tau init 0.07.

    ``forward()`` returns ``1 / tau = exp(log_scale)`` clamped to [``min_scale``, ``max_scale``],
    default [1, 100] (CLIP and open_clip clamp the scale at 100, i.e. tau >= 0.01; open_clip's
    lower bound 0 on the log scale keeps tau <= 1). BLIP-2 stores tau itself and clamps it to
    [0.001, 0.5]; we follow CLIP because the log parametrisation makes the learning rate
    scale-free. The clamp is applied in the forward, so no trainer hook is needed (past the
    bound the gradient is 0). ``log_scale`` is a one-element vector, not a 0-d scalar: DeepSpeed
    broadcasts parameters as bytes, which a 0-d bf16 tensor cannot be viewed as.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        learnable: bool = True,
        max_scale: float = 100.0,
        min_scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0 < init_temperature or not 0 < min_scale <= 1 / init_temperature <= max_scale:
            raise ValueError(
                f"temperature {init_temperature} outside [1/{max_scale}, 1/{min_scale}]"
            )
        value = torch.tensor([math.log(1.0 / init_temperature)])
        self.init_temperature = init_temperature
        self.loaded_from_weights = False  # set when a state dict brings its value
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)
        self.min_log_scale, self.max_log_scale = math.log(min_scale), math.log(max_scale)

    def forward(self) -> torch.Tensor:
        return self.log_scale.clamp(self.min_log_scale, self.max_log_scale).exp().squeeze(0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "log_scale" in state_dict:
            self.loaded_from_weights = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def temperature(self) -> float:
        return float(1.0 / self.forward().detach())


def reduce_queries(
    sim: torch.Tensor,
    weights: torch.Tensor | None,
    mode: Literal["weighted_mean", "max"] = "weighted_mean",
    dim: int = -1,
) -> torch.Tensor:
    """Per-query similarities s_k -> one score, reducing ``dim`` (the queries).

    Eq. 4 (``mode="weighted_mean"``): sum_k W_k s_k / sum_k W_k. ``mode="max"``: max_k W_k s_k
    (the weight acts inside Eq. 1's max). Without weights it is Eq. 1's max_k s_k in both modes.
    ``weights`` broadcasts against ``sim``.
    """
    if mode not in ("weighted_mean", "max"):
        raise ValueError(f"unknown DQR mode {mode!r}; expected 'weighted_mean' or 'max'")
    if weights is None:
        return sim.amax(dim=dim)
    w = weights.to(sim.dtype)
    if mode == "max":
        return (w * sim).amax(dim=dim)
    # Eq. 4: s_hat = sum_k W_k s_k / sum_k W_k
    return (w * sim).sum(dim) / w.sum(dim).clamp_min(1e-12)


def query_max_similarity(
    queries: torch.Tensor,
    texts: torch.Tensor,
    query_weights: torch.Tensor | None = None,
    mode: Literal["weighted_mean", "max"] = "weighted_mean",
) -> torch.Tensor:
    """Image-text similarity for unit vectors: (n, K, D) x (m, D) -> (n, m).

    Without weights s[i, j] = max_k cos(q_k^i, t^j) (Eq. 1). With ``query_weights`` W (n, K),
    Eq. 4: s[i, j] = sum_k W_ik cos / sum_k W_ik (``mode="weighted_mean"``), or
    max_k W_ik cos (``mode="max"``); see :func:`reduce_queries`.
    """
    cos = torch.einsum("nkd,md->nmk", queries, texts)  # (n, m, K)
    w = None if query_weights is None else query_weights[:, None, :]  # (n, 1, K)
    return reduce_queries(cos, w, mode)


def _symmetric_local_infonce(
    logits_i2t: torch.Tensor,
    logits_t2i: torch.Tensor,
    labels: torch.Tensor,
    label_smoothing: float = 0.0,
    reduction: Literal["mean", "sum"] = "mean",
) -> torch.Tensor:
    """(CE(image->text) + CE(text->image)) / 2 over the local rows (global columns)."""
    i2t = F.cross_entropy(logits_i2t, labels, label_smoothing=label_smoothing, reduction=reduction)
    t2i = F.cross_entropy(logits_t2i, labels, label_smoothing=label_smoothing, reduction=reduction)
    return (i2t + t2i) / 2


class GlobalContrastiveLoss(nn.Module):
    """GCL (Eq. 1), and with ``query_weights`` the DQR-weighted GCL of phase 2 (Eq. 4).

    ``forward(image_queries (b, K, D), text_cls (b, D), query_weights (b, K) | None)``:
    s_ij = max_k cos(q_k^i, t_cls^j) (BLIP-2's image-text contrastive similarity), symmetric
    InfoNCE over the global batch with a learnable temperature (init 0.07, BLIP-2; clamped as
    CLIP does). ``image_queries`` may also be (b, D) (one embedding per image, K = 1).

    With ``query_weights`` W (Eq. 4), s_ij = sum_k W_ik cos(q_k^i, t^j) / sum_k W_ik, the
    paper's weighted average over queries (``dqr_mode="weighted_mean"``, default), or
    max_k W_ik cos(q_k^i, t^j) (``dqr_mode="max"``: the weight acts inside Eq. 1's max, so a
    boosted query can win it; W = 1 gives Eq. 1 back). The same W_i is used in both
    directions (it belongs to image i).

    ``label_smoothing``: 0 by default (the paper's InfoNCE); BLIP-2's ITC uses 0.1.
    ``return_logits=True`` also returns the local logits, each (b, B): image->text (rows: local
    images, columns: all texts) and text->image (rows: local texts, columns: all images).
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        label_smoothing: float = 0.0,
        dqr_mode: Literal["weighted_mean", "max"] = "weighted_mean",
    ) -> None:
        super().__init__()
        if dqr_mode not in ("weighted_mean", "max"):
            raise ValueError(f"unknown DQR mode {dqr_mode!r}; expected 'weighted_mean' or 'max'")
        self.logit_scale = LogitScale(init_temperature, learn_temperature, max_logit_scale)
        self.label_smoothing = label_smoothing
        self.dqr_mode = dqr_mode

    def forward(
        self,
        image_queries: torch.Tensor,
        text_cls: torch.Tensor,
        query_weights: torch.Tensor | None = None,
        return_logits: bool = False,
    ):
        with full_precision(text_cls):
            return self._forward(image_queries, text_cls, query_weights, return_logits)

    def _forward(self, image_queries, text_cls, query_weights, return_logits):
        if image_queries.dim() == 2:
            image_queries = image_queries[:, None, :]
        b = image_queries.shape[0]
        if text_cls.shape[0] != b:
            raise ValueError(f"{b} images but {text_cls.shape[0]} texts: GCL needs pairs")
        queries = F.normalize(_float(image_queries), dim=-1)  # (b, K, D)
        texts = F.normalize(_float(text_cls), dim=-1)  # (b, D)
        all_queries, rank, world = gather_with_grad(queries)  # (B, K, D)
        all_texts, _, _ = gather_with_grad(texts)  # (B, D)
        local_w = all_w = None
        if query_weights is not None:
            if query_weights.shape != image_queries.shape[:2]:
                raise ValueError(
                    f"query_weights {tuple(query_weights.shape)} != (b, K) "
                    f"{tuple(image_queries.shape[:2])}"
                )
            local_w = _float(query_weights)
            all_w, _, _ = gather_with_grad(local_w)  # (B, K)
        # Eq. 1 (Eq. 4 with weights): s_ij = max_k cos(q_k^i, t_cls^j) [W-weighted], local rows
        sim_i2t = query_max_similarity(queries, all_texts, local_w, self.dqr_mode)  # (b, B)
        sim_t2i = query_max_similarity(all_queries, texts, all_w, self.dqr_mode).T  # (b, B)
        scale = self.logit_scale()
        logits_i2t, logits_t2i = scale * sim_i2t, scale * sim_t2i
        labels = torch.arange(b, device=queries.device) + rank * b
        loss = _symmetric_local_infonce(logits_i2t, logits_t2i, labels, self.label_smoothing)
        if return_logits:
            return loss, (logits_i2t, logits_t2i)
        return loss


class QueryContrastiveLoss(nn.Module):
    """QCL (Eq. 2-3): words against their text-guided queries.

    Eq. 2: for word j of description i, q_j^i = sum_k w(t_j^i, q_k^i) q_k^i, L2-normalised
    before Eq. 3. The weights ("normalised similarity weights"; :meth:`query_weights`):

    - ``weighting="sparc"`` (default; SPARC, Bica et al. 2024, which the paper follows): per
      word, the cosines to the K queries are min-max normalised, s' = (s - min_k s) /
      (max_k s - min_k s), values below 1/K set to 0 and the rest renormalised to sum 1. A word
      equally similar to every query (max = min) gets uniform weights.
    - ``weighting="softmax"``: w = softmax_k(cos / ``weight_temperature``) (attention of the
      word over the image's queries; fixed temperature 0.07 by default, learnable with
      ``learn_weight_temperature``).
    - ``weighting="linear"``: w = relu(cos) / sum_k relu(cos).

    Eq. 3: symmetric InfoNCE between the words t_j^i and their text-guided queries q_j^i.

    - ``negatives="caption"`` (default; SPARC's fine-grained loss): the negatives of a word are
      the other words of the same caption; the loss is averaged over the caption's words, then
      over the captions of the global batch that have a word. A one-word caption has no
      negative: its term is log 1 = 0 and it still counts as a caption (SPARC's 1/B); a caption
      without words does not count. No features cross ranks, only the caption count.
    - ``negatives="global"``: every valid word of the GLOBAL batch (logits (valid local words) x
      (all word slots of the global batch), padding columns masked out), loss = mean over all
      valid words of the global batch.
    - ``negatives="image"``: the words of the same caption as in ``"caption"``, but the loss is
      the mean over all valid words of the global batch (long captions weigh more).

    Padding and special tokens are excluded through ``word_mask`` (rows and columns). The
    module docstring explains the per-rank scaling. No label smoothing: it would put mass on
    masked columns.

    ``return_logits=True`` also returns the local logits word->query and query->word, each
    (n_local_valid_words, B * T), or (n_local_valid_words, T) with ``negatives="caption"``.
    """

    def __init__(
        self,
        init_temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        weight_temperature: float = 0.07,
        learn_weight_temperature: bool = False,
        weighting: Literal["sparc", "softmax", "linear"] = "sparc",
        negatives: Literal["caption", "global", "image"] = "caption",
    ) -> None:
        super().__init__()
        if weighting not in ("sparc", "softmax", "linear"):
            raise ValueError(f"unknown QCL weighting {weighting!r}")
        if negatives not in ("caption", "global", "image"):
            raise ValueError(f"unknown QCL negatives {negatives!r}")
        if learn_weight_temperature and weighting != "softmax":
            raise ValueError(
                f"learn_weight_temperature needs weighting='softmax' ({weighting!r} has no "
                "weight temperature: the parameter would never receive a gradient)"
            )
        self.logit_scale = LogitScale(init_temperature, learn_temperature, max_logit_scale)
        self.weight_scale = LogitScale(weight_temperature, learn_weight_temperature, 1e4, 1e-4)
        self.weighting = weighting
        self.negatives = negatives

    def query_weights(self, cos: torch.Tensor) -> torch.Tensor:
        """Eq. 2's w(t_j, q_k): (..., K) word-query cosines -> (..., K) weights summing to 1."""
        if self.weighting == "softmax":
            return torch.softmax(self.weight_scale() * cos, dim=-1)
        if self.weighting == "linear":
            pos = cos.clamp_min(0)
            return pos / pos.sum(-1, keepdim=True).clamp_min(1e-12)
        lo, hi = cos.amin(-1, keepdim=True), cos.amax(-1, keepdim=True)
        flat = hi == lo  # every query equally similar: s' = 1 for all, uniform weights
        spread = torch.where(flat, torch.ones_like(hi), hi - lo)
        # SPARC: s' = (s - min_k s) / (max_k s - min_k s), zero below 1/K, renormalised
        scaled = torch.where(flat, torch.ones_like(cos), (cos - lo) / spread)
        kept = scaled * (scaled >= 1.0 / cos.shape[-1])
        return kept / kept.sum(-1, keepdim=True)  # >= 1: the best query keeps s' = 1

    def text_guided_queries(self, queries: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        """Eq. 2 for unit vectors: (b, K, D) queries, (b, T, D) words -> (b, T, D) unit."""
        weights = self.query_weights(torch.einsum("btd,bkd->btk", words, queries))  # (b, T, K)
        # Eq. 2: q_j^i = sum_k w(t_j^i, q_k^i) q_k^i
        return F.normalize(torch.einsum("btk,bkd->btd", weights, queries), dim=-1)

    def forward(
        self,
        image_queries: torch.Tensor,
        words: torch.Tensor,
        word_mask: torch.Tensor,
        return_logits: bool = False,
    ):
        with full_precision(words):
            return self._forward(image_queries, words, word_mask, return_logits)

    def _forward(self, image_queries, words, word_mask, return_logits):
        b, t = word_mask.shape
        if words.shape[:2] != (b, t) or image_queries.shape[0] != b:
            raise ValueError(
                f"QCL shapes disagree: queries {tuple(image_queries.shape)}, words "
                f"{tuple(words.shape)}, word_mask {tuple(word_mask.shape)}"
            )
        queries = F.normalize(_float(image_queries), dim=-1)  # (b, K, D)
        word_feats = F.normalize(_float(words), dim=-1)  # (b, T, D)
        mask = word_mask.bool()
        guided = self.text_guided_queries(queries, word_feats)  # (b, T, D)
        if self.negatives == "caption":
            loss, logits = self._caption_loss(word_feats, guided, mask)
        else:
            loss, logits = self._batch_loss(word_feats, guided, mask)
        return (loss, logits) if return_logits else loss

    def _caption_loss(self, word_feats, guided, mask):
        """Eq. 3 in SPARC's form: InfoNCE among each caption's own words, caption means."""
        scale = self.logit_scale()
        # Eq. 3 within caption i: logits[i, j, l] = cos(t_j^i, q_l^i) / tau
        sim = scale * torch.einsum("btd,bld->btl", word_feats, guided)  # (b, T, T)
        invalid = ~mask[:, None, :]  # padding columns
        logits_w2q = sim.masked_fill(invalid, float("-inf"))
        logits_q2w = sim.transpose(1, 2).masked_fill(invalid, float("-inf"))
        caption, word = mask.nonzero(as_tuple=True)  # local valid words (n,)
        logits_w2q, logits_q2w = logits_w2q[caption, word], logits_q2w[caption, word]  # (n, T)
        per_word = (
            F.cross_entropy(logits_w2q, word, reduction="none")
            + F.cross_entropy(logits_q2w, word, reduction="none")
        ) / 2
        n_words = mask.sum(1).to(per_word.dtype)  # (b,)
        total = (per_word / n_words[caption]).sum()  # sum over captions of caption means
        has_words, _, world = gather_with_grad(mask.any(1))  # (B,)
        n_captions = has_words.sum().clamp_min(1).to(total.dtype)
        return total * world / n_captions, (logits_w2q, logits_q2w)

    def _batch_loss(self, word_feats, guided, mask):
        """Eq. 3 with batch negatives: mean over all valid words of the global batch."""
        b, t = mask.shape
        all_words, rank, world = gather_with_grad(word_feats)  # (B, T, D)
        all_guided, _, _ = gather_with_grad(guided)  # (B, T, D)
        all_mask, _, _ = gather_with_grad(mask)  # (B, T)

        rows = mask.flatten().nonzero().squeeze(1)  # local valid word slots (n,)
        labels = rows + rank * b * t  # their slots in the global (B * T) columns
        local_words = word_feats.flatten(0, 1)[rows]  # (n, D)
        local_guided = guided.flatten(0, 1)[rows]  # (n, D)
        scale = self.logit_scale()
        # Eq. 3: word -> text-guided query and text-guided query -> word, local rows
        logits_w2q = scale * local_words @ all_guided.flatten(0, 1).T  # (n, B * T)
        logits_q2w = scale * local_guided @ all_words.flatten(0, 1).T  # (n, B * T)
        invalid = ~all_mask.flatten()[None, :]  # (1, B * T)
        if self.negatives == "image":
            slots = torch.arange(all_mask.numel(), device=rows.device)
            invalid = invalid | ((labels // t)[:, None] != (slots // t)[None, :])
        logits_w2q = logits_w2q.masked_fill(invalid, float("-inf"))
        logits_q2w = logits_q2w.masked_fill(invalid, float("-inf"))
        total = _symmetric_local_infonce(logits_w2q, logits_q2w, labels, reduction="sum")
        n_global = all_mask.sum().clamp_min(1).to(total.dtype)
        return total * world / n_global, (logits_w2q, logits_q2w)  # mean over all valid words


DQR_ALPHA = 4.5  # the smallest half-integer giving every tail class (n_c < 20) a weight >= 2


def _dqr_boost(
    query_class_sim: torch.Tensor,
    class_frequency: torch.Tensor,
    boosted_classes: torch.Tensor | None,
    alpha: float,
    temperature: float,
    assign: Literal["soft", "hard"],
) -> torch.Tensor:
    """alpha * [c boosted] * a_ikc / sqrt(n_c): (B, K, C), the part of Eq. 4's weight that
    class c gives query k of image i."""
    if query_class_sim.dim() != 3:
        raise ValueError(f"query_class_sim must be (B, K, C), got {tuple(query_class_sim.shape)}")
    sim = _float(query_class_sim)
    if assign == "soft":
        attn = torch.softmax(sim / temperature, dim=1)  # (B, K, C), sums to 1 over queries
    elif assign == "hard":
        attn = F.one_hot(sim.argmax(dim=1), sim.shape[1]).transpose(1, 2).to(sim.dtype)
    else:
        raise ValueError(f"unknown DQR assignment {assign!r}; expected 'soft' or 'hard'")
    freq = class_frequency.to(sim.device, sim.dtype).clamp_min(1)
    if freq.shape != sim.shape[2:]:
        raise ValueError(f"{freq.numel()} class frequencies for {sim.shape[2]} classes")
    intensity = 1.0 / freq.sqrt()  # (C,): rarer = larger
    if boosted_classes is not None:
        intensity = intensity * boosted_classes.to(sim.device, sim.dtype)
    return alpha * attn * intensity


def dqr_weights(
    query_class_sim: torch.Tensor,
    targets: torch.Tensor,
    class_frequency: torch.Tensor,
    boosted_classes: torch.Tensor | None = None,
    alpha: float = DQR_ALPHA,
    temperature: float = 0.07,
    assign: Literal["soft", "hard"] = "soft",
) -> torch.Tensor:
    """DQR query weights of the GCL-DQR term (Eq. 4): (B, K, C) query-class cosines -> W (B, K).

    W_ik = 1 + alpha * sum_{c in tail(i)} a_ikc / sqrt(n_c), where tail(i) are image i's
    ground-truth classes among ``boosted_classes`` (the tail group; all classes when None),
    n_c the training frequency of class c, and a_ikc how much query k answers for class c:
    softmax over k of cos(q_k^i, E_c) / ``temperature`` (``assign="soft"``: the most correlated
    queries get most of the boost and it sums to 1 over k) or the one-hot argmax
    (``assign="hard"``: only the most correlated query). An image without tail classes keeps
    W = 1. The boost of class c is proportional to 1 / sqrt(n_c) (rarer = larger).
    """
    boost = _dqr_boost(
        query_class_sim, class_frequency, boosted_classes, alpha, temperature, assign
    )
    # Eq. 4: W_ik = 1 + alpha * sum_c [c in tail(i)] a_ikc / sqrt(n_c)
    return 1.0 + torch.einsum("bkc,bc->bk", boost, targets.to(boost.dtype))


def class_dqr_weights(
    query_class_sim: torch.Tensor,
    class_frequency: torch.Tensor,
    boosted_classes: torch.Tensor | None = None,
    alpha: float = DQR_ALPHA,
    temperature: float = 0.07,
    assign: Literal["soft", "hard"] = "soft",
) -> torch.Tensor:
    """Label-free DQR weights of the class scores (Eq. 4 at inference): (B, K, C) -> W (B, K, C).

    W_ikc = 1 + alpha * [c in boosted] a_ikc / sqrt(n_c): the weight query k gets when image i
    is scored for class c, the class's own tail prior in place of the labels that inference
    lacks. For a positive class c that is an image's only tail class it equals the training
    weight W_ik of :func:`dqr_weights`.
    """
    return 1.0 + _dqr_boost(
        query_class_sim, class_frequency, boosted_classes, alpha, temperature, assign
    )

"""DP-VLPA (AAAI 2026): dual-phase visual-language pretraining (GCL + QCL) and adaptation
(classification + DQR-weighted GCL + COA) on a frozen image tower and a Q-Former.

The towers are passed in and duck-typed:

- ``image_tower(images) -> (B, N, Wv)`` patch tokens; frozen here (no gradient, eval mode).
- ``qformer.encode_image(image_tokens) -> (B, K, H)`` query outputs.
- ``qformer.encode_text(input_ids, attention_mask) -> (cls (B, H), words (B, T, H))``, words
  aligned with ``input_ids``. The width H comes from ``hidden_size=``, ``qformer.hidden_size`` or
  ``qformer.config.hidden_size`` (ltdist.models.qformer.QFormer).

DP-VLPA owns the projections into the joint space (``vision_proj``, ``text_proj``: H -> D,
BLIP-2's names), the temperatures (inside the loss modules) and the classification scale.
Image features are ``normalize(vision_proj(query outputs))`` (B, K, D), text features
``normalize(text_proj(.))`` of the [CLS] output and of every word.

Phase 1, ``pretrain_loss``: L = L_GCL + ``qcl_weight`` * L_QCL (the paper sums them; weight 1).
Phase 2, ``adapt_loss`` (Eq. 6): L = L_CLS + lambda1 * L_GCL-DQR + lambda2 * L_COA, where the
class logits are ``scale * s_hat_ic`` (+ an optional learnable bias), s_hat_ic Eq. 4's weighted
mean over queries of cos(q_k^i, E_c) with label-free DQR weights (training and inference
alike; ``dqr_class_scores=False``: max_k), for class text embeddings E_class (C, D), and L_CLS
is any ``cls_loss(logits, targets)`` (default ``BCEWithLogitsLoss``, mean over images and
classes). The scale is a learnable :class:`LogitScale` (init 1 / 0.07, clamped to [1, 100]):
cosines live in [-1, 1], so BCE needs logits scaled as CLIP scales its zero-shot logits.

Readings of the paper's ambiguous parts are documented at each loss (``ltdist.losses``) and in
:class:`DPVLPAConfig`; the phase-2 GCL reuses the phase-1 GCL module and its temperature.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from ltdist.labels import GROUPS
from ltdist.losses.coa import CooccurrenceLoss
from ltdist.losses.contrastive import (
    DQR_ALPHA,
    GlobalContrastiveLoss,
    LogitScale,
    QueryContrastiveLoss,
    class_dqr_weights,
    dqr_weights,
    full_precision,
    reduce_queries,
)

__all__ = ["DPVLPA", "DPVLPAConfig"]


@dataclass
class DPVLPAConfig:
    """DP-VLPA's knobs. Defaults: the paper where it says, BLIP-2 where DP-VLPA builds on it,
    otherwise an untuned, documented choice."""

    embed_dim: int = 256  # joint space (BLIP-2's 256)
    init_temperature: float = 0.07  # GCL and QCL temperatures (BLIP-2), learnable
    learn_temperature: bool = True
    max_logit_scale: float = 100.0  # CLIP's clamp: tau >= 0.01
    gcl_label_smoothing: float = 0.0  # the paper's plain InfoNCE; BLIP-2 uses 0.1

    # Phase 1 (QCL, Eq. 2-3)
    qcl_weight: float = 1.0
    qcl_weight_temperature: float = 0.07  # softmax over queries in Eq. 2 ("softmax" only)
    # Eq. 2 weights: SPARC's min-max normalised, sparsified (< 1/K dropped) and renormalised
    # similarities; or softmax(cos / qcl_weight_temperature), or relu(cos) normalised
    qcl_weighting: Literal["sparc", "softmax", "linear"] = "sparc"
    # Eq. 3 negatives: the other words of the same caption, loss averaged per caption then over
    # captions (SPARC); or every word of the global batch, or the same caption's words, both
    # averaged over all words (the earlier form: qcl_weighting="softmax", qcl_negatives="global")
    qcl_negatives: Literal["caption", "global", "image"] = "caption"
    # Tokens that are not words in QCL: BERT's [CLS] and [SEP] (padding is masked anyway).
    # The text feature of GCL and of the class embeddings: BERT's [CLS] output ("cls", BLIP-2
    # and the paper) or the mean of the attended token outputs ("mean"), for a Q-Former
    # initialised from a sentence-embedding BERT trained with mean pooling (all-MiniLM-L6-v2,
    # the demo's): its [CLS] output is nearly the same for every text (cosine 0.9996 between
    # the demo's captions at 2 layers), which leaves GCL at chance.
    text_pool: Literal["cls", "mean"] = "cls"
    special_token_ids: tuple[int, ...] = (101, 102)
    pad_token_id: int = 0  # only used when a batch has token ids but no attention mask

    # Phase 2 (Eq. 6): L_CLS + lambda1 * L_GCL-DQR + lambda2 * L_COA
    lambda1: float = 1.0
    lambda2: float = 1.0
    cls_init_temperature: float = 0.07  # class logits = max_k cos / tau_cls (learnable)
    cls_learn_scale: bool = True
    cls_bias_init: float | None = None  # a learnable logit bias when set (SigLIP-style)

    # DQR (Eq. 4): W_ik = 1 + alpha * sum_{tail c of image i} a_ikc / sqrt(n_c); the strength
    # alpha = 4.5 makes a tail query weigh >= 2x a head query ("significantly higher")
    dqr_alpha: float = DQR_ALPHA
    dqr_temperature: float = 0.07  # softmax over queries of cos(q_k, E_c)
    dqr_assign: Literal["soft", "hard"] = "soft"
    dqr_classes: Literal["tail", "all"] = "tail"  # which positives of an image boost queries
    # Eq. 4: s = sum_k W_k s_k / sum_k W_k; "max": max_k W_k s_k (W = 1: Eq. 1's max)
    dqr_mode: Literal["weighted_mean", "max"] = "weighted_mean"
    # class scores (L_CLS, evaluation, export, predict) through Eq. 4 with the label-free
    # W_ikc = 1 + alpha [c boosted] a_ikc / sqrt(n_c); False: max_k cos(q_k, E_c)
    dqr_class_scores: bool = True
    dqr_detach: bool = True  # W is a stop-gradient reweighting

    # COA (Eq. 5): beta * ||Q_co - Q Q^T||_F^2. The paper's form (defaults): per image, the
    # query assigned to each class (the logit's argmax), Q_co = symmetrised P(j|i), the sum over
    # the C^2 entries averaged over images. Before: "predictions", "cosine", "mean".
    # beta: the paper gives no value; None = 1 / C^2, so the per-image sum over C^2 entries starts
    # at the scale of L_CLS (beta = 1 makes COA ~1e3 per image on COCO-LT and swamps it)
    beta: float | None = None
    coa_source: Literal["queries", "predictions", "prototypes"] = "queries"
    coa_target: Literal["conditional", "cosine", "jaccard"] = "conditional"
    coa_reduction: Literal["sum", "mean"] = "sum"


class DPVLPA(nn.Module):
    """DP-VLPA on a frozen ``image_tower`` and a ``qformer`` (interfaces in the module doc).

    ``label_space`` (a :class:`ltdist.labels.LabelSpace`) is needed for phase 2 only (class
    frequencies for DQR, co-occurrence for COA); give it here or with ``set_label_space``.
    ``cls_loss`` is the multi-label loss on the class logits (default BCE with logits).
    """

    def __init__(
        self,
        image_tower: nn.Module,
        qformer: nn.Module,
        config: DPVLPAConfig | None = None,
        *,
        hidden_size: int | None = None,
        label_space=None,
        cls_loss: nn.Module | None = None,
    ) -> None:
        super().__init__()
        cfg = config or DPVLPAConfig()
        self.config = cfg
        width = hidden_size or getattr(qformer, "hidden_size", None)
        if not width:
            raise ValueError(
                "DPVLPA needs the Q-Former width: pass hidden_size= or give the "
                "qformer a .hidden_size attribute"
            )
        # frozen (the papers) unless the tower says otherwise (ImageTower(frozen=False): a
        # tower without pretrained weights, e.g. the demo's)
        self.tower_frozen = getattr(image_tower, "frozen", True)
        if self.tower_frozen:
            image_tower = image_tower.requires_grad_(False).eval()
        self.image_tower = image_tower
        self.qformer = qformer
        self.vision_proj = nn.Linear(width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.gcl = GlobalContrastiveLoss(
            cfg.init_temperature,
            cfg.learn_temperature,
            cfg.max_logit_scale,
            cfg.gcl_label_smoothing,
            cfg.dqr_mode,
        )
        self.qcl = QueryContrastiveLoss(
            cfg.init_temperature,
            cfg.learn_temperature,
            cfg.max_logit_scale,
            weight_temperature=cfg.qcl_weight_temperature,
            weighting=cfg.qcl_weighting,
            negatives=cfg.qcl_negatives,
        )
        self.cls_scale = LogitScale(
            cfg.cls_init_temperature, cfg.cls_learn_scale, cfg.max_logit_scale
        )
        self.cls_bias = (
            nn.Parameter(torch.tensor([float(cfg.cls_bias_init)]))  # 1-element: see LogitScale
            if cfg.cls_bias_init is not None
            else None
        )
        self.cls_loss = cls_loss if cls_loss is not None else nn.BCEWithLogitsLoss()
        self.coa: CooccurrenceLoss | None = None
        self.label_space = None
        self.phase: Literal["pretrain", "adapt"] | None = None
        if label_space is not None:
            self.set_label_space(label_space)

    # -- set-up ---------------------------------------------------------------------------

    def set_label_space(self, label_space) -> None:
        """Class statistics for phase 2 (not saved in the state dict: the label space travels
        with the checkpoint as ``classes.json``)."""
        cfg = self.config
        freq = torch.as_tensor(label_space.frequency, dtype=torch.float32)
        tail = torch.tensor([g == "tail" for g in label_space.groups])
        boosted = tail if cfg.dqr_classes == "tail" else torch.ones_like(tail)
        device = self.vision_proj.weight.device
        self.label_space = label_space  # names -> frequencies for open-vocabulary class scores
        self.register_buffer("class_frequency", freq.to(device), persistent=False)
        self.register_buffer("dqr_classes", boosted.to(device), persistent=False)
        self.coa = CooccurrenceLoss.from_label_space(
            label_space,
            beta=cfg.beta if cfg.beta is not None else 1.0 / len(label_space.names) ** 2,
            target=cfg.coa_target,
            source=cfg.coa_source,
            reduction=cfg.coa_reduction,
        ).to(device)

    def set_phase(self, phase: Literal["pretrain", "adapt"]) -> None:
        """Freeze the parameters that ``phase``'s loss never uses, so DDP (without
        ``find_unused_parameters``) and optimisers see only live ones: the classification scale
        and bias in pretraining, the QCL temperatures (and GCL's when lambda1 = 0) in
        adaptation. Parameters of the towers are left as they are."""
        if phase not in ("pretrain", "adapt"):
            raise ValueError(f"unknown phase {phase!r}; expected 'pretrain' or 'adapt'")
        self.phase = phase
        cls_params = [self.cls_scale.log_scale] + (
            [self.cls_bias] if self.cls_bias is not None else []
        )
        for p in cls_params:
            if isinstance(p, nn.Parameter):
                p.requires_grad_(phase == "adapt")
        for p in self.qcl.parameters():
            p.requires_grad_(phase == "pretrain")
        for p in self.gcl.parameters():  # phase 2 uses GCL only through the DQR term
            p.requires_grad_(phase == "pretrain" or bool(self.config.lambda1))

    def train(self, mode: bool = True) -> DPVLPA:
        super().train(mode)
        if self.tower_frozen:
            self.image_tower.eval()  # frozen: dropout / norm statistics stay as loaded
        return self

    # -- encoders -------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Unit query features (B, K, D): normalize(vision_proj(qformer(tower(images))))."""
        with torch.no_grad() if self.tower_frozen else contextlib.nullcontext():
            tokens = self.image_tower(images)  # (B, N, Wv)
        return self.encode_tokens(tokens)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unit query features (B, K, D) from the frozen tower's tokens (B, N, Wv), e.g. read
        from a token cache (``ltdist.data.token_cache``) instead of computed from images."""
        queries = self.qformer.encode_image(tokens)  # (B, K, H)
        return F.normalize(self.vision_proj(queries), dim=-1)

    def encode_cached(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unit query features (B, K, D) from a token cache's tokens (B, N, Wv) in bf16 / fp16:
        the tower is frozen, so they are what it would compute from the images."""
        if not self.tower_frozen:
            raise ValueError("cached image tokens need a frozen image tower")
        return self.encode_tokens(tokens.to(self.vision_proj.weight.dtype))

    def _batch_queries(self, batch: Mapping) -> torch.Tensor:
        """A batch's query features: from its cached ``image_tokens`` when it has them, else
        from its images."""
        if "image_tokens" in batch:
            return self.encode_cached(batch["image_tokens"])
        return self.encode_image(_images(batch))

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit text features (B, D) (``config.text_pool``) and unit word features (B, T, D)."""
        cls, words = self.qformer.encode_text(input_ids, attention_mask)
        if words.shape[:2] != input_ids.shape:
            raise ValueError(
                f"qformer.encode_text returned words {tuple(words.shape)} for input_ids "
                f"{tuple(input_ids.shape)}: words must be aligned with the tokens"
            )
        if self.config.text_pool == "mean":
            mask = attention_mask.to(words.dtype)[..., None]  # (B, T, 1)
            cls = (words * mask).sum(1) / mask.sum(1).clamp_min(1)
        return F.normalize(self.text_proj(cls), dim=-1), F.normalize(self.text_proj(words), dim=-1)

    def encode_classes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """Class text embeddings E_class (C, D) from tokenised class prompts."""
        return self.encode_text(input_ids, attention_mask)[0]

    def word_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """QCL's words: attended tokens that are not special tokens ([CLS], [SEP])."""
        special = torch.tensor(self.config.special_token_ids, device=input_ids.device)
        return attention_mask.bool() & ~torch.isin(input_ids, special)

    # -- phase 1 --------------------------------------------------------------------------

    def pretrain_loss(self, batch: Mapping) -> dict[str, torch.Tensor]:
        """Phase 1: ``{"loss", "gcl", "qcl"}`` with loss = GCL + qcl_weight * QCL."""
        queries = self._batch_queries(batch)  # (b, K, D)
        input_ids, attention_mask = self._text_inputs(batch)
        text_cls, words = self.encode_text(input_ids, attention_mask)
        mask = batch.get("word_mask")
        if mask is None:
            mask = self.word_mask(input_ids, attention_mask)
        gcl = self.gcl(queries, text_cls)  # Eq. 1
        qcl = self.qcl(queries, words, mask)  # Eq. 2-3
        return {"loss": gcl + self.config.qcl_weight * qcl, "gcl": gcl, "qcl": qcl}

    # -- phase 2 --------------------------------------------------------------------------

    def class_logits(
        self,
        query_feats: torch.Tensor,
        class_embeddings: torch.Tensor,
        class_frequency: torch.Tensor | None = None,
        boosted_classes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, C) logits = scale * s_hat_ic (+ bias), in float32; the same in L_CLS and at
        inference (evaluation, export, predict).

        s_hat_ic is Eq. 4 over the queries with the label-free weights of
        :meth:`class_weights` (``dqr_class_scores``, default; not in the pretraining phase,
        whose zero-shot scores are GCL's max_k cos(q_k^i, E_c)). ``class_frequency`` and
        ``boosted_classes`` (C,) describe classes other than the label space's
        (:meth:`class_prior`).
        """
        logits, _ = self._class_logits(
            query_feats, class_embeddings, class_frequency, boosted_classes
        )
        return logits

    def _class_logits(self, query_feats, class_embeddings, class_frequency, boosted_classes):
        """(logits (B, C), the class-score weights W (B, K, C) or None)."""
        with full_precision(query_feats):
            sim = self.query_class_similarity(query_feats, class_embeddings)  # (B, K, C)
            weights = None
            if self.config.dqr_class_scores and self.phase != "pretrain":
                weights = self.class_weights(sim, class_frequency, boosted_classes)
            # Eq. 4: s_hat_ic = sum_k W_ikc s_ikc / sum_k W_ikc (W = None: max_k s_ikc)
            score = reduce_queries(sim, weights, self.config.dqr_mode, dim=1)
            logits = self.cls_scale() * score
            logits = logits + self.cls_bias if self.cls_bias is not None else logits
            return logits, weights

    def class_weights(
        self,
        query_class_sim: torch.Tensor,
        class_frequency: torch.Tensor | None = None,
        boosted_classes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The label-free DQR weights W_ikc (B, K, C) of the class scores (Eq. 4 at inference)."""
        cfg = self.config
        if class_frequency is None:
            self._need_label_space()
            class_frequency, boosted_classes = self.class_frequency, self.dqr_classes
        grad = torch.is_grad_enabled() and not cfg.dqr_detach
        with torch.set_grad_enabled(grad):
            return class_dqr_weights(
                query_class_sim,
                class_frequency,
                boosted_classes,
                alpha=cfg.dqr_alpha,
                temperature=cfg.dqr_temperature,
                assign=cfg.dqr_assign,
            )

    def class_prior(self, names) -> tuple[torch.Tensor, torch.Tensor]:
        """(frequency, boosted) (C,) for class names: a training class (name, display name or
        synonym) brings its own; any other name has n_c = 0, i.e. a tail class (the group rule)
        that is boosted as n_c = 1, the rarest."""
        self._need_label_space()
        space, freq, boosted = self.label_space, [], []
        for name in names:
            try:
                i = space.id_of(name)
            except KeyError:
                freq.append(0.0)
                boosted.append(True)  # n_c = 0 is a tail class
            else:
                freq.append(float(space.frequency[i]))
                boosted.append(bool(self.dqr_classes[i]))
        device = self.class_frequency.device
        return torch.tensor(freq, device=device), torch.tensor(boosted, device=device)

    def _need_label_space(self) -> None:
        if getattr(self, "class_frequency", None) is None:
            raise RuntimeError(
                "DQR needs class frequencies: DPVLPA(..., label_space=...) or "
                "model.set_label_space(label_space) (or DPVLPAConfig.dqr_class_scores=False "
                "for max-over-queries class scores)"
            )

    @staticmethod
    def query_class_similarity(
        query_feats: torch.Tensor, class_embeddings: torch.Tensor
    ) -> torch.Tensor:
        """cos(q_k^i, E_c): (B, K, D) x (C, D) -> (B, K, C)."""
        if query_feats.dtype in (torch.float16, torch.bfloat16):
            query_feats = query_feats.float()
        q = F.normalize(query_feats, dim=-1)
        e = F.normalize(class_embeddings.to(q.dtype), dim=-1)
        return torch.einsum("bkd,cd->bkc", q, e)

    def dqr_weights(
        self, query_feats: torch.Tensor, class_embeddings: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Eq. 4's query weights W (B, K) >= 1 for the images' tail classes (GCL-DQR)."""
        self._need_label_space()
        cfg = self.config
        grad = torch.is_grad_enabled() and not cfg.dqr_detach
        with torch.set_grad_enabled(grad), full_precision(query_feats):
            sim = self.query_class_similarity(query_feats, class_embeddings)
            return dqr_weights(
                sim,
                targets,
                self.class_frequency,
                self.dqr_classes,
                alpha=cfg.dqr_alpha,
                temperature=cfg.dqr_temperature,
                assign=cfg.dqr_assign,
            )

    def adapt_loss(
        self,
        batch: Mapping,
        class_embeddings: torch.Tensor,
        cls_loss: nn.Module | None = None,
    ) -> dict[str, torch.Tensor]:
        """Phase 2 (Eq. 6): ``{"loss", "cls", "gcl_dqr", "coa"}`` and the DQR weights' range per
        group (:meth:`dqr_weight_stats`).

        ``batch``: images (``image``/``images``), multi-hot targets (``labels``/``targets``,
        (b, C)) and, when lambda1 > 0, the descriptions' tokens (``input_ids`` +
        ``attention_mask`` or ``tokens``). ``class_embeddings``: E_class (C, D), e.g. from
        :meth:`encode_classes` (with gradient if the text side is trained).
        """
        if self.coa is None:
            raise RuntimeError(
                "adapt_loss needs the label space: DPVLPA(..., label_space=...) "
                "or model.set_label_space(label_space)"
            )
        cfg = self.config
        targets = _targets(batch)
        queries = self._batch_queries(batch)  # (b, K, D)
        logits, class_w = self._class_logits(queries, class_embeddings, None, None)  # (b, C)
        l_cls = (cls_loss or self.cls_loss)(logits, targets.to(logits.dtype))
        zero = logits.new_zeros(())
        gcl_dqr = coa = zero
        if cfg.lambda1:
            input_ids, attention_mask = self._text_inputs(batch)
            text_cls, _ = self.encode_text(input_ids, attention_mask)
            weights = self.dqr_weights(queries, class_embeddings, targets)  # Eq. 4
            gcl_dqr = self.gcl(queries, text_cls, query_weights=weights)
        if cfg.lambda2:
            if cfg.coa_source == "queries":
                coa = self.coa(queries, class_embeddings)  # Eq. 5
            else:
                coa = self.coa(logits if cfg.coa_source == "predictions" else class_embeddings)
        # Eq. 6: L = L_CLS + lambda1 * L_GCL-DQR + lambda2 * L_COA
        loss = l_cls + cfg.lambda1 * gcl_dqr + cfg.lambda2 * coa
        out = {"loss": loss, "cls": l_cls, "gcl_dqr": gcl_dqr, "coa": coa}
        if class_w is None:
            with torch.no_grad(), full_precision(queries):
                sim = self.query_class_similarity(queries, class_embeddings)
                class_w = self.class_weights(sim)
        return {**out, **self.dqr_weight_stats(class_w)}

    def dqr_weight_stats(self, class_weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``dqr_w_{group}_{min,mean,max}`` of W_ikc (B, K, C) over the group's classes, every
        image and query: the range of the boost per frequency group, for the training log
        (the loop keeps the window's min of ``_min`` and max of ``_max`` keys)."""
        w = class_weights.detach()
        groups = self.label_space.groups
        stats = {}
        for g in GROUPS:
            ids = [c for c, name in enumerate(groups) if name == g]
            if ids:
                wg = w[:, :, ids]
                stats |= {
                    f"dqr_w_{g}_min": wg.min(),
                    f"dqr_w_{g}_mean": wg.mean(),
                    f"dqr_w_{g}_max": wg.max(),
                }
        return stats

    def forward(
        self,
        images: torch.Tensor,
        class_embeddings: torch.Tensor,
        class_frequency: torch.Tensor | None = None,
        boosted_classes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Inference: class logits (B, C) (:meth:`class_logits`)."""
        queries = self.encode_image(images)
        return self.class_logits(queries, class_embeddings, class_frequency, boosted_classes)

    # -- batches --------------------------------------------------------------------------

    def _text_inputs(self, batch: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) from ``input_ids``/``attention_mask`` or ``tokens``."""
        if "input_ids" in batch:
            ids, mask = batch["input_ids"], batch.get("attention_mask")
        elif "tokens" in batch:
            tokens = batch["tokens"]
            if isinstance(tokens, Mapping):
                ids, mask = tokens["input_ids"], tokens.get("attention_mask")
            else:
                ids, mask = tokens, None
        else:
            raise KeyError(
                "the batch has no text: expected 'input_ids' (+ 'attention_mask') "
                "or 'tokens' (a tokenizer was not given to the loader?)"
            )
        if mask is None:
            mask = ids != self.config.pad_token_id
        return ids, mask


def _images(batch: Mapping) -> torch.Tensor:
    for key in ("image", "images"):
        if key in batch:
            return batch[key]
    raise KeyError("the batch has no images: expected 'image' or 'images'")


def _targets(batch: Mapping) -> torch.Tensor:
    for key in ("labels", "targets"):
        if key in batch:
            return batch[key]
    raise KeyError("the batch has no multi-hot targets: expected 'labels' or 'targets'")

"""What differs between the phases: the model and its loss, as one ``nn.Module`` per task.

Each task's ``forward(batch)`` returns the loss dict (``"loss"`` plus its parts), so the one
training loop wraps it with DDP or DeepSpeed and calls it like any module. ``logits(images)``
scores the task's classes; ``logits_for(images, names)`` scores any class names through the
text side (open vocabulary) where the task has one.

- ``pretrain``: DP-VLPA phase 1 (GCL + QCL) on image-description pairs; zero-shot class logits
  from the class prompts through the Q-Former's text side.
- ``dpvlpa``: DP-VLPA phase 2 (classification + DQR-weighted GCL + COA).
- ``cprfl``: a head on ResNet-101, CLIP or pretrained Q-Former tokens with a multi-label loss
  (ASL by default; BCE, focal, class-balanced or distribution-balanced focal): the CPRFL head
  (prompt initialisation + visual-semantic interaction; ``model.head=cprfl``, the default), or
  the papers' ERM baseline, a linear head on the pooled tokens (``model.head=linear``), which
  knows only its training classes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import nn

from ltdist.config import ConfigError, resolve_path
from ltdist.entry import InputError
from ltdist.losses.multilabel import build_loss
from ltdist.models.backbones import QFormerTokens, TokenBackbone, build_backbone
from ltdist.models.clip import (
    ImageTower,
    TextTower,
    build_towers,
    class_embeddings,
    without_weights,
)
from ltdist.models.cprfl import CPRFLHead
from ltdist.models.dpvlpa import DPVLPA
from ltdist.models.heads import LinearHead
from ltdist.models.qformer import QFormer
from ltdist.models.word_vectors import glove_class_embeddings
from ltdist.train.config import ModelConfig

log = logging.getLogger(__name__)


class TextTokenizer:
    """The Q-Former's BERT tokenizer as a picklable callable for the loader's workers.

    Pads to ``max_length`` always: QCL gathers word features across ranks, which needs the
    same shape on every rank.
    """

    def __init__(self, name_or_path: str, max_length: int):
        self.name_or_path, self.max_length = resolve_path(name_or_path), max_length
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {"name_or_path": self.name_or_path, "max_length": self.max_length}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["name_or_path"], state["max_length"])

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        enc = self._tokenizer(
            list(texts),
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def class_prompts(names: Sequence[str], template: str) -> list[str]:
    return [template.format(n.replace("_", " ")) for n in names]


def _images(batch: Mapping) -> torch.Tensor:
    return batch["image"]


class _DPVLPATask(nn.Module):
    """DP-VLPA on a frozen CLIP image tower and a Q-Former; class prompts through its text side."""

    backbone_prefixes: tuple[str, ...] = ()  # the Q-Former trains at the full rate
    no_decay_names: tuple[str, ...] = ("query_tokens",)
    needs_text = True

    def __init__(self, cfg: ModelConfig, label_space, load_weights: bool = True):
        super().__init__()
        clip_cfg = cfg.clip if load_weights else without_weights(cfg.clip)
        tower = ImageTower.from_config(clip_cfg)
        bert_init = resolve_path(cfg.qformer.bert_init) if load_weights else ""
        qformer = QFormer(replace(cfg.qformer, vision_width=tower.width, bert_init=bert_init))
        self.model = DPVLPA(tower, qformer, cfg.dpvlpa, label_space=label_space)
        self.tokenizer = TextTokenizer(cfg.text_tokenizer, cfg.max_text_tokens)
        self.template = cfg.class_template
        self.set_classes(label_space.display_names)

    def prompt_tokens(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Class prompts tokenised and cut after their longest: padding is masked, so the
        embeddings are the same, and adaptation encodes all C prompts every step (COCO-LT's
        80 prompts: 0.37 TFLOP a step at their 9 tokens, 5.37 padded to 128)."""
        tokens = self.tokenizer(class_prompts(names, self.template))
        attended = tokens["attention_mask"].bool().any(0)  # (T,): a column some prompt uses
        length = int(attended.nonzero().max()) + 1  # left padding: the full width is kept
        return {k: v[:, :length] for k, v in tokens.items()}

    def set_classes(self, names: Sequence[str]) -> None:
        tokens = self.prompt_tokens(names)
        device = self.model.vision_proj.weight.device
        self.register_buffer("class_ids", tokens["input_ids"].to(device), persistent=False)
        self.register_buffer("class_mask", tokens["attention_mask"].to(device), persistent=False)

    def class_embeddings(self) -> torch.Tensor:
        return self.model.encode_classes(self.class_ids, self.class_mask)

    def frozen_token_source(self) -> nn.Module | None:
        """The module whose tokens a token cache holds (``ltdist.train.token_cache``): the
        image tower when frozen, else None."""
        return self.model.image_tower if self.model.tower_frozen else None

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images, self.class_embeddings())

    def logits_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``logits`` from the frozen tower's cached tokens (B, N, Wv) of the images."""
        return self.model.class_logits(self.model.encode_cached(tokens), self.class_embeddings())

    def logits_for(self, images: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        tokens = self.prompt_tokens(names)
        device = self.class_ids.device
        emb = self.model.encode_classes(
            tokens["input_ids"].to(device), tokens["attention_mask"].to(device)
        )
        if self.model.phase == "pretrain" or not self.model.config.dqr_class_scores:
            return self.model(images, emb)
        return self.model(images, emb, *self.model.class_prior(names))  # Eq. 4's class prior


class PretrainTask(_DPVLPATask):
    """DP-VLPA phase 1: L = GCL + QCL on image-description pairs."""

    def __init__(self, cfg: ModelConfig, label_space, load_weights: bool = True):
        super().__init__(cfg, label_space, load_weights)
        self.model.set_phase("pretrain")

    def forward(self, batch: Mapping) -> dict[str, torch.Tensor]:
        return self.model.pretrain_loss(batch)


class AdaptTask(_DPVLPATask):
    """DP-VLPA phase 2 (Eq. 6) with class embeddings from the prompts, trained end to end."""

    def __init__(self, cfg: ModelConfig, label_space, load_weights: bool = True):
        super().__init__(cfg, label_space, load_weights)
        self.model.cls_loss = build_loss(cfg.loss, label_space)
        self.model.set_phase("adapt")
        self.needs_text = bool(cfg.dpvlpa.lambda1)  # DQR-weighted GCL reads descriptions

    def forward(self, batch: Mapping) -> dict[str, torch.Tensor]:
        return self.model.adapt_loss(batch, self.class_embeddings())

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Take a pretraining export's DP-VLPA weights; returns the export keys left unused."""
        return _load_subset(self, state, {"model.": "model."})


class CPRFLTask(nn.Module):
    """Visual tokens -> a head -> logits, with a multi-label loss (ASL by default).

    ``cfg.head='cprfl'``: CPRFL's category-prompt refined features (class prompts from CLIP text,
    GloVe or random embeddings). ``cfg.head='linear'``: the ERM baseline of the CPRFL / DP-VLPA
    comparisons, a ``LinearHead`` on the same tokens (pooled by ``cfg.linear_pool``); it needs
    no text side, so none is built, and it scores only its training classes.
    """

    backbone_prefixes = ("backbone.source.",)  # an unfrozen backbone trains at lr x mult
    no_decay_names: tuple[str, ...] = ("query_tokens",)
    needs_text = False

    def __init__(self, cfg: ModelConfig, label_space, load_weights: bool = True):
        super().__init__()
        if cfg.head not in ("cprfl", "linear"):
            raise ValueError(f"unknown model.head {cfg.head!r}; one of 'cprfl', 'linear'")
        self.cfg = cfg
        clip_cfg = cfg.clip if load_weights else without_weights(cfg.clip)
        kind = cfg.backbone.kind
        image_tower, self.text_tower = None, None
        if cfg.head == "linear":  # no prompts: the image tower alone, when the backbone needs it
            if kind in ("clip", "qformer"):
                image_tower = ImageTower.from_config(clip_cfg)
        elif kind in ("clip", "qformer"):
            image_tower, self.text_tower = build_towers(clip_cfg)
        elif cfg.cprfl.prompt_init == "clip":  # ResNet-101 tokens: the prompts' text tower alone
            self.text_tower = TextTower.from_config(clip_cfg)  # (RN50 CLIPs have no ViT tower)
        if kind == "resnet101":
            bb_cfg = cfg.backbone if load_weights else replace(cfg.backbone, pretrained=False)
            self.backbone = build_backbone(bb_cfg)
        elif kind == "clip":
            self.backbone = TokenBackbone(image_tower, cfg.backbone.proj_dim)
        else:  # qformer: weights from the pretraining export (load_pretrained)
            qformer = QFormer(replace(cfg.qformer, vision_width=image_tower.width, bert_init=""))
            source = QFormerTokens(image_tower, qformer, freeze_qformer=cfg.backbone.freeze)
            if not source.frozen:
                _freeze_unused(source, clip_cfg.image_size)
            self.backbone = TokenBackbone(source, cfg.backbone.proj_dim)
        self.names = list(label_space.display_names)
        if cfg.head == "linear":
            self.head = LinearHead(self.backbone.token_dim, len(self.names), cfg.linear_pool)
        else:
            self.head = CPRFLHead(
                self._embed(self.names), self.backbone.token_dim, cfg.cprfl, len(self.names)
            )
        self.loss = build_loss(cfg.loss, label_space)

    def _embed(self, names: Sequence[str]) -> torch.Tensor | None:
        init = self.cfg.cprfl.prompt_init
        if init == "clip":
            with torch.no_grad():
                return class_embeddings(self.text_tower, list(names), self.cfg.class_template)
        if init == "glove":
            return glove_class_embeddings(list(names), self.cfg.cprfl.glove_source)
        return None

    def _fresh_embeddings(self) -> torch.Tensor | None:
        """A trainable CLIP text tower re-embeds the prompts every step (CPRFL's code)."""
        if self.text_tower is not None and not self.text_tower.frozen:
            return class_embeddings(self.text_tower, self.names, self.cfg.class_template)
        return None

    def frozen_token_source(self) -> nn.Module | None:
        """The module whose tokens a token cache holds (``ltdist.train.token_cache``): the
        backbone's source (a CLIP tower or Q-Former tokens) when none of it trains, else None."""
        source = self.backbone.source
        return source if getattr(source, "frozen", False) else None  # ResNet tokens train

    def forward(self, batch: Mapping) -> dict[str, torch.Tensor]:
        if "image_tokens" in batch:  # the frozen source's tokens, read from a token cache
            logits = self.logits_from_tokens(batch["image_tokens"])
        else:
            logits = self.logits(_images(batch))
        return {"loss": self.loss(logits, batch["labels"].to(logits.dtype))}

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self._score(self.backbone(images))

    def logits_from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits from the frozen source's tokens (B, N, D) in the cache's bf16 / fp16: what
        ``logits`` computes from the images the tokens came from."""
        if self.frozen_token_source() is None:
            raise ValueError("cached image tokens need a frozen token source")
        dtype = next(self.head.parameters()).dtype
        return self._score(self.backbone.project(tokens.to(dtype)))

    def _score(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.head == "linear":
            return self.head(tokens)
        return self.head(tokens, self._fresh_embeddings())

    def logits_for(self, images: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        if self.cfg.head == "linear":
            raise InputError(
                "a linear head knows only its training classes (one output per class, no text "
                "side): score other class names with a CPRFL head (prompt_init clip or glove) "
                "or a DP-VLPA export"
            )
        if self.cfg.cprfl.prompt_init == "random":
            raise InputError("a CPRFL head with random prompts knows only its training classes")
        emb = self._embed(names)
        return self.head(self.backbone(images), emb.to(self.head.class_embeddings.device))

    def load_pretrained(self, state: Mapping[str, torch.Tensor]) -> list[str]:
        """Take the image tower and Q-Former of a pretraining export (backbone kind qformer)."""
        if self.cfg.backbone.kind != "qformer":
            raise ConfigError(
                "model.init_from with the cprfl task needs model.backbone.kind=qformer "
                f"(got {self.cfg.backbone.kind!r})"
            )
        return _load_subset(
            self,
            state,
            {
                "model.image_tower.": "backbone.source.image_tower.",
                "model.qformer.": "backbone.source.qformer.",
            },
        )


def _freeze_unused(tokens: nn.Module, image_size: int) -> None:
    """Freeze what an image-only pass never uses (the Q-Former's text side): DDP without
    ``find_unused_parameters`` fails on trainable parameters that get no gradient."""
    for p in tokens.parameters():
        p.grad = None
    tokens(torch.zeros(1, 3, image_size, image_size)).float().sum().backward()
    unused = [n for n, p in tokens.named_parameters() if p.requires_grad and p.grad is None]
    for n, p in tokens.named_parameters():
        p.grad = None
        if n in unused:
            p.requires_grad_(False)
    log.info(
        "Q-Former tokens: %d parameters unused by images frozen (%s ...)", len(unused), unused[:3]
    )


def _load_subset(
    module: nn.Module, state: Mapping[str, torch.Tensor], prefixes: Mapping[str, str]
) -> list[str]:
    """Copy ``state`` tensors under each source prefix into ``module`` under the target prefix.

    Every parameter under a target prefix must be covered and shapes must agree (else a
    ValueError names the tensor); export keys outside the prefixes are returned as unused.
    """
    own = module.state_dict()
    mapped, unused = {}, []
    for key, value in state.items():
        src = next((p for p in prefixes if key.startswith(p)), None)
        if src is None:
            unused.append(key)
            continue
        target = prefixes[src] + key[len(src) :]
        if target not in own:
            unused.append(key)
            continue
        if own[target].shape != value.shape:
            raise InputError(
                f"pretrained {key} has shape {tuple(value.shape)}, the model's {target} "
                f"{tuple(own[target].shape)}: the export was made with other model sizes"
            )
        mapped[target] = value
    wanted = [k for k in own if any(k.startswith(t) for t in prefixes.values())]
    missing = [k for k in wanted if k not in mapped]
    if missing:
        raise InputError(
            f"the pretrained export lacks {len(missing)} tensors the model needs, e.g. {missing[0]}"
        )
    module.load_state_dict(mapped, strict=False)
    log.info("loaded %d pretrained tensors; %d export tensors unused", len(mapped), len(unused))
    return unused


TASKS = {"pretrain": PretrainTask, "dpvlpa": AdaptTask, "cprfl": CPRFLTask}


def build_task(task: str, cfg: ModelConfig, label_space, load_weights: bool = True) -> nn.Module:
    """The task module; ``load_weights=False`` skips pretrained downloads (an export's own
    weights are loaded on top)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; one of {sorted(TASKS)}")
    return TASKS[task](cfg, label_space, load_weights)

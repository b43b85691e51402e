"""CLIP towers through open_clip: a frozen image tower that yields tokens, and a text tower.

``ImageTower`` returns every token of a ViT image tower, the class token first:
(B, 1 + N, width), e.g. (B, 197, 768) for ViT-B/16 at 224 px. The tokens are the last
transformer block's output with the tower's final LayerNorm (``ln_post``) applied to every
token. For the CLIP ViTs (``pool_type='tok'``, ``final_ln_after_pool=False``) open_clip itself
applies ``ln_post`` to the whole sequence before taking the class token, so token 0 is exactly
the vector that CLIP projects (``tokens[:, 0] @ proj`` equals ``encode_image``); the patch
tokens are those of open_clip's ``output_tokens=True``. The projection ``proj`` is not applied:
the tokens stay at the tower's width (768 for ViT-B/16).

``TextTower`` returns the projected text embedding at the end-of-text token (512-d for
ViT-B/16, 1024-d for RN50), as ``CLIP.encode_text`` does, unnormalised.

Weights come from open_clip's ``pretrained=`` tags (``'openai'``, ``'laion2b_s34b_b88k'``, …)
or a checkpoint path; ``pretrained=''`` builds a randomly initialised model (tests, or machines
without the weights). ``tiny=True`` builds a small ``open_clip.model.CLIP`` from explicit widths
for tests; it keeps CLIP's vocabulary and context length so the real tokenizer fits it.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ltdist.data.loader import ClipPreprocess

if TYPE_CHECKING:  # open_clip imports torchvision: load it only when a tower is built
    import open_clip

log = logging.getLogger(__name__)


@dataclass
class ClipTowerConfig:
    model_name: str = "ViT-B-16"  # an open_clip model name (ViT-B-16, RN50, …)
    pretrained: str = "openai"  # an open_clip tag or a checkpoint path; "" = random init
    image_size: int = 224
    cache_dir: str = ""  # where open_clip keeps downloaded weights; "" = its default
    freeze_text: bool = True  # the text tower (CPRFL's code trains it)
    # The image tower is frozen, as in both papers. False trains it with the rest: only for a
    # tower without pretrained weights (the demo's tiny random ViT), where freezing would leave
    # random features.
    freeze_image: bool = True
    quick_gelu: bool | None = None  # None: as the pretrained tag says (True for 'openai')
    # Tiny model for tests: a small open_clip CLIP built from these sizes (model_name then only
    # picks the tokenizer, which every CLIP model shares).
    tiny: bool = False
    tiny_width: int = 64  # width of both the vision and the text transformer
    tiny_layers: int = 2
    tiny_heads: int = 2
    tiny_embed_dim: int = 32  # the joint (projected) embedding width
    tiny_patch_size: int = 16

    def validate(self) -> None:
        if self.tiny and self.tiny_width % self.tiny_heads:
            raise ValueError(
                f"tiny_width {self.tiny_width} must be divisible by tiny_heads {self.tiny_heads}"
            )
        if self.tiny and self.image_size % self.tiny_patch_size:
            raise ValueError(
                f"image_size {self.image_size} must be a multiple of tiny_patch_size "
                f"{self.tiny_patch_size}"
            )
        if self.image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {self.image_size}")
        if not self.tiny:
            stride, what = _image_stride(self.model_name)
            if stride and self.image_size % stride:
                good = max(stride, round(self.image_size / stride) * stride)
                raise ValueError(
                    f"image_size {self.image_size} is not a multiple of {self.model_name}'s "
                    f"{what} ({stride}): the tower would drop the image's edge; {good} is"
                )


def _image_stride(model_name: str) -> tuple[int, str]:
    """A tower's patch size (ViT) or total stride (ResNet: 32) from open_clip's model table;
    (0, '') for a model the table does not have (an hf-hub: name, a custom config)."""
    try:
        import open_clip
    except ImportError:  # the generation environment reads train configs without open_clip
        return 0, ""

    vision = (open_clip.get_model_config(model_name) or {}).get("vision_cfg", {})
    if vision.get("patch_size"):
        return int(vision["patch_size"]), "patch size"
    if isinstance(vision.get("layers"), list | tuple):  # ModifiedResNet
        return 32, "total stride"
    return 0, ""


def build_clip(cfg: ClipTowerConfig) -> open_clip.model.CLIP:
    """The whole open_clip CLIP model for ``cfg`` (both towers), in eval mode, fp32."""
    import open_clip

    cfg.validate()
    if cfg.tiny:
        vision_cfg = open_clip.model.CLIPVisionCfg(
            layers=cfg.tiny_layers,
            width=cfg.tiny_width,
            head_width=cfg.tiny_width // cfg.tiny_heads,
            patch_size=cfg.tiny_patch_size,
            image_size=cfg.image_size,
        )
        text_cfg = open_clip.model.CLIPTextCfg(
            context_length=77,
            vocab_size=49408,
            width=cfg.tiny_width,
            heads=cfg.tiny_heads,
            layers=cfg.tiny_layers,
        )
        model = open_clip.model.CLIP(
            cfg.tiny_embed_dim, vision_cfg, text_cfg, quick_gelu=resolve_quick_gelu(cfg)
        )
    else:
        model = open_clip.create_model(
            cfg.model_name,
            pretrained=cfg.pretrained or None,
            force_quick_gelu=resolve_quick_gelu(cfg),
            force_image_size=cfg.image_size,
            cache_dir=cfg.cache_dir or None,
        )
        if not cfg.pretrained:
            log.warning("CLIP %s built with random weights (pretrained='')", cfg.model_name)
    return model.eval()


def resolve_quick_gelu(cfg: ClipTowerConfig) -> bool:
    """QuickGELU or GELU: as told, else as the pretrained tag's entry in open_clip's table says
    (OpenAI's weights were trained with QuickGELU, most others with GELU). A random init follows
    the 'openai' architecture, a checkpoint path needs the flag, a tiny model is GELU unless
    told. Reads a table only: nothing is downloaded."""
    if cfg.quick_gelu is not None:
        return cfg.quick_gelu
    if cfg.tiny:
        return False
    import open_clip

    tag = cfg.pretrained or "openai"
    return bool(open_clip.get_pretrained_cfg(cfg.model_name, tag).get("quick_gelu"))


def clip_preprocess(cfg: ClipTowerConfig) -> ClipPreprocess:
    """The images the tower expects: open_clip's preprocess config (mean, std, interpolation,
    resize mode) for the model and pretrained tag, merged as ``open_clip.create_model`` merges
    it (its defaults, then the tag's entry in its table; nothing is downloaded). A tiny or
    random tower, a checkpoint path or a name open_clip's table lacks keeps the defaults
    (OpenAI CLIP's), as open_clip does."""
    if cfg.tiny or not cfg.pretrained:
        return ClipPreprocess()
    if ":" in cfg.model_name:  # hf-hub:, local-dir: keep theirs in a file open_clip fetches
        log.warning(
            "%s: its preprocessing is not looked up (OpenAI CLIP's is used); set loader.mean, "
            "loader.std, loader.interpolation and loader.resize_mode as its config says",
            cfg.model_name,
        )
        return ClipPreprocess()
    from open_clip.pretrained import get_pretrained_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    tag_cfg = get_pretrained_cfg(cfg.model_name.replace("/", "-"), cfg.pretrained)
    merged = merge_preprocess_dict(PreprocessCfg(), tag_cfg)
    return ClipPreprocess(
        mean=tuple(float(v) for v in merged["mean"]),
        std=tuple(float(v) for v in merged["std"]),
        # open_clip resizes with bilinear when told so, else bicubic ("random" at inference)
        interpolation="bilinear" if merged["interpolation"] == "bilinear" else "bicubic",
        resize_mode=merged["resize_mode"],
    )


def resolved_clip_config(cfg: ClipTowerConfig) -> ClipTowerConfig:
    """``cfg`` with ``quick_gelu`` decided, as an export records it: its rebuild has no tag."""
    return replace(cfg, quick_gelu=resolve_quick_gelu(cfg))


def without_weights(cfg: ClipTowerConfig) -> ClipTowerConfig:
    """The same model with random weights (an export's own go on top): the activation is
    decided from the tag before the tag is dropped, also for exports that did not record it."""
    return replace(resolved_clip_config(cfg), pretrained="")


class SequenceFirstAttention(nn.MultiheadAttention):
    """A batch-first ``nn.MultiheadAttention`` that hands its projections a contiguous
    sequence-first input. PyTorch's attention transposes a batch-first input to (L, B, D), a
    view, and under autocast ``matmul`` folds that view into one GEMM only when the weight
    requires grad; with frozen weights it copies the in-projection weight once per token into
    a batched GEMM (ViT-B/16 at 224 px: 197 copies of a 768 x 2304 matrix per layer, a frozen
    tower 6x slower in bf16 on a CPU than the same tower trainable). Same weights, same state
    dict, same outputs."""

    def forward(self, query, key, value, *args, **kwargs):
        if not self.batch_first:
            return super().forward(query, key, value, *args, **kwargs)
        seq_first = query.transpose(0, 1).contiguous()
        k = seq_first if key is query else key.transpose(0, 1).contiguous()
        v = seq_first if value is query else k if value is key else value.transpose(0, 1)
        self.batch_first = False
        try:
            out, weights = super().forward(seq_first, k, v.contiguous(), *args, **kwargs)
        finally:
            self.batch_first = True
        return out.transpose(0, 1), weights


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
    for m in module.modules():
        if type(m) is nn.MultiheadAttention and m.batch_first:
            m.__class__ = SequenceFirstAttention  # frozen weights: see its docstring
    module.eval()


class ImageTower(nn.Module):
    """A CLIP ViT image tower: tokens (B, 1 + N, width), class token first.

    Frozen (the default, both papers): every parameter has ``requires_grad=False``, the module
    stays in eval mode whatever ``train()`` a parent calls, and the forward pass runs under
    ``torch.no_grad()``: it holds no trainable parameter and no optimizer state is ever made
    for it. ``frozen=False`` (``ClipTowerConfig.freeze_image``) makes it an ordinary module.
    """

    def __init__(self, visual: nn.Module, frozen: bool = True):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        if not isinstance(visual, VisionTransformer):
            raise TypeError(
                f"ImageTower needs an open_clip VisionTransformer (a ViT model such as "
                f"ViT-B-16), got {type(visual).__name__}; ResNet CLIP towers give no tokens"
            )
        if visual.attn_pool is not None or visual.final_ln_after_pool:
            raise ValueError("ImageTower supports CLIP ViTs without attentional pooling")
        self.visual = visual
        self.frozen = frozen
        if frozen:
            _freeze(self)
        elif isinstance(visual.proj, nn.Parameter):
            # the tokens never pass through CLIP's projection: a trainable parameter without a
            # gradient would fail DDP (and would only decay under weight decay)
            visual.proj.requires_grad_(False)

    @classmethod
    def from_config(cls, cfg: ClipTowerConfig) -> ImageTower:
        return cls(build_clip(cfg).visual, frozen=cfg.freeze_image)

    def train(self, mode: bool = True) -> ImageTower:
        # frozen: always eval (no dropout, fixed statistics)
        return super().train(mode and not self.frozen)

    @property
    def width(self) -> int:
        return self.visual.transformer.width

    @property
    def token_dim(self) -> int:  # the token-source interface (ltdist.models.backbones)
        return self.width

    @property
    def num_tokens(self) -> int:
        h, w = self.visual.grid_size
        return 1 + h * w

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            return self._tokens(images)

    def _tokens(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            images,
            indices=1,  # the last block only
            normalize_intermediates=True,  # ln_post on every token
            intermediates_only=True,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        cls_token = out["image_intermediates_prefix"][0]  # (B, 1, width)
        patches = out["image_intermediates"][0]  # (B, N, width)
        return torch.cat([cls_token, patches], dim=1)  # (B, 1 + N, width)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The token-source interface: same as calling the module (hooks included)."""
        return self(images)

    @torch.no_grad()
    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's image embedding from this tower's tokens: class token @ proj -> (B, embed)."""
        return tokens[:, 0] @ self.visual.proj


class TextTower(nn.Module):
    """CLIP's text encoder: token ids (N, 77) -> projected embeddings (N, embed_dim).

    Holds only the text parts of the CLIP model (no image tower, no logit scale), so a
    trainable text tower has no unused parameters. ``frozen=True`` freezes it as
    ``ImageTower`` is frozen.
    """

    def __init__(self, clip_model: nn.Module, tokenizer, frozen: bool = True):
        super().__init__()
        if not hasattr(clip_model, "token_embedding"):
            raise TypeError(
                f"TextTower needs an open_clip CLIP with its built-in text transformer, got "
                f"{type(clip_model).__name__}"
            )
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)
        self.pool_type = clip_model.text_pool_type
        self.eos_id = clip_model.text_eos_id
        self.tokenizer = tokenizer
        self.frozen = frozen
        if frozen:
            _freeze(self)

    @classmethod
    def from_config(cls, cfg: ClipTowerConfig) -> TextTower:
        return cls(build_clip(cfg), get_tokenizer(cfg), frozen=cfg.freeze_text)

    def train(self, mode: bool = True) -> TextTower:
        return super().train(mode and not self.frozen)

    @property
    def embed_dim(self) -> int:
        proj = self.text_projection
        return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)  # (N, context_length) int64

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._encode(token_ids)

    def _encode(self, token_ids: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(token_ids).to(dtype)  # (N, L, width)
        x = x + self.positional_embedding.to(dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = text_global_pool(x, token_ids, self.pool_type, eos_token_id=self.eos_id)  # (N, width)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection  # (N, embed_dim)


def get_tokenizer(cfg: ClipTowerConfig):
    """open_clip's tokenizer for the model (the BPE vocabulary ships with open_clip)."""
    import open_clip

    return open_clip.get_tokenizer(cfg.model_name)


def build_towers(cfg: ClipTowerConfig) -> tuple[ImageTower, TextTower]:
    """Both towers from one CLIP model (one weight load)."""
    model = build_clip(cfg)
    image = ImageTower(model.visual, frozen=cfg.freeze_image)
    return image, TextTower(model, get_tokenizer(cfg), cfg.freeze_text)


def class_embeddings(
    text_tower: TextTower,
    class_names: list[str],
    template: str = "a photo of a {}.",
    normalize: bool = False,
) -> torch.Tensor:
    """One text embedding per class, (C, D), from ``template`` filled with each class name.

    Underscores in names become spaces ("traffic_light" -> "traffic light"). Unnormalised by
    default: CPRFL's code feeds the raw projected CLIP embedding to its prompt network.
    Gradient flows only if the tower is trainable and grad mode is on; wrap in
    ``torch.no_grad()`` to precompute.
    """
    texts = [template.format(name.replace("_", " ")) for name in class_names]
    device = next(text_tower.parameters()).device
    emb = text_tower(text_tower.tokenize(texts).to(device)).float()  # (C, D)
    return F.normalize(emb, dim=-1) if normalize else emb

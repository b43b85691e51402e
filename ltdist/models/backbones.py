"""Visual token sources for the CPRFL head and the linear baselines.

One interface: a module with ``.tokens(images) -> (B, N, D)`` (also its ``forward``) and
``.token_dim`` (D). Sources here:

- ``ResNetTokens``: torchvision ResNet-101 up to layer4; at 448 px the 14 x 14 map gives 196
  tokens of width 2048 (CPRFL's backbone). Trainable, BatchNorm in the usual train/eval modes.
  ``tiny``: one Bottleneck per stage instead of [3, 4, 23, 3], the same code at a fraction of
  the cost, for tests and reduced-size runs of the shipped configs.
- ``ImageTower`` (``ltdist.models.clip``): CLIP ViT tokens, class token first.
- ``QFormerTokens``: the query outputs of a (DP-VLPA-pretrained) Q-Former over a frozen CLIP
  tower, K tokens of the Q-Former's width: the design card's "DP-VLPA pretraining -> CPRFL
  fine-tuning", which no published system has.

``TokenBackbone`` puts an optional trainable Linear(D, proj_dim) on top of either (CPRFL's code
has Linear(2048, 2048) after the ResNet map). Images arrive as float tensors, normalised by the
data loader; CPRFL's code feeds its ResNet unnormalised [0, 1] images, torchvision's ImageNet
weights expect ImageNet's mean and std: the loader's choice, not this module's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn

from ltdist.models.clip import ClipTowerConfig, ImageTower


class TokenSource(Protocol):
    token_dim: int

    def tokens(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass
class BackboneConfig:
    kind: Literal["resnet101", "clip", "qformer"] = "resnet101"  # qformer: ltdist.train builds it
    pretrained: bool = True  # resnet101: torchvision ImageNet weights (else random init)
    weights: str = "IMAGENET1K_V2"  # resnet101: a ResNet101_Weights member (IMAGENET1K_V1 too)
    proj_dim: int = 2048  # trainable Linear(token_dim, proj_dim) on top; 0 = none
    # kind='qformer': freeze the Q-Former too (the CLIP tower under it follows
    # model.clip.freeze_image), so only the projection and the head train: a head on fixed
    # pretrained features, which a token cache (data.token_cache) can then hold.
    freeze: bool = False
    # resnet101: a random ResNet with one Bottleneck per stage (pretrained, weights ignored),
    # like ClipTowerConfig.tiny: runs the ResNet-101 code path quickly on a CPU.
    tiny: bool = False
    clip: ClipTowerConfig = field(default_factory=ClipTowerConfig)  # kind='clip'

    def validate(self) -> None:
        if self.proj_dim < 0:
            raise ValueError(f"BackboneConfig.proj_dim must be >= 0, got {self.proj_dim}")


class ResNetTokens(nn.Module):
    """ResNet-101 layer4 map as tokens: (B, 3, H, W) -> (B, H/32 * W/32, 2048)."""

    def __init__(self, pretrained: bool = True, weights: str = "IMAGENET1K_V2", tiny: bool = False):
        super().__init__()
        from torchvision.models import ResNet101_Weights, resnet101
        from torchvision.models.resnet import Bottleneck, ResNet

        if tiny:  # no weights exist for this depth: random init
            net = ResNet(Bottleneck, [1, 1, 1, 1])
        else:
            try:
                enum = ResNet101_Weights[weights] if pretrained else None
            except KeyError:
                names = [w.name for w in ResNet101_Weights]
                raise ValueError(f"unknown ResNet101 weights {weights!r}; one of {names}") from None
            net = resnet101(weights=enum)
        self.token_dim = net.fc.in_features  # layer4's width: 2048
        self.body = nn.Sequential(
            net.conv1,
            net.bn1,
            net.relu,
            net.maxpool,
            net.layer1,
            net.layer2,
            net.layer3,
            net.layer4,
        )  # no pooling, no fc

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.body(images)  # (B, 2048, h, w)
        return fmap.flatten(2).transpose(1, 2)  # (B, h * w, 2048)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)


class QFormerTokens(nn.Module):
    """Q-Former query outputs as tokens: (B, 3, H, W) -> (B, K, hidden).

    The image tower is an ``ImageTower`` (frozen unless configured otherwise); the Q-Former is
    trainable unless ``freeze_qformer``: then, like a frozen ``ImageTower``, it has no trainable
    parameter, stays in eval mode and runs under ``torch.no_grad()``.
    """

    def __init__(self, image_tower: nn.Module, qformer: nn.Module, freeze_qformer: bool = False):
        super().__init__()
        self.image_tower, self.qformer = image_tower, qformer
        self.token_dim = qformer.hidden_size
        self.num_tokens = qformer.config.num_queries
        self.qformer_frozen = freeze_qformer
        if freeze_qformer:
            qformer.requires_grad_(False)
            qformer.eval()

    @property
    def frozen(self) -> bool:
        """No parameter trains: a frozen Q-Former over a frozen tower."""
        return self.qformer_frozen and self.image_tower.frozen

    def train(self, mode: bool = True) -> QFormerTokens:
        super().train(mode)
        if self.qformer_frozen:
            self.qformer.eval()  # no dropout: its tokens are fixed
        return self  # the image tower keeps itself in eval mode when frozen

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            return self.qformer.encode_image(self.image_tower(images))  # (B, K, hidden)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)


class TokenBackbone(nn.Module):
    """A token source with an optional trainable projection: ``tokens(images) -> (B, N, D)``."""

    def __init__(self, source: nn.Module, proj_dim: int = 0):
        super().__init__()
        self.source = source
        self.proj = nn.Linear(source.token_dim, proj_dim) if proj_dim else None
        self.token_dim = proj_dim or source.token_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.source.tokens(images))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The source's tokens (B, N, source dim), computed or read from a token cache, to the
        backbone's (B, N, token_dim)."""
        return self.proj(tokens) if self.proj is not None else tokens

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self(images)


def build_backbone(cfg: BackboneConfig) -> TokenBackbone:
    cfg.validate()
    if cfg.kind == "resnet101":
        source: nn.Module = ResNetTokens(cfg.pretrained, cfg.weights, cfg.tiny)
    elif cfg.kind == "clip":
        source = ImageTower.from_config(cfg.clip)
    else:
        raise ValueError(f"unknown backbone kind {cfg.kind!r}; one of 'resnet101', 'clip'")
    return TokenBackbone(source, cfg.proj_dim)

"""CPRFL's head (Category-Prompt Refined Feature Learning, ACM MM 2024).

Given visual tokens (B, N, D) and one text embedding per class (C, T):

- Prompt Initialization (PI, Eq. 2): a two-layer MLP maps each class embedding to a category
  prompt ``p_i`` in the visual token space: Linear(T, hidden) -> GELU -> Linear(hidden, D),
  hidden = ``hidden_ratio`` x D (0.5 in the official code: 1024 for D = 2048). Ablations
  (``prompt_net``): one Linear(T, D), or no network (the embeddings are the prompts; T = D).
- Visual-Semantic Interaction (VSI, Eq. 3-5): one pre-LayerNorm Transformer encoder layer over
  [visual tokens; prompts] of which only the prompt positions are kept. We compute exactly
  those: queries come from the prompts, keys and values from the whole sequence. With one layer
  this equals full self-attention followed by discarding the visual outputs, at C instead of
  N + C query rows. The official code has no residual connections in this layer (the paper
  does not say); ``residual=True`` gives the standard encoder layer.
- Logits (Eq. 6): ``s_i = p'_i . p_i``, the unnormalised dot product of the refined category
  feature with the class's own prompt. The prompts reach the logits by two paths, through
  ``p'_i`` (via VSI) and directly: the paper's dual-path back-propagation. ``detach_prompts``
  blocks one path for the ablation: ``"vsi"`` feeds VSI detached prompts (gradient by the direct
  path only), ``"direct"`` detaches the factor ``p_i`` (gradient through ``p'_i`` only).

Sizes follow the official code: 8 heads of width 512 (inner width 4096), MLP 2048, dropout 0.1
after the attention's output projection and inside the MLP, q/k/v projections without bias.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ltdist.losses.contrastive import full_precision
from ltdist.models.word_vectors import GLOVE_PACKAGE


@dataclass
class CPRFLConfig:
    prompt_init: Literal["clip", "glove", "random"] = "clip"
    hidden_ratio: float = 0.5  # PI hidden width = hidden_ratio x token_dim
    heads: int = 8
    head_dim: int = 512  # inner attention width = heads x head_dim = 4096
    mlp_dim: int = 2048
    dropout: float = 0.1
    residual: bool = False  # the official code: none; True: the paper's standard encoder layer
    random_dim: int = 1024  # prompt_init='random': width T of the random class embeddings
    random_seed: int = 0
    # prompt_init='glove': the package (GloVe 6B 50-d), or a GloVe text file / .npy + .parquet
    # folder of any width (e.g. glove.6B.300d.txt); the width is read from the file.
    glove_source: str = GLOVE_PACKAGE
    # Eq. 2's PI network: "mlp" (the paper), "linear" (one Linear(T, D)), "none" (the class
    # embeddings are the prompts: needs T = token width, e.g. model.backbone.proj_dim=1024).
    prompt_net: Literal["mlp", "linear", "none"] = "mlp"
    # Eq. 6's dual path: "none" (both), "vsi" (prompts enter VSI detached: direct path only),
    # "direct" (the p_i factor detached: gradient through p'_i only).
    detach_prompts: Literal["none", "vsi", "direct"] = "none"

    def validate(self) -> None:
        if self.hidden_ratio <= 0 or self.heads < 1 or self.head_dim < 1 or self.mlp_dim < 1:
            raise ValueError(f"CPRFLConfig sizes must be positive: {self}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"CPRFLConfig.dropout must be in [0, 1), got {self.dropout}")


def random_class_embeddings(num_classes: int, dim: int, seed: int = 0) -> torch.Tensor:
    """The paper's random-initialisation ablation: fixed N(0, 1) class embeddings (C, dim)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes, dim, generator=gen)


def word_vector_embeddings(
    class_names: Sequence[str], vectors: Mapping[str, Sequence[float]]
) -> torch.Tensor:
    """GloVe-style class embeddings (C, T): the mean of the word vectors of each class name.

    ``vectors`` maps a lower-case word to its vector (e.g. GloVe 6B loaded by the caller);
    multi-word names ("traffic light", "hair_drier") average their words. A word with no vector
    is an error that names the class, so a silent zero prompt cannot happen.
    """
    rows = []
    for name in class_names:
        words = name.replace("_", " ").lower().split()
        missing = [w for w in words if w not in vectors]
        if missing or not words:
            raise KeyError(f"class {name!r}: no word vector for {missing or name!r}")
        rows.append(torch.tensor([list(vectors[w]) for w in words], dtype=torch.float32).mean(0))
    return torch.stack(rows)


class PromptInit(nn.Module):
    """Eq. 2: class embeddings (C, T) -> category prompts (C, D); ``kind`` "linear" and "none"
    are the ablations (one Linear; the embeddings themselves, T = D)."""

    def __init__(self, text_dim: int, token_dim: int, hidden_dim: int, kind: str = "mlp"):
        super().__init__()
        self.kind = kind
        if kind == "mlp":
            self.fc1 = nn.Linear(text_dim, hidden_dim)
            self.fc2 = nn.Linear(hidden_dim, token_dim)
        elif kind == "linear":
            self.fc = nn.Linear(text_dim, token_dim)
        elif kind == "none":
            if text_dim != token_dim:
                raise ValueError(
                    f"model.cprfl.prompt_net=none uses the class embeddings as prompts, so their "
                    f"width ({text_dim}) must equal the visual tokens' ({token_dim}): set "
                    f"model.backbone.proj_dim={text_dim}, or use prompt_net linear or mlp"
                )
        else:
            raise ValueError(f"model.cprfl.prompt_net {kind!r} is not one of mlp, linear, none")

    def forward(self, class_embeddings: torch.Tensor) -> torch.Tensor:
        if self.kind == "mlp":
            return self.fc2(F.gelu(self.fc1(class_embeddings)))
        if self.kind == "linear":
            return self.fc(class_embeddings)
        return class_embeddings


class VisualSemanticInteraction(nn.Module):
    """Eq. 3-5: one encoder layer in which only the prompt positions are updated."""

    def __init__(
        self, dim: int, heads: int, head_dim: int, mlp_dim: int, dropout: float, residual: bool
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.residual = residual
        self.norm1 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, dim)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, visual: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        B, N, _ = visual.shape
        C = prompts.shape[-2]
        if prompts.dim() == 2:
            prompts = prompts.unsqueeze(0).expand(B, -1, -1)  # (B, C, D)
        x = self.norm1(torch.cat([visual, prompts], dim=1))  # (B, N + C, D), Eq. 3 input
        q = self.to_q(x[:, N:])  # (B, C, inner): queries only at the prompt positions
        k, v = self.to_kv(x).chunk(2, dim=-1)  # (B, N + C, inner) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn = F.scaled_dot_product_attention(q, k, v)  # (B, h, C, head_dim), Eq. 4
        attn = self.drop(self.to_out(attn.transpose(1, 2).reshape(B, C, -1)))  # (B, C, D)
        if self.residual:
            attn = attn + prompts
        refined = self.drop(self.mlp(self.norm2(attn)))  # Eq. 5
        if self.residual:
            refined = refined + attn
        return refined  # (B, C, D): the refined category features p'


class CPRFLHead(nn.Module):
    """Visual tokens (B, N, token_dim) -> logits (B, C).

    ``class_embeddings`` (C, T) are the PI network's input: CLIP text embeddings
    (``prompt_init='clip'``), word vectors ('glove'), or None for 'random' (then
    ``num_classes`` is needed and fixed random embeddings are made). They are a buffer (saved
    with the head, never trained); a trainable text encoder can instead pass fresh embeddings
    to each ``forward`` call, as the official code does.
    """

    def __init__(
        self,
        class_embeddings: torch.Tensor | None,
        token_dim: int,
        config: CPRFLConfig | None = None,
        num_classes: int | None = None,
    ):
        super().__init__()
        cfg = config or CPRFLConfig()
        cfg.validate()
        self.config = cfg
        if cfg.prompt_init == "random":
            if num_classes is None:
                if class_embeddings is None:
                    raise ValueError("prompt_init='random' needs num_classes")
                num_classes = class_embeddings.shape[0]
            class_embeddings = random_class_embeddings(num_classes, cfg.random_dim, cfg.random_seed)
        elif class_embeddings is None or class_embeddings.dim() != 2:
            raise ValueError(
                f"prompt_init={cfg.prompt_init!r} needs class embeddings of shape (C, T), got "
                f"{None if class_embeddings is None else tuple(class_embeddings.shape)}"
            )
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        num_classes, text_dim = self.class_embeddings.shape
        self.num_classes = num_classes
        self.token_dim = token_dim
        hidden = round(cfg.hidden_ratio * token_dim)
        self.prompt_init = PromptInit(text_dim, token_dim, hidden, cfg.prompt_net)
        self.vsi = VisualSemanticInteraction(
            token_dim, cfg.heads, cfg.head_dim, cfg.mlp_dim, cfg.dropout, cfg.residual
        )

    def prompts(self, class_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        """Eq. 2: the category prompts p (C, token_dim)."""
        emb = self.class_embeddings if class_embeddings is None else class_embeddings
        return self.prompt_init(emb)

    def refine(self, visual: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Eq. 3-5: refined category features p' (B, C, token_dim)."""
        return self.vsi(visual, prompts)

    @staticmethod
    def score(refined: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Eq. 6: s_i = p'_i . p_i, (B, C), in float32 (float64 stays) with autocast off: a
        bf16 dot product of D = 2048 terms keeps 8 significant bits, which ties and reorders
        the samples AP ranks."""
        dtype = torch.promote_types(refined.dtype, torch.float32)
        with full_precision(refined):
            return (refined.to(dtype) * prompts.to(dtype)).sum(-1)

    def forward(
        self, visual: torch.Tensor, class_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        if visual.shape[-1] != self.token_dim:
            raise ValueError(
                f"visual tokens have width {visual.shape[-1]}, head expects {self.token_dim}"
            )
        prompts = self.prompts(class_embeddings)  # (C, D)
        block = self.config.detach_prompts
        refined = self.refine(visual, prompts.detach() if block == "vsi" else prompts)
        return self.score(refined, prompts.detach() if block == "direct" else prompts)  # (B, C)

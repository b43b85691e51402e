"""BLIP-2-style Q-Former: a BERT encoder whose learnable queries read frozen image tokens.

Layout (BLIP-2, Li et al. 2023). The input sequence is ``[queries; text]``: ``num_queries``
learnable query tokens (no position embedding) followed by BERT text embeddings (word + learned
position). Both go through the embedding LayerNorm and dropout. Every layer is a post-LayerNorm
BERT layer:

1. self-attention over ``[queries; text]`` under a mask that says who sees whom;
2. on layers 0, f, 2f, ... (``f = cross_attention_freq``) the QUERY positions alone attend to
   the image tokens (keys and values projected from ``vision_width``);
3. feed-forward: the queries through their own feed-forward, the text through BERT's.

Masks (``mode``):

* ``"unimodal"`` (image-text contrastive, ITC): queries see only queries, text sees only
  (non-padding) text. The two streams never mix, so running them jointly equals running
  :meth:`QFormer.encode_image` and :meth:`QFormer.encode_text` separately.
* ``"multimodal"`` (BLIP-2's image-text matching, ITM): every position sees every query and
  every non-padding text token.

BERT initialisation (:func:`load_bert_weights`) copies the embeddings, every self-attention and
text feed-forward from a BERT checkpoint, and initialises each query feed-forward from the same
BERT feed-forward (as BLIP-2 does); cross-attention and the query tokens stay random. BLIP-2's
Q-Former has no token-type embedding, so BERT's ``token_type_embeddings`` are dropped by default
(a constant vector added to every BERT token before the embedding LayerNorm);
``fold_token_type=True`` adds type 0 into the word embeddings instead, which makes
:meth:`QFormer.encode_text` reproduce the BERT encoder exactly.

Parameter counts (``vocab_size`` 30522, BERT-base sizes, 32 queries; see
``tests/models/test_qformer.py``):

* ``vision_width=768`` (CLIP ViT-B/16 tokens): 179,785,728.
* ``vision_width=1408`` (EVA ViT-g, as in BLIP-2): 185,683,968.

Of these, 23,835,648 are the text embeddings (word 23,440,896 + position 393,216 + LayerNorm),
28,366,848 the self-attention blocks, 56,687,616 each the query and the text feed-forwards; the
cross-attention blocks are 6 x 2,363,904 (768) or 6 x 3,346,944 (1408); the queries 24,576.
No pooler, no token-type embedding, no language-model head.

BLIP-2 reports 188M trainable Q-Former parameters (its Table 1). Its stage-1 model, as LAVIS
builds it, also holds what this module leaves to the heads that use it: one extra word-embedding
row for the added ``[DEC]`` token (768), the language-model head's transform (dense + LayerNorm,
592,128) and output bias (30,523; the output weight is tied to the word embeddings), the ITC
projections (2 x 196,864), the ITM head (1,538), the temperature (1) and the LayerNorm on the
ViT-g features (2,816): 186,705,470 in all, about 1.3M short of 188M; we cannot attribute the
rest (the paper does not state how it counted). BLIP-2's Table 2 gives 107M for the same Q-Former;
that figure matches the query path alone (queries, self-attention, cross-attention and query
feed-forwards: 105,160,704, plus the embedding LayerNorm) plus the 768 x 2560 projection into
OPT-2.7B (1,968,640), i.e. without the word/position embeddings and text feed-forwards that
only the text side uses (LAVIS issue #503 notes the two tables disagree).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

QFormerMode = Literal["unimodal", "multimodal"]


@dataclass
class QFormerConfig:
    """Sizes of a Q-Former. Defaults are BLIP-2's (BERT-base) except ``vision_width`` (768, the
    width of CLIP ViT-B/16 tokens; BLIP-2's ViT-g gives 1408)."""

    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 30522
    max_positions: int = 512
    num_queries: int = 32
    cross_attention_freq: int = 2
    vision_width: int = 768
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    initializer_range: float = 0.02
    # A Hugging Face id or local folder of a BERT checkpoint; empty = random init.
    bert_init: str = ""

    def __post_init__(self) -> None:
        sizes = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "num_queries")
        small = [f"{k}={getattr(self, k)}" for k in sizes if getattr(self, k) < 1]
        if small:
            raise ValueError(f"QFormerConfig: sizes must be >= 1, got {', '.join(small)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"QFormerConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"QFormerConfig: hidden_size {self.hidden_size} is not divisible by "
                f"num_heads {self.num_heads}"
            )
        if self.cross_attention_freq < 1:
            raise ValueError(
                f"QFormerConfig: cross_attention_freq must be >= 1, got {self.cross_attention_freq}"
            )


class QFormerOutput(NamedTuple):
    """Final hidden states: ``query_states`` (B, K, H) when image tokens were given,
    ``text_states`` (B, T, H) when text was given (``None`` otherwise). A named tuple, not a
    dataclass: ZeRO-3's backward hooks find the tensors of tuples, not of dataclasses (with a
    dataclass they never gather ``query_tokens`` again, and the backward fails)."""

    query_states: Tensor | None
    text_states: Tensor | None


class Attention(nn.Module):
    """Multi-head attention with BERT's post-LayerNorm residual: ``norm(x + out(attn(x)))``.

    Self-attention when ``context`` is ``None``; otherwise cross-attention whose keys and values
    come from ``context`` (width ``context_width``).
    """

    def __init__(self, config: QFormerConfig, context_width: int | None = None) -> None:
        super().__init__()
        hidden = config.hidden_size
        kv_width = hidden if context_width is None else context_width
        self.num_heads = config.num_heads
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.attn_dropout = config.dropout
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, x: Tensor, context: Tensor | None = None, allowed: Tensor | None = None
    ) -> Tensor:
        # x (B, L, H); context (B, S, C); allowed: bool, broadcastable to (B, nh, L, S)
        B, L, H = x.shape
        source = x if context is None else context
        nh, hd = self.num_heads, H // self.num_heads
        q = self.query(x).view(B, L, nh, hd).transpose(1, 2)  # (B, nh, L, hd)
        k = self.key(source).view(B, -1, nh, hd).transpose(1, 2)  # (B, nh, S, hd)
        v = self.value(source).view(B, -1, nh, hd).transpose(1, 2)  # (B, nh, S, hd)
        bias = None
        if allowed is not None:
            # additive mask in the compute dtype (autocast-safe); a finite minimum rather than
            # -inf keeps a fully masked row (an all-padding text) free of NaN, as BERT does
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            bias.masked_fill_(~allowed, torch.finfo(q.dtype).min)
        p = self.attn_dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, L, H)  # (B, L, H)
        return self.norm(x + self.dropout(self.out(y)))


class FeedForward(nn.Module):
    """BERT feed-forward with post-LayerNorm residual: ``norm(x + fc_out(gelu(fc_in(x))))``."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc_out = nn.Linear(config.intermediate_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc_out(F.gelu(self.fc_in(x)))))


class QFormerLayer(nn.Module):
    """Self-attention over [queries; text], cross-attention of the queries to the image tokens
    (only if ``has_cross_attention``), then separate feed-forwards for queries and text."""

    def __init__(self, config: QFormerConfig, has_cross_attention: bool) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.cross_attn = Attention(config, config.vision_width) if has_cross_attention else None
        self.query_ffn = FeedForward(config)
        self.text_ffn = FeedForward(config)

    def forward(
        self,
        x: Tensor,
        num_queries: int,
        image_tokens: Tensor | None,
        allowed: Tensor | None,
    ) -> Tensor:
        # x (B, K + T, H): the first num_queries positions are the queries
        x = self.self_attn(x, allowed=allowed)
        queries, text = x[:, :num_queries], x[:, num_queries:]
        parts = []
        if num_queries:
            if self.cross_attn is not None:
                queries = self.cross_attn(queries, context=image_tokens)  # (B, K, H)
            parts.append(self.query_ffn(queries))
        if text.shape[1]:
            parts.append(self.text_ffn(text))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class TextEmbeddings(nn.Module):
    """Word + learned position embeddings for the text; the queries are prepended without a
    position embedding; LayerNorm and dropout over the whole [queries; text] sequence."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_positions, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: Tensor | None, queries: Tensor | None) -> Tensor:
        parts = []
        if queries is not None:
            parts.append(queries)  # (B, K, H)
        if input_ids is not None:
            T = input_ids.shape[1]
            if T > self.position.num_embeddings:
                raise ValueError(
                    f"text of {T} tokens is longer than max_positions "
                    f"{self.position.num_embeddings}; truncate it in the tokenizer"
                )
            positions = torch.arange(T, device=input_ids.device)
            parts.append(self.word(input_ids) + self.position(positions))  # (B, T, H)
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return self.dropout(self.norm(x))


class QFormer(nn.Module):
    """BLIP-2 Q-Former (see the module docstring). ``config.bert_init`` names a BERT checkpoint
    to initialise from (:func:`load_bert_weights`); its report is kept in ``bert_init_report``."""

    def __init__(self, config: QFormerConfig) -> None:
        super().__init__()
        self.config = config
        self.query_tokens = nn.Parameter(torch.empty(1, config.num_queries, config.hidden_size))
        self.embeddings = TextEmbeddings(config)
        self.layers = nn.ModuleList(
            QFormerLayer(config, has_cross_attention=i % config.cross_attention_freq == 0)
            for i in range(config.num_layers)
        )
        self.apply(self._init_module)
        nn.init.normal_(self.query_tokens, std=config.initializer_range)
        self.bert_init_report: BertLoadReport | None = None
        if config.bert_init:
            self.bert_init_report = load_bert_weights(self, config.bert_init)

    def _init_module(self, module: nn.Module) -> None:
        # BERT's initialisation: normal(0, initializer_range) weights, zero biases, unit norms
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    @property
    def hidden_size(self) -> int:
        """Width H of the outputs."""
        return self.config.hidden_size

    def cross_attention_layers(self) -> list[int]:
        """Indices of the layers that hold a cross-attention block."""
        return [i for i, layer in enumerate(self.layers) if layer.cross_attn is not None]

    def forward(
        self,
        image_tokens: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        mode: QFormerMode = "unimodal",
    ) -> QFormerOutput:
        """Run the queries (if ``image_tokens`` (B, N, vision_width) is given), the text (if
        ``input_ids`` (B, T) is given; ``attention_mask`` (B, T), 1 = token, 0 = padding), or
        both jointly under ``mode``'s mask."""
        if image_tokens is None and input_ids is None:
            raise ValueError("QFormer.forward needs image_tokens, input_ids or both")
        if mode not in ("unimodal", "multimodal"):
            raise ValueError(f"unknown mode {mode!r}; expected 'unimodal' or 'multimodal'")
        queries = None
        K = 0
        if image_tokens is not None:
            if image_tokens.ndim != 3 or image_tokens.shape[-1] != self.config.vision_width:
                raise ValueError(
                    f"image_tokens must be (B, N, {self.config.vision_width}), "
                    f"got {tuple(image_tokens.shape)}"
                )
            K = self.config.num_queries
            queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)  # (B, K, H)
        if input_ids is not None:
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be (B, T), got {tuple(input_ids.shape)}")
            if image_tokens is not None and image_tokens.shape[0] != input_ids.shape[0]:
                raise ValueError(
                    f"batch sizes differ: image_tokens {image_tokens.shape[0]}, "
                    f"input_ids {input_ids.shape[0]}"
                )
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} does not match "
                    f"input_ids {tuple(input_ids.shape)}"
                )

        x = self.embeddings(input_ids, queries)  # (B, K + T, H)
        allowed = self._allowed(x.shape[1], K, attention_mask, mode, x.device)
        for layer in self.layers:
            x = layer(x, K, image_tokens, allowed)
        return QFormerOutput(
            query_states=x[:, :K] if K else None,
            text_states=x[:, K:] if input_ids is not None else None,
        )

    @staticmethod
    def _allowed(
        length: int,
        num_queries: int,
        attention_mask: Tensor | None,
        mode: QFormerMode,
        device: torch.device,
    ) -> Tensor | None:
        """Boolean (B or 1, 1, L or 1, L) mask, True where a row may attend to a column."""
        T = length - num_queries
        if T and attention_mask is not None:
            text_keys = attention_mask.to(device=device, dtype=torch.bool)  # (B, T)
        else:
            text_keys = torch.ones(1, T, dtype=torch.bool, device=device)
        query_keys = torch.ones(text_keys.shape[0], num_queries, dtype=torch.bool, device=device)
        keys = torch.cat([query_keys, text_keys], dim=1)  # (B, L)
        if num_queries == 0 or T == 0 or mode == "multimodal":
            if bool(keys.all()):
                return None
            return keys[:, None, None, :]  # (B, 1, 1, L)
        # unimodal: block-diagonal, queries <-> queries and text <-> text
        is_query = torch.arange(length, device=device) < num_queries  # (L,)
        same_stream = is_query[:, None] == is_query[None, :]  # (L, L)
        return (same_stream[None] & keys[:, None, :])[:, None]  # (B, 1, L, L)

    def encode_image(self, image_tokens: Tensor) -> Tensor:
        """Query outputs (B, K, H) for image tokens (B, N, vision_width); no text involved."""
        return self(image_tokens=image_tokens).query_states

    def encode_text(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Plain BERT encoding of the text (no queries, no cross-attention): the [CLS] state
        (B, H) and all token states (B, T, H)."""
        words = self(input_ids=input_ids, attention_mask=attention_mask).text_states
        return words[:, 0], words


# ----------------------------------------------------------------------------------------------
# BERT initialisation


@dataclass
class BertLoadReport:
    """What :func:`load_bert_weights` did.

    ``mapped``: Q-Former parameter -> BERT tensor copied into it unchanged (the query
    feed-forwards map to the same BERT tensors as the text feed-forwards). ``derived``:
    Q-Former parameter -> how it was computed from BERT tensors (only with
    ``fold_token_type``). ``unmapped``: Q-Former parameters left at their initialisation (query
    tokens, cross-attention). ``unused``: BERT tensors not used (pooler, token types, heads, ...).
    """

    source: str
    mapped: dict[str, str] = field(default_factory=dict)
    derived: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)


_TOKEN_TYPE = "embeddings.token_type_embeddings.weight"

# Q-Former name (relative to a layer) -> BERT name (relative to encoder.layer.{i}).
_LAYER_MAP = {
    "self_attn.query": "attention.self.query",
    "self_attn.key": "attention.self.key",
    "self_attn.value": "attention.self.value",
    "self_attn.out": "attention.output.dense",
    "self_attn.norm": "attention.output.LayerNorm",
    "text_ffn.fc_in": "intermediate.dense",
    "text_ffn.fc_out": "output.dense",
    "text_ffn.norm": "output.LayerNorm",
    # BLIP-2 initialises the query feed-forward from the same BERT feed-forward
    "query_ffn.fc_in": "intermediate.dense",
    "query_ffn.fc_out": "output.dense",
    "query_ffn.norm": "output.LayerNorm",
}
_EMBEDDING_MAP = {
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
}


def bert_name_map(config: QFormerConfig) -> dict[str, str]:
    """Q-Former parameter name -> BERT checkpoint tensor name, for every parameter that BERT
    initialises."""
    names: dict[str, str] = {}
    for ours, theirs in _EMBEDDING_MAP.items():
        for leaf in ("weight", "bias"):
            if ours != "embeddings.norm" and leaf == "bias":
                continue
            names[f"{ours}.{leaf}"] = f"{theirs}.{leaf}"
    for i in range(config.num_layers):
        for ours, theirs in _LAYER_MAP.items():
            for leaf in ("weight", "bias"):
                names[f"layers.{i}.{ours}.{leaf}"] = f"encoder.layer.{i}.{theirs}.{leaf}"
    return names


def _normalise_bert_names(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip a task model's ``bert.`` prefix; rename TF-era LayerNorm ``gamma``/``beta``."""
    out: dict[str, Tensor] = {}
    for name, tensor in state.items():
        if name.startswith("bert."):
            name = name[len("bert.") :]
        if name.endswith(".gamma"):
            name = name[: -len("gamma")] + "weight"
        elif name.endswith(".beta"):
            name = name[: -len("beta")] + "bias"
        out[name] = tensor
    return out


def _read_weights_file(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    # never unpickle arbitrary objects
    return torch.load(path, map_location="cpu", weights_only=True)


def _read_folder(folder: Path) -> tuple[dict[str, Tensor], dict | None]:
    config_file = folder / "config.json"
    hf_config = json.loads(config_file.read_text()) if config_file.is_file() else None
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    legacy = folder / "pytorch_model.bin"
    if single.is_file():
        return _read_weights_file(single), hf_config
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(_read_weights_file(folder / shard))
        return state, hf_config
    if legacy.is_file():
        return _read_weights_file(legacy), hf_config
    raise FileNotFoundError(
        f"{folder}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def _read_bert(
    source: str | os.PathLike | Mapping[str, Tensor] | nn.Module,
) -> tuple[dict[str, Tensor], dict | None, str]:
    """The checkpoint's tensors, its config as a dict (if known), and a name for messages."""
    if isinstance(source, nn.Module):
        cfg = getattr(source, "config", None)
        cfg_dict = cfg.to_dict() if hasattr(cfg, "to_dict") else None
        return dict(source.state_dict()), cfg_dict, type(source).__name__
    if isinstance(source, Mapping):
        return dict(source), None, "state dict"
    path = Path(source)
    if path.is_dir():
        state, cfg_dict = _read_folder(path)
        return state, cfg_dict, str(path)
    if path.is_file():
        return _read_weights_file(path), None, str(path)
    # a Hugging Face id: transformers resolves it (from its cache when offline)
    try:
        from transformers import AutoModel
    except ImportError as err:
        raise ImportError(
            f"{source!r} is not a local file or folder; loading it as a Hugging Face id needs "
            "transformers (install the 'train' extra)"
        ) from err
    model = AutoModel.from_pretrained(str(source))
    return dict(model.state_dict()), model.config.to_dict(), str(source)


def _check_hf_config(config: QFormerConfig, hf: dict | None, where: str) -> None:
    """Settings that weight shapes cannot reveal."""
    if not hf:
        return
    heads = hf.get("num_attention_heads")
    if heads is not None and heads != config.num_heads:
        raise ValueError(
            f"{where}: checkpoint has {heads} attention heads, QFormerConfig.num_heads is "
            f"{config.num_heads}; set num_heads={heads}"
        )
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{where}: checkpoint uses hidden_act={act!r}; the Q-Former uses 'gelu'")
    eps = hf.get("layer_norm_eps")
    if eps is not None and eps != config.layer_norm_eps:
        logger.warning(
            "%s: checkpoint layer_norm_eps %g differs from QFormerConfig.layer_norm_eps %g",
            where,
            eps,
            config.layer_norm_eps,
        )


@torch.no_grad()
def load_bert_weights(
    qformer: QFormer,
    source: str | os.PathLike | Mapping[str, Tensor] | nn.Module,
    fold_token_type: bool = False,
) -> BertLoadReport:
    """Initialise ``qformer`` from a BERT checkpoint, in place, as BLIP-2 does.

    ``source``: a local folder (``model.safetensors``, sharded safetensors, or
    ``pytorch_model.bin`` read with ``weights_only=True``), a weights file, a state dict, a
    transformers ``BertModel`` (or a task model with a ``bert.`` prefix), or a Hugging Face id
    (through ``transformers.AutoModel``). Copies the embeddings, every self-attention and text
    feed-forward, and initialises the query feed-forwards from the same BERT feed-forwards;
    cross-attention and the query tokens keep their initialisation.

    ``fold_token_type``: BLIP-2's Q-Former has no token-type embedding and drops BERT's (the
    default). With True, BERT's token type 0 is added into the word embeddings, so that
    :meth:`QFormer.encode_text` equals the BERT encoder's output exactly.

    Raises ``ValueError`` naming the parameter when a shape differs or a tensor is missing; no
    parameter is changed in that case.
    """
    raw, hf_config, where = _read_bert(source)
    state = _normalise_bert_names(raw)
    if "embeddings.word_embeddings.weight" not in state:
        raise ValueError(f"{where}: not a BERT checkpoint (no embeddings.word_embeddings.weight)")
    _check_hf_config(qformer.config, hf_config, where)

    ours = dict(qformer.named_parameters())
    names = bert_name_map(qformer.config)
    missing = sorted({theirs for theirs in names.values() if theirs not in state})
    if missing:
        layers = {k.split(".")[2] for k in state if k.startswith("encoder.layer.")}
        raise ValueError(
            f"{where}: checkpoint lacks {len(missing)} tensors the Q-Former needs, e.g. "
            f"{missing[0]} (checkpoint has {len(layers)} layers, Q-Former "
            f"{qformer.config.num_layers})"
        )
    for mine, theirs in names.items():
        if tuple(ours[mine].shape) != tuple(state[theirs].shape):
            raise ValueError(
                f"{where}: shape mismatch for Q-Former parameter {mine} {tuple(ours[mine].shape)}"
                f" <- BERT {theirs} {tuple(state[theirs].shape)}"
            )
    if fold_token_type:
        if _TOKEN_TYPE not in state:
            raise ValueError(
                f"{where}: fold_token_type=True but the checkpoint has no {_TOKEN_TYPE}"
            )
        if state[_TOKEN_TYPE].shape[-1] != qformer.config.hidden_size:
            raise ValueError(
                f"{where}: shape mismatch for {_TOKEN_TYPE} {tuple(state[_TOKEN_TYPE].shape)}"
            )

    report = BertLoadReport(source=where)
    for mine, theirs in names.items():
        ours[mine].copy_(state[theirs])
        report.mapped[mine] = theirs
    if fold_token_type:
        word = "embeddings.word.weight"
        ours[word].add_(state[_TOKEN_TYPE][0].to(ours[word].dtype))
        report.derived[word] = f"{report.mapped.pop(word)} + {_TOKEN_TYPE}[0]"
    used = set(names.values()) | ({_TOKEN_TYPE} if fold_token_type else set())
    report.unmapped = [n for n in ours if n not in names]
    report.unused = sorted(n for n in state if n not in used)
    logger.info(
        "Q-Former initialised from %s: %d tensors copied, %d derived, %d left at init "
        "(query tokens, cross-attention), %d checkpoint tensors unused (%s)",
        where,
        len(report.mapped),
        len(report.derived),
        len(report.unmapped),
        len(report.unused),
        ", ".join(report.unused[:6]) + (" ..." if len(report.unused) > 6 else ""),
    )
    return report

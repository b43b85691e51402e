"""The token cache's format: a frozen token source's output tokens (a CLIP image tower's, or a
frozen Q-Former's over one) stored once, read by training instead of the images
(``ltdist.train.token_cache`` builds it).

A cache is a shard folder of its own (docs/design.md, "Token caches"): the same split names,
shard names, keys, sample order and per-sample ``json`` / ``txt`` as the image shards, with a
``vtok`` member (the tokens, raw little-endian bf16 or fp16 bytes, shape ``(views, N, D)``) in
place of the image; ``<split>.index.json`` with checksums as for any shard set; a copy of
``classes.json``; and ``<split>.tokens.json``, the manifest of what produced the tokens. The
loader plans over the cache exactly as over the images (same counts, same order), so a run
reads the same samples in the same batches from either.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from ltdist import storage
from ltdist.data.shards import ShardIndex, load_index
from ltdist.entry import InputError, MissingInputError

CacheDtype = Literal["bf16", "fp16"]
TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MANIFEST_VERSION = 2  # 2: the source's kind; its weights, token count and width compared
AUTO = "auto"  # data.token_cache: <data location>/tokens


def cache_location(data_location: str, setting: str) -> str:
    """Where ``data.token_cache`` points: ``auto`` = a ``tokens`` folder inside the image
    shards' folder; anything else is a folder (local or an fsspec URL)."""
    return storage.join(data_location, "tokens") if setting == AUTO else setting


def manifest_location(location: str, split: str) -> str:
    return storage.join(location, f"{split}.tokens.json")


def shards_digest(index: ShardIndex) -> str:
    """SHA-256 over the image shards' names, counts and checksums: a cache belongs to these."""
    rows = [(s.name, s.count, s.sha256) for s in index.ordered()]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@dataclass
class TokenManifest:
    """What produced a split's tokens. ``expected`` fields must equal the current run's for the
    cache to be read; ``versions`` are recorded, not compared."""

    split: str
    # compared, in this order, when a run opens the cache (the first difference is named)
    source: str  # "clip": a CLIP image tower; "qformer": Q-Former queries over one
    model_name: str
    pretrained: str
    image_size: int
    transform: str
    mean: list[float]
    std: list[float]
    interpolation: str
    resize_mode: str
    dtype: str
    views: int
    augment_seed: int | None  # loader.seed for augmented views (views > 1), else None
    tower: dict  # the rest of model.clip that shapes the tokens (tiny sizes, quick_gelu)
    # the whole source's weights (a Q-Former's with its tower's): a random init, a tag, an export
    source_weights_sha256: str
    num_tokens: int
    token_dim: int
    image_shards_sha256: str  # the image shards the tokens were computed from
    # recorded only
    num_samples: int = 0
    versions: dict = field(default_factory=dict)
    format_version: int = MANIFEST_VERSION

    COMPARED = (
        "source",
        "model_name",
        "pretrained",
        "image_size",
        "transform",
        "mean",
        "std",
        "interpolation",
        "resize_mode",
        "dtype",
        "views",
        "augment_seed",
        "tower",
        "source_weights_sha256",
        "num_tokens",
        "token_dim",
        "image_shards_sha256",
    )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @property
    def sample_bytes(self) -> int:
        return self.views * self.num_tokens * self.token_dim * 2

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.views, self.num_tokens, self.token_dim


def read_manifest(location: str, split: str) -> TokenManifest | None:
    path = manifest_location(location, split)
    if not storage.exists(path):
        return None
    try:
        data = json.loads(storage.read_bytes(path))
        if data.get("format_version") != MANIFEST_VERSION:
            raise InputError(
                f"{path}: manifest format {data.get('format_version')!r}, this ltdist reads "
                f"{MANIFEST_VERSION}: rebuild the cache (remove it, or set another folder)"
            )
        return TokenManifest(**data)
    except (ValueError, TypeError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: not a readable token manifest ({e})") from None


def mismatch(found: TokenManifest, wanted: TokenManifest) -> tuple[str, object, object] | None:
    """The first compared field where a cache's manifest differs from what a run needs."""
    for name in TokenManifest.COMPARED:
        a, b = getattr(found, name), getattr(wanted, name)
        if a != b:
            return name, a, b
    return None


_WHY = {
    "source_weights_sha256": "the token source's weights differ (another random init seed, "
    "another init_from export or checkpoint)",
    "image_shards_sha256": "the image shards changed since the cache was built",
}


def check_manifest(location: str, split: str, wanted: TokenManifest) -> None:
    """Refuse a cache built for another source, weights, tag, size, preprocessing, dtype or
    shard set, naming the field and both values."""
    found = read_manifest(location, split)
    if found is None:
        raise MissingInputError(
            f"{manifest_location(location, split)} does not exist: not a token cache of split "
            f"{split!r} (build it with `ltdist features cache --config CONFIG`)"
        )
    diff = mismatch(found, wanted)
    if diff is not None:
        name, a, b = diff
        why = f": {_WHY[name]}" if name in _WHY else ""
        raise InputError(
            f"the token cache {location} ({split}) was built with {name}={a!r}, this run has "
            f"{name}={b!r}{why}. Rebuild it (`ltdist features cache --config CONFIG --out "
            "ANOTHER_DIR`, or remove it) or set data.token_cache to a matching cache"
        )


def complete_index(location: str, split: str) -> ShardIndex | None:
    """The cache's index when every shard is written, else None (absent or partial)."""
    if not storage.exists(storage.join(location, f"{split}.index.json")):
        return None
    index = load_index(location, split)
    return index if index.complete else None


def encode_tokens(tokens: torch.Tensor, dtype: CacheDtype) -> bytes:
    """(views, N, D) float tensor -> raw little-endian bytes in ``dtype``."""
    bits = tokens.to(TORCH_DTYPES[dtype]).contiguous().view(torch.int16).cpu().numpy()
    return bits.astype("<i2", copy=False).tobytes()


def decode_tokens(data: bytes, shape: tuple[int, ...], dtype: CacheDtype, key: str) -> torch.Tensor:
    """Raw bytes -> a tensor of ``shape`` in ``dtype`` (no copy beyond the one out of ``data``)."""
    expected = int(np.prod(shape)) * 2
    if len(data) != expected:
        raise InputError(
            f"sample {key}: {len(data)} token bytes, the manifest's shape {shape} needs {expected}"
        )
    bits = np.frombuffer(data, dtype="<i2").astype(np.int16).reshape(shape)
    return torch.from_numpy(bits).view(TORCH_DTYPES[dtype])


def size_estimate(num_samples: int, views: int, num_tokens: int, token_dim: int) -> str:
    """What the cache will take, written out: samples x views x tokens x width x 2 bytes."""
    per = views * num_tokens * token_dim * 2
    total = num_samples * per
    return (
        f"{num_samples} samples x {views} view(s) x {num_tokens} tokens x {token_dim} x 2 bytes "
        f"= {per / 1e6:.3f} MB per sample, {_size(total)} in all"
    )


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"

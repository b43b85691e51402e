"""A frozen token source's tokens computed once: building a token cache, and opening one for a
training run (the format: ``ltdist.data.token_cache``).

DP-VLPA keeps its CLIP tower frozen in both phases, and the cprfl task's heads can read a frozen
CLIP tower or frozen pretrained Q-Former tokens (``model.backbone.freeze``): the output of such a
source for an image under the deterministic (test-form) transform never changes, so computing
it every step of every epoch is wasted work. A task names that source
(``task.frozen_token_source()``: the module whose ``tokens(images)`` are cached, or None).
``build_token_cache`` runs the source over a split once, on every rank (rank r takes
the shards k with k % world == r: no collective, so ranks only share the index lock), writing
each shard with an atomic publish, so a killed build resumes with the shards not yet in the
index and writes each sample exactly once. Shards are batched on their own, independent of
the rank that computes them, so a cache built on N ranks is byte-identical to one built on 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ltdist import storage
from ltdist.data.loader import augment_rng, decode_image, image_transform
from ltdist.data.shards import ShardSample, ShardWriter, load_index, read_shard
from ltdist.data.token_cache import (
    AUTO,
    TokenManifest,
    cache_location,
    check_manifest,
    complete_index,
    encode_tokens,
    manifest_location,
    read_manifest,
    shards_digest,
    size_estimate,
)
from ltdist.entry import InputError
from ltdist.labels import CLASSES_FILE
from ltdist.models.clip import resolved_clip_config
from ltdist.provenance import package_versions
from ltdist.train.config import TrainConfig

log = logging.getLogger(__name__)

# model.clip fields that do not change the tokens (where weights are kept, the text side)
_NOT_TOKENS = ("model_name", "pretrained", "image_size", "cache_dir", "freeze_text")


def uses_token_cache(cfg: TrainConfig) -> bool:
    """Whether a run reads cached tokens (its frozen source never runs in training steps)."""
    return bool(cfg.data.token_cache)


def frozen_source(task: nn.Module) -> nn.Module:
    """The task's frozen token source, or a clear error when none of it is frozen."""
    source = getattr(task, "frozen_token_source", lambda: None)()
    if source is None:
        raise InputError(
            "data.token_cache needs a frozen token source, and this model's trains (an "
            "init_from export whose CLIP tower is not frozen?): train from the images "
            "(data.token_cache='')"
        )
    return source


def source_kind(source: nn.Module) -> str:
    """The manifest's name for a source's kind."""
    from ltdist.models.backbones import QFormerTokens
    from ltdist.models.clip import ImageTower

    if isinstance(source, QFormerTokens):
        return "qformer"
    if isinstance(source, ImageTower):
        return "clip"
    raise TypeError(f"no token cache for a {type(source).__name__} token source")


def training_source(cfg: TrainConfig) -> nn.Module:
    """The frozen token source exactly as a training run of ``cfg`` builds it (same seed, the
    ``init_from`` export's weights on top), for a cache built outside the run."""
    from accelerate.utils import set_seed

    from ltdist.data.shards import load_label_space
    from ltdist.train.export import read_export_weights
    from ltdist.train.tasks import build_task

    set_seed(cfg.seed)  # as the loop seeds before building the task: a random tower matches
    task = build_task(cfg.task, cfg.model, load_label_space(cfg.data.location))
    if cfg.model.init_from:
        task.load_pretrained(read_export_weights(cfg.model.init_from))
    return frozen_source(task)


def weights_digest(source: nn.Module) -> str:
    """SHA-256 over a source's weights (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(source.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def expected_manifest(
    cfg: TrainConfig, source: nn.Module, split: str, dtype: str, views: int = 1
) -> TokenManifest:
    """The manifest of ``split``'s tokens under ``cfg`` (a resolved config: its loader's
    mean/std are the tower's) from ``source`` (the run's own, weights loaded)."""
    clip, loader = cfg.model.clip, cfg.loader
    prep = loader.clip_preprocess()
    index = load_index(cfg.data.location, split)
    return TokenManifest(
        split=split,
        source=source_kind(source),
        model_name=clip.model_name,
        pretrained=clip.pretrained,
        image_size=loader.image_size,
        transform=loader.transform,
        mean=list(prep.mean),
        std=list(prep.std),
        interpolation=prep.interpolation,
        resize_mode=prep.resize_mode,
        dtype=dtype,
        views=views,
        augment_seed=loader.seed if views > 1 else None,
        tower={
            k: v
            for k, v in sorted(vars(resolved_clip_config(clip)).items())
            if k not in _NOT_TOKENS and (clip.tiny or not k.startswith("tiny_"))
        },
        source_weights_sha256=weights_digest(source),
        num_tokens=int(source.num_tokens),
        token_dim=int(source.token_dim),
        image_shards_sha256=shards_digest(index),
        num_samples=index.num_samples,
        versions=package_versions(
            {"torch": ["torch"], "open_clip": ["open_clip_torch"], "ltdist": ["ltdist"]}
        ),
    )


@dataclass
class CacheBuild:
    """What one rank's ``build_token_cache`` did."""

    location: str
    split: str
    manifest: TokenManifest
    estimate: str  # the size, written out
    shards_written: list[int] = field(default_factory=list)
    shards_kept: int = 0  # this rank's shards found done (a resumed build)


def build_token_cache(
    cfg: TrainConfig,
    source: nn.Module,
    *,
    split: str = "",
    out: str = "",
    dtype: str = "",
    views: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    batch_size: int = 0,
    progress: bool = False,
    announce: Callable[[str], None] = log.info,
) -> CacheBuild:
    """Write ``split``'s tokens (default: the training split) from the frozen ``source`` to
    ``out`` (default: ``data.token_cache``, or ``<location>/tokens``): this rank's shards that
    are not written yet. ``announce`` receives the size estimate before any work starts."""
    split = split or cfg.data.train_split
    dtype = dtype or cfg.data.token_cache_dtype
    views = views or cfg.data.token_cache_views
    location = out or cache_location(cfg.data.location, cfg.data.token_cache or AUTO)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    if world_size > 1 and not storage.is_local(location):
        raise InputError(
            f"{location}: several ranks write a cache's index under a file lock, which an "
            "object store has not: build it on a shared file system, or with one process"
        )
    if any(p.requires_grad for p in source.parameters()):
        raise InputError(
            "a token cache needs a frozen token source (model.clip.freeze_image; "
            "model.backbone.freeze for Q-Former tokens)"
        )
    index = load_index(cfg.data.location, split)
    if not index.complete:
        raise InputError(
            f"{cfg.data.location}: split {split!r} is incomplete (missing shards "
            f"{index.missing()[:10]}): finish writing it before caching its tokens"
        )
    wanted = expected_manifest(cfg, source, split, dtype, views)
    estimate = size_estimate(index.num_samples, views, wanted.num_tokens, wanted.token_dim)
    announce(f"token cache {location} ({split}): {estimate}")
    if read_manifest(location, split) is None:  # every rank writes the same bytes, atomically
        storage.write_bytes_atomic(manifest_location(location, split), wanted.to_json())
    check_manifest(location, split, wanted)
    classes = storage.join(location, CLASSES_FILE)
    if not storage.exists(classes):
        storage.write_bytes_atomic(
            classes, storage.read_bytes(storage.join(cfg.data.location, CLASSES_FILE))
        )
    writer = ShardWriter(location, split, index.samples_per_shard, index.num_input)
    mine = [k for k in sorted(index.shards) if k % world_size == rank]
    todo = [k for k in mine if k not in writer.done()]
    result = CacheBuild(location, split, wanted, estimate, shards_kept=len(mine) - len(todo))
    # one view: the test form; K views: the training form with the draws of epochs 0..K-1
    prep = image_transform(
        cfg.loader.transform,
        cfg.loader.image_size,
        augment=views > 1,
        preprocess=cfg.loader.clip_preprocess(),
    )
    batch = batch_size or cfg.data.eval_batch_size
    device = torch.device(device)
    autocast = (
        torch.autocast(
            device.type, dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16
        )
        if cfg.mixed_precision in ("bf16", "fp16")
        else contextlib.nullcontext()
    )
    from tqdm import tqdm

    bar = tqdm(
        total=sum(index.shards[k].count for k in todo),
        desc=f"tokens rank {rank}",
        unit="img",
        disable=not progress,
    )
    source = source.to(device).eval()
    for k in todo:
        info = index.shards[k]
        samples = list(read_shard(storage.join(cfg.data.location, info.name), expected=info))
        out_samples = []
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            decoded = [decode_image(s) for s in chunk]
            per_view = []
            for v in range(views):
                draws = [augment_rng(cfg.loader.seed, v, s.key) for s in chunk]
                draws = draws if views > 1 else [None] * len(chunk)
                images = prep.normalize(
                    torch.stack([prep(img, rng) for img, rng in zip(decoded, draws, strict=True)])
                )
                with torch.no_grad(), autocast:
                    per_view.append(source.tokens(images.to(device)).float())  # (b, N, D)
            tokens = torch.stack(per_view, dim=1)  # (b, views, N, D)
            for s, t in zip(chunk, tokens, strict=True):
                data = encode_tokens(t, dtype)
                out_samples.append(ShardSample(s.key, s.meta, text=s.text, image_tokens=data))
            bar.update(len(chunk))
        writer.write_shard(k, out_samples, info.rejected, {"image_sha256": info.sha256})
        result.shards_written.append(k)
    bar.close()
    return result


def open_token_cache(
    cfg: TrainConfig,
    source: nn.Module,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    barrier: Callable[[], None] = lambda: None,
    split: str = "",
    views: int = 0,
) -> tuple[str, TokenManifest]:
    """The run's token cache of ``split`` (default: training) with ``views`` views (default:
    the config's; an evaluation split's: 1, the deterministic view), checked against its frozen
    token ``source`` and preprocessing; built first (each rank its shards, then ``barrier``)
    when missing or partial. Returns its location and manifest."""
    split = split or cfg.data.train_split
    location = cache_location(cfg.data.location, cfg.data.token_cache)
    views = views or cfg.data.token_cache_views
    wanted = expected_manifest(cfg, source, split, cfg.data.token_cache_dtype, views)
    if read_manifest(location, split) is not None:
        check_manifest(location, split, wanted)  # refuse before any work
    if complete_index(location, split) is None:
        build_token_cache(
            cfg,
            source,
            split=split,
            out=location,
            views=views,
            rank=rank,
            world_size=world_size,
            device=device,
            announce=log.warning if rank == 0 else log.debug,
        )
        barrier()
    check_manifest(location, split, wanted)
    if complete_index(location, split) is None:
        raise InputError(f"{location}: the token cache of {split!r} is still incomplete")
    if views > 1 and cfg.epochs > views:
        log.warning(
            "%d epochs from %d cached views: epoch e reads view e %% %d, so augmentations repeat "
            "from epoch %d (training from images draws new ones)",
            cfg.epochs,
            views,
            views,
            views,
        )
    return location, wanted

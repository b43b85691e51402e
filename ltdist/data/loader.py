"""Streaming training loader over the shards of one split, with an exact data position.

Exactness comes from a plan computed from the index alone (shard names and counts), before
any shard is opened:

- The sample stream S is the concatenation of passes; pass p lists the shards in an order
  shuffled with (seed, p) and each shard's samples in stored order.
- Steps per epoch = floor(N / global batch), the same on every rank (docs/design.md); epoch e is
  the stretch S[e*spe*G, (e+1)*spe*G), so the remainder rolls into the next epoch.
- Rank r reads a contiguous 1/world of that stretch (split by node) and its DataLoader
  workers read contiguous parts of the rank's stretch (split by worker). A shard boundary
  may fall inside a part: then the worker skips to its first sample, so fewer shards than
  workers is not a hang, only redundant reading (logged).
- The sample shuffle buffer is a window permutation: each worker cuts its part into windows
  of ``shuffle_buffer`` samples and permutes each with a seed of (seed, epoch, rank, worker,
  window). A saved position (epoch, step) therefore maps to a window and an offset, and a
  resumed worker starts reading at that window: shards consumed before it are never opened.
- Resampled mode draws shards with replacement per (rank, worker) for multi-node runs where
  an epoch is a set number of samples; resuming it with another world size is allowed.

Batches are formed inside the workers; the DataLoader interleaves workers round-robin, and a
resumed run rotates the workers so the interleaving continues where it stopped.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal, NamedTuple, get_args

import numpy as np
import torch
import torch.utils.data

from ltdist import storage
from ltdist.data.images import to_rgb
from ltdist.data.shards import (
    DigestingReader,
    ShardIntegrityError,
    ShardSample,
    decode_tar,
    load_index,
    load_label_space,
    read_split,
)
from ltdist.data.token_cache import TORCH_DTYPES, TokenManifest, decode_tokens
from ltdist.entry import InputError

log = logging.getLogger(__name__)

# OpenAI CLIP's normalisation constants (the CLIP image towers expect them).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Image preprocessing presets (LoaderConfig.transform); each has a training and a test form.
Transform = Literal["clip", "cprfl_official"]
Interpolation = Literal["bicubic", "bilinear"]
ResizeMode = Literal["shortest", "longest", "squash"]


@dataclass(frozen=True)
class ClipPreprocess:
    """The "clip" preset's resize and normalisation: what open_clip's preprocess config says
    for the image tower's model and tag (``ltdist.models.clip.clip_preprocess``). The defaults
    are OpenAI CLIP's (open_clip's own defaults, which the random and tiny towers keep).

    ``resize_mode``: "shortest" = short side to the size, centre crop; "squash" = both sides
    to the size, ignoring the aspect ratio; "longest" = long side to the size, centre pad
    with black."""

    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    interpolation: Interpolation = "bicubic"
    resize_mode: ResizeMode = "shortest"


@dataclass
class LoaderConfig:
    batch_size: int = 32  # per process
    num_workers: int = 2
    shuffle_buffer: int = 1000  # window size of the sample shuffle; <= 1 turns it off
    shuffle_shards: bool = True
    resampled: bool = False
    samples_per_epoch: int = 0  # global; required in resampled mode
    image_size: int = 224
    # Preprocessing preset, in training and at evaluation: "clip" (the CLIP tower's resize and
    # mean/std below) or "cprfl_official" (CPRFL's code: squash to image_size x image_size,
    # values in [0, 1], no mean/std). See image_transform.
    transform: Transform = "clip"
    # The "clip" preset's mean/std, interpolation and resize mode (ClipPreprocess). Left empty,
    # a training run fills them in from open_clip's preprocess config for the image tower's
    # model and tag (ltdist.train.resolve), and its checkpoints and export record them; empty
    # at load time (exports written before) = OpenAI CLIP's, short side, bicubic.
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    interpolation: Literal["", "bicubic", "bilinear"] = ""
    resize_mode: Literal["", "shortest", "longest", "squash"] = ""
    # The preset's training augmentation, seeded per sample and epoch: clip = random resized
    # crop + flip; cprfl_official = Cutout + RandAugment.
    augment: bool = False
    seed: int = 0
    prefetch_factor: int = 2
    # Check every shard's SHA-256 against the index as it streams (a swapped, edited or damaged
    # shard stops the run naming it); see benchmarks/loader_throughput.py for what it costs.
    verify: bool = True

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_workers < 0:
            raise ValueError("batch_size must be >= 1 and num_workers >= 0")
        if self.resampled and self.samples_per_epoch <= 0:
            raise ValueError("resampled mode needs samples_per_epoch > 0 (the epoch length)")
        if self.transform not in get_args(Transform):
            raise ValueError(
                f"loader.transform {self.transform!r} is not one of {get_args(Transform)}"
            )
        given = [k for k in ("mean", "std", "interpolation", "resize_mode") if getattr(self, k)]
        if given and self.transform != "clip":
            raise ValueError(
                f"loader.{given[0]} is a setting of loader.transform=clip; "
                f"{self.transform} has its own resize and no mean/std"
            )
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values and (len(values) != 3 or (key == "std" and min(values) <= 0)):
                raise ValueError(f"loader.{key} must be 3 values (R, G, B), std > 0: {values}")

    def clip_preprocess(self) -> ClipPreprocess:
        """The "clip" preset's settings: the ones given, OpenAI CLIP's for the rest."""
        given = {
            "mean": tuple(self.mean),
            "std": tuple(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }
        return ClipPreprocess(**{k: v for k, v in given.items() if v})


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) of one shard."""

    url: str
    start: int
    stop: int
    sha256: str = ""  # the shard's digest in the index: checked as it streams when set


class SamplePlan:
    """Maps positions of the sample stream to shard segments, from counts alone."""

    def __init__(
        self,
        urls: list[str],
        counts: list[int],
        cfg: LoaderConfig,
        world_size: int,
        digests: list[str] | None = None,
    ):
        self.urls, self.counts, self.cfg, self.world_size = urls, counts, cfg, world_size
        self.digests = digests if digests is not None and cfg.verify else [""] * len(urls)
        self.num_samples = sum(counts)
        global_batch = cfg.batch_size * world_size
        epoch_samples = cfg.samples_per_epoch if cfg.resampled else self.num_samples
        self.steps_per_epoch = epoch_samples // global_batch
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{epoch_samples} samples per epoch is less than one global batch "
                f"({cfg.batch_size} x {world_size} processes): lower the batch size"
            )

    def worker_batches(self, worker: int) -> tuple[int, int]:
        """(first batch index within the rank's epoch, number of batches) of a logical worker."""
        n_workers = max(1, self.cfg.num_workers)
        base, extra = divmod(self.steps_per_epoch, n_workers)
        first = worker * base + min(worker, extra)
        return first, base + (1 if worker < extra else 0)

    def worker_range(self, epoch: int, rank: int, worker: int) -> tuple[int, int]:
        """Stream positions [start, stop) that a logical worker reads in ``epoch``."""
        b = self.cfg.batch_size
        first, n = self.worker_batches(worker)
        if self.cfg.resampled:  # every (rank, worker) has a stream of its own
            start = (epoch * self.steps_per_epoch + first) * b
        else:
            start = (epoch * self.world_size + rank) * self.steps_per_epoch * b + first * b
        return start, start + n * b

    def segments(self, start: int, stop: int, rank: int, worker: int) -> Iterator[Segment]:
        """The shard segments that cover stream positions [start, stop)."""
        pos = start
        while pos < stop:
            order, offsets = self._block(pos, rank, worker)
            i = bisect.bisect_right(offsets, pos) - 1
            while i < len(order) and pos < stop:
                shard = order[i]
                lo, hi = pos - offsets[i], min(self.counts[shard], stop - offsets[i])
                yield Segment(self.urls[shard], lo, hi, self.digests[shard])
                pos = offsets[i] + hi
                i += 1

    def _block(self, pos: int, rank: int, worker: int) -> tuple[list[int], list[int]]:
        """The shard order of the pass (or resampled block) that holds ``pos``, and the
        stream position where each of its shards starts."""
        if self.cfg.resampled:
            # Each block is len(shards) draws with replacement; lengths vary, so walk blocks.
            block, start = 0, 0
            while True:
                rng = _rng(self.cfg.seed, "resample", rank, worker, block)
                order = rng.integers(0, len(self.urls), len(self.urls)).tolist()
                offsets = list(accumulate((self.counts[s] for s in order), initial=start))
                if pos < offsets[-1]:
                    return order, offsets[:-1]
                start, block = offsets[-1], block + 1
        p = pos // self.num_samples
        order = list(range(len(self.urls)))
        if self.cfg.shuffle_shards:
            order = _rng(self.cfg.seed, "pass", p).permutation(len(self.urls)).tolist()
        offsets = accumulate((self.counts[s] for s in order), initial=p * self.num_samples)
        return order, list(offsets)[:-1]


def _rng(*parts) -> np.random.Generator:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def augment_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The random draws of a sample's augmentation in ``epoch`` (a token cache's view ``v`` is
    the augmentation of epoch ``v``)."""
    return _rng(seed, "augment", epoch, key)


def read_range(
    plan: SamplePlan,
    start: int,
    stop: int,
    rank: int,
    worker: int,
    skip: frozenset[int] = frozenset(),
) -> Iterator[ShardSample | None]:
    """Stored samples at stream positions [start, stop), opening each shard segment once.

    Positions in ``skip`` (already consumed before a resume) yield None, and a segment made
    only of such positions is not opened at all.
    """
    pos = start
    for seg in plan.segments(start, stop, rank, worker):
        n = seg.stop - seg.start
        if all(p in skip for p in range(pos, pos + n)):
            yield from [None] * n
            pos += n
            continue
        seen = 0
        with storage.open_read(seg.url) as raw:
            # every segment reads its shard from the start, so each one can check it whole
            f = DigestingReader(raw, seg.url, seg.sha256) if seg.sha256 else raw
            for sample in decode_tar(f, seg.url):
                if seen >= seg.start:
                    yield None if pos in skip else sample
                    pos += 1
                seen += 1
                if seen == seg.stop:
                    break
            if seg.sha256:
                f.verify()
        if seen < seg.stop:
            raise ShardIntegrityError(
                f"{seg.url} holds {seen} samples, fewer than its index says: "
                "run `ltdist data stats` on the data set to verify it"
            )


class ClipTransform:
    """CLIP-style preprocessing without torchvision (it does not import in the generation env).

    Resize as ``preprocess.resize_mode`` says (default: the short side to ``image_size``,
    bicubic, centre crop) and return a uint8 (3, H, W) tensor; the collate step normalises
    whole batches with the preprocess's mean and std (:meth:`normalize`), which is cheaper than
    per image and sends 4x fewer bytes from the loader workers. With ``augment``, first a
    random resized crop (scale 0.5..1) and a horizontal flip drawn from the per-sample ``rng``,
    so that a resumed run is exact.
    """

    def __init__(
        self, image_size: int, augment: bool = False, preprocess: ClipPreprocess | None = None
    ):
        self.image_size, self.augment = image_size, augment
        self.preprocess = preprocess or ClipPreprocess()
        std = torch.tensor(self.preprocess.std).view(1, 3, 1, 1)
        self._scale = 1.0 / (255.0 * std)
        self._shift = -torch.tensor(self.preprocess.mean).view(1, 3, 1, 1) / std

    def __call__(self, img, rng: np.random.Generator | None = None):
        from PIL import Image

        size = self.image_size
        resample = Image.BICUBIC if self.preprocess.interpolation == "bicubic" else Image.BILINEAR
        img = to_rgb(img)
        w, h = img.size
        if self.augment and rng is not None:
            scale = rng.uniform(0.5, 1.0)
            cw, ch = max(1, int(w * math.sqrt(scale))), max(1, int(h * math.sqrt(scale)))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            img = img.crop((x0, y0, x0 + cw, y0 + ch))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            w, h = img.size
        mode = self.preprocess.resize_mode
        if mode == "squash":
            if img.size != (size, size):
                img = img.resize((size, size), resample)
        elif mode == "longest":  # open_clip's ResizeKeepRatio(longest=1) + CenterCropOrPad
            ratio = max(w, h) / size
            img = img.resize((round(w / ratio), round(h / ratio)), resample)
            canvas = Image.new("RGB", (size, size))
            canvas.paste(img, ((size - img.size[0]) // 2, (size - img.size[1]) // 2))
            img = canvas
        else:
            if min(w, h) != size:
                s = size / min(w, h)
                img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample)
            if img.size != (size, size):
                left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
                img = img.crop((left, top, left + size, top + size))
        return _uint8_chw(img)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std."""
        return images.float().mul_(self._scale).add_(self._shift)


class SquashTransform:
    """CPRFL's official preprocessing (its ImageList transforms), with per-sample seeds.

    Resize to ``image_size`` x ``image_size`` ignoring the aspect ratio (bilinear, as
    torchvision's ``Resize`` on a PIL image), so evaluation sees the whole image; with
    ``augment``, then Cutout (:func:`cutout`) and torchvision's ``RandAugment`` (2 ops,
    magnitude 9; the official code takes the ``randaugment`` package's), both drawn from the
    per-sample ``rng``. Returns uint8 (3, S, S); :meth:`normalize` only scales to [0, 1]
    (``ToTensor``), no mean/std: the official ResNet-101 sees unnormalised images.
    """

    def __init__(self, image_size: int, augment: bool = False):
        self.image_size, self.augment = image_size, augment
        self._rand_augment = None  # torchvision: the training environment only
        if augment:  # imported here, once, so that forked loader workers inherit it
            from torchvision.transforms import RandAugment

            self._rand_augment = RandAugment(num_ops=2, magnitude=9)

    def __call__(self, img, rng: np.random.Generator | None = None):
        from PIL import Image

        size = self.image_size
        img = to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        if self.augment and rng is not None:
            img = cutout(img, rng)
            img = self._augment(img, int(rng.integers(2**63)))
        return _uint8_chw(img)

    def _augment(self, img, seed: int):
        """RandAugment draws from torch's global RNG: seed it inside a fork, so the draws are
        the sample's and the caller's RNG stream is left as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._rand_augment(img)

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> float32 x / 255, ``ToTensor``'s scaling."""
        return images.float().div_(255.0)


def cutout(img, rng: np.random.Generator, factor: float = 0.5):
    """CPRFL's CutoutPIL (applied to every training image): a rectangle of ``factor`` x the
    width and height, centred on a uniformly drawn pixel and clipped at the borders, filled
    with one random colour."""
    from PIL import Image

    w, h = img.size
    cut_w, cut_h = int(factor * w + 0.5), int(factor * h + 0.5)
    cx, cy = int(rng.integers(w)), int(rng.integers(h))
    x1, x2 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, w)
    y1, y2 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, h)
    arr = np.array(img, dtype=np.uint8)
    arr[y1 : y2 + 1, x1 : x2 + 1] = rng.integers(0, 256, 3, dtype=np.uint8)  # corners inclusive
    return Image.fromarray(arr)


def image_transform(
    name: str, image_size: int, augment: bool = False, preprocess: ClipPreprocess | None = None
):
    """The preprocessing preset ``name`` (``LoaderConfig.transform``): with ``augment`` its
    training form, without it the test form that evaluation and prediction use. ``preprocess``
    is the "clip" preset's resize and mean/std (``LoaderConfig.clip_preprocess()``)."""
    if name == "clip":
        return ClipTransform(image_size, augment, preprocess)
    if name == "cprfl_official":
        return SquashTransform(image_size, augment)
    raise ValueError(f"loader.transform {name!r} is not one of {get_args(Transform)}")


def _uint8_chw(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


_OPENAI = ClipTransform(1)


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std with OpenAI CLIP's mean and std."""
    return _OPENAI.normalize(images)


class _EpochStream(torch.utils.data.IterableDataset):
    """The IterableDataset that one DataLoader runs for one epoch from one position."""

    def __init__(self, loader: ShardLoader, epoch: int, step: int):
        self.loader, self.epoch, self.step = loader, epoch, step

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        n_workers = max(1, self.loader.cfg.num_workers)
        physical = info.id if info is not None else 0
        if info is None:  # in-process: play every logical worker in the interleaved order
            yield from self._interleaved(n_workers)
            return
        # Rotate so that the DataLoader's round-robin resumes with the worker due next.
        yield from self._worker(self.epoch, (physical + self.step) % n_workers, self.step)

    def _interleaved(self, n_workers: int):
        streams = [self._worker(self.epoch, w, self.step) for w in range(n_workers)]
        w = self.step % n_workers
        active = set(range(n_workers))
        while active:
            if w in active:
                try:
                    yield next(streams[w])
                except StopIteration:
                    active.discard(w)
            w = (w + 1) % n_workers

    def _worker(self, epoch: int, worker: int, step: int):
        ld = self.loader
        plan, cfg = ld.plan, ld.cfg
        n_workers = max(1, cfg.num_workers)
        _, n_batches = plan.worker_batches(worker)
        done = step // n_workers + (1 if worker < step % n_workers else 0)
        done = min(done, n_batches)
        start, stop = plan.worker_range(epoch, ld.rank, worker)
        window = max(1, cfg.shuffle_buffer)
        consumed = done * cfg.batch_size
        t = consumed // window  # the window holding the next sample
        pos = start + t * window
        skip = consumed - t * window  # outputs of that window already consumed
        perm = self._perm(epoch, worker, t, min(window, stop - pos))
        stream = read_range(
            plan, pos, stop, ld.rank, worker, frozenset(pos + int(i) for i in perm[:skip])
        )
        batch: list = []
        while pos < stop:
            size = min(window, stop - pos)
            samples = [next(stream) for _ in range(size)]
            for i in perm[skip:]:
                batch.append(ld.prepare(samples[i], epoch))
                if len(batch) == cfg.batch_size:
                    yield ld.collate(batch)
                    batch = []
            pos, t, skip = pos + size, t + 1, 0
            perm = self._perm(epoch, worker, t, min(window, stop - pos))

    def _perm(self, epoch: int, worker: int, t: int, size: int) -> np.ndarray:
        """Output order of window ``t``: a seeded permutation (identity without shuffling)."""
        if self.loader.cfg.shuffle_buffer <= 1 or size <= 0:
            return np.arange(max(size, 0))
        return _rng(self.loader.cfg.seed, "window", epoch, self.loader.rank, worker, t).permutation(
            size
        )


class ShardLoader:
    """Batches of one split for one process, resumable at the exact next batch.

    Iterating yields dicts: ``image`` (B, 3, H, W) float, ``labels`` (B, C) multi-hot float,
    ``key`` and ``text`` lists, and ``tokens`` when a tokenizer is given; from a token cache
    ``image_tokens`` (B, N, D) instead of ``image``. ``state_dict()`` is
    the position of the next batch; ``load_state_dict`` restores it.
    """

    def __init__(
        self,
        location: str,
        split: str,
        cfg: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        # (PIL image, rng | None) -> uint8 or float tensor; uint8 batches go through its
        # ``normalize`` (CLIP's for a transform without one). Default: cfg's preset.
        transform: Callable | None = None,
        tokenizer: Callable[[list[str]], object] | None = None,
        decode_images: bool = True,
        # ``location`` is a token cache (ltdist.data.token_cache) with this manifest: batches
        # carry ``image_tokens`` (B, N, D) in the cache's dtype instead of ``image``
        token_cache: TokenManifest | None = None,
    ):
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.location, self.split, self.cfg = location, split, cfg
        self.rank, self.world_size = rank, world_size
        self.label_space = load_label_space(location)
        index = load_index(location, split)
        if not index.complete:
            raise InputError(
                f"{location}: split {split!r} is incomplete "
                f"(missing shards {index.missing()[:10]}); "
                "finish writing it (rerun the pack or generation job) before training"
            )
        shards = [s for s in index.ordered() if s.count > 0]
        urls = [storage.join(location, s.name) for s in shards]
        counts = [s.count for s in shards]
        self.fingerprint = hashlib.sha256(
            repr([(s.name, s.count, s.sha256) for s in shards]).encode()
        ).hexdigest()[:16]
        self.plan = SamplePlan(urls, counts, cfg, world_size, [s.sha256 for s in shards])
        readers = world_size * max(1, cfg.num_workers)
        if not cfg.resampled and len(urls) < readers:
            log.warning(
                "%s/%s has %d shards for %d readers (%d processes x %d workers): shards are "
                "split inside, so some are read by several workers; write more, smaller shards",
                location,
                split,
                len(urls),
                readers,
                world_size,
                max(1, cfg.num_workers),
            )
        self.transform = transform or image_transform(
            cfg.transform, cfg.image_size, cfg.augment, cfg.clip_preprocess()
        )
        self.normalize = getattr(self.transform, "normalize", clip_normalize)
        self.tokenizer = tokenizer
        self.decode_images = decode_images
        self.token_cache = token_cache
        self.epoch, self.step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    def prepare(self, sample: ShardSample, epoch: int) -> dict:
        """Decode and transform one sample (runs in the loader workers)."""
        item = {"key": sample.key, "label_ids": sample.label_ids, "text": sample.text or ""}
        if self.token_cache is not None:
            item["image_tokens"] = cached_tokens(sample, self.token_cache, epoch)
        elif self.decode_images:
            rng = augment_rng(self.cfg.seed, epoch, sample.key) if self.cfg.augment else None
            item["image"] = self.transform(decode_image(sample), rng)
        return item

    def collate(self, items: list[dict]) -> dict:
        labels = torch.zeros(len(items), self.label_space.num_classes)
        for i, it in enumerate(items):
            labels[i, it["label_ids"]] = 1.0
        batch = {
            "key": [it["key"] for it in items],
            "text": [it["text"] for it in items],
            "labels": labels,
        }
        if self.token_cache is not None:
            batch["image_tokens"] = torch.stack([it["image_tokens"] for it in items])
        elif self.decode_images:
            images = torch.stack([it["image"] for it in items])
            batch["image"] = self.normalize(images) if images.dtype == torch.uint8 else images
        if self.tokenizer is not None:
            batch["tokens"] = self.tokenizer(batch["text"])
        return batch

    def __iter__(self) -> Iterator[dict]:
        """Batches from the current position to the end of the current epoch."""
        epoch, start = self.epoch, self.step
        stream = _EpochStream(self, epoch, start)
        if self.cfg.num_workers > 0:
            # Its own generator: a DataLoader draws its workers' base seed from torch's global
            # RNG otherwise, which is the model's (dropout): a resumed run, whose loader starts
            # at another point of that stream than the straight run's, would draw other masks.
            # The data's randomness is seeded per sample (_rng), so the base seed is unused.
            base = int(_rng(self.cfg.seed, "workers", epoch, self.rank).integers(2**62))
            batches = torch.utils.data.DataLoader(
                stream,
                batch_size=None,
                num_workers=self.cfg.num_workers,
                prefetch_factor=self.cfg.prefetch_factor,
                generator=torch.Generator().manual_seed(base),
            )
        else:
            batches = stream
        produced = start
        for batch in batches:
            produced += 1
            self.step = produced
            yield batch
        if produced != self.steps_per_epoch:
            raise RuntimeError(
                f"epoch {epoch} produced {produced} batches, planned {self.steps_per_epoch}"
            )
        self.epoch, self.step = epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "batch_size": self.cfg.batch_size,
            "resampled": self.cfg.resampled,
            "fingerprint": self.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise InputError(
                "the saved data position belongs to other shards (index fingerprint differs)"
            )
        same = all(
            state[k] == v
            for k, v in (
                ("world_size", self.world_size),
                ("num_workers", self.cfg.num_workers),
                ("batch_size", self.cfg.batch_size),
            )
        )
        if not same and not self.cfg.resampled:
            raise InputError(
                f"cannot resume exactly: saved with world_size={state['world_size']}, "
                f"num_workers={state['num_workers']}, batch_size={state['batch_size']}; now "
                f"{self.world_size}, {self.cfg.num_workers}, {self.cfg.batch_size}. Resume with "
                "the same layout, or train in resampled mode (loader.resampled=true)"
            )
        self.epoch = int(state["epoch"])
        self.step = int(state["step"]) if same else 0
        if self.step > self.steps_per_epoch:
            raise InputError(
                f"saved step {self.step} beyond {self.steps_per_epoch} steps per epoch"
            )


def cached_tokens(sample: ShardSample, manifest: TokenManifest, epoch: int) -> torch.Tensor:
    """A token cache sample's tokens (N, D) for ``epoch``: view ``epoch % views``."""
    if sample.image_tokens is None:
        raise ShardIntegrityError(
            f"sample {sample.key} has no tokens: not a token cache shard (data.token_cache)"
        )
    views = decode_tokens(sample.image_tokens, manifest.shape, manifest.dtype, sample.key)
    return views[epoch % manifest.views]


def decode_image(sample: ShardSample):
    """A sample's image as a loaded PIL image; a sample without one, or whose bytes do not
    decode, is an error naming its key."""
    from PIL import Image

    if sample.image is None:
        raise InputError(f"sample {sample.key} has no image (a text-only data set?)")
    try:
        img = Image.open(io.BytesIO(sample.image))
        img.load()
    except Exception as e:
        raise ShardIntegrityError(f"sample {sample.key}: image does not decode ({e})") from e
    return img


class EvalBatch(NamedTuple):
    """One evaluation batch of one rank: ``index`` gives each row's position in the split's
    stored order; a ``padded`` batch is a stand-in that keeps the ranks in lockstep (score it,
    drop the scores). Read from a token cache, it has ``tokens`` and no ``images``."""

    images: torch.Tensor | None  # (B, 3, S, S), normalised as the preprocessing preset says
    targets: torch.Tensor  # (B, C) multi-hot
    keys: list[str]
    index: list[int]
    padded: bool = False
    tokens: torch.Tensor | None = None  # (B, N, D) in the cache's dtype


def eval_batches(
    location: str,
    split: str,
    batch_size: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
    limit: int = 0,
    transform: str = "clip",
    preprocess: ClipPreprocess | None = None,
    token_cache: TokenManifest | None = None,
) -> Iterator[EvalBatch]:
    """The one reader of a split for evaluation: every sample exactly once (the first ``limit``
    with ``limit``), in stored order, from a complete split whose shards are verified, through
    the test form of the preprocessing preset ``transform`` with ``preprocess`` (the training
    run's: ``LoaderConfig.clip_preprocess()``); or, with ``token_cache`` (``location`` is then
    a token cache with this manifest, of one deterministic view), the cached tokens.

    Batches go to the ranks round-robin and every rank gets the same number of them (the last
    ones padded), so the forward passes stay in lockstep as ZeRO-3 needs; one rank
    (``world_size=1``) gets them all. The last real batch may be short.
    """
    if token_cache is not None and token_cache.views != 1:
        raise InputError(
            f"{location}: the token cache of {split!r} holds {token_cache.views} augmented views; "
            "evaluation reads the deterministic view (a cache of one view)"
        )
    space = load_label_space(location)
    prep = image_transform(transform, image_size, preprocess=preprocess)
    total = load_index(location, split).num_samples
    total = min(total, limit) if limit else total
    if total == 0:
        raise InputError(f"{location}: split {split!r} has no samples to evaluate")
    per_round = batch_size * world_size
    rounds = math.ceil(math.ceil(total / batch_size) / world_size)
    samples = read_split(location, split)
    for r in range(rounds):
        inputs, rows, keys, index = [], [], [], []  # inputs: images, or cached tokens
        for n in range(r * per_round, min(total, (r + 1) * per_round)):
            sample = next(samples, None)
            if sample is None:  # read_split verifies each shard; this is a belt and braces
                raise ShardIntegrityError(
                    f"{location}: split {split!r} holds {n} samples, its index {total}"
                )
            if (n // batch_size) % world_size != rank:
                continue
            if token_cache is not None:
                inputs.append(cached_tokens(sample, token_cache, 0))
            else:
                inputs.append(prep(decode_image(sample)))
            row = torch.zeros(space.num_classes)
            row[sample.label_ids] = 1.0
            rows.append(row)
            keys.append(sample.key)
            index.append(n)
        padded = not inputs  # this rank has no batch in the last round: a stand-in
        targets = torch.stack(rows) if rows else torch.zeros(1, space.num_classes)
        if token_cache is not None:
            blank = torch.zeros(token_cache.shape[1:], dtype=TORCH_DTYPES[token_cache.dtype])
            tokens = torch.stack(inputs) if inputs else blank[None]
            yield EvalBatch(None, targets, keys, index, padded, tokens=tokens)
        else:
            blank = torch.zeros(3, image_size, image_size, dtype=torch.uint8)
            images = torch.stack(inputs) if inputs else blank[None]
            yield EvalBatch(prep.normalize(images), targets, keys, index, padded)

"""``ltdist data pack``: records (a manifest, a benchmark split, the demo set) -> shards.

Every input record is accounted for: it is written, or listed in its shard's index entry with
the reason (missing or unreadable image) under the ``skip`` policy; the ``error`` policy stops
at the first bad record and names it. A rerun writes only the shards the index lacks.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Literal

from ltdist import storage
from ltdist.data.images import to_rgb
from ltdist.data.manifest import Record
from ltdist.data.shards import ShardSample, ShardWriter, sample_meta
from ltdist.data.stratify import carve_records
from ltdist.entry import UserError
from ltdist.labels import CLASSES_FILE, LabelSpace

log = logging.getLogger(__name__)

_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class ImageError(UserError, ValueError):
    """An image that is missing or does not decode."""


class PackError(UserError, ValueError):
    """A record that stops the run under the ``error`` policy."""


@dataclass
class PackResult:
    split: str
    location: str
    num_input: int
    num_written: int
    rejected: list[dict] = field(default_factory=list)
    shards_written: list[int] = field(default_factory=list)
    shards_kept: int = 0
    shards_redone: list[int] = field(default_factory=list)  # written again: the input changed


# Decoding cost is pixels, not bytes: a 12,000 x 12,000 PNG of 17 KB takes 1.2 GB and 5 s to
# decode, in every epoch. COCO's images are ~0.3 MP; 40 MP leaves room for any photograph.
MAX_PIXELS = 40_000_000


def load_image(path: str, max_size: int = 0, max_pixels: int = MAX_PIXELS) -> tuple[bytes, str]:
    """Image bytes and extension; re-encoded only for other formats or when ``max_size`` asks.
    An image of more than ``max_pixels`` is refused before it is decoded."""
    from PIL import Image

    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {path}") from None
    except storage.UntrustedLocationError as e:
        raise ImageError(f"image path is not a file: {e}") from None
    except OSError as e:
        raise ImageError(f"image file unreadable: {path} ({e})") from None
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format
            w, h = img.size  # from the header: nothing decoded yet
            if max_pixels and w * h > max_pixels:
                raise ImageError(
                    f"image of {w} x {h} = {w * h:,} pixels is over the limit of {max_pixels:,} "
                    f"(max_pixels): {path}; downscale it before packing"
                )
            img.load()  # a full decode: truncated files fail here, not in training
            too_big = max_size > 0 and max(img.size) > max_size
            if fmt in _PIL_EXT and not too_big:
                return data, _PIL_EXT[fmt]
            if too_big:
                img.thumbnail((max_size, max_size), Image.BICUBIC)
            out_fmt = "JPEG" if fmt == "JPEG" else "PNG"
            buf = io.BytesIO()
            to_rgb(img).save(buf, format=out_fmt, quality=95)
            return buf.getvalue(), _PIL_EXT[out_fmt]
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(f"image does not decode: {path} ({type(e).__name__}: {e})") from None


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a batch scheduler narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# A pool takes about a second to start (each worker imports ltdist): below this many images
# per worker a parallel run would be slower than a serial one, so the split is packed serially.
MIN_IMAGES_PER_WORKER = 64

NO_IMAGE = "record has no image path (use text_only for such data sets)"


def _load_or_reason(path: str | None, max_size: int) -> tuple[bytes, str] | str:
    """``load_image``'s answer as a plain value a worker process returns: (bytes, ext), or the
    reason the image is rejected (the same text in a serial and a parallel run)."""
    if path is None:
        return NO_IMAGE
    try:
        return load_image(path, max_size)
    except ImageError as e:
        return str(e)


def _load_batch(paths: list[str | None], max_size: int) -> list[tuple[bytes, str] | str]:
    return [_load_or_reason(p, max_size) for p in paths]


def loaded_images(
    paths: list[str | None], max_size: int, workers: int, batch: int = 8
) -> Iterator[tuple[bytes, str] | str]:
    """``_load_or_reason`` of every path, in input order; with ``workers`` > 1 computed in a
    pool of processes (decoding is CPU-bound and holds the GIL). At most 2 x workers batches
    are in flight, so memory stays bounded on any data set; the order of the answers, hence
    every shard's bytes, does not depend on ``workers``. As with any start method but fork, a
    script that packs must keep its top-level code under ``if __name__ == "__main__":``."""
    if workers <= 1:
        for p in paths:
            yield _load_or_reason(p, max_size)
        return
    batches = (paths[i : i + batch] for i in range(0, len(paths), batch))
    # forkserver: workers are not forks of a process that may hold threads (tqdm, fsspec).
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending = deque(pool.submit(_load_batch, b, max_size) for b in islice(batches, 2 * workers))
        try:
            while pending:
                done = pending.popleft().result()
                nxt = next(batches, None)
                if nxt is not None:
                    pending.append(pool.submit(_load_batch, nxt, max_size))
                yield from done
        finally:  # a stop at a bad record (policy error): do not decode the rest
            for f in pending:
                f.cancel()


def samples_per_shard_for(records: list[Record], target_shard_mb: float) -> int:
    """Samples per shard for a target shard size, from the mean size of up to 1,000 images."""
    sizes = []
    for r in sorted(records, key=lambda r: r.key)[:1000]:
        if r.image and storage.is_local(r.image) and os.path.isfile(r.image):
            sizes.append(os.path.getsize(r.image))
    mean = (sum(sizes) / len(sizes) if sizes else 0) + 1024  # json, txt and tar headers
    return max(1, int(target_shard_mb * 2**20 // mean))


def write_classes(location: str, space: LabelSpace) -> None:
    """Write ``classes.json``; a folder that holds a different label space is an error."""
    path = storage.join(location, CLASSES_FILE)
    if storage.exists(path):
        if LabelSpace.load(path).to_dict() != space.to_dict():
            raise PackError(
                f"{path} holds a different label space: all splits of a data set share one "
                "classes.json from the training split; write to a fresh folder"
            )
        return
    storage.makedirs(location)
    space.save(path)


def input_digest(records: list[Record], settings: dict) -> str:
    """What a shard is made from: its records (key, labels, caption, the image file's path,
    size and modification time) and the settings that shape its bytes."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in records:
        stat = None
        if r.image and storage.is_local(r.image) and os.path.isfile(r.image):
            st = os.stat(r.image)
            stat = (st.st_size, st.st_mtime_ns)
        h.update(json.dumps([r.key, list(r.label_ids), r.caption, r.image, stat]).encode())
    return h.hexdigest()


def stale_shards(index, inputs: dict[int, str], split: str) -> list[int]:
    """Shards of the index whose input changed since they were written: to write again."""
    stale, unknown = [], []
    for k, info in sorted(index.shards.items()):
        made_from = info.meta.get("input")
        if made_from is None:
            unknown.append(k)
        elif made_from != inputs.get(k):
            stale.append(k)
    if unknown:
        log.warning(
            "%s: shards %s were written before shards recorded their input: kept as they are "
            "(remove the folder to rebuild them from the current input)",
            split,
            unknown[:10],
        )
    if stale:
        log.warning(
            "%s: the input of shards %s changed since they were written (records, image files "
            "or settings): writing them again",
            split,
            stale[:10],
        )
    return stale


def pack_split(
    records: list[Record],
    space: LabelSpace,
    location: str,
    split: str,
    samples_per_shard: int,
    *,
    policy: Literal["error", "skip"] = "error",
    text_only: bool = False,
    max_image_size: int = 0,
    progress: bool = True,
    workers: int = 1,
) -> PackResult:
    """Write the shards of one split that the index does not have yet; images are read,
    checked and re-encoded in ``workers`` processes (1: in this one), with identical bytes."""
    from tqdm import tqdm

    records = sorted(records, key=lambda r: r.key)
    writer = ShardWriter(location, split, samples_per_shard, len(records))
    settings = {"text_only": text_only, "max_image_size": max_image_size, "space": space.to_dict()}

    def chunk_of(k: int) -> list[Record]:
        return records[k * samples_per_shard : (k + 1) * samples_per_shard]

    inputs = {
        k: input_digest(chunk_of(k), settings) for k in range(writer.index.num_shards_planned)
    }
    stale = stale_shards(writer.index, inputs, split)
    done = writer.done() - set(stale)
    result = PackResult(split, location, len(records), 0, shards_kept=len(done))
    result.shards_redone = sorted(stale)
    todo = sorted(set(writer.index.missing()) | set(stale))
    bar = tqdm(total=len(records), desc=f"pack {split}", unit="img", disable=not progress)
    bar.update(
        sum(writer.index.shards[k].count + len(writer.index.shards[k].rejected) for k in done)
    )
    images = None
    if not text_only:
        paths = [r.image for k in todo for r in chunk_of(k)]
        workers = min(workers, len(paths) // MIN_IMAGES_PER_WORKER)
        images = loaded_images(paths, max_image_size, workers)
    try:
        for k in todo:
            chunk = chunk_of(k)
            samples, rejected = [], []
            for r in chunk:
                sample = ShardSample(r.key, sample_meta(r.label_ids, space, caption=r.caption))
                sample.text = r.caption
                if images is not None:
                    loaded = next(images)
                    if isinstance(loaded, str):
                        if policy == "error":
                            raise PackError(
                                f"{split} key {r.key!r} (manifest line {r.line}): {loaded}"
                            ) from None
                        rejected.append({"key": r.key, "reason": loaded})
                        continue
                    sample.image, sample.image_ext = loaded
                samples.append(sample)
            writer.write_shard(k, samples, rejected, meta={"input": inputs[k]})
            result.shards_written.append(k)
            bar.update(len(chunk))
    finally:  # stops the worker pool, also at a bad record under the error policy
        if images is not None:
            images.close()
    bar.close()
    index = writer.index
    result.num_written = index.num_samples
    result.rejected = [rej for info in index.ordered() for rej in info.rejected]
    if result.rejected:
        log.warning(
            "%s: %d of %d records rejected (listed in %s.index.json), e.g. %s",
            split,
            len(result.rejected),
            len(records),
            split,
            result.rejected[0],
        )
    return result


@dataclass
class PackConfig:
    """What ``ltdist data pack`` reads and where it writes."""

    out: str = "shards/demo"
    source: Literal["manifest", "benchmark"] = "manifest"
    classes: str = ""  # manifest source: classes.txt (one name per line) or classes.json
    # train: frequencies and groups counted on the manifest's train split; classes: the
    # classes.json as it is (a corpus packed in a benchmark's label space keeps its tails)
    space_from: Literal["train", "classes"] = "train"
    manifests: dict[str, str] = field(default_factory=dict)  # split -> manifest; needs 'train'
    benchmark: str = ""  # benchmark source: coco_lt | voc_lt
    splits_dir: str = "data/splits"  # where `ltdist data fetch-splits` put the split files
    image_root: str = ""  # benchmark: the COCO 2017 / VOC root; manifest: overrides its folder
    policy: Literal["error", "skip"] = "error"
    samples_per_shard: int = 0  # 0: derived from target_shard_mb
    target_shard_mb: float = 256.0
    text_only: bool = False  # shards without images (labels + captions only)
    max_image_size: int = 0  # > 0: downscale larger images (re-encoded)
    # > 0: carve this share of the train split into a `val` split (ltdist.data.stratify:
    # stratified, every class keeps a training positive), seeded by val_seed.
    val_fraction: float = 0.0
    val_seed: int = 0
    # Which train split classes.json describes when val is carved: "full" (as given; for the
    # benchmarks the published head/medium/tail groups) or "carved" (what training sees).
    classes_from: Literal["full", "carved"] = "full"
    # Processes that read, check and re-encode images; 0: the cores this process may use.
    # The shards are byte-identical for every value (benchmarks/pack_throughput.py).
    workers: int = 0

    def validate(self) -> None:
        if self.source == "manifest" and ("train" not in self.manifests or not self.classes):
            raise ValueError("manifest source needs `classes` and a `manifests.train` path")
        if self.space_from == "classes" and not self.classes.endswith(".json"):
            raise ValueError("space_from: classes needs `classes` to be a classes.json")
        if self.source == "benchmark" and not self.benchmark:
            raise ValueError("benchmark source needs `benchmark` (coco_lt or voc_lt)")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_fraction > 0 and "val" in self.manifests:
            raise ValueError("val_fraction carves a `val` split, but `manifests.val` is given too")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: every available core), got {self.workers}")


def load_records(cfg: PackConfig) -> tuple[LabelSpace, dict[str, list[Record]], list]:
    """Label space (from the training split) and the records of every split."""
    from ltdist.data import manifest
    from ltdist.data import splits as benchmark_splits

    problems = []
    if cfg.source == "benchmark":
        root = cfg.image_root or None
        names = benchmark_splits.class_names(cfg.benchmark, cfg.splits_dir)
        splits = {
            s: benchmark_splits.load_split_records(cfg.benchmark, cfg.splits_dir, s, root)
            for s in benchmark_splits.SPLITS
        }
    else:
        names = manifest.read_class_names(cfg.classes)
        splits = {}
        for split, path in cfg.manifests.items():
            m = manifest.read_manifest(
                path,
                names,
                image_root=cfg.image_root or None,
                policy=cfg.policy,
                check_files=not cfg.text_only,
                allow_empty_labels=split != "train",
            )
            splits[split] = m.records
            problems += [
                {"split": split, "line": p.line, "key": p.key, "reason": p.reason}
                for p in m.problems
            ]
    full_train = splits["train"]
    if cfg.val_fraction > 0:
        splits["train"], splits["val"], carve = carve_records(
            full_train, len(names), cfg.val_fraction, cfg.val_seed
        )
        lacking = carve.lacking()
        log.info(
            "val: %d of %d training images carved out (seed %d)%s",
            len(splits["val"]),
            len(full_train),
            cfg.val_seed,
            f"; {len(lacking)} classes have no val positive: {[names[c] for c in lacking]}"
            if lacking
            else "",
        )
    if cfg.space_from == "classes":  # a given classes.json (the benchmark's, for a corpus)
        space = LabelSpace.load(cfg.classes)
    else:
        described = full_train if cfg.classes_from == "full" else splits["train"]
        space = LabelSpace.from_label_sets(names, (r.label_ids for r in described))
    return space, splits, problems


def pack_dataset(cfg: PackConfig, progress: bool = True) -> dict[str, PackResult]:
    """Pack every split of a data set into ``cfg.out`` with one shared ``classes.json``."""
    space, splits, problems = load_records(cfg)
    write_classes(cfg.out, space)
    if problems:
        storage.write_bytes_atomic(
            storage.join(cfg.out, "manifest_problems.json"), json.dumps(problems, indent=1).encode()
        )
    results = {}
    for split, records in splits.items():
        s = cfg.samples_per_shard or samples_per_shard_for(records, cfg.target_shard_mb)
        results[split] = pack_split(
            records,
            space,
            cfg.out,
            split,
            s,
            policy=cfg.policy,
            text_only=cfg.text_only,
            max_image_size=cfg.max_image_size,
            progress=progress,
            workers=cfg.workers or available_cores(),
        )
    return results

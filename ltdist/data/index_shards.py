"""``ltdist data index``: existing WebDataset shards -> a data set folder of the shard contract.

The user's tars (a brace URL such as ``data/shard-{000000..000099}.tar``, a glob, a folder or
one file) are read twice: a scan of the label and text members (image payloads are skipped)
gives the sample count, the keys and the label sets, hence ``classes.json`` and the plan; the
second pass copies the samples into contract shards ``<split>-NNNNNN.tar`` through the same
``ShardWriter`` that ``ltdist data pack`` uses. Image bytes are copied as they are (never
decoded or re-encoded: only the header is read, for the format and the pixel limit); the
``json`` member becomes the contract's record, ``txt`` the caption.

Why copies, not the user's files under an index: the index may only name contract shards inside
the folder (a rule that keeps an index from pointing a reader anywhere else), links do not
exist on object stores, and the loader reads the contract's ``json`` (``label_ids``), which
third-party shards rarely hold. A copy costs disk once; the folder then verifies, resumes and
trains like any packed one.

Labels, per sample, first found wins:
- a ``json`` member with ``label_ids`` (ints; with ``labels`` beside them, the names must match)
  or ``labels`` (a list of class names, or of ids);
- a ``cls`` member: one id or several (``3``, ``3 17``, ``3,17`` or ``[3, 17]``).
Class names come from ``--classes`` (classes.txt or classes.json), else from the data (ids with
names, or names alone: sorted); ids alone need ``--classes``. Other splits use the folder's
``classes.json``, written when the training split was indexed.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from ltdist import storage
from ltdist.data.manifest import read_class_names
from ltdist.data.pack import _PIL_EXT, MAX_PIXELS, stale_shards, write_classes
from ltdist.data.shards import _SPLIT_RE, ShardSample, ShardWriter, key_problem, sample_meta
from ltdist.entry import InputError, MissingInputError
from ltdist.labels import CLASSES_FILE, LabelSpace, UnknownClassError

log = logging.getLogger(__name__)

_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
_TEXT_MEMBERS = ("json", "cls", "txt")


class SourceShardError(InputError):
    """A source shard that cannot be indexed: the message names the shard and the member."""


@dataclass
class IndexConfig:
    """What ``ltdist data index`` reads and where it writes."""

    source: str  # brace URL, glob, folder of .tar files, or one tar (local or fsspec URL)
    out: str  # the data set folder (contract shards, index and classes.json go here)
    split: str = "train"
    classes: str = ""  # classes.txt / classes.json; "" = the names found in the data
    samples_per_shard: int = 0  # 0: the largest source shard's sample count

    def validate(self) -> None:
        if self.samples_per_shard < 0:
            raise InputError(f"samples_per_shard must be >= 0, got {self.samples_per_shard}")
        if not _SPLIT_RE.match(self.split):
            raise InputError(f"split {self.split!r} is not a plain name (letters, digits, _.-)")


@dataclass
class SourceRow:
    """One sample as scanned: where it is, its contract key and what it is labelled."""

    source: int  # index into the source URL list
    raw_key: str
    key: str
    labels: list  # ids (int) or names (str)
    names: list[str] | None  # names given beside ids (ltdist json), to check
    caption: str | None


@dataclass
class IndexResult:
    split: str
    location: str
    sources: list[str]
    num_samples: int
    num_shards: int
    shards_written: list[int] = field(default_factory=list)
    shards_kept: int = 0
    dropped_members: dict[str, int] = field(default_factory=dict)


def source_urls(source: str) -> list[str]:
    """The source tars in order: a brace URL is expanded in its own order, a glob or a folder
    sorted by name. ``pipe:`` is refused: this command reads data, it runs nothing."""
    from braceexpand import braceexpand

    if storage.runs_program(source):
        raise InputError(
            f"refusing {source[:200]!r}: a 'pipe:' source runs a shell command; give the shard "
            "files' paths or fsspec URLs"
        )
    urls: list[str] = []
    for url in braceexpand(source):
        if not storage.is_local(url):
            urls.append(url)
            continue
        path = storage.local_path(url)
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.tar")))
            if not found:
                raise MissingInputError(f"{path}: a folder without .tar files")
            urls += found
        elif glob.has_magic(path):
            urls += sorted(p for p in glob.glob(path) if os.path.isfile(p))
        else:
            urls.append(path)
    if not urls:
        raise MissingInputError(f"{source}: matches no shard files")
    seen = Counter(urls)
    if dup := [u for u, n in seen.items() if n > 1]:
        raise InputError(f"{source}: names the same shard more than once: {dup[:5]}")
    for url in urls:
        if not storage.exists(url):
            raise MissingInputError(f"source shard {url} does not exist")
    return urls


def _split_name(name: str) -> tuple[str, str] | None:
    """WebDataset's member naming: the key runs to the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _samples(url: str, payload: bool, dropped: Counter) -> Iterator[tuple[str, dict]]:
    """(raw key, {ext: bytes}) per sample of one source tar, in stored order. Without
    ``payload`` image members map to None (their bytes are skipped, by a seek where the
    stream allows it)."""
    current, members = None, {}
    try:
        with storage.open_read(url) as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                parts = _split_name(info.name)
                if parts is None:
                    dropped[info.name.rpartition("/")[2]] += 1
                    continue
                key, ext = parts
                if key != current:
                    if current is not None:
                        yield current, members
                    current, members = key, {}
                if ext in members:
                    raise SourceShardError(f"{url}: member {info.name!r} appears twice in sample")
                if ext in _TEXT_MEMBERS or (payload and ext in _IMAGE_MEMBERS):
                    members[ext] = tar.extractfile(info).read()
                elif ext in _IMAGE_MEMBERS:
                    members[ext] = None
                else:
                    dropped[ext] += 1
            if current is not None:
                yield current, members
    except tarfile.TarError as e:
        raise SourceShardError(f"{url}: not a readable tar ({e})") from None


def contract_key(raw_key: str, url: str) -> str:
    """The contract's key of a source key: '/' and '.' become '_' (manifest.key_from_path)."""
    key = raw_key.removeprefix("./").replace("/", "_").replace(".", "_")
    if problem := key_problem(key):
        raise SourceShardError(f"{url}: sample {raw_key!r} cannot be a key: {problem}")
    return key


def _ints(values, where: str) -> list[int]:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise SourceShardError(
            f"{where}: expected a list of integer class ids, got {values!r:.200}"
        )
    return values


def parse_labels(members: dict, where: str) -> tuple[list, list[str] | None, str | None]:
    """(labels as ids or names, names given beside ids, caption) of one sample; ``where``
    names the shard and the key, and the message adds the member."""
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except (UnicodeDecodeError, ValueError) as e:
            raise SourceShardError(f"{where}.json: not JSON ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict):
            raise SourceShardError(
                f"{where}.json: expected a JSON object, got {type(meta).__name__}"
            )
    caption = meta.get("caption") if isinstance(meta.get("caption"), str) else None
    if caption is None and "txt" in members:
        try:
            caption = members["txt"].decode()
        except UnicodeDecodeError as e:
            raise SourceShardError(f"{where}.txt: not UTF-8 ({e})") from None
    if "label_ids" in meta:
        ids = _ints(meta["label_ids"], f"{where}.json label_ids")
        names = meta.get("labels")
        if names is not None and (
            not isinstance(names, list) or not all(isinstance(n, str) for n in names)
        ):
            raise SourceShardError(f"{where}.json labels: expected a list of class names")
        if names is not None and len(names) != len(ids):
            raise SourceShardError(f"{where}.json: {len(ids)} label_ids but {len(names)} labels")
        return ids, names, caption
    if "labels" in meta:
        labels = meta["labels"]
        if isinstance(labels, list) and all(isinstance(n, str) for n in labels):
            return labels, None, caption
        return _ints(labels, f"{where}.json labels"), None, caption
    if "cls" in members:
        text = members["cls"].decode(errors="replace").strip()
        try:
            ids = (
                json.loads(text)
                if text.startswith("[")
                else [int(t) for t in re.split(r"[\s,]+", text) if t]
            )
        except ValueError:
            raise SourceShardError(
                f"{where}.cls: {text[:100]!r} is not class ids (one integer, or several "
                "separated by spaces or commas, or a JSON list)"
            ) from None
        return _ints(ids, f"{where}.cls"), None, caption
    raise SourceShardError(
        f"{where}: no labels (members: {sorted(members)}); expected a json member with "
        "'label_ids' or 'labels', or a cls member"
    )


def scan(urls: list[str]) -> tuple[list[SourceRow], list[int], Counter]:
    """Every sample's key and labels, and the sample count per source shard."""
    rows, counts, dropped = [], [], Counter()
    first_seen: dict[str, str] = {}
    for i, url in enumerate(urls):
        n = 0
        for raw_key, members in _samples(url, payload=False, dropped=dropped):
            where = f"{url}: member {raw_key}"
            images = [e for e in members if e in _IMAGE_MEMBERS]
            if len(images) != 1:
                raise SourceShardError(
                    f"{url}: sample {raw_key!r} has {len(images)} image members "
                    f"(members: {sorted(members)}); one of {_IMAGE_MEMBERS} is needed"
                )
            key = contract_key(raw_key, url)
            if key in first_seen:
                raise SourceShardError(
                    f"{url}: key {key!r} (sample {raw_key!r}) is also in {first_seen[key]}: "
                    "keys must be unique in a data set"
                )
            first_seen[key] = url
            labels, names, caption = parse_labels(members, where)
            rows.append(SourceRow(i, raw_key, key, labels, names, caption))
            n += 1
        counts.append(n)
    return rows, counts, dropped


def class_names(cfg: IndexConfig, rows: list[SourceRow], urls: list[str]) -> list[str]:
    """The label space's names: the user's file, the folder's classes.json, or the data's."""
    if cfg.classes:
        return read_class_names(cfg.classes)
    existing = storage.join(cfg.out, CLASSES_FILE)
    if storage.exists(existing):
        return LabelSpace.load(existing).names
    if cfg.split != "train":
        raise InputError(
            f"{cfg.out} has no {CLASSES_FILE}: index the training split first (frequencies "
            "come from it), or give --classes"
        )
    by_id: dict[int, str] = {}
    found: set[str] = set()
    for r in rows:
        if r.names is not None:
            for i, name in zip(r.labels, r.names, strict=True):
                if by_id.setdefault(i, name) != name:
                    raise InputError(
                        f"{urls[r.source]}: sample {r.raw_key!r}: class id {i} is named "
                        f"{name!r} here and {by_id[i]!r} elsewhere; give the names with --classes"
                    )
        elif r.labels and isinstance(r.labels[0], str):
            found.update(r.labels)
        elif r.labels:
            raise InputError(
                f"{urls[r.source]}: sample {r.raw_key!r} is labelled with class ids only: give "
                "the class names with --classes (a classes.txt, one name per line in id order)"
            )
    if by_id and found:
        raise InputError("the data mixes ids with names and names alone: give --classes")
    if by_id:
        missing = [i for i in range(max(by_id) + 1) if i not in by_id]
        if missing or min(by_id) < 0:
            raise InputError(
                f"class ids {missing[:10]} never appear in the training split, so their names "
                "are unknown: give the names with --classes"
            )
        return [by_id[i] for i in range(len(by_id))]
    if not found:
        raise InputError("no sample of the training split carries a label: nothing to index")
    return sorted(found)


def resolve_ids(rows: list[SourceRow], names: list[str], urls: list[str]) -> list[list[int]]:
    """Each row's sorted label ids in the label space of ``names``."""
    lookup = LabelSpace.from_label_sets(names, [])
    out = []
    for r in rows:
        where = f"{urls[r.source]}: sample {r.raw_key!r}"
        if r.labels and isinstance(r.labels[0], str):
            try:
                ids = lookup.ids_of(r.labels)
            except UnknownClassError as e:
                raise SourceShardError(f"{where}: {e}") from None
        else:
            ids = sorted(set(r.labels))
            if ids and (ids[0] < 0 or ids[-1] >= len(names)):
                raise SourceShardError(f"{where}: class id out of range 0..{len(names) - 1}: {ids}")
            if r.names is not None and [names[i] for i in r.labels] != r.names:
                raise SourceShardError(
                    f"{where}: labels {r.names} do not name label_ids {r.labels} in the "
                    f"class list ({[names[i] for i in r.labels]})"
                )
        out.append(ids)
    return out


def image_ext(data: bytes, where: str) -> str:
    """The contract's extension of image bytes, from the header (nothing is decoded)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (w, h) = img.format, img.size
    except Exception as e:
        raise SourceShardError(f"{where}: not an image ({type(e).__name__}: {e})") from None
    if fmt not in _PIL_EXT:
        raise SourceShardError(f"{where}: a {fmt} image; the contract holds {sorted(_PIL_EXT)}")
    if w * h > MAX_PIXELS:
        raise SourceShardError(f"{where}: {w} x {h} pixels, over the limit of {MAX_PIXELS:,}")
    return _PIL_EXT[fmt]


def _stat(url: str) -> tuple[int, int] | None:
    if storage.is_local(url):
        st = os.stat(storage.local_path(url))
        return st.st_size, st.st_mtime_ns
    return None


def index_shards(cfg: IndexConfig) -> IndexResult:
    """Index (and copy into contract shards) one split of existing WebDataset shards."""
    cfg.validate()
    urls = source_urls(cfg.source)
    rows, counts, dropped = scan(urls)
    if not rows:
        raise InputError(f"{cfg.source}: the source shards hold no samples")
    if dropped:
        log.warning("members left out (not image, json, cls or txt): %s", dict(dropped))
    names = class_names(cfg, rows, urls)
    label_ids = resolve_ids(rows, names, urls)
    if cfg.split == "train":
        space = LabelSpace.from_label_sets(names, label_ids)
        write_classes(cfg.out, space)
    else:
        space = LabelSpace.load(storage.join(cfg.out, CLASSES_FILE))
        if space.names != names:
            raise InputError(f"--classes differs from {cfg.out}/{CLASSES_FILE}")

    per_shard = cfg.samples_per_shard or max(counts)
    writer = ShardWriter(cfg.out, cfg.split, per_shard, len(rows))
    settings = {"samples_per_shard": per_shard, "space": space.to_dict()}
    stats = [_stat(u) for u in urls]

    def digest(k: int) -> str:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        for r, ids in zip(
            rows[k * per_shard : (k + 1) * per_shard],
            label_ids[k * per_shard : (k + 1) * per_shard],
            strict=True,
        ):
            source = urls[r.source]
            h.update(json.dumps([r.key, ids, r.caption, source, stats[r.source]]).encode())
        return h.hexdigest()

    inputs = {k: digest(k) for k in range(writer.index.num_shards_planned)}
    stale = set(stale_shards(writer.index, inputs, cfg.split))
    todo = sorted(set(writer.index.missing()) | stale)
    result = IndexResult(
        cfg.split,
        cfg.out,
        urls,
        len(rows),
        writer.index.num_shards_planned,
        shards_kept=len(writer.done() - stale),
        dropped_members=dict(dropped),
    )
    wanted = {
        row for k in todo for row in range(k * per_shard, min(len(rows), (k + 1) * per_shard))
    }
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    samples: list[ShardSample] = []
    for i, url in enumerate(urls):
        if not any(row in wanted for row in range(starts[i], starts[i + 1])):
            continue  # nothing of this source is to be written: not read again
        row = starts[i]
        for raw_key, members in _samples(url, payload=True, dropped=Counter()):
            r = rows[row] if row < starts[i + 1] else None
            if r is None or r.raw_key != raw_key:
                raise SourceShardError(
                    f"{url} changed while it was indexed (at sample {raw_key!r})"
                )
            if row in wanted:
                image_member = next(e for e in members if e in _IMAGE_MEMBERS)
                data = members[image_member]
                ext = image_ext(data, f"{url}: member {raw_key}.{image_member}")
                record = sample_meta(label_ids[row], space, caption=r.caption)
                samples.append(ShardSample(r.key, record, data, ext, r.caption))
                k = row // per_shard
                if row + 1 == min(len(rows), (k + 1) * per_shard):
                    first = rows[k * per_shard].source
                    made_from = {"input": inputs[k], "source": urls[first : r.source + 1]}
                    writer.write_shard(k, samples, meta=made_from)
                    result.shards_written.append(k)
                    samples = []
            row += 1
        if row != starts[i + 1]:
            raise SourceShardError(f"{url} changed while it was indexed (fewer samples)")
    return result

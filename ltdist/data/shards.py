"""Writer and reader of the shard contract (docs/design.md): WebDataset tars plus an index.

A data set folder holds ``classes.json``, ``<split>-NNNNNN.tar`` and ``<split>.index.json``.
Shard k holds rows [k*S, (k+1)*S) of the key-sorted input, so a rerun knows from the index
alone which shards are done and writes exactly the missing ones. A shard is written under a
temporary name and published by an atomic rename (or a single object-store PUT); the index
is the source of truth, so a shard file that the index does not list is an orphan from a
killed run and is rewritten. Tars are byte-deterministic (fixed member order, mtime, owner),
so a rewritten shard is identical to the one a straight run would have written.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

from ltdist import storage
from ltdist.entry import InputError, MissingInputError
from ltdist.labels import CLASSES_FILE, LabelSpace

log = logging.getLogger(__name__)

INDEX_VERSION = 1
IMAGE_EXTS = ("jpg", "png", "webp")
# A token cache's member (visual tokens, raw little-endian 16-bit floats); at most 4 letters so
# that a key of MAX_KEY_LENGTH still fits a tar name.
TOKENS_EXT = "vtok"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# A tar member is "<key>.<ext>" in a USTAR name field of 100 bytes; the longest ext is 4.
MAX_KEY_LENGTH = 100 - len(".json")


def key_problem(key: str) -> str | None:
    """Why ``key`` cannot be a shard key, or None: the rule every writer and reader shares."""
    if not _KEY_RE.match(key):
        return (
            "a key may hold only letters, digits, '_' and '-' (WebDataset splits names at the "
            "first dot)"
        )
    if len(key) > MAX_KEY_LENGTH:
        return f"a key may be at most {MAX_KEY_LENGTH} characters (a tar name), not {len(key)}"
    return None


_SPLIT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class ShardSample:
    """One sample as stored: key, image bytes (None in text-only data sets), json, txt; a
    token cache's shard holds the frozen tower's tokens instead of the image
    (``ltdist.data.token_cache``)."""

    key: str
    meta: dict
    image: bytes | None = None
    image_ext: str | None = None
    text: str | None = None
    image_tokens: bytes | None = None

    @property
    def label_ids(self) -> list[int]:
        return list(self.meta["label_ids"])


def sample_meta(
    label_ids: Iterable[int],
    space: LabelSpace,
    caption: str | None = None,
    description: str | None = None,
    stag: dict | None = None,
) -> dict:
    """The per-sample ``json`` record of the contract."""
    ids = sorted(set(int(i) for i in label_ids))
    return {
        "label_ids": ids,
        "labels": [space.names[i] for i in ids],
        "caption": caption,
        "description": description,
        "tail_labels": [space.names[i] for i in ids if space.is_tail(i)],
        "stag": stag,
    }


@dataclass
class ShardInfo:
    id: int
    name: str
    count: int
    bytes: int
    sha256: str
    rejected: list[dict] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # per-shard stage statistics (e.g. STAG counts)


@dataclass
class ShardIndex:
    """``<split>.index.json``: what is done, with counts and checksums."""

    split: str
    samples_per_shard: int
    num_input: int
    shards: dict[int, ShardInfo] = field(default_factory=dict)

    @property
    def num_shards_planned(self) -> int:
        return -(-self.num_input // self.samples_per_shard) if self.num_input else 0

    @property
    def complete(self) -> bool:
        return len(self.shards) == self.num_shards_planned

    @property
    def num_samples(self) -> int:
        return sum(s.count for s in self.shards.values())

    @property
    def num_rejected(self) -> int:
        return sum(len(s.rejected) for s in self.shards.values())

    def missing(self) -> list[int]:
        return [k for k in range(self.num_shards_planned) if k not in self.shards]

    def ordered(self) -> list[ShardInfo]:
        return [self.shards[k] for k in sorted(self.shards)]

    def to_dict(self) -> dict:
        return {
            "format_version": INDEX_VERSION,
            "split": self.split,
            "samples_per_shard": self.samples_per_shard,
            "num_input": self.num_input,
            "num_shards": self.num_shards_planned,
            "complete": self.complete,
            "num_samples": self.num_samples,
            "num_rejected": self.num_rejected,
            "num_bytes": sum(s.bytes for s in self.shards.values()),
            "shards": [asdict(s) for s in self.ordered()],
        }

    @classmethod
    def from_dict(cls, data: dict, where: str = "index") -> ShardIndex:
        if data.get("format_version") != INDEX_VERSION:
            raise InputError(
                f"{where}: index format_version {data.get('format_version')!r} unsupported"
            )
        split = data["split"]
        if not isinstance(split, str) or not _SPLIT_RE.match(split):
            raise InputError(f"{where}: split name {split!r} is not a plain name")
        index = cls(split, int(data["samples_per_shard"]), int(data["num_input"]))
        for s in data["shards"]:
            info = ShardInfo(**s)
            # Names are joined to the data folder: only the contract's own plain names, never
            # an absolute path, a '../' or a URL that would read from elsewhere.
            if info.name != shard_name(split, int(info.id)):
                raise InputError(
                    f"{where}: shard {info.id} is named {info.name!r}; a shard of split "
                    f"{split!r} must be named {shard_name(split, int(info.id))!r} inside the "
                    "data folder"
                )
            index.shards[int(info.id)] = info
        return index


def index_location(location: str, split: str) -> str:
    return storage.join(location, f"{split}.index.json")


def shard_name(split: str, shard_id: int) -> str:
    return f"{split}-{shard_id:06d}.tar"


def load_index(location: str, split: str) -> ShardIndex:
    path = index_location(location, split)
    if not storage.exists(path):
        found = list_splits(location)
        hint = f"; splits here: {found}" if found else "; no shard index found there at all"
        raise MissingInputError(f"{path} does not exist{hint}")
    return _parse_index(storage.read_bytes(path), path)


def _parse_index(data: bytes, path: str) -> ShardIndex:
    try:
        return ShardIndex.from_dict(json.loads(data), where=path)
    except (ValueError, KeyError, TypeError) as e:  # truncated or edited by hand
        if isinstance(e, ShardIntegrityError) or str(e).startswith(path):
            raise
        raise InputError(f"{path}: not a readable shard index ({type(e).__name__}: {e})") from None


def list_splits(location: str) -> list[str]:
    return [
        n[: -len(".index.json")] for n in storage.listdir(location) if n.endswith(".index.json")
    ]


def load_label_space(location: str) -> LabelSpace:
    path = storage.join(location, CLASSES_FILE)
    if not storage.exists(path):
        raise MissingInputError(
            f"{path} does not exist: not a shard folder (run `ltdist data pack`)"
        )
    return LabelSpace.load(path)


def encode_tar(samples: list[ShardSample]) -> bytes:
    """A deterministic WebDataset tar: members key.<ext>, key.json, key.txt per sample."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            problem = key_problem(s.key)
            if problem:
                raise ValueError(f"sample key {s.key[:120]!r}: {problem}")
            members: list[tuple[str, bytes]] = []
            if s.image is not None:
                if s.image_ext not in IMAGE_EXTS:
                    raise ValueError(
                        f"{s.key}: image extension {s.image_ext!r} not in {IMAGE_EXTS}"
                    )
                members.append((s.image_ext, s.image))
            if s.image_tokens is not None:
                members.append((TOKENS_EXT, s.image_tokens))
            members.append(("json", json.dumps(s.meta, sort_keys=True).encode()))
            if s.text is not None:
                members.append(("txt", s.text.encode()))
            for ext, data in members:
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uname = info.gname = ""
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def decode_tar(stream, url: str = "") -> Iterator[ShardSample]:
    """Samples of a shard stream, in order, through WebDataset's tar reader and key grouping."""
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    files = ({**f, "__url__": url} for f in tar_file_iterator(stream))
    where = url or "a shard"
    try:
        for raw in group_by_keys(files):
            yield _sample(raw, where)
    except tarfile.TarError as e:  # a broken header or a truncated file
        raise ShardIntegrityError(f"{where}: not a readable tar ({e})") from None


def _sample(raw: dict, where: str) -> ShardSample:
    """One grouped tar entry as a sample; a damaged member is named, not a bare decode error."""
    key = raw.get("__key__")
    member = "json"
    try:
        meta = json.loads(raw["json"])
        member = "txt"
        text = raw["txt"].decode() if "txt" in raw else None
    except KeyError:
        raise ShardIntegrityError(
            f"{where}: sample {key!r} has no .json member (members: "
            f"{sorted(k for k in raw if not k.startswith('__'))})"
        ) from None
    except (UnicodeDecodeError, ValueError) as e:
        raise ShardIntegrityError(
            f"{where}: member {key}.{member} does not decode ({type(e).__name__}: {e})"
        ) from None
    ext = next((e for e in IMAGE_EXTS if e in raw), None)
    return ShardSample(
        key=key,
        meta=meta,
        image=raw.get(ext) if ext else None,
        image_ext=ext,
        text=text,
        image_tokens=raw.get(TOKENS_EXT),
    )


class ShardIntegrityError(InputError):
    """A shard whose bytes or sample count are not what its index recorded, or that does not
    decode: the message names the shard (and the member)."""


class DigestingReader(io.RawIOBase):
    """A read-through stream that hashes what it reads; :meth:`verify` reads the rest and
    checks the whole file against the index's SHA-256 (about 1 GB/s: cheap beside decoding)."""

    def __init__(self, raw, url: str, sha256: str):
        self.raw, self.url, self.expected = raw, url, sha256
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.raw.readinto(b)
        if n:
            self.digest.update(memoryview(b)[:n])
        return n

    def verify(self) -> None:
        while chunk := self.raw.read(1 << 20):
            self.digest.update(chunk)
        actual = self.digest.hexdigest()
        if actual != self.expected:
            raise ShardIntegrityError(
                f"{self.url}: SHA-256 {actual[:16]}... is not the index's {self.expected[:16]}...: "
                "the shard changed after it was written (a swapped, edited or damaged file). "
                "Rewrite it (remove it from the index and rerun the pack or STAG job) and check "
                "the rest with `ltdist data stats LOCATION`"
            )


def read_shard(
    url: str, *, allow_pipe: bool = False, expected: ShardInfo | None = None
) -> Iterator[ShardSample]:
    """Samples of one shard; with ``expected`` (its index entry) the bytes and the count are
    checked against it once the shard is read. ``allow_pipe`` only for a ``pipe:`` URL the
    caller trusts."""
    with storage.open_read(url, allow_pipe=allow_pipe) as f:
        if expected is None:
            yield from decode_tar(f, url)
            return
        stream = DigestingReader(f, url, expected.sha256)
        count = 0
        for sample in decode_tar(stream, url):
            count += 1
            yield sample
        stream.verify()
        if count != expected.count:
            raise ShardIntegrityError(f"{url} holds {count} samples, its index {expected.count}")


def read_split(location: str, split: str) -> Iterator[ShardSample]:
    """Every sample of a complete split once, in stored order, each shard verified against
    the index: what evaluation scores is what was written, all of it."""
    index = load_index(location, split)
    if not index.complete:
        raise InputError(
            f"{location}: split {split!r} is incomplete (missing shards "
            f"{index.missing()[:10]} of {index.num_shards_planned}): it would be scored on "
            "the samples left; finish writing it (rerun the pack or generation job)"
        )
    for info in index.ordered():
        yield from read_shard(storage.join(location, info.name), expected=info)


def split_coverage(location: str, split: str, scored: int) -> dict:
    """How many samples an evaluation scored against what the split holds and was made from."""
    index = load_index(location, split)
    return {
        "split": split,
        "samples_scored": scored,
        "split_samples": index.num_samples,
        "split_input": index.num_input,
        "rejected_at_pack": index.num_rejected,
        "text": (
            f"scored {scored} of the {index.num_samples} samples of {split} "
            f"({index.num_input} input records, {index.num_rejected} left out when it was "
            "written, each listed with its reason in the index)"
        ),
    }


class ShardWriter:
    """Writes the shards of one split; safe to rerun after a kill at any point.

    Several processes may write different shards of one local split at once: the index is
    updated under a file lock. On object stores one process writes the index.
    """

    def __init__(self, location: str, split: str, samples_per_shard: int, num_input: int):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.location, self.split = location, split
        storage.makedirs(location)
        with self._locked():
            index = self._read_index()
            if index is None:
                index = ShardIndex(split, samples_per_shard, num_input)
                self._write_index(index)
            elif (index.samples_per_shard, index.num_input) != (samples_per_shard, num_input):
                raise InputError(
                    f"{index_location(location, split)} was written with "
                    f"samples_per_shard={index.samples_per_shard}, num_input={index.num_input}; "
                    f"this run has {samples_per_shard}, {num_input}. Resume with the same input "
                    "and settings, or write to a fresh folder."
                )
        self.index = index
        with self._locked():  # not while another writer publishes a shard
            self._remove_orphans()

    def done(self) -> set[int]:
        return set(self.index.shards)

    def write_shard(
        self,
        shard_id: int,
        samples: list[ShardSample],
        rejected: list[dict] = (),
        meta: dict | None = None,
    ) -> ShardInfo:
        """Publish shard ``shard_id`` atomically and record it (with its rejects and the
        writing stage's statistics ``meta``) in the index."""
        if not 0 <= shard_id < self.index.num_shards_planned:
            raise ValueError(f"shard id {shard_id} outside 0..{self.index.num_shards_planned - 1}")
        data = encode_tar(samples)
        name = shard_name(self.split, shard_id)
        info = ShardInfo(
            shard_id,
            name,
            len(samples),
            len(data),
            hashlib.sha256(data).hexdigest(),
            list(rejected),
            dict(meta or {}),
        )
        # Published and recorded under the folder's lock: another writer's orphan sweep never
        # sees a shard between its rename and its index entry.
        with self._locked():
            storage.write_bytes_atomic(storage.join(self.location, name), data)
            self.index = self._read_index()
            self.index.shards[shard_id] = info
            self._write_index(self.index)
        return info

    def _remove_orphans(self) -> None:
        """Remove what killed runs left: shards the index does not list, and temporaries whose
        writer is gone (a temporary of a live writer, another pack of this folder, is its own)."""
        pattern = re.compile(rf"^{re.escape(self.split)}-(\d{{6}})\.tar(?:\.tmp-(\d+))?$")
        local = storage.is_local(self.location)
        for name in storage.listdir(self.location):
            m = pattern.match(name)
            if not m:
                continue
            writer = m.group(2)
            if writer is not None:
                if local and storage.process_alive(int(writer)):
                    continue
            elif int(m.group(1)) in self.index.shards:
                continue
            log.info("removing %s left by an interrupted run", name)
            storage.remove(storage.join(self.location, name))

    def _read_index(self) -> ShardIndex | None:
        path = index_location(self.location, self.split)
        if not storage.exists(path):
            return None
        return _parse_index(storage.read_bytes(path), path)

    def _write_index(self, index: ShardIndex) -> None:
        data = json.dumps(index.to_dict(), indent=1).encode()
        storage.write_bytes_atomic(index_location(self.location, self.split), data)

    @contextlib.contextmanager
    def _locked(self):
        if not storage.is_local(self.location):
            yield
            return
        lock_path = storage.join(self.location, f".{self.split}.index.lock")
        with open(lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class ShardProblem:
    shard: str
    reason: str


def verify_split(location: str, split: str) -> list[ShardProblem]:
    """Recompute every shard's SHA-256 and sample count against the index."""
    index = load_index(location, split)
    problems = []
    for info in index.ordered():
        url = storage.join(location, info.name)
        if not storage.exists(url):
            problems.append(ShardProblem(info.name, "missing"))
            continue
        data = storage.read_bytes(url)
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            problems.append(ShardProblem(info.name, f"sha256 {digest} != index {info.sha256}"))
            continue
        count = sum(1 for _ in decode_tar(io.BytesIO(data)))
        if count != info.count:
            problems.append(ShardProblem(info.name, f"{count} samples, index says {info.count}"))
    if not index.complete:
        problems.append(
            ShardProblem(f"{split}.index.json", f"incomplete: missing shards {index.missing()}")
        )
    return problems

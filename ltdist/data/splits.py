"""The published COCO-LT and VOC-LT splits: where to get them, how to check them, how to read them.

The split files (Wu et al. 2020, as published in the LMPT repository) name images by relative
path and list 0-based label ids; images are not part of them, so loaders join the paths to the
user's own COCO / VOC copy. The files are never committed here: ``fetch_splits`` downloads them
(or copies them from a local folder) and checks each against a pinned SHA-256, so a run can only
ever train and test on the exact published split.
"""

from __future__ import annotations

import hashlib
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ltdist import storage
from ltdist.data.manifest import Record, key_from_path
from ltdist.entry import MissingInputError, UserError
from ltdist.labels import LabelSpace

logger = logging.getLogger(__name__)

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

# LMPT at a fixed commit (the newest on 2024-08-13); all eight files there hash to the values
# pinned below. A branch name would let the bytes change under the pinned hashes.
LMPT_COMMIT = "aab39caca28362bfb9d9340f9c8a5cd75614e130"
DEFAULT_SOURCE = f"https://raw.githubusercontent.com/richard-peng-xia/LMPT/{LMPT_COMMIT}/data"
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class BenchmarkSpec:
    """One benchmark's split files, their pinned hashes and where the public copy lives.

    ``name`` is also the local folder (``<splits_dir>/<name>/<file>``); ``remote_dir`` is the
    folder under the public source (LMPT calls them ``coco`` and ``voc``).
    """

    name: str
    remote_dir: str
    labels_file: str
    train_file: str
    test_file: str
    captions_file: str
    sha256: tuple[tuple[str, str], ...]

    @property
    def files(self) -> tuple[str, ...]:
        return (self.labels_file, self.train_file, self.test_file, self.captions_file)

    def expected_sha256(self, file: str) -> str:
        return dict(self.sha256)[file]

    def split_file(self, split: str) -> str:
        if split == "train":
            return self.train_file
        if split == "test":
            return self.test_file
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "coco_lt": BenchmarkSpec(
        name="coco_lt",
        remote_dir="coco",
        labels_file="coco_labels.txt",
        train_file="coco_lt_train.txt",
        test_file="coco_lt_test.txt",
        captions_file="coco_lt_captions.txt",
        sha256=(
            ("coco_labels.txt", "a16d52dc65d8bc2b7abe5875199d802e951b7af142b327f8c85b496116a87f45"),
            (
                "coco_lt_captions.txt",
                "4bcc3de5c20e3561f6bbe90188c00cea3adf1eab58245f761e4fd9b93319fecd",
            ),
            (
                "coco_lt_test.txt",
                "4dda722463b0ed3aada172ce1c75f46f1391e4d2bee7643760549f916a8022e5",
            ),
            (
                "coco_lt_train.txt",
                "8e0c354ae2214d7ced46f4a5ae24236149296be4dcd2df74f00eba2abe6be0ce",
            ),
        ),
    ),
    "voc_lt": BenchmarkSpec(
        name="voc_lt",
        remote_dir="voc",
        labels_file="voc_labels.txt",
        train_file="voc_lt_train.txt",
        test_file="voc_lt_test.txt",
        captions_file="voc_lt_captions.txt",
        sha256=(
            ("voc_labels.txt", "59e82ce7a1fa096b8a80c22cc72e6c86e54c598b2e1cfe08a211f1c82a0dcb2c"),
            (
                "voc_lt_captions.txt",
                "a986c2d493d4258aa470fe0b48b66b12c1ec338e4341dda3fb4c46ef9865f273",
            ),
            ("voc_lt_test.txt", "43b2929a86e9fe685cdf3b6b72fb90b6838ff9f9f427807e8b9502111e73750a"),
            (
                "voc_lt_train.txt",
                "2111a5e58ae8b67a112a2b2c8aa98fe8fa926ac3e1d73e2e4e0e4844c90cc047",
            ),
        ),
    ),
}


class BenchmarkFileError(UserError, ValueError):
    """A split file that cannot be read as the benchmark format; the message names file and line."""


class ChecksumError(UserError, ValueError):
    """A downloaded or copied file whose SHA-256 is not the pinned one."""


class FetchError(UserError, OSError):
    """A split file that could not be downloaded or found; the message names the URL or path."""


def get_benchmark(bench: str) -> BenchmarkSpec:
    try:
        return BENCHMARKS[bench]
    except KeyError:
        raise ValueError(
            f"unknown benchmark {bench!r}; expected one of {sorted(BENCHMARKS)}"
        ) from None


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- reading ------------------------------------------------------------------------------------


def _locate(spec: BenchmarkSpec, splits_dir: str | os.PathLike, file: str) -> str:
    """Locate ``file`` as ``<splits_dir>/<bench>/<file>`` or ``<splits_dir>/<file>``."""
    base = os.fspath(splits_dir)
    candidates = [storage.join(base, spec.name, file), storage.join(base, file)]
    for location in candidates:
        if storage.exists(location):
            return location
    raise MissingInputError(
        f"{spec.name}: {file} not found (looked for {candidates[0]} and {candidates[1]}); "
        f"run fetch_splits({spec.name!r}, {base!r}) to download the split files"
    )


def _read_lines(spec: BenchmarkSpec, location: str, file: str) -> list[str]:
    data = storage.read_bytes(location)
    actual = sha256_of(data)
    if actual != spec.expected_sha256(file):
        logger.warning(
            "%s: SHA-256 %s is not the published %s split file's; results will not be comparable",
            location,
            actual,
            spec.name,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BenchmarkFileError(f"{location}: not UTF-8 text ({e})") from e
    return text.splitlines()


def class_names(bench: str, splits_dir: str | os.PathLike) -> list[str]:
    """Class names in label-id order, from the ``name idx`` labels file."""
    spec = get_benchmark(bench)
    location = _locate(spec, splits_dir, spec.labels_file)
    by_id: dict[int, str] = {}
    for n, raw in enumerate(_read_lines(spec, location, spec.labels_file), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise BenchmarkFileError(f"{location}:{n}: expected 'name idx', got {raw!r}")
        name, idx = parts[0], int(parts[1])
        if idx in by_id:
            raise BenchmarkFileError(
                f"{location}:{n}: class id {idx} given twice ({by_id[idx]!r}, {name!r})"
            )
        by_id[idx] = name
    if sorted(by_id) != list(range(len(by_id))):
        raise BenchmarkFileError(f"{location}: class ids are not 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def _read_captions(spec: BenchmarkSpec, splits_dir: str | os.PathLike) -> dict[str, str]:
    location = _locate(spec, splits_dir, spec.captions_file)
    captions: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for n, raw in enumerate(_read_lines(spec, location, spec.captions_file), start=1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2:
            raise BenchmarkFileError(f"{location}:{n}: expected 'path caption', got {raw!r}")
        path, caption = parts
        if path in captions:
            raise BenchmarkFileError(
                f"{location}:{n}: duplicate path {path!r} (first on line {first_line[path]})"
            )
        captions[path] = caption
        first_line[path] = n
    return captions


def load_split_records(
    bench: str,
    splits_dir: str | os.PathLike,
    split: Split,
    image_root: str | os.PathLike | None = None,
) -> list[Record]:
    """Read one split in file order; train records carry the benchmark's captions.

    Images without labels (48 in COCO-LT test) are kept with empty ``label_ids``: evaluation
    excludes classes without positives, not samples.
    """
    spec = get_benchmark(bench)
    file = spec.split_file(split)
    location = _locate(spec, splits_dir, file)
    num_classes = len(class_names(bench, splits_dir))
    captions = _read_captions(spec, splits_dir) if split == "train" else {}

    records: list[Record] = []
    line_of_path: dict[str, int] = {}
    line_of_key: dict[str, tuple[int, str]] = {}
    for n, raw in enumerate(_read_lines(spec, location, file), start=1):
        fields = raw.split()
        if not fields:
            continue
        path, id_fields = fields[0], fields[1:]
        if path in line_of_path:
            raise BenchmarkFileError(
                f"{location}:{n}: duplicate image path {path!r} "
                f"(first on line {line_of_path[path]})"
            )
        line_of_path[path] = n
        try:
            ids = sorted({int(f) for f in id_fields})
        except ValueError:
            raise BenchmarkFileError(
                f"{location}:{n}: label ids must be integers, got {raw!r}"
            ) from None
        bad = [i for i in ids if not 0 <= i < num_classes]
        if bad:
            raise BenchmarkFileError(
                f"{location}:{n}: label id(s) {bad} out of range 0..{num_classes - 1} for {path!r}"
            )
        key = key_from_path(path)
        if key in line_of_key:
            first, other = line_of_key[key]
            raise BenchmarkFileError(
                f"{location}:{n}: {path!r} and {other!r} (line {first}) give the same key {key!r}"
            )
        line_of_key[key] = (n, path)
        image = path if image_root is None else storage.join(os.fspath(image_root), path)
        records.append(Record(key, image, tuple(ids), captions.get(path), n))

    unlabeled = sum(1 for r in records if not r.label_ids)
    if unlabeled:
        logger.info(
            "%s %s: %d of %d images have no label (kept; they only count as negatives)",
            bench,
            split,
            unlabeled,
            len(records),
        )
    if split == "train":
        missing = sum(1 for r in records if r.caption is None)
        if missing:
            logger.warning(
                "%s train: %d of %d images have no caption", bench, missing, len(records)
            )
        extra = len(set(captions) - set(line_of_path))
        if extra:
            logger.warning("%s: %d captions name images not in the train split", bench, extra)
    logger.info("%s %s: %d records from %s", bench, split, len(records), location)
    return records


def label_space(bench: str, splits_dir: str | os.PathLike) -> LabelSpace:
    """The benchmark's label space: names from the labels file, statistics from the train split."""
    names = class_names(bench, splits_dir)
    records = load_split_records(bench, splits_dir, "train")
    return LabelSpace.from_label_sets(names, (r.label_ids for r in records))


# -- fetching -----------------------------------------------------------------------------------


def _is_http(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def _candidates(spec: BenchmarkSpec, source: str, file: str) -> list[str]:
    """Where ``file`` may sit under ``source``: our layout, LMPT's layout, or flat."""
    if _is_http(source):
        base = source.rstrip("/")
        if source == DEFAULT_SOURCE:
            return [f"{base}/{spec.remote_dir}/{file}"]
        return [f"{base}/{d}/{file}" for d in (spec.name, spec.remote_dir)] + [f"{base}/{file}"]
    base = storage.local_path(source)
    return [os.path.join(base, d, file) for d in (spec.name, spec.remote_dir)] + [
        os.path.join(base, file)
    ]


def _download(urls: Sequence[str], timeout: float) -> tuple[str, bytes]:
    """Bytes of the first URL that exists; a 404 tries the next layout, other failures raise."""
    for url in urls:
        request = urllib.request.Request(url, headers={"User-Agent": "ltdist"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return url, response.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                logger.debug("%s: not found, trying the next layout", url)
                continue
            raise FetchError(f"download of {url} failed: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise FetchError(f"download of {url} failed: {reason}") from e
    raise FetchError(f"not found (HTTP 404) at any of: {', '.join(urls)}")


def _read_local(paths: Sequence[str]) -> tuple[str, bytes]:
    for path in paths:
        if os.path.isfile(path):
            return path, Path(path).read_bytes()
    raise FetchError(f"not found at any of: {', '.join(paths)}")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_splits(
    bench: str,
    dest_dir: str | os.PathLike,
    source: str | os.PathLike | None = None,
    timeout: float = DOWNLOAD_TIMEOUT_S,
) -> list[Path]:
    """Download (or copy) a benchmark's split files into ``dest_dir/<bench>/`` and verify them.

    ``source`` is an http(s) base URL (default: LMPT's ``data/`` folder at a pinned commit) or a
    local folder holding ``<bench>/<file>``, LMPT's ``coco|voc/<file>``, or ``<file>``. A file
    already there with the pinned hash is kept; a file whose hash is wrong is never written.
    """
    spec = get_benchmark(bench)
    src = DEFAULT_SOURCE if source is None else os.fspath(source)
    if not _is_http(src) and not os.path.isdir(storage.local_path(src)):
        raise FetchError(f"source {src!r} is neither an http(s) URL nor an existing folder")
    out_dir = Path(dest_dir) / spec.name
    out_dir.mkdir(parents=True, exist_ok=True)

    paths: list[Path] = []
    for file in spec.files:
        dest = out_dir / file
        expected = spec.expected_sha256(file)
        if dest.is_file():
            actual = _file_sha256(dest)
            if actual == expected:
                logger.info("%s: already present and verified", dest)
                paths.append(dest)
                continue
            logger.warning(
                "%s: SHA-256 %s is not the pinned %s; replacing it", dest, actual, expected
            )
            dest.unlink()
        candidates = _candidates(spec, src, file)
        if _is_http(src):
            origin, data = _download(candidates, timeout)
        else:
            origin, data = _read_local(candidates)
        actual = sha256_of(data)
        if actual != expected:
            raise ChecksumError(
                f"{spec.name}/{file} from {origin}: SHA-256 {actual}, expected {expected}; "
                "the source does not hold the published split (nothing was written)"
            )
        storage.write_bytes_atomic(str(dest), data)
        logger.info("%s: %d bytes from %s, SHA-256 verified", dest, len(data), origin)
        paths.append(dest)
    return paths


__all__ = [
    "BENCHMARKS",
    "DEFAULT_SOURCE",
    "BenchmarkFileError",
    "BenchmarkSpec",
    "ChecksumError",
    "FetchError",
    "Record",
    "class_names",
    "fetch_splits",
    "get_benchmark",
    "key_from_path",
    "label_space",
    "load_split_records",
    "sha256_of",
]

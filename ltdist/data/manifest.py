"""JSONL manifests: the way a user brings their own data set.

One JSON object per line::

    {"key": "img_001", "image": "images/001.jpg", "labels": ["person", "surfboard"],
     "caption": "a man carries a surfboard"}

``key`` is optional (derived from the image path, see :func:`key_from_path`); ``image`` is
relative to the manifest's folder (or ``image_root``) unless absolute; ``labels`` holds class
names (or synonyms) or integer label ids; ``caption`` is optional. Every problem is reported
with its line number and key, and the ``policy`` decides whether it stops the run (``error``)
or the record is left out and listed (``skip``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ltdist.data.shards import key_problem
from ltdist.entry import UserError
from ltdist.labels import LabelSpace, UnknownClassError

log = logging.getLogger(__name__)

Policy = Literal["error", "skip"]
_SURROGATE = re.compile("[\ud800-\udfff]")


def key_from_path(path: str) -> str:
    """The shard key of an image path: no extension, '/' and '.' replaced by '_'.

    WebDataset splits a file name at its first dot, so a key must not contain one:
    ``train2017/000000554625.jpg`` -> ``train2017_000000554625``.
    """
    path = path.replace("\\", "/")
    while path.startswith("./"):
        path = path[2:]
    stem, _ = os.path.splitext(path)
    key = stem.replace("/", "_").replace(".", "_")
    if not key:
        raise ValueError(f"cannot make a key from path {path!r}")
    return key


@dataclass(frozen=True)
class Record:
    """One sample of a data set before it is packed into shards."""

    key: str
    image: str | None
    label_ids: tuple[int, ...]
    caption: str | None = None
    line: int = 0


@dataclass
class Problem:
    """A record that was left out, and why."""

    line: int
    key: str | None
    reason: str

    def __str__(self) -> str:
        return f"line {self.line} (key {self.key!r}): {self.reason}"


@dataclass
class Manifest:
    records: list[Record]
    problems: list[Problem] = field(default_factory=list)


class ManifestError(UserError, ValueError):
    """A manifest problem under the ``error`` policy."""


def read_class_names(path: str | Path) -> list[str]:
    """Class names in label-id order from ``classes.txt`` (one per line) or a ``classes.json``."""
    path = Path(path)
    if path.suffix == ".json":
        return LabelSpace.load(path).names
    names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    if not names:
        raise ManifestError(f"{path}: no class names")
    return names


def read_manifest(
    path: str | Path,
    labels: LabelSpace | list[str],
    *,
    image_root: str | Path | None = None,
    policy: Policy = "error",
    check_files: bool = True,
    allow_empty_labels: bool = False,
) -> Manifest:
    """Parse and validate a manifest; problems are raised or collected per ``policy``."""
    path = Path(path)
    if policy not in ("error", "skip"):
        raise ValueError(f"policy must be 'error' or 'skip', got {policy!r}")
    space = labels if isinstance(labels, LabelSpace) else _names_only(labels)
    root = Path(image_root) if image_root is not None else path.parent
    records: list[Record] = []
    problems: list[Problem] = []
    seen: dict[str, int] = {}

    def problem(line: int, key: str | None, reason: str) -> None:
        p = Problem(line, key, reason)
        if policy == "error":
            raise ManifestError(f"{path}: {p} (use policy=skip to leave such records out)")
        problems.append(p)

    with path.open("rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:  # one bad byte costs its line, not the file
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem(
                    line_no,
                    None,
                    f"not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})",
                )
                continue
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problem(line_no, None, f"not valid JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                problem(line_no, None, "not a JSON object")
                continue
            image = obj.get("image")
            key = obj.get("key")
            if key in (None, "") and isinstance(image, str):
                try:
                    key = key_from_path(image)
                except ValueError:
                    key = None
            if key in (None, ""):
                problem(line_no, None, "no 'key' and no 'image' to derive one from")
                continue
            if not isinstance(key, str):
                problem(line_no, None, f"'key' must be a string, got {key!r}")
                continue
            bad_key = key_problem(key)  # the shard writer's rule, checked where the line is known
            if bad_key:
                problem(line_no, key[:120], f"{bad_key}; give the record a 'key' that fits")
                continue
            unknown_fields = set(obj) - {"key", "image", "labels", "caption"}
            if unknown_fields:
                problem(line_no, key, f"unknown fields {sorted(unknown_fields)}")
                continue
            if key in seen:
                problem(line_no, key, f"duplicate key (first on line {seen[key]})")
                continue
            try:
                label_ids = _label_ids(obj.get("labels"), space)
            except (UnknownClassError, ValueError) as e:
                problem(line_no, key, str(e.args[0]) if e.args else str(e))
                continue
            if not label_ids and not allow_empty_labels:
                problem(line_no, key, "empty label set")
                continue
            image_path = None
            if image is not None:
                if not isinstance(image, str):
                    problem(line_no, key, f"'image' must be a path string, got {image!r}")
                    continue
                # Absolute, so that no image path can read as a URL scheme (``pipe:...``).
                image_path = os.path.abspath(image if os.path.isabs(image) else root / image)
                if check_files and not os.path.isfile(image_path):
                    problem(line_no, key, f"image file not found: {image_path}")
                    continue
            caption = obj.get("caption")
            if caption is not None and not isinstance(caption, str):
                problem(line_no, key, f"'caption' must be a string, got {type(caption).__name__}")
                continue
            if caption is not None and _SURROGATE.search(caption):
                at = _SURROGATE.search(caption).start()
                problem(
                    line_no,
                    key,
                    f"'caption' holds a lone surrogate (\\u{ord(caption[at]):04x} at "
                    f"character {at}): not text that UTF-8 can write",
                )
                continue
            seen[key] = line_no
            records.append(Record(key, image_path, tuple(label_ids), caption, line_no))
    if problems:
        log.warning(
            "%s: %d records left out: %s", path, len(problems), "; ".join(map(str, problems[:5]))
        )
    return Manifest(records, problems)


def write_manifest(path: str | Path, records: list[Record], names: list[str]) -> None:
    """Write records as a manifest with label names, image paths relative to its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            obj = {"key": r.key}
            if r.image is not None:
                obj["image"] = os.path.relpath(r.image, path.parent)
            obj["labels"] = [names[i] for i in r.label_ids]
            if r.caption is not None:
                obj["caption"] = r.caption
            f.write(json.dumps(obj) + "\n")


def _label_ids(labels: object, space: LabelSpace) -> list[int]:
    if labels is None:
        return []
    if not isinstance(labels, list):
        raise ValueError(f"'labels' must be a list, got {type(labels).__name__}")
    ids = set()
    for item in labels:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise ValueError(f"label {item!r} is neither a class name nor an id")
        if isinstance(item, int):
            if not 0 <= item < space.num_classes:
                raise ValueError(f"label id {item} out of range 0..{space.num_classes - 1}")
            ids.add(item)
        else:
            ids.add(space.id_of(item))
    return sorted(ids)


def _names_only(names: list[str]) -> LabelSpace:
    import numpy as np

    c = len(names)
    return LabelSpace(list(names), np.zeros(c), np.zeros((c, c)))

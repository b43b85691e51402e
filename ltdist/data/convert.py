"""What every format converter returns: labels (and captions) per image, and what went wrong.

Images are named by their path relative to the data set root, as the benchmark split files name
them (``train2017/000000554625.jpg``, ``VOCdevkit/VOC2012/JPEGImages/2008_000023.jpg``), so a
split file's line and a converted image meet by that path. A problem belongs to one image (it is
left out under ``policy: skip``) or to a file (a note in the report).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ltdist import storage
from ltdist.entry import UserError


class ConvertError(UserError, ValueError):
    """A source annotation that cannot be converted; the message names the file and the id/line."""


@dataclass(frozen=True)
class ConvertProblem:
    """Why one image cannot be used: the file, where in it (an id or a line) and the reason."""

    file: str
    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.where}: {self.reason}"


@dataclass
class Converted:
    """Label ids (benchmark order) and captions per image path; problems per image path."""

    labels: dict[str, tuple[int, ...]] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    caption_lists: dict[str, list[str]] = field(default_factory=dict)  # each caption apart
    instances: dict[str, dict[int, int]] = field(default_factory=dict)  # label id -> objects
    problems: dict[str, ConvertProblem] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)

    def add_problem(self, path: str, problem: ConvertProblem) -> None:
        """The first problem of an image is the one reported."""
        self.problems.setdefault(path, problem)

    def count(self, what: str, n: int = 1) -> None:
        self.counts[what] = self.counts.get(what, 0) + n

    def update(self, other: Converted) -> None:
        self.labels.update(other.labels)
        self.captions.update(other.captions)
        self.caption_lists.update(other.caption_lists)
        self.instances.update(other.instances)
        for path, p in other.problems.items():
            self.add_problem(path, p)
        self.notes += other.notes
        for k, v in other.counts.items():
            self.count(k, v)


def load_json(path: str) -> object:
    """A JSON file; a syntax error names the file, line and column."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise ConvertError(f"{path}: file not found") from None
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConvertError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConvertError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None


def has_surrogate(text: str) -> bool:
    """A lone surrogate (JSON may escape one, ``"\\ud800"``) is not text UTF-8 can write."""
    return any("\ud800" <= ch <= "\udfff" for ch in text)

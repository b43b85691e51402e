"""The label space: class names, training frequencies, head/medium/tail groups, co-occurrence.

It is serialised as ``classes.json`` and travels with shards and checkpoints, so every stage
(generation, training, evaluation) agrees on class ids, groups and names. Frequencies and
co-occurrence always come from the training split.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ltdist import storage
from ltdist.entry import InputError, UserError

CLASSES_FILE = "classes.json"
FORMAT_VERSION = 1

# The benchmark rule (Wu et al. 2020): head >= 100, medium 20..99, tail < 20 training positives.
HEAD_MIN = 100
MEDIUM_MIN = 20
GROUPS = ("head", "medium", "tail")

# Display names and synonyms for the class names that the benchmark files spell tersely.
# One table serves every data set; a class absent here displays as its own name.
DISPLAY_NAMES = {
    "aeroplane": "aeroplane",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "tvmonitor": "tv monitor",
    "motorbike": "motorbike",
}
SYNONYMS = {
    "aeroplane": ["airplane", "plane"],
    "diningtable": ["table"],
    "tvmonitor": ["television", "tv", "monitor"],
    "motorbike": ["motorcycle"],
    "sofa": ["couch"],
    "pottedplant": ["houseplant", "plant"],
    "hair drier": ["hair dryer", "hairdryer"],
    "tv": ["television"],
    "couch": ["sofa"],
    "cell phone": ["mobile phone", "cellphone"],
    "motorcycle": ["motorbike"],
    "airplane": ["aeroplane", "plane"],
    "donut": ["doughnut"],
    "sports ball": ["ball"],
    "dining table": ["table"],
    "potted plant": ["houseplant"],
}


def group_of(frequency: int) -> str:
    """Group of a class with ``frequency`` positive training images (the benchmark rule)."""
    if frequency >= HEAD_MIN:
        return "head"
    if frequency >= MEDIUM_MIN:
        return "medium"
    return "tail"


class UnknownClassError(UserError, KeyError):
    """A class name that the label space does not know; the message names the closest one."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Mention:
    """One class mentioned in a text: its id, the matched words and their character span."""

    class_id: int
    text: str
    start: int
    end: int


@dataclass
class LabelSpace:
    """Class names in label-id order with their training statistics.

    ``cooccurrence[i, j]`` counts training images that carry both class i and class j; its
    diagonal equals ``frequency``.
    """

    names: list[str]
    frequency: np.ndarray
    cooccurrence: np.ndarray
    display_names: list[str] = field(default_factory=list)
    synonyms: list[list[str]] = field(default_factory=list)
    num_train_images: int = 0

    def __post_init__(self) -> None:
        c = len(self.names)
        if len(set(self.names)) != c:
            dupes = sorted({n for n in self.names if self.names.count(n) > 1})
            raise ValueError(f"duplicate class names: {dupes}")
        self.frequency = np.asarray(self.frequency, dtype=np.int64)
        self.cooccurrence = np.asarray(self.cooccurrence, dtype=np.int64)
        if self.frequency.shape != (c,) or self.cooccurrence.shape != (c, c):
            raise ValueError(
                f"{c} classes but frequency {self.frequency.shape} and co-occurrence "
                f"{self.cooccurrence.shape}"
            )
        if not self.display_names:
            self.display_names = [DISPLAY_NAMES.get(n, n) for n in self.names]
        if not self.synonyms:
            self.synonyms = [list(SYNONYMS.get(n, [])) for n in self.names]
        self._lookup = self._build_lookup()
        self._matcher: re.Pattern[str] | None = None

    # -- construction -------------------------------------------------------------------

    @classmethod
    def from_label_sets(
        cls, names: Sequence[str], label_sets: Iterable[Sequence[int]]
    ) -> LabelSpace:
        """Count frequencies and co-occurrence over the training split's label-id sets."""
        c = len(names)
        co = np.zeros((c, c), dtype=np.int64)
        n_images = 0
        for ids in label_sets:
            ids = sorted(set(int(i) for i in ids))
            if ids and (ids[0] < 0 or ids[-1] >= c):
                raise ValueError(f"label id out of range 0..{c - 1}: {ids}")
            idx = np.asarray(ids, dtype=np.int64)
            co[np.ix_(idx, idx)] += 1
            n_images += 1
        return cls(list(names), np.diag(co).copy(), co, num_train_images=n_images)

    # -- derived statistics ---------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def groups(self) -> list[str]:
        return [group_of(int(f)) for f in self.frequency]

    def group_ids(self, group: str) -> np.ndarray:
        """Class ids of one group ('head', 'medium' or 'tail')."""
        if group not in GROUPS:
            raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")
        return np.array([i for i, g in enumerate(self.groups) if g == group], dtype=np.int64)

    def group_counts(self) -> dict[str, int]:
        groups = self.groups
        return {g: groups.count(g) for g in GROUPS}

    def is_tail(self, class_id: int) -> bool:
        return group_of(int(self.frequency[class_id])) == "tail"

    def conditional(self) -> np.ndarray:
        """P(j | i) = co[i, j] / freq[i]: asymmetric, diagonal 1 (0 rows for unseen classes)."""
        freq = self.frequency.astype(np.float64)[:, None]
        return np.divide(
            self.cooccurrence, freq, out=np.zeros(self.cooccurrence.shape), where=freq > 0
        )

    # -- names ----------------------------------------------------------------------------

    def _build_lookup(self) -> dict[str, int]:
        lookup: dict[str, int] = {}
        for i, name in enumerate(self.names):
            for alias in (name, self.display_names[i], *self.synonyms[i]):
                lookup.setdefault(_norm(alias), i)
        # Canonical names win over another class's synonym ('couch' is COCO's class even
        # though it is a synonym of VOC's 'sofa').
        for i, name in enumerate(self.names):
            lookup[_norm(name)] = i
        return lookup

    def id_of(self, name: str) -> int:
        """Class id of a name, display name or synonym (case- and space-insensitive)."""
        key = _norm(name)
        if key in self._lookup:
            return self._lookup[key]
        close = difflib.get_close_matches(key, list(self._lookup), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownClassError(f"unknown class {name!r}{hint}")

    def ids_of(self, names: Iterable[str]) -> list[int]:
        return sorted({self.id_of(n) for n in names})

    def mentions(self, text: str) -> list[Mention]:
        """Classes named in ``text``: longest match first, on word boundaries, plurals allowed.

        'hot dog' is not 'dog' and 'teddy bear' is not 'bear': the alternation is ordered by
        length so the regex engine takes the longest alias at each position.
        """
        if self._matcher is None:
            aliases = sorted(self._lookup, key=len, reverse=True)
            alt = "|".join(r"\s+".join(map(re.escape, a.split())) for a in aliases)
            self._matcher = re.compile(rf"(?<![\w-])({alt})(?:e?s)?(?![\w-])", re.IGNORECASE)
        found = []
        for m in self._matcher.finditer(text):
            found.append(Mention(self._lookup[_norm(m.group(1))], m.group(0), *m.span()))
        return found

    # -- serialisation --------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "num_train_images": self.num_train_images,
            "group_rule": {"head_min": HEAD_MIN, "medium_min": MEDIUM_MIN},
            "classes": [
                {
                    "id": i,
                    "name": n,
                    "display_name": self.display_names[i],
                    "synonyms": self.synonyms[i],
                    "frequency": int(self.frequency[i]),
                    "group": self.groups[i],
                }
                for i, n in enumerate(self.names)
            ],
            "cooccurrence": self.cooccurrence.tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict) -> LabelSpace:
        if data.get("format_version") != FORMAT_VERSION:
            raise InputError(
                f"classes.json format_version {data.get('format_version')!r}, "
                f"this ltdist reads {FORMAT_VERSION}"
            )
        classes = data["classes"]
        if [c["id"] for c in classes] != list(range(len(classes))):
            raise InputError("classes.json: class ids must be 0..C-1 in order")
        return cls(
            names=[c["name"] for c in classes],
            frequency=np.array([c["frequency"] for c in classes]),
            cooccurrence=np.array(data["cooccurrence"]),
            display_names=[c["display_name"] for c in classes],
            synonyms=[list(c["synonyms"]) for c in classes],
            num_train_images=int(data.get("num_train_images", 0)),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> LabelSpace:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        storage.write_bytes_atomic(str(path), self.to_json().encode())

    @classmethod
    def load(cls, path: str | Path) -> LabelSpace:
        path = str(path)
        try:
            return cls.from_json(storage.read_bytes(path).decode())
        except (KeyError, ValueError) as e:
            raise InputError(f"{path}: not a valid classes.json ({e})") from e

    def table(self) -> str:
        """The class table that `ltdist data stats` prints: id, name, frequency, group."""
        width = max(len(n) for n in self.names)
        lines = [f"{'id':>3}  {'class':<{width}}  {'freq':>6}  group"]
        for i, n in enumerate(self.names):
            lines.append(f"{i:>3}  {n:<{width}}  {int(self.frequency[i]):>6}  {self.groups[i]}")
        counts = self.group_counts()
        lines.append(
            f"{self.num_classes} classes: head {counts['head']} / medium {counts['medium']} / "
            f"tail {counts['tail']}; frequency {int(self.frequency.min())}.."
            f"{int(self.frequency.max())} ({int(self.frequency.sum())} positives over "
            f"{self.num_train_images} images)"
        )
        return "\n".join(lines)


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").split())

"""``ltdist data split-lt``: a long-tailed training split sampled from a balanced multi-label set.

COCO-LT and VOC-LT (Wu et al. 2020) were made this way from COCO 2017 train and VOC 2012
trainval: per-class target counts follow a Pareto profile, classes are ranked so that the
classes most often found with others get the large targets, and images are added (or dropped)
class by class, from the largest target down, until each class holds its target. Ours follows
that order and picks the least disruptive image at each step where theirs picks at random (see
docs/method.md, "Long-tailed splits"). The images not picked are balanced like the source: a
stratified validation split and a test split come from them.
"""

from __future__ import annotations

import heapq
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from ltdist import storage
from ltdist.config import to_dict
from ltdist.data.manifest import Record, read_class_names, read_manifest, write_manifest
from ltdist.data.stratify import carve_records
from ltdist.labels import GROUPS, HEAD_MIN, MEDIUM_MIN, LabelSpace, group_of

log = logging.getLogger(__name__)

_COLOURS = {"head": "tab:blue", "medium": "tab:orange", "tail": "tab:red"}  # as eval.report
REPORT_FILE = "split_lt.json"
PLOT_FILE = "split_lt.png"


def pareto_targets(
    num_classes: int, alpha: float, max_count: int, min_count: int = 1, tail: float = 0.99
) -> np.ndarray:
    """Target images per class rank (largest first): the Pareto(alpha) density at C evenly
    spaced points between its 0 and ``tail`` quantiles, scaled from ``max_count`` down:

        n_r = floor(min + (max - min) * x_r^-(alpha + 1)),  x_r = 1 + r (q_tail - 1) / (C - 1),
        q_tail = (1 - tail)^(-1 / alpha)

    (pdf(x) = alpha x^-(alpha+1) for x >= 1, so n_0 = max). With alpha 6 and tail 0.99 the last
    class gets 1 + 0.00464 (max - 1): 6 for COCO-LT's max 1200, 4 for VOC-LT's 800, the
    published minimum frequencies of both benchmarks.
    """
    if num_classes < 1 or alpha <= 0 or not 0 < tail < 1 or not 1 <= min_count <= max_count:
        raise ValueError(
            f"pareto_targets: need num_classes >= 1, alpha > 0, 0 < tail < 1 and "
            f"1 <= min_count <= max_count; got {num_classes}, {alpha}, {tail}, "
            f"{min_count}, {max_count}"
        )
    x = np.linspace(1.0, (1.0 - tail) ** (-1.0 / alpha), num_classes)
    return np.floor(min_count + (max_count - min_count) * x ** -(alpha + 1.0)).astype(np.int64)


def class_ranking(
    label_sets: list[tuple[int, ...]],
    num_classes: int,
    rank_by: str,
    rng: np.random.Generator,
) -> np.ndarray:
    """Class ids from the one that gets the largest target to the one that gets the smallest.

    ``cooccurrence`` (Wu et al.): by sum_i P(j | i) over the classes i, how much class j comes
    along with the others; such a class cannot be kept rare, so it is made frequent.
    ``frequency``: by the source's positives. ``random``: a seeded permutation. Ties are
    broken by a seeded permutation in every case.
    """
    space = LabelSpace.from_label_sets([str(c) for c in range(num_classes)], label_sets)
    if rank_by == "cooccurrence":
        score = space.conditional().sum(axis=0)
    elif rank_by == "frequency":
        score = space.frequency.astype(np.float64)
    elif rank_by == "random":
        score = np.zeros(num_classes)
    else:
        raise ValueError(f"rank_by {rank_by!r}: expected cooccurrence, frequency or random")
    tie = rng.permutation(num_classes)
    return np.lexsort((tie, -score))


@dataclass
class LongTailSample:
    """The sampled training images and how each class came out against its target."""

    selected: np.ndarray  # sorted indices into the input
    ranking: np.ndarray  # class ids, largest target first
    target: np.ndarray  # (C,) per class id, capped at what the source holds
    profile: np.ndarray  # (C,) the Pareto target before the cap
    counts: np.ndarray  # (C,) positives among the selected images
    available: np.ndarray  # (C,) positives in the source


def sample_long_tailed(
    label_sets: list[tuple[int, ...]],
    num_classes: int,
    alpha: float = 6.0,
    max_count: int = 1200,
    min_count: int = 1,
    tail: float = 0.99,
    rank_by: str = "cooccurrence",
    seed: int = 0,
) -> LongTailSample:
    """Pick images so that class counts follow ``pareto_targets``.

    Classes are served from the largest target down (Wu et al.'s order). Class c, holding h
    positives among the images picked so far (its co-occurrences), gets t_c - h more images
    with c, or, when h > t_c, loses h - t_c of its picked images. Where Wu et al. pick at
    random, each step here takes the image that pushes the fewest other classes past their
    targets (or, when dropping, below them), a seeded order among equals. A class served
    early can still move when a later class adds or drops images it shares; the report shows
    every class's count against its target.
    """
    rng = np.random.default_rng(seed)
    labels = [tuple(sorted({int(c) for c in ids})) for ids in label_sets]
    ranking = class_ranking(labels, num_classes, rank_by, rng)
    profile = np.zeros(num_classes, dtype=np.int64)
    profile[ranking] = pareto_targets(num_classes, alpha, max_count, min_count, tail)
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for i, ids in enumerate(labels):
        for c in ids:
            members[c].append(i)
    available = np.array([len(m) for m in members], dtype=np.int64)
    target = np.minimum(profile, available)
    short = [c for c in range(num_classes) if profile[c] > available[c]]
    if short:
        log.warning(
            "%d classes have fewer images than their Pareto target; they keep all they have "
            "(class ids %s)",
            len(short),
            short[:20],
        )
    counts = np.zeros(num_classes, dtype=np.int64)
    picked = np.zeros(len(labels), dtype=bool)
    order = rng.permutation(len(labels))

    def excess(i: int, c: int) -> int:
        return sum(1 for d in labels[i] if d != c and counts[d] + 1 > target[d])

    def shortfall(i: int, c: int) -> int:
        return sum(1 for d in labels[i] if d != c and counts[d] - 1 < target[d])

    def move(c: int, candidates: list[int], cost, add: bool) -> None:
        """Add (or drop) images of class c until it holds its target, cheapest first; the
        cost only grows as counts move, so a stale heap key is re-pushed, not trusted."""
        heap = [(cost(i, c), int(order[i]), i) for i in candidates]
        heapq.heapify(heap)
        while heap and (counts[c] < target[c] if add else counts[c] > target[c]):
            key, r, i = heapq.heappop(heap)
            now = cost(i, c)
            if now > key:
                heapq.heappush(heap, (now, r, i))
                continue
            picked[i] = add
            counts[list(labels[i])] += 1 if add else -1

    for c in ranking:  # largest target first
        if counts[c] < target[c]:
            move(c, [i for i in members[c] if not picked[i]], excess, add=True)
        elif counts[c] > target[c]:
            move(c, [i for i in members[c] if picked[i]], shortfall, add=False)
    return LongTailSample(np.flatnonzero(picked), ranking, target, profile, counts, available)


@dataclass
class SplitLTConfig:
    """What ``ltdist data split-lt`` reads, samples and writes."""

    manifest: str = ""  # the balanced source set (JSONL, ltdist.data.manifest)
    classes: str = ""  # classes.txt (one name per line) or a classes.json
    out: str = "data/split_lt"  # train.jsonl, val.jsonl, test.jsonl, split_lt.json, split_lt.png
    image_root: str = ""  # overrides the manifest's folder for relative image paths
    policy: Literal["error", "skip"] = "error"
    check_files: bool = True  # refuse records whose image file is missing
    alpha: float = 6.0  # Pareto shape (Wu et al.: 6 for both benchmarks)
    max_per_class: int = 1200  # the largest target (COCO-LT 1200, VOC-LT 800)
    min_per_class: int = 1  # the profile's floor (the smallest target is above it)
    tail_quantile: float = 0.99  # the profile spans the Pareto quantiles 0 .. this
    rank_by: Literal["cooccurrence", "frequency", "random"] = "cooccurrence"
    seed: int = 0
    # The validation split: "rest" = a stratified share of the images not picked for train
    # (balanced like test, as the benchmarks' test sets); "train" = carved from the long-tailed
    # sample (ltdist.data.stratify: each class keeps a training positive); "none".
    val_from: Literal["rest", "train", "none"] = "rest"
    val_fraction: float = 0.1  # of the rest (val_from=rest) or of the sample (val_from=train)
    write_test: bool = True  # test.jsonl: every image in neither train nor val
    plot: bool = True  # split_lt.png: the train profile against its target

    def validate(self) -> None:
        if not self.manifest or not self.classes:
            raise ValueError("split-lt needs `manifest` and `classes`")
        if self.val_from != "none" and not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        pareto_targets(1, self.alpha, self.max_per_class, self.min_per_class, self.tail_quantile)


@dataclass
class SplitLTResult:
    splits: dict[str, list[Record]]
    space: LabelSpace  # names with the statistics of the final train split
    sample: LongTailSample
    files: dict[str, str] = field(default_factory=dict)


def split_long_tailed(cfg: SplitLTConfig) -> SplitLTResult:
    """Read the source, sample the train split, carve val, write the manifests and the report."""
    names = read_class_names(cfg.classes)
    source = read_manifest(
        cfg.manifest,
        names,
        image_root=cfg.image_root or None,
        policy=cfg.policy,
        check_files=cfg.check_files,
        allow_empty_labels=True,
    ).records
    source = sorted(source, key=lambda r: r.key)  # the input's line order does not matter
    sample = sample_long_tailed(
        [r.label_ids for r in source],
        len(names),
        cfg.alpha,
        cfg.max_per_class,
        cfg.min_per_class,
        cfg.tail_quantile,
        cfg.rank_by,
        cfg.seed,
    )
    chosen = set(sample.selected.tolist())
    train = [source[i] for i in sample.selected]
    rest = [r for i, r in enumerate(source) if i not in chosen]
    val: list[Record] = []
    if cfg.val_from == "train":
        train, val, _ = carve_records(train, len(names), cfg.val_fraction, cfg.seed)
    elif cfg.val_from == "rest" and rest:
        rest, val, _ = carve_records(rest, len(names), cfg.val_fraction, cfg.seed)
    splits = {"train": train}
    if cfg.val_from != "none":
        splits["val"] = val
    if cfg.write_test:
        splits["test"] = rest
    space = LabelSpace.from_label_sets(names, (r.label_ids for r in train))
    out = Path(cfg.out)
    files = {}
    for split, records in splits.items():
        files[split] = str(out / f"{split}.jsonl")
        write_manifest(files[split], records, names)
    report = split_report(space, sample, {s: len(r) for s, r in splits.items()}, cfg)
    files["report"] = str(out / REPORT_FILE)
    storage.write_bytes_atomic(files["report"], json.dumps(report, indent=1).encode())
    if cfg.plot:
        files["plot"] = str(out / PLOT_FILE)
        storage.write_bytes_atomic(files["plot"], plot_profile(space, sample))
    return SplitLTResult(splits, space, sample, files)


def split_report(
    space: LabelSpace, sample: LongTailSample, sizes: dict[str, int], cfg: SplitLTConfig
) -> dict:
    """``split_lt.json``: the settings, split sizes, group counts and per-class numbers."""

    return {
        "config": to_dict(cfg),
        "images": sizes,
        "groups": space.group_counts(),
        "classes": [
            {
                "id": c,
                "name": space.names[c],
                "rank": int(np.flatnonzero(sample.ranking == c)[0]),
                "target": int(sample.profile[c]),
                "sampled": int(sample.counts[c]),
                "train": int(space.frequency[c]),
                "available": int(sample.available[c]),
                "group": space.groups[c],
            }
            for c in range(space.num_classes)
        ],
    }


def histogram(space: LabelSpace, sample: LongTailSample, width: int = 50) -> str:
    """Per-class text histogram of the train split, most frequent first, with targets."""
    freq = space.frequency
    top = max(int(freq.max()), 1)
    name_w = max(len(n) for n in space.names)
    lines = [f"{'class':<{name_w}}  {'train':>6}  {'target':>6}  group"]
    for c in sorted(range(space.num_classes), key=lambda c: (-freq[c], c)):
        bar = "#" * (max(1, round(width * freq[c] / top)) if freq[c] else 0)
        lines.append(
            f"{space.names[c]:<{name_w}}  {int(freq[c]):>6}  {int(sample.profile[c]):>6}  "
            f"{space.groups[c]:<6}  {bar}"
        )
    counts = space.group_counts()
    lines.append(
        f"groups (head >= {HEAD_MIN}, medium {MEDIUM_MIN}..{HEAD_MIN - 1}, tail < {MEDIUM_MIN}): "
        + " / ".join(f"{g} {counts[g]}" for g in GROUPS)
    )
    return "\n".join(lines)


def plot_profile(space: LabelSpace, sample: LongTailSample) -> bytes:
    """PNG: train positives per class (sorted, log scale) coloured by group, the Pareto target
    and the group boundaries."""
    from matplotlib.figure import Figure

    order = np.argsort(-space.frequency, kind="stable")
    freq = space.frequency[order]
    fig = Figure(figsize=(9.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    x = np.arange(space.num_classes)
    for g in GROUPS:
        sel = np.array([group_of(int(f)) == g for f in freq])
        ax.bar(x[sel], np.maximum(freq[sel], 0.5), color=_COLOURS[g], label=f"{g} ({sel.sum()})")
    ax.plot(x, np.sort(sample.profile)[::-1], color="0.2", linewidth=1.2, label="Pareto target")
    for edge in (MEDIUM_MIN, HEAD_MIN):
        ax.axhline(edge, color="0.6", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("class (sorted by training positives)")
    ax.set_ylabel("training positives (log scale)")
    ax.set_title(f"Long-tailed train split: {space.num_train_images} images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()

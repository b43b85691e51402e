"""The bundled demo data set: generated, long-tailed, multi-label images with captions.

It exists so that the whole pipeline (manifest -> STAG -> shards -> training -> evaluation) can be
run and tested in minutes on a laptop, with no download. Every class is an object whose
(shape, colour, pattern) identifies it; colours and shapes are each shared by several classes,
so a model has to see both. Training frequencies follow a truncated Pareto profile chosen so that
the benchmark rule (head >= 100, medium 20..99, tail < 20) gives several classes per group, and
some tail classes mostly appear beside one head class ('surfboard' beside 'person'), as they do
in COCO. The test split is flatter so that tail AP is measured on enough positives.

Everything is a function of ``DemoConfig.seed``: the same config gives byte-identical files.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ltdist.labels import LabelSpace

log = logging.getLogger(__name__)

SPLITS = ("train", "test")

# Class table in frequency-rank order (rank 0 is the most frequent): name, shape, colour, pattern.
# Each (shape, colour) pair is unique; each colour and each shape recurs across classes.
CLASS_TABLE: tuple[tuple[str, str, str, str], ...] = (
    ("person", "circle", "red", "solid"),
    ("car", "square", "blue", "solid"),
    ("dog", "triangle", "yellow", "solid"),
    ("chair", "diamond", "green", "stripes"),
    ("horse", "hexagon", "orange", "solid"),
    ("bicycle", "ring", "blue", "solid"),
    ("cup", "cross", "red", "stripes"),
    ("bird", "star", "yellow", "solid"),
    ("boat", "crescent", "cyan", "solid"),
    ("umbrella", "triangle", "purple", "dots"),
    ("clock", "ring", "white", "solid"),
    ("bench", "square", "orange", "checks"),
    ("surfboard", "diamond", "cyan", "stripes"),
    ("kite", "star", "purple", "solid"),
    ("frisbee", "circle", "green", "dots"),
    ("traffic light", "square", "red", "dots"),
    ("saddle", "crescent", "orange", "stripes"),
    ("teddy bear", "hexagon", "purple", "dots"),
    ("giraffe", "diamond", "yellow", "checks"),
    ("toaster", "cross", "white", "solid"),
    ("laptop", "hexagon", "blue", "stripes"),
    ("banana", "crescent", "yellow", "solid"),
    ("sheep", "circle", "white", "checks"),
    ("cake", "triangle", "green", "stripes"),
)
MAX_CLASSES = len(CLASS_TABLE)

# Rare class -> the frequent class it mostly appears beside (used when both are in the config).
COMPANIONS: dict[str, str] = {
    "surfboard": "person",
    "kite": "person",
    "frisbee": "dog",
    "traffic light": "car",
    "saddle": "horse",
}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 210, 220),
    "blue": (40, 80, 225),
    "purple": (150, 60, 200),
    "white": (240, 240, 240),
}
# Muted backgrounds, named for the captions.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "grey": (105, 105, 105),
    "beige": (170, 155, 120),
    "dark green": (50, 78, 55),
    "navy": (38, 44, 82),
    "brown": (105, 78, 58),
    "slate": (78, 92, 108),
}
CAPTION_TEMPLATES = (
    "{objs} on a {bg} background",
    "a photo of {objs}",
    "{objs} against a {bg} backdrop",
    "a picture showing {objs}",
    "a {bg} scene with {objs}",
    "there is {objs} in the picture",
    "{objs}",
)


@dataclass
class DemoConfig:
    """How the demo set is generated; every field has a default that gives the bundled set."""

    seed: int = 0
    num_classes: int = 20
    num_train: int = 1200
    num_test: int = 600
    image_size: int = 64
    # Training frequencies: quantiles of a Pareto law truncated to [min, max]; alpha -> 0 is
    # log-uniform, larger alpha puts more classes near min_frequency.
    max_frequency: int = 500
    min_frequency: int = 5
    pareto_alpha: float = 0.2
    # Test frequencies: test_min_frequency * (train / train_min) ** test_balance (flatter).
    test_min_frequency: int = 15
    test_balance: float = 0.5
    max_labels: int = 4
    companion_prob: float = 0.85  # share of a rare class's images showing its companion
    caption_drop_prob: float = 0.3  # a caption leaves out one of several objects
    min_object_frac: float = 0.26  # object size as a fraction of the image side
    max_object_frac: float = 0.46

    def __post_init__(self) -> None:
        if not 1 <= self.num_classes <= MAX_CLASSES:
            raise ValueError(f"num_classes must be 1..{MAX_CLASSES}, got {self.num_classes}")
        if not 1 <= self.min_frequency <= self.max_frequency:
            raise ValueError("need 1 <= min_frequency <= max_frequency")
        if self.max_frequency > self.num_train:
            raise ValueError(
                f"max_frequency {self.max_frequency} exceeds num_train {self.num_train}"
            )
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.max_labels <= self.num_classes:
            raise ValueError(f"max_labels must be 1..num_classes, got {self.max_labels}")


# -- labels -------------------------------------------------------------------------------


def class_names(cfg: DemoConfig) -> list[str]:
    """Class names in label-id order (which is also frequency-rank order)."""
    return [row[0] for row in CLASS_TABLE[: cfg.num_classes]]


def companion_ids(cfg: DemoConfig) -> dict[int, int]:
    """Rare class id -> companion class id, for the pairs whose two classes are both present."""
    ids = {n: i for i, n in enumerate(class_names(cfg))}
    return {ids[t]: ids[h] for t, h in COMPANIONS.items() if t in ids and h in ids}


def target_frequencies(cfg: DemoConfig) -> dict[str, np.ndarray]:
    """Exact number of positive images per class in each split (the sampler meets them)."""
    c = cfg.num_classes
    lo, hi, a = float(cfg.min_frequency), float(cfg.max_frequency), cfg.pareto_alpha
    cdf = 1.0 - np.arange(c) / max(c - 1, 1)  # rank 0 -> the top quantile
    if a > 1e-9:
        # Inverse CDF of a Pareto(alpha) truncated to [lo, hi].
        train = lo * (1.0 - cdf * (1.0 - (lo / hi) ** a)) ** (-1.0 / a)
    else:
        train = lo * (hi / lo) ** cdf
    train = np.round(train).astype(np.int64)
    test = cfg.test_min_frequency * (train / train.min()) ** cfg.test_balance
    test = np.minimum(np.round(test).astype(np.int64), cfg.num_test)
    return {"train": train, "test": test}


def _sample_split(
    targets: np.ndarray,
    num_images: int,
    companions: dict[int, int],
    cfg: DemoConfig,
    rng: np.random.Generator,
    split: str,
) -> list[list[int]]:
    """Label-id sets for one split with exactly ``targets[c]`` positives per class.

    Rare classes are placed first so their companions can take from the frequent classes'
    quota; images left without a label then take one over from an image that has several.
    """
    total = int(targets.sum())
    if not num_images <= total <= cfg.max_labels * num_images:
        raise ValueError(
            f"{split}: {total} positives cannot give {num_images} images 1..{cfg.max_labels} "
            "labels each; change the frequencies or the number of images"
        )
    labels: list[set[int]] = [set() for _ in range(num_images)]
    quota = targets.astype(np.int64).copy()
    sizes = np.zeros(num_images, dtype=np.int64)
    for c in np.argsort(targets, kind="stable"):
        need = int(quota[c])
        if need <= 0:
            continue
        has_c = np.fromiter((c in s for s in labels), dtype=bool, count=num_images)
        eligible = np.flatnonzero(~has_c & (sizes < cfg.max_labels))
        if len(eligible) < need:
            raise ValueError(f"{split}: class {c} needs {need} images, {len(eligible)} free")
        # Prefer images with few labels, so most images carry 1-2 and few reach max_labels.
        w = 1.0 / (1.0 + 2.0 * sizes[eligible])
        chosen = rng.choice(eligible, size=need, replace=False, p=w / w.sum())
        for i in chosen:
            labels[i].add(int(c))
        sizes[chosen] += 1
        h = companions.get(int(c))
        if h is not None:
            # An exact share of the rare class's images also shows its companion.
            room = [i for i in np.sort(chosen) if sizes[i] < cfg.max_labels and h not in labels[i]]
            k = min(round(cfg.companion_prob * need), len(room), int(quota[h]))
            for i in rng.permutation(room)[:k]:
                labels[i].add(h)
                sizes[i] += 1
            quota[h] -= k
        quota[c] = 0

    # Cover empty images by moving the most frequent movable label of a multi-label image.
    paired = {frozenset(pair) for pair in companions.items()}
    empty = [i for i in range(num_images) if not labels[i]]
    donors = [i for i in rng.permutation(num_images) if sizes[i] >= 2]
    for i in empty:
        while donors:
            d = donors[-1]
            # A companion pair stays together: neither of its two labels moves.
            movable = [c for c in labels[d] if not any({c, o} in paired for o in labels[d])]
            if sizes[d] < 2 or not movable:
                donors.pop()
                continue
            c = max(movable, key=lambda k: (targets[k], k))
            labels[d].remove(c)
            sizes[d] -= 1
            labels[i].add(c)
            sizes[i] += 1
            break
        else:
            raise ValueError(f"{split}: cannot give every image a label; raise the frequencies")
    return [sorted(s) for s in labels]


def sample_labels(cfg: DemoConfig) -> dict[str, list[list[int]]]:
    """Label-id sets of both splits, without rendering: cheap, and identical to build_demo's."""
    targets = target_frequencies(cfg)
    companions = companion_ids(cfg)
    sizes = {"train": cfg.num_train, "test": cfg.num_test}
    return {
        split: _sample_split(
            targets[split],
            sizes[split],
            companions,
            cfg,
            np.random.default_rng([cfg.seed, k, 1]),
            split,
        )
        for k, split in enumerate(SPLITS)
    }


# -- captions ------------------------------------------------------------------------------


def _with_article(name: str) -> str:
    return ("an " if name[0] in "aeiou" else "a ") + name


def make_caption(
    names: list[str], background: str, rng: np.random.Generator, drop_prob: float = 0.3
) -> str:
    """A short caption naming the objects, sometimes leaving one out as real captions do."""
    names = list(names)
    rng.shuffle(names)
    if len(names) >= 2 and rng.random() < drop_prob:
        names.pop(int(rng.integers(len(names))))
    phrases = [_with_article(n) for n in names]
    objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(objs=objs, bg=background)


# -- rendering -----------------------------------------------------------------------------


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of a unit shape in local coordinates u, v in [-1, 1] (v points down)."""
    r = np.hypot(u, v)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.82
    if shape == "triangle":  # apex up
        return (v <= 0.8) & (np.abs(u) <= (v + 0.95) * 0.55)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1.0
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | (
            (np.abs(v) <= 0.3) & (np.abs(u) <= 0.95)
        )
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "star":
        phi = np.arctan2(v, u)
        return r <= 0.62 + 0.38 * np.cos(5.0 * (phi + np.pi / 2))
    if shape == "hexagon":
        return np.maximum(np.abs(u) * 0.866 + np.abs(v) * 0.5, np.abs(v)) <= 0.9
    if shape == "crescent":
        return (r <= 1.0) & (np.hypot(u - 0.45, v + 0.1) > 0.78)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(pattern: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Where the darker second tone of a pattern goes."""
    if pattern == "solid":
        return np.zeros(u.shape, dtype=bool)
    if pattern == "stripes":
        return np.sin((u + v) * 7.0) > 0.25
    if pattern == "dots":
        return np.hypot((u * 2.2) % 1.0 - 0.5, (v * 2.2) % 1.0 - 0.5) < 0.22
    if pattern == "checks":
        return (np.floor((u + 1.0) * 2.0) + np.floor((v + 1.0) * 2.0)) % 2 == 1
    raise ValueError(f"unknown pattern {pattern!r}")


@functools.lru_cache(maxsize=8)
def _interp_matrix(size: int, n: int) -> np.ndarray:
    """(size, n) weights that linearly interpolate n grid values onto size pixels."""
    pos = np.linspace(0.0, n - 1.0, size)
    lo = np.minimum(np.floor(pos).astype(np.int64), n - 2)
    frac = (pos - lo).astype(np.float32)
    w = np.zeros((size, n), dtype=np.float32)
    w[np.arange(size), lo] = 1.0 - frac
    w[np.arange(size), lo + 1] = frac
    return w


def _background(size: int, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A muted colour with low-frequency blotches, as float32 (H, W, 3)."""
    name = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    base = np.asarray(BACKGROUNDS[name], dtype=np.float32)
    coarse = rng.normal(0.0, 18.0, size=(5, 5, 3)).astype(np.float32)
    # Bilinear upsampling of the coarse grid: blotch = W @ coarse @ W^T per channel.
    w = _interp_matrix(size, 5)
    blotch = np.tensordot(np.tensordot(w, coarse, axes=(1, 0)), w, axes=(1, 1))  # (H, 3, W)
    return name, base + blotch.transpose(0, 2, 1)


def _draw_object(
    canvas: np.ndarray, class_id: int, cx: float, cy: float, radius: float, rng: np.random.Generator
) -> None:
    """Paint one object in place: its class's shape, colour and pattern, jittered and shaded."""
    _, shape, colour, pattern = CLASS_TABLE[class_id]
    size = canvas.shape[0]
    x0, x1 = max(int(cx - radius * 1.3), 0), min(int(cx + radius * 1.3) + 2, size)
    y0, y1 = max(int(cy - radius * 1.3), 0), min(int(cy + radius * 1.3) + 2, size)
    if x0 >= x1 or y0 >= y1:
        return
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    theta = rng.uniform(-0.45, 0.45)
    aspect = rng.uniform(0.85, 1.15)
    dx, dy = (xs + 0.5 - cx) / radius, (ys + 0.5 - cy) / radius
    u = (np.cos(theta) * dx + np.sin(theta) * dy) * aspect
    v = (-np.sin(theta) * dx + np.cos(theta) * dy) / aspect
    mask = _shape_mask(shape, u, v)
    rgb = np.asarray(COLOURS[colour], dtype=np.float32) * rng.uniform(0.85, 1.08, size=3)
    tone = np.where(_pattern_mask(pattern, u, v)[..., None], 0.45, 1.0)
    light = 1.0 + 0.15 * (np.cos(rng.uniform(0, 2 * np.pi)) * u + 0.5 * v)[..., None]
    patch = rgb * tone * light
    region = canvas[y0:y1, x0:x1]
    region[mask] = patch[mask]


def render_image(
    label_ids: list[int], cfg: DemoConfig, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """Draw one image (uint8 (H, W, 3)) holding one object per label; returns it and its
    background's name. Rendered at twice the size and box-downsampled for smooth edges."""
    size = 2 * cfg.image_size
    name, canvas = _background(size, rng)
    placed: list[tuple[float, float, float]] = []
    for c in rng.permutation(label_ids):
        radius = rng.uniform(cfg.min_object_frac, cfg.max_object_frac) * size / 2
        best, best_gap = None, -np.inf
        for _ in range(8):  # a few tries for a spot that keeps objects mostly visible
            cx, cy = rng.uniform(radius * 0.8, size - radius * 0.8, size=2)
            gaps = [np.hypot(cx - x, cy - y) - 0.7 * (radius + r) for x, y, r in placed]
            gap = min(gaps, default=np.inf)
            if gap > best_gap:
                best, best_gap = (cx, cy), gap
            if gap >= 0:
                break
        placed.append((best[0], best[1], radius))
        _draw_object(canvas, int(c), best[0], best[1], radius, rng)
    # 2x2 box filter, then pixel noise at the output resolution.
    small = 0.25 * (
        canvas[0::2, 0::2] + canvas[1::2, 0::2] + canvas[0::2, 1::2] + canvas[1::2, 1::2]
    )
    small += rng.normal(0.0, 6.0, size=small.shape).astype(np.float32)
    return np.clip(np.round(small), 0, 255).astype(np.uint8), name


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes with fixed settings and no metadata, so equal pixels give equal files."""
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


# -- build ---------------------------------------------------------------------------------


def build_demo(out_dir: str | Path, cfg: DemoConfig | None = None) -> dict:
    """Write the demo set to ``out_dir``: classes.txt, images/<split>/*.png, <split>.jsonl.

    Returns a summary (image counts, per-class frequencies, the training group counts).
    """
    cfg = cfg or DemoConfig()
    out = Path(out_dir)
    names = class_names(cfg)
    start = time.perf_counter()
    label_sets = sample_labels(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("".join(n + "\n" for n in names))
    log.info("building demo set in %s (%s)", out, asdict(cfg))

    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety
        tqdm = None

    for k, split in enumerate(SPLITS):
        img_dir = out / "images" / split
        img_dir.mkdir(parents=True, exist_ok=True)
        wanted = {f"{i:06d}.png" for i in range(len(label_sets[split]))}
        for stale in img_dir.glob("*.png"):  # left over from a larger earlier build
            if stale.name not in wanted:
                stale.unlink()
        lines = []
        rows = enumerate(label_sets[split])
        if tqdm is not None:
            rows = tqdm(rows, total=len(label_sets[split]), desc=f"demo {split}", disable=None)
        for i, ids in rows:
            # One generator per image: an image depends on (seed, split, index) only.
            rng = np.random.default_rng([cfg.seed, k, 2, i])
            image, background = render_image(ids, cfg, rng)
            (img_dir / f"{i:06d}.png").write_bytes(encode_png(image))
            record = {
                "key": f"{split}_{i:06d}",
                "image": f"images/{split}/{i:06d}.png",
                "labels": [names[c] for c in ids],
                "caption": make_caption(
                    [names[c] for c in ids], background, rng, cfg.caption_drop_prob
                ),
            }
            lines.append(json.dumps(record) + "\n")
        (out / f"{split}.jsonl").write_text("".join(lines))

    space = LabelSpace.from_label_sets(names, label_sets["train"])
    test_freq = LabelSpace.from_label_sets(names, label_sets["test"]).frequency
    summary = {
        "num_classes": cfg.num_classes,
        "num_images": {s: len(label_sets[s]) for s in SPLITS},
        "train_frequency": space.frequency.tolist(),
        "test_frequency": test_freq.tolist(),
        "groups": space.group_counts(),
    }
    log.info(
        "demo set: %d train / %d test images, groups %s, train frequency %d..%d, %.1f s",
        cfg.num_train,
        cfg.num_test,
        summary["groups"],
        int(space.frequency.min()),
        int(space.frequency.max()),
        time.perf_counter() - start,
    )
    return summary

"""A validation split carved from a training split, stratified over the labels.

Threshold tuning and checkpoint selection need a split the model does not train on and that
holds positives of every class, including tail classes with a handful of images. A random
10% of COCO-LT's training images leaves on average 8.4 of its 25 tail classes without a
validation positive (100 seeds), so the carve is iterative (in the spirit of Sechidis et al.
2011): classes are served from the rarest up, each gets its quota of validation positives,
and every class keeps at least one training positive. Deterministic for a seed and
independent of the input order (records are sorted by key first).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ltdist.data.manifest import Record

log = logging.getLogger(__name__)


@dataclass
class Carve:
    """Which images went to validation, and what each class holds on either side."""

    val: np.ndarray  # sorted indices into the input
    train: np.ndarray  # sorted indices: the others
    train_positives: np.ndarray  # (C,)
    val_positives: np.ndarray  # (C,)
    quota: np.ndarray  # (C,) validation positives each class asked for
    single: list[int]  # classes with exactly one positive: it stays in train, none in val

    def lacking(self) -> list[int]:
        """Classes with training positives but no validation positive (too few images)."""
        return [
            c
            for c in range(len(self.quota))
            if self.train_positives[c] > 0 and self.val_positives[c] == 0
        ]


def val_quota(positives: np.ndarray, fraction: float, min_val: int = 1) -> np.ndarray:
    """Validation positives per class: round(fraction * n), at least ``min_val`` and at most
    n - 1 (one positive always stays in train); 0 for classes with fewer than 2 positives."""
    n = np.asarray(positives, dtype=np.int64)
    want = np.floor(fraction * n + 0.5).astype(np.int64)  # round half up, not to even
    want = np.maximum(want, min_val)
    return np.where(n >= 2, np.minimum(want, n - 1), 0)


def stratified_carve(
    label_sets: Sequence[Sequence[int]],
    num_classes: int,
    fraction: float,
    seed: int = 0,
    min_val: int = 1,
) -> Carve:
    """Carve about ``fraction`` of the images into validation, class by class from the rarest.

    For class c (fewest positives first), its unassigned images are taken into validation
    until c holds its quota (``val_quota``), preferring images that push no other class past
    its own quota (a seeded random order among equals); the images of c not taken are fixed
    to train, so later classes cannot move them. No image may take any class's validation
    count past n - 1. Unlabelled images go to validation in the same ``fraction``.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    n_images = len(label_sets)
    labels = [sorted({int(c) for c in ids}) for ids in label_sets]
    members: list[list[int]] = [[] for _ in range(num_classes)]
    for i, ids in enumerate(labels):
        for c in ids:
            members[c].append(i)
    positives = np.array([len(m) for m in members], dtype=np.int64)
    quota = val_quota(positives, fraction, min_val)
    cap = np.maximum(positives - 1, 0)  # the most a class may hold in validation
    val_count = np.zeros(num_classes, dtype=np.int64)
    state = np.zeros(n_images, dtype=np.int8)  # 0 open, 1 train, 2 val
    rank = rng.permutation(n_images)  # the tie-break among equally good images

    def excess(i: int, c: int) -> int:
        return sum(1 for d in labels[i] if d != c and val_count[d] + 1 > quota[d])

    for c in sorted(range(num_classes), key=lambda c: (positives[c], c)):
        if positives[c] == 0:
            continue
        open_ids = [i for i in members[c] if state[i] == 0]
        heap = [(excess(i, c), int(rank[i]), i) for i in open_ids]
        heapq.heapify(heap)
        while heap and val_count[c] < quota[c]:
            key, r, i = heapq.heappop(heap)
            now = excess(i, c)
            if now > key:  # an earlier pick made it worse: back in line with its new key
                heapq.heappush(heap, (now, r, i))
                continue
            if any(val_count[d] + 1 > cap[d] for d in labels[i]):
                continue  # would leave some class without a training positive
            state[i] = 2
            val_count[labels[i]] += 1
        for i in members[c]:
            if state[i] == 0:
                state[i] = 1
    unlabelled = [i for i in range(n_images) if not labels[i]]
    if unlabelled:
        take = math.floor(fraction * len(unlabelled) + 0.5)
        chosen = sorted(unlabelled, key=lambda i: rank[i])[:take]
        state[chosen] = 2
    val = np.flatnonzero(state == 2)
    train = np.flatnonzero(state != 2)
    return Carve(
        val=val,
        train=train,
        train_positives=positives - val_count,
        val_positives=val_count,
        quota=quota,
        single=[c for c in range(num_classes) if positives[c] == 1],
    )


def carve_records(
    records: Sequence[Record], num_classes: int, fraction: float, seed: int = 0, min_val: int = 1
) -> tuple[list[Record], list[Record], Carve]:
    """``stratified_carve`` on records sorted by key: (train, val, carve)."""
    ordered = sorted(records, key=lambda r: r.key)
    carve = stratified_carve([r.label_ids for r in ordered], num_classes, fraction, seed, min_val)
    if carve.single:
        log.info(
            "val carve: %d classes have one training positive; it stays in train (ids %s)",
            len(carve.single),
            carve.single[:20],
        )
    return [ordered[i] for i in carve.train], [ordered[i] for i in carve.val], carve

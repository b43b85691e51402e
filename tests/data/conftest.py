"""Small real shard folders for the shard and loader tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from ltdist.data.pack import write_classes
from ltdist.data.shards import ShardSample, ShardWriter, sample_meta
from ltdist.labels import LabelSpace

NUM_CLASSES = 5


def png(value: int, size: int = 8) -> bytes:
    """A tiny image whose pixel values encode ``value`` (so decoded images are checkable)."""
    arr = np.full((size, size, 3), value % 256, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def label_ids(i: int) -> list[int]:
    return sorted({i % NUM_CLASSES, (i * 7) % NUM_CLASSES})


def write_dataset(location: str, n: int, samples_per_shard: int, split: str = "train") -> list[str]:
    """A split of ``n`` samples with keys s00000.. in key order; returns the keys."""
    keys = [f"s{i:05d}" for i in range(n)]
    space = LabelSpace.from_label_sets(
        [f"c{c}" for c in range(NUM_CLASSES)], map(label_ids, range(n))
    )
    write_classes(location, space)
    writer = ShardWriter(location, split, samples_per_shard, n)
    for k in writer.index.missing():
        rows = range(k * samples_per_shard, min(n, (k + 1) * samples_per_shard))
        samples = [
            ShardSample(
                keys[i],
                sample_meta(label_ids(i), space, caption=f"cap {i}"),
                png(i),
                "png",
                f"txt {i}",
            )
            for i in rows
        ]
        writer.write_shard(k, samples)
    return keys


@pytest.fixture
def dataset(tmp_path):
    """Factory: dataset(n, samples_per_shard) -> (location, keys)."""

    def make(n: int, samples_per_shard: int, split: str = "train"):
        location = str(tmp_path / f"ds_{n}_{samples_per_shard}")
        return location, write_dataset(location, n, samples_per_shard, split)

    return make

"""Stand-in data for a rehearsal: images generated at a split's own file names, packed by the
real packer, so the run reads what the cluster run will read but for the pixels.

For COCO-LT / VOC-LT the records (paths, labels, captions) come from the split files and the
label space from the whole training split (its real frequencies and groups); only the first
``num_train`` / ``num_test`` records get an image. The demo set is its own generator, at a
reduced size.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

SAMPLES_PER_SHARD = 8  # several shards per split: every rank and loader worker gets its own


@dataclass
class StandinData:
    location: str  # the shard folder
    image_root: str  # where the stand-in images are (at the split files' paths)
    test_images: list[str]  # a few image files, for predict
    num_train: int
    num_test: int


def standin_image(key: str, label_ids: tuple[int, ...], size: int) -> bytes:
    """A JPEG whose content depends on the key and labels (one colour bar per label)."""
    from PIL import Image

    seed = int.from_bytes(hashlib.sha256(f"{key}{label_ids}".encode()).digest()[:4], "big")
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 64, (size, size, 3), dtype=np.uint8)
    for i, label in enumerate(label_ids[:8]):
        colour = np.array([(label * 37) % 256, (label * 91) % 256, (label * 53) % 256])
        pixels[i * size // 8 : (i + 1) * size // 8] = colour
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_standin(
    dataset: str,
    work: str,
    splits_dir: str,
    num_train: int = 32,
    num_test: int = 16,
    image_size: int = 96,
) -> StandinData:
    """Shards of ``dataset`` (coco_lt, voc_lt, demo) under ``work``; reruns reuse them."""
    location = os.path.join(work, "shards")
    if dataset == "demo":
        return _demo(work, location)
    if dataset not in ("coco_lt", "voc_lt"):
        raise ValueError(
            f"data.dataset={dataset!r}: a rehearsal run makes stand-in data for coco_lt, voc_lt "
            "or demo; set data.dataset to the benchmark the config trains on"
        )
    from ltdist.data.pack import pack_split, write_classes
    from ltdist.data.splits import label_space, load_split_records

    root = os.path.join(work, "images")
    space = label_space(dataset, splits_dir)
    write_classes(location, space)
    test_images: list[str] = []
    for split, count in (("train", num_train), ("test", num_test)):
        records = load_split_records(dataset, splits_dir, split, image_root=root)[:count]
        for r in records:
            if not os.path.exists(r.image):
                os.makedirs(os.path.dirname(r.image), exist_ok=True)
                with open(r.image, "wb") as f:
                    f.write(standin_image(r.key, r.label_ids, image_size))
        pack_split(records, space, location, split, SAMPLES_PER_SHARD, progress=False)
        if split == "test":
            test_images = [r.image for r in records[:3]]
    return StandinData(location, root, test_images, num_train, num_test)


def small_demo_config():
    """The demo's class profile at a fifth of its size (its sampler needs room per class)."""
    from ltdist.data.demo import DemoConfig

    return DemoConfig(
        num_train=240, num_test=120, max_frequency=100, min_frequency=2, test_min_frequency=3
    )


def _demo(work: str, location: str) -> StandinData:
    from ltdist.config import load_config
    from ltdist.data.demo import build_demo
    from ltdist.data.pack import PackConfig, pack_dataset

    data = os.path.join(work, "demo")
    demo = small_demo_config()
    if not os.path.exists(os.path.join(data, "test.jsonl")):
        build_demo(data, demo)
    pack = load_config(
        PackConfig,
        None,
        [
            f"out={location}",
            f"classes={os.path.join(data, 'classes.txt')}",
            f"manifests.train={os.path.join(data, 'train.jsonl')}",
            f"manifests.test={os.path.join(data, 'test.jsonl')}",
            f"samples_per_shard={SAMPLES_PER_SHARD}",
        ],
    )
    pack_dataset(pack, progress=False)
    images = sorted(
        os.path.join(dirpath, f)
        for dirpath, _, files in os.walk(data)
        for f in files
        if f.endswith((".png", ".jpg"))
    )
    return StandinData(location, data, images[:3], demo.num_train, demo.num_test)

"""Fixtures in the real COCO / VOC formats, written by the tests (never copied from the data sets).

The label sets come from the published split files, so a converter's output can be compared
with the split file image for image.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from ltdist.data.splits import BENCHMARKS, class_names, load_split_records

_HERE = Path(__file__).resolve()
# The repository's own shared/ (a checkout beside the data) or the one above it (/work/shared).
SHARED_CANDIDATES = [p / "shared" / "benchmarks" for p in (_HERE.parents[2], _HERE.parents[3])]


def shared_dir() -> Path:
    for folder in SHARED_CANDIDATES:
        if all((folder / b / f).is_file() for b, s in BENCHMARKS.items() for f in s.files):
            return folder
    pytest.fail(f"benchmark split files not found under any of {SHARED_CANDIDATES}")


def jpeg(value: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (value % 256, 40, 90)).save(buf, format="JPEG")
    return buf.getvalue()


def coco_category_ids(names: list[str], seed: int = 0) -> dict[str, int]:
    """COCO-style category ids (1..90 with gaps), shuffled against the benchmark's class order."""
    rng = random.Random(seed)
    ids = rng.sample(range(1, 91), len(names))
    return dict(zip(names, ids))


def coco_instances(
    image_labels: dict[str, list[str]], extra_images: int = 0, seed: int = 0
) -> tuple[dict, dict[str, int]]:
    """An instances JSON (images, annotations with iscrowd, categories) whose label sets are
    ``image_labels`` (file name -> class names); every fourth image gets a crowd annotation of
    its first class and each label one to three instances. Categories are listed shuffled."""
    shared = shared_dir()
    names = class_names("coco_lt", shared)
    cat_ids = coco_category_ids(names, seed)
    rng = random.Random(seed)
    categories = [{"id": cat_ids[n], "name": n, "supercategory": "x"} for n in names]
    rng.shuffle(categories)
    images, annotations = [], []
    for i, (file_name, labels) in enumerate(image_labels.items()):
        image_id = 1000 + 7 * i
        images.append({"id": image_id, "file_name": file_name, "width": 8, "height": 8})
        for j, name in enumerate(labels):
            for _ in range(rng.randint(1, 3)):
                annotations.append(
                    {"image_id": image_id, "category_id": cat_ids[name], "iscrowd": 0}
                )
            if j == 0 and i % 4 == 0:
                annotations.append(
                    {"image_id": image_id, "category_id": cat_ids[name], "iscrowd": 1}
                )
    for k in range(extra_images):  # images outside the split, with annotations
        images.append({"id": 5 + 7 * k, "file_name": f"9{k:011d}.jpg", "width": 8, "height": 8})
        annotations.append({"image_id": 5 + 7 * k, "category_id": cat_ids["dog"], "iscrowd": 0})
    rng.shuffle(annotations)
    for n, ann in enumerate(annotations, start=1):
        ann["id"] = n
    return {"images": images, "annotations": annotations, "categories": categories}, cat_ids


def split_label_names(bench: str, split: str, limit: int | None = None) -> dict[str, list[str]]:
    """Relative image path -> class names of the published split (file order)."""
    shared = shared_dir()
    names = class_names(bench, shared)
    records = load_split_records(bench, shared, split)[:limit]
    return {r.image: [names[i] for i in r.label_ids] for r in records}


def voc_xml(labels: list[str], difficult: set[int] = frozenset()) -> str:
    objects = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{int(k in difficult)}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        "<xmax>5</xmax><ymax>5</ymax></bndbox></object>"
        for k, n in enumerate(labels)
    )
    return (
        "<annotation><folder>VOC</folder><filename>x.jpg</filename>"
        f"<size><width>8</width><height>8</height><depth>3</depth></size>{objects}</annotation>"
    )


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")

"""COCO 2017 -> labels and captions per image, in a benchmark's class order.

Labels come from ``annotations/instances_<set>.json``: an image's label set is every category
that one of its annotations names, crowd annotations included (the COCO-LT benchmark counts them;
``include_crowd=False`` is the other reading). COCO's category ids (1..90 with gaps) are mapped
to the benchmark's label ids by name through the label space (names and synonyms), never by
position. Captions come from ``annotations/captions_<set>.json``: an image's captions joined
with spaces in the file's order, as the COCO-LT captions file joins them.
"""

from __future__ import annotations

import logging

from ltdist.data.convert import Converted, ConvertError, ConvertProblem, has_surrogate, load_json
from ltdist.labels import LabelSpace, UnknownClassError

log = logging.getLogger(__name__)


def _list_field(data: object, name: str, path: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise ConvertError(f"{path}: not a COCO annotation file (no {name!r} list at the top)")
    return data[name]


def _images(data: object, path: str, image_dir: str, out: Converted) -> tuple[dict[int, str], set]:
    """Image id -> relative path, and the ids given twice: every image with such an id is left
    out (its annotations cannot be told apart)."""
    by_id: dict[int, str] = {}
    duplicate: dict[int, list[str]] = {}
    for n, img in enumerate(_list_field(data, "images", path)):
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str):
            raise ConvertError(f"{path}: images[{n}] has no 'file_name'")
        image_id = img.get("id")
        rel = f"{image_dir}/{img['file_name']}"
        if image_id in by_id or image_id in duplicate:
            duplicate.setdefault(image_id, [by_id.pop(image_id)] if image_id in by_id else [])
            duplicate[image_id].append(rel)
            continue
        by_id[image_id] = rel
    for image_id, rels in duplicate.items():
        for rel in rels:
            out.add_problem(
                rel,
                ConvertProblem(
                    path,
                    f"image id {image_id}",
                    f"image id given {len(rels)} times ({', '.join(rels)}): its annotations "
                    "cannot be told apart",
                ),
            )
    out.count("images", len(by_id))
    return by_id, set(duplicate)


def read_instances(
    path: str, image_dir: str, space: LabelSpace, *, include_crowd: bool = True
) -> Converted:
    """Label ids per image of one COCO instances file; ``image_dir`` prefixes its file names."""
    data = load_json(path)
    out = Converted()
    images, duplicate = _images(data, path, image_dir, out)
    category: dict[int, int] = {}  # COCO category id -> benchmark label id
    unknown: dict[int, str] = {}
    for n, cat in enumerate(_list_field(data, "categories", path)):
        if not isinstance(cat, dict) or "id" not in cat or not isinstance(cat.get("name"), str):
            raise ConvertError(f"{path}: categories[{n}] needs an 'id' and a 'name'")
        if cat["id"] in category or cat["id"] in unknown:
            raise ConvertError(f"{path}: category id {cat['id']} given twice")
        try:
            category[cat["id"]] = space.id_of(cat["name"])
        except UnknownClassError as e:
            unknown[cat["id"]] = f"category id {cat['id']} ({e}); not a class of this benchmark"
    labels: dict[int, dict[int, int]] = {i: {} for i in images}  # label id -> instances
    for n, ann in enumerate(_list_field(data, "annotations", path)):
        if not isinstance(ann, dict) or "image_id" not in ann or "category_id" not in ann:
            raise ConvertError(f"{path}: annotations[{n}] needs an 'image_id' and a 'category_id'")
        image_id, cat_id, ann_id = ann["image_id"], ann["category_id"], ann.get("id", f"#{n}")
        if image_id in duplicate:
            continue
        if image_id not in images:
            out.count("annotations of unknown images")
            continue
        if ann.get("iscrowd"):
            out.count("crowd annotations")
            if not include_crowd:
                continue
        if cat_id in unknown:
            out.add_problem(
                images[image_id],
                ConvertProblem(path, f"annotation id {ann_id}", unknown[cat_id]),
            )
            continue
        if cat_id not in category:
            out.add_problem(
                images[image_id],
                ConvertProblem(
                    path, f"annotation id {ann_id}", f"category id {cat_id} is not in categories"
                ),
            )
            continue
        counts = labels[image_id]
        counts[category[cat_id]] = counts.get(category[cat_id], 0) + 1
        out.count("annotations")
    for image_id, ids in labels.items():
        out.labels[images[image_id]] = tuple(sorted(ids))
        out.instances[images[image_id]] = ids
        if not ids:
            out.count("images without annotations")
    if unknown:
        out.notes.append(f"{path}: {len(unknown)} unknown categories: {list(unknown.values())}")
    if out.counts.get("annotations of unknown images"):
        out.notes.append(
            f"{path}: {out.counts['annotations of unknown images']} annotations name an image "
            "id that is not in 'images' (ignored)"
        )
    return out


def read_captions(path: str, image_dir: str) -> Converted:
    """Captions per image of one COCO captions file, joined in the file's order."""
    data = load_json(path)
    out = Converted()
    images, duplicate = _images(data, path, image_dir, out)
    parts: dict[int, list[str]] = {}
    for n, ann in enumerate(_list_field(data, "annotations", path)):
        if not isinstance(ann, dict) or "image_id" not in ann:
            raise ConvertError(f"{path}: annotations[{n}] needs an 'image_id'")
        image_id, ann_id, caption = ann["image_id"], ann.get("id", f"#{n}"), ann.get("caption")
        if image_id in duplicate:
            continue
        if image_id not in images:
            out.count("captions of unknown images")
            continue
        if not isinstance(caption, str) or has_surrogate(caption):
            out.add_problem(
                images[image_id],
                ConvertProblem(
                    path,
                    f"annotation id {ann_id}",
                    "caption is not text that UTF-8 can write"
                    if isinstance(caption, str)
                    else f"'caption' must be a string, got {type(caption).__name__}",
                ),
            )
            continue
        text = " ".join(caption.split())
        if text:
            parts.setdefault(image_id, []).append(text)
    for image_id, texts in parts.items():
        out.captions[images[image_id]] = " ".join(texts)
        out.caption_lists[images[image_id]] = texts
    out.count("captions", sum(len(t) for t in parts.values()))
    return out


def convert_coco(
    root: str,
    image_dirs: list[str],
    space: LabelSpace,
    *,
    include_crowd: bool = True,
    with_captions: bool = True,
) -> Converted:
    """Labels and captions of the COCO image sets ``image_dirs`` (``train2017``, ``val2017``)
    from ``<root>/annotations/``."""
    out = Converted()
    for image_dir in image_dirs:
        path = f"{root}/annotations/instances_{image_dir}.json"
        log.info("reading %s", path)
        out.update(read_instances(path, image_dir, space, include_crowd=include_crowd))
        if with_captions:
            path = f"{root}/annotations/captions_{image_dir}.json"
            log.info("reading %s", path)
            captions = read_captions(path, image_dir)
            captions.counts.pop("images", None)
            out.update(captions)
    return out

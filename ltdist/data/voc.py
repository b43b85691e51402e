"""Pascal VOC XML -> labels per image, in a benchmark's class order.

An image's label set is every ``<object><name>`` of its ``Annotations/<id>.xml``. Objects marked
``<difficult>1</difficult>`` are kept by default: the VOC-LT benchmark (Wu et al. 2020) counts
every object, difficult included, and its split files list those labels
(``include_difficult=False`` is the other reading, VOC's own evaluation's). Names map to label
ids through the label space (``diningtable``, ``tvmonitor``, ...). VOC has no captions.
"""

from __future__ import annotations

import logging
import posixpath
import xml.etree.ElementTree as ET

from ltdist import storage
from ltdist.data.convert import Converted, ConvertProblem
from ltdist.labels import LabelSpace, UnknownClassError

log = logging.getLogger(__name__)


def annotation_path(image_path: str) -> str:
    """``VOCdevkit/VOC2012/JPEGImages/2008_000023.jpg`` -> ``.../Annotations/2008_000023.xml``."""
    folder, name = posixpath.split(image_path)
    year_dir = posixpath.dirname(folder)
    return posixpath.join(year_dir, "Annotations", posixpath.splitext(name)[0] + ".xml")


def read_annotation(
    path: str, space: LabelSpace, *, include_difficult: bool = True
) -> tuple[tuple[int, ...], int] | ConvertProblem:
    """(label ids, number of difficult objects) of one VOC XML file, or why it cannot be read."""
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        return ConvertProblem(path, "file", "annotation file not found")
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        line, column = e.position
        what = str(e).split(": line ")[0]  # the position is given once, in front
        return ConvertProblem(path, f"line {line}, column {column}", f"malformed XML ({what})")
    objects = root.findall("object")
    if not objects:
        return ConvertProblem(path, "<annotation>", "no <object>: the image has no label")
    ids: set[int] = set()
    difficult = 0
    for n, obj in enumerate(objects, start=1):
        name = (obj.findtext("name") or "").strip()
        if not name:
            return ConvertProblem(path, f"object {n}", "<object> without a <name>")
        is_difficult = (obj.findtext("difficult") or "0").strip() == "1"
        difficult += is_difficult
        if is_difficult and not include_difficult:
            continue
        try:
            ids.add(space.id_of(name))
        except UnknownClassError as e:
            return ConvertProblem(path, f"object {n}", f"{e}; not a class of this benchmark")
    return tuple(sorted(ids)), difficult


def convert_voc(
    root: str, image_paths: list[str], space: LabelSpace, *, include_difficult: bool = True
) -> Converted:
    """Labels of the VOC images ``image_paths`` (relative to ``root``, as the split files name
    them) from their XML files."""
    out = Converted()
    for image_path in image_paths:
        result = read_annotation(
            storage.join(root, annotation_path(image_path)),
            space,
            include_difficult=include_difficult,
        )
        if isinstance(result, ConvertProblem):
            out.add_problem(image_path, result)
            continue
        ids, difficult = result
        out.labels[image_path] = ids
        out.count("images")
        out.count("difficult objects", difficult)
        if not ids:
            out.count("images without labels")
    return out

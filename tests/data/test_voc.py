"""VOC XML -> labels in the benchmark's class order; difficult objects kept as VOC-LT keeps them."""

from __future__ import annotations

import pytest

from ltdist.data.splits import class_names, label_space, load_split_records
from ltdist.data.voc import annotation_path, convert_voc
from tests.data.convert_fixtures import shared_dir, voc_xml

pytestmark = pytest.mark.both_envs


@pytest.fixture(scope="module")
def space():
    return label_space("voc_lt", shared_dir())


def write_voc_annotations(root, records, names, sole_difficult_every: int = 5) -> set[str]:
    """XML for each record: its labels (a second instance for every other one), and for every
    ``sole_difficult_every``-th image its first class present only as a difficult object.
    Returns the images whose label set depends on the difficult objects."""
    depends = set()
    for i, r in enumerate(records):
        labels = [names[j] for j in r.label_ids]
        objects = labels + labels[::2]
        difficult = set()
        if i % sole_difficult_every == 0 and labels:
            difficult = {k for k, n in enumerate(objects) if n == labels[0]}
            depends.add(r.image)
        path = root / annotation_path(r.image)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(voc_xml(objects, difficult))
    return depends


def test_voc_lt_train_split_rebuilt_image_for_image(tmp_path, space):
    """XML files holding the 1,142 VOC-LT training images' objects (some classes present only
    as difficult objects) convert back to the split file's labels, image for image: the
    benchmark counts difficult objects."""
    names = class_names("voc_lt", shared_dir())
    records = load_split_records("voc_lt", shared_dir(), "train")
    depends = write_voc_annotations(tmp_path, records, names)

    out = convert_voc(str(tmp_path), [r.image for r in records], space)
    assert len(records) == 1142 and out.problems == {}
    for r in records:
        assert out.labels[r.image] == r.label_ids, r.image
    assert sum(len(v) for v in out.labels.values()) == 2346  # the published positives
    assert out.counts["images"] == 1142
    assert out.counts["difficult objects"] > 0

    strict = convert_voc(str(tmp_path), [r.image for r in records], space, include_difficult=False)
    differ = {r.image for r in records if strict.labels[r.image] != r.label_ids}
    assert differ == depends and len(depends) == 229  # every fifth of 1,142


def test_bad_xml_is_named_by_file_and_line(tmp_path, space):
    ann = tmp_path / "VOCdevkit/VOC2007/Annotations"
    ann.mkdir(parents=True)
    (ann / "000001.xml").write_text(voc_xml(["dog", "person", "diningtable"], {0}))
    (ann / "000002.xml").write_text("<annotation>\n<object><name>dog</name>\n</annotation>\n")
    (ann / "000003.xml").write_text(voc_xml([]))
    (ann / "000004.xml").write_text(voc_xml(["person", "unicorn"]))
    images = [f"VOCdevkit/VOC2007/JPEGImages/00000{i}.jpg" for i in range(1, 6)]

    out = convert_voc(str(tmp_path), images, space)

    assert out.labels == {images[0]: tuple(space.ids_of(["dog", "person", "dining table"]))}
    assert out.counts == {"images": 1, "difficult objects": 1}
    assert str(out.problems[images[1]]) == (
        f"{ann}/000002.xml: line 3, column 2: malformed XML (mismatched tag)"
    )
    assert str(out.problems[images[2]]) == (
        f"{ann}/000003.xml: <annotation>: no <object>: the image has no label"
    )
    assert str(out.problems[images[3]]).startswith(
        f"{ann}/000004.xml: object 2: unknown class 'unicorn'"
    )
    assert str(out.problems[images[4]]) == f"{ann}/000005.xml: file: annotation file not found"

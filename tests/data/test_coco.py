"""COCO instances / captions -> labels and captions in the benchmark's class order."""

from __future__ import annotations

import pytest

from ltdist.data.coco import read_captions, read_instances
from ltdist.data.convert import ConvertError
from ltdist.data.splits import label_space, load_split_records
from tests.data.convert_fixtures import (
    coco_instances,
    shared_dir,
    split_label_names,
    write_json,
)

pytestmark = pytest.mark.both_envs


@pytest.fixture(scope="module")
def space():
    return label_space("coco_lt", shared_dir())


def test_coco_lt_train_split_rebuilt_image_for_image(tmp_path, space):
    """A fixture instances JSON holding the 1,909 COCO-LT training images' label sets (category
    ids shuffled against the class order, crowd annotations, images outside the split) converts
    back to the split file's labels, image for image."""
    by_path = split_label_names("coco_lt", "train")
    data, cat_ids = coco_instances(
        {p.split("/", 1)[1]: names for p, names in by_path.items()}, extra_images=30
    )
    by_id = sorted(cat_ids, key=cat_ids.get)
    assert by_id != space.names  # a converter that mapped by position would fail below
    write_json(tmp_path / "instances_train2017.json", data)

    out = read_instances(str(tmp_path / "instances_train2017.json"), "train2017", space)

    records = load_split_records("coco_lt", shared_dir(), "train")
    assert len(records) == 1909
    for r in records:
        assert out.labels[r.image] == r.label_ids, r.image
    assert sum(len(out.labels[r.image]) for r in records) == 8316  # the published positives
    assert out.problems == {}
    crowd = sum(a["iscrowd"] for a in data["annotations"])
    assert crowd == 478  # every fourth of 1,909 images
    assert out.counts == {
        "images": 1909 + 30,
        "annotations": len(data["annotations"]),  # crowd included: the benchmark's reading
        "crowd annotations": crowd,
    }
    assert out.labels["train2017/900000000000.jpg"] == (space.id_of("dog"),)


def _bad_instances(tmp_path):
    data = {
        "images": [
            {"id": 1, "file_name": "a.jpg"},
            {"id": 2, "file_name": "b.jpg"},  # no annotation
            {"id": 3, "file_name": "c.jpg"},
            {"id": 3, "file_name": "c2.jpg"},  # duplicate image id
            {"id": 4, "file_name": "d.jpg"},
            {"id": 5, "file_name": "e.jpg"},  # crowd only
        ],
        "categories": [
            {"id": 18, "name": "dog"},
            {"id": 1, "name": "person"},
            {"id": 17, "name": "cat"},
            {"id": 91, "name": "unicorn"},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 18, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0},
            {"id": 12, "image_id": 3, "category_id": 1, "iscrowd": 0},
            {"id": 13, "image_id": 4, "category_id": 17, "iscrowd": 0},
            {"id": 14, "image_id": 4, "category_id": 91, "iscrowd": 0},
            {"id": 15, "image_id": 5, "category_id": 1, "iscrowd": 1},
            {"id": 16, "image_id": 77, "category_id": 1, "iscrowd": 0},
        ],
    }
    path = tmp_path / "instances_val2017.json"
    write_json(path, data)
    return str(path)


def test_bad_instances_are_named_by_file_and_id(tmp_path, space):
    path = _bad_instances(tmp_path)
    out = read_instances(path, "val2017", space)
    dog, person = space.id_of("dog"), space.id_of("person")
    assert out.labels["val2017/a.jpg"] == tuple(sorted((dog, person)))
    assert out.labels["val2017/b.jpg"] == ()
    assert out.labels["val2017/e.jpg"] == (person,)  # the crowd annotation counts
    assert set(out.problems) == {"val2017/c.jpg", "val2017/c2.jpg", "val2017/d.jpg"}
    assert str(out.problems["val2017/c2.jpg"]) == (
        f"{path}: image id 3: image id given 2 times (val2017/c.jpg, val2017/c2.jpg): its "
        "annotations cannot be told apart"
    )
    d = str(out.problems["val2017/d.jpg"])
    assert d.startswith(f"{path}: annotation id 14: category id 91 (unknown class 'unicorn'")
    assert d.endswith("not a class of this benchmark")
    assert out.counts["images without annotations"] == 1
    assert out.counts["crowd annotations"] == 1
    assert any("1 annotations name an image id that is not in 'images'" in n for n in out.notes)

    no_crowd = read_instances(path, "val2017", space, include_crowd=False)
    assert no_crowd.labels["val2017/e.jpg"] == ()


def test_captions_keep_non_ascii_text_and_refuse_lone_surrogates(tmp_path):
    text = (
        '{"images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg"}],'
        ' "annotations": ['
        '{"id": 5, "image_id": 1, "caption": "Ein Hund läuft über die Straße. "},'
        '{"id": 3, "image_id": 1, "caption": "一只狗\\n在街上 🐕"},'
        '{"id": 4, "image_id": 2, "caption": "bad \\ud800 text"}]}'
    )
    path = tmp_path / "captions_val2017.json"
    path.write_text(text, encoding="utf-8")
    out = read_captions(str(path), "val2017")
    assert out.captions == {"val2017/a.jpg": "Ein Hund läuft über die Straße. 一只狗 在街上 🐕"}
    assert str(out.problems["val2017/b.jpg"]) == (
        f"{path}: annotation id 4: caption is not text that UTF-8 can write"
    )


def test_malformed_json_names_file_line_and_column(tmp_path, space):
    path = tmp_path / "instances_train2017.json"
    path.write_text('{"images": [\n {"id": 1, "file_name": "a.jpg"}\n "annotations": []}')
    with pytest.raises(ConvertError, match=rf"{path}:3:2: not valid JSON"):
        read_instances(str(path), "train2017", space)
    path.write_text('{"images": []}')
    with pytest.raises(ConvertError, match="not a COCO annotation file .no 'categories' list"):
        read_instances(str(path), "train2017", space)

"""ltdist.data.manifest: reading and validating JSONL manifests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ltdist.data.manifest import (
    ManifestError,
    Record,
    key_from_path,
    read_class_names,
    read_manifest,
    write_manifest,
)
from ltdist.labels import LabelSpace

# Shared modules: these tests run in both environments (see tests/test_environments.py).
pytestmark = pytest.mark.both_envs


NAMES = ["person", "dog", "cat", "diningtable", "hot dog"]


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8fake")
    return path


def write_lines(path: Path, lines: list[object]) -> Path:
    """One line per item: dicts as JSON, strings verbatim."""
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for name in ("a.jpg", "b.jpg", "c.png", "sub/d.jpg"):
        touch(tmp_path / "data" / "images" / name)
    return tmp_path / "data"


def test_valid_manifest(folder: Path) -> None:
    absolute = touch(folder.parent / "elsewhere" / "e.jpg")
    path = write_lines(
        folder / "train.jsonl",
        [
            {"key": "img_a", "image": "images/a.jpg", "labels": ["person", "dog"], "caption": "x"},
            {"image": "images/b.jpg", "labels": [2, 0, 2]},  # ids; duplicates collapse
            "",  # blank lines are skipped but still counted
            {"image": "./images/sub/d.jpg", "labels": ["Dining Table", "table", "hot dog"]},
            {"image": str(absolute), "labels": ["Cat"], "caption": "un chat été"},
        ],
    )
    m = read_manifest(path, NAMES)
    assert m.problems == []
    assert m.records == [
        Record("img_a", str(folder / "images/a.jpg"), (0, 1), "x", 1),
        Record("images_b", str(folder / "images/b.jpg"), (0, 2), None, 2),
        Record("images_sub_d", str(folder / "images/sub/d.jpg"), (3, 4), None, 4),
        Record(key_from_path(str(absolute)), str(absolute), (2,), "un chat été", 5),
    ]
    # Derived keys follow key_from_path on the path as written in the manifest.
    assert m.records[1].key == key_from_path("images/b.jpg")
    assert m.records[2].key == key_from_path("./images/sub/d.jpg")


def test_label_space_argument_and_synonyms(folder: Path) -> None:
    space = LabelSpace.from_label_sets(NAMES, [[0, 1]])
    path = write_lines(folder / "m.jsonl", [{"image": "images/a.jpg", "labels": ["dining table"]}])
    assert read_manifest(path, space).records[0].label_ids == (3,)


def test_image_root_override(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    touch(root / "images" / "x.jpg")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    path = write_lines(manifests / "m.jsonl", [{"image": "images/x.jpg", "labels": ["dog"]}])
    with pytest.raises(ManifestError, match="image file not found"):
        read_manifest(path, NAMES)  # resolved against the manifest's folder by default
    m = read_manifest(path, NAMES, image_root=root)
    assert m.records[0].image == str(root / "images" / "x.jpg")
    assert m.records[0].key == "images_x"
    m = read_manifest(path, NAMES, image_root=str(root))
    assert m.records[0].image == str(root / "images" / "x.jpg")


def test_check_files_off_and_text_only_records(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "m.jsonl",
        [
            {"image": "missing/x.jpg", "labels": ["dog"]},
            {"key": "t1", "labels": ["cat"], "caption": "a cat"},
        ],
    )
    m = read_manifest(path, NAMES, check_files=False)
    assert [(r.key, r.image) for r in m.records] == [
        ("missing_x", str(tmp_path / "missing/x.jpg")),
        ("t1", None),
    ]


def test_allow_empty_labels(folder: Path) -> None:
    path = write_lines(
        folder / "m.jsonl",
        [{"image": "images/a.jpg", "labels": []}, {"image": "images/b.jpg"}],
    )
    m = read_manifest(path, NAMES, allow_empty_labels=True)
    assert [r.label_ids for r in m.records] == [(), ()]


# -- problems -----------------------------------------------------------------------------------

GOOD_1 = {"key": "good1", "image": "images/a.jpg", "labels": ["dog"]}
GOOD_2 = {"key": "good2", "image": "images/b.jpg", "labels": ["cat"]}

# (bad line, key the report names, words in the reason); the bad line goes on line 2.
PROBLEMS = [
    pytest.param(
        {"key": "k1", "image": "images/c.png", "labels": ["dgo"]},
        "k1",
        "unknown class 'dgo'; did you mean 'dog'?",
        id="unknown-class",
    ),
    pytest.param(
        {"key": "k2", "image": "images/c.png", "labels": [5]}, "k2", "out of range", id="bad-id"
    ),
    pytest.param(
        {"key": "k3", "image": "images/c.png", "labels": [True]},
        "k3",
        "neither a class name nor an id",
        id="bool-label",
    ),
    pytest.param(
        {"key": "k4", "image": "images/c.png", "labels": "dog"},
        "k4",
        "'labels' must be a list",
        id="labels-not-list",
    ),
    pytest.param(
        {"key": "good1", "image": "images/c.png", "labels": ["dog"]},
        "good1",
        "duplicate key (first on line 1)",
        id="duplicate-key",
    ),
    pytest.param(
        {"image": "images/a.jpg", "labels": ["dog"], "key": "images_a"},
        "images_a",
        None,
        id="no-problem",
    ),
    pytest.param(
        {"image": "images/missing.jpg", "labels": ["dog"]},
        "images_missing",
        "image file not found",
        id="missing-file",
    ),
    pytest.param(
        {"key": "k5", "image": "images/c.png", "labels": []}, "k5", "empty label set", id="empty"
    ),
    pytest.param({"key": "k6", "image": "images/c.png"}, "k6", "empty label set", id="no-labels"),
    pytest.param('{"key": "k7", "labels": ["dog"', None, "not valid JSON", id="malformed-json"),
    pytest.param("[1, 2]", None, "not a JSON object", id="not-object"),
    pytest.param({"labels": ["dog"]}, None, "no 'key' and no 'image'", id="no-key"),
    pytest.param({"image": "", "labels": ["dog"]}, None, "no 'key' and no 'image'", id="empty-img"),
    pytest.param({"key": 7, "labels": ["dog"]}, None, "'key' must be a string", id="int-key"),
    pytest.param(
        {"key": "a.b", "image": "images/c.png", "labels": ["dog"]},
        "a.b",
        "letters, digits",
        id="dot-in-key",
    ),
    pytest.param(
        {"image": "images/c d.png", "labels": ["dog"]}, "images_c d", "letters", id="space-in-key"
    ),
    pytest.param(
        {"key": "k8", "image": "images/c.png", "labels": ["dog"], "extra": 1},
        "k8",
        "unknown fields ['extra']",
        id="unknown-field",
    ),
    pytest.param(
        {"key": "k9", "image": 3, "labels": ["dog"]},
        "k9",
        "'image' must be a path string",
        id="image-not-str",
    ),
    pytest.param(
        {"key": "k10", "image": "images/c.png", "labels": ["dog"], "caption": 3},
        "k10",
        "'caption' must be a string",
        id="caption-not-str",
    ),
]


def bad_manifest(folder: Path, bad: object) -> Path:
    return write_lines(folder / "m.jsonl", [GOOD_1, bad, GOOD_2])


@pytest.mark.parametrize(("bad", "key", "reason"), PROBLEMS)
def test_policy_error_names_line_and_key(
    folder: Path, bad: object, key: str | None, reason: str | None
) -> None:
    path = bad_manifest(folder, bad)
    if reason is None:
        assert [r.key for r in read_manifest(path, NAMES).records] == ["good1", key, "good2"]
        return
    with pytest.raises(ManifestError) as e:
        read_manifest(path, NAMES)
    msg = str(e.value)
    assert msg.startswith(f"{path}: line 2 (key {key!r}): ")
    assert reason in msg
    assert "policy=skip" in msg


@pytest.mark.parametrize(("bad", "key", "reason"), PROBLEMS)
def test_policy_skip_lists_problem_and_keeps_the_rest(
    folder: Path, bad: object, key: str | None, reason: str | None
) -> None:
    m = read_manifest(bad_manifest(folder, bad), NAMES, policy="skip")
    if reason is None:
        assert m.problems == []
        return
    assert [r.key for r in m.records] == ["good1", "good2"]
    assert [r.line for r in m.records] == [1, 3]
    assert len(m.problems) == 1
    p = m.problems[0]
    assert (p.line, p.key) == (2, key)
    assert reason in p.reason
    assert str(p).startswith(f"line 2 (key {key!r}): ")


def test_skip_collects_many_problems_in_order(folder: Path) -> None:
    lines = [
        GOOD_1,
        "{oops",
        {"key": "x1", "image": "images/c.png", "labels": ["nope"]},
        {"key": "good1", "image": "images/c.png", "labels": ["dog"]},
        {"image": "images/zzz.jpg", "labels": ["dog"]},
        {"key": "x2", "image": "images/c.png", "labels": []},
        GOOD_2,
        {"image": "images/c.png", "labels": ["hot dog", 1]},
    ]
    m = read_manifest(write_lines(folder / "m.jsonl", lines), NAMES, policy="skip")
    assert [(r.key, r.line, r.label_ids) for r in m.records] == [
        ("good1", 1, (1,)),
        ("good2", 7, (2,)),
        ("images_c", 8, (1, 4)),
    ]
    assert [(p.line, p.key) for p in m.problems] == [
        (2, None),
        (3, "x1"),
        (4, "good1"),
        (5, "images_zzz"),
        (6, "x2"),
    ]


def test_skipped_record_does_not_claim_its_key(folder: Path) -> None:
    lines = [
        {"key": "k", "image": "images/missing.jpg", "labels": ["dog"]},
        {"key": "k", "image": "images/a.jpg", "labels": ["dog"]},
    ]
    m = read_manifest(write_lines(folder / "m.jsonl", lines), NAMES, policy="skip")
    assert [(r.key, r.line) for r in m.records] == [("k", 2)]
    assert [p.line for p in m.problems] == [1]


def test_bad_policy(folder: Path) -> None:
    with pytest.raises(ValueError, match="policy"):
        read_manifest(bad_manifest(folder, GOOD_2), NAMES, policy="ignore")


# -- helpers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "key"),
    [
        ("train2017/000000554625.jpg", "train2017_000000554625"),
        ("a.b/c.d.png", "a_b_c_d"),
        ("./././x/y.jpg", "x_y"),
        ("dir\\file.jpg", "dir_file"),
        (".\\images\\x.jpg", "images_x"),
        ("noext", "noext"),
    ],
)
def test_key_from_path(path: str, key: str) -> None:
    assert key_from_path(path) == key


@pytest.mark.parametrize("path", ["", "./", "././", ".\\"])
def test_key_from_path_empty(path: str) -> None:
    with pytest.raises(ValueError, match="cannot make a key"):
        key_from_path(path)


def test_write_then_read_round_trip(folder: Path, tmp_path: Path) -> None:
    records = [
        Record("r1", str(folder / "images/a.jpg"), (0, 3), "a person at a table", 1),
        Record("r2", str(folder / "images/sub/d.jpg"), (4,), None, 2),
    ]
    out = tmp_path / "out" / "m.jsonl"
    write_manifest(out, records, NAMES)
    first = json.loads(out.read_text().splitlines()[0])
    assert first["labels"] == ["person", "diningtable"]
    assert not Path(first["image"]).is_absolute()
    back = read_manifest(out, NAMES).records
    assert [(r.key, Path(r.image).resolve(), r.label_ids, r.caption, r.line) for r in back] == [
        (r.key, Path(r.image).resolve(), r.label_ids, r.caption, r.line) for r in records
    ]


def test_read_class_names(tmp_path: Path) -> None:
    txt = tmp_path / "classes.txt"
    txt.write_text("person\n\n dog \ncat\n")
    assert read_class_names(txt) == ["person", "dog", "cat"]
    js = tmp_path / "classes.json"
    LabelSpace.from_label_sets(NAMES, [[0], [1, 2]]).save(js)
    assert read_class_names(js) == NAMES
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ManifestError, match="no class names"):
        read_class_names(empty)
    assert np.array_equal(LabelSpace.load(js).frequency, [1, 1, 1, 0, 0])

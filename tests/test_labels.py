"""ltdist.labels: frequencies, groups, co-occurrence, classes.json, names and mentions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ltdist.labels import LabelSpace, UnknownClassError, group_of

# Shared modules: these tests run in both environments (see tests/test_environments.py).
pytestmark = pytest.mark.both_envs

# The shared benchmark label files ('name idx' lines); the names are also written out here so
# that the tests run where the shared folder is absent (and are checked against it where not).


SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe "
    "backpack umbrella handbag tie suitcase frisbee skis snowboard sports_ball kite baseball_bat "
    "baseball_glove skateboard surfboard tennis_racket bottle wine_glass cup fork knife spoon "
    "bowl banana apple sandwich orange broccoli carrot hot_dog pizza donut cake chair couch "
    "potted_plant bed dining_table toilet tv laptop mouse remote keyboard cell_phone microwave "
    "oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier toothbrush"
)
COCO_NAMES = [n.replace("_", " ") for n in COCO_NAMES.split()]
VOC_NAMES = (
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike "
    "person pottedplant sheep sofa train tvmonitor"
).split()


def read_names(path: Path) -> list[str]:
    """'name idx' lines (names may hold spaces) -> names in id order."""
    pairs = [ln.strip().rsplit(None, 1) for ln in path.read_text().splitlines() if ln.strip()]
    names = {int(i): n.strip() for n, i in pairs}
    assert sorted(names) == list(range(len(names)))
    return [names[i] for i in range(len(names))]


@pytest.mark.parametrize(
    ("file", "names"),
    [("coco_lt/coco_labels.txt", COCO_NAMES), ("voc_lt/voc_labels.txt", VOC_NAMES)],
)
def test_names_match_shared_label_files(file: str, names: list[str]) -> None:
    path = SHARED / file
    if not path.exists():
        pytest.skip(f"{path} not present")
    assert read_names(path) == names


@pytest.fixture(scope="module")
def coco() -> LabelSpace:
    assert len(COCO_NAMES) == 80
    return LabelSpace.from_label_sets(COCO_NAMES, [])


@pytest.fixture(scope="module")
def voc() -> LabelSpace:
    assert len(VOC_NAMES) == 20
    return LabelSpace.from_label_sets(VOC_NAMES, [])


def found(space: LabelSpace, text: str) -> list[tuple[str, str]]:
    """(class name, matched text) of each mention, in text order."""
    return [(space.names[m.class_id], m.text) for m in space.mentions(text)]


# -- statistics ---------------------------------------------------------------------------------


def test_from_label_sets_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    n, c = 500, 12
    y = (rng.random((n, c)) < rng.uniform(0.01, 0.5, size=c)).astype(np.int64)  # (N, C)
    y[7] = 0  # an image with no labels still counts as an image
    label_sets = [np.flatnonzero(row).tolist() for row in y]
    # Duplicated and unordered ids must not count twice.
    label_sets[3] = label_sets[3][::-1] + label_sets[3]
    names = [f"c{i}" for i in range(c)]
    space = LabelSpace.from_label_sets(names, label_sets)

    np.testing.assert_array_equal(space.frequency, y.sum(0))
    np.testing.assert_array_equal(space.cooccurrence, y.T @ y)
    np.testing.assert_array_equal(np.diag(space.cooccurrence), space.frequency)
    assert space.num_train_images == n and space.num_classes == c
    assert space.names == names
    assert space.frequency.dtype == np.int64 and space.cooccurrence.dtype == np.int64


def test_from_label_sets_accepts_a_generator() -> None:
    space = LabelSpace.from_label_sets(["a", "b"], (ids for ids in ([0], [0, 1], [1])))
    np.testing.assert_array_equal(space.cooccurrence, [[2, 1], [1, 2]])
    assert space.num_train_images == 3


@pytest.mark.parametrize("bad", [[3], [-1], [0, 5]])
def test_from_label_sets_rejects_out_of_range(bad: list[int]) -> None:
    with pytest.raises(ValueError, match="out of range"):
        LabelSpace.from_label_sets(["a", "b", "c"], [[0], bad])


def test_duplicate_names_and_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="duplicate class names: \\['a'\\]"):
        LabelSpace(["a", "b", "a"], np.zeros(3), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="2 classes"):
        LabelSpace(["a", "b"], np.zeros(3), np.zeros((2, 2)))


@pytest.mark.parametrize(
    ("freq", "group"),
    [(0, "tail"), (1, "tail"), (19, "tail"), (20, "medium"), (99, "medium"), (100, "head")],
)
def test_group_boundaries(freq: int, group: str) -> None:
    assert group_of(freq) == group


def test_groups_of_a_space() -> None:
    freq = [100, 99, 20, 19, 0, 1000]
    label_sets = [[c for c, f in enumerate(freq) if i < f] for i in range(max(freq))]
    space = LabelSpace.from_label_sets([f"c{i}" for i in range(6)], label_sets)
    np.testing.assert_array_equal(space.frequency, freq)
    assert space.groups == ["head", "medium", "medium", "tail", "tail", "head"]
    np.testing.assert_array_equal(space.group_ids("head"), [0, 5])
    np.testing.assert_array_equal(space.group_ids("medium"), [1, 2])
    np.testing.assert_array_equal(space.group_ids("tail"), [3, 4])
    assert space.group_counts() == {"head": 2, "medium": 2, "tail": 2}
    assert [space.is_tail(i) for i in range(6)] == [False, False, False, True, True, False]
    with pytest.raises(ValueError, match="unknown group"):
        space.group_ids("few")
    table = space.table()
    assert "6 classes: head 2 / medium 2 / tail 2" in table
    assert "frequency 0..1000" in table


def test_conditional() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((300, 8)) < 0.3).astype(np.int64)
    y[:, 5] = 0  # a class never seen in training
    space = LabelSpace.from_label_sets([f"c{i}" for i in range(8)], [np.flatnonzero(r) for r in y])
    cond = space.conditional()
    co = y.T @ y
    seen = co.diagonal() > 0
    np.testing.assert_allclose(np.diag(cond)[seen], 1.0)
    for i in np.flatnonzero(seen):
        np.testing.assert_allclose(cond[i], co[i] / co[i, i])
    np.testing.assert_array_equal(cond[5], 0.0)
    assert np.isfinite(cond).all()
    # P(j | i) is not symmetric in general.
    assert not np.allclose(cond, cond.T)


# -- classes.json -------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    names = ["diningtable", "hair drier", "person", "sofa"]
    label_sets = [np.flatnonzero(rng.random(4) < 0.4) for _ in range(200)]
    space = LabelSpace.from_label_sets(names, label_sets)
    space.synonyms[2] = ["human", "man"]
    path = tmp_path / "sub" / "classes.json"
    space.save(path)
    back = LabelSpace.load(path)

    assert back.names == space.names
    assert back.display_names == ["dining table", "hair drier", "person", "sofa"]
    assert back.display_names == space.display_names
    assert back.synonyms == space.synonyms
    assert back.num_train_images == 200
    np.testing.assert_array_equal(back.frequency, space.frequency)
    np.testing.assert_array_equal(back.cooccurrence, space.cooccurrence)
    assert back.groups == space.groups
    assert back.to_dict() == space.to_dict()
    assert back.id_of("human") == 2  # the saved synonyms are used, not the built-in table
    assert [c["group"] for c in back.to_dict()["classes"]] == space.groups


def test_load_rejects_bad_files(tmp_path: Path) -> None:
    space = LabelSpace.from_label_sets(["a", "b"], [[0]])
    data = space.to_dict()
    data["format_version"] = 99
    bad = tmp_path / "classes.json"
    bad.write_text(str(data).replace("'", '"'))
    with pytest.raises(ValueError, match="format_version"):
        LabelSpace.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=str(bad)):
        LabelSpace.load(bad)
    data = space.to_dict()
    data["classes"].reverse()
    with pytest.raises(ValueError, match="ids must be 0..C-1"):
        LabelSpace.from_dict(data)


# -- names --------------------------------------------------------------------------------------


def test_id_of_names_display_names_synonyms(voc: LabelSpace, coco: LabelSpace) -> None:
    assert voc.display_names[voc.names.index("diningtable")] == "dining table"
    assert voc.display_names[voc.names.index("tvmonitor")] == "tv monitor"
    assert voc.display_names[voc.names.index("cat")] == "cat"
    table = voc.names.index("diningtable")
    for alias in ("diningtable", "dining table", "Dining  Table", "DINING_TABLE", "table"):
        assert voc.id_of(alias) == table
    assert voc.id_of("couch") == voc.names.index("sofa")
    assert voc.id_of("Airplane") == voc.names.index("aeroplane")
    assert voc.id_of("TV") == voc.names.index("tvmonitor")

    assert coco.id_of("hair dryer") == coco.names.index("hair drier")
    assert coco.id_of("Hair_Drier") == coco.names.index("hair drier")
    # A canonical COCO name beats another class's synonym.
    assert coco.id_of("couch") == coco.names.index("couch")
    assert coco.id_of("sofa") == coco.names.index("couch")
    assert coco.ids_of(["dog", "person", "Dog"]) == sorted(
        [coco.names.index("dog"), coco.names.index("person")]
    )


def test_id_of_unknown_suggests_closest(coco: LabelSpace) -> None:
    with pytest.raises(UnknownClassError) as e:
        coco.id_of("persn")
    assert "'persn'" in str(e.value) and "did you mean 'person'" in str(e.value)
    assert isinstance(e.value, KeyError)
    with pytest.raises(UnknownClassError) as e:
        coco.id_of("qqqqqqqq")
    assert "did you mean" not in str(e.value)


# -- mentions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a hot dog on a plate", [("hot dog", "hot dog")]),
        ("a dog eats a hot dog", [("dog", "dog"), ("hot dog", "hot dog")]),
        ("a teddy bear", [("teddy bear", "teddy bear")]),
        ("a teddy bear and a bear", [("teddy bear", "teddy bear"), ("bear", "bear")]),
        ("two dogs chase three buses", [("dog", "dogs"), ("bus", "buses")]),
        ("Hot Dogs and Teddy Bears", [("hot dog", "Hot Dogs"), ("teddy bear", "Teddy Bears")]),
        ("wine glasses", [("wine glass", "wine glasses")]),
        ("a catalog of cattle", []),
        ("a catalog and a cat.", [("cat", "cat")]),
        ("the doghouse", []),
        ("a hair dryer", [("hair drier", "hair dryer")]),
        ("a hair drier", [("hair drier", "hair drier")]),
        ("a hot\n dog", [("hot dog", "hot\n dog")]),
        ("the person's umbrella", [("person", "person"), ("umbrella", "umbrella")]),
        ("a television on a table", [("tv", "television"), ("dining table", "table")]),
        ("", []),
    ],
)
def test_mentions_coco(coco: LabelSpace, text: str, expected: list[tuple[str, str]]) -> None:
    assert found(coco, text) == expected


def test_mention_spans(coco: LabelSpace) -> None:
    text = "A hot dog, two dogs."
    mentions = coco.mentions(text)
    assert [(m.start, m.end) for m in mentions] == [(2, 9), (15, 19)]
    assert all(text[m.start : m.end] == m.text for m in mentions)
    assert all(m.class_id == coco.names.index(n) for m, n in zip(mentions, ["hot dog", "dog"]))


def test_mentions_voc(voc: LabelSpace) -> None:
    assert found(voc, "a dining table and a diningtable") == [
        ("diningtable", "dining table"),
        ("diningtable", "diningtable"),
    ]
    assert found(voc, "a couch, a TV monitor, potted plants") == [
        ("sofa", "couch"),
        ("tvmonitor", "TV monitor"),
        ("pottedplant", "potted plants"),
    ]

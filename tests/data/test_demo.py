"""The demo data set: its long-tailed split, co-occurrence, manifest format and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltdist.data.demo import (
    CLASS_TABLE,
    COLOURS,
    DemoConfig,
    build_demo,
    class_names,
    companion_ids,
    render_image,
    sample_labels,
    target_frequencies,
)
from ltdist.labels import LabelSpace

# Small enough to render in well under a second; still multi-label with a companion pair.
SMALL = DemoConfig(
    num_classes=16,
    num_train=80,
    num_test=48,
    image_size=32,
    max_frequency=50,
    min_frequency=3,
    test_min_frequency=4,
)


@pytest.fixture(scope="module")
def default_labels() -> dict[str, list[list[int]]]:
    return sample_labels(DemoConfig())


@pytest.fixture(scope="module")
def small_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, build_demo(out, SMALL)


def test_default_train_split_is_long_tailed(default_labels):
    cfg = DemoConfig()
    space = LabelSpace.from_label_sets(class_names(cfg), default_labels["train"])
    counts = space.group_counts()
    assert all(counts[g] >= 3 for g in ("head", "medium", "tail")), counts
    assert 400 <= space.frequency.max() <= 600
    assert 4 <= space.frequency.min() <= 6
    # The sampler meets the Pareto targets exactly, so the split does not drift with the seed.
    np.testing.assert_array_equal(space.frequency, target_frequencies(cfg)["train"])
    assert space.num_train_images == cfg.num_train


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_image_has_one_to_max_labels(default_labels, split):
    sizes = [len(ids) for ids in default_labels[split]]
    assert min(sizes) >= 1 and max(sizes) <= DemoConfig().max_labels
    assert np.mean(sizes) > 1.2  # genuinely multi-label
    assert all(len(set(ids)) == len(ids) for ids in default_labels[split])


def test_test_split_is_flatter_with_enough_positives(default_labels):
    names = class_names(DemoConfig())
    train = LabelSpace.from_label_sets(names, default_labels["train"]).frequency
    test = LabelSpace.from_label_sets(names, default_labels["test"]).frequency
    assert test.min() >= 10, dict(zip(names, test.tolist(), strict=True))
    assert test.max() / test.min() < train.max() / train.min()


@pytest.mark.parametrize("split", ["train", "test"])
def test_rare_classes_appear_beside_their_companion(default_labels, split):
    cfg = DemoConfig()
    names = class_names(cfg)
    train = LabelSpace.from_label_sets(names, default_labels["train"])
    space = LabelSpace.from_label_sets(names, default_labels[split])
    pairs = companion_ids(cfg)
    assert len(pairs) >= 4
    conditional = space.conditional()
    base_rate = space.frequency / space.num_train_images
    for tail, head in pairs.items():
        assert train.groups[tail] == "tail" and train.groups[head] == "head", names[tail]
        p = conditional[tail, head]
        assert p >= 0.75, f"P({names[head]} | {names[tail]}) = {p:.2f}"
        assert p > base_rate[head] + 0.25, f"{names[tail]} is not tied to {names[head]}"


def test_sample_labels_depends_on_the_seed_only():
    a, b = sample_labels(SMALL), sample_labels(SMALL)
    assert a == b
    other = sample_labels(DemoConfig(**{**SMALL.__dict__, "seed": 1}))
    assert other["train"] != a["train"]


def test_build_is_byte_identical_for_a_seed(tmp_path, small_build):
    first, _ = small_build
    build_demo(tmp_path / "again", SMALL)
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    again = sorted(p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*"))
    assert files == [p for p in again if (tmp_path / "again" / p).is_file()]
    for rel in files:
        assert (first / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel

    build_demo(tmp_path / "seed1", DemoConfig(**{**SMALL.__dict__, "seed": 1}))
    assert (tmp_path / "seed1" / "train.jsonl").read_bytes() != (first / "train.jsonl").read_bytes()


def test_manifest_format(small_build):
    out, summary = small_build
    names = (out / "classes.txt").read_text().splitlines()
    assert names == class_names(SMALL)
    expected = sample_labels(SMALL)
    space = LabelSpace.from_label_sets(names, expected["train"])
    keys = set()
    for split, n in (("train", SMALL.num_train), ("test", SMALL.num_test)):
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == n == summary["num_images"][split]
        for i, line in enumerate(lines):
            rec = json.loads(line)
            assert set(rec) == {"key", "image", "labels", "caption"}
            assert rec["key"] == f"{split}_{i:06d}" and rec["key"] not in keys
            keys.add(rec["key"])
            assert rec["image"] == f"images/{split}/{i:06d}.png"
            assert rec["labels"] == [names[c] for c in expected[split][i]]
            assert isinstance(rec["caption"], str) and rec["caption"].strip()
            # Captions name only objects in the image, and at least one of them.
            mentioned = {m.class_id for m in space.mentions(rec["caption"])}
            assert mentioned and mentioned <= set(expected[split][i]), rec
            with Image.open(out / rec["image"]) as im:
                assert im.format == "PNG" and im.mode == "RGB"
                assert im.size == (SMALL.image_size, SMALL.image_size)
    assert summary["train_frequency"] == space.frequency.tolist()
    assert summary["groups"] == space.group_counts()


def test_rebuild_removes_images_of_a_larger_build(tmp_path):
    bigger = DemoConfig(**{**SMALL.__dict__, "num_test": 60})
    build_demo(tmp_path, bigger)
    build_demo(tmp_path, SMALL)
    assert len(list((tmp_path / "images" / "test").glob("*.png"))) == SMALL.num_test


@pytest.mark.parametrize("class_id", range(len(CLASS_TABLE)))
def test_each_object_shows_its_class_colour(class_id):
    cfg = DemoConfig(num_classes=len(CLASS_TABLE))
    image, _ = render_image([class_id], cfg, np.random.default_rng(class_id))
    colour = np.asarray(COLOURS[CLASS_TABLE[class_id][2]], dtype=np.float32)
    blank, _ = render_image([], cfg, np.random.default_rng(class_id))

    def near(img: np.ndarray) -> float:
        return float((np.linalg.norm(img.astype(np.float32) - colour, axis=-1) < 70).mean())

    # A small striped crescent covers ~1% of the image; the background alone ~0%.
    assert near(image) > 0.008, f"{CLASS_TABLE[class_id][0]}: {near(image):.3f} of pixels"
    assert near(blank) < 0.002


def test_shape_and_colour_each_shared_but_pairs_unique():
    pairs = [(shape, colour) for _, shape, colour, _ in CLASS_TABLE]
    assert len(set(pairs)) == len(pairs)
    for k in (0, 1):
        values = [p[k] for p in pairs]
        assert all(values.count(v) >= 2 for v in values)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_classes": 0},
        {"num_classes": len(CLASS_TABLE) + 1},
        {"min_frequency": 10, "max_frequency": 5},
        {"max_frequency": 2000},
    ],
)
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        DemoConfig(**bad)


def test_impossible_frequencies_are_refused():
    # 20 classes with at most 5 positives cannot label 1200 images.
    with pytest.raises(ValueError, match="positives"):
        sample_labels(DemoConfig(max_frequency=5, min_frequency=1))

"""The stratified validation carve: quotas, a training positive kept per class, determinism, and
the benchmark packing option whose classes.json keeps the published groups."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from ltdist import cli
from ltdist.data.manifest import Record, read_manifest
from ltdist.data.pack import PackConfig, load_records, pack_dataset
from ltdist.data.stratify import carve_records, stratified_carve, val_quota
from tests.data.test_splits import EXPECTED, SHARED

C = 12


def synthetic_label_sets(seed: int = 0, n: int = 600) -> list[list[int]]:
    """A long-tailed multi-label set: class c has about 300 / (c + 1) positives, the rarest
    two exactly 2 and 1 positives (one image each beside the others)."""
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(n):
        ids = [c for c in range(C - 2) if rng.random() < 0.5 / (c + 1)]
        sets.append(ids)
    sets[0] = sorted({*sets[0], C - 2})
    sets[1] = sorted({*sets[1], C - 2})
    sets[2] = sorted({*sets[2], C - 1})
    return sets


def test_quota_is_the_rounded_share_within_one_and_n_minus_one():
    n = np.arange(0, 60)
    for fraction in (0.05, 0.1, 0.25, 0.5):
        expected = [
            0 if k < 2 else min(max(math.floor(fraction * k + 0.5), 1), k - 1) for k in n.tolist()
        ]
        assert val_quota(n, fraction).tolist() == expected


def test_every_class_keeps_a_training_positive_and_gets_its_quota():
    sets = synthetic_label_sets()
    carve = stratified_carve(sets, C, 0.2, seed=3)
    positives = np.zeros(C, dtype=int)
    for ids in sets:
        positives[ids] += 1
    val_set = set(carve.val.tolist())
    assert val_set.isdisjoint(carve.train.tolist())
    assert sorted(val_set | set(carve.train.tolist())) == list(range(len(sets)))
    # the counts it reports are the counts of the images it assigned
    val_pos = np.zeros(C, dtype=int)
    for i in carve.val:
        val_pos[sets[i]] += 1
    assert val_pos.tolist() == carve.val_positives.tolist()
    assert (carve.train_positives + carve.val_positives).tolist() == positives.tolist()
    assert (carve.train_positives >= 1).all()
    assert (carve.val_positives[positives >= 2] >= 1).all()  # a val positive wherever possible
    assert carve.single == [C - 1] and carve.val_positives[C - 1] == 0
    # the rarest classes are served first and land exactly on their quota
    rare = np.argsort(positives, kind="stable")[:6]
    assert carve.val_positives[rare].tolist() == val_quota(positives, 0.2)[rare].tolist()
    # and the whole carve is near the asked share of images
    assert abs(len(carve.val) / len(sets) - 0.2) < 0.05


def test_the_carve_is_a_function_of_the_seed_not_of_the_input_order():
    sets = synthetic_label_sets()
    records = [Record(f"k{i:04d}", None, tuple(ids)) for i, ids in enumerate(sets)]
    train, val, _ = carve_records(records, C, 0.1, seed=7)
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    train2, val2, _ = carve_records(shuffled, C, 0.1, seed=7)
    assert [r.key for r in val] == [r.key for r in val2]
    assert [r.key for r in train] == [r.key for r in train2]
    _, val3, _ = carve_records(records, C, 0.1, seed=8)
    assert [r.key for r in val3] != [r.key for r in val]


def test_unlabelled_images_are_carved_in_the_same_share():
    sets = [[0], [0], [1], [1]] + [[] for _ in range(10)]
    carve = stratified_carve(sets, 2, 0.3, seed=0)
    assert sum(1 for i in carve.val if not sets[i]) == 3  # round(0.3 * 10)


@pytest.mark.parametrize("bench", ["coco_lt", "voc_lt"])
def test_a_benchmark_val_split_keeps_the_published_groups(bench, tmp_path):
    cfg = PackConfig(
        out=str(tmp_path / bench),
        source="benchmark",
        benchmark=bench,
        splits_dir=str(SHARED),
        text_only=True,
        val_fraction=0.1,
        val_seed=0,
    )
    space, splits, _ = load_records(cfg)
    facts = EXPECTED[bench]
    assert space.group_counts() == facts["groups"]  # from the full published train split
    assert space.num_train_images == facts["train"]
    assert len(splits["train"]) + len(splits["val"]) == facts["train"]
    assert {r.key for r in splits["train"]}.isdisjoint(r.key for r in splits["val"])
    val_pos = np.zeros(space.num_classes, dtype=int)
    for r in splits["val"]:
        val_pos[list(r.label_ids)] += 1
    # every class has >= 4 published positives: each gets a val positive and keeps the rest
    assert (val_pos >= 1).all()
    assert ((space.frequency - val_pos) >= 1).all()
    carved = load_records(PackConfig(**{**cfg.__dict__, "classes_from": "carved"}))[0]
    assert carved.frequency.tolist() == (space.frequency - val_pos).tolist()


def test_pack_writes_a_val_split_beside_train_and_test(tmp_path):
    names = ["a", "b", "c"]
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    rng = np.random.default_rng(0)
    with open(tmp_path / "train.jsonl", "w") as f:
        for i in range(40):
            labels = [n for n in names if rng.random() < 0.5] or ["a"]
            f.write(json.dumps({"key": f"t{i:03d}", "labels": labels, "caption": "x"}) + "\n")
    cfg = PackConfig(
        out=str(tmp_path / "shards"),
        classes=str(tmp_path / "classes.txt"),
        manifests={"train": str(tmp_path / "train.jsonl")},
        text_only=True,
        samples_per_shard=16,
        val_fraction=0.25,
    )
    results = pack_dataset(cfg, progress=False)
    assert set(results) == {"train", "val"}
    assert results["train"].num_written + results["val"].num_written == 40
    assert 6 <= results["val"].num_written <= 14
    with pytest.raises(ValueError, match="manifests.val"):
        PackConfig(**{**cfg.__dict__, "manifests": {**cfg.manifests, "val": "v"}}).validate()


def test_split_val_command_writes_manifests_that_still_find_their_images(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "classes.txt").write_text("a\nb\nc\n")
    lines = []
    for i, labels in enumerate([["a"], ["a", "b"], ["b"], ["a"], ["b", "c"], ["a"]] * 3):
        (tmp_path / "img" / f"{i}.jpg").write_bytes(b"x")
        lines.append(json.dumps({"image": f"img/{i}.jpg", "labels": labels}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    args = ["data", "split-val", str(tmp_path / "train.jsonl"), "--classes"]
    args += [str(tmp_path / "classes.txt"), "--out", str(out), "--fraction", "0.2"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "train: " in text and "val: " in text
    names = ["a", "b", "c"]
    train = read_manifest(out / "train.jsonl", names).records  # check_files: paths resolve
    val = read_manifest(out / "val.jsonl", names).records
    assert len(train) + len(val) == 18 and {2} <= {c for r in val for c in r.label_ids}
    assert cli.main([*args[:-1], "1.5"]) == 2

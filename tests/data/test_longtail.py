"""Long-tailed splits of a balanced set: the Pareto profile against its density formula, the
sampled counts against the profile, determinism, and the command's files."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from scipy import stats

from ltdist import cli
from ltdist.data.longtail import (
    SplitLTConfig,
    class_ranking,
    pareto_targets,
    sample_long_tailed,
    split_long_tailed,
)
from ltdist.labels import GROUPS, group_of

C = 20


def balanced_label_sets(n: int = 4000, seed: int = 0, max_labels: int = 2) -> list[tuple]:
    """Every class equally likely; 1..max_labels distinct classes per image."""
    rng = np.random.default_rng(seed)
    return [
        tuple(sorted(rng.choice(C, size=int(rng.integers(1, max_labels + 1)), replace=False)))
        for _ in range(n)
    ]


def write_source(folder, n: int = 4000, seed: int = 0) -> tuple[str, str]:
    names = [f"class{c:02d}" for c in range(C)]
    (folder / "classes.txt").write_text("\n".join(names) + "\n")
    lines = [
        json.dumps({"key": f"img{i:05d}", "labels": [names[c] for c in ids], "caption": f"c {i}"})
        for i, ids in enumerate(balanced_label_sets(n, seed))
    ]
    (folder / "all.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder / "all.jsonl"), str(folder / "classes.txt")


@pytest.mark.parametrize("alpha, c, top, low", [(6, 80, 1200, 1), (6, 20, 800, 1), (3, 7, 50, 5)])
def test_targets_are_the_scaled_pareto_density(alpha, c, top, low):
    # direct float64: the density alpha / x^(alpha+1) on C points from the 0 to the 0.99
    # quantile ((1 - q)^(-1/alpha)), scaled by (max - min) / alpha, plus min, floored
    xs = [1 + r * ((0.01 ** (-1 / alpha)) - 1) / (c - 1) for r in range(c)]
    direct = [math.floor(low + (top - low) / alpha * alpha / x ** (alpha + 1)) for x in xs]
    assert pareto_targets(c, alpha, top, low).tolist() == direct
    # the same through scipy's Pareto distribution
    rv = stats.pareto(alpha)
    x = np.linspace(rv.ppf(0.0), rv.ppf(0.99), c)
    expected = np.floor(rv.pdf(x) * (top - low) / alpha + low).astype(int)
    assert pareto_targets(c, alpha, top, low).tolist() == expected.tolist()


def test_alpha_6_gives_the_published_benchmark_extremes():
    # COCO-LT: 80 classes, frequencies 6..1128 from a 1200 profile; VOC-LT: 20 classes, 4..775
    coco, voc = pareto_targets(80, 6.0, 1200), pareto_targets(20, 6.0, 800)
    assert (coco[0], coco[-1], voc[0], voc[-1]) == (1200, 6, 800, 4)
    assert (np.diff(coco) <= 0).all()


def test_a_class_found_with_every_other_gets_the_largest_target():
    # class 0 is the rarest (95 images) but each of its images carries another class
    sets = [(c,) for c in range(1, C) for _ in range(100)] + [
        (0, c) for c in range(1, C) for _ in range(5)
    ]
    ranking = class_ranking(sets, C, "cooccurrence", np.random.default_rng(1))
    assert ranking[0] == 0  # sum_i P(0 | i) = 1 + 19 * 5 / 105 against 1 + 5 / 95
    assert class_ranking(sets, C, "frequency", np.random.default_rng(1))[-1] == 0
    assert sorted(ranking.tolist()) == list(range(C))


@pytest.mark.parametrize("max_labels", [1, 2, 3])
def test_counts_follow_the_profile_on_a_balanced_set(max_labels):
    sets = balanced_label_sets(max_labels=max_labels)
    sample = sample_long_tailed(sets, C, alpha=6.0, max_count=150, seed=0)
    counts = np.zeros(C, dtype=int)
    for i in sample.selected:
        counts[list(sets[i])] += 1
    assert counts.tolist() == sample.counts.tolist()
    profile = pareto_targets(C, 6.0, 150)
    assert sorted(sample.profile.tolist(), reverse=True) == profile.tolist()
    by_rank = counts[sample.ranking]
    # every class within 10% (or 2 images) of its target: the tail exactly, by construction
    assert (np.abs(by_rank - profile) <= np.maximum(2, 0.1 * profile)).all(), by_rank
    assert (by_rank[-8:] == profile[-8:]).all()
    groups = [group_of(int(n)) for n in by_rank]
    assert {g: groups.count(g) for g in GROUPS} == {
        g: [group_of(int(n)) for n in profile].count(g) for g in GROUPS
    }
    assert groups.count("tail") >= C // 2  # long-tailed: most classes are tail classes


def test_same_seed_same_files_other_seed_other_split(tmp_path):
    manifest, classes = write_source(tmp_path, n=1500)
    shuffled = tmp_path / "shuffled.jsonl"
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    random.Random(0).shuffle(lines)
    shuffled.write_text("\n".join(lines) + "\n")

    def run(name, seed, source=manifest):
        cfg = SplitLTConfig(
            manifest=source, classes=classes, out=str(tmp_path / name), seed=seed,
            check_files=False, max_per_class=60, plot=False,
        )  # fmt: skip
        split_long_tailed(cfg)
        return {
            f: (tmp_path / name / f).read_bytes()
            for f in ("train.jsonl", "val.jsonl", "test.jsonl")
        }

    first = run("a", 0)
    assert run("b", 0) == first
    assert run("c", 0, str(shuffled)) == first  # the input's line order does not matter
    assert run("d", 1)["train.jsonl"] != first["train.jsonl"]


def test_the_splits_partition_the_source_and_val_is_stratified(tmp_path):
    manifest, classes = write_source(tmp_path, n=2000)
    cfg = SplitLTConfig(manifest=manifest, classes=classes, out=str(tmp_path / "o"))
    cfg.check_files, cfg.max_per_class, cfg.val_fraction = False, 100, 0.1
    result = split_long_tailed(cfg)
    keys = {s: [r.key for r in recs] for s, recs in result.splits.items()}
    assert sum(map(len, keys.values())) == 2000 == len(set().union(*map(set, keys.values())))
    val_pos = np.zeros(C, dtype=int)
    for r in result.splits["val"]:
        val_pos[list(r.label_ids)] += 1
    assert (val_pos >= 1).all()  # the rest is balanced: every class reaches val
    assert abs(len(keys["val"]) - 0.1 * (2000 - len(keys["train"]))) <= 0.03 * 2000
    report = json.loads((tmp_path / "o" / "split_lt.json").read_text())
    assert report["groups"] == result.space.group_counts()
    assert report["images"] == {s: len(k) for s, k in keys.items()}
    assert (tmp_path / "o" / "split_lt.png").read_bytes()[:4] == b"\x89PNG"

    cfg.val_from, cfg.out, cfg.plot = "train", str(tmp_path / "t"), False
    carved = split_long_tailed(cfg)
    assert carved.sample.selected.tolist() == result.sample.selected.tolist()
    sampled = {r.key for r in carved.splits["train"] + carved.splits["val"]}
    assert sampled == set(keys["train"])  # val carved from the long-tailed sample


def test_the_command_prints_groups_and_the_histogram(tmp_path, capsys):
    manifest, classes = write_source(tmp_path, n=1500)
    args = ["data", "split-lt", f"manifest={manifest}", f"classes={classes}"]
    args += [f"out={tmp_path / 'o'}", "check_files=false", "max_per_class=60"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "groups (head >= 100, medium 20..99, tail < 20): head 0 / medium" in out
    assert "class00" in out and "#" in out and "train: " in out
    assert cli.main(["data", "split-lt", "manifest=x", "classes=y", "alpha=0"]) == 2

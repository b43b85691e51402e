"""The DP-VLPA pretraining corpus: train2017 images with a COCO-LT tail class (tails from the
benchmark's training split), one caption each, COCO-LT test images excluded."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from ltdist.data.coco import convert_coco
from ltdist.data.corpus import build_corpus, choose_caption, format_facts
from ltdist.data.pack import PackConfig, load_records
from ltdist.data.prepare import PrepareConfig, format_report, prepare
from ltdist.data.splits import class_names, label_space, load_split_records
from ltdist.labels import LabelSpace
from tests.data.convert_fixtures import coco_category_ids, jpeg, shared_dir, write_json

pytestmark = pytest.mark.both_envs

TEST_NAME = "000000397133.jpg"  # the first image of the COCO-LT test split (val2017)


def benchmark_tails() -> set[str]:
    """Tail classes straight from the split file: fewer than 20 positive training images."""
    names = class_names("coco_lt", shared_dir())
    freq = Counter(
        i for r in load_split_records("coco_lt", shared_dir(), "train") for i in r.label_ids
    )
    return {names[i] for i in range(len(names)) if freq[i] < 20}


def write_coco(root: Path, giraffe_images: int = 0) -> None:
    """train2017 (instances + captions) and an empty val2017 set; objects: image -> names."""
    cat = coco_category_ids(class_names("coco_lt", shared_dir()), seed=3)
    objects = {
        "a.jpg": ["person", "person", "giraffe", "giraffe", "giraffe"],
        "b.jpg": ["person", "dog"],  # heads only: not in the corpus
        "c.jpg": ["hot dog", "dog"],  # + a crowd hot dog below
        TEST_NAME: ["bear"],  # a COCO-LT test image: excluded whatever its folder
        "e.jpg": ["bear"],  # no caption: left out, counted
    }
    objects |= {f"g{k:02d}.jpg": ["giraffe"] for k in range(giraffe_images)}
    captions = {
        "a.jpg": ["Three giraffes near a man.", "A giraffe and people.", "giraffe, giraffe!"],
        "b.jpg": ["A man walks his dog."],
        "c.jpg": ["A dog looks at a plate.", "Hot dog on a plate, a dog nearby.", "Lunch."],
        TEST_NAME: ["A bear."],
    }
    captions |= {f"g{k:02d}.jpg": ["A tall giraffe."] for k in range(giraffe_images)}
    images, annotations, caption_anns = [], [], []
    for i, (name, objs) in enumerate(objects.items(), start=1):
        images.append({"id": i, "file_name": name})
        annotations += [{"image_id": i, "category_id": cat[o], "iscrowd": 0} for o in objs]
        caption_anns += [{"image_id": i, "caption": c} for c in captions.get(name, [])]
    annotations.append({"image_id": 3, "category_id": cat["hot dog"], "iscrowd": 1})
    for n, a in enumerate(annotations + caption_anns):
        a["id"] = n
    categories = [{"id": v, "name": k} for k, v in cat.items()]
    ann = root / "annotations"
    write_json(
        ann / "instances_train2017.json",
        {"images": images, "annotations": annotations, "categories": categories},
    )
    write_json(ann / "captions_train2017.json", {"images": images, "annotations": caption_anns})
    write_json(
        ann / "instances_val2017.json", {"images": [], "annotations": [], "categories": categories}
    )
    write_json(ann / "captions_val2017.json", {"images": [], "annotations": []})
    for name in objects:
        (root / "train2017").mkdir(parents=True, exist_ok=True)
        (root / "train2017" / name).write_bytes(jpeg(len(name)))
    (root / "val2017").mkdir(exist_ok=True)


def test_corpus_facts_match_a_direct_count(tmp_path):
    assert {"giraffe", "bear", "hot dog"} <= benchmark_tails() and "dog" not in benchmark_tails()
    write_coco(tmp_path)
    space = label_space("coco_lt", shared_dir())
    converted = convert_coco(str(tmp_path), ["train2017"], space)
    test_paths = [r.image for r in load_split_records("coco_lt", shared_dir(), "test")]
    assert test_paths[0] == f"val2017/{TEST_NAME}"

    records, facts = build_corpus(converted, space, test_paths, seed=0)

    assert [r.image for r in records] == ["train2017/a.jpg", "train2017/c.jpg"]
    # direct count: a.jpg 3 giraffes; c.jpg 1 hot dog + 1 crowd hot dog (crowd counts)
    assert (facts.images, facts.tail_instances) == (2, 5)
    assert (facts.excluded_test_images, facts.without_caption) == (1, 1)
    # mentions of the image's own tail classes in the chosen caption ("hot dog" is not "dog")
    chosen = {r.image: r.caption for r in records}
    expected = {
        "Three giraffes near a man.": 1,
        "A giraffe and people.": 1,
        "giraffe, giraffe!": 2,
        "A dog looks at a plate.": 0,
        "Hot dog on a plate, a dog nearby.": 1,
        "Lunch.": 0,
    }
    assert facts.tail_mentions == sum(expected[c] for c in chosen.values())
    assert facts.mentions_per_instance == pytest.approx(facts.tail_mentions / 5, abs=1e-12)
    for r in records:  # deterministic, and independent of the captions' file order
        options = converted.caption_lists[r.image]
        assert (
            r.caption
            == choose_caption(r.key, options, 0)
            == choose_caption(r.key, options[::-1], 0)
        )
    seeds = {
        choose_caption("train2017_a", converted.caption_lists["train2017/a.jpg"], s)
        for s in range(20)
    }
    assert len(seeds) == 3  # the seed does pick among them

    table = format_facts(facts)
    assert "tail-class instances" in table and "49,205" in table
    assert "0.438" in table and "1.883" in table and f"{facts.mentions_per_instance:.3f}" in table


def test_prepare_corpus_keeps_the_benchmark_tails(tmp_path):
    """25 corpus images of giraffe would make it a medium class by the corpus's own count; the
    corpus is packed in the benchmark's label space, and STAG (space_from: classes) reads that."""
    root = tmp_path / "coco"
    write_coco(root, giraffe_images=25)
    cfg = PrepareConfig(
        benchmark="coco_lt",
        root=str(root),
        out=str(tmp_path / "shards" / "coco_lt"),
        splits_dir=str(tmp_path / "splits"),
        splits_source=str(shared_dir()),
        samples_per_shard=8,
        corpus=True,
    )
    report = prepare(cfg, progress=False)
    corpus_dir = Path(tmp_path / "shards" / "coco_lt_corpus")
    assert report.corpus["location"] == str(corpus_dir)
    assert report.corpus["written"] == 27 and report.corpus["facts"]["tail_instances"] == 30
    text = format_report(report)
    assert "pretraining corpus in" in text and "49,205" in text
    again = prepare(cfg, progress=False)  # a rerun: nothing to do, the same table
    assert again.reused and again.corpus == report.corpus

    space = LabelSpace.load(corpus_dir / "classes.json")
    giraffe = space.id_of("giraffe")
    assert space.to_dict() == label_space("coco_lt", shared_dir()).to_dict()
    assert space.groups[giraffe] == "tail"

    stag_data = PackConfig(
        out=str(tmp_path / "stag"),
        classes=str(corpus_dir / "classes.json"),
        manifests={"train": str(corpus_dir / "manifests" / "train.jsonl")},
        space_from="classes",
    )
    read_space, splits, problems = load_records(stag_data)
    assert not problems and len(splits["train"]) == 27
    assert read_space.groups[giraffe] == "tail"
    stag_data.space_from = "train"  # the corpus's own count: what the benchmark must not allow
    assert load_records(stag_data)[0].groups[giraffe] == "medium"
    assert json.loads((corpus_dir / "train.index.json").read_text())["num_samples"] == 27


def test_the_corpus_configs_read_the_prepared_corpus():
    """The STAG config reads prepare's corpus manifest in the benchmark's classes.json; the
    pretraining config reads what that STAG run writes."""
    from ltdist.config import load_config
    from ltdist.stag.config import StagConfig
    from ltdist.train.config import TrainConfig

    configs = Path(__file__).resolve().parents[2] / "configs"
    stag = load_config(StagConfig, configs / "stag" / "coco_lt_corpus.yaml")
    prepared = PrepareConfig(benchmark="coco_lt", root="/datasets/coco", corpus=True)
    assert stag.data.space_from == "classes"
    assert stag.data.classes == f"{prepared.location}/classes.json"
    assert stag.data.manifests == {
        "train": f"{prepared.corpus_location}/manifests/train.jsonl",
        "test": f"{prepared.location}/manifests/test.jsonl",
    }
    pretrain = load_config(TrainConfig, configs / "pretrain" / "coco_lt_corpus.yaml")
    assert pretrain.task == "pretrain" and pretrain.data.location == stag.data.out
    assert pretrain.data.eval_split == "test"

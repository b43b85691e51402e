"""`ltdist data prepare`: COCO / VOC folders in their real layout -> benchmark shards, every split
image accounted for, resumable and idempotent."""

from __future__ import annotations

import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from ltdist.cli import main
from ltdist.data import prepare as prepare_module
from ltdist.data.convert import ConvertError
from ltdist.data.manifest import read_manifest
from ltdist.data.prepare import REPORT_FILE, PrepareConfig, format_report, prepare
from ltdist.data.shards import load_index
from ltdist.data.splits import class_names, label_space, load_split_records
from ltdist.entry import MissingInputError
from tests.data.convert_fixtures import (
    coco_instances,
    jpeg,
    shared_dir,
    split_label_names,
    voc_xml,
    write_json,
)

pytestmark = pytest.mark.both_envs

NON_ASCII = "Ein Hund läuft über die Straße — 一只狗"


def make_coco_root(tmp_path: Path, present: dict[str, int], full: bool = False) -> Path:
    """A COCO 2017 folder: instances and captions JSON (label sets from the split files) for
    every image of both COCO-LT splits (``full``) or a few more than the images present (the
    first ``present[split]`` of each; a missing image's annotations are never read)."""
    root = tmp_path / "coco"
    for split, image_dir in (("train", "train2017"), ("test", "val2017")):
        by_path = split_label_names("coco_lt", split, None if full else present[split] + 3)
        instances, _ = coco_instances({p.split("/", 1)[1]: n for p, n in by_path.items()})
        write_json(root / "annotations" / f"instances_{image_dir}.json", instances)
        captions = [
            {"id": 2 * i + k, "image_id": img["id"], "caption": f"caption {k} of {img['id']}."}
            for i, img in enumerate(instances["images"])
            for k in range(2)
        ]
        captions[0]["caption"] = NON_ASCII
        write_json(
            root / "annotations" / f"captions_{image_dir}.json",
            {"images": instances["images"], "annotations": captions},
        )
        for i, path in enumerate(list(by_path)[: present[split]]):
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(jpeg(i))
    return root


def config(tmp_path: Path, root: Path, benchmark: str = "coco_lt", **kw) -> PrepareConfig:
    return PrepareConfig(
        benchmark=benchmark,
        root=str(root),
        out=str(tmp_path / "shards"),
        splits_dir=str(tmp_path / "splits"),
        splits_source=str(shared_dir()),
        samples_per_shard=4,
        **kw,
    )


def shard_samples(location: str, split: str) -> dict[str, dict]:
    samples = {}
    for tar in sorted(Path(location).glob(f"{split}-*.tar")):
        with tarfile.open(tar) as t:
            for m in t.getmembers():
                if m.name.endswith(".json"):
                    samples[m.name[: -len(".json")]] = json.loads(t.extractfile(m).read())
    return samples


def table_row(text: str, split: str) -> list[int]:
    line = next(ln for ln in text.splitlines() if re.match(rf"{split}\s+\d", ln))
    return [int(x) for x in line.split()[1:]]


def test_coco_prepare_accounts_for_every_split_image_and_reruns_as_a_no_op(tmp_path):
    root = make_coco_root(tmp_path, {"train": 6, "test": 4}, full=True)
    cfg = config(tmp_path, root)
    report = prepare(cfg, progress=False)

    text = format_report(report)
    # in split, found, missing, rejected, written, unlabeled, differ
    assert table_row(text, "train") == [1909, 6, 1903, 0, 6, 0, 0]
    assert table_row(text, "test") == [5000, 4, 4996, 0, 4, 0, 0]
    assert "not comparable with the published benchmark" in text
    crowd = sum(
        a.get("iscrowd", 0)
        for d in ("train2017", "val2017")
        for a in json.loads((root / f"annotations/instances_{d}.json").read_text())["annotations"]
    )
    assert f"crowd annotations {crowd:,}," in text and crowd > 1000  # counted as labels
    assert "images without annotations 48" in text  # COCO-LT test's unlabelled images

    space = label_space("coco_lt", shared_dir())  # the benchmark's groups, not the 6 images'
    assert json.loads(Path(cfg.out, "classes.json").read_text()) == space.to_dict()
    names = class_names("coco_lt", shared_dir())
    expected = {r.key: r for r in load_split_records("coco_lt", shared_dir(), "train")[:6]}
    samples = shard_samples(cfg.out, "train")
    assert set(samples) == set(expected)
    for key, meta in samples.items():
        assert meta["label_ids"] == list(expected[key].label_ids)
        assert meta["labels"] == [names[i] for i in expected[key].label_ids]
    first = next(iter(expected))
    assert samples[first]["caption"] == f"{NON_ASCII} caption 1 of 1000."
    manifest = read_manifest(Path(cfg.out, "manifests", "train.jsonl"), space)
    assert [r.key for r in manifest.records] == list(expected) and not manifest.problems
    assert load_index(cfg.out, "test").complete

    report_file = Path(cfg.out, REPORT_FILE)
    stamp = report_file.stat().st_mtime_ns
    again = prepare(cfg, progress=False)
    assert again.reused and report_file.stat().st_mtime_ns == stamp
    assert table_row(format_report(again), "train") == [1909, 6, 1903, 0, 6, 0, 0]
    assert "already prepared, nothing done" in format_report(again)


def test_interrupted_prepare_resumes_and_keeps_the_packed_split(tmp_path, monkeypatch):
    root = make_coco_root(tmp_path, {"train": 9, "test": 2})
    cfg = config(tmp_path, root)
    real_pack = prepare_module.pack_split

    def interrupted(records, space, location, split, *args, **kw):
        if split == "test":
            raise KeyboardInterrupt
        return real_pack(records, space, location, split, *args, **kw)

    monkeypatch.setattr(prepare_module, "pack_split", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    assert load_index(cfg.out, "train").complete
    assert not Path(cfg.out, REPORT_FILE).exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in Path(cfg.out).glob("train-*.tar")}
    assert len(stamps) == 3  # 9 images, 4 per shard

    monkeypatch.setattr(prepare_module, "pack_split", real_pack)
    report = prepare(cfg, progress=False)
    assert not report.reused
    assert {p.name: p.stat().st_mtime_ns for p in Path(cfg.out).glob("train-*.tar")} == stamps
    assert report.splits["train"].written == 9 and report.splits["test"].written == 2


def test_layout_check_names_the_first_missing_folder_before_reading_anything(tmp_path, monkeypatch):
    root = make_coco_root(tmp_path, {"train": 2, "test": 0})  # no val2017/ at all
    monkeypatch.setattr(prepare_module, "convert", lambda *a: pytest.fail("converted"))
    with pytest.raises(MissingInputError, match=rf"{root}/val2017 not found: the layout needs"):
        prepare(config(tmp_path, root), progress=False)
    with pytest.raises(MissingInputError, match="data set root .* is not a folder"):
        prepare(config(tmp_path, tmp_path / "nowhere"), progress=False)


def test_bad_annotation_is_listed_under_skip_and_stops_under_error(tmp_path):
    root = make_coco_root(tmp_path, {"train": 5, "test": 1})
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["categories"].append({"id": 95, "name": "unicorn"})
    first = data["images"][0]
    data["annotations"].append({"id": 99999, "image_id": first["id"], "category_id": 95})
    write_json(path, data)

    report = prepare(config(tmp_path, root), progress=False)
    train = report.splits["train"]
    assert train.written == 4 and len(train.rejected) == 1904 + 1
    bad = next(r for r in train.rejected if r["reason"] != "image not found")
    assert bad["image"] == f"train2017/{first['file_name']}"
    assert bad["reason"].startswith(f"{path}: annotation id 99999: category id 95 (unknown class")
    assert f"train {bad['image']}: {bad['reason']}" in format_report(report)

    strict = config(tmp_path, root, policy="error")
    strict.out = str(tmp_path / "strict")
    with pytest.raises(ConvertError, match=rf"train split image {bad['image']} .*line 1.*{path}"):
        prepare(strict, progress=False)
    data["annotations"].pop()
    write_json(path, data)
    sixth = split_label_names("coco_lt", "train", limit=6)
    missing = os.path.join(root, list(sixth)[5])
    with pytest.raises(MissingInputError, match=rf"{missing} \(split file line 6\) not found"):
        prepare(strict, progress=False)


def test_voc_prepare_from_the_command_line(tmp_path, capsys):
    root = tmp_path / "voc"
    names = class_names("voc_lt", shared_dir())
    present = {}
    for split in ("train", "test"):
        records = load_split_records("voc_lt", shared_dir(), split)
        present[split] = records[:3]
        for i, r in enumerate(records[:3]):  # the others' images are missing: never read
            xml = root / r.image.replace("JPEGImages", "Annotations").replace(".jpg", ".xml")
            xml.parent.mkdir(parents=True, exist_ok=True)
            xml.write_text(voc_xml([names[j] for j in r.label_ids], {0} if i % 2 else set()))
        for i, r in enumerate(records[:3]):
            (root / r.image).parent.mkdir(parents=True, exist_ok=True)
            (root / r.image).write_bytes(jpeg(i))
    broken = present["train"][1]
    xml = root / broken.image.replace("JPEGImages", "Annotations").replace(".jpg", ".xml")
    xml.write_text("<annotation>\n<object><name>dog</name>\n</annotation>\n")
    out = tmp_path / "shards"
    argv = ["data", "prepare", "voc_lt", "--voc-root", str(root / "VOCdevkit"), "--out", str(out)]
    argv += ["--splits-dir", str(tmp_path / "splits"), "--splits-source", str(shared_dir())]
    assert main([*argv, "samples_per_shard=2"]) == 0
    text = capsys.readouterr().out
    assert table_row(text, "train") == [1142, 3, 1139, 1, 2, 0, 0]
    assert table_row(text, "test") == [4952, 3, 4949, 0, 3, 0, 0]
    assert f"train {broken.image}: {xml}: line 3, column 2: malformed XML" in text

    space = label_space("voc_lt", shared_dir())
    manifest = read_manifest(out / "manifests" / "train.jsonl", space)
    kept = [present["train"][0], present["train"][2]]
    assert [(r.key, r.label_ids, r.caption) for r in manifest.records] == [
        (r.key, r.label_ids, r.caption)
        for r in kept  # VOC captions: the split's (OFA) file
    ]
    assert main(["data", "prepare", "voc_lt", "--coco-root", str(root)]) == 2
    assert "--coco-root does not apply to voc_lt" in capsys.readouterr().err


def test_labels_that_differ_from_the_split_file_are_listed_and_selectable(tmp_path):
    root = make_coco_root(tmp_path, {"train": 3, "test": 1})
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    first = data["images"][0]
    toaster = next(c["id"] for c in data["categories"] if c["name"] == "toaster")
    data["annotations"].append({"id": 99999, "image_id": first["id"], "category_id": toaster})
    write_json(path, data)
    split = load_split_records("coco_lt", shared_dir(), "train")[0]
    space = label_space("coco_lt", shared_dir())
    added = tuple(sorted({*split.label_ids, space.id_of("toaster")}))

    report = prepare(config(tmp_path, root), progress=False)
    assert report.splits["train"].disagreements == [
        {"key": split.key, "split": list(split.label_ids), "source": list(added)}
    ]
    text = format_report(report)
    assert table_row(text, "train")[-1] == 1
    listed = f"labels {list(added)} from the annotations, {list(split.label_ids)} in the split"
    assert listed in text
    assert shard_samples(report.location, "train")[split.key]["label_ids"] == list(added)

    by_file = config(tmp_path, root, labels="split")
    by_file.out = str(tmp_path / "by_file")
    prepare(by_file, progress=False)
    assert shard_samples(by_file.out, "train")[split.key]["label_ids"] == list(split.label_ids)

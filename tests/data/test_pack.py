"""`ltdist data pack`: every input record written or listed with its reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltdist.data import pack
from ltdist.data.pack import PackConfig, PackError, pack_dataset
from ltdist.data.shards import load_index, verify_split

# Shared modules: these tests run in both environments (see tests/test_environments.py).
pytestmark = pytest.mark.both_envs


def write_inputs(folder: Path) -> PackConfig:
    rng = np.random.default_rng(1)
    (folder / "img").mkdir(parents=True)
    (folder / "classes.txt").write_text("person\ndog\nsurfboard\n")
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(
            folder / f"img/{i}.png"
        )
        lines.append(
            {"key": f"k{i:02d}", "image": f"img/{i}.png", "labels": ["person", "dog"][: 1 + i % 2]}
        )
    (folder / "img/3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # corrupt: fails decoding
    lines[5]["image"] = "img/missing.png"  # missing: caught while reading the manifest
    lines[7]["labels"] = ["persn"]  # unknown class
    (folder / "train.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    tests = [{"key": "t0", "image": "img/0.png", "labels": ["dog"]}]
    (folder / "test.jsonl").write_text(json.dumps(tests[0]) + "\n")
    return PackConfig(
        out=str(folder / "shards"),
        classes=str(folder / "classes.txt"),
        manifests={"train": str(folder / "train.jsonl"), "test": str(folder / "test.jsonl")},
        samples_per_shard=5,
    )


def test_skip_policy_accounts_for_every_record(tmp_path):
    cfg = write_inputs(tmp_path)
    cfg.policy = "skip"
    results = pack_dataset(cfg, progress=False)
    train = results["train"]
    assert train.num_input == 10  # two records left out while reading the manifest
    assert train.num_written == 9
    assert [r["key"] for r in train.rejected] == ["k03"]
    assert "does not decode" in train.rejected[0]["reason"]
    problems = json.loads(Path(cfg.out, "manifest_problems.json").read_text())
    assert {(p["key"], p["line"]) for p in problems} == {("k05", 6), ("k07", 8)}
    assert "not found" in problems[0]["reason"] and "did you mean 'person'" in problems[1]["reason"]
    index = load_index(cfg.out, "train")
    assert index.num_samples + index.num_rejected + len(problems) == 12
    assert verify_split(cfg.out, "train") == []

    again = pack_dataset(cfg, progress=False)["train"]  # a rerun has nothing left to do
    assert again.shards_written == [] and again.num_written == 9


def test_error_policy_names_the_record(tmp_path):
    cfg = write_inputs(tmp_path)
    with pytest.raises(ValueError, match=r"line 6 \(key 'k05'\): image file not found"):
        pack_dataset(cfg, progress=False)
    (tmp_path / "img/missing.png").write_bytes((tmp_path / "img/0.png").read_bytes())
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    lines[7] = lines[7].replace("persn", "person")
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        PackError, match=r"train key 'k03' \(manifest line 4\): image does not decode"
    ):
        pack_dataset(cfg, progress=False)


def test_all_splits_share_the_training_label_space(tmp_path):
    cfg = write_inputs(tmp_path)
    cfg.policy = "skip"
    pack_dataset(cfg, progress=False)
    classes = json.loads(Path(cfg.out, "classes.json").read_text())
    # Counted over the 10 records that passed manifest validation: person on all, dog on the
    # odd ones (k05 and k07 were left out).
    assert [c["frequency"] for c in classes["classes"]] == [10, 4, 0]
    other = PackConfig(**{**cfg.__dict__, "manifests": {"train": cfg.manifests["test"]}})
    with pytest.raises(PackError, match="different label space"):
        pack_dataset(other, progress=False)


def test_a_pipe_image_path_in_a_manifest_runs_nothing(tmp_path, monkeypatch):
    # A manifest beside the working directory: its folder is '.', so a relative image path
    # 'pipe:...' once read as a WebDataset pipe URL and ran its command.
    cfg = write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "ran"  # what `touch ran`, run in this folder, would create
    lines = Path("train.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"key": "evil", "image": "pipe:touch ran", "labels": ["dog"]})
    Path("train.jsonl").write_text("\n".join(lines) + "\n")
    Path("pipe:touch ran").write_bytes(Path("img/1.png").read_bytes())  # a real file
    cfg.manifests = {"train": "train.jsonl"}
    cfg.policy = "skip"
    train = pack_dataset(cfg, progress=False)["train"]
    assert not marker.exists()
    # The file of that name is data: it is read as an image, and nothing runs.
    assert "evil" not in {r["key"] for r in train.rejected}
    assert train.num_written == 9


def test_a_pipe_image_location_is_rejected_with_its_reason(tmp_path):
    from ltdist.data.pack import load_image

    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="runs a shell command"):
        load_image(f"pipe:touch {marker}")
    assert not marker.exists()


def test_a_rerun_after_the_input_changed_rewrites_what_changed(tmp_path):
    # once: "48 kept from an earlier run" although labels and images had changed, as only
    # the counts were compared
    cfg = write_inputs(tmp_path)
    cfg.policy = "skip"
    first = pack_dataset(cfg, progress=False)["train"]
    assert first.shards_written == [0, 1]
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    rec = json.loads(lines[8])  # k08, in the second shard (k00..k04 | k06, k08..k11)
    rec["caption"] = "a new caption"
    lines[8] = json.dumps(rec)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    again = pack_dataset(cfg, progress=False)["train"]
    assert again.shards_redone == [1] and again.shards_written == [1] and again.shards_kept == 1
    written = {s.key: s.meta["caption"] for s in read_split_samples(cfg.out)}
    assert written["k08"] == "a new caption"
    # an image file replaced under the same name is a change too
    Image.fromarray(np.zeros((12, 12, 3), dtype=np.uint8)).save(tmp_path / "img/0.png")
    third = pack_dataset(cfg, progress=False)["train"]
    assert third.shards_redone == [0]
    assert pack_dataset(cfg, progress=False)["train"].shards_written == []  # nothing changed


def read_split_samples(location: str):
    from ltdist.data.shards import read_split

    return list(read_split(location, "train"))


def test_one_bad_record_costs_only_itself(tmp_path):
    # a caption with a non-UTF-8 byte, one with a lone surrogate, and a 96-character key once
    # each stopped the whole pack (rc 2) naming neither line nor key
    cfg = write_inputs(tmp_path)
    cfg.policy = "skip"
    path = tmp_path / "train.jsonl"
    lines = path.read_bytes().splitlines()
    lines[0] = lines[0].replace(b'"k00"', b'"k00", "caption": "caf\xe9 au lait"')  # Latin-1
    rec = json.loads(lines[1])
    rec["caption"] = "a \ud800 surrogate"
    lines[1] = json.dumps(rec).encode()  # JSON escapes it: \\ud800
    rec = json.loads(lines[2])
    rec["key"] = "k" * 96
    lines[2] = json.dumps(rec).encode()
    path.write_bytes(b"\n".join(lines) + b"\n")
    train = pack_dataset(cfg, progress=False)["train"]
    problems = json.loads(Path(cfg.out, "manifest_problems.json").read_text())
    reasons = {p["line"]: p["reason"] for p in problems}
    assert "not valid UTF-8" in reasons[1]
    assert "lone surrogate" in reasons[2] and "k01" in {p["key"] for p in problems}
    assert "at most 95 characters" in reasons[3]
    assert train.num_written == 6  # the 9 good ones of before, less these three
    assert verify_split(cfg.out, "train") == []


def test_a_bad_record_under_the_error_policy_names_its_line(tmp_path):
    cfg = write_inputs(tmp_path)
    path = tmp_path / "train.jsonl"
    lines = path.read_bytes().splitlines()
    lines[0] = lines[0] + b" \xff"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"train.jsonl: line 1 \(key None\): not valid UTF-8"):
        pack_dataset(cfg, progress=False)


def test_an_image_of_too_many_pixels_is_refused_before_it_is_decoded(tmp_path):
    from ltdist.data.pack import ImageError, load_image

    path = tmp_path / "huge.png"
    Image.new("L", (12_000, 12_000)).save(path, optimize=True)  # ~150 KB on disk
    assert path.stat().st_size < 1_000_000
    with pytest.raises(ImageError, match=r"12000 x 12000 = 144,000,000 pixels is over the limit"):
        load_image(str(path))
    small = tmp_path / "small.png"
    Image.new("RGB", (64, 48)).save(small)
    assert load_image(str(small))[1] == "png"


@pytest.fixture
def small_pools(monkeypatch):
    """A worker pool even for the dozen images of these tests."""
    monkeypatch.setattr(pack, "MIN_IMAGES_PER_WORKER", 1)


def test_parallel_pack_is_byte_identical_to_serial(tmp_path, small_pools, monkeypatch):
    """Images decoded and re-encoded (resize on) in 2 worker processes give the serial run's
    shard and index bytes, and the same reject with the same reason."""
    cfg = write_inputs(tmp_path)
    cfg.policy, cfg.max_image_size, cfg.samples_per_shard = "skip", 8, 3
    pools, loaded_images = [], pack.loaded_images
    monkeypatch.setattr(pack, "loaded_images", lambda *a: pools.append(a[2]) or loaded_images(*a))
    outs = {}
    for workers in (1, 2):
        cfg.out, cfg.workers = str(tmp_path / f"shards_{workers}"), workers
        result = pack_dataset(cfg, progress=False)["train"]
        assert [r["key"] for r in result.rejected] == ["k03"]
        outs[workers] = {p.name: p.read_bytes() for p in Path(cfg.out).iterdir()}
    assert pools == [1, 1, 2, 1]  # train and test per run; test has one image
    assert sorted(outs[1]) == sorted(outs[2])
    assert len([n for n in outs[1] if n.endswith(".tar")]) == 5
    assert outs[1] == outs[2]


def test_parallel_pack_stops_at_the_same_record(tmp_path, small_pools):
    cfg = write_inputs(tmp_path)
    cfg.manifests.pop("test")
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    del lines[7], lines[5]  # leave the corrupt k03 as the only bad record
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    messages = []
    for workers in (1, 2):
        cfg.out, cfg.workers = str(tmp_path / f"shards_{workers}"), workers
        with pytest.raises(PackError) as e:
            pack_dataset(cfg, progress=False)
        messages.append(str(e.value))
        assert load_index(cfg.out, "train").shards == {}  # k03 is in the first shard
    assert messages[0] == messages[1] and "key 'k03'" in messages[0]

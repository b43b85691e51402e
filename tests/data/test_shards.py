"""The shard contract: deterministic WebDataset tars, index, atomic publish, kill + resume."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltdist.data.pack import pack_split
from ltdist.data.shards import (
    ShardSample,
    ShardWriter,
    encode_tar,
    load_index,
    read_shard,
    verify_split,
)
from ltdist.labels import LabelSpace

# Shared modules: these tests run in both environments (see tests/test_environments.py).
pytestmark = pytest.mark.both_envs


def all_samples(location: str, split: str = "train") -> list[ShardSample]:
    index = load_index(location, split)
    return [s for info in index.ordered() for s in read_shard(os.path.join(location, info.name))]


def test_tar_members_are_webdataset_samples_and_bytes_are_deterministic(dataset):
    location, keys = dataset(25, 10)
    samples = all_samples(location)
    assert [s.key for s in samples] == keys
    assert samples[3].meta["label_ids"] == [3, 1] or samples[3].meta["label_ids"] == [1, 3]
    assert samples[3].text == "txt 3" and samples[3].image_ext == "png"
    with tarfile.open(os.path.join(location, "train-000000.tar")) as tar:
        names = tar.getnames()[:3]
        assert names == ["s00000.png", "s00000.json", "s00000.txt"]
        assert {m.mtime for m in tar.getmembers()} == {0}
    # The same samples encode to the same bytes: a rewritten shard equals the original.
    assert encode_tar(samples[:10]) == Path(location, "train-000000.tar").read_bytes()


def test_index_records_counts_bytes_and_sha256(dataset):
    location, _ = dataset(25, 10)
    index = json.loads(Path(location, "train.index.json").read_text())
    assert index["num_shards"] == 3 and index["complete"] and index["num_samples"] == 25
    assert [s["count"] for s in index["shards"]] == [10, 10, 5]
    for s in index["shards"]:
        data = Path(location, s["name"]).read_bytes()
        assert s["bytes"] == len(data)
        assert s["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_split(location, "train") == []


def test_verify_reports_a_corrupted_shard(dataset):
    location, _ = dataset(25, 10)
    path = Path(location, "train-000001.tar")
    data = bytearray(path.read_bytes())
    data[700] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify_split(location, "train")
    assert [p.shard for p in problems] == ["train-000001.tar"]
    assert "sha256" in problems[0].reason


def test_keys_with_dots_or_slashes_are_refused():
    with pytest.raises(ValueError, match="first dot"):
        encode_tar([ShardSample("a.b", {"label_ids": []})])


def test_rerun_removes_orphans_and_temporaries(dataset):
    location, _ = dataset(25, 10)
    index = load_index(location, "train")
    # A killed run can leave a published shard the index does not list, and a temporary file.
    del index.shards[2]
    Path(location, "train.index.json").write_text(json.dumps(index.to_dict()))
    dead = _a_dead_pid()
    Path(location, f"train-000002.tar.tmp-{dead}").write_bytes(b"partial")
    writer = ShardWriter(location, "train", 10, 25)
    assert writer.index.missing() == [2]
    assert not Path(location, "train-000002.tar").exists()
    assert not Path(location, f"train-000002.tar.tmp-{dead}").exists()


def _a_dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_second_writer_leaves_a_live_writers_temporary_alone(dataset):
    # two packs into one folder: the second's orphan sweep once removed the first's in-flight
    # temporary, and the first crashed on its rename
    location, _ = dataset(25, 10)
    live = Path(location, f"train-000001.tar.tmp-{os.getpid()}")  # this process: alive
    live.write_bytes(b"in flight")
    ShardWriter(location, "train", 10, 25)
    assert live.exists()


def test_shard_temporaries_stay_beside_the_output(dataset, tmp_path, monkeypatch):
    # killed packs once left shard-sized files in the system's temp folder
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    location, _ = dataset(25, 10)
    assert list(system_tmp.iterdir()) == []
    assert not [p for p in Path(location).iterdir() if ".tmp-" in p.name]


def test_resume_with_other_settings_is_refused(dataset):
    location, _ = dataset(25, 10)
    with pytest.raises(ValueError, match="samples_per_shard=10"):
        ShardWriter(location, "train", 5, 25)


# -- SIGKILL mid-shard, then resume -------------------------------------------------------

NAMES = ["person", "dog", "surfboard"]

KILLABLE_PACK = """
import sys, time
from pathlib import Path
import ltdist.data.pack as pack
from ltdist.data.manifest import read_manifest
from ltdist.labels import LabelSpace


manifest, out, marker = sys.argv[1:4]
names = ["person", "dog", "surfboard"]
records = read_manifest(manifest, names).records
space = LabelSpace.from_label_sets(names, [r.label_ids for r in records])
real_load = pack.load_image
calls = 0
def slow_load(path, max_size=0):
    global calls
    calls += 1
    if calls == 25:  # the middle of shard 2 (shards of 10)
        Path(marker).touch()
        time.sleep(60)
    return real_load(path, max_size)
pack.load_image = slow_load
pack.pack_split(records, space, out, "train", 10, progress=False)
"""


def make_images(folder: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        path = folder / "img" / f"{i:03d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path, quality=90)
        labels = [NAMES[i % 3]] + (["person"] if i % 5 == 0 else [])
        lines.append(
            json.dumps({"image": f"img/{i:03d}.jpg", "labels": labels, "caption": f"c{i}"})
        )
    manifest = folder / "train.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_sigkill_mid_shard_then_resume_writes_every_sample_exactly_once(tmp_path):
    manifest = make_images(tmp_path, 50)
    out, marker = tmp_path / "shards", tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE_PACK, str(manifest), str(out), str(marker)],
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 60
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "the pack never reached shard 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    index = load_index(str(out), "train")
    assert sorted(index.shards) == [0, 1]  # shard 2 was in progress: not published
    done_bytes = {n: Path(out, n).read_bytes() for n in ("train-000000.tar", "train-000001.tar")}

    from ltdist.data.manifest import read_manifest

    records = read_manifest(manifest, NAMES).records
    space = LabelSpace.from_label_sets(NAMES, [r.label_ids for r in records])
    result = pack_split(records, space, str(out), "train", 10, progress=False)
    assert result.shards_written == [2, 3, 4] and result.shards_kept == 2
    for name, data in done_bytes.items():
        assert Path(out, name).read_bytes() == data  # completed shards untouched

    samples = all_samples(str(out))
    assert sorted(s.key for s in samples) == sorted(r.key for r in records)  # exactly once
    assert verify_split(str(out), "train") == []

    # Resumed == straight: a fresh run in another folder writes identical bytes.
    straight = tmp_path / "straight"
    pack_split(records, space, str(straight), "train", 10, progress=False)
    for k in range(5):
        name = f"train-{k:06d}.tar"
        assert Path(out, name).read_bytes() == Path(straight, name).read_bytes()


def test_images_keep_their_bytes(tmp_path):
    manifest = make_images(tmp_path, 3)
    from ltdist.data.manifest import read_manifest

    records = read_manifest(manifest, NAMES).records
    space = LabelSpace.from_label_sets(NAMES, [r.label_ids for r in records])
    pack_split(records, space, str(tmp_path / "s"), "train", 10, progress=False)
    for s in all_samples(str(tmp_path / "s")):
        assert s.image_ext == "jpg"
        assert s.image == Path(tmp_path, "img", s.key.split("_")[-1] + ".jpg").read_bytes()
        assert Image.open(io.BytesIO(s.image)).size == (16, 16)


@pytest.mark.parametrize(
    "name", ["/etc/passwd", "../other/train-000000.tar", "sub/train-000000.tar", "pipe:ls"]
)
def test_index_shard_names_must_be_plain_names_in_the_folder(tmp_path, name):
    from ltdist.data.shards import ShardWriter, load_index

    writer = ShardWriter(str(tmp_path), "train", 2, 2)
    writer.write_shard(
        0, [ShardSample("a", {"label_ids": [0]}), ShardSample("b", {"label_ids": []})]
    )
    path = tmp_path / "train.index.json"
    data = json.loads(path.read_text())
    data["shards"][0]["name"] = name
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"train.index.json: shard 0 is named .* must be named"):
        load_index(str(tmp_path), "train")


def test_index_split_name_must_be_plain(tmp_path):
    from ltdist.data.shards import ShardIndex

    with pytest.raises(ValueError, match="not a plain name"):
        ShardIndex.from_dict(
            {
                "format_version": 1,
                "split": "../x",
                "samples_per_shard": 1,
                "num_input": 0,
                "shards": [],
            }
        )


# -- what evaluation and training read is what was written, all of it -----------------------


def _swap_second_shard_for_the_first(location: str) -> None:
    # a shard replaced by another of the same count: the index's counts still agree
    first, second = Path(location, "train-000000.tar"), Path(location, "train-000001.tar")
    second.write_bytes(first.read_bytes())


def _flip_a_label_byte(location: str) -> None:
    path = Path(location, "train-000001.tar")
    data = bytearray(path.read_bytes())
    i = data.index(b'"label_ids": [') + len(b'"label_ids": [')
    data[i] = ord("4") if data[i] != ord("4") else ord("3")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_swap_second_shard_for_the_first, _flip_a_label_byte])
def test_evaluation_refuses_a_shard_that_is_not_what_its_index_says(dataset, damage):
    from ltdist.data.shards import ShardIntegrityError, read_split

    location, keys = dataset(12, 4)
    assert [s.key for s in read_split(location, "train")] == keys
    damage(location)
    with pytest.raises(ShardIntegrityError, match=r"train-000001\.tar: SHA-256 .* index"):
        list(read_split(location, "train"))


@pytest.mark.parametrize("damage", [_swap_second_shard_for_the_first, _flip_a_label_byte])
def test_training_refuses_a_shard_that_is_not_what_its_index_says(dataset, damage):
    from ltdist.data.loader import LoaderConfig, ShardLoader
    from ltdist.data.shards import ShardIntegrityError

    location, _ = dataset(12, 4)
    damage(location)
    cfg = LoaderConfig(batch_size=2, num_workers=0, shuffle_buffer=0, shuffle_shards=False)
    with pytest.raises(ShardIntegrityError, match=r"train-000001\.tar"):
        list(ShardLoader(location, "train", cfg, decode_images=False))
    # the check is a switch: off, the damaged shard is read as it is
    off = LoaderConfig(
        batch_size=2, num_workers=0, shuffle_buffer=0, shuffle_shards=False, verify=False
    )
    assert len(list(ShardLoader(location, "train", off, decode_images=False))) == 6


def test_evaluation_refuses_an_incomplete_split(dataset):
    from ltdist.data.shards import read_split

    location, _ = dataset(12, 4)
    path = Path(location, "train.index.json")
    index = json.loads(path.read_text())
    index["shards"] = index["shards"][:2]  # an interrupted pack: 8 of the 12 samples
    path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"incomplete \(missing shards \[2\] of 3\)"):
        list(read_split(location, "train"))


def test_coverage_states_what_was_scored_against_the_split(dataset):
    from ltdist.data.shards import split_coverage

    location, _ = dataset(12, 4)
    cov = split_coverage(location, "train", 12)
    assert (cov["samples_scored"], cov["split_samples"], cov["rejected_at_pack"]) == (12, 12, 0)
    assert cov["text"].startswith("scored 12 of the 12 samples of train")


def _break_json(location: str) -> None:
    path = Path(location, "train-000001.tar")
    data = bytearray(path.read_bytes())
    i = data.index(b'{"caption"')
    data[i] = 0xFF  # not UTF-8 any more
    path.write_bytes(bytes(data))


def _break_a_header(location: str) -> None:
    path = Path(location, "train-000001.tar")
    data = bytearray(path.read_bytes())
    data[148:156] = b"XXXXXXXX"  # the first header's checksum field
    path.write_bytes(bytes(data))


def _truncate(location: str) -> None:
    path = Path(location, "train-000001.tar")
    path.write_bytes(path.read_bytes()[:700])


@pytest.mark.parametrize(
    "damage, what",
    [
        (_break_json, r"member s0000\d\.json does not decode \(UnicodeDecodeError"),
        (_break_a_header, "not a readable tar"),
        (_truncate, "train-000001.tar"),
    ],
)
def test_a_damaged_shard_is_named_with_its_member(dataset, damage, what):
    from ltdist.data.shards import ShardIntegrityError, read_split

    location, _ = dataset(12, 4)
    damage(location)
    with pytest.raises(ShardIntegrityError, match=r"train-000001\.tar") as err:
        list(read_split(location, "train"))
    assert re.search(what, str(err.value)), str(err.value)


def test_a_truncated_index_names_its_file(dataset):
    location, _ = dataset(12, 4)
    path = Path(location, "train.index.json")
    path.write_text(path.read_text()[:100])
    with pytest.raises(ValueError, match=r"train\.index\.json: not a readable shard index"):
        load_index(location, "train")

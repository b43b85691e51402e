"""Storage locations (ltdist/storage.py): local folders, ``s3://`` on a local moto server, and
``pipe:`` commands.

The S3 tests configure the endpoint the way a user points ltdist at MinIO or Ceph, with no
code change: the ``AWS_ENDPOINT_URL`` environment variable (honoured by botocore >= 1.31, and
so by aiobotocore and s3fs), plus the usual credential variables. The moto server listens on
127.0.0.1 only.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ltdist import storage
from ltdist.data.loader import LoaderConfig, ShardLoader
from ltdist.data.pack import PackConfig, pack_dataset
from ltdist.data.shards import (
    ShardSample,
    encode_tar,
    index_location,
    load_index,
    load_label_space,
    read_shard,
    verify_split,
)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A folder location of either kind: the storage ops must behave the same on both."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3") + "/root"


def test_s3_endpoint_comes_from_the_environment(s3, s3_endpoint):
    import boto3
    import fsspec

    fs, _ = fsspec.core.url_to_fs(s3)
    assert fs.endpoint_url is None  # nothing passed in code: botocore read AWS_ENDPOINT_URL
    storage.write_bytes_atomic(storage.join(s3, "probe.txt"), b"hello")
    # The object is on the moto server (asked directly), not on some other S3.
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    body = client.get_object(Bucket=s3.removeprefix("s3://"), Key="probe.txt")["Body"].read()
    assert body == b"hello"


def test_fsspec_config_variables_also_set_the_endpoint(s3, s3_endpoint, monkeypatch):
    """``FSSPEC_S3_ENDPOINT_URL`` works too, but fsspec reads it when it is imported."""
    import fsspec
    import fsspec.config
    import s3fs

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    fsspec.config.set_conf_env(fsspec.config.conf, {"FSSPEC_S3_ENDPOINT_URL": s3_endpoint})
    s3fs.S3FileSystem.clear_instance_cache()
    fs, _ = fsspec.core.url_to_fs(s3)
    assert fs.endpoint_url == s3_endpoint
    storage.write_bytes_atomic(storage.join(s3, "probe.txt"), b"hi")
    assert storage.read_bytes(storage.join(s3, "probe.txt")) == b"hi"


def test_join():
    assert storage.join("s3://b/ds/", "train.index.json") == "s3://b/ds/train.index.json"
    assert storage.join("s3://b", "ds", "a.tar") == "s3://b/ds/a.tar"
    assert storage.join("/data/ds", "a.tar") == "/data/ds/a.tar"
    assert storage.join("file:///data/ds", "a.tar") == "/data/ds/a.tar"
    assert storage.is_local("/data/ds") and storage.is_local("file:///data/ds")
    assert not storage.is_local("s3://b/ds") and not storage.is_local("pipe:cat x")


def test_file_ops(root, tmp_path):
    a, b = storage.join(root, "a.bin"), storage.join(root, "sub", "b.bin")
    assert storage.listdir(root) == []  # a folder that does not exist yet is empty
    assert not storage.exists(a)
    storage.makedirs(root)
    storage.write_bytes_atomic(a, b"one")
    assert storage.exists(a) and storage.read_bytes(a) == b"one"
    storage.write_bytes_atomic(a, b"two")  # replaces whole
    assert storage.read_bytes(a) == b"two"
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    storage.put_file_atomic(str(src), b)  # into a sub-folder that does not exist yet
    assert storage.read_bytes(b) == src.read_bytes()
    assert src.exists()  # put copies; the caller owns the local file
    assert storage.listdir(root) == ["a.bin", "sub"]
    assert storage.listdir(storage.join(root, "sub")) == ["b.bin"]
    with storage.open_read(b) as f:
        assert f.read(4) == bytes(range(4))
    storage.remove(a)
    storage.remove(a)  # removing what is gone is not an error
    assert not storage.exists(a)
    assert storage.listdir(root) == ["sub"]
    with pytest.raises(FileNotFoundError):  # pack turns exactly this into "image not found"
        storage.read_bytes(a)


def test_s3_sees_what_other_processes_did(s3, s3_endpoint):
    """No stale answers from fsspec's listing cache after another writer changed the folder."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket, folder = s3.removeprefix("s3://"), storage.join(s3, "ds")
    storage.write_bytes_atomic(storage.join(folder, "a"), b"short")
    assert (
        storage.listdir(folder) == ["a"]
        and storage.read_bytes(storage.join(folder, "a")) == b"short"
    )
    client.put_object(Bucket=bucket, Key="ds/b", Body=b"new")
    client.put_object(Bucket=bucket, Key="ds/a", Body=b"a longer body")
    assert storage.exists(storage.join(folder, "b")) and storage.listdir(folder) == ["a", "b"]
    assert storage.read_bytes(storage.join(folder, "a")) == b"a longer body"
    client.delete_object(Bucket=bucket, Key="ds/b")
    assert not storage.exists(storage.join(folder, "b")) and storage.listdir(folder) == ["a"]


def test_tree_upload_and_download(root, tmp_path):
    files = {"trainer.json": b"{}", "state/model.bin": b"w" * 5000, "state/rng/0.pkl": b"r"}
    src = tmp_path / "src"
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    location = storage.join(root, "step-00000001")
    storage.upload_tree(src, location)
    assert storage.listdir(location) == ["state", "trainer.json"]
    assert storage.read_bytes(storage.join(location, "state", "rng", "0.pkl")) == b"r"
    dst = tmp_path / "dst"
    storage.download_tree(location, dst)
    got = {p.relative_to(dst).as_posix(): p.read_bytes() for p in dst.rglob("*") if p.is_file()}
    assert got == files


def test_s3_download_tree_sees_what_other_processes_did(s3, s3_endpoint, tmp_path):
    """A tree listed earlier in this process and changed since is downloaded as it is now."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    bucket, folder = s3.removeprefix("s3://"), storage.join(s3, "ckpt")
    storage.write_bytes_atomic(storage.join(folder, "a"), b"old")
    assert storage.listdir(folder) == ["a"]  # fsspec now holds a listing of the folder
    client.put_object(Bucket=bucket, Key="ckpt/a", Body=b"a longer body")
    client.put_object(Bucket=bucket, Key="ckpt/sub/b", Body=b"new")
    storage.download_tree(folder, tmp_path / "dst")
    assert (tmp_path / "dst" / "a").read_bytes() == b"a longer body"
    assert (tmp_path / "dst" / "sub" / "b").read_bytes() == b"new"


def test_the_old_import_path_is_the_same_module():
    """``ltdist.data.storage`` moved to ``ltdist.storage``; the old path is the module itself,
    so patching through it reaches every caller."""
    import ltdist.data.storage
    from ltdist.data import storage as old

    assert old is storage and ltdist.data.storage is storage
    assert old.UntrustedLocationError is storage.UntrustedLocationError


def test_local_write_leaves_no_temporary_files(tmp_path):
    storage.write_bytes_atomic(str(tmp_path / "x.json"), b"{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json"]


# -- pipe: ----------------------------------------------------------------------------------


def test_pipe_reads_command_output(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * 1000)
    assert storage.read_bytes(f"pipe:cat {path}", allow_pipe=True) == path.read_bytes()


def test_pipe_runs_a_shell_command_like_webdataset(tmp_path):
    path = tmp_path / "my data.bin"
    path.write_bytes(b"abc" * 1000)
    assert storage.read_bytes(f"pipe:cat '{path}' | head -c 6", allow_pipe=True) == b"abcabc"


def test_pipe_shard_reads_like_a_file(tmp_path):
    samples = [
        ShardSample(f"k{i}", {"label_ids": [i]}, b"\x89PNG" * (i + 1), "png", f"t{i}")
        for i in range(5)
    ]
    path = tmp_path / "train-000000.tar"
    path.write_bytes(encode_tar(samples))
    got = list(read_shard(f"pipe:cat {path}", allow_pipe=True))
    assert [(s.key, s.image, s.text) for s in got] == [(s.key, s.image, s.text) for s in samples]


@pytest.mark.parametrize(
    "cmd", ["cat /nonexistent/ltdist-shard.tar", "false", "ltdist-no-such-command"]
)
def test_pipe_failure_is_an_error(cmd):
    with pytest.raises(OSError):
        storage.read_bytes(f"pipe:{cmd}", allow_pipe=True)


def test_pipe_failure_while_reading_a_shard_is_an_error():
    with pytest.raises(OSError):
        list(read_shard("pipe:cat /nonexistent/ltdist-shard.tar", allow_pipe=True))


@pytest.mark.parametrize("prefix", ["pipe:", "PIPE:", "  pipe:"])
def test_pipe_is_refused_unless_trusted(tmp_path, prefix):
    marker = tmp_path / "ran"
    url = f"{prefix}touch {marker}"
    with pytest.raises(storage.UntrustedLocationError, match="runs a shell command"):
        storage.read_bytes(url)
    with pytest.raises(storage.UntrustedLocationError):
        list(read_shard(url))
    assert not marker.exists()


def test_pipe_closed_early_does_not_hang():
    # A reader that stops early (the loader skips the rest of a shard) closes the pipe; the
    # command dies of SIGPIPE and close() returns.
    with storage.open_read("pipe:yes", allow_pipe=True) as f:
        assert f.read(4) == b"y\ny\n"


# -- the whole path on s3: pack, verify, read, resume, load ---------------------------------

CLASSES = ["cat", "dog", "bird"]
TRAIN = [["cat"], ["cat", "dog"], ["cat"], ["dog"], ["cat", "bird"], ["cat"], ["dog"]]
TEST = [["bird"], ["cat"], ["dog", "cat"]]


def _make_dataset(folder: Path) -> dict[str, dict[str, bytes]]:
    """PNG images, classes.txt and one manifest per split; returns split -> key -> image bytes."""
    (folder / "images").mkdir(parents=True)
    (folder / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    expected: dict[str, dict[str, bytes]] = {}
    for split, labels in (("train", TRAIN), ("test", TEST)):
        lines, expected[split] = [], {}
        for i, names in enumerate(labels):
            arr = np.full((24 + i, 40, 3), (30 * i) % 256, dtype=np.uint8)
            arr[:, :, 1] = 200 if split == "train" else 50
            rel = f"images/{split}_{i}.png"
            Image.fromarray(arr).save(folder / rel)
            lines.append(
                json.dumps({"image": rel, "labels": names, "caption": f"a {' and a '.join(names)}"})
            )
            expected[split][f"images_{split}_{i}"] = (folder / rel).read_bytes()
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return expected


@pytest.fixture
def packed(s3, tmp_path):
    expected = _make_dataset(tmp_path / "src")
    cfg = PackConfig(
        out=f"{s3}/ds",
        classes=str(tmp_path / "src" / "classes.txt"),
        manifests={
            "train": str(tmp_path / "src" / "train.jsonl"),
            "test": str(tmp_path / "src" / "test.jsonl"),
        },
        samples_per_shard=3,
    )
    results = pack_dataset(cfg, progress=False)
    return cfg, expected, results


def test_pack_to_s3_verify_and_read_back(packed):
    cfg, expected, results = packed
    assert results["train"].shards_written == [0, 1, 2] and results["test"].shards_written == [0]
    assert storage.listdir(cfg.out) == [
        "classes.json",
        "test-000000.tar",
        "test.index.json",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "train.index.json",
    ]
    space = load_label_space(cfg.out)
    assert space.names == CLASSES and space.frequency.tolist() == [5, 3, 1]
    for split, images in expected.items():
        assert verify_split(cfg.out, split) == []
        index = load_index(cfg.out, split)
        assert index.complete and index.num_samples == len(images) and index.num_rejected == 0
        got = {}
        for info in index.ordered():
            for sample in read_shard(storage.join(cfg.out, info.name)):
                got[sample.key] = sample
        assert {k: s.image for k, s in got.items()} == images  # PNGs stored as they were
        assert all(s.image_ext == "png" and s.text.startswith("a ") for s in got.values())


def test_pack_to_s3_resumes(packed, monkeypatch):
    cfg, _, _ = packed
    puts = []
    real_write = storage.write_bytes_atomic
    monkeypatch.setattr(
        storage, "write_bytes_atomic", lambda dst, data: (puts.append(dst), real_write(dst, data))
    )
    # A rerun of a finished job writes nothing at all.
    again = pack_dataset(cfg, progress=False)
    assert again["train"].shards_written == [] and again["test"].shards_written == []
    assert again["train"].shards_kept == 3 and again["train"].num_written == len(TRAIN)
    assert puts == []
    # A job killed after writing shard 1 but before indexing it: the orphan is replaced.
    index_url = index_location(cfg.out, "train")
    index = json.loads(storage.read_bytes(index_url))
    index["shards"] = [s for s in index["shards"] if s["id"] != 1]
    storage.write_bytes_atomic(index_url, json.dumps(index).encode())
    storage.write_bytes_atomic(storage.join(cfg.out, "train-000001.tar"), b"half a shard")
    puts.clear()
    again = pack_dataset(cfg, progress=False)
    assert again["train"].shards_written == [1] and again["test"].shards_written == []
    assert puts == [storage.join(cfg.out, "train-000001.tar"), index_url]
    assert verify_split(cfg.out, "train") == []


def test_verify_reports_a_corrupt_shard_on_s3(packed):
    cfg, _, _ = packed
    storage.write_bytes_atomic(storage.join(cfg.out, "train-000002.tar"), b"not a tar")
    problems = verify_split(cfg.out, "train")
    assert [p.shard for p in problems] == ["train-000002.tar"] and "sha256" in problems[0].reason
    storage.remove(storage.join(cfg.out, "train-000000.tar"))
    first = verify_split(cfg.out, "train")[0]
    assert (first.shard, first.reason) == ("train-000000.tar", "missing")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_streams_from_s3(packed, num_workers):
    cfg, expected, _ = packed
    loader = ShardLoader(
        location=cfg.out,
        split="train",
        cfg=LoaderConfig(batch_size=2, num_workers=num_workers, image_size=32),
    )
    assert loader.steps_per_epoch == len(TRAIN) // 2
    batches = list(loader)
    assert len(batches) == loader.steps_per_epoch
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys)) == loader.steps_per_epoch * 2
    assert set(keys) <= set(expected["train"])
    for b in batches:
        assert b["image"].shape == (2, 3, 32, 32) and b["labels"].shape == (2, len(CLASSES))
    assert loader.state_dict()["epoch"] == 1

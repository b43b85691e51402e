"""The COCO-LT / VOC-LT loaders against the published split files, and fetching them over HTTP."""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from ltdist.data.manifest import key_from_path
from ltdist.data.splits import (
    BENCHMARKS,
    DEFAULT_SOURCE,
    LMPT_COMMIT,
    BenchmarkFileError,
    ChecksumError,
    FetchError,
    fetch_splits,
    label_space,
    load_split_records,
    sha256_of,
)

SHARED = Path(__file__).resolve().parents[3] / "shared" / "benchmarks"

# Published facts (Wu et al. 2020; /work/shared/benchmarks/README.md).
EXPECTED = {
    "coco_lt": {
        "train": 1909,
        "test": 5000,
        "groups": {"head": 22, "medium": 33, "tail": 25},
        "freq": (6, 1128),
        "positives": 8316,
        "classes": 80,
        "unlabeled_test": 48,
    },
    "voc_lt": {
        "train": 1142,
        "test": 4952,
        "groups": {"head": 6, "medium": 6, "tail": 8},
        "freq": (4, 775),
        "positives": 2346,
        "classes": 20,
        "unlabeled_test": 0,
    },
}


@pytest.fixture(scope="module")
def shared_dir() -> Path:
    if not all((SHARED / bench / f).is_file() for bench, s in BENCHMARKS.items() for f in s.files):
        pytest.fail(
            f"benchmark split files not found under {SHARED}: these tests need the shared "
            "folder with coco_lt/ and voc_lt/ (see shared/benchmarks/README.md)"
        )
    return SHARED


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, key",
    [
        ("train2017/000000554625.jpg", "train2017_000000554625"),
        (
            "VOCdevkit/VOC2012/JPEGImages/2008_000023.jpg",
            "VOCdevkit_VOC2012_JPEGImages_2008_000023",
        ),
        ("a.b/c.d.png", "a_b_c_d"),
        ("./x/y.jpg", "x_y"),
        ("noext", "noext"),
    ],
)
def test_key_from_path(path: str, key: str) -> None:
    assert key_from_path(path) == key


# -- the published splits -----------------------------------------------------------------------


@pytest.mark.parametrize("bench", sorted(EXPECTED))
def test_pinned_hashes_match_shared_files(shared_dir: Path, bench: str) -> None:
    spec = BENCHMARKS[bench]
    for file in spec.files:
        assert sha256_of((shared_dir / bench / file).read_bytes()) == spec.expected_sha256(file)


@pytest.mark.parametrize("bench", sorted(EXPECTED))
def test_split_sizes_and_keys(shared_dir: Path, bench: str) -> None:
    exp = EXPECTED[bench]
    num_classes = exp["classes"]
    all_keys: set[str] = set()
    for split in ("train", "test"):
        records = load_split_records(bench, shared_dir, split)
        assert len(records) == exp[split]
        keys = [r.key for r in records]
        assert len(set(keys)) == len(keys)
        assert all(r.key == key_from_path(r.image) for r in records)
        assert all("." not in k and "/" not in k for k in keys)
        assert all(all(0 <= i < num_classes for i in r.label_ids) for r in records)
        assert [r.line for r in records] == list(range(1, len(records) + 1))
        all_keys |= set(keys)
        if split == "train":
            assert all(r.caption for r in records)
            assert all(r.label_ids for r in records)
        else:
            assert all(r.caption is None for r in records)
            assert sum(1 for r in records if not r.label_ids) == exp["unlabeled_test"]
    # Train and test images never share a key, so one data set folder can hold both splits.
    assert len(all_keys) == exp["train"] + exp["test"]


def test_first_coco_record(shared_dir: Path) -> None:
    first = load_split_records("coco_lt", shared_dir, "train")[0]
    assert first.key == "train2017_000000554625"
    assert first.image == "train2017/000000554625.jpg"
    assert first.label_ids == (0, 62, 64, 66)
    assert first.caption.startswith("a boy wearing headphones")
    assert first.line == 1


def test_image_root_is_joined(shared_dir: Path, tmp_path: Path) -> None:
    records = load_split_records("voc_lt", shared_dir, "test", image_root=str(tmp_path))
    rel = "VOCdevkit/VOC2007/JPEGImages/000001.jpg"
    assert records[0].image == os.path.join(str(tmp_path), rel)
    assert records[0].key == key_from_path(rel)
    assert records[0].label_ids == (11, 14)


def test_unlabeled_count_is_logged(shared_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="ltdist.data.splits"):
        load_split_records("coco_lt", shared_dir, "test")
    assert any("48 of 5000 images have no label" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("bench", sorted(EXPECTED))
def test_label_space_matches_published_groups(shared_dir: Path, bench: str) -> None:
    exp = EXPECTED[bench]
    space = label_space(bench, shared_dir)
    assert space.num_classes == exp["classes"]
    assert space.group_counts() == exp["groups"]
    assert (int(space.frequency.min()), int(space.frequency.max())) == exp["freq"]
    assert int(space.frequency.sum()) == exp["positives"]
    assert space.num_train_images == exp["train"]


def test_class_names_in_id_order(shared_dir: Path) -> None:
    coco = label_space("coco_lt", shared_dir).names
    assert coco[0] == "person" and coco[9] == "traffic light" and coco[79] == "toothbrush"
    voc = label_space("voc_lt", shared_dir).names
    assert voc[0] == "aeroplane" and voc[10] == "diningtable" and voc[19] == "tvmonitor"


def test_flat_layout_is_read(shared_dir: Path, tmp_path: Path) -> None:
    for file in BENCHMARKS["voc_lt"].files:
        shutil.copy(shared_dir / "voc_lt" / file, tmp_path / file)
    assert len(load_split_records("voc_lt", tmp_path, "train")) == 1142


# -- validation ---------------------------------------------------------------------------------


def _edited_copy(shared_dir: Path, root: Path, bench: str, file: str, edit) -> Path:
    shutil.copytree(shared_dir / bench, root / bench)
    path = root / bench / file
    path.chmod(0o644)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(edit(lines)))
    return path


def test_label_id_out_of_range_names_file_and_line(shared_dir: Path, tmp_path: Path) -> None:
    def edit(lines: list[str]) -> list[str]:
        lines[2] = "VOCdevkit/VOC2012/JPEGImages/bad.jpg 3 20\n"
        return lines

    path = _edited_copy(shared_dir, tmp_path, "voc_lt", "voc_lt_train.txt", edit)
    with pytest.raises(BenchmarkFileError, match=rf"{re.escape(str(path))}:3: .*out of range"):
        load_split_records("voc_lt", tmp_path, "train")


def test_duplicate_path_is_an_error(shared_dir: Path, tmp_path: Path) -> None:
    path = _edited_copy(
        shared_dir, tmp_path, "voc_lt", "voc_lt_test.txt", lambda lines: lines + [lines[4]]
    )
    with pytest.raises(
        BenchmarkFileError, match=rf"{re.escape(str(path))}:4953: duplicate image path"
    ):
        load_split_records("voc_lt", tmp_path, "test")


def test_unknown_benchmark_and_split(shared_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_split_records("imagenet_lt", shared_dir, "train")
    with pytest.raises(ValueError, match="unknown split"):
        load_split_records("voc_lt", shared_dir, "val")  # type: ignore[arg-type]


def test_missing_files_say_how_to_fetch(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="fetch_splits"):
        load_split_records("coco_lt", tmp_path, "train")


# -- fetching -----------------------------------------------------------------------------------


def test_default_source_is_pinned() -> None:
    assert DEFAULT_SOURCE.startswith("https://raw.githubusercontent.com/richard-peng-xia/LMPT/")
    assert f"/{LMPT_COMMIT}/" in DEFAULT_SOURCE and len(LMPT_COMMIT) == 40


class _Server:
    """A local HTTP server over one folder that counts the requests it answers."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        handler = functools.partial(Handler, directory=str(root))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def serve() -> Iterator:
    servers: list[_Server] = []

    def start(root: Path) -> _Server:
        servers.append(_Server(root))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def _writable_copy(shared_dir: Path, root: Path) -> Path:
    shutil.copytree(shared_dir, root, ignore=shutil.ignore_patterns("README.md"))
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def test_fetch_over_http_verifies_and_caches(shared_dir: Path, tmp_path: Path, serve) -> None:
    server = serve(_writable_copy(shared_dir, tmp_path / "www"))
    dest = tmp_path / "splits"
    for bench, spec in BENCHMARKS.items():
        paths = fetch_splits(bench, dest, source=server.url)
        assert paths == [dest / bench / f for f in spec.files]
        for path in paths:
            assert sha256_of(path.read_bytes()) == spec.expected_sha256(path.name)
    assert len(server.requests) == 8
    assert label_space("coco_lt", dest).group_counts() == EXPECTED["coco_lt"]["groups"]

    server.requests.clear()
    for bench in BENCHMARKS:
        fetch_splits(bench, dest, source=server.url)
    assert server.requests == []


def test_fetch_rejects_a_corrupted_file(shared_dir: Path, tmp_path: Path, serve) -> None:
    www = _writable_copy(shared_dir, tmp_path / "www")
    bad = www / "coco_lt" / "coco_lt_test.txt"
    data = bytearray(bad.read_bytes())
    data[1000] = ord("9") if data[1000] != ord("9") else ord("8")
    bad.write_bytes(bytes(data))
    server = serve(www)
    dest = tmp_path / "splits"
    spec = BENCHMARKS["coco_lt"]
    with pytest.raises(ChecksumError) as info:
        fetch_splits("coco_lt", dest, source=server.url)
    message = str(info.value)
    assert "coco_lt_test.txt" in message
    assert spec.expected_sha256("coco_lt_test.txt") in message
    assert sha256_of(bytes(data)) in message
    # Files before the bad one are good and kept; the bad one and any temporary file are absent.
    assert sorted(p.name for p in (dest / "coco_lt").iterdir()) == sorted(
        [spec.labels_file, spec.train_file]
    )


def test_fetch_replaces_a_stale_local_file(shared_dir: Path, tmp_path: Path, serve) -> None:
    server = serve(_writable_copy(shared_dir, tmp_path / "www"))
    dest = tmp_path / "splits"
    fetch_splits("voc_lt", dest, source=server.url)
    stale = dest / "voc_lt" / "voc_lt_train.txt"
    stale.write_text("edited\n")
    server.requests.clear()
    fetch_splits("voc_lt", dest, source=server.url)
    assert server.requests == ["/voc_lt/voc_lt_train.txt"]
    assert sha256_of(stale.read_bytes()) == BENCHMARKS["voc_lt"].expected_sha256(stale.name)


def test_fetch_http_failure_names_the_url(tmp_path: Path, serve) -> None:
    (tmp_path / "empty").mkdir()
    server = serve(tmp_path / "empty")
    with pytest.raises(FetchError, match=re.escape(f"{server.url}/voc_lt/voc_labels.txt")):
        fetch_splits("voc_lt", tmp_path / "splits", source=server.url)
    assert not (tmp_path / "splits" / "voc_lt" / "voc_labels.txt").exists()


def test_fetch_accepts_lmpt_layout_over_http(shared_dir: Path, tmp_path: Path, serve) -> None:
    www = tmp_path / "www"
    (www / "voc").mkdir(parents=True)
    for file in BENCHMARKS["voc_lt"].files:
        shutil.copy(shared_dir / "voc_lt" / file, www / "voc" / file)
    server = serve(www)
    paths = fetch_splits("voc_lt", tmp_path / "splits", source=server.url)
    assert len(paths) == 4


def test_fetch_from_local_folder_both_layouts(shared_dir: Path, tmp_path: Path) -> None:
    nested = fetch_splits("coco_lt", tmp_path / "a", source=shared_dir)
    assert [p.name for p in nested] == list(BENCHMARKS["coco_lt"].files)
    flat = tmp_path / "flat"
    flat.mkdir()
    for file in BENCHMARKS["voc_lt"].files:
        shutil.copy(shared_dir / "voc_lt" / file, flat / file)
    paths = fetch_splits("voc_lt", tmp_path / "b", source=str(flat))
    assert all(
        sha256_of(p.read_bytes()) == BENCHMARKS["voc_lt"].expected_sha256(p.name) for p in paths
    )
    assert len(load_split_records("voc_lt", tmp_path / "b", "test")) == 4952


def test_fetch_from_local_folder_rejects_bad_copy(shared_dir: Path, tmp_path: Path) -> None:
    src = _writable_copy(shared_dir, tmp_path / "src")
    (src / "voc_lt" / "voc_labels.txt").write_text("aeroplane 0\n")
    with pytest.raises(ChecksumError, match="voc_labels.txt"):
        fetch_splits("voc_lt", tmp_path / "dest", source=src)
    assert not (tmp_path / "dest" / "voc_lt" / "voc_labels.txt").exists()


def test_fetch_bad_source(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="neither an http"):
        fetch_splits("voc_lt", tmp_path, source=str(tmp_path / "nope"))

"""`ltdist data index`: third-party WebDataset shards -> a contract folder the loader trains on."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from ltdist.data.index_shards import IndexConfig, SourceShardError, index_shards, source_urls
from ltdist.data.loader import LoaderConfig, ShardLoader
from ltdist.data.shards import load_index, load_label_space, read_split, verify_split
from ltdist.entry import InputError, MissingInputError

pytestmark = pytest.mark.both_envs

NAMES = ["cat", "dog", "hot dog", "zebra"]


def jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    arr = np.full((10, 14, 3), (i * 37) % 256, dtype=np.uint8)
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def label_set(i: int) -> list[int]:
    return sorted({i % 4, (i * 3) % 4} - ({3} if i % 5 else set()))


def write_sources(folder, sizes=(4, 4, 3), broken: str | None = None) -> list[dict]:
    """Shards shard_a_000.tar .. in WebDataset's own writer: keys under a 'img/' folder,
    labels as a json with names (shard 0), a cls member of ids (shard 1) or ltdist's json."""
    import webdataset as wds

    folder.mkdir(exist_ok=True)
    expected, i = [], 0
    for s, n in enumerate(sizes):
        with wds.TarWriter(str(folder / f"shard_a_{s:03d}.tar")) as sink:
            for _ in range(n):
                ids = label_set(i)
                sample = {"__key__": f"img/p{i:03d}", "jpeg": jpeg(i), "txt": f"caption {i}"}
                if s == 0:
                    sample["json"] = {"labels": [NAMES[c] for c in ids], "source": "x"}
                elif s == 1:
                    sample["cls"] = " ".join(map(str, ids))
                else:
                    sample["json"] = {"label_ids": ids, "labels": [NAMES[c] for c in ids]}
                    sample["npy"] = b"dropped"
                if broken and sample["__key__"] == broken:
                    sample["json"] = b"{not json"
                sink.write(sample)
                expected.append({"key": f"img_p{i:03d}", "ids": ids, "caption": f"caption {i}"})
                i += 1
    return expected


def test_indexed_third_party_shards_train_with_their_labels(tmp_path):
    expected = write_sources(tmp_path / "src")
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    out = tmp_path / "ds"
    cfg = IndexConfig(
        f"{tmp_path}/src/shard_a_{{000..002}}.tar", str(out), classes=str(tmp_path / "classes.txt")
    )
    result = index_shards(cfg)
    assert result.num_samples == 11 and result.num_shards == 3  # 4 per shard, as the largest
    assert result.dropped_members == {"npy": 3}
    assert sorted(p.name for p in out.glob("*.tar")) == [f"train-00000{k}.tar" for k in range(3)]
    assert verify_split(str(out), "train") == []

    # classes.json: frequency and co-occurrence counted directly from the label sets
    space = load_label_space(str(out))
    assert space.names == NAMES and space.num_train_images == 11
    co = np.zeros((4, 4), dtype=np.int64)
    for e in expected:
        for a in e["ids"]:
            for b in e["ids"]:
                co[a, b] += 1
    assert (space.cooccurrence == co).all() and (space.frequency == np.diag(co)).all()

    stored = list(read_split(str(out), "train"))  # verified against the index as it reads
    assert [s.key for s in stored] == [e["key"] for e in expected]
    assert [s.label_ids for s in stored] == [e["ids"] for e in expected]
    assert [s.meta["labels"] for s in stored] == [[NAMES[c] for c in e["ids"]] for e in expected]
    assert [s.text for s in stored] == [e["caption"] for e in expected]
    assert all(s.image == jpeg(i) and s.image_ext == "jpg" for i, s in enumerate(stored))

    loader = ShardLoader(
        str(out), "train", LoaderConfig(batch_size=11, num_workers=0, image_size=8, verify=True)
    )
    (batch,) = list(loader)
    order = [next(e for e in expected if e["key"] == k) for k in batch["key"]]
    want = np.zeros((11, 4))
    for row, e in enumerate(order):
        want[row, e["ids"]] = 1
    assert sorted(batch["key"]) == [e["key"] for e in expected]
    assert (batch["labels"].numpy() == want).all()

    again = index_shards(cfg)  # a rerun finds everything done
    assert again.shards_written == [] and again.shards_kept == 3


def test_names_found_in_the_data_and_a_folder_source(tmp_path):
    write_sources(tmp_path / "src", sizes=(5,))  # json labels by name only
    result = index_shards(IndexConfig(str(tmp_path / "src"), str(tmp_path / "ds")))
    assert result.num_samples == 5
    assert load_label_space(str(tmp_path / "ds")).names == ["cat", "dog", "hot dog"]  # sorted
    assert load_index(str(tmp_path / "ds"), "train").complete


def test_a_bad_member_is_named(tmp_path):
    write_sources(tmp_path / "src", broken="img/p005")
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    cfg = IndexConfig(
        f"{tmp_path}/src/shard_a_{{000..002}}.tar",
        str(tmp_path / "ds"),
        classes=str(tmp_path / "classes.txt"),
    )
    bad = r"shard_a_001\.tar: member img/p005\.json: not JSON"
    with pytest.raises(SourceShardError, match=bad):
        index_shards(cfg)


def test_ids_alone_need_class_names_and_pipes_are_refused(tmp_path):
    write_sources(tmp_path / "src", sizes=(2, 2))
    with pytest.raises(InputError, match="class ids only: give the class names with --classes"):
        index_shards(IndexConfig(f"{tmp_path}/src/shard_a_00[01].tar", str(tmp_path / "ds")))
    with pytest.raises(InputError, match="split '../x' is not a plain name"):
        index_shards(IndexConfig(f"{tmp_path}/src", str(tmp_path / "ds"), split="../x"))
    with pytest.raises(InputError, match="'pipe:' source runs a shell command"):
        source_urls("pipe:cat /etc/passwd")
    with pytest.raises(MissingInputError, match="shard_a_002.tar does not exist"):
        source_urls(f"{tmp_path}/src/shard_a_{{000..003}}.tar")
    assert [u[-7:] for u in source_urls(f"{tmp_path}/src/*.tar")] == ["000.tar", "001.tar"]


def test_a_rerun_writes_only_the_missing_shard_byte_for_byte(tmp_path):
    """Shard 1 of 3-sample shards spans source shards 0 and 1; written again, it is the same."""
    write_sources(tmp_path / "src")
    (tmp_path / "classes.txt").write_text("\n".join(NAMES) + "\n")
    out = tmp_path / "ds"
    cfg = IndexConfig(
        f"{tmp_path}/src/shard_a_{{000..002}}.tar",
        str(out),
        classes=str(tmp_path / "classes.txt"),
        samples_per_shard=3,
    )
    assert index_shards(cfg).shards_written == [0, 1, 2, 3]
    before = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    index = json.loads((out / "train.index.json").read_text())
    assert index["shards"][1]["meta"]["source"] == [
        f"{tmp_path}/src/shard_a_000.tar",
        f"{tmp_path}/src/shard_a_001.tar",
    ]
    index["shards"] = [s for s in index["shards"] if s["id"] != 1]  # as if killed before it
    (out / "train.index.json").write_text(json.dumps(index, indent=1))
    (out / "train-000001.tar").unlink()
    again = index_shards(cfg)
    assert again.shards_written == [1] and again.shards_kept == 3
    after = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    assert after == before

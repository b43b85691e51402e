"""launchers/evaluate.py and launchers/predict.py on a tiny pretraining export."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ltdist.data.loader import eval_batches
from ltdist.eval import group_map
from ltdist.train.export import load_export

from .conftest import BIN, ROOT, free_port

pytestmark = pytest.mark.slow


def _run(args: list[str], accelerate: bool = False) -> subprocess.CompletedProcess:
    if accelerate:
        cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2"]
        cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        cmd += ["--main_process_port", str(free_port()), *args]
        env = {"ACCELERATE_USE_CPU": "1"}
    else:
        cmd, env = [str(BIN / "python"), *args], {}
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env}
    )


def test_evaluate_matches_a_direct_computation_in_one_and_two_processes(pretrained, demo, tmp_path):
    export = pretrained / "export"
    exported = load_export(str(export))
    scores, targets = [], []
    with torch.no_grad():
        for x, y, *_ in eval_batches(str(demo), "test", 64, exported.config.loader.image_size):
            scores.append(torch.sigmoid(exported.module.logits(x)))
            targets.append(y)
    direct = group_map(torch.cat(scores), torch.cat(targets), exported.label_space).summary()

    results = {}
    for procs in (1, 2):
        out = tmp_path / f"eval{procs}"
        args = [str(ROOT / "launchers" / "evaluate.py"), "--export", str(export)]
        args += ["--data", str(demo), "--split", "test", "--val-split", "test"]
        args += ["--out", str(out), "--batch-size", "48"]
        proc = _run(args, accelerate=procs == 2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "micro-F1" in proc.stdout
        results[procs] = json.loads((out / "evaluation.json").read_text())
        assert (out / "ap_vs_frequency.png").stat().st_size > 0
    for procs, res in results.items():
        for group, value in direct.items():
            assert res["map"][group] == pytest.approx(value, abs=1e-6), (procs, group)
        assert len(res["thresholds"]) == exported.label_space.num_classes
        assert res["thresholds_from"] == "test"
        assert res["splits"] == {"map": "test", "f1": "test", "thresholds": "test"}
    assert results[1]["f1"] == results[2]["f1"]


def test_evaluate_refuses_data_with_other_classes(pretrained, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    space = load_export(str(pretrained / "export")).label_space
    data = json.loads(space.to_json())
    for c in data["classes"]:
        c["name"] = "x" + c["name"]
    (other / "classes.json").write_text(json.dumps(data))
    args = [str(ROOT / "launchers" / "evaluate.py"), "--export", str(pretrained / "export")]
    proc = _run([*args, "--data", str(other), "--out", str(tmp_path / "o")])
    assert proc.returncode == 2
    assert "other classes than the export" in proc.stderr


@pytest.fixture
def images(demo, tmp_path) -> Path:
    """Three real demo images, one corrupt file and one text file named .jpg."""
    from ltdist.data.shards import load_index, read_shard

    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    info = load_index(str(demo), "test").ordered()[0]
    for i, sample in zip(range(3), read_shard(str(demo / info.name))):
        (folder / ("sub" if i == 2 else "") / f"img{i}.png").write_bytes(sample.image)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "notes.jpg").write_text("not an image")
    return folder


def test_predict_labels_the_checkpoint_classes_and_lists_unreadable_images(pretrained, images):
    export = pretrained / "export"
    args = [str(ROOT / "launchers" / "predict.py"), "--export", str(export), str(images)]
    proc = _run([*args, "--threshold", "0.5"])
    assert proc.returncode == 1  # two files could not be read
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(Path(r["image"]).name for r in lines) == ["img0.png", "img1.png", "img2.png"]
    space = load_export(str(export)).label_space
    for r in lines:
        assert list(r["scores"]) == space.display_names
        assert r["labels"] == [n for n, s in r["scores"].items() if s >= 0.5]
    assert "broken.png" in proc.stderr and "notes.jpg" in proc.stderr
    assert "3 images labelled, 2 unreadable" in proc.stderr


def test_predict_scores_any_class_names(pretrained, images, tmp_path):
    export = pretrained / "export"
    out = tmp_path / "preds.jsonl"
    args = [str(ROOT / "launchers" / "predict.py"), "--export", str(export)]
    args += [str(images / "img0.png"), "--classes", "zebra, red kite,teddy bear", "--out", str(out)]
    proc = _run(args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert list(row["scores"]) == ["zebra", "red kite", "teddy bear"]
    assert all(0.0 <= s <= 1.0 for s in row["scores"].values())
    # the scores are the model's: the same names scored in-process agree
    exported = load_export(str(export))
    from PIL import Image

    from ltdist.data.loader import ClipTransform, clip_normalize

    x = clip_normalize(
        ClipTransform(exported.config.loader.image_size)(Image.open(images / "img0.png"))[None]
    )
    with torch.no_grad():
        ref = torch.sigmoid(exported.module.logits_for(x, ["zebra", "red kite", "teddy bear"]))
    np.testing.assert_allclose(list(row["scores"].values()), ref[0].numpy(), atol=1e-5)

"""launchers/evaluate.py and launchers/predict.py on a tiny pretraining export."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ltdist.data.loader import eval_batches
from ltdist.eval import group_map
from ltdist.eval.thresholds import f1_report
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


@pytest.fixture(scope="module")
def direct(pretrained, demo) -> tuple[torch.Tensor, torch.Tensor]:
    """The export's logits and the targets of the demo test split, computed in-process."""
    exported = load_export(str(pretrained / "export"))
    logits, targets = [], []
    with torch.no_grad():
        for x, y, *_ in eval_batches(str(demo), "test", 64, exported.config.loader.image_size):
            logits.append(exported.module.logits(x))
            targets.append(y)
    return torch.cat(logits), torch.cat(targets)


def test_evaluate_matches_a_direct_computation_in_one_and_two_processes(
    pretrained, demo, direct, tmp_path
):
    export = pretrained / "export"
    exported = load_export(str(export))
    logits, targets = direct
    expected = group_map(torch.sigmoid(logits.double()), targets, exported.label_space).summary()

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
        for group, value in expected.items():
            assert res["map"][group] == pytest.approx(value, abs=1e-6), (procs, group)
        assert len(res["thresholds"]) == exported.label_space.num_classes
        assert res["thresholds_from"] == "test"
        assert (res["scoring"], res["checkpoint_selection"]) == ("sigmoid", "last")
        assert res["table"].startswith("AP scores: sigmoid (")
        assert res["splits"] == {"map": "test", "f1": "test", "thresholds": "test"}
    assert results[1]["f1"] == results[2]["f1"]


def test_the_run_states_it_exported_its_last_weights(pretrained):
    """No checkpoint is selected on any split: the export holds the last step's weights, and
    the run's metrics, report and export say so."""
    from safetensors.torch import load_file

    run = json.loads((pretrained / "metrics.json").read_text())
    report = json.loads(Path(run["report"]["metrics"]).read_text())
    meta = json.loads((pretrained / "export" / "export.json").read_text())
    assert run["checkpoint_selection"] == report["checkpoint_selection"] == "last"
    assert meta["checkpoint_selection"] == "last" and meta["step"] == run["steps"]
    assert run["scoring"] == report["scoring"] == meta["scoring"] == "sigmoid"
    exported = load_file(pretrained / "export" / "model.safetensors")
    last, earlier = (
        load_file(pretrained / "checkpoints" / f"step-{step:08d}" / "state" / "model.safetensors")
        for step in (run["steps"], run["steps"] - 2)
    )
    assert exported.keys() == last.keys()
    assert all(torch.equal(exported[k], last[k]) for k in exported)
    assert not all(torch.equal(exported[k], earlier[k]) for k in exported)


def test_softmax_scoring_and_the_exports_selection_reach_the_report(
    pretrained, demo, direct, tmp_path
):
    """``scoring="softmax"`` ranks LMPT's softmax over classes; the selection stated is the
    one the export records (here edited to "test"), not an assumption of the evaluator."""
    from ltdist.train.inference import evaluate_export

    export = tmp_path / "export"
    shutil.copytree(pretrained / "export", export)
    meta = json.loads((export / "export.json").read_text())
    (export / "export.json").write_text(json.dumps({**meta, "checkpoint_selection": "test"}))
    exported = load_export(str(export))
    logits, targets = direct
    softmax = torch.softmax(logits.double(), dim=1)
    expected = group_map(softmax, targets, exported.label_space).summary()
    sigmoid = torch.sigmoid(logits.double()).numpy()
    f1 = f1_report(sigmoid, targets, exported.thresholds, exported.label_space)

    out = tmp_path / "eval"
    result = evaluate_export(str(export), str(demo), "test", str(out), scoring="softmax")
    for group, value in expected.items():
        assert result["map"][group] == pytest.approx(value, abs=1e-12), group
    assert result["f1"]["micro"] == pytest.approx(f1["micro"])  # F1 stays on the sigmoid
    assert (result["scoring"], result["checkpoint_selection"]) == ("softmax", "test")
    written = json.loads((out / "metrics.json").read_text())
    assert (written["scoring"], written["checkpoint_selection"]) == ("softmax", "test")
    assert "checkpoint: test (the best on the test split)" in (out / "report.txt").read_text()
    np.testing.assert_allclose(np.load(out / "scores.npy"), softmax.numpy(), rtol=1e-12)


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

"""Checkpoint selection (``checkpoint.select=val``) in one in-process run: the export holds the
weights of the step whose periodic evaluation scored best on the selection split, the report
says so, and a run stopped and resumed picks the same step and weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ltdist.config import load_config
from ltdist.data.loader import eval_batches
from ltdist.train import loop
from ltdist.train.config import TrainConfig
from ltdist.train.export import load_export, read_export_weights

from .conftest import TINY

pytestmark = pytest.mark.slow

LIMIT = 32  # data.eval_limit: the periodic evaluations score the first 32 samples


def _config(demo: Path, out: Path, *extra: str) -> TrainConfig:
    overrides = [f"data.location={demo}", f"output_dir={out}", "max_steps=6"]
    overrides += ["eval_every_steps=2", "checkpoint.every_steps=2", f"data.eval_limit={LIMIT}"]
    # the demo has no val split: train's first samples stand in as the selection split
    overrides += ["data.val_split=train", "checkpoint.select=val", "ema_decay=0.9", *extra]
    return load_config(TrainConfig, TINY, overrides)


def _direct_map(export: Path, demo: Path, split: str) -> float:
    """mAP over the classes with a positive among the first LIMIT samples of ``split``, in
    float64 from the export's logits: AP_c = mean over positives of precision at their rank."""
    exported = load_export(str(export))
    logits, targets = [], []
    with torch.no_grad():
        for x, y, *_ in eval_batches(str(demo), split, 16, exported.config.loader.image_size):
            logits.append(exported.module.logits(x))
            targets.append(y)
    s = torch.cat(logits)[:LIMIT].double().numpy()
    t = torch.cat(targets)[:LIMIT].numpy() > 0
    aps = []
    for c in range(s.shape[1]):
        if not t[:, c].any():
            continue
        order = np.argsort(-s[:, c], kind="stable")
        hits = t[order, c]
        ranks = np.flatnonzero(hits) + 1
        aps.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
    return float(np.mean(aps))


def test_the_export_holds_the_best_weights_on_the_validation_split(demo, tmp_path, monkeypatch):
    straight = loop.train(_config(demo, tmp_path / "straight"))
    scored = {h["step"]: h["select_map"] for h in straight["history"] if "select_map" in h}
    assert sorted(scored) == [2, 4, 6]  # every periodic evaluation, and the final weights
    best = max(scored, key=lambda s: (scored[s], -s))  # the argmax; a tie keeps the earlier
    assert best < 6  # here an earlier step: the export is not the last weights
    selection = straight["selection"]
    assert selection == {"by": "val", "split": "train", "step": best, "map": scored[best]}
    assert straight["checkpoint_selection"] == "val" and straight["steps"] == 6

    export = tmp_path / "straight" / "export"
    meta = json.loads((export / "export.json").read_text())
    assert (meta["checkpoint_selection"], meta["step"], meta["steps_trained"]) == ("val", best, 6)
    assert meta["selection"] == selection and meta["weights"] == "ema"
    # the exported weights are the ones evaluated at the selected step: their mAP, recomputed
    assert _direct_map(export, demo, "train") == pytest.approx(selection["map"], abs=1e-6)
    best_folder = tmp_path / "straight" / "best" / f"step-{best:08d}"
    assert json.loads((tmp_path / "straight" / "best" / "BEST.json").read_text()) == selection
    assert [p.name for p in (tmp_path / "straight" / "best").glob("step-*")] == [best_folder.name]
    same = read_export_weights(str(best_folder))
    assert all(torch.equal(v, same[k]) for k, v in read_export_weights(str(export)).items())

    report = (tmp_path / "straight" / "report" / "report.txt").read_text()
    assert f"weights of step {best} of 6, the best on train" in report
    assert "checkpoint: val (the best on the validation split)" in report
    metrics = json.loads((tmp_path / "straight" / "report" / "metrics.json").read_text())
    assert metrics["checkpoint_selection"] == "val"

    # Stopped after step 4's evaluation and checkpoint, then resumed: the resumed run compares
    # against the stored best and ends with the same selection and weights.
    preempt = tmp_path / "stop"
    real = loop._periodic_eval

    def stop_at_4(*args, **kwargs):
        record = real(*args, **kwargs)
        if record["step"] == 4:
            preempt.touch()
        return record

    resumed_cfg = _config(demo, tmp_path / "resumed", f"preempt_file={preempt}")
    monkeypatch.setattr(loop, "_periodic_eval", stop_at_4)
    assert loop.train(resumed_cfg) == {"status": "preempted", "step": 4}
    monkeypatch.undo()
    kept = json.loads((tmp_path / "resumed" / "best" / "BEST.json").read_text())
    assert kept["step"] == max((2, 4), key=lambda s: (scored[s], -s))
    preempt.unlink()
    resumed = loop.train(resumed_cfg)
    assert resumed["selection"] == selection
    assert [h.get("select_map") for h in resumed["history"]] == [
        h.get("select_map") for h in straight["history"]
    ]
    again = read_export_weights(str(tmp_path / "resumed" / "export"))
    assert all(torch.equal(v, again[k]) for k, v in same.items())

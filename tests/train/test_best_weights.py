"""``BestWeights``: which scores replace the best, and what a killed run leaves behind."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from ltdist.config import load_config
from ltdist.labels import LabelSpace
from ltdist.train import selection
from ltdist.train.config import TrainConfig
from ltdist.train.export import read_export_weights
from ltdist.train.selection import POINTER, BestWeights


class _OneProcess:
    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass


def test_only_a_higher_finite_score_replaces_the_best_and_a_resume_reads_it(tmp_path, monkeypatch):
    acc, root = _OneProcess(), str(tmp_path / "best")
    cfg = load_config(TrainConfig, overrides=["data.location=x"])
    space = LabelSpace(["a", "b"], np.array([3, 1]), np.array([[3, 1], [1, 1]]))
    best = BestWeights(root, "val", "val")
    best.clear(acc)
    asked = []

    def state_of(step):
        def state():
            asked.append(step)
            return {"w": torch.full((2,), float(step))}

        return state

    offers = [(2, 0.5), (4, 0.5), (6, math.nan), (8, None), (10, 0.7), (12, 0.6)]
    kept = [best.offer(acc, s, m, state_of(s), space, cfg, {}) for s, m in offers]
    assert kept == [True, False, False, False, True, False]  # a tie keeps the earlier step
    assert asked == [2, 10]  # weights are gathered only for a new best
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [POINTER, "step-00000010"]
    assert json.loads((tmp_path / "best" / POINTER).read_text()) == best.record()
    assert torch.equal(read_export_weights(best.folder)["w"], torch.full((2,), 10.0))

    resumed = BestWeights(root, "val", "val")
    resumed.load()
    assert (resumed.step, resumed.map) == (10, 0.7)
    assert not resumed.offer(acc, 14, 0.69, state_of(14), space, cfg, {})

    # killed while writing a new best: the pointer still names the complete previous one
    def killed(location, *args):
        (tmp_path / "best" / "step-00000016").mkdir()
        (tmp_path / "best" / "step-00000016" / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(selection, "save_export", killed)
    with pytest.raises(KeyboardInterrupt):
        resumed.offer(acc, 16, 0.9, state_of(16), space, cfg, {})
    after = BestWeights(root, "val", "val")
    after.load()
    assert (after.step, after.map) == (10, 0.7)
    assert torch.equal(read_export_weights(after.folder)["w"], torch.full((2,), 10.0))
    monkeypatch.undo()
    assert after.offer(acc, 18, 0.8, state_of(18), space, cfg, {})  # the partial folder goes
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == [POINTER, "step-00000018"]
    with pytest.raises(ValueError, match="selected on split 'val', this run selects on 'test'"):
        BestWeights(root, "test", "test").load()
    BestWeights(root, "val", "val").clear(acc)  # a fresh run
    assert not (tmp_path / "best").exists()

"""Checkpoints, export and metrics on an object store (s3:// on a local moto server), and
resume from there: one process, run as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest

from ltdist import storage
from ltdist.train.checkpoint import complete_steps
from ltdist.train.export import load_export

from .conftest import BIN, ROOT, TINY

pytestmark = pytest.mark.slow


def _train(demo, out: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "python"), str(ROOT / "launchers" / "pretrain.py"), "--config", str(TINY)]
    cmd += [f"data.location={demo}", f"output_dir={out}", "data.eval_split=", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_checkpoints_and_export_on_s3_and_resume_from_there(demo, s3, tmp_path):
    out = f"{s3}/runs/tiny"
    staging = tmp_path / "staging"
    common = [
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        f"checkpoint.staging_dir={staging}",
    ]
    _train(demo, out, "max_steps=3", *common)
    ckpts = storage.join(out, "checkpoints")
    assert complete_steps(ckpts) == [2, 3]  # keep_last=2 pruned step 1 on the store
    step3 = storage.join(ckpts, "step-00000003")
    names = set(storage.listdir(step3))
    assert {"COMPLETE", "trainer.json", "classes.json", "config.json", "state"} <= names
    assert json.loads(storage.read_bytes(storage.join(step3, "trainer.json")))["step"] == 3
    assert not any(staging.rglob("*.safetensors"))  # the staging copy is cleaned up

    exported = load_export(storage.join(out, "export"))
    assert exported.config.output_dir == out and exported.meta["step"] == 3
    assert {"README.md", "tokenizer"} <= set(storage.listdir(storage.join(out, "export")))
    local_tokenizer = exported.module.tokenizer.name_or_path  # the export's, copied down
    assert local_tokenizer.startswith(tempfile.gettempdir()) and "tokenizer.json" in os.listdir(
        local_tokenizer
    )

    proc = _train(demo, out, "max_steps=5", *common)
    assert "resumed from step 3" in proc.stdout + proc.stderr
    metrics = json.loads(storage.read_bytes(storage.join(out, "metrics.json")))
    assert metrics["steps"] == 5
    assert [h["step"] for h in metrics["history"]] == [1, 2, 3, 4, 5]
    assert complete_steps(ckpts) == [4, 5]

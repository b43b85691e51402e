"""The quick start's main job at a tiny size: `DEMO_SIZE=tiny scripts/demo.sh`, every step real
(demo data, STAG through a local Ray cluster and vLLM's CPU build, pretraining, both fine-tuning
heads, evaluation of the exports, the comparison table). CI's smoke test of `make demo`."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENVS = [ROOT / ".venvs/train/bin/python", ROOT / ".venvs/gen/bin/python"]
LLM = ROOT / ".cache/llm/SmolLM2-135M-Instruct"


@pytest.mark.skipif(
    not all(p.exists() for p in ENVS) or not LLM.is_dir(),
    reason="needs both environments and the demo LLM (make setup)",
)
def test_tiny_demo_runs_the_whole_pipeline(tmp_path):
    data, shards, runs = tmp_path / "data", tmp_path / "shards", tmp_path / "runs"
    env = {
        **os.environ,
        "DEMO_SIZE": "tiny",
        "DEMO_DATA": str(data),
        "DEMO_SHARDS": str(shards),
        "DEMO_RUNS": str(runs),
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts/demo.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"demo failed:\n{out[-4000:]}\n{proc.stderr[-4000:]}"

    # STAG: every training record accounted for; the tail-bearing ones went to the LLM
    report = json.loads((shards / "stag_report.json").read_text())
    train = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    assert report["num_input"] == len(train) == 240
    assert report["num_written"] + report["num_rejected"] == report["num_input"]
    counts = report["counts"]
    assert counts["generated"] + counts["fallback_caption"] > 0
    assert counts["not_described"] == len(train) - report["quality"]["described"]
    assert report["complete"]

    # each training stage wrote its export; both heads were evaluated on the whole test split
    for run in ("pretrain", "dpvlpa", "cprfl"):
        assert (runs / run / "export" / "model.safetensors").exists(), run
        assert json.loads((runs / run / "metrics.json").read_text())["status"] == "completed"
    num_test = len((data / "test.jsonl").read_text().splitlines())
    for head in ("dpvlpa", "cprfl"):
        metrics = json.loads((runs / head / "eval-test" / "metrics.json").read_text())
        assert metrics["num_samples"] == num_test
        assert (runs / head / "eval-test" / "ap_vs_frequency.png").stat().st_size > 0
    assert (runs / "per_class_ap.png").stat().st_size > 0

    # the printed table: one row per stage with the four group columns, values in [0, 100]
    table = out[out.index("=== group mAP") :]
    for name in ("zero-shot after pretraining", "DP-VLPA adaptation head", "CPRFL head"):
        row = next(line for line in table.splitlines() if line.startswith(name))
        values = [float(v) for v in re.findall(r"\d+\.\d", row[len(name) :])]
        assert len(values) == 4 and all(0 <= v <= 100 for v in values), row
    assert "per-class AP plots" in out

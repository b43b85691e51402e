"""benchmarks/cache_speedup.py and train_throughput's step split, on toy towers: the table
per phase, the FLOP bound from the two runs' counts, and a split that adds up to the step."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cache_speedup  # noqa: E402  (benchmarks/ is no package on the path)
import gpu_check  # noqa: E402
from train_throughput import PARTS, ThroughputRun  # noqa: E402


@pytest.mark.slow
def test_the_table_per_phase_and_a_step_split_that_adds_up(tmp_path, capsys):
    argv = ["--toy", "--work", str(tmp_path), "--images", "80", "--batch-size", "4"]
    results = cache_speedup.main([*argv, "--steps", "2", "--warmup", "1", "--workers", "0"])
    out = capsys.readouterr().out
    tables: dict[int, dict[str, list[str]]] = {}  # by width: the summary has 7 columns
    for line in out.splitlines():
        if line.startswith("| ") and not line.startswith("| phase"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            tables.setdefault(len(cells), {})[" ".join(cells[: len(cells) - 6])] = cells
    rows = tables[7]
    assert set(rows) == {"pretrain", "dpvlpa"}
    split = tables[2 + len(PARTS)]  # phase, from, one column per part
    assert set(split) == {f"{p} {s}" for p in rows for s in ("images", "cache")}
    assert all(split[f"{p} cache"][3] == "0 (0%)" for p in rows)  # no frozen forward
    for phase in ("pretrain", "dpvlpa"):
        _, flops, bound, images, cached, speedup, share = rows[phase]
        assert float(bound.rstrip("x")) > 1 and float(images) > 0 and float(cached) > 0
        ratio = float(cached) / float(images)
        assert float(speedup.rstrip("x")) == pytest.approx(ratio, rel=0.02)
        assert float(share.rstrip("%")) == pytest.approx(100 * ratio / float(bound[:-1]), rel=0.03)
    assert "pretrain from the cache: the largest part of a step is" in out

    # a cached run counts no frozen forward, and its split holds none; the bound is the ratio
    # of the two runs' FLOPs
    images, cached = results["pretrain"]
    full, less = images.flops.per_sample(4), cached.flops.per_sample(4)
    assert full.frozen_forward > 0 and less.frozen_forward == 0
    assert less.total == pytest.approx(full.total - full.frozen_forward)
    assert cache_speedup.bound(images, cached) == full.total / less.total
    assert images.breakdown_ms["frozen forward"] > 0 == cached.breakdown_ms["frozen forward"]

    # the split of consecutive steps adds up to their mean step time
    prep = {"shards": str(tmp_path / "shards"), "tokenizer": str(tmp_path / "bert-tokenizer")}
    config = str(ROOT / cache_speedup.PHASES["pretrain"][0])
    run = ThroughputRun(config, gpu_check.train_overrides(prep, True), batch_size=4, breakdown=True)
    measured = run.measure(steps=3, warmup=1)
    assert list(measured.breakdown_ms) == list(PARTS)
    step_ms = float(dict(measured.rows)["step time (ms)"])
    assert sum(measured.breakdown_ms.values()) == pytest.approx(step_ms, rel=0.02)
    assert all(measured.breakdown_ms[p] > 0 for p in ("frozen forward", "loss", "backward"))

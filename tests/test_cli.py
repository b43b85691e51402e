"""The `ltdist` command end to end on the demo set, and the demo set's learnability."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ltdist(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [sys.executable, "-m", "ltdist.cli", *args], cwd=cwd, capture_output=True, text=True
    )
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory) -> Path:
    """data/demo -> shards/demo through the CLI, in a scratch copy of the configs."""
    work = tmp_path_factory.mktemp("cli")
    (work / "configs").symlink_to(ROOT / "configs")
    ltdist("data", "demo", "--out", "data/demo", cwd=work)
    out = ltdist("data", "pack", "--config", "configs/data/demo.yaml", cwd=work)
    assert "train: 1200 of 1200 samples" in out.stdout
    assert "test: 600 of 600 samples" in out.stdout
    return work


def test_stats_prints_the_class_table_and_verifies_checksums(demo_shards):
    out = ltdist("data", "stats", "shards/demo", cwd=demo_shards)
    assert "20 classes: head 5 / medium 7 / tail 8" in out.stdout
    assert out.stdout.count("checksums: OK") == 2

    shard = demo_shards / "shards/demo/test-000002.tar"
    original = shard.read_bytes()
    try:
        shard.write_bytes(original[:5000] + bytes(100) + original[5100:])
        bad = ltdist("data", "stats", "shards/demo", cwd=demo_shards, check=False)
        assert bad.returncode == 1
        assert "test-000002.tar: sha256" in bad.stdout
    finally:
        shard.write_bytes(original)


def test_pack_rerun_keeps_every_shard(demo_shards):
    out = ltdist("data", "pack", "--config", "configs/data/demo.yaml", cwd=demo_shards)
    assert "0 shards written, 12 kept" in out.stdout


def test_config_typo_is_a_clear_error(demo_shards):
    out = ltdist(
        "data",
        "pack",
        "--config",
        "configs/data/demo.yaml",
        "polcy=skip",
        cwd=demo_shards,
        check=False,
    )
    assert out.returncode == 2
    assert "unknown key 'polcy' for PackConfig; did you mean 'policy'?" in out.stderr


@pytest.mark.slow
def test_demo_set_is_learnable_far_above_the_shuffled_label_control(demo_shards):
    """A small CNN trained for about 30 s vs the same with labels shuffled across images."""
    summaries = {}
    # the command's old name, `ltdist baseline`, still runs it
    for name, command, extra in (
        ("real", "reference-cnn", []),
        ("shuffled", "baseline", ["shuffle_labels=true"]),
    ):
        out = ltdist(
            command,
            "--config",
            "configs/reference_cnn/demo.yaml",
            "epochs=4",
            f"out=runs/{name}",
            *extra,
            cwd=demo_shards,
        )
        assert "report:" in out.stdout
        summaries[name] = json.loads((demo_shards / f"runs/{name}/summary.json").read_text())["map"]
    real, shuffled = summaries["real"], summaries["shuffled"]
    print("learnability (mAP all/head/medium/tail):", real, shuffled)
    assert real["all"] > shuffled["all"] + 0.25
    for group in ("head", "medium", "tail"):
        assert real[group] > shuffled[group] + 0.1
    assert (demo_shards / "runs/real/ap_vs_frequency.png").stat().st_size > 10_000


def test_pack_workers_flag_is_the_config_key(demo_shards):
    out = ltdist(
        "data",
        "pack",
        "--config",
        "configs/data/demo.yaml",
        "--workers",
        "3",
        "--print-config",
        cwd=demo_shards,
    )
    assert "workers: 3" in out.stdout
    bad = ltdist(
        "data",
        "pack",
        "--config",
        "configs/data/demo.yaml",
        "--workers",
        "-1",
        cwd=demo_shards,
        check=False,
    )
    assert bad.returncode == 2 and "workers must be >= 0" in bad.stderr

"""benchmarks/gpu_check.sh: its CPU dry run, with packages made missing the way a bare GPU
machine lacks them (vLLM, Ray, DeepSpeed), and the overrides it hands the training code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402  (benchmarks/ is no package on the path)

HIDDEN = ("vllm", "ray", "deepspeed")


def hide(packages, folder: Path) -> Path:
    """A folder that, first on PYTHONPATH, makes ``import <package>`` fail as if not installed."""
    for name in packages:
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {name!r}", name={name!r})\n'
        )
    return folder


def test_missing_tells_absent_from_broken(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(hide(["vllm"], tmp_path / "shim")))
    (tmp_path / "shim" / "broken_pkg").mkdir()
    (tmp_path / "shim" / "broken_pkg" / "__init__.py").write_text("import no_such_dependency\n")
    assert gpu_check.missing(["json", "vllm"]) == "vllm not installed"
    assert gpu_check.missing(["broken_pkg"]).startswith("broken_pkg does not import")
    assert gpu_check.missing(["json"]) is None


@pytest.mark.slow
def test_dry_run_prints_every_row_and_skips_missing_packages(tmp_path):
    """The dry run with vLLM, Ray and DeepSpeed made missing: exit 0, every row of the table
    printed and written to the Markdown file, the STAG and ZeRO rows skipped naming the package,
    the training rows measured (toy sizes on the CPU)."""
    shim = hide(HIDDEN, tmp_path / "shim")
    env = {**os.environ, "PYTHONPATH": str(shim), "PYTHON": sys.executable}
    out = tmp_path / "table.md"
    cmd = [str(ROOT / "benchmarks/gpu_check.sh"), "--dry-run", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--work", str(tmp_path / "work")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout
    assert "CPU dry run" in text and "- device: CPU" in text
    cells = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| measure"):
            measure, value, _setting = (c.strip() for c in line.strip("|").split("|"))
            cells[measure] = value
    rows = [row for part in gpu_check.PARTS for row in part.rows]
    assert list(cells) == rows
    for row in rows:
        if row.startswith("STAG"):
            assert cells[row] == "skipped: vllm not installed"
        elif row.startswith("ZeRO"):
            assert cells[row] == "skipped: deepspeed not installed"
    assert float(cells["pretraining samples/s: from images"]) > 0
    # "<TFLOP/s> (<MFU>)": train_throughput's number in %.4g (a toy CPU run: 7.1e-05)
    tflops, mfu = re.fullmatch(
        r"(\S+) \((.+)\)", cells["pretraining TFLOP/s (MFU): from images"]
    ).groups()
    assert float(tflops) > 0 and mfu == "no peak known here"
    cache = cells["pretraining samples/s: from the token cache"]
    assert float(cache) > 0  # train_throughput.py --from-cache: built the cache, trained from it


def test_training_overrides_are_keys_of_the_training_config(tmp_path):
    """What gpu_check hands train_throughput.py and the launcher loads into a TrainConfig at
    the real shapes (random weights) and the dry run's (a typo would fail the run there)."""
    from ltdist.config import load_config
    from ltdist.train.config import TrainConfig

    prep = {"shards": str(tmp_path / "shards"), "tokenizer": str(tmp_path / "tok")}
    for dry in (False, True):
        cmd, _ = gpu_check.zero_command(3, 4, tmp_path / "out", gpu_check.GPU_SIZES, prep, dry)
        overrides = cmd[cmd.index("--config") + 2 :]
        cfg = load_config(TrainConfig, gpu_check.PRETRAIN_CONFIG, overrides)
        assert (cfg.max_steps, cfg.cluster.gpus_per_node, cfg.loader.batch_size) == (12, 4, 64)
        assert cfg.model.clip.pretrained == "" and cfg.model.qformer.bert_init == ""
        assert cfg.model.clip.tiny is dry
        assert cfg.model.qformer.num_queries == (4 if dry else 32)
        assert cmd[cmd.index("--deepspeed_config_file") + 1].endswith("zero3.json")

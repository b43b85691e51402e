"""The launchers under the one entry contract (ltdist.entry), run as a user runs them: a bug
inside training exits 1 with its traceback, a config mistake exits 2 with one line naming the
key, and ``--print-config`` shows the config as it would run."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml

from ltdist.train.export import read_export_config

from .conftest import BIN, ROOT, TINY

PYTHON = str(BIN / "python")

# Runs the pretraining launcher in this interpreter with GCL's forward replaced by a bug.
BUGGY_LOSS = """
import runpy, sys
from ltdist.losses import contrastive

def forward(self, *args, **kwargs):
    raise RuntimeError("a bug inside a loss")

contrastive.GlobalContrastiveLoss.forward = forward
sys.argv = ["launchers/pretrain.py", *sys.argv[1:]]
runpy.run_path("launchers/pretrain.py", run_name="__main__")
"""


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env or os.environ
    )


def test_a_bug_inside_training_exits_1_with_its_traceback(demo, tmp_path):
    common = [f"data.location={demo}", f"output_dir={tmp_path}", "max_steps=3"]
    proc = _run([PYTHON, "-c", BUGGY_LOSS, "--config", str(TINY), *common, "data.eval_split="])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert "RuntimeError: a bug inside a loss" in proc.stderr
    assert "error: a bug" not in proc.stderr  # not dressed up as a config mistake


def test_a_config_mistake_exits_2_with_one_line_naming_the_key(demo, tmp_path):
    args = [PYTHON, "launchers/pretrain.py", "--config", str(TINY), f"data.location={demo}"]
    proc = _run([*args, f"output_dir={tmp_path}", "optim.lrr=1e-4"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "error" in line]
    assert lines == [
        f"pretrain: error: {TINY}: optim: unknown key 'lrr' for OptimConfig; did you mean 'lr'?"
    ]
    proc = _run([*args, f"output_dir={tmp_path}", "loader.batch_size=0"])
    assert proc.returncode == 2 and "loader.batch_size" not in proc.stdout
    assert "Traceback" not in proc.stderr and "batch_size" in proc.stderr


def test_a_missing_input_is_a_user_error(tmp_path):
    args = [PYTHON, "launchers/evaluate.py", "--export", str(tmp_path / "nope")]
    proc = _run([*args, "--data", str(tmp_path)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"evaluate: error: {tmp_path / 'nope'} is not a complete export" in proc.stderr


def test_print_config_shows_the_config_as_it_runs(pretrained, demo, tmp_path):
    """At the launch's world size, with the export's settings, each change said once."""
    export = pretrained / "export"
    args = [PYTHON, "launchers/finetune.py", "--config", str(TINY), f"data.location={demo}"]
    args += ["task=dpvlpa", f"model.init_from={export}", "model.text_tokenizer=bert-base-uncased"]
    args += ["cluster.nodes=1", "cluster.gpus_per_node=1"]  # written for one process
    proc = _run([*args, "--print-config"], env={**os.environ, "WORLD_SIZE": "2"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = read_export_config(str(export)).model
    changes = [line for line in proc.stdout.splitlines() if line.startswith("# ")]
    assert (
        f"# model.text_tokenizer: 'bert-base-uncased' -> {source.text_tokenizer!r} "
        f"(from the export {export})"
    ) in changes
    assert any(line.startswith("# rescaled from 1 x 1 to 2 processes") for line in changes)
    shown = yaml.safe_load(proc.stdout)
    assert shown["model"]["text_tokenizer"] == source.text_tokenizer
    assert shown["model"]["qformer"]["bert_init"] == ""  # the export's weights, not BERT's
    assert shown["task"] == "dpvlpa" and not (tmp_path / "export").exists()


def test_print_config_before_the_data_exists(tmp_path):
    args = [PYTHON, "launchers/pretrain.py", "--config", "configs/pretrain/coco_lt.yaml"]
    proc = _run([*args, f"data.location={tmp_path / 'not-yet'}", "--print-config"])
    assert proc.returncode == 0, proc.stderr
    first, *rest = proc.stdout.splitlines()
    assert first.startswith("# as loaded, not resolved: ") and "not-yet" in first
    assert yaml.safe_load("\n".join(rest))["data"]["location"] == str(tmp_path / "not-yet")


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "ltdist.cli", "data", "pack", "--config", "configs/data/demo.yaml"],
        ["-m", "ltdist.cli", "reference-cnn", "--config", "configs/reference_cnn/demo.yaml"],
    ],
)
def test_every_config_command_prints_its_config(command):
    if not (ROOT / command[-1]).exists():
        pytest.fail(f"{command[-1]} is missing")
    proc = _run([PYTHON, *command, "--print-config"])
    assert proc.returncode == 0, proc.stderr
    assert isinstance(yaml.safe_load(proc.stdout), dict)

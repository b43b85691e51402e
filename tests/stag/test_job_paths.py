"""Paths of a STAG run as a Ray job with a working_dir: refused up front where they would be
missing or lost, unchanged everywhere else. The job itself, through the real ``ray job
submit --working-dir`` CLI, is in test_pipeline.py (it needs the module's Ray cluster)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ltdist import stag_gen
from ltdist.config import load_config
from ltdist.stag.config import StagConfig, StagError
from ltdist.stag.job_paths import JOB_CONFIG_ENV, check_job_paths, job_working_dir

ROOT = Path(__file__).resolve().parents[2]
# What Ray's job supervisor gives a driver submitted with --working-dir (ray 2.60)
JOB_CONFIG = {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123abcd.zip"}, "metadata": {}}


@pytest.fixture
def job_copy(tmp_path, monkeypatch) -> Path:
    """The driver's view in a Ray job: the env Ray sets, and the cwd in Ray's copy of the
    working dir, which holds the tracked configs but none of the .gitignored data/ or .cache/."""
    copy = tmp_path / "working_dir_files" / "_ray_pkg_0123abcd"
    (copy / "configs" / "stag").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "stag" / "demo.yaml", copy / "configs" / "stag")
    monkeypatch.chdir(copy)
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(JOB_CONFIG))
    return copy


def demo_config(*overrides: str) -> StagConfig:
    return load_config(StagConfig, ROOT / "configs" / "stag" / "demo.yaml", list(overrides))


def test_readme_command_without_absolute_paths_is_refused_naming_each_key(job_copy, capsys):
    # the README's first try: the demo config as it is, relative data.out and relative inputs
    status = stag_gen.main(["--config", "configs/stag/demo.yaml", "data.out=shards/demo_stag"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert "gcs://_ray_pkg_0123abcd.zip" in err
    # why: Ray's copy, where it is, that Ray deletes it and leaves .gitignored paths out
    assert f"temporary copy of that folder on the head node ({job_copy})" in err
    assert "Ray deletes afterwards and which lacks the .gitignored paths" in err
    # the output by its key, and what to write instead (data.out takes a URL)
    assert "data.out=shards/demo_stag: a relative output would be written into the copy" in err
    assert "Write data.out=<an absolute path on a file system the nodes share> or a URL" in err
    # every missing input by its key
    for key in ("data.classes", "data.manifests.train", "data.manifests.test", "engine.model"):
        line = next(x for x in err.splitlines() if x.strip().startswith(f"{key}="))
        assert ": not in the copy. Write " in line, line
    # no URL offered for a manifest: it is read as a local file
    assert "data.manifests.train=<an absolute path on a file system the nodes share>\n" in err
    assert not (job_copy / "shards").exists()  # refused before anything was written


def test_relative_request_log_is_refused_and_absolute_paths_pass(job_copy, tmp_path):
    demo = tmp_path / "demo"
    absolute = [
        f"data.classes={demo / 'classes.txt'}",
        f"data.manifests.train={demo / 'train.jsonl'}",
        f"data.manifests.test={demo / 'test.jsonl'}",
        f"engine.model={tmp_path / 'model'}",
    ]
    with pytest.raises(StagError, match=r"record_requests=requests\.jsonl: a relative output"):
        check_job_paths(
            demo_config(*absolute, "data.out=s3://b/x", "record_requests=requests.jsonl")
        )
    # outputs absolute or URLs; inputs absolute (whether they exist is the loaders' business)
    check_job_paths(demo_config(*absolute, f"data.out={tmp_path / 'out'}"))
    check_job_paths(demo_config(*absolute, "data.out=s3://bucket/shards/demo_stag"))
    # a relative input that the upload holds is found in the copy
    (job_copy / "configs" / "classes.txt").write_text("cat\n")
    check_job_paths(demo_config(*absolute[1:], "data.classes=configs/classes.txt", "data.out=/o"))


def test_benchmark_inputs_and_a_missing_config_file(job_copy, capsys):
    cfg = demo_config("data.source=benchmark", "data.benchmark=coco_lt", "data.out=/o")
    with pytest.raises(StagError) as e:
        check_job_paths(cfg)
    assert "data.splits_dir=data/splits: not in the copy" in str(e.value)
    assert "or a URL such as s3://" in str(e.value)  # split files are read through fsspec
    # a config that the upload left out (runs/ is .gitignored)
    status = stag_gen.main(["--config", "runs/my_stag.yaml", "data.out=/o"])
    err = capsys.readouterr().err
    assert status == 2 and "--config runs/my_stag.yaml is not in the job's working dir" in err


def test_outside_a_ray_job_relative_paths_mean_what_they_did(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert job_working_dir() is None
    check_job_paths(demo_config("data.out=shards/demo_stag"))  # relative, inputs missing: fine
    # a job without --working-dir runs where its entrypoint cds to: the same
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps({"runtime_env": {}, "metadata": {}}))
    assert job_working_dir() is None
    check_job_paths(demo_config("data.out=shards/demo_stag"))

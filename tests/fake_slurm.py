"""Stand-in SLURM commands for the sbatch-script tests (no SLURM controller exists here):
each fake is a bash script that logs its call as one JSON line, then acts out its part."""

from __future__ import annotations

import json
import stat
from pathlib import Path

# ``log`` in a fake: one JSON line per call (the command, its argv, the working directory and
# the environment variables with the given prefixes), written with one write() so concurrent
# callers' lines stay apart under O_APPEND (print's two writes once tore a line on TERM).
_LOGGER = r"""
log() {
    python3 - "$@" <<'PY' >> "$FAKE_LOG"
import json, os, sys
env = {k: v for k, v in os.environ.items() if k.startswith(PREFIXES)}
os.write(1, (json.dumps({"cmd": os.environ["FAKE_CMD"], "argv": sys.argv[1:], "env": env,
                         "cwd": os.getcwd()}) + "\n").encode())
PY
}
"""


def install_fakes(bin_dir: Path, fakes: dict[str, str], env_prefixes: tuple[str, ...]) -> None:
    """Write each fake (name -> bash body, which may call ``log``) as an executable."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    logger = _LOGGER.replace("PREFIXES", repr(tuple(env_prefixes)))
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text("#!/bin/bash\n" + logger + body)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)


def read_calls(log: Path, cmd: str | None = None) -> list[dict]:
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    return [c for c in calls if cmd is None or c["cmd"] == cmd]


def option(argv: list[str], name: str) -> str | None:
    """An option's value in an argv: the item after ``name`` ('--port'), or from
    ``--name=value`` when ``name`` has no dashes ('port')."""
    if name.startswith("-"):
        return argv[argv.index(name) + 1]
    return next((a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")), None)

"""The launchers' shared command line: ``--config FILE [key=value ...]`` into a TrainConfig."""

from __future__ import annotations

import argparse
import logging
import sys

from ltdist.config import ConfigError, load_config
from ltdist.train.config import TrainConfig


def main(task: str | tuple[str, ...], argv: list[str] | None = None, description: str = "") -> int:
    """Parse, check the task, train; exit 2 with the message on a configuration error."""
    from ltdist.train.loop import TrainingError, train

    tasks = (task,) if isinstance(task, str) else task
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(TrainConfig, args.config, args.overrides)
        if cfg.task not in tasks:
            raise ConfigError(f"{args.config}: task {cfg.task!r}; this launcher runs {tasks}")
        result = train(cfg)
    except (ConfigError, TrainingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result.get("status") in ("completed", "preempted") else 1

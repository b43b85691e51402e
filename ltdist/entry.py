"""The one contract of every entry point (``ltdist``, ``python -m ltdist.stag_gen``, the files
in ``launchers/``): logging is set up once, a :class:`UserError` exits 2 with its message on one
line, and anything else keeps its traceback and exits 1, so a bug never reads like a config
mistake. Base floor: imports nothing of ltdist, and both environments load it.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

EXIT_OK, EXIT_FAILED, EXIT_USER_ERROR = 0, 1, 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEBUG_ENV = "LTDIST_DEBUG"  # 1: debug logging, and a user error's traceback too


class UserError(Exception):
    """A problem the user fixes (a config value, an input, a data set, a run's state): the
    message says what and where, and the command exits 2 without a traceback."""


class InputError(UserError, ValueError):
    """An input that cannot be used as asked: a data set, an index, an export, a metrics file."""


class MissingInputError(UserError, FileNotFoundError):
    """A path the user gave (or that a config names) does not exist."""


def debug_requested() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose`` or LTDIST_DEBUG=1) in one format; the first call configures
    the root logger, later calls only lower the level."""
    level = logging.DEBUG if verbose or debug_requested() else logging.INFO
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=level, format=LOG_FORMAT)
    elif level < root.level:
        root.setLevel(level)


def run(prog: str, main: Callable[[], int | None]) -> int:
    """Run a command's ``main`` under the contract; returns the exit status."""
    try:
        status = main()
    except UserError as e:
        if debug_requested():
            traceback.print_exc()
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    return EXIT_OK if status is None else int(status)

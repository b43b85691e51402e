"""A hung engine is not a hung job: the stall watchdog of a STAG engine actor and the ledger of
batch tries that bounds how often a batch is retried.

Why in the actor, not the driver: Ray Data's actor pool does not tell the driver which actor
holds which batch, and only the engine sees whether its batch advances. So each actor runs a
:class:`Watchdog` thread fed by the engine's progress hook (vLLM: the tokens of every engine
step; transformers: every decoding step; template: every request). When a batch makes no
progress for ``engine.stall_timeout_s`` the watchdog logs what it saw, records it in the
:class:`BatchLedger` and ends the actor process hard (``os._exit``). Ray Data runs its actors
with ``max_restarts=-1, max_task_retries=-1``, so Ray restarts the actor (a fresh engine) and
retries the batch on it, as it does for an actor killed any other way. A wedge that holds the
GIL would keep the watchdog thread from running: ``faulthandler`` (a C thread) then dumps the
stacks and exits the process instead.

The ledger (one small Ray actor per run, owned by the driver) counts the tries of each batch
that began and never finished: stalls and deaths alike (a killed actor, a node lost, the
faulthandler exit). A batch that already had ``engine.batch_retries`` + 1 unfinished tries is
not tried again: its rows come back as ``hung``, the run publishes everything else and then
stops with an error and a report that names them (``run.engine_stalls``); a rerun resumes.

Test hook: with ``LTDIST_STAG_TEST_HANG=<folder>`` in an actor's environment (``env.`` in the
config), a batch holding a key that has a file in that folder blocks for good inside the
engine call: ``always`` in the file, every time; ``once``, the first time only.
"""

from __future__ import annotations

import faulthandler
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HUNG = "hung"  # status of a row whose batch was given up (never written; its shard stays missing)
TEST_HANG_ENV = "LTDIST_STAG_TEST_HANG"
STALL_EXIT_CODE = 75  # the actor's exit status when its watchdog ends it


def batch_id(keys: list[str]) -> str:
    """A batch's identity across retries: Ray retries a batch with the same rows."""
    return hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]


class Watchdog:
    """Calls ``on_stall(seen)`` when the watched batch makes no progress for ``timeout_s``.

    Progress is whatever the engine reports through :meth:`progress` (tokens, decoding steps,
    requests): a long batch that keeps advancing is never stalled, however long it takes.
    ``on_stall`` is meant not to return (the actor exits); the thread stops after calling it.
    While a batch runs, ``faulthandler`` ends the process when the thread itself has not run for
    ``backstop_s`` (default ``timeout_s`` + 30 s): only a wedge that holds the GIL does that.
    """

    def __init__(
        self,
        timeout_s: float,
        on_stall: Callable[[dict], Any],
        clock: Callable[[], float] = time.monotonic,
        backstop_s: float | None = None,
    ):
        if timeout_s <= 0:
            raise ValueError(f"Watchdog: timeout_s must be > 0, got {timeout_s}")
        self.timeout_s, self.on_stall, self.clock = timeout_s, on_stall, clock
        self.poll_s = min(1.0, timeout_s / 5)
        self.backstop_s = timeout_s + 30 if backstop_s is None else backstop_s
        self._lock = threading.Lock()
        self._keys: list[str] | None = None
        self._started = self._last = 0.0
        self._progress = 0
        self._thread: threading.Thread | None = None

    def start(self, keys: list[str]) -> None:
        with self._lock:
            self._keys = list(keys)
            self._started = self._last = self.clock()
            self._progress = 0

    def progress(self, n: int = 1) -> None:
        """The engine advanced by ``n`` (tokens, steps or requests); called from any thread."""
        if n <= 0:
            return
        with self._lock:
            self._last = self.clock()
            self._progress += n

    def stop(self) -> None:
        with self._lock:
            self._keys = None

    def stalled(self) -> dict | None:
        """What was seen, when the batch has made no progress for ``timeout_s``; else None."""
        with self._lock:
            if self._keys is None:
                return None
            now = self.clock()
            if now - self._last < self.timeout_s:
                return None
            return {
                "keys": list(self._keys),
                "seconds_without_progress": round(now - self._last, 1),
                "batch_seconds": round(now - self._started, 1),
                "progress": self._progress,  # engine units since the batch began
            }

    @contextmanager
    def watch(self, keys: list[str]) -> Iterator[None]:
        """Watch one batch (starts the thread on first use)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="stag-watchdog", daemon=True)
            self._thread.start()
        self.start(keys)
        try:
            yield
        finally:
            self.stop()

    def _run(self) -> None:
        """The thread: polls the batch; while one runs it also keeps ``faulthandler``'s timer
        re-armed, which fires only when this thread cannot run (the GIL held that long)."""
        while True:
            time.sleep(self.poll_s)
            seen = self.stalled()
            if seen is not None:
                faulthandler.cancel_dump_traceback_later()
                self.on_stall(seen)
                return
            with self._lock:
                busy = self._keys is not None
            if busy:
                faulthandler.dump_traceback_later(self.backstop_s, exit=True)
            else:
                faulthandler.cancel_dump_traceback_later()


class BatchLedger:
    """Tries of each batch, kept for the run by one Ray actor (tested without Ray).

    ``begin`` is called before a batch goes to the engine, ``finish`` after it came back,
    ``stalled`` by the watchdog before the actor exits.
    """

    def __init__(self) -> None:
        self.batches: dict[str, dict] = {}

    def begin(self, keys: list[str], worker: dict, retries: int) -> bool:
        """Whether to try the batch now: not when ``retries`` + 1 earlier tries never
        finished (it is then given up)."""
        entry = self.batches.setdefault(batch_id(keys), {"keys": sorted(keys), "tries": []})
        if sum(not t["finished"] for t in entry["tries"]) > retries:
            entry["given_up"] = True
            return False
        entry["tries"].append({"worker": worker, "finished": False, "stall": None})
        return True

    def finish(self, keys: list[str]) -> None:
        self.batches[batch_id(keys)]["tries"][-1]["finished"] = True

    def stalled(self, seen: dict) -> None:
        self.batches[batch_id(seen["keys"])]["tries"][-1]["stall"] = {
            k: v for k, v in seen.items() if k != "keys"
        }

    def summary(self) -> dict:
        """The report's ``run.engine_stalls``: every batch that had a try not finish."""
        batches = []
        for entry in self.batches.values():
            failed = [t for t in entry["tries"] if not t["finished"]]
            if not failed:
                continue
            batches.append(
                {
                    "keys": entry["keys"],
                    "failed_tries": [
                        {
                            "why": "stalled" if t["stall"] else "actor_died",
                            "worker": t["worker"],
                            **(t["stall"] or {}),
                        }
                        for t in failed
                    ],
                    # retried: a later try finished; unfinished: the run ended first
                    "outcome": "given_up"
                    if entry.get("given_up")
                    else ("retried" if entry["tries"][-1]["finished"] else "unfinished"),
                }
            )
        batches.sort(key=lambda b: b["keys"])
        return {
            "restarts": sum(len(b["failed_tries"]) for b in batches),
            "stalls": sum(t["why"] == "stalled" for b in batches for t in b["failed_tries"]),
            "rows_retried": sorted(
                k for b in batches if b["outcome"] == "retried" for k in b["keys"]
            ),
            "rows_given_up": sorted(
                k for b in batches if b["outcome"] == "given_up" for k in b["keys"]
            ),
            "batches": batches,
        }


class HangForTest:
    """The test hook (module doc): wraps an engine; ``generate`` blocks for good when a
    request's key has a file in ``folder`` saying ``always``, or ``once`` (then rewritten to
    ``done``). The block is real: the actor's thread waits on an event nobody sets."""

    def __init__(self, engine: Any, folder: str):
        self.engine, self.folder = engine, Path(folder)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def generate(self, requests: list) -> list:
        for request in requests:
            marker = self.folder / request.key
            mode = marker.read_text().strip() if marker.is_file() else ""
            if mode in ("always", "once"):
                if mode == "once":
                    marker.write_text("done")
                log.warning("test hook %s: request %s hangs (%s)", TEST_HANG_ENV, request.key, mode)
                threading.Event().wait()
        return self.engine.generate(requests)

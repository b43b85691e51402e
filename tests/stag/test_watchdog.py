"""The stall watchdog's progress logic, its thread on a real block, the faulthandler backstop
on a real GIL-holding wedge, and the batch ledger. The whole path on Ray (an actor that really
hangs, is restarted, its batch retried or given up) is in test_pipeline.py."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ltdist.stag.engines import EngineConfig, GenerationRequest, TemplateEngine
from ltdist.stag.watchdog import BatchLedger, Watchdog

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_advancing_batch_is_never_stalled_however_long_it_takes():
    clock = Clock()
    dog = Watchdog(10.0, on_stall=lambda seen: pytest.fail("no thread here"), clock=clock)
    assert dog.stalled() is None  # no batch
    dog.start(["a", "b"])
    for _ in range(100):  # 990 s, a step every 9.9 s: slow, but advancing
        clock.now += 9.9
        assert dog.stalled() is None
        dog.progress(3)
    clock.now += 9.9
    dog.progress(0)  # a step without a new token is no progress
    assert dog.stalled() is None
    clock.now += 0.1
    seen = dog.stalled()
    assert seen == {
        "keys": ["a", "b"],
        "seconds_without_progress": 10.0,
        "batch_seconds": 1000.0,
        "progress": 300,
    }
    dog.stop()  # the batch came back: nothing to watch
    assert dog.stalled() is None
    dog.start(["c"])  # a new batch starts its own clock
    assert dog.stalled() is None
    clock.now += 10
    assert dog.stalled()["progress"] == 0


def test_the_thread_fires_on_a_real_block_and_not_on_slow_progress():
    fired: list[dict] = []
    done = threading.Event()

    def on_stall(seen):
        fired.append(seen)
        done.set()

    dog = Watchdog(1.5, on_stall)
    with dog.watch(["slow"]):
        for _ in range(15):  # 3 s, twice the timeout, with progress every 0.2 s
            time.sleep(0.2)
            dog.progress(1)
    assert fired == []
    t0 = time.monotonic()
    with dog.watch(["stuck"]):
        assert done.wait(timeout=20)  # the batch really blocks here until the watchdog fires
    assert 1.5 <= time.monotonic() - t0 < 20
    assert fired[0]["keys"] == ["stuck"] and fired[0]["progress"] == 0
    assert fired[0]["seconds_without_progress"] >= 1.5


def test_a_wedge_that_holds_the_gil_still_ends_the_process():
    """A regular expression with catastrophic backtracking holds the GIL in C for hours: the
    watchdog thread cannot run, and faulthandler's C thread ends the process instead."""
    script = (
        "import re, sys, time\n"
        "from ltdist.stag.watchdog import Watchdog\n"
        "dog = Watchdog(1.0, lambda seen: print('python path', flush=True), backstop_s=1.0)\n"
        "with dog.watch(['k']):\n"
        "    time.sleep(0.5)\n"  # the thread arms the backstop
        "    re.match(r'(a+)+$', 'a' * 64 + 'b')\n"
        "print('returned', flush=True)\n"
    )
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode != 0 and "returned" not in proc.stdout
    assert "python path" not in proc.stdout
    assert "Timeout" in proc.stderr and " in match" in proc.stderr  # the stacks, dumped
    assert time.monotonic() - t0 < 30


def test_the_template_engine_reports_each_request_as_progress():
    engine = TemplateEngine(EngineConfig(kind="template"))
    counts: list[int] = []
    engine.on_progress = counts.append
    engine.generate([GenerationRequest(f"k{i}", "", 0, labels=["dog"]) for i in range(3)])
    assert counts == [1, 1, 1]


def test_the_ledger_retries_a_batch_then_gives_it_up():
    ledger = BatchLedger()
    once, always, fine = ["a1", "a0"], ["b0", "b1"], ["c0"]
    w1, w2, w3 = {"pid": 1}, {"pid": 2}, {"pid": 3}
    assert ledger.begin(fine, w1, retries=1)
    ledger.finish(fine)
    assert ledger.begin(once, w1, retries=1)
    ledger.stalled({"keys": once, "seconds_without_progress": 3.1, "progress": 0})
    assert ledger.begin(["a0", "a1"], w2, retries=1)  # the same batch, any row order
    ledger.finish(once)
    assert ledger.begin(always, w2, retries=1)
    ledger.stalled({"keys": always, "seconds_without_progress": 3.0, "progress": 0})
    assert ledger.begin(always, w3, retries=1)  # its actor died without a word: no stall
    assert not ledger.begin(always, w3, retries=1)  # two unfinished tries: given up
    s = ledger.summary()
    assert (s["restarts"], s["stalls"]) == (3, 2)
    assert s["rows_retried"] == ["a0", "a1"] and s["rows_given_up"] == ["b0", "b1"]
    by_keys = {tuple(b["keys"]): b for b in s["batches"]}
    assert set(by_keys) == {("a0", "a1"), ("b0", "b1")}  # the batch that never failed: absent
    assert [t["why"] for t in by_keys["b0", "b1"]["failed_tries"]] == ["stalled", "actor_died"]
    assert by_keys["a0", "a1"]["failed_tries"] == [
        {"why": "stalled", "worker": w1, "seconds_without_progress": 3.1, "progress": 0}
    ]
    assert by_keys["b0", "b1"]["outcome"] == "given_up"
    assert by_keys["a0", "a1"]["outcome"] == "retried"


def test_watchdog_config_errors():
    with pytest.raises(ValueError, match="stall_timeout_s"):
        EngineConfig(stall_timeout_s=-1)
    with pytest.raises(ValueError, match="batch_retries"):
        EngineConfig(batch_retries=-1)
    with pytest.raises(ValueError, match="timeout_s must be > 0"):
        Watchdog(0, lambda seen: None)

"""The training log's reduction (``loop._log_step``): a window of steps on every rank becomes one
record; ranges (``*_min`` / ``*_max``, e.g. DP-VLPA's DQR weights) keep their extremes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ltdist.train import loop


class _Acc:
    """The Accelerator surface ``_log_step`` uses; ``others`` are the other ranks' rows."""

    device = torch.device("cpu")

    def __init__(self, others: list[list[float]] = ()) -> None:
        self.others, self.logged = others, {}
        self.num_processes = 1 + len(others)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        return torch.cat([local, torch.tensor(self.others, dtype=local.dtype)])

    def log(self, values: dict, step: int) -> None:
        self.logged = values


class _Scheduler:
    def get_last_lr(self) -> list[float]:
        return [1e-4]


@pytest.mark.parametrize("other_rank", [False, True])
def test_a_window_keeps_means_and_the_extremes_of_ranges(other_rank):
    parts = {
        "loss": [1.0, 2.0, 4.0],
        "dqr_w_tail_min": [1.0, 0.5, 0.75],
        "dqr_w_tail_mean": [1.5, 1.25, 2.0],
        "dqr_w_tail_max": [2.0, 3.5, 3.0],
    }
    # the other rank's window, already reduced, in sorted key order: max, mean, min, loss
    other = [[4.0, 3.0, 0.25, 5.0]] if other_rank else []
    acc = _Acc(other)
    record = loop._log_step(acc, parts, 3, _Scheduler(), (time.perf_counter(), 0), 8)
    ranks = [parts] + [dict(zip(sorted(parts), [[v] for v in row])) for row in other]
    expected = {
        "loss": np.mean([np.mean(r["loss"]) for r in ranks]),
        "dqr_w_tail_mean": np.mean([np.mean(r["dqr_w_tail_mean"]) for r in ranks]),
        "dqr_w_tail_min": min(min(r["dqr_w_tail_min"]) for r in ranks),
        "dqr_w_tail_max": max(max(r["dqr_w_tail_max"]) for r in ranks),
    }
    assert expected["dqr_w_tail_max"] == (4.0 if other_rank else 3.5)
    for key, value in expected.items():
        assert record[key] == pytest.approx(value, abs=1e-6), key
        assert acc.logged[f"train/{key}"] == record[key]
    assert record["step"] == 3 and record["lr"] == 1e-4

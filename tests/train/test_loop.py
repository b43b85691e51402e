"""The training log's reduction (``loop._log_step``): a window of steps on every rank becomes one
record; ranges (``*_min`` / ``*_max``, e.g. DP-VLPA's DQR weights) keep their extremes."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ltdist.train import loop
from ltdist.train.flops import device_peak


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
    since = (time.perf_counter() - 0.5, 1)  # 2 steps of global batch 8 in >= 0.5 s
    h100 = device_peak("NVIDIA H100 80GB HBM3", "bf16")
    record = loop._log_step(acc, parts, 3, _Scheduler(), since, 8, 150e9, h100)
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
    # throughput: 150 GFLOP per sample, split over the ranks, against the H100's bf16 peak
    assert 0 < record["samples_per_s"] <= 16 / 0.5
    tflops = record["samples_per_s"] * 150e9 / 1e12
    assert record["tflops"] == pytest.approx(tflops)
    assert record["tflops_per_device"] == pytest.approx(tflops / acc.num_processes)
    assert record["mfu"] == pytest.approx(tflops / acc.num_processes / 989.4)
    assert acc.logged["train/mfu"] == record["mfu"]
    line = loop._step_line(record, 10, h100)
    assert line.startswith("step 3/10: loss ") and " TFLOP/s (" in line
    assert line.endswith(f"MFU {100 * record['mfu']:.1f}% of 989.4 (H100 SXM bf16 dense)")

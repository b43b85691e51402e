"""Training throughput of a task: samples/s and model FLOPs utilisation (MFU), one process.

    python benchmarks/train_throughput.py --config configs/pretrain/coco_lt.yaml \\
        [--batch-size 64] [--steps 20] [--peak-tflops 989] [--breakdown] [key=value ...]

Synthetic batches (random images and descriptions of ``max_text_tokens`` tokens) isolate the
model from the data path; ``--real-data`` streams the configured shards instead, and
``--from-cache`` streams the frozen image tower's cached tokens of those shards (built first,
untimed, under ``--cache-dir``; one deterministic view, so ``loader.augment`` is turned off).
FLOPs per sample are the training loop's count (``ltdist.train.flops``: frozen forward,
trainable forward, backward; a cached run has no frozen forward); MFU = achieved FLOP/s / the
device's dense peak at the run's precision (the table there, or ``--peak-tflops``).
``--breakdown`` splits a step's time into data, frozen forward, trainable forward, loss,
backward and optimizer (on a GPU every split point synchronises, which costs a little speed).
Prints a table; run it when an issue asks for a figure. ``benchmarks/cache_speedup.py`` runs it
per phase from images and from the cache, side by side.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import torch
from accelerate.utils import set_seed

from ltdist.config import load_config
from ltdist.data.shards import load_label_space
from ltdist.train.accel import to_device
from ltdist.train.config import TrainConfig
from ltdist.train.flops import (
    StepFlops,
    count_run_flops,
    run_peak,
    synthetic_batch,
    throughput,
)
from ltdist.train.optim import build_optimizer, build_scheduler
from ltdist.train.tasks import build_task

PARTS = ("data", "frozen forward", "trainable forward", "loss", "backward", "optimizer")


def synced_time(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


class StepClock:
    """Where a step's wall time goes: ``PARTS``. The forward is split by hooks on the task's
    frozen modules (the outermost ones without trainable parameters, as the FLOP count finds
    them) and on its loss modules (classes of ``ltdist.losses``); time in neither is trainable
    forward. Nested marked modules count for the outermost one only."""

    def __init__(self, task: torch.nn.Module, device: torch.device):
        from ltdist.train.flops import frozen_roots

        self.device, self.seconds, self.steps = device, dict.fromkeys(PARTS, 0.0), 0
        self._open: tuple[torch.nn.Module, float] | None = None
        marked = {id(m): (m, "frozen forward") for m in frozen_roots(task).values()}
        for m in task.modules():
            if type(m).__module__.startswith("ltdist.losses"):
                marked.setdefault(id(m), (m, "loss"))
        self._forward_marks = 0.0  # time in marked modules during the current forward
        for module, part in marked.values():
            module.register_forward_pre_hook(self._enter)
            module.register_forward_hook(lambda m, a, o, part=part: self._leave(m, part))

    def now(self) -> float:
        return synced_time(self.device)

    def _enter(self, module, _args) -> None:
        if self._open is None:
            self._open = (module, self.now())

    def _leave(self, module, part: str) -> None:
        if self._open is not None and self._open[0] is module:
            elapsed = self.now() - self._open[1]
            self.seconds[part] += elapsed
            self._forward_marks += elapsed
            self._open = None

    def begin_step(self) -> None:
        self._forward_marks = 0.0

    def add(self, part: str, seconds: float) -> None:
        if part == "trainable forward":  # the forward's time outside the marked modules
            seconds -= self._forward_marks
        self.seconds[part] += seconds

    def per_step_ms(self) -> dict[str, float]:
        return {k: 1000 * v / max(self.steps, 1) for k, v in self.seconds.items()}


@dataclass
class Measurement:
    """One throughput run: what ``main`` prints, and what ``cache_speedup.py`` tabulates."""

    rows: list[tuple[str, str]]
    samples_per_s: float
    batch_size: int
    flops: StepFlops
    breakdown_ms: dict[str, float] = field(default_factory=dict)


class ThroughputRun:
    """A task of ``config`` built for timed training steps on synthetic batches, the shards
    (``real_data``) or the tower's token cache (``from_cache``, built first, untimed).

    ``measure`` times consecutive steps; ``cache_speedup.py`` interleaves the steps of two runs
    (``step``), so a noisy neighbour slows both alike."""

    def __init__(
        self,
        config: str,
        overrides: list[str],
        *,
        batch_size: int = 0,
        peak_tflops: float = 0.0,
        real_data: bool = False,
        from_cache: bool = False,
        cache_dir: str = "",
        breakdown: bool = False,
    ):
        overrides = list(overrides)
        if from_cache:  # K = 1 cached view: the deterministic transform
            real_data = True
            overrides += ["loader.augment=false", f"data.token_cache={cache_dir or 'auto'}"]
        self.cfg = cfg = load_config(TrainConfig, config, overrides)
        self.device = device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = bs = batch_size or cfg.loader.batch_size
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
        space = load_label_space(cfg.data.location)
        set_seed(cfg.seed)  # the loop's random weights: a cache built before still matches
        self.task = task = build_task(cfg.task, cfg.model, space).to(device).train()
        text = cfg.model.max_text_tokens if getattr(task, "needs_text", False) else 0
        size, classes = cfg.loader.image_size, len(space.names)
        # the loop's count: without the tower's forward when cached
        self.flops = count_run_flops(cfg, task, classes, device)
        location, token_cache, build_s = cfg.data.location, None, 0.0
        if from_cache:
            from ltdist.train.token_cache import frozen_source, open_token_cache

            start = time.perf_counter()
            location, token_cache = open_token_cache(cfg, frozen_source(task), device=device)
            build_s = time.perf_counter() - start
        self.optimizer = build_optimizer(
            task, cfg.optim, task.backbone_prefixes, task.no_decay_names
        )
        # a long horizon: the steps this measures sit at the start of a real run's schedule
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, 1_000_000)
        self.stream = None
        if real_data:
            from ltdist.data.loader import ShardLoader

            cfg.loader.batch_size = bs
            loader = ShardLoader(
                location,
                cfg.data.train_split,
                cfg.loader,
                tokenizer=task.tokenizer if getattr(task, "needs_text", False) else None,
                token_cache=token_cache,
            )
            self.stream = iter(loader)
        self.fixed = synthetic_batch(bs, size, classes, text, device)
        self.clock = StepClock(task, device) if breakdown else None
        self.peak = run_peak(device, cfg.mixed_precision, peak_tflops)
        self.data = (
            f"token cache ({location}; opened or built in {build_s:.1f} s)"
            if from_cache
            else "shards"
            if real_data
            else "synthetic"
        )

    def _next_batch(self) -> dict:
        return self.fixed if self.stream is None else to_device(next(self.stream), self.device)

    def step(self) -> float:
        """One optimizer step; its wall time in seconds (synchronised)."""
        clock, marks = self.clock, [synced_time(self.device)]
        if clock:
            clock.begin_step()
        batch = self._next_batch()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            if clock:
                marks.append(clock.now())
            loss = self.task(batch)["loss"]
        if clock:
            marks.append(clock.now())
        loss.backward()
        if clock:
            marks.append(clock.now())
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        marks.append(synced_time(self.device))
        if clock:
            for part, (a, b) in zip(
                ("data", "trainable forward", "backward", "optimizer"), zip(marks, marks[1:])
            ):
                clock.add(part, b - a)
            clock.steps += 1
        return marks[-1] - marks[0]

    def reset_clock(self) -> None:
        """Forget the split so far (the warmup's time is not the steady state)."""
        if self.clock:
            self.clock.seconds, self.clock.steps = dict.fromkeys(PARTS, 0.0), 0

    def measure(self, steps: int, warmup: int) -> Measurement:
        """``steps`` consecutive timed steps after ``warmup``."""
        for _ in range(warmup):
            self.step()
        self.reset_clock()
        start = synced_time(self.device)
        for _ in range(steps):
            self.step()
        return self.measurement((synced_time(self.device) - start) / steps)

    def measurement(self, step_seconds: float) -> Measurement:
        """The table of this run at ``step_seconds`` per step."""
        cfg, task, bs = self.cfg, self.task, self.batch_size
        name = torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"
        per_sample = self.flops.per_sample(bs)
        samples_per_s = bs / step_seconds
        achieved = throughput(per_sample.total, samples_per_s, 1, self.peak)
        trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
        total = sum(p.numel() for p in task.parameters())
        peak = self.peak
        rows = [
            ("device", name),
            ("task", f"{cfg.task} ({trainable / 1e6:.1f}M trainable of {total / 1e6:.1f}M)"),
            ("precision / batch", f"{cfg.mixed_precision} / {bs}"),
            ("data", self.data),
            ("samples/s", f"{samples_per_s:.1f}"),
            ("step time (ms)", f"{1000 * step_seconds:.1f}"),
            ("GFLOP per sample", f"{per_sample.total / 1e9:.4g}"),
            ("  frozen forward", f"{per_sample.frozen_forward / 1e9:.4g}"),
            ("  trainable forward", f"{per_sample.trainable_forward / 1e9:.4g}"),
            ("  backward", f"{per_sample.trainable_backward / 1e9:.4g}"),
            ("achieved TFLOP/s", f"{achieved['tflops']:.4g}"),
            (
                "MFU",
                f"{100 * achieved['mfu']:.1f}% of {peak.tflops:g} ({peak.source})"
                if "mfu" in achieved
                else f"n/a ({peak.source})",
            ),
        ]
        breakdown_ms = self.clock.per_step_ms() if self.clock else {}
        rows += [(f"  {part} (ms/step)", f"{ms:.1f}") for part, ms in breakdown_ms.items()]
        if self.device.type == "cuda":
            memory = torch.cuda.max_memory_allocated() / 2**30
            rows.append(("peak memory (GiB)", f"{memory:.1f}"))
        return Measurement(rows, samples_per_s, bs, self.flops, breakdown_ms)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-size", type=int, default=0, help="default: the config's")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    parser.add_argument("--real-data", action="store_true")
    parser.add_argument("--from-cache", action="store_true", help="the tower's cached tokens")
    parser.add_argument("--cache-dir", default="", help="default: <data.location>/tokens")
    parser.add_argument("--breakdown", action="store_true", help="split a step's time")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    run = ThroughputRun(
        args.config,
        args.overrides,
        batch_size=args.batch_size,
        peak_tflops=args.peak_tflops,
        real_data=args.real_data,
        from_cache=args.from_cache,
        cache_dir=args.cache_dir,
        breakdown=args.breakdown,
    )
    result = run.measure(args.steps, args.warmup)
    width = max(len(k) for k, _ in result.rows)
    for k, v in result.rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()

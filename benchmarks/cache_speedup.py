"""What the frozen-tower token cache buys per phase, on the real shapes with random weights: the
FLOP bound, samples/s from images and from the cache side by side, and where a step's time goes.

    python benchmarks/cache_speedup.py [--phases pretrain,dpvlpa] [--batch-size 8] [--steps 3]
        [--warmup 1] [--images 96] [--workers 1] [--work DIR] [--toy]

Generates ``--images`` photo-like 640 x 480 JPEGs over COCO-LT's 80 classes with a 60-word
description each, packs them into shards (one process, untimed), and writes a tokenizer with
bert-base-uncased's shape (``gpu_check.bert_shaped_tokenizer``: no download). Each phase builds
its shipped COCO-LT config (``PHASES``) twice with ``train_throughput.ThroughputRun``: reading
the images, and reading the tower's token cache (built first, untimed). Their steps alternate,
so a noisy neighbour slows both alike; both use ``loader.augment=false``, so they see the same
pixels. The bound is the FLOPs of a step from images over those of a step from the cache
(``ltdist.train.flops``); the share of the bound is the measured speedup over it. ``--toy``
swaps in tiny towers (``gpu_check.TOY_TRAIN``) for a quick check of the script.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_check  # noqa: E402  (benchmarks/ is no package: the tokenizer and toy towers)
from pack_throughput import make_images  # noqa: E402
from train_throughput import PARTS, Measurement, ThroughputRun  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = {
    "pretrain": ("configs/pretrain/coco_lt.yaml", []),
    # random weights, not the pretraining export; gpu_check's warmup_steps replaces the ratio
    "dpvlpa": (
        "configs/finetune/coco_lt_dpvlpa.yaml",
        ["model.init_from=", "optim.warmup_ratio=0"],
    ),
}
NUM_CLASSES = 80  # COCO-LT's
DESCRIPTION_WORDS = 60  # a STAG description's length (50-80 words)


def generate_shards(work: Path, images: int, toy: bool) -> dict:
    """Shards of generated JPEGs with long-tailed labels over 80 classes and a description
    each, and the BERT-shaped tokenizer: what ``gpu_check.train_overrides`` reads."""
    from ltdist.data.manifest import Record
    from ltdist.data.pack import pack_split, write_classes
    from ltdist.labels import LabelSpace

    rng = np.random.default_rng(0)
    width, height = (64, 48) if toy else (640, 480)
    records = []
    for r in make_images(str(work / "jpeg"), images, width, height):
        head = {int(min(rng.zipf(1.6), NUM_CLASSES)) - 1 for _ in range(2)}  # long-tailed
        labels = tuple(sorted(head | {(r.line - 1) % NUM_CLASSES}))  # every class seen
        words = " ".join(f"word{int(w)}" for w in rng.integers(0, 500, DESCRIPTION_WORDS))
        records.append(Record(r.key, r.image, labels, caption=words, line=r.line))
    names = [f"class {c}" for c in range(NUM_CLASSES)]
    space = LabelSpace.from_label_sets(names, (r.label_ids for r in records))
    shards = str(work / "shards")
    pack_split(records, space, shards, "train", 32, progress=False)
    write_classes(shards, space)
    gpu_check.bert_shaped_tokenizer(work / "bert-tokenizer")
    return {"shards": shards, "tokenizer": str(work / "bert-tokenizer")}


def run_phase(phase: str, prep: dict, args) -> tuple[Measurement, Measurement]:
    """The phase's steps from images and from the cache, interleaved (a noisy neighbour slows
    both alike), each timed alone; samples/s at the median step time."""
    config, extra = PHASES[phase]
    overrides = [*gpu_check.train_overrides(prep, args.toy), *extra]
    overrides += [
        "loader.augment=false",  # both runs read the deterministic view
        "loader.resampled=true",  # the generated shards repeat for as many steps as it takes
        "loader.samples_per_epoch=1000000",
        f"loader.num_workers={args.workers}",
    ]
    config = str(ROOT / config)
    images = ThroughputRun(
        config, overrides, batch_size=args.batch_size, real_data=True, breakdown=True
    )
    cache_dir = str(Path(prep["shards"]) / f"tokens-{phase}")
    cached = ThroughputRun(
        config,
        overrides,
        batch_size=args.batch_size,
        from_cache=True,
        cache_dir=cache_dir,
        breakdown=True,
    )
    runs = (images, cached)
    for _ in range(args.warmup):
        for run in runs:
            run.step()
    for run in runs:
        run.reset_clock()
    seconds: tuple[list[float], list[float]] = ([], [])
    for _ in range(args.steps):
        for run, times in zip(runs, seconds):
            times.append(run.step())
    return images.measurement(median(seconds[0])), cached.measurement(median(seconds[1]))


def bound(images: Measurement, cached: Measurement) -> float:
    """FLOPs of a step from images over those of a step from the cache."""
    bs = images.batch_size
    return images.flops.per_sample(bs).total / cached.flops.per_sample(bs).total


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main(argv=None) -> dict[str, tuple[Measurement, Measurement]]:
    """Prints the tables; returns each phase's (from images, from the cache) measurements."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default="pretrain,dpvlpa")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--images", type=int, default=96, help=f">= {NUM_CLASSES}")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument("--work", default="", help="default: a temporary folder")
    parser.add_argument("--toy", action="store_true", help="tiny towers: a quick check")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        parser.error(f"unknown phase(s) {unknown}; known: {sorted(PHASES)}")
    if args.images < NUM_CLASSES:
        parser.error(f"--images must be >= {NUM_CLASSES}: every class needs an image")
    work = Path(args.work or tempfile.mkdtemp(prefix="ltdist-cache-speedup-"))
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    prep = generate_shards(work, args.images, args.toy)
    print(f"generated {args.images} images and their shards in {time.perf_counter() - start:.0f} s")
    results = {p: run_phase(p, prep, args) for p in phases}

    summary, split = [], []
    for phase, (images, cached) in results.items():
        b, ratio = bound(images, cached), cached.samples_per_s / images.samples_per_s
        per = images.flops.per_sample(images.batch_size)
        summary.append(
            [
                phase,
                f"{per.total / 1e9:.4g} (frozen {per.frozen_forward / 1e9:.4g})",
                f"{b:.2f}x",
                f"{images.samples_per_s:.3g}",
                f"{cached.samples_per_s:.3g}",
                f"{ratio:.2f}x",
                f"{100 * ratio / b:.0f}%",
            ]
        )
        for source, m in (("images", images), ("cache", cached)):
            ms = m.breakdown_ms
            total = sum(ms.values())
            split.append(
                [phase, source, *(f"{ms[p]:.0f} ({100 * ms[p] / total:.0f}%)" for p in PARTS)]
            )
    device = dict(results[phases[0]][0].rows)
    print(
        f"\n{device['device']}, {device['precision / batch']} (precision / batch per process), "
        f"{args.steps} timed steps after {args.warmup}, {args.workers} loader worker(s), "
        f"{os.cpu_count()} cores{', toy towers' if args.toy else ''}\n"
    )
    header = ["phase", "GFLOP/sample (frozen)", "FLOP bound", "images: samples/s"]
    header += ["cache: samples/s", "speedup", "share of bound"]
    print(markdown(header, summary))
    print("\nms per step (share of the step):\n")
    print(markdown(["phase", "from", *PARTS], split))
    for phase, (_, cached) in results.items():
        part = max(cached.breakdown_ms, key=cached.breakdown_ms.get)
        print(f"\n{phase} from the cache: the largest part of a step is {part}")
    return results


if __name__ == "__main__":
    main()

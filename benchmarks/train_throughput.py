"""Training throughput of a task: samples/s and model FLOPs utilisation (MFU), one process.

    python benchmarks/train_throughput.py --config configs/pretrain/coco_lt.yaml \\
        [--batch-size 64] [--steps 20] [--peak-tflops 989] [key=value ...]

Synthetic batches (random images and descriptions of ``max_text_tokens`` tokens) isolate the
model from the data path; ``--real-data`` streams the configured shards instead, and
``--from-cache`` streams the frozen image tower's cached tokens of those shards (built first,
untimed, under ``--cache-dir``; one deterministic view, so ``loader.augment`` is turned off).
FLOPs per sample are the training loop's count (``ltdist.train.flops``: frozen forward,
trainable forward, backward; a cached run has no frozen forward); MFU = achieved FLOP/s / the
device's dense peak at the run's precision (the table there, or ``--peak-tflops``). Prints a
table; run it when an issue asks for a figure.
"""

from __future__ import annotations

import argparse
import time

import torch

from ltdist.config import load_config
from ltdist.data.shards import load_label_space
from ltdist.train.config import TrainConfig
from ltdist.train.flops import count_run_flops, run_peak, synthetic_batch, throughput
from ltdist.train.optim import build_optimizer, build_scheduler
from ltdist.train.tasks import build_task


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
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.from_cache:  # K = 1 cached view: the deterministic transform
        args.real_data = True
        overrides += ["loader.augment=false", f"data.token_cache={args.cache_dir or 'auto'}"]
    cfg = load_config(TrainConfig, args.config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bs = args.batch_size or cfg.loader.batch_size
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.mixed_precision)
    space = load_label_space(cfg.data.location)
    task = build_task(cfg.task, cfg.model, space).to(device).train()
    text = cfg.model.max_text_tokens if getattr(task, "needs_text", False) else 0
    size, classes = cfg.loader.image_size, len(space.names)
    flops = count_run_flops(cfg, task, classes, device)  # without the tower's forward if cached
    location, token_cache, build_s = cfg.data.location, None, 0.0
    if args.from_cache:
        from ltdist.train.token_cache import open_token_cache

        start = time.perf_counter()
        location, token_cache = open_token_cache(cfg, task.model.image_tower, device=device)
        build_s = time.perf_counter() - start
    optimizer = build_optimizer(task, cfg.optim, task.backbone_prefixes, task.no_decay_names)
    scheduler = build_scheduler(optimizer, cfg.optim, args.steps + args.warmup + 1)
    if args.real_data:
        from ltdist.data.loader import ShardLoader

        cfg.loader.batch_size = bs
        loader = ShardLoader(
            location,
            cfg.data.train_split,
            cfg.loader,
            tokenizer=task.tokenizer if getattr(task, "needs_text", False) else None,
            token_cache=token_cache,
        )
        stream = iter(loader)
    fixed = synthetic_batch(bs, size, classes, text, device)

    def next_batch() -> dict:
        if not args.real_data:
            return fixed
        b = next(stream)
        return {
            k: (
                v.to(device)
                if torch.is_tensor(v)
                else {kk: vv.to(device) for kk, vv in v.items()}
                if isinstance(v, dict)
                else v
            )
            for k, v in b.items()
        }

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = task(next_batch())["loss"]
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = run_peak(device, cfg.mixed_precision, args.peak_tflops)
    per_sample = flops.per_sample(bs)
    achieved = throughput(per_sample.total, bs * args.steps / seconds, 1, peak)
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    total = sum(p.numel() for p in task.parameters())
    rows = [
        ("device", name),
        ("task", f"{cfg.task} ({trainable / 1e6:.1f}M trainable of {total / 1e6:.1f}M)"),
        ("precision / batch", f"{cfg.mixed_precision} / {bs}"),
        (
            "data",
            f"token cache ({location}; opened or built in {build_s:.1f} s)"
            if args.from_cache
            else "shards"
            if args.real_data
            else "synthetic",
        ),
        ("samples/s", f"{bs * args.steps / seconds:.1f}"),
        ("step time (ms)", f"{1000 * seconds / args.steps:.1f}"),
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
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if device.type == "cuda":
        print(f"{'peak memory (GiB)':<{width}}  {torch.cuda.max_memory_allocated() / 2**30:.1f}")


if __name__ == "__main__":
    main()

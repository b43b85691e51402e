"""Loader throughput vs. raw tar iteration + decode on the same shards, and mAP speed.

    python benchmarks/loader_throughput.py [--shards shards/demo] [--image-size 64] [--epochs 3]

The raw baseline reads every shard with the standard library's tarfile, decodes each image
with PIL and applies the same CLIP transform and normalisation in one process: what any
loader must do at the least. The loader rows add WebDataset grouping, the shuffle windows,
label collation, batching and (with workers) the DataLoader's inter-process transfer.
Goal: loader / raw >= 0.9; the SHA-256 check of every shard as it streams (the default)
must keep >= 0.9 of the unverified rate. The second table is benchmarks/eval_speed.py:
vectorised AP vs. scikit-learn per class (goal >= 10x).
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time

from eval_speed import map_speed  # the sibling script (a script's folder is on its path)

from ltdist.data.loader import ClipTransform, LoaderConfig, ShardLoader, clip_normalize
from ltdist.data.shards import load_index


def raw_pass(location: str, split: str, transform: ClipTransform) -> int:
    from PIL import Image

    n = 0
    for info in load_index(location, split).ordered():
        with tarfile.open(os.path.join(location, info.name)) as tar:
            for member in tar:
                if member.name.endswith((".png", ".jpg", ".webp")):
                    image = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    clip_normalize(transform(image)[None])
                    n += 1
    return n


def loader_pass(loader: ShardLoader) -> int:
    return sum(len(batch["key"]) for batch in loader)


def best_of(pipelines: dict, repeats: int) -> dict[str, tuple[float, int]]:
    """Best time per pipeline, running them in turn each round so load bursts hit all alike."""
    best = {name: (float("inf"), 0) for name in pipelines}
    for _ in range(repeats):
        for name, fn in pipelines.items():
            start = time.perf_counter()
            n = fn()
            best[name] = (min(best[name][0], time.perf_counter() - start), n)
    return best


def ensure_demo_shards(location: str | None) -> str:
    if location:
        return location
    from ltdist.data.demo import DemoConfig, build_demo
    from ltdist.data.pack import PackConfig, pack_dataset

    tmp = tempfile.mkdtemp(prefix="ltdist-bench-")
    build_demo(f"{tmp}/demo", DemoConfig())
    cfg = PackConfig(
        out=f"{tmp}/shards",
        classes=f"{tmp}/demo/classes.txt",
        manifests={"train": f"{tmp}/demo/train.jsonl"},
        samples_per_shard=100,
    )
    pack_dataset(cfg, progress=False)
    return cfg.out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", default=None, help="a shard folder (default: build the demo)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    location = ensure_demo_shards(args.shards)
    transform = ClipTransform(args.image_size)

    pipelines = {"raw tar + decode (1 process)": lambda: raw_pass(location, args.split, transform)}
    for workers in (0, 2):
        for verify in (False, True):
            cfg = LoaderConfig(
                batch_size=args.batch_size,
                num_workers=workers,
                shuffle_buffer=1000,
                image_size=args.image_size,
                verify=verify,
            )
            loader = ShardLoader(location, args.split, cfg, transform=transform)
            name = f"ShardLoader, {workers} workers, {'verified' if verify else 'unverified'}"
            pipelines[name] = lambda ld=loader: loader_pass(ld)
    best = best_of(pipelines, args.repeats)
    raw_rate = best["raw tar + decode (1 process)"][1] / best["raw tar + decode (1 process)"][0]
    rows = [(name, n / t, (n / t) / raw_rate) for name, (t, n) in best.items()]
    rate = {name: n / t for name, (t, n) in best.items()}

    print(f"loader throughput on {location} ({args.split}, {args.image_size} px)")
    print(f"{'pipeline':<44} {'samples/s':>10} {'vs raw':>8} {'verified/unverified':>20}")
    for name, r, ratio in rows:
        pair = name.replace("verified", "unverified") if name.endswith(", verified") else ""
        vs = f"{rate[name] / rate[pair]:.2f}" if pair else ""
        print(f"{name:<44} {r:>10.0f} {ratio:>8.2f} {vs:>20}")

    r = map_speed()
    print(f"\nmAP on a {r['n']} x {r['c']} matrix")
    print(f"{'vectorised':<32} {1000 * r['vectorised_s']:>9.2f} ms")
    print(f"{'sklearn, per class':<32} {1000 * r['sklearn_loop_s']:>9.2f} ms")
    print(f"{'speed-up':<32} {r['speedup']:>9.1f} x   (max |diff| {r['max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()

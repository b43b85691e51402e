"""Packing throughput, serial vs. worker processes, on the same JPEGs; and byte-identity.

    python benchmarks/pack_throughput.py [--images 1500] [--size 640x480] [--workers 2]

Generates ``--images`` photo-like JPEGs (smooth colour fields with grain, quality 90) once, then
packs them with ``ltdist.data.pack.pack_split`` serially (workers=1) and with ``--workers``
processes, without resizing (every image fully decoded and checked, bytes kept) and with
``--resize`` (decoded, downscaled and re-encoded). Each setting runs ``--repeats`` times in
turn; the best time counts. Every parallel run's shards and index must be byte-identical to the
serial run's: the script fails otherwise.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import tempfile
import time

import numpy as np

from ltdist.data.manifest import Record
from ltdist.data.pack import available_cores, pack_split
from ltdist.labels import LabelSpace

NUM_CLASSES = 20


def make_images(folder: str, n: int, width: int, height: int, seed: int = 0) -> list[Record]:
    """Photo-like JPEGs (a few hundred KB of pixels, ~50-100 KB of JPEG) and their records."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    records = []
    for i in range(n):
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        grain = rng.normal(0, 6, (height, width, 3))
        arr = np.clip(np.asarray(img, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{i:06d}.jpg")
        Image.fromarray(arr).save(path, quality=90)
        labels = sorted({int(i % NUM_CLASSES), int(rng.integers(NUM_CLASSES))})
        records.append(Record(f"img_{i:06d}", path, tuple(labels), line=i + 1))
    return records


def same_folder(a: str, b: str) -> bool:
    names = sorted(n for n in os.listdir(a) if not n.startswith("."))
    if names != sorted(n for n in os.listdir(b) if not n.startswith(".")):
        return False
    return all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--size", default="640x480", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--resize", type=int, default=320, help="max_image_size of the resize rows")
    parser.add_argument("--samples-per-shard", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))

    tmp = tempfile.mkdtemp(prefix="ltdist-pack-bench-")
    try:
        records = make_images(os.path.join(tmp, "img"), args.images, width, height)
        space = LabelSpace.from_label_sets(
            [f"c{c}" for c in range(NUM_CLASSES)], (r.label_ids for r in records)
        )
        mb = sum(os.path.getsize(r.image) for r in records) / 2**20
        settings = [(resize, w) for resize in (0, args.resize) for w in (1, args.workers)]
        best = {s: float("inf") for s in settings}
        for rep in range(args.repeats):
            for resize, w in settings:
                out = os.path.join(tmp, f"out_{resize}_{w}_{rep}")
                start = time.perf_counter()
                pack_split(
                    records,
                    space,
                    out,
                    "train",
                    args.samples_per_shard,
                    max_image_size=resize,
                    progress=False,
                    workers=w,
                )
                best[resize, w] = min(best[resize, w], time.perf_counter() - start)
        identical = {
            resize: same_folder(
                os.path.join(tmp, f"out_{resize}_1_0"),
                os.path.join(tmp, f"out_{resize}_{args.workers}_0"),
            )
            for resize in (0, args.resize)
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"pack_split on {args.images} JPEGs of {width} x {height} ({mb:.1f} MiB), "
        f"{args.samples_per_shard} per shard, best of {args.repeats}; "
        f"{available_cores()} cores available to this process"
    )
    print(f"{'setting':<34} {'workers':>7} {'images/s':>9} {'vs serial':>9} {'identical':>9}")
    for resize, w in settings:
        what = f"resize to {resize} px, re-encode" if resize else "decode + check, bytes kept"
        rate = args.images / best[resize, w]
        ratio = best[resize, 1] / best[resize, w]
        same = "" if w == 1 else ("yes" if identical[resize] else "NO")
        print(f"{what:<34} {w:>7} {rate:>9.1f} {ratio:>9.2f} {same:>9}")
    if not all(identical.values()):
        raise SystemExit("parallel shards differ from the serial ones")


if __name__ == "__main__":
    main()

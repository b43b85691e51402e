"""Group mAP (all / head / medium / tail), per-class AP vs frequency plot, and F1 at decision
thresholds, for an exported checkpoint on a shard split.

    python launchers/evaluate.py --export runs/demo/cprfl/export --data shards/demo --split test
    accelerate launch launchers/evaluate.py ...      # ranks split the batches
"""

import argparse
import sys

from ltdist.train.inference import evaluate_export


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="an export folder (<run>/export)")
    parser.add_argument("--data", required=True, help="a shard folder with the export's classes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--val-split", default="", help="pick per-class F1 thresholds on it")
    parser.add_argument(
        "--out", default="", help="report folder (default <export>/../eval-<split>)"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    args = parser.parse_args(argv)
    out = args.out or f"{args.export.rstrip('/').rsplit('/', 1)[0]}/eval-{args.split}"
    try:
        result = evaluate_export(
            args.export,
            args.data,
            args.split,
            out,
            args.val_split,
            args.batch_size,
            args.mixed_precision,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result:
        print(result["table"])
        print(result["coverage"]["text"])
        print(result["f1_table"])
        print(f"thresholds: {result['thresholds_from']}; report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

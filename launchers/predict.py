"""Label new images with an exported checkpoint: its own classes (with its thresholds), or any
class names through the text side (open vocabulary).

    python launchers/predict.py --export runs/demo/cprfl/export photos/ a.jpg
    python launchers/predict.py --export runs/demo/pretrain/export photos/ --classes "cat,red kite"

One JSON line per image on stdout (or --out): {"image", "labels", "scores"}; unreadable images
are listed on stderr with the reason and the exit status is 1.
"""

import argparse
import json
import sys

from ltdist.train.inference import predict_images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", required=True, help="an export folder (<run>/export)")
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--classes", default="", help="comma-separated class names (open vocab)")
    parser.add_argument("--classes-file", default="", help="one class name per line")
    parser.add_argument("--threshold", type=float, default=None, help="one global threshold")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="", help="write the JSON lines here instead of stdout")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.classes.split(",") if n.strip()]
    if args.classes_file:
        with open(args.classes_file) as f:
            names += [line.strip() for line in f if line.strip()]
    try:
        run = predict_images(args.export, args.images, names, args.threshold, args.batch_size)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [
        json.dumps({"image": p.image, "labels": p.labels, "scores": p.scores})
        for p in run.predictions
    ]
    if args.out:
        with open(args.out, "w") as f:
            f.write("".join(line + "\n" for line in lines))
    else:
        print("\n".join(lines))
    for path, reason in run.failed:
        print(f"unreadable: {path}: {reason}", file=sys.stderr)
    print(
        f"{len(run.predictions)} images labelled, {len(run.failed)} unreadable",
        file=sys.stderr,
    )
    return 1 if run.failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The training-environment commands behind ``launchers/``: train (pretrain / finetune),
evaluate and predict. Each parses its own command line and runs under :func:`ltdist.entry.run`
(a user error exits 2 with one line, anything else keeps its traceback and exits 1)."""

from __future__ import annotations

import argparse
import json
import sys

from ltdist import entry
from ltdist.config import ConfigError, dump_yaml, load_config
from ltdist.eval.metrics import SCORING_TEXT
from ltdist.train.config import TrainConfig


def _common(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def train_main(
    task: str | tuple[str, ...], argv: list[str] | None = None, description: str = ""
) -> int:
    """``--config FILE [key=value ...] [--print-config]``: check the task, train."""
    tasks = (task,) if isinstance(task, str) else task
    parser = _common(argparse.ArgumentParser(description=description))
    parser.add_argument("--config", required=True, help="a YAML file under configs/")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. optim.lr=1e-4")
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the config as it would run (at this world size) and exit",
    )
    args = parser.parse_args(argv)
    entry.setup_logging(args.verbose)

    def main() -> int:
        from ltdist.train.loop import train
        from ltdist.train.resolve import launch_world_size, resolve_config

        cfg = load_config(TrainConfig, args.config, args.overrides)
        if cfg.task not in tasks:
            raise ConfigError(f"{args.config}: task {cfg.task!r}; this launcher runs {tasks}")
        if args.print_config:
            try:
                resolved = resolve_config(cfg, launch_world_size())
            except entry.MissingInputError as e:  # no shards (or export) yet: as loaded
                print(f"# as loaded, not resolved: {e}")
                print(dump_yaml(cfg), end="")
                return 0
            for change in resolved.changes:
                print(f"# {change}")
            print(dump_yaml(resolved.config), end="")
            return 0
        result = train(cfg)
        return 0 if result.get("status") in ("completed", "preempted") else 1

    return entry.run(tasks[0], main)


EVALUATE_DOC = """Group mAP (all / head / medium / tail), per-class AP vs frequency plot, and F1 at
decision thresholds, for an exported checkpoint on a shard split."""


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = _common(argparse.ArgumentParser(description=EVALUATE_DOC))
    parser.add_argument(
        "--export", required=True, help="an export: <run>/export, an fsspec URL or hf://ORG/NAME"
    )
    parser.add_argument("--data", required=True, help="a shard folder with the export's classes")
    parser.add_argument("--split", default="test")
    parser.add_argument("--val-split", default="", help="pick per-class F1 thresholds on it")
    parser.add_argument(
        "--out",
        default="",
        help="report folder (default <export>/../eval-<split>; for hf://ORG/NAME: "
        "eval-NAME-<split> here)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument(
        "--scoring",
        choices=list(SCORING_TEXT),
        default=None,
        help="what AP ranks: per-class sigmoid, or softmax over each image's classes (LMPT's "
        "protocol); default: the export's training config (eval.scoring)",
    )
    args = parser.parse_args(argv)
    entry.setup_logging(args.verbose)
    out = args.out or f"{args.export.rstrip('/').rsplit('/', 1)[0]}/eval-{args.split}"
    if not args.out and args.export.startswith("hf://"):  # a Hub repo is not written to
        out = f"eval-{args.export.rstrip('/').rsplit('/', 1)[-1].split('@')[0]}-{args.split}"

    def main() -> int:
        from ltdist.train.inference import evaluate_export

        result = evaluate_export(
            args.export,
            args.data,
            args.split,
            out,
            args.val_split,
            args.batch_size,
            args.mixed_precision,
            args.scoring,
        )
        if result:
            print(result["table"])
            print(result["coverage"]["text"])
            print(result["f1_table"])
            print(f"thresholds: {result['thresholds_from']}; report: {out}")
        return 0

    return entry.run("evaluate", main)


PREDICT_DOC = """Label new images with an exported checkpoint: its own classes (with its
thresholds), or any class names through the text side (open vocabulary). One JSON line per
image on stdout (or --out): {"image", "labels", "scores"}; unreadable images are listed on
stderr with the reason and the exit status is 1."""


def predict_main(argv: list[str] | None = None) -> int:
    parser = _common(argparse.ArgumentParser(description=PREDICT_DOC))
    parser.add_argument(
        "--export", required=True, help="an export: <run>/export, an fsspec URL or hf://ORG/NAME"
    )
    parser.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
    parser.add_argument("--classes", default="", help="comma-separated class names (open vocab)")
    parser.add_argument("--classes-file", default="", help="one class name per line")
    parser.add_argument("--threshold", type=float, default=None, help="one global threshold")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", default="", help="write the JSON lines here instead of stdout")
    args = parser.parse_args(argv)
    entry.setup_logging(args.verbose)

    def main() -> int:
        from ltdist.train.inference import predict_images

        names = [n.strip() for n in args.classes.split(",") if n.strip()]
        if args.classes_file:
            try:
                with open(args.classes_file) as f:
                    names += [line.strip() for line in f if line.strip()]
            except FileNotFoundError:
                raise entry.MissingInputError(
                    f"--classes-file {args.classes_file} does not exist"
                ) from None
        run = predict_images(args.export, args.images, names, args.threshold, args.batch_size)
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

    return entry.run("predict", main)

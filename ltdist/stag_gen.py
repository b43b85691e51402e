"""``python -m ltdist.stag_gen --config configs/stag/<name>.yaml [key=value ...]``

The STAG generation job (``ltdist.stag.pipeline.run_stag``): LLM scene descriptions for the
training split on a Ray cluster, written as resumable shards plus ``stag_report.json``. Run it
directly (joins RAY_ADDRESS or starts a local Ray) or through
``ray job submit --address http://<head>:8265 --working-dir . -- python -m ltdist.stag_gen
--config ...``, where inputs and outputs are absolute paths or URLs (ltdist.stag.job_paths).

Exit status (ltdist.entry): 0 done, 2 a config or input problem (the message says which), 1
anything else, with its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys

from ltdist import entry
from ltdist.config import dump_yaml, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ltdist.stag_gen",
        description="STAG: tail-aware LLM descriptions of the training images, on Ray + vLLM.",
    )
    parser.add_argument("--config", default=None, help="YAML file (configs/stag/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="e.g. engine.max_tokens=96"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    entry.setup_logging(args.verbose)
    return entry.run("stag_gen", lambda: _run(args))


def _run(args: argparse.Namespace) -> int:
    from ltdist.stag.config import StagConfig, StagError
    from ltdist.stag.job_paths import missing_config_hint
    from ltdist.stag.pipeline import run_stag
    from ltdist.stag.report import quality_table

    if args.config and (hint := missing_config_hint(args.config)):
        raise StagError(hint)
    cfg = load_config(StagConfig, args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    report = run_stag(cfg)
    print(quality_table(report))
    summary = {k: report[k] for k in ("dataset", "counts", "num_written", "complete")}
    summary["run"] = {
        k: report["run"][k] for k in ("samples", "seconds", "samples_per_s", "num_actors")
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

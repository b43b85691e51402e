"""The comparison on the demo benchmark, in the style of the papers' Table 1 / Table 2 and
ablations, over several seeds; regenerates the table and the per-class AP plot in the README.

    python benchmarks/demo_table.py [--seeds 0 1 2] [--work runs/demo_table] [--only NAME ...]

From empty folders under ``--work``: the demo data set, its STAG descriptions (Ray + vLLM, the
generation environment), a plain (caption) packing of the same data, then per seed: DP-VLPA
pretraining on the descriptions and on the captions, and every fine-tuning row below from the
pretraining of its seed. Every run goes through the same launchers a user runs (``accelerate
launch launchers/finetune.py ...``); a run whose ``metrics.json`` exists is kept, so an
interrupted table resumes. Prints the table (Markdown) and writes ``table.md``, ``table.json``
and ``per_class_ap.png`` under ``--work``.

Unless a row says otherwise, the visual side is the demo's frozen tiny random CLIP image tower
(no CLIP weights can be downloaded here) under the 2-layer Q-Former of configs/pretrain/demo.yaml,
and every trainer run (pretraining and fine-tuning) trains for its config's epochs (4-6), or
``--epochs`` when given (before 2026-12-07 the flag was accepted but not passed on: the tables
so far used the configs' epochs). 13 rows x 3 seeds took about 1.5 hours on 2 CPU cores; the 6
reading rows add about half of that.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from ltdist.eval.compare import Method, RunMetrics, format_table, plot_per_class_ap

ROOT = Path(__file__).resolve().parents[1]
TRAIN_BIN = ROOT / ".venvs/train/bin"
GEN_BIN = ROOT / ".venvs/gen/bin"

PRETRAIN = "configs/pretrain/demo.yaml"
DPVLPA = "configs/finetune/demo_dpvlpa.yaml"
CPRFL = "configs/finetune/demo_cprfl.yaml"


@dataclass
class Row:
    """One table row: a run per seed of ``launcher`` with ``config`` and ``overrides``.

    ``shards`` is 'stag', 'stag_strict' (STAG with the strict prompt stag-v1) or 'caption'
    (the data the run reads); ``init`` names the pretraining run it starts from ('' = none)."""

    name: str
    table: str
    launcher: str
    config: str
    overrides: list[str] = field(default_factory=list)
    shards: str = "stag"
    init: str = "pretrain_stag"
    key: str = ""

    def __post_init__(self) -> None:
        self.key = self.key or self.name.lower().replace(" ", "_")


LINEAR = ["model.head=linear"]
# the readings each paper equation had before it took the paper's form (docs/method.md)
QCL_SOFTMAX = ["model.dpvlpa.qcl_weighting=softmax", "model.dpvlpa.qcl_negatives=global"]
COA_PREDICTIONS = [
    "model.dpvlpa.coa_source=predictions",
    "model.dpvlpa.coa_target=cosine",
    "model.dpvlpa.coa_reduction=mean",
    "model.dpvlpa.beta=1",
]
# the tiny CLIP of configs/pretrain/demo.yaml, for the row without pretraining
DEMO_CLIP = [
    "model.clip.tiny=true",
    "model.clip.pretrained=",
    "model.clip.image_size=64",
    "model.clip.tiny_width=128",
    "model.clip.tiny_layers=4",
    "model.clip.tiny_heads=4",
    "model.clip.tiny_patch_size=8",
    "model.clip.freeze_image=false",
]
ROWS = [
    # pretraining runs, also rows (zero-shot through the Q-Former's text side)
    Row(
        "zero-shot after DP-VLPA pretraining (STAG)",
        "DP-VLPA",
        "pretrain",
        PRETRAIN,
        init="",
        key="pretrain_stag",
    ),
    Row(
        "zero-shot after DP-VLPA pretraining (STAG, strict prompt)",
        "DP-VLPA",
        "pretrain",
        PRETRAIN,
        shards="stag_strict",
        init="",
        key="pretrain_stag_strict",
    ),
    Row(
        "zero-shot after DP-VLPA pretraining (STAG, QCL softmax + batch negatives)",
        "DP-VLPA",
        "pretrain",
        PRETRAIN,
        QCL_SOFTMAX,
        init="",
        key="pretrain_qcl_softmax",
    ),
    Row(
        "zero-shot after DP-VLPA pretraining (captions)",
        "DP-VLPA",
        "pretrain",
        PRETRAIN,
        shards="caption",
        init="",
        key="pretrain_caption",
    ),
    # Table 1 style: losses and heads on the same pretrained visual side
    Row(
        "ERM (BCE), linear head",
        "losses and heads",
        "finetune",
        CPRFL,
        [*LINEAR, "model.loss.kind=bce"],
        key="erm_bce_linear",
    ),
    Row(
        "ASL, linear head",
        "losses and heads",
        "finetune",
        CPRFL,
        [*LINEAR, "model.loss.kind=asl"],
        key="asl_linear",
    ),
    Row(
        "DB-focal, linear head",
        "losses and heads",
        "finetune",
        CPRFL,
        [*LINEAR, "model.loss.kind=dbfocal"],
        key="dbfocal_linear",
    ),
    Row("CPRFL head (ASL)", "losses and heads", "finetune", CPRFL, key="cprfl"),
    Row(
        "CPRFL head (ASL) on CLIP tokens, no pretraining",
        "losses and heads",
        "finetune",
        CPRFL,
        ["model.backbone.kind=clip", "model.init_from=", *DEMO_CLIP],
        init="",
        key="cprfl_clip",
    ),
    # Table 2 style: DP-VLPA and its ablations
    Row("DP-VLPA (STAG + DQR + COA)", "DP-VLPA", "finetune", DPVLPA, key="dpvlpa"),
    Row(
        "DP-VLPA without STAG (captions)",
        "DP-VLPA",
        "finetune",
        DPVLPA,
        shards="caption",
        init="pretrain_caption",
        key="dpvlpa_no_stag",
    ),
    Row(
        "DP-VLPA without DQR",
        "DP-VLPA",
        "finetune",
        DPVLPA,
        ["model.dpvlpa.dqr_alpha=0", "model.dpvlpa.dqr_mode=max"],  # Eq. 1's max, W = 1
        key="dpvlpa_no_dqr",
    ),
    Row(
        "DP-VLPA without COA",
        "DP-VLPA",
        "finetune",
        DPVLPA,
        ["model.dpvlpa.lambda2=0"],
        key="dpvlpa_no_coa",
    ),
    # the paper's form of each equation (the defaults above) against the reading it replaced
    Row(
        "DP-VLPA, DQR as max over queries (not Eq. 4's weighted mean)",
        "DP-VLPA readings",
        "finetune",
        DPVLPA,
        ["model.dpvlpa.dqr_mode=max", "model.dpvlpa.dqr_class_scores=false"],
        key="dpvlpa_dqr_max",
    ),
    Row(
        "DP-VLPA, COA on batch predictions (not Eq. 5 over queries)",
        "DP-VLPA readings",
        "finetune",
        DPVLPA,
        COA_PREDICTIONS,
        key="dpvlpa_coa_predictions",
    ),
    Row(
        "DP-VLPA, pretrained with QCL softmax + batch negatives (not SPARC)",
        "DP-VLPA readings",
        "finetune",
        DPVLPA,
        init="pretrain_qcl_softmax",
        key="dpvlpa_qcl_softmax",
    ),
    Row(
        "DP-VLPA, STAG with the strict prompt (not the paper's)",
        "DP-VLPA readings",
        "finetune",
        DPVLPA,
        shards="stag_strict",
        init="pretrain_stag_strict",
        key="dpvlpa_stag_strict",
    ),
    # references
    Row(
        "small CNN trained end to end (ERM, BCE)",
        "references",
        "reference-cnn",
        "configs/reference_cnn/demo.yaml",
        init="",
        key="cnn",
    ),
    Row(
        "shuffled-label control (CPRFL head)",
        "references",
        "finetune",
        CPRFL,
        ["data.shuffle_labels=true"],
        key="cprfl_shuffled",
    ),
]


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-30:])
        raise RuntimeError(f"demo_table: failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    print(f"  {time.time() - start:6.0f} s  {log.stem}", flush=True)


def prepare_data(work: Path) -> dict[str, Path]:
    data, caption = work / "data", work / "shards_caption"
    stag, stag_strict = work / "shards_stag", work / "shards_stag_strict"
    if not (data / "train.jsonl").exists():
        run([str(TRAIN_BIN / "ltdist"), "data", "demo", "--out", str(data)], work / "logs/data.log")
    sources = [
        f"data.classes={data}/classes.txt",
        f"data.manifests.train={data}/train.jsonl",
        f"data.manifests.test={data}/test.jsonl",
    ]
    for out, version in ((stag, ""), (stag_strict, "stag-v1")):
        if not (out / "stag_report.json").exists():
            run(
                [
                    str(GEN_BIN / "python"),
                    "-m",
                    "ltdist.stag_gen",
                    "--config",
                    "configs/stag/demo.yaml",
                    f"data.out={out}",
                    *sources,
                    *([f"prompt.version={version}"] if version else []),
                ],
                work / f"logs/{out.name}.log",
            )
    if not (caption / "train.index.json").exists():
        run(
            [
                str(TRAIN_BIN / "ltdist"),
                "data",
                "pack",
                "--config",
                "configs/data/demo.yaml",
                f"out={caption}",
                f"classes={data}/classes.txt",
                f"manifests.train={data}/train.jsonl",
                f"manifests.test={data}/test.jsonl",
            ],
            work / "logs/pack_caption.log",
        )
    return {"stag": stag, "stag_strict": stag_strict, "caption": caption}


def run_row(
    row: Row, seed: int, shards: dict[str, Path], work: Path, epochs: int, threads: int
) -> Path:
    out = work / f"seed{seed}" / row.key
    if (out / "metrics.json").exists():
        return out
    data = shards[row.shards]
    log = work / "logs" / f"seed{seed}_{row.key}.log"
    if row.launcher == "reference-cnn":
        cmd = [
            str(TRAIN_BIN / "ltdist"),
            "reference-cnn",
            "--config",
            row.config,
            f"data={data}",
            f"out={out}",
            f"seed={seed}",
            f"threads={threads}",
            *([f"epochs={epochs}"] if epochs else []),
        ]
    else:
        cmd = [
            str(TRAIN_BIN / "accelerate"),
            "launch",
            "--config_file",
            "configs/accelerate/single.yaml",
            "--num_cpu_threads_per_process",
            str(threads),
            f"launchers/{row.launcher}.py",
            "--config",
            row.config,
            f"data.location={data}",
            f"output_dir={out}",
            f"seed={seed}",
            *([f"epochs={epochs}"] if epochs else []),
            "progress=false",
            "tracker=none",
        ]
        if row.init:
            cmd.append(f"model.init_from={work / f'seed{seed}' / row.init / 'export'}")
        cmd += row.overrides
    run(cmd, log, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="runs/demo_table")
    parser.add_argument(
        "--epochs", type=int, default=0, help="epochs of every trainer run (0: each config's own)"
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs at a time (each gets cores / jobs threads)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="row keys to run (and pretrain)")
    args = parser.parse_args(argv)
    work = (ROOT / args.work).resolve()
    rows = [r for r in ROWS if args.only is None or r.key in args.only or r.launcher == "pretrain"]
    start = time.time()
    print(f"demo table: {len(rows)} rows x {len(args.seeds)} seeds under {work}", flush=True)
    shards = prepare_data(work)
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    # Runs at a time: on a few cores, the start-up and evaluation of one run overlap the
    # training of another. The pretrainings first: every other row starts from one.
    with ThreadPoolExecutor(args.jobs) as pool:
        for stage in (
            [r for r in rows if r.launcher == "pretrain"],
            [r for r in rows if r.launcher != "pretrain"],
        ):
            jobs = [
                pool.submit(run_row, row, seed, shards, work, args.epochs, threads)
                for seed in args.seeds
                for row in stage
            ]
            for job in jobs:
                job.result()
    methods = [
        Method(r.name, [RunMetrics.read(work / f"seed{s}" / r.key) for s in args.seeds])
        for r in rows
    ]
    table = format_table(methods, markdown=True, extra={"group": [r.table for r in rows]})
    print(f"\n{table}\n\n{time.time() - start:.0f} s in all")
    (work / "table.md").write_text(table + "\n")
    (work / "table.json").write_text(
        json.dumps(
            {
                "seeds": args.seeds,
                "rows": [
                    {
                        "name": m.name,
                        "key": r.key,
                        "group": r.table,
                        "map": {g: m.values(g).tolist() for g in ("all", "head", "medium", "tail")},
                    }
                    for r, m in zip(rows, methods, strict=True)
                ],
            },
            indent=1,
        )
    )
    keys = {"cnn", "erm_bce_linear", "cprfl", "dpvlpa", "cprfl_shuffled"}
    picked = [m for r, m in zip(rows, methods, strict=True) if r.key in keys]
    if picked:
        (work / "per_class_ap.png").write_bytes(
            plot_per_class_ap(
                picked,
                f"Per-class AP on the demo test split, mean ± std over {len(args.seeds)} seeds",
            )
        )
    print(f"table: {work / 'table.md'}\nplot:  {work / 'per_class_ap.png'}")


if __name__ == "__main__":
    main()

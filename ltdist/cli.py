"""The ``ltdist`` command: data preparation, inspection, the reference CNN and rehearsals.

ltdist data demo     [--out DIR] [key=value ...]        build the bundled demo data set
ltdist data pack     --config FILE [--workers N] [key=value ...]   manifest / benchmark -> shards
ltdist data index    SOURCE --out DIR [--split S] [--classes FILE]   WebDataset tars -> contract
ltdist data stats    LOCATION [--no-verify]             class table, counts, checksums
ltdist data fetch-splits {coco_lt,voc_lt} [--dest DIR] [--source URL|DIR]
ltdist data split-lt [--config FILE] [key=value ...]    a long-tailed train split (+ val, test)
                                                        sampled from a balanced manifest
ltdist data split-val MANIFEST --classes FILE [--out DIR] [--fraction F] [--seed S]
                                                        a stratified val split carved from train
ltdist data prepare  coco_lt --coco-root DIR | voc_lt --voc-root DIR [--out DIR] [key=value ...]
                     fetch splits + convert + verify + pack, resumable, with a table per split
ltdist reference-cnn --config FILE [key=value ...]      small CNN, group-mAP report
ltdist compare       [NAME=]RUN ... [--plot PNG]        group-mAP table of runs (mean ± std)
ltdist rehearse      CONFIG ... [key=value ...] [--plan] [--nodes N --gpus-per-node G]
                     [--shapes 1x8,8x8] [--splits-dir DIR]   a config's plan at a cluster shape,
                     then (without --plan) its run here at reduced width
ltdist features cache --config TRAIN_CONFIG [--out DIR] [--dtype bf16|fp16] [--views K]
                     [--split S] [key=value ...]   the frozen token source's tokens, once, for
                     training (resumable; several ranks: `accelerate launch -m ltdist.cli ...`)
ltdist export push   EXPORT REPO_ID [--private] [--revision BRANCH] [--license ID]   upload an
                     export folder as a Hugging Face Hub model repo (HF_TOKEN or `hf auth login`)
"""

from __future__ import annotations

import argparse
import json
import sys

from ltdist import entry
from ltdist.config import dump_yaml, load_config


def _load(cls, args: argparse.Namespace):
    """The command's config; with --print-config it is printed and None returned."""
    cfg = load_config(cls, args.config, args.overrides)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return None
    return cfg


def _config_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--print-config", action="store_true", help="print the config and exit")


def _demo(args: argparse.Namespace) -> int:
    from ltdist.data.demo import DemoConfig, build_demo

    cfg = _load(DemoConfig, args)
    if cfg is None:
        return 0
    summary = build_demo(args.out, cfg)
    print(json.dumps(summary, indent=1))
    return 0


def _pack(args: argparse.Namespace) -> int:
    from ltdist.data.pack import PackConfig, pack_dataset

    if args.workers is not None:  # the flag is the config key, checked and printed with it
        args.overrides.append(f"workers={args.workers}")
    cfg = _load(PackConfig, args)
    if cfg is None:
        return 0
    results = pack_dataset(cfg)
    for split, r in results.items():
        print(
            f"{split}: {r.num_written} of {r.num_input} samples in {cfg.out} "
            f"({len(r.shards_written)} shards written"
            + (f" ({len(r.shards_redone)} again: their input changed)" if r.shards_redone else "")
            + f", {r.shards_kept} kept from an earlier run, {len(r.rejected)} rejected)"
        )
        for rej in r.rejected[:10]:
            print(f"  rejected {rej['key']}: {rej['reason']}")
    return 0


def _index(args: argparse.Namespace) -> int:
    from ltdist.data.index_shards import IndexConfig, index_shards

    cfg = IndexConfig(args.source, args.out, args.split, args.classes or "", args.samples_per_shard)
    r = index_shards(cfg)
    print(
        f"{r.split}: {r.num_samples} samples from {len(r.sources)} source shards in "
        f"{r.num_shards} shards of {r.location} ({len(r.shards_written)} written, "
        f"{r.shards_kept} kept from an earlier run)"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from ltdist.data.shards import list_splits, load_index, load_label_space, verify_split

    space = load_label_space(args.location)
    print(space.table())
    failed = False
    for split in list_splits(args.location):
        index = load_index(args.location, split)
        state = (
            "complete" if index.complete else f"INCOMPLETE, missing shards {index.missing()[:10]}"
        )
        print(
            f"\n{split}: {index.num_samples} samples in {len(index.shards)} shards "
            f"({index.to_dict()['num_bytes'] / 2**20:.1f} MiB), "
            f"{index.num_rejected} rejected, {state}"
        )
        if args.verify:
            problems = verify_split(args.location, split)
            for p in problems:
                print(f"  {p.shard}: {p.reason}")
            print(f"  checksums: {'OK' if not problems else f'{len(problems)} problems'}")
            failed |= bool(problems)
    return 1 if failed else 0


def _fetch_splits(args: argparse.Namespace) -> int:
    from ltdist.data.splits import fetch_splits

    for path in fetch_splits(args.benchmark, args.dest, args.source):
        print(path)
    return 0


def _split_lt(args: argparse.Namespace) -> int:
    from ltdist.data.longtail import SplitLTConfig, histogram, split_long_tailed

    cfg = _load(SplitLTConfig, args)
    if cfg is None:
        return 0
    result = split_long_tailed(cfg)
    print(histogram(result.space, result.sample))
    for split, records in result.splits.items():
        print(f"{split}: {len(records)} images -> {result.files[split]}")
    print(f"report: {result.files['report']}")
    if "plot" in result.files:
        print(f"plot:   {result.files['plot']}")
    return 0


def _split_val(args: argparse.Namespace) -> int:
    import os

    from ltdist.data.manifest import read_class_names, read_manifest, write_manifest
    from ltdist.data.stratify import carve_records

    if not 0 < args.fraction < 1:
        raise entry.UserError(f"--fraction must be in (0, 1), got {args.fraction}")
    names = read_class_names(args.classes)
    records = read_manifest(args.manifest, names, check_files=False).records
    train, val, carve = carve_records(records, len(names), args.fraction, args.seed, args.min_val)
    for split, part in (("train", train), ("val", val)):
        path = os.path.join(args.out, f"{split}.jsonl")
        write_manifest(path, part, names)
        print(f"{split}: {len(part)} images -> {path}")
    width = max(len(n) for n in names)
    print(f"{'class':<{width}}  {'train':>6}  {'val':>5}")
    for c, name in enumerate(names):
        print(f"{name:<{width}}  {carve.train_positives[c]:>6}  {carve.val_positives[c]:>5}")
    lacking = carve.lacking()
    if lacking:
        print(
            f"{len(lacking)} classes have no val positive (too few images; they stay in train): "
            + ", ".join(names[c] for c in lacking)
        )


def _prepare(args: argparse.Namespace) -> int:
    from ltdist.data.prepare import PrepareConfig, format_report, prepare

    flags = {
        "benchmark": args.benchmark,
        "root": args.coco_root if args.benchmark == "coco_lt" else args.voc_root,
        "out": args.out,
        "splits_dir": args.splits_dir,
        "splits_source": args.splits_source,
    }
    other = "--voc-root" if args.benchmark == "coco_lt" else "--coco-root"
    if (args.voc_root if args.benchmark == "coco_lt" else args.coco_root) is not None:
        raise entry.UserError(f"{other} does not apply to {args.benchmark}")
    args.overrides = [f"{k}={v}" for k, v in flags.items() if v is not None] + args.overrides
    cfg = _load(PrepareConfig, args)
    if cfg is None:
        return 0
    print(format_report(prepare(cfg)))
    return 0


def _reference_cnn(args: argparse.Namespace) -> int:
    from ltdist.reference_cnn import ReferenceCNNConfig, train_reference_cnn

    cfg = _load(ReferenceCNNConfig, args)
    if cfg is None:
        return 0
    summary = train_reference_cnn(cfg)
    print(f"{summary['title']}: {summary['train_seconds']} s of training\n{summary['table']}")
    print(f"report: {summary['report']['report']}\nplot:   {summary['report']['plot']}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from ltdist import storage
    from ltdist.eval.compare import compare_runs, format_table, plot_per_class_ap

    methods = compare_runs(args.runs)
    print(format_table(methods, markdown=args.markdown))
    if args.plot:
        storage.write_bytes_atomic(args.plot, plot_per_class_ap(methods))
        print(f"per-class AP plot: {args.plot}")
    return 0


def _rehearse(args: argparse.Namespace) -> int:
    """Plans; the exit status counts refusals at the shape asked for (default: the config's
    own), while refusals at the extra ``--shapes`` are reported, not failures."""
    from ltdist.rehearsal import Shape, plan_config

    configs = [c for c in args.configs if "=" not in c]
    overrides = [c for c in args.configs if "=" in c]
    extra = [Shape.parse(s) for s in args.shapes.split(",") if s]
    shape = Shape(args.nodes, args.gpus_per_node) if args.nodes else None
    refused, reported = 0, 0
    for path in configs:
        main_result = plan_config(path, shape, overrides, args.splits_dir)
        print(main_result.render() + "\n", flush=True)
        refused += not main_result.ok
        for other in extra:
            if other == main_result.shape:
                continue
            result = plan_config(path, other, overrides, args.splits_dir)
            print(result.render() + "\n", flush=True)
            reported += not result.ok
        if not args.plan and main_result.ok:
            from ltdist.rehearsal.run import rehearse_run
            from ltdist.rehearsal.stag_run import rehearse_stag_run

            rehearse = rehearse_run if main_result.kind == "train" else rehearse_stag_run
            try:
                run = rehearse(path, args.work, args.splits_dir or "data/splits", overrides)
            except (RuntimeError, TimeoutError) as e:  # a launch that failed: say which
                print(f"{path}: rehearsal run FAILED\n{e}\n")
                refused += 1
                continue
            print(run.render() + "\n", flush=True)
            refused += not run.ok
    note = f"; {reported} refusal(s) at the extra shapes (reported)" if reported else ""
    state = f"{refused} config(s) refused or failed" if refused else "every config passes"
    print(f"rehearse: {state} at the shape asked for{note}")
    return 1 if refused else 0


def _features_cache(args: argparse.Namespace) -> int:
    from ltdist.train.accel import command_state
    from ltdist.train.config import TrainConfig
    from ltdist.train.resolve import resolve_config
    from ltdist.train.token_cache import build_token_cache, training_source

    if args.out:
        args.overrides.append(f"data.token_cache={args.out}")
    if args.dtype:
        args.overrides.append(f"data.token_cache_dtype={args.dtype}")
    if args.views:
        args.overrides.append(f"data.token_cache_views={args.views}")
    cfg = _load(TrainConfig, args)
    if cfg is None:
        return 0
    if not cfg.data.token_cache:
        cfg.data.token_cache = "auto"
    cfg.validate()  # the checks a run reading the cache makes (frozen source, no augmentation)
    state, barrier = command_state()  # one process, or each rank of a launch
    cfg = resolve_config(cfg, state.num_processes).config
    main = state.is_main_process
    split = args.split or cfg.data.train_split
    result = build_token_cache(
        cfg,
        training_source(cfg),
        split=split,
        # another split is for evaluation, which reads the deterministic view
        views=1 if split != cfg.data.train_split and not args.views else 0,
        rank=state.process_index,
        world_size=state.num_processes,
        device=state.device,
        batch_size=args.batch_size,
        progress=main,
        announce=print if main else (lambda _: None),
    )
    print(
        f"rank {state.process_index}: wrote {len(result.shards_written)} shards, "
        f"{result.shards_kept} already done",
        flush=True,
    )
    barrier()
    if main:
        print(f"token cache: {result.location} ({result.split}), {result.estimate}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from ltdist.train.hub import push

    url = push(args.export, args.repo_id, args.private, args.revision or None, args.license or None)
    print(f"pushed {args.export} to {args.repo_id}: {url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ltdist", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="build, pack and inspect data sets").add_subparsers(
        dest="data_command", required=True
    )
    p = data.add_parser("demo", help="build the bundled demo data set")
    p.add_argument("--out", default="data/demo")
    _config_arguments(p)
    p.set_defaults(func=_demo)

    p = data.add_parser("pack", help="pack a manifest or a benchmark split into shards")
    _config_arguments(p)
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="image processes (config key workers; default 0: every available core)",
    )
    p.set_defaults(func=_pack)

    p = data.add_parser(
        "index", help="existing WebDataset shards -> contract shards, index and classes.json"
    )
    p.add_argument("source", help="brace URL (shard-{000000..000099}.tar), glob, folder or file")
    p.add_argument("--out", required=True, help="the data set folder to write")
    p.add_argument("--split", default="train")
    p.add_argument("--classes", default=None, help="classes.txt / classes.json (default: data)")
    p.add_argument(
        "--samples-per-shard", type=int, default=0, help="default: the largest source shard's"
    )
    p.set_defaults(func=_index)

    p = data.add_parser("stats", help="class table and shard checksums of a data set")
    p.add_argument("location")
    p.add_argument("--no-verify", dest="verify", action="store_false")
    p.set_defaults(func=_stats)

    p = data.add_parser("fetch-splits", help="download the COCO-LT / VOC-LT split files")
    p.add_argument("benchmark", choices=["coco_lt", "voc_lt"])
    p.add_argument("--dest", default="data/splits")
    p.add_argument("--source", default=None, help="base URL or local folder (default: public)")
    p.set_defaults(func=_fetch_splits)

    p = data.add_parser(
        "split-lt", help="sample a long-tailed train split (Pareto profile) from a balanced set"
    )
    _config_arguments(p)
    p.set_defaults(func=_split_lt)

    p = data.add_parser("split-val", help="carve a stratified validation split from a train set")
    p.add_argument("manifest", help="the training split's manifest (JSONL)")
    p.add_argument("--classes", required=True, help="classes.txt or classes.json")
    p.add_argument("--out", default="data/split_val", help="train.jsonl and val.jsonl go here")
    p.add_argument("--fraction", type=float, default=0.1, help="share of each class's positives")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-val", type=int, default=1, help="val positives per class at least")
    p.set_defaults(func=_split_val)

    p = data.add_parser(
        "prepare", help="a COCO 2017 / VOC copy -> coco_lt / voc_lt shards in one command"
    )
    p.add_argument("benchmark", choices=["coco_lt", "voc_lt"])
    p.add_argument("--coco-root", default=None, help="holds annotations/, train2017/, val2017/")
    p.add_argument("--voc-root", default=None, help="holds VOCdevkit/VOC2007 and VOC2012")
    p.add_argument("--out", default=None, help="default shards/<benchmark>")
    p.add_argument("--splits-dir", default=None, help="default data/splits")
    p.add_argument("--splits-source", default=None, help="base URL or local folder of the splits")
    _config_arguments(p)
    p.set_defaults(func=_prepare, trailing_overrides=True)

    p = sub.add_parser(
        "reference-cnn",
        aliases=["baseline"],  # its name until 2026-12
        help="train and evaluate the small CNN reference (end to end, from the shards)",
    )
    _config_arguments(p)
    p.set_defaults(func=_reference_cnn)

    p = sub.add_parser("compare", help="group-mAP table (mean ± std over seeds) of finished runs")
    p.add_argument(
        "runs", nargs="+", metavar="[NAME=]RUN", help="a run folder; repeat NAME for its seeds"
    )
    p.add_argument("--plot", default="", help="write the per-class AP plot here (PNG)")
    p.add_argument("--markdown", action="store_true", help="a Markdown table")
    p.set_defaults(func=_compare)

    p = sub.add_parser("rehearse", help="a config's plan (and run) before the cluster does it")
    p.add_argument("configs", nargs="+", metavar="CONFIG|key=value")
    p.add_argument("--plan", action="store_true", help="the plan only: no model is built")
    p.add_argument("--nodes", type=int, default=0, help="default: the config's cluster shape")
    p.add_argument("--gpus-per-node", type=int, default=1)
    p.add_argument("--shapes", default="", help="comma-separated NODESxGPUS besides its own")
    p.add_argument("--splits-dir", default="", help="the benchmark split files (data/splits)")
    p.add_argument("--work", default="runs/rehearsal", help="stand-in data and runs go here")
    p.set_defaults(func=_rehearse)

    features = sub.add_parser("features", help="frozen token sources' outputs, computed once")
    features = features.add_subparsers(dest="features_command", required=True)
    p = features.add_parser(
        "cache", help="write a training config's frozen token source's tokens beside its shards"
    )
    _config_arguments(p)
    p.add_argument("--out", default="", help="default: data.token_cache, else <location>/tokens")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="", help="default: the config's")
    p.add_argument(
        "--views",
        type=int,
        default=0,
        help="1: the deterministic view; K: epochs 0..K-1's augmentations (loader.augment=true)",
    )
    p.add_argument(
        "--split",
        default="",
        help="default: the training split; another (evaluation) split: one view unless --views",
    )
    p.add_argument("--batch-size", type=int, default=0, help="default: data.eval_batch_size")
    p.set_defaults(func=_features_cache, trailing_overrides=True)

    export = sub.add_parser("export", help="publish a training run's export").add_subparsers(
        dest="export_command", required=True
    )
    p = export.add_parser(
        "push", help="upload an export folder as a Hugging Face Hub model repo (created if new)"
    )
    p.add_argument("export", help="an export folder (<run>/export), local or an fsspec URL")
    p.add_argument("repo_id", help="ORG/NAME on the Hub")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default="", help="a branch to push to (created from main)")
    p.add_argument(
        "--license", default="", help="a Hub licence id (apache-2.0, mit, ...) for the card"
    )
    p.set_defaults(func=_push)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `prepare` takes key=value after its options too (argparse gives both positionals the
    # first run of words: `prepare voc_lt --voc-root DIR key=value` would leave key=value over)
    if extra and (
        not getattr(args, "trailing_overrides", False)
        or any(x.startswith("-") or "=" not in x for x in extra)
    ):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    entry.setup_logging(args.verbose)
    return entry.run("ltdist", lambda: args.func(args))


if __name__ == "__main__":
    sys.exit(main())

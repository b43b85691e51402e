"""The STAG generation job on Ray Data: records -> LLM descriptions -> shards (docs/design.md).

This module is the run; each step it composes lives in its own module::

    driver   load records + label space -> classes.json -> ShardWriter('train')
             -> rows of the shards the index lacks (shard k = rows [kS, (k+1)S) of the
                key-sorted records, so a rerun sends the engine exactly the missing samples)
    ray_pool Ray Data from_items(rows)
             -> map_batches(GenerateActor, compute=ActorPoolStrategy(size=n), num_gpus, num_cpus)
                (each actor builds its engine once; per batch a ``describe.Describer``: chat
                prompts -> generate -> validate -> retry the invalid ones with new seeds -> fall
                back)
    publish  iter_batches -> group rows by shard id -> a complete shard is put back in key
             order, gets its images and is published with ``write_shard`` (atomic), with its
             statistics in the index entry's ``meta['stag']``
    report   stag_report.json (counts, rejects, throughput, tail mentions, provenance)

With ``describe: tail`` only the images with a tail label go to the engine; the others are
written at once as ``not_described`` (``config.STATUSES`` lists a sample's outcomes).
"""

from __future__ import annotations

import json
import logging
import time

from ltdist import storage
from ltdist.data.manifest import Record
from ltdist.data.pack import (
    available_cores,
    load_records,
    pack_split,
    samples_per_shard_for,
    write_classes,
)
from ltdist.data.shards import ShardWriter
from ltdist.labels import LabelSpace
from ltdist.stag import ray_pool
from ltdist.stag.config import NOT_DESCRIBED, REPORT_FILE, SPLIT, StagConfig, StagError
from ltdist.stag.describe import Describer, RowResult, derive_seed, wants_description
from ltdist.stag.job_paths import check_job_paths
from ltdist.stag.publish import Collector, ShardPublisher
from ltdist.stag.ray_pool import cpu_engine_threads, plan_actors
from ltdist.stag.report import (
    RunStats,
    build_report,
    quality_counts,
    quality_summary,
    quality_table,
)
from ltdist.stag.watchdog import HUNG

# The names this module has always offered (the run's parts now live in their own modules).
__all__ = [
    "Describer",
    "RowResult",
    "StagConfig",
    "StagError",
    "cpu_engine_threads",
    "derive_seed",
    "plan_actors",
    "quality_counts",
    "quality_summary",
    "quality_table",
    "run_stag",
]

log = logging.getLogger(__name__)


def run_stag(cfg: StagConfig) -> dict:
    """Generate the training split's descriptions into ``cfg.data.out`` (resumable), pack the
    other splits plainly, and write ``stag_report.json``; returns the report."""
    started = time.time()
    check_job_paths(cfg)  # `ray job submit --working-dir`: no input missing, no output lost
    ray_pool.actor_config(cfg)  # fail early on a missing model folder
    space, splits, problems = load_records(cfg.data)
    if SPLIT not in splits:
        raise StagError(f"data: no '{SPLIT}' split among {sorted(splits)}")
    out = cfg.data.out
    write_classes(out, space)
    if problems:
        storage.write_bytes_atomic(
            storage.join(out, "manifest_problems.json"), json.dumps(problems, indent=1).encode()
        )
    records = sorted(splits[SPLIT], key=lambda r: r.key)
    if cfg.limit:
        records = records[: cfg.limit]
    size = cfg.data.samples_per_shard or samples_per_shard_for(records, cfg.data.target_shard_mb)
    writer = ShardWriter(out, SPLIT, size, len(records))
    plain = [info.name for info in writer.index.ordered() if "stag" not in info.meta]
    if plain:
        raise StagError(
            f"{out}: {SPLIT} shards {plain[:3]} were packed without STAG (ltdist data pack); "
            "write the STAG output to a fresh folder"
        )
    written_with = {info.meta["stag"].get("describe", "all") for info in writer.index.ordered()}
    if written_with - {cfg.describe}:
        other = sorted(written_with - {cfg.describe})[0]
        raise StagError(
            f"{out}: {SPLIT} shards were written with describe={other}; this run has "
            f"describe={cfg.describe}. Resume with describe={other}, or write to a fresh folder."
        )
    # one prompt version per output: the report states one
    versions = {info.meta["stag"].get("prompt_version") for info in writer.index.ordered()}
    if versions - {cfg.prompt.version}:
        other = sorted(versions - {cfg.prompt.version})[0]
        raise StagError(
            f"{out}: {SPLIT} shards were written with prompt.version={other}; this run has "
            f"prompt.version={cfg.prompt.version}. Resume with prompt.version={other}, or write "
            "to a fresh folder."
        )
    kept = len(writer.index.shards)
    stats = RunStats()
    if writer.index.missing():
        stats = _generate(cfg, space, records, size, writer)
    else:
        log.info("%s: all %d %s shards are done; nothing to generate", out, kept, SPLIT)
    others = {}
    for split, recs in splits.items():
        if split == SPLIT:
            continue
        s = cfg.data.samples_per_shard or samples_per_shard_for(recs, cfg.data.target_shard_mb)
        res = pack_split(
            recs,
            space,
            out,
            split,
            s,
            policy=cfg.data.policy,
            text_only=cfg.data.text_only,
            max_image_size=cfg.data.max_image_size,
            progress=cfg.progress,
            workers=cfg.data.workers or available_cores(),
        )
        others[split] = {
            "num_input": res.num_input,
            "num_written": res.num_written,
            "num_rejected": len(res.rejected),
        }
    report = build_report(cfg, writer, stats, kept, others, problems, started)
    storage.write_bytes_atomic(
        storage.join(out, REPORT_FILE), json.dumps(report, indent=1).encode()
    )
    if stats.not_published:
        hung = sorted(k for k, why in stats.not_published.items() if why.startswith(HUNG))
        raise StagError(
            f"the engine stalled (or its actor died) on {len(hung)} rows in every one of "
            f"{cfg.engine.batch_retries + 1} tries of their batch: {hung[:10]}"
            f"{' ...' if len(hung) > 10 else ''}; everything else is published, and "
            f"{REPORT_FILE} in {out} lists the {len(stats.not_published)} rows not written "
            "(run.not_published) and every stall (run.engine_stalls). Rerun the same command "
            "to generate the missing shards (engine.stall_timeout_s, engine.batch_retries)"
        )
    log.info(
        "STAG done: %s; %s; this run %d samples in %.1f s (%.2f samples/s, %.0f tok/s)",
        out,
        report["counts"],
        stats.rows,
        stats.seconds,
        report["run"]["samples_per_s"],
        report["run"]["generated_tokens_per_s"],
    )
    return report


def _generate(
    cfg: StagConfig,
    space: LabelSpace,
    records: list[Record],
    samples_per_shard: int,
    writer: ShardWriter,
) -> RunStats:
    """Send the rows of the missing shards that get a description through the actor pool
    (rows that do not are written at once); publish complete shards."""
    from tqdm import tqdm

    todo = writer.index.missing()
    rows, shard_size = [], {}
    for k in todo:
        chunk = records[k * samples_per_shard : (k + 1) * samples_per_shard]
        shard_size[k] = len(chunk)
        rows += [
            {"key": r.key, "shard": k, "label_ids": list(r.label_ids), "caption": r.caption or ""}
            for r in chunk
        ]
    described = [r for r in rows if wants_description(cfg, space, r["label_ids"])]
    skipped = [r for r in rows if not wants_description(cfg, space, r["label_ids"])]
    if cfg.describe != "all":
        log.info(
            "describe=%s: %d of the %d samples to write go to the engine; the others keep "
            "their captions (%s)",
            cfg.describe,
            len(described),
            len(rows),
            NOT_DESCRIBED,
        )
    stats = RunStats(described=len(described))
    start = time.perf_counter()
    publisher = ShardPublisher(cfg, space, writer, {r.key: r for r in records})
    collector = Collector(publisher, rows, shard_size, stats)
    done_before = sum(info.count + len(info.rejected) for info in writer.index.shards.values())
    bar = tqdm(
        total=len(records),
        initial=done_before,
        desc="stag",
        unit="sample",
        disable=not cfg.progress,
        mininterval=1.0,
    )
    passer = Describer(cfg, space)  # no engine: the texts of the rows not described
    for row in skipped:  # a shard with no row to describe is published here
        collector.add(passer.not_described(row))
    bar.update(len(skipped))
    batches = ray_pool.describe_on_ray(cfg, space, described, stats)
    try:
        for results in batches:
            for res in results:
                collector.add(res)
            stats.last_result_at = time.time()
            if stats.first_result_s is None:
                stats.first_result_s = time.perf_counter() - start
                stats.first_rows = stats.rows
            elapsed = time.perf_counter() - start
            bar.set_postfix_str(f"{stats.generated_tokens / elapsed:.0f} tok/s", refresh=False)
            bar.update(len(results))
    finally:
        batches.close()  # leaves the Ray cluster
        stats.seconds = time.perf_counter() - start
        bar.close()
    collector.finish()
    stats.not_published = collector.not_published()
    return stats

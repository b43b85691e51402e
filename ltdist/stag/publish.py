"""Publishing STAG results as shards: a shard is written, atomically and in key order, as soon
as its last row is back, so a killed run keeps every complete shard and a rerun redoes only
the missing ones (the shard contract in docs/design.md).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Any

from ltdist.data.manifest import Record
from ltdist.data.pack import ImageError, load_image
from ltdist.data.shards import ShardSample, ShardWriter, sample_meta
from ltdist.labels import LabelSpace
from ltdist.stag.config import NOT_DESCRIBED, StagConfig, StagError, model_label
from ltdist.stag.describe import RowResult
from ltdist.stag.grammar import GRAMMAR_VERSION
from ltdist.stag.judge import judge_sample, shard_counts
from ltdist.stag.report import RunStats, quality_counts
from ltdist.stag.validate import count_words, reason_code, tail_mention_rate
from ltdist.stag.watchdog import HUNG


class ShardPublisher:
    """Turns the results of one complete shard into a published WebDataset shard."""

    def __init__(self, cfg: StagConfig, space: LabelSpace, writer: ShardWriter, records: dict):
        self.cfg, self.space, self.writer, self.records = cfg, space, writer, records

    def publish(self, shard_id: int, results: dict[str, RowResult]) -> None:
        samples, rejected = [], []
        stats: dict[str, Any] = {
            "status": Counter(),
            "reasons": Counter(),
            "attempts": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            **quality_counts(results.values()),
            "words_written": Counter(),  # word count -> descriptions written
            "describe": self.cfg.describe,  # a resumed run must have the same
            # rows kept from the engine (written as not_described, or rejected for the image)
            "not_described": sum(r.status == NOT_DESCRIBED for r in results.values()),
        }
        judged = []  # (key, text, judgement) of the generated texts written
        for key in sorted(results):  # Ray Data does not keep order: restore key order
            rec: Record = self.records[key]
            res = results[key]
            stats["attempts"] += res.attempts
            stats["prompt_tokens"] += res.prompt_tokens
            stats["generated_tokens"] += res.generated_tokens
            if res.status != "generated":
                stats["reasons"].update({reason_code(r) for r in res.reasons})
            if res.status == "dropped":
                rejected.append(
                    {
                        "key": key,
                        "status": "dropped",
                        "reason": f"no valid description in {res.attempts} attempts "
                        f"(fallback: drop): {', '.join(res.reasons) or 'none given'}",
                    }
                )
                stats["status"]["dropped"] += 1
                continue
            stag = {
                "engine": res.engine,
                "model": model_label(self.cfg.engine),
                "prompt_version": self.cfg.prompt.version,
                "attempts": res.attempts,
                "status": res.status,
                "reasons": res.reasons,
                "repairs": res.repairs,
                "stage": res.stage,
            }
            judgement = None
            if res.status == "generated" and res.text:  # the content judge (ltdist.stag.judge)
                judgement = judge_sample(res.text, rec.label_ids, rec.caption, self.space)
                stag["judge"] = judgement.to_dict()
            sample = ShardSample(
                key, sample_meta(rec.label_ids, self.space, rec.caption, res.description, stag)
            )
            sample.text = res.text or rec.caption
            if not self.cfg.data.text_only:
                try:
                    if rec.image is None:
                        raise ImageError("record has no image path (use data.text_only=true)")
                    sample.image, sample.image_ext = load_image(
                        rec.image, self.cfg.data.max_image_size
                    )
                except ImageError as e:
                    rejected.append({"key": key, "status": "rejected", "reason": str(e)})
                    stats["status"]["rejected"] += 1
                    continue
            stats["status"][res.status] += 1
            if judgement is not None:
                judged.append((key, res.text, judgement))
            if res.description:
                stats["words_written"][count_words(res.text or "")] += 1
            samples.append(sample)
        label_sets = [s.label_ids for s in samples]
        instances = sum(1 for ids in label_sets for i in ids if self.space.is_tail(i))
        stats["tail_instances"] = instances
        for name, texts in (
            ("tail_mentions_caption", [s.meta["caption"] for s in samples]),
            ("tail_mentions_text", [s.text for s in samples]),
        ):
            stats[name] = round(tail_mention_rate(texts, label_sets, self.space) * instances)
        stats["engine"], stats["model"] = self.cfg.engine.kind, model_label(self.cfg.engine)
        stats["prompt_version"] = self.cfg.prompt.version
        stats["judge"] = shard_counts(judged)
        stats["grammar"] = GRAMMAR_VERSION if self.cfg.constrain.grammar else None
        stats["repetition_sum"] = round(stats["repetition_sum"], 4)
        for name in ("status", "reasons", "stages", "repairs"):
            stats[name] = dict(stats[name])
        for name in ("words_generated", "words_written"):  # JSON keys are strings
            stats[name] = {str(k): v for k, v in sorted(stats[name].items())}
        self.writer.write_shard(shard_id, samples, rejected, meta={"stag": stats})


class Collector:
    """Matches output rows to input rows (none unknown, none twice) and publishes a shard as
    soon as its last row is in. A shard with a ``hung`` row (its batch was given up) is not
    published: a rerun generates it again."""

    def __init__(
        self, publisher: ShardPublisher, rows: list[dict], shard_size: dict, stats: RunStats
    ):
        self.publisher, self.shard_size, self.stats = publisher, shard_size, stats
        self.expected = {r["key"]: r["shard"] for r in rows}
        self.pending: dict[int, dict[str, RowResult]] = defaultdict(dict)
        self.hung: dict[str, RowResult] = {}

    def add(self, res: RowResult) -> None:
        stats = self.stats
        shard = self.expected.pop(res.key, None)
        if shard is None:
            raise StagError(f"output row {res.key!r} matches no pending input row")
        if shard != res.shard:
            raise StagError(f"output row {res.key!r}: shard {res.shard} != {shard}")
        self.pending[shard][res.key] = res
        if res.status == HUNG:
            self.hung[res.key] = res
        stats.rows += 1
        stats.prompt_tokens += res.prompt_tokens
        stats.generated_tokens += res.generated_tokens
        if res.worker:  # rows that were not described never saw an actor
            entry = stats.workers.setdefault(res.worker, {**json.loads(res.worker), "rows": 0})
            entry["rows"] += 1
            entry["grammars_built"] = max(entry.get("grammars_built", 0), res.grammars_built)
        complete = len(self.pending[shard]) == self.shard_size[shard]
        if complete and not any(r.status == HUNG for r in self.pending[shard].values()):
            self.publisher.publish(shard, self.pending.pop(shard))
            stats.shards_written.append(shard)

    def not_published(self) -> dict[str, str]:
        """The rows of the shards held back by hung rows, each with why it was not written."""
        out = {}
        for shard, rows in self.pending.items():
            hung = sum(r.status == HUNG for r in rows.values())
            for key, res in rows.items():
                out[key] = (
                    f"{HUNG}: {'; '.join(res.reasons)}"
                    if res.status == HUNG
                    else f"shard {shard} is not written: {hung} of its rows hung"
                )
        return out

    def finish(self) -> None:
        """Raises when input rows did not come back (hung rows did: :meth:`not_published`)."""
        if self.expected:
            raise StagError(
                f"{len(self.expected)} input rows came back without output (e.g. "
                f"{sorted(self.expected)[:5]}); rerun to regenerate the missing shards"
            )

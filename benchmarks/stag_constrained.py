"""Constrained vs. free STAG decoding on the real COCO-LT training images with tail labels.

    .venvs/gen/bin/python benchmarks/stag_constrained.py [--num 0] [--max-tokens 200]
        [--json runs/stag_constrained.json]

The COCO-LT training images that have tail labels (269; text-only: labels + captions from
../shared/benchmarks) go through the STAG ``Describer`` (prompt, validation, retries, fallback:
what each Ray actor runs) on ONE vLLM engine in this process, in three settings:

    free          no grammar, no bad words (the model alone)
    grammar       the per-tail-set grammar (``ltdist.stag.grammar``)
    grammar+ban   the grammar and the absent classes' names as bad words (the default)

each with repair off, then on. The settings take turns chunk by chunk (``--chunk`` rows), so
load on a shared machine hits them alike. A repair-on arm is the repair-off arm's generations
with repair applied: generations are memoised by request (key, seed, grammar, bad words), so it
sends the engine only what the repair-off arm did not already generate; its tokens/s is not
measured. Tokens/s compares the first-attempt calls (same rows, same batch size) of each
setting. Grammar compilations are counted inside vLLM's xgrammar backend (new compiled-grammar
cache entries; the engine core runs in this process) and compared with the distinct tail sets.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from pathlib import Path

from stag_bench import (  # benchmarks/, the script's folder
    PAPER_WORDS,
    SMOLLM2,
    SPLITS_DIR,
    coco_lt_config,
    tail_records,
    use_cpu_env,
)

SETTINGS = {
    "free": dict(grammar=False, ban_absent_classes=False),
    "grammar": dict(grammar=True, ban_absent_classes=False),
    "grammar+ban": dict(grammar=True, ban_absent_classes=True),
}


def count_compiles() -> list[bool]:
    """Wrap vLLM's xgrammar compile: one entry per call, True when it compiled anew."""
    from vllm.v1.structured_output import backend_xgrammar

    calls: list[bool] = []
    original = backend_xgrammar.XgrammarBackend.compile_grammar

    def compile_grammar(self, *args, **kwargs):
        before = self.compiler.get_cache_size_bytes()
        grammar = original(self, *args, **kwargs)
        calls.append(self.compiler.get_cache_size_bytes() > before)
        return grammar

    backend_xgrammar.XgrammarBackend.compile_grammar = compile_grammar
    return calls


class MemoEngine:
    """The shared engine behind one arm: cached generations come back without generating."""

    def __init__(self, engine, memo: dict):
        self.engine, self.memo = engine, memo
        self.name, self.model, self.tokenizer = engine.name, engine.model, engine.tokenizer
        self.calls: list[dict] = []  # per generate call: requests, tokens, seconds (uncached)
        self._first = True

    @staticmethod
    def _key(r) -> tuple:
        return (r.key, r.seed, r.grammar, tuple(r.banned_words or ()))

    def generate(self, requests):
        todo = [r for r in requests if self._key(r) not in self.memo]
        if todo:
            start = time.perf_counter()
            outs = self.engine.generate(todo)
            seconds = time.perf_counter() - start
            for r, g in zip(todo, outs):
                self.memo[self._key(r)] = g
            self.calls.append(
                {
                    "requests": len(todo),
                    "tokens": sum(g.num_tokens for g in outs),
                    "seconds": seconds,
                    "first": self._first,  # the chunk's first attempt
                }
            )
        self._first = False
        return [self.memo[self._key(r)] for r in requests]

    def new_chunk(self) -> None:
        self._first = True

    def close(self) -> None:
        pass


def arm_stats(results, records, space, calls) -> dict:
    """The report's quality section (the pipeline's own definitions) plus tokens/s."""
    from ltdist.stag.report import quality_counts, quality_summary
    from ltdist.stag.validate import count_words, reason_code, tail_mention_rate

    described = [r for r in results if r.status == "generated"]
    by_key = {r.key: r for r in records}
    counts = quality_counts(results)
    counts["words_written"] = collections.Counter(count_words(r.text) for r in described)
    # tail mentions over the descriptions written (fallbacks have none)
    mentions = tail_mention_rate(
        [r.text for r in described], [by_key[r.key].label_ids for r in described], space
    )
    quality = quality_summary(counts, mentions_per_tail=mentions)
    words = quality["words_generated"]
    first = [c for c in calls if c["first"]]
    failures = collections.Counter(
        reason_code(x) for r in results if r.status != "generated" for x in r.reasons
    )
    return {
        "samples": quality["samples"],
        "valid": len(described) / len(results),
        "first_try": quality["valid_first_try"],
        "after_repair": quality["valid_after_repair"],
        "after_retry": quality["valid_after_retry"],
        "fallback": quality["fallback"],
        "generations": quality["generations"],
        "hallucination_rate": quality["hallucination_rate"],
        "repetition_rate": quality["repetition_rate"],
        "tail_mentions_per_tail_instance": quality["tail_mentions_per_tail_instance"],
        "words_min": words.get("min", 0),
        "words_median": words.get("median", 0),
        "words_max": words.get("max", 0),
        "tokens_per_s_first_attempt": (
            sum(c["tokens"] for c in first) / sum(c["seconds"] for c in first) if first else None
        ),
        "tokens_per_s_all": (
            sum(c["tokens"] for c in calls) / sum(c["seconds"] for c in calls) if calls else None
        ),
        "engine_seconds": sum(c["seconds"] for c in calls),
        "failure_reasons": dict(failures.most_common()),
        "repairs": quality["repairs"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=0, help="first N tail samples (0: all)")
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--splits-dir", default=str(SPLITS_DIR))
    parser.add_argument("--json", default="", help="write every output and the table here")
    args = parser.parse_args()
    use_cpu_env()

    from ltdist.stag.config import StagConfig
    from ltdist.stag.describe import Describer
    from ltdist.stag.engines import VLLMEngine
    from ltdist.stag.grammar import ConstraintConfig

    base = coco_lt_config(
        args.splits_dir,
        [
            f"engine.model={args.model}",
            f"engine.max_tokens={args.max_tokens}",
            *PAPER_WORDS,  # the paper's 50-80 words, not the demo's shorter texts
            # the tagged prompt whose format the arms compare (the demo's paper-v1 asks for none)
            "prompt.version=stag-v1",
        ],
    )
    space, records = tail_records(base)
    if args.num:
        records = records[: args.num]
    tail_sets = {tuple(sorted(i for i in set(r.label_ids) if space.is_tail(i))) for r in records}
    compiles = count_compiles()
    engine = VLLMEngine(base.engine)
    memo: dict = {}
    arms = {}
    for setting, constrain in SETTINGS.items():
        for repair in (False, True):
            cfg = StagConfig(**{**vars(base), "constrain": ConstraintConfig(**constrain)})
            cfg.repair = repair
            mem = MemoEngine(engine, memo)
            arms[(setting, repair)] = (Describer(cfg, space, mem), mem, [])
    rows = [
        {"key": r.key, "shard": 0, "label_ids": list(r.label_ids), "caption": r.caption}
        for r in records
    ]
    start = time.perf_counter()
    for c in range(0, len(rows), args.chunk):
        chunk = rows[c : c + args.chunk]
        for repair in (False, True):  # repair-on arms reuse the repair-off generations
            for setting in SETTINGS:
                describer, mem, results = arms[(setting, repair)]
                mem.new_chunk()
                results += describer.describe(chunk)
        done = min(c + args.chunk, len(rows))
        print(f"{done}/{len(rows)} samples, {time.perf_counter() - start:.0f} s", flush=True)
    engine.close()

    table = {}
    for (setting, repair), (describer, mem, results) in arms.items():
        stats = arm_stats(results, records, space, mem.calls)
        stats["grammars_built"] = describer.grammars.builds if describer.grammars else 0
        table[f"{setting}, repair {'on' if repair else 'off'}"] = stats
    free_rate = table["free, repair off"]["tokens_per_s_first_attempt"]
    print(
        f"\nSTAG format: {len(records)} COCO-LT training images with tail labels "
        f"({len(tail_sets)} distinct tail sets), {base.engine.model.split('/')[-1]}, vLLM "
        f"(CPU build), max_tokens {args.max_tokens}, {base.max_attempts} attempts"
    )
    cols = (
        f"{'setting':<24} {'valid':>6} {'1st':>6} {'repair':>6} {'retry':>6} {'fallbk':>6} "
        f"{'halluc':>6} {'tail/inst':>9} {'repet':>6} {'words':>10} {'grammars':>8} "
        f"{'tok/s':>6} {'vs free':>7}"
    )
    print(cols)
    for name, s in table.items():
        rate = s["tokens_per_s_first_attempt"]
        words = f"{s['words_min']}/{s['words_median']}/{s['words_max']}"
        print(
            f"{name:<24} {s['valid']:>6.1%} {s['first_try']:>6.1%} {s['after_repair']:>6.1%} "
            f"{s['after_retry']:>6.1%} {s['fallback']:>6.1%} {s['hallucination_rate']:>6.1%} "
            f"{s['tail_mentions_per_tail_instance']:>9.2f} {s['repetition_rate']:>6.1%} "
            f"{words:>10} {s['grammars_built']:>8} "
            + (f"{rate:>6.1f} {rate / free_rate:>7.2f}" if rate else f"{'(memo)':>6} {'':>7}")
        )
    new = sum(compiles)
    print(
        f"vLLM grammar compilations: {new} (compile calls {len(compiles)}); distinct tail sets "
        f"{len(tail_sets)}"
    )
    for name, s in table.items():
        print(f"{name}: failures {s['failure_reasons']}; repairs {s['repairs']}")
    if args.json:
        outputs = {
            name: [
                {
                    "key": r.key,
                    "status": r.status,
                    "stage": r.stage,
                    "attempts": r.attempts,
                    "description": r.description,
                    "reasons": r.reasons,
                    "repairs": r.repairs,
                }
                for r in arms[key][2]
            ]
            for key, name in zip(arms, table)
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {
                    "table": table,
                    "compilations": new,
                    "compile_calls": len(compiles),
                    "distinct_tail_sets": len(tail_sets),
                    "outputs": outputs,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

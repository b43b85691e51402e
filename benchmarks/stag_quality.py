"""STAG content quality (``ltdist.stag.judge``) by prompt version, decoding and model.

    .venvs/gen/bin/python benchmarks/stag_quality.py [--num 32] [--seed 0]
        [--model NAME=FOLDER ...] [--json runs/stag_quality.json]

A fixed random sample (``--num``, ``--seed``) of the COCO-LT training images with tail labels
(text-only: labels + captions from ../shared/benchmarks) goes through the STAG ``Describer``
(prompt, constrained decoding, validation, repair, retries, fallback: what each Ray actor runs)
with the demo's settings (configs/stag/demo.yaml: 30-50 words, grammar + banned absent classes),
on one vLLM engine per model, for every arm of the grid:

    --arms          version:temperature:repetition_penalty,... (default ARMS: both prompt
                    versions at the demo's decoding, and the strict one at a lower temperature
                    and with a repetition penalty)

Per arm: the format figures the report gives (valid share, hallucination, tail mentions) and the
judge's (grounded share, caption facts kept, off-topic items, contradictions, score) over the
generated texts; the table is printed and, with ``--json``, written with every text. Quality,
not speed: the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from stag_bench import (  # benchmarks/, the script's folder
    SMOLLM2,
    SPLITS_DIR,
    coco_lt_config,
    tail_records,
    use_cpu_env,
)

# version:temperature:repetition_penalty; the demo's decoding first
ARMS = "stag-v1:0.7:1.0,paper-v1:0.7:1.0,stag-v1:0.3:1.0,stag-v1:0.7:1.2"


def arm_row(results, records, space) -> dict:
    """Format figures (the pipeline's definitions) and the judge's, over one arm's results."""
    from ltdist.stag.judge import judge_sample, shard_counts, summarize
    from ltdist.stag.report import quality_counts, quality_summary
    from ltdist.stag.validate import tail_mention_rate

    by_key = {r.key: r for r in records}
    generated = [r for r in results if r.status == "generated"]
    counts = quality_counts(results)
    counts["words_written"] = {}
    mentions = tail_mention_rate(
        [r.text for r in generated], [by_key[r.key].label_ids for r in generated], space
    )
    q = quality_summary(counts, mentions_per_tail=mentions)
    judged = [
        (r.key, r.text, judge_sample(r.text, by_key[r.key].label_ids, by_key[r.key].caption, space))
        for r in generated
    ]
    j = summarize([shard_counts(judged)], worst=5)
    return {
        "samples": len(results),
        "valid": len(generated) / len(results),
        "first_try": q["valid_first_try"],
        "hallucination_rate": q["hallucination_rate"],
        "tail_mentions_per_tail_instance": q["tail_mentions_per_tail_instance"],
        "judge": j,
        "texts": [
            {"key": k, "caption": by_key[k].caption, "text": t, **jd.to_dict()}
            for k, t, jd in judged
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=32, help="tail images sampled")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        help="NAME=FOLDER (repeatable); default SmolLM2-135M=.cache/llm/SmolLM2-135M-Instruct",
    )
    parser.add_argument("--arms", default=ARMS)
    parser.add_argument("--splits-dir", default=str(SPLITS_DIR))
    parser.add_argument("--json", default="", help="write the table and every text here")
    args = parser.parse_args()
    use_cpu_env()

    from ltdist.stag.config import StagConfig
    from ltdist.stag.describe import Describer
    from ltdist.stag.engines import VLLMEngine
    from ltdist.stag.prompt import StagPromptConfig

    models = dict(m.split("=", 1) for m in args.model) or {"SmolLM2-135M": str(SMOLLM2)}
    arms = [(v, float(t), float(rp)) for v, t, rp in (a.split(":") for a in args.arms.split(","))]
    base = coco_lt_config(args.splits_dir)
    space, tail = tail_records(base)
    records = sorted(
        random.Random(args.seed).sample(tail, min(args.num, len(tail))), key=lambda r: r.key
    )
    rows = [
        {"key": r.key, "shard": 0, "label_ids": list(r.label_ids), "caption": r.caption}
        for r in records
    ]
    table: dict[str, dict] = {}
    start = time.perf_counter()
    for model, folder in models.items():
        base.engine.model = folder
        engine = VLLMEngine(base.engine)
        for version, temperature, penalty in arms:
            cfg = StagConfig(**vars(base))
            cfg.prompt = StagPromptConfig(**{**vars(base.prompt), "version": version})
            engine.cfg.temperature, engine.cfg.repetition_penalty = temperature, penalty
            cfg.validate()
            results = []
            describer = Describer(cfg, space, engine)
            for c in range(0, len(rows), base.batch_size):
                results += describer.describe(rows[c : c + base.batch_size])
            name = f"{model} {version} T={temperature} rp={penalty}"
            table[name] = arm_row(results, records, space)
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        engine.close()

    print(
        f"\nSTAG content: {len(records)} COCO-LT training images with tail labels (sample seed "
        f"{args.seed}), demo settings (30-50 words, grammar + ban), vLLM CPU build"
    )
    cols = (
        f"{'arm':<36} {'valid':>6} {'1st':>6} {'ground':>7} {'g.p25':>6} {'kept':>6} "
        f"{'off/txt':>7} {'contra':>6} {'repet':>6} {'score':>6}"
    )
    print(cols)
    for name, s in table.items():
        j = s["judge"]
        print(
            f"{name:<36} {s['valid']:>6.1%} {s['first_try']:>6.1%} "
            f"{j['grounded'].get('mean', 0):>7.3f} {j['grounded'].get('p25', 0):>6.2f} "
            f"{j['caption_kept'].get('mean', 0):>6.3f} {j['off_topic_per_text']:>7.1f} "
            f"{j['contradicted_share']:>6.1%} {j['repetition'].get('mean', 0):>6.3f} "
            f"{j['score'].get('mean', 0):>6.3f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps(
                {"num": len(records), "seed": args.seed, "models": models, "table": table},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()

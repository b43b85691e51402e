"""Generated tokens/s of the whole STAG job vs. a bare ``vllm.LLM.generate`` on the same prompts.

    .venvs/gen/bin/python benchmarks/stag_throughput.py [--num 64] [--batch-size 64 16]
        [--repeats 3] [key=value ...]

The prompts are the STAG prompts of the first ``--num`` real COCO-LT training images (labels +
captions, text-only). A pipeline row is ``python -m ltdist.stag_gen``'s own report (local Ray,
one vLLM actor, one attempt per sample, so both sides generate once per prompt) for one
``batch_size`` (rows per actor call, i.e. what the engine batches at once): its generation rate
(from the engine ready to the last result, so without Ray and engine start-up, which the bare
row does not time either) and end to end. The bare row builds one ``vllm.LLM`` with the same
settings in this process and times one ``generate`` call over all prompts. Goal: pipeline at
batch size = all prompts / bare >= 0.9; smaller batches show what the engine loses when it
batches fewer sequences. Trailing ``key=value`` overrides of the STAG config apply to both sides
(benchmarks/gpu_check.py passes a random-weight model shape and GPU settings this way).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from stag_bench import (  # benchmarks/, the script's folder
    PAPER_WORDS,
    SMOLLM2,
    SPLITS_DIR,
    coco_lt_config,
    use_cpu_env,
)


def stag_config(args, out: str, batch_size: int):
    overrides = [
        f"data.samples_per_shard={args.num}",
        f"limit={args.num}",
        f"batch_size={batch_size}",
        f"engine.model={args.model}",
        f"engine.max_tokens={args.max_tokens}",
        "max_attempts=1",
        # the bare side decodes freely: so does the pipeline here (constrained decoding has
        # its own benchmark, stag_constrained.py)
        "constrain.grammar=false",
        "constrain.ban_absent_classes=false",
        # the prompt these figures were measured with (the demo's paper-v1 wants the grammar to
        # write its tags)
        "prompt.version=stag-v1",
        "num_actors=1",
        "reject_truncated=false",
        # the paper's settings, not the demo's shorter texts or tail-only selection
        "describe=all",
        *PAPER_WORDS,
        *args.overrides,
    ]
    return coco_lt_config(args.splits_dir, overrides, out=out)


def pipeline_row(args, batch_size: int) -> dict:
    from ltdist.stag.pipeline import run_stag

    with tempfile.TemporaryDirectory(prefix="stag-bench-") as tmp:
        report = run_stag(stag_config(args, f"{tmp}/out", batch_size))
    run = report["run"]
    return {
        "generation": run["generation_tokens_per_s"],
        "end_to_end": run["generated_tokens"] / run["seconds"],
        "tokens": run["generated_tokens"],
    }


def bare_row(args) -> dict:
    from vllm import LLM, SamplingParams

    from ltdist.data.pack import load_records
    from ltdist.stag.describe import Describer, derive_seed
    from ltdist.stag.engines import VLLMEngine

    cfg = stag_config(args, "unused", args.num)
    space, splits, _ = load_records(cfg.data)
    records = sorted(splits["train"], key=lambda r: r.key)[: args.num]
    # The pipeline's engine settings (chunked prefill off on CPU, eager, dtype, seed), its
    # prompts and per-request seeds; then the bare LLM object's generate alone is timed.
    engine = VLLMEngine(cfg.engine)
    describer = Describer(cfg, space, engine)
    prompts = [describer.prompt(list(r.label_ids), r.caption) for r in records]
    llm: LLM = engine.llm
    params = [
        SamplingParams(
            temperature=cfg.engine.temperature,
            top_p=cfg.engine.top_p,
            max_tokens=cfg.engine.max_tokens,
            seed=derive_seed(cfg.engine.seed, r.key, 0),
        )
        for r in records
    ]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    engine.close()
    return {"tokens_per_s": tokens / seconds, "tokens": tokens}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=64)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[64, 16])
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of pipeline rows + bare")
    parser.add_argument("--model", default=str(SMOLLM2))
    parser.add_argument("--splits-dir", default=str(SPLITS_DIR))
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the STAG config")
    args = parser.parse_args()
    use_cpu_env()

    # Rounds alternate the pipeline rows and the bare row, so that a slow spell of a shared
    # machine hits both; each round's ratio uses that round's bare rate.
    rounds = []
    for _ in range(args.repeats):
        pipes = {b: pipeline_row(args, b) for b in args.batch_size}
        rounds.append((pipes, bare_row(args)))
    print(f"STAG throughput: {args.num} COCO-LT prompts, {args.max_tokens} new tokens max")
    print(f"{'':<44} {'tokens/s':>9} {'vs bare':>8}   (per round; median ratio last)")
    rates = " ".join(f"{bare['tokens_per_s']:>6.1f}" for _, bare in rounds)
    print(f"{'bare vllm.LLM.generate (all prompts)':<44} {rates}")
    for b in args.batch_size:
        for label, key in (("generation", "generation"), ("end to end", "end_to_end")):
            ratios = [p[b][key] / bare["tokens_per_s"] for p, bare in rounds if p[b][key]]
            if not ratios:
                continue
            cells = " ".join(f"{p[b][key]:>6.1f}" for p, _ in rounds)
            median = statistics.median(ratios)
            each = " ".join(f"{r:.2f}" for r in ratios)
            name = f"pipeline, batch {b}, {label}"
            print(f"{name:<44} {cells}   ratios {each}, median {median:.2f}")


if __name__ == "__main__":
    main()

"""What the STAG benchmarks share: vLLM's CPU settings, and the COCO-LT training records they
describe through the demo's STAG config."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS_DIR = ROOT.parent / "shared" / "benchmarks"
SMOLLM2 = ROOT / ".cache/llm/SmolLM2-135M-Instruct"

CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine core in this process: compiles counted
    "HF_HUB_OFFLINE": "1",
}
# the paper's 50-80-word descriptions (the demo config asks for shorter ones)
PAPER_WORDS = [
    "prompt.min_words=50",
    "prompt.max_words=80",
    "validation.min_words=50",
    "validation.max_words=80",
]


def use_cpu_env() -> None:
    """vLLM's CPU settings, unless the caller's environment sets them (before vLLM imports)."""
    for name, value in CPU_ENV.items():
        os.environ.setdefault(name, value)


def coco_lt_config(splits_dir: str, overrides: Sequence[str] = (), out: str = "unused"):
    """configs/stag/demo.yaml on COCO-LT's split files, text only, with ``overrides``."""
    from ltdist.config import load_config
    from ltdist.stag.config import StagConfig

    base = [
        f"data.out={out}",
        "data.source=benchmark",
        "data.benchmark=coco_lt",
        f"data.splits_dir={splits_dir}",
        "data.text_only=true",
    ]
    return load_config(StagConfig, ROOT / "configs/stag/demo.yaml", [*base, *overrides])


def tail_records(cfg):
    """(label space, the training records with a tail class, in key order)."""
    from ltdist.data.pack import load_records

    space, splits, _ = load_records(cfg.data)
    records = sorted(splits["train"], key=lambda r: r.key)
    return space, [r for r in records if any(space.is_tail(i) for i in r.label_ids)]

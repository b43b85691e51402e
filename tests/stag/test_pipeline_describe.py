"""``describe: tail`` in the STAG job (ltdist/stag/pipeline.py): only images with a tail label go
to the engine; the others are written with their caption as the text (``not_described``).

Most tests run the whole driver (``run_stag``: planning, publishing, the report) with the actor
pool replaced by an in-process ``Describer`` over a scripted engine, so they need neither Ray nor
a model (both envs). One test runs the real Ray path with the template engine (gen env).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from ltdist.config import ConfigError, load_config
from ltdist.data.pack import PackConfig, load_records
from ltdist.data.shards import read_shard
from ltdist.stag import ray_pool
from ltdist.stag.config import StagConfig, StagError
from ltdist.stag.describe import Describer
from ltdist.stag.engines import EngineConfig, Generation
from ltdist.stag.judge import judge_sample
from ltdist.stag.pipeline import run_stag
from ltdist.stag.prompt import StagPromptConfig
from ltdist.stag.report import quality_table
from ltdist.stag.validate import ValidationConfig

NAMES = ["person", "dog", "kite", "surfboard"]
# 45 training records, keys r00..r44: person in r00-r24 (25: medium), dog in r25-r44 (20:
# medium), kite in 3 and surfboard in 2 (tail). Shard size 10: shard 2 (r20-r29) has no tail.
TAIL = {"r03": [2], "r12": [3], "r17": [2], "r30": [2], "r41": [3]}
NO_CAPTION = {"r05", "r17", "r40"}  # r17 is described, r05 and r40 are not
# what the scripted engine answers each described key, attempt by attempt
SCRIPT = {
    "r03": ["good"],  # valid at once
    "r12": ["hallucinated", "good"],  # valid at the retry (attempt 0 names a dog)
    "r17": ["bad", "bad", "bad"],  # never valid, no caption: template fallback
    "r30": ["untagged"],  # valid after the deterministic repair
    "r41": ["good"],
}


def write_data(folder: Path, tail: dict[str, list[int]] = TAIL) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "classes.txt").write_text("\n".join(NAMES) + "\n")
    lines = []
    for i in range(45):
        key = f"r{i:02d}"
        ids = [0 if i < 25 else 1] + tail.get(key, [])
        names = [NAMES[j] for j in ids]
        rec = {"key": key, "labels": names}
        if key not in NO_CAPTION:
            rec["caption"] = f" a photo of a {' and a '.join(names)} "
        lines.append(json.dumps(rec))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"classes": str(folder / "classes.txt"), "train": str(folder / "train.jsonl")}


def config(data: dict, out: Path, **kw) -> StagConfig:
    return StagConfig(
        data=PackConfig(
            out=str(out),
            classes=data["classes"],
            manifests={"train": data["train"]},
            samples_per_shard=10,
            text_only=True,
        ),
        engine=EngineConfig(kind="template", seed=3),
        progress=False,
        **{
            "validation": ValidationConfig(min_words=5, max_words=40),
            "describe": "tail",
            "batch_size": 2,
            **kw,
        },
    )


class ScriptedEngine:
    """Answers each request by its key's script (see SCRIPT), then ``default``; records the
    keys it was sent."""

    name, model, tokenizer = "scripted", "script-v1", None

    def __init__(self, script: dict[str, list[str]], default: str = "good"):
        self.script = {k: list(v) for k, v in script.items()}
        self.default = default
        self.sent: list[str] = []
        self.prompts: dict[str, str] = {}

    def generate(self, requests):
        out = []
        for r in requests:
            self.sent.append(r.key)
            self.prompts[r.key] = r.prompt
            queue = self.script.get(r.key)
            mode = queue.pop(0) if queue else self.default
            tails = " and ".join(f"<tail> {t} </tail>" for t in r.tail_labels)
            text = {
                "good": f"A {tails} rests near the quiet water on a calm day.",
                "untagged": f"A {' and '.join(r.tail_labels)} rests near the quiet water today.",
                "hallucinated": "A dog runs.",
                "bad": "Sure! here it is.",
            }[mode]
            out.append(Generation(r.key, text, 10, 5, "stop"))
        return out

    def close(self):
        pass


def in_process_pool(monkeypatch, engine, fail_after: int | None = None) -> None:
    """The actor pool replaced by one in-process Describer (batches of ``cfg.batch_size``);
    with ``fail_after``, the run dies after that many batches (a killed job)."""

    def describe_on(cfg, space, rows, stats):
        describer = Describer(cfg, space, engine)
        for n, start in enumerate(range(0, len(rows), cfg.batch_size)):
            if n == fail_after:
                raise RuntimeError("killed")
            yield describer.describe(rows[start : start + cfg.batch_size])

    monkeypatch.setattr(ray_pool, "describe_on_ray", describe_on)


def samples(out: Path) -> dict:
    index = json.loads((out / "train.index.json").read_text())
    return {s.key: s for info in index["shards"] for s in read_shard(str(out / info["name"]))}


def shard_hashes(out: Path) -> dict[int, str]:
    index = json.loads((out / "train.index.json").read_text())
    return {s["id"]: s["sha256"] for s in index["shards"]}


def row_of(key: str, caption: str | None) -> dict:
    ids = [0 if int(key[1:]) < 25 else 1] + TAIL.get(key, [])
    return {"key": key, "shard": int(key[1:]) // 10, "label_ids": ids, "caption": caption}


@pytest.mark.both_envs
def test_tail_mode_sends_only_tail_images_and_writes_the_rest_with_captions(tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    cfg = config(data, tmp_path / "out")
    engine = ScriptedEngine(SCRIPT)
    in_process_pool(monkeypatch, engine)
    report = run_stag(cfg)
    # only the tail-bearing records reached the engine, each as often as its script says
    assert collections.Counter(engine.sent) == {k: len(v) for k, v in SCRIPT.items()}
    got = samples(tmp_path / "out")
    assert sorted(got) == [f"r{i:02d}" for i in range(45)]  # every record written
    # the text a not-described record gets is what the fallback paths write for it
    space = load_records(cfg.data)[0]
    for fallback in ("caption", "template"):
        always_bad = ScriptedEngine({}, default="bad")
        fb = Describer(config(data, tmp_path / "x", fallback=fallback), space, always_bad)
        for key, sample in got.items():
            stag = sample.meta["stag"]
            if key in TAIL:
                assert stag["status"] != "not_described" and stag["attempts"] >= 1
                continue
            assert (stag["status"], stag["stage"], stag["attempts"]) == (
                "not_described",
                "not_described",
                0,
            )
            assert stag["reasons"] == [] and stag["repairs"] == []
            assert sample.meta["description"] is None and sample.meta["tail_labels"] == []
            caption = sample.meta["caption"]
            if (caption is not None) == (fallback == "caption"):
                (res,) = fb.describe([row_of(key, caption)])
                assert sample.text == res.text, key
    assert got["r00"].text == "a photo of a person"  # the caption, stripped
    assert got["r05"].text and "<tail>" not in got["r05"].text  # no caption: template text
    assert (got["r17"].meta["stag"]["status"], got["r12"].meta["stag"]["stage"]) == (
        "fallback_template",
        "retry",
    )
    # accounting: every key once, not_described counted and written
    counts = report["counts"]
    assert counts["not_described"] == 40 and counts["generated"] == 4
    assert counts["fallback_template"] == 1
    assert sum(counts.values()) == report["num_input"] == 45 == report["num_written"]
    assert report["describe"] == "tail" and report["run"]["described"] == 5
    assert report["run"]["samples"] == 45 and report["totals"]["not_described"] == 40


@pytest.mark.both_envs
def test_quality_is_over_described_samples_only(tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    in_process_pool(monkeypatch, ScriptedEngine(SCRIPT))
    report = run_stag(config(data, tmp_path / "out"))
    q = report["quality"]
    # a direct computation from the written samples: the described ones and their stages
    described = [
        s.meta["stag"]
        for s in samples(tmp_path / "out").values()
        if s.meta["stag"]["status"] != "not_described"
    ]
    stages = collections.Counter(m["stage"] or "fallback" for m in described)
    n = len(described)
    assert (q["described"], q["samples"], q["not_described"], n) == (5, 5, 40, 5)
    for key, stage in (
        ("valid_first_try", "first_try"),
        ("valid_after_repair", "repair"),
        ("valid_after_retry", "retry"),
        ("fallback", "fallback"),
    ):
        assert q[key] == pytest.approx(stages[stage] / n), key
    assert (q["valid_first_try"], q["valid_after_repair"]) == (0.4, 0.2)
    assert (q["valid_after_retry"], q["fallback"]) == (0.2, 0.2)
    generations = sum(m["attempts"] for m in described)
    assert q["generations"] == generations == 8 == q["words_generated"]["n"]
    assert q["hallucination_rate"] == pytest.approx(1 / 8)  # r12's first answer names a dog
    # descriptions written: the 4 generated and r17's template one, no caption
    assert q["words_written"]["n"] == 5
    # tail mentions are over every written text (captions of the others included)
    assert report["tail_mentions"]["tail_instances"] == 5
    table = quality_table(report)
    assert "5 of 45 described (describe=tail)" in table and "40.0%" in table


@pytest.mark.both_envs
def test_all_mode_is_unchanged(tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    engine = ScriptedEngine(SCRIPT)
    in_process_pool(monkeypatch, engine)
    report = run_stag(config(data, tmp_path / "out", describe="all"))
    assert set(engine.sent) == {f"r{i:02d}" for i in range(45)}
    statuses = collections.Counter(
        s.meta["stag"]["status"] for s in samples(tmp_path / "out").values()
    )
    assert "not_described" not in statuses and report["counts"]["not_described"] == 0
    assert report["quality"]["described"] == 45 and report["quality"]["not_described"] == 0
    assert report["describe"] == "all" and report["run"]["described"] == 45
    table = quality_table(report)
    assert "described (describe" not in table


@pytest.mark.both_envs
def test_tail_mode_resumes_a_killed_run_byte_for_byte(tmp_path, monkeypatch):
    data = write_data(tmp_path / "data")
    # a straight run, for the bytes
    in_process_pool(monkeypatch, ScriptedEngine(SCRIPT))
    run_stag(config(data, tmp_path / "straight"))
    # killed after its first batch (batch_size 1: r03, which completes shard 0); shard 2 has
    # no tail image and is published before the engine is needed
    out = tmp_path / "out"
    in_process_pool(monkeypatch, ScriptedEngine(SCRIPT), fail_after=1)
    with pytest.raises(RuntimeError, match="killed"):
        run_stag(config(data, out, batch_size=1))
    before = shard_hashes(out)
    assert sorted(before) == [0, 2]
    engine = ScriptedEngine({k: v for k, v in SCRIPT.items() if k != "r03"})
    in_process_pool(monkeypatch, engine)
    report = run_stag(config(data, out, batch_size=1))
    # the rerun sent the engine exactly the tail records of the missing shards
    assert set(engine.sent) == {"r12", "r17", "r30", "r41"}
    assert sorted(report["run"]["shards_written"]) == [1, 3, 4]
    assert report["run"]["described"] == 4 and report["run"]["samples"] == 25
    after = shard_hashes(out)
    assert {k: after[k] for k in before} == before  # published shards untouched
    assert after == shard_hashes(tmp_path / "straight")  # same bytes as a straight run
    assert report["complete"] and sum(report["counts"].values()) == 45
    assert report["quality"]["described"] == 5  # across both runs
    assert report["counts"]["not_described"] == 40


@pytest.mark.both_envs
@pytest.mark.parametrize("first, second", [("tail", "all"), ("all", "tail")])
def test_rerun_with_another_describe_is_refused(tmp_path, monkeypatch, first, second):
    data = write_data(tmp_path / "data")
    out = tmp_path / "out"
    # killed after its first batch, which completes shard 0
    in_process_pool(monkeypatch, ScriptedEngine(SCRIPT), fail_after=1)
    with pytest.raises(RuntimeError, match="killed"):
        run_stag(config(data, out, describe=first, batch_size=10 if first == "all" else 1))
    assert 0 in shard_hashes(out)
    engine = ScriptedEngine(SCRIPT)
    in_process_pool(monkeypatch, engine)
    with pytest.raises(StagError, match=f"written with describe={first}; this run has"):
        run_stag(config(data, out, describe=second))
    assert engine.sent == []
    run_stag(config(data, out, describe=first))  # the same setting resumes
    with pytest.raises(StagError, match=f"describe={second}"):  # and a complete folder too
        run_stag(config(data, out, describe=second))


@pytest.mark.both_envs
def test_no_tail_class_starts_no_engine(tmp_path, monkeypatch):
    # kite and surfboard never occur: no class is tail, nothing is described
    data = write_data(tmp_path / "data", tail={})

    def no_ray(cfg):
        raise AssertionError("no engine should be started")

    monkeypatch.setattr(ray_pool, "_ray_init", no_ray)
    report = run_stag(config(data, tmp_path / "out"))
    assert report["counts"]["not_described"] == 45 == report["num_written"]
    q = report["quality"]
    assert (q["described"], q["not_described"], q["generations"]) == (0, 45, 0)
    assert q["valid_first_try"] == q["fallback"] == q["hallucination_rate"] == 0
    assert report["tail_mentions"]["tail_instances"] == 0
    assert report["tail_mentions"]["ratio"] is None
    assert "0 of 45 described (describe=tail)" in quality_table(report)


@pytest.mark.both_envs
def test_cli_prints_how_many_were_described(tmp_path, monkeypatch, capsys):
    from ltdist.stag_gen import main

    data = write_data(tmp_path / "data")
    in_process_pool(monkeypatch, ScriptedEngine(SCRIPT))
    overrides = [
        f"data.out={tmp_path / 'out'}",
        f"data.classes={data['classes']}",
        f"data.manifests.train={data['train']}",
        "data.samples_per_shard=10",
        "data.text_only=true",
        "engine.kind=template",
        "validation.min_words=5",
        "validation.max_words=40",
        "progress=false",
    ]
    assert main([*overrides, "describe=tail"]) == 0
    assert "5 of 45 described (describe=tail)" in capsys.readouterr().out


@pytest.mark.both_envs
def test_describe_values_are_checked():
    with pytest.raises(ConfigError, match="did you mean 'tail'"):
        load_config(StagConfig, None, ["describe=tails"])
    with pytest.raises(ValueError, match="describe must be 'all' or 'tail'"):
        StagConfig(describe="some").validate()
    assert load_config(StagConfig, None, []).describe == "all"  # the paper's default


# -- the real Ray path (gen env) ----------------------------------------------------------------


@pytest.mark.gen_env
def test_tail_mode_through_a_local_ray_actor_pool(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a local cluster of its own
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    data = write_data(tmp_path / "data")
    requests = tmp_path / "requests.jsonl"
    cfg = config(
        data,
        tmp_path / "out",
        num_actors=1,
        num_gpus_per_actor=0,
        num_cpus_per_actor=0.5,
        record_requests=str(requests),
    )
    report = run_stag(cfg)
    sent = [k for line in requests.read_text().splitlines() for k in json.loads(line)["keys"]]
    assert sorted(sent) == sorted(TAIL)  # the template engine is valid at once: one attempt
    assert report["counts"]["generated"] == 5 and report["counts"]["not_described"] == 40
    assert report["quality"]["valid_first_try"] == 1.0
    assert report["run"]["num_actors"] == 1 and report["run"]["described"] == 5
    got = samples(tmp_path / "out")
    assert all(got[k].meta["stag"]["engine"] == "template" for k in got)
    assert got["r03"].meta["description"] and got["r00"].text == "a photo of a person"


def test_the_report_says_which_dtype_gives_byte_identical_reruns():
    from ltdist.stag.report import reproducibility

    assert reproducibility("float32")["byte_identical_reruns"] is True
    for dtype in ("auto", "bfloat16", "float16"):
        r = reproducibility(dtype)
        assert r["byte_identical_reruns"] is False and "float32" in r["note"]


@pytest.mark.both_envs
@pytest.mark.parametrize("version", ["stag-v1", "paper-v1"])
def test_prompt_version_used_is_recorded_and_texts_are_judged(tmp_path, monkeypatch, version):
    data = write_data(tmp_path / "data")
    engine = ScriptedEngine(SCRIPT)
    in_process_pool(monkeypatch, engine)
    # the paper's prompt asks for no tags: the validator then needs mentions only
    validation = ValidationConfig(min_words=5, max_words=40, require_tail_tags=version == "stag-v1")
    kw = dict(prompt=StagPromptConfig(version=version), validation=validation)
    report = run_stag(config(data, tmp_path / "out", **kw))
    # the engine got the version's prompts (the scripted engine has no tokenizer: the user turn)
    first_line = {"stag-v1": "Objects in the image:", "paper-v1": "Labels: person, kite"}
    assert engine.prompts["r03"].splitlines()[0] == first_line[version]
    got = samples(tmp_path / "out")
    assert {s.meta["stag"]["prompt_version"] for s in got.values()} == {version}
    assert report["prompt_version"] == version
    index = json.loads((tmp_path / "out" / "train.index.json").read_text())
    assert {s["meta"]["stag"]["prompt_version"] for s in index["shards"]} == {version}
    # every generated text carries its judgement; the report sums them
    space = load_records(config(data, tmp_path / "x").data)[0]
    generated = [s for s in got.values() if s.meta["stag"]["status"] == "generated"]
    assert len(generated) == report["counts"]["generated"] >= 3
    for s in generated:
        expected = judge_sample(s.text, s.label_ids, s.meta["caption"], space).to_dict()
        assert s.meta["stag"]["judge"] == expected
    assert all("judge" not in s.meta["stag"] for s in got.values() if s not in generated)
    section = report["judge"]
    assert section["texts"] == len(generated)
    scores = [s.meta["stag"]["judge"]["score"] for s in generated]
    assert section["score"]["mean"] == pytest.approx(sum(scores) / len(scores), abs=1e-4)
    assert sorted(w["score"] for w in section["worst"]) == sorted(scores)
    assert "grounded share mean" in quality_table(report)
    # a rerun into the same folder with the other version is refused
    other = "paper-v1" if version == "stag-v1" else "stag-v1"
    kw = dict(
        prompt=StagPromptConfig(version=other),
        validation=ValidationConfig(min_words=5, max_words=40, require_tail_tags=False),
    )
    with pytest.raises(StagError, match=f"written with prompt.version={version}; this run has"):
        run_stag(config(data, tmp_path / "out", **kw))


@pytest.mark.both_envs
def test_paper_prompt_without_grammar_cannot_require_tags(tmp_path):
    data = write_data(tmp_path / "data")
    cfg = config(data, tmp_path / "out", prompt=StagPromptConfig(version="paper-v1"))
    cfg.constrain.grammar = False
    with pytest.raises(ValueError, match="paper-v1 asks for no <tail> tags"):
        cfg.validate()
    cfg.constrain.grammar = True  # the grammar writes the tags
    cfg.validate()

"""The rehearsal's run: one shipped config of each (task x method x data set) pair trains at
reduced width with 2 processes, is SIGKILLed after a checkpoint and resumes, and its export
rebuilds the trained model exactly (evaluate and predict through the launchers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ltdist.rehearsal.run import MAX_STEPS, SCORE_TOLERANCE, rehearse_run, run_name, shrink

pytestmark = pytest.mark.slow

SHARED = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"

# pretraining first: the phase-2 runs of a data set start from its export
PAIRS = [
    "configs/pretrain/coco_lt.yaml",
    "configs/pretrain/voc_lt.yaml",
    "configs/pretrain/demo.yaml",
    "configs/finetune/coco_lt_dpvlpa.yaml",
    "configs/finetune/voc_lt_dpvlpa.yaml",
    "configs/finetune/demo_dpvlpa.yaml",
    "configs/finetune/coco_lt_cprfl_official.yaml",
    "configs/finetune/voc_lt_cprfl_official.yaml",
    "configs/finetune/demo_cprfl.yaml",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    if not (SHARED / "coco_lt" / "coco_lt_train.txt").is_file():
        pytest.fail(f"the benchmark split files are not under {SHARED}")
    return str(tmp_path_factory.mktemp("rehearsal"))


def check(result) -> None:
    assert result.ok, result.render()
    assert result.steps == MAX_STEPS
    assert result.killed_at is not None and result.resumed_from == result.killed_at
    assert result.killed_at < MAX_STEPS  # killed mid-run, not after it
    assert result.max_score_diff is not None and result.max_score_diff <= SCORE_TOLERANCE
    assert result.predicted == 3 and result.eval_samples > 0


@pytest.mark.parametrize("path", PAIRS)
def test_each_pair_rehearses(path, root):
    result = rehearse_run(path, root, str(SHARED), timeout_s=600)
    check(result)
    # the run read the stand-in shards of its data set, at the split files' names
    cfg = json.loads((Path(root) / run_name(path) / "run" / "export" / "config.json").read_text())
    assert cfg["data"]["location"].endswith(f"data_{cfg['data']['dataset']}/shards")


def test_the_cprfl_resnet101_path_with_a_gelu_clip_text_tower(root):
    # ViT-B-16/laion2b_s34b_b88k is a GELU tower (the OpenAI tags are QuickGELU): the export
    # must rebuild it with its own activation
    overrides = ["model.clip.model_name=ViT-B-16", "model.clip.pretrained=laion2b_s34b_b88k"]
    config = "configs/finetune/coco_lt_cprfl_official.yaml"
    result = rehearse_run(config, root, str(SHARED), overrides)
    assert {o.key: o.value for o in result.overrides}["model.clip.quick_gelu"] == "false"
    check(result)
    exported = json.loads(
        (Path(root) / run_name(config) / "run" / "export" / "config.json").read_text()
    )
    assert exported["model"]["clip"]["quick_gelu"] is False
    assert exported["model"]["backbone"]["kind"] == "resnet101"


def test_shrinking_changes_only_widths_and_the_schedule():
    from ltdist.config import load_config
    from ltdist.train.config import TrainConfig

    cfg = load_config(TrainConfig, "configs/pretrain/coco_lt.yaml")
    keys = {o.key for o in shrink(cfg)}
    # the method's settings stay the config's
    for kept in (
        "optim.lr",
        "optim.weight_decay",
        "optim.schedule",
        "model.qformer.num_queries",
        "model.dpvlpa.lambda1",
        "model.loss.kind",
        "seed",
        "loader.augment",
    ):
        assert kept not in keys
    quick_gelu = {o.key: o.value for o in shrink(cfg)}["model.clip.quick_gelu"]
    assert quick_gelu == "true"  # ViT-B-16/openai is a QuickGELU tower


def test_a_stag_rehearsal_overrides_only_the_engine_pool_and_inputs(tmp_path):
    # the STAG run itself (local Ray + vLLM, kill and resume, ~100 s) runs in `make rehearse`;
    # here: what it changes, and its stand-in inputs at the split files' names
    from ltdist.config import load_config
    from ltdist.rehearsal.stag_run import LIMIT, _standin_inputs, shrink_stag
    from ltdist.stag.pipeline import StagConfig

    cfg = load_config(StagConfig, "configs/stag/coco_lt.yaml")
    data = _standin_inputs(cfg, str(tmp_path), str(SHARED))
    overrides = {o.key: o.value for o in shrink_stag(cfg, str(tmp_path / "out"), data)}
    assert overrides["limit"] == str(LIMIT) and overrides["engine.model"].endswith(
        "SmolLM2-135M-Instruct"
    )
    for kept in (
        "prompt.min_words",
        "validation.max_words",
        "constrain.grammar",
        "max_attempts",
        "fallback",
        "describe",
        "engine.max_tokens",
        "engine.temperature",
    ):
        assert kept not in overrides
    images = sorted(Path(overrides["data.image_root"]).rglob("*.jpg"))
    assert len(images) == LIMIT + 8 and all(p.stat().st_size > 0 for p in images)
    assert any("train2017" in str(p) for p in images) and any("val2017" in str(p) for p in images)


def test_a_stag_rehearsal_of_a_given_label_space_loads_with_its_standins(tmp_path):
    """The corpus's STAG config keeps a given classes.json (`space_from: classes`): its
    stand-ins provide one, and the shrunk config loads; it is the demo set's label space."""
    from ltdist.config import load_config
    from ltdist.labels import LabelSpace
    from ltdist.rehearsal.stag_run import _standin_inputs, shrink_stag
    from ltdist.stag.pipeline import StagConfig

    path = "configs/stag/coco_lt_corpus.yaml"
    cfg = load_config(StagConfig, path)
    assert cfg.data.space_from == "classes"
    data = _standin_inputs(cfg, str(tmp_path), str(SHARED))
    overrides = [f"{o.key}={o.value}" for o in shrink_stag(cfg, str(tmp_path / "out"), data)]
    shrunk = load_config(StagConfig, path, overrides)
    space = LabelSpace.load(shrunk.data.classes)
    names = (tmp_path / "demo" / "classes.txt").read_text().splitlines()
    assert shrunk.data.classes.endswith("classes.json") and space.names == names
    assert sum(space.frequency) > 0

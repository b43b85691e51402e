"""The loss kinds of ``ltdist.losses.multilabel.build_loss`` and the cprfl task's linear head
(the ERM baseline), from unit checks to a 2-process run whose export is evaluated and labels
images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ltdist.config import load_config
from ltdist.data.shards import load_index, load_label_space, read_shard
from ltdist.labels import LabelSpace
from ltdist.losses.multilabel import (
    DB_OFFICIAL_SETTINGS,
    AsymmetricLoss,
    BCELoss,
    ClassBalancedFocalLoss,
    DistributionBalancedLoss,
    LossConfig,
    MultiLabelSoftMarginLoss,
    build_loss,
)
from ltdist.models.backbones import ResNetTokens
from ltdist.models.clip import ImageTower
from ltdist.models.cprfl import CPRFLHead
from ltdist.models.heads import LinearHead
from ltdist.train import tasks
from ltdist.train.config import ModelConfig, TrainConfig
from ltdist.train.export import load_export
from ltdist.train.tasks import build_task

from .conftest import TINY, launch, metrics


def _space(num_classes: int = 6, num_images: int = 80, seed: int = 0) -> LabelSpace:
    """Random multi-label training sets; every class has positives, some images none."""
    rng = np.random.default_rng(seed)
    sets = [list(range(num_classes))]  # every class seen at least once
    rates = np.geomspace(0.5, 0.03, num_classes)  # long-tailed
    sets += [np.flatnonzero(rng.random(num_classes) < rates).tolist() for _ in range(num_images)]
    return LabelSpace.from_label_sets([f"class{i}" for i in range(num_classes)], sets)


def _batch(space: LabelSpace, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(16, space.num_classes, generator=gen)
    targets = (torch.rand(16, space.num_classes, generator=gen) < 0.3).float()
    targets[0] = 0  # an image without positives
    return logits, targets


@pytest.mark.parametrize("settings", ["default", "coco-lt", "voc-lt"])
def test_dbfocal_is_the_distribution_balanced_focal_loss_of_the_label_space(settings):
    space = _space()
    loss = build_loss(LossConfig(kind="dbfocal", db_settings=settings), space)
    ref = DistributionBalancedLoss(
        space.frequency,
        space.num_train_images,
        focal=True,
        **DB_OFFICIAL_SETTINGS.get(settings, {}),
    )
    assert isinstance(loss, DistributionBalancedLoss) and loss.focal
    assert loss.num_train_images == space.num_train_images == 81
    logits, targets = _batch(space)
    torch.testing.assert_close(loss(logits, targets), ref(logits, targets), rtol=0, atol=0)
    el, el_ref = loss.element_loss(logits, targets), ref.element_loss(logits, targets)
    torch.testing.assert_close(el, el_ref, rtol=0, atol=0)
    if settings != "default":  # the preset reaches the loss
        assert (loss.lam, loss.mu, loss.kappa) == tuple(
            DB_OFFICIAL_SETTINGS[settings][k] for k in ("lam", "mu", "kappa")
        )


def test_db_is_the_distribution_balanced_loss_without_the_focal_factor():
    space = _space()
    loss = build_loss(LossConfig(kind="db", db_settings="coco-lt"), space)
    assert isinstance(loss, DistributionBalancedLoss) and not loss.focal
    ref = DistributionBalancedLoss(
        space.frequency, space.num_train_images, focal=False, **DB_OFFICIAL_SETTINGS["coco-lt"]
    )
    logits, targets = _batch(space)
    torch.testing.assert_close(loss(logits, targets), ref(logits, targets), rtol=0, atol=0)
    assert isinstance(build_loss(LossConfig(kind="mls"), space), MultiLabelSoftMarginLoss)


def test_the_other_loss_kinds():
    space = _space()
    logits, targets = _batch(space)
    cb = build_loss(LossConfig(kind="cbfocal", cb_beta=0.99, gamma=1.5), space)
    ref = ClassBalancedFocalLoss(space.frequency, beta=0.99, gamma=1.5)
    torch.testing.assert_close(cb(logits, targets), ref(logits, targets), rtol=0, atol=0)
    assert isinstance(build_loss(LossConfig(kind="bce"), space), BCELoss)
    assert isinstance(build_loss(LossConfig(), space), AsymmetricLoss)  # the default


def test_dbfocal_without_the_number_of_training_images_is_a_clear_error():
    space = _space()
    unknown = LabelSpace(space.names, space.frequency, space.cooccurrence)  # num_train_images 0
    with pytest.raises(ValueError, match="num_train_images is 0"):
        build_loss(LossConfig(kind="dbfocal"), unknown)


def _tiny_model(*overrides: str) -> ModelConfig:
    return load_config(TrainConfig, TINY, ["task=cprfl", *overrides]).model


def test_a_linear_head_on_resnet101_builds_no_clip_tower(monkeypatch):
    """Not even with prompt_init=clip (the default, which the CPRFL head would need the text
    tower for): a linear head ignores the prompt settings."""

    def no_clip(*args, **kwargs):
        raise AssertionError("a linear head on ResNet-101 needs no CLIP tower")

    monkeypatch.setattr(tasks, "build_towers", no_clip)
    monkeypatch.setattr(tasks.ImageTower, "from_config", no_clip)
    cfg = _tiny_model(
        "model.head=linear",
        "model.backbone.kind=resnet101",
        "model.cprfl.prompt_init=clip",
    )
    space = _space()
    task = build_task("cprfl", cfg, space, load_weights=False)
    assert task.text_tower is None and isinstance(task.head, LinearHead)
    assert task.head.fc.in_features == task.backbone.token_dim == 2048  # proj_dim 0
    assert not any(k.startswith("text_tower.") for k in task.state_dict())
    images = torch.randn(2, 3, 32, 32)
    task.eval()
    with torch.no_grad():
        assert task.logits(images).shape == (2, space.num_classes)
        with pytest.raises(ValueError, match="linear head knows only its training classes"):
            task.logits_for(images, ["zebra"])


def _rn50_prompts_on_resnet(*overrides: str) -> ModelConfig:
    """The shipped CPRFL configs' model: prompts from CLIP RN50's text tower, ResNet-101 tokens
    (here a tiny ResNet through the same code)."""
    return _tiny_model(
        "model.head=cprfl",
        "model.cprfl.prompt_init=clip",
        "model.clip.model_name=RN50",
        "model.backbone.kind=resnet101",
        "model.backbone.tiny=true",
        *overrides,
    )


@pytest.mark.parametrize("freeze_text", [True, False])
def test_cprfl_prompts_on_resnet101_build_the_text_tower_alone(monkeypatch, freeze_text):
    """An RN50 CLIP has no ViT image tower, and ResNet-101 tokens need none: only the text
    tower is built; a trainable one gets gradient through the prompts."""

    def no_image_tower(*args, **kwargs):
        raise AssertionError("prompts on ResNet-101 tokens need no CLIP image tower")

    monkeypatch.setattr(ImageTower, "__init__", no_image_tower)
    cfg = _rn50_prompts_on_resnet(f"model.clip.freeze_text={str(freeze_text).lower()}")
    space = _space()
    task = build_task("cprfl", cfg, space)
    assert isinstance(task.backbone.source, ResNetTokens) and isinstance(task.head, CPRFLHead)
    assert not any("visual" in k for k in task.state_dict())
    assert task.text_tower.frozen is freeze_text
    labels = torch.zeros(2, space.num_classes)
    labels[:, 0] = 1
    images = torch.randn(2, 3, 64, 64)
    task.train()
    assert task.logits(images).shape == (2, space.num_classes)
    out = task({"image": images, "labels": labels})
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert task.head.prompt_init.fc1.weight.grad.abs().sum() > 0
    assert task.backbone.source.body[0].weight.grad.abs().sum() > 0
    text = list(task.text_tower.parameters())
    if freeze_text:
        assert not any(p.requires_grad or p.grad is not None for p in text)
    else:
        assert all(p.grad is not None for p in text)
        assert task.text_tower.token_embedding.weight.grad.abs().sum() > 0
        assert task.text_tower.text_projection.grad.abs().sum() > 0


@pytest.mark.slow
def test_cprfl_prompts_from_a_random_rn50_text_tower():
    """open_clip's RN50 itself (random weights): 1024-d prompts, QuickGELU as the 'openai'
    tag's architecture has it."""
    from open_clip.transformer import QuickGELU

    space = _space()
    task = build_task("cprfl", _rn50_prompts_on_resnet("model.clip.tiny=false"), space)
    assert task.text_tower.embed_dim == 1024
    assert task.head.class_embeddings.shape == (space.num_classes, 1024)
    assert any(isinstance(m, QuickGELU) for m in task.text_tower.modules())
    assert not any("visual" in k for k in task.state_dict())
    task.eval()
    with torch.no_grad():
        logits = task.logits(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, space.num_classes) and torch.isfinite(logits).all()


def test_a_linear_head_on_clip_tokens_takes_the_image_tower_alone(demo):
    space = load_label_space(str(demo))
    cfg = _tiny_model(
        "model.head=linear",
        "model.linear_pool=cls",
        "model.backbone.kind=clip",
        "model.loss.kind=dbfocal",
    )
    task = build_task("cprfl", cfg, space)
    assert task.text_tower is None and task.head.pool == "cls"
    assert not any(k.startswith("text_tower.") for k in task.state_dict())
    assert isinstance(task.loss, DistributionBalancedLoss)  # from the demo's classes.json
    assert task.loss.num_train_images == space.num_train_images > 0
    trainable = [n for n, p in task.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["head.fc.bias", "head.fc.weight"]  # frozen tower, no proj
    labels = torch.zeros(4, space.num_classes)
    labels[:, 0] = 1
    out = task({"image": torch.randn(4, 3, 32, 32), "labels": labels})
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and task.head.fc.weight.grad.abs().sum() > 0


def test_head_options_are_checked():
    with pytest.raises(ValueError, match="head of task=cprfl"):
        load_config(
            TrainConfig, overrides=["task=dpvlpa", "model.head=linear", "data.location=x"]
        ).validate()
    with pytest.raises(ValueError, match="linear_pool=cls"):
        load_config(
            TrainConfig,
            overrides=[
                "task=cprfl",
                "model.head=linear",
                "model.linear_pool=cls",
                "data.location=x",
            ],
        ).validate()


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory, demo) -> Path:
    """The ERM baseline: random ResNet-101 + linear head + BCE, 4 steps on 2 processes."""
    out = tmp_path_factory.mktemp("linear") / "run"
    overrides = [
        "task=cprfl",
        f"output_dir={out}",
        "model.head=linear",
        "model.loss.kind=bce",
        "model.backbone.kind=resnet101",
        "model.backbone.pretrained=false",
        "max_steps=4",
    ]
    launch("finetune.py", overrides, demo)
    return out


@pytest.mark.slow
def test_the_linear_baseline_trains_and_exports(linear_run):
    m = metrics(linear_run)
    assert (m["status"], m["steps"], m["world_size"]) == ("completed", 4, 2)
    losses = [h["loss"] for h in m["history"] if "loss" in h]
    assert len(losses) == 4 and losses[-1] < losses[0]  # the bias alone learns the label rate
    exported = load_export(str(linear_run / "export"))
    assert isinstance(exported.module.head, LinearHead)
    assert exported.module.text_tower is None
    assert exported.config.model.head == "linear"


@pytest.mark.slow
def test_the_linear_baselines_export_evaluates_to_the_runs_final_map(linear_run, demo, tmp_path):
    """The loop's final mAP is the export's: on 2 processes each rank held its own BatchNorm
    statistics until the loop broadcast rank 0's before evaluating."""
    from ltdist.train.inference import evaluate_export

    m = metrics(linear_run)
    export = str(linear_run / "export")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 CI cores: more threads make the ResNet 5x slower here
    try:
        result = evaluate_export(export, str(demo), "test", str(tmp_path / "eval"), batch_size=32)
    finally:
        torch.set_num_threads(threads)
    for group, value in m["map"].items():
        assert result["map"][group] == pytest.approx(value, abs=1e-6), group


@pytest.mark.slow
def test_the_linear_baselines_export_labels_its_own_classes_only(linear_run, demo, tmp_path):
    from ltdist.train.inference import predict_images

    export = str(linear_run / "export")
    info = load_index(str(demo), "test").ordered()[0]
    for i, sample in zip(range(2), read_shard(str(demo / info.name))):
        (tmp_path / f"img{i}.png").write_bytes(sample.image)
    run = predict_images(export, [str(tmp_path)])
    assert len(run.predictions) == 2 and not run.failed
    assert list(run.predictions[0].scores) == load_label_space(str(demo)).display_names
    with pytest.raises(ValueError, match="linear head knows only its training classes"):
        predict_images(export, [str(tmp_path)], class_names=["zebra"])


def test_cprfl_ablation_settings_reach_the_head(tmp_path):
    """A user's 300-d GloVe file as the embeddings, used directly as the prompts (prompt_net
    none, tokens projected to 300), with one path of Eq. 6 blocked."""
    space = _space()
    rng = np.random.default_rng(0)
    vectors = {name: rng.normal(size=300).round(4) for name in space.display_names}
    glove = tmp_path / "glove.300d.txt"
    glove.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in vectors.items()))
    cfg = _tiny_model(
        "model.backbone.kind=resnet101",
        "model.backbone.tiny=true",
        "model.backbone.proj_dim=300",
        "model.cprfl.prompt_init=glove",
        f"model.cprfl.glove_source={glove}",
        "model.cprfl.prompt_net=none",
        "model.cprfl.detach_prompts=vsi",
    )
    task = build_task("cprfl", cfg, space, load_weights=False)
    assert task.text_tower is None and task.head.config.detach_prompts == "vsi"
    expected = torch.tensor(np.stack([vectors[n] for n in space.display_names]))
    torch.testing.assert_close(task.head.prompts(), expected.float())  # the vectors themselves
    task.eval()
    with torch.no_grad():
        assert task.logits(torch.randn(2, 3, 64, 64)).shape == (2, space.num_classes)


def test_class_prompts_are_cut_after_the_longest_with_the_same_embeddings():
    """Adaptation encodes every class prompt each step: the prompts drop the padding columns
    no prompt uses, and the class embeddings (float64) are those of the full-width prompts."""
    cfg = load_config(TrainConfig, TINY, ["task=dpvlpa"]).model
    space = LabelSpace.from_label_sets(
        ["cat", "traffic_light", "potted plant with a long name"], [[0], [1], [2], [0, 2]]
    )
    task = build_task("dpvlpa", cfg, space, load_weights=False).double().eval()
    full = task.tokenizer(tasks.class_prompts(space.display_names, task.template))
    assert full["input_ids"].shape[1] == cfg.max_text_tokens
    longest = int(full["attention_mask"].sum(1).max())
    assert task.class_ids.shape == (3, longest) and longest < cfg.max_text_tokens
    assert torch.equal(task.class_ids, full["input_ids"][:, :longest])
    with torch.no_grad():
        cut = task.class_embeddings()
        padded = task.model.encode_classes(full["input_ids"], full["attention_mask"])
        assert torch.allclose(cut, padded, rtol=0, atol=1e-12)
        images = torch.randn(2, 3, cfg.clip.image_size, cfg.clip.image_size, dtype=torch.float64)
        assert torch.allclose(
            task.logits_for(images, space.display_names),
            task.model(images, padded),
            rtol=0,
            atol=1e-10,
        )

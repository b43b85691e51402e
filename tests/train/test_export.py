"""ltdist.train.export: an export rebuilds exactly the model it was written from, without the
pretrained weights it started from (``load_export``, the path of evaluate and predict)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from open_clip.transformer import QuickGELU
from torch import nn

from ltdist.config import load_config
from ltdist.labels import LabelSpace
from ltdist.train.config import TrainConfig
from ltdist.train.export import load_export, save_export
from ltdist.train.tasks import build_task

from .conftest import TINY


def _space() -> LabelSpace:
    return LabelSpace.from_label_sets(["cat", "dog", "traffic_light"], [[0], [1, 2], [0, 2], [1]])


def _config(*overrides: str) -> TrainConfig:
    """CPRFL prompts from the CLIP text tower on CLIP image tokens: both towers' activations
    reach the logits."""
    return load_config(TrainConfig, TINY, ["task=cprfl", "model.backbone.kind=clip", *overrides])


def _activations(task: nn.Module) -> set[type]:
    """The activation classes in the CLIP towers (the CPRFL head has GELUs of its own)."""
    towers = [t for t in (task.backbone.source, task.text_tower) if t is not None]
    return {type(m) for t in towers for m in t.modules() if isinstance(m, (nn.GELU, QuickGELU))}


def _export(task: nn.Module, cfg: TrainConfig, folder: Path) -> Path:
    save_export(str(folder), task.state_dict(), _space(), cfg, {"step": 1})
    return folder


@pytest.mark.parametrize("quick_gelu", [False, True, None])
def test_a_tiny_export_rebuilds_the_same_model_and_records_its_activation(tmp_path, quick_gelu):
    cfg = _config(f"model.clip.quick_gelu={json.dumps(quick_gelu)}")
    torch.manual_seed(0)
    task = build_task(cfg.task, cfg.model, _space()).eval()
    built = QuickGELU if quick_gelu else nn.GELU  # tiny towers: unset is GELU
    assert _activations(task) == {built}
    exported = load_export(str(_export(task, cfg, tmp_path)))
    assert _activations(exported.module) == {built}
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(exported.module.logits(images), task.logits(images))
    recorded = json.loads((tmp_path / "config.json").read_text())["model"]
    assert recorded["clip"]["quick_gelu"] is bool(quick_gelu)  # explicit, never null
    assert recorded["backbone"]["clip"]["quick_gelu"] is True  # its default ViT-B-16 'openai'
    assert exported.config.model.clip.pretrained == cfg.model.clip.pretrained


@pytest.fixture(scope="module")
def gelu_export(tmp_path_factory) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A linear head on CLIP ViT-B-32 tokens trained from a GELU tag: the tag's weights cannot
    be downloaded here, so open_clip gets no weights and builds the tag's architecture."""
    import open_clip

    cfg = _config(
        "model.head=linear",
        "model.clip.tiny=false",
        "model.clip.model_name=ViT-B-32",
        "model.clip.pretrained=laion2b_s34b_b79k",
        "model.clip.image_size=64",
        "loader.image_size=64",
    )
    create_model = open_clip.create_model

    def offline(name: str, pretrained: str | None = None, **kwargs):
        return create_model(name, pretrained=None, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(open_clip, "create_model", offline)
        torch.manual_seed(0)
        task = build_task(cfg.task, cfg.model, _space()).eval()
    assert _activations(task) == {nn.GELU}
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = task.logits(images)
    return _export(task, cfg, tmp_path_factory.mktemp("gelu") / "export"), images, logits


@pytest.mark.slow
@pytest.mark.parametrize("written", ["now", "before quick_gelu was recorded"])
def test_an_export_from_a_gelu_tag_rebuilds_with_gelu(gelu_export, written, tmp_path):
    """Rebuilt with random weights under the export's own, the model keeps the tag's GELU: from
    the recorded flag, or (older exports, quick_gelu null) from the recorded tag, never from
    the 'openai' architecture that a random init otherwise follows."""
    folder, images, logits = gelu_export
    if written != "now":
        folder = Path(shutil.copytree(folder, tmp_path / "old"))
        config = json.loads((folder / "config.json").read_text())
        config["model"]["clip"]["quick_gelu"] = None
        (folder / "config.json").write_text(json.dumps(config))
    exported = load_export(str(folder))
    assert exported.config.model.clip.pretrained == "laion2b_s34b_b79k"
    assert _activations(exported.module) == {nn.GELU}
    with torch.no_grad():
        assert torch.equal(exported.module.logits(images), logits)


@pytest.mark.parametrize("written_before_dqr_scores", [False, True])
def test_a_dpvlpa_export_scores_as_it_was_trained(tmp_path, written_before_dqr_scores):
    """Phase-2 class scores (Eq. 4 with the label-free DQR weights) come back from an export; one
    written before they existed keeps the max over queries it was trained with."""
    cfg = load_config(TrainConfig, TINY, ["task=dpvlpa"])
    torch.manual_seed(0)
    task = build_task(cfg.task, cfg.model, _space()).eval()
    folder = _export(task, cfg, tmp_path)
    if written_before_dqr_scores:
        recorded = json.loads((folder / "config.json").read_text())
        del recorded["model"]["dpvlpa"]["dqr_class_scores"]
        (folder / "config.json").write_text(json.dumps(recorded))
    exported = load_export(str(folder))
    assert exported.config.model.dpvlpa.dqr_class_scores is not written_before_dqr_scores
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if written_before_dqr_scores:
            task.model.config.dqr_class_scores = False
        assert torch.equal(exported.module.logits(images), task.logits(images))
        queries = task.model.encode_image(images)
        sim = task.model.query_class_similarity(queries, task.class_embeddings())  # (2, K, C)
        scores = task.model.cls_scale() * (
            sim.amax(dim=1)
            if written_before_dqr_scores
            else (task.model.class_weights(sim) * sim).sum(1) / task.model.class_weights(sim).sum(1)
        )
        assert torch.allclose(exported.module.logits(images), scores, atol=1e-5)

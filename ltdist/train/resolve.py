"""The config that runs, resolved once before the loop starts.

Two things change a config between the YAML and the run: the world size it runs at (the plan
rescales batch, steps and learning rate from the config's stated cluster shape, see
:mod:`ltdist.train.plan`), and ``model.init_from`` (the CLIP tower, Q-Former, tokenizer and
embedding settings come from the export it starts from, so its weights fit). Both are applied
here, every field that differs from what the YAML said is listed with the reason, and the loop,
``--print-config``, the checkpoints and the export all see this one config.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, replace
from typing import Any

from ltdist.data.loader import ClipPreprocess, LoaderConfig
from ltdist.data.shards import load_index
from ltdist.models.clip import clip_preprocess
from ltdist.train.config import ModelConfig, TrainConfig
from ltdist.train.export import read_export_config
from ltdist.train.plan import TrainingPlan, plan_training


@dataclass
class ResolvedConfig:
    config: TrainConfig
    plan: TrainingPlan
    changes: list[str]  # each field that differs from the YAML's, with why


def launch_world_size() -> int:
    """The world size of the launch this process belongs to (``accelerate launch`` and
    ``torchrun`` set WORLD_SIZE; a plain ``python`` run is 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def resolve_config(cfg: TrainConfig, world_size: int) -> ResolvedConfig:
    """``cfg`` as it runs at ``world_size`` (the shard index gives the training set's size)."""
    num_train = load_index(cfg.data.location, cfg.data.train_split).num_samples
    rescaled, plan = plan_training(cfg, num_train, world_size)
    shape = f"{cfg.cluster.nodes} x {cfg.cluster.gpus_per_node}"
    changes = [f"rescaled from {shape} to {world_size} processes: {c}" for c in plan.changes]
    model = init_model_config(rescaled.model)
    source = f"from the export {cfg.model.init_from}"
    changes += [
        f"{key}: {old!r} -> {new!r} ({source})"
        for key, old, new in _differences("model", rescaled.model, model)
    ]
    resolved = replace(rescaled, model=model)
    loader, why = image_preprocess(resolved)
    changes += [
        f"{key}: {old!r} -> {new!r} ({why})"
        for key, old, new in _differences("loader", resolved.loader, loader)
    ]
    return ResolvedConfig(replace(resolved, loader=loader), plan, changes)


def image_preprocess(cfg: TrainConfig) -> tuple[LoaderConfig, str]:
    """``cfg.loader`` with the "clip" preset's mean/std, interpolation and resize mode filled in
    where the config leaves them empty: the image tower's own (open_clip's preprocess config
    for its model and tag; with ``init_from``, what the export recorded, since an export's
    tower has no tag), so that the export records what the run used. Also: why."""
    loader = cfg.loader
    if loader.transform != "clip":
        return loader, ""
    m = cfg.model
    if cfg.task == "cprfl" and m.backbone.kind == "resnet101":
        return loader, ""  # not an open_clip tower: the preset's defaults, as before
    if cfg.task == "cprfl" and m.backbone.kind == "clip":
        tower, why = m.backbone.clip, "model.backbone.clip"
    elif m.init_from:
        src = read_export_config(m.init_from).loader
        tower = None
        prep = src.clip_preprocess() if src.transform == "clip" else ClipPreprocess()
        why = f"as the export {m.init_from} preprocessed"
    else:
        tower, why = m.clip, "model.clip"
    if tower is not None:
        prep = clip_preprocess(tower)
        if tower.tiny or not tower.pretrained:
            why = f"{why} has random weights: open_clip's defaults, OpenAI CLIP's"
        else:
            why = f"open_clip's preprocessing for {why} {tower.model_name} / {tower.pretrained!r}"
    filled = {
        "mean": loader.mean or prep.mean,
        "std": loader.std or prep.std,
        "interpolation": loader.interpolation or prep.interpolation,
        "resize_mode": loader.resize_mode or prep.resize_mode,
    }
    return replace(loader, **filled), why


def init_model_config(m: ModelConfig) -> ModelConfig:
    """With ``init_from``, the settings the export's weights were made with: the CLIP tower,
    the Q-Former (no BERT init: its weights come from the export), the text tokenizer and
    length, and the embedding width and text pooling of DP-VLPA."""
    if not m.init_from:
        return m
    src = read_export_config(m.init_from).model
    return replace(
        m,
        clip=src.clip,
        qformer=replace(src.qformer, bert_init=""),
        text_tokenizer=src.text_tokenizer,
        max_text_tokens=src.max_text_tokens,
        dpvlpa=replace(m.dpvlpa, embed_dim=src.dpvlpa.embed_dim, text_pool=src.dpvlpa.text_pool),
    )


def _differences(prefix: str, a: Any, b: Any) -> list[tuple[str, Any, Any]]:
    """(dotted key, a's value, b's value) for each leaf field where two configs differ."""
    if dataclasses.is_dataclass(a) and dataclasses.is_dataclass(b):
        out = []
        for f in dataclasses.fields(a):
            out += _differences(f"{prefix}.{f.name}", getattr(a, f.name), getattr(b, f.name))
        return out
    return [] if a == b else [(prefix, a, b)]

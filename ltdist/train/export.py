"""The hand-off format: one safetensors file + ``classes.json`` + the config, never a pickle.

``<dir>/model.safetensors``  the task module's weights (EMA weights when EMA was on)
``<dir>/classes.json``       the label space the model predicts
``<dir>/config.json``        the whole training config (rebuilds the module without downloads;
                             what a pretrained tag implied, such as CLIP's activation, is
                             recorded explicitly, since the rebuild has no weights to follow)
``<dir>/export.json``        task, step, which weights, decision thresholds, headline metrics

Fine-tuning (``model.init_from``), ``evaluate`` and ``predict`` read this; resume reads the
checkpoint folders instead (:mod:`ltdist.train.checkpoint`).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ltdist import storage
from ltdist.config import from_dict, to_dict
from ltdist.entry import InputError, MissingInputError
from ltdist.eval.report import SELECTION_TEXT
from ltdist.labels import LabelSpace
from ltdist.models.clip import resolved_clip_config
from ltdist.train.config import ModelConfig, TrainConfig

FORMAT_VERSION = 1
WEIGHTS, CLASSES, CONFIG, META = "model.safetensors", "classes.json", "config.json", "export.json"


@dataclass
class Exported:
    module: nn.Module
    label_space: LabelSpace
    config: TrainConfig
    meta: dict = field(default_factory=dict)

    @property
    def thresholds(self) -> list[float]:
        """Per-class decision thresholds (validation-F1 ones when chosen, else the global one)."""
        chosen = self.meta.get("thresholds")
        if chosen:
            return [float(t) for t in chosen]
        return [float(self.meta.get("global_threshold", 0.5))] * self.label_space.num_classes

    @property
    def checkpoint_selection(self) -> str:
        """Which weights the run exported ("last", "val" or "test"), as its loop recorded;
        exports older than the record hold the last weights (the loop never selected)."""
        selection = self.meta.get("checkpoint_selection", "last")
        if selection not in SELECTION_TEXT:
            raise InputError(
                f"export.json: checkpoint_selection {selection!r} is not one of "
                f"{list(SELECTION_TEXT)}"
            )
        return selection


def save_export(
    location: str,
    state_dict: dict[str, torch.Tensor],
    label_space: LabelSpace,
    config: TrainConfig,
    meta: dict,
) -> None:
    """Write an export folder (local or object store); the weights file goes last-but-one and
    ``export.json`` last, so a folder with ``export.json`` is complete."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, WEIGHTS)
        save_file(tensors, path, metadata={"format": "pt", "task": config.task})
        storage.put_file_atomic(path, storage.join(location, WEIGHTS))
    storage.write_bytes_atomic(storage.join(location, CLASSES), label_space.to_json().encode())
    config = replace(config, model=_explicit(config.model))
    storage.write_bytes_atomic(
        storage.join(location, CONFIG), json.dumps(to_dict(config), indent=1).encode()
    )
    meta = {"format_version": FORMAT_VERSION, "task": config.task, **meta}
    storage.write_bytes_atomic(storage.join(location, META), json.dumps(meta, indent=1).encode())


def _explicit(model: ModelConfig) -> ModelConfig:
    """The model settings with CLIP's activation decided from the tags it was trained from."""
    backbone = model.backbone
    if backbone.kind == "clip":
        backbone = replace(backbone, clip=resolved_clip_config(backbone.clip))
    return replace(model, clip=resolved_clip_config(model.clip), backbone=backbone)


def read_export_config(location: str) -> TrainConfig:
    location = _folder(location)
    data = json.loads(storage.read_bytes(storage.join(location, CONFIG)))
    dpvlpa = data.get("model", {}).get("dpvlpa")
    if isinstance(dpvlpa, dict) and "dqr_class_scores" not in dpvlpa:
        dpvlpa["dqr_class_scores"] = False  # written before DQR at inference: max_k cos scores
    return from_dict(TrainConfig, data, where=storage.join(location, CONFIG))


def read_export_weights(location: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    location = _folder(location)
    return load(storage.read_bytes(storage.join(location, WEIGHTS)))


def load_export(location: str, device: str | torch.device = "cpu") -> Exported:
    """Rebuild the task module from an export (no pretrained downloads) with its weights."""
    from ltdist.train.tasks import build_task

    location = _folder(location)
    meta_path = storage.join(location, META)
    if not storage.exists(meta_path):
        raise MissingInputError(
            f"{location} is not a complete export (no {META}); exports are written by "
            "training runs under <output_dir>/export"
        )
    meta = json.loads(storage.read_bytes(meta_path))
    if meta.get("format_version") != FORMAT_VERSION:
        raise InputError(f"{location}: export format {meta.get('format_version')} unsupported")
    config = read_export_config(location)
    label_space = LabelSpace.from_json(storage.read_bytes(storage.join(location, CLASSES)).decode())
    module = build_task(config.task, config.model, label_space, load_weights=False)
    state = read_export_weights(location)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{location}: weights do not fit the {config.task} model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return Exported(module.to(device).eval(), label_space, config, meta)


def _folder(location: str) -> str:
    """An export folder, also when given its ``model.safetensors``."""
    return location.rsplit("/", 1)[0] if location.endswith(".safetensors") else location

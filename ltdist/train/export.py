"""The hand-off format: one safetensors file + ``classes.json`` + the config, never a pickle.

``<dir>/model.safetensors``  the task module's weights (EMA weights when EMA was on)
``<dir>/classes.json``       the label space the model predicts
``<dir>/config.json``        the whole training config (rebuilds the module without downloads;
                             what a pretrained tag implied, such as CLIP's activation, is
                             recorded explicitly, since the rebuild has no weights to follow)
``<dir>/export.json``        task, step, which weights, decision thresholds, headline metrics,
                             provenance (ltdist version, git commit, date)
``<dir>/tokenizer/``         the Q-Former's text tokenizer (``save_pretrained``), for the tasks
                             that tokenize class prompts (pretrain, dpvlpa): predict needs no
                             Hub download (CLIP's BPE vocabulary ships with open_clip, and a
                             CPRFL head's prompt embeddings are a buffer in the weights)
``<dir>/README.md``          the model card (:mod:`ltdist.train.hub`)

The folder is a Hugging Face Hub model repo as it stands (``ltdist export push``). Fine-tuning
(``model.init_from``), ``evaluate`` and ``predict`` read this, through :func:`load_export`, the
public loading API (a folder, an fsspec URL or ``hf://org/name[@revision]``); resume reads the
checkpoint folders instead (:mod:`ltdist.train.checkpoint`). Exports written before the
tokenizer folder and the card load as before (the tokenizer from ``model.text_tokenizer``).
"""

from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ltdist import storage
from ltdist.config import from_dict, resolve_path, to_dict
from ltdist.entry import InputError, MissingInputError
from ltdist.eval.report import SELECTION_TEXT
from ltdist.labels import LabelSpace
from ltdist.models.clip import resolved_clip_config
from ltdist.provenance import git_commit, package_versions
from ltdist.train.config import ModelConfig, TrainConfig
from ltdist.train.hub import CARD, TOKENIZER, is_hf, model_card, snapshot

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS, CLASSES, CONFIG, META = "model.safetensors", "classes.json", "config.json", "export.json"
TOKENIZING_TASKS = ("pretrain", "dpvlpa")  # class prompts through the Q-Former's tokenizer


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
    """Write an export folder (local or object store); ``export.json`` goes last, so a folder
    with ``export.json`` is complete."""
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
    if config.task in TOKENIZING_TASKS:
        _save_tokenizer(config.model.text_tokenizer, storage.join(location, TOKENIZER))
    meta = {"format_version": FORMAT_VERSION, "task": config.task, **meta}
    meta.setdefault("provenance", _provenance())
    storage.write_bytes_atomic(
        storage.join(location, CARD), model_card(config, label_space, meta).encode()
    )
    storage.write_bytes_atomic(storage.join(location, META), json.dumps(meta, indent=1).encode())


def _save_tokenizer(name_or_path: str, location: str) -> None:
    """The tokenizer the run used (a Hub id from the training node's cache, or a folder), as
    its files: ``tokenizer_config.json``, the vocabulary, ``tokenizer.json``. Never from the
    network (training loaded it already); one that is not here is left out with a warning."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_path(name_or_path), local_files_only=True)
    except OSError as e:
        log.warning(
            "export %s: no %s/ folder, the tokenizer %r cannot be loaded (%s); predicting "
            "from this export will need it",
            location.rsplit("/", 1)[0],
            TOKENIZER,
            name_or_path,
            e,
        )
        return
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        storage.upload_tree(tmp, location)


def _provenance() -> dict:
    return {
        "ltdist": package_versions({"ltdist": ["ltdist"]})["ltdist"],
        "git_commit": git_commit(),
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def write_card(location: str) -> None:
    """(Re)write an export's model card from its config, classes and ``export.json`` (an
    export written before cards gets one)."""
    location = _folder(location)
    meta = json.loads(storage.read_bytes(storage.join(location, META)))
    space = LabelSpace.from_json(storage.read_bytes(storage.join(location, CLASSES)).decode())
    card = model_card(read_export_config(location), space, meta)
    storage.write_bytes_atomic(storage.join(location, CARD), card.encode())


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
    """The public way to load a trained model: the task module rebuilt from the export's config
    (no pretrained downloads), its weights, label space, thresholds and metrics.

    ``location``: an export folder (or its ``model.safetensors``), an fsspec URL (``s3://``,
    ``gs://``, ...) or ``hf://org/name[@revision]`` (a Hub model repo, through the Hub's cache:
    offline with ``HF_HUB_OFFLINE=1`` once downloaded). ``Exported.module.logits(images)``
    scores the export's classes and ``logits_for(images, names)`` any names where the model has
    a text side; :func:`ltdist.train.inference.predict_images` adds preprocessing and
    thresholds.
    """
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
    model = config.model
    tokenizer = _tokenizer_folder(location)
    if tokenizer:  # the export's own files, not the Hub id it was trained with
        model = replace(model, text_tokenizer=tokenizer)
    try:
        module = build_task(config.task, model, label_space, load_weights=False)
    except OSError as e:  # transformers' "not found locally and the Hub is out of reach"
        if tokenizer or config.task not in TOKENIZING_TASKS:
            raise
        raise MissingInputError(
            f"{location} has no {TOKENIZER}/ folder (written before exports carried one) and "
            f"its training tokenizer {model.text_tokenizer!r} cannot be loaded here "
            f"({str(e).rstrip('.')}). "
            "Load it once where it can be, or copy its files into the export's tokenizer/"
        ) from None
    state = read_export_weights(location)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(
            f"{location}: weights do not fit the {config.task} model "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    return Exported(module.to(device).eval(), label_space, config, meta)


def _tokenizer_folder(location: str) -> str:
    """A local folder with the export's tokenizer files ("" for an export without them);
    an object store's are copied to a temporary folder removed at exit."""
    folder = storage.join(location, TOKENIZER)
    if storage.is_local(location):
        return storage.local_path(folder) if os.path.isdir(storage.local_path(folder)) else ""
    if not storage.listdir(folder):
        return ""
    local = tempfile.mkdtemp(prefix="ltdist-tokenizer-")
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    storage.download_tree(folder, local)
    return local


def _folder(location: str) -> str:
    """An export folder, also when given its ``model.safetensors``; ``hf://`` ones are local
    snapshots in the Hub cache."""
    if is_hf(location):
        return snapshot(location)
    return location.rsplit("/", 1)[0] if location.endswith(".safetensors") else location

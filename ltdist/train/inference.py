"""Evaluation of an export on a shard split, and prediction on image files.

``evaluate_export``: group mAP (all / head / medium / tail), per-class AP, plots, and F1 at
decision thresholds picked on a validation split (per class, maximising F1) or taken from the
export. ``predict_images``: per-class scores and labels for new images, for the export's own
classes (its thresholds) or for any class names through the text side (open vocabulary, one
global threshold: there is no validation data for names nobody trained on).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ltdist.data.loader import image_transform
from ltdist.entry import InputError
from ltdist.eval.metrics import Scoring
from ltdist.train.evaluation import evaluate_and_report, write_evaluation
from ltdist.train.export import load_export

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def evaluate_export(
    export: str,
    location: str,
    split: str,
    out: str,
    val_split: str = "",
    batch_size: int = 64,
    mixed_precision: str = "no",
    scoring: Scoring | None = None,
) -> dict:
    """Evaluate an export on ``location``/``split``; write the report under ``out``.

    ``scoring`` (AP on per-class sigmoid or LMPT's softmax over classes) defaults to the
    export's training config; the report states it and the export's checkpoint selection.
    Runs in one process or under ``accelerate launch`` (ranks split the batches).
    """
    from accelerate import Accelerator

    from ltdist.data.shards import load_label_space

    acc = Accelerator(mixed_precision=mixed_precision)
    exported = load_export(export, device=acc.device)
    module, space = exported.module, exported.label_space
    data_space = load_label_space(location)
    if data_space.names != space.names:
        raise InputError(
            f"{location} has other classes than the export ({data_space.num_classes} vs "
            f"{space.num_classes}; first difference: "
            f"{next((a, b) for a, b in zip(data_space.names, space.names) if a != b)})"
        )
    evaluation = evaluate_and_report(
        acc,
        module,
        space,
        location,
        split,
        out,
        f"{exported.config.task} export ({export}) on {location}/{split}",
        batch_size,
        exported.config.loader.image_size,
        val_split=val_split,
        thresholds=exported.thresholds,
        thresholds_from=exported.meta.get("threshold_split") or "",
        transform=exported.config.loader.transform,
        preprocess=exported.config.loader.clip_preprocess(),
        scoring=scoring or exported.config.eval.scoring,
        checkpoint_selection=exported.checkpoint_selection,
    )
    result = {}
    if acc.is_main_process:
        result = {"export": export, "data": location, "split": split, **evaluation}
        write_evaluation(out, result)
    acc.wait_for_everyone()
    return result


@dataclass
class Prediction:
    image: str
    scores: dict[str, float]
    labels: list[str]


@dataclass
class PredictionRun:
    classes: list[str]
    thresholds: list[float]
    predictions: list[Prediction] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def image_files(paths: Sequence[str]) -> Iterator[str]:
    """Files named directly, and image files found (recursively, sorted) under folders."""
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    yield str(f)
        else:
            yield str(path)


def predict_images(
    export: str,
    paths: Sequence[str],
    class_names: Sequence[str] = (),
    threshold: float | None = None,
    batch_size: int = 32,
) -> PredictionRun:
    """Score every image; an unreadable one is listed in ``failed`` with the reason."""
    from PIL import Image

    exported = load_export(export)
    module, space = exported.module, exported.label_space
    open_vocab = bool(class_names)
    names = list(class_names) if open_vocab else list(space.display_names)
    if threshold is not None:
        thresholds = [float(threshold)] * len(names)
    elif open_vocab:
        thresholds = [float(exported.meta.get("global_threshold", 0.5))] * len(names)
    else:
        thresholds = exported.thresholds
    loader_cfg = exported.config.loader
    transform = image_transform(  # the test form
        loader_cfg.transform, loader_cfg.image_size, preprocess=loader_cfg.clip_preprocess()
    )
    run = PredictionRun(names, thresholds)
    cut = np.asarray(thresholds)

    def flush(batch: list[tuple[str, torch.Tensor]]) -> None:
        x = transform.normalize(torch.stack([t for _, t in batch]))
        with torch.no_grad():
            logits = module.logits_for(x, names) if open_vocab else module.logits(x)
        probs = torch.sigmoid(logits.float()).numpy()
        for (path, _), row in zip(batch, probs):
            labels = [n for n, s, t in zip(names, row, cut) if s >= t]
            scores = {n: round(float(s), 6) for n, s in zip(names, row)}
            run.predictions.append(Prediction(path, scores, labels))

    batch: list[tuple[str, torch.Tensor]] = []
    for path in image_files(paths):
        try:
            with open(path, "rb") as f:
                img = Image.open(io.BytesIO(f.read()))
                img.load()
            batch.append((path, transform(img)))
        except Exception as e:  # a corrupt or missing file must not stop the others
            run.failed.append((path, f"{type(e).__name__}: {e}"))
            continue
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    return run

"""The one evaluation path, used by the training loop's final evaluation and by
``launchers/evaluate.py``: float32 logits of a split read by the one rank-aware reader
(:func:`ltdist.data.loader.eval_batches`), gathered in stored order; decision thresholds picked
on a validation split; group mAP, F1 and the report written once, on the main process.

AP ranks the scores of the configured scoring (``ltdist.eval.metrics.Scoring``: per-class
sigmoid, or LMPT's softmax over classes); F1 and thresholds always use the sigmoid
probabilities, the decision rule the export's thresholds and ``predict`` apply (a softmax
score depends on how many classes an image has, so no fixed cut-off suits it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from ltdist import storage
from ltdist.data.loader import ClipPreprocess, eval_batches
from ltdist.data.shards import load_index, split_coverage
from ltdist.data.token_cache import TokenManifest
from ltdist.eval import format_summary, write_report
from ltdist.eval.metrics import Scoring, class_scores, map_from_logits
from ltdist.eval.report import format_f1_summary
from ltdist.eval.thresholds import best_f1_thresholds, f1_report
from ltdist.train.accel import input_dtype


def evaluate_split(
    acc,
    module,
    location: str,
    split: str,
    batch_size: int,
    image_size: int,
    limit: int = 0,
    transform: str = "clip",
    preprocess: ClipPreprocess | None = None,
    caches: Mapping[str, tuple[str, TokenManifest]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C, float32) and targets (N, C) of a split, every sample once, in stored
    order, on every rank (each rank scores its batches, then all are gathered); images through
    the test form of the training run's preprocessing preset ``transform`` with its
    ``preprocess`` (``LoaderConfig.clip_preprocess()``), or, when ``caches`` holds the split
    (split -> (location, manifest) of its token cache, one deterministic view), its frozen
    source's cached tokens (``module.logits_from_tokens``). The heads compute
    their logits in float32 with autocast off (``CPRFLHead.score``, ``DPVLPA.class_logits``,
    ``LinearHead``), so bf16 rounding of the logits cannot tie or reorder samples; the
    ``.float()`` here only guards a head that does not."""
    rank, world = acc.process_index, acc.num_processes
    dtype = input_dtype(acc)
    mine: list[tuple[int, np.ndarray, np.ndarray]] = []
    was_training = module.training
    module.eval()
    cache = (caches or {}).get(split)
    batches = eval_batches(
        cache[0] if cache else location,
        split,
        batch_size,
        image_size,
        rank,
        world,
        limit,
        transform,
        preprocess,
        token_cache=cache[1] if cache else None,
    )
    with torch.no_grad(), acc.autocast():
        for batch in batches:
            if cache:
                logits = module.logits_from_tokens(batch.tokens.to(acc.device))
            else:
                x = batch.images.to(acc.device)
                logits = module.logits(x if dtype is None else x.to(dtype))
            logits = logits.float().cpu().numpy()
            if not batch.padded:
                mine.extend(zip(batch.index, logits, batch.targets.numpy()))
    module.train(was_training)
    from accelerate.utils import gather_object

    everything = gather_object([mine]) if world > 1 else [mine]
    rows = sorted((t for part in everything for t in part), key=lambda t: t[0])
    total = load_index(location, split).num_samples
    total = min(total, limit) if limit else total
    if [r[0] for r in rows] != list(range(total)):
        raise RuntimeError(f"evaluation gathered {len(rows)} of {total} samples of {split}")
    return np.stack([r[1] for r in rows]), np.stack([r[2] for r in rows])


def evaluate_and_report(
    acc,
    module,
    space,
    location: str,
    split: str,
    out_dir: str,
    title: str,
    batch_size: int,
    image_size: int,
    *,
    checkpoint_selection: str,
    val_split: str = "",
    thresholds: float | Sequence[float] = 0.5,
    thresholds_from: str = "",
    transform: str = "clip",
    preprocess: ClipPreprocess | None = None,
    scoring: Scoring = "sigmoid",
    caches: Mapping[str, tuple[str, TokenManifest]] | None = None,
) -> dict:
    """Score ``split`` (and ``val_split``, whose per-class F1-best thresholds then replace
    ``thresholds``), and on the main process write the report under ``out_dir`` and return
    the result: map (under ``scoring``), coverage, the tables, f1, thresholds and where they
    came from, and the protocol (``scoring``; ``checkpoint_selection``: which weights
    ``module`` holds, which only the caller knows, so it has no default). Images go through
    the test form of the preprocessing preset ``transform`` with ``preprocess``, or a split
    in ``caches`` from its token cache (``evaluate_split``). Other ranks take part in the
    scoring and return {}."""
    prep = {"transform": transform, "preprocess": preprocess, "caches": caches}
    logits, targets = evaluate_split(acc, module, location, split, batch_size, image_size, **prep)
    if val_split:
        vl, vt = evaluate_split(acc, module, location, val_split, batch_size, image_size, **prep)
        thresholds, _ = best_f1_thresholds(class_scores(vl, "sigmoid"), vt, fallback=0.5)
        thresholds_from = val_split
    if not acc.is_main_process:
        return {}
    maps = map_from_logits(logits, targets, space, scoring)
    f1 = f1_report(class_scores(logits, "sigmoid"), targets, thresholds, space)
    per_class = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (space.num_classes,))
    return {
        "scoring": scoring,
        "checkpoint_selection": checkpoint_selection,
        "map": maps.summary(),
        "coverage": split_coverage(location, split, len(logits)),
        "table": format_summary(maps, checkpoint_selection),
        "f1": {k: v for k, v in f1.items() if k != "classes"},
        "f1_table": format_f1_summary(f1),
        "thresholds_from": thresholds_from or "global 0.5",
        "thresholds": [float(t) for t in per_class],
        # Which split each number comes from: mAP and F1 are scored on `split`, with
        # thresholds picked on another (or fixed); groups from classes.json's training split.
        "splits": {"map": split, "f1": split, "thresholds": thresholds_from or "global 0.5"},
        "report": write_report(
            maps,
            space,
            out_dir,
            title=title,
            scores=class_scores(logits, scoring),
            checkpoint_selection=checkpoint_selection,
        ),
    }


def write_evaluation(out_dir: str, result: dict) -> None:
    storage.write_bytes_atomic(
        storage.join(out_dir, "evaluation.json"), json.dumps(result, indent=1).encode()
    )

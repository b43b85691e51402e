"""An export as a Hugging Face Hub model repo: its model card, ``hf://`` locations, and push.

The export folder is the repo as it stands (:mod:`ltdist.train.export`): nothing is converted
on the way up or down. ``README.md`` is the model card: Hub metadata in its YAML front matter
(``library_name``, ``pipeline_tag``, tags, data set, base model, and the group mAPs in the
``model-index`` form the Hub shows as results), then what the model is, how well it does per
group, how it was trained and where it came from. ``hf://org/name[@revision]`` is read through
the Hub's own cache (``snapshot_download``), so an offline node (``HF_HUB_OFFLINE=1``) loads
what an earlier download left there.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping

from ltdist import storage
from ltdist.entry import InputError, MissingInputError, UserError
from ltdist.labels import LabelSpace
from ltdist.train.config import TrainConfig

log = logging.getLogger(__name__)

HF_SCHEME = "hf://"
CARD = "README.md"
TOKENIZER = "tokenizer"  # the Q-Former's tokenizer files (save_pretrained), for offline nodes
GROUPS = ("all", "head", "medium", "tail")
DATASET_NAMES = {"coco_lt": "COCO-LT", "voc_lt": "VOC-LT", "demo": "ltdist demo set"}
TASK_TEXT = {
    "pretrain": "DP-VLPA phase 1: vision-language pretraining of a Q-Former on a frozen CLIP "
    "image tower (GCL + QCL on image-description pairs); class scores zero-shot through the "
    "Q-Former's text side",
    "dpvlpa": "DP-VLPA phase 2: adaptation with class prompts through the Q-Former's text side "
    "(classification + DQR-weighted GCL + COA)",
    "cprfl": "a CPRFL head (category-prompt refined features) on visual tokens",
}


def is_hf(location: str) -> bool:
    return location.startswith(HF_SCHEME)


def parse_hf(location: str) -> tuple[str, str | None]:
    """``hf://org/name[@revision]`` -> (repo id, revision or None)."""
    ref = location[len(HF_SCHEME) :].strip("/")
    repo_id, _, revision = ref.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")) or (_ and not revision):
        raise InputError(
            f"{location}: a Hub model is hf://ORG/NAME or hf://ORG/NAME@REVISION "
            "(a model repo; files inside it are not addressed)"
        )
    return repo_id, revision or None


def snapshot(location: str) -> str:
    """The local folder of an ``hf://`` export: downloaded into the Hub cache, or found there
    when offline (``HF_HUB_OFFLINE=1``)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = parse_hf(location)
    try:
        return snapshot_download(repo_id, revision=revision, repo_type="model")
    except LocalEntryNotFoundError as e:
        raise MissingInputError(
            f"{location}: not in the Hugging Face cache and the Hub cannot be reached ({e}); "
            "download it once where there is a network (same HF_HOME), or copy the export folder"
        ) from None
    except HfHubHTTPError as e:
        raise MissingInputError(f"{location}: the Hub refused it ({e})") from None


def _percent(value) -> str:
    return "–" if value is None else f"{100 * float(value):.2f}"


def _dataset(cfg: TrainConfig) -> tuple[str, str]:
    """(type, display name) of the training data."""
    kind = cfg.data.dataset or cfg.data.location.rstrip("/").rsplit("/", 1)[-1] or "unknown"
    return kind, DATASET_NAMES.get(kind, kind)


def _clip_used(cfg: TrainConfig) -> bool:
    m = cfg.model
    if cfg.task != "cprfl":
        return True
    if m.head == "linear":
        return m.backbone.kind in ("clip", "qformer")
    return m.backbone.kind in ("clip", "qformer") or m.cprfl.prompt_init == "clip"


def base_models(cfg: TrainConfig) -> list[str]:
    """Hub repos whose weights the model started from: the CLIP tag's (open_clip's table
    names it) and the Q-Former's BERT when it was a Hub id. Random or tiny towers have none."""
    found = []
    clip = cfg.model.clip
    if _clip_used(cfg) and not clip.tiny and clip.pretrained:
        try:
            import open_clip

            hub = (open_clip.get_pretrained_cfg(clip.model_name, clip.pretrained) or {}).get(
                "hf_hub", ""
            )
        except ImportError:
            hub = ""
        if hub:
            found.append(hub.strip("/"))
    bert = cfg.model.qformer.bert_init
    if cfg.task == "pretrain" and bert and not os.path.exists(bert) and ":" not in bert:
        found.append(bert)
    return found


def _settings(cfg: TrainConfig, meta: Mapping) -> list[tuple[str, str]]:
    m = cfg.model
    rows = [("task", cfg.task)]
    if _clip_used(cfg):
        tower = (
            f"tiny random CLIP (width {m.clip.tiny_width})"
            if m.clip.tiny
            else f"{m.clip.model_name} / {m.clip.pretrained or 'random init'}"
        )
        rows.append(("CLIP tower (open_clip)", tower))
    if cfg.task == "cprfl":
        prompts = f" (prompts: {m.cprfl.prompt_init})" if m.head == "cprfl" else ""
        rows.append(("head", m.head + prompts))
        rows.append(("visual tokens", m.backbone.kind))
        rows.append(("loss", m.loss.kind))
    else:
        q = m.qformer
        rows.append(
            ("Q-Former", f"{q.num_layers} layers, width {q.hidden_size}, {q.num_queries} queries")
        )
        rows.append(("text tokenizer", f"{m.text_tokenizer} (its files in {TOKENIZER}/)"))
        if cfg.task == "dpvlpa":
            rows.append(("loss", m.loss.kind))
    rows += [
        ("image size / preprocessing", f"{cfg.loader.image_size} px, {cfg.loader.transform}"),
        ("batch size per process", str(cfg.loader.batch_size)),
        (
            "optimizer",
            f"AdamW lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}, "
            f"{cfg.optim.schedule} schedule",
        ),
        ("steps trained", str(meta.get("steps_trained", meta.get("step", "?")))),
        ("epochs / max steps", f"{cfg.epochs} / {cfg.max_steps or 'by epochs'}"),
        ("mixed precision", cfg.mixed_precision),
        ("EMA", f"decay {cfg.ema_decay:g}" if cfg.ema_decay else "off"),
        (
            "weights exported",
            f"{meta.get('weights', 'raw')}, checkpoint selection "
            f"{meta.get('checkpoint_selection', 'last')}",
        ),
        (
            "decision thresholds",
            f"per class, picked on {meta['threshold_split']}"
            if meta.get("threshold_split")
            else f"global {meta.get('global_threshold', 0.5)}",
        ),
        ("seed", str(cfg.seed)),
    ]
    return rows


def model_card(cfg: TrainConfig, space: LabelSpace, meta: Mapping) -> str:
    """The export's ``README.md``: Hub metadata (YAML front matter) and a readable body."""
    from huggingface_hub import EvalResult, ModelCardData

    kind, data_name = _dataset(cfg)
    maps = meta.get("map") or {}
    split = cfg.data.eval_split or "test"
    name = f"ltdist-{cfg.task}-{kind}"
    task_name = "Multi-label image classification"
    results = [
        EvalResult(
            task_type="image-classification",
            task_name=task_name,
            dataset_type=kind,
            dataset_name=data_name,
            dataset_split=split,
            metric_type="mAP",
            metric_name=f"mAP ({group})",
            metric_value=round(100 * float(maps[group]), 2),
            metric_config=group,
        )
        for group in GROUPS
        if maps.get(group) is not None
    ]
    data = ModelCardData(
        library_name="ltdist",
        pipeline_tag="image-classification",
        tags=["multi-label-image-classification", "long-tailed-recognition", cfg.task],
        datasets=[kind] if cfg.data.dataset else None,
        metrics=["mAP"] if results else None,
        base_model=base_models(cfg) or None,
        license=meta.get("license") or None,
        model_name=name if results else None,
        eval_results=results or None,
    )
    provenance = meta.get("provenance") or {}
    counts = {g: sum(1 for x in space.groups if x == g) for g in GROUPS[1:]}
    lines = [
        f"# {name}",
        "",
        f"Multi-label image classification over {space.num_classes} classes of {data_name} "
        f"({counts['head']} head, {counts['medium']} medium, {counts['tail']} tail by training "
        "frequency: head >= 100 positives, medium 20-99, tail < 20), trained with ltdist as "
        f"{TASK_TEXT[cfg.task]}.",
        "",
        "## Results",
        "",
    ]
    if maps:
        scoring = meta.get("scoring", cfg.eval.scoring)
        lines += [
            f"mAP (%) on the {split} split of {data_name}, AP from {scoring} scores:",
            "",
            "| " + " | ".join(GROUPS) + " |",
            "|" + "---:|" * len(GROUPS),
            "| " + " | ".join(_percent(maps.get(g)) for g in GROUPS) + " |",
        ]
    else:
        lines.append("The run that wrote this export did not evaluate it (no `data.eval_split`).")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from ltdist.train.export import load_export  # the model, its classes and config",
        "from ltdist.train.inference import predict_images  # labels for image files",
        "",
        'exported = load_export("hf://ORG/NAME")  # or this folder, or an s3:// / gs:// URL',
        'run = predict_images("hf://ORG/NAME", ["photo.jpg"])  # run.predictions[0].labels',
        "```",
        "",
        "or `python launchers/predict.py --export hf://ORG/NAME photos/` (one JSON line per "
        "image). The folder holds everything prediction needs offline: `model.safetensors`, "
        "`config.json` (the training config; it rebuilds the model), `classes.json` (label "
        "space), `export.json` (thresholds, metrics)"
        + (", `tokenizer/` (the Q-Former's text tokenizer)" if cfg.task != "cprfl" else "")
        + ".",
        "",
        "## Training",
        "",
        "| setting | value |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _settings(cfg, meta)),
        "",
        "## Provenance",
        "",
        f"- ltdist {provenance.get('ltdist') or 'version unknown'}, git commit "
        f"{provenance.get('git_commit') or 'not recorded'}",
        f"- exported {provenance.get('created') or 'at an unrecorded date'}",
        f"- training data: `{cfg.data.location}` (split `{cfg.data.train_split}`)",
        "- license: "
        + (
            meta.get("license")
            or "not stated; `ltdist export push ... --license ID` (or `license:` in the "
            "metadata above) sets it before "
            "publishing (the pretrained weights' own licences apply)"
        ),
        "",
    ]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)


def push(
    export: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    license: str | None = None,
    token: str | None = None,
) -> str:
    """Upload an export folder as the model repo ``repo_id`` (created when absent); returns
    the commit's URL. Needs a token: ``HF_TOKEN`` or ``hf auth login``. ``license`` (a Hub
    licence id, e.g. ``apache-2.0``) is recorded in ``export.json`` and the card first."""
    from huggingface_hub import HfApi, get_token

    from ltdist.train.export import CLASSES, CONFIG, META, WEIGHTS, write_card

    token = token or get_token()
    if not token:
        raise UserError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write "
            "access), then push again"
        )
    if not storage.exists(storage.join(export, META)):
        raise MissingInputError(f"{export} is not a complete export (no {META})")
    with tempfile.TemporaryDirectory() as tmp:
        folder = export
        if not storage.is_local(export):
            storage.download_tree(export, tmp)
            folder = tmp
        if license:
            meta_path = os.path.join(folder, META)
            with open(meta_path) as f:
                meta = {**json.load(f), "license": license}
            storage.write_bytes_atomic(meta_path, json.dumps(meta, indent=1).encode())
            write_card(folder)
        elif not os.path.exists(os.path.join(folder, CARD)):  # written before model cards
            write_card(folder)
            log.info("%s had no model card: wrote %s", export, os.path.join(folder, CARD))
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=storage.local_path(folder),
            revision=revision,
            allow_patterns=[WEIGHTS, CLASSES, CONFIG, META, CARD, f"{TOKENIZER}/*"],
            commit_message=f"ltdist export from {export}",
        )
    return str(getattr(info, "commit_url", info))

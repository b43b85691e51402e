"""``ltdist data prepare``: the user's COCO / VOC copy -> a benchmark's shards, in one command.

fetch the split files -> check the folder layout (the first missing folder, before any image)
-> convert the annotations (labels and captions per image) -> check every split image is
present -> write the manifests (atomically) -> pack (resumable) -> a table per split of images
found / missing / rejected with reason, and the labels that differ from the split file's.

The label space (names, frequencies, groups) is always the benchmark's, from its training split
file: what the user's copy holds can change which images are packed, never which classes are
tail. A rerun after completion does nothing but print the table; after an interruption it
resumes (the manifests are rewritten whole, the shards the index already has are kept).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Literal

from ltdist import storage
from ltdist.config import to_dict
from ltdist.data import splits as benchmark_splits
from ltdist.data.coco import convert_coco
from ltdist.data.convert import Converted, ConvertError
from ltdist.data.corpus import CorpusFacts, build_corpus, format_facts
from ltdist.data.manifest import Record
from ltdist.data.pack import pack_split, samples_per_shard_for, write_classes
from ltdist.data.shards import load_index
from ltdist.data.voc import annotation_path, convert_voc
from ltdist.entry import MissingInputError, UserError
from ltdist.labels import LabelSpace

log = logging.getLogger(__name__)

REPORT_FILE = "prepare_report.json"
MANIFEST_DIR = "manifests"
MISSING = "image not found"


@dataclass
class PrepareConfig:
    """What ``ltdist data prepare`` reads and where it writes."""

    benchmark: Literal["coco_lt", "voc_lt"] = "coco_lt"
    root: str = ""  # COCO: holds annotations/, train2017/, val2017/; VOC: holds VOCdevkit/
    out: str = ""  # default shards/<benchmark>
    splits_dir: str = "data/splits"
    splits_source: str = ""  # base URL or local folder of the split files ("" = the public copy)
    policy: Literal["error", "skip"] = "skip"  # skip: leave bad images out, listed with reason
    labels: Literal["source", "split"] = "source"  # source: the converter's; split: the file's
    include_crowd: bool = True  # COCO: crowd annotations count (the benchmark's reading)
    include_difficult: bool = True  # VOC: difficult objects count (the benchmark's reading)
    samples_per_shard: int = 0  # 0: derived from target_shard_mb
    target_shard_mb: float = 256.0
    max_image_size: int = 0
    # DP-VLPA's pretraining corpus (coco_lt): every train2017 image with a COCO-LT tail class,
    # one caption each, packed as split 'train' of its own data set in the benchmark's classes
    corpus: bool = False
    corpus_out: str = ""  # default <out>_corpus
    corpus_seed: int = 0  # which caption of an image (a hash of seed and key)

    @property
    def location(self) -> str:
        return self.out or f"shards/{self.benchmark}"

    @property
    def corpus_location(self) -> str:
        return self.corpus_out or f"{self.location.rstrip('/')}_corpus"

    def validate(self) -> None:
        if not self.root:
            flag = "--coco-root" if self.benchmark == "coco_lt" else "--voc-root"
            raise ValueError(f"root: the data set folder is required ({flag} DIR)")
        if self.corpus and self.benchmark != "coco_lt":
            raise ValueError("corpus: the pretraining corpus is built from COCO (coco_lt) only")


@dataclass
class SplitReport:
    """One split's accounting: every split image is written, missing or rejected with reason."""

    split: str
    in_split: int = 0
    found: int = 0
    missing: int = 0
    written: int = 0
    unlabeled: int = 0
    rejected: list[dict] = field(default_factory=list)  # {key, image, reason}
    disagreements: list[dict] = field(default_factory=list)  # {key, split, source}


@dataclass
class PrepareReport:
    benchmark: str
    location: str
    splits: dict[str, SplitReport]
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    corpus: dict | None = None  # location, facts, in_corpus, missing, written, rejected
    reused: bool = False  # True: nothing was done, an earlier complete run's report

    def to_dict(self) -> dict:
        return to_dict(self)


# -- layout -------------------------------------------------------------------------------------


def resolve_root(benchmark: str, root: str) -> str:
    """The folder the split paths are relative to; a VOC root given as ``.../VOCdevkit`` is
    accepted as its parent."""
    root = os.path.abspath(os.path.expanduser(root))
    if (
        benchmark == "voc_lt"
        and os.path.basename(root) == "VOCdevkit"
        and not os.path.isdir(os.path.join(root, "VOCdevkit"))
    ):
        return os.path.dirname(root)
    return root


def required_paths(benchmark: str, image_paths: list[str]) -> list[str]:
    """Folders and files a benchmark reads under its root, outermost first."""
    folders = sorted({os.path.dirname(p) for p in image_paths})
    if benchmark == "coco_lt":
        files = [
            f"annotations/{kind}_{folder}.json"
            for folder in folders
            for kind in ("instances", "captions")
        ]
        return ["annotations", *files, *folders]
    annotations = sorted({os.path.dirname(annotation_path(p)) for p in image_paths})
    return sorted(set(folders) | set(annotations))


def check_layout(benchmark: str, root: str, required: list[str]) -> None:
    """Fail on the first missing folder (or annotation file), naming it and what is there."""
    if not os.path.isdir(root):
        raise MissingInputError(f"{benchmark}: data set root {root} is not a folder")
    for rel in required:
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            path = os.path.join(root, *parts[:depth])
            if not os.path.exists(path):
                parent = os.path.dirname(path)
                present = sorted(os.listdir(parent))[:12] if os.path.isdir(parent) else []
                raise MissingInputError(
                    f"{benchmark}: {path} not found: the layout needs "
                    f"{', '.join(required)} under {root} ({parent} holds: "
                    f"{', '.join(present) or 'nothing'})"
                )


def _fingerprint(root: str, paths: list[str], splits_dir: str) -> list:
    """Size and modification time of the inputs a conversion reads (not the images: packing
    checks those itself)."""
    out = []
    for rel in paths:
        st = os.stat(os.path.join(root, rel))
        out.append([rel, st.st_size, st.st_mtime_ns])
    for dirpath, _, files in sorted(os.walk(splits_dir)):
        for name in sorted(files):
            st = os.stat(os.path.join(dirpath, name))
            out.append([name, st.st_size, st.st_mtime_ns])
    return out


# -- conversion ---------------------------------------------------------------------------------


def convert(cfg: PrepareConfig, root: str, space: LabelSpace, image_paths: list[str]) -> Converted:
    if cfg.benchmark == "coco_lt":
        folders = sorted({p.split("/")[0] for p in image_paths})
        return convert_coco(root, folders, space, include_crowd=cfg.include_crowd)
    return convert_voc(root, image_paths, space, include_difficult=cfg.include_difficult)


def split_records(
    cfg: PrepareConfig,
    split: str,
    root: str,
    benchmark_records: list[Record],
    converted: Converted,
    progress: bool = False,
) -> tuple[list[Record], SplitReport]:
    """The records to pack for one split: every split image checked for presence and labels."""
    from tqdm import tqdm

    report = SplitReport(split, in_split=len(benchmark_records))
    source_name = "instances" if cfg.benchmark == "coco_lt" else "XML"
    records = []

    def reject(r: Record, reason: str) -> None:
        if cfg.policy == "error":
            raise ConvertError(
                f"{split} split image {r.image} (split file line {r.line}): {reason} "
                "(policy=skip leaves such images out)"
            )
        report.rejected.append({"key": r.key, "image": r.image, "reason": reason})

    for r in tqdm(benchmark_records, desc=f"check {split}", unit="img", disable=not progress):
        path = os.path.join(root, r.image)
        if not os.path.isfile(path):
            report.missing += 1
            if cfg.policy == "error":
                raise MissingInputError(
                    f"{split} split image {path} (split file line {r.line}) not found"
                )
            report.rejected.append({"key": r.key, "image": r.image, "reason": MISSING})
            continue
        report.found += 1
        if r.image in converted.problems:
            reject(r, str(converted.problems[r.image]))
            continue
        if r.image not in converted.labels:
            reject(r, f"no {source_name} annotation for this image")
            continue
        labels = converted.labels[r.image]
        if labels != r.label_ids:
            report.disagreements.append(
                {"key": r.key, "split": list(r.label_ids), "source": list(labels)}
            )
        ids = labels if cfg.labels == "source" else r.label_ids
        if not ids and split == "train":
            reject(r, "empty label set (a training image needs at least one label)")
            continue
        report.unlabeled += not ids
        caption = converted.captions.get(r.image, r.caption)  # VOC: the split's captions file
        records.append(Record(r.key, path, tuple(ids), caption, r.line))
    return records, report


def write_manifest_atomic(location: str, records: list[Record], names: list[str]) -> None:
    """A manifest (``ltdist.data.manifest`` format, absolute image paths) written whole or not
    at all, so an interrupted prepare never leaves half of one."""
    lines = []
    for r in records:
        obj = {"key": r.key, "image": r.image, "labels": [names[i] for i in r.label_ids]}
        if r.caption is not None:
            obj["caption"] = r.caption
        lines.append(json.dumps(obj, ensure_ascii=False))
    storage.write_bytes_atomic(location, ("\n".join(lines) + "\n" if lines else "").encode())


# -- the command --------------------------------------------------------------------------------


def _reusable(location: str, state: dict) -> PrepareReport | None:
    """An earlier run's report when it was made from the same inputs and every split is packed."""
    path = storage.join(location, REPORT_FILE)
    if not storage.exists(path):
        return None
    saved = json.loads(storage.read_bytes(path))
    if saved.get("state") != state:
        return None
    for split in saved["report"]["splits"]:
        try:
            if not load_index(location, split).complete:
                return None
        except UserError:
            return None
    r = saved["report"]
    if r.get("corpus"):
        try:
            if not load_index(r["corpus"]["location"], "train").complete:
                return None
        except UserError:
            return None
    splits = {s: SplitReport(**v) for s, v in r["splits"].items()}
    return PrepareReport(
        r["benchmark"], r["location"], splits, r["counts"], r["notes"], r["corpus"], True
    )


def prepare(cfg: PrepareConfig, progress: bool = True) -> PrepareReport:
    """Fetch splits, check the layout, convert, verify, write manifests and pack: see above."""
    cfg.validate()
    bench, location = cfg.benchmark, cfg.location
    root = resolve_root(bench, cfg.root)
    benchmark_splits.fetch_splits(bench, cfg.splits_dir, cfg.splits_source or None)
    space = benchmark_splits.label_space(bench, cfg.splits_dir)
    by_split = {
        s: benchmark_splits.load_split_records(bench, cfg.splits_dir, s)
        for s in benchmark_splits.SPLITS
    }
    image_paths = [r.image for records in by_split.values() for r in records]
    required = required_paths(bench, image_paths)
    check_layout(bench, root, required)
    settings = {k: v for k, v in to_dict(cfg).items() if k != "splits_source"}  # hashes pinned
    inputs = _fingerprint(root, required, cfg.splits_dir)
    state = {"settings": settings, "root": root, "inputs": inputs}
    state = json.loads(json.dumps(state))  # as it reads back from the report
    reused = _reusable(location, state)
    if reused is not None:
        log.info("%s: already prepared from these inputs; nothing to do", location)
        return reused

    converted = convert(cfg, root, space, image_paths)
    report = PrepareReport(bench, location, {}, dict(converted.counts), list(converted.notes))
    write_classes(location, space)
    for split, benchmark_records in by_split.items():
        records, split_report = split_records(
            cfg, split, root, benchmark_records, converted, progress
        )
        write_manifest_atomic(
            storage.join(location, MANIFEST_DIR, f"{split}.jsonl"), records, space.names
        )
        per_shard = cfg.samples_per_shard or samples_per_shard_for(records, cfg.target_shard_mb)
        packed = pack_split(
            records,
            space,
            location,
            split,
            per_shard,
            policy=cfg.policy,
            max_image_size=cfg.max_image_size,
            progress=progress,
        )
        images = {r.key: os.path.relpath(r.image, root) for r in records}  # as the split names it
        split_report.rejected += [
            {"key": rej["key"], "image": images.get(rej["key"]), "reason": rej["reason"]}
            for rej in packed.rejected
        ]
        split_report.written = packed.num_written
        report.splits[split] = split_report
    if cfg.corpus:
        test_paths = [r.image for r in by_split["test"]]
        report.corpus = prepare_corpus(cfg, root, space, converted, test_paths, progress)
    storage.write_bytes_atomic(
        storage.join(location, REPORT_FILE),
        json.dumps({"state": state, "report": report.to_dict()}, indent=1).encode(),
    )
    return report


def prepare_corpus(
    cfg: PrepareConfig,
    root: str,
    space: LabelSpace,
    converted: Converted,
    test_paths: list[str],
    progress: bool = False,
) -> dict:
    """Build, check and pack the pretraining corpus (``ltdist.data.corpus``) beside the
    benchmark, in the benchmark's label space."""
    from tqdm import tqdm

    corpus, facts = build_corpus(converted, space, test_paths, seed=cfg.corpus_seed)
    location = cfg.corpus_location
    records, rejected = [], []
    for r in tqdm(corpus, desc="check corpus", unit="img", disable=not progress):
        path = os.path.join(root, r.image)
        if not os.path.isfile(path):
            if cfg.policy == "error":
                raise MissingInputError(f"corpus image {path} not found")
            rejected.append({"key": r.key, "image": r.image, "reason": MISSING})
            continue
        records.append(Record(r.key, path, r.label_ids, r.caption))
    write_classes(location, space)
    write_manifest_atomic(storage.join(location, MANIFEST_DIR, "train.jsonl"), records, space.names)
    per_shard = cfg.samples_per_shard or samples_per_shard_for(records, cfg.target_shard_mb)
    packed = pack_split(
        records,
        space,
        location,
        "train",
        per_shard,
        policy=cfg.policy,
        max_image_size=cfg.max_image_size,
        progress=progress,
    )
    rejected += [{"key": x["key"], "image": None, "reason": x["reason"]} for x in packed.rejected]
    return {
        "location": location,
        "facts": to_dict(facts),
        "in_corpus": len(corpus),
        "missing": len(corpus) - len(records),
        "written": packed.num_written,
        "rejected": rejected,
    }


def format_report(report: PrepareReport, max_listed: int = 10) -> str:
    """The final table: per split, images in the split file / found / missing / rejected /
    written, then the reasons and the label disagreements."""
    head = ("split", "in split", "found", "missing", "rejected", "written", "unlabeled", "differ")
    rows = [
        (
            s.split,
            s.in_split,
            s.found,
            s.missing,
            len(s.rejected) - s.missing,
            s.written,
            s.unlabeled,
            len(s.disagreements),
        )
        for s in report.splits.values()
    ]
    width = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{width[0]}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(width))
    state = "already prepared, nothing done" if report.reused else "prepared"
    lines = [f"{report.benchmark} {state} in {report.location}", fmt.format(*head)]
    lines += [fmt.format(*row) for row in rows]
    for s in report.splits.values():
        missing = [rej["image"] for rej in s.rejected if rej["reason"] == MISSING]
        if missing:
            lines.append(
                f"  {s.split}: {len(missing)} split images not found, e.g. "
                f"{', '.join(missing[:3])} (all in {REPORT_FILE})"
            )
        others = [rej for rej in s.rejected if rej["reason"] != MISSING]
        for rej in others[:max_listed]:
            lines.append(f"  {s.split} {rej['image']}: {rej['reason']}")
        if len(others) > max_listed:
            lines.append(f"  ... {len(others) - max_listed} more (see {REPORT_FILE})")
        for d in s.disagreements[:max_listed]:
            lines.append(
                f"  {s.split} {d['key']}: labels {d['source']} from the annotations, "
                f"{d['split']} in the split file"
            )
    if any(s.missing or s.rejected for s in report.splits.values()):
        lines.append(
            "WARNING: not every split image was packed: results on these shards are not "
            "comparable with the published benchmark"
        )
    if any(s.disagreements for s in report.splits.values()):
        lines.append(
            "differ: images whose annotation labels are not the split file's "
            "(labels=source packs the annotations', labels=split the file's)"
        )
    counts = ", ".join(f"{k} {v:,}" for k, v in sorted(report.counts.items()))
    if counts:
        lines.append(f"annotations read: {counts}")
    lines += report.notes
    if report.corpus:
        c = report.corpus
        lines.append(
            f"\npretraining corpus in {c['location']}: {c['written']:,} of {c['in_corpus']:,} "
            f"images written, {c['missing']:,} missing, "
            f"{len(c['rejected']) - c['missing']:,} rejected"
        )
        lines.append(format_facts(CorpusFacts(**c["facts"])))
    return "\n".join(lines)

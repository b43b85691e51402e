"""The DP-VLPA pretraining corpus: COCO train2017 images that hold a COCO-LT tail class.

Tail is what the COCO-LT *training split* makes it (fewer than 20 positive images there), never
the corpus's own frequencies: the corpus's records are packed with the benchmark's
``classes.json``, and STAG marks tails from that, so tens of thousands of corpus images cannot
turn a tail class into a head. Every image of the COCO-LT test split (val2017) is excluded, by
file name, whatever folder it sits in. Each image gets one of its COCO captions, chosen by a hash
of (seed, key): deterministic, and independent of file order.
"""

from __future__ import annotations

import hashlib
import posixpath
from dataclasses import dataclass

from ltdist.data.convert import Converted
from ltdist.data.manifest import Record, key_from_path
from ltdist.labels import LabelSpace

# DP-VLPA (AAAI 2026), STAG quality: tail instances in the pretraining data and tail-class
# mentions per tail instance in the COCO captions and in the STAG descriptions.
PAPER_TAIL_INSTANCES = 49_205
PAPER_MENTIONS_CAPTIONS = 0.438
PAPER_MENTIONS_STAG = 1.883


@dataclass
class CorpusFacts:
    images: int = 0  # corpus images (at least one tail instance)
    tail_instances: int = 0  # annotations of tail classes in them, crowd included
    tail_mentions: int = 0  # mentions of an image's own tail classes in its chosen caption
    excluded_test_images: int = 0  # images of the COCO-LT test split left out
    without_caption: int = 0  # tail images left out: no caption to pair with

    @property
    def mentions_per_instance(self) -> float:
        return self.tail_mentions / self.tail_instances if self.tail_instances else 0.0


def choose_caption(key: str, captions: list[str], seed: int) -> str:
    """One caption of an image, the same on every run and machine for a (seed, key)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    ordered = sorted(captions)  # not the file's order: the same captions, the same choice
    return ordered[int.from_bytes(digest[:8], "big") % len(ordered)]


def build_corpus(
    converted: Converted,
    space: LabelSpace,
    test_paths: list[str],
    *,
    image_dir: str = "train2017",
    seed: int = 0,
) -> tuple[list[Record], CorpusFacts]:
    """Records (relative image paths, the image's labels, one caption) of every ``image_dir``
    image with a tail-class instance, and the corpus facts."""
    test_names = {posixpath.basename(p) for p in test_paths}
    facts = CorpusFacts()
    records = []
    for path in sorted(converted.instances):
        if not path.startswith(f"{image_dir}/") or path in converted.problems:
            continue
        tail = {c: n for c, n in converted.instances[path].items() if space.is_tail(c)}
        if not tail:
            continue
        if posixpath.basename(path) in test_names:
            facts.excluded_test_images += 1
            continue
        captions = converted.caption_lists.get(path)
        if not captions:
            facts.without_caption += 1
            continue
        key = key_from_path(path)
        caption = choose_caption(key, captions, seed)
        facts.images += 1
        facts.tail_instances += sum(tail.values())
        facts.tail_mentions += sum(1 for m in space.mentions(caption) if m.class_id in tail)
        records.append(Record(key, path, converted.labels[path], caption))
    return records, facts


def format_facts(facts: CorpusFacts) -> str:
    """Our corpus beside the paper's numbers (STAG's own figure comes from its report)."""
    rows = [
        ("images", f"{facts.images:,}", "-"),
        ("tail-class instances", f"{facts.tail_instances:,}", f"{PAPER_TAIL_INSTANCES:,}"),
        (
            "tail mentions per instance, captions",
            f"{facts.mentions_per_instance:.3f}",
            f"{PAPER_MENTIONS_CAPTIONS:.3f}",
        ),
        (
            "tail mentions per instance, after STAG",
            "see stag_report.json",
            f"{PAPER_MENTIONS_STAG:.3f}",
        ),
        ("COCO-LT test images excluded", f"{facts.excluded_test_images:,}", "-"),
        ("tail images without a caption (left out)", f"{facts.without_caption:,}", "-"),
    ]
    width = [max(len(r[i]) for r in rows + [("", "ours", "paper")]) for i in range(3)]
    lines = [f"{'pretraining corpus':<{width[0]}}  {'ours':>{width[1]}}  {'paper':>{width[2]}}"]
    lines += [f"{a:<{width[0]}}  {b:>{width[1]}}  {c:>{width[2]}}" for a, b, c in rows]
    return "\n".join(lines)

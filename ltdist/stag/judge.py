"""A text-only judge of STAG content: how much of a description is grounded in its image's
labels and caption, what is off-topic, loops, and the caption facts it drops or contradicts.

The validator guarantees the format (tags, length, no absent class names); this module looks at
the words. The paper judges its texts with a vision-language model (7.5% hallucination); we
have no image model on every machine, so the judge compares the text with the two sources an
image's STAG prompt holds, and runs anywhere (pure Python, no model).

Definitions (per text, markup stripped; words as ``validate`` counts them, lower-cased):

- **stem**: possessive ``'s`` dropped, then one suffix of ``ies -> y``, ``ing``, ``ed``, ``es``,
  ``s`` (when 3+ letters remain, never from ``ss``), a final ``e`` dropped and a final doubled
  consonant undoubled: "giraffes" / "giraffe", "riding" / "rides" / "ride" share a stem.
- **content words**: words that are not function words (``validate.FUNCTION_WORDS`` plus a few
  auxiliaries), not numbers and not generic picture words ("image", "scene", "background"...).
- **sources**: the stems of the image's class names (canonical, display, synonyms, and for
  "person" the caption words for people: ``EXTRA_SYNONYMS``) and of every caption word.
- ``grounded``: share of the content words (with repeats) whose stem is in the sources.
- ``off_topic``: ``names`` (capitalised words not at a sentence start and absent from the
  sources), ``numbers`` (digits and number words absent from the sources) and ``words`` (the
  other content words absent from the sources), each listed once in text order.
- ``repetition``: ``validate.repetition`` (share of word 4-grams repeating an earlier one).
- ``caption_facts``: the caption's noun-like content words (content words not ending in
  -ing / -ed / -ly), once each; ``caption_kept`` the share of them the text has (by stem),
  ``caption_dropped`` the others.
- ``contradictions``: ``count:<noun>:<caption n>-><text n>`` when a number in the caption and a
  different number in the text each count the same stem within the next two words;
  ``negated:<word>`` when a caption fact follows a negation ("no", "not", "without", "never",
  "none", "nor") within three words in the text.
- ``score`` (a ranking key for the worst examples, not a calibrated measure):
  ``grounded x caption_kept x (1 - repetition) x 0.5 ^ contradictions``; without a caption the
  ``caption_kept`` factor is left out.

Paraphrase counts against ``grounded`` (a faithful synonym the sources do not hold is
"off-topic"), so read it as a lower bound, and compare settings on the same images.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

from ltdist.labels import LabelSpace
from ltdist.stag.validate import _WORD, FUNCTION_WORDS, repetition

JUDGE_VERSION = "judge-v1"
WORST = 10  # worst examples kept in the report
BUCKET = 100  # histogram resolution of the shares (0.01)

STOP_WORDS = FUNCTION_WORDS | frozenset(
    """am isn't aren't wasn't weren't doesn't don't didn't it's that's there's what how why
    here now too such own same only more most much even still well like get gets got next""".split()
)
# words about the picture, not its content: neither grounded nor off-topic
PICTURE_WORDS = frozenset(
    """image picture photo photograph scene view setting background foreground left right side
    front top bottom middle center centre""".split()
)
NUMBER_WORDS = {
    w: i + 1
    for i, w in enumerate("one two three four five six seven eight nine ten eleven twelve".split())
}
NEGATIONS = frozenset("no not without never none nor".split())
# caption words for a person that no class name holds (COCO's "person" is "a man" in captions)
EXTRA_SYNONYMS = {
    "person": "people man men woman women boy boys girl girls child children kid kids player "
    "players lady guy guys".split()
}
_SENTENCE_END = re.compile(r"[.!?]\s*$")
_VOWELS = set("aeiou")


def stem(word: str) -> str:
    """A light suffix stripper (see the module docstring); applied alike to text and sources."""
    w = word.lower().replace("’", "'")
    if w.endswith("'s"):
        w = w[:-2]
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    for suffix in ("ing", "ed", "es", "s"):
        if w.endswith(suffix) and len(w) - len(suffix) >= 3 and not w.endswith("ss"):
            w = w[: -len(suffix)]
            break
    if w.endswith("e") and len(w) > 3:
        w = w[:-1]
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in _VOWELS and w[-1] not in "ls":
        w = w[:-1]
    return w


def _number(word: str) -> int | None:
    w = word.lower()
    if w.isdigit():
        return int(w)
    return NUMBER_WORDS.get(w)


def _is_content(word: str) -> bool:
    w = word.lower()
    return (
        w not in STOP_WORDS
        and w not in PICTURE_WORDS
        and _number(w) is None
        and not w.isdigit()
        and any(c.isalpha() for c in w)
    )


def _words(text: str) -> list[tuple[str, bool]]:
    """The words of a text, each with whether it starts a sentence."""
    out = []
    for m in _WORD.finditer(text):
        before = text[: m.start()].rstrip()
        out.append((m.group(0), not before or bool(_SENTENCE_END.search(before))))
    return out


def _counts(words: Sequence[str]) -> dict[str, int]:
    """stem -> the number that counts it (a number, then a stem within the next two words)."""
    counted: dict[str, int] = {}
    for i, w in enumerate(words):
        n = _number(w)
        if n is None:
            continue
        for nxt in words[i + 1 : i + 3]:
            if _is_content(nxt):
                counted.setdefault(stem(nxt), n)
    return counted


@dataclass
class Judgement:
    """The judge's view of one text (see the module docstring for each field)."""

    content_words: int = 0
    grounded: float = 0.0
    off_topic: dict[str, list[str]] = field(default_factory=dict)
    repetition: float = 0.0
    caption_facts: list[str] = field(default_factory=list)
    caption_kept: float | None = None  # None: no caption
    caption_dropped: list[str] = field(default_factory=list)
    contradictions: list[str] = field(default_factory=list)
    score: float = 0.0

    @property
    def off_topic_count(self) -> int:
        return sum(len(v) for v in self.off_topic.values())

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("grounded", "repetition", "score"):
            d[k] = round(d[k], 4)
        if self.caption_kept is not None:
            d["caption_kept"] = round(self.caption_kept, 4)
        return d


def label_words(label_ids: Iterable[int], space: LabelSpace) -> list[str]:
    """The words of an image's class names: canonical, display and synonyms."""
    words = []
    for i in sorted({int(i) for i in label_ids}):
        names = (space.names[i], space.display_names[i], *space.synonyms[i])
        for name in (*names, *EXTRA_SYNONYMS.get(space.names[i], [])):
            words += _WORD.findall(name)
    return words


def judge(text: str, labels: Sequence[str], caption: str | None) -> Judgement:
    """Judge one plain (markup-stripped) text against its image's label words and caption."""
    caption = caption or ""
    caption_words = _WORD.findall(caption)
    sources = {stem(w) for w in [*labels, *caption_words]}
    source_numbers = {n for w in [*labels, *caption_words] if (n := _number(w)) is not None}

    words = _words(text)
    plain = [w for w, _ in words]
    content = [w for w in plain if _is_content(w)]
    grounded = sum(stem(w) in sources for w in content) / len(content) if content else 0.0

    names, numbers, others = [], [], []
    for w, starts in words:
        n = _number(w)
        if n is not None:
            if n not in source_numbers and w.lower() not in numbers:
                numbers.append(w.lower())
            continue
        if not _is_content(w) or stem(w) in sources:
            continue
        if w[0].isupper() and not starts and w != "I":
            if w not in names:
                names.append(w)
        elif w.lower() not in others and w not in names:
            others.append(w.lower())

    text_stems = {stem(w) for w in plain}
    facts = list(
        dict.fromkeys(
            w.lower()
            for w in caption_words
            if _is_content(w) and not w.lower().endswith(("ing", "ed", "ly"))
        )
    )
    dropped = [w for w in facts if stem(w) not in text_stems]
    kept = (1 - len(dropped) / len(facts)) if facts else None

    contradictions = []
    in_text = _counts(plain)
    for s, n in _counts(caption_words).items():
        if s in in_text and in_text[s] != n:
            contradictions.append(f"count:{s}:{n}->{in_text[s]}")
    fact_stems = {stem(w): w for w in facts}
    for i, w in enumerate(plain):
        if w.lower() in NEGATIONS:
            for nxt in plain[i + 1 : i + 4]:
                fact = fact_stems.get(stem(nxt))
                if fact and f"negated:{fact}" not in contradictions:
                    contradictions.append(f"negated:{fact}")

    rep = repetition(text)
    score = grounded * (1 - rep) * 0.5 ** len(contradictions)
    if caption and kept is not None:
        score *= kept
    return Judgement(
        content_words=len(content),
        grounded=grounded,
        off_topic={"names": names, "numbers": numbers, "words": others},
        repetition=rep,
        caption_facts=facts,
        caption_kept=kept,
        caption_dropped=dropped,
        contradictions=contradictions,
        score=score,
    )


def judge_sample(
    text: str, label_ids: Iterable[int], caption: str | None, space: LabelSpace
) -> Judgement:
    return judge(text, label_words(label_ids, space), caption)


# -- aggregation (per shard, then summed over shards by the report) ----------------------------

SHARES = ("grounded", "caption_kept", "repetition", "score")


def shard_counts(items: Iterable[tuple[str, str, Judgement]]) -> dict:
    """What a shard's index entry carries for the report: per share a histogram at 0.01 and
    the exact sum, counts, and the shard's worst examples. ``items``: (key, text, judgement)."""
    hist: dict[str, Counter] = {k: Counter() for k in SHARES}
    sums: Counter = Counter()
    n = {k: 0 for k in SHARES}
    worst = []
    off, contradicted, texts = 0, 0, 0
    for key, text, j in items:
        texts += 1
        for k in SHARES:
            value = getattr(j, k)
            if value is None:
                continue
            hist[k][str(round(value * BUCKET))] += 1
            sums[k] += value
            n[k] += 1
        off += j.off_topic_count
        contradicted += bool(j.contradictions)
        worst.append({"key": key, "text": text, **j.to_dict()})
    worst.sort(key=lambda w: (w["score"], w["key"]))
    return {
        "version": JUDGE_VERSION,
        "texts": texts,
        "off_topic_items": off,
        "contradicted_texts": contradicted,
        "n": n,
        "sums": {k: round(v, 6) for k, v in sums.items()},
        "hist": {k: dict(v) for k, v in hist.items()},
        "worst": worst[:WORST],
    }


def _quantile(hist: Counter, q: float) -> float:
    """The q-quantile (lower nearest rank) of a histogram of 0.01 buckets."""
    values = sorted((int(k), v) for k, v in hist.items())
    total = sum(v for _, v in values)
    rank, seen = q * (total - 1), 0
    for bucket, v in values:
        seen += v
        if seen > rank:
            return bucket / BUCKET
    return values[-1][0] / BUCKET


def summarize(shards: Iterable[dict], worst: int = WORST) -> dict:
    """The report's ``judge`` section from the shards' ``shard_counts``."""
    hist: dict[str, Counter] = {k: Counter() for k in SHARES}
    sums: Counter = Counter()
    n: Counter = Counter()
    examples = []
    texts = off = contradicted = 0
    for s in shards:
        texts += s["texts"]
        off += s["off_topic_items"]
        contradicted += s["contradicted_texts"]
        for k in SHARES:
            hist[k].update(s["hist"].get(k, {}))
            sums[k] += s["sums"].get(k, 0.0)
            n[k] += s["n"].get(k, 0)
        examples += s["worst"]
    examples.sort(key=lambda w: (w["score"], w["key"]))
    out: dict = {"version": JUDGE_VERSION, "texts": texts}
    for k in SHARES:
        if n[k]:
            out[k] = {
                "n": n[k],
                "mean": round(sums[k] / n[k], 4),
                "p25": _quantile(hist[k], 0.25),
                "median": _quantile(hist[k], 0.5),
                "p75": _quantile(hist[k], 0.75),
            }
        else:
            out[k] = {"n": 0}
    out["off_topic_per_text"] = round(off / texts, 3) if texts else 0.0
    out["contradicted_share"] = round(contradicted / texts, 4) if texts else 0.0
    out["worst"] = examples[:worst]
    return out


def judge_table(section: dict, examples: int = 3) -> list[tuple[str, str]]:
    """Rows for the CLI's quality table: the distributions and the worst few texts."""
    if not section.get("texts"):
        return [("judged texts", "0")]

    def dist(k: str) -> str:
        d = section[k]
        return (
            f"{d['mean']:.2f} ({d['p25']:.2f} / {d['median']:.2f} / {d['p75']:.2f})"
            if d["n"]
            else "-"
        )

    rows = [
        ("judged texts (generated)", str(section["texts"])),
        ("grounded share mean (p25 / median / p75)", dist("grounded")),
        ("caption facts kept", dist("caption_kept")),
        ("judge score", dist("score")),
        ("off-topic items per text", f"{section['off_topic_per_text']:.1f}"),
        ("texts contradicting the caption", f"{section['contradicted_share']:.1%}"),
    ]
    for w in section["worst"][:examples]:
        off = [x for v in w["off_topic"].values() for x in v][:6]
        rows.append(
            (f"worst {w['key']} ({w['score']:.2f})", f"{w['text'][:90]!r} off-topic: {off}")
        )
    return rows

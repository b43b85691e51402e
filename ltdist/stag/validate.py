"""Validation of STAG descriptions, tag stripping, and the tail-mention metric.

A generated description must be plain prose of ``min_words``..``max_words`` words in which every
tail class of the image is tagged as ``<tail> name </tail>`` (optional spaces inside the tags,
tag names case-insensitive) and no class of the label space that the image lacks is named.
Class mentions come from ``LabelSpace.mentions`` (the one longest-match, word-boundary matcher)
run on the text with its markup stripped, so "hot dog" is never "dog".

``ValidationResult.reasons`` holds short machine-readable codes, each optionally followed by
``:detail`` (split on the first colon; names are canonical class names):

===========================  ===================================================================
``empty``                    nothing but whitespace (and markup)
``unbalanced_tags``          a ``<tail>`` without its ``</tail>`` or the reverse
``nested_tags``              ``<tail>`` inside ``<tail>``
``unknown_tag:<markup>``     any other markup: ``<tial>``, ``<b>``, chat-template tokens
                             (``<|im_end|>``, ``[INST]``), a stray ``<`` or ``>``
``markdown``                 markdown emphasis, code, headings or list items
``preamble``                 a chatty lead-in ("Sure!", "Here is the description:")
``empty_tag``                ``<tail> </tail>``
``tag_not_tail_label:<s>``   tagged text that is not exactly one of this image's tail labels
``missing_tail:<name>``      a tail label never mentioned
``untagged_tail:<name>``     a tail label mentioned, but never inside tags (repairable)
``hallucination:<name>``     a class the image lacks is named (fatal unless ``hallucination``
                             is 'flag')
``too_short:<n>``            fewer than ``min_words`` words (n = the word count)
``too_long:<n>``             more than ``max_words`` words
===========================  ===================================================================

A tail label that is tagged once may be mentioned again untagged: coverage needs one tag.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ltdist.labels import LabelSpace

REASON_CODES = (
    "empty",
    "unbalanced_tags",
    "nested_tags",
    "unknown_tag",
    "markdown",
    "preamble",
    "empty_tag",
    "tag_not_tail_label",
    "missing_tail",
    "untagged_tail",
    "hallucination",
    "too_short",
    "too_long",
)

# The one markup grammar (also used to neutralise captions in prompt.py). The open tag owns
# the spaces after it and the close tag the spaces before it ("optional spaces inside").
_MARKUP = re.compile(
    r"(?P<open><\s*tail\s*>\s*)"
    r"|(?P<close>\s*<\s*/\s*tail\s*>)"
    # chat-template tokens: <|im_start|>, DeepSeek's <｜end▁of▁sentence｜>, [INST], <<SYS>>
    r"|(?P<chat>[<＜]\s*[|｜][^\n]{0,64}?[|｜]\s*[>＞]|\[\s*/?\s*INST\s*\]|<<\s*/?\s*SYS\s*>>)"
    # any other tag-like markup, e.g. <tial>, </b>, <think>, <s>
    r"|(?P<other><\s*/?\s*[^\s<>][^<>\n]{0,64}>)"
    # what is left of a bracket
    r"|(?P<stray>[<>＜＞])",
    re.IGNORECASE,
)
_MARKDOWN = re.compile(r"\*\*|__|`|^\s{0,3}(?:#{1,6}\s|[-*•+]\s|\d+[.)]\s)", re.MULTILINE)
_PREAMBLE = re.compile(
    r"^\W*(?:(?:sure|certainly|of course|okay|ok)\s*[,.!]|here(?:'s|’s| is)\b[^.:\n]{0,80}:)",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+(?:['’-]\w+)*")


@dataclass
class ValidationConfig:
    """What a description must satisfy; ``hallucination='flag'`` reports without rejecting."""

    min_words: int = 50
    max_words: int = 80
    hallucination: Literal["invalid", "flag"] = "invalid"
    require_tail_tags: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.min_words <= self.max_words:
            raise ValueError(
                f"ValidationConfig: need 0 <= min_words <= max_words, got "
                f"{self.min_words}..{self.max_words}"
            )
        if self.hallucination not in ("invalid", "flag"):
            raise ValueError(
                f"ValidationConfig.hallucination must be 'invalid' or 'flag', "
                f"got {self.hallucination!r}"
            )


@dataclass
class ValidationResult:
    """The verdict on one generated description.

    ``description`` keeps the tags (whitespace-normalised); ``text`` has all markup stripped and
    is what training reads; ``hallucinated`` holds canonical names of classes mentioned that
    the image lacks; ``tail_mentions`` counts mentions of the image's own tail classes.
    """

    valid: bool
    reasons: list[str] = field(default_factory=list)
    description: str = ""
    text: str = ""
    word_count: int = 0
    tail_mentions: int = 0
    hallucinated: list[str] = field(default_factory=list)


def reason_code(reason: str) -> str:
    """'missing_tail:surfboard' -> 'missing_tail' (for counting rejects by cause)."""
    return reason.split(":", 1)[0]


def normalize_whitespace(text: str) -> str:
    """Drop invisible control/format characters and collapse whitespace to single spaces."""
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if ch.isspace() or unicodedata.category(ch) not in ("Cc", "Cf")
    )
    return " ".join(text.split())


@dataclass
class _Parsed:
    text: str  # markup stripped, whitespace normalised
    tagged: list[bool]  # per character of text: inside <tail> ... </tail>
    tag_contents: list[str]  # the text of each well-formed, non-nested tag pair
    reasons: list[str]


def _parse(description: str) -> _Parsed:
    """Strip markup from a whitespace-normalised text, tracking which characters were tagged."""
    chars: list[str] = []
    tagged: list[bool] = []
    contents: list[str] = []
    reasons: list[str] = []
    depth = 0
    pair_start: int | None = None  # where the current well-formed pair's content starts
    joint = False  # a tail tag was just removed: do not glue two words together

    def emit(s: str) -> None:
        nonlocal joint
        for ch in s:
            if ch == " ":
                if chars and chars[-1] != " ":
                    chars.append(" ")
                    tagged.append(depth > 0)
            else:
                if joint and chars and chars[-1].isalnum() and ch.isalnum():
                    chars.append(" ")
                    tagged.append(False)
                chars.append(ch)
                tagged.append(depth > 0)
            joint = False

    pos = 0
    for m in _MARKUP.finditer(description):
        emit(description[pos : m.start()])
        pos = m.end()
        kind = m.lastgroup
        if kind == "open":
            depth += 1
            if depth > 1:
                reasons.append("nested_tags")
                pair_start = None
            else:
                pair_start = len(chars)
            joint = True
        elif kind == "close":
            if depth == 0:
                reasons.append("unbalanced_tags")
            else:
                depth -= 1
                if depth == 0 and pair_start is not None:
                    contents.append("".join(chars[pair_start:]).strip())
                    pair_start = None
            joint = True
        else:
            reasons.append(f"unknown_tag:{m.group(0).strip()}")
            emit(" ")
    emit(description[pos:])
    if depth > 0:
        reasons.append("unbalanced_tags")
    while chars and chars[-1] == " ":
        chars.pop()
        tagged.pop()
    return _Parsed("".join(chars), tagged, contents, reasons)


def strip_markup(text: str) -> str:
    """The text with ``<tail>`` tags and any other markup removed, whitespace normalised."""
    return _parse(normalize_whitespace(text)).text


def count_words(text: str) -> int:
    """Words as the length limits count them (markup is not stripped here: pass plain text)."""
    return len(_WORD.findall(text))


def validate(
    text: str | None,
    label_ids: Sequence[int],
    space: LabelSpace,
    cfg: ValidationConfig | None = None,
) -> ValidationResult:
    """Check one generated description against the image's labels (see the module docstring)."""
    cfg = cfg or ValidationConfig()
    raw = text or ""
    description = normalize_whitespace(raw)
    if not description:
        return ValidationResult(valid=False, reasons=["empty"])

    parsed = _parse(description)
    reasons = list(parsed.reasons)
    if _MARKDOWN.search(raw):
        reasons.append("markdown")
    if _PREAMBLE.search(parsed.text):
        reasons.append("preamble")

    labels = {int(i) for i in label_ids}
    tails = sorted(i for i in labels if space.is_tail(i))

    for content in parsed.tag_contents:
        if not content:
            reasons.append("empty_tag")
            continue
        found = space.mentions(content)
        exact = len(found) == 1 and found[0].start == 0 and found[0].end == len(content)
        if not (exact and found[0].class_id in tails):
            reasons.append(f"tag_not_tail_label:{content}")

    tail_mentions = 0
    covered: set[int] = set()
    untagged: set[int] = set()
    hallucinated: list[str] = []
    for m in space.mentions(parsed.text):
        if m.class_id in tails:
            tail_mentions += 1
            (covered if parsed.tagged[m.start] else untagged).add(m.class_id)
        elif m.class_id not in labels and space.names[m.class_id] not in hallucinated:
            hallucinated.append(space.names[m.class_id])

    for t in tails:
        if t in covered or (t in untagged and not cfg.require_tail_tags):
            continue
        code = "untagged_tail" if t in untagged else "missing_tail"
        reasons.append(f"{code}:{space.names[t]}")
    reasons.extend(f"hallucination:{name}" for name in hallucinated)

    word_count = count_words(parsed.text)
    if word_count == 0:
        reasons.append("empty")
    elif word_count < cfg.min_words:
        reasons.append(f"too_short:{word_count}")
    elif word_count > cfg.max_words:
        reasons.append(f"too_long:{word_count}")

    reasons = list(dict.fromkeys(reasons))
    fatal = [
        r
        for r in reasons
        if not (reason_code(r) == "hallucination" and cfg.hallucination == "flag")
    ]
    return ValidationResult(
        valid=not fatal,
        reasons=reasons,
        description=description,
        text=parsed.text,
        word_count=word_count,
        tail_mentions=tail_mentions,
        hallucinated=hallucinated,
    )


def repetition(text: str | None, n: int = 4) -> float:
    """Share of a text's word n-grams that repeat an earlier one (0: none; degenerate loops such
    as "the person is sitting on a towel. The person is sitting on a towel" score high)."""
    words = [w.lower() for w in _WORD.findall(strip_markup(text or ""))]
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def tail_mention_rate(
    texts: Iterable[str | None],
    label_sets: Iterable[Sequence[int]],
    space: LabelSpace,
) -> float:
    """Mentions of each image's own tail classes per tail label instance (DP-VLPA Table 4).

    = sum over images of the mentions (in the markup-stripped text) of that image's tail classes
    / sum over images of its number of tail labels. A missing text counts as 0 mentions; with no
    tail label instance at all the rate is 0.0.
    """
    texts, label_sets = list(texts), list(label_sets)
    if len(texts) != len(label_sets):
        raise ValueError(f"tail_mention_rate: {len(texts)} texts but {len(label_sets)} label sets")
    mentions = instances = 0
    for text, ids in zip(texts, label_sets):
        tails = {int(i) for i in ids if space.is_tail(int(i))}
        instances += len(tails)
        if text and tails:
            mentions += sum(m.class_id in tails for m in space.mentions(strip_markup(text)))
    return mentions / instances if instances else 0.0


# -- deterministic repair ---------------------------------------------------------------------

_EMPHASIS = re.compile(r"\*\*|__|`")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;!?])")  # left where a removed tag stood


@dataclass
class Repair:
    """A repaired text and what was done to it (empty ``repairs``: nothing to repair).

    Codes: ``strip_control_chars``, ``strip_chat_tokens``, ``strip_markdown`` (emphasis and
    code marks only), ``fix_tags`` (stray, unbalanced, nested or misspelled ``<tail>`` tags
    removed), ``untag:<content>`` (tags around text that is not one of the image's tail labels
    removed), ``tag:<name>`` (the first mention of an untagged tail label tagged).
    """

    text: str
    repairs: list[str] = field(default_factory=list)


def _tail_like(markup: str) -> bool:
    """'<tial>', '</ tails>', '<Tale>': a misspelled tail tag (edit distance <= 2, 't' first)."""
    name = re.sub(r"[^a-z]", "", markup.lower())
    return bool(name) and name[0] == "t" and _edit_distance(name, "tail") <= 2


def _edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance (insertions, deletions, substitutions, swaps)."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(
                d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])
            )
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _join(parts: list[str]) -> str:
    """Concatenate text pieces and tags, putting a space where two words or a word and a tag
    would touch (but none before punctuation after a tag)."""
    out = ""
    for part in parts:
        if out and part and not out[-1].isspace() and not part[0].isspace():
            if (out[-1].isalnum() or out[-1] == ">") and (part[0].isalnum() or part[0] == "<"):
                out += " "
        out += part
    return _SPACE_BEFORE_PUNCT.sub(r"\1", normalize_whitespace(out))


def repair(text: str | None, label_ids: Sequence[int], space: LabelSpace) -> Repair:
    """Fix what can be fixed without a model, deterministically; ``validate`` decides after.

    Chat-template tokens, control characters and markdown emphasis are removed; a ``<tail>``
    pair is kept only when it is well formed, not nested, and holds exactly one of the image's
    tail labels (case, plural and synonyms as ``LabelSpace.mentions`` reads them); every other
    tail tag (and a misspelled one) is removed, keeping its words; each tail label left
    without a tag gets one around its first mention. Other markup, missing labels, named
    classes the image lacks, and lengths are not touched: those stay invalid.
    """
    raw = text or ""
    repairs: list[str] = []
    if any(not ch.isspace() and unicodedata.category(ch) in ("Cc", "Cf") for ch in raw):
        repairs.append("strip_control_chars")
    s = normalize_whitespace(raw)
    if _EMPHASIS.search(s):
        s = normalize_whitespace(_EMPHASIS.sub("", s))
        repairs.append("strip_markdown")
    tails = {int(i) for i in label_ids if space.is_tail(int(i))}

    def tail_label(content: str) -> int | None:
        found = space.mentions(content)
        exact = len(found) == 1 and found[0].start == 0 and found[0].end == len(content)
        return found[0].class_id if exact and found[0].class_id in tails else None

    # pieces: ("text", str), ("markup", str) kept as is, ("tag", class id, content)
    pieces: list[tuple] = []
    depth, nested, start = 0, False, 0  # start: index in pieces where the open pair began
    fixed = False
    pos = 0
    for m in _MARKUP.finditer(s):
        pieces.append(("text", s[pos : m.start()]))
        pos = m.end()
        kind = m.lastgroup
        if kind == "chat":
            if "strip_chat_tokens" not in repairs:
                repairs.append("strip_chat_tokens")
        elif kind == "open":
            depth += 1
            if depth == 1:
                start, nested = len(pieces), False
            else:
                nested = fixed = True
        elif kind == "close":
            if depth == 0:
                fixed = True
                continue
            depth -= 1
            if depth:
                continue
            inside = pieces[start:]
            content = strip_markup("".join(p[1] for p in inside))
            class_id = tail_label(content)
            if class_id is not None and not nested and all(p[0] == "text" for p in inside):
                pieces[start:] = [("tag", class_id, content)]
            elif content and class_id is None:
                repairs.append(f"untag:{content}")
            else:  # empty, nested, or holding other markup: the tags go
                fixed = True
        elif kind == "other" and _tail_like(m.group(0)):
            fixed = True
        else:
            pieces.append(("markup", m.group(0)))
    pieces.append(("text", s[pos:]))
    if depth:
        fixed = True
    if fixed:
        repairs.append("fix_tags")

    covered = {p[1] for p in pieces if p[0] == "tag"}
    for class_id in sorted(tails - covered):
        for k, piece in enumerate(pieces):
            if piece[0] != "text":
                continue
            hit = next((m for m in space.mentions(piece[1]) if m.class_id == class_id), None)
            if hit is not None:
                words = piece[1]
                pieces[k : k + 1] = [
                    ("text", words[: hit.start]),
                    ("tag", class_id, hit.text),
                    ("text", words[hit.end :]),
                ]
                repairs.append(f"tag:{space.names[class_id]}")
                break
    out = _join([f"<tail> {p[2]} </tail>" if p[0] == "tag" else p[1] for p in pieces])
    return Repair(out, repairs)

"""Validation of STAG descriptions, tag stripping, and the tail-mention metric.

A generated description must be plain English prose of ``min_words``..``max_words`` words in
which every tail class of the image is tagged as ``<tail> name </tail>`` (optional spaces inside
the tags, tag names case-insensitive) and no class of the label space that the image lacks is
named. Class mentions come from ``LabelSpace.mentions`` (the one longest-match, word-boundary
matcher) run on the text with its markup stripped, so "hot dog" is never "dog".

Before anything is checked the text is put in its canonical form (``ltdist.stag.text``), which
is also the form that is written, and class names are matched on its look-alike skeleton.

``ValidationResult.reasons`` holds short machine-readable codes, each optionally followed by
``:detail`` (split on the first colon; names are canonical class names):

===========================  ===================================================================
``empty``                    nothing but whitespace (and markup)
``encoded_markup``           HTML / numeric entities or URL-encoding (``&lt;tail&gt;``,
                             ``%3Ctail%3E``): checked decoded, repairable
``unbalanced_tags``          a ``<tail>`` without its ``</tail>`` or the reverse
``nested_tags``              ``<tail>`` inside ``<tail>``
``unknown_tag:<markup>``     any other markup: ``<tial>``, ``<b>``, chat-template tokens
                             (``<|im_end|>``, ``[INST]``), a stray ``<`` or ``>``
``markdown``                 markdown emphasis, code, headings or list items
``preamble``                 a chatty lead-in ("Sure!", "Here is the description:")
``role_word``                a chat role left by a stripped template ("assistant", "User:")
``mixed_script:<word>``      a word mixing Latin with look-alike letters of another script
                             (repairable: folded to Latin)
``non_latin:<word>``         a word in another script, or with letters that have no Latin
                             look-alike
``garbled:<what>``           ``replacement_char`` (U+FFFD: bytes the decoder could not read)
``empty_tag``                ``<tail> </tail>``
``tag_not_tail_label:<s>``   tagged text that is not exactly one of this image's tail labels
``missing_tail:<name>``      a tail label never mentioned
``untagged_tail:<name>``     a tail label mentioned, but never inside tags (repairable)
``hallucination:<name>``     a class the image lacks is named (fatal unless ``hallucination``
                             is 'flag')
``too_short:<n>``            fewer than ``min_words`` words (n = the word count)
``too_long:<n>``             more than ``max_words`` words
``too_many_chars:<n>``       more than ``max_chars`` characters
``long_token:<start>``       a run of more than ``max_token_chars`` characters without a space
``url``                      a web address
``repetitive:<share>``       more than ``max_repetition`` of the word 4-grams repeat an earlier
                             one (a degenerate loop, a word repeated)
``repeated_sentence``        a sentence of 4+ words written twice
``not_prose:<what>``         ``function_words=<share>`` (fewer English function words than
                             ``min_function_word_share``: lorem ipsum, word lists),
                             ``numbers=<share>`` (number salad), ``lorem_ipsum``
===========================  ===================================================================

A tail label that is tagged once may be mentioned again untagged: coverage needs one tag. The
prose checks (repetition, function words, numbers) apply to texts of 10 words or more.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ltdist.labels import LabelSpace
from ltdist.stag.text import (
    canonicalize,
    clean,
    decode_encoded,
    fold_mixed_words,
    invisible,
    normalize_whitespace,
    script_reasons,
    skeleton,
)

REASON_CODES = (
    "empty",
    "encoded_markup",
    "unbalanced_tags",
    "nested_tags",
    "unknown_tag",
    "markdown",
    "preamble",
    "role_word",
    "mixed_script",
    "non_latin",
    "garbled",
    "empty_tag",
    "tag_not_tail_label",
    "missing_tail",
    "untagged_tail",
    "hallucination",
    "too_short",
    "too_long",
    "too_many_chars",
    "long_token",
    "url",
    "repetitive",
    "repeated_sentence",
    "not_prose",
)

_ROLE = r"(?:assistant|system|user|model)"
# The one markup grammar (also used to neutralise captions in prompt.py). The open tag owns
# the spaces after it and the close tag the spaces before it ("optional spaces inside").
_MARKUP = re.compile(
    r"(?P<open><\s*tail\s*>\s*)"
    r"|(?P<close>\s*<\s*/\s*tail\s*>)"
    # chat-template tokens: <|im_start|>, DeepSeek's <｜end▁of▁sentence｜>, [INST], <<SYS>>, </s>,
    # Gemma's <start_of_turn>, each with the role word a template puts after its start token
    r"|(?P<chat>(?:[<＜]\s*[|｜][^\n]{0,64}?[|｜]\s*[>＞]|\[\s*/?\s*INST\s*\]|<<\s*/?\s*SYS\s*>>"
    r"|<\s*/?\s*(?:s|eos|bos|start_of_turn|end_of_turn)\s*>)"
    rf"(?:\s*{_ROLE}\b(?:\s*:)?)?)"
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
# a role word at the start: 'assistant' alone, or any role with a colon ('User: ...')
_ROLE_WORD = re.compile(rf"^\W*(?:assistant\b\s*:?|{_ROLE}\s*:)\s*", re.IGNORECASE)
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_URL = re.compile(r"\b(?:https?://|www\.)\S", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+")

PROSE_MIN_WORDS = 10  # the prose checks' shares are noise on fewer words

# Closed-class English words: prose has ~30-50 % of them, lorem ipsum and word lists ~0-5 %.
FUNCTION_WORDS = frozenset(
    """a an the and or but nor so yet of in on at to for with by from as into onto over under
    near beside behind between among through across along around above below beneath against
    toward towards upon within without while where when which who whom whose that this these
    those it its is are was were be been being has have had do does did there their them they
    he she his her him we our us you your i my me one some several many few each every other
    another both all any no not than then very can could may might will would should just also
    up down out off about""".split()
)


@dataclass
class ValidationConfig:
    """What a description must satisfy; ``hallucination='flag'`` reports without rejecting.

    ``max_chars`` 0 means 12 characters per allowed word (English averages ~6 with the space).
    """

    min_words: int = 50
    max_words: int = 80
    hallucination: Literal["invalid", "flag"] = "invalid"
    require_tail_tags: bool = True
    max_chars: int = 0
    max_token_chars: int = 40
    max_repetition: float = 0.2
    min_function_word_share: float = 0.1
    max_number_share: float = 0.3

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
        if self.max_chars < 0 or self.max_token_chars < 1:
            raise ValueError(
                f"ValidationConfig: need max_chars >= 0 (0: 12 per word) and max_token_chars "
                f">= 1, got {self.max_chars} and {self.max_token_chars}"
            )
        for name in ("max_repetition", "min_function_word_share", "max_number_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ValidationConfig.{name} is a share in [0, 1], got {value}")

    @property
    def char_limit(self) -> int:
        return self.max_chars or 12 * max(self.max_words, 1)


@dataclass
class ValidationResult:
    """The verdict on one generated description.

    ``description`` keeps the tags (whitespace-normalised); ``text`` has all markup stripped and
    is what training reads; ``hallucinated`` holds canonical names of classes mentioned that
    the image lacks; ``tail_mentions`` counts mentions of the image's own tail classes;
    ``repetition`` is :func:`repetition` of ``text``.
    """

    valid: bool
    reasons: list[str] = field(default_factory=list)
    description: str = ""
    text: str = ""
    word_count: int = 0
    tail_mentions: int = 0
    hallucinated: list[str] = field(default_factory=list)
    repetition: float = 0.0


def reason_code(reason: str) -> str:
    """'missing_tail:surfboard' -> 'missing_tail' (for counting rejects by cause)."""
    return reason.split(":", 1)[0]


def _repeated_share(words: list[str], n: int) -> float:
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return (len(grams) - len(set(grams))) / len(grams) if grams else 0.0


def _form_reasons(text: str, words: list[str], share: float, cfg: ValidationConfig) -> list[str]:
    """Characters, tokens, addresses, repetition and prose-likeness of a plain text, given its
    lower-cased words and their repeated 4-gram share."""
    reasons = []
    if len(text) > cfg.char_limit:
        reasons.append(f"too_many_chars:{len(text)}")
    long = next((t for t in text.split() if len(t) > cfg.max_token_chars), None)
    if long is not None:
        reasons.append(f"long_token:{long[:20]}")
    if _URL.search(text):
        reasons.append("url")
    if len(words) < PROSE_MIN_WORDS:
        return reasons
    if share > cfg.max_repetition:
        reasons.append(f"repetitive:{share:.2f}")
    sentences = [tuple(w.lower() for w in _WORD.findall(s)) for s in _SENTENCE_END.split(text)]
    sentences = [s for s in sentences if len(s) >= 4]
    if len(set(sentences)) < len(sentences):
        reasons.append("repeated_sentence")
    if "lorem ipsum" in " ".join(words):
        reasons.append("not_prose:lorem_ipsum")
    function = sum(w in FUNCTION_WORDS for w in words) / len(words)
    if function < cfg.min_function_word_share:
        reasons.append(f"not_prose:function_words={function:.2f}")
    numbers = sum(w.isdigit() for w in words) / len(words)
    if numbers > cfg.max_number_share:
        reasons.append(f"not_prose:numbers={numbers:.2f}")
    return reasons


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
    """The canonical text with ``<tail>`` tags and any other markup (also entity-encoded)
    removed."""
    return _parse(canonicalize(decode_encoded(text))).text


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
    decoded = decode_encoded(raw)
    cleaned = clean(decoded)
    description = normalize_whitespace(cleaned)
    if not description:
        return ValidationResult(valid=False, reasons=["empty"])

    parsed = _parse(description)
    reasons = ["encoded_markup"] if decoded != raw else []
    reasons += parsed.reasons
    if _MARKDOWN.search(cleaned):
        reasons.append("markdown")
    if _PREAMBLE.search(parsed.text):
        reasons.append("preamble")
    if _ROLE_WORD.match(parsed.text):
        reasons.append("role_word")
    reasons += script_reasons(parsed.text)
    if "\ufffd" in parsed.text:
        reasons.append("garbled:replacement_char")

    labels = {int(i) for i in label_ids}
    tails = sorted(i for i in labels if space.is_tail(i))

    for content in parsed.tag_contents:
        if not content:
            reasons.append("empty_tag")
            continue
        found = space.mentions(skeleton(content))
        exact = len(found) == 1 and found[0].start == 0 and found[0].end == len(content)
        if not (exact and found[0].class_id in tails):
            reasons.append(f"tag_not_tail_label:{content}")

    tail_mentions = 0
    covered: set[int] = set()
    untagged: set[int] = set()
    hallucinated: list[str] = []
    for m in space.mentions(skeleton(parsed.text)):
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

    words = [w.lower() for w in _WORD.findall(parsed.text)]
    share = _repeated_share(words, 4)
    word_count = len(words)
    if word_count == 0:
        reasons.append("empty")
    elif word_count < cfg.min_words:
        reasons.append(f"too_short:{word_count}")
    elif word_count > cfg.max_words:
        reasons.append(f"too_long:{word_count}")
    reasons += _form_reasons(parsed.text, words, share, cfg)

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
        repetition=share,
    )


def repetition(text: str | None, n: int = 4) -> float:
    """Share of a text's word n-grams that repeat an earlier one (0: none; degenerate loops such
    as "the person is sitting on a towel. The person is sitting on a towel" score high)."""
    return _repeated_share([w.lower() for w in _WORD.findall(strip_markup(text or ""))], n)


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
            found = space.mentions(skeleton(strip_markup(text)))
            mentions += sum(m.class_id in tails for m in found)
    return mentions / instances if instances else 0.0


# -- deterministic repair ---------------------------------------------------------------------

_EMPHASIS = re.compile(r"\*\*|__|`")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;!?])")  # left where a removed tag stood


@dataclass
class Repair:
    """A repaired text and what was done to it (empty ``repairs``: nothing to repair).

    Codes: ``decode_entities`` (HTML entities, URL-encoded markup), ``strip_control_chars``,
    ``fold_confusables`` (look-alike letters of other scripts inside Latin words),
    ``strip_markdown`` (emphasis and code marks only), ``strip_role_word`` (a leading
    "assistant"), ``strip_chat_tokens``, ``fix_tags`` (stray, unbalanced, nested or misspelled
    ``<tail>`` tags removed), ``untag:<content>`` (tags around text that is not one of the
    image's tail labels removed: a tail name split by a tag is then tagged whole),
    ``tag:<name>`` (the first mention of an untagged tail label tagged).
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


def _glue(a: str, b: str) -> str:
    """Two text pieces that a removed tag separated: a space where two words would touch."""
    return a + " " + b if a and b and a[-1].isalnum() and b[0].isalnum() else a + b


def repair(text: str | None, label_ids: Sequence[int], space: LabelSpace) -> Repair:
    """Fix what can be fixed without a model, deterministically; ``validate`` decides after.

    Entities and URL-encoded markup are decoded; control characters, chat-template tokens, a
    leading role word and markdown emphasis are removed; look-alike letters inside Latin words
    are folded to Latin; a ``<tail>`` pair is kept only when it is well formed, not nested, and
    holds exactly one of the image's tail labels (case, plural and synonyms as
    ``LabelSpace.mentions`` reads them); every other tail tag (and a misspelled one) is removed,
    keeping its words; each tail label left without a tag gets one around its first mention
    (also when a removed tag had split its name). Other markup, missing labels, named classes
    the image lacks, other scripts, repetition and lengths are not touched: those stay invalid.
    """
    raw = text or ""
    repairs: list[str] = []
    decoded = decode_encoded(raw)
    if decoded != raw:
        repairs.append("decode_entities")
    if any(map(invisible, decoded)):
        repairs.append("strip_control_chars")
    s = canonicalize(decoded)
    folded = fold_mixed_words(s)
    if folded != s:
        s = folded
        repairs.append("fold_confusables")
    if _EMPHASIS.search(s):
        s = normalize_whitespace(_EMPHASIS.sub("", s))
        repairs.append("strip_markdown")
    role = _ROLE_WORD.match(s)
    if role and role.end():
        s = s[role.end() :]
        repairs.append("strip_role_word")
    tails = {int(i) for i in label_ids if space.is_tail(int(i))}

    def tail_label(content: str) -> int | None:
        found = space.mentions(skeleton(content))
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

    # text that removed tags left in pieces is one text again, so a split name reads whole
    merged: list[tuple] = []
    for piece in pieces:
        if piece[0] == "text" and merged and merged[-1][0] == "text":
            merged[-1] = ("text", _glue(merged[-1][1], piece[1]))
        else:
            merged.append(piece)
    pieces = merged

    covered = {p[1] for p in pieces if p[0] == "tag"}
    for class_id in sorted(tails - covered):
        for k, piece in enumerate(pieces):
            if piece[0] != "text":
                continue
            words = piece[1]
            found = space.mentions(skeleton(words))
            hit = next((m for m in found if m.class_id == class_id), None)
            if hit is not None:
                pieces[k : k + 1] = [
                    ("text", words[: hit.start]),
                    ("tag", class_id, words[hit.start : hit.end]),
                    ("text", words[hit.end :]),
                ]
                repairs.append(f"tag:{space.names[class_id]}")
                break
    out = _join([f"<tail> {p[2]} </tail>" if p[0] == "tag" else p[1] for p in pieces])
    return Repair(out, repairs)

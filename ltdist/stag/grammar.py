"""Per-sample grammars for constrained STAG decoding, and the words a sample must not use.

A sample's grammar (xgrammar EBNF, the dialect vLLM's structured outputs and xgrammar's
transformers logits processor take) admits only texts that pass ``validate`` on markup and
length: plain prose of ``min_words``..``max_words`` words (counted as the validator counts
them; the words before and between the tags do not count toward the minimum) that opens with
the image's tail labels, each written once as ``<tail> name </tail>`` in the prompt's order
with at most ``gap_words`` words before and between them, then continues freely and ends with
a short word and a full stop. Words are ``[A-Za-z0-9]+`` with one optional ``-`` or ``'`` part
and one optional ``, . ; ! ?``; there is no ``<``, ``>``, ``*``, backtick, ``#`` or newline
anywhere, so no other markup can appear. The first free word starts with a letter ("1. " at
the start would read as a markdown list) and has no punctuation ("Sure," / "Okay." would read
as a chatty preamble).

What a grammar cannot say is which *other* class names to avoid (that depends on the whole
label set, not only the tails, and would make grammars per label set): ``banned_words`` lists
them for the engines' bad-words filters, and ``validate`` still checks hallucinations.

Forms chosen by measurement (xgrammar 0.2.8, SmolLM2 vocabulary, 2 CPU cores): repetition
written space-first, ``(" " wd){a,b}``; the word-then-space form ``(wd " "){0,6}`` in front
of a literal cost ~35 ms of mask computation per token instead of ~50 us. Native bounded
repetition ``{48,72}`` compiles in ~50 ms; expanding it into chained rules took 16 s. Only the
last word has a length bound (every word bounded: ~1 ms per token); without it a model that
reaches the word cap glues its sentence into one long last word.

Grammars depend only on the tail-label tuple and the settings, so ``GrammarCache`` builds each
once; engines that cache compiled grammars by their text (vLLM's xgrammar backend, our
transformers engine) then compile each distinct tail set once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ltdist.entry import UserError
from ltdist.labels import LabelSpace
from ltdist.stag.validate import count_words

GRAMMAR_VERSION = "stag-grammar-v1"


@dataclass
class ConstraintConfig:
    """Constrained decoding: ``grammar`` per sample, ``ban_absent_classes`` as bad words."""

    grammar: bool = True
    ban_absent_classes: bool = True
    gap_words: int = 6  # at most this many words before the first tail tag and between tags
    last_word_max_chars: int = 12

    def __post_init__(self) -> None:
        if self.gap_words < 0:
            raise ValueError(f"ConstraintConfig.gap_words must be >= 0, got {self.gap_words}")
        if self.last_word_max_chars < 1:
            raise ValueError(
                f"ConstraintConfig.last_word_max_chars must be >= 1, got {self.last_word_max_chars}"
            )


class GrammarError(UserError, ValueError):
    """No grammar can satisfy the settings for this tail set (e.g. its names alone exceed
    ``max_words``), or the built grammar does not parse."""


_WORD_CORE = "[A-Za-z0-9]+ ([-'] [A-Za-z0-9]+)?"
_PUNCT = "[,.;!?]?"


def _literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def stag_grammar(
    tail_names: Sequence[str],
    min_words: int,
    max_words: int,
    gap_words: int = 6,
    last_word_max_chars: int = 12,
) -> str:
    """The EBNF of the descriptions that pass validation for an image with these tail names."""
    names = list(tail_names)
    for name in names:
        if not name.strip() or any(c in name for c in "<>\n"):
            raise GrammarError(f"tail label {name!r} cannot be written inside <tail> tags")
    n = len(names)
    label_words = sum(count_words(name) for name in names)
    # The free words after the tags: lo..hi of them (the last one included).
    lo = max(min_words - label_words, 2)
    if label_words + lo > max_words:
        raise GrammarError(
            f"{n} tail labels take {label_words} words: no room for a description of "
            f"{min_words}..{max_words} words"
        )
    gap = gap_words if n == 0 else min(gap_words, max(0, (max_words - label_words - lo) // n))
    hi = max_words - label_words - gap * n
    rules = [
        "first ::= [A-Za-z] [A-Za-z0-9]* ([-'] [A-Za-z0-9]+)?",
        f"wd ::= {_WORD_CORE} {_PUNCT}",
        f'last ::= [A-Za-z0-9]{{1,{last_word_max_chars}}} "."',
    ]
    if n == 0:
        root = f'first (" " wd){{{lo - 2},{hi - 2}}} " " last'
    else:
        parts = [f'(first (" " wd){{0,{gap - 1}}} " ")?' if gap else ""]
        for i, name in enumerate(names):
            if i:
                parts.append(f'(" " wd){{0,{gap}}} " "' if gap else '" "')
            parts.append(f"{_literal('<tail> ' + name + ' </tail>')} {_PUNCT}")
        parts.append(f'(" " wd){{{lo - 1},{hi - 1}}} " " last')
        root = " ".join(p for p in parts if p)
    return "\n".join([f"root ::= {root}", *rules])


def check_grammar(ebnf: str) -> None:
    """Parse the grammar with xgrammar when it is installed (one malformed grammar fails a whole
    vLLM generate call, so it is caught here, per sample)."""
    try:
        import xgrammar
    except ImportError:
        return
    try:
        xgrammar.Grammar.from_ebnf(ebnf)
    except RuntimeError as e:
        raise GrammarError(f"grammar does not parse: {e}") from e


class GrammarCache:
    """Grammar texts by tail-label tuple; ``builds`` counts the distinct grammars made.

    A tail set whose grammar cannot exist maps to None (the sample is then generated
    unconstrained and validated as usual); ``impossible`` counts those.
    """

    def __init__(self, cfg: ConstraintConfig, min_words: int, max_words: int, maxsize=65536):
        self.cfg, self.min_words, self.max_words = cfg, min_words, max_words
        self._get = functools.lru_cache(maxsize=maxsize)(self._build)
        self.impossible = 0

    def _build(self, tail_names: tuple[str, ...]) -> str | None:
        try:
            ebnf = stag_grammar(
                tail_names,
                self.min_words,
                self.max_words,
                self.cfg.gap_words,
                self.cfg.last_word_max_chars,
            )
            check_grammar(ebnf)
        except GrammarError:
            self.impossible += 1
            return None
        return ebnf

    def get(self, tail_names: Sequence[str]) -> str | None:
        return self._get(tuple(tail_names))

    @property
    def builds(self) -> int:
        return self._get.cache_info().misses - self.impossible


def banned_words(
    label_ids: Sequence[int], space: LabelSpace, allow_parts_of_present: bool = False
) -> list[str]:
    """Names of the label-space classes the image lacks, as bad words for the engines.

    Every alias (name, display name, synonyms) in lower case, capitalised, with 's', and in
    capitals when it is an acronym of at most 3 letters ('TV'); engines add the leading-space
    forms. A name that is part of a present class's alias ('bear' for an image with 'teddy
    bear' but no bear) is banned too: the validator counts it as a hallucination, and a
    grammar still writes the present name's tag (through the other tokenisations of its
    words). Without a grammar, ``allow_parts_of_present`` keeps such names allowed so that
    the model can write the present name at all.
    """
    present = {int(i) for i in label_ids}
    kept = [
        f" {' '.join(alias.lower().split())} "
        for i in present
        for alias in (space.names[i], space.display_names[i], *space.synonyms[i])
    ]
    words: dict[str, None] = {}
    for i in range(space.num_classes):
        if i in present:
            continue
        for alias in (space.names[i], space.display_names[i], *space.synonyms[i]):
            base = " ".join(alias.lower().split())
            if not base or (allow_parts_of_present and any(f" {base} " in k for k in kept)):
                continue
            for form in (base, base + "s"):
                words[form] = None
                words[form[0].upper() + form[1:]] = None
            if len(base) <= 3 and base.isalpha():
                words[base.upper()] = None
    return list(words)

"""The canonical form of a generated text, and the skeleton class names are matched on.

Canonical (what is checked and written): Unicode NFKC (full-width letters and brackets become
ASCII), bracket look-alikes (``‹tail›``, ``⟨tail⟩``, ``[tail]``) folded to ``<tail>``, control
characters turned into spaces (a NUL never glues two words), format characters, surrogates,
private-use and unassigned code points and stray combining marks removed, whitespace collapsed.
Encoded markup (HTML / numeric entities, URL-encoding) is decoded separately, so a validator can
say it was there. The skeleton folds Cyrillic / Greek look-alike letters and Latin diacritics to
a-z, one character for one, so "сat" with a Cyrillic "с" still reads as a cat.
"""

from __future__ import annotations

import functools
import html
import re
import unicodedata
import urllib.parse

_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]{1,31});?")
_PERCENT_MARKUP = re.compile(r"%(?:3c|3e|2f)", re.IGNORECASE)  # URL-encoded '<', '>', '/'

# Letters of other scripts that render like a Latin letter (Unicode confusables, the clear ones).
_CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "е": "e", "к": "k", "м": "m", "н": "h", "о": "o", "р": "p", "с": "c",
    "т": "t", "у": "y", "х": "x", "ѕ": "s", "і": "i", "ј": "j", "ԁ": "d", "һ": "h", "ԛ": "q",
    "ԝ": "w", "ӏ": "l", "ь": "b", "ү": "y",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P", "С": "C",
    "Т": "T", "Х": "X", "У": "Y", "Ѕ": "S", "І": "I", "Ј": "J", "Ԛ": "Q", "Ԝ": "W", "Ӏ": "I",
    # Greek
    "α": "a", "ο": "o", "ν": "v", "ι": "i", "κ": "k", "ρ": "p", "τ": "t", "υ": "u", "χ": "x",
    "ε": "e", "ϲ": "c", "ϳ": "j",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N",
    "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X", "Ϲ": "C",
    # Armenian
    "օ": "o", "ս": "u", "հ": "h", "ո": "n", "ց": "g",
    # Latin letters outside a-z that read as one
    "ı": "i", "ȷ": "j", "ɑ": "a", "ɡ": "g", "ʏ": "y", "ɪ": "i",
}  # fmt: skip
# Bracket look-alikes NFKC leaves alone, folded to ASCII so tags written with them are read.
_BRACKETS = str.maketrans({"‹": "<", "›": ">", "⟨": "<", "⟩": ">", "〈": "<", "〉": ">"})
_SQUARE_TAG = re.compile(r"\[\s*(/?)\s*tail\s*\]", re.IGNORECASE)


def _drop(ch: str) -> bool:
    """Format characters (zero-width, bidi overrides, tags), surrogates, private-use and
    unassigned code points: never part of a text."""
    return unicodedata.category(ch) in ("Cf", "Cs", "Co", "Cn")


def invisible(ch: str) -> bool:
    return not ch.isspace() and (unicodedata.category(ch) == "Cc" or _drop(ch))


def normalize_whitespace(text: str) -> str:
    """Control characters become spaces (a NUL never glues two words), invisible characters
    (:func:`_drop`) go, and whitespace collapses to single spaces."""
    out = []
    for ch in text:
        if ch.isspace() or unicodedata.category(ch) == "Cc":
            out.append(" ")
        elif not _drop(ch):
            out.append(ch)
    return " ".join("".join(out).split())


def decode_encoded(text: str) -> str:
    """HTML named and numeric entities decoded (up to three layers: ``&amp;lt;``), and URL
    percent-encoding where it encodes markup (``%3Ctail%3E``)."""
    for _ in range(3):
        if not _ENTITY.search(text):
            break
        decoded = html.unescape(text)
        if decoded == text:
            break
        text = decoded
    if _PERCENT_MARKUP.search(text):
        text = urllib.parse.unquote(text)
    return text


def clean(text: str) -> str:
    """NFKC, bracket look-alikes folded, stray combining marks removed; lines kept."""
    # lone surrogates cannot be normalised: drop them first
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cs")
    text = unicodedata.normalize("NFKC", text).translate(_BRACKETS)
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Mn", "Me"))
    return _SQUARE_TAG.sub(r"<\1tail>", text)


def canonicalize(text: str) -> str:
    """The canonical form of a text, which is what is checked and written (see the module
    docstring); encoded markup is not decoded here (:func:`decode_encoded`)."""
    return normalize_whitespace(clean(text))


@functools.lru_cache(maxsize=8192)
def _fold(ch: str) -> str:
    if ch in _CONFUSABLES:
        return _CONFUSABLES[ch]
    if ch.isalpha() and not ch.isascii():
        base = unicodedata.normalize("NFD", ch)[0]
        if base.isascii():
            return base
    return ch


def skeleton(text: str) -> str:
    """``text`` with look-alike letters of other scripts and Latin diacritics folded to a-z,
    one character for one (positions are kept): what class names are matched against."""
    return "".join(map(_fold, text))


@functools.lru_cache(maxsize=8192)
def _latin(ch: str) -> bool:
    return ch not in _CONFUSABLES and unicodedata.name(ch, "").startswith("LATIN")


_LETTERS = re.compile(r"[^\W\d_]+")


def _script(word: str) -> str:
    """'latin'; 'mixed' (Latin with look-alikes only: foldable); or 'foreign'."""
    foreign = [ch for ch in word if not _latin(ch)]
    if not foreign:
        return "latin"
    if len(foreign) < len(word) and all(ch in _CONFUSABLES for ch in foreign):
        return "mixed"
    return "foreign"


def fold_mixed_words(text: str) -> str:
    return _LETTERS.sub(
        lambda m: skeleton(m.group(0)) if _script(m.group(0)) == "mixed" else m.group(0), text
    )


def script_reasons(text: str, limit: int = 3) -> list[str]:
    found: dict[str, list[str]] = {"mixed": [], "foreign": []}
    for m in _LETTERS.finditer(text):
        kind = _script(m.group(0))
        if kind != "latin" and len(found[kind]) < limit and m.group(0) not in found[kind]:
            found[kind].append(m.group(0))
    return [f"mixed_script:{w}" for w in found["mixed"]] + [
        f"non_latin:{w}" for w in found["foreign"]
    ]

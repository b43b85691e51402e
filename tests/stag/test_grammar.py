"""ltdist.stag.grammar: what the per-sample grammars accept and reject (xgrammar, gen env), and
the grammar cache, settings and banned words (both envs)."""

from __future__ import annotations

import pytest

from ltdist.labels import LabelSpace
from ltdist.stag.grammar import (
    ConstraintConfig,
    GrammarCache,
    GrammarError,
    banned_words,
    check_grammar,
    stag_grammar,
)
from ltdist.stag.validate import ValidationConfig, count_words, strip_markup, validate

from .conftest import BEAR, CAR, DOG, DRIER, HOT_DOG, NAMES, PERSON, SURFBOARD, TEDDY

# Small bounds keep the texts short; GAP words at most before and between the tags.
MIN, MAX, GAP, LAST = 10, 20, 3, 8
TAIL_IDS = {"surfboard": SURFBOARD, "hair drier": DRIER, "teddy bear": TEDDY, "bear": BEAR}
# Prose words that name no class (the validator would call them hallucinations otherwise),
# with the hyphen, apostrophe and punctuation forms the grammar allows.
# Long enough that no 4-gram repeats in a text (the validator rejects loops).
FILLER = (
    "the well-lit beach is calm; it's warm and quiet under a pale sky, with soft waves "
    "rolling toward shore slowly while gulls circle above the dunes and a light breeze moves "
    "through tall grass near an old wooden fence, where shells lie scattered in small heaps "
    "beside faded towels, and distant boats drift past the rocky point as evening light turns "
    "gold over the water's edge before the tide comes back in again tonight"
).split()


def words(n: int, start: int = 0) -> list[str]:
    return [FILLER[(start + i) % len(FILLER)] for i in range(n)]


def describe(tails, free: int, lead: int = 0, between: int = 0, after_tag: str = "", last="sand."):
    """``lead`` words, the tail tags in order (``between`` words between two tags, ``after_tag``
    glued after each), then ``free`` words of which the last is ``last``."""
    parts = words(lead)
    for k, name in enumerate(tails):
        if k:
            parts += words(between, start=7)
        parts.append(f"<tail> {name} </tail>{after_tag}")
    parts += [*words(free - 1, start=3), last]
    text = " ".join(parts)
    return text[0].upper() + text[1:]


def n_words(text: str) -> int:
    """Words as the validator counts them."""
    return count_words(strip_markup(text))


def label_words(tails) -> int:
    return sum(len(name.split()) for name in tails)


def labels_of(tails) -> list[int]:
    return [PERSON, *(TAIL_IDS[name] for name in tails)]


def grammar(tails, min_words=MIN, max_words=MAX):
    return stag_grammar(tails, min_words, max_words, GAP, LAST)


@pytest.fixture(scope="module")
def accepts():
    """Whether a grammar accepts a whole string (and may end there).

    ``_is_grammar_accept_string`` is a private test helper of xgrammar 0.2.8 (the version the
    gen env pins); it may move or change in another version.
    """
    from xgrammar.testing import _is_grammar_accept_string

    return _is_grammar_accept_string


# -- acceptance (xgrammar) --------------------------------------------------------------------

TAIL_SETS = [(), ("teddy bear",), ("surfboard", "hair drier"), ("hair drier", "teddy bear")]


@pytest.mark.gen_env
@pytest.mark.parametrize("tails", TAIL_SETS, ids=lambda t: "+".join(t) or "none")
def test_grammar_accepts_valid_descriptions_at_both_bounds(space, accepts, tails):
    g = grammar(tails)
    n = len(tails)
    # the minimum: the words before and between the tags would not count, so none here
    shortest = describe(tails, free=MIN - label_words(tails))
    # the maximum: every gap filled
    lead = GAP if n else 0
    longest = describe(tails, free=MAX - label_words(tails) - GAP * n, lead=lead, between=GAP)
    # in between: one lead word, punctuation right after the tags
    middle = describe(tails, free=MIN - label_words(tails) + 2, lead=1, between=1, after_tag=",")
    assert (n_words(shortest), n_words(longest)) == (MIN, MAX)
    assert MIN < n_words(middle) < MAX
    cfg = ValidationConfig(min_words=MIN, max_words=MAX)
    for text in (shortest, longest, middle):
        assert accepts(g, text), text
        r = validate(text, labels_of(tails), space, cfg)
        assert r.valid and r.reasons == [], (text, r.reasons)
        assert r.tail_mentions == n


@pytest.mark.gen_env
def test_grammar_accepts_hyphens_apostrophes_and_punctuation(space, accepts):
    text = (
        "It's well-lit. <tail> surfboard </tail>; a sun-bleached <tail> hair drier "
        "</tail>! Waves roll in, it's calm, the owner's dog-eared book lies open on sand."
    )
    g = grammar(("surfboard", "hair drier"), max_words=30)
    assert accepts(g, text)
    # "dog-eared" is one word and no dog: the validator agrees
    r = validate(text, [PERSON, SURFBOARD, DRIER], space, ValidationConfig(MIN, 30))
    assert r.valid, r.reasons


@pytest.mark.gen_env
def test_grammar_with_the_default_bounds(space, accepts):
    cfg = ConstraintConfig()
    tails = ("surfboard", "hair drier")
    g = stag_grammar(tails, 50, 80, cfg.gap_words, cfg.last_word_max_chars)
    shortest, longest = describe(tails, free=47), describe(tails, free=65, lead=6, between=6)
    assert (n_words(shortest), n_words(longest)) == (50, 80)
    for text in (shortest, longest):
        assert accepts(g, text)
        assert validate(text, labels_of(tails), space, ValidationConfig(50, 80)).valid
    assert not accepts(g, describe(tails, free=46))
    assert not accepts(g, describe(tails, free=66, lead=6, between=6))


# A valid description for the tails (surfboard, hair drier): 3 lead words, 2 between the tags,
# 8 free words after them (MIN..MAX allow 7..11 there).
TWO = ("surfboard", "hair drier")
BASE = (
    "A surfer carries <tail> surfboard </tail> past a <tail> hair drier </tail>, it's a "
    "well-lit and quiet beach at dusk."
)
REJECTED = {
    "tail_tag_missing": BASE.replace("<tail> hair drier </tail>", "towel"),
    "tail_untagged": BASE.replace("<tail> surfboard </tail>", "surfboard"),
    "head_class_tagged": BASE.replace("A surfer carries", "A <tail> person </tail> carries"),
    "head_class_instead": BASE.replace("<tail> surfboard </tail>", "<tail> person </tail>"),
    "misspelled_tag": BASE.replace("<tail> surfboard </tail>", "<tial> surfboard </tial>"),
    "html_markup": BASE.replace("quiet", "<b>quiet</b>"),
    "chat_token": BASE + "<|im_end|>",
    "chat_token_spaced": BASE + " <|im_end|>",
    "markdown_bold": BASE.replace("quiet", "**quiet**"),
    "markdown_numbered": BASE.replace("A surfer carries", "1. surfer carries"),
    "markdown_bullet": BASE.replace("A surfer carries", "- surfer carries"),
    "newline": BASE.replace(" past", "\npast"),
    "wrong_order": BASE.replace("surfboard", "@")
    .replace("hair drier", "surfboard")
    .replace("@", "hair drier"),
    "no_full_stop": BASE[:-1],
    "empty": "",
    "space_only": " ",
    "too_many_lead_words": BASE.replace("A surfer carries", "A young surfer carries"),
    # a chatty preamble ('Sure,' / 'Okay.'): the first word takes no punctuation
    "preamble_sure": BASE.replace("A surfer carries", "Sure, surfer carries"),
    "preamble_okay": BASE.replace("A surfer carries", "Okay. surfer carries"),
}


@pytest.mark.gen_env
def test_base_text_is_accepted_and_valid(space, accepts):
    assert accepts(grammar(TWO), BASE)
    assert validate(BASE, [PERSON, SURFBOARD, DRIER], space, ValidationConfig(MIN, MAX)).valid


@pytest.mark.gen_env
@pytest.mark.parametrize("text", list(REJECTED.values()), ids=list(REJECTED))
def test_grammar_rejects(accepts, text):
    assert text != BASE
    if text.strip():
        assert MIN <= n_words(text) <= MAX  # rejected for its form, not its length
    assert not accepts(grammar(TWO), text)


@pytest.mark.gen_env
def test_truncated_text_is_only_a_prefix(accepts):
    g = grammar(TWO)
    for cut in (BASE[:-1], BASE[: BASE.index(" quiet")], BASE[: BASE.index("hair")]):
        assert not accepts(g, cut)
        assert accepts(g, cut, require_termination=False)  # the model could still finish it


@pytest.mark.gen_env
@pytest.mark.parametrize("tails", TAIL_SETS, ids=lambda t: "+".join(t) or "none")
def test_grammar_rejects_one_word_off_the_bounds(accepts, tails):
    g = grammar(tails)
    n = len(tails)
    too_short = describe(tails, free=MIN - label_words(tails) - 1)
    lead = GAP if n else 0
    too_long = describe(tails, free=MAX - label_words(tails) - GAP * n + 1, lead=lead, between=GAP)
    assert n_words(too_short) == MIN - 1
    assert n_words(too_long) == MAX + 1
    assert not accepts(g, too_short)
    assert not accepts(g, too_long)


@pytest.mark.gen_env
def test_last_word_length_bound(accepts):
    g = grammar(TWO)
    ok = describe(TWO, free=8, last="seashore.")  # 8 characters
    too_long = describe(TWO, free=8, last="seashores.")  # 9
    assert accepts(g, ok)
    assert not accepts(g, too_long)
    assert not accepts(g, describe(TWO, free=8, last="sea-shore."))  # one plain word only


@pytest.mark.gen_env
def test_labels_with_quotes_and_backslashes_are_escaped(accepts):
    name = 'the "big" \\ board'
    g = grammar((name,))
    check_grammar(g)  # parses
    text = f"<tail> {name} </tail> " + " ".join(words(MIN - 4, start=2)) + " sand."
    assert n_words(text) == MIN
    assert accepts(g, text)
    assert not accepts(g, text.replace('"big"', "big"))


@pytest.mark.gen_env
@pytest.mark.parametrize("ebnf", ["root ::= (", 'root ::= "a" undefined_rule', "no rules here"])
def test_check_grammar_rejects_broken_grammars(ebnf):
    with pytest.raises(GrammarError, match="does not parse"):
        check_grammar(ebnf)


@pytest.mark.gen_env
def test_check_grammar_accepts_built_grammars():
    for tails in TAIL_SETS:
        check_grammar(grammar(tails))


# -- building, caching, settings (both envs) --------------------------------------------------


@pytest.mark.both_envs
@pytest.mark.parametrize("name", ["hair <drier", "hair drier>", "<tail> x", "two\nlines", "  "])
def test_unwritable_tail_names_raise(name):
    with pytest.raises(GrammarError, match="cannot be written"):
        stag_grammar([name], MIN, MAX)


@pytest.mark.both_envs
def test_tail_names_longer_than_the_word_cap_raise():
    # the names' words plus at least two free words must fit into max_words
    assert stag_grammar(["hair drier"], 3, 4)
    with pytest.raises(GrammarError, match="no room"):
        stag_grammar(["hair drier"], 3, 3)
    with pytest.raises(GrammarError, match="no room"):
        stag_grammar(["hair drier", "teddy bear", "surfboard"], 5, 6)


@pytest.mark.both_envs
def test_grammar_cache_builds_each_tail_set_once():
    cfg = ConstraintConfig()
    cache = GrammarCache(cfg, 50, 80)
    first = cache.get(("surfboard",))
    assert first == stag_grammar(["surfboard"], 50, 80, cfg.gap_words, cfg.last_word_max_chars)
    assert cache.get(["surfboard"]) is first  # a list is the same key as the tuple
    other = cache.get(("hair drier", "surfboard"))
    assert other != first
    assert cache.get(("surfboard", "hair drier")) != other  # order matters
    assert cache.builds == 3
    assert cache.get(("hair drier", "surfboard")) is other
    assert cache.builds == 3


@pytest.mark.both_envs
def test_grammar_cache_impossible_tail_sets_map_to_none():
    cache = GrammarCache(ConstraintConfig(), 50, 80)
    assert cache.get(("surfboard",)) is not None
    assert cache.get(("hair <drier",)) is None
    assert cache.get(("hair drier",) * 40) is None  # 80 words of names: no room
    assert cache.get(("hair <drier",)) is None
    assert cache.builds == 1
    assert cache.impossible == 2


@pytest.mark.both_envs
def test_constraint_config_checks():
    with pytest.raises(ValueError, match="gap_words"):
        ConstraintConfig(gap_words=-1)
    with pytest.raises(ValueError, match="last_word_max_chars"):
        ConstraintConfig(last_word_max_chars=0)
    cfg = ConstraintConfig(gap_words=0, last_word_max_chars=1)
    assert (cfg.gap_words, cfg.last_word_max_chars) == (0, 1)


# -- banned words (both envs) ----------------------------------------------------------------


@pytest.mark.both_envs
def test_banned_words_ban_parts_of_present_names_unless_asked(space):
    # with a grammar (the default) 'dog' is banned for an image with 'hot dog' but no dog:
    # the validator reads a lone 'dog' as a hallucination, and the grammar still writes the tag
    banned = set(banned_words([PERSON, HOT_DOG], space))
    assert {"dog", "Dog", "dogs", "car", "Cars", "surfboard", "teddy bear", "bear"} <= banned
    assert not banned & {"person", "hot dog", "Hot dog"}
    # without a grammar the parts of present names stay writable
    banned = set(banned_words([PERSON, HOT_DOG], space, allow_parts_of_present=True))
    assert not banned & {"dog", "Dog", "dogs", "Dogs", "person", "hot dog", "Hot dog"}
    for word in ("car", "Car", "cars", "Cars", "surfboard", "Surfboards", "teddy bear", "bear"):
        assert word in banned, word


@pytest.mark.both_envs
def test_banned_words_absent_compound_name(space):
    banned = set(banned_words([PERSON, DOG], space))
    assert {"hot dog", "Hot dog", "hot dogs"} <= banned
    assert not banned & {"dog", "Dog", "dogs", "person"}
    assert {"bear", "Bear", "bears"} <= set(banned_words([TEDDY], space))
    allowed = set(banned_words([TEDDY], space, allow_parts_of_present=True))
    assert not allowed & {"bear", "Bear", "bears", "teddy bear"}


@pytest.mark.both_envs
def test_banned_words_spell_short_acronyms_in_capitals():
    s = LabelSpace.from_label_sets(["tv", "person"], [[0]] * 3 + [[1]] * 300)
    assert {"tv", "Tv", "TV", "tvs", "television", "Television"} <= set(banned_words([1], s))
    assert "PERSON" not in banned_words([0], s)


@pytest.mark.both_envs
def test_banned_words_include_synonyms_of_absent_classes(space):
    banned = set(banned_words([PERSON], space))
    for word in ("hair drier", "hair dryer", "Hair dryer", "hair dryers", "hairdryer"):
        assert word in banned, word
    banned = set(banned_words([PERSON, DRIER], space))
    assert not banned & {"hair drier", "hair dryer", "hairdryer", "Hairdryers"}


@pytest.mark.both_envs
def test_banned_words_all_and_nothing(space):
    assert banned_words(range(len(NAMES)), space) == []
    banned = banned_words([], space)
    expected = set()
    for name in [*NAMES, "hair dryer", "hairdryer"]:
        for form in (name, name + "s"):
            expected |= {form, form[0].upper() + form[1:]}
        if len(name) <= 3:  # 'dog', 'car': acronym-length names in capitals too
            expected.add(name.upper())
    assert sorted(banned) == sorted(expected)
    assert len(banned) == len(set(banned))


@pytest.mark.both_envs
@pytest.mark.parametrize("labels", [[PERSON, HOT_DOG], [PERSON, DOG, SURFBOARD], [TEDDY, CAR]])
def test_every_banned_word_is_a_hallucination_for_the_validator(space, labels):
    cfg = ValidationConfig(min_words=1, max_words=20, require_tail_tags=False)
    for word in banned_words(labels, space):
        r = validate(f"Nearby there is a {word} today.", labels, space, cfg)
        assert r.hallucinated, word

"""ltdist.stag.validate: adversarial LLM outputs, tag stripping, word counts, mention rate."""

from __future__ import annotations

import pytest

from ltdist.stag.validate import (
    REASON_CODES,
    ValidationConfig,
    normalize_whitespace,
    reason_code,
    repair,
    repetition,
    strip_markup,
    tail_mention_rate,
    validate,
)

from .conftest import BEAR, DOG, DRIER, NAMES, PERSON, SURFBOARD

pytestmark = pytest.mark.both_envs


LABELS = [PERSON, DOG, SURFBOARD]
VALID = (
    "A bright yellow <tail> surfboard </tail> lies across the sand in the foreground, its "
    "waxed deck catching the afternoon sun. A young person kneels beside the <tail> surfboard "
    "</tail>, fastening the leash around one ankle while a playful dog sniffs at the fin and "
    "wags its tail. Behind them, gentle waves roll toward the shore under a pale sky, and a "
    "few footprints trace a path from the water to the spot where the group rests."
)
VALID_PLAIN = VALID.replace("<tail> ", "").replace(" </tail>", "")


def check(space, text, labels=LABELS, **cfg):
    return validate(text, labels, space, ValidationConfig(**cfg))


def codes(result) -> list[str]:
    return [reason_code(r) for r in result.reasons]


def test_valid_sample_passes(space):
    r = check(space, VALID)
    assert r.valid, r.reasons
    assert r.reasons == []
    assert r.description == " ".join(VALID.split())
    assert r.text == VALID_PLAIN
    assert r.tail_mentions == 2
    assert r.hallucinated == []
    assert 50 <= r.word_count <= 80


def test_tags_stripped_and_word_count_excludes_tags(space):
    r = check(space, VALID)
    assert "<" not in r.text and "tail>" not in r.text
    assert "surfboard, fastening" in r.text  # no space left before the comma
    assert r.word_count == len(VALID_PLAIN.split())
    assert r.word_count < len(VALID.split())  # the tags would add words
    assert strip_markup(VALID) == r.text
    # a tag glued to words does not glue the words; spaces inside tags are optional
    assert strip_markup("a<tail>surfboard</tail>rides (<tail> dog </tail>).") == (
        "a surfboard rides (dog)."
    )
    assert strip_markup("  two\n\nlines\t<TAIL>x</ Tail >  ") == "two lines x"


def test_tag_names_case_insensitive_and_spaces_optional(space):
    text = VALID.replace("<tail> ", "<TAIL>").replace(" </tail>", "</ Tail >")
    r = check(space, text)
    assert r.valid, r.reasons
    assert r.text == VALID_PLAIN


def test_plural_and_synonym_tags_accepted(space):
    text = VALID.replace("<tail> surfboard </tail>", "<tail> surfboards </tail>", 1)
    assert check(space, text).valid
    drier = VALID + " A <tail> hair dryer </tail> hangs on a hook."
    r = check(space, drier, labels=LABELS + [DRIER], max_words=100)
    assert r.valid, r.reasons


def test_unbalanced_tags(space):
    open_only = VALID.replace(" </tail>", "", 1)
    assert "unbalanced_tags" in check(space, open_only).reasons
    close_only = VALID.replace("<tail> ", "", 1)
    r = check(space, close_only)
    assert not r.valid and "unbalanced_tags" in r.reasons
    assert "<" not in r.text


def test_nested_tags(space):
    text = VALID.replace("<tail> surfboard </tail>", "<tail> <tail> surfboard </tail> </tail>", 1)
    r = check(space, text)
    assert not r.valid
    assert "nested_tags" in r.reasons


def test_misspelled_tag_name(space):
    text = VALID.replace("<tail>", "<tial>").replace("</tail>", "</tial>")
    r = check(space, text)
    assert not r.valid
    assert "unknown_tag:<tial>" in r.reasons and "unknown_tag:</tial>" in r.reasons
    # the class is named but no longer tagged
    assert "untagged_tail:surfboard" in r.reasons
    assert "<" not in r.text


def test_misspelled_class_in_tag(space):
    text = VALID.replace("<tail> surfboard </tail>", "<tail> surfbord </tail>")
    r = check(space, text)
    assert not r.valid
    assert "tag_not_tail_label:surfbord" in r.reasons
    assert "missing_tail:surfboard" in r.reasons


def test_head_class_tagged(space):
    text = VALID.replace("a playful dog", "a playful <tail> dog </tail>")
    r = check(space, text)
    assert not r.valid
    assert r.reasons == ["tag_not_tail_label:dog"]


def test_tag_wrapping_more_than_the_name_or_empty(space):
    text = VALID.replace("<tail> surfboard </tail> lies", "<tail> surfboard lies </tail>")
    assert "tag_not_tail_label:surfboard lies" in check(space, text).reasons
    assert "empty_tag" in check(space, VALID + " <tail> </tail>").reasons


@pytest.mark.parametrize("text", ["", "   \n\t ", None, "\x00\u200b"])
def test_empty_output(space, text):
    r = check(space, text)
    assert not r.valid
    assert r.reasons == ["empty"]
    assert r.text == "" and r.word_count == 0


def test_markup_only_output_is_empty(space):
    r = check(space, "<tail> </tail>")
    assert not r.valid and "empty" in r.reasons


def test_runaway_length(space):
    text = VALID + " The waves keep rolling." * 100
    r = check(space, text)
    assert not r.valid
    assert r.word_count == len(VALID_PLAIN.split()) + 400
    assert r.reasons == [f"too_long:{r.word_count}"]


def test_too_short(space):
    r = check(space, "A <tail> surfboard </tail> near a person and a dog.")
    assert not r.valid
    assert r.reasons == ["too_short:8"]
    assert check(space, "A <tail> surfboard </tail> near a person.", min_words=5).valid


def test_every_class_named_is_hallucination(space):
    everything = ", ".join(NAMES)
    text = VALID + f" Nearby one can also see a {everything}."
    r = check(space, text, max_words=200)
    lacking = [n for i, n in enumerate(NAMES) if i not in LABELS]
    assert r.hallucinated == lacking
    assert [x for x in r.reasons if x.startswith("hallucination:")] == [
        f"hallucination:{n}" for n in lacking
    ]
    assert not r.valid
    flagged = check(space, text, max_words=200, hallucination="flag")
    assert flagged.valid
    assert "hallucination" in codes(flagged)
    assert flagged.hallucinated == lacking


def test_hot_dog_is_not_dog(space):
    # the image has a dog; 'hot dog' is another class, not a dog mention
    text = VALID.replace("a playful dog sniffs at", "a child eats a hot dog beside")
    r = check(space, text)
    assert r.hallucinated == ["hot dog"]
    assert r.reasons == ["hallucination:hot dog"]
    # 'teddy bear' does not cover the tail label 'bear'
    bear = VALID_PLAIN + " A <tail> teddy bear </tail> sits on a towel."
    r = check(space, bear, labels=[PERSON, DOG, SURFBOARD, BEAR], max_words=100)
    assert "missing_tail:bear" in r.reasons
    assert "tag_not_tail_label:teddy bear" in r.reasons
    assert r.hallucinated == ["teddy bear"]


def test_untagged_tail_mention(space):
    r = check(space, VALID_PLAIN)
    assert not r.valid
    assert r.reasons == ["untagged_tail:surfboard"]
    assert r.tail_mentions == 2
    assert check(space, VALID_PLAIN, require_tail_tags=False).valid
    # tagged once is enough; later untagged mentions are fine
    once = VALID.replace("the <tail> surfboard </tail>,", "the surfboard,")
    assert once.count("<tail>") == 1
    assert check(space, once).valid


def test_missing_tail(space):
    text = VALID_PLAIN.replace("surfboard", "board")
    r = check(space, text)
    assert r.reasons == ["missing_tail:surfboard"]
    assert r.tail_mentions == 0


@pytest.mark.parametrize(
    "junk",
    [
        "<|im_end|>",
        "<|im_start|>assistant",
        "<｜end▁of▁sentence｜>",
        "[INST]",
        "<think>ok</think>",
        "</s>",
        "a < b",
    ],
)
def test_chat_tokens_and_other_markup_are_invalid(space, junk):
    r = check(space, VALID + " " + junk)
    assert not r.valid
    assert "unknown_tag" in codes(r), r.reasons
    assert "<" not in r.text and "｜" not in r.text and "[INST]" not in r.text


def test_markdown_and_preamble(space):
    assert "markdown" in check(space, VALID.replace("bright yellow", "**bright yellow**")).reasons
    assert "markdown" in check(space, "- " + VALID).reasons
    r = check(space, "Here is the description: " + VALID, max_words=100)
    assert r.reasons == ["preamble"]
    assert check(space, "Sure! " + VALID).reasons == ["preamble"]
    # 'sure-footed' is prose, not a preamble
    assert check(space, "Sure-footed, " + VALID, max_words=100).valid


def test_no_tail_labels_needs_no_tags(space):
    r = check(space, VALID_PLAIN.replace("surfboard", "board"), labels=[PERSON, DOG])
    assert r.valid, r.reasons
    r = check(space, VALID.replace("surfboard", "dog"), labels=[PERSON, DOG])
    assert "tag_not_tail_label:dog" in r.reasons


def test_reasons_use_known_codes(space):
    texts = [VALID + " <b> <|x|> hot dog", VALID.replace("</tail>", ""), "x", VALID_PLAIN]
    for t in texts:
        for reason in check(space, t).reasons:
            assert reason_code(reason) in REASON_CODES, reason


def test_config_checks():
    with pytest.raises(ValueError, match="min_words"):
        ValidationConfig(min_words=90, max_words=80)
    with pytest.raises(ValueError, match="hallucination"):
        ValidationConfig(hallucination="ignore")


def test_tail_mention_rate_hand_count(space):
    texts = [
        "A surfboard and another surfboard on the beach with a person.",  # 2 of surfboard
        "A <tail> bear </tail> near a teddy bear and a <tail> hair dryer </tail>.",  # 1 + 1
        None,  # 0 mentions, 1 instance (surfboard)
        "A person with a dog and a hot dog.",  # no tail labels: 0 instances, hot dog not own
        "Bears, a bear, and a surfboard.",  # bear 2 (surfboard is not this image's)
    ]
    label_sets = [
        [PERSON, SURFBOARD],  # 1 instance
        [BEAR, DRIER, PERSON],  # 2 instances
        [SURFBOARD],  # 1 instance
        [PERSON, DOG],  # 0 instances
        [BEAR],  # 1 instance
    ]
    # mentions 2 + 2 + 0 + 0 + 2 = 6 over 1 + 2 + 1 + 0 + 1 = 5 instances
    assert tail_mention_rate(texts, label_sets, space) == pytest.approx(6 / 5)
    assert tail_mention_rate([None], [[PERSON]], space) == 0.0
    with pytest.raises(ValueError, match="2 texts but 1 label sets"):
        tail_mention_rate(["a", "b"], [[PERSON]], space)


# -- repair -----------------------------------------------------------------------------------

REPAIR_LABELS = [PERSON, SURFBOARD, DRIER]  # tails: surfboard, hair drier
REPAIR_CFG = ValidationConfig(min_words=5, max_words=30)
GOOD = "A person carries a <tail> surfboard </tail> past a <tail> hair drier </tail> on the sand."

# id: (adversarial output, the repairs recorded, in order)
REPAIRABLE = {
    "untagged_plural_and_synonym": (
        "A person carries Surfboards past a hair dryer on the sand.",
        ["tag:surfboard", "tag:hair drier"],
    ),
    "untagged_upper_case": (
        "A person carries a SURFBOARD past a <tail> hair drier </tail>.",
        ["tag:surfboard"],
    ),
    "only_first_mention_tagged": (
        "A surfboard, another surfboard and a <tail> hair drier </tail> on the sand.",
        ["tag:surfboard"],
    ),
    "head_class_tagged": (
        "A <tail> person </tail> carries a <tail> surfboard </tail> past a <tail> hair drier "
        "</tail>.",
        ["untag:person"],
    ),
    "misspelled_tags": (
        "A person carries a <tial>surfboard</tial> past a <tail> hair drier </tail>.",
        ["fix_tags", "tag:surfboard"],
    ),
    "nested_tags": (
        "A person carries a <tail> <tail> surfboard </tail> </tail> past a <tail> hair drier "
        "</tail>.",
        ["fix_tags", "tag:surfboard"],
    ),
    "unclosed_tag": (
        "A person passes a <tail> hair drier </tail> with a <tail> surfboard on the sand.",
        ["fix_tags", "tag:surfboard"],
    ),
    "stray_close_tag": (
        "A person carries a </tail> surfboard past a <tail> hair drier </tail>.",
        ["fix_tags", "tag:surfboard"],
    ),
    "chat_token_at_end": (GOOD + "<|im_end|>", ["strip_chat_tokens"]),
    "inst_token_in_front": ("[INST] " + GOOD, ["strip_chat_tokens"]),
    "bell_character": (GOOD.replace("person", "person\x07"), ["strip_control_chars"]),
    "zero_width_space": (GOOD.replace(" past", "\u200b past"), ["strip_control_chars"]),
    "bold": (GOOD.replace("person", "**person**"), ["strip_markdown"]),
    "all_at_once": (
        "**A** <tail> person </tail> carries a <tial>SURFBOARD</tial> past a hair dryer.<|im_end|>",
        # emphasis first, then the markup in text order, then the tags
        ["strip_markdown", "untag:person", "strip_chat_tokens", "fix_tags", "tag:surfboard",
         "tag:hair drier"],
    ),
}  # fmt: skip


def plain(text: str) -> str:
    """The words a repair must keep: markup stripped, markdown emphasis removed."""
    return strip_markup(text.replace("**", ""))


@pytest.mark.parametrize("text, expected", list(REPAIRABLE.values()), ids=list(REPAIRABLE))
def test_repair_makes_adversarial_outputs_valid(space, text, expected):
    if "strip_control_chars" not in expected:  # validate drops invisible characters itself
        assert not validate(text, REPAIR_LABELS, space, REPAIR_CFG).valid
    fixed = repair(text, REPAIR_LABELS, space)
    r = validate(fixed.text, REPAIR_LABELS, space, REPAIR_CFG)
    assert r.valid, (fixed.text, r.reasons)
    assert set(expected) <= set(fixed.repairs)
    assert plain(fixed.text) == plain(text)  # the words are kept
    assert repair(text, REPAIR_LABELS, space) == fixed  # deterministic
    again = repair(fixed.text, REPAIR_LABELS, space)  # and done in one pass
    assert (again.text, again.repairs) == (fixed.text, [])


@pytest.mark.parametrize("text, expected", list(REPAIRABLE.values()), ids=list(REPAIRABLE))
def test_repair_reports_what_it_did(space, text, expected):
    assert repair(text, REPAIR_LABELS, space).repairs == expected


def test_repair_tags_the_mention_as_written(space):
    fixed = repair("A person carries Surfboards past a hair dryer.", REPAIR_LABELS, space)
    assert fixed.text == (
        "A person carries <tail> Surfboards </tail> past a <tail> hair dryer </tail>."
    )
    fixed = repair("<tail>surfboard</tail>, a <TAIL>hair drier</ Tail >.", REPAIR_LABELS, space)
    assert fixed.text == "<tail> surfboard </tail>, a <tail> hair drier </tail>."


TAGS = "a <tail> surfboard </tail> and a <tail> hair drier </tail>"
UNREPAIRABLE = {
    "missing_tail": ("A person carries a board past a <tail> hair drier </tail>.", "missing_tail"),
    "hallucinated_dog": (f"A person and a dog carry {TAGS} on the sand.", "hallucination"),
    "hallucinated_car": (f"A person loads {TAGS} into the cars.", "hallucination"),
    "too_short": ("<tail> surfboard </tail>, <tail> hair drier </tail>.", "too_short"),
    "too_long": (GOOD + " The waves keep rolling in." * 5, "too_long"),
    "unknown_tag": ("A <b>surfboard</b> lies past a <tail> hair drier </tail>.", "unknown_tag"),
    "markdown_list_item": (f"- {TAGS} lie on the sand.", "markdown"),
    "numbered_list_item": (f"1. {TAGS} lie on the sand.", "markdown"),
    "heading": (f"# Beach\n{TAGS} lie on the sand.", "markdown"),
    "preamble": (f"Sure! Here {TAGS} lie on the sand.", "preamble"),
    "preamble_colon": (f"Here is the description: {TAGS} lie on the sand.", "preamble"),
    "empty": ("", "empty"),
    "none": (None, "empty"),
    "only_chat_tokens": ("<|im_start|> [INST] <|im_end|>", "empty"),
}


@pytest.mark.parametrize("text, code", list(UNREPAIRABLE.values()), ids=list(UNREPAIRABLE))
def test_unrepairable_outputs_stay_invalid(space, text, code):
    fixed = repair(text, REPAIR_LABELS, space)
    r = validate(fixed.text, REPAIR_LABELS, space, REPAIR_CFG)
    assert not r.valid
    assert {reason_code(x) for x in r.reasons} == {code}, r.reasons
    assert repair(text, REPAIR_LABELS, space) == fixed


@pytest.mark.parametrize(
    "text, labels",
    [
        (GOOD, REPAIR_LABELS),
        ("  A person carries a <tail> surfboard </tail>,\n\n past a <tail> hair drier </tail>. ",
         REPAIR_LABELS),
        (VALID, LABELS),
        (VALID_PLAIN.replace("surfboard", "board"), [PERSON, DOG]),
    ],
)  # fmt: skip
def test_valid_text_is_left_alone(space, text, labels):
    assert validate(text, labels, space, REPAIR_CFG if labels == REPAIR_LABELS else None).valid
    fixed = repair(text, labels, space)
    assert fixed.repairs == []
    assert fixed.text == normalize_whitespace(text)


# -- repetition -------------------------------------------------------------------------------


def repeated_share(words: list[str], n: int = 4) -> float:
    """Reference: the n-grams that occurred at an earlier position, over all n-grams."""
    grams = [tuple(w.lower() for w in words[i : i + n]) for i in range(len(words) - n + 1)]
    repeats = sum(g in grams[:i] for i, g in enumerate(grams))
    return repeats / len(grams) if grams else 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("one two three four five six seven", 0.0),
        ("a b c d a b c d", 1 / 5),  # 5 4-grams, the last repeats the first
        ("A b C d a B c D", 1 / 5),  # case does not matter
        ("the person is sitting on a towel. The person is sitting on a towel", 4 / 11),
        ("a a a a a a", 2 / 3),
        ("a b c", 0.0),  # no 4-gram at all
        ("", 0.0),
        (None, 0.0),
        ("<tail> a </tail> b <|im_end|> c d <b>a</b> b c d", 1 / 5),  # markup ignored
        ("it's well-lit, it's well-lit, it's well-lit", 1 / 3),  # 6 words
    ],
)
def test_repetition(text, expected):
    assert repetition(text) == pytest.approx(expected)
    words = strip_markup(text or "").replace(",", " ").replace(".", " ").split()
    assert repetition(text) == pytest.approx(repeated_share(words))


def test_repetition_other_n():
    assert repetition("a b a b", n=2) == pytest.approx(1 / 3)
    assert repetition("a b a b", n=5) == 0.0

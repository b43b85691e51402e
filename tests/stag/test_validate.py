"""ltdist.stag.validate: adversarial LLM outputs, tag stripping, word counts, mention rate."""

from __future__ import annotations

import re

import pytest

from ltdist.stag.validate import (
    REASON_CODES,
    ValidationConfig,
    canonicalize,
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
    # a runaway is a loop: too long in words and characters, and repetitive
    assert r.reasons == [
        f"too_long:{r.word_count}",
        f"too_many_chars:{len(r.text)}",
        f"repetitive:{repetition(text):.2f}",
        "repeated_sentence",
    ]
    assert len(r.text) > 12 * 80


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
    "too_long": (
        GOOD + " Gulls wheel overhead while distant boats drift toward the harbour, and "
        "children build sandcastles near the dunes as the tide slowly turns.",
        "too_long",
    ),
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
def test_repetition(space, text, expected):
    assert repetition(text) == pytest.approx(expected)
    words = strip_markup(text or "").replace(",", " ").replace(".", " ").split()
    assert repetition(text) == pytest.approx(repeated_share(words))
    assert check(space, text).repetition == pytest.approx(expected)  # what the report counts


def test_repetition_other_n():
    assert repetition("a b a b", n=2) == pytest.approx(1 / 3)
    assert repetition("a b a b", n=5) == 0.0


# -- adversarial outputs: the verdict on each -------------------------------------------------

TAGGED = "<tail> surfboard </tail>"
DRIER_TAG = "<tail> hair drier </tail>"
LOOP = "A person carries a <tail> surfboard </tail> past a <tail> hair drier </tail>. "
LOREM = (
    "Lorem ipsum dolor sit amet <tail> surfboard </tail> consectetur adipiscing elit "
    "<tail> hair drier </tail> sed eiusmod tempor incididunt labore."
)


def cyr(word: str) -> str:
    """``word`` with its Latin a, c, e, o, p written in Cyrillic look-alikes."""
    return word.translate(str.maketrans("aceop", "асеор"))


# id: (output, verdict): 'valid' (as written, in canonical form), ('repaired', the repairs),
# or ('invalid', the reason codes left after repair)
ADVERSARIAL = {
    # encodings: decoded before parsing, never left in the text
    "html_entities": (GOOD.replace("<", "&lt;").replace(">", "&gt;"),
                      ("repaired", ["decode_entities"])),
    "numeric_entities": (GOOD.replace("<", "&#60;").replace(">", "&#62;"),
                         ("repaired", ["decode_entities"])),
    "hex_entities": (GOOD.replace("<", "&#x3C;").replace(">", "&#x3e;"),
                     ("repaired", ["decode_entities"])),
    "double_encoded": (GOOD.replace("<", "&amp;lt;").replace(">", "&amp;gt;"),
                       ("repaired", ["decode_entities"])),
    "url_encoded": (GOOD.replace("<", "%3C").replace(">", "%3E").replace("/", "%2F"),
                    ("repaired", ["decode_entities"])),
    "entity_in_prose": (GOOD.replace("the sand", "salt &amp; sand"),
                        ("repaired", ["decode_entities"])),
    "entity_spelled_class": (GOOD.replace("the sand", "a c&#97;r"), ("invalid", {"hallucination"})),
    "plain_ampersand_and_percent": (GOOD.replace("the sand", "salt & sand, 50% wet"), "valid"),
    # degenerate loops and filler
    "sentence_repeated": (LOOP * 2, ("invalid", {"repetitive", "repeated_sentence"})),
    "word_repeated": (GOOD + " very" * 12, ("invalid", {"repetitive"})),
    "lorem_ipsum": (LOREM, ("invalid", {"not_prose"})),
    "number_salad": (f"{TAGGED} <tail> hair drier </tail> 12 48 7 300 5 91 23 64 8 15 77 2",
                     ("invalid", {"not_prose"})),
    "word_list": (f"person {TAGGED} <tail> hair drier </tail> sand sea sky towel sun wave shell",
                  ("invalid", {"not_prose"})),
    # characters
    "no_spaces": (GOOD + " waves.roll.in.slowly.from.the.far.blue.sea.today",
                  ("invalid", {"long_token"})),
    "one_huge_token": (GOOD + " " + "a" * 60, ("invalid", {"long_token"})),
    "lone_surrogate": (GOOD.replace("sand", "sa\ud800nd"), "valid"),
    "nul_between_words": (GOOD.replace("person carries", "person\x00carries"), "valid"),
    "replacement_char": (GOOD.replace("sand", "sa\ufffdnd"), ("invalid", {"garbled"})),
    "bidi_override": (GOOD.replace("past", "\u202epast\u202c"), "valid"),
    "unicode_tag_chars": (GOOD + "\U000e0041\U000e0042", "valid"),
    "private_use": (GOOD.replace("sand", "sand\ue000"), "valid"),
    "non_breaking_spaces": (GOOD.replace(" ", "\u00a0"), "valid"),
    "url": (GOOD + " See www.example.com for more.", ("invalid", {"url"})),
    # chat templates
    "role_word": ("assistant\n" + GOOD, ("repaired", ["strip_role_word"])),
    "role_word_colon": ("Assistant: " + GOOD, ("repaired", ["strip_role_word"])),
    "chat_start_with_role": ("<|im_start|>assistant\n" + GOOD, ("repaired", ["strip_chat_tokens"])),
    "gemma_turn": ("<start_of_turn>model\n" + GOOD + "<end_of_turn>",
                   ("repaired", ["strip_chat_tokens"])),
    "eos_token": (GOOD + "</s>", ("repaired", ["strip_chat_tokens"])),
    # look-alikes: folded before matching, so a class the image lacks is still found
    "cyrillic_in_absent_class": (GOOD.replace("the sand", "a " + cyr("car")),
                                 ("invalid", {"hallucination"})),
    "greek_in_absent_class": (GOOD.replace("the sand", "a dοg"), ("invalid", {"hallucination"})),
    "cyrillic_in_tail_name": (GOOD.replace("surfboard", cyr("surfboard")),
                              ("repaired", ["fold_confusables"])),
    "full_width_class": (GOOD.replace("the sand", "a ｃａｒ"), ("invalid", {"hallucination"})),
    "math_bold_class": (GOOD.replace("the sand", "a 𝐜𝐚𝐫"), ("invalid", {"hallucination"})),
    "diacritic_class": (GOOD.replace("the sand", "a cár"), ("invalid", {"hallucination"})),
    "zero_width_in_class": (GOOD.replace("the sand", "a c\u200bar"),
                            ("invalid", {"hallucination"})),
    "zalgo_class": (GOOD.replace("the sand", "a c\u0336a\u0336r\u0336"),
                    ("invalid", {"hallucination"})),
    "other_script_word": (GOOD.replace("sand", "сосна"), ("invalid", {"non_latin"})),
    "cjk_text": (GOOD + " 海滩上有人", ("invalid", {"non_latin"})),
    # bracket forms and split names
    "full_width_brackets": (GOOD.replace("<", "＜").replace(">", "＞").replace("/", "／"), "valid"),
    "angle_quotes": (GOOD.replace("<", "‹").replace(">", "›"), "valid"),
    "square_brackets": (GOOD.replace("<", "[").replace(">", "]"), "valid"),
    "tail_name_split_after": (GOOD.replace(DRIER_TAG, "<tail> hair </tail> drier"),
                              ("repaired", ["untag:hair", "tag:hair drier"])),
    "tail_name_split_before": (GOOD.replace(DRIER_TAG, "hair <tail> drier </tail>"),
                               ("repaired", ["untag:drier", "tag:hair drier"])),
    "tail_name_in_two_tags": (GOOD.replace(DRIER_TAG, "<tail> hair </tail> <tail> drier </tail>"),
                              ("repaired", ["untag:hair", "untag:drier", "tag:hair drier"])),
    # good text that must stay good
    "curly_quotes_dash_accent": (GOOD.replace("the sand", "the café’s sand — warm"), "valid"),
    "fi_ligature": (GOOD.replace("the sand", "a ﬁeld"), "valid"),
}  # fmt: skip


def verdict(text, space):
    """'valid', ('repaired', repairs) or ('invalid', codes after repair), and the final text."""
    first = validate(text, REPAIR_LABELS, space, REPAIR_CFG)
    if first.valid:
        return "valid", first
    fixed = repair(text, REPAIR_LABELS, space)
    again = validate(fixed.text, REPAIR_LABELS, space, REPAIR_CFG)
    if again.valid:
        return ("repaired", fixed.repairs), again
    return ("invalid", {reason_code(r) for r in again.reasons}), again


@pytest.mark.parametrize("text, expected", list(ADVERSARIAL.values()), ids=list(ADVERSARIAL))
def test_adversarial_verdicts(space, text, expected):
    got, result = verdict(text, space)
    assert got == expected, result.reasons
    # whatever the verdict, what would be written is clean, canonical text
    result.text.encode("utf-8")  # no surrogate
    assert not any(ch in result.text for ch in "\x00\ufeff\u200b\u202e<>＜")
    assert not re.search(r"&(?:amp|lt|gt|#)|%3C", result.text, re.IGNORECASE)
    assert result.description == canonicalize(result.description)


def test_nul_and_look_alikes_in_the_written_text(space):
    _, r = verdict(GOOD.replace("person carries", "person\x00carries"), space)
    assert "person carries" in r.text
    _, r = verdict(GOOD.replace("surfboard", cyr("surfboard")), space)
    assert "surfboard" in r.text and r.tail_mentions == 2
    _, r = verdict(GOOD.replace("<", "＜").replace(">", "＞").replace("/", "／"), space)
    assert r.description == GOOD
    _, r = verdict(GOOD.replace("<tail> hair drier </tail>", "<tail> hair </tail> drier"), space)
    assert r.description == GOOD
    first = validate(cyr("surfboard") + " " + GOOD, REPAIR_LABELS, space, REPAIR_CFG)
    assert f"mixed_script:{cyr('surfboard')}" in first.reasons


def test_character_limits(space):
    cfg = ValidationConfig(min_words=5, max_words=30, max_chars=40)
    r = validate(GOOD, REPAIR_LABELS, space, cfg)
    assert r.reasons == [f"too_many_chars:{len(r.text)}"]
    assert ValidationConfig(max_words=80).char_limit == 960  # 0: 12 characters a word


def test_prose_checks_need_ten_words(space):
    # too few words for a share to mean anything: only the length is reported
    r = validate("<tail> surfboard </tail>, <tail> hair drier </tail>.", REPAIR_LABELS, space)
    assert {reason_code(x) for x in r.reasons} == {"too_short"}


def test_prose_thresholds_are_settings(space):
    cfg = ValidationConfig(min_words=5, max_words=40, max_repetition=1.0)
    assert validate(GOOD + " very" * 12, REPAIR_LABELS, space, cfg).valid
    cfg = ValidationConfig(min_words=5, max_words=40, min_function_word_share=0.0)
    assert validate(LOREM.replace("Lorem ipsum", "Lorem"), REPAIR_LABELS, space, cfg).valid
    with pytest.raises(ValueError, match="max_repetition"):
        ValidationConfig(max_repetition=1.5)
    with pytest.raises(ValueError, match="max_token_chars"):
        ValidationConfig(max_token_chars=0)

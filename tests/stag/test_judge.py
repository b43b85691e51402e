"""ltdist.stag.judge: the text-only content judge, on hand-written texts with numbers counted
by hand, and its aggregation checked against a direct computation."""

from __future__ import annotations

import math
import random

import pytest

from ltdist.stag.judge import (
    BUCKET,
    Judgement,
    judge,
    judge_sample,
    judge_table,
    label_words,
    shard_counts,
    stem,
    summarize,
)
from ltdist.stag.validate import repetition

from .conftest import PERSON, SURFBOARD

pytestmark = pytest.mark.both_envs

GIRAFFE_CAPTION = "A giraffe standing next to a tree in a zoo."


def test_stems_join_plurals_and_verb_forms():
    pairs = [
        ("giraffes", "giraffe"),
        ("riding", "rides"),
        ("ride", "riding"),
        ("sitting", "sits"),
        ("horses", "horse"),
        ("puppies", "puppy"),
        ("glasses", "glass"),
        ("buses", "bus"),
        ("bear's", "bear"),
        ("Dogs", "dog"),
    ]
    for a, b in pairs:
        assert stem(a) == stem(b), (a, b)
    for a, b in [("bus", "busy"), ("glass", "gas"), ("car", "cart")]:
        assert stem(a) != stem(b), (a, b)


def test_the_issues_film_director_text_scores_badly():
    text = "Lionel Scarfe, a renowned film director, giraffe is a celebrated filmmaker."
    j = judge(text, ["giraffe"], GIRAFFE_CAPTION)
    # content words: lionel scarfe renowned film director giraffe celebrated filmmaker
    assert j.content_words == 8 and j.grounded == pytest.approx(1 / 8)
    assert j.off_topic == {
        "names": ["Scarfe"],  # capitalised, not at a sentence start ('Lionel' starts it)
        "numbers": [],
        "words": ["lionel", "renowned", "film", "director", "celebrated", "filmmaker"],
    }
    # caption facts: giraffe tree zoo ('standing' is a verb form, 'next' a function word)
    assert j.caption_facts == ["giraffe", "tree", "zoo"]
    assert j.caption_dropped == ["tree", "zoo"] and j.caption_kept == pytest.approx(1 / 3)
    assert j.contradictions == [] and j.repetition == 0.0
    assert j.score == pytest.approx(1 / 8 * 1 / 3)


def test_the_issues_frisbee_text_is_grounded_but_drops_the_caption():
    text = "The image is a frisbee that's frisbee in the car"
    j = judge(text, ["frisbee", "car", "dog"], "A dog jumps to catch a frisbee in a park.")
    # frisbee frisbee car: all grounded ('image' is a picture word, "that's" a function word)
    assert j.content_words == 3 and j.grounded == 1.0 and j.off_topic_count == 0
    assert j.caption_facts == ["dog", "jumps", "catch", "frisbee", "park"]
    assert j.caption_dropped == ["dog", "jumps", "catch", "park"]
    assert j.score == pytest.approx(1.0 * 1 / 5)


def test_a_good_grounded_text_scores_well():
    text = (
        "A tall giraffe is standing next to a leafy tree in the zoo. A man watches the giraffe "
        "from the path while the tree shades them both."
    )
    j = judge(text, ["giraffe", "person", "man"], GIRAFFE_CAPTION)  # 'man': a person word
    # 12 content words ('is', 'next', 'both' ... are function words), 7 of them grounded
    grounded = ["giraffe", "standing", "tree", "zoo", "man", "giraffe", "tree"]
    off = ["tall", "leafy", "watches", "path", "shades"]
    assert j.content_words == len(grounded) + len(off)
    assert j.grounded == pytest.approx(len(grounded) / (len(grounded) + len(off)))
    assert j.off_topic["words"] == off and j.off_topic["names"] == []
    assert j.caption_kept == 1.0 and j.contradictions == []
    assert j.score == pytest.approx(j.grounded) and j.score > 0.5
    bad = judge(
        "Lionel Scarfe, a renowned film director, giraffe is a celebrated filmmaker.",
        ["giraffe", "person", "man"],
        GIRAFFE_CAPTION,
    )
    assert j.score > 10 * bad.score


def test_numbers_names_and_contradictions():
    caption = "Two dogs play with a frisbee on the grass near 3 people."
    text = (
        "Three dogs chase the frisbee across the grass. There is no frisbee in the air, and "
        "Rex the dog barks at 12 birds while 3 people watch."
    )
    j = judge(text, ["dog", "frisbee", "person"], caption)
    # a count of dogs differs; the frisbee follows 'no' within three words
    assert j.contradictions == ["count:dog:2->3", "negated:frisbee"]
    assert j.off_topic["names"] == ["Rex"]
    assert j.off_topic["numbers"] == ["12"]  # by value: 'three' is the caption's '3'

    assert j.off_topic["words"] == ["chase", "air", "barks", "birds", "watch"]
    # four factors: grounded x kept x (1 - repetition) x 0.5^2
    assert j.score == pytest.approx(j.grounded * j.caption_kept * (1 - j.repetition) * 0.25)


def test_loops_and_no_caption():
    text = "the dog sits on the mat. the dog sits on the mat. the dog sits on the mat."
    j = judge(text, ["dog"], None)
    assert j.repetition == repetition(text) > 0.5  # the validator's 4-gram share
    assert j.caption_kept is None and j.caption_facts == []
    # without a caption the score is grounded x (1 - repetition): of dog / sits / mat (x3)
    # only 'dog' is in the sources
    assert j.content_words == 9 and j.grounded == pytest.approx(3 / 9)
    assert j.score == pytest.approx(1 / 3 * (1 - j.repetition))
    empty = judge("", ["dog"], "a dog")
    assert (empty.content_words, empty.grounded, empty.score) == (0, 0.0, 0.0)


def test_label_words_use_display_names_and_synonyms(space):
    words = label_words([PERSON, SURFBOARD], space)
    assert {"person", "surfboard", "man", "people"} <= set(words)
    j = judge_sample("A man and a surfboard.", [PERSON, SURFBOARD], None, space)
    assert j.grounded == 1.0


def test_aggregation_matches_a_direct_computation():
    rng = random.Random(0)
    vocab = "dog frisbee grass park runs jumps tree man Rex 3 two no blue".split()
    shards, flat = [], []
    for s in range(3):
        items = []
        for i in range(17):
            text = " ".join(rng.choice(vocab) for _ in range(rng.randint(3, 15)))
            caption = None if i % 5 == 0 else "A dog catches a frisbee in the park."
            j = judge(text, ["dog", "frisbee"], caption)
            items.append((f"s{s}k{i:02d}", text, j))
            flat.append((f"s{s}k{i:02d}", j))
        shards.append(shard_counts(items))
    out = summarize(shards, worst=4)
    assert out["texts"] == len(flat) == 51
    for k in ("grounded", "caption_kept", "repetition", "score"):
        values = [getattr(j, k) for _, j in flat if getattr(j, k) is not None]
        assert out[k]["n"] == len(values)
        assert out[k]["mean"] == pytest.approx(math.fsum(values) / len(values), abs=1e-4)
        ranked = sorted(round(v * BUCKET) / BUCKET for v in values)
        for q, name in ((0.25, "p25"), (0.5, "median"), (0.75, "p75")):
            assert out[k][name] == ranked[math.floor(q * (len(ranked) - 1))], (k, name)
    assert out["caption_kept"]["n"] == 51 - 12  # keys 0, 5, 10, 15 of each shard: no caption
    off = sum(j.off_topic_count for _, j in flat)
    assert out["off_topic_per_text"] == pytest.approx(off / 51, abs=1e-3)
    assert out["contradicted_share"] == pytest.approx(
        sum(bool(j.contradictions) for _, j in flat) / 51, abs=1e-4
    )
    worst = sorted(flat, key=lambda kj: (kj[1].score, kj[0]))[:4]
    assert [w["key"] for w in out["worst"]] == [k for k, _ in worst]
    rows = dict(judge_table(out))
    assert rows["judged texts (generated)"] == "51"
    assert sum(k.startswith("worst ") for k in rows) == 3
    assert judge_table(summarize([])) == [("judged texts", "0")]


def test_judgement_round_trips_to_json_types():
    d = Judgement(grounded=1 / 3, score=0.123456).to_dict()
    assert d["grounded"] == 0.3333 and d["score"] == 0.1235 and d["caption_kept"] is None

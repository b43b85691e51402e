"""GloVe vectors for CPRFL's prompts: the real GloVe 6B 50-d and the plain text format."""

from __future__ import annotations

import numpy as np
import pytest

from ltdist.models.cprfl import CPRFLConfig, CPRFLHead
from ltdist.models.word_vectors import glove_class_embeddings, load_word_vectors

COCO_DISPLAY = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
]  # fmt: skip


def cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_real_glove_vectors_carry_meaning():
    v = load_word_vectors(["cat", "dog", "truck", "car", "notaword_xyz"])
    assert set(v) == {"cat", "dog", "truck", "car"} and v["cat"].shape == (50,)
    assert cos(v["cat"], v["dog"]) > cos(v["cat"], v["truck"]) + 0.3
    assert cos(v["car"], v["truck"]) > cos(v["car"], v["dog"]) + 0.3


def test_every_coco_class_has_a_glove_embedding():
    emb = glove_class_embeddings(COCO_DISPLAY)
    assert emb.shape == (80, 50)
    v = load_word_vectors(["traffic", "light"])
    np.testing.assert_allclose(emb[9].numpy(), (v["traffic"] + v["light"]) / 2, rtol=1e-6)


def test_text_format_and_missing_words(tmp_path):
    path = tmp_path / "glove.txt"
    path.write_text("the 0.1 0.2\nred 1.0 -1.0\napple 0.5 0.5\nred 9 9\n")
    v = load_word_vectors(["Red", "apple", "pear"], str(path))
    assert set(v) == {"red", "apple"}
    np.testing.assert_array_equal(v["red"], [1.0, -1.0])  # the first occurrence wins
    np.testing.assert_allclose(glove_class_embeddings(["red apple"], str(path))[0], [0.75, -0.25])
    with pytest.raises(KeyError, match="pear"):
        glove_class_embeddings(["pear"], str(path))


def test_a_300d_glove_file_sets_the_prompt_width(tmp_path):
    rng = np.random.default_rng(0)
    vectors = {w: rng.normal(size=300).round(5) for w in ["the", "traffic", "light", "dog"]}
    path = tmp_path / "glove.6B.300d.txt"
    path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in vectors.items()))
    emb = glove_class_embeddings(["traffic light", "dog"], str(path))
    assert emb.shape == (2, 300)
    expected = np.stack([(vectors["traffic"] + vectors["light"]) / 2, vectors["dog"]])
    np.testing.assert_allclose(emb.numpy(), expected, rtol=1e-6, atol=1e-6)
    head = CPRFLHead(emb, 16, CPRFLConfig(prompt_init="glove", heads=2, head_dim=8, mlp_dim=24))
    assert head.prompt_init.fc1.in_features == 300
    # a word2vec-style header is skipped; a short row is an error naming its line
    (tmp_path / "w2v.txt").write_text("2 300\n" + path.read_text().split("\n", 1)[1])
    assert load_word_vectors(["dog"], str(tmp_path / "w2v.txt"))["dog"].shape == (300,)
    (tmp_path / "bad.txt").write_text(path.read_text() + "cat 0.1 0.2\n")
    with pytest.raises(ValueError, match=r"line 5: 'cat' has 2 values"):
        load_word_vectors(["cat"], str(tmp_path / "bad.txt"))

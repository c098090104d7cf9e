"""Metrics on small examples worked out by hand."""
from __future__ import annotations

import math

import pytest

from mm.eval.metrics import bleu4, cer, exact_match, normalize_answer, normalize_text, rouge_l, token_f1, wer


def test_bleu_identical_is_100():
    s = "there is a big red star at the top left."
    assert bleu4([s, "a small circle in the middle"], [s, "a small circle in the middle"]) == pytest.approx(100.0)


def test_bleu_by_hand():
    # hyp vs ref differ in one word ("the" for "a"): clipped n-gram matches 5/6, 3/5, 2/4, 1/3, no brevity penalty
    hyp, ref = "the cat sat on the mat", "the cat sat on a mat"
    assert bleu4([hyp], [ref]) == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25, abs=1e-6)
    # a prefix: all precisions 1, brevity penalty exp(1 - 6/5)
    assert bleu4(["the cat sat on the"], ["the cat sat on the mat"]) == pytest.approx(100 * math.exp(-0.2), abs=1e-6)
    # corpus BLEU pools the counts over sentences (it is not the mean of sentence scores)
    pooled = (11 / 12) * (8 / 10) * (6 / 8) * (4 / 6)
    assert bleu4([ref, hyp], [ref, ref]) == pytest.approx(100 * pooled**0.25, abs=1e-6)
    # several references: the matching one counts
    assert bleu4([hyp], [["a dog ran over the hill", ref]]) == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)
    assert bleu4(["the cat"], [["x y", "the cat"]]) < 100  # no 3- and 4-grams: smoothed, not perfect


def test_rouge_l_by_hand():
    # LCS "the star at the top" = 5 of 7 words each side: F = 5/7
    assert rouge_l(["the red star is at the top"], ["the blue star at the top left"]) == pytest.approx(100 * 5 / 7)
    # LCS "red circle left" = 3: P = 3/5, R = 3/4, F = 2PR/(P+R) = 2/3
    assert rouge_l(["red circle on the left"], ["big red circle left"]) == pytest.approx(100 * 2 / 3)
    assert rouge_l(["the red star is at the top", "red circle on the left"],
                   ["the blue star at the top left", "big red circle left"]) == pytest.approx(100 * (5 / 7 + 2 / 3) / 2)
    assert rouge_l(["red circle on the left"], [["blue", "big red circle left"]]) == pytest.approx(100 * 2 / 3)
    assert rouge_l(["a b"], ["c d"]) == 0.0


def test_wer_cer_by_hand():
    # "red"->"blue" substitution, "is" deleted, "left" inserted: 3 errors over 7 reference words
    assert wer(["the blue star at the top left"], ["the red star is at the top"]) == pytest.approx(100 * 3 / 7)
    # corpus WER pools errors and words: 0/2 and 2/5 (one substitution, one deletion) give 2/7, not 20%
    assert wer(["red star", "blue square at top"], ["red star", "blue circle at the top"]) == pytest.approx(100 * 2 / 7)
    # light normalisation: case and punctuation do not count, unless switched off
    assert wer(["The red star, at the top."], ["the red star at the top"]) == 0.0
    assert wer(["The red star"], ["the red star"], normalize=False) == pytest.approx(100 / 3)
    assert cer(["stars"], ["star"]) == pytest.approx(25.0)  # one insertion over 4 characters
    assert cer(["a stat"], ["a star"]) == pytest.approx(100 / 6)  # the space counts
    assert wer(["one two three four"], ["one"]) == pytest.approx(300.0)  # insertions can pass 100%


def test_exact_match_and_token_f1_by_hand():
    predictions, references = ["The red.", "two", "at the top left"], ["red", "three", "At the top left!"]
    assert exact_match(predictions, references) == pytest.approx(200 / 3)
    assert exact_match(["blue"], [["red", "Blue!"]]) == 100.0
    # [at, top, left] vs [at, bottom, left]: P = R = 2/3; "red" vs "red circle": P 1, R 1/2, F 2/3; "" vs "x": 0
    assert token_f1(["at the top left", "red", ""], ["at the bottom left", "red circle", "x"]) == pytest.approx(
        100 * (2 / 3 + 2 / 3 + 0) / 3)
    assert token_f1(["red red"], ["red"]) == pytest.approx(100 * 2 * 0.5 * 1 / 1.5)  # P 1/2, R 1
    assert token_f1(["red"], [["blue", "red"]]) == 100.0
    assert normalize_answer("  The Red,  Star! ") == "red star"
    assert normalize_text("There are two shapes: a red star.") == "there are two shapes a red star"


def test_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        wer(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="reference 1 is empty"):
        wer(["a", "b"], ["a", "?"])
    with pytest.raises(TypeError, match="lists of strings"):
        bleu4("a cat", "a cat")
    with pytest.raises(ValueError, match="no predictions"):
        exact_match([], [])


def test_object_f1_by_hand():
    from mm.eval.metrics import object_f1

    r = object_f1([["a", "b"], ["c"]], [["a"], ["c", "d"]])  # 2 right of 3 predicted and of 3 true
    assert r == pytest.approx({"precision": 200 / 3, "recall": 200 / 3, "f1": 200 / 3})
    r = object_f1([["a", "a"], []], [["a"], ["b"]])  # a duplicate counts once; 1 right, 2 predicted, 2 true
    assert r == pytest.approx({"precision": 50.0, "recall": 50.0, "f1": 50.0})
    r = object_f1([["a", "a"]], [["a", "b", "c", "d"]])  # 1 right of 2 predicted, of 4 true: F1 = 2/(2+4)
    assert r == pytest.approx({"precision": 50.0, "recall": 25.0, "f1": 100 / 3})
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        object_f1([[], []], [[]])

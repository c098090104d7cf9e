"""Text-only reading: questions about a scene told in words and texts to repeat, as training rows
(`tiny_data.read_conversation`) and as `mm eval --tasks read`."""
from __future__ import annotations

import random
from dataclasses import replace
from types import SimpleNamespace

import pytest

from mm.data.scenes import (REPEAT_PROMPT, Obj, describe, parse_objects, question_form, questions, sample_split_scene,
                            told)
from mm.eval.evaluate import evaluate, format_results
from mm.train.recipe_tiny import TinyRecipe
from mm.train.tiny_data import read_conversation, sample_batch


def oracle(prompt: str) -> str:
    """The right reply to a reading prompt, worked out from the text alone."""
    if prompt.startswith(REPEAT_PROMPT):
        return prompt[len(REPEAT_PROMPT):]
    caption, question = prompt.split("\n")
    return next(qa.answer for qa in questions(parse_objects(caption)) if qa.question == question)


def test_told_is_the_caption_then_the_question():
    scene = sample_split_scene(random.Random(4), "train")
    assert told(scene, "what colour is the star?") == describe(scene) + "\nwhat colour is the star?"


def test_read_rows_answer_from_the_text_they_hold():
    data = {"caption": ["there is a big red star at the top."], "open": [(None, "faithless orphan")],
            "transcribe": [(None, "where is the star")]}
    r = replace(TinyRecipe(), question_turns=3)
    rng = random.Random(0)
    convs = sample_batch(r, data, "read", 200, rng)[0]
    told_rows = [c for c in convs if not c[0]["content"].startswith(REPEAT_PROMPT)]
    repeats = [c for c in convs if c[0]["content"].startswith(REPEAT_PROMPT)]
    assert 60 < len(told_rows) < 140 and len(told_rows) + len(repeats) == 200
    for conv in told_rows:  # every answer follows from the scene in the first turn
        assert len(conv) == 6 and [m["role"] for m in conv] == ["user", "assistant"] * 3
        caption = conv[0]["content"].split("\n")[0]
        truth = {qa.question: qa.answer for qa in questions(parse_objects(caption))}
        assert len(parse_objects(caption)) >= 1
        for q, a in zip(conv[::2], conv[1::2]):
            assert truth[q["content"].split("\n")[-1]] == a["content"]
    echoed = [c[1]["content"] for c in repeats]
    assert all(len(c) == 2 and c[0]["content"] == REPEAT_PROMPT + c[1]["content"] for c in repeats)
    assert {"there is a big red star at the top.", "faithless orphan", "where is the star"} <= set(echoed)
    assert any(t.isdigit() for t in echoed)
    assert read_conversation(r, data, random.Random(5)) == read_conversation(r, data, random.Random(5))


class Reader:
    """A stand-in model for the eval: replies by `answer`, and records the prompts."""

    def __init__(self, answer):
        self.answer, self.prompts = answer, []
        self.config = SimpleNamespace(vision=SimpleNamespace(image_size=48))

    def replies(self, rows, batch_size=32, max_new_tokens=64, desc=""):
        assert all(images == [] and audios == [] for _, images, audios in rows)  # text only
        self.prompts += [p for p, _, _ in rows]
        return [self.answer(p) for p, _, _ in rows]


def test_eval_read_scores_lookups_by_objects_and_repeats():
    right = evaluate(Reader(oracle), n=30, tasks=("read",))["read"]
    assert right["accuracy"] == 100 and right["repeat"] == 100 and set(right["by_objects"].values()) == {100}

    def blind_to_three(prompt):  # wrong whenever the scene has three objects; never repeats a number
        if prompt.startswith(REPEAT_PROMPT):
            text = prompt[len(REPEAT_PROMPT):]
            return "0" if text.isdigit() else text
        return "nothing" if len(parse_objects(prompt.split("\n")[0])) == 3 else oracle(prompt)

    reader = Reader(blind_to_three)
    r = evaluate(reader, n=30, tasks=("read",))
    got = r["read"]
    assert got["by_objects"]["3"] == 0 and got["by_objects"]["1"] == 100
    threes = sum(len(parse_objects(p.split("\n")[0])) == 3 for p in reader.prompts[:30])
    assert got["accuracy"] == pytest.approx(100 * (30 - threes) / 30)
    assert got["repeat"] == 50  # the captions, not the numbers
    assert "read         scene in words: accuracy" in format_results(r)
    forms = got["by_form"]  # scenes of 2 and 3 objects: right exactly on the twos
    twos = sum(len(parse_objects(p.split("\n")[0])) == 2 for p in reader.prompts[:30])
    assert sum(v["n"] for v in forms.values()) == 30 - sum(len(parse_objects(p.split("\n")[0])) == 1
                                                          for p in reader.prompts[:30])
    assert sum(v["accuracy"] * v["n"] / 100 for v in forms.values()) == pytest.approx(twos)
    assert "by form, 2-3 objects" in format_results(r)


def test_question_form_names_what_is_looked_up():
    scene = [Obj("star", "red", "big", 0, 0), Obj("star", "blue", "small", 2, 2), Obj("circle", "white", "big", 1, 1)]
    forms = {question_form(qa.question) for qa in questions(scene)}
    assert forms == {"what colour is the <size> <shape>?", "what colour is the <shape>?",
                     "what colour is the shape <place>?", "what shape is <place>?", "what shape is <colour>?",
                     "how many shapes are there?", "how many <shape> are there?", "how many <colour> shapes are there?",
                     "where is the <shape>?", "where is the <colour> <shape>?"}
    assert question_form("what shape is at the bottom right?") == "what shape is <place>?"  # not "<place> right"
    assert question_form("what colour is the shape in the middle?") == "what colour is the shape <place>?"

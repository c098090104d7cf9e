"""Procedural scenes: captions unchanged, rendering deterministic and where the scene says, QA right, split disjoint."""
from __future__ import annotations

import hashlib
import math
import random
import re

import numpy as np
import pytest

from mm.data import scenes
from mm.data.scenes import (
    BACKGROUND_RGB,
    COLOUR_JITTER,
    COLOUR_RGB,
    SHAPES,
    SIZES,
    Obj,
    captions,
    cot_target,
    describe,
    heldout_pairs,
    object_centres,
    parse_objects,
    questions,
    render,
    sample_question,
    sample_scene,
    scene_examples,
    scene_key,
    scene_split,
    split_cot,
)

# Written by hand, independent of Obj.place(): the phrase for each grid cell.
PLACES = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the middle", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
NUMBER = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def random_scenes(n, seed, max_objects=3):
    rng = random.Random(seed)
    return [sample_scene(rng, max_objects) for _ in range(n)]


def test_captions_unchanged():
    # the shipped text model was trained on these: a hand-written caption and the hash of the corpus as committed
    scene = [Obj("star", "red", "small", 2, 2), Obj("circle", "blue", "big", 0, 0), Obj("square", "white", "big", 1, 1)]
    assert describe(scene) == (
        "there are three shapes: a big blue circle at the top left, a big white square in the middle"
        " and a small red star at the bottom right."
    )
    assert describe([Obj("hexagon", "green", "small", 1, 0)]) == "there is a small green hexagon on the left."
    corpus = "\n".join(captions(200, seed=0)).encode()
    assert hashlib.sha256(corpus).hexdigest() == "7c0583956a809d7d926ee97b0ed33f98d857d774e9505649e99f6a70c026e144"


def test_render_is_deterministic():
    scene = [Obj("star", "red", "small", 0, 0), Obj("triangle", "yellow", "big", 2, 1)]
    a, b = render(scene, 64, rng=3), render(scene, 64, rng=random.Random(3))
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert render(scene, 64, rng=4).tobytes() != a.tobytes()
    ex1, ex2 = scene_examples(5, "train", seed=7), scene_examples(3, "train", seed=7)
    for e1, e2 in zip(ex1, ex2):  # item i does not depend on how many items are drawn
        assert e1.scene == e2.scene and e1.caption == e2.caption and e1.image.tobytes() == e2.image.tobytes()
    assert [e.caption for e in scene_examples(5, "train", seed=8)] != [e.caption for e in ex1]


def nearest(rgb, palette):
    return min(palette, key=lambda k: math.dist(rgb, palette[k]))


@pytest.mark.parametrize("size", [64, 96])
def test_objects_are_where_the_scene_says(size):
    cell = size / 3
    for i, scene in enumerate(random_scenes(150, seed=size, max_objects=5)):
        image = np.asarray(render(scene, size, rng=i)).astype(int)  # [H, W, 3]
        for o, (x, y, r) in zip(scene, object_centres(scene, size, rng=i)):
            assert int(x // cell) == o.col and int(y // cell) == o.row
            assert o.col * cell < x - r and x + r < (o.col + 1) * cell  # the whole shape stays in its cell
            assert o.row * cell < y - r and y + r < (o.row + 1) * cell
            pixel = image[int(y), int(x)]
            assert nearest(pixel, {**COLOUR_RGB, **BACKGROUND_RGB}) == o.colour, (scene, o, pixel)
            assert np.abs(pixel - COLOUR_RGB[o.colour]).max() <= COLOUR_JITTER


def test_sizes_and_shapes_have_their_areas():
    # area / r^2 of each shape, by hand: circle pi, square 2*0.9^2, diamond 2*0.65, triangle 3*sqrt(3)/4,
    # hexagon 3*sqrt(3)/2, star 5 * 0.45 * sin(36 deg) (ten triangles r x 0.45r)
    expected = {"circle": math.pi, "square": 1.62, "diamond": 1.3, "triangle": 3 * math.sqrt(3) / 4,
                "hexagon": 3 * math.sqrt(3) / 2, "star": 5 * 0.45 * math.sin(math.radians(36))}
    size, cell = 96, 32
    for k, shape in enumerate(SHAPES):
        for size_word in ["small", "big"]:
            scene = [Obj(shape, "blue", size_word, 1, 1)]
            image = np.asarray(render(scene, size, rng=k, background="beige", noisy=False)).astype(float)
            (x, y, r), = object_centres(scene, size, rng=k, background="beige", noisy=False)
            inside = image[int(y), int(x)]
            bg = np.array(BACKGROUND_RGB["beige"], float)
            block = image[cell:2 * cell, cell:2 * cell, 2]  # blue channel: 150 (beige) vs ~230
            coverage = (block - bg[2]) / (inside[2] - bg[2])  # box filter: pixel = mix of the two by area
            area = coverage.sum()
            assert area == pytest.approx(expected[shape] * r * r, rel=0.06), (shape, size_word)
            assert r / cell == pytest.approx(0.40 if size_word == "big" else 0.24, rel=0.11)
            assert np.all(image[:cell] == bg) and np.all(image[2 * cell:] == bg)  # nothing outside its cell


def test_background_is_never_an_object_colour():
    for b, brgb in BACKGROUND_RGB.items():
        for c, crgb in COLOUR_RGB.items():
            assert math.dist(brgb, crgb) > 90, (b, c)
    for i, scene in enumerate(random_scenes(60, seed=1)):
        image = np.asarray(render(scene, 64, rng=i)).astype(int)
        yy, xx = np.mgrid[0:64, 0:64] + 0.5
        free = np.ones((64, 64), bool)
        for x, y, r in object_centres(scene, 64, rng=i):
            free &= (xx - x) ** 2 + (yy - y) ** 2 > (r + 1.5) ** 2
        pixels = image[free]
        bgs = np.array(list(BACKGROUND_RGB.values()))
        objs = np.array(list(COLOUR_RGB.values()))
        d_bg = np.linalg.norm(pixels[:, None] - bgs[None], axis=-1).min(1)
        d_obj = np.linalg.norm(pixels[:, None] - objs[None], axis=-1).min(1)
        assert np.all(d_bg < d_obj)


def answer_by_hand(scene, question):
    """Recompute the answer to a grammar question from the scene; None if it has no unique answer."""
    cell_of = {v: k for k, v in PLACES.items()}

    def one(objs):
        return objs[0] if len(objs) == 1 else None

    if m := re.fullmatch(r"what colour is the shape (.+)\?", question):
        o = one([o for o in scene if (o.row, o.col) == cell_of[m[1]]])
        return o and o.colour
    if m := re.fullmatch(r"what colour is the (?:(small|big) )?(\w+)\?", question):
        o = one([o for o in scene if o.shape == m[2] and m[1] in (None, o.size)])
        return o and o.colour
    if m := re.fullmatch(r"what shape is (.+)\?", question):
        if m[1] in cell_of:
            o = one([o for o in scene if (o.row, o.col) == cell_of[m[1]]])
        else:
            o = one([o for o in scene if o.colour == m[1]])
        return o and o.shape
    if question == "how many shapes are there?":
        return NUMBER[len(scene)]
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return NUMBER[sum(o.colour == m[1] for o in scene)]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return NUMBER[sum(o.shape == m[1] for o in scene)]
    if m := re.fullmatch(r"where is the (?:(\w+) )?(\w+)\?", question):
        o = one([o for o in scene if o.shape == m[2] and m[1] in (None, o.colour)])
        return o and PLACES[(o.row, o.col)]
    raise AssertionError(f"question outside the grammar: {question}")


def test_answers_are_correct_and_unique():
    kinds = set()
    for scene in random_scenes(400, seed=2, max_objects=9):
        qas = questions(scene)
        assert len({q.question for q in qas}) == len(qas)
        for q in qas:
            assert answer_by_hand(scene, q.question) == q.answer, (scene, q)
            kinds.add(q.kind)
        assert {q.kind for q in qas} == {"colour", "shape", "count", "position"} or len(scene) > 6
    assert kinds == {"colour", "shape", "count", "position"}


def test_ambiguous_questions_are_not_asked():
    scene = [Obj("circle", "red", "big", 0, 0), Obj("circle", "red", "small", 0, 2), Obj("star", "blue", "big", 2, 2)]
    asked = {q.question: q.answer for q in questions(scene)}
    assert "what colour is the circle?" not in asked  # two circles
    assert "where is the red circle?" not in asked and "what shape is red?" not in asked
    assert asked["what colour is the small circle?"] == "red"
    assert asked["how many circles are there?"] == "two"
    assert asked["how many red shapes are there?"] == "two"
    assert asked["how many squares are there?"] == "zero"
    assert asked["where is the blue star?"] == "at the bottom right"
    assert asked["what shape is at the top right?"] == "circle"
    assert asked["what colour is the star?"] == "blue"


def test_sample_question_covers_every_kind():
    rng = random.Random(0)
    scene = [Obj("circle", "red", "big", 0, 0), Obj("star", "blue", "big", 2, 2)]
    counts = {}
    for _ in range(400):
        q = sample_question(scene, rng)
        assert q in questions(scene)
        counts[q.kind] = counts.get(q.kind, 0) + 1
    assert set(counts) == {"colour", "shape", "count", "position"} and min(counts.values()) > 70


def test_splits_are_disjoint_by_rule():
    pairs = heldout_pairs(0)
    assert sorted(s for s, _ in pairs) == sorted(SHAPES)  # one held-out colour per shape
    assert len({c for _, c in pairs}) == len(SHAPES)  # no colour twice
    assert heldout_pairs(0) == pairs and any(heldout_pairs(s) != pairs for s in range(1, 5))
    train = scene_examples(300, "train", seed=0)
    held, novel = scene_examples(100, "heldout", seed=0), scene_examples(60, "novel-pairs", seed=0)
    for e in train + held:
        assert not any((o.shape, o.colour) in pairs for o in e.scene)
        text = " ".join([e.caption] + [q.question for q in e.qa])
        for shape, colour in pairs:  # no training or held-out-scene sentence names a held-out pair
            assert f"{colour} {shape}" not in text
    assert all(scene_split(e.scene) == "train" for e in train)
    assert all(scene_split(e.scene) == "heldout" for e in held)
    for e in novel:
        assert any((o.shape, o.colour) in pairs for o in e.scene)
    # no held-out scene is a training scene, whatever seed drew the training set: the rule is on the combination
    train_keys = {scene_key(e.scene) for seed in (0, 1, 2) for e in scene_examples(300, "train", seed=seed)}
    assert train_keys.isdisjoint(scene_key(e.scene) for e in held + novel)
    # one-object scenes are few (864 combinations): the bucket holds some of them out too
    singles = [[Obj(sh, c, sz, 0, 0)] for sh in SHAPES for c in COLOUR_RGB for sz in SIZES]
    assert {scene_split(s) for s in singles} == {"train", "heldout", "novel-pairs"}
    assert scene_key([Obj("star", "red", "big", 0, 0), Obj("circle", "blue", "small", 1, 1)]) == \
        scene_key([Obj("circle", "blue", "small", 1, 1), Obj("star", "red", "big", 0, 0)])
    # every shape and colour word is still seen in training
    seen = {w for e in train for o in e.scene for w in (o.shape, o.colour)}
    assert seen == set(SHAPES) | set(COLOUR_RGB)
    assert {e.caption for e in train}.isdisjoint({e.caption for e in held + novel})


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="share a grid cell"):
        render([Obj("star", "red", "big", 0, 0), Obj("circle", "blue", "big", 0, 0)])
    with pytest.raises(ValueError, match="too small"):
        render([Obj("star", "red", "big", 0, 0)], size=8)
    with pytest.raises(ValueError, match="unknown background"):
        render([Obj("star", "red", "big", 0, 0)], background="pink")
    with pytest.raises(ValueError, match="bad object"):
        render([Obj("star", "pink", "big", 0, 0)])
    with pytest.raises(ValueError, match="split must be one of"):
        scene_examples(1, "test")
    assert scenes.QUESTION_KINDS == ["colour", "shape", "count", "position"]


def test_parse_objects_reads_what_describe_writes():
    for scene in random_scenes(500, seed=5, max_objects=5):
        assert parse_objects(describe(scene)) == sorted(scene, key=lambda o: (o.row, o.col))
    text = "there are two shapes: a big red star at the top, ah, a small white diamond at the top right and a blue star."
    assert parse_objects(text) == [Obj("star", "red", "big", 0, 1), Obj("diamond", "white", "small", 0, 2)]
    assert parse_objects("a big red starfish at the top left; a huge red star on the right") == []


def test_rationales_name_the_objects_the_question_is_about():
    for scene in random_scenes(300, seed=6, max_objects=6):
        for q in questions(scene):
            named = parse_objects(q.rationale)
            assert q.rationale.startswith("i see ") and q.rationale.endswith(".")
            assert all(o in scene for o in named), (scene, q)
            if q.kind == "count":
                assert len(named) == NUMBER.index(q.answer), (scene, q)
                continue
            assert len(named) == 1, (scene, q)
            o = named[0]
            assert {"colour": o.colour, "shape": o.shape, "position": PLACES[(o.row, o.col)]}[q.kind] == q.answer
    scene = [Obj("star", "blue", "big", 2, 2), Obj("circle", "red", "small", 1, 1)]
    asked = {q.question: q for q in questions(scene)}
    assert asked["what colour is the star?"].rationale == "i see a big blue star at the bottom right."
    assert asked["how many circles are there?"].rationale == "i see a small red circle in the middle."
    assert asked["how many squares are there?"].rationale == "i see no squares."
    assert asked["how many shapes are there?"].rationale == (
        "i see a small red circle in the middle and a big blue star at the bottom right.")
    target = cot_target(asked["what colour is the star?"])
    assert target == "i see a big blue star at the bottom right. answer: blue"
    assert split_cot(target) == ("i see a big blue star at the bottom right.", "blue")
    assert split_cot("  blue ") == ("", "blue")


WITH_PLACES = ("shape_at", "col_at", "where_shape", "where_cs")
ITEM = re.compile(rf"({'|'.join(scenes.COLOURS)}) ({'|'.join(scenes.SHAPES)})(?: ({'|'.join(scenes.PLACES)}))?$")
C, S, P = (f"(?P<{n}>{'|'.join(v)})" for n, v in (("colour", scenes.COLOURS), ("shape", scenes.SHAPES),
                                                      ("place", scenes.PLACES)))
QUESTION = {d: re.compile(q) for d, q in {
    "col_of_shape": f"what colour is the {S}", "shape_of_col": f"what shape is {C}", "shape_at": f"what shape is {P}",
    "col_at": f"what colour is the shape {P}", "where_shape": f"where is the {S}",
    "where_cs": f"where is the {C} {S}"}.items()}


@pytest.mark.parametrize("direction", scenes.LOOKUP_DIRECTIONS)
def test_each_lookup_answer_belongs_to_the_object_its_question_names(direction):
    """Bare told items of the lookup warm-up: the answer is the named object's attribute; with `avoid` (the
    held-out pairs, as the recipe draws them) no item shows an avoided pair."""
    seen, avoid = set(), scenes.heldout_pairs()
    for i in range(300):
        items, question, answer = scenes.lookup_item(random.Random(i), direction, avoid=avoid)
        objects = [ITEM.match(part).groups() for part in items.split(", ")]  # (colour, shape, place or None)
        assert not avoid.intersection((o[1], o[0]) for o in objects)
        assert 2 <= len(objects) <= 3 and all((o[2] is not None) == (direction in WITH_PLACES) for o in objects)
        for field in range(2 + (direction in WITH_PLACES)):
            assert len({o[field] for o in objects}) == len(objects)  # each colour, shape, place once
        key = QUESTION[direction].fullmatch(question).groupdict()  # what the question names
        named = [o for o in objects if all(dict(zip(("colour", "shape", "place"), o))[f] == v for f, v in key.items())]
        assert len(named) == 1, (items, question)
        colour, shape, place = named[0]
        assert answer == {"col_of_shape": colour, "shape_of_col": shape, "shape_at": shape, "col_at": colour,
                          "where_shape": place, "where_cs": place}[direction]
        seen.add(answer)
    assert len(seen) > 3  # the answers vary
    for k in (1, 2, 5):
        assert len(scenes.lookup_item(random.Random(k), direction, (k,))[0].split(", ")) == k


def test_lookup_phases_parse_and_reject_with_the_phase_named():
    assert scenes.lookup_phases("col_of_shape:600,shape_at:1500:2") == [("col_of_shape", 600, (2, 3)),
                                                                         ("shape_at", 1500, (2,))]
    assert scenes.lookup_phases("") == []
    for bad in ("sideways:10", "col_at:10:7", "col_at:10:0", "col_at", "col_at:x"):
        with pytest.raises(ValueError, match=bad):
            scenes.lookup_phases(f"col_of_shape:5,{bad}")

"""Procedural scenes described in words: the project's own data, deterministic from a seed, nothing downloaded.

A scene is a few objects (shape, colour, size, position on a 3x3 grid); `describe` turns it into a caption.
The text model shipped with the package is trained on these captions. `render` draws a scene, `questions` asks
everything about it that has one answer, and `scene_examples` gives rendered scenes of the train split or of one of
the two held-out splits (rules above `SPLITS`).
"""
from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass

SHAPES = ["circle", "square", "triangle", "star", "hexagon", "diamond"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
SIZES = ["small", "big"]
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "centre", "right"]
NUMBERS = ["no", "one", "two", "three", "four", "five"]


@dataclass(frozen=True)
class Obj:
    """One object of a scene."""

    shape: str
    colour: str
    size: str
    row: int  # 0..2, top to bottom
    col: int  # 0..2, left to right

    def phrase(self) -> str:
        """'a small red circle'."""
        return f"a {self.size} {self.colour} {self.shape}"

    def place(self) -> str:
        """'at the top left', 'in the middle'."""
        if (self.row, self.col) == (1, 1):
            return "in the middle"
        if self.row == 1:
            return f"on the {COLS[self.col]}"
        if self.col == 1:
            return f"at the {ROWS[self.row]}"
        return f"at the {ROWS[self.row]} {COLS[self.col]}"


def sample_scene(rng: random.Random, max_objects: int = 3) -> list[Obj]:
    """Between one and `max_objects` objects in distinct grid cells."""
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], rng.randint(1, max_objects))
    return [Obj(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(SIZES), r, c) for r, c in cells]


def describe(scene: list[Obj]) -> str:
    """A caption naming every object and where it is, in reading order."""
    objs = sorted(scene, key=lambda o: (o.row, o.col))
    parts = [f"{o.phrase()} {o.place()}" for o in objs]
    if len(parts) == 1:
        body = parts[0]
    else:
        body = ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"there is {body}." if len(objs) == 1 else f"there are {NUMBERS[len(objs)]} shapes: {body}."


PLACE_CELLS = {Obj("circle", "red", "big", r, c).place(): (r, c) for r in range(3) for c in range(3)}
_OBJECT = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
                     rf"({'|'.join(sorted(PLACE_CELLS, key=len, reverse=True))})\b")


def parse_objects(text: str) -> list[Obj]:
    """The objects a caption or rationale names ('... a big red star at the top left ...'), in order of mention;
    anything else in the text is skipped. The inverse of `describe` for its objects."""
    return [Obj(shape, colour, size, *PLACE_CELLS[place]) for size, colour, shape, place in _OBJECT.findall(text)]


def captions(n: int, seed: int = 0) -> list[str]:
    """`n` captions of random scenes, the same for the same seed."""
    rng = random.Random(seed)
    return [describe(sample_scene(rng)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Images, questions and the train/held-out split. Everything below is new; the functions above keep their outputs
# (the shipped text model was trained on them).

COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
QUESTION_KINDS = ["colour", "shape", "count", "position"]

# Object colours far apart (the closest pair, yellow/orange, is 85 apart in RGB) and background colours at
# least 90 from every object colour, so a pixel's nearest palette colour always names what is drawn there.
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 230),
    "yellow": (245, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 130, 25),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUND_RGB = {
    "grey": (128, 128, 128),
    "light grey": (190, 190, 195),
    "beige": (200, 185, 150),
    "slate": (70, 85, 105),
    "sky": (150, 190, 215),
    "sage": (130, 160, 120),
}
COLOUR_JITTER = 12  # per channel, added to an object's colour
NOISE_STD = 6.0  # per pixel, on noisy backgrounds only
SUPERSAMPLE = 4  # draw at 4x and box-filter down: smooth edges, interiors keep their exact colour
BIG_RADIUS, SMALL_RADIUS = 0.40, 0.24  # circumradius as a fraction of a grid cell
MAX_ROTATION = 12.0  # degrees; small enough that a square never looks like a diamond


def _polygon(shape: str, cx: float, cy: float, r: float, degrees: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred (centroid) at (cx, cy) with circumradius r, rotated by `degrees`."""
    if shape == "square":
        radii, angles = [r * 0.9] * 4, [45 + 90 * k for k in range(4)]
    elif shape == "diamond":  # taller than wide, so it is not a square turned by 45 degrees
        radii, angles = [r, r * 0.65, r, r * 0.65], [-90, 0, 90, 180]
    elif shape == "triangle":  # point up
        radii, angles = [r] * 3, [-90 + 120 * k for k in range(3)]
    elif shape == "hexagon":
        radii, angles = [r] * 6, [60 * k for k in range(6)]
    elif shape == "star":  # five points, inner radius 0.45 r
        radii, angles = [r if k % 2 == 0 else 0.45 * r for k in range(10)], [-90 + 36 * k for k in range(10)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return [
        (cx + rad * math.cos(math.radians(a + degrees)), cy + rad * math.sin(math.radians(a + degrees)))
        for rad, a in zip(radii, angles)
    ]


def object_centres(
    scene: list[Obj], size: int = 64, rng: random.Random | int = 0, background: str | None = None,
    noisy: bool | None = None,
) -> list[tuple[float, float, float]]:
    """(x, y, radius) in pixels of every object as `render` with the same arguments (a seed, or a copy of the
    Random: both functions draw from it) draws it."""
    return [(x, y, r) for x, y, r, _, _ in _plan(scene, size, _as_rng(rng), background, noisy)[3]]


def _as_rng(rng: random.Random | int) -> random.Random:
    return rng if isinstance(rng, random.Random) else random.Random(rng)


def _plan(scene: list[Obj], size: int, rng: random.Random, background: str | None, noisy: bool | None):
    """All of an image's random draws, in order: background name, noisy or not, noise seed, object layout."""
    if size < 24:
        raise ValueError(f"image size {size} is too small to draw a 3x3 grid of shapes (at least 24)")
    if len(set((o.row, o.col) for o in scene)) != len(scene):
        raise ValueError("two objects share a grid cell")
    if background is None:
        background = rng.choice(sorted(BACKGROUND_RGB))
    if background not in BACKGROUND_RGB:
        raise ValueError(f"unknown background {background!r}; expected one of {sorted(BACKGROUND_RGB)}")
    coin = rng.random() < 0.5  # drawn even when `noisy` is given, so the layout does not depend on it
    noisy = coin if noisy is None else noisy
    noise_seed = rng.getrandbits(32)
    return background, noisy, noise_seed, _layout(scene, size, rng)


def _layout(scene: list[Obj], size: int, rng: random.Random):
    """Per object: centre x, y and radius in pixels, rotation in degrees, jittered RGB; draws from `rng` in order."""
    cell = size / 3
    out = []
    for o in scene:
        if o.shape not in SHAPES or o.colour not in COLOUR_RGB or o.size not in SIZES:
            raise ValueError(f"bad object {o}: shape, colour and size must come from SHAPES, COLOURS and SIZES")
        if not (0 <= o.row <= 2 and 0 <= o.col <= 2):
            raise ValueError(f"bad object {o}: row and col must be 0, 1 or 2")
        r = cell * (BIG_RADIUS * rng.uniform(0.95, 1.05) if o.size == "big" else SMALL_RADIUS * rng.uniform(0.9, 1.1))
        slack = max(0.0, cell / 2 - r - 0.03 * cell)  # keep the whole shape inside its cell
        x = (o.col + 0.5) * cell + rng.uniform(-slack, slack)
        y = (o.row + 0.5) * cell + rng.uniform(-slack, slack)
        degrees = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
        rgb = tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOUR_RGB[o.colour])
        out.append((x, y, r, degrees, rgb))
    return out


def render(
    scene: list[Obj], size: int = 64, rng: random.Random | int = 0, background: str | None = None,
    noisy: bool | None = None,
):
    """Draw a scene as a `size` x `size` RGB PIL image; the same scene and seed give the same pixels.

    The background is one of BACKGROUND_RGB, plain or with Gaussian pixel noise (both chosen by `rng` unless given);
    each object is drawn flat in its (slightly jittered) colour, a little off its cell centre and turned a little.
    """
    import numpy as np
    from PIL import Image, ImageDraw

    background, noisy, noise_seed, layout = _plan(scene, size, _as_rng(rng), background, noisy)

    base = np.empty((size, size, 3), dtype=np.float32)  # [H, W, 3]
    base[:] = BACKGROUND_RGB[background]
    if noisy:
        base += np.random.default_rng(noise_seed).normal(0.0, NOISE_STD, size=base.shape).astype(np.float32)
    base = np.clip(np.rint(base), 0, 255).astype(np.uint8)
    s = SUPERSAMPLE
    # nearest-neighbour upsampling, so after the box filter each background pixel is exactly what it was
    canvas = Image.fromarray(base.repeat(s, axis=0).repeat(s, axis=1), "RGB")
    draw = ImageDraw.Draw(canvas)
    for o, (x, y, r, degrees, rgb) in zip(scene, layout):
        if o.shape == "circle":
            draw.ellipse([(x - r) * s, (y - r) * s, (x + r) * s, (y + r) * s], fill=rgb)
        else:
            draw.polygon([(px * s, py * s) for px, py in _polygon(o.shape, x, y, r, degrees)], fill=rgb)
    return canvas.resize((size, size), Image.BOX)


@dataclass(frozen=True)
class QA:
    """A question about a scene with its one correct answer."""

    kind: str  # one of QUESTION_KINDS
    question: str
    answer: str
    rationale: str = ""  # what to look at first (Multimodal-CoT): "i see a big red star at the top left."


def seen(objs: list[Obj], none: str = "shapes") -> str:
    """The rationale naming the objects a question is about: 'i see a big red star at the top left.', or
    'i see no {none}.' when there are none (a count of zero)."""
    if not objs:
        return f"i see no {none}."
    parts = [f"{o.phrase()} {o.place()}" for o in objs]
    return "i see " + (parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]) + "."


def questions(scene: list[Obj]) -> list[QA]:
    """Every question of the grammar whose answer the scene fixes uniquely, in a fixed order.

    colour: "what colour is the star?" (only if one star), "what colour is the big star?", "what colour is the
    shape at the top left?"; shape: "what shape is at the top left?", "what shape is red?" (only if one red
    object); count: "how many shapes are there?", "how many circles are there?", "how many red shapes are
    there?" (answers "zero" .. "nine"); position: "where is the star?", "where is the red star?" (only if unique),
    answered like the captions: "at the top left", "on the right", "in the middle".
    """
    out: list[QA] = []
    objs = sorted(scene, key=lambda o: (o.row, o.col))

    def only(pred) -> Obj | None:
        hits = [o for o in objs if pred(o)]
        return hits[0] if len(hits) == 1 else None

    for shape in SHAPES:
        if o := only(lambda o: o.shape == shape):
            out.append(QA("colour", f"what colour is the {shape}?", o.colour, seen([o])))
        else:
            for size in SIZES:
                if o := only(lambda o: (o.size, o.shape) == (size, shape)):
                    out.append(QA("colour", f"what colour is the {size} {shape}?", o.colour, seen([o])))
    for o in objs:
        out.append(QA("colour", f"what colour is the shape {o.place()}?", o.colour, seen([o])))
    for o in objs:
        out.append(QA("shape", f"what shape is {o.place()}?", o.shape, seen([o])))
    for colour in COLOURS:
        if o := only(lambda o: o.colour == colour):
            out.append(QA("shape", f"what shape is {colour}?", o.shape, seen([o])))
    out.append(QA("count", "how many shapes are there?", COUNT_WORDS[len(objs)], seen(objs)))
    for shape in SHAPES:
        hits = [o for o in objs if o.shape == shape]
        out.append(QA("count", f"how many {shape}s are there?", COUNT_WORDS[len(hits)], seen(hits, f"{shape}s")))
    for colour in COLOURS:
        if hits := [o for o in objs if o.colour == colour]:
            out.append(QA("count", f"how many {colour} shapes are there?", COUNT_WORDS[len(hits)], seen(hits)))
    for shape in SHAPES:
        if o := only(lambda o: o.shape == shape):
            out.append(QA("position", f"where is the {shape}?", o.place(), seen([o])))
    for o in objs:
        if only(lambda p: (p.colour, p.shape) == (o.colour, o.shape)):
            out.append(QA("position", f"where is the {o.colour} {o.shape}?", o.place(), seen([o])))
    return out


PLACES = [Obj("", "", "", r, c).place() for r in range(3) for c in range(3)]  # "at the top left" ... "at the bottom right"


def question_form(question: str) -> str:
    """The grammar's form of a question, its words of the scene replaced: "what colour is the <shape>?", "what shape
    is <place>?", "how many <colour> shapes are there?" (what is looked up, and how; `mm eval`'s "by form")."""
    places = "|".join(sorted(PLACES, key=len, reverse=True))  # "at the top left" before "at the top"
    form = re.sub(rf"\b({places})\b", "<place>", question)
    form = re.sub(rf"\b({'|'.join(COLOURS)})\b", "<colour>", form)
    form = re.sub(rf"\b({'|'.join(SIZES)})\b", "<size>", form)
    return re.sub(rf"\b({'|'.join(SHAPES)})s?\b", "<shape>", form)


COT_INSTRUCTION = "look first."  # appended to a question: answer with the rationale first, then "answer: ..."


def cot_target(qa: QA) -> str:
    """The reply to a question asked with COT_INSTRUCTION: 'i see a big red star at the top left. answer: red'."""
    return join_cot(qa.rationale, qa.answer)


def join_cot(rationale: str, answer: str) -> str:
    """A reply with its rationale first; `split_cot` takes it apart."""
    return f"{rationale} answer: {answer}"


def split_cot(reply: str) -> tuple[str, str]:
    """(rationale, answer) of a reply in the `cot_target` form; a reply without 'answer:' is all answer."""
    rationale, sep, answer = reply.rpartition("answer:")
    return (rationale.strip(), answer.strip()) if sep else ("", reply.strip())


REPEAT_PROMPT = "repeat: "  # before a text that the reply repeats word for word (the text-only `read` rows)


def told(scene: list[Obj], question: str) -> str:
    """A question about a scene given in words instead of an image: its caption, then the question on a line of its
    own. The answer can only come from looking the object up in the context (text-only `read` rows, `mm eval`)."""
    return f"{describe(scene)}\n{question}"


LOOKUP_DIRECTIONS = ("col_of_shape", "shape_of_col", "shape_at", "col_at", "where_shape", "where_cs")


def lookup_item(rng: random.Random, direction: str, objects: tuple[int, ...] = (2, 3),
                avoid: frozenset[tuple[str, str]] = frozenset()) -> tuple[str, str, str]:
    """A bare told item of one lookup direction: (items, question without its tail, answer), `objects` (a count
    drawn from them) of distinct shapes, colours and places, no (shape, colour) pair in `avoid` (e.g. the held-out
    pairs: redrawn until none is):
        col_of_shape  "red star, blue circle" / "what colour is the star"                 -> "red"
        shape_of_col  "red star, blue circle" / "what shape is red"                       -> "star"
        shape_at      "red star at the top left, ..." / "what shape is at the top left"   -> "star"
        col_at        "..." / "what colour is the shape at the top left"                  -> "red"
        where_shape   "..." / "where is the star"                                         -> "at the top left"
        where_cs      "..." / "where is the red star"                                     -> "at the top left"
    """
    if direction not in LOOKUP_DIRECTIONS:
        raise ValueError(f"lookup direction must be one of {LOOKUP_DIRECTIONS}, got {direction!r}")
    while True:
        k = rng.choice(objects)
        shapes, cols, places = rng.sample(SHAPES, k), rng.sample(COLOURS, k), rng.sample(PLACES, k)
        i = rng.randrange(k)
        if not avoid.intersection(zip(shapes, cols)):
            break
    with_place = direction in ("shape_at", "col_at", "where_shape", "where_cs")
    items = ", ".join(f"{c} {s} {p}" if with_place else f"{c} {s}" for c, s, p in zip(cols, shapes, places))
    question, answer = {"col_of_shape": (f"what colour is the {shapes[i]}", cols[i]),
                        "shape_of_col": (f"what shape is {cols[i]}", shapes[i]),
                        "shape_at": (f"what shape is {places[i]}", shapes[i]),
                        "col_at": (f"what colour is the shape {places[i]}", cols[i]),
                        "where_shape": (f"where is the {shapes[i]}", places[i]),
                        "where_cs": (f"where is the {cols[i]} {shapes[i]}", places[i])}[direction]
    return items, question, answer


def lookup_phases(text: str) -> list[tuple[str, int, tuple[int, ...]]]:
    """'col_of_shape:600,shape_at:1500:2' -> [(direction, steps, objects)]: a warm-up of bare told items, one
    direction after another, on 2-3 objects or the phase's OBJECTS (1-6); ValueError naming a malformed phase."""
    phases = []
    for phase in text.split(",") if text else []:
        direction, *numbers = phase.split(":")
        if direction not in LOOKUP_DIRECTIONS or len(numbers) not in (1, 2) or not all(n.isdigit() for n in numbers) or (
                len(numbers) == 2 and not 1 <= int(numbers[1]) <= 6):
            raise ValueError(f"a lookup warm-up is DIRECTION:STEPS or DIRECTION:STEPS:OBJECTS phases, comma-separated "
                             f"(directions: {', '.join(LOOKUP_DIRECTIONS)}; 1 to 6 objects), got {phase!r}")
        phases.append((direction, int(numbers[0]), (int(numbers[1]),) if len(numbers) == 2 else (2, 3)))
    return phases


def sample_question(scene: list[Obj], rng: random.Random) -> QA:
    """One question: a kind uniformly among QUESTION_KINDS, then a question of that kind uniformly."""
    qas = questions(scene)
    kinds = [k for k in QUESTION_KINDS if any(q.kind == k for q in qas)]  # every scene has all four kinds
    kind = rng.choice(kinds)
    return rng.choice([q for q in qas if q.kind == kind])


# The splits. Two held-out sets, each unseen in training by a rule:
#   heldout      new scenes: the scene's exact combination of objects (shape, colour, size and cell of each) falls
#                in a hashed bucket (1 in HELDOUT_SCENE_BUCKETS) that training never draws, so no held-out scene
#                is ever shown, captioned or asked about in training;
#   novel-pairs  new compositions: each shape gets one held-out colour, no two shapes the same one (a seeded draw
#                of 6 of the 8 colours), e.g. "red star"; a scene with any held-out pair belongs here, and neither
#                training nor `heldout` scenes hold one. Every shape and every colour word still occurs in training.
# `heldout` measures generalisation to unseen scenes; `novel-pairs` measures the much harder composition of
# attributes never seen together.

SPLITS = ("train", "heldout", "novel-pairs")
HELDOUT_SCENE_BUCKETS = 8


def heldout_pairs(split_seed: int = 0) -> frozenset[tuple[str, str]]:
    """The held-out (shape, colour) pairs: one colour per shape, all colours different, fixed by `split_seed`."""
    colours = random.Random(f"heldout-pairs/{split_seed}").sample(COLOURS, len(SHAPES))
    return frozenset(zip(SHAPES, colours))


def scene_key(scene: list[Obj]) -> str:
    """The scene's combination of objects, independent of their order: 'big red circle 0 0|small blue star 2 2'."""
    return "|".join(sorted(f"{o.size} {o.colour} {o.shape} {o.row} {o.col}" for o in scene))


def scene_split(scene: list[Obj], split_seed: int = 0) -> str:
    """'novel-pairs' if any object is a held-out (shape, colour) pair, else 'heldout' if the scene's combination
    hashes into the held-out bucket, else 'train'."""
    pairs = heldout_pairs(split_seed)
    if any((o.shape, o.colour) in pairs for o in scene):
        return "novel-pairs"
    digest = hashlib.sha256(f"{split_seed}/{scene_key(scene)}".encode()).digest()
    return "heldout" if digest[0] % HELDOUT_SCENE_BUCKETS == 0 else "train"


def sample_split_scene(rng: random.Random, split: str, max_objects: int = 3, split_seed: int = 0) -> list[Obj]:
    """A scene from `sample_scene` that belongs to `split` (rejection sampling, so the mix stays natural)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    while True:
        scene = sample_scene(rng, max_objects)
        if scene_split(scene, split_seed) == split:
            return scene


def item_rng(seed: int, split: str, kind: str, index: int) -> random.Random:
    """The random stream of item `index`: items do not depend on how many others are drawn."""
    return random.Random(f"{kind}/{split}/{seed}/{index}")


@dataclass
class SceneExample:
    """A rendered scene with its caption and every unique-answer question about it."""

    scene: list[Obj]
    image: object  # PIL.Image.Image
    caption: str
    qa: list[QA]


def scene_examples(
    n: int, split: str = "train", seed: int = 0, size: int = 64, max_objects: int = 3, split_seed: int = 0
) -> list[SceneExample]:
    """`n` rendered scenes of `split` with captions and questions, the same for the same arguments."""
    out = []
    for i in range(n):
        rng = item_rng(seed, split, "scene", i)
        scene = sample_split_scene(rng, split, max_objects, split_seed)
        out.append(SceneExample(scene, render(scene, size, rng), describe(scene), questions(scene)))
    return out

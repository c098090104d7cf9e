"""Procedural scenes described in words: the project's own data, deterministic from a seed, nothing downloaded.

A scene is a few objects (shape, colour, size, position on a 3x3 grid); `describe` turns it into a caption.
The text model shipped with the package is trained on these captions.
"""
from __future__ import annotations

import random
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


def captions(n: int, seed: int = 0) -> list[str]:
    """`n` captions of random scenes, the same for the same seed."""
    rng = random.Random(seed)
    return [describe(sample_scene(rng)) for _ in range(n)]

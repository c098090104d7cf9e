"""The told-scene lookup probe (mm.eval.lookup): every bare warm-up item's answer is the attribute of the object its
question names, and the command warms up, trains and reports."""
import json
import random
import re

import pytest

from mm.data.scenes import COLOURS, PLACES, SHAPES
from mm.eval.lookup import DIRECTIONS, WITH_PLACES, bare_item, main

ITEM = re.compile(rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})(?: ({'|'.join(PLACES)}))?$")
C, S, P = (f"(?P<{n}>{'|'.join(v)})" for n, v in (("colour", COLOURS), ("shape", SHAPES), ("place", PLACES)))
QUESTION = {d: re.compile(q) for d, q in {
    "col_of_shape": f"what colour is the {S}", "shape_of_col": f"what shape is {C}", "shape_at": f"what shape is {P}",
    "col_at": f"what colour is the shape {P}", "where_shape": f"where is the {S}",
    "where_cs": f"where is the {C} {S}"}.items()}


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_each_bare_answer_belongs_to_the_object_its_question_names(direction):
    seen = set()
    for i in range(300):
        items, question, answer = bare_item(random.Random(i), direction)
        objects = [ITEM.match(part).groups() for part in items.split(", ")]  # (colour, shape, place or None)
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
        assert len(bare_item(random.Random(k), direction, (k,))[0].split(", ")) == k


def test_the_command_warms_up_trains_and_writes_its_curve(tmp_path, capsys):
    out = tmp_path / "lookup.json"
    assert main(["--warmup", "col_of_shape:3,where_cs:3:2", "--steps", "2", "--every", "1", "--eval-items", "4",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert list(result["warmup"]) == ["col_of_shape", "where_cs"]
    assert list(result["warmup"]["where_cs"]) == ["col_of_shape", "where_cs"]
    assert all(0 <= v <= 100 for r in result["warmup"].values() for v in r.values())
    assert [r["step"] for r in result["curve"]] == [1, 2]
    for r in result["curve"]:
        assert 0 < r["loss"] < 20
        for split in ("heldout", "train"):
            assert 0 <= r[split]["accuracy"] <= 100 and set(r[split]["objects"]) == {"1", "2", "3"}
    assert "warm-up where_cs" in capsys.readouterr().out
    for bad in ("sideways:10", "col_at:10:7", "col_at:10:0", "col_at", "col_at:x"):
        with pytest.raises(SystemExit):
            main(["--warmup", bad])

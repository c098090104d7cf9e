"""The told-scene lookup probe (mm.eval.lookup): the command warms up, trains and reports (its bare items are
`mm.data.scenes.lookup_item`, tested with the scenes)."""
import json

import pytest

from mm.eval.lookup import main

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

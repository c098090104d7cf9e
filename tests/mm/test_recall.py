"""The associative-recall probe (mm.eval.recall): each form's sequences hold the answer where the form says, and the
command trains and reports."""
import json

import pytest
import torch

from mm.eval.recall import FILLER, FIRST_KEY, FIRST_VALUE, FORMS, KEYS, SEP, main, recall_batch


@pytest.mark.parametrize("form", list(FORMS))
def test_the_answer_is_the_value_beside_the_query_key(form):
    value_first, fillers = FORMS[form]
    x, y = recall_batch(200, 6, value_first, fillers, torch.Generator().manual_seed(0))
    assert x.shape == (200, 12 + 2 + fillers) and y.shape == (200,)
    for row, answer in zip(x.tolist(), y.tolist()):
        body, query = row[:12], row[13]
        assert row[12] == SEP and row[14:] == list(range(FILLER, FILLER + fillers))
        keys = body[1::2] if value_first else body[0::2]
        values = body[0::2] if value_first else body[1::2]
        assert len(set(keys)) == 6 and all(FIRST_KEY <= k < FIRST_KEY + KEYS for k in keys)
        assert all(FIRST_VALUE <= v < FIRST_VALUE + KEYS for v in values)
        at = body.index(query)
        assert answer == body[at - 1 if value_first else at + 1]


def test_the_command_trains_each_form_and_writes_its_curve(tmp_path, capsys):
    out = tmp_path / "recall.json"
    assert main(["--forms", "easy,both", "--steps", "3", "--every", "1", "--pairs", "2", "--layers", "1",
                 "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--json", str(out)]) == 0
    curves = json.loads(out.read_text())
    assert list(curves) == ["easy", "both"]
    for curve in curves.values():
        assert [r["step"] for r in curve] == [1, 2, 3]
        assert all(0 <= r["accuracy"] <= 1 and 0 < r["loss"] < 10 for r in curve)
    assert "easy" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--forms", "sideways"])


def test_a_curriculum_trains_its_first_steps_on_fewer_pairs(monkeypatch):
    import mm.eval.recall as recall

    seen = []
    real = recall.recall_batch
    monkeypatch.setattr(recall, "recall_batch", lambda n, pairs, first, fillers, g: seen.append((n, pairs, fillers))
                        or real(n, pairs, first, fillers, g))
    log = recall.train_recall("both", 6, pairs=4, batch=8, layers=1, hidden=32, heads=2, kv_heads=1, every=6,
                              curriculum=[(2, 0, 2), (2, None, 1), (3, 1, 1)])
    # held out on the form (4 pairs, 3 fillers); 2 steps on 2 pairs without fillers, 1 with the form's, 1 on 3 pairs
    # with one filler, then the form
    assert seen == [(500, 4, 3), (8, 2, 0), (8, 2, 0), (8, 2, 3), (8, 3, 1), (8, 4, 3), (8, 4, 3)]
    assert [r["step"] for r in log] == [6]
    for bad in ("2", "2:1:2:3", "0:5", "2:9:5", "x:1"):
        with pytest.raises(SystemExit):
            main(["--curriculum", bad])

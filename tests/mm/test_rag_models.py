"""mm.rag with the shipped model: images indexed by its captions, audio by its timed transcripts, answers that show
it the retrieved image, prompts cut to its context; `mm rag index` then `search` / `ask` in new processes."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import mm
from mm.apps.cli import main
from mm.assets import example
from mm.rag import Index, answer
from mm.rag.answer import context_length, prompt_tokens
from tests.mm.test_rag import tiny_pdf

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model():
    return mm.load()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("docs")
    (d / "notes.txt").write_text("Meeting notes.\n\nThe budget for March is twelve thousand euros.\n\n"
                                 "Alice travels to Lisbon in April.\n")
    (d / "report.pdf").write_bytes(tiny_pdf([["Quarterly report", "", "Revenue grew by nine percent in March."]]))
    shutil.copy(example("scene.png"), d / "scene.png")
    shutil.copy(example("question.wav"), d / "question.wav")
    return d


def test_image_and_audio_chunks(model, folder, tmp_path):
    index = Index.open(tmp_path / "db")
    index.add([folder / "scene.png", folder / "question.wav"], model=model)
    chunks = {Path(c.source).name: c for c in index.search("shape star yellow colour bottom", k=5)}
    caption, transcript = model.caption(str(example("scene.png"))), model.transcript(str(example("question.wav")))
    assert (chunks["scene.png"].text, chunks["scene.png"].location, chunks["scene.png"].kind) == (caption, "image", "image")
    seg = transcript.segments[0]
    start, end = round(seg.start), round(transcript.segments[-1].end)
    assert chunks["question.wav"].location == f"00:{start:02d}-00:{end:02d}"  # seconds as mm:ss, by hand
    assert chunks["question.wav"].text == transcript.text and chunks["question.wav"].kind == "audio"


def test_answer_shows_the_image_and_fits_the_context(model, folder, tmp_path):
    index = Index.open(tmp_path / "db")
    index.add([folder / "scene.png"], model=model)
    result = answer(model, index, "what colour is the star?", k=1, max_new_tokens=16)
    caption = model.caption(str(folder / "scene.png"))
    text = ("\nAnswer the question using the numbered sources below. Cite the sources you use as [1], [2], ... If they "
            f"do not hold the answer, say so.\n\n[1] scene.png image:\n{caption}\n\nQuestion: what colour is the star?")
    by_hand = [{"role": "user", "content": [{"type": "image", "image": str(folder / "scene.png")},
                                             {"type": "text", "text": text}]}]
    assert result.text == model.chat(by_hand, max_new_tokens=16)
    assert str(result).endswith("Sources:\n[1] scene.png image")

    (tmp_path / "long").mkdir()
    for i in range(12):  # twelve chunks of ~190 tokens: far more than the 1024-token context holds
        (tmp_path / "long" / f"{i}.txt").write_text(" ".join(f"budget{i} line {j}." for j in range(60)))
    index.add([tmp_path / "long"])
    result = answer(model, index, "budget line", k=6, max_new_tokens=32)
    assert 1 <= len(result.sources) < 6
    from mm.rag.answer import message

    assert prompt_tokens(model, message("budget line", result.sources, None)) + 32 <= context_length(model) == 1024


def run_cli(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mm.apps.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_index_search_ask_across_processes(folder, tmp_path, capsys):
    db = str(tmp_path / "db")
    assert main(["rag", "index", str(folder), "--db", db, "--no-progress"]) == 0
    assert capsys.readouterr().out.strip() == f"4 added, 0 re-indexed, 0 unchanged (4 new chunks); 4 files, 4 chunks in {db}"
    assert main(["rag", "index", str(folder), "--db", db, "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith("0 added, 0 re-indexed, 4 unchanged (0 new chunks)")

    found = run_cli("rag", "search", "budget March", "--db", db, "--json")  # a new process: the index from disk
    assert found.returncode == 0, found.stderr
    hits = json.loads(found.stdout)
    assert [Path(h["source"]).name for h in hits] == ["notes.txt", "report.pdf"]  # "march" in both, budget in one
    assert set(hits[0]) == {"source", "location", "score", "text", "kind"}
    assert (hits[0]["location"], hits[1]["location"]) == ("lines 1-5", "p. 1")
    assert "twelve thousand euros" in hits[0]["text"] and hits[0]["score"] > hits[1]["score"] > 0

    asked = run_cli("rag", "ask", "The budget for March?", "--db", db, "--k", "2")
    assert asked.returncode == 0, asked.stderr
    reply, sources = asked.stdout.rsplit("Sources:\n", 1)
    assert reply.strip() and set(sources.split("\n")) - {""} <= {"[1] notes.txt lines 1-5", "[2] report.pdf p. 1"}

    bad = run_cli("rag", "search", "budget", "--db", db, "--metric", "l1")
    assert bad.returncode == 2 and "indexed with BM25 alone" in bad.stderr


def test_chat_documents_tab(model, folder, tmp_path):
    from mm.apps.chat import build_demo

    demo = build_demo(model, docs_db=tmp_path / "db")
    tabs = [c["props"]["label"] for c in demo.config["components"] if c.get("type") == "tabitem"]
    assert tabs == ["chat", "documents", "agent"]
    fns = {f.fn.__name__: f.fn for f in demo.fns.values() if f.fn is not None}
    assert fns["on_ask"]("budget?") == "error: no documents yet: upload some and press index"
    assert not (tmp_path / "db").exists()  # made at the first upload
    (tmp_path / "x.exe").write_bytes(b"MZ")
    status = fns["on_index"]([str(folder / "notes.txt"), str(folder / "report.pdf"), str(tmp_path / "x.exe")])
    assert status == "2 added, 0 re-indexed, 0 unchanged (2 new chunks); 2 files, 2 chunks; not indexed (unknown " \
                     "type): x.exe"
    assert sorted(p.name for p in (tmp_path / "db" / "files").iterdir()) == ["notes.txt", "report.pdf"]  # kept copies
    reply = fns["on_ask"]("The budget for March?")
    sources = reply.rsplit("Sources:\n", 1)[1].split("\n")
    assert sources and set(sources) <= {"[1] notes.txt lines 1-5", "[2] report.pdf p. 1"}
    assert fns["on_ask"]("  ") == "error: the question is empty"
    again = build_demo(model, docs_db=tmp_path / "db")  # a restart: the index is there
    status = [c["props"]["value"] for c in again.config["components"] if c["props"].get("elem_id") == "rag-status"]
    assert status == ["2 files, 2 chunks"]

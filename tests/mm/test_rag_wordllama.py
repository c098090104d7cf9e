"""WordLlama as mm.rag's dense embedder, against the wordllama package's own `embed` on its real weights.

The wheel wordllama==0.4.0.post1 (weights/l2_supercat_256.safetensors: a [32000, 256] float16 table;
tokenizers/l2_supercat_tokenizer_config.json: Llama 2's tokenizer) is fetched with pip --no-deps into
~/.cache/mm-test (MM_TEST_CACHE) on first use; never committed. The package's `WordLlamaInference` is imported without
its __init__ (which needs toml, not installed) and built as its `WordLlama.load` builds it: the safetensors tensor
"embedding.weight" and `Tokenizer.from_file` of the config."""
import inspect
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from mm.rag import Index
from tests.mm.wheels import fetch_package
from mm.rag.embed import RRF_K, WordLlama, load_embedder

WORDLLAMA = "wordllama==0.4.0.post1"
SCIPY_METRIC = {"cosine": "cosine", "l2": "euclidean", "l1": "cityblock"}


def fetch_wordllama(requirement: str = WORDLLAMA) -> Path:
    """The folder holding the unpacked `wordllama` package of a pinned wheel, cached."""
    return fetch_package(requirement, "wordllama", "weights/l2_supercat_256.safetensors").parent


@pytest.fixture(scope="module")
def site():
    return fetch_wordllama()


@pytest.fixture(scope="module")
def weights(site):
    return site / "wordllama" / "weights" / "l2_supercat_256.safetensors"


@pytest.fixture(scope="module")
def reference(site):
    """The package's WordLlamaInference with the l2_supercat 256-d weights, as WordLlama.load returns it."""
    from safetensors import safe_open
    from tokenizers import Tokenizer

    saved = {k: v for k, v in sys.modules.items() if k == "wordllama" or k.startswith("wordllama.")}
    for k in saved:
        del sys.modules[k]
    sys.modules["wordllama"] = types.ModuleType("wordllama")
    sys.modules["wordllama"].__path__ = [str(site / "wordllama")]
    try:
        from wordllama.inference import WordLlamaInference
    finally:
        for k in [k for k in sys.modules if k == "wordllama" or k.startswith("wordllama.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    with safe_open(site / "wordllama" / "weights" / "l2_supercat_256.safetensors", framework="np") as f:
        table = f.get_tensor("embedding.weight")
    tokenizer = Tokenizer.from_file(str(site / "wordllama" / "tokenizers" / "l2_supercat_tokenizer_config.json"))
    return WordLlamaInference(table, tokenizer)


def first_paragraphs(n: int) -> list[str]:
    """The first paragraph of n real docstrings (json, re, os.path, textwrap, string, functools), on one line each,
    distinct."""
    import functools
    import os.path
    import re
    import string
    import textwrap

    texts = []
    for module in (json, re, os.path, textwrap, string, functools):
        for name, obj in sorted(vars(module).items()):
            doc = None if name.startswith("_") else inspect.getdoc(obj)
            if doc and callable(obj):
                text = " ".join(doc.split("\n\n")[0].split())
                if len(text.split()) >= 6 and text not in texts:
                    texts.append(text)
    assert len(texts) >= n
    return texts[:n]


def test_embeddings_equal_the_package(weights, reference):
    texts = [inspect.getdoc(json), inspect.getdoc(json.dumps), "hello world", "Café naïve — 東京 😀 ∑",
             "word " * 3000, "  two  spaces  ", "x"]
    ours = WordLlama(weights)
    got = ours.encode(texts)  # [7, 256]
    want = reference.embed(texts, norm=True)
    assert got.shape == want.shape == (7, 256) and got.dtype == np.float32
    assert np.abs(got - want).max() <= 1e-6
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    assert np.abs(ours.encode(texts[:3], batch_size=2) - want[:3]).max() <= 1e-6  # batches change nothing
    assert not ours.encode([""]).any()  # an empty text: zeros (the package divides 0 by 0)


def test_named_installed_and_bad_files(site, weights, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    named = load_embedder("wordllama")
    assert isinstance(named, WordLlama) and named.weights.resolve() == weights.resolve()
    assert isinstance(load_embedder(weights), WordLlama)
    with pytest.raises(FileNotFoundError, match="no WordLlama weights"):
        WordLlama(tmp_path / "none_256.safetensors")
    lone = tmp_path / "lone" / "l2_supercat_256.safetensors"
    lone.parent.mkdir()
    shutil.copyfile(weights, lone)
    with pytest.raises(FileNotFoundError, match="l2_supercat_tokenizer_config.json is neither beside it"):
        WordLlama(lone)
    from safetensors.numpy import save_file

    shutil.copyfile(weights.parent.parent / "tokenizers" / "l2_supercat_tokenizer_config.json",
                    tmp_path / "lone" / "l2_supercat_tokenizer_config.json")
    save_file({"emb": np.zeros((4, 8), np.float16)}, str(lone))
    with pytest.raises(ValueError, match="no tensor 'embedding.weight' \\(has emb\\)"):
        WordLlama(lone)
    save_file({"embedding.weight": np.zeros((4, 8), np.float16)}, str(lone))
    with pytest.raises(ValueError, match=r"shape \(4, 8\), not \[32000"):
        WordLlama(lone)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install wordllama"):
        load_embedder("wordllama")


def indexed(texts: list[str], tmp_path, weights) -> Index:
    """An index over one file per text (00.txt, 01.txt, ...) embedded with `weights`."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, t in enumerate(texts):
        (docs / f"{i:02d}.txt").write_text(t)
    index = Index.open(tmp_path / "db", embedder=weights)
    index.add([docs])
    return index


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_exact_top_k_equals_brute_force(weights, reference, tmp_path, metric):
    texts = first_paragraphs(60)
    index = indexed(texts, tmp_path, weights)
    x = reference.embed(texts, norm=True).astype(np.float64)  # [60, 256]
    for query in ("serialize an object to a JSON string", "split a string by a regular expression",
                  "wrap text to a width", "cache the results of a function"):
        d = cdist(reference.embed([query], norm=True).astype(np.float64), x, SCIPY_METRIC[metric])[0]  # [60]
        order = np.argsort(d, kind="stable")[:8]
        hits = index.search(query, k=8, metric=metric, mode="dense")
        assert [h.text for h in hits] == [texts[i] for i in order]
        want = 1 - d[order] if metric == "cosine" else d[order]
        np.testing.assert_allclose([h.score for h in hits], want, rtol=1e-5, atol=1e-5)
    index.close()


def test_index_survives_reopen_through_the_cli(site, tmp_path, capsys, monkeypatch):
    from mm.apps.rag import run_rag

    monkeypatch.syspath_prepend(str(site))
    texts = first_paragraphs(20)
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, t in enumerate(texts):
        (docs / f"{i:02d}.txt").write_text(t)
    db = str(tmp_path / "db")
    assert run_rag(["index", str(docs), "--db", db, "--embedder", "wordllama", "--no-progress"]) == 0
    capsys.readouterr()

    def search(mode, query="decode a JSON document"):
        assert run_rag(["search", query, "--db", db, "--json", "--mode", mode, "--metric", "l1", "--k", "5"]) == 0
        return json.loads(capsys.readouterr().out)

    before = {mode: search(mode) for mode in ("dense", "hybrid", "bm25")}
    again = Index.open(db)  # a new process would see the same files: the embedder is remembered
    assert again.embedder == "wordllama" and len(again) == 20
    hits = again.search("decode a JSON document", k=5, metric="l1", mode="dense")
    assert [(h.source, h.text, h.score) for h in hits] == [(h["source"], h["text"], h["score"])
                                                             for h in before["dense"]]
    again.close()
    assert {mode: search(mode) for mode in before} == before
    (docs / "00.txt").write_text("Bake the sourdough bread in a hot oven with steam.")
    assert run_rag(["index", str(docs), "--db", db, "--no-progress"]) == 0
    assert "0 added, 1 re-indexed, 19 unchanged (1 new chunks); 20 files, 20 chunks" in capsys.readouterr().out
    assert search("dense", "baking bread in an oven")[0]["text"] == "Bake the sourdough bread in a hot oven with steam."
    assert texts[0] not in [h["text"] for h in search("dense", texts[0])]
    with pytest.raises(ValueError, match="indexed with embedder 'wordllama'"):
        Index.open(db, embedder=site / "wordllama" / "weights" / "l2_supercat_256.safetensors")


def test_hybrid_is_the_reciprocal_rank_fusion_of_both(weights, reference, tmp_path):
    texts = ["The cat sat on the warm mat by the oven.", "Bread is baked in a hot oven.",
             "A kitten sleeps on the rug.", "Dogs bark at the mail carrier.", "The baker sells fresh loaves.",
             "Rain fell on the city all night.", "Mice hide from the cat in the barn.", "Snow covered the roofs."]
    query = "baker's oven at night"
    index = indexed(texts, tmp_path, weights)
    x = reference.embed(texts, norm=True).astype(np.float64)
    similarity = x @ reference.embed([query], norm=True)[0].astype(np.float64)  # [8]
    dense = [texts[i] for i in np.argsort(-similarity, kind="stable")]  # all 8, best first
    assert [h.text for h in index.search(query, k=8, mode="dense")] == dense
    lexical = [h.text for h in index.search(query, k=8, mode="bm25")]  # the chunks holding baker, oven or night
    assert set(lexical) == {texts[0], texts[1], texts[4], texts[5]}
    fused = {t: 0.0 for t in texts}
    for ranking in (lexical, dense):
        for rank, t in enumerate(ranking, start=1):
            fused[t] += 1 / (RRF_K + rank)
    want = sorted(texts, key=lambda t: -fused[t])
    hits = index.search(query, k=8, mode="hybrid")
    assert [h.text for h in hits] == want
    np.testing.assert_allclose([h.score for h in hits], [fused[t] for t in want], rtol=1e-12)
    assert want[:4] != lexical and want != dense  # the fusion ranks differently from each of its parts
    index.close()

"""mm.rag without the shipped model: chunking, loaders (HTML, a hand-written PDF), BM25 against its formula, exact
cosine / L2 / L1 search against scipy's distances, the HNSW index, persistence, incremental re-indexing, dense and
hybrid search with a tiny random sentence-transformers model, answers with citations from a scripted model."""
import math
import os

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from mm.rag import Index, answer
from mm.rag.answer import cited_numbers
from mm.rag.documents import count_tokens, html_sections, load, mmss, pack, paragraphs
from mm.rag.embed import reciprocal_rank_fusion
from mm.rag.store import HNSW, Store

SCIPY_METRIC = {"cosine": "cosine", "l2": "euclidean", "l1": "cityblock"}


def tiny_pdf(pages: list[list[str]]) -> bytes:
    """A PDF 1.4 file written by hand: one Helvetica text line per string, an empty string leaves an empty line."""
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>",
            f"<< /Type /Pages /Kids [{' '.join(f'{4 + 2 * i} 0 R' for i in range(len(pages)))}] "
            f"/Count {len(pages)} >>".encode(),
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, lines in enumerate(pages):
        stream = "BT /F1 12 Tf 72 720 Td 14 TL " + " ".join(f"({line}) Tj T*" for line in lines) + " ET"
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {5 + 2 * i} 0 R >>".encode())
        objs.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream".encode())
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objs, start=1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n".encode() + obj + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}w{j}" for j in range(n)) + "."


def test_chunks_end_at_paragraphs_and_overlap():
    sizes = [30, 50, 20, 70, 10, 5, 60]
    text = "\n\n".join(words(f"p{i}", n) for i, n in enumerate(sizes))  # paragraph i: n words + "." = n + 1 tokens
    chunks = pack(paragraphs(text), max_tokens=100, overlap=25)
    assert [count_tokens(t) for t, _, _ in chunks] == [82, 46, 92, 42, 78]  # by hand from the sizes
    ends = {words(f"p{i}", n)[-8:] for i, n in enumerate(sizes)}
    overlaps = []
    for n, (t, a, b) in enumerate(chunks):
        assert count_tokens(t) <= 100 and t[-8:] in ends  # whole paragraphs only: every chunk ends at one's end
        if n:  # the longest start of this chunk that ends the previous one
            m = next(m for m in range(len(t), 0, -1) if chunks[n - 1][0].endswith(t[:m]))
            overlaps.append(count_tokens(t[:m]))
    # p1's last 25 tokens; p2 whole (21); p3's last 25; p4 + p5 (11 + 6)
    assert overlaps == [25, 21, 25, 17]
    assert chunks[1][0].startswith("p1w26 ") and chunks[2][0].startswith("p2w0 ")
    assert [(a, b) for _, a, b in chunks] == [(1, 3), (3, 5), (5, 7), (7, 11), (9, 13)]  # line numbers
    joined = " ".join(t for t, _, _ in chunks)
    assert all(f"p{i}w{j}" in joined for i, n in enumerate(sizes) for j in range(n))


def test_long_paragraph_cut_at_sentences():
    sentences = [words(f"s{i}", 14) for i in range(10)]  # 15 tokens each
    chunks = pack(paragraphs(" ".join(sentences)), max_tokens=40, overlap=10)
    for t, _, _ in chunks:
        assert count_tokens(t) <= 40
        assert t.endswith(".")  # cut at sentence ends: 2 sentences (30 tokens) fit in 40 - 10
    assert [sum(t.count(f"s{i}w0 ") for t, _, _ in chunks) for i in range(10)] == [1] * 10  # each sentence once...
    assert sum(t.count("w13.") for t, _, _ in chunks) == 14  # ... but the 4 overlaps: the last 10 tokens of the 5 pieces
    with pytest.raises(ValueError, match="overlap"):
        pack(paragraphs("a b"), max_tokens=10, overlap=10)


def test_html_text_headings_and_scripts(tmp_path):
    html = ("<html><head><title>Manual</title><style>p {color: red}</style></head><body><h1>Install</h1>"
            "<p>Run <code>pip install</code> &amp; wait.</p><script>alert('x')</script><h2>Use</h2><ul><li>one</li>"
            "<li>two</li></ul></body></html>")
    assert html_sections(html) == [("Manual", ""), ("Install", "Install"), ("Run pip install & wait.", "Install"),
                                   ("Use", "Use"), ("one", "Use"), ("two", "Use")]
    (tmp_path / "m.html").write_text(html)
    chunks = load(tmp_path / "m.html", max_tokens=8, overlap=2)
    assert [c.location for c in chunks] == ["§ Install", "§ Use"] and "alert" not in " ".join(c.text for c in chunks)


def test_pdf_pages(tmp_path):
    pdf = tmp_path / "report.pdf"
    pdf.write_bytes(tiny_pdf([["Quarterly report", "", "Revenue grew by nine percent."],
                              ["Appendix", "", "The auditors signed on May first."]]))
    chunks = load(pdf, max_tokens=50, overlap=5)
    assert [(c.location, c.kind) for c in chunks] == [("pp. 1-2", "pdf")]
    assert chunks[0].text.split("\n\n") == ["Quarterly report", "Revenue grew by nine percent.", "Appendix",
                                            "The auditors signed on May first."]
    by_page = load(pdf, max_tokens=8, overlap=0)  # 2 + 6 tokens, then 1 + 7
    assert [(c.location, c.text) for c in by_page] == [("p. 1", "Quarterly report\n\nRevenue grew by nine percent."),
                                                       ("p. 2", "Appendix\n\nThe auditors signed on May first.")]
    (tmp_path / "bad.pdf").write_bytes(b"%PDF-1.4\nnot really")
    with pytest.raises(ValueError, match="bad.pdf"):
        load(tmp_path / "bad.pdf")


def test_bad_inputs(tmp_path):
    (tmp_path / "x.exe").write_bytes(b"MZ")
    with pytest.raises(ValueError, match=r"x.exe: cannot index files of type '.exe'"):
        load(tmp_path / "x.exe")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8"):
        load(tmp_path / "latin.txt")
    with pytest.raises(ValueError, match="needs a model to caption"):
        load(tmp_path / "a.png")
    index = Index.open(tmp_path / "db")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        index.add([tmp_path / "nowhere"])
    with pytest.raises(ValueError, match="no vectors.*'l2'"):
        index.search("x", metric="l2")
    assert mmss(192) == "03:12" and mmss(3725) == "1:02:05"


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_exact_search_equals_brute_force(tmp_path, metric):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 24)).astype(np.float32)
    store = Store(tmp_path)
    chunks = [type("C", (), {"location": f"row {i}", "text": f"t{i}", "kind": "text"}) for i in range(500)]
    ids = store.replace("a.txt", "0" * 64, 0.0, 0, "text", chunks[:300], x[:300])
    ids += store.replace("b.txt", "1" * 64, 0.0, 0, "text", chunks[300:], x[300:])
    for q in rng.standard_normal((5, 24)).astype(np.float32):
        ref = cdist(q[None].astype(np.float64), x.astype(np.float64), SCIPY_METRIC[metric])[0]  # [500]
        order = np.argsort(ref, kind="stable")[:10]
        got = store.search(q, k=10, metric=metric)
        assert [i for i, _ in got] == [ids[r] for r in order]
        want = 1 - ref[order] if metric == "cosine" else ref[order]
        np.testing.assert_allclose([s for _, s in got], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown metric 'dot'"):
        store.search(x[0], metric="dot")
    with pytest.raises(ValueError, match="query has 3 dimensions"):
        store.search(x[0, :3], metric=metric)


@pytest.mark.parametrize("metric", ["cosine", "l2", "l1"])
def test_hnsw_close_to_exact_and_persisted(tmp_path, metric):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    store = Store(tmp_path)
    chunks = [type("C", (), {"location": "", "text": "", "kind": "text"})] * len(x)
    store.replace("a", "0" * 64, 0.0, 0, "text", chunks, x)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    recall = np.mean([len({i for i, _ in store.search(q, 10, metric, approximate=True)}
                          & {i for i, _ in store.search(q, 10, metric)}) / 10 for q in queries])
    assert recall >= 0.9
    first = store.search(queries[0], 10, metric, approximate=True)
    assert len(list(tmp_path.glob(f"hnsw-{metric}-*.faiss"))) == 1
    exact = dict(store.search(queries[0], 2000, metric))
    np.testing.assert_allclose([s for _, s in first], [exact[i] for i, _ in first], rtol=1e-4, atol=1e-4)
    store.close()
    again = Store(tmp_path)
    assert again.search(queries[0], 10, metric, approximate=True) == first  # the saved graph, read back
    assert isinstance(again.hnsw(metric), HNSW)


def bm25_lucene(query: list[str], docs: list[list[str]], k1=1.5, b=0.75) -> list[float]:
    """BM25 as Lucene scores it since version 8 (its idf; no (k1 + 1) factor, which only scales), for the test."""
    avgdl = sum(map(len, docs)) / len(docs)
    scores = []
    for d in docs:
        s = 0.0
        for term in set(query):
            df = sum(term in e for e in docs)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            tf = d.count(term)
            s += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl)) if tf else 0.0
        scores.append(s)
    return scores


def test_bm25_scores_by_formula_persist_and_reindex(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = {"a.txt": "Cats chase mice. The cat sleeps.", "b.txt": "Dogs chase cats and balls.",
             "c.md": "# Bread\n\nBake the bread at two hundred degrees.", "d.txt": "Mice eat bread and cheese."}
    for name, text in texts.items():
        (docs / name).write_text(text)
    index = Index.open(tmp_path / "db")
    (docs / "blob").write_bytes(b"\x00\xff\xfe binary, no suffix")  # found in the folder: skipped, reported
    assert index.add([docs]) == {"added": 4, "replaced": 0, "unchanged": 0, "chunks": 4,
                                 "skipped": [f"{docs / 'blob'}: not UTF-8 text (invalid start byte at byte 1)"]}
    hits = index.search("cat chasing mice", k=4)
    stems = {"a.txt": "cat chase mice cat sleep", "b.txt": "dog chase cat ball", "c.md": "bread bake bread two hundr degre",
             "d.txt": "mice eat bread chees"}  # Snowball stems of the words that are not stop words, by hand
    names = sorted(texts)
    ref = bm25_lucene("cat chase mice".split(), [stems[n].split() for n in names])
    want = sorted(((s, n) for s, n in zip(ref, names) if s > 0), key=lambda p: -p[0])
    assert [(h.source.split("/")[-1], h.location) for h in hits] == [(n, "line 1") for _, n in want]
    np.testing.assert_allclose([h.score for h in hits], [s for s, _ in want], rtol=1e-5)
    index.close()

    again = Index.open(tmp_path / "db")  # reopened: same ranking from the saved index
    assert [(h.source, h.score) for h in again.search("cat chasing mice", k=4)] == [(h.source, h.score) for h in hits]
    (docs / "c.md").write_text("# Bread\n\nCats never bake. Mice bake bread.")  # changed: its chunk replaced
    os.utime(docs / "a.txt", (1, 1))  # touched, same bytes: unchanged (by its SHA-256)
    (docs / "blob").unlink()
    assert again.add([docs]) == {"added": 0, "replaced": 1, "unchanged": 3, "chunks": 1, "skipped": []}
    assert again.store.file(str((docs / "a.txt").resolve()))[1] == 1.0  # the new mtime recorded
    with pytest.raises(ValueError, match="not UTF-8"):  # named, not found in a folder: an error
        (docs / "bad.txt").write_bytes(b"\xff")
        again.add([docs / "bad.txt"])
    (docs / "bad.txt").unlink()
    assert len(again) == 4 and not again.search("degrees")
    assert again.search("never")[0].text == "# Bread\n\nCats never bake. Mice bake bread."
    again.remove(docs / "c.md")
    assert len(again) == 3 and not again.search("never") and len(again.files()) == 3


def tiny_sentence_transformer(path):
    """A random one-layer BERT with a word-level vocabulary, saved as a sentence-transformers directory."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = "[PAD] [UNK] [CLS] [SEP] [MASK] the a cat cats mice dog bread bake oven rain snow sun".split()
    bert = path / "bert"
    bert.mkdir(parents=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(bert)
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(bert)
    SentenceTransformer(modules=[Transformer(str(bert)), Pooling(16)]).save(str(path / "st"))
    return path / "st"


@pytest.fixture(scope="module")
def st(tmp_path_factory):
    return tiny_sentence_transformer(tmp_path_factory.mktemp("st"))


def test_dense_and_hybrid_with_sentence_transformers(st, tmp_path):
    from sentence_transformers import SentenceTransformer

    docs = tmp_path / "docs"
    docs.mkdir()
    texts = ["the cat", "mice", "a dog", "bake bread", "the oven", "rain", "snow and sun", "cats and mice"]
    for i, t in enumerate(texts):
        (docs / f"{i}.txt").write_text(t)
    index = Index.open(tmp_path / "db", embedder=st)
    index.add([docs])
    reference = SentenceTransformer(str(st), device="cpu")
    x = reference.encode(texts).astype(np.float64)  # [8, 16]
    q = reference.encode(["cat and bread"]).astype(np.float64)
    for metric in ("cosine", "l2", "l1"):
        d = cdist(q, x, SCIPY_METRIC[metric])[0]
        order = np.argsort(d, kind="stable")[:5]
        hits = index.search("cat and bread", k=5, metric=metric, mode="dense")
        assert [h.text for h in hits] == [texts[i] for i in order]
    dense = index.search("cat and bread", k=20, mode="dense")
    lexical = index.search("cat and bread", k=20, mode="bm25")
    assert {h.text for h in lexical} == {"the cat", "bake bread", "cats and mice"}  # "cats" is stemmed to "cat"
    fused = index.search("cat and bread", k=3)  # hybrid by default with an embedder
    rank = {t: 0.0 for t in texts}
    for ranking in (lexical, dense):
        for r, h in enumerate(ranking, start=1):
            rank[h.text] += 1 / (60 + r)
    want = sorted(rank, key=lambda t: -rank[t])[:3]
    assert [h.text for h in fused] == want and fused[0].score == pytest.approx(rank[want[0]])
    index.close()
    with pytest.raises(ValueError, match="indexed with embedder"):
        Index.open(tmp_path / "db", embedder=tmp_path)


def test_reciprocal_rank_fusion():
    fused = reciprocal_rank_fusion([(7, 3.0), (8, 2.0)], [(8, 0.9), (9, 0.5)])
    assert fused == [(8, 1 / 62 + 1 / 61), (7, 1 / 61), (9, 1 / 62)]


class Scripted:
    """A chat model that replies with a fixed text and remembers the messages (no processor: no context limit)."""

    def __init__(self, reply):
        self.reply, self.seen = reply, None

    def chat(self, messages, max_new_tokens=64):
        self.seen = messages
        return self.reply


def test_answer_prompt_and_citations(tmp_path):
    (tmp_path / "a.txt").write_text("The budget for March is twelve thousand euros.")
    (tmp_path / "b.txt").write_text("Alice travels to Lisbon in April; the budget covers it.")
    index = Index.open(tmp_path / "db")
    index.add([tmp_path / "a.txt", tmp_path / "b.txt"])
    model = Scripted("Twelve thousand euros [2], see also [9] and [2].")
    result = answer(model, index, "What is the March budget?", k=2)
    prompt = model.seen[0]["content"]
    assert "[1] a.txt line 1:\nThe budget for March is twelve thousand euros." in prompt
    assert "[2] b.txt line 1:\nAlice travels" in prompt and prompt.endswith("Question: What is the March budget?")
    assert result.cited == [2] and str(result).endswith("Sources:\n[2] b.txt line 1")
    assert cited_numbers("[3] [1] [3] [0]", 3) == [3, 1]
    uncited = answer(Scripted("I do not know."), index, "budget", k=2)
    assert str(uncited) == "I do not know.\n\nSources:\n[1] a.txt line 1\n[2] b.txt line 1"
    with pytest.raises(ValueError, match="question is empty"):
        answer(model, index, "  ")


def test_vectors_in_qdrant_local_mode(st, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = ["the cat", "mice", "a dog", "bake bread", "the oven", "rain", "snow and sun", "cats and mice"]
    for i, t in enumerate(texts):
        (docs / f"{i}.txt").write_text(t)
    local, remote = Index.open(tmp_path / "local", embedder=st), Index.open(tmp_path / "q", st, str(tmp_path / "qd"))
    local.add([docs])
    remote.add([docs])
    assert remote.store.vectors()[0].size == 0  # no vector in SQLite: they are in Qdrant
    for metric in ("cosine", "l2", "l1"):
        want = local.search("cat and bread", k=5, metric=metric, mode="dense")
        got = remote.search("cat and bread", k=5, metric=metric, mode="dense")
        assert [h.text for h in got] == [h.text for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], rtol=1e-4, atol=1e-5)
    (docs / "3.txt").write_text("rain and snow")  # re-indexed: the old vector goes, the new one comes
    assert remote.add([docs])["replaced"] == 1
    remote.close()
    again = Index.open(tmp_path / "q")  # the Qdrant location is kept with the index
    assert again.store.qdrant.client.count("mm_rag").count == 8
    assert "bake bread" not in [h.text for h in again.search("bread", k=8, mode="dense")]
    again.remove(docs / "5.txt")
    assert again.store.qdrant.client.count("mm_rag").count == 7
    again.close()
    with pytest.raises(ValueError, match="keeps its vectors in SQLite"):
        Index.open(tmp_path / "local", qdrant=str(tmp_path / "other"))

"""Embedding and scoring: BM25 (lexical, offline, bm25s), dense vectors from a sentence-transformers model directory
(optional), and their fusion by reciprocal rank (Cormack et al., 2009).

BM25 (Robertson et al.) scores a chunk by the query words it holds, weighted by their rarity across the chunks and
damped by the chunk's length; it needs nothing downloaded. Words are lowercased, English stop words dropped and,
when PyStemmer is installed, stemmed with Snowball's English stemmer (the choice is kept with the index).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

WORD = re.compile(r"\w+")
RRF_K = 60  # Cormack et al.'s constant: a rank-1 hit in one list weighs 1/61


def stemmer(name: str | None):
    """PyStemmer's stemmer for `name` ("english"), None for no stemming; a clear error if the index needs one absent."""
    if not name:
        return None
    try:
        import Stemmer
    except ImportError:
        raise ValueError(f"this index stems words ({name}); install PyStemmer to search it") from None
    return Stemmer.Stemmer(name)


def default_stemming() -> str:
    """"english" when PyStemmer is installed, else "" (no stemming)."""
    try:
        import Stemmer  # noqa: F401
    except ImportError:
        return ""
    return "english"


class BM25:
    """A bm25s index of chunk texts, saved in `directory` with the chunk ids it ranks."""

    def __init__(self, directory: str | Path, stemming: str = ""):
        try:
            import bm25s
            from bm25s.stopwords import STOPWORDS_EN
        except ImportError:
            raise ValueError("lexical search needs bm25s: pip install bm25s") from None
        self.bm25s, self.stopwords = bm25s, set(STOPWORDS_EN)
        self.dir, self.stemming, self.stem = Path(directory), stemming, stemmer(stemming)
        self.retriever, self.ids = None, np.zeros(0, np.int64)
        if (self.dir / "ids.json").exists():
            self.ids = np.array(json.loads((self.dir / "ids.json").read_text()), dtype=np.int64)
            if len(self.ids):
                self.retriever = bm25s.BM25.load(self.dir, show_progress=False)

    def tokens(self, text: str) -> list[str]:
        """The index terms of a text."""
        words = [w for w in WORD.findall(text.lower()) if w not in self.stopwords]
        return self.stem.stemWords(words) if self.stem else words

    def build(self, ids: list[int], texts: list[str]) -> None:
        """Index the texts (all the chunks: BM25's weights depend on the whole collection) and save."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ids = np.array(ids, dtype=np.int64)
        self.retriever = None
        if texts:
            self.retriever = self.bm25s.BM25()
            self.retriever.index([self.tokens(t) for t in texts], show_progress=False)
            self.retriever.save(self.dir, show_progress=False)
        (self.dir / "ids.json").write_text(json.dumps(self.ids.tolist()))

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score) of the k best chunks holding a query term, best first."""
        terms = self.tokens(query)
        if self.retriever is None or not terms or k < 1:
            return []
        rows, scores = self.retriever.retrieve([terms], k=min(k, len(self.ids)), show_progress=False)
        return [(int(self.ids[r]), float(s)) for r, s in zip(rows[0], scores[0]) if s > 0]


class Dense:
    """Sentence embeddings [N, D] from a sentence-transformers model directory (Reimers & Gurevych, 2019)."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ValueError(f"dense embeddings with {model_dir} need sentence-transformers: "
                             "pip install sentence-transformers (or index with BM25 alone)") from None
        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no sentence-transformers model directory there")
        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = dim()  # renamed in sentence-transformers 5

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """float32 embeddings of the texts, [N, D]."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return np.asarray(self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                            show_progress_bar=False), dtype=np.float32)


def reciprocal_rank_fusion(*rankings: list[tuple[int, float]], k: int = RRF_K) -> list[tuple[int, float]]:
    """One ranking from several (each best first): score = sum over rankings of 1 / (k + rank), rank from 1."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (chunk_id, _) in enumerate(ranking, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))

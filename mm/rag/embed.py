"""Embedding and scoring: BM25 (lexical, offline, bm25s), dense vectors (WordLlama's table, or a sentence-transformers
model directory; optional), and their fusion by reciprocal rank (Cormack et al., 2009).

BM25 (Robertson et al.) scores a chunk by the query words it holds, weighted by their rarity across the chunks and
damped by the chunk's length; it needs nothing downloaded. Words are lowercased, English stop words dropped and,
when PyStemmer is installed, stemmed with Snowball's English stemmer (the choice is kept with the index).

An embedder is named by `--embedder`: `wordllama` (the weights the wordllama wheel installs), a WordLlama
`.safetensors` file, or a sentence-transformers model directory.
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


class WordLlama:
    """WordLlama (Miller, 2024): a text's embedding is the mean of its tokens' rows in a [V, D] table distilled from
    Llama 2's token embeddings and trained for sentence similarity, L2-normalised; Llama 2's tokenizer, no special
    tokens, no truncation (as the wordllama package's `embed(texts, norm=True)`, binarisation off).

    Read with safetensors and tokenizers from the wordllama wheel's files (weights/l2_supercat_256.safetensors,
    tensor "embedding.weight"; tokenizers/l2_supercat_tokenizer_config.json) rather than through the package, whose
    import sets the root logger to INFO, needs toml, pydantic and requests, and whose `load` falls back to downloading
    from Hugging Face; the few lines here match its `embed` within 1e-6 (tests/mm/test_rag_wordllama.py)."""

    def __init__(self, weights: str | Path):
        from safetensors import safe_open
        from tokenizers import Tokenizer

        self.weights = Path(weights)
        if not self.weights.is_file():
            raise FileNotFoundError(f"{self.weights}: no WordLlama weights file there")
        config = re.sub(r"_(binary_)?\d+$", "", self.weights.stem)  # l2_supercat_256 -> l2_supercat
        name = f"{config}_tokenizer_config.json"
        found = [d / name for d in (self.weights.parent, self.weights.parent.parent / "tokenizers")
                 if (d / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{self.weights}: its tokenizer {name} is neither beside it nor in ../tokenizers/")
        self.tokenizer = Tokenizer.from_file(str(found[0]))
        with safe_open(self.weights, framework="np") as f:
            if "embedding.weight" not in f.keys():
                raise ValueError(f"{self.weights}: no tensor 'embedding.weight' (has {', '.join(f.keys())})")
            self.table = f.get_tensor("embedding.weight").astype(np.float32)  # [V, D], stored as float16
        if self.table.ndim != 2 or self.table.shape[0] < self.tokenizer.get_vocab_size():
            raise ValueError(f"{self.weights}: embedding.weight has shape {self.table.shape}, not "
                             f"[{self.tokenizer.get_vocab_size()} (the tokenizer's vocabulary), D]")
        self.dim = self.table.shape[1]

    @classmethod
    def installed(cls) -> "WordLlama":
        """The l2_supercat 256-d model of the installed wordllama package (found, not imported)."""
        import importlib.util

        spec = importlib.util.find_spec("wordllama")
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("--embedder wordllama needs the wordllama package's weights: pip install wordllama "
                             "(or give the path of a WordLlama .safetensors file)")
        return cls(Path(spec.submodule_search_locations[0]) / "weights" / "l2_supercat_256.safetensors")

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        """float32 unit-length embeddings of the texts, [N, D] (an empty text: zeros)."""
        out = np.zeros((len(texts), self.dim), np.float32)
        for start in range(0, len(texts), batch_size):
            for i, enc in enumerate(self.tokenizer.encode_batch(list(texts[start:start + batch_size]),
                                                                add_special_tokens=False), start=start):
                x = self.table[enc.ids].sum(axis=0, dtype=np.float32) / np.float32(max(len(enc.ids), 1))  # [D]
                out[i] = x / max(np.linalg.norm(x), 1e-12)
        return out


def embedder_name(embedder: str | Path) -> str:
    """How an index remembers its embedder: "wordllama" as such, a file or directory by its absolute path."""
    return "wordllama" if str(embedder) == "wordllama" else str(Path(embedder).resolve())


def load_embedder(embedder: str | Path) -> "WordLlama | Dense":
    """The embedder named by `--embedder`: "wordllama", a WordLlama .safetensors file or a sentence-transformers
    model directory."""
    if str(embedder) == "wordllama":
        return WordLlama.installed()
    if str(embedder).endswith(".safetensors"):
        return WordLlama(embedder)
    return Dense(embedder)


def reciprocal_rank_fusion(*rankings: list[tuple[int, float]], k: int = RRF_K) -> list[tuple[int, float]]:
    """One ranking from several (each best first): score = sum over rankings of 1 / (k + rank), rank from 1."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (chunk_id, _) in enumerate(ranking, start=1):
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: (-item[1], item[0]))

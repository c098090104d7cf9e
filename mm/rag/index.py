"""An index directory: files in, ranked cited chunks out. Incremental: a file whose content hash is unchanged is
skipped, a changed one has its chunks replaced, and BM25's statistics are rebuilt over the whole collection.

    index = Index.open("docs.db")                  # BM25 alone; Index.open(db, embedder="wordllama") adds vectors
    index.add(["notes/", "talk.wav"], model=mm.load())
    for hit in index.search("when is the meeting", k=5):
        print(hit.source, hit.location, hit.score)
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from mm.rag.documents import kind_of, load
from mm.rag.embed import BM25, Dense, WordLlama, default_stemming, embedder_name, load_embedder, reciprocal_rank_fusion
from mm.rag.store import Store, check_metric

MODES = ("bm25", "dense", "hybrid")


@dataclass
class Hit:
    """A retrieved chunk: its file, where in it, the score (BM25; cosine similarity; L2/L1 distance; fused rank
    score in hybrid mode) and its text. `kind` is text, markdown, html, pdf, image or audio; `chunk_id` its row in
    the store (a re-indexed file's chunks get new ones)."""

    source: str
    location: str
    score: float
    text: str
    kind: str = "text"
    chunk_id: int | None = None

    def cite(self) -> str:
        """`meeting.wav 03:12-03:40`: the file's name and where in it."""
        return f"{Path(self.source).name} {self.location}"

    def to_dict(self) -> dict:
        """The hit as a JSON-ready dict (source, location, score, text, kind)."""
        d = asdict(self)
        del d["chunk_id"]
        return d


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def expand(paths) -> list[Path]:
    """The indexable files under `paths` (files as given, folders walked, hidden entries skipped), sorted."""
    files = []
    for p in map(Path, [paths] if isinstance(paths, (str, Path)) else paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and kind_of(f) is not None
                            and not any(part.startswith(".") for part in f.relative_to(p).parts))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return files


class Index:
    """Chunks of files in a `Store`, searchable by BM25, by dense vectors (with an embedder) or both."""

    def __init__(self, directory: str | Path, embedder: str | Path | None = None, qdrant: str | None = None):
        self.store = Store(directory, qdrant)
        self.dir = self.store.dir
        stored = self.store.meta("embedder")
        if stored is None:  # a new index fixes its embedder and stemming
            stored = embedder_name(embedder) if embedder else ""
            self.store.set_meta("embedder", stored)
            self.store.set_meta("stemming", default_stemming())
        elif embedder and embedder_name(embedder) != stored:
            raise ValueError(f"{self.dir} was indexed with embedder {stored or 'BM25 alone'!r}, not {str(embedder)!r}; "
                             "use a new --db directory to change it")
        self.embedder = stored
        self._dense = None
        self.bm25 = BM25(self.dir / "bm25", self.store.meta("stemming", ""))

    @classmethod
    def open(cls, directory: str | Path, embedder: str | Path | None = None, qdrant: str | None = None) -> "Index":
        """Open (or create) the index in `directory`; `embedder`: "wordllama", a WordLlama .safetensors file or a
        sentence-transformers model directory, for dense vectors (kept with a new index; an existing one remembers its
        own); `qdrant`: keep the vectors in Qdrant (a server URL, or a directory for its local mode) instead of the
        index's SQLite."""
        return cls(directory, embedder, qdrant)

    @property
    def dense(self) -> WordLlama | Dense | None:
        """The embedder, loaded on first use; None for BM25 alone."""
        if self.embedder and self._dense is None:
            self._dense = load_embedder(self.embedder)
        return self._dense

    def add(self, paths, model=None, progress: bool = False, max_tokens: int = 200, overlap: int = 40) -> dict:
        """Index files and folders. Unchanged files (same mtime and size, or else the same SHA-256) are skipped,
        changed ones replaced. Images and audio need `model` (captions, transcripts); without one the shipped model is
        loaded when first needed. A file named in `paths` that cannot be read is an error; one found in a folder is
        skipped and reported. Returns {"added", "replaced", "unchanged", "chunks": counts, "skipped": [reasons]}."""
        files = expand(paths)
        named = {Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths) if Path(p).is_file()}
        counts = {"added": 0, "replaced": 0, "unchanged": 0, "chunks": 0, "skipped": []}
        bar = tqdm(total=len(files), unit="file", desc="indexing", disable=not progress)
        for path in files:
            key, stat = str(path.resolve()), path.stat()
            old = self.store.file(key)
            digest = None if old is not None and old[1:] == (stat.st_mtime, stat.st_size) else sha256(path)
            if old is not None and digest in (None, old[0]):
                counts["unchanged"] += 1
                if digest is not None:  # touched, not changed: next time the mtime tells
                    self.store.touch(key, stat.st_mtime, stat.st_size)
            else:
                kind = kind_of(path)
                if kind in ("image", "audio") and model is None:
                    from mm.models.formats import load as load_model

                    model = load_model()
                try:
                    chunks = load(path, model, max_tokens, overlap)
                except ValueError as e:
                    if path in named:
                        raise
                    counts["skipped"].append(str(e))
                else:
                    for c in chunks:
                        c.source = key
                    vectors = self.dense.encode([c.text for c in chunks]) if self.dense else None
                    self.store.replace(key, digest, stat.st_mtime, stat.st_size, kind, chunks, vectors)
                    counts["replaced" if old else "added"] += 1
                    counts["chunks"] += len(chunks)
            bar.set_postfix_str(path.name[-30:], refresh=False)
            bar.update()
        bar.close()
        if counts["added"] or counts["replaced"] or not (self.dir / "bm25" / "ids.json").exists():
            self.bm25.build(*self.store.texts())
        return counts

    def remove(self, path: str | Path) -> None:
        """Forget a file (by the path it was indexed under)."""
        self.store.remove(str(Path(path).resolve()))
        self.bm25.build(*self.store.texts())

    def files(self) -> list[str]:
        """The indexed files."""
        return self.store.files()

    def __len__(self) -> int:
        return len(self.store)

    def search(self, query: str, k: int = 5, metric: str | None = None, mode: str | None = None,
               approximate: bool = False) -> list[Hit]:
        """The k best chunks for `query`, best first. mode: "bm25", "dense" (by `metric`: cosine, l2 or l1) or
        "hybrid" (both by reciprocal rank fusion); the default is hybrid with an embedder, else BM25. A metric
        needs vectors, i.e. an index made with an embedder."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        mode = mode or ("hybrid" if self.embedder else "bm25")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
        if (metric or mode != "bm25") and not self.embedder:
            raise ValueError(f"{self.dir} has no vectors (indexed with BM25 alone), so it cannot be searched by "
                             f"{'metric ' + repr(metric) if metric else 'mode ' + repr(mode)}; index into a new --db "
                             "with --embedder wordllama (pip install wordllama) or a sentence-transformers model "
                             "directory")
        metric = check_metric(metric or "cosine")
        if mode == "bm25":
            ranked = self.bm25.search(query, k)
        else:
            dense = self.store.search(self.dense.encode([query])[0], k if mode == "dense" else 4 * k, metric, approximate)
            ranked = dense if mode == "dense" else reciprocal_rank_fusion(self.bm25.search(query, 4 * k), dense)[:k]
        rows = self.store.chunks([i for i, _ in ranked])
        return [Hit(*rows[i][:2], score, *rows[i][2:], chunk_id=i) for i, score in ranked if i in rows]

    def close(self) -> None:
        """Close the database file."""
        self.store.close()

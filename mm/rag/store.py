"""The store: one SQLite file for files, chunks and their vectors, exact search by cosine / L2 / L1 in numpy, and an
approximate FAISS HNSW index (optional dependency) for large collections, persisted beside it.

Why this pair: `python -m mm.rag.store_bench` measured FAISS + SQLite, LanceDB and Qdrant's local mode on 100k random
384-d chunks (the README's table). SQLite is in Python's standard library, transactional and one file; exact numpy
search covers all three metrics (LanceDB has no L1); FAISS's HNSW answered in 2 ms at p50 against LanceDB's 11 ms
(IVF_HNSW_SQ) at a larger disk footprint; Qdrant's local mode took ~25 ms per inserted point, unusable at 100k (a
Qdrant server is reachable instead through `mm.rag.qdrant`). A `Store` directory holds `chunks.sqlite` and
`hnsw-<metric>-<version>.faiss`.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

METRICS = ("cosine", "l2", "l1")
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, sha256 TEXT NOT NULL, mtime REAL, size INTEGER, kind TEXT);
CREATE TABLE IF NOT EXISTS chunks (id INTEGER PRIMARY KEY, path TEXT NOT NULL, location TEXT, text TEXT, kind TEXT,
                                   vector BLOB);
CREATE INDEX IF NOT EXISTS chunks_path ON chunks (path);
"""


def check_metric(metric: str) -> str:
    """`metric` if it is one we search by, else a clear error."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose from {', '.join(METRICS)}")
    return metric


def exact_search(vectors: np.ndarray, query: np.ndarray, k: int, metric: str = "cosine", norms: np.ndarray | None = None,
                 block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `vectors` [N, D] nearest `query` [D]: (row indices, scores) best first, k of them. Scores are the
    cosine similarity (higher is nearer) or the L2 / L1 distance (lower is nearer), computed exactly, in blocks.
    `norms` [N]: the rows' L2 norms, if known (cosine)."""
    check_metric(metric)
    query = np.asarray(query, dtype=np.float32).reshape(-1)
    if vectors.ndim != 2 or vectors.shape[1] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} dimensions, the store's vectors {vectors.shape[1:]}")
    scores = np.empty(len(vectors), dtype=np.float32)
    if metric == "cosine":
        q = query / max(np.linalg.norm(query), 1e-12)
        norms = np.maximum(np.linalg.norm(vectors, axis=1) if norms is None else norms, 1e-12)
    for i in range(0, len(vectors), block):
        x = vectors[i:i + block]  # [b, D]
        if metric == "cosine":
            scores[i:i + block] = -(x @ q) / norms[i:i + block]
        elif metric == "l2":
            scores[i:i + block] = np.sqrt(((x - query) ** 2).sum(axis=1))
        else:
            scores[i:i + block] = np.abs(x - query).sum(axis=1)
    k = min(k, len(scores))
    top = np.argpartition(scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
    top = top[np.lexsort((top, scores[top]))]  # by score, ties by row
    return top, (-scores[top] if metric == "cosine" else scores[top])


class Store:
    """Chunks, their files and vectors in `directory/chunks.sqlite`; `search` by vector, exact or approximate.
    With `qdrant` (a server URL or a local-mode directory, kept with the index) the vectors live in Qdrant instead."""

    def __init__(self, directory: str | Path, qdrant: str | None = None):
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"{self.dir}: the index must be a directory, this is a file")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.dir / "chunks.sqlite", check_same_thread=False)
        self.db.executescript(SCHEMA)
        self._matrix = None  # (version, ids [N], vectors [N, D], norms [N]) read once per version
        self._graphs = {}  # metric -> (version, HNSW) read once per version
        stored = self.meta("qdrant")
        if qdrant and stored is None and len(self) == 0:  # a new index chooses where its vectors live
            self.set_meta("qdrant", qdrant)
        elif qdrant and qdrant != stored:
            raise ValueError(f"{self.dir} keeps its vectors {'in ' + stored if stored else 'in SQLite'}, not in {qdrant}")
        self.qdrant = None
        if self.meta("qdrant"):
            from mm.rag.qdrant import QdrantVectors

            self.qdrant = QdrantVectors(self.meta("qdrant"))

    def meta(self, key: str, default: str | None = None) -> str | None:
        """A value stored with the index (embedder, dimension, version)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, key: str, value) -> None:
        """Store a value with the index."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, str(value)))

    @property
    def version(self) -> int:
        """Bumped by every change of the chunks (approximate indexes of an older version are stale)."""
        return int(self.meta("version", "0"))

    def file(self, path: str) -> tuple[str, float, int] | None:
        """(sha256, mtime, size) of an indexed file, None if it is not indexed."""
        return self.db.execute("SELECT sha256, mtime, size FROM files WHERE path = ?", (path,)).fetchone()

    def files(self) -> list[str]:
        """Paths of the indexed files."""
        return [r[0] for r in self.db.execute("SELECT path FROM files ORDER BY path")]

    def replace(self, path: str, sha256: str, mtime: float, size: int, kind: str, chunks, vectors=None) -> list[int]:
        """Put a file's chunks (and their vectors [n, D]) in place of its old ones, in one transaction; their ids."""
        if vectors is not None and len(vectors) != len(chunks):
            raise ValueError(f"{path}: {len(chunks)} chunks but {len(vectors)} vectors")
        old = [r[0] for r in self.db.execute("SELECT id FROM chunks WHERE path = ?", (path,))]
        with self.db:
            self.db.execute("DELETE FROM chunks WHERE path = ?", (path,))
            self.db.execute("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", (path, sha256, mtime, size, kind))
            ids = []
            for i, c in enumerate(chunks):
                local = vectors is not None and self.qdrant is None
                blob = np.asarray(vectors[i], dtype=np.float32).tobytes() if local else None
                cur = self.db.execute("INSERT INTO chunks (path, location, text, kind, vector) VALUES (?, ?, ?, ?, ?)",
                                      (path, c.location, c.text, c.kind, blob))
                ids.append(cur.lastrowid)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (str(self.version + 1),))
        if self.qdrant is not None:
            self.qdrant.delete(old)
            if vectors is not None:
                self.qdrant.upsert(ids, np.asarray(vectors, np.float32))
        return ids

    def touch(self, path: str, mtime: float, size: int) -> None:
        """Record a file's new mtime and size (its content unchanged)."""
        with self.db:
            self.db.execute("UPDATE files SET mtime = ?, size = ? WHERE path = ?", (mtime, size, path))

    def remove(self, path: str) -> None:
        """Forget a file and its chunks."""
        if self.qdrant is not None:
            self.qdrant.delete([r[0] for r in self.db.execute("SELECT id FROM chunks WHERE path = ?", (path,))])
        with self.db:
            self.db.execute("DELETE FROM chunks WHERE path = ?", (path,))
            self.db.execute("DELETE FROM files WHERE path = ?", (path,))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('version', ?)", (str(self.version + 1),))

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]

    def texts(self) -> tuple[list[int], list[str]]:
        """Ids and texts of all chunks, by id."""
        rows = self.db.execute("SELECT id, text FROM chunks ORDER BY id").fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def chunks(self, ids) -> dict[int, tuple[str, str, str, str]]:
        """id -> (path, location, text, kind) of the given chunk ids."""
        ids = [int(i) for i in ids]
        rows = self.db.execute(f"SELECT id, path, location, text, kind FROM chunks WHERE id IN ({','.join('?' * len(ids))})",
                               ids).fetchall()
        return {r[0]: r[1:] for r in rows}

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [N], vectors [N, D] float32) of the chunks that have vectors, read once per version."""
        if self._matrix is None or self._matrix[0] != self.version:
            rows = self.db.execute("SELECT id, vector FROM chunks WHERE vector IS NOT NULL ORDER BY id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            x = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1) if rows \
                else np.zeros((0, 0), np.float32)
            self._matrix = (self.version, ids, x, np.linalg.norm(x, axis=1))
        return self._matrix[1], self._matrix[2]

    def search(self, query: np.ndarray, k: int = 5, metric: str = "cosine",
               approximate: bool = False) -> list[tuple[int, float]]:
        """(chunk id, score) of the k nearest vectors, best first (see `exact_search` for the scores)."""
        if self.qdrant is not None:
            return self.qdrant.search(query, k, check_metric(metric))
        ids, x = self.vectors()
        if len(ids) == 0:
            return []
        if approximate:
            rows, scores = self.hnsw(metric).search(np.asarray(query, np.float32), k)
        else:
            rows, scores = exact_search(x, query, k, metric, norms=self._matrix[3])
        return [(int(ids[r]), float(s)) for r, s in zip(rows, scores)]

    def hnsw(self, metric: str) -> "HNSW":
        """The approximate index of the current vectors for `metric`, built and saved on first use."""
        version = self.version
        if self._graphs.get(check_metric(metric), (None,))[0] == version:
            return self._graphs[metric][1]
        path = self.dir / f"hnsw-{metric}-{version}.faiss"
        for stale in self.dir.glob(f"hnsw-{metric}-*.faiss"):
            if stale != path:
                stale.unlink()
        if path.exists():
            index = HNSW.load(path, metric)
        else:
            index = HNSW.build(self.vectors()[1], metric)
            index.save(path)
        self._graphs[metric] = (version, index)
        return index

    def close(self) -> None:
        """Close the database file (and the Qdrant client)."""
        self.db.close()
        if self.qdrant is not None:
            self.qdrant.close()


class HNSW:
    """FAISS's HNSW graph (Malkov & Yashunin, 2016) over a store's vector rows; cosine as the inner product of
    normalised vectors."""

    FAISS_METRICS = {"cosine": "METRIC_INNER_PRODUCT", "l2": "METRIC_L2", "l1": "METRIC_L1"}

    def __init__(self, index, metric: str):
        self.index, self.metric = index, metric

    @staticmethod
    def faiss():
        """The faiss module, or a clear error."""
        try:
            import faiss
        except ImportError:
            raise ValueError("approximate search needs FAISS: pip install faiss-cpu") from None
        return faiss

    @classmethod
    def build(cls, vectors: np.ndarray, metric: str, m: int = 32, ef_construction: int = 200) -> "HNSW":
        """A graph over `vectors` [N, D] with M links per node."""
        faiss = cls.faiss()
        x = cls.prepare(vectors, metric)
        index = faiss.IndexHNSWFlat(x.shape[1], m, getattr(faiss, cls.FAISS_METRICS[check_metric(metric)]))
        index.hnsw.efConstruction = ef_construction
        index.add(x)
        return cls(index, metric)

    @staticmethod
    def prepare(x: np.ndarray, metric: str) -> np.ndarray:
        """float32 rows, unit length for cosine."""
        x = np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if metric == "cosine" else x

    def search(self, query: np.ndarray, k: int, ef_search: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, scores) as `exact_search` returns them, approximately."""
        self.index.hnsw.efSearch = max(ef_search, k)
        scores, rows = self.index.search(self.prepare(query, self.metric), k)
        keep = rows[0] >= 0
        scores = scores[0][keep]
        return rows[0][keep], (np.sqrt(np.maximum(scores, 0)) if self.metric == "l2" else scores)

    def save(self, path: Path) -> None:
        """Write the graph to a file."""
        self.faiss().write_index(self.index, str(path))

    @classmethod
    def load(cls, path: Path, metric: str) -> "HNSW":
        """Read a graph written by `save`."""
        return cls(cls.faiss().read_index(str(path)), metric)

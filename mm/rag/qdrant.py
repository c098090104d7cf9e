"""Vectors in Qdrant, for collections past one machine: a server by URL (`http://host:6333`), or qdrant-client's
embedded local mode by a directory path (what the tests use). Chunk texts and files stay in the index's SQLite; the
collection holds each chunk's vector under its chunk id, once per metric (named vectors: cosine, l2 = Euclid,
l1 = Manhattan, since a Qdrant vector has one distance). Qdrant's search is approximate (HNSW) on a server,
exact in local mode.
"""
from __future__ import annotations

import numpy as np

DISTANCES = {"cosine": "COSINE", "l2": "EUCLID", "l1": "MANHATTAN"}


class QdrantVectors:
    """A Qdrant collection of chunk vectors: `upsert`, `delete`, `search` (chunk id, score) best first."""

    def __init__(self, location: str, collection: str = "mm_rag"):
        try:
            from qdrant_client import QdrantClient, models
        except ImportError:
            raise ValueError(f"vectors in Qdrant ({location}) need qdrant-client: pip install qdrant-client") from None
        self.models, self.collection, self.location = models, collection, location
        remote = location.startswith(("http://", "https://"))
        self.client = QdrantClient(url=location) if remote else QdrantClient(path=location)

    def ensure(self, dim: int) -> None:
        """Create the collection (one named vector per metric) if it is missing."""
        if not self.client.collection_exists(self.collection):
            params = {m: self.models.VectorParams(size=dim, distance=getattr(self.models.Distance, d))
                      for m, d in DISTANCES.items()}
            self.client.create_collection(self.collection, vectors_config=params)

    def upsert(self, ids: list[int], vectors: np.ndarray) -> None:
        """Put the vectors [n, D] under the chunk ids."""
        if not ids:
            return
        self.ensure(vectors.shape[1])
        points = [self.models.PointStruct(id=int(i), vector={m: v.tolist() for m in DISTANCES})
                  for i, v in zip(ids, np.asarray(vectors, np.float32))]
        self.client.upsert(self.collection, points=points)

    def delete(self, ids: list[int]) -> None:
        """Remove the chunk ids' vectors."""
        if ids and self.client.collection_exists(self.collection):
            self.client.delete(self.collection, points_selector=self.models.PointIdsList(points=[int(i) for i in ids]))

    def search(self, query: np.ndarray, k: int, metric: str) -> list[tuple[int, float]]:
        """(chunk id, score) of the k nearest: cosine similarity, or the L2 / L1 distance, as `Store.search`."""
        if not self.client.collection_exists(self.collection):
            return []
        found = self.client.query_points(self.collection, query=np.asarray(query, np.float32).tolist(), using=metric,
                                         limit=k)
        return [(int(p.id), float(p.score)) for p in found.points]

    def close(self) -> None:
        """Release the client (local mode holds a lock on its directory)."""
        self.client.close()

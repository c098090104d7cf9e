"""Retrieval-augmented generation: load and split files, embed (BM25, dense, hybrid), store, retrieve, answer with citations."""

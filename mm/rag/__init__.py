"""Retrieval-augmented generation: load and split files, embed (BM25, dense, hybrid), store, retrieve, answer with citations.

    from mm.rag import Index, answer
    index = Index.open("docs.db")                      # a directory; created on first use
    index.add(["notes/", "scan.pdf", "meeting.wav"], progress=True)
    hits = index.search("budget for March", k=5)       # [Hit(source, location, score, text, kind)], best first
    print(answer(mm.load(), index, "What is the budget for March?"))
"""
from mm.rag.answer import Answer, answer
from mm.rag.documents import Chunk, load
from mm.rag.index import Hit, Index

__all__ = ["Answer", "Chunk", "Hit", "Index", "answer", "load"]

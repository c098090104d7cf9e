"""Retrieval quality on real text no one here wrote: the docstrings of Python's standard library (each public
module, function, class and method, as `inspect.getdoc` gives them: the same text wherever this Python version is
installed), chunked as `mm rag index` chunks files.

Queries are sentences of the chunks. Two tasks:
- lookup: the sentence stays in the index; the chunk(s) holding it must come first (an upper bound, near trivial);
- ict (the inverse cloze task of Lee et al., 2019): the sentence is deleted from the index, and the chunk(s) it
  came from must be found from the rest of their text: no exact copy to match, only the topic and its words.
Reported: recall@1, recall@5 (a chunk the sentence came from in the top k) and MRR (over the top 100), for BM25 and,
with an embedder, dense (cosine) and hybrid (their reciprocal rank fusion), on the same chunks and queries. The
embedder (`--embedder`, as `mm rag index` takes it): by default WordLlama when the wordllama package is installed
(pip install wordllama), else none; a WordLlama .safetensors file or a sentence-transformers model directory.

    python -m mm.rag.retrieval_bench [--queries 500] [--embedder auto|none|wordllama|FILE|DIR]
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import os
import random
import sys
import tempfile
import time
import warnings

from mm.rag.documents import SENTENCE_END, Chunk, count_tokens, pack, paragraphs
from mm.rag.index import Index

SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "lib2to3", "pydoc_data",
        "ensurepip", "venv", "xxlimited", "xxlimited_35", "xxsubtype", "__future__", "__hello__", "__phello__"}


def stdlib_modules() -> list[str]:
    """The standard library's public top-level modules that import here (no GUI, tests or easter eggs)."""
    names = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names - SKIP):
            if name.startswith("_"):
                continue
            try:
                importlib.import_module(name)
            except Exception:  # a module this build lacks (e.g. curses without its C library)
                continue
            names.append(name)
    return names


def docstrings(module_name: str) -> str:
    """A module's documentation as text: its docstring, then each public function, class and method with its own."""
    module = importlib.import_module(module_name)
    parts = [f"{module_name}\n\n{inspect.getdoc(module) or ''}"]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", module_name) != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isroutine(obj):
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{module_name}.{name}\n\n{doc}")
            if inspect.isclass(obj):
                for mname, member in sorted(vars(obj).items()):
                    mdoc = None if mname.startswith("_") else inspect.getdoc(member)
                    if mdoc and inspect.isroutine(member):
                        parts.append(f"{module_name}.{name}.{mname}\n\n{mdoc}")
    return "\n\n".join(parts)


def corpus(modules: list[str], max_tokens: int, overlap: int) -> list[Chunk]:
    """The chunks of the modules' documentation."""
    chunks = []
    for name in modules:
        text = docstrings(name)
        chunks += [Chunk(f"{name}.txt", f"lines {a:.0f}-{b:.0f}", t, "text") for t, a, b in
                   pack(paragraphs(text), max_tokens, overlap)]
    return chunks


def pick_queries(chunks: list[Chunk], n: int, seed: int) -> list[tuple[str, set[int]]]:
    """n sentences of 8-40 tokens that occur once in the corpus text (overlaps aside), each with the chunks holding it."""
    holders: dict[str, set[int]] = {}
    for i, c in enumerate(chunks):
        for para in c.text.split("\n\n"):
            for s in SENTENCE_END.split(para):
                if 8 <= count_tokens(s) <= 40:
                    holders.setdefault(s.strip(), set()).add(i)
    sources = {s: {chunks[i].source for i in held} for s, held in holders.items()}
    candidates = sorted(s for s, held in holders.items() if len(held) <= 2 and len(sources[s]) == 1
                        and all(count_tokens(chunks[i].text) - count_tokens(s) >= 20 for i in held))
    picked = random.Random(seed).sample(candidates, min(n, len(candidates)))
    return [(s, holders[s]) for s in picked]


def evaluate(index: Index, ids: list[int], queries, mode: str, top: int = 100) -> dict:
    """recall@1, recall@5 and MRR of `mode` over the queries (ids: chunk position -> chunk id)."""
    r1 = r5 = rr = 0.0
    t0 = time.perf_counter()
    for sentence, held in queries:
        want = {ids[i] for i in held}
        hits = index.search(sentence, k=top, mode=mode)
        ranks = [r for r, h in enumerate(hits, start=1) if h.chunk_id in want]
        r1 += bool(ranks and ranks[0] == 1)
        r5 += bool(ranks and ranks[0] <= 5)
        rr += 1 / ranks[0] if ranks else 0.0
    n = len(queries)
    return {"recall@1": r1 / n, "recall@5": r5 / n, "MRR": rr / n, "ms/query": (time.perf_counter() - t0) * 1e3 / n}


def build(directory: str, chunks: list[Chunk], embedder: str | None) -> tuple[Index, list[int], float]:
    """An index of the chunks (by module, as files are indexed); chunk ids in corpus order and the indexing time."""
    index = Index.open(directory, embedder=embedder)
    t0 = time.perf_counter()
    ids = []
    for source in dict.fromkeys(c.source for c in chunks):
        mine = [c for c in chunks if c.source == source]
        vectors = index.dense.encode([c.text for c in mine]) if index.dense else None
        ids += index.store.replace(source, "-", 0.0, 0, "text", mine, vectors)
    index.bm25.build(*index.store.texts())
    return index, ids, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Build the corpus, pick the queries, print the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--max-tokens", type=int, default=200)
    p.add_argument("--overlap", type=int, default=40)
    p.add_argument("--embedder", default="auto", help="dense and hybrid rows: wordllama, a WordLlama .safetensors "
                   "file or a sentence-transformers model directory; auto (default): wordllama if installed; none")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.embedder == "auto":
        args.embedder = "wordllama" if importlib.util.find_spec("wordllama") else None
    elif args.embedder == "none":
        args.embedder = None
    modules = stdlib_modules()
    chunks = corpus(modules, args.max_tokens, args.overlap)
    queries = pick_queries(chunks, args.queries, args.seed)
    tokens = sum(count_tokens(c.text) for c in chunks)
    print(f"corpus: the docstrings of {len(modules)} standard modules (Python {sys.version.split()[0]}), {len(chunks)} chunks, "
          f"{tokens:,} tokens; {len(queries)} query sentences; embedder: {args.embedder or 'none (BM25 alone)'}")
    modes = ["bm25"] + (["dense", "hybrid"] if args.embedder else [])
    print("| task | retriever | recall@1 | recall@5 | MRR | ms/query |\n|---|---|---|---|---|---|")
    for task in ("lookup", "ict"):
        held_out = [Chunk(c.source, c.location, c.text, c.kind) for c in chunks]
        if task == "ict":
            for sentence, held in queries:
                for i in held:
                    held_out[i].text = held_out[i].text.replace(sentence, " ")
        with tempfile.TemporaryDirectory() as tmp:
            index, ids, seconds = build(tmp, held_out, args.embedder)
            for mode in modes:
                r = evaluate(index, ids, queries, mode)
                print(f"| {task} | {mode} | {r['recall@1']:.3f} | {r['recall@5']:.3f} | {r['MRR']:.3f} | "
                      f"{r['ms/query']:.1f} |", flush=True)
            index.close()
    print(f"(indexing {len(chunks)} chunks: {seconds:.1f} s; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

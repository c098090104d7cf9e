"""`mm rag index|search|ask`: retrieval over your own files (`mm.rag`).

    mm rag index notes/ scan.pdf meeting.wav --db docs.db     # incremental; images captioned, audio transcribed
    mm rag search "budget for March" --db docs.db --k 5 --json
    mm rag ask "What is the budget for March?" --db docs.db
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mm rag`."""
    p = argparse.ArgumentParser(prog="mm rag", description="Index your files and ask about them, with citations.")
    sub = p.add_subparsers(dest="action", required=True)

    i = sub.add_parser("index", help="add files and folders to an index (changed files are re-indexed)")
    i.add_argument("paths", nargs="+", help="files or folders: text, Markdown, HTML, PDF, images, audio")
    i.add_argument("--embedder", default=None, help="dense vectors (a new index only): wordllama (after pip install "
                   "wordllama), a WordLlama .safetensors file or a sentence-transformers model directory; default: "
                   "BM25 alone, nothing downloaded")
    i.add_argument("--qdrant", default=None, help="keep the vectors in Qdrant: a server URL (http://host:6333) or a "
                   "directory for its local mode (a new index with --embedder only)")
    i.add_argument("--max-tokens", type=int, default=200, help="chunk size in words and punctuation marks")
    i.add_argument("--overlap", type=int, default=40, help="tokens a chunk repeats from the previous one")
    i.add_argument("--no-progress", action="store_true")

    s = sub.add_parser("search", help="the best chunks for a query, ranked")
    s.add_argument("query")
    s.add_argument("--k", type=int, default=5)
    s.add_argument("--metric", choices=["cosine", "l2", "l1"], default=None,
                   help="vector distance (indexes made with --embedder; default cosine)")
    s.add_argument("--mode", choices=["bm25", "dense", "hybrid"], default=None,
                   help="default: hybrid with an embedder, else bm25")
    s.add_argument("--approximate", action="store_true", help="FAISS HNSW instead of the exact search")
    s.add_argument("--json", action="store_true", help="a JSON list of {source, location, score, text, kind}")

    a = sub.add_parser("ask", help="answer a question from the index, citing its sources")
    a.add_argument("question")
    a.add_argument("--k", type=int, default=4, help="chunks shown to the model")
    a.add_argument("--metric", choices=["cosine", "l2", "l1"], default=None)
    a.add_argument("--mode", choices=["bm25", "dense", "hybrid"], default=None)
    a.add_argument("--max-new-tokens", type=int, default=64)
    for q in (i, a):
        q.add_argument("--model", default=None, help="multimodal or LLaVA directory (captions, transcripts, answers; "
                       "default: the shipped model)")
    for q in (i, s, a):
        q.add_argument("--db", required=True, help="the index directory (created on first use)")
    return p


def run_rag(argv: list[str] | None = None) -> int:
    """`mm rag ...`; returns the exit code."""
    from mm.rag import Index, answer

    args = build_parser().parse_args(argv)
    if args.action != "index" and not (Path(args.db) / "chunks.sqlite").exists():
        raise FileNotFoundError(f"{args.db}: no index there; make one with mm rag index PATH... --db {args.db}")
    index = Index.open(args.db, embedder=getattr(args, "embedder", None), qdrant=getattr(args, "qdrant", None))
    model = None
    if args.action == "ask" or getattr(args, "model", None):  # index: only if given (else loaded when first needed)
        from mm.models.formats import CAPTIONERS, load

        model = load(args.model, expect=CAPTIONERS)
    if args.action == "index":
        counts = index.add(args.paths, model=model, progress=not args.no_progress, max_tokens=args.max_tokens,
                           overlap=args.overlap)
        print(f"{counts['added']} added, {counts['replaced']} re-indexed, {counts['unchanged']} unchanged "
              f"({counts['chunks']} new chunks); {len(index.files())} files, {len(index)} chunks in {args.db}")
        for reason in counts["skipped"]:
            print(f"skipped {reason}", file=sys.stderr)
        return 0
    if args.action == "search":
        hits = index.search(args.query, k=args.k, metric=args.metric, mode=args.mode, approximate=args.approximate)
        if args.json:
            print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False, indent=1))
        else:
            for n, h in enumerate(hits, start=1):
                text = " ".join(h.text.split())
                print(f"{n}. {h.cite()}  (score {h.score:.4f})\n   {text[:300]}{'...' if len(text) > 300 else ''}")
            if not hits:
                print("(no chunk matches)", file=sys.stderr)
        return 0
    print(answer(model, index, args.question, k=args.k, max_new_tokens=args.max_new_tokens, metric=args.metric,
                 mode=args.mode))
    return 0


def index_uploads(index, paths: list[str], model) -> str:
    """Copy uploaded files into the index directory's `files/` (Gradio's upload cache is cleaned daily) and index
    them; a one-line status."""
    import shutil

    from mm.rag.documents import kind_of

    if not paths:
        return "no file uploaded"
    keep = index.dir / "files"
    keep.mkdir(exist_ok=True)
    copied, skipped = [], []
    for p in map(Path, paths):
        if kind_of(p) is None:
            skipped.append(p.name)
            continue
        copied.append(keep / p.name)
        shutil.copyfile(p, copied[-1])
    counts = index.add(copied, model=model) if copied else {"added": 0, "replaced": 0, "unchanged": 0, "chunks": 0}
    status = (f"{counts['added']} added, {counts['replaced']} re-indexed, {counts['unchanged']} unchanged "
              f"({counts['chunks']} new chunks); {len(index.files())} files, {len(index)} chunks")
    return status + (f"; not indexed (unknown type): {', '.join(skipped)}" if skipped else "")


def documents_tab(model, db: str | Path | None = None, k: int = 4, max_new_tokens: int = 64) -> None:
    """The chat's "documents" tab (inside a gr.Blocks): upload files into the index at `db` (None: a temporary
    directory made at the first upload), ask about them with citations."""
    import tempfile

    import gradio as gr

    from mm.rag import Index, answer

    state = {}
    if db is not None and (Path(db) / "chunks.sqlite").exists():
        state["index"] = Index.open(db)

    def on_index(files):
        try:
            if "index" not in state:
                state["index"] = Index.open(db or tempfile.mkdtemp(prefix="mm-chat-docs-"))
            return index_uploads(state["index"], [getattr(f, "name", f) for f in files or []], model)
        except (ValueError, OSError) as e:
            return f"error: {e}"

    def on_ask(question):
        if "index" not in state:
            return "error: no documents yet: upload some and press index"
        try:
            return str(answer(model, state["index"], question, k=k, max_new_tokens=max_new_tokens))
        except (ValueError, OSError) as e:
            return f"error: {e}"

    gr.Markdown("Index text, Markdown, HTML, PDF, image and audio files, then ask about them: the answer lists the "
                "sources it was given.")
    files = gr.File(file_count="multiple", label="files to index", elem_id="rag-files")
    index = state.get("index")
    status = gr.Textbox(label="index", interactive=False, elem_id="rag-status",
                        value=f"{len(index.files())} files, {len(index)} chunks" if index else "no documents yet")
    gr.Button("index", elem_id="rag-index").click(on_index, files, status)
    question = gr.Textbox(label="question", elem_id="rag-question")
    reply = gr.Textbox(label="answer with sources", interactive=False, lines=8, elem_id="rag-answer")
    gr.Button("ask", elem_id="rag-ask").click(on_ask, question, reply)
    question.submit(on_ask, question, reply)

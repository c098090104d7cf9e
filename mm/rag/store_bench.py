"""Vector store candidates on N random D-dimensional chunks: index time, query p50/p95 (k=10, cosine), recall@10 of
the approximate search against the exact top 10, disk, and memory (peak RSS over the process's baseline).

    python -m mm.rag.store_bench --n 100000 --dim 384              # all candidates, a Markdown table
    python -m mm.rag.store_bench --data lowrank                     # vectors of low intrinsic dimension

Candidates (each in its own process, so memory is its own):
- faiss: ours, `mm.rag.store.Store` (SQLite rows with float32 vector blobs; exact numpy search) + FAISS HNSW (M=32).
- lancedb: a Lance table on disk; exact = flat scan, approximate = IVF_HNSW_SQ, 8 partitions probed, re-ranked
  exactly x4 (LanceDB has no L1).
- qdrant: qdrant-client's local mode (the embedded engine the client ships, exact only) with on-disk persistence;
  not in the default run: it inserted ~25 ms per point here (5,000 in 128 s), some 40 minutes for 100k.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CANDIDATES = ("faiss", "lancedb", "qdrant")


def data(n: int, dim: int, queries: int, kind: str = "random", seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Vectors [n, dim] and queries [queries, dim], float32. random: unit normal, the worst case of any approximate
    index (the nearest are hardly nearer than the rest); lowrank: 32 normal factors through a random map plus 10%
    noise, the low intrinsic dimension of real sentence embeddings."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((n, dim), dtype=np.float32), rng.standard_normal((queries, dim), dtype=np.float32)
    basis = rng.standard_normal((32, dim), dtype=np.float32)  # [32, D]
    make = lambda m: (rng.standard_normal((m, 32), dtype=np.float32) @ basis  # noqa: E731
                      + 0.1 * np.sqrt(32) * rng.standard_normal((m, dim), dtype=np.float32))
    return make(n), make(queries)


def truth(x: np.ndarray, q: np.ndarray, k: int) -> list[set[int]]:
    """Exact cosine top-k row sets."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    return [set(np.argsort(-(xn @ v))[:k].tolist()) for v in q]


def peak_mb() -> float:
    """Peak resident memory of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def disk_mb(path: Path) -> float:
    """Bytes under a directory, in MiB."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def timed(search, queries: np.ndarray) -> tuple[list, float, float]:
    """Results and (p50, p95) milliseconds of one search per query."""
    out, times = [], []
    for v in queries:
        t0 = time.perf_counter()
        out.append(search(v))
        times.append((time.perf_counter() - t0) * 1e3)
    return out, float(np.percentile(times, 50)), float(np.percentile(times, 95))


def bench_faiss(x, q, k, d: Path) -> dict:
    from mm.rag.documents import Chunk
    from mm.rag.store import Store

    t0 = time.perf_counter()
    store = Store(d)
    chunks = [Chunk("bench.txt", f"row {i}", f"chunk {i}", "text") for i in range(len(x))]
    ids = np.array(store.replace("bench.txt", "0" * 64, 0.0, 0, "text", chunks, x), dtype=np.int64)
    t_rows = time.perf_counter() - t0
    store.vectors()
    t1 = time.perf_counter()
    store.hnsw("cosine")
    t_ann = time.perf_counter() - t1
    exact, e50, e95 = timed(lambda v: [i for i, _ in store.search(v, k, "cosine")], q)
    approx, a50, a95 = timed(lambda v: [i for i, _ in store.search(v, k, "cosine", approximate=True)], q)
    _, l2_50, _ = timed(lambda v: store.search(v, k, "l2"), q[:20])
    _, l1_50, _ = timed(lambda v: store.search(v, k, "l1"), q[:20])
    row = {i: r for r, i in enumerate(ids)}
    return {"index_s": t_rows, "ann_build_s": t_ann, "exact": [[row[i] for i in r] for r in exact], "exact_p50": e50,
            "exact_p95": e95, "approx": [[row[i] for i in r] for r in approx], "approx_p50": a50, "approx_p95": a95,
            "note": f"exact L2 p50 {l2_50:.1f} ms, L1 p50 {l1_50:.1f} ms"}


def bench_lancedb(x, q, k, d: Path) -> dict:
    import lancedb
    import pyarrow as pa

    t0 = time.perf_counter()
    db = lancedb.connect(str(d))
    vectors = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])
    table = db.create_table("chunks", pa.table({"id": np.arange(len(x)), "text": [f"chunk {i}" for i in range(len(x))],
                                                "vector": vectors}))
    t_rows = time.perf_counter() - t0
    exact, e50, e95 = timed(lambda v: [r["id"] for r in table.search(v).distance_type("cosine").limit(k)
                                       .select(["id"]).to_list()], q)
    t1 = time.perf_counter()
    table.create_index(metric="cosine", index_type="IVF_HNSW_SQ", num_partitions=max(1, len(x) // 4096))
    t_ann = time.perf_counter() - t1
    approx, a50, a95 = timed(lambda v: [r["id"] for r in table.search(v).distance_type("cosine").limit(k).nprobes(8)
                                        .refine_factor(4).select(["id"]).to_list()], q)
    return {"index_s": t_rows, "ann_build_s": t_ann, "exact": exact, "exact_p50": e50, "exact_p95": e95,
            "approx": approx, "approx_p50": a50, "approx_p95": a95, "note": "no L1 distance; ANN: IVF_HNSW_SQ, nprobes 8, refine x4"}


def bench_qdrant(x, q, k, d: Path) -> dict:
    from qdrant_client import QdrantClient, models

    t0 = time.perf_counter()
    client = QdrantClient(path=str(d))
    client.create_collection("chunks", vectors_config=models.VectorParams(size=x.shape[1], distance=models.Distance.COSINE))
    for i in range(0, len(x), 2048):
        client.upload_collection("chunks", vectors=x[i:i + 2048], ids=list(range(i, min(i + 2048, len(x)))),
                                 payload=[{"text": f"chunk {j}"} for j in range(i, min(i + 2048, len(x)))])
    t_rows = time.perf_counter() - t0
    exact, e50, e95 = timed(lambda v: [p.id for p in client.query_points("chunks", query=v, limit=k).points], q)
    client.close()
    return {"index_s": t_rows, "ann_build_s": None, "exact": exact, "exact_p50": e50, "exact_p95": e95,
            "approx": None, "approx_p50": None, "approx_p95": None, "note": "local mode: exact search only"}


def run_one(name: str, n: int, dim: int, queries: int, k: int, kind: str) -> dict:
    """One candidate in this process: its figures (recalls against the exact cosine top k)."""
    x, q = data(n, dim, queries, kind)
    ref = truth(x, q, k)
    base = peak_mb()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / name
        r = {"faiss": bench_faiss, "lancedb": bench_lancedb, "qdrant": bench_qdrant}[name](x, q, k, d)
        r["disk_mb"] = disk_mb(d)
    r["memory_mb"] = peak_mb() - base
    for key in ("exact", "approx"):
        r[f"{key}_recall"] = None if r[key] is None else float(np.mean([len(set(map(int, got)) & t) / k
                                                                         for got, t in zip(r[key], ref)]))
        del r[key]
    return {"candidate": name, **r}


def table(rows: list[dict], n: int, dim: int, kind: str) -> str:
    """The Markdown table of the results."""
    f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    lines = [f"| store ({n:,} x {dim}-d {kind}, k=10, cosine) | index s | ANN build s | exact p50 / p95 ms | exact recall@10 "
             "| ANN p50 / p95 ms | ANN recall@10 | disk MiB | memory MiB | note |", "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['candidate']} | {f(r['index_s'])} | {f(r['ann_build_s'])} | {f(r['exact_p50'])} / "
                     f"{f(r['exact_p95'])} | {f(r['exact_recall'], 3)} | {f(r['approx_p50'], 2)} / {f(r['approx_p95'], 2)}"
                     f" | {f(r['approx_recall'], 3)} | {f(r['disk_mb'], 0)} | {f(r['memory_mb'], 0)} | {r['note']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the candidates (each in a child process), print the table, write JSON."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--data", choices=["random", "lowrank"], default="random")
    p.add_argument("--candidates", default="faiss,lancedb", help=f"comma list of {', '.join(CANDIDATES)}")
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # the child's candidate
    p.add_argument("--out", default="store_bench.json")
    args = p.parse_args(argv)
    if args.only:
        print(json.dumps(run_one(args.only, args.n, args.dim, args.queries, args.k, args.data)))
        return 0
    rows = []
    for name in args.candidates.split(","):
        cmd = [sys.executable, "-m", "mm.rag.store_bench", "--only", name, "--n", str(args.n), "--dim", str(args.dim),
               "--queries", str(args.queries), "--k", str(args.k), "--data", args.data]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{name}: done", file=sys.stderr)
    print(table(rows, args.n, args.dim, args.data))
    print(f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

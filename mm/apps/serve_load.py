"""Load test of `mm serve` on 127.0.0.1: throughput and latency at 1, 4, 8, 16 concurrent clients, with continuous
batching against one request at a time (the same server with --max-batch 1).

    python -m mm.apps.serve_load [--clients 1,4,8,16] [--requests 4] [--max-tokens 48] [--out serve_load.json]
    python -m mm.apps.serve_load --url http://127.0.0.1:8000   # an already running server (one column)
    python -m mm.apps.serve_load --engine 125m                  # the batching engine alone, a random Llama, no HTTP

Each client sends its requests one after another (a closed loop): a caption request for the example image, greedy.
Reported per row: requests/s, completion tokens/s, p50 and p95 request latency, and the load average while it ran.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

EXAMPLE_IMAGE = Path(__file__).resolve().parents[1] / "examples" / "scene.png"


def request_body(max_tokens: int) -> dict:
    url = "data:image/png;base64," + base64.b64encode(EXAMPLE_IMAGE.read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "\ndescribe the image."}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def run_level(url: str, clients: int, requests: int, body: dict) -> dict:
    """`clients` threads each sending `requests` requests in turn; latency and throughput figures."""
    latencies, tokens = [], []

    def client(_):
        with httpx.Client(base_url=url, timeout=600) as http:
            for _ in range(requests):
                t0 = time.perf_counter()
                r = http.post("/v1/chat/completions", json=body)
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                tokens.append(r.json()["usage"]["completion_tokens"])

    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(latencies), "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
            "p50_s": round(statistics.median(latencies), 3), "p95_s": round(percentile(latencies, 0.95), 3),
            "mean_tokens": round(sum(tokens) / len(tokens), 1), "load_before": round(load0, 2),
            "load_after": round(os.getloadavg()[0], 2)}


SIZES = {"10m": dict(vocab_size=8000, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                     num_key_value_heads=2),
         "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=4)}  # the shapes of mm bench


def engine_levels(size: str, levels: list[int], requests: int, max_tokens: int, prompt_len: int = 32) -> list[dict]:
    """`requests` prompts submitted at once to a `BatchingEngine` over a random Llama of `size`, for each max_batch in
    `levels` (1: one at a time); every request decodes exactly max_tokens (no EOS)."""
    import torch

    from decoders import LlamaConfig, LlamaForCausalLM
    from decoders.batching import BatchingEngine

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES[size], max_position_embeddings=512, eos_token_id=None)).eval()
    prompts = torch.randint(3, model.config.vocab_size, (requests, prompt_len))
    rows = []
    for max_batch in levels:
        engine = BatchingEngine(model, max_batch=max_batch).start()
        engine.submit(prompts[0], max_new_tokens=4).result()  # warm-up
        load0, t0 = os.getloadavg()[0], time.perf_counter()
        reqs = [engine.submit(p, max_new_tokens=max_tokens) for p in prompts]
        latencies = []
        for r in reqs:
            r.result()
            latencies.append(time.perf_counter() - t0)
        wall = time.perf_counter() - t0
        engine.stop()
        n = sum(len(r.tokens) for r in reqs)
        rows.append({"server": f"engine {size}", "clients": max_batch, "requests": requests, "wall_s": round(wall, 2),
                     "requests_per_s": round(requests / wall, 2), "tokens_per_s": round(n / wall, 1),
                     "p50_s": round(statistics.median(latencies), 3), "p95_s": round(percentile(latencies, 0.95), 3),
                     "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def start_server(max_batch: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`mm serve` in a child process on a free 127.0.0.1 port, once it answers /v1/models."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mm.apps.cli", "serve", "--port", str(port), "--max-batch", str(max_batch), *extra]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(f"mm serve exited with {proc.returncode}: {' '.join(cmd)}")
        try:
            httpx.get(url + "/v1/models", timeout=1).raise_for_status()
            return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"mm serve did not answer on {url} within 300 s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.apps.serve_load", description=__doc__.split("\n")[0])
    p.add_argument("--url", help="a running server (default: start `mm serve` batched and one-at-a-time)")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-batch", type=int, default=16, help="the batched server's --max-batch")
    p.add_argument("--server-args", default="", help="more `mm serve` options, e.g. '--model DIR --threads 2'")
    p.add_argument("--engine", choices=list(SIZES), help="measure the engine alone on a random Llama of this size: "
                   "--clients are then its max_batch values, --requests the prompts submitted at once")
    p.add_argument("--threads", type=int, default=0, help="CPU threads of the server or engine (default: torch's "
                   "choice; on a busy machine 1 avoids stalls of threads waiting for each other)")
    p.add_argument("--out", default="serve_load.json")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
        args.server_args += f" --threads {args.threads}"
    levels = [int(c) for c in args.clients.split(",")]
    body = request_body(args.max_tokens)
    servers = [] if args.engine else [("url", None)] if args.url else [("batched", args.max_batch), ("one-at-a-time", 1)]
    rows = engine_levels(args.engine, levels, args.requests, args.max_tokens) if args.engine else []
    for name, max_batch in servers:
        proc, url = (None, args.url) if max_batch is None else start_server(max_batch, args.server_args.split())
        try:
            run_level(url, 1, 1, body)  # warm-up
            for c in levels:
                row = {"server": name, **run_level(url, c, args.requests, body)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    print("\n| clients | server | requests/s | tokens/s | p50 s | p95 s | load |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['server']} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['p50_s']} | "
              f"{r['p95_s']} | {r['load_before']}-{r['load_after']} |")
    Path(args.out).write_text(json.dumps({"uname": os.uname().machine, "cpus": os.cpu_count(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""llama.cpp beside us on the same weights: `python -m mm.eval.llama_cpp --build DIR` (also `mm bench --llama-cpp DIR`).

One random Llama per size (mm.eval.bench.random_llama, clear greedy choices) is written as GGUF (`save_gguf`) in
the weights' format and read by both: F32 and BF16 (ours in that dtype), Q8_0 (ours: the file's weights
dequantized, then int8 per channel; `q8_0a8` also quantizes the activations to int8 per token, W8A8, as llama.cpp's
Q8_0 product quantizes them in blocks of 32) and Q4_0 (ours: the file's 4-bit blocks kept as Int4Linear, groups of
32; `q4_0a8`: the same blocks times int8 activations in blocks of 32, W4A8Linear, llama.cpp's own Q4_0 product).
Batch 1, the same thread count for both:
    decode   llama-bench tg128 (128 tokens from an empty context) vs our `generate` from one token,
             (128 steps) / (time of 129 tokens - time of 1 token)
    prefill  llama-bench pp512 vs our `generate(ids[1, 512], max_new_tokens=1)`
    tokens   llama-simple's greedy continuation of a prompt vs ours (the placeholder vocabulary maps `<tN>` <-> N)
Each of `rounds` rounds times ours (best of 3) then llama.cpp (best of its 3 repetitions); a row reports the median
of the per-round ratios and their range: a shared machine drifts within minutes, so ratios are paired in time.

llama.cpp has no Debian package; build it from the source vendored in the llama-cpp-python sdist (without its AMX
backend, which crashes in Q8_0/Q4_0 products on the Sapphire Rapids-class VMs here: llama.cpp issue 20824):
    pip download llama-cpp-python --no-binary :all: --no-deps && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8
    cmake --build build -j --target llama-bench llama-simple
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from decoders.gguf import load_gguf, save_gguf
from decoders.quantize import int8_activations, quantize_model
from mm.eval.bench import best_time, format_table, random_llama

WEIGHTS = {"f32": "F32", "bf16": "BF16", "q8_0": "Q8_0", "q8_0a8": "Q8_0", "q4_0": "Q4_0",
           "q4_0a8": "Q4_0"}  # ours -> GGUF tensor type
COLUMNS = ["model", "weights", "threads", "ours_decode_tok_s", "llama_cpp_decode_tok_s", "decode_ratio",
           "decode_ratio_range", "ours_prefill_tok_s", "llama_cpp_prefill_tok_s", "prefill_ratio",
           "prefill_ratio_range", "same_tokens"]


def binaries(build: str | Path) -> dict[str, Path]:
    """llama-bench and llama-simple under a llama.cpp build directory (its bin/ or itself)."""
    build = Path(build)
    found = {}
    for name in ("llama-bench", "llama-simple"):
        path = next((p for p in (build / "bin" / name, build / name) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"{build}: no {name} in it or in its bin/ "
                                    "(how to build it: python -m mm.eval.llama_cpp --help)")
        found[name] = path
    return found


def llama_bench(exe: Path, gguf: Path, threads: int, n_prompt: int, n_gen: int, repeats: int = 3) -> dict[str, float]:
    """Best tokens/s of `repeats` runs of llama-bench: {"prefill": pp<n_prompt>, "decode": tg<n_gen>}."""
    out = subprocess.run([str(exe), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads),
                          "-r", str(repeats), "-o", "json"], capture_output=True, text=True, check=True).stdout
    tests = json.loads(out)
    return {"prefill": max(next(t for t in tests if t["n_prompt"] == n_prompt and t["n_gen"] == 0)["samples_ts"]),
            "decode": max(next(t for t in tests if t["n_gen"] == n_gen and t["n_prompt"] == 0)["samples_ts"])}


def llama_greedy(exe: Path, gguf: Path, ids: list[int], n: int) -> list[int]:
    """llama-simple's greedy continuation of `ids` (ids[0] is BOS, which llama.cpp adds itself): n ids or fewer,
    as it stops at end of sequence."""
    prompt = "".join(f"<t{i}>" for i in ids[1:])
    text = subprocess.run([str(exe), "-m", str(gguf), "-n", str(n), prompt], capture_output=True, text=True,
                          check=True).stdout
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    pieces = re.findall(r"<t\d+>|<unk>|<s>|</s>", text)
    got = [specials[p] if p in specials else int(p[2:-1]) for p in pieces]
    if got[:len(ids)] != ids:
        raise RuntimeError(f"llama-simple read the prompt as {got[:len(ids)]}, not {ids}")
    return got[len(ids):]


def ours_for(model, weights: str, gguf: Path):
    """Our model for a weights format, from the same file llama.cpp reads where a format is quantized."""
    if weights in ("f32", "bf16"):
        return model.to(torch.float32 if weights == "f32" else torch.bfloat16)
    ours = load_gguf(gguf, dtype=torch.bfloat16, quantized=True)  # Q4_0 stays 4-bit (Int4Linear g32)
    if weights == "q8_0":
        quantize_model(ours, "rtn", 8, None)  # no kernel takes ggml's 32-wide int8 groups: int8 per channel
    elif weights == "q8_0a8":
        quantize_model(ours, "rtn", 8, None, activations=True)
    elif weights == "q4_0a8":
        int8_activations(ours)
    return ours


def compare(size: str, weights: str, exes: dict[str, Path], rounds: int = 3, n_gen: int = 128, n_prompt: int = 512,
            compile: bool = True, log=print) -> dict:
    """One row: our decode and prefill tokens/s against llama.cpp's on the same weights, paired by round."""
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as d:
        base = random_llama(size)
        gguf = save_gguf(base, Path(d) / f"{size}-{weights}.gguf", WEIGHTS[weights])
        model = ours_for(base, weights, gguf)
        vocab = model.config.vocab_size
        prompt = [1] + torch.randint(3, vocab, (15,), generator=torch.Generator().manual_seed(0)).tolist()
        long_prompt = torch.randint(3, vocab, (1, n_prompt), generator=torch.Generator().manual_seed(1))

        def gen(ids, n):
            return model.generate(ids, max_new_tokens=n, eos_token_id=None, compile=compile)

        with torch.inference_mode():
            ours_tokens = gen(torch.tensor([prompt]), 32)[0, len(prompt):].tolist()
            theirs = llama_greedy(exes["llama-simple"], gguf, prompt, 32)
            one = torch.tensor([[1]])
            gen(one, n_gen + 1), gen(long_prompt, 1)  # compile and warm up
            ours, ref = {"decode": [], "prefill": []}, {"decode": [], "prefill": []}
            for _ in range(rounds):
                t1, tn = best_time(lambda: gen(one, 1), 3), best_time(lambda: gen(one, n_gen + 1), 3)
                ours["decode"].append(n_gen / (tn - t1))
                ours["prefill"].append(n_prompt / best_time(lambda: gen(long_prompt, 1), 3))
                for k, v in llama_bench(exes["llama-bench"], gguf, threads, n_prompt, n_gen).items():
                    ref[k].append(v)
    differ = [i for i, (a, b) in enumerate(zip(ours_tokens, theirs)) if a != b]
    row = {"model": size, "weights": weights, "threads": threads, "rounds": rounds,
           "same_tokens": not differ and len(theirs) == len(ours_tokens),
           "first_difference": differ[0] if differ else None, "load_avg_1m": round(os.getloadavg()[0], 2)}
    for k in ("decode", "prefill"):
        ratios = [a / b for a, b in zip(ours[k], ref[k])]
        row[f"ours_{k}_tok_s"] = statistics.median(ours[k])
        row[f"llama_cpp_{k}_tok_s"] = statistics.median(ref[k])
        row[f"{k}_ratio"] = statistics.median(ratios)
        row[f"{k}_ratio_range"] = f"{min(ratios):.2f}-{max(ratios):.2f}"
    log(format_table([row], COLUMNS).splitlines()[-1])
    return row


def run(build: str | Path, sizes=("10m", "125m"), weights=("f32", "bf16"), rounds: int = 3, compile: bool = True,
        out: str | None = None, log=print) -> list[dict]:
    exes = binaries(build)
    log(f"llama.cpp from {build}; {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}")
    rows = []
    for size in sizes:
        for w in weights:
            torch._dynamo.reset()  # the compiled step skips guards on modules: one model per compilation
            rows.append(compare(size, w, exes, rounds, compile=compile, log=log))
    log("\n" + format_table(rows, COLUMNS))
    if out:
        Path(out).write_text(json.dumps(rows, indent=1))
        log(f"wrote {out}")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.eval.llama_cpp", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n")[-1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", required=True,
                   help="llama.cpp build directory (holding bin/llama-bench, bin/llama-simple)")
    p.add_argument("--sizes", default="10m,125m", help="comma list of 10m, 125m, 1b")
    p.add_argument("--weights", default="f32,bf16", help=f"comma list of {', '.join(WEIGHTS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench_llama_cpp.json")
    args = p.parse_args(argv)
    for name, given, known in (("--weights", args.weights, WEIGHTS), ("--sizes", args.sizes, ("10m", "125m", "1b"))):
        unknown = set(given.split(",")) - set(known)
        if unknown:
            p.error(f"{name}: unknown {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run(args.build, args.sizes.split(","), args.weights.split(","), args.rounds, not args.no_compile, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

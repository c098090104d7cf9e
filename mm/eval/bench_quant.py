"""Decode speed of quantized vs bf16 weights: `python -m mm.eval.bench_quant [--sizes 125m,1b] [--no-compile]`.

Batch 1, greedy, the same random weights (shapes of mm.eval.bench's 125M and TinyLlama-1.1B, with clear greedy
choices) in bf16, int8 weight-only, int4 g32 / g128 weight-only, W8A8 and W4A8 g32 / g128 (all linears, the head
included). Decode tokens/s = (new tokens - 1) / (time of n tokens - time of 1 token), the median of `repeats` rounds
in which every variant runs once (paired in time: the speed-up over bf16 is the median of the per-round ratios, with
their range); also whether the greedy tokens equal bf16's and the resident weight bytes. The machine's load average
is printed beside the figures: on a shared machine they move with it.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import statistics

import torch

from decoders import LlamaForCausalLM
from decoders.quantize import memory_report, quantize_model
from mm.eval.bench import decode_rounds, put_ratio, random_llama

VARIANTS = {"bf16": None, "int8": dict(bits=8, group_size=None), "int4-g128": dict(bits=4, group_size=128),
            "int4-g32": dict(bits=4, group_size=32), "w8a8": dict(bits=8, group_size=None, activations=True),
            "w4a8-g32": dict(bits=4, group_size=32, activations=True),
            "w4a8-g128": dict(bits=4, group_size=128, activations=True)}  # RTN


def make_variant(base: LlamaForCausalLM, name: str) -> LlamaForCausalLM:
    import copy

    model = copy.deepcopy(base).to(torch.bfloat16)
    if VARIANTS[name] is not None:
        quantize_model(model, "rtn", **VARIANTS[name])
    return model


def bench(size: str, variants: list[str], new_tokens: int, repeats: int, compile: bool, log=print) -> list[dict]:
    """One row per variant; their decode timings paired in rounds, the speed-up over the first variant (bf16) as the
    median of the per-round ratios with their range."""
    base = random_llama(size)
    ids = torch.randint(3, base.config.vocab_size, (1, 16))
    models = {name: make_variant(base, name) for name in variants}
    gens = {name: functools.partial(lambda m, n: m.generate(ids, max_new_tokens=n, eos_token_id=None, compile=compile),
                                    model) for name, model in models.items()}
    with torch.inference_mode():
        tokens = {name: gen(new_tokens) for name, gen in gens.items()}  # warms up (and compiles)
        rates = decode_rounds(gens, {}, 1, ids.shape[1], new_tokens, repeats)
    rows = []
    for name, model in models.items():
        mem = memory_report(model)
        row = {"model": size, "weights": name, "compiled": compile,
               "decode_tok_s": round(statistics.median(rates[name][1]), 1),
               "same_tokens_as_bf16": bool(torch.equal(tokens[name], tokens[variants[0]])),
               "linear_MiB": round((mem["measured_bytes"] or 2 * sum(m.weight.numel() for m in model.modules()
                                                                       if isinstance(m, torch.nn.Linear))) / 2**20, 1),
               "load_avg_1m": round(os.getloadavg()[0], 2)}
        put_ratio(row, "speedup_vs_bf16", rates[name][1], rates[variants[0]][1])
        rows.append(row)
        log(json.dumps(row))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.eval.bench_quant", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="125m,1b")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="bench_quant.json")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes.split(","):
        rows += bench(size, args.variants.split(","), args.new_tokens, args.repeats, not args.no_compile)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    for r in rows:
        lo, hi = r["speedup_vs_bf16_range"]
        print(f"{r['model']:>5} {r['weights']:>10} {r['decode_tok_s']:>8} tok/s  x{r['speedup_vs_bf16']:.2f} "
              f"({lo:.2f}-{hi:.2f})  same tokens: {r['same_tokens_as_bf16']}  linears {r['linear_MiB']} MiB  "
              f"load {r['load_avg_1m']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

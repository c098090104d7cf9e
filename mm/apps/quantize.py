"""`mm quantize MODEL --method rtn|awq|smoothquant --bits 8|4|3 [--group-size 128] [--calib FILE]
[--int8-activations] --out DIR`.

MODEL: a Hugging Face Llama directory or a llama GGUF file. DIR: a Hugging Face directory with
`quantization_config` (AWQ GEMM layout for 4/3 bits, int8 for 8) and the tokenizer files, which `mm.load` and
`mm generate` open. `--int8-activations`: W8A8 (RTN) or W4A8 / W3A8 (RTN or AWQ weights), the activations quantized
to int8 at run time too (per token for 8-bit weights, per block of 32 inputs for 4/3-bit ones); SmoothQuant is W8A8.
Calibration (AWQ, SmoothQuant): a text file (paragraphs), a JSONL file (each line's "text", or its string values), or
by default the project's own scene captions.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


def calibration_texts(path: str | None, n: int) -> list[str]:
    """Up to `n` texts from a .txt (blank-line paragraphs, else lines) or .jsonl file; the scene captions by default."""
    if path is None:
        from mm.data.scenes import captions

        return captions(n, seed=0)
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--calib: no such file {p}")
    raw = p.read_text(encoding="utf-8", errors="replace")
    if p.suffix == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"--calib {p}: line {i} is not JSON ({e.msg})") from e
            if isinstance(row, str):
                texts.append(row)
            elif isinstance(row, dict):
                texts.append(row["text"] if isinstance(row.get("text"), str) else
                             "\n".join(v for v in row.values() if isinstance(v, str)))
    else:
        texts = [t.strip() for t in raw.split("\n\n") if t.strip()]
        if len(texts) < n:
            texts = [t.strip() for t in raw.splitlines() if t.strip()]
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError(f"--calib {p}: no text found")
    return texts[:n]


def calibration_ids(tokenizer, texts: list[str], samples: int, tokens: int):
    """Token ids [samples, tokens]: the texts joined into one stream, cut into windows (repeated if short)."""
    import torch

    stream = [t for text in texts for t in tokenizer.encode(text, bos=True)]
    if not stream:
        raise ValueError("calibration text encodes to no tokens")
    need = samples * tokens
    stream = (stream * (need // len(stream) + 1))[:need]
    return torch.tensor(stream).view(samples, tokens)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face Llama directory or llama .gguf file")
    p.add_argument("--method", choices=["rtn", "awq", "smoothquant"], default="rtn")
    p.add_argument("--bits", type=int, choices=[8, 4, 3], default=4)
    p.add_argument("--group-size", type=int, default=128, help="4/3 bits: inputs per scale (32, 64, 128, 256)")
    p.add_argument("--symmetric", action="store_true", help="4/3 bits: no zero point")
    p.add_argument("--int8-activations", action="store_true",
                   help="W8A8 / W4A8 / W3A8: int8 activations at run time too (rtn, awq; smoothquant always)")
    p.add_argument("--calib", default=None, help="calibration .txt or .jsonl (default: the project's scene captions)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-tokens", type=int, default=256)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant's migration strength")
    p.add_argument("--skip", default="", help="comma list of linear names to keep in float (e.g. lm_head)")
    p.add_argument("--out", required=True, help="output directory")


def run_quantize(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mm quantize", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)

    import torch
    from tqdm import tqdm

    from decoders.awq_format import save_quantized
    from decoders.quantize import linear_names, memory_report, quantize_model
    from decoders.tokenizer import load_tokenizer

    from mm.models.formats import detect, load

    src = Path(args.model)
    kind = detect(src)
    if kind not in ("llama", "gguf"):
        raise ValueError(f"{src}: a {kind} checkpoint; mm quantize takes a Llama directory or a llama .gguf file")
    group = None if args.bits == 8 else args.group_size
    if args.method == "smoothquant" and args.bits != 8:
        raise ValueError(f"--method smoothquant is W8A8: use --bits 8 (got {args.bits})")
    if args.int8_activations and args.method == "awq" and args.bits == 8:
        raise ValueError("--method awq --bits 8 --int8-activations: W8A8 is --method smoothquant or rtn")
    activations = args.int8_activations and args.method != "smoothquant"
    # a GGUF file is requantized from its float weights
    model = load(src, dtype=torch.float32, **({"quantized": False} if kind == "gguf" else {}))
    skip = tuple(s for s in args.skip.split(",") if s)
    calib = None
    if args.method != "rtn":
        calib = calibration_ids(load_tokenizer(src), calibration_texts(args.calib, 4 * args.calib_samples),
                                args.calib_samples, args.calib_tokens)
    bar = tqdm(total=len(linear_names(model, skip=skip)), unit="linear",
               desc=f"{args.method} W{args.bits}" + ("A8" if activations or args.method == "smoothquant" else ""))
    t0 = time.perf_counter()
    extra = {"alpha": args.alpha} if args.method == "smoothquant" else {}
    with torch.no_grad():
        quantize_model(model, args.method, args.bits, group, symmetric=args.symmetric, skip=skip, calib=calib,
                       progress=lambda name: bar.update(1), activations=activations, **extra)
    bar.close()
    out = Path(args.out)
    save_quantized(model, out)
    if kind == "gguf":  # the file's own tokenizer (not whatever lies beside it), as out/tokenizer.gguf
        load_tokenizer(src).save(out)
    else:
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy(src / name, out / name)
    r = memory_report(model)
    print(f"{out}: {r['quantized_params']:,} weights quantized in {time.perf_counter() - t0:.1f} s; resident "
          f"{r['measured_bytes'] / 2**20:.2f} MiB (formula {r['formula_bytes'] / 2**20:.2f} MiB, bf16 "
          f"{r['float_bytes'] / 2**20:.2f} MiB, {r['bits_per_weight']:.2f} bits/weight)")
    return 0

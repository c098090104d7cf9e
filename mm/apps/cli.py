"""The `mm` command line: `generate`, `transcribe`, `train`, `bench` parsed here; the others (DELEGATED) by their modules."""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from mm.apps.options import check_threads, set_threads

DTYPES = ("float32", "bfloat16", "float16")


def cmd_generate(args) -> int:
    """Stream a continuation of `--prompt` from a decoder checkpoint directory (Llama, Meta, quantized, DeepSeek,
    Mixtral: `mm.models.formats.TEXT_MODELS`), then a one-line summary."""
    import torch

    from decoders import stream_text
    from decoders.tokenizer import load_tokenizer

    from mm.assets import default_model_dir
    from mm.models.formats import TEXT_MODELS, load

    model_dir = Path(args.model) if args.model else default_model_dir()
    set_threads(args.threads)
    model = load(model_dir, expect=TEXT_MODELS, dtype=getattr(torch, args.dtype))
    tokenizer = load_tokenizer(model_dir)  # a .gguf file: the tokenizer in its metadata
    ids = torch.tensor([tokenizer.encode(args.prompt, bos=True)])
    t0 = time.perf_counter()
    stats = {}
    sys.stdout.write(args.prompt)
    for piece in stream_text(model, tokenizer, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed, stats=stats):
        sys.stdout.write(piece)
        sys.stdout.flush()
    dt = time.perf_counter() - t0
    n_new = stats["new_tokens"]
    print(f"\n[prompt tokens: {ids.shape[1]}, new tokens: {n_new}, {n_new / dt:.1f} tokens/s]")
    return 0


def cmd_bench(args) -> int:
    """Benchmark our decoder and ViT against transformers and timm on the same weights."""
    from mm.eval import bench

    speech = not args.no_speech and not args.cuda
    missing = [m for m in ("transformers",) + (("espnet",) if speech else ()) if importlib.util.find_spec(m) is None]
    if missing:  # the references are development dependencies, not the library's
        raise ValueError(f"mm bench compares against transformers, timm and espnet ({', '.join(missing)} missing); "
                         "install them with pip install -e '.[dev]'")
    set_threads(args.threads)
    sizes, moe = args.sizes.split(","), [m for m in args.moe.split(",") if m]
    for option, what, given, known in (("--sizes", "size(s)", sizes, bench.LLAMA_SIZES),
                                       ("--moe", "model(s)", moe, bench.MOE_SIZES)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"{option}: unknown {what} {', '.join(unknown)}; choose from {', '.join(known)}")
    if args.llama_cpp:
        from mm.eval import llama_cpp

        llama_cpp.binaries(args.llama_cpp)  # before an hour of timings, not after
    result = bench.run(sizes=sizes, dtypes=args.dtypes.split(","), batches=[int(b) for b in args.batches.split(",")],
                       new_tokens=args.new_tokens, repeats=args.repeats, compile=not args.no_compile,
                       vit=not args.no_vit, speech=speech, device="cuda" if args.cuda else "cpu", out=None, moe=moe)
    if args.llama_cpp:
        weights = [w for w in ({"float32": "f32", "bfloat16": "bf16"}.get(d) for d in args.dtypes.split(",")) if w]
        result["llama_cpp"] = llama_cpp.run(args.llama_cpp, sizes, weights, args.repeats, not args.no_compile)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")
    return 0


def cmd_train(args) -> int:
    """Run a training recipe and save the model directory."""
    check_threads(args.threads)
    if args.recipe in ("tiny", "tiny-open", "tiny-agent"):
        import dataclasses

        from mm.train.recipe_tiny import TinyRecipe, train_tiny

        if args.recipe != "tiny" and not args.init:
            raise ValueError(f"--recipe {args.recipe} continues from a model: give --init DIR (tiny-open: a tiny "
                             "model, e.g. runs/tiny/model; tiny-agent: a tiny-open model, e.g. runs/tiny-open/model)")
        recipe = {"tiny": TinyRecipe, "tiny-open": TinyRecipe.open_vocab, "tiny-agent": TinyRecipe.agent}[args.recipe]
        recipe = (recipe(args.init) if args.init and args.recipe != "tiny" else recipe()).overridden(args.set)
        if args.smoke:
            recipe = dataclasses.replace(TinyRecipe.smoke(init=recipe.init), agent_share=recipe.agent_share,
                                         context=recipe.context, name=recipe.name)
        recipe.seed = args.seed
        train_tiny(args.out or f"runs/{args.recipe}", recipe, resume=not args.no_resume, threads=args.threads or None,
                   device=args.device)
        return 0
    if args.recipe == "text-tiny":
        from mm.train.text import train_text_tiny

        train_text_tiny(args.out or "runs/text-tiny", steps=args.steps or 600, seed=args.seed)
        return 0
    raise ValueError(f"unknown recipe {args.recipe!r} (available: tiny, tiny-open, tiny-agent, text-tiny)")


# subcommands with their own parser in their own module: name -> (module, function taking argv, help)
DELEGATED = {
    "caption": ("mm.apps.caption", "run_caption", "caption images (mm caption --help)"),
    "eval": ("mm.eval.evaluate", "run_eval", "held-out figures of a multimodal model (mm eval --help)"),
    "chat": ("mm.apps.chat", "run_chat", "the Gradio multimodal chat on 127.0.0.1 (mm chat --help)"),
    "quantize": ("mm.apps.quantize", "run_quantize",
                 "RTN / AWQ / SmoothQuant a Llama to 8, 4 or 3 bits (mm quantize --help)"),
    "agent": ("mm.apps.agent", "run_agent", "a ReAct agent with tools, or a YAML procedure (mm agent --help)"),
    "serve": ("mm.apps.serve", "run_serve", "OpenAI-compatible chat server with continuous batching (mm serve --help)"),
    "rag": ("mm.apps.rag", "run_rag", "index your files, search them, ask with citations (mm rag --help)"),
}


def cmd_delegated(args) -> int:
    """`mm caption|eval|chat|...`: the subcommand's module parses the rest of the command line (imported only now)."""
    module, function, _ = DELEGATED[args.command]
    return getattr(importlib.import_module(module), function)(args.args)


def add_bench_arguments(b: argparse.ArgumentParser) -> None:
    """The options of `mm bench`."""
    b.add_argument("--sizes", default="10m,125m", help="comma list of 10m, 125m, 1b")
    b.add_argument("--moe", default="v3-small,mixtral-small", help="MoE decoders against transformers ('' to skip)")
    b.add_argument("--dtypes", default="float32,bfloat16")
    b.add_argument("--batches", default="1,8")
    b.add_argument("--new-tokens", type=int, default=128)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--no-compile", action="store_true", help="eager decode step instead of torch.compile")
    b.add_argument("--no-vit", action="store_true")
    b.add_argument("--no-speech", action="store_true", help="skip the speech encoder against ESPnet")
    b.add_argument("--cuda", action="store_true", help="run on the GPU")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--llama-cpp", metavar="BUILD_DIR", default=None,
                   help="also llama.cpp on the same weights, batch 1 (its llama-bench, llama-simple; see mm.eval.llama_cpp)")
    b.add_argument("--out", default="bench.json")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mm` with all subcommands."""
    p = argparse.ArgumentParser(prog="mm", description="Multimodal vision-speech-language models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="continue a text prompt with a Llama checkpoint (streams to stdout)")
    g.add_argument("--model", help="Hugging Face Llama directory, or a llama .gguf file with its tokenizer (default: "
                                   "the shipped model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", choices=DTYPES, default="float32")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    g.set_defaults(func=cmd_generate)

    for name, (_, _, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False).set_defaults(func=cmd_delegated, delegated=True)

    from mm.apps.transcribe import add_arguments, cmd_transcribe

    tr = sub.add_parser("transcribe", help="transcribe audio files (the multimodal model, ESPnet/Dolphin or ours)")
    add_arguments(tr)
    tr.set_defaults(func=cmd_transcribe)

    t = sub.add_parser("train", help="train a model by a recipe")
    t.add_argument("--recipe", default="tiny", choices=["tiny", "tiny-open", "tiny-agent", "text-tiny"],
                   help="tiny: the shipped multimodal model (runs under torchrun too); tiny-open: the same with speech "
                        "beyond the scene grammar and rationales, continuing from a tiny model (--init); tiny-agent: "
                        "tool use (ReAct) continuing from a tiny-open model (--init); text-tiny: the text model")
    t.add_argument("--init", default=None, help="tiny-open, tiny-agent: the model directory to continue from")
    t.add_argument("--out", default=None, help="output directory (default: runs/RECIPE)")
    t.add_argument("--steps", type=int, default=0, help="text-tiny: training steps (default 600)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="tiny recipes: change a setting of the recipe, e.g. --set steps=0,0,600 agent_share=0.6")
    t.add_argument("--smoke", action="store_true", help="tiny: a few steps on a few examples, to check the setup")
    t.add_argument("--no-resume", action="store_true", help="tiny: start over even if OUT/checkpoint.pt exists")
    t.add_argument("--threads", type=int, default=0, help="CPU threads per process (default: torch's choice)")
    t.add_argument("--device", default=None, help="tiny, tiny-open: cpu (default) or cuda")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("bench", help="benchmark against transformers/timm on the same weights (prints a table, writes JSON)")
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mm` console script."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "delegated", False):
        args.args = rest  # the subcommand's own parser reads these
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:  # our errors already say what and where
        print(f"mm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except MemoryError as e:  # an input too large for this machine: say so, no traceback
        print(f"mm {args.command}: error: out of memory{f' ({e})' if str(e) else ''}; try a smaller input, batch or "
              "model", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

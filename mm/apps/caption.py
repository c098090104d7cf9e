"""`mm caption IMAGE... [--model DIR] [--prompt TEXT]`: prints the caption (one image) or `PATH<TAB>CAPTION` lines
(several), in input order, from `model.captions` (batched, greedy) of the multimodal or a LLaVA model."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mm.models.fusion import CAPTION_PROMPT, DEFAULT_PROMPT


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mm caption`."""
    p = argparse.ArgumentParser(prog="mm caption", description="Caption images with the multimodal or a LLaVA model.")
    p.add_argument("images", nargs="*", help="image files (default: the bundled example scene)")
    p.add_argument("--model", default=None, help="our multimodal directory, or LLaVA: llava-hf, original LLaVA or ours "
                   "(default: the shipped multimodal model)")
    p.add_argument("--prompt", default=None, help=f"question asked about each image (default: the model's own, "
                   f"{CAPTION_PROMPT!r} for ours, {DEFAULT_PROMPT!r} for LLaVA)")
    p.add_argument("--vision-tower", default=None, help="CLIP directory, for original LLaVA checkpoints")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    return p


def run_caption(argv: list[str] | None = None) -> int:
    """`mm caption IMAGE... --model DIR [--prompt TEXT]`: print one caption per image; returns the exit code."""
    from mm.assets import example
    from mm.models.formats import CAPTIONERS, load

    args = build_parser().parse_args(argv)
    if not args.images:
        args.images = [str(example("scene.png"))]
        print(f"(no image given: captioning the bundled example {args.images[0]})", file=sys.stderr)
    for f in args.images:
        if not Path(f).is_file():
            raise FileNotFoundError(f"image not found: {f}")
    model = load(args.model, expect=CAPTIONERS, dtype=getattr(torch, args.dtype), device=args.device,
                 vision_tower=args.vision_tower)
    captions = model.captions(args.images, prompt=args.prompt, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens)
    for path, text in zip(args.images, captions):
        print(text if len(args.images) == 1 else f"{path}\t{text}")
    return 0

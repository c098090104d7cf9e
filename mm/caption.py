"""Image captioning with a LLaVA model: batches of images through the model's template, greedy decoding.

`caption(model, images)` returns one string per image; `run_caption(argv)` is `mm caption IMAGE... [--model DIR]
[--prompt TEXT]`, which prints the caption (one image) or `PATH<TAB>CAPTION` lines (several), in input order.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .conversation import user_prompt

DEFAULT_PROMPT = "Provide a one-sentence caption for the provided image."  # LLaVA-1.5's short-caption prompt


def caption(model, images, prompt: str | None = None, batch_size: int = 8, max_new_tokens: int = 64,
            progress: bool | None = None) -> list[str]:
    """Greedy captions of images (PIL images or paths), `batch_size` at a time; a tqdm bar on stderr when
    `progress` (default: when there is more than one batch)."""
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = list(images)
    show = len(images) > batch_size if progress is None else progress
    if hasattr(model, "speech_encoder"):  # the multimodal model: its own prompt and processor
        from .multimodal import CAPTION_PROMPT

        content = "<image>\n" + (prompt or CAPTION_PROMPT)
        return model.replies([(content, [im], []) for im in images], batch_size, max_new_tokens, "captioning", show)
    processor = model.processor()
    tokenizer = processor.tokenizer
    stops = set(tokenizer.stop_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
    messages = user_prompt(DEFAULT_PROMPT if prompt is None else prompt)
    out = []
    with tqdm(total=len(images), desc="captioning", unit="image", disable=not show, file=sys.stderr) as bar:
        for start in range(0, len(images), batch_size):
            batch = images[start:start + batch_size]
            inputs = processor([messages] * len(batch), [[im] for im in batch])
            ids = model.generate(inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                 max_new_tokens=max_new_tokens, eos_token_id=sorted(stops) or None)
            for row in ids[:, inputs["input_ids"].shape[1]:].tolist():
                cut = next((i for i, t in enumerate(row) if t in stops), len(row))
                out.append(tokenizer.decode(row[:cut]).strip())
            bar.update(len(batch))
    return out


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `mm caption`."""
    p = argparse.ArgumentParser(prog="mm caption", description="Caption images with the multimodal or a LLaVA model.")
    p.add_argument("images", nargs="*", help="image files (default: the bundled example scene)")
    p.add_argument("--model", default=None, help="our multimodal directory, or LLaVA: llava-hf, original LLaVA or ours "
                   "(default: the shipped multimodal model)")
    p.add_argument("--prompt", default=None, help=f"question asked about each image (default: {DEFAULT_PROMPT!r})")
    p.add_argument("--vision-tower", default=None, help="CLIP directory, for original LLaVA checkpoints")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--device", default="cpu")
    return p


def run_caption(argv: list[str] | None = None) -> int:
    """`mm caption IMAGE... --model DIR [--prompt TEXT]`: print one caption per image; returns the exit code."""
    from .assets import example
    from .formats import CAPTIONERS, load

    args = build_parser().parse_args(argv)
    if not args.images:
        args.images = [str(example("scene.png"))]
        print(f"(no image given: captioning the bundled example {args.images[0]})", file=sys.stderr)
    for f in args.images:
        if not Path(f).is_file():
            raise FileNotFoundError(f"image not found: {f}")
    model = load(args.model, expect=CAPTIONERS, dtype=getattr(torch, args.dtype), device=args.device,
                 vision_tower=args.vision_tower)
    captions = caption(model, args.images, prompt=args.prompt, batch_size=args.batch_size,
                       max_new_tokens=args.max_new_tokens)
    for path, text in zip(args.images, captions):
        print(text if len(args.images) == 1 else f"{path}\t{text}")
    return 0

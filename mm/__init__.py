"""mm: vision and speech encoders projected into one shared Llama decoder.

`mm.load(path)` opens any checkpoint directory the library understands and returns the matching model.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["load"]


def load(path: str | Path | None = None, **kwargs):
    """Load a model directory: Hugging Face Llama or LLaVA, original LLaVA, Meta Llama, ESPnet/Dolphin ASR, or ours
    (the table in `mm.models.formats`).

    Without a path, the shipped multimodal model (`mm train --recipe tiny`). Keyword arguments (dtype, device, ...) go to the loader.
    """
    from mm.models.formats import load as load_format

    return load_format(path, **kwargs)

"""The GPT-style next-token objective."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross entropy of logits [B, T, V] at position t against labels [B, T] at t+1 (in float32).

    Label positions equal to `ignore_index` (padding, prompts, image/audio placeholders) do not count, which
    gives answer-only losses by masking everything but the answer.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on [batch, tokens]")
    pred = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # [B*(T-1), V]
    target = labels[:, 1:].reshape(-1)
    if not bool((target != ignore_index).any()):
        raise ValueError("every label is ignore_index: nothing to learn from")
    return F.cross_entropy(pred, target, ignore_index=ignore_index)

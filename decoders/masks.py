"""Masks and positions of a left-padded batch: which keys each query sees, and RoPE positions that skip padding."""
from __future__ import annotations

import torch


def attention_mask_4d(attention_mask: torch.Tensor | None, start: int, T: int,
                      device: torch.device | None = None) -> tuple[torch.Tensor | None, bool]:
    """Turn a key padding mask [B, start+T] (1 = token, 0 = pad) into (SDPA mask [B, 1, T, start+T], is_causal).

    Slot i of the query block sits at absolute slot start+i and sees keys at slots <= start+i that are not
    padding. A padding query sees itself only, so its row is never empty (no NaN); its output is unused.
    Without padding, a square block uses SDPA's causal kernels and a single new token needs no mask at all.
    """
    if attention_mask is None or bool(attention_mask.all()):
        if start == 0:
            return None, True
        if T == 1:
            return None, False
        attention_mask = None
    S = start + T
    q_slot = torch.arange(start, S, device=device)[:, None]  # [T, 1]
    k_slot = torch.arange(S, device=device)[None, :]  # [1, S]
    mask = (k_slot <= q_slot)[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_slot == q_slot)
    return mask, False


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE positions [B, S] counting only real tokens, so left padding does not shift a sequence."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)

"""`attend`: the one place that picks the attention kernel for a layer's q, k, v.

    decode step over cache prefixes (cache_lens)  -> decoders.flash_decoding.decode_attention (FlashDecoding's
                                                     split-KV Triton kernel on long CUDA caches, SDPA otherwise)
    square causal block (prefill, training)       -> SDPA's causal kernels, GQA without repeating K/V
    masked block, CPU single-token step           -> decode_attention.cpp (cpu_kernels: skips masked slots) where
                                                     built; compiled otherwise: fused_decode_attention (broadcast
                                                     products inductor fuses)
    masked block otherwise                        -> SDPA with the additive mask, query heads folded per KV group
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .flash_decoding import decode_attention


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
           cache_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention of q [B, H, T, D] over k, v [B, Hkv, S, D] -> [B, H, T, D]; query head h reads kv head
    h // (H // Hkv). mask: additive [B, 1, T, S] or None; is_causal: a square causal block with no mask;
    cache_lens [B]: one query per row attending to the first cache_lens[b] keys (then mask is unused)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    if cache_lens is not None:
        return decode_attention(q, k, v, cache_lens)  # [B, H, 1, D]
    if is_causal:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=G > 1)
    # Fold each KV group's query heads into the query length: [B, Hkv, G*T, D]. Query head h uses kv head h // G
    # (the order Hugging Face's repeat_kv gives), and K/V are never copied G times.
    q = q.reshape(B, Hkv, G * T, D)
    if mask is not None and G > 1 and T > 1:
        mask = mask.repeat(1, 1, G, 1)  # [B, 1, G*T, S]; a single query row broadcasts as it is
    if T == 1 and q.device.type == "cpu" and kernel_takes(q, k, v, mask):
        y = torch.ops.mm_attention.decode(q.contiguous(), k.contiguous(), v.contiguous(),
                                          None if mask is None else mask.expand(B, 1, 1, -1).contiguous())
    elif T == 1 and q.device.type == "cpu" and torch.compiler.is_compiling():
        y = fused_decode_attention(q, k, v, mask)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.reshape(B, H, T, D)


def kernel_takes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether `decode_attention.cpp` computes this step (q [B, Hkv, G, D] folded): built (`cpu_kernels`), float32
    or bf16 throughout, D a multiple of 16, k and v alike, a mask [B, 1, 1, S] or none, no gradient wanted. It gives
    `fused_decode_attention`'s numbers and skips the slots masked with -inf, so its work follows the filled part of
    the cache (10M bf16 and 125M W4A8 steps: 7-9% more tokens/s than the fused form at 16-144 of 256 slots, same
    tokens)."""
    return (cpu_kernels.loaded and q.dtype in (torch.float32, torch.bfloat16) and k.dtype == v.dtype == q.dtype
            and q.shape[-1] % 16 == 0 and k.shape == v.shape
            and (mask is None or mask.dtype == q.dtype and mask.shape[1:3] == (1, 1))
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def fused_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of a few query rows q [B, Hkv, G, D] over a whole cache k, v [B, Hkv, S, D], in float32, with an
    additive mask [B, 1, 1, S]: written as broadcast products and sums, which inductor fuses into a few loops of
    its own. For the compiled CPU decode step, where SDPA's flash kernel costs more per call (~0.1 ms) than all
    of a small cache's arithmetic; eager, this form would materialise [B, Hkv, G, S, D] products."""
    s = (q.float()[:, :, :, None] * k.float()[:, :, None]).sum(-1) * q.shape[-1] ** -0.5  # [B, Hkv, G, S]
    if mask is not None:
        s = s + mask.float()
    p = s.softmax(dim=-1)
    return (p[..., None] * v.float()[:, :, None]).sum(-2).to(q.dtype)  # [B, Hkv, G, D]

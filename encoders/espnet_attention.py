"""ESPnet's encoder self-attention: absolute (OWSM) or relative (Transformer-XL; Dolphin's `rel_selfattn` with
`rel_pos_type: latest`) positions, and multi-head attention through F.scaled_dot_product_attention.

Weight names equal ESPnet's (`linear_q/k/v/out`, `linear_pos`, `pos_bias_u/v`); used by the E-Branchformer layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from decoders.linear import Linear


# ----------------------------------------------------------------------------------------------- positions


def sinusoids(positions: torch.Tensor, d: int) -> torch.Tensor:
    """[N] float positions -> [N, d] with sin at even and cos at odd channels (Vaswani et al. 2017)."""
    inv_freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32, device=positions.device) * -(math.log(10000.0) / d))
    angles = positions[:, None] * inv_freq  # [N, d/2]
    table = torch.zeros(positions.numel(), d, device=positions.device)
    table[:, 0::2] = torch.sin(angles)
    table[:, 1::2] = torch.cos(angles)
    return table


class PositionalEncoding(nn.Module):
    """Absolute positions (OWSM): x * sqrt(d) + sinusoids(0..T-1)."""

    def __init__(self, d: int, dropout_rate: float):
        super().__init__()
        self.d = d
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        positions = torch.arange(x.size(1), dtype=torch.float32, device=x.device)
        x = x * math.sqrt(self.d) + sinusoids(positions, self.d).to(x.dtype)  # [B, T, d]
        return self.dropout(x), None


class RelPositionalEncoding(nn.Module):
    """Relative positions (Transformer-XL, Dai et al. 2019): x * sqrt(d) and a table for offsets T-1 .. -(T-1)."""

    def __init__(self, d: int, dropout_rate: float):
        super().__init__()
        self.d = d
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = x.size(1)
        # offset i - j of query i and key j, largest first: row T-1-(i-j) of the table, see rel_shift
        offsets = torch.arange(T - 1, -T, -1, dtype=torch.float32, device=x.device)  # [2T-1]
        pos_emb = sinusoids(offsets, self.d).to(x.dtype)[None]  # [1, 2T-1, d]
        return self.dropout(x * math.sqrt(self.d)), self.dropout(pos_emb)


# ----------------------------------------------------------------------------------------------- attention


class MultiHeadedAttention(nn.Module):
    """Multi-head self-attention with a key padding mask, through F.scaled_dot_product_attention."""

    def __init__(self, d: int, heads: int, dropout_rate: float):
        super().__init__()
        self.heads, self.d_k = heads, d // heads
        self.dropout_rate = dropout_rate
        self.linear_q = Linear(d, d)
        self.linear_k = Linear(d, d)
        self.linear_v = Linear(d, d)
        self.linear_out = Linear(d, d)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, d] -> [B, H, T, d_k]."""
        return x.view(x.size(0), x.size(1), self.heads, self.d_k).transpose(1, 2)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values [B, H, T, d_k] of x [B, T, d]."""
        q, k, v = self.linear_q(x), self.linear_k(x), self.linear_v(x)
        return self.split_heads(q), self.split_heads(k), self.split_heads(v)

    def attend(self, q, k, v, attn_mask) -> torch.Tensor:
        """SDPA over heads, then the output projection: [B, H, T, d_k] -> [B, T, d]."""
        dropout_p = self.dropout_rate if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)  # [B, H, T, d_k]
        return self.linear_out(out.transpose(1, 2).reshape(q.size(0), q.size(2), -1))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d], mask [B, T] (True = real frame) -> [B, T, d]."""
        q, k, v = self.qkv(x)
        return self.attend(q, k, v, mask[:, None, None, :])


def rel_shift(scores: torch.Tensor) -> torch.Tensor:
    """[B, H, T, 2T-1] scores against offsets T-1..-(T-1) -> [B, H, T, T] with out[i, j] = scores[i, T-1-i+j].

    Row i starts at column T-1-i and rows are 2T-1 long, so each next row starts 2T-2 elements later in
    memory: one strided view, no copy (the same result as Transformer-XL's pad-and-reshape trick).
    """
    B, H, T, P = scores.shape
    scores = scores.contiguous()
    return scores.as_strided((B, H, T, T), (H * T * P, T * P, P - 1, 1), scores.storage_offset() + T - 1)


class RelPositionMultiHeadedAttention(MultiHeadedAttention):
    """Transformer-XL attention: scores = ((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(d_k)."""

    def __init__(self, d: int, heads: int, dropout_rate: float):
        super().__init__(d, heads, dropout_rate)
        self.linear_pos = Linear(d, d, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(heads, d // heads))  # content bias u
        self.pos_bias_v = nn.Parameter(torch.zeros(heads, d // heads))  # position bias v
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, d], mask [B, T] (True = real frame), pos_emb [1, 2T-1, d] -> [B, T, d]."""
        q, k, v = self.qkv(x)
        p = self.split_heads(self.linear_pos(pos_emb))  # [1, H, 2T-1, d_k]
        position_scores = rel_shift(torch.matmul(q + self.pos_bias_v[:, None, :], p.transpose(-2, -1)))  # [B, H, T, T]
        # SDPA adds a float mask after scaling q k^T, so the position term enters pre-scaled, with -inf on padding
        bias = (position_scores / math.sqrt(self.d_k)).masked_fill(~mask[:, None, None, :], float("-inf"))
        return self.attend(q + self.pos_bias_u[:, None, :], k, v, bias)

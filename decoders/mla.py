"""Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one small latent per token, so the cache
holds only that latent and a RoPE key shared by all heads.

    q      = q_b_proj(q_a_layernorm(q_a_proj(x)))   (or q_proj(x) without q_lora)   -> per head [q_nope | q_rope]
    latent = kv_a_proj_with_mqa(x) = [c_kv (kv_lora_rank) | k_rope (qk_rope_head_dim)]
    cache    [kv_a_layernorm(c_kv) | rope(k_rope)]   per token: (kv_lora_rank + qk_rope_head_dim) numbers a layer
    naive    kv_b_proj(c_kv) -> per head [k_nope | v];  k = [k_nope | k_rope];  softmax(q k^T * scale) v
    absorbed q_nope W_UK -> a query in latent space; attention over the cache as one shared key/value head
             (key [c_kv | k_rope], value c_kv); the latent output times W_UV is v's output. W_UK and W_UV are the
             two halves of kv_b_proj's weight: the same products, associated the other way.

The naive form is cheaper for a prompt (the latent is expanded once per token); the absorbed one for decoding
(nothing is expanded per cached token). RoPE rotates halves here; checkpoints whose rope dims are interleaved
pairs (V2, V3 with `rope_interleave`) have those rows permuted by the converter (decoders/convert_deepseek.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .llama import Pass, RMSNorm, apply_rope


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 without scaling)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_parameters(dim: int, theta: float, scaling: dict | None,
                    max_position_embeddings: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin factor of RoPE over `dim` dims: plain, or YaRN (NTK-by-parts:
    dims turning fewer than beta_slow times over the original context are interpolated by `factor`, those turning
    more than beta_fast times kept, a linear ramp between) with DeepSeek's mscale / mscale_all_dim."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim))
    if not scaling or scaling.get("rope_type", "default") == "default":
        return inv_freq, 1.0
    if scaling["rope_type"] != "yarn":
        raise ValueError(f"unsupported rope_scaling type {scaling['rope_type']!r} for MLA (supported: default, yarn)")
    old_ctx = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or max_position_embeddings / old_ctx
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def dim_turning(turns: float) -> float:  # the dim whose wavelength fits `turns` times in the original context
        return dim * math.log(old_ctx / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_turning(beta_fast), dim_turning(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / ((high - low) or 0.001)
    ramp = ramp.clamp(0, 1)  # 1: interpolate, 0: keep
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = yarn_mscale(factor, m) / yarn_mscale(factor, m_all) if m and m_all else yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def softmax_scale(qk_head_dim: int, scaling: dict | None) -> float:
    """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN: DeepSeek scales all dims' scores."""
    scale = qk_head_dim ** -0.5
    if scaling and scaling.get("rope_type", "default") != "default" and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


def rope_cos_sin(inv_freq: torch.Tensor, factor: float, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin [B, 1, T, dim] for positions [B, T], times YaRN's factor (halves layout), computed in float32."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * factor).to(dtype)[:, None], (emb.sin() * factor).to(dtype)[:, None]


class LatentCache:
    """MLA's cache: per layer one [B, max_tokens, kv_lora_rank + qk_rope_head_dim] tensor holding, per token, the
    normalised c_kv then the rotated k_rope (FlashMLA's layout). Same interface as `KVCache`."""

    def __init__(self, n_layers: int, batch_size: int, latent_dim: int, max_tokens: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.kv = [torch.zeros(batch_size, max_tokens, latent_dim, dtype=dtype, device=device) for _ in range(n_layers)]
        self.length = 0  # slots filled so far

    @property
    def max_tokens(self) -> int:
        """How many slots the cache holds."""
        return self.kv[0].shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held: layers x batch x max_tokens x (kv_lora_rank + qk_rope_head_dim) x element size."""
        return sum(t.nbytes for t in self.kv)

    def update(self, layer: int, start: int | torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """Write latent [B, T, L+R] at slots start..start+T; return the layer's cache so far [B, end, L+R]
        (all slots [B, S_max, L+R] when `start` is a tensor of slots, the compiled decode step)."""
        if isinstance(start, torch.Tensor):
            self.kv[layer].index_copy_(1, start, latent)
            return self.kv[layer]
        end = start + latent.shape[1]
        if end > self.max_tokens:
            raise ValueError(f"latent cache holds {self.max_tokens} tokens; writing slots {start}..{end} overflows it")
        self.kv[layer][:, start:end] = latent
        return self.kv[layer][:, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep rows `index` [N'] of the batch, in that order."""
        self.kv = [kv.index_select(0, index) for kv in self.kv]

    def reset(self) -> None:
        """Forget what is cached (the memory is kept)."""
        self.length = 0


def latent_cache_bytes(kv_lora_rank: int, qk_rope_head_dim: int, layers: int, tokens: int, batch: int = 1,
                       bytes_per_element: int = 2) -> int:
    """(kv_lora_rank + qk_rope_head_dim) x layers x batch x tokens x bytes: what MLA caches."""
    return (kv_lora_rank + qk_rope_head_dim) * layers * batch * tokens * bytes_per_element


class MLA(nn.Module):
    """Multi-head latent attention over a `LatentCache` (keys as in Hugging Face DeepSeek checkpoints).

    `form`: "auto" (absorbed when new tokens attend to a longer cache, naive otherwise), "naive" or "absorbed"."""

    def __init__(self, dim: int, n_heads: int, q_lora_rank: int | None, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, scale: float):
        super().__init__()
        self.n_heads, self.kv_lora_rank, self.scale = n_heads, kv_lora_rank, scale
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        q_out = n_heads * (qk_nope_head_dim + qk_rope_head_dim)
        self.q_lora = q_lora_rank is not None
        if not self.q_lora:
            self.q_proj = nn.Linear(dim, q_out, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(q_lora_rank, 1e-6)  # DeepSeek's inner norms keep the default eps
            self.q_b_proj = nn.Linear(q_lora_rank, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, dim, bias=False)
        self.form = "auto"

    def forward(self, x: torch.Tensor, p: Pass, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, N, R, L = self.n_heads, self.nope, self.rope, self.kv_lora_rank
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, H, N + R).transpose(1, 2).split([N, R], dim=-1)  # [B, H, T, N], [B, H, T, R]
        q_rope = apply_rope(q_rope, p.cos, p.sin)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([L, R], dim=-1)  # [B, T, L], [B, T, R]
        latent = torch.cat((self.kv_a_layernorm(c_kv), apply_rope(k_rope[:, None], p.cos, p.sin)[:, 0]), dim=-1)
        if p.kv_cache is not None:
            latent = p.kv_cache.update(layer, p.start, latent)  # [B, S, L+R]
        absorbed = self.form == "absorbed" or (self.form == "auto" and latent.shape[1] > T)
        attend = self.absorbed if absorbed else self.naive
        y = attend(q_nope, q_rope, latent, p.mask, p.is_causal)  # [B, H, T, V]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def naive(self, q_nope, q_rope, latent, mask, is_causal) -> torch.Tensor:
        """Attention with keys and values expanded per head from the latent: q [B, H, T, *], latent [B, S, L+R]."""
        B, H, T, _ = q_nope.shape
        S, L = latent.shape[1], self.kv_lora_rank
        kv = self.kv_b_proj(latent[..., :L]).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)  # [B, H, S, N+V]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, latent[:, None, :, L:].expand(B, H, S, self.rope)), dim=-1)  # [B, H, S, N+R]
        q = torch.cat((q_nope, q_rope), dim=-1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)

    def absorbed(self, q_nope, q_rope, latent, mask, is_causal) -> torch.Tensor:
        """The same attention with W_UK folded into the query and W_UV into the output: one shared latent head."""
        B, H, T, _ = q_nope.shape
        S, L = latent.shape[1], self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, L)
        q_latent = torch.einsum("bhtn,hnl->bhtl", q_nope, w[:, :self.nope])  # [B, H, T, L]
        q = torch.cat((q_latent, q_rope), dim=-1).reshape(B, 1, H * T, L + self.rope)  # heads folded into rows
        if is_causal:  # a square causal block: each head's rows need the causal mask of their own positions
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()[None, None]
        if mask is not None and T > 1:
            mask = mask.repeat(1, 1, H, 1)  # [B, 1, H*T, S]; row h*T + t is query t of head h
        y = F.scaled_dot_product_attention(q, latent[:, None], latent[:, None, :, :L], attn_mask=mask, scale=self.scale)
        return torch.einsum("bhtl,hvl->bhtv", y.view(B, H, T, L), w[:, self.nope:])  # [B, H, T, V]

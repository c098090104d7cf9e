"""The Llama decoder (Llama 1, 2 and 3): RMSNorm, RoPE, grouped-query attention, SwiGLU, static KV cache.

One image of the model from top to bottom, nanoGPT style. Weights live fused (q/k/v in one matrix, gate/up in
another) because that halves the number of matmuls per layer; the converters at the bottom map Hugging Face
and Meta checkpoints to and from this layout, so users only ever see the reference formats on disk.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import decode_block
from .attention import attend
from .causal_lm import CausalLM
from .checkpoint import (CheckpointError, build_from_state_dict, read_config, read_hf_weights, read_json, read_torch,
                         write_hf_weights)
from .convert_hf import convert_hf_state_dict, to_hf_state_dict
from .convert_meta import hf_config_from_meta_params, merge_meta_shards, meta_to_hf_state_dict
from .kv_cache import KVCache
from .linear import Linear, linear


def rope_from_hf(d: dict) -> dict:
    """`rope_scaling` (None for plain RoPE) and, when given there, `rope_theta` from a Hugging Face config dict: 5.x
    keeps both in `rope_parameters`, 4.x in `rope_scaling` (before 4.45 spelled with "type")."""
    rope = d.get("rope_parameters") or d.get("rope_scaling") or None
    if rope is None:
        return {}
    rope, out = dict(rope), {}
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope.pop("type")
    if "rope_theta" in rope:
        out["rope_theta"] = rope.pop("rope_theta")
    out["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    return out


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama decoder; reads and writes Hugging Face `config.json`.

    Attention heads share key/value heads in groups::

        MHA  n_kv_heads == n_heads     q q q q      GQA  n_kv_heads == 2     q q q q      MQA  n_kv_heads == 1
                                       | | | |                               \\ / \\ /                         \\ \\/ /
                                       k k k k                                k   k                            k
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "max_position_embeddings")
        for name in sizes:
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"config {name} must be a positive integer, got {v!r} ({type(v).__name__})")
        for name in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
                raise ValueError(f"config {name} must be a positive number, got {v!r} ({type(v).__name__})")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads={self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads}"
            )
        if self.rope_scaling is not None and self.rope_scaling.get("rope_type", "default") not in ("default", "llama3"):
            raise ValueError(f"unsupported rope_scaling type {self.rope_scaling.get('rope_type')!r} (supported: default, llama3)")

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        """Build from a Hugging Face `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"config model_type is {d.get('model_type')!r}, expected 'llama'")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config sets {flag}=True; Llama checkpoints with biases are not supported")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config hidden_act is {d.get('hidden_act')!r}; Llama uses 'silu'")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.update(rope_from_hf(d))
        return cls(**kw)

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` dict (transformers 5 layout, with the 4.x keys too)."""
        d = asdict(self)
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        d.update(
            model_type="llama", architectures=["LlamaForCausalLM"], hidden_act="silu", attention_bias=False,
            mlp_bias=False, rope_parameters=rope, rope_scaling=self.rope_scaling,
        )
        return d


# ----------------------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 and cast back (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] of RoPE, with Llama 3 frequency scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device="cpu").float() / d))
    s = cfg.rope_scaling
    if not s or s.get("rope_type", "default") == "default":
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)  # long waves: slowed down
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, 1, T, head_dim] for integer `positions [B, T]` (halves layout, as Hugging Face)."""
    freqs = positions[..., None].float() * inv_freq  # [B, T, D/2], in float32
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `x [B, H, T, D]`: pairs are (i, i + D/2), the Hugging Face layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


@dataclass
class Pass:
    """What every layer needs in one forward pass: RoPE cos/sin [B, 1, T, D], the additive mask [B, 1, T, S] (or
    None) and whether the block is square-causal, the KV cache and the slot(s) written from `start`, and, for a
    decode step over cache prefixes, each row's cache length [B]."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    kv_cache: KVCache | None
    start: int | torch.Tensor
    cache_lens: torch.Tensor | None = None


class Attention(nn.Module):
    """Causal grouped-query self-attention (the kernel is `decoders.attention.attend`'s choice), fused q/k/v."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, p: Pass, layer: int) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), p.cos, p.sin)  # [B, H, T, D]
        k = apply_rope(k.view(B, T, Hkv, D).transpose(1, 2), p.cos, p.sin)  # [B, Hkv, T, D]
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        if p.kv_cache is not None:
            k, v = p.kv_cache.update(layer, p.start, k, v)  # [B, Hkv, S, D]
        y = attend(q, k, v, p.mask, p.is_causal, p.cache_lens)  # [B, H, T, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, p: Pass, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), p, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# ------------------------------------------------------------------------------------------------ model

class LlamaForCausalLM(CausalLM):
    """Llama decoder with its language-model head: token ids [B, T] -> logits [B, T, V]."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.compiled_decode_step = None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`).

        attention_mask [B, past+T]: 1 for tokens, 0 for (left) padding, covering cached slots too.
        position_ids [B, T]: RoPE positions; by default counted over real tokens of the mask.
        kv_cache: a static cache; the new keys/values are written at slots `kv_cache.length...`.
        """
        h, position_ids, mask, is_causal, start = self.prepare(input_ids, attention_mask, inputs_embeds, position_ids,
                                                               kv_cache)
        logits = self.run_layers(h, position_ids, mask, is_causal, kv_cache, start, last_only)
        if kv_cache is not None:
            kv_cache.length = start + h.shape[1]
        return logits

    def run_layers(self, h, position_ids, mask, is_causal, kv_cache, start, last_only=False, cache_lens=None) -> torch.Tensor:
        """The layers, final norm and head on embeddings h [B, T, D]; no checks (see `forward`)."""
        cos, sin = rope_cos_sin(self.inv_freq, position_ids, h.dtype)
        if mask is not None:  # once here rather than inside SDPA in every layer: 0 where seen, -inf where masked
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        p = Pass(cos, sin, mask, is_causal, kv_cache, start, cache_lens)
        in_cpp = decode_block.takes(h, p)  # an eager one-token CPU step: each plain block one C++ call
        for i, layer in enumerate(self.layers):
            h = decode_block.block(layer, h, p, i) if in_cpp and decode_block.plain(layer) else layer(h, p, i)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        return linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def decode_step(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, key_mask: torch.Tensor,
                    kv_cache: KVCache, cache_lens: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row with static shapes, for `torch.compile`: logits [B, 1, V].

        token, position [B, 1]; slot [1]: the cache slot written; key_mask [B, S_max] bool: slots to attend to
        (this one included). Attends over the whole cache, so shapes never change from step to step.
        cache_lens [B]: when every row's real tokens are a prefix of the cache (no padding), their lengths; then
        attention runs through `decode_attention` (FlashDecoding's split-KV kernel on long CUDA caches).
        """
        h = self.embed_tokens(token)  # [B, 1, D]
        mask = None if cache_lens is not None else key_mask[:, None, None, :]  # [B, 1, 1, S_max]
        return self.run_layers(h, position, mask, False, kv_cache, slot, cache_lens=cache_lens)

    def one_call_step(self, batch_size: int, max_tokens: int):
        """`decode_step` as one C++ call a token on a cache of `max_tokens` slots (`decode_block.stepper`), or None
        where that does not apply (a subclass, another block, adapted linears or other quantized ones, ...)."""
        if type(self) is not LlamaForCausalLM or not all(type(b) is Block for b in self.layers):
            return None
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(max_tokens)[None], self.dtype)  # [1, 1, P, Dh]
        return decode_block.stepper(self, batch_size, cos[0, 0].contiguous(), sin[0, 0].contiguous())

    def new_kv_cache(self, batch_size: int, max_tokens: int) -> KVCache:
        """A static cache for `batch_size` rows of up to `max_tokens` tokens, in the model's dtype and device."""
        c = self.config
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, max_tokens, self.dtype, self.device)

    # ----------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "LlamaForCausalLM":
        """Load a Hugging Face Llama directory (`config.json` + safetensors, single or sharded)."""
        path = Path(path)
        cfg = read_config(path, LlamaConfig.from_hf)
        state_dict = convert_hf_state_dict(read_hf_weights(path), cfg, source=str(path))
        return cls.from_state_dict(cfg, state_dict, dtype, device, source=str(path))

    @classmethod
    def from_meta(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> "LlamaForCausalLM":
        """Load Meta's `params.json` + `consolidated.*.pth` directory (weights_only; q/k rows permuted to halves)."""
        path = Path(path)
        shards = sorted(path.glob("consolidated.*.pth"))
        if not shards:
            raise CheckpointError(f"{path}: no consolidated.*.pth files")
        params = read_json(path / "params.json")
        state_dict = merge_meta_shards([read_torch(p) for p in shards], source=str(path))
        cfg = LlamaConfig.from_hf(hf_config_from_meta_params(params, state_dict))
        hf = meta_to_hf_state_dict(state_dict, cfg)
        return cls.from_state_dict(cfg, convert_hf_state_dict(hf, cfg, source=str(path)), dtype, device, source=str(path))

    @classmethod
    def from_state_dict(cls, cfg: LlamaConfig, state_dict: dict[str, torch.Tensor], dtype=torch.float32,
                        device="cpu", source: str = "state dict") -> "LlamaForCausalLM":
        """Build a model from one of our state dicts without a throwaway random initialisation."""
        return build_from_state_dict(lambda: cls(cfg), state_dict, source, dtype, device)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write a Hugging Face directory (`config.json`, `generation_config.json`, safetensors) transformers can load."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf = self.config.to_hf()
        hf["dtype"] = str(self.dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(hf, indent=2))
        gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
        write_hf_weights(path, to_hf_state_dict(self.state_dict(), self.config), max_shard_bytes)

"""Hugging Face Llama checkpoints <-> our layout: q/k/v and gate/up are fused matrices here, separate there.

Hugging Face keys: `model.embed_tokens.weight`, `model.layers.N.self_attn.{q,k,v,o}_proj.weight`,
`model.layers.N.mlp.{gate,up,down}_proj.weight`, `model.layers.N.{input,post_attention}_layernorm.weight`,
`model.norm.weight`, `lm_head.weight` (absent when tied).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointError

if TYPE_CHECKING:
    from .llama import LlamaConfig


def convert_hf_state_dict(sd: dict[str, torch.Tensor], cfg: LlamaConfig, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Hugging Face Llama keys (`model.layers.N.self_attn.q_proj.weight`, ...) -> ours (q/k/v and gate/up fused)."""
    out = {k.removeprefix("model."): v for k, v in sd.items()
           if not k.endswith("rotary_emb.inv_freq")}  # a buffer old checkpoints saved; recomputed from the config
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    problems = []
    for i in range(cfg.num_hidden_layers):
        for fused, parts in ((f"layers.{i}.self_attn.qkv_proj.weight", ("q_proj", "k_proj", "v_proj")),
                             (f"layers.{i}.mlp.gate_up_proj.weight", ("gate_proj", "up_proj"))):
            mod = "self_attn" if "self_attn" in fused else "mlp"
            names = [f"layers.{i}.{mod}.{p}.weight" for p in parts]
            if all(n in out for n in names):
                try:
                    out[fused] = torch.cat([out.pop(n) for n in names], dim=0)
                except RuntimeError as e:
                    problems.append(f"{', '.join(names)}: cannot be stacked ({e})")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our keys -> Hugging Face Llama keys (fused projections split back)."""
    H, Hkv, D, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
    out = {}
    for k, v in sd.items():
        if k.endswith("qkv_proj.weight"):
            base = k.removesuffix("qkv_proj.weight")
            for name, t in zip(("q_proj", "k_proj", "v_proj"), v.split([H * D, Hkv * D, Hkv * D])):
                out[f"model.{base}{name}.weight"] = t
        elif k.endswith("gate_up_proj.weight"):
            base = k.removesuffix("gate_up_proj.weight")
            for name, t in zip(("gate_proj", "up_proj"), v.split([I, I])):
                out[f"model.{base}{name}.weight"] = t
        elif k == "lm_head.weight":
            out[k] = v
        else:
            out[f"model.{k}"] = v
    return out

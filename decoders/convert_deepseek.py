"""Hugging Face DeepSeek-V2/V3 and Mixtral checkpoints <-> our layout.

    Hugging Face (per expert, as transformers and the original checkpoints store them)      ours
    model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight (Mixtral: block_sparse_moe...w1/w3/w2)
                                                         -> layers.N.mlp.experts.gate_up_proj [E, 2I, D], down_proj [E, D, I]
    model.layers.N.mlp.{gate,up}_proj, mlp.shared_experts.{gate,up}_proj  -> ...gate_up_proj (fused)
    model.layers.N.self_attn.{q,k,v}_proj (Mixtral)                       -> self_attn.qkv_proj (fused)
    model.layers.N.mlp.gate.weight / .e_score_correction_bias            -> the same (the router)
    q_proj / q_b_proj and kv_a_proj_with_mqa rows of the rope dims: interleaved pairs (V2; V3 with rope_interleave)
                                                                         -> halves, so one RoPE serves all
    model.layers.{num_hidden_layers + k}.*  (V3's multi-token-prediction modules) -> returned apart, for decoders/mtp.py
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointError

if TYPE_CHECKING:
    from .deepseek import DeepseekConfig

MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def halves_order(rope_dim: int) -> torch.Tensor:
    """Index [R]: halves[i] = interleaved[order[i]] (even dims first, then odd)."""
    return torch.cat((torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)))


def permute_rope_rows(w: torch.Tensor, cfg: DeepseekConfig, heads: int, to_halves: bool) -> torch.Tensor:
    """Reorder the last qk_rope_head_dim rows of each of `heads` row blocks of w [heads * (X + R), in]."""
    R = cfg.qk_rope_head_dim
    order = halves_order(R) if to_halves else halves_order(R).argsort()
    blocks = w.reshape(heads, -1, *w.shape[1:]).clone()
    blocks[:, -R:] = blocks[:, -R:][:, order]
    return blocks.reshape(w.shape)


def split_mtp(sd: dict[str, torch.Tensor], cfg: DeepseekConfig) -> tuple[dict, dict]:
    """(main model keys, {k: MTP depth k's keys without the `model.layers.{N+k}.` prefix})."""
    main, mtp = {}, {}
    for key, v in sd.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
        if m and int(m.group(1)) >= cfg.num_hidden_layers:
            mtp.setdefault(int(m.group(1)) - cfg.num_hidden_layers, {})[m.group(2)] = v
        else:
            main[key] = v
    return main, mtp


def convert_layer(sd: dict[str, torch.Tensor], cfg: DeepseekConfig, layer: int, prefix: str, source: str) -> dict:
    """One decoder layer's Hugging Face keys (under `prefix`) -> ours (without the prefix)."""
    out = {}
    for key, v in sd.items():
        if key.startswith(prefix):
            name = key[len(prefix):].replace("block_sparse_moe.", "mlp.")
            m = re.match(r"mlp\.experts\.\d+\.(w[123])\.weight", name)
            if m:
                name = name.replace(f".{m.group(1)}.", f".{MIXTRAL_NAMES[m.group(1)]}.")
            out[name] = v
    experts = sorted({int(m.group(1)) for k in out if (m := re.match(r"mlp\.experts\.(\d+)\.", k))})
    if experts:
        if experts != list(range(cfg.n_routed_experts)):
            raise CheckpointError(f"{source}: layer {layer} has experts {experts[:3]}...{experts[-1]}, "
                                  f"config n_routed_experts={cfg.n_routed_experts}")
        try:
            gate_up = [torch.cat([out.pop(f"mlp.experts.{e}.{p}.weight") for p in ("gate_proj", "up_proj")]) for e in experts]
            down = [out.pop(f"mlp.experts.{e}.down_proj.weight") for e in experts]
            out["mlp.experts.gate_up_proj"], out["mlp.experts.down_proj"] = torch.stack(gate_up), torch.stack(down)
        except (KeyError, RuntimeError) as e:
            raise CheckpointError(f"{source}: layer {layer}'s experts cannot be stacked: {e}") from e
    fused = (("mlp.", ("gate_proj", "up_proj"), "gate_up_proj"), ("mlp.shared_experts.", ("gate_proj", "up_proj"), "gate_up_proj"),
             ("self_attn.", ("q_proj", "k_proj", "v_proj"), "qkv_proj"))
    for base, parts, name in fused:
        keys = [f"{base}{p}.weight" for p in parts]
        if cfg.attention == "mla" and base == "self_attn.":
            continue
        if all(k in out for k in keys):
            try:
                out[f"{base}{name}.weight"] = torch.cat([out.pop(k) for k in keys])
            except RuntimeError as e:
                raise CheckpointError(f"{source}: {', '.join(prefix + k for k in keys)} cannot be stacked: {e}") from e
    if cfg.attention == "mla" and cfg.rope_interleave:
        for name in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight"):
            if name in out:
                out[name] = permute_rope_rows(out[name], cfg, cfg.num_attention_heads, to_halves=True)
        if "self_attn.kv_a_proj_with_mqa.weight" in out:
            out["self_attn.kv_a_proj_with_mqa.weight"] = permute_rope_rows(out["self_attn.kv_a_proj_with_mqa.weight"], cfg, 1, True)
    return out


def convert_hf_state_dict(sd: dict[str, torch.Tensor], cfg: DeepseekConfig, source: str = "checkpoint") -> tuple[dict, dict]:
    """Hugging Face keys -> (our main-model state dict, {depth k: MTP module k's raw keys})."""
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    main, mtp = split_mtp(sd, cfg)
    out = {k.removeprefix("model."): v for k, v in main.items() if not k.startswith("model.layers.")}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    for i in range(cfg.num_hidden_layers):
        out.update({f"layers.{i}.{k}": v for k, v in convert_layer(main, cfg, i, f"model.layers.{i}.", source).items()})
    return out, mtp


def to_hf_layer(sd: dict[str, torch.Tensor], cfg: DeepseekConfig) -> dict[str, torch.Tensor]:
    """One layer's keys of ours (no prefix) -> Hugging Face's (no prefix)."""
    out = {}
    mixtral = cfg.model_type == "mixtral"
    moe = "block_sparse_moe." if mixtral else "mlp."
    names = {v: k for k, v in MIXTRAL_NAMES.items()} if mixtral else {n: n for n in ("gate_proj", "up_proj", "down_proj")}
    for k, v in sd.items():
        if k == "mlp.experts.gate_up_proj":
            for e, w in enumerate(v):
                gate, up = w.chunk(2)
                out[f"{moe}experts.{e}.{names['gate_proj']}.weight"], out[f"{moe}experts.{e}.{names['up_proj']}.weight"] = gate, up
        elif k == "mlp.experts.down_proj":
            for e, w in enumerate(v):
                out[f"{moe}experts.{e}.{names['down_proj']}.weight"] = w
        elif k.endswith("gate_up_proj.weight"):
            gate, up = v.chunk(2)
            base = k.removesuffix("gate_up_proj.weight")
            out[f"{base}gate_proj.weight"], out[f"{base}up_proj.weight"] = gate, up
        elif k == "self_attn.qkv_proj.weight":
            D, Hkv = cfg.head_dim, cfg.num_key_value_heads
            for name, w in zip(("q_proj", "k_proj", "v_proj"), v.split([cfg.num_attention_heads * D, Hkv * D, Hkv * D])):
                out[f"self_attn.{name}.weight"] = w
        elif k.startswith("mlp.gate."):
            out[moe + k.removeprefix("mlp.")] = v
        elif cfg.attention == "mla" and cfg.rope_interleave and k in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight"):
            out[k] = permute_rope_rows(v, cfg, cfg.num_attention_heads, to_halves=False)
        elif cfg.attention == "mla" and cfg.rope_interleave and k == "self_attn.kv_a_proj_with_mqa.weight":
            out[k] = permute_rope_rows(v, cfg, 1, to_halves=False)
        else:
            out[k] = v
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: DeepseekConfig) -> dict[str, torch.Tensor]:
    """Our main-model keys -> Hugging Face keys (per-expert matrices, the original rope order)."""
    out, layers = {}, {}
    for k, v in sd.items():
        m = re.match(r"layers\.(\d+)\.(.*)", k)
        if m:
            layers.setdefault(int(m.group(1)), {})[m.group(2)] = v
        elif k == "lm_head.weight":
            out[k] = v
        else:
            out[f"model.{k}"] = v
    for i, layer in sorted(layers.items()):
        out.update({f"model.layers.{i}.{k}": v for k, v in to_hf_layer(layer, cfg).items()})
    return out

"""Meta's original Llama checkpoints (`params.json` + `consolidated.NN.pth`) -> Hugging Face keys and config.

Meta's layout: `tok_embeddings`, `layers.N.attention.w{q,k,v,o}`, `layers.N.feed_forward.w{1,3,2}`,
`layers.N.{attention,ffn}_norm`, `norm`, `output`; model-parallel shards split column-parallel weights on dim 0 and
row-parallel ones on dim 1; q/k rows pair dimensions (2i, 2i+1) for RoPE where Hugging Face pairs (i, i + D/2).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .checkpoint import CheckpointError

if TYPE_CHECKING:
    from .llama import LlamaConfig


META_TO_HF = {
    "tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight",
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight", "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
# Model-parallel shards: column-parallel weights split on dim 0, row-parallel on dim 1, norms replicated.
_META_SHARD_DIM = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}


def merge_meta_shards(state_dicts: list[dict[str, torch.Tensor]], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Join Meta's model-parallel `consolidated.NN.pth` shards into one state dict."""
    if len(state_dicts) == 1:
        return state_dicts[0]
    merged = {}
    for k in state_dicts[0]:
        parts = [sd.get(k) for sd in state_dicts]
        if any(p is None for p in parts):
            raise CheckpointError(f"{source}: key {k} is missing from some consolidated shards")
        dim = _META_SHARD_DIM.get(k.split(".")[-2])
        merged[k] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def meta_context(params: dict) -> int:
    """The context a Meta `params.json` without `max_seq_len` was trained for: Llama 3.1+ (scaled RoPE) 131072,
    Llama 3 (theta 500000 or a 128k vocabulary) 8192, Llama 2 (norm_eps 1e-5) 4096, Llama 1 (norm_eps 1e-6) 2048."""
    if params.get("use_scaled_rope"):
        return 131072
    if params.get("rope_theta", 10000.0) >= 500000.0 or params.get("vocab_size", -1) >= 128000:
        return 8192
    return 4096 if params.get("norm_eps", 1e-5) >= 1e-5 else 2048


def hf_config_from_meta_params(params: dict, sd: dict[str, torch.Tensor]) -> dict:
    """The Hugging Face `config.json` dict of Meta's `params.json`; vocab and MLP sizes are read off the weights."""
    dim, n_heads = params["dim"], params["n_heads"]
    scaling = None
    if params.get("use_scaled_rope"):  # Llama 3.1 constants (meta-llama/llama-models apply_scaling)
        scaling = {"rope_type": "llama3", "factor": params.get("rope_scaling_factor", 8.0), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    try:
        vocab, inter = sd["tok_embeddings.weight"].shape[0], sd["layers.0.feed_forward.w1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"Meta checkpoint lacks {e.args[0]}") from e
    return dict(
        model_type="llama", vocab_size=vocab, hidden_size=dim, intermediate_size=inter, num_hidden_layers=params["n_layers"],
        num_attention_heads=n_heads, num_key_value_heads=params.get("n_kv_heads") or n_heads,
        rms_norm_eps=params.get("norm_eps", 1e-5), rope_theta=params.get("rope_theta", 10000.0), rope_scaling=scaling,
        max_position_embeddings=params.get("max_seq_len") or meta_context(params),
        tie_word_embeddings="output.weight" not in sd,
    )


def meta_to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Meta keys -> Hugging Face keys: rename, and permute q/k rows from interleaved-pair RoPE to the halves layout."""
    D = cfg.head_dim

    def permute(w, n_heads):  # rows (pair i, member j) -> (member j, pair i) within each head
        return w.view(n_heads, D // 2, 2, w.shape[1]).transpose(1, 2).reshape(n_heads * D, w.shape[1])

    hf = {}
    for k, v in sd.items():
        if k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            if rest not in META_TO_HF:
                hf[k] = v  # left for the strict check to report as unexpected
                continue
            if rest == "attention.wq.weight":
                v = permute(v, cfg.num_attention_heads)
            elif rest == "attention.wk.weight":
                v = permute(v, cfg.num_key_value_heads)
            hf[f"model.layers.{i}.{META_TO_HF[rest]}"] = v
        elif k == "rope.freqs":
            continue
        else:
            hf[META_TO_HF.get(k, k)] = v
    return hf

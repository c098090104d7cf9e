"""Mixture-of-experts decoders: DeepSeek-V3, DeepSeek-V2 (MLA attention, DeepSeekMoE) and Mixtral (GQA + top-2 MoE).

Same interface as `decoders.llama.LlamaForCausalLM` (forward, decode_step, generate, from_pretrained,
save_pretrained), so generation, the fusion model and benchmarks take either.

    layer i:  x + attn(input_layernorm(x))            attn: MLA (DeepSeek, decoders/mla.py) or Llama's GQA (Mixtral)
              x + ffn(post_attention_layernorm(x))    ffn: dense SwiGLU for i < first_k_dense_replace, else MoE
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .causal_lm import CausalLM
from .checkpoint import load_state_dict_strict, read_config, read_hf_weights, write_hf_weights
from .convert_deepseek import convert_hf_state_dict, to_hf_state_dict
from .kv_cache import KVCache
from .llama import Attention, LlamaConfig, Pass, RMSNorm, rope_from_hf, rope_inv_freq
from .mla import MLA, LatentCache, rope_cos_sin, rope_parameters, softmax_scale
from .moe import MoE, Router, SwiGLU
from .mtp import MTP, convert_mtp_state_dict, mtp_to_hf_state_dict

MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "mixtral")
# transformers' defaults for keys a config.json may leave out, per model type
HF_DEFAULTS = {
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, routed_scaling_factor=2.5,
                        n_group=8, topk_group=4, first_k_dense_replace=3, n_shared_experts=1, q_lora_rank=1536,
                        rope_interleave=True, num_nextn_predict_layers=1),
    "deepseek_v2": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                        first_k_dense_replace=0, n_shared_experts=2, q_lora_rank=1536, rope_interleave=True),
    "mixtral": dict(scoring_func="softmax", topk_method="greedy", norm_topk_prob=True, routed_scaling_factor=1.0,
                    first_k_dense_replace=0, n_shared_experts=0, rope_theta=1e6),
}


@dataclass
class DeepseekConfig:
    """Hyper-parameters of a DeepSeek-V2/V3 or Mixtral decoder (Hugging Face `config.json` names)."""

    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense layers' SwiGLU (Mixtral: each expert's)
    moe_intermediate_size: int | None = 2048  # each routed / shared expert's (None: intermediate_size)
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # GQA (Mixtral); MLA: num_attention_heads
    head_dim: int | None = None  # GQA (Mixtral), None: hidden_size // num_attention_heads; MLA: qk_rope_head_dim
    q_lora_rank: int | None = 1536  # None: a plain q_proj (V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    scoring_func: str = "sigmoid"  # sigmoid (V3) | softmax (V2, Mixtral)
    topk_method: str = "noaux_tc"  # noaux_tc (V3: groups by top-2 sum, bias) | group_limited_greedy (V2) | greedy
    n_group: int | None = 8
    topk_group: int | None = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "yarn", "factor", "original_max_position_embeddings", "mscale", ...}
    rope_interleave: bool = True  # the checkpoint's rope dims are interleaved pairs (the converter reorders them)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # V3's multi-token-prediction depth (its modules are loaded when present)
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"config model_type is {self.model_type!r}, expected one of {', '.join(MODEL_TYPES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "q_lora_rank", "kv_lora_rank",
                     "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok",
                     "max_position_embeddings", "n_group", "topk_group"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"config {name} must be a positive integer, got {v!r}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ValueError(f"config scoring_func {self.scoring_func!r}: supported sigmoid, softmax")
        if self.topk_method not in ("noaux_tc", "group_limited_greedy", "greedy"):
            raise ValueError(f"config topk_method {self.topk_method!r}: supported noaux_tc, group_limited_greedy, greedy")
        self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size
        if self.attention == "mla":  # as transformers sets them: keys are per head, head_dim names the rope part
            self.num_key_value_heads, self.head_dim = self.num_attention_heads, self.qk_rope_head_dim
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.attention == "gqa" and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")

    @property
    def attention(self) -> str:
        """"mla" (DeepSeek) or "gqa" (Mixtral)."""
        return "gqa" if self.model_type == "mixtral" else "mla"

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i's feed-forward is the MoE (the first `first_k_dense_replace` layers are dense)."""
        return i >= self.first_k_dense_replace

    def gqa_config(self) -> LlamaConfig:
        """Mixtral's attention as Llama's config (the attention modules are Llama's)."""
        return LlamaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                           num_hidden_layers=self.num_hidden_layers,
                           num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
                           head_dim=self.head_dim, rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                           max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps)

    def router(self) -> Router:
        """A router for this config's MoE layers."""
        grouped = self.topk_method != "greedy" and self.n_group and self.topk_group
        # DeepSeek-V2's code scales the weights only when it does not normalise them (V3 does both)
        scale = 1.0 if self.model_type == "deepseek_v2" and self.norm_topk_prob else self.routed_scaling_factor
        return Router(self.hidden_size, self.n_routed_experts, self.num_experts_per_tok, self.scoring_func,
                      self.n_group if grouped else 1, self.topk_group if grouped else 1,
                      "top2" if self.topk_method == "noaux_tc" else "max", self.norm_topk_prob, scale,
                      correction_bias=self.topk_method == "noaux_tc")

    @classmethod
    def from_hf(cls, d: dict) -> "DeepseekConfig":
        """Build from a Hugging Face `config.json` dict (transformers 4.x `rope_scaling` or 5.x `rope_parameters`)."""
        kind = d.get("model_type")
        if kind not in MODEL_TYPES:
            raise ValueError(f"config model_type is {kind!r}, expected one of {', '.join(MODEL_TYPES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config hidden_act is {d.get('hidden_act')!r}; only 'silu' is supported")
        for flag in ("attention_bias", "mlp_bias"):
            if d.get(flag):
                raise ValueError(f"config sets {flag}=True; checkpoints with biases are not supported")
        if d.get("moe_layer_freq", 1) != 1:
            raise ValueError(f"config moe_layer_freq={d['moe_layer_freq']}: only 1 (every layer after the dense ones) "
                             "is supported")
        window = d.get("sliding_window") or 0
        if kind == "mixtral" and window and window < d.get("max_position_embeddings", 0):
            raise ValueError(f"config sliding_window={d['sliding_window']}: sliding-window attention is not supported")
        kw = {**HF_DEFAULTS[kind], **{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}}}
        if kind == "mixtral":
            kw.update(n_routed_experts=d.get("num_local_experts", 8), moe_intermediate_size=d.get("intermediate_size"),
                      n_shared_experts=0, first_k_dense_replace=0)
        if kind == "deepseek_v2":
            kw["rope_interleave"] = True  # V2 always rotates interleaved pairs
        kw.update(rope_from_hf(d))
        return cls(**kw)

    def to_hf(self) -> dict:
        """The Hugging Face `config.json` dict of this model type."""
        d = asdict(self)
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        arch = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
                "mixtral": "MixtralForCausalLM"}
        d.update(architectures=[arch[self.model_type]], hidden_act="silu", rope_parameters=rope, attention_bias=False)
        if self.model_type == "mixtral":
            for k in ("moe_intermediate_size", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                      "v_head_dim", "n_routed_experts", "n_shared_experts", "first_k_dense_replace", "scoring_func",
                      "topk_method", "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "rope_interleave",
                      "num_nextn_predict_layers"):
                d.pop(k)
            d.update(num_local_experts=self.n_routed_experts, sliding_window=None)
        return d


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)); attn MLA or GQA, ffn SwiGLU or MoE."""

    def __init__(self, cfg: DeepseekConfig, i: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.attention == "mla":
            self.self_attn = MLA(cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank,
                                 cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                                 softmax_scale(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.rope_scaling))
        else:
            self.self_attn = Attention(cfg.gqa_config())
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_moe_layer(i):
            self.mlp = MoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts, cfg.n_shared_experts,
                           cfg.router())
        else:
            self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, p: Pass, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), p, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekForCausalLM(CausalLM):
    """A DeepSeek-V2/V3 or Mixtral decoder with its language-model head: token ids [B, T] -> logits [B, T, V].

    `mtp`: V3's multi-token-prediction modules (decoders/mtp.py) when the checkpoint has them, else None."""

    def __init__(self, cfg: DeepseekConfig, mtp_depth: int = 0):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.attention == "mla":
            inv_freq, self.rope_factor = rope_parameters(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.rope_scaling,
                                                         cfg.max_position_embeddings)
        else:
            inv_freq, self.rope_factor = rope_inv_freq(cfg.gqa_config()), 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.mtp = MTP(cfg, mtp_depth, DecoderLayer) if mtp_depth else None
        self.compiled_decode_step = None

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                kv_cache: KVCache | LatentCache | None = None, last_only: bool = False,
                return_hidden: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] (or [B, 1, V] with `last_only`); see `LlamaForCausalLM.forward` for the arguments.
        return_hidden: also the final (normalised) hidden states [B, T, D], what MTP reads."""
        h, position_ids, mask, is_causal, start = self.prepare(input_ids, attention_mask, inputs_embeds, position_ids,
                                                               kv_cache)
        out = self.run_layers(h, position_ids, mask, is_causal, kv_cache, start, last_only, return_hidden=return_hidden)
        if kv_cache is not None:
            kv_cache.length = start + h.shape[1]
        return out

    def run_layers(self, h, position_ids, mask, is_causal, kv_cache, start, last_only=False, cache_lens=None,
                   return_hidden=False):
        """The layers, final norm and head on embeddings h [B, T, D]; no checks (see `forward`)."""
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_factor, position_ids, h.dtype)
        if mask is not None:  # additive, built once: 0 where seen, -inf where masked
            mask = torch.zeros(mask.shape, dtype=h.dtype, device=h.device).masked_fill_(~mask, float("-inf"))
        p = Pass(cos, sin, mask, is_causal, kv_cache, start, cache_lens if self.config.attention == "gqa" else None)
        for i, layer in enumerate(self.layers):
            h = layer(h, p, i)
        if last_only:
            h = h[:, -1:]
        h = self.norm(h)
        logits = self.head(h)
        return (logits, h) if return_hidden else logits

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Logits of normalised hidden states (the output matrix is shared with MTP)."""
        return F.linear(h, self.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)

    def decode_step(self, token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, key_mask: torch.Tensor,
                    kv_cache, cache_lens: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row with static shapes (see `LlamaForCausalLM.decode_step`): logits [B, 1, V].
        MLA attends through the absorbed form over the whole latent cache with the key mask."""
        h = self.embed_tokens(token)  # [B, 1, D]
        use_lens = cache_lens is not None and self.config.attention == "gqa"
        mask = None if use_lens else key_mask[:, None, None, :]  # [B, 1, 1, S_max]
        return self.run_layers(h, position, mask, False, kv_cache, slot, cache_lens=cache_lens if use_lens else None)

    def new_kv_cache(self, batch_size: int, max_tokens: int) -> KVCache | LatentCache:
        """A static cache (MLA: the latent cache) for `batch_size` rows of up to `max_tokens` tokens."""
        c = self.config
        if c.attention == "mla":
            return LatentCache(c.num_hidden_layers, batch_size, c.kv_lora_rank + c.qk_rope_head_dim, max_tokens,
                               self.dtype, self.device)
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, max_tokens, self.dtype,
                       self.device)

    # ----------------------------------------------------------------------------------- checkpoints

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32,
                        device: torch.device | str = "cpu") -> "DeepseekForCausalLM":
        """Load a Hugging Face deepseek_v3 / deepseek_v2 / mixtral directory (config.json + safetensors, sharded or
        not); V3's multi-token-prediction layers, when the checkpoint has them, go to `model.mtp`."""
        path = Path(path)
        cfg = read_config(path, DeepseekConfig.from_hf)
        state_dict, mtp = convert_hf_state_dict(read_hf_weights(path), cfg, source=str(path))
        if mtp:
            state_dict.update(convert_mtp_state_dict(mtp, cfg, source=str(path)))
        return cls.from_state_dict(cfg, state_dict, dtype, device, source=str(path), mtp_depth=len(mtp))

    @classmethod
    def from_state_dict(cls, cfg: DeepseekConfig, state_dict: dict[str, torch.Tensor], dtype=torch.float32,
                        device="cpu", source: str = "state dict", mtp_depth: int = 0) -> "DeepseekForCausalLM":
        """Build a model from one of our state dicts without a random initialisation. DeepSeek's routers (weight and
        correction bias) stay in float32 whatever `dtype`, as in transformers (routing is sensitive to rounding)."""
        with torch.device("meta"):
            model = cls(cfg, mtp_depth)
        fp32 = cfg.attention == "mla"
        state_dict = {k: v.to(device=device, dtype=torch.float32 if fp32 and ".mlp.gate." in k else dtype)
                      for k, v in state_dict.items()}
        load_state_dict_strict(model, state_dict, source, assign=True)
        return model.to(device).eval()

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
        """Write a Hugging Face directory (config, generation config, safetensors with per-expert matrices and, for
        V3 with MTP, the extra `model.layers.{N + k}` modules) that transformers loads."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf = self.config.to_hf()
        hf["dtype"] = str(self.dtype).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(hf, indent=2))
        gen = {"bos_token_id": self.config.bos_token_id, "eos_token_id": self.config.eos_token_id}
        (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
        sd = {k: v for k, v in self.state_dict().items() if not k.startswith("mtp.")}
        hf_sd = to_hf_state_dict(sd, self.config)
        if self.mtp is not None:
            hf_sd.update(mtp_to_hf_state_dict(self))
        write_hf_weights(path, hf_sd, max_shard_bytes)

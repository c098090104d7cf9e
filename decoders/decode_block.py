"""The eager one-token CPU decode step's Llama blocks in C++ (`decode_block.cpp`, built with the other CPU kernels
by `cpu_kernels`): each block is one call instead of ~45 PyTorch calls, with the Python block's roundings, its
products on `linear.cpp`'s row kernel and its attention on `decode_attention.cpp`. Python's per-call cost was most
of an eager step of a small model (10M float32: 1.2 ms a token, ~0.5 of it in the products; 0.68 ms with these
blocks, against 0.43 for the compiled step; 125M bf16 5.8 -> 3.8 ms, as fast as compiled). `stepper` goes one
further for `generate`: the whole step (embedding, blocks, final norm, head) in one call. The compiled step keeps
the Python block (inductor fuses it); so does anything with more than one row or token, a gradient, quantized or
adapted linears, biases."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from . import cpu_kernels
from .linear import Linear

if TYPE_CHECKING:
    from .kv_cache import KVCache
    from .llama import LlamaForCausalLM


def takes(h: torch.Tensor, p) -> bool:
    """Whether the layers of this pass (`llama.Pass` p) on embeddings h [B, T, D] can run as C++ blocks: an eager
    decode step (`decode_step`: a slot tensor, a mask over the whole cache) of one token on CPU with a cache of one
    row, float32 or bf16 (bf16 on CPUs with AVX512-BF16), no gradient."""
    return (cpu_kernels.loaded and h.device.type == "cpu" and h.shape[0] == 1 and h.shape[1] == 1
            and (h.dtype == torch.float32 or h.dtype == torch.bfloat16 and cpu_kernels.bf16)
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and p.kv_cache is not None and isinstance(p.start, torch.Tensor) and p.cache_lens is None
            and p.kv_cache.k[0].shape[0] == 1 and p.mask is not None and p.mask.shape[:3] == (1, 1, 1))


def plain(block) -> bool:
    """Whether `block` (`llama.Block`) is the plain Llama block the C++ one computes: `Linear`s without bias (not
    quantized or adapted), one RMSNorm epsilon, a head size that is a multiple of 16 (the attention kernel's)."""
    a, m = block.self_attn, block.mlp
    linears = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
    return (all(type(x) is Linear and x.bias is None for x in linears) and a.head_dim % 16 == 0
            and block.input_layernorm.eps == block.post_attention_layernorm.eps)


def block(b, x: torch.Tensor, p, layer: int) -> torch.Tensor:
    """`b(x, p, layer)` for x [1, 1, D], in one C++ call (see `takes` and `plain`)."""
    a, m = b.self_attn, b.mlp
    weights = [b.input_layernorm.weight, a.qkv_proj.weight, a.o_proj.weight, b.post_attention_layernorm.weight,
               m.gate_up_proj.weight, m.down_proj.weight]
    y = torch.ops.mm_decode.block(x.view(1, -1), weights, p.cos.view(-1), p.sin.view(-1), p.kv_cache.k[layer],
                                  p.kv_cache.v[layer], p.start, p.mask.view(1, 1, 1, -1), a.n_kv_heads,
                                  b.input_layernorm.eps)
    return y.view(1, 1, -1)


def stepper(model: LlamaForCausalLM, batch_size: int, cos: torch.Tensor, sin: torch.Tensor) -> Callable | None:
    """`model.decode_step` (a `LlamaForCausalLM` of `llama.Block`s) for a batch of one as one C++ call a token
    (embedding, every block, final norm, head: `torch.ops.mm_decode.step`), or None where that does not apply: a CPU
    model of plain blocks (`plain`) in float32 or bf16 (bf16 on CPUs with AVX512-BF16), the kernels loaded, a batch of
    one, no gradient. cos, sin [P, Dh]: RoPE at positions 0..P-1 in the model's dtype (`rope_cos_sin`'s values)."""
    dtype = model.dtype
    if not (batch_size == 1 and cpu_kernels.loaded and model.device.type == "cpu" and not torch.is_grad_enabled()
            and (dtype == torch.float32 or dtype == torch.bfloat16 and cpu_kernels.bf16)
            and all(plain(b) and b.input_layernorm.eps == model.norm.eps for b in model.layers)
            and (model.lm_head is None or type(model.lm_head) is Linear and model.lm_head.bias is None)):
        return None
    weights = [w for b in model.layers for w in (
        b.input_layernorm.weight, b.self_attn.qkv_proj.weight, b.self_attn.o_proj.weight,
        b.post_attention_layernorm.weight, b.mlp.gate_up_proj.weight, b.mlp.down_proj.weight)]
    embed = model.embed_tokens.weight
    head = embed if model.lm_head is None else model.lm_head.weight
    if any(w.dtype != dtype or not w.is_contiguous() for w in [*weights, embed, head, model.norm.weight]):
        return None
    n_kv_heads, eps = model.config.num_key_value_heads, model.norm.eps

    def step(token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, key_mask: torch.Tensor,
             kv_cache: KVCache, cache_lens: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.ops.mm_decode.step(token, position, slot, key_mask, embed, weights, model.norm.weight, head,
                                          cos, sin, kv_cache.k, kv_cache.v, n_kv_heads, eps)
        return logits.view(1, 1, -1)

    return step

"""The eager one-token CPU decode step's Llama blocks in C++ (`decode_block.cpp`, built with the other CPU kernels
by `cpu_kernels`): each block is one call instead of ~45 PyTorch calls, with the Python block's roundings, its
products on `linear.cpp`'s row kernel and its attention on `decode_attention.cpp`. Python's per-call cost was most
of an eager step of a small model (10M float32: 1.2 ms a token, ~0.5 of it in the products; 0.68 ms with these
blocks, against 0.43 for the compiled step; 125M bf16 5.8 -> 3.8 ms, as fast as compiled). `stepper` goes one
further for `generate`: the whole step (embedding, blocks, final norm, head) in one call, its linears float or
quantized as W8A8 / W4A8 (the modules' numbers) or weight-only int8 / int4 (their sums in another order). The
compiled step keeps the Python block (inductor fuses it); so does anything with more than one row or token, a
gradient, other quantized or adapted linears, biases."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from . import cpu_kernels
from .linear import Linear
from .qlinear import Int4Linear, Int8Linear, W4A8Linear, W8A8Linear

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


def linears(block) -> tuple:
    """The four products of `block` (`llama.Block`), in the C++ block's order: qkv, o, gate_up, down."""
    a, m = block.self_attn, block.mlp
    return a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj


def shaped(block) -> bool:
    """Whether `block` has the C++ block's shape: one RMSNorm epsilon, a head size that is a multiple of 16 (the
    attention kernel's)."""
    return block.self_attn.head_dim % 16 == 0 and block.input_layernorm.eps == block.post_attention_layernorm.eps


def plain(block) -> bool:
    """Whether `block` is the plain Llama block the C++ one computes: `shaped`, its `Linear`s without bias (not
    quantized or adapted)."""
    return shaped(block) and all(type(x) is Linear and x.bias is None for x in linears(block))


def block(b, x: torch.Tensor, p, layer: int) -> torch.Tensor:
    """`b(x, p, layer)` for x [1, 1, D], in one C++ call (see `takes` and `plain`)."""
    qkv, o, gate_up, down = (x.weight for x in linears(b))
    weights = [b.input_layernorm.weight, qkv, o, b.post_attention_layernorm.weight, gate_up, down]
    y = torch.ops.mm_decode.block(x.view(1, -1), weights, p.cos.view(-1), p.sin.view(-1), p.kv_cache.k[layer],
                                  p.kv_cache.v[layer], p.start, p.mask.view(1, 1, 1, -1), b.self_attn.n_kv_heads,
                                  b.input_layernorm.eps)
    return y.view(1, 1, -1)


NO_SCALES = torch.empty(0)


def product(linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(weight, scales) of a linear as `torch.ops.mm_decode.step` takes it, or None for one it does not compute: a
    `Linear` (no scales), `W8A8Linear` (int8 weight, float32 scales), `Int8Linear` (int8 weight, bf16 scales: weight
    only), `W4A8Linear` (packed codes, float16 scales and corrections) or `Int4Linear` (the same packing, bf16 scales
    and offsets: weight only), none with a bias."""
    if linear.bias is not None:
        return None
    if type(linear) is Linear:
        return linear.weight, NO_SCALES
    if type(linear) is W8A8Linear or type(linear) is Int8Linear:
        return linear.qweight, linear.scales
    if type(linear) is W4A8Linear:
        return linear.qweight, linear.sc
    if type(linear) is Int4Linear:
        return linear.qweight, linear.so
    return None


def stepper(model: LlamaForCausalLM, batch_size: int, cos: torch.Tensor, sin: torch.Tensor) -> Callable | None:
    """`model.decode_step` (a `LlamaForCausalLM` of `llama.Block`s) for a batch of one as one C++ call a token
    (embedding, every block, final norm, head: `torch.ops.mm_decode.step`), or None where that does not apply: a CPU
    model in float32 or bf16 (bf16 on CPUs with AVX512-BF16) of `shaped` blocks whose linears are bias-free `Linear`s
    or W8A8 / W4A8 / weight-only int8 / int4 (`product`), the kernels loaded, a batch of one, no gradient. cos, sin
    [P, Dh]: RoPE at positions 0..P-1 in the model's dtype (`rope_cos_sin`'s values)."""
    dtype = model.dtype
    if not (batch_size == 1 and cpu_kernels.loaded and model.device.type == "cpu" and not torch.is_grad_enabled()
            and (dtype == torch.float32 or dtype == torch.bfloat16 and cpu_kernels.bf16)
            and all(shaped(b) and b.input_layernorm.eps == model.norm.eps for b in model.layers)):
        return None
    embed = model.embed_tokens.weight
    products = [product(x) for b in model.layers for x in linears(b)]
    products.append((embed, NO_SCALES) if model.lm_head is None else product(model.lm_head))
    if None in products:
        return None
    norms = [w for b in model.layers for w in (b.input_layernorm.weight, b.post_attention_layernorm.weight)]
    floats = [embed, model.norm.weight, *norms] + [w for w, _ in products if w.is_floating_point()]
    if any(w.dtype != dtype or not w.is_contiguous() for w in floats):
        return None
    weights = [w for i in range(len(model.layers)) for w in (
        norms[2 * i], products[4 * i][0], products[4 * i + 1][0], norms[2 * i + 1], products[4 * i + 2][0],
        products[4 * i + 3][0])]
    scales = [s for _, s in products]
    head = products[-1][0]
    n_kv_heads, eps = model.config.num_key_value_heads, model.norm.eps

    def step(token: torch.Tensor, position: torch.Tensor, slot: torch.Tensor, key_mask: torch.Tensor,
             kv_cache: KVCache, cache_lens: torch.Tensor | None = None) -> torch.Tensor:
        logits = torch.ops.mm_decode.step(token, position, slot, key_mask, embed, weights, scales, model.norm.weight,
                                          head, cos, sin, kv_cache.k, kv_cache.v, n_kv_heads, eps)
        return logits.view(1, 1, -1)

    return step

"""FlashDecoding: one decode step of attention over a static, ragged KV cache, split along the sequence.

At decode time there is one query token per sequence, so ordinary flash attention runs only
B * H programs and leaves most of a GPU idle at small batch. FlashDecoding (Dao et al., 2023) also
splits the KV sequence into `num_splits` chunks: each chunk gives a partial softmax output and its
log-sum-exp (LSE), and a second pass combines the chunks, each rescaled by exp(lse_i - lse_total).

Shapes (one decode step):
    q                 [B, H, D]  (or [B, H, 1, D], the model's layout; the output has q's layout)
    k_cache, v_cache  [B, H_kv, S_max, D]  preallocated; only the first cache_lens[b] positions of row b are valid
    cache_lens        [B]  integer, each in [1, S_max]
GQA: H is a multiple of H_kv and query head h reads kv head h // (H // H_kv); MQA is H_kv = 1.

`decode_attention` is the one function the model calls; `flash_decode_reference` (pure PyTorch) and
`flash_decode_triton` (two Triton kernels) implement the same split-and-combine algorithm and are
compared in the tests. Triton is optional and the kernels are jitted on first use, so this module
imports on machines without triton or a GPU. To run the kernels on CPU, set
`TRITON_INTERPRET=1` before triton is first imported in the process: triton.language's own helpers
(tl.cdiv, tl.max, ...) are jitted, in one mode or the other, at that import.
"""

from __future__ import annotations  # kernel annotations stay strings: no triton needed at import

import functools
import math

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode_attention falls back to SDPA
    triton = None
    tl = None

__all__ = ["decode_attention", "flash_decode_reference", "flash_decode_triton", "choose_num_splits"]

# Heuristic constants of `decode_attention` (see `choose_num_splits`).
MIN_TRITON_CACHE_LEN = 1024  # below this the whole padded cache is small enough for one fused SDPA call
MIN_KEYS_PER_SPLIT = 256  # a split should stream at least this many keys to amortise its launch and the combine
MAX_SPLITS = 64


# ----------------------------------------------------------------------------- shapes


def _check_inputs(q, k_cache, v_cache, cache_lens, num_splits=1):
    """Validate shapes (and a given split count); return q as [B, H, D] and whether it came as [B, H, 1, D]."""
    was_4d = q.dim() == 4
    if was_4d:
        if q.shape[2] != 1:
            raise ValueError(f"decode attention takes one query token: q [B, H, 1, D], got {tuple(q.shape)}")
        q = q.squeeze(2)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D] or [B, H, 1, D], got {tuple(q.shape)}")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must both be [B, H_kv, S_max, D], got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    B, H, D = q.shape
    Bk, H_kv, _, Dk = k_cache.shape
    if Bk != B or Dk != D:
        raise ValueError(f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on batch or head dim")
    if H % H_kv != 0:
        raise ValueError(f"query heads H={H} must be a multiple of kv heads H_kv={H_kv}")
    if cache_lens.shape != (B,) or cache_lens.dtype.is_floating_point or cache_lens.dtype == torch.bool:
        raise ValueError(f"cache_lens must be an integer tensor [B]={B}, got {cache_lens.dtype} "
                         f"{tuple(cache_lens.shape)}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    return q, was_4d


# ----------------------------------------------------------------------------- reference


def flash_decode_reference(q, k_cache, v_cache, cache_lens, num_splits, scale=None):
    """FlashDecoding in pure PyTorch (fp32): per-split partial softmax and LSE, combined by their LSE."""
    q3, was_4d = _check_inputs(q, k_cache, v_cache, cache_lens, num_splits)
    B, H, D = q3.shape
    _, H_kv, S, _ = k_cache.shape
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qg = q3.float().reshape(B, H_kv, G, D)
    k, v = k_cache.float(), v_cache.float()

    # Row b is cut into chunks of ceil(len_b / num_splits) keys, as in the kernel; trailing chunks may be empty.
    lens = cache_lens.to(device=q.device, dtype=torch.long)
    chunk = (lens + num_splits - 1) // num_splits  # [B]
    pos = torch.arange(S, device=q.device)  # [S]
    split_start = torch.arange(num_splits, device=q.device)[None, :] * chunk[:, None]  # [B, n]
    split_end = torch.minimum(split_start + chunk[:, None], lens[:, None])  # [B, n]
    in_split = (pos >= split_start[..., None]) & (pos < split_end[..., None])  # [B, n, S]

    scores = torch.einsum("bkgd,bksd->bkgs", qg, k) * scale  # [B, H_kv, G, S]
    scores = scores[:, :, :, None, :].masked_fill(~in_split[:, None, None], float("-inf"))  # [B, H_kv, G, n, S]
    lse = torch.logsumexp(scores, dim=-1)  # [B, H_kv, G, n], -inf for empty splits
    # An empty split has no keys: weight 0 instead of exp(-inf - -inf) = nan.
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
    out_split = torch.einsum("bkgns,bksd->bkgnd", p, v)  # [B, H_kv, G, n, D]

    lse_total = torch.logsumexp(lse, dim=-1, keepdim=True)  # [B, H_kv, G, 1]
    out = (torch.exp(lse - lse_total)[..., None] * out_split).sum(dim=3)  # [B, H_kv, G, D]
    out = out.reshape(B, H, D).to(q.dtype)
    return out.unsqueeze(2) if was_4d else out


# ----------------------------------------------------------------------------- triton kernels
# Plain functions here, turned into kernels by `_kernels()` on first use: importing needs no triton.


def _split_kernel(
    Q, K, V, Lens, OutPartial, LsePartial,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    H_KV, NUM_SPLITS,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (batch row, kv head, split): all GROUP query heads of the kv head share each K/V load.
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)  # int64: b * stride overflows int32 on large caches
    hk = (pid_bh % H_KV).to(tl.int64)
    length = tl.load(Lens + b).to(tl.int32)
    chunk = tl.cdiv(length, NUM_SPLITS)
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = hk * GROUP + offs_g  # query heads of this kv head; rows >= GROUP are padding for tl.dot
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=mask_g[:, None] & mask_d[None, :], other=0.0).to(DOT_DTYPE)  # [BLOCK_G, BLOCK_D]
    k_base = K + b * stride_kb + hk * stride_kh + offs_d[None, :] * stride_kd
    v_base = V + b * stride_vb + hk * stride_vh + offs_d[None, :] * stride_vd

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # A while loop rather than range(start, end): the Triton 3.6 interpreter cannot take tensor bounds
    # in range() under numpy >= 2.4 (triton-lang/triton#9171); compiled code is the same loop.
    n0 = start
    while n0 < end:
        pos = n0 + offs_n
        mask_n = pos < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + pos[:, None] * stride_ks, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_base + pos[:, None] * stride_vs, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # Each block holds at least one valid key, so m_new is finite and alpha = 0 on the first block.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new
        n0 += BLOCK_N

    # An empty split (start >= end) stores output 0 and LSE -inf, so the combine gives it weight 0.
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    tl.store(OutPartial + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :],
             acc / l_safe[:, None], mask=mask_g[:, None] & mask_d[None, :])
    tl.store(LsePartial + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


def _combine_kernel(
    OutPartial, LsePartial, Out,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh, stride_outd,
    H, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (batch row, query head): out = sum_i exp(lse_i - lse_total) * out_i.
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(LsePartial + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))  # [BLOCK_S]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)  # all splits empty (length 0): output 0, not nan
    w = tl.exp(lse - lse_max)  # [BLOCK_S]
    w_sum = tl.sum(w, 0)
    o = tl.load(OutPartial + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                mask=mask_s[:, None] & mask_d[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    out = tl.sum(o * w[:, None], 0) / tl.where(w_sum > 0, w_sum, 1.0)  # [BLOCK_D]
    tl.store(Out + b * stride_outb + h * stride_outh + offs_d * stride_outd, out.to(Out.dtype.element_ty), mask=mask_d)


_TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


@functools.cache
def _kernels():
    """The two kernels, jitted on first use."""
    if triton is None:
        raise RuntimeError("flash_decode_triton needs the `triton` package, which is not installed")
    return triton.jit(_split_kernel), triton.jit(_combine_kernel)


def flash_decode_triton(q, k_cache, v_cache, cache_lens, num_splits, scale=None, block_n=None):
    """FlashDecoding with Triton: a split kernel (partial output + LSE per chunk) and a combine kernel."""
    q3, was_4d = _check_inputs(q, k_cache, v_cache, cache_lens, num_splits)
    split_kernel, combine_kernel = _kernels()
    if not (q.is_cuda or triton.knobs.runtime.interpret):
        raise RuntimeError(f"flash_decode_triton needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if not (q3.dtype == k_cache.dtype == v_cache.dtype) or q3.dtype not in _TL_DTYPES:
        raise ValueError(f"q, k_cache, v_cache must share one of float16/bfloat16/float32, got {q3.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    B, H, D = q3.shape
    H_kv = k_cache.shape[1]
    G = H // H_kv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    BLOCK_D = max(16, triton.next_power_of_2(D))  # tl.arange needs a power of two; other head dims are masked
    BLOCK_G = max(16, triton.next_power_of_2(G))  # tl.dot needs at least 16 rows
    if block_n is None:
        block_n = 64 if BLOCK_D <= 128 else 32  # K and V blocks of 16 KiB each in half precision
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16 (tl.dot), got {block_n}")
    cache_lens = cache_lens.to(q.device)
    # Dots take the cache dtype (p is rounded to it, as in flash attention) and fp32 inputs stay exact
    # (ieee, not tf32). The Triton 3.6 interpreter mishandles bfloat16: its tl.dot multiplies the raw uint16
    # bits and its fp32 -> bf16 cast truncates. So under the interpreter bf16 dots run in fp32 and the
    # kernel writes an fp32 output that torch rounds to bf16; compiled code uses bf16 as is.
    interpret_bf16 = bool(triton.knobs.runtime.interpret) and q3.dtype == torch.bfloat16
    dot_dtype = tl.float32 if interpret_bf16 else getattr(tl, _TL_DTYPES[q3.dtype])

    out_partial = torch.empty(B, H, num_splits, D, device=q.device, dtype=torch.float32)
    lse_partial = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    split_kernel[(B * H_kv, num_splits)](
        q3, k_cache, v_cache, cache_lens, out_partial, lse_partial,
        *q3.stride(), *k_cache.stride(), *v_cache.stride(),
        *out_partial.stride()[:3], *lse_partial.stride()[:2],
        scale * math.log2(math.e), H_kv, num_splits,
        GROUP=G, HEAD_DIM=D, DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else None,
        BLOCK_G=BLOCK_G, BLOCK_N=block_n, BLOCK_D=BLOCK_D,
        num_warps=4, num_stages=2,
    )
    out = torch.empty(B, H, D, device=q.device, dtype=torch.float32 if interpret_bf16 else q.dtype)
    combine_kernel[(B * H,)](
        out_partial, lse_partial, out,
        *out_partial.stride()[:3], *lse_partial.stride()[:2], *out.stride(),
        H, num_splits,
        HEAD_DIM=D, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=BLOCK_D,
        num_warps=4 if BLOCK_D >= 128 else 2,
    )
    out = out.to(q.dtype)
    return out.unsqueeze(2) if was_4d else out


# ----------------------------------------------------------------------------- dispatch


@functools.cache
def _num_sms(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (cached: the query is slow)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(batch_kv_heads: int, cache_len: int, num_sms: int) -> int:
    """Splits so that B * H_kv * splits programs fill about two waves of SMs, each split >= MIN_KEYS_PER_SPLIT keys."""
    want = -(-2 * num_sms // batch_kv_heads)  # ceil
    most = max(1, -(-cache_len // MIN_KEYS_PER_SPLIT))
    return max(1, min(want, most, MAX_SPLITS))


def _sdpa_decode(q3, k_cache, v_cache, cache_lens, scale):
    """One-token attention with SDPA and a key-padding mask; GQA by grouping queries, never repeating K/V."""
    B, H, D = q3.shape
    _, H_kv, S, _ = k_cache.shape
    valid = torch.arange(S, device=q3.device)[None, :] < cache_lens.to(q3.device)[:, None]  # [B, S]
    qg = q3.reshape(B, H_kv, H // H_kv, D)  # [B, H_kv, G, D]: the G query heads of a kv head act as G query rows
    out = F.scaled_dot_product_attention(qg, k_cache, v_cache, attn_mask=valid[:, None, None, :], scale=scale)
    return out.reshape(B, H, D)


@torch.library.custom_op("mm::flash_decode", mutates_args=())
def _flash_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """`flash_decode_triton` with the split count of `choose_num_splits`, as an operator `torch.compile` keeps whole:
    dynamo records one call in the graph (no tracing into triton's launcher), and CUDA graphs capture its launches."""
    B, H_kv, S, _ = k_cache.shape
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    num_splits = choose_num_splits(B * H_kv, S, _num_sms(device_index))
    return flash_decode_triton(q, k_cache, v_cache, cache_lens, num_splits, scale=scale)


@_flash_decode_op.register_fake
def _(q, k_cache, v_cache, cache_lens, scale):
    return torch.empty_like(q)


def decode_attention(q, k_cache, v_cache, cache_lens, scale=None, num_splits=None):
    """Attention of one query token per row over a ragged static KV cache; the model's decode-step kernel.

    On CUDA with triton installed and a cache of at least MIN_TRITON_CACHE_LEN positions this runs
    `flash_decode_triton`, which reads only the valid keys of each row, with `num_splits` from
    `choose_num_splits(B * H_kv, S_max, number of SMs)` unless given (through the `mm::flash_decode` operator, so
    a compiled decode step calls the kernel too). Otherwise (CPU, short caches) it runs
    `F.scaled_dot_product_attention` over the whole cache with a key-padding mask.
    The cache length S_max is used, not cache_lens, because reading cache_lens would sync the GPU.
    The SDPA path multiplies zero weights with the stale positions, so they must be finite (a zeroed cache).
    """
    q3, was_4d = _check_inputs(q, k_cache, v_cache, cache_lens)
    B, H, D = q3.shape
    _, H_kv, S, _ = k_cache.shape
    use_triton = (triton is not None and q3.is_cuda and S >= MIN_TRITON_CACHE_LEN and q3.dtype in _TL_DTYPES
                  and q3.dtype == k_cache.dtype == v_cache.dtype and D <= 256)
    if use_triton and num_splits is None:
        out = _flash_decode_op(q3.contiguous(), k_cache, v_cache, cache_lens, 1.0 / math.sqrt(D) if scale is None else scale)
    elif use_triton:
        out = flash_decode_triton(q3, k_cache, v_cache, cache_lens, num_splits, scale=scale)
    else:
        out = _sdpa_decode(q3, k_cache, v_cache, cache_lens, scale)
    return out.unsqueeze(2) if was_4d else out

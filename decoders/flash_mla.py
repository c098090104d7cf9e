"""FlashMLA-style decode: one query token per row attending over a paged latent KV cache, split along the sequence.

Multi-head latent attention (DeepSeek-V2/V3) caches per token only the latent c_kv [kv_lora_rank] and the RoPE key
k_pe [qk_rope_head_dim] shared by all heads (512 + 64 = 576 numbers in V3). At decode kv_b_proj is absorbed, W_UK
into the query and W_UV into the output, so attention runs on the latent itself: MQA with one 576-wide KV "head"
for all H query heads, whose values are the first kv_lora_rank dims of the same rows (`mla_decode_paged`):
    scores[h, t] = q[h] . cache[t] * softmax_scale;   out[h] = softmax(scores[h]) @ cache[:, :kv_lora_rank]

Shapes (one decode step, one layer):
    q              [B, H, kv_lora_rank + rope]   the absorbed query: [q_nope @ W_UK, q_pe]
    blocks         [num_blocks, block_size, kv_lora_rank + rope]   the paged cache (FlashMLA's with h_kv = 1 dropped)
    block_table    [B, max_blocks_per_seq] int32   page i of row b is blocks[block_table[b, i]]
    cache_seqlens  [B] int32   row b's tokens are positions 0..cache_seqlens[b]-1 (0 gives output 0, LSE -inf)
    returns        out [B, H, kv_lora_rank] in q's dtype, lse [B, H] float32 (natural log of the softmax sums)

`flash_mla_reference` gathers the pages and takes a masked softmax; `flash_mla_triton` is FlashDecoding
(decoders/flash_decoding.py) over pages: a program takes one batch row, a block of heads (16 by default, FlashMLA
takes 64) and one split of the sequence and reads each latent row once for all the block's heads; a second kernel
combines the splits by their LSE.
Triton is optional and jitted on first use; under `TRITON_INTERPRET=1` (set before triton's first import) the
kernels run on CPU.
"""

from __future__ import annotations  # kernel annotations stay strings: no triton needed at import

import functools
import math
from collections.abc import Sequence

import torch

from .flash_decoding import _TL_DTYPES, _num_sms, choose_num_splits

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: flash_mla_decode falls back to the reference
    triton = None
    tl = None

__all__ = ["PagedLatentCache", "flash_mla_decode", "flash_mla_reference", "flash_mla_triton", "mla_decode_paged",
           "latent_cache_bytes_per_token", "kv_cache_bytes_per_token"]


# ----------------------------------------------------------------------------- paged cache and its bytes


def latent_cache_bytes_per_token(num_layers: int, kv_lora_rank: int, qk_rope_head_dim: int, element_size: int) -> int:
    """Bytes one token takes in an MLA latent cache: (kv_lora_rank + qk_rope_head_dim) x layers x element size."""
    return (kv_lora_rank + qk_rope_head_dim) * num_layers * element_size


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, element_size: int,
                             v_head_dim: int | None = None) -> int:
    """Bytes one token takes in an MHA/GQA cache: (K + V) x kv heads x layers x element size (V as wide as K unless
    v_head_dim is given, as MLA expanded to MHA would need: K 192 and V 128 per head in V3)."""
    return (head_dim + (head_dim if v_head_dim is None else v_head_dim)) * num_kv_heads * num_layers * element_size


class PagedLatentCache:
    """The latent rows of every layer in fixed-size pages handed out from a free list, as FlashMLA and vLLM page them.

    blocks[layer] [num_blocks, block_size, kv_lora_rank + rope] (one tensor per layer, as KVCache: in-place writes);
    block_table [batch_size, ceil(max_seq_len / block_size)] int32 and cache_seqlens [batch_size] int32 are shared
    by the layers and updated in place (a captured CUDA graph keeps reading them). Row b's bookkeeping (lengths,
    pages) is kept on the host too, so appending never syncs the device. Unused block-table entries are 0 (a valid
    page, never read: the kernel stops at cache_seqlens).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_lora_rank: int, qk_rope_head_dim: int,
                 batch_size: int, max_seq_len: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        if min(num_layers, num_blocks, block_size, kv_lora_rank, batch_size, max_seq_len) < 1 or qk_rope_head_dim < 0:
            raise ValueError(f"PagedLatentCache sizes must be positive: layers={num_layers} blocks={num_blocks} "
                             f"block_size={block_size} kv_lora_rank={kv_lora_rank} rope={qk_rope_head_dim} "
                             f"batch={batch_size} max_seq_len={max_seq_len}")
        self.block_size, self.kv_lora_rank, self.max_seq_len = block_size, kv_lora_rank, max_seq_len
        width = kv_lora_rank + qk_rope_head_dim
        self.blocks = [torch.zeros(num_blocks, block_size, width, dtype=dtype, device=device)
                       for _ in range(num_layers)]  # L x [num_blocks, block_size, r + d]
        self.block_table = torch.zeros(batch_size, -(-max_seq_len // block_size), dtype=torch.int32, device=device)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.lengths = [0] * batch_size  # host copy of cache_seqlens
        self.pages: list[list[int]] = [[] for _ in range(batch_size)]  # host copy of each row's block_table prefix
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # popped from the end: blocks 0, 1, 2, ... first

    @property
    def nbytes(self) -> int:
        """Bytes of the pages: layers x num_blocks x block_size x (kv_lora_rank + rope) x element size."""
        return sum(b.nbytes for b in self.blocks)

    def append(self, num_tokens: int | Sequence[int]) -> torch.Tensor:
        """Make room for `num_tokens` more tokens in each row (one count for all rows, or one per row), taking pages
        from the free list; return their slots [N] (page * block_size + offset), row by row, for `write`."""
        counts = [num_tokens] * len(self.lengths) if isinstance(num_tokens, int) else list(num_tokens)
        if len(counts) != len(self.lengths) or min(counts, default=0) < 0:
            raise ValueError(f"append takes a count >= 0 for each of the {len(self.lengths)} rows, got {num_tokens}")
        new_lengths = [n + c for n, c in zip(self.lengths, counts)]
        if max(new_lengths) > self.max_seq_len:
            raise ValueError(f"paged latent cache rows hold {self.max_seq_len} tokens; appending {counts} to "
                             f"lengths {self.lengths} overflows it")
        need = sum(-(-n // self.block_size) - len(p) for n, p in zip(new_lengths, self.pages))
        if need > len(self.free_blocks):
            raise ValueError(f"paged latent cache is out of blocks: {need} more needed, {len(self.free_blocks)} free "
                             f"of {self.blocks[0].shape[0]}")
        slots = []
        for b, (start, end) in enumerate(zip(self.lengths, new_lengths)):
            pages = self.pages[b]
            first_new = len(pages)
            while len(pages) * self.block_size < end:
                pages.append(self.free_blocks.pop())
            if len(pages) > first_new:  # only the new entries travel to the device
                self.block_table[b, first_new:len(pages)] = torch.tensor(pages[first_new:], dtype=torch.int32)
            slots += [pages[t // self.block_size] * self.block_size + t % self.block_size for t in range(start, end)]
        self.lengths = new_lengths
        self.cache_seqlens.copy_(torch.tensor(new_lengths, dtype=torch.int32))
        return torch.tensor(slots, dtype=torch.long, device=self.cache_seqlens.device)

    def write(self, layer: int, slots: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor) -> None:
        """Store c_kv [N, kv_lora_rank] and k_pe [N, rope] of N tokens at `slots` [N] (from `append`) of `layer`."""
        flat = self.blocks[layer].view(-1, self.blocks[layer].shape[-1])  # [num_blocks * block_size, r + d]
        n, r = slots.shape[0], self.kv_lora_rank
        if c_kv.shape != (n, r) or k_pe.shape != (n, flat.shape[1] - r):
            raise ValueError(f"write takes c_kv [N, {r}] and k_pe [N, {flat.shape[1] - r}] for N={n} slots, "
                             f"got {tuple(c_kv.shape)} and {tuple(k_pe.shape)}")
        flat.index_copy_(0, slots, torch.cat([c_kv, k_pe], dim=-1).to(flat.dtype))

    def release(self, row: int) -> None:
        """Return row `row`'s pages to the free list; its length becomes 0."""
        self.free_blocks += reversed(self.pages[row])
        self.pages[row], self.lengths[row] = [], 0
        self.block_table[row] = 0
        self.cache_seqlens[row] = 0


# ----------------------------------------------------------------------------- reference


def _check_inputs(q, blocks, block_table, cache_seqlens, head_dim_v):
    if q.dim() != 3 or blocks.dim() != 3 or q.shape[-1] != blocks.shape[-1]:
        raise ValueError("flash MLA takes q [B, H, kv_lora_rank + rope] and blocks [num_blocks, block_size, "
                         f"kv_lora_rank + rope] of the same width, got {tuple(q.shape)} and {tuple(blocks.shape)}")
    B = q.shape[0]
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.dtype.is_floating_point:
        raise ValueError(f"block_table must be an integer tensor [B={B}, max_blocks], got {block_table.dtype} "
                         f"{tuple(block_table.shape)}")
    if cache_seqlens.shape != (B,) or cache_seqlens.dtype.is_floating_point or cache_seqlens.dtype == torch.bool:
        raise ValueError(f"cache_seqlens must be an integer tensor [B]={B}, got {cache_seqlens.dtype} "
                         f"{tuple(cache_seqlens.shape)}")
    if not 0 < head_dim_v <= q.shape[-1]:
        raise ValueError(f"head_dim_v (kv_lora_rank) must be in 1..{q.shape[-1]}, got {head_dim_v}")


def flash_mla_reference(q, blocks, block_table, cache_seqlens, head_dim_v, softmax_scale):
    """Gather each row's pages into one sequence and take a masked softmax, in fp32. Returns (out, lse)."""
    _check_inputs(q, blocks, block_table, cache_seqlens, head_dim_v)
    B, H, D = q.shape
    num_blocks, block_size, _ = blocks.shape
    S = block_table.shape[1] * block_size
    pos = torch.arange(S, device=q.device)  # [S]
    valid = pos[None, :] < cache_seqlens.to(q.device)[:, None]  # [B, S]
    pages = block_table.long().clamp(0, num_blocks - 1)  # entries past a row's length may be anything
    kv = blocks[pages].reshape(B, S, D).float()  # [B, S, D]
    kv = torch.where(valid[..., None], kv, 0.0)  # stale rows may hold nan/inf
    scores = torch.einsum("bhd,bsd->bhs", q.float(), kv) * softmax_scale
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))  # [B, H, S]
    lse = torch.logsumexp(scores, dim=-1)  # [B, H], -inf for an empty row
    p = torch.exp(scores - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])  # 0 for an empty row
    out = torch.einsum("bhs,bsd->bhd", p, kv[..., :head_dim_v])
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- triton kernels
# Plain functions, turned into kernels by `_kernels()` on first use: importing needs no triton.


def _split_kernel(
    Q, Blocks, BlockTable, SeqLens, OutPartial, LsePartial,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_tb, stride_tn,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    H, NUM_SPLITS,
    HEAD_DIM_V: tl.constexpr, ROPE_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # One program per (batch row, block of heads, split): each latent tile is loaded once for BLOCK_H heads.
    b = tl.program_id(0).to(tl.int64)  # int64: offsets overflow int32 on large caches
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    length = tl.load(SeqLens + b).to(tl.int32)
    chunk = tl.cdiv(tl.cdiv(length, NUM_SPLITS), BLOCK_N) * BLOCK_N  # whole tiles: none straddles a split
    start = split * chunk
    end = tl.minimum(start + chunk, length)

    offs_n = tl.arange(0, BLOCK_N)
    offs_v = tl.arange(0, BLOCK_V)  # latent dims: scores and values
    offs_r = HEAD_DIM_V + tl.arange(0, BLOCK_R)  # RoPE dims: scores only
    mask_h = heads < H
    mask_v = offs_v < HEAD_DIM_V
    mask_r = offs_r < HEAD_DIM_V + ROPE_DIM
    q_base = Q + b * stride_qb + heads[:, None] * stride_qh
    q_nope = tl.load(q_base + offs_v[None, :] * stride_qd, mask=mask_h[:, None] & mask_v[None, :], other=0.0)
    q_pe = tl.load(q_base + offs_r[None, :] * stride_qd, mask=mask_h[:, None] & mask_r[None, :], other=0.0)
    q_nope = q_nope.to(DOT_DTYPE)  # [BLOCK_H, BLOCK_V]
    q_pe = q_pe.to(DOT_DTYPE)  # [BLOCK_H, BLOCK_R]

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_H], tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_V], tl.float32)
    # A while loop, not range(start, end): the Triton 3.6 interpreter cannot take tensor bounds in range() under
    # numpy >= 2.4 (triton-lang/triton#9171).
    n0 = start
    while n0 < end:
        pos = n0 + offs_n
        mask_n = pos < end
        page = tl.load(BlockTable + b * stride_tb + (pos // PAGE_SIZE) * stride_tn, mask=mask_n, other=0)
        row = Blocks + page.to(tl.int64) * stride_kb + (pos % PAGE_SIZE) * stride_kt  # [BLOCK_N] row pointers
        c = tl.load(row[:, None] + offs_v[None, :] * stride_kd, mask=mask_n[:, None] & mask_v[None, :], other=0.0)
        k_pe = tl.load(row[:, None] + offs_r[None, :] * stride_kd, mask=mask_n[:, None] & mask_r[None, :], other=0.0)
        c = c.to(DOT_DTYPE)  # [BLOCK_N, BLOCK_V]
        s = tl.dot(q_nope, tl.trans(c), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe, tl.trans(k_pe.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        s = tl.where(mask_n[None, :], s * qk_scale, float("-inf"))  # [BLOCK_H, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: each tile holds at least one valid position
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), c, input_precision=DOT_PRECISION)
        m_i = m_new
        n0 += BLOCK_N

    # An empty split (start >= end) stores output 0 and LSE -inf, so the combine gives it weight 0.
    nonempty = l_i > 0
    l_safe = tl.where(nonempty, l_i, 1.0)
    lse = tl.where(nonempty, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # natural log
    tl.store(OutPartial + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_v[None, :],
             acc / l_safe[:, None], mask=mask_h[:, None] & mask_v[None, :])
    tl.store(LsePartial + b * stride_lb + heads * stride_lh + split, lse, mask=mask_h)


def _combine_kernel(
    OutPartial, LsePartial, Out, Lse,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    stride_outb, stride_outh, stride_outd,
    stride_lseb, stride_lseh,
    H, NUM_SPLITS,
    HEAD_DIM_V: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # One program per (batch row, head): out = sum_i exp(lse_i - lse) * out_i, lse = log sum_i exp(lse_i).
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_v = tl.arange(0, BLOCK_V)
    mask_s = offs_s < NUM_SPLITS
    mask_v = offs_v < HEAD_DIM_V
    lse = tl.load(LsePartial + b * stride_lb + h * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    empty = lse_max == float("-inf")  # length 0: output 0, LSE -inf (not nan)
    lse_max = tl.where(empty, 0.0, lse_max)
    w = tl.exp(lse - lse_max)  # [BLOCK_S]
    w_sum = tl.sum(w, 0)
    o = tl.load(OutPartial + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_v[None, :],
                mask=mask_s[:, None] & mask_v[None, :], other=0.0)  # [BLOCK_S, BLOCK_V]
    w_sum = tl.where(empty, 1.0, w_sum)
    out = tl.sum(o * w[:, None], 0) / w_sum
    tl.store(Out + b * stride_outb + h * stride_outh + offs_v * stride_outd, out.to(Out.dtype.element_ty), mask=mask_v)
    tl.store(Lse + b * stride_lseb + h * stride_lseh, tl.where(empty, float("-inf"), lse_max + tl.log(w_sum)))


DEFAULT_BLOCK_H = 16  # query heads a program takes: tl.dot's smallest tile; its [16, 512] fp32 accumulator fits 4 warps


@functools.cache
def _kernels():
    """The two kernels, jitted on first use."""
    if triton is None:
        raise RuntimeError("flash_mla_triton needs the `triton` package, which is not installed")
    return triton.jit(_split_kernel), triton.jit(_combine_kernel)


def flash_mla_triton(q, blocks, block_table, cache_seqlens, head_dim_v, softmax_scale, num_splits,
                     block_h=DEFAULT_BLOCK_H, block_n=None):
    """Split-KV decode over the paged latent cache with Triton: partial outputs and LSEs per split, then a combine."""
    _check_inputs(q, blocks, block_table, cache_seqlens, head_dim_v)
    split_kernel, combine_kernel = _kernels()
    if not (q.is_cuda or triton.knobs.runtime.interpret):
        raise RuntimeError(f"flash_mla_triton needs CUDA tensors (or TRITON_INTERPRET=1), got {q.device}")
    if q.dtype != blocks.dtype or q.dtype not in _TL_DTYPES:
        raise ValueError(f"q and blocks must share one of float16/bfloat16/float32, got {q.dtype} and {blocks.dtype}")
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if block_n is None:
        block_n = 32 if q.element_size() <= 2 else 16  # a latent tile of 32 KiB (+ its RoPE part)
    for name, n in (("block_h", block_h), ("block_n", block_n)):
        if n < 16 or n & (n - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {n}")
    B, H, D = q.shape
    page_size = blocks.shape[1]
    if page_size & (page_size - 1):
        raise ValueError(f"the block size of the paged cache must be a power of two, got {page_size}")
    # As in flash_decoding: the Triton 3.6 interpreter mishandles bf16 dots and fp32 -> bf16 casts, so there
    # bf16 runs its dots in fp32 and writes an fp32 output that torch rounds; compiled code uses bf16 as is.
    interpret_bf16 = bool(triton.knobs.runtime.interpret) and q.dtype == torch.bfloat16
    dot_dtype = tl.float32 if interpret_bf16 else getattr(tl, _TL_DTYPES[q.dtype])
    block_v = max(16, triton.next_power_of_2(head_dim_v))
    block_r = max(16, triton.next_power_of_2(D - head_dim_v))
    num_warps = 4 if block_h * block_v <= 16 * 512 else 8

    out_partial = torch.empty(B, H, num_splits, head_dim_v, device=q.device, dtype=torch.float32)
    lse_partial = torch.empty(B, H, num_splits, device=q.device, dtype=torch.float32)
    split_kernel[(B, triton.cdiv(H, block_h), num_splits)](
        q, blocks, block_table, cache_seqlens.to(q.device), out_partial, lse_partial,
        *q.stride(), *blocks.stride(), *block_table.stride(),
        *out_partial.stride()[:3], *lse_partial.stride()[:2],
        softmax_scale * math.log2(math.e), H, num_splits,
        HEAD_DIM_V=head_dim_v, ROPE_DIM=D - head_dim_v, PAGE_SIZE=page_size,
        DOT_DTYPE=dot_dtype, DOT_PRECISION="ieee" if dot_dtype == tl.float32 else None,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_R=block_r,
        num_warps=num_warps, num_stages=2,
    )
    out = torch.empty(B, H, head_dim_v, device=q.device, dtype=torch.float32 if interpret_bf16 else q.dtype)
    lse = torch.empty(B, H, device=q.device, dtype=torch.float32)
    combine_kernel[(B * H,)](
        out_partial, lse_partial, out, lse,
        *out_partial.stride()[:3], *lse_partial.stride()[:2], *out.stride(), *lse.stride(),
        H, num_splits,
        HEAD_DIM_V=head_dim_v, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_V=block_v,
        num_warps=4,
    )
    return out.to(q.dtype), lse


# ----------------------------------------------------------------------------- dispatch


@torch.library.custom_op("mm::flash_mla_decode", mutates_args=())
def _flash_mla_op(q: torch.Tensor, blocks: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
                  head_dim_v: int, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`flash_mla_triton` with the split count of `choose_num_splits`, as one operator for torch.compile and CUDA
    graphs (dynamo records one call; the graph captures its launches). Splits are chosen from the table's capacity,
    not cache_seqlens, which would sync the GPU."""
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    capacity = block_table.shape[1] * blocks.shape[1]
    num_splits = choose_num_splits(q.shape[0] * -(-q.shape[1] // DEFAULT_BLOCK_H), capacity, _num_sms(device_index))
    return flash_mla_triton(q, blocks, block_table, cache_seqlens, head_dim_v, softmax_scale, num_splits)


@_flash_mla_op.register_fake
def _(q, blocks, block_table, cache_seqlens, head_dim_v, softmax_scale):
    B, H, _ = q.shape
    return q.new_empty(B, H, head_dim_v), q.new_empty(B, H, dtype=torch.float32)


def flash_mla_decode(q, blocks, block_table, cache_seqlens, head_dim_v, softmax_scale, num_splits=None):
    """Decode attention of q [B, H, r + d] over one layer's paged latent cache; returns out [B, H, r], lse [B, H].

    On CUDA with triton, the Triton kernels (through the `mm::flash_mla_decode` operator unless `num_splits` is
    given); elsewhere (CPU, where a compiled decode step inlines it) `flash_mla_reference`.
    """
    _check_inputs(q, blocks, block_table, cache_seqlens, head_dim_v)
    if triton is None or not q.is_cuda or q.dtype not in _TL_DTYPES or q.dtype != blocks.dtype:
        return flash_mla_reference(q, blocks, block_table, cache_seqlens, head_dim_v, softmax_scale)
    if num_splits is None:
        return _flash_mla_op(q, blocks, block_table, cache_seqlens, head_dim_v, float(softmax_scale))
    return flash_mla_triton(q, blocks, block_table, cache_seqlens, head_dim_v, softmax_scale, num_splits)


def mla_decode_paged(q_nope, q_pe, kv_b_weight, blocks, block_table, cache_seqlens, softmax_scale, num_splits=None):
    """One MLA decode step in the absorbed form over a layer's paged latent cache; returns [B, H, v_head_dim].

    q_nope [B, H, qk_nope_head_dim] and q_pe [B, H, qk_rope_head_dim] (RoPE applied) are the decode token's query;
    kv_b_weight [H * (qk_nope_head_dim + v_head_dim), kv_lora_rank] is transformers' `kv_b_proj.weight`, per head
    W_UK (its first qk_nope_head_dim rows) then W_UV; the pages hold c_kv after `kv_a_layernorm` and the roped k_pe.
    Equal to expanding the latent into per-head keys [k_nope = W_UK c_kv, k_pe] and values W_UV c_kv:
    q_nope . (W_UK c) = (W_UK^T q_nope) . c, and sum_t p_t W_UV c_t = W_UV (sum_t p_t c_t).
    """
    B, H, nope = q_nope.shape
    r = kv_b_weight.shape[1]
    if kv_b_weight.dim() != 2 or kv_b_weight.shape[0] % H or kv_b_weight.shape[0] // H <= nope:
        raise ValueError(f"kv_b_weight must be [H * (qk_nope_head_dim + v_head_dim), kv_lora_rank] with H={H}, "
                         f"qk_nope_head_dim={nope}, got {tuple(kv_b_weight.shape)}")
    w = kv_b_weight.view(H, -1, r)  # [H, nope + v, r]
    q_latent = torch.einsum("bhn,hnr->bhr", q_nope, w[:, :nope])  # W_UK folded into the query
    out, _ = flash_mla_decode(torch.cat([q_latent, q_pe], dim=-1), blocks, block_table, cache_seqlens, r,
                              softmax_scale, num_splits)  # [B, H, r]
    return torch.einsum("bhr,hvr->bhv", out, w[:, nope:])  # W_UV folded into the output

"""W4A8 on CPU: 4-bit weights times int8 activations, as llama.cpp's Q4_0 x Q8_0 product.

The activations are quantized per block of 32 inputs (d = max|x| / 127, q = round(x / d)); the kernel
(`w4a8.cpp`, AVX512-VNNI integer dot products, 16 output rows in one register) is built from source on first use
with the project's other CPU kernels (`cpu_kernels`). Without the instructions or a
compiler, and for products of more than `MAX_ROWS` rows (prefill), `reference` computes them with the dequantized
weights in the activations' dtype (float32: the kernel's numbers up to summation order); where the kernel is loaded,
its `dequantize_t` writes those weights (transposed, [K, N]) in one pass and the product runs on oneDNN.

Measured here (2 threads, one row, groups of 32): [768 x 4096] 24 us against 57 us for the weight-only
`torch._weight_int4pack_mm_for_cpu`, [2048 x 2560] 31 vs 72 us, [5632 x 2048] 76 vs 155 us.
"""
from __future__ import annotations

import torch

from . import cpu_kernels

QK = 32  # inputs per activation block
MAX_ROWS = 4  # rows of x the kernel takes (w4a8.cpp's MAX_ROWS)


def kernel() -> bool:
    """Whether `torch.ops.mm_w4a8.linear` is loaded (`cpu_kernels.build()`: AVX512-VNNI and a C++ compiler)."""
    return cpu_kernels.build()


def pack(u: torch.Tensor) -> torch.Tensor:
    """Codes u [N, K] in [0, 15] -> the kernel's bytes [N/16, K/8, 64]: per tile of 16 rows and 8 inputs, byte
    4 l + j holds row l's code at input j (low nibble) and at input 4 + j (high nibble)."""
    N, K = u.shape
    ub = u.to(torch.uint8).reshape(N // 16, 16, K // 8, 2, 4).permute(0, 2, 1, 3, 4)  # [N/16, K/8, 16, 2, 4]
    return (ub[..., 0, :] | (ub[..., 1, :] << 4)).reshape(N // 16, K // 8, 64).contiguous()


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """`pack`'s inverse: codes u [N, K] (uint8)."""
    T, K8, _ = packed.shape
    p = packed.reshape(T, K8, 16, 1, 4)
    ub = torch.cat([p & 0x0F, p >> 4], dim=3)  # [N/16, K/8, 16, 2, 4]
    return ub.permute(0, 2, 1, 3, 4).reshape(T * 16, K8 * 8)


def pack_scales(scales: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
    """Scales and corrections [K/group, N] -> the kernel's sc [N/16, K/group, 32] (float16): per tile of 16 rows and
    group, the 16 scales, then the 16 corrections."""
    G, N = scales.shape
    tiles = lambda t: t.to(torch.float16).reshape(G, N // 16, 16).transpose(0, 1)  # noqa: E731  [N/16, G, 16]
    return torch.cat([tiles(scales), tiles(corr)], dim=-1).contiguous()


def unpack_scales(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_scales`'s inverse: (scales, corrections) [K/group, N]."""
    T, G, _ = sc.shape
    return tuple(h.transpose(0, 1).reshape(G, T * 16) for h in sc.split(16, dim=-1))


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the kernel quantizes it (int8 per block of 32 inputs, d = max|x| / 127), back in float32."""
    M, K = x.shape
    xb = x.float().reshape(M, K // QK, QK)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)  # as the kernel: 127 / amax (not 1 / amax * 127)
    q = torch.round(xb * inv)
    return (q * (amax / 127)).reshape(M, K)


def reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y [M, N] = quantize_activations(x) @ w^T in x's dtype (w: the dequantized weight [N, K])."""
    return quantize_activations(x).to(x.dtype) @ w.to(x.dtype).t()


def dequantize_t(packed: torch.Tensor, sc: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """w^T [K, N] in `dtype` (float32 or bfloat16) from the kernel's bytes, by the kernel's library (`kernel()`)."""
    return torch.ops.mm_w4a8.dequantize_t(packed, sc, group, dtype)


def linear(x: torch.Tensor, packed: torch.Tensor, sc: torch.Tensor, group: int, dequantized) -> torch.Tensor:
    """y [M, N] for x [M, K]: the kernel where it is loaded (`kernel()`, float32 out; more rows: `reference` on its
    `dequantize_t`), else `reference` on `dequantized()`."""
    if cpu_kernels.loaded and x.device.type == "cpu":
        if x.shape[0] <= MAX_ROWS:
            return torch.ops.mm_w4a8.linear(x.float().contiguous(), packed, sc, group)
        dtype = x.dtype if x.dtype == torch.bfloat16 else torch.float32
        return quantize_activations(x).to(dtype) @ dequantize_t(packed, sc, group, dtype)
    return reference(x, dequantized())

"""Quantized linear modules and the round-to-nearest (RTN) formulas they are built with.

    module        weight in memory                                  product on CPU (measured, batch 1)
    Int8Linear    int8 [N, K] + one scale per output channel [N]    1-4 rows: linear.cpp's exact rows (bf16 activations
                                                                     as 15-bit integers on a power-of-two grid, integer
                                                                     sums); more: the bf16 product (AMX), bf16
    Int4Linear    4-bit codes [N/16, K/8, 64] (decoders.w4a8.pack)   1-4 rows: decoders/w4a8.cpp's exact rows (the same
                  + scale and offset per group of g inputs             15-bit activations, integer sums per group);
                  [N/16, K/g, 16, 2] (per tile of 16 rows), bf16       more: its dequantized weight, bf16 activations
    W8A8Linear    int8 [N, K] + scale per output channel [N]         torch._int_mm on int8 activations quantized per
                                                                     token (dynamic scale max|x| / 127), fp32 rescale;
                                                                     1-4 rows: linear.cpp's int8 kernel (same sums)
    W4A8Linear    4-bit codes [N/16, K/8, 64] (decoders.w4a8.pack)   decoders/w4a8.cpp (AVX512-VNNI) on int8 activations
                  + scale and o - 8 s per group [K/g, N], fp16       quantized per block of 32 inputs (llama.cpp's Q8_0)

Formulas (per output row, per group of `group_size` inputs; 8 bits: one group of all K inputs):
    symmetric   s = max|w| / (2^(b-1) - 1),  q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),  w_hat = q * s
    asymmetric  s = (max w - min w) / (2^b - 1),  z = clamp(round(-min w / s), 0, 2^b - 1),
                q = clamp(round(w / s) + z, 0, 2^b - 1),  w_hat = (q - z) * s
The int4 kernel computes (u - 8) * s + o with codes u in [0, 15]; 3-bit codes run on it too (u = q + 8 symmetric,
u = q asymmetric with o = (8 - z) * s), so a 3-bit weight occupies 4 bits in memory. Scales are stored in bfloat16
(the kernels' dtype) and codes are rounded against the stored scale. Measured here (2 threads, [2048 x 2048], one
row): bf16 F.linear 162 us, _weight_int8pack_mm 67 us, _weight_int4pack_mm_for_cpu 66 us, W8A8 _int_mm 68 us;
with fp32 activations the two weight-only kernels take 1.5-3.3 ms, hence the bf16 activations.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels, linear, w4a8

BITS = (8, 4, 3)
GROUP_SIZES = (32, 64, 128, 256)
METHODS = ("rtn", "awq", "smoothquant")


def check_spec(bits: int, group_size: int | None, method: str = "rtn") -> None:
    """ValueError naming the first quantization option out of range."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
    if bits == 8 and group_size is not None:
        raise ValueError(f"8-bit weights have one scale per output channel; group_size must be None, got {group_size}")
    if bits < 8 and group_size not in GROUP_SIZES:
        raise ValueError(f"{bits}-bit weights need group_size in {GROUP_SIZES}, got {group_size!r}")
    if method == "smoothquant" and bits != 8:
        raise ValueError(f"SmoothQuant is W8A8 (bits=8), got bits={bits}")


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool,
                    scale_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """RTN of w [N, K]: integer codes q [N, K] (int16; signed when symmetric), scales s [N, G] in `scale_dtype` and
    integer zero points z [N, G] (None when symmetric), G = K / group_size (1 when group_size is None)."""
    N, K = w.shape
    g = K if group_size is None else group_size
    if K % g:
        raise ValueError(f"weight [{N}, {K}]: in_features {K} is not a multiple of group_size {g}")
    wg = w.detach().float().reshape(N, K // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        s = (wg.abs().amax(-1) / qmax).clamp(min=1e-8).to(scale_dtype).float()  # [N, G]
        q = torch.round(wg / s[..., None]).clamp(-qmax - 1, qmax)
        return q.reshape(N, K).to(torch.int16), s.to(scale_dtype), None
    qmax = 2 ** bits - 1
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # the range holds 0, so z is a valid code
    s = ((hi - lo) / qmax).clamp(min=1e-8).to(scale_dtype).float()
    z = torch.round(-lo / s).clamp(0, qmax)
    q = (torch.round(wg / s[..., None]) + z[..., None]).clamp(0, qmax)
    return q.reshape(N, K).to(torch.int16), s.to(scale_dtype), z.to(torch.int16)


def dequantize_weight(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """w_hat [N, K] (float32) = (q - z) * s, groups of K / G inputs."""
    N, K = q.shape
    G = s.shape[1]
    qg = q.float().reshape(N, G, K // G)
    if z is not None:
        qg = qg - z.float()[..., None]
    return (qg * s.float()[..., None]).reshape(N, K)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """The weight RTN would leave, w_hat [N, K] in w's dtype (what AWQ's searches measure)."""
    return dequantize_weight(*quantize_weight(w, bits, group_size, symmetric)).to(w.dtype)


class QuantLinear(nn.Module):
    """Base of the quantized linears: y = x @ w_hat^T + b, with w_hat held quantized. Subclasses set the buffers."""

    bits: int
    group_size: int | None

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight and its scales/offsets (the bias not counted)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class Int8Linear(QuantLinear):
    """Weight-only int8, one symmetric scale per output channel."""

    bits, group_size = 8, None

    def __init__(self, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(q.shape[1], q.shape[0], bias)
        self.register_buffer("qweight", q.to(torch.int8).contiguous())  # [N, K]
        self.register_buffer("scales", s.reshape(-1).to(torch.bfloat16).contiguous())  # [N]
        cpu_kernels.build()  # built (once) here rather than inside a compiled step's tracing

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = bf16(x) w^T s rounded to bf16: 1-4 rows on CPU on the kernel library's exact rows (`linear.cpp`'s
        w8_into: x as 15-bit integers on a power-of-two grid of its largest value, integer sums), more rows by the
        bf16 product where the CPU has AVX512-BF16, else torch's `_weight_int8pack_mm` (float32 sums); elsewhere,
        against the dequantized weight."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if cpu_kernels.loaded and x.device.type == "cpu" and x2.shape[0] <= linear.MAX_ROWS:
            y = torch.ops.mm_linear.w8_linear(x2.contiguous(), self.qweight, self.scales)
        elif cpu_kernels.bf16 and x.device.type == "cpu":  # int8 weights are exact in bf16: oneDNN's bf16 product
            # (AMX here: 512 rows of [2304 x 768] 1.7 ms against 12.7 for _weight_int8pack_mm), rounded to bf16 once
            # more, before the scales
            y = (F.linear(x2.to(torch.bfloat16), self.qweight.to(torch.bfloat16)) * self.scales).to(x.dtype)
        elif x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scales).to(x.dtype)
        else:  # elsewhere: dequantize on the fly (the CPU kernel is the measured one)
            y = F.linear(x2, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class Int4Linear(QuantLinear):
    """Weight-only 4- or 3-bit codes in groups of `group_size` inputs, packed as `w4a8.pack` (W4A8Linear's bytes)."""

    def __init__(self, u: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None):
        """Codes u [N, K] in [0, 15], scale and offset [N, K / group_size]: w = (u - 8) * scale + offset."""
        N, K = u.shape
        super().__init__(K, N, bias)
        if N % 16 or K % 8 or group_size % 8:
            raise ValueError(f"the int4 kernel needs out_features divisible by 16, in_features by 8 and groups of a "
                             f"multiple of 8 inputs, got [{N}, {K}] in groups of {group_size}")
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", w4a8.pack(u))  # [N/16, K/8, 64]
        so = torch.stack([scale.float(), offset.float()], dim=-1).to(torch.bfloat16)  # [N, K/g, 2]
        self.register_buffer("so", so.view(N // 16, 16, -1, 2).transpose(1, 2).contiguous())  # [N/16, K/g, 16, 2]
        w4a8.kernel()  # built (once) here rather than inside a compiled step's tracing

    @staticmethod
    def codes(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """RTN's (q, s, z) as the kernel's (u, scale, offset): symmetric u = q + 8, o = 0; else u = q, o = (8 - z) s."""
        if z is None:
            return q.int() + 8, s, torch.zeros_like(s, dtype=torch.float32)
        return q.int(), s, (8 - z.float()) * s.float()

    def scales_offsets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, o) [N, K/g] in float32 (stored in bf16, per tile of 16 rows and group: `so` [N/16, K/g, 16, 2])."""
        return self.so.transpose(1, 2).reshape(self.out_features, -1, 2).float().unbind(-1)

    def dequantize(self) -> torch.Tensor:
        """w_hat [N, K] = (u - 8) * s + o in float32 (two roundings, as the kernel library's `w4_dequantize_t`)."""
        N, K = self.out_features, self.in_features
        s, o = self.scales_offsets()  # [N, K/g] each
        u = w4a8.unpack(self.qweight).view(N, s.shape[1], -1).float()
        return ((u - 8) * s[..., None] + o[..., None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = bf16(x) w_hat^T rounded to bf16: 1-4 rows on CPU on the kernel library's weight-only rows (`w4a8.cpp`:
        bf16(x) as 15-bit integers q on a power-of-two grid, per group s sum u q + (o - 8 s) sum q in exact integer
        sums), more rows against its dequantized weight; elsewhere, or without the library, against `dequantize()`."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16).float()
        if cpu_kernels.loaded and x.device.type == "cpu" and x2.shape[0] <= w4a8.MAX_ROWS:
            y = torch.ops.mm_w4a8.w4_linear(x2.contiguous(), self.qweight, self.so, self.group_size)
        elif cpu_kernels.loaded and x.device.type == "cpu":
            y = x2 @ torch.ops.mm_w4a8.w4_dequantize_t(self.qweight, self.so, self.group_size)
        else:
            y = x2 @ self.dequantize().t()
        y = y.to(torch.bfloat16).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class W8A8Linear(QuantLinear):
    """SmoothQuant's W8A8: int8 weights per output channel, int8 activations per token, int32 accumulation."""

    bits, group_size = 8, None

    def __init__(self, q: torch.Tensor, s: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(q.shape[1], q.shape[0], bias)
        self.register_buffer("qweight", q.to(torch.int8).contiguous())  # [N, K]
        self.register_buffer("scales", s.reshape(-1).float().contiguous())  # [N]

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()  # [M, K]
        xs = x2.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127  # [M, 1] per-token scale
        xq = torch.round(x2 / xs).to(torch.int8)
        if x.device.type != "cpu":
            acc = xq.float() @ self.qweight.t().float()
        elif xq.shape[0] <= 4 and cpu_kernels.loaded:  # decode steps: the row kernel (the same int32 sums, 2x faster)
            acc = torch.ops.mm_linear.int8_rows(xq, self.qweight)
        else:
            acc = torch._int_mm(xq, self.qweight.t())
        y = (acc.float() * xs * self.scales).to(x.dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


class W4A8Linear(QuantLinear):
    """4- or 3-bit weights in groups of `group_size` times int8 activations (blocks of 32 inputs, one scale each):
    llama.cpp's Q4_0 x Q8_0 product on CPU (`decoders.w4a8`)."""

    def __init__(self, u: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int,
                 bias: torch.Tensor | None = None):
        """Codes u [N, K] in [0, 15], scale and offset [N, K / group_size]: w = (u - 8) * scale + offset."""
        N, K = u.shape
        super().__init__(K, N, bias)
        if N % 16 or group_size % w4a8.QK:
            raise ValueError(f"the W4A8 kernel needs out_features divisible by 16 and groups of a multiple of 32 "
                             f"inputs, got [{N}, {K}] in groups of {group_size}")
        self.bits, self.group_size = bits, group_size
        self.register_buffer("qweight", w4a8.pack(u))  # [N/16, K/8, 64]
        c = offset.float() - 8 * scale.float()  # o - 8 s
        self.register_buffer("sc", w4a8.pack_scales(scale.t().half(), c.t().half()))  # [N/16, K/g, 32]
        w4a8.kernel()  # built (once) here rather than inside a compiled step's tracing

    @classmethod
    def from_int4(cls, lin: Int4Linear) -> W4A8Linear:
        """The same weights (codes, scales, offsets of a 4-bit model, e.g. a GGUF Q4_0 file's) with int8 activations."""
        s, o = lin.scales_offsets()  # [N, K/g] each
        u = w4a8.unpack(lin.qweight)  # the same bytes
        return cls(u, s, o, lin.bits, lin.group_size, lin.bias)

    @property
    def scales(self) -> torch.Tensor:
        """s [K/g, N] (float16)."""
        return w4a8.unpack_scales(self.sc)[0]

    @property
    def corr(self) -> torch.Tensor:
        """c = o - 8 s [K/g, N] (float16)."""
        return w4a8.unpack_scales(self.sc)[1]

    def dequantize(self) -> torch.Tensor:
        """w_hat [N, K] = u * s + (o - 8 s)."""
        N, K, G = self.out_features, self.in_features, self.sc.shape[1]
        u = w4a8.unpack(self.qweight).view(N, G, K // G).float()
        s, c = w4a8.unpack_scales(self.sc)  # [K/g, N] each
        return (u * s.t().float()[..., None] + c.t().float()[..., None]).view(N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = w4a8.linear(x2, self.qweight, self.sc, self.group_size, self.dequantize).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)


def quantized_linear(linear: nn.Linear, bits: int, group_size: int | None, symmetric: bool = False,
                     activations: bool = False, weight: torch.Tensor | None = None) -> QuantLinear:
    """The quantized module for `linear` (RTN of `weight`, default its own): weight-only int8 (per channel,
    symmetric) or 4/3-bit group-wise; with int8 activations (W8A8, W4A8) when `activations`."""
    w = linear.weight if weight is None else weight
    if bits == 8:
        q, s, _ = quantize_weight(w, 8, None, symmetric=True, scale_dtype=torch.float32 if activations else torch.bfloat16)
        return (W8A8Linear if activations else Int8Linear)(q, s, linear.bias)
    u, s, o = Int4Linear.codes(*quantize_weight(w, bits, group_size, symmetric))
    return (W4A8Linear if activations else Int4Linear)(u, s, o, bits, group_size, linear.bias)


def linear_names(model: nn.Module, include: Callable[[str], bool] | None = None,
                 skip: Iterable[str] = ()) -> list[str]:
    """Names of the `nn.Linear` modules to quantize: all of them, or those `include(name)` accepts, minus names that
    end with an entry of `skip`."""
    skip = tuple(skip)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (include is None or include(n))
            and not (skip and n.endswith(skip))]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)



"""`Linear`: `nn.Linear` whose products of one to four rows on CPU (decode steps) run the project's kernel
(`linear.cpp`, built with the other CPU kernels by `cpu_kernels`): one weight row after the other against every row
of x, float32 by FMA, bf16 by vdpbf16ps (llama.cpp's bf16 product). Measured: bf16 from memory 45-50 GB/s against
24-26 for ATen's bf16 product (compiled decode steps 13-25% faster at 10M and 125M); float32 eager decode steps 2x
faster than on ATen's product (MKL at one row: 10M 2.5 -> 1.2 ms a token, 125M 27 -> 13 ms). Compiled float32 steps
keep inductor's C++ GEMM template on prepacked weights, 10-15% faster there than this kernel. Everything else, and
anything that wants a gradient, is `F.linear`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

MAX_ROWS = 4  # linear.cpp's MAX_ROWS
# float32 products of more rows (prefill) on oneDNN's AVX-512 kernels where MKL is slow: torch's F.linear calls MKL's
# sgemm, which on an AMD EPYC (Zen 5) runs at ~95 GMAC/s (its AVX2 rate) where oneDNN reaches 225-235 (512-row
# products of the 10M-125M shapes, plain weights, float32 accumulation: 2.3-2.7x). On an Intel Xeon MKL runs its
# AVX-512 code and measured as fast or 2-5% faster (154-170 against 158-166 GMAC/s on ViT-B and 125M shapes).
ONEDNN = torch.backends.mkldnn.is_available() and cpu_kernels.cpu_info("vendor_id") != "GenuineIntel"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on the row kernel or oneDNN where they apply."""
    K = x.shape[-1]
    if (x.device.type != "cpu" or x.dtype != weight.dtype or x.numel() == 0
            or torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.linear(x, weight, bias)
    rows = x.numel() // K
    if rows <= MAX_ROWS and (cpu_kernels.bf16 if x.dtype == torch.bfloat16 else
                             x.dtype == torch.float32 and cpu_kernels.loaded and not torch.compiler.is_compiling()):
        y = torch.ops.mm_linear.rows(x.reshape(-1, K).contiguous(), weight.contiguous(), bias)
    elif rows > MAX_ROWS and x.dtype == torch.float32 and ONEDNN and not torch.compiler.is_compiling():
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, K), weight, bias, "none", [None], "")
    else:
        return F.linear(x, weight, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) on `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

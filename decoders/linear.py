"""`Linear`: `nn.Linear` whose products of one to four bf16 rows on CPU (decode steps) run the project's
AVX512-BF16 kernel (`bf16_linear.cpp`, built with the other CPU kernels by `cpu_kernels`): vdpbf16ps, llama.cpp's
bf16 product, one weight row after the other against every row of x (measured from memory: 45-50 GB/s against
24-26 for ATen's bf16 product; compiled decode steps 13-25% faster at 10M and 125M). Everything else, and anything
that wants a gradient, is `F.linear`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_kernels

MAX_ROWS = 4  # bf16_linear.cpp's MAX_ROWS


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), on the bf16 kernel where it applies."""
    K = x.shape[-1]
    if (cpu_kernels.bf16 and x.device.type == "cpu" and x.dtype == weight.dtype == torch.bfloat16
            and 0 < x.numel() <= MAX_ROWS * K
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))):
        y = torch.ops.mm_bf16.linear(x.reshape(-1, K).contiguous(), weight.contiguous(), bias)
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) on `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

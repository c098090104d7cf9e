"""The bf16 one-row product kernel (decoders/bf16_linear.cpp, vdpbf16ps) against the product computed here in
float64 from the same bf16 numbers, and `Linear` using it only where it applies."""
import pytest
import torch
import torch.nn.functional as F

from decoders import cpu_kernels
from decoders.linear import Linear

cpu_kernels.build()
pytestmark = pytest.mark.skipif(not cpu_kernels.bf16, reason="the kernel needs AVX512-BF16 and a C++ compiler")


@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("K,N", [(256, 384), (688, 37), (40, 4)])  # K % 32 tails; N not a multiple of 4
def test_kernel_equals_the_product_in_float64(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    want = x.double() @ w.double().t() + b.double()
    got = torch.ops.mm_bf16.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # float32 sums rounded once to bf16: within one bf16 rounding (2^-8 relative) of the exact product
    assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-3 * want.abs().max()).all()
    assert torch.equal(torch.ops.mm_bf16.linear(x, w, None), torch.ops.mm_bf16.linear(x, w, torch.zeros(N)))


def test_linear_uses_the_kernel_only_where_it_applies():
    lin = Linear(64, 48).bfloat16()
    x = torch.randn(2, 2, 64).bfloat16()
    with torch.no_grad():
        got = lin(x)  # 4 rows: the kernel
        assert torch.equal(got, torch.ops.mm_bf16.linear(x.reshape(4, 64), lin.weight, lin.bias).reshape(2, 2, 48))
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=2e-2, atol=2e-2)
        five = torch.randn(5, 64).bfloat16()  # more rows: F.linear
        assert torch.equal(lin(five), F.linear(five, lin.weight, lin.bias))
        assert torch.equal(lin.float()(x.float()), F.linear(x.float(), lin.weight, lin.bias))  # float32: F.linear
    lin = Linear(64, 48).bfloat16()
    y = lin(x)  # a gradient wanted: F.linear
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0

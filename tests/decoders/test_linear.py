"""The few-row product kernel (decoders/linear.cpp: float32 by FMA, bf16 by vdpbf16ps, int8 by vpdpbusd) against the
product computed here in float64 (int8: in int64) from the same numbers, and `Linear` and `W8A8Linear` using it only
where it applies."""
import pytest
import torch
import torch.nn.functional as F

from decoders import cpu_kernels
from decoders.linear import Linear

cpu_kernels.build()
needs_bf16 = pytest.mark.skipif(not cpu_kernels.bf16, reason="bf16 rows need AVX512-BF16 and a C++ compiler")
needs_kernels = pytest.mark.skipif(not cpu_kernels.loaded, reason="the kernels need AVX-512 and a C++ compiler")


@needs_bf16
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("K,N", [(256, 384), (688, 37), (40, 4)])  # K % 32 tails; N not a multiple of 4
def test_bf16_kernel_equals_the_product_in_float64(M, K, N):
    g = torch.Generator().manual_seed(M * K + N)
    x = torch.randn(M, K, generator=g).bfloat16()
    w = (torch.randn(N, K, generator=g) * 0.05).bfloat16()
    b = torch.randn(N, generator=g).bfloat16()
    want = x.double() @ w.double().t() + b.double()
    got = torch.ops.mm_linear.rows(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    # float32 sums rounded once to bf16: within one bf16 rounding (2^-8 relative) of the exact product
    assert ((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-3 * want.abs().max()).all()
    assert torch.equal(torch.ops.mm_linear.rows(x, w, None), torch.ops.mm_linear.rows(x, w, torch.zeros(N)))


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("K,N", [(256, 384), (688, 37), (40, 4), (7, 3)])  # K % 64 and K % 16 tails
def test_float32_kernel_equals_the_product_in_float64(M, K, N):
    g = torch.Generator().manual_seed(M * K + N + 1)
    x, w, b = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * 0.05, torch.randn(N, generator=g)
    want = x.double() @ w.double().t() + b.double()
    got = torch.ops.mm_linear.rows(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    # float32 sums of K products: within K float32 roundings of the exact product's magnitude
    assert ((got.double() - want).abs() <= K * 2 ** -23 * ((x.double().abs() @ w.double().abs().t()) + b.abs())).all()
    assert not torch.equal(got, got.new_zeros(M, N))


@needs_bf16
def test_linear_uses_the_kernel_only_where_it_applies():
    lin = Linear(64, 48).bfloat16()
    x = torch.randn(2, 2, 64).bfloat16()
    with torch.no_grad():
        got = lin(x)  # 4 rows: the kernel
        assert torch.equal(got, torch.ops.mm_linear.rows(x.reshape(4, 64), lin.weight, lin.bias).reshape(2, 2, 48))
        torch.testing.assert_close(got, F.linear(x, lin.weight, lin.bias), rtol=2e-2, atol=2e-2)
        five = torch.randn(5, 64).bfloat16()  # more rows: F.linear
        assert torch.equal(lin(five), F.linear(five, lin.weight, lin.bias))
        x32 = x.float()  # float32: the kernel too, within float32 rounding of F.linear
        assert torch.equal(lin.float()(x32), torch.ops.mm_linear.rows(x32.reshape(4, 64), lin.weight, lin.bias).view(2, 2, 48))
        torch.testing.assert_close(lin(x32), F.linear(x32, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
        five32 = five.float()  # more rows in float32: oneDNN where MKL is slow (decoders.linear.ONEDNN), else MKL
        torch.testing.assert_close(lin(five32), F.linear(five32, lin.weight, lin.bias), rtol=1e-5, atol=1e-6)
        lin64, x64 = lin.double(), x.double()  # other dtypes: F.linear
        assert torch.equal(lin64(x64), F.linear(x64, lin64.weight, lin64.bias))
    lin = Linear(64, 48).bfloat16()
    y = lin(x)  # a gradient wanted: F.linear
    y.float().sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("K,N", [(768, 1280), (1000, 37), (100, 37), (64, 4), (5, 3)])  # K % 256, K % 64 tails; N % 4
def test_int8_kernel_equals_int_mm_exactly(M, K, N):
    g = torch.Generator().manual_seed(M * K + N + 2)
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    x[0, 0], w[0, 0] = -128, -128  # the extremes: w + 128 = 0 and the largest product
    got = torch.ops.mm_linear.int8_rows(x, w)
    assert got.dtype == torch.int32
    assert torch.equal(got, (x.long() @ w.long().t()).int())  # the exact integer sums, as torch._int_mm's


@needs_kernels
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("K,N", [(768, 1280), (1000, 37), (100, 37), (5, 3)])  # K % 64, K % 16 tails; N % 4
def test_weight_only_int8_kernel_equals_the_float64_product(M, K, N):
    g = torch.Generator().manual_seed(M * K + N + 3)
    x = torch.randn(M, K, generator=g)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    got = torch.ops.mm_linear.w8_rows(x, w)
    want = x.double() @ w.double().t()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-5 * want.abs().max().item())


@needs_kernels
def test_w8a8_decode_rows_run_the_int8_kernel():
    from decoders.qlinear import W8A8Linear

    g = torch.Generator().manual_seed(3)
    lin = W8A8Linear(torch.randint(-127, 128, (48, 64), generator=g), torch.rand(48, generator=g) / 100)
    calls = []
    real = torch.ops.mm_linear.int8_rows
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.mm_linear, "int8_rows", lambda *a: calls.append(1) or real(*a))
        for rows in (1, 4, 5):  # 5 rows: torch._int_mm
            x = torch.randn(rows, 64, generator=g)
            xs = x.abs().amax(-1, keepdim=True) / 127
            want = (x / xs).round().long() @ lin.qweight.long().t() * xs * lin.scales
            torch.testing.assert_close(lin(x), want.float(), rtol=1e-5, atol=1e-5)
    assert len(calls) == 2

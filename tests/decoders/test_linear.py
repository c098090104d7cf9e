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
@pytest.mark.parametrize("K,N", [(256, 384), (256, 1000), (688, 37), (40, 4)])
# K % 32 tails; N not a multiple of 4, each thread's rows not a multiple of 16 (blocks of four rows 4 apart)
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
@pytest.mark.parametrize("K,N", [(256, 384), (256, 1000), (688, 37), (40, 4), (7, 3)])  # K % 64, K % 16 tails
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
@pytest.mark.parametrize("K,N", [(768, 1280), (256, 1000), (1000, 37), (100, 37), (64, 4), (5, 3)])
# K % 256, K % 64 tails; N % 4, and each thread's rows % 16 (the kernels' blocks of four rows 4 apart)
def test_int8_kernel_equals_int_mm_exactly(M, K, N):
    g = torch.Generator().manual_seed(M * K + N + 2)
    x = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    x[0, 0], w[0, 0] = -128, -128  # the extremes: w + 128 = 0 and the largest product
    got = torch.ops.mm_linear.int8_rows(x, w)
    assert got.dtype == torch.int32
    assert torch.equal(got, (x.long() @ w.long().t()).int())  # the exact integer sums, as torch._int_mm's


def grid(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """linear.cpp's split_rows as documented: each row of bf16(x) as 15-bit integers q [M, K] on the grid a [M, 1] =
    2^(e - 13), e the exponent of its largest |x|, ties to even."""
    xb = x.bfloat16().float()
    amax = xb.abs().amax(-1, keepdim=True)  # [M, 1]
    e = torch.frexp(amax).exponent - 1  # amax = m 2^e, 1 <= m < 2
    a = torch.where(amax > 0, torch.ldexp(torch.ones_like(amax), e - 13), torch.ones_like(amax))
    q = torch.round(xb / a)  # round half to even, as nearbyint
    assert q.abs().max() < 2 ** 14
    return q, a


def w8_formula(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The weight-only int8 product as documented: exact integer sums of q w; y = bf16(float(sum q w) a s)."""
    q, a = grid(x)
    acc = q.long() @ w.long().t()  # [M, N] exact
    return (acc.float() * a * s.float()).bfloat16()


@needs_kernels
@pytest.mark.parametrize("M", [1, 2, 3, 4])
@pytest.mark.parametrize("K,N", [(768, 1280), (256, 1000), (1000, 37), (100, 37), (64, 4), (5, 3)])
# K % 256, K % 32 tails; N % 4, and each thread's rows % 16
def test_weight_only_int8_kernel_is_its_formula_bitwise(M, K, N):
    g = torch.Generator().manual_seed(M * K + N + 3)
    x = torch.randn(M, K, generator=g) * torch.logspace(-6, 2, K)[torch.randperm(K, generator=g)]  # 8 decades
    x[-1, :3] = torch.tensor([0.0, -1e-30, 3e4])[: min(3, K)]
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = (torch.rand(N, generator=g) / 50 + 1e-4).bfloat16()
    got = torch.ops.mm_linear.w8_linear(x, w, s)
    assert got.dtype == torch.float32 and torch.equal(got, w8_formula(x, w, s).float())
    assert torch.equal(torch.ops.mm_linear.w8_linear(x.bfloat16(), w, s), w8_formula(x, w, s))
    # against bf16(x) w^T s in float64 (torch._weight_int8pack_mm's product): its bf16 rounding, plus the grid's
    # error of at most 2^-14 max|x| per input
    xb = x.bfloat16().double()
    exact = xb @ w.double().t() * s.double()
    grid_error = 2.0 ** -14 * xb.abs().amax(-1, keepdim=True) * (w.double().abs().sum(-1) * s.double())
    assert ((got.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + grid_error * 1.001).all()


@needs_kernels
def test_weight_only_int8_kernel_keeps_long_rows_exact_and_passes_nan_on():
    K = 40_000  # the extremes over a long row: every int32 lane of the sums stays in range
    x = torch.full((2, K), 3.0)
    x[1, 5] = 3.5
    w = torch.full((3, K), -128, dtype=torch.int8)
    w[1] = 127
    s = torch.tensor([1e-3, 2e-3, 1.0]).bfloat16()
    got = torch.ops.mm_linear.w8_linear(x, w, s)
    assert torch.equal(got, w8_formula(x, w, s).float())
    torch.testing.assert_close(got, (x.double() @ w.double().t() * s.double()).float(), rtol=2 ** -8, atol=0)
    x[0, 7] = float("nan")
    x[1, 9] = float("inf")
    assert torch.ops.mm_linear.w8_linear(x, w, s).isnan().all()


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


@needs_kernels
@pytest.mark.parametrize("M,group", [(1, 32), (3, 128), (4, 8)])
def test_weight_only_int4_kernel_is_its_integer_formula(M, group):
    """w4a8.cpp's weight-only rows: y = a sum_g (s sum_k u q + (o - 8 s) sum_k q) with q, a from the grid above and
    the sums over k exact, against the same in float64 (the kernel's float32 steps only round)."""
    from decoders.qlinear import Int4Linear

    g = torch.Generator().manual_seed(M + group)
    N, K = 48, 256
    u = torch.randint(0, 16, (N, K), generator=g)
    scale, offset = torch.rand(N, K // group, generator=g) / 20, torch.randn(N, K // group, generator=g) / 20
    lin = Int4Linear(u, scale, offset, 4, group)
    x = torch.randn(M, K, generator=g) * torch.logspace(-4, 1, K)[torch.randperm(K, generator=g)]
    got = torch.ops.mm_w4a8.w4_linear(x, lin.qweight, lin.so, group)
    q, a = grid(x)
    s, o = (t.double() for t in lin.scales_offsets())  # [N, G], as stored (bf16)
    dots = (u.view(N, 1, -1, group).double() * q.view(1, M, -1, group).double()).sum(-1)  # [N, M, G] exact
    Q = q.view(M, -1, group).double().sum(-1)  # [M, G]
    want = a.double() * ((s[:, None] * dots).sum(-1).t() + Q @ (o - 8 * s).t())  # [M, N]
    scale_of_terms = a.double() * ((s[:, None] * dots).abs().sum(-1).t() + Q.abs() @ (o - 8 * s).abs().t())
    assert ((got.double() - want).abs() <= 1e-6 * scale_of_terms + 1e-30).all()

"""W4A8 (4-bit weights x int8 activations, llama.cpp's Q4_0 x Q8_0 product): the CPU kernel equals the documented
formula computed here block by block in integers, the packing round-trips, a W4A8 Llama decodes the same tokens
compiled and eager, and an Int4Linear (as a GGUF Q4_0 file loads) converts without changing its weights."""
import pytest
import torch
from torch import nn

from decoders import cpu_kernels, w4a8
from decoders.quantize import Int4Linear, W4A8Linear, memory_report, quantize_model, quantized_linear
from tests.decoders.test_quantize import tiny_llama


def formula(x, u, s, o, g):
    """y [M, N] by the formula of decoders/w4a8.cpp: activations int8 per block of 32 (d = max|x| / 127), integer dot
    products per block, scaled by d and the group's s, plus (o - 8 s) times the group's sum of x as quantized."""
    M, K = x.shape
    N = u.shape[0]
    y = torch.zeros(M, N, dtype=torch.float64)
    for b in range(K // 32):
        xb = x[:, b * 32:(b + 1) * 32]
        amax = xb.abs().amax(-1)
        q = torch.round(xb * (torch.full_like(amax, 127) / amax)[:, None]).long()  # float32, as the kernel computes it
        d = (amax / 127).double()
        dot = q @ u[:, b * 32:(b + 1) * 32].long().t()  # [M, N] exact integers
        sg, og = s[:, b * 32 // g].double(), o[:, b * 32 // g].double()
        y += d[:, None] * dot.double() * sg + (og - 8 * sg) * (d * q.sum(-1).double())[:, None]
    return y


def test_the_kernel_is_built_where_the_cpu_has_vnni():
    assert w4a8.kernel() == (cpu_kernels.CPU_FLAGS <= cpu_kernels.cpu_flags()) == cpu_kernels.loaded


def test_packing_round_trips():
    u = torch.randint(0, 16, (48, 256), generator=torch.Generator().manual_seed(0))
    packed = w4a8.pack(u)
    assert packed.shape == (3, 32, 64) and packed.dtype == torch.uint8
    assert torch.equal(w4a8.unpack(packed).long(), u)
    s, c = torch.randn(4, 48).half(), torch.randn(4, 48).half()  # 4 groups, 48 rows
    sc = w4a8.pack_scales(s, c)
    assert sc.shape == (3, 4, 32) and torch.equal(sc[1, 2, :16], s[2, 16:32]) and torch.equal(sc[1, 2, 16:], c[2, 16:32])
    assert all(torch.equal(a, b) for a, b in zip(w4a8.unpack_scales(sc), (s, c)))


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("g,symmetric", [(32, True), (64, False), (128, False)])
def test_products_equal_the_formula(rows, g, symmetric):
    gen = torch.Generator().manual_seed(rows * g)
    N, K = 48, 256
    u = torch.randint(0, 16, (N, K), generator=gen)
    s = (torch.rand(N, K // g, generator=gen) * 0.02 + 0.01).half().float()
    o = torch.zeros(N, K // g) if symmetric else (torch.randn(N, K // g, generator=gen) * 0.05).half().float() + 8 * s
    lin = W4A8Linear(u, s, o, 4, g, bias=None)
    x = torch.randn(rows, K, generator=gen) * 3
    want = formula(x, u, s, o, g)
    got = lin(x).double()  # the kernel for up to 4 rows, `w4a8.reference` for more
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want16 = formula(x.bfloat16().float(), u, s, o, g)  # bf16 in, bf16 out (more than 4 rows: a bf16 matmul)
    torch.testing.assert_close(lin(x.bfloat16()).double(), want16, rtol=2e-2, atol=1e-2 * want16.abs().max().item())


@pytest.mark.skipif(not w4a8.kernel(), reason="the kernel needs AVX512-VNNI and a C++ compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernels_prefill_weights_equal_dequantize(dtype):
    gen = torch.Generator().manual_seed(7)
    u = torch.randint(0, 16, (48, 256), generator=gen)
    s = (torch.rand(48, 4, generator=gen) * 0.02).half().float()
    o = (torch.randn(48, 4, generator=gen) * 0.05).half().float()
    lin = W4A8Linear(u, s, o, 4, 64)
    wt = w4a8.dequantize_t(lin.qweight, lin.sc, 64, dtype)
    assert wt.dtype == dtype and torch.equal(wt, lin.dequantize().t().to(dtype))  # bf16: rounded to nearest even


def test_w4a8_llama_compiled_equals_eager_and_stays_near_the_weight_only_model():
    torch._dynamo.reset()
    w4 = quantize_model(tiny_llama(dtype=torch.bfloat16), "rtn", 4, 32)
    a8 = quantize_model(tiny_llama(dtype=torch.bfloat16), "rtn", 4, 32, activations=True)
    linears = [m for m in a8.modules() if isinstance(m, W4A8Linear)]
    assert len(linears) == 9  # 2 x (qkv, o, gate_up, down) + head
    for a, b in zip(linears, [m for m in w4.modules() if isinstance(m, Int4Linear)]):
        torch.testing.assert_close(a.dequantize(), b.dequantize(), rtol=0, atol=1e-3)  # offsets fp16 vs bf16
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    eager = a8.generate(ids, max_new_tokens=8, compile=False)
    compiled = a8.generate(ids, max_new_tokens=8, compile=True)
    torch._dynamo.reset()
    assert torch.equal(eager, compiled)
    with torch.no_grad():
        la, lw = a8(ids).float(), w4(ids).float()
    assert (la - lw).abs().max() < 0.05 * lw.abs().max()  # int8 activations: a small change of the logits


@pytest.mark.parametrize("rows", [32, 128])  # 128: the int4 kernel's bytes read directly; 32: read back
def test_from_int4_keeps_the_weights(rows):
    gen = torch.Generator().manual_seed(5)
    u = torch.randint(0, 16, (rows, 128), generator=gen)
    d = (torch.rand(rows, 4, generator=gen) * 0.01).bfloat16().float()
    d[0, 0] = 0  # a Q4_0 block of zeros: any code, w = the offset
    lin4 = Int4Linear(u, d, torch.zeros_like(d), 4, 32, bias=torch.randn(rows))
    lin = W4A8Linear.from_int4(lin4)
    assert torch.equal(lin.dequantize(), lin4.dequantize()) and torch.equal(lin.bias, lin4.bias)
    assert torch.equal(w4a8.unpack(lin.qweight)[1:].long(), u[1:])


def test_resident_bytes_and_bad_shapes():
    model = quantize_model(tiny_llama(), "rtn", 4, 32, activations=True, skip=("lm_head",))
    r = memory_report(model)
    assert r["measured_bytes"] == r["formula_bytes"] == r["quantized_params"] // 2 + 2 * 2 * r["quantized_params"] // 32
    with pytest.raises(ValueError, match=r"W4A8 kernel needs out_features divisible by 16 .* \[40, 64\]"):
        quantized_linear(nn.Linear(64, 40), 4, 32, activations=True)

"""Round-to-nearest quantization: codes and scales equal the documented formulas (computed here group by group), the
quantized linears' kernels equal a matmul with their dequantized weight, a quantized Llama stays close to the float
one (also inside the compiled decode step), and resident bytes equal the formula."""
import pytest
import torch
from torch import nn

from decoders import LlamaConfig, LlamaForCausalLM, cpu_kernels
from decoders.quantize import (Int4Linear, Int8Linear, QuantLinear, W8A8Linear, dequantize_weight, memory_report,
                               quantize_model, quantize_weight, quantized_linear)

CFG = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=128)


def tiny_llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**CFG))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def bf16(t):
    return t.to(torch.bfloat16).float()


def reference_rtn(w, bits, g, symmetric):
    """The formulas of decoders/quantize.py's docstring, one group at a time: w_hat [N, K]."""
    N, K = w.shape
    out = torch.empty(N, K)
    for n in range(N):
        for j in range(0, K, g):
            x = w[n, j:j + g].double()
            if symmetric:
                s = bf16(x.abs().max() / (2 ** (bits - 1) - 1)).double()
                q = torch.clamp(torch.round(x / s), -2 ** (bits - 1), 2 ** (bits - 1) - 1)
                out[n, j:j + g] = (q * s).float()
            else:
                lo, hi = min(x.min(), 0), max(x.max(), 0)
                s = bf16((hi - lo) / (2 ** bits - 1)).double()
                z = torch.clamp(torch.round(-lo / s), 0, 2 ** bits - 1)
                q = torch.clamp(torch.round(x / s) + z, 0, 2 ** bits - 1)
                out[n, j:j + g] = ((q - z) * s).float()
    return out


@pytest.mark.parametrize("bits,g,symmetric", [(8, None, True), (4, 32, True), (4, 64, False), (3, 128, False),
                                               (3, 32, True), (4, 128, False)])
def test_dequantized_weights_equal_the_formulas(bits, g, symmetric):
    w = torch.randn(16, 256) * torch.linspace(0.1, 3, 256)  # columns of different ranges
    q, s, z = quantize_weight(w, bits, g, symmetric)
    expected = reference_rtn(w, bits, g or 256, symmetric)
    assert torch.allclose(dequantize_weight(q, s, z), expected, rtol=0, atol=1e-6)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    step = s.float().repeat_interleave(256 // s.shape[1], dim=1)
    # symmetric: within half a step; asymmetric: the zero point's rounding moves the range by up to half a step more
    assert ((dequantize_weight(q, s, z) - w).abs() <= step * (0.5 if symmetric else 1.0) + 1e-6).all()


@pytest.mark.parametrize("bits,g,symmetric", [(4, 32, False), (4, 128, True), (3, 64, False), (3, 32, True)])
def test_int4_kernel_weight_and_product(bits, g, symmetric):
    torch.manual_seed(1)
    lin = nn.Linear(256, 48, bias=True)
    q, s, z = quantize_weight(lin.weight, bits, g, symmetric)
    ql = quantized_linear(lin, bits, g, symmetric)
    assert isinstance(ql, Int4Linear)
    # the kernel's weight: (u - 8) * s + o, with the offset o = (8 - z) * s rounded to bfloat16
    G = 256 // g
    u = (q.float() + 8) if symmetric else q.float()
    o = torch.zeros(48, G) if symmetric else bf16((8 - z.float()) * s.float())
    expected = ((u.view(48, G, g) - 8) * s.float()[..., None] + o[..., None]).view(48, 256)
    assert torch.allclose(ql.dequantize(), expected, rtol=0, atol=1e-6)
    # ... within 2% of a step of the formula (q - z) * s
    assert (ql.dequantize() - dequantize_weight(q, s, z)).abs().max() <= 0.02 * s.float().max()
    x = torch.randn(3, 5, 256)
    ref = bf16(x) @ expected.t() + lin.bias
    assert torch.allclose(ql(x), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@pytest.mark.parametrize("rows", [1, 4, 15])
def test_int4_rows_kernel_and_its_dequantized_weight_equal_the_pytorch_form(rows, monkeypatch):
    """Int4Linear's CPU paths (w4a8.cpp: weight-only rows for 1-4 rows, its dequantized weight for more) against the
    PyTorch form (bf16(x) @ dequantize().t(), rounded to bf16) that runs without the kernel library."""
    if not cpu_kernels.build():
        pytest.skip("the kernel library needs AVX512-VNNI and a C++ compiler")
    torch.manual_seed(3)
    ql = quantized_linear(nn.Linear(512, 96, bias=False), 4, 64)
    assert isinstance(ql, Int4Linear) and ql.qweight.shape == (6, 64, 64)
    assert torch.equal(torch.ops.mm_w4a8.w4_dequantize_t(ql.qweight, ql.so, 64).t(), ql.dequantize())
    x = torch.randn(rows, 512) * torch.linspace(0.1, 3, 512)
    got = ql(x)
    monkeypatch.setattr(cpu_kernels, "loaded", False)
    want = ql(x)
    exact = bf16(x).double() @ ql.dequantize().double().t()
    ulp = want.abs().max().item() * 2 ** -7
    assert (got - want).abs().max() <= ulp and (got - exact).abs().max() <= ulp  # one bf16 rounding apart at most


def test_int8_and_w8a8_products_equal_their_formulas():
    torch.manual_seed(2)
    lin = nn.Linear(64, 24, bias=False)
    x = torch.randn(2, 3, 64) * torch.linspace(0.1, 4, 64)
    q, s, _ = quantize_weight(lin.weight, 8, None, True)
    i8 = quantized_linear(lin, 8, None)
    assert isinstance(i8, Int8Linear) and i8.qweight.dtype == torch.int8
    ref = bf16(x) @ (q.float() * s.float()).t()
    assert torch.allclose(i8(x), ref, rtol=1e-2, atol=1e-2 * ref.abs().max().item())
    a8 = quantized_linear(lin, 8, None, activations=True)
    assert isinstance(a8, W8A8Linear)
    xs = x.abs().amax(-1, keepdim=True) / 127  # per-token scale
    xq = torch.round(x / xs)
    ws = lin.weight.abs().amax(1) / 127
    wq = torch.round(lin.weight / ws[:, None])
    ref8 = (xq @ wq.t()) * xs * ws  # integer products are exact in float32 at these sizes
    assert torch.allclose(a8(x), ref8, rtol=1e-5, atol=1e-5)
    assert (a8(x) - x @ lin.weight.t()).abs().max() < 0.05 * (x @ lin.weight.t()).abs().max()


@pytest.mark.parametrize("bits,g,tol", [(8, None, 0.04), (4, 32, 0.4), (3, 64, 0.8)])
def test_quantized_llama_equals_its_dequantized_weights(bits, g, tol):
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids)
        quantize_model(model, "rtn", bits, g)
        got = model(ids)
        names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
        assert len(names) == 2 * 4 + 1 and "layers.0.self_attn.qkv_proj" in names  # fused q/k/v and gate/up, lm_head
        assert not any(isinstance(m, nn.Linear) for m in model.modules())
        float_twin = tiny_llama()  # the float model holding the dequantized weights: the kernels' only other error
        for n in names:  # is the bf16 rounding of activations
            float_twin.get_submodule(n).weight.copy_(model.get_submodule(n).dequantize())
        twin = float_twin(ids)
    assert ((got - twin).norm() / twin.norm()).item() < 0.03
    assert ((got - ref).norm() / ref.norm()).item() < tol  # random weights: int4 error compounds over the layers


def test_resident_bytes_equal_the_formula():
    model = tiny_llama()
    quantize_model(model, "rtn", 4, 32, skip=("lm_head",))
    H, I, D = 64, 128, 64
    params = H * (D + 2 * 32) + D * H + H * 2 * I + I * H  # qkv, o, gate_up, down per layer
    r = memory_report(model)
    assert r["quantized_params"] == 2 * params
    scales_and_offsets = 2 * 2 * (2 * params // 32)  # a bf16 scale and a bf16 offset per group of 32
    assert r["measured_bytes"] == r["formula_bytes"] == 2 * params // 2 + scales_and_offsets
    m8 = quantize_model(tiny_llama(), "rtn", 8, None)
    n8 = 2 * params + 96 * 64
    outs = 2 * ((D + 2 * 32) + H + 2 * I + H) + 96  # one bf16 scale per output channel
    assert memory_report(m8)["measured_bytes"] == n8 + 2 * outs


def test_compiled_decode_step_runs_the_kernels():
    """int4 (layer 0), int8 (layer 1) and W8A8 (lm_head) inside one compiled step equal the eager step."""
    torch._dynamo.reset()
    model = tiny_llama(dtype=torch.bfloat16)
    quantize_model(model, "rtn", 4, 32, include=lambda n: n.startswith("layers.0."))
    quantize_model(model, "rtn", 8, None, include=lambda n: n.startswith("layers.1."))
    model.lm_head = quantized_linear(model.lm_head, 8, None, activations=True)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(3))
    eager = model.generate(ids, max_new_tokens=6, compile=False)
    compiled = model.generate(ids, max_new_tokens=6, compile=True)
    torch._dynamo.reset()
    assert torch.equal(eager, compiled)


def test_rtn_w8a8_model():
    model = quantize_model(tiny_llama(), "rtn", 8, None, activations=True)
    linears = [m for m in model.modules() if isinstance(m, (nn.Linear, QuantLinear))]
    assert len(linears) == 9 and all(isinstance(m, W8A8Linear) for m in linears)  # 2 x (qkv, o, gate_up, down) + head
    with pytest.raises(ValueError, match="activations=True is RTN's W8A8, or W4A8/W3A8 of RTN or AWQ weights"):
        quantize_model(tiny_llama(), "smoothquant", 8, None, activations=True, calib=torch.zeros(1, 4, dtype=torch.long))


def test_w8a8_decode_steps_keep_onednn(monkeypatch):
    """A bf16 batch-1 step switches oneDNN off for ATen's one-row bf16 product, except where a W8A8 linear runs:
    its torch._int_mm is oneDNN's (without it ATen's reference loop is ~250x slower). Recorded in each call of the
    Python step (the whole step in C++, `decode_block.stepper`, runs no module)."""
    from decoders import decode_block

    monkeypatch.setattr(decode_block, "stepper", lambda *a: None)
    seen = []
    for cls in (Int8Linear, W8A8Linear):
        forward = cls.forward
        monkeypatch.setattr(cls, "forward", lambda self, x, f=forward: seen.append(
            (type(self), torch._C._get_mkldnn_enabled())) or f(self, x))
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(4))
    for activations in (False, True):
        model = tiny_llama(dtype=torch.bfloat16)
        model.lm_head = quantized_linear(model.lm_head, 8, None, activations=activations)
        seen.clear()
        model.generate(ids, max_new_tokens=4, compile=False)
        steps = seen[1:]  # seen[0]: the prefill, which keeps oneDNN for its several rows
        assert len(steps) == 3 and all(on == activations for _, on in steps), (activations, seen)


def test_w8a8_one_row_steps_keep_plain_weights():
    """Prepacking turns W8A8's int8 products into oneDNN's quantized linear, which is slower for one row: a batch-1
    step of a model holding W8A8 linears keeps its weights plain; other small models and batches prepack."""
    from decoders.compile import prepack_weights

    model = tiny_llama(dtype=torch.bfloat16)
    assert prepack_weights(model, 1)  # a few kB of bf16 weights: in the last-level cache
    model.lm_head = quantized_linear(model.lm_head, 8, None, activations=True)
    assert not prepack_weights(model, 1) and prepack_weights(model, 2)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="bits must be one of"):
        quantize_model(tiny_llama(), "rtn", 5, 32)
    with pytest.raises(ValueError, match="group_size in"):
        quantize_model(tiny_llama(), "rtn", 4, 100)
    with pytest.raises(ValueError, match="group_size must be None"):
        quantize_model(tiny_llama(), "rtn", 8, 128)
    with pytest.raises(ValueError, match="needs calibration"):
        quantize_model(tiny_llama(), "awq", 4, 32)
    with pytest.raises(ValueError, match="divisible by 16"):
        quantized_linear(nn.Linear(64, 40), 4, 32)
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize_weight(torch.randn(16, 48), 4, 32, False)
    with pytest.raises(ValueError, match="layers.0.self_attn.qkv_proj: .* in_features 64 is not a multiple of group_size 128"):
        quantize_model(tiny_llama(), "rtn", 4, 128)

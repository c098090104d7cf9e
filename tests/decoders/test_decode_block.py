"""The C++ Llama block of the eager one-token CPU decode step (decoders/decode_block.cpp): a decode step through it
against the same step through the Python blocks and against the model in float64, the cache slot it writes, and
`decode_block.takes`/`plain` keeping the Python blocks wherever the C++ one does not apply; the same for the whole
step in one call (`one_call_step`, what `generate` runs)."""
import pytest
import torch

from decoders import cpu_kernels, decode_block
from decoders.llama import LlamaConfig, LlamaForCausalLM
from decoders.qlinear import Int4Linear, Int8Linear, W4A8Linear, W8A8Linear
from decoders.quantize import quantize_model

pytestmark = pytest.mark.skipif(not cpu_kernels.build(), reason="the kernels need AVX512-VNNI and a C++ compiler")

CFG = dict(vocab_size=101, hidden_size=64, intermediate_size=88, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0)  # head size 16, GQA 2


def model(dtype, **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**{**CFG, **kw})).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.2)
        for name, p in m.named_parameters():
            if "layernorm" in name or name == "norm.weight":
                p.uniform_(0.5, 1.5)
    return m.to(dtype)


def step(m, in_cpp: bool, prompt=(3, 14, 15, 92, 65), token=35):
    """Prefill `prompt`, then one decode step on `token`: (logits [1, 1, V], the cache), the step's blocks in C++
    or in Python; counts the C++ calls."""
    calls = []
    real = decode_block.block

    def counted(*a):
        calls.append(1)
        return real(*a)

    T, S = len(prompt), 16
    cache = m.new_kv_cache(1, S)
    key_mask = torch.zeros(1, S, dtype=torch.bool)
    key_mask[:, :T + 1] = True
    with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
        mp.setattr(decode_block, "block", counted)
        if not in_cpp:
            mp.setattr(decode_block, "takes", lambda h, p: False)
        m(torch.tensor([prompt]), kv_cache=cache)
        logits = m.decode_step(torch.tensor([[token]]), torch.tensor([[T]]), torch.tensor([T]), key_mask, cache)
    assert len(calls) == (m.config.num_hidden_layers if in_cpp else 0)
    return logits, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpp_step_equals_the_python_step_and_the_float64_model(dtype):
    if dtype == torch.bfloat16 and not cpu_kernels.bf16:
        pytest.skip("bf16 rows need AVX512-BF16")
    m = model(dtype)
    got, cache = step(m, True)
    want, want_cache = step(m, False)
    exact, _ = step(model(torch.float64), False)  # the formula: the same weights, every rounding 2^-52
    scale = exact.abs().max().item()
    assert scale > 1
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
        assert (got.double() - exact).abs().max() < 1e-5 * scale
    else:  # the Python step's roundings, sums in another order: a few bf16 steps at most
        assert (got.float() - want.float()).abs().max() < 2e-2 * scale
        assert (got.double() - exact).abs().max() < 5e-2 * scale
    for layer in range(2):  # the slot written (5): rotated keys and values as the Python step writes them
        for c, w in ((cache.k[layer], want_cache.k[layer]), (cache.v[layer], want_cache.v[layer])):
            torch.testing.assert_close(c, w, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
            assert c[:, :, 5].abs().sum() > 0 and (c[:, :, 6:] == 0).all()


def whole_step(m, prompt=(3, 14, 15, 92, 65), token=35):
    """As `step`, through `decode_block.stepper` (one C++ call); the cache has room beyond the step (masked)."""
    T, S = len(prompt), 16
    cache = m.new_kv_cache(1, S)
    key_mask = torch.zeros(1, S, dtype=torch.bool)
    key_mask[:, :T + 1] = True
    with torch.inference_mode():
        m(torch.tensor([prompt]), kv_cache=cache)
        fn = m.one_call_step(1, S)
        assert fn is not None
        logits = fn(torch.tensor([[token]]), torch.tensor([[T]]), torch.tensor([T]), key_mask, cache)
    return logits, cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tied", [False, True])
def test_the_whole_cpp_step_equals_the_python_step(dtype, tied):
    if dtype == torch.bfloat16 and not cpu_kernels.bf16:
        pytest.skip("bf16 rows need AVX512-BF16")
    m = model(dtype, tie_word_embeddings=tied)
    assert (m.lm_head is None) == tied
    got, cache = whole_step(m)
    want, want_cache = step(m, False)
    scale = want.float().abs().max().item()
    assert scale > 1
    if dtype == torch.float32:  # RoPE's cos and sin from a table: the same float32 values, to an ulp
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    else:
        assert (got.float() - want.float()).abs().max() < 2e-2 * scale
    torch.testing.assert_close(cache.v[0], want_cache.v[0], rtol=0, atol=0)  # the first block's values: same sums
    for c, w in zip(cache.k + cache.v, want_cache.k + want_cache.v):
        torch.testing.assert_close(c, w, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6, atol=1e-6)
        assert c[:, :, 5].abs().sum() > 0 and (c[:, :, 6:] == 0).all()


QUANTIZED = dict(intermediate_size=96, vocab_size=112)  # W4A8: rows a multiple of 16, inputs of 32


def quantized(dtype, bits, skip=()):
    """The test model with its linears (those not in `skip`) as W8A8 (bits 8) or W4A8 in groups of 32."""
    return quantize_model(model(dtype, **QUANTIZED), bits=bits, group_size=None if bits == 8 else 32, activations=True,
                          skip=skip)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, skip", [(8, ()), (4, ()), (8, ("lm_head", "o_proj")), (4, ("gate_up_proj",))])
def test_the_whole_cpp_step_with_w8a8_and_w4a8_linears_equals_the_python_step(dtype, bits, skip):
    if dtype == torch.bfloat16 and not cpu_kernels.bf16:
        pytest.skip("bf16 rows need AVX512-BF16")
    m = quantized(dtype, bits, skip)
    kind = W8A8Linear if bits == 8 else W4A8Linear
    assert type(m.layers[0].self_attn.qkv_proj) is kind and type(m.layers[1].mlp.down_proj) is kind
    assert (type(m.lm_head) is kind) == ("lm_head" not in skip)
    got, cache = whole_step(m)
    want, want_cache = step(m, False)  # the modules' own forward (their int8 kernels and roundings)
    scale = want.float().abs().max().item()
    assert scale > 1
    if dtype == torch.float32:  # the same int32 sums and scalings; float products and attention as before
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * scale)
    else:
        assert (got.float() - want.float()).abs().max() < 2e-2 * scale
    for c, w in zip(cache.k + cache.v, want_cache.k + want_cache.v):
        torch.testing.assert_close(c, w, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-5)
        assert c[:, :, 5].abs().sum() > 0 and (c[:, :, 6:] == 0).all()


def test_greedy_tokens_of_a_quantized_model_equal_with_and_without_the_whole_cpp_step():
    m = quantized(torch.float32, 8)
    ids = torch.tensor([[5, 6, 7]])
    calls = []
    real = decode_block.stepper
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decode_block, "stepper", lambda *a: calls.append(real(*a)) or calls[-1])
        whole = m.generate(ids, max_new_tokens=12, eos_token_id=None)
        assert calls and None not in calls  # generate ran the whole step in C++
        mp.setattr(decode_block, "stepper", lambda *a: None)
        python = m.generate(ids, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(whole, python)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits, group_size, kind", [(8, None, Int8Linear), (4, 32, Int4Linear)])
def test_the_whole_cpp_step_with_weight_only_linears_is_the_python_step_in_another_order(dtype, bits, group_size,
                                                                                           kind):
    """Int8Linear (torch._weight_int8pack_mm) and Int4Linear (w4a8.cpp's weight-only rows), both weight-only: x
    rounded to bf16, float32 sums, y rounded to bf16; the C++ step sums in another order, so the results agree to
    bf16's rounding, and greedy tokens are the same."""
    if dtype == torch.bfloat16 and not cpu_kernels.bf16:
        pytest.skip("bf16 rows need AVX512-BF16")
    m = quantize_model(model(dtype, **QUANTIZED), bits=bits, group_size=group_size)
    assert type(m.layers[0].self_attn.qkv_proj) is kind and type(m.lm_head) is kind
    got, cache = whole_step(m)
    want, want_cache = step(m, False)
    scale = want.float().abs().max().item()
    assert scale > 1
    assert (got.float() - want.float()).abs().max() < 2e-2 * scale  # bf16 outputs: one rounding apart at most
    for c, w in zip(cache.k + cache.v, want_cache.k + want_cache.v):
        torch.testing.assert_close(c.float(), w.float(), rtol=2e-2, atol=1e-3)
        assert c[:, :, 5].abs().sum() > 0 and (c[:, :, 6:] == 0).all()
    ids = torch.tensor([[5, 6, 7]])
    with pytest.MonkeyPatch.context() as mp:
        whole = m.generate(ids, max_new_tokens=12, eos_token_id=None)
        mp.setattr(decode_block, "stepper", lambda *a: None)
        python = m.generate(ids, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(whole, python)


def test_no_whole_cpp_step_for_quantized_linears_with_a_bias():
    m = quantize_model(model(torch.float32, **QUANTIZED), bits=4, group_size=32)  # weight-only int4
    assert type(m.layers[0].mlp.down_proj) is Int4Linear
    with torch.inference_mode():
        assert m.one_call_step(1, 8) is not None
        m.layers[0].mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(64))
        assert m.one_call_step(1, 8) is None
        m = quantized(torch.float32, 8)
        assert m.one_call_step(1, 8) is not None
        m.layers[1].self_attn.o_proj.bias = torch.nn.Parameter(torch.zeros(64))  # W8A8 with a bias
        assert m.one_call_step(1, 8) is None


def test_the_step_op_names_a_quantized_weight_that_does_not_fit():
    m = quantized(torch.float32, 8)
    cache = m.new_kv_cache(1, 8)
    with torch.inference_mode():
        fn = m.one_call_step(1, 8)
        args = (torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([0]), torch.ones(1, 8, dtype=torch.bool), cache)
        fn(*args)
        m.layers[0].self_attn.o_proj.scales = torch.ones(63)
        with pytest.raises(RuntimeError, match=r"o: int8 \[N, K\] takes float32 \(W8A8\) or bf16 \(weight-only\) "
                                               r"scales \[N\]"):
            m.one_call_step(1, 8)(*args)
        m = quantized(torch.float32, 4)
        m.layers[0].mlp.down_proj.sc = m.layers[0].mlp.down_proj.sc[:, :, :16].contiguous()
        with pytest.raises(RuntimeError, match="down: a weight in x's dtype, W8A8 .int8. or W4A8"):
            m.one_call_step(1, 8)(*args)


def test_greedy_tokens_equal_with_and_without_the_cpp_blocks():
    m = model(torch.float32)
    ids = torch.tensor([[5, 6, 7]])
    calls = []
    real = decode_block.stepper
    with pytest.MonkeyPatch.context() as mp:  # the whole step in one call: what generate runs
        mp.setattr(decode_block, "stepper", lambda *a: calls.append(1) or real(*a))
        whole = m.generate(ids, max_new_tokens=12, eos_token_id=None)
    assert calls
    with pytest.MonkeyPatch.context() as mp:  # each block in one call
        mp.setattr(decode_block, "stepper", lambda *a: None)
        blocks = m.generate(ids, max_new_tokens=12, eos_token_id=None)
        mp.setattr(decode_block, "takes", lambda h, p: False)  # Python
        python = m.generate(ids, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(whole, python) and torch.equal(blocks, python)


def test_no_whole_cpp_step_where_it_does_not_apply():
    m = model(torch.float32)
    with torch.inference_mode():
        assert m.one_call_step(1, 8) is not None
        assert m.one_call_step(2, 8) is None  # two rows
        assert model(torch.float64).one_call_step(1, 8) is None
        assert model(torch.float32, head_dim=8).one_call_step(1, 8) is None  # a block the C++ one is not
        m.lm_head.bias = torch.nn.Parameter(torch.zeros(101))  # a head with a bias
        assert m.one_call_step(1, 8) is None
        sub = type("Sub", (LlamaForCausalLM,), {})(m.config)  # a subclass may change the step
        assert sub.one_call_step(1, 8) is None
    assert model(torch.float32).one_call_step(1, 8) is None  # a gradient


def test_the_step_op_names_what_does_not_fit():
    m = model(torch.float32)
    assert m.one_call_step(1, 8) is None  # gradients on: built under inference mode below
    cache = m.new_kv_cache(1, 8)
    key_mask = torch.ones(1, 8, dtype=torch.bool)
    with torch.inference_mode():
        fn = m.one_call_step(1, 8)
        with pytest.raises(RuntimeError, match="token 101 outside the vocabulary of 101"):
            fn(torch.tensor([[101]]), torch.tensor([[0]]), torch.tensor([0]), key_mask, cache)
        with pytest.raises(RuntimeError, match="position 8 beyond the 8 RoPE rows given"):
            fn(torch.tensor([[1]]), torch.tensor([[8]]), torch.tensor([0]), key_mask, cache)
        with pytest.raises(RuntimeError, match=r"key_mask: \[1, 16\] bool"):
            fn(torch.tensor([[1]]), torch.tensor([[0]]), torch.tensor([0]), key_mask, m.new_kv_cache(1, 16))


def test_python_blocks_where_the_cpp_block_does_not_apply():
    m = model(torch.float32)
    block = m.layers[0]
    assert decode_block.plain(block)
    block.mlp.down_proj.bias = torch.nn.Parameter(torch.zeros(64))  # a bias: Python
    assert not decode_block.plain(block)
    assert not decode_block.plain(model(torch.float32, head_dim=8).layers[0])  # head size 8 (not a multiple of 16)
    h = torch.zeros(1, 1, 64)
    cache = m.new_kv_cache(1, 8)
    p = type("P", (), dict(kv_cache=cache, start=torch.tensor([0]), cache_lens=None, mask=torch.zeros(1, 1, 1, 8)))
    with torch.inference_mode():
        assert decode_block.takes(h, p)
        assert not decode_block.takes(torch.zeros(2, 1, 64), p)  # two rows
        assert not decode_block.takes(torch.zeros(1, 2, 64), p)  # two tokens
        assert not decode_block.takes(h.double(), p)
        p.kv_cache = m.new_kv_cache(3, 8)  # one row of a batch's cache (continuous batching)
        assert not decode_block.takes(h, p)
        p.kv_cache = cache
        p.start = 0  # `forward` with a cache (no slot tensor, no mask over the whole cache)
        assert not decode_block.takes(h, p)
    p.start = torch.tensor([0])
    with torch.enable_grad():
        assert not decode_block.takes(h, p)


def test_the_op_names_what_does_not_fit():
    m = model(torch.float32)
    b, cache = m.layers[0], m.new_kv_cache(1, 8)
    w = [b.input_layernorm.weight, b.self_attn.qkv_proj.weight, b.self_attn.o_proj.weight,
         b.post_attention_layernorm.weight, b.mlp.gate_up_proj.weight, b.mlp.down_proj.weight]
    args = (torch.zeros(16), torch.zeros(16), cache.k[0], cache.v[0])
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="slot 8 outside the cache's 8 slots"):
            torch.ops.mm_decode.block(torch.zeros(1, 64), w, *args, torch.tensor([8]), None, 2, 1e-6)
        with pytest.raises(RuntimeError, match="block weights do not fit D = 32"):
            torch.ops.mm_decode.block(torch.zeros(1, 32), [w[0][:32]] + w[1:], *args, torch.tensor([0]), None, 2, 1e-6)
        with pytest.raises(RuntimeError, match="RMSNorm weights contiguous in x's dtype"):
            torch.ops.mm_decode.block(torch.zeros(1, 64), [t.double() for t in w], *args, torch.tensor([0]), None, 2,
                                      1e-6)

"""FlashMLA-style decode over a paged latent cache: the reference against dense attention over unpaged rows, the
Triton kernels (interpreted) against the reference, the page allocator, and cache bytes against the formula."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoders.flash_mla import (PagedLatentCache, flash_mla_decode, flash_mla_reference, flash_mla_triton,
                                kv_cache_bytes_per_token, latent_cache_bytes_per_token, mla_decode_paged)
from decoders.kv_cache import KVCache

# fp32 to 1e-5; half precision 2e-3, and bf16 also rtol 2e-3: rounding the output to bf16 moves it by 2^-9 relative.
TOL = {torch.float32: (1e-5, 0.0), torch.float16: (2e-3, 0.0), torch.bfloat16: (2e-3, 2e-3)}


def make_problem(H, r, d, lens, block_size, dtype, seed=0, spare_blocks=2):
    """Random rows per sequence [len_b, r + d], laid into shuffled pages whose unused rows hold nan (a read of one
    shows in the output); the block table's unused entries are -1. Returns q, the rows, blocks, table, seqlens."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(len(lens), H, r + d, generator=g).to(dtype)
    rows = [torch.randn(n, r + d, generator=g).to(dtype) for n in lens]
    pages_per_row = [-(-n // block_size) for n in lens]
    num_blocks = sum(pages_per_row) + spare_blocks
    blocks = torch.full((num_blocks, block_size, r + d), float("nan"), dtype=dtype)
    table = torch.full((len(lens), max(pages_per_row) + 1), -1, dtype=torch.int32)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    for b, n in enumerate(lens):
        for i in range(pages_per_row[b]):
            page = perm.pop()
            table[b, i] = page
            chunk = rows[b][i * block_size:(i + 1) * block_size]
            blocks[page, :len(chunk)] = chunk
    return q, rows, blocks, table, torch.tensor(lens, dtype=torch.int32)


def dense_expected(q, rows, r, scale):
    """Row by row in float64: softmax(q k^T * scale) v with k = the whole rows, v = their first r dims; and the LSE."""
    outs, lses = [], []
    for b, k in enumerate(rows):
        k = k.double()
        if len(k) == 0:  # nothing to attend to: output 0, LSE -inf
            outs.append(torch.zeros(q.shape[1], r, dtype=torch.float64))
            lses.append(torch.full((q.shape[1],), float("-inf"), dtype=torch.float64))
            continue
        s = q[b].double() @ k.T * scale  # [H, n]
        outs.append(torch.softmax(s, dim=-1) @ k[:, :r])
        lses.append(torch.logsumexp(s, dim=-1))
    return torch.stack(outs), torch.stack(lses)


def errors(out, lse, expected_out, expected_lse):
    """Max abs errors of the output and of the LSE (where finite: an empty row's is -inf in both)."""
    finite = torch.isfinite(expected_lse)
    err_lse = (lse.double() - expected_lse)[finite].abs().max().item() if finite.any() else 0.0
    return (out.double() - expected_out).abs().max().item(), err_lse


def close(out, lse, expected_out, expected_lse, dtype):
    atol, rtol = TOL[dtype]
    return (out.dtype == dtype and lse.dtype == torch.float32
            and torch.allclose(out.double(), expected_out, atol=atol, rtol=rtol)
            and torch.allclose(lse.double(), expected_lse, atol=1e-5, rtol=1e-6))  # LSE is fp32 in every dtype


# ----------------------------------------------------------------------------- Triton kernels (interpreter)
# TRITON_INTERPRET=1 only takes effect if set before triton's first import in a process, and other tests may import
# it first; so the kernel cases run in a fresh interpreter (this file run as a script), as in test_flash_decoding.

LENS = [1, 37, 0, 64, 50]  # length 1, not a multiple of the 16-row page, an empty row, exactly 4 pages


def kernel_cases():
    """(dtype, H, kv_lora_rank, rope, block_size, lens, num_splits, block_h, block_n): the checked grid."""
    # Head counts: one, not a power of two, more than one block of 16 heads; splits beyond the tiles in a row.
    cases = [(torch.float32, H, 32, 16, 16, LENS, n, 16, 16) for H in (1, 5, 20) for n in (1, 2, 3, 7)]
    cases += [(dtype, 5, 32, 16, 16, LENS, 3, 16, 16) for dtype in (torch.bfloat16, torch.float16)]
    cases += [
        (torch.float32, 3, 48, 8, 8, LENS, 2, 16, 16),  # latent and RoPE widths not powers of two; 8-row pages
        (torch.float32, 20, 32, 16, 64, [130, 1, 64], 3, 32, 32),  # wider head and row tiles; 64-row pages
        (torch.bfloat16, 3, 512, 64, 64, [1, 70, 130], 3, 16, 32),  # DeepSeek-V3's 512 + 64, 64-row pages
        (torch.float32, 4, 512, 64, 64, [200], 16, 16, 32),  # 16 splits of one row: empty splits
    ]
    return cases


def check_kernel_cases():
    """Run every kernel case against dense attention; print one line per case; return the number of failures."""
    failures = 0
    for i, (dtype, H, r, d, bs, lens, n, block_h, block_n) in enumerate(kernel_cases()):
        q, rows, blocks, table, seqlens = make_problem(H, r, d, lens, bs, dtype, seed=i)
        scale = (r + d) ** -0.5
        out, lse = flash_mla_triton(q, blocks, table, seqlens, r, scale, n, block_h=block_h, block_n=block_n)
        expected = dense_expected(q, rows, r, scale)
        ok = close(out, lse, *expected, dtype)
        failures += not ok
        err_out, err_lse = errors(out, lse, *expected)
        print(f"{'ok  ' if ok else 'FAIL'} {dtype} H={H} r={r} rope={d} page={bs} splits={n} block_h={block_h} "
              f"block_n={block_n}: max abs err out {err_out:.3g} lse {err_lse:.3g}", flush=True)

    # The allocator's cache as the model fills it (tokens appended in three steps), default tiles, int64 lengths.
    cache, rows = filled_cache([5, 33, 18], r=32, d=16, block_size=16, dtype=torch.float32)
    q = torch.randn(3, 6, 48)
    out, lse = flash_mla_triton(q, cache.blocks[1], cache.block_table, cache.cache_seqlens.long(), 32, 0.3, 2)
    ok = close(out, lse, *dense_expected(q, rows[1], 32, 0.3), torch.float32)
    failures += not ok
    print(f"{'ok  ' if ok else 'FAIL'} PagedLatentCache layer 1, default tiles", flush=True)
    return failures


def test_triton_kernels_under_interpreter():
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok  ") == len(kernel_cases()) + 1


def test_triton_needs_cuda_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, _, blocks, table, seqlens = make_problem(2, 16, 16, [3], 16, torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        flash_mla_triton(q, blocks, table, seqlens, 16, 0.1, 1)


# ----------------------------------------------------------------------------- PyTorch reference


@st.composite
def problems(draw):
    """Random heads, widths, page size and ragged lengths (0 included)."""
    B = draw(st.integers(1, 4))
    block_size = draw(st.sampled_from([1, 4, 16, 64]))
    lens = draw(st.lists(st.integers(0, 150), min_size=B, max_size=B))
    H, r, d = draw(st.integers(1, 17)), draw(st.sampled_from([8, 32, 48])), draw(st.sampled_from([0, 8, 16]))
    return (H, r, d, lens, block_size), draw(st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(problems())
def test_reference_matches_dense(problem):
    (H, r, d, lens, block_size), seed = problem
    q, rows, blocks, table, seqlens = make_problem(H, r, d, lens, block_size, torch.float32, seed)
    scale = 1.7 / (r + d) ** 0.5
    out, lse = flash_mla_reference(q, blocks, table, seqlens, r, scale)
    assert close(out, lse, *dense_expected(q, rows, r, scale), torch.float32), errors(out, lse, *dense_expected(
        q, rows, r, scale))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_reference_half_precision_v3_width(dtype):
    q, rows, blocks, table, seqlens = make_problem(16, 512, 64, [1, 70, 130], 64, dtype, seed=5)
    out, lse = flash_mla_reference(q, blocks, table, seqlens, 512, 576 ** -0.5)
    assert close(out, lse, *dense_expected(q, rows, 512, 576 ** -0.5), dtype)


def test_decode_on_cpu_is_the_reference_and_compiles_whole():
    q, rows, blocks, table, seqlens = make_problem(5, 32, 16, LENS, 16, torch.float32, seed=7)
    expected = dense_expected(q, rows, 32, 0.2)
    assert close(*flash_mla_decode(q, blocks, table, seqlens, 32, 0.2), *expected, torch.float32)
    compiled = torch.compile(flash_mla_decode, backend="eager", fullgraph=True)  # fullgraph: no graph break
    assert close(*compiled(q, blocks, table, seqlens, 32, 0.2), *expected, torch.float32)


def test_operator_fake_gives_output_and_lse_layout():
    # torch.compile traces the CUDA operator through its fake: out [B, H, r] in q's dtype, lse [B, H] fp32.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from decoders.flash_mla import _flash_mla_op

    with FakeTensorMode():
        q, blocks = torch.empty(3, 7, 576, dtype=torch.bfloat16), torch.empty(10, 64, 576, dtype=torch.bfloat16)
        out, lse = _flash_mla_op(q, blocks, torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, dtype=torch.int32),
                                 512, 0.1)
    assert (out.shape, out.dtype, lse.shape, lse.dtype) == ((3, 7, 512), torch.bfloat16, (3, 7), torch.float32)


def test_bad_inputs_raise():
    q, _, blocks, table, seqlens = make_problem(4, 32, 16, [3, 20], 16, torch.float32)
    for fn in (flash_mla_reference, flash_mla_decode, flash_mla_triton):
        extra = (1,) if fn is flash_mla_triton else ()
        with pytest.raises(ValueError, match="same width"):
            fn(q[..., :40], blocks, table, seqlens, 32, 0.1, *extra)
        with pytest.raises(ValueError, match="block_table"):
            fn(q, blocks, table[:1], seqlens, 32, 0.1, *extra)
        with pytest.raises(ValueError, match="cache_seqlens"):
            fn(q, blocks, table, seqlens.float(), 32, 0.1, *extra)
        with pytest.raises(ValueError, match="head_dim_v"):
            fn(q, blocks, table, seqlens, 49, 0.1, *extra)


def test_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from decoders import flash_mla as fm\n"
        "assert fm.triton is None\n"
        "blocks = torch.arange(48.0).view(3, 2, 8)\n"  # rows 2t, 2t+1 of page t
        "q = torch.zeros(1, 2, 8)\n"  # equal scores: out = mean of the valid rows' first 4 dims
        "out, lse = fm.flash_mla_decode(q, blocks, torch.tensor([[2, 0]]), torch.tensor([3]), 4, 1.0)\n"
        "assert torch.allclose(out, blocks.view(6, 8)[[4, 5, 0], :4].mean(0).expand(1, 2, 4)), out\n"
        "assert torch.allclose(lse, torch.tensor(3.0).log().expand(1, 2)), lse\n"
        "try:\n"
        "    fm.flash_mla_triton(q, blocks, torch.tensor([[2, 0]]), torch.tensor([3]), 4, 1.0, 1)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    repo = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


# ----------------------------------------------------------------------------- PagedLatentCache


def filled_cache(lens, r, d, block_size, dtype, num_layers=2, seed=0):
    """A cache filled as a model would: a ragged prefill, then two one-token steps, every layer its own rows.
    Returns the cache and the rows written, per layer and batch row: rows[layer][b] [len_b, r + d]."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    cache = PagedLatentCache(num_layers, num_blocks, block_size, r, d, len(lens), max(lens) + 4, dtype)
    rows = [[torch.empty(0, r + d, dtype=dtype) for _ in lens] for _ in range(num_layers)]
    for counts in ([n - 2 for n in lens], 1, 1):
        slots = cache.append(counts)
        counts = [counts] * len(lens) if isinstance(counts, int) else counts
        for layer in range(num_layers):
            new = torch.randn(len(slots), r + d, generator=g).to(dtype)
            cache.write(layer, slots, new[:, :r], new[:, r:])
            for b, part in enumerate(new.split(counts)):
                rows[layer][b] = torch.cat([rows[layer][b], part])
    return cache, rows


def cached_rows(cache, layer, row):
    """Row `row`'s cached rows of `layer`, read page by page: [length, kv_lora_rank + rope]."""
    pages = [cache.blocks[layer][p] for p in cache.pages[row]]
    return torch.cat(pages)[:cache.lengths[row]] if pages else cache.blocks[layer][0, :0]


def test_cache_holds_what_was_written_and_attends_to_it():
    cache, rows = filled_cache([5, 33, 18, 2], r=32, d=16, block_size=16, dtype=torch.float32)
    assert cache.lengths == [5, 33, 18, 2] and cache.cache_seqlens.tolist() == [5, 33, 18, 2]
    pages = [p for row in cache.pages for p in row]
    assert sorted(pages) == list(range(len(pages)))  # ceil(len / 16) pages each, none shared
    assert [len(p) for p in cache.pages] == [1, 3, 2, 1]
    for b, row_pages in enumerate(cache.pages):
        assert cache.block_table[b, :len(row_pages)].tolist() == row_pages
        for layer in range(2):
            assert torch.equal(cached_rows(cache, layer, b), rows[layer][b])
    q = torch.randn(4, 3, 48)
    for layer in range(2):
        out, lse = flash_mla_reference(q, cache.blocks[layer], cache.block_table, cache.cache_seqlens, 32, 0.25)
        assert close(out, lse, *dense_expected(q, rows[layer], 32, 0.25), torch.float32)


def test_cache_release_reuses_pages_and_refuses_overflow():
    cache = PagedLatentCache(1, num_blocks=4, block_size=8, kv_lora_rank=4, qk_rope_head_dim=2, batch_size=2,
                             max_seq_len=24)
    cache.append([17, 8])  # 3 + 1 pages: all of them
    with pytest.raises(ValueError, match="out of blocks: 1 more needed, 0 free of 4"):
        cache.append([0, 1])
    with pytest.raises(ValueError, match="hold 24 tokens"):
        cache.append([8, 0])
    assert cache.lengths == [17, 8]  # failed appends change nothing
    row0 = cache.pages[0]
    cache.release(0)
    assert cache.lengths == [0, 8] and cache.cache_seqlens.tolist() == [0, 8]
    assert cache.block_table[0].tolist() == [0, 0, 0]
    slots = cache.append([1, 1])  # row 0 takes back its first page; row 1 needs a second one
    assert cache.pages == [[row0[0]], cache.pages[1]] and cache.pages[1][1] in row0[1:]
    assert slots.tolist() == [row0[0] * 8, cache.pages[1][1] * 8]
    assert cache.block_table.tolist() == [[row0[0], 0, 0], cache.pages[1] + [0]]
    assert cache.cache_seqlens.tolist() == [1, 9]
    with pytest.raises(ValueError, match=r"c_kv \[N, 4\] and k_pe \[N, 2\] for N=2"):
        cache.write(0, slots, torch.zeros(2, 4), torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cache_bytes_equal_the_formula(dtype):
    L, r, d, tokens = 3, 64, 16, 40 * 8
    cache = PagedLatentCache(L, num_blocks=40, block_size=8, kv_lora_rank=r, qk_rope_head_dim=d, batch_size=2,
                             max_seq_len=64, dtype=dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    assert cache.nbytes == sum(b.numel() * b.element_size() for b in cache.blocks)
    assert cache.nbytes == latent_cache_bytes_per_token(L, r, d, size) * tokens == (r + d) * L * size * tokens
    # A GQA cache of the same width (8 query heads of 64 -> 2 kv heads), as the Llama decoder allocates it.
    gqa = KVCache(L, batch_size=1, n_kv_heads=2, head_dim=64, max_tokens=tokens, dtype=dtype)
    assert gqa.nbytes == kv_cache_bytes_per_token(L, 2, 64, size) * tokens == 2 * 2 * 64 * L * size * tokens


def test_bytes_per_token_deepseek_v3():
    # V3: 61 layers, latent 512 + RoPE 64 in bf16, against the same attention as MHA (128 heads, K 192, V 128 wide).
    assert latent_cache_bytes_per_token(61, 512, 64, 2) == 70_272
    assert kv_cache_bytes_per_token(61, 128, 192, 2, v_head_dim=128) == 4_997_120



# ----------------------------------------------------------------------------- absorbed MLA decode


def naive_mla(q_nope, q_pe, kv_b_weight, latents, r, scale):
    """The expanded form per row in float64: per head k = [W_UK c_kv, k_pe], v = W_UV c_kv; softmax(q k^T * scale) v."""
    H, nope = q_nope.shape[1:]
    outs = []
    for b, rows in enumerate(latents):
        kv = (rows[:, :r].double() @ kv_b_weight.double().T).view(len(rows), H, -1)  # [n, H, nope + v]
        k = torch.cat([kv[..., :nope], rows[:, None, r:].double().expand(-1, H, -1)], dim=-1)  # [n, H, nope + rope]
        q = torch.cat([q_nope[b], q_pe[b]], dim=-1).double()  # [H, nope + rope]
        p = torch.softmax(torch.einsum("hd,nhd->hn", q, k) * scale, dim=-1)
        outs.append(torch.einsum("hn,nhv->hv", p, kv[..., nope:]))
    return torch.stack(outs)  # [B, H, v]


def test_mla_decode_paged_equals_the_expanded_form():
    H, nope, rope, v, r = 3, 16, 8, 12, 32
    cache, rows = filled_cache([5, 33, 18, 2], r=r, d=rope, block_size=16, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    q_nope, q_pe = torch.randn(4, H, nope, generator=g), torch.randn(4, H, rope, generator=g)
    kv_b_weight = torch.randn(H * (nope + v), r, generator=g) / r ** 0.5
    scale = (nope + rope) ** -0.5
    for layer in range(2):
        out = mla_decode_paged(q_nope, q_pe, kv_b_weight, cache.blocks[layer], cache.block_table,
                               cache.cache_seqlens, scale)
        torch.testing.assert_close(out.double(), naive_mla(q_nope, q_pe, kv_b_weight, rows[layer], r, scale),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"kv_b_weight must be \[H \* \(qk_nope_head_dim \+ v_head_dim\)"):
        mla_decode_paged(q_nope, q_pe, kv_b_weight[:-1], cache.blocks[0], cache.block_table, cache.cache_seqlens, 0.1)


def test_mla_decode_paged_equals_transformers_deepseek_v3_attention():
    # transformers' DeepseekV3Attention (q_lora, YaRN with mscale, interleaved RoPE) decodes one token after a prefill;
    # the latents it cached, paged, and its own query give the same attention output through the absorbed form.
    import transformers
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    torch.manual_seed(0)
    cfg = transformers.DeepseekV3Config(
        vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, num_hidden_layers=1, max_position_embeddings=64,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0,
                         "mscale_all_dim": 1.0})
    attn, rotary = hf.DeepseekV3Attention(cfg, layer_idx=0).eval(), hf.DeepseekV3RotaryEmbedding(cfg)
    B, T = 2, 21
    x = torch.randn(B, T + 1, 64)
    pos = torch.arange(T + 1)[None].expand(B, -1)
    hf_cache = transformers.DynamicCache(config=cfg)
    with torch.no_grad():
        attn(x[:, :T], rotary(x, pos[:, :T]), None, cache=hf_cache)  # prefill: fills the latent cache
        cos, sin = rotary(x, pos[:, T:])
        expected = attn(x[:, T:], (cos, sin), None, cache=hf_cache)[0][:, 0]  # [B, hidden]

        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x[:, T:]))).view(B, 1, 4, 24).transpose(1, 2)
        q_nope, q_pe = q.split([16, 8], dim=-1)
        q_pe = hf.apply_rotary_pos_emb_interleave(q_pe, q_pe, cos, sin)[0]  # [B, H, 1, rope]
        c_kv, k_pe = hf_cache.layers[0].keys, hf_cache.layers[0].values  # [B, 1, T + 1, 32], [B, 1, T + 1, 8]
        cache = PagedLatentCache(1, num_blocks=8, block_size=8, kv_lora_rank=32, qk_rope_head_dim=8, batch_size=B,
                                 max_seq_len=T + 1)
        cache.free_blocks = [5, 0, 7, 2, 6, 1, 3, 4]  # pages out of order
        cache.write(0, cache.append(T + 1), c_kv.reshape(-1, 32), k_pe.reshape(-1, 8))
        out = mla_decode_paged(q_nope[:, :, 0], q_pe[:, :, 0], attn.kv_b_proj.weight, cache.blocks[0],
                               cache.block_table, cache.cache_seqlens, attn.scaling)  # [B, H, v]
        out = attn.o_proj(out.reshape(B, 4 * 12))
    assert attn.scaling != 24 ** -0.5  # YaRN's mscale is in the scale
    torch.testing.assert_close(out, expected, atol=1e-5 * expected.abs().max().item(), rtol=0)


if __name__ == "__main__":
    # The kernel cases, run by test_triton_kernels_under_interpreter in a fresh process with TRITON_INTERPRET=1.
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    sys.exit(1 if check_kernel_cases() else 0)

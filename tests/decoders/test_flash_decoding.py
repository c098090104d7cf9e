"""FlashDecoding against F.scaled_dot_product_attention: Triton kernels (interpreted), PyTorch reference, dispatch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from decoders.flash_decoding import choose_num_splits, decode_attention, flash_decode_reference, flash_decode_triton

STALE = 1e3  # cache positions past a row's length hold large values, so any read of them shows in the output

# fp32 must match to 1e-5. Half precision: 2e-3; bf16 also gets rtol 2e-3 because rounding the output
# to bf16 alone moves it by up to 2^-9 relative, i.e. past 2e-3 once |out| > 1.
TOL = {torch.float32: (1e-5, 0.0), torch.float16: (2e-3, 0.0), torch.bfloat16: (2e-3, 2e-3)}


def make_inputs(B, H, H_kv, D, lens, S_max, dtype, seed=0):
    """Random q [B, H, D], caches [B, H_kv, S_max, D] with stale values past each length, lens [B]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g)
    k = torch.randn(B, H_kv, S_max, D, generator=g)
    v = torch.randn(B, H_kv, S_max, D, generator=g)
    for b, n in enumerate(lens):
        k[b, :, n:] = STALE
        v[b, :, n:] = -STALE
    return q.to(dtype), k.to(dtype), v.to(dtype), torch.tensor(lens, dtype=torch.int32)


def sdpa_expected(q, k_cache, v_cache, cache_lens, scale=None):
    """Row by row: fp32 SDPA over the valid prefix, K/V heads repeated for GQA. Returns [B, H, D] fp32."""
    B, H, D = q.shape
    G = H // k_cache.shape[1]
    rows = []
    for b in range(B):
        n = int(cache_lens[b])
        k = k_cache[b, :, :n].float().repeat_interleave(G, dim=0)  # [H, n, D]
        v = v_cache[b, :, :n].float().repeat_interleave(G, dim=0)  # [H, n, D]
        rows.append(F.scaled_dot_product_attention(q[b, :, None].float(), k, v, scale=scale)[:, 0])  # [H, D]
    return torch.stack(rows)


def assert_matches(out, expected, dtype):
    assert out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------- Triton kernels (interpreter)
# TRITON_INTERPRET=1 only takes effect if set before triton is first imported in a process, and other tests
# may import it first; so the kernel cases run in a fresh interpreter (this file run as a script).

HEADS = [(2, 2), (4, 2), (8, 2), (4, 1)]  # (H, H_kv): GQA ratios 1, 2, 4 and MQA; few kv heads (slow interpreter)
SPLITS = [1, 2, 3, 7, 16]  # 7 and 16 exceed the 4 blocks of 16 keys in a row: empty splits


def kernel_cases():
    """(dtype, head_dim, H, H_kv, num_splits, lens, S_max): the grid the Triton kernels are checked on."""
    # Every GQA ratio x split count; lengths 1, not a multiple of the 16-key block, and the full cache.
    cases = [(torch.float32, 64, H, H_kv, n, [1, 37, 56], 56) for H, H_kv in HEADS for n in SPLITS]
    # Every dtype x head dim on MHA, GQA 4 and MQA; lengths include an exact multiple of the block.
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for head_dim in (64, 128):
            for (H, H_kv), n in (((2, 2), 3), ((8, 2), 7), ((4, 1), 2)):
                cases.append((dtype, head_dim, H, H_kv, n, [32, 1, 45], 48))
    return cases


def check_kernel_cases():
    """Run every kernel case against SDPA; print one line per case; return the number of failures."""
    failures = 0
    for i, (dtype, head_dim, H, H_kv, n, lens, S_max) in enumerate(kernel_cases()):
        q, k, v, lens_t = make_inputs(len(lens), H, H_kv, head_dim, lens, S_max, dtype, seed=i)
        out = flash_decode_triton(q, k, v, lens_t, n, block_n=16)
        expected = sdpa_expected(q, k, v, lens_t)
        failures += report(f"{dtype} D={head_dim} H={H} H_kv={H_kv} splits={n}", out, expected, dtype)

    # Default BLOCK_N (64), a cache laid out [B, S, H_kv, D] and viewed as [B, H_kv, S, D], q as [B, H, 1, D],
    # a head dim (40) that is not a power of two, int64 lengths and a custom scale.
    q, k, v, lens_t = make_inputs(2, 4, 2, 40, [150, 67], S_max=150, dtype=torch.float32, seed=99)
    k_strided = k.transpose(1, 2).contiguous().transpose(1, 2)
    v_strided = v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k_strided.is_contiguous()
    out = flash_decode_triton(q[:, :, None], k_strided, v_strided, lens_t.long(), 3, scale=0.3)
    assert out.shape == (2, 4, 1, 40)
    expected = sdpa_expected(q, k, v, lens_t, scale=0.3)
    failures += report("strided cache, 4-d q, D=40, default block", out[:, :, 0], expected, torch.float32)
    return failures


def report(name, out, expected, dtype):
    """Print the case's max-abs error; return 1 if it is out of tolerance."""
    err = (out.float() - expected).abs().max().item()
    atol, rtol = TOL[dtype]
    ok = out.dtype == dtype and bool(torch.isclose(out.float(), expected, atol=atol, rtol=rtol).all())
    print(f"{'ok  ' if ok else 'FAIL'} {name}: max abs err {err:.3g}", flush=True)
    return 0 if ok else 1


def test_triton_kernels_under_interpreter():
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("ok  ") == len(kernel_cases()) + 1


def test_triton_needs_cuda_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v, lens = make_inputs(1, 2, 1, 16, [3], S_max=4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="CUDA"):
        flash_decode_triton(q, k, v, lens, 1)


# ----------------------------------------------------------------------------- PyTorch reference


@st.composite
def decode_problems(draw):
    """Random shapes over the grid: GQA ratio, head dim, ragged lengths in [1, S_max], split count."""
    B = draw(st.integers(1, 3))
    H_kv = draw(st.integers(1, 3))
    G = draw(st.sampled_from([1, 2, 4, 8]))
    D = draw(st.sampled_from([8, 40, 64, 128]))
    S_max = draw(st.integers(1, 80))
    lens = draw(st.lists(st.integers(1, S_max), min_size=B, max_size=B))
    num_splits = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    return make_inputs(B, G * H_kv, H_kv, D, lens, S_max, torch.float32, seed), num_splits


@settings(max_examples=50, deadline=None)
@given(decode_problems())
def test_reference_matches_sdpa(problem):
    (q, k, v, lens), num_splits = problem
    assert_matches(flash_decode_reference(q, k, v, lens, num_splits), sdpa_expected(q, k, v, lens), torch.float32)


@pytest.mark.parametrize("heads", HEADS, ids=lambda h: f"H{h[0]}-Hkv{h[1]}")
@pytest.mark.parametrize("num_splits", SPLITS + [100])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_reference_grid(heads, num_splits, head_dim):
    H, H_kv = heads
    q, k, v, lens = make_inputs(3, H, H_kv, head_dim, [1, 37, 56], S_max=56, dtype=torch.float32)
    assert_matches(flash_decode_reference(q, k, v, lens, num_splits), sdpa_expected(q, k, v, lens), torch.float32)


def test_reference_bf16_and_4d_query():
    q, k, v, lens = make_inputs(2, 8, 2, 64, [5, 30], S_max=32, dtype=torch.bfloat16)
    out = flash_decode_reference(q[:, :, None], k, v, lens, 4)
    assert out.shape == (2, 8, 1, 64)
    assert_matches(out[:, :, 0], sdpa_expected(q, k, v, lens), torch.bfloat16)


# ----------------------------------------------------------------------------- decode_attention


@settings(max_examples=40, deadline=None)
@given(decode_problems())
def test_decode_attention_cpu_matches_sdpa(problem):
    (q, k, v, lens), _ = problem
    assert_matches(decode_attention(q, k, v, lens), sdpa_expected(q, k, v, lens), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_attention_4d_query_scale_and_dtype(dtype):
    q, k, v, lens = make_inputs(3, 8, 2, 128, [1, 37, 64], S_max=64, dtype=dtype, seed=3)
    out = decode_attention(q[:, :, None], k, v, lens.long(), scale=0.05)
    assert out.shape == (3, 8, 1, 128)
    assert_matches(out[:, :, 0], sdpa_expected(q, k, v, lens, scale=0.05), dtype)


def test_choose_num_splits():
    # Two waves of 132 SMs: ceil(264 / (B * H_kv)) splits, at most one per 256 keys and at most 64.
    assert choose_num_splits(8, 32768, 132) == 33
    assert choose_num_splits(1, 32768, 132) == 64
    assert choose_num_splits(8, 300, 132) == 2
    assert choose_num_splits(512, 32768, 132) == 1


def test_imports_and_runs_without_triton():
    # `import triton` fails in the child (a None entry in sys.modules); decode_attention must still work.
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from decoders import flash_decoding as fd\n"
        "assert fd.triton is None\n"
        "q, k, v = torch.ones(1, 2, 8), torch.ones(1, 1, 4, 8), torch.arange(32.0).view(1, 1, 4, 8)\n"
        "out = fd.decode_attention(q, k, v, torch.tensor([2]))\n"
        "assert torch.allclose(out, v[:, :, :2].mean(2).expand(1, 2, 8)), out\n"  # equal scores: mean of 2 values
        "try:\n"
        "    fd.flash_decode_triton(q, k, v, torch.tensor([2]), 1)\n"
        "except RuntimeError as e:\n"
        "    assert 'triton' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error without triton')\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "fn", [decode_attention, flash_decode_reference, flash_decode_triton], ids=lambda f: f.__name__
)
def test_bad_shapes_raise(fn):
    q, k, v, lens = make_inputs(2, 6, 4, 16, [3, 4], S_max=4, dtype=torch.float32)
    extra = () if fn is decode_attention else (2,)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        fn(q, k, v, lens, *extra)
    q, k, v, lens = make_inputs(2, 4, 2, 16, [3, 4], S_max=4, dtype=torch.float32)
    with pytest.raises(ValueError, match="one query token"):
        fn(q[:, :, None].expand(2, 4, 2, 16), k, v, lens, *extra)
    with pytest.raises(ValueError, match="cache_lens"):
        fn(q, k, v, lens[:1], *extra)
    with pytest.raises(ValueError, match="disagree"):
        fn(q, k[:1], v[:1], lens, *extra)
    if fn is not decode_attention:
        with pytest.raises(ValueError, match="num_splits"):
            fn(q, k, v, lens, 0)


if __name__ == "__main__":
    # The kernel cases, run by test_triton_kernels_under_interpreter in a fresh process with TRITON_INTERPRET=1.
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    sys.exit(1 if check_kernel_cases() else 0)

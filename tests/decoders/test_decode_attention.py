"""The C++ decode attention kernel (decoders/decode_attention.cpp): one token's query heads over a static cache with
slots masked out, against attention written here in float64 from its formula, and `attend` choosing it only where
it applies (no gradient wanted, k and v alike)."""
import pytest
import torch
import torch.nn.functional as F

from decoders import cpu_kernels
from decoders.attention import attend, kernel_takes

pytestmark = pytest.mark.skipif(not cpu_kernels.build(), reason="the kernels need AVX512-VNNI and a C++ compiler")


def formula(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v in float64; q [B, Hkv, G, D], k, v [B, Hkv, S, D], mask [B, 1, 1, S]."""
    s = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5 + mask.double()
    return s.softmax(-1) @ v.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("B,Hkv,G,S,D", [(1, 4, 3, 256, 64), (2, 2, 4, 37, 32), (3, 1, 1, 5, 16), (1, 2, 2, 64, 128)])
def test_kernel_equals_the_formula_with_masked_slots(dtype, tol, B, Hkv, G, S, D):
    g = torch.Generator().manual_seed(S * D)
    q, k, v = (torch.randn(*shape, generator=g).to(dtype) for shape in ((B, Hkv, G, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    seen = torch.rand(B, 1, 1, S, generator=g) < 0.6
    seen[..., 0] = True
    seen[0, ..., S // 2:] = False  # row 0: only the first half of its cache filled
    mask = torch.zeros(B, 1, 1, S, dtype=dtype).masked_fill(~seen, float("-inf"))
    got = torch.ops.mm_attention.decode(q, k, v, mask)
    want = formula(q, k, v, mask)
    assert got.dtype == dtype and got.shape == q.shape
    assert (got.double() - want).abs().max() < tol * want.abs().max()
    unmasked = torch.ops.mm_attention.decode(q, k, v, None)  # no mask: every slot
    assert (unmasked.double() - formula(q, k, v, torch.zeros_like(mask))).abs().max() < tol * want.abs().max()


def test_a_fully_masked_row_is_nan_as_in_the_reference():
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 8, 16)
    mask = torch.full((1, 1, 1, 8), float("-inf"))
    assert torch.isnan(torch.ops.mm_attention.decode(q, k, k, mask)).all()
    assert torch.isnan(formula(q, k, k, mask)).all()


def test_attend_uses_the_kernel_only_where_it_applies():
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, S, D = 2, 6, 2, 20, 32
    q, k, v = torch.randn(B, H, 1, D, generator=g), torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    mask = torch.zeros(1, 1, 1, S).masked_fill(torch.arange(S) >= 12, float("-inf"))  # one mask for the batch
    with torch.no_grad():
        assert kernel_takes(q.reshape(B, Hkv, 3, D), k, v, mask)
        y = attend(q, k, v, mask, is_causal=False)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), attn_mask=mask)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    q.requires_grad_(True)  # training: the custom op has no gradient, so attention stays on SDPA
    assert not kernel_takes(q.reshape(B, Hkv, 3, D), k, v, mask)
    attend(q, k, v, mask, is_causal=False).sum().backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert not kernel_takes(q.detach().reshape(B, Hkv, 3, D), k, v[..., :16], mask)  # MLA: v narrower than k
    assert not kernel_takes(q.detach().reshape(B, Hkv, 3, D).half(), k.half(), v.half(), mask.half())

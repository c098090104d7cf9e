// Attention of one new token over a whole static KV cache, for CPU decode steps (AVX-512).
//
// q [B, Hkv, G, D]: the G query heads that read kv head h; k, v [B, Hkv, S, D]; mask [B, 1, 1, S] additive (0 or
// -inf) or absent. As attention.fused_decode_attention, in float32: scores = (q . k) / sqrt(D) + mask, p = softmax
// over the slots, y = sum p v, in q's dtype. Slots masked with -inf are skipped (their p is exactly 0), so the work
// follows how much of the cache is filled, not its size. Parallel over (b, h); D a multiple of 16.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

namespace {

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 -> float32: the 16 bits on top
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store16(float* p, __m512 x) { _mm512_storeu_ps(p, x); }
inline void store16(at::BFloat16* p, __m512 x) {  // float32 -> bf16, rounded to nearest even (as torch's .to)
  const __m512i b = _mm512_castps_si512(x);
  const __m512i r = _mm512_add_epi32(
      b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1))));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

template <typename T>
void attend(const T* q, const T* k, const T* v, const T* mask, T* y, int64_t B, int64_t Hkv, int64_t G, int64_t S,
            int64_t D) {
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<int32_t> slots(S);
    std::vector<float> p(S + 16), bias(S);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv;
      int64_t n = 0;  // the slots not masked out
      for (int64_t s = 0; s < S; ++s) {
        const float m = mask ? to_float(mask[b * S + s]) : 0.f;
        if (m != -std::numeric_limits<float>::infinity()) { slots[n] = static_cast<int32_t>(s); bias[n++] = m; }
      }
      const T* ki = k + i * S * D;
      const T* vi = v + i * S * D;
      for (int64_t g = 0; g < G; ++g) {
        const T* qg = q + (i * G + g) * D;
        T* yg = y + (i * G + g) * D;
        if (n == 0) {  // every slot masked: softmax of all -inf is NaN, as the reference gives
          for (int64_t d = 0; d < D; d += 16) store16(yg + d, _mm512_set1_ps(std::numeric_limits<float>::quiet_NaN()));
          continue;
        }
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          const T* ks = ki + slots[j] * D;
          __m512 acc = _mm512_mul_ps(load16(qg), load16(ks));
          for (int64_t d = 16; d < D; d += 16) acc = _mm512_fmadd_ps(load16(qg + d), load16(ks + d), acc);
          p[j] = _mm512_reduce_add_ps(acc) * scale + bias[j];
          mx = std::max(mx, p[j]);
        }
        using Vec = at::vec::Vectorized<float>;
        Vec sum(0.f);
        for (int64_t j = 0; j < n; j += Vec::size()) {  // p = exp(score - max), 16 at a time (padding beyond n unused)
          const int64_t c = std::min<int64_t>(Vec::size(), n - j);
          const Vec e = (Vec::loadu(p.data() + j, c) - Vec(mx)).exp_u20();
          e.store(p.data() + j, c);
          sum = sum + Vec::set(Vec(0.f), e, c);
        }
        const float total = _mm512_reduce_add_ps(sum);
        for (int64_t j = 0; j < n; ++j) p[j] /= total;
        for (int64_t d = 0; d < D; d += 16) {
          __m512 acc = _mm512_setzero_ps();
          for (int64_t j = 0; j < n; ++j) acc = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), load16(vi + slots[j] * D + d), acc);
          store16(yg + d, acc);
        }
      }
    }
  });
}

}  // namespace

// The same on raw pointers for one row (decode_block.cpp's step): q [Hkv, G, D], k, v [Hkv, S, D], mask [S] -> y
void attention_into(const float* q, const float* k, const float* v, const float* mask, float* y, int64_t Hkv,
                    int64_t G, int64_t S, int64_t D) {
  attend(q, k, v, mask, y, 1, Hkv, G, S, D);
}
void attention_into(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, const at::BFloat16* mask,
                    at::BFloat16* y, int64_t Hkv, int64_t G, int64_t S, int64_t D) {
  attend(q, k, v, mask, y, 1, Hkv, G, S, D);
}

// q [B, Hkv, G, D], k, v [B, Hkv, S, D], mask [B, 1, 1, S] or None, all contiguous, float32 or bfloat16 -> [B, Hkv, G, D]
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, c10::optional<torch::Tensor> mask) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && q.size(0) == k.size(0) &&
              q.size(1) == k.size(1) && q.size(3) == k.size(3) && q.size(3) % 16 == 0,
              "q [B, Hkv, G, D], k, v [B, Hkv, S, D] with D a multiple of 16; got ", q.sizes(), ", ", k.sizes());
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v must be contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
              (q.scalar_type() == torch::kFloat || q.scalar_type() == torch::kBFloat16), "q, k, v: float32 or bfloat16");
  const int64_t B = k.size(0), Hkv = k.size(1), S = k.size(2), D = k.size(3), G = q.size(2);
  if (mask) {
    TORCH_CHECK(mask->numel() == B * S && mask->size(-1) == S && mask->is_contiguous() &&
                mask->scalar_type() == q.scalar_type(), "mask: contiguous [B, 1, 1, S] in q's dtype");
  }
  auto y = torch::empty_like(q);
  if (q.scalar_type() == torch::kFloat) {
    attend<float>(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                  mask ? mask->data_ptr<float>() : nullptr, y.data_ptr<float>(), B, Hkv, G, S, D);
  } else {
    attend<at::BFloat16>(q.data_ptr<at::BFloat16>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(),
                         mask ? mask->data_ptr<at::BFloat16>() : nullptr, y.data_ptr<at::BFloat16>(), B, Hkv, G, S, D);
  }
  return y;
}

TORCH_LIBRARY(mm_attention, m) { m.def("decode(Tensor q, Tensor k, Tensor v, Tensor? mask) -> Tensor"); }
TORCH_LIBRARY_IMPL(mm_attention, CPU, m) { m.impl("decode", &decode_attention); }

// bf16 products of a few rows (decode steps) on AVX512-BF16: y [M, N] = x [M, K] w [N, K]^T (+ bias), float32
// accumulation by vdpbf16ps (each lane adds two bf16 products), one weight row after the other against all M rows of
// x, so each weight byte is read once, in order; y in bf16, rounded to nearest even. M <= 4.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cstring>

namespace {

constexpr int64_t MAX_ROWS = 4;
constexpr int U = 4;  // independent accumulators along K (hides vdpbf16ps's latency)

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

template <int M>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows(const uint16_t* x, const uint16_t* w, const float* bias,
                                                                 uint16_t* y, int64_t n0, int64_t n1, int64_t N,
                                                                 int64_t K) {
  for (int64_t n = n0; n < n1; ++n) {  // one weight row after the other: a single forward stream per thread
    const uint16_t* wn = w + n * K;
    __m512 acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
      for (int u = 0; u < U; ++u) {
        const __m512i wv = _mm512_loadu_si512(wn + k + 32 * u);
        for (int m = 0; m < M; ++m)
          acc[m][u] = _mm512_dpbf16_ps(acc[m][u], (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u), (__m512bh)wv);
      }
    for (; k < K; k += 32) {  // the rest, the last block masked (K % 32)
      const __mmask32 in = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
      const __m512i wv = _mm512_maskz_loadu_epi16(in, wn + k);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_dpbf16_ps(acc[m][0], (__m512bh)_mm512_maskz_loadu_epi16(in, x + m * K + k), (__m512bh)wv);
    }
    for (int m = 0; m < M; ++m) {
      __m512 a = acc[m][0];
      for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[m][u]);
      y[m * N + n] = to_bf16(_mm512_reduce_add_ps(a) + (bias ? bias[n] : 0.f));
    }
  }
}

}  // namespace

// x [M, K] bf16 (M <= 4), w [N, K] bf16, bias [N] float32 or None -> y [M, N] bf16
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]; got ", x.sizes(), ", ",
              w.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16 && x.is_contiguous() &&
              w.is_contiguous(), "x, w: contiguous bfloat16");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= MAX_ROWS, "1 to ", MAX_ROWS, " rows, got ", M);
  torch::Tensor b;
  if (bias) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "bias: [", N, "], got ", bias->sizes());
  }
  auto y = torch::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    switch (M) {
      case 1: rows<1>(xp, wp, bp, yp, n0, n1, N, K); break;
      case 2: rows<2>(xp, wp, bp, yp, n0, n1, N, K); break;
      case 3: rows<3>(xp, wp, bp, yp, n0, n1, N, K); break;
      default: rows<4>(xp, wp, bp, yp, n0, n1, N, K); break;
    }
  });
  return y;
}

TORCH_LIBRARY(mm_bf16, m) { m.def("linear(Tensor x, Tensor w, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(mm_bf16, CPU, m) { m.impl("linear", &bf16_linear); }

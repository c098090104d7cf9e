// Products of a few rows (decode steps): y [M, N] = x [M, K] w [N, K]^T (+ bias), M <= 4, float32 or bf16;
// int8 x int8 -> int32 (W8A8), exact; and float32 x int8 -> float32 (weight-only int8).
//
// One weight row after the other against all M rows of x, so each thread reads its weights once, in one forward
// stream (for one row of x on Intel CPUs, four weight rows at a time: `four_rows`). Float32 accumulation with U
// independent accumulators along K: float32 by FMA (AVX-512F), bf16 by vdpbf16ps (AVX512-BF16: each lane adds two
// bf16 products; y rounded to bf16, nearest even). From memory (AMD EPYC): bf16 45-50 GB/s where ATen's bf16
// product reads 24-26; float32 one-row products ~4x faster than ATen's (MKL sgemm at M = 1) on small models.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t MAX_ROWS = 4;
constexpr int U = 4;  // independent accumulators along K (hides the FMA / vdpbf16ps latency)

inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's float -> bfloat16
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

// y[m, n] for n in [n0, n1), R weight rows at a time ((n1 - n0) % R == 0), each row's sum in the same order whatever R
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_bf16(const uint16_t* x, const uint16_t* w,
                                                                      const float* bias, uint16_t* y, int64_t n0,
                                                                      int64_t n1, int64_t N, int64_t K) {
  for (int64_t n = n0; n < n1; n += R) {
    __m512 acc[M][R][U];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) {
          const __m512i wv = _mm512_loadu_si512(w + (n + r) * K + k + 32 * u);
          for (int m = 0; m < M; ++m)
            acc[m][r][u] = _mm512_dpbf16_ps(acc[m][r][u], (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u),
                                            (__m512bh)wv);
        }
    for (; k < K; k += 32) {  // the rest, the last block masked (K % 32)
      const __mmask32 in = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
      for (int r = 0; r < R; ++r) {
        const __m512i wv = _mm512_maskz_loadu_epi16(in, w + (n + r) * K + k);
        for (int m = 0; m < M; ++m)
          acc[m][r][0] = _mm512_dpbf16_ps(acc[m][r][0], (__m512bh)_mm512_maskz_loadu_epi16(in, x + m * K + k),
                                          (__m512bh)wv);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        __m512 a = acc[m][r][0];
        for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[m][r][u]);
        y[m * N + n + r] = to_bf16(_mm512_reduce_add_ps(a) + (bias ? bias[n + r] : 0.f));
      }
  }
}

// 16 weights as float32: float32 as they are; int8 (weight-only int8, Int8Linear) widened as they are read
// (vpmovsxbd, vcvtdq2ps); masked: the first K % 16, zeros after
inline __m512 load16(const float* w) { return _mm512_loadu_ps(w); }
inline __m512 load16(__mmask16 in, const float* w) { return _mm512_maskz_loadu_ps(in, w); }
inline __m512 load16(const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
}
inline __m512 load16(__mmask16 in, const int8_t* w) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(in, w)));
}

// float32 x against float32 or int8 weights W, float32 sums by FMA. int8 rows are read S = 4 times further per
// iteration (256 bytes of a row, as the int8 kernel reads): at 64 they streamed from memory at half its rate.
template <int M, int R, typename W>
void rows_f32(const float* x, const W* w, const float* bias, float* y, int64_t n0, int64_t n1, int64_t N,
              int64_t K) {
  constexpr int S = sizeof(W) == 1 ? 4 : 1;
  for (int64_t n = n0; n < n1; n += R) {
    __m512 acc[M][R][U];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U * S <= K; k += 16 * U * S)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U * S; ++u) {
          const __m512 wv = load16(w + (n + r) * K + k + 16 * u);
          for (int m = 0; m < M; ++m)
            acc[m][r][u % U] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16 * u), wv, acc[m][r][u % U]);
        }
    for (; k < K; k += 16) {  // the rest, the last block masked (K % 16)
      const __mmask16 in = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = load16(in, w + (n + r) * K + k);
        for (int m = 0; m < M; ++m)
          acc[m][r][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, x + m * K + k), wv, acc[m][r][0]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        __m512 a = acc[m][r][0];
        for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[m][r][u]);
        y[m * N + n + r] = _mm512_reduce_add_ps(a) + (bias ? bias[n + r] : 0.f);
      }
  }
}

// Four weight rows at a time for one row of x: on an Intel Xeon (2 cores of a Sapphire Rapids-class VM) 8-11% more
// GB/s than one (float32 26.5 -> 29.5, bf16 21 -> 23 on the 125M model's products, cycled through memory); on an AMD
// EPYC (Zen 5) a first version of this kernel that interleaved 4 rows read at half the rate of one stream.
const bool four_rows = (__builtin_cpu_init(), __builtin_cpu_is("intel"));

template <typename F>
void for_rows(int64_t M, int64_t N, F rows) {  // rows<M, R>(n0, n1) over blocks of weight rows, in parallel
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    using I1 = std::integral_constant<int, 1>;
    switch (M) {
      case 1:
        if (four_rows) {
          const int64_t n4 = n0 + (n1 - n0) / 4 * 4;
          rows(I1{}, std::integral_constant<int, 4>{}, n0, n4);
          n0 = n4;
        }
        rows(I1{}, I1{}, n0, n1);
        break;
      case 2: rows(std::integral_constant<int, 2>{}, I1{}, n0, n1); break;
      case 3: rows(std::integral_constant<int, 3>{}, I1{}, n0, n1); break;
      default: rows(std::integral_constant<int, 4>{}, I1{}, n0, n1); break;
    }
  });
}

// int8 x int8 -> int32, exact (W8A8): vpdpbusd multiplies unsigned by signed bytes, so each weight block goes in as
// w + 128 (its bits with the top one flipped as it is read) against x, and 128 sum_k x[m, k] (xsum, once a call) is
// taken off. One vpdpbusd per 64 weights, U blocks of a row per iteration: on the Intel Xeon, 1.1B-shaped products
// cycled through memory, 19 GB/s as the bf16 kernel, where taking 128 sum_k w off beside it (a second vpdpbusd) and
// one block per iteration read 16.
template <int M, int R>
void rows_int8(const int8_t* x, const int32_t* xsum, const int8_t* w, int32_t* y, int64_t n0, int64_t n1, int64_t N,
               int64_t K) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t n = n0; n < n1; n += R) {
    __m512i acc[M][R][U];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 * U <= K; k += 64 * U)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) {
          const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(w + (n + r) * K + k + 64 * u), c128);
          for (int m = 0; m < M; ++m)
            acc[m][r][u] = _mm512_dpbusd_epi32(acc[m][r][u], wu, _mm512_loadu_si512(x + m * K + k + 64 * u));
        }
    for (; k < K; k += 64) {  // the rest, the last block masked (K % 64): x's zeros add nothing
      const __mmask64 in = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
      for (int r = 0; r < R; ++r) {
        const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, w + (n + r) * K + k), c128);
        for (int m = 0; m < M; ++m)
          acc[m][r][0] = _mm512_dpbusd_epi32(acc[m][r][0], wu, _mm512_maskz_loadu_epi8(in, x + m * K + k));
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        __m512i a = acc[m][r][0];
        for (int u = 1; u < U; ++u) a = _mm512_add_epi32(a, acc[m][r][u]);
        y[m * N + n + r] = _mm512_reduce_add_epi32(a) - 128 * xsum[m];
      }
  }
}

}  // namespace

// The same on raw pointers (decode_block.cpp's step, and rows_linear below): y [M, N] = x [M, K] w [N, K]^T + bias
// (float32 [N] or null), 1 <= M <= 4.
void rows_into(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K,
               const float* bias = nullptr) {
  for_rows(M, N, [&](auto m, auto r, int64_t n0, int64_t n1) { rows_f32<m(), r()>(x, w, bias, y, n0, n1, N, K); });
}
void rows_into(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t M, int64_t N, int64_t K,
               const float* bias = nullptr) {
  const auto* xp = reinterpret_cast<const uint16_t*>(x);
  const auto* wp = reinterpret_cast<const uint16_t*>(w);
  auto* yp = reinterpret_cast<uint16_t*>(y);
  for_rows(M, N, [&](auto m, auto r, int64_t n0, int64_t n1) {
    rows_bf16<m(), r()>(xp, wp, bias, yp, n0, n1, N, K);
  });
}

// x [M, K] (M <= 4), w [N, K], both float32 or both bf16; bias [N] or None -> y [M, N] in x's dtype
torch::Tensor rows_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]; got ", x.sizes(), ", ",
              w.sizes());
  const auto dt = x.scalar_type();
  TORCH_CHECK((dt == torch::kFloat || dt == torch::kBFloat16) && w.scalar_type() == dt && x.is_contiguous() &&
              w.is_contiguous(), "x, w: contiguous, both float32 or both bfloat16; got ", dt, ", ", w.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= MAX_ROWS, "1 to ", MAX_ROWS, " rows, got ", M);
  torch::Tensor b;
  if (bias) {
    b = bias->to(torch::kFloat).contiguous();
    TORCH_CHECK(b.numel() == N, "bias: [", N, "], got ", bias->sizes());
  }
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  auto y = torch::empty({M, N}, x.options());
  if (dt == torch::kFloat) {
    rows_into(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, N, K, bp);
  } else {
    TORCH_CHECK(__builtin_cpu_supports("avx512bf16"), "bf16 rows need a CPU with AVX512-BF16");
    rows_into(x.data_ptr<at::BFloat16>(), w.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, N, K, bp);
  }
  return y;
}

// x [M, K], w [N, K], both int8 -> y = x w^T [M, N] int32, exact (decode_block.cpp's step, and int8_rows below),
// 1 <= M <= 4.
void int8_rows_into(const int8_t* x, const int8_t* w, int32_t* y, int64_t M, int64_t N, int64_t K) {
  int32_t xsum[MAX_ROWS] = {};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xsum[m] += x[m * K + k];
  for_rows(M, N, [&](auto m, auto r, int64_t n0, int64_t n1) { rows_int8<m(), r()>(x, xsum, w, y, n0, n1, N, K); });
}

// x [M, K] float32, w [N, K] int8 -> y = x w^T [M, N] float32 (decode_block.cpp's step for Int8Linear, and w8_rows
// below), 1 <= M <= 4.
void w8_rows_into(const float* x, const int8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
  for_rows(M, N, [&](auto m, auto r, int64_t n0, int64_t n1) { rows_f32<m(), r()>(x, w, nullptr, y, n0, n1, N, K); });
}

// x [M, K] (M <= 4) float32, w [N, K] int8 -> x w^T [M, N] float32 (the weight-only int8 product before its scales)
torch::Tensor w8_rows(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]; got ", x.sizes(), ", ",
              w.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w.scalar_type() == torch::kChar && w.is_contiguous(),
              "x float32, w int8 contiguous; got ", x.scalar_type(), ", ", w.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= MAX_ROWS, "1 to ", MAX_ROWS, " rows, got ", M);
  const auto xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options());
  w8_rows_into(xc.data_ptr<float>(), w.data_ptr<int8_t>(), y.data_ptr<float>(), M, N, K);
  return y;
}

// x [M, K] (M <= 4), w [N, K], both int8 -> x w^T [M, N] int32, exactly torch._int_mm(x, w.t()) (W8A8's product)
torch::Tensor int8_rows(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]; got ", x.sizes(), ", ",
              w.sizes());
  TORCH_CHECK(x.scalar_type() == torch::kChar && w.scalar_type() == torch::kChar && w.is_contiguous(),
              "x, w: int8, w contiguous; got ", x.scalar_type(), ", ", w.scalar_type());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= MAX_ROWS, "1 to ", MAX_ROWS, " rows, got ", M);
  const auto xc = x.contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(torch::kInt));
  int8_rows_into(xc.data_ptr<int8_t>(), w.data_ptr<int8_t>(), y.data_ptr<int32_t>(), M, N, K);
  return y;
}

TORCH_LIBRARY(mm_linear, m) {
  m.def("rows(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("int8_rows(Tensor x, Tensor w) -> Tensor");
  m.def("w8_rows(Tensor x, Tensor w) -> Tensor");
}
TORCH_LIBRARY_IMPL(mm_linear, CPU, m) {
  m.impl("rows", &rows_linear);
  m.impl("int8_rows", &int8_rows);
  m.impl("w8_rows", &w8_rows);
}

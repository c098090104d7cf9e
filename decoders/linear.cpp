// Products of a few rows (decode steps): y [M, N] = x [M, K] w [N, K]^T (+ bias), M <= 4, float32 or bf16;
// int8 x int8 -> int32 (W8A8), exact; and weight-only int8 (Int8Linear: bf16 x as 15-bit integers, exact sums).
//
// One weight row after the other against all M rows of x, so each thread reads its weights once, in one forward
// stream (for one row of x on Intel CPUs, four weight rows at a time: `four_rows`). Float32 accumulation with U
// independent accumulators along K: float32 by FMA (AVX-512F), bf16 by vdpbf16ps (AVX512-BF16: each lane adds two
// bf16 products; y rounded to bf16, nearest even). From memory (AMD EPYC): bf16 45-50 GB/s where ATen's bf16
// product reads 24-26; float32 one-row products ~4x faster than ATen's (MKL sgemm at M = 1) on small models.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
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

inline __m512 round_bf16(__m512 v) {  // to_bf16 on 16 floats, back as float32 (finite values)
  const __m512i b = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd));
  return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// R = 4 weight rows are read together ROW_STRIDE rows apart, in blocks of 16 rows, where four neighbouring rows of
// 1.5-2 KB lie in two 4 KB pages: products from memory read 13% faster so (1.1B-shaped weight-only int8 on the Intel
// Xeon's two threads: 25 -> 29 GB/s); decode steps: 125M bf16 10.0 -> 8.1 ms, float32 15.1 -> 13.8, 1.1B bf16 (4 KB
// rows) 82.3 -> 79.1.
constexpr int ROW_STRIDE = 4;

// y[m, n] for n in [n0, n1), R weight rows at a time, ROW_STRIDE apart ((n1 - n0) % (R ROW_STRIDE) == 0 for R > 1),
// each row's sum in the same order whatever R
template <int M, int R>
__attribute__((target("avx512f,avx512bw,avx512bf16"))) void rows_bf16(const uint16_t* x, const uint16_t* w,
                                                                      const float* bias, uint16_t* y, int64_t n0,
                                                                      int64_t n1, int64_t N, int64_t K) {
  constexpr int S = R > 1 ? ROW_STRIDE : 1;
  for (int64_t nb = n0; nb < n1; nb += R * S)
  for (int64_t n = nb; n < nb + S; ++n) {
    __m512 acc[M][R][U];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 * U <= K; k += 32 * U)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) {
          const __m512i wv = _mm512_loadu_si512(w + (n + r * S) * K + k + 32 * u);
          for (int m = 0; m < M; ++m)
            acc[m][r][u] = _mm512_dpbf16_ps(acc[m][r][u], (__m512bh)_mm512_loadu_si512(x + m * K + k + 32 * u),
                                            (__m512bh)wv);
        }
    for (; k < K; k += 32) {  // the rest, the last block masked (K % 32)
      const __mmask32 in = K - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (K - k)) - 1;
      for (int r = 0; r < R; ++r) {
        const __m512i wv = _mm512_maskz_loadu_epi16(in, w + (n + r * S) * K + k);
        for (int m = 0; m < M; ++m)
          acc[m][r][0] = _mm512_dpbf16_ps(acc[m][r][0], (__m512bh)_mm512_maskz_loadu_epi16(in, x + m * K + k),
                                          (__m512bh)wv);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        __m512 a = acc[m][r][0];
        for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[m][r][u]);
        y[m * N + n + r * S] = to_bf16(_mm512_reduce_add_ps(a) + (bias ? bias[n + r * S] : 0.f));
      }
  }
}

// float32 x against float32 weights, float32 sums by FMA
template <int M, int R>
void rows_f32(const float* x, const float* w, const float* bias, float* y, int64_t n0, int64_t n1, int64_t N,
              int64_t K) {
  constexpr int S = R > 1 ? ROW_STRIDE : 1;
  for (int64_t nb = n0; nb < n1; nb += R * S)
  for (int64_t n = nb; n < nb + S; ++n) {
    __m512 acc[M][R][U];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 * U <= K; k += 16 * U)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) {
          const __m512 wv = _mm512_loadu_ps(w + (n + r * S) * K + k + 16 * u);
          for (int m = 0; m < M; ++m)
            acc[m][r][u] = _mm512_fmadd_ps(_mm512_loadu_ps(x + m * K + k + 16 * u), wv, acc[m][r][u]);
        }
    for (; k < K; k += 16) {  // the rest, the last block masked (K % 16)
      const __mmask16 in = K - k >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (K - k)) - 1);
      for (int r = 0; r < R; ++r) {
        const __m512 wv = _mm512_maskz_loadu_ps(in, w + (n + r * S) * K + k);
        for (int m = 0; m < M; ++m)
          acc[m][r][0] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(in, x + m * K + k), wv, acc[m][r][0]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        __m512 a = acc[m][r][0];
        for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[m][r][u]);
        y[m * N + n + r * S] = _mm512_reduce_add_ps(a) + (bias ? bias[n + r * S] : 0.f);
      }
  }
}

// Four weight rows at a time for one row of x: on an Intel Xeon (2 cores of a Sapphire Rapids-class VM) 8-11% more
// GB/s than one (float32 26.5 -> 29.5, bf16 21 -> 23 on the 125M model's products, cycled through memory); on an AMD
// EPYC (Zen 5) a first version of this kernel that interleaved 4 rows read at half the rate of one stream.
const bool four_rows = (__builtin_cpu_init(), __builtin_cpu_is("intel"));

// rows<M, R>(n0, n1) over blocks of weight rows, in parallel (R = 4 over whole blocks of 4 ROW_STRIDE rows)
template <typename F>
void for_rows(int64_t M, int64_t N, F rows) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    using I1 = std::integral_constant<int, 1>;
    switch (M) {
      case 1:
        if (four_rows) {
          const int64_t n4 = n0 + (n1 - n0) / (4 * ROW_STRIDE) * (4 * ROW_STRIDE);
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
// taken off. One vpdpbusd per 64 weights, U blocks of a row per iteration (lines prefetched 512 bytes ahead): on the
// Intel Xeon, 1.1B-shaped products cycled through memory, 19 GB/s as the bf16 kernel, where taking 128 sum_k w off
// beside it (a second vpdpbusd) and one block per iteration read 16.
template <int M, int R>
void rows_int8(const int8_t* x, const int32_t* xsum, const int8_t* w, int32_t* y, int64_t n0, int64_t n1, int64_t N,
               int64_t K) {
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  constexpr int S = R > 1 ? ROW_STRIDE : 1;
  for (int64_t nb = n0; nb < n1; nb += R * S)
  for (int64_t n = nb; n < nb + S; ++n) {
    __m512i acc[M][R][U];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) acc[m][r][u] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 * U <= K; k += 64 * U)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) {
          const int8_t* wp = w + (n + r * S) * K + k + 64 * u;
          _mm_prefetch(reinterpret_cast<const char*>(wp) + 512, _MM_HINT_T0);
          const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(wp), c128);
          for (int m = 0; m < M; ++m)
            acc[m][r][u] = _mm512_dpbusd_epi32(acc[m][r][u], wu, _mm512_loadu_si512(x + m * K + k + 64 * u));
        }
    for (; k < K; k += 64) {  // the rest, the last block masked (K % 64): x's zeros add nothing
      const __mmask64 in = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
      for (int r = 0; r < R; ++r) {
        const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, w + (n + r * S) * K + k), c128);
        for (int m = 0; m < M; ++m)
          acc[m][r][0] = _mm512_dpbusd_epi32(acc[m][r][0], wu, _mm512_maskz_loadu_epi8(in, x + m * K + k));
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        __m512i a = acc[m][r][0];
        for (int u = 1; u < U; ++u) a = _mm512_add_epi32(a, acc[m][r][u]);
        y[m * N + n + r * S] = _mm512_reduce_add_epi32(a) - 128 * xsum[m];
      }
  }
}

// Weight-only int8 rows, exact: x as 15-bit integers q = 128 xh + xl (xh in [-128, 127], xl in [0, 127], both int8)
// against int8 weights by vpdpbusd, which multiplies unsigned by signed bytes: each weight block goes in as w + 128
// (its top bit flipped as it is read) against xh and against xl, and 128 sum_k q (xsum) is taken off at the end:
// sum_k w q = 128 sum (w + 128) xh + sum (w + 128) xl - 128 xsum; y = bf16(float(sum_k w q) a s), rounded as it is
// stored (in parallel, where a loop after the product ran on one thread). Three instructions per 64 weights (where
// widening the weights to int16 for vpdpwssd took four, and to float32 for FMAs twelve), 256 bytes of a row per
// iteration, each line prefetched 512 bytes ahead (on two threads 1 KB read ~10% slower, 256-2048 alike). Each
// accumulator holds at most K / 2 + 64 products of at most 255 * 128, so its lanes and their sum stay within int32
// for K <= 131072 (w8_into checks).
template <int M, int R>
void rows_w8(const int8_t* xh, const int8_t* xl, const int64_t* xsum, const float* a, const int8_t* w,
             const at::BFloat16* s, at::BFloat16* y, int64_t n0, int64_t n1, int64_t N, int64_t K) {
  constexpr int V = 2;  // accumulators per part (R = 4: 16 in all)
  const __m512i c128 = _mm512_set1_epi8(static_cast<char>(0x80));
  constexpr int S = R > 1 ? ROW_STRIDE : 1;
  for (int64_t nb = n0; nb < n1; nb += R * S)
  for (int64_t n = nb; n < nb + S; ++n) {
    __m512i hi[M][R][V], lo[M][R][V];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) hi[m][r][v] = lo[m][r][v] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 256 <= K; k += 256)
      for (int r = 0; r < R; ++r)
        for (int u = 0; u < 4; u += V)
          for (int v = 0; v < V; ++v) {
            const int8_t* wp = w + (n + r * S) * K + k + 64 * (u + v);
            _mm_prefetch(reinterpret_cast<const char*>(wp) + 512, _MM_HINT_T0);
            const __m512i wu = _mm512_xor_si512(_mm512_loadu_si512(wp), c128);
            for (int m = 0; m < M; ++m) {
              const int64_t i = m * K + k + 64 * (u + v);
              hi[m][r][v] = _mm512_dpbusd_epi32(hi[m][r][v], wu, _mm512_loadu_si512(xh + i));
              lo[m][r][v] = _mm512_dpbusd_epi32(lo[m][r][v], wu, _mm512_loadu_si512(xl + i));
            }
          }
    for (; k < K; k += 64) {  // the rest, the last block masked (K % 64): x's zeros add nothing
      const __mmask64 in = K - k >= 64 ? ~__mmask64(0) : (__mmask64(1) << (K - k)) - 1;
      for (int r = 0; r < R; ++r) {
        const __m512i wu = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, w + (n + r * S) * K + k), c128);
        for (int m = 0; m < M; ++m) {
          hi[m][r][0] = _mm512_dpbusd_epi32(hi[m][r][0], wu, _mm512_maskz_loadu_epi8(in, xh + m * K + k));
          lo[m][r][0] = _mm512_dpbusd_epi32(lo[m][r][0], wu, _mm512_maskz_loadu_epi8(in, xl + m * K + k));
        }
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) {
        int64_t h = 0, l = 0;
        for (int v = 0; v < V; ++v) {
          h += _mm512_reduce_add_epi32(hi[m][r][v]);
          l += _mm512_reduce_add_epi32(lo[m][r][v]);
        }
        const int64_t i = n + r * S;
        y[m * N + i] = static_cast<float>(128 * h + l - 128 * xsum[m]) * a[m] * static_cast<float>(s[i]);
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
  for_rows(M, N, [&](auto m, auto r, int64_t n0, int64_t n1) {
    rows_int8<m(), r()>(x, xsum, w, y, n0, n1, N, K);
  });
}

// Activations for the exact weight-only products (w8_into here, w4_into in w4a8.cpp): each row m of x [M, K] rounded
// to bf16, then written as a 15-bit integer q on a power-of-two grid a[m] = 2^(e - 13), e the exponent of its largest
// |x|: the values within 2^6 of the largest keep every bit (a bf16 value has 8 significant bits), smaller ones round
// to the grid (ties to even; error <= 2^(e - 14), against bf16's own rounding of x of up to |x| 2^-9). q goes out in
// two int8 parts, q = 128 xh + xl (xh in [-128, 127], xl in [0, 127]), for vpdpbusd; sums [M, K / group] holds each
// group's sum of q. A NaN or infinite x makes a[m] NaN (its row of y NaN).
void split_rows(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xh, int8_t* xl, float* a, int64_t* sums) {
  const int64_t G = K / group;
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m512 mx = _mm512_setzero_ps();
    __mmask16 nan = 0;  // vmaxps drops NaN: kept apart
    for (int64_t k = 0; k < K; k += 16) {
      const __m512 v = _mm512_maskz_loadu_ps(K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1, xm + k);
      mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    const float amax = static_cast<float>(c10::BFloat16(_mm512_reduce_max_ps(mx)));  // max |bf16(x)|
    const bool finite = std::isfinite(amax) && !nan;
    const int e = amax > 0.f && finite ? std::ilogb(amax) - 13 : 0;
    a[m] = !finite ? NAN : amax > 0.f ? std::ldexp(1.f, e) : 1.f;
    const __m512 scale = _mm512_set1_ps(static_cast<float>(-e));
    std::fill(sums + m * G, sums + (m + 1) * G, 0);
    for (int64_t k = 0; k < K; k += 16) {  // |q| <= 255 * 2^6 = 16320
      const __mmask16 in = K - k >= 16 ? 0xFFFF : (1u << (K - k)) - 1;
      const __m512i q = _mm512_cvtps_epi32(_mm512_scalef_ps(round_bf16(_mm512_maskz_loadu_ps(in, xm + k)), scale));
      _mm_mask_storeu_epi8(xh + m * K + k, in, _mm512_cvtepi32_epi8(_mm512_srai_epi32(q, 7)));
      _mm_mask_storeu_epi8(xl + m * K + k, in, _mm512_cvtepi32_epi8(_mm512_and_si512(q, _mm512_set1_epi32(127))));
      if (k / group == std::min(k + 15, K - 1) / group) {
        sums[m * G + k / group] += _mm512_reduce_add_epi32(q);
      } else {  // a block across groups (a group of 8 or 24 inputs)
        alignas(64) int32_t qs[16];
        _mm512_store_si512(qs, q);
        for (int64_t i = k; i < std::min(k + 16, K); ++i) sums[m * G + i / group] += qs[i - k];
      }
    }
  }
}

// Weight-only int8 (Int8Linear): y [M, N] = bf16(x) w^T * s in float32 (decode_block.cpp's step, and w8_linear
// below), 1 <= M <= 4: x as split_rows writes it, exact integer sums (rows_w8), y = bf16(float(sum q w) a s), where
// torch._weight_int8pack_mm sums bf16(x) w in float32.
void w8_into(const float* x, const int8_t* w, const at::BFloat16* s, at::BFloat16* y, int64_t M, int64_t N,
             int64_t K) {
  TORCH_CHECK(K <= 131072, "weight-only int8 rows take up to 131072 inputs, got ", K);
  std::vector<int8_t> xh(M * K), xl(M * K);
  float a[MAX_ROWS];
  int64_t xsum[MAX_ROWS];
  split_rows(x, M, K, K, xh.data(), xl.data(), a, xsum);
  for_rows(M, N, [&](auto m, auto r, int64_t n0, int64_t n1) {
    rows_w8<m(), r()>(xh.data(), xl.data(), xsum, a, w, s, y, n0, n1, N, K);
  });
}

// x [M, K] (M <= 4) float32 or bf16, w [N, K] int8, s [N] bf16 -> bf16(bf16(x) w^T s) [M, N] in x's dtype (Int8Linear)
torch::Tensor w8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor s) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K], w [N, K]; got ", x.sizes(), ", ",
              w.sizes());
  TORCH_CHECK(w.scalar_type() == torch::kChar && w.is_contiguous() && s.scalar_type() == torch::kBFloat16 &&
              s.is_contiguous() && s.numel() == w.size(0), "w int8 [N, K] and s bf16 [N], contiguous; got ",
              w.scalar_type(), " ", w.sizes(), ", ", s.scalar_type(), " ", s.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= MAX_ROWS, "1 to ", MAX_ROWS, " rows, got ", M);
  const auto xf = x.to(torch::kFloat).contiguous();
  auto y = torch::empty({M, N}, x.options().dtype(torch::kBFloat16));
  w8_into(xf.data_ptr<float>(), w.data_ptr<int8_t>(), s.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(), M, N,
          K);
  return y.to(x.scalar_type());
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
  m.def("w8_linear(Tensor x, Tensor w, Tensor s) -> Tensor");
}
TORCH_LIBRARY_IMPL(mm_linear, CPU, m) {
  m.impl("rows", &rows_linear);
  m.impl("int8_rows", &int8_rows);
  m.impl("w8_linear", &w8_linear);
}

// W4A8 products for CPU decode steps: 4-bit weights times int8 activations in integer dot products (AVX512-VNNI).
//
// y[m, n] = sum_k x[m, k] w[n, k],  w[n, k] = (u[n, k] - 8) s[g, n] + o[g, n] for k in group g (`group` inputs).
// The activations are quantized per block b of 32 inputs, as llama.cpp's Q8_0: d[m, b] = max|x| / 127,
// q[m, k] = round(x / d). With dot[m, n, b] = sum_k u q over the block (vpdpbusd: unsigned codes times signed
// activations, 16 output rows in the lanes of one register) and X[m, g] = sum over the group's blocks of d sum_k q
// (the group's sum of x as quantized):
//   y[m, n] = sum_g ( s[g, n] sum_b d[m, b] dot[m, n, b] + c[g, n] X[m, g] ),  c = o - 8 s  (s, c: float16).
// Weights, packed [N/16, K/8, 64] bytes: per tile of 16 rows and 8 inputs k0..k0+7, byte 4 l + j holds the code of
// row 16 t + l at input k0 + j in its low nibble and at k0 + 4 + j in its high nibble (j < 4). Scales and
// corrections, sc [N/16, K/group, 32] float16: per tile and group, the 16 rows' s, then their c, so a tile reads its
// scales as one forward stream beside its weights (laid out [K/group, N], the 1.1B model's products took 20% longer).
// Weight-only (Int4Linear), on the same bytes: each row of x rounded to bf16 and written as 15-bit integers q on a
// power-of-two grid a (linear.cpp's split_rows), and
//   y[m, n] = a[m] sum_g ( s[g, n] sum_k u[n, k] q[m, k] + c[g, n] Q[m, g] ),  Q: the group's sum of q, c = o - 8 s,
// the sums over k exact integers (vpdpbusd), the rest in float32 FMAs. Its scales and offsets, so [N/16, K/group,
// 16, 2] bf16: per tile and group, one 32-bit word a row, s in the low half and o in the high one (exact in
// float32), a forward stream beside the codes as W4A8's scales are.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstring>
#include <vector>

void split_rows(const float* x, int64_t M, int64_t K, int64_t group, int8_t* xh, int8_t* xl, float* a,  // linear.cpp
                int64_t* sums);

namespace {

constexpr int64_t QK = 32;      // inputs per activation block
constexpr int64_t MAX_ROWS = 4;  // rows of x per call (decode steps; larger products dequantize instead)
// The codes are read 2 KB ahead (a software prefetch beside each load): on the Intel Xeon's two threads, 1.1B-shaped
// weight-only products in groups of 32 cycled through memory read 24 GB/s against 20 without (512 bytes ahead: 22).
constexpr int PREFETCH = 2048;

// x [M, K] (float32) -> q [M, K] int8 and d [M, K/32] per block; X [M, G] = sum of d * sum(q) over a group's blocks.
// q = round(x * (127 / amax)) to nearest even (the default rounding mode, as nearbyint).
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t group, int8_t* q, float* d, float* X) {
  for (int64_t i = 0; i < M * K / QK; ++i) {
    const __m512 a = _mm512_loadu_ps(x + i * QK), b = _mm512_loadu_ps(x + i * QK + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv)), qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * QK), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * QK + 16), _mm512_cvtepi32_epi8(qb));
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    d[i] = amax / 127.f;
    if (i * QK % group == 0) X[i * QK / group] = 0.f;
    X[i * QK / group] += d[i] * static_cast<float>(sum);
  }
}

inline __m512i bcast4(const int8_t* p) {  // 4 activation bytes into every 32-bit lane
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// rows [16 t, 16 t + 16) of y for the M rows of x
template <int M>
void tile(const uint8_t* w, const uint16_t* sc, const int8_t* q, const float* d, const float* X, float* y, int64_t t,
          int64_t N, int64_t K, int64_t group) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* wt = w + t * (K / 8) * 64;
  __m512 tot[M];
  for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = g * group / QK; b < (g + 1) * group / QK; ++b) {
      __m512i dot0[M], dot1[M];
      for (int m = 0; m < M; ++m) dot0[m] = dot1[m] = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {  // 8 inputs a step
        _mm_prefetch(reinterpret_cast<const char*>(wt + (b * 4 + j) * 64) + PREFETCH, _MM_HINT_T0);
        const __m512i v = _mm512_loadu_si512(wt + (b * 4 + j) * 64);
        const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
        for (int m = 0; m < M; ++m) {
          const int8_t* qm = q + m * K + b * QK + j * 8;
          dot0[m] = _mm512_dpbusd_epi32(dot0[m], lo, bcast4(qm));
          dot1[m] = _mm512_dpbusd_epi32(dot1[m], hi, bcast4(qm + 4));
        }
      }
      for (int m = 0; m < M; ++m)
        acc[m] = _mm512_fmadd_ps(_mm512_set1_ps(d[m * (K / QK) + b]),
                                 _mm512_cvtepi32_ps(_mm512_add_epi32(dot0[m], dot1[m])), acc[m]);
    }
    const uint16_t* sct = sc + (t * (K / group) + g) * 32;
    const __m512 sg = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sct)));
    const __m512 cg = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sct + 16)));
    for (int m = 0; m < M; ++m)
      tot[m] = _mm512_fmadd_ps(cg, _mm512_set1_ps(X[m * (K / group) + g]), _mm512_fmadd_ps(sg, acc[m], tot[m]));
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * N + t * 16, tot[m]);
}

// (s, o) of rows [16 t, 16 t + 16) in group g of G, from so [N/16, G, 16, 2] bf16 read as 32-bit words (s in the low
// half, o in the high one), in float32 (exact)
inline void scales_offsets(const uint32_t* sz, int64_t g, int64_t t, int64_t G, __m512& s, __m512& o) {
  const __m512i so = _mm512_loadu_si512(sz + (t * G + g) * 16);
  s = _mm512_castsi512_ps(_mm512_slli_epi32(so, 16));
  o = _mm512_castsi512_ps(_mm512_and_si512(so, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

// Weight-only: rows [16 t, 16 t + 16) of y for the M rows of x as split_rows writes them (xh, xl [M, K]; Q
// [M, K/group] the groups' sums of q; a [M] the rows' grids). Per group the exact integer sum_k u q = 128 sum u xh
// + sum u xl (vpdpbusd: the codes unsigned, x's parts signed, 16 output rows in the lanes of a register; four
// instructions per 8 inputs, two chains for each part), then y += s dot + (o - 8 s) Q in float32, times a at the end.
// Lanes stay within int32 for groups of up to 8192 inputs.
template <int M>
void tile_w4(const uint8_t* w, const uint32_t* sz, const int8_t* xh, const int8_t* xl, const int64_t* Q,
             const float* a, float* y, int64_t t, int64_t N, int64_t K, int64_t group) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* wt = w + t * (K / 8) * 64;
  const int64_t G = K / group;
  __m512 tot[M];
  for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i h0[M], h1[M], l0[M], l1[M];
    for (int m = 0; m < M; ++m) h0[m] = h1[m] = l0[m] = l1[m] = _mm512_setzero_si512();
    for (int64_t k8 = g * group / 8; k8 < (g + 1) * group / 8; ++k8) {  // 8 inputs a step
      _mm_prefetch(reinterpret_cast<const char*>(wt + k8 * 64) + PREFETCH, _MM_HINT_T0);
      const __m512i v = _mm512_loadu_si512(wt + k8 * 64);  // lane l: row 16 t + l, byte j: inputs j, 4 + j
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int m = 0; m < M; ++m) {
        const int64_t i = m * K + k8 * 8;
        h0[m] = _mm512_dpbusd_epi32(h0[m], lo, bcast4(xh + i));
        h1[m] = _mm512_dpbusd_epi32(h1[m], hi, bcast4(xh + i + 4));
        l0[m] = _mm512_dpbusd_epi32(l0[m], lo, bcast4(xl + i));
        l1[m] = _mm512_dpbusd_epi32(l1[m], hi, bcast4(xl + i + 4));
      }
    }
    __m512 sg, og;
    scales_offsets(sz, g, t, G, sg, og);
    const __m512 cg = _mm512_sub_ps(og, _mm512_mul_ps(_mm512_set1_ps(8.f), sg));  // o - 8 s (8 s exact)
    for (int m = 0; m < M; ++m) {
      const __m512i dot = _mm512_add_epi32(_mm512_slli_epi32(_mm512_add_epi32(h0[m], h1[m]), 7),
                                           _mm512_add_epi32(l0[m], l1[m]));
      tot[m] = _mm512_fmadd_ps(cg, _mm512_set1_ps(static_cast<float>(Q[m * G + g])),
                               _mm512_fmadd_ps(sg, _mm512_cvtepi32_ps(dot), tot[m]));
    }
  }
  for (int m = 0; m < M; ++m) _mm512_storeu_ps(y + m * N + t * 16, _mm512_mul_ps(tot[m], _mm512_set1_ps(a[m])));
}

// tile(std::integral_constant<int, M>{}, t) for every tile t of 16 output rows, in parallel (M: rows of x, 1-4)
template <typename F>
void for_tiles(int64_t M, int64_t N, F tile) {
  at::parallel_for(0, N / 16, 4, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) switch (M) {
        case 1: tile(std::integral_constant<int, 1>{}, t); break;
        case 2: tile(std::integral_constant<int, 2>{}, t); break;
        case 3: tile(std::integral_constant<int, 3>{}, t); break;
        default: tile(std::integral_constant<int, 4>{}, t); break;
      }
  });
}

}  // namespace

// The product on raw pointers (w4a8_linear below, decode_block.cpp's step): x [M, K] float32 (1 <= M <= 4), packed
// and sc as w4a8_linear's -> y [M, N] float32.
void w4a8_into(const float* x, const uint8_t* w, const uint16_t* sc, float* y, int64_t M, int64_t N, int64_t K,
               int64_t group) {
  std::vector<int8_t> q(M * K);
  std::vector<float> d(M * K / QK), X(M * K / group);
  quantize_rows(x, M, K, group, q.data(), d.data(), X.data());
  const int8_t* qp = q.data();
  const float* dp = d.data();
  const float* Xp = X.data();
  for_tiles(M, N, [&](auto m, int64_t t) { tile<m()>(w, sc, qp, dp, Xp, y, t, N, K, group); });
}

inline void check_sc(const torch::Tensor& sc, int64_t N, int64_t K, int64_t group) {
  TORCH_CHECK(sc.scalar_type() == torch::kHalf && sc.dim() == 3 && sc.size(0) * 16 == N && sc.size(1) * group == K &&
              sc.size(2) == 32 && sc.is_contiguous(), "scales and corrections: contiguous float16 [", N / 16, ", ",
              K / group, ", 32], got ", sc.sizes(), " ", sc.scalar_type());
}

// x [M, K] float32 (M <= 4), packed [N/16, K/8, 64] uint8, scales and corrections sc [N/16, K/group, 32] float16
// -> [M, N]
torch::Tensor w4a8_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor sc, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16;
  TORCH_CHECK(M >= 1 && M <= MAX_ROWS, "1 to ", MAX_ROWS, " rows, got ", M);
  TORCH_CHECK(group % QK == 0 && K % group == 0, "in_features ", K, " must be a multiple of group ", group,
              ", a multiple of 32");
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 3 && packed.size(1) * 8 == K &&
              packed.size(2) == 64 && packed.is_contiguous(), "packed: contiguous uint8 [N/16, K/8, 64]");
  check_sc(sc, N, K, group);
  auto y = torch::empty({M, N}, x.options());
  w4a8_into(x.data_ptr<float>(), packed.data_ptr<uint8_t>(),
            reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()), y.data_ptr<float>(), M, N, K, group);
  return y;
}

// The weights for products of many rows (prefill): w^T [K, N] = (u s + c)^T in float32 or bfloat16 (rounded to
// nearest even), from the same packed bytes; one pass, 16 rows of a tile per register.
torch::Tensor w4a8_dequantize_t(torch::Tensor packed, torch::Tensor sc, int64_t group, at::ScalarType dtype) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 3 && packed.size(2) == 64 &&
              packed.is_contiguous(), "packed: contiguous uint8 [N/16, K/8, 64]");
  const int64_t N = packed.size(0) * 16, K8 = packed.size(1), K = K8 * 8;
  TORCH_CHECK(group % 8 == 0 && K % group == 0, "in_features ", K, " must be a multiple of group ", group);
  check_sc(sc, N, K, group);
  TORCH_CHECK(dtype == torch::kFloat || dtype == torch::kBFloat16, "dtype: float32 or bfloat16, got ", dtype);
  auto out = torch::empty({K, N}, packed.options().dtype(dtype));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const auto* scp = reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>());
  const bool bf16 = dtype == torch::kBFloat16;
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t esize = bf16 ? 2 : 4;
  at::parallel_for(0, K8, 8, [&](int64_t k0, int64_t k1) {
    const __m512i low = _mm512_set1_epi32(0x0F), one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7FFF);
    for (int64_t k8 = k0; k8 < k1; ++k8) {
      const int64_t g = k8 * 8 / group;
      for (int64_t t = 0; t < N / 16; ++t) {
        const __m512i v = _mm512_loadu_si512(w + (t * K8 + k8) * 64);  // lane l: row 16 t + l, byte j: inputs j, 4 + j
        const uint16_t* sct = scp + (t * (K / group) + g) * 32;
        const __m512 sg = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sct)));
        const __m512 cg = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sct + 16)));
        for (int j = 0; j < 8; ++j) {  // input k8 * 8 + j: byte j % 4 of each lane, low nibble for j < 4
          const __m512i u = _mm512_and_si512(_mm512_srli_epi32(v, 8 * (j % 4) + 4 * (j / 4)), low);
          const __m512 x = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(u), sg), cg);  // two roundings, as torch
          char* dst = o + ((k8 * 8 + j) * N + t * 16) * esize;
          if (!bf16) {
            _mm512_storeu_ps(dst, x);
          } else {
            const __m512i b = _mm512_castps_si512(x);
            const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
          }
        }
      }
    }
  });
  return out;
}

// Weight-only, on raw pointers (w4_linear below, decode_block.cpp's step): x [M, K] float32 (1 <= M <= 4), packed
// [N/16, K/8, 64], sz [N/16, K/group, 16, 2] bf16 as 32-bit words -> y [M, N] float32
void w4_into(const float* x, const uint8_t* w, const uint32_t* sz, float* y, int64_t M, int64_t N, int64_t K,
             int64_t group) {
  std::vector<int8_t> xh(M * K), xl(M * K);
  std::vector<int64_t> Q(M * (K / group));
  float a[MAX_ROWS];
  split_rows(x, M, K, group, xh.data(), xl.data(), a, Q.data());
  const int8_t *xhp = xh.data(), *xlp = xl.data();
  const int64_t* Qp = Q.data();
  for_tiles(M, N, [&](auto m, int64_t t) { tile_w4<m()>(w, sz, xhp, xlp, Qp, a, y, t, N, K, group); });
}

inline void check_sz(const torch::Tensor& sz, int64_t N, int64_t K, int64_t group) {
  TORCH_CHECK(sz.scalar_type() == torch::kBFloat16 && sz.dim() == 4 && sz.size(0) * 16 == N &&
              sz.size(1) * group == K && sz.size(2) == 16 && sz.size(3) == 2 && sz.is_contiguous(),
              "scales and offsets: contiguous bfloat16 [", N / 16, ", ", K / group, ", 16, 2], got ", sz.sizes(), " ",
              sz.scalar_type());
}

inline void check_packed(const torch::Tensor& packed, int64_t group) {
  TORCH_CHECK(packed.scalar_type() == torch::kUInt8 && packed.dim() == 3 && packed.size(2) == 64 &&
              packed.is_contiguous(), "packed: contiguous uint8 [N/16, K/8, 64]");
  TORCH_CHECK(group % 8 == 0 && group <= 8192 && packed.size(1) * 8 % group == 0, "in_features ",
              packed.size(1) * 8, " must be a multiple of group ", group, ", a multiple of 8 up to 8192");
}

// x [M, K] float32 (M <= 4), packed [N/16, K/8, 64] uint8, scales and offsets sz [N/16, K/group, 16, 2] bf16
// -> [M, N]
torch::Tensor w4_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor sz, int64_t group) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat && x.is_contiguous(), "x: contiguous float32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0) * 16;
  TORCH_CHECK(M >= 1 && M <= MAX_ROWS, "1 to ", MAX_ROWS, " rows, got ", M);
  check_packed(packed, group);
  TORCH_CHECK(packed.size(1) * 8 == K, "x has ", K, " inputs, the weight ", packed.size(1) * 8);
  check_sz(sz, N, K, group);
  auto y = torch::empty({M, N}, x.options());
  w4_into(x.data_ptr<float>(), packed.data_ptr<uint8_t>(), reinterpret_cast<const uint32_t*>(sz.data_ptr()),
          y.data_ptr<float>(), M, N, K, group);
  return y;
}

// w^T [K, N] = ((u - 8) s + o)^T in float32 (two roundings, as Int4Linear.dequantize) from the same bytes
torch::Tensor w4_dequantize_t(torch::Tensor packed, torch::Tensor sz, int64_t group) {
  check_packed(packed, group);
  const int64_t N = packed.size(0) * 16, K8 = packed.size(1), K = K8 * 8;
  check_sz(sz, N, K, group);
  auto out = torch::empty({K, N}, packed.options().dtype(torch::kFloat));
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const auto* szp = reinterpret_cast<const uint32_t*>(sz.data_ptr());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, K8, 8, [&](int64_t k0, int64_t k1) {
    const __m512i low = _mm512_set1_epi32(0x0F);
    const __m512 eight = _mm512_set1_ps(8.f);
    for (int64_t k8 = k0; k8 < k1; ++k8) {
      const int64_t g = k8 * 8 / group;
      for (int64_t t = 0; t < N / 16; ++t) {
        const __m512i v = _mm512_loadu_si512(w + (t * K8 + k8) * 64);
        __m512 sg, og;
        scales_offsets(szp, g, t, K / group, sg, og);
        for (int j = 0; j < 8; ++j) {
          const __m512i u = _mm512_and_si512(_mm512_srli_epi32(v, 8 * (j % 4) + 4 * (j / 4)), low);
          const __m512 wv = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(u), eight), sg), og);
          _mm512_storeu_ps(o + (k8 * 8 + j) * N + t * 16, wv);
        }
      }
    }
  });
  return out;
}

TORCH_LIBRARY(mm_w4a8, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor sc, int group) -> Tensor");
  m.def("dequantize_t(Tensor packed, Tensor sc, int group, ScalarType dtype) -> Tensor");
  m.def("w4_linear(Tensor x, Tensor packed, Tensor sz, int group) -> Tensor");
  m.def("w4_dequantize_t(Tensor packed, Tensor sz, int group) -> Tensor");
}
TORCH_LIBRARY_IMPL(mm_w4a8, CPU, m) {
  m.impl("linear", &w4a8_linear);
  m.impl("dequantize_t", &w4a8_dequantize_t);
  m.impl("w4_linear", &w4_linear);
  m.impl("w4_dequantize_t", &w4_dequantize_t);
}

// One Llama block for one token (batch 1) of an eager CPU decode step, in one call: what the Python block does in
// ~45 PyTorch calls (decoders/llama.py Block.forward), with the same roundings, so eager decoding costs the kernels'
// time rather than Python's. The products run on linear.cpp's row kernel, attention on decode_attention.cpp's.
// `step` runs a whole step so: the token's embedding, every block, the final RMSNorm and the head, one call a token
// instead of one a block and ~20 PyTorch calls around them (10M float32: 1.16 -> 0.73 ms a token). The step's
// linears may also be quantized as decoders/qlinear.py's W8A8Linear and W4A8Linear compute them (`Product`).
//
//   h = rmsnorm(x) ln1;  q, k, v = h Wqkv^T;  q, k = rope(q), rope(k);  cache[slot] = k, v
//   x = x + attend(q, cache) Wo^T;  h = rmsnorm(x) ln2;  g, u = h Wgu^T;  x = x + (silu(g) u) Wdown^T
//
// Every value the Python block rounds to its dtype is rounded here at the same point (bf16: nearest even), so
// float32 blocks agree to float32 rounding and bf16 blocks to the odd bf16 step where a sum's order differs.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

void rows_into(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K,
               const float* bias);  // linear.cpp
void rows_into(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t M, int64_t N, int64_t K,
               const float* bias);
void int8_rows_into(const int8_t* x, const int8_t* w, int32_t* y, int64_t M, int64_t N, int64_t K);  // linear.cpp
void w8_into(const float* x, const int8_t* w, const at::BFloat16* s, at::BFloat16* y, int64_t M, int64_t N,
             int64_t K);  // linear.cpp
void w4a8_into(const float* x, const uint8_t* w, const uint16_t* sc, float* y, int64_t M, int64_t N, int64_t K,
               int64_t group);  // w4a8.cpp
void w4_into(const float* x, const uint8_t* w, const uint32_t* sz, float* y, int64_t M, int64_t N, int64_t K,
             int64_t group);  // w4a8.cpp
void attention_into(const float* q, const float* k, const float* v, const float* mask, float* y, int64_t Hkv,
                    int64_t G, int64_t S, int64_t D);  // decode_attention.cpp
void attention_into(const at::BFloat16* q, const at::BFloat16* k, const at::BFloat16* v, const at::BFloat16* mask,
                    at::BFloat16* y, int64_t Hkv, int64_t G, int64_t S, int64_t D);

namespace {

template <typename T>
inline float f(T v) { return static_cast<float>(v); }
template <typename T>
inline T rnd(float v) { return static_cast<T>(v); }  // float32: exact; bf16: nearest even (c10::BFloat16)

// out = weight * (x * rsqrt(mean(x^2) + eps)).to(T), in float32 as RMSNorm.forward
template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t D, float eps) {
  float ss = 0.f;
  for (int64_t d = 0; d < D; ++d) ss += f(x[d]) * f(x[d]);
  const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
  for (int64_t d = 0; d < D; ++d) out[d] = rnd<T>(f(w[d]) * f(rnd<T>(f(x[d]) * r)));
}

// out = x * cos + cat(-x2, x1) * sin for one head of Dh (apply_rope: pairs (i, i + Dh/2))
template <typename T>
void rope(const T* x, const T* cos, const T* sin, T* out, int64_t Dh) {
  const int64_t half = Dh / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = f(x[i]), x2 = f(x[i + half]);
    out[i] = rnd<T>(f(rnd<T>(x1 * f(cos[i]))) + f(rnd<T>(-x2 * f(sin[i]))));
    out[i + half] = rnd<T>(f(rnd<T>(x2 * f(cos[i + half]))) + f(rnd<T>(x1 * f(sin[i + half]))));
  }
}

// One linear, y [N] = x [K] W^T, as its module computes it; the kind is read off the weight's dtype:
//   Plain  a weight [N, K] in x's dtype, no scales (Linear)
//   W8A8   int8 weight [N, K], float32 scales [N]; x quantized per token: a = max(max|x|, 1e-8) / 127,
//          q = round(x / a) (nearest even); y = (float(q W^T) a) s  (W8A8Linear, exact int32 sums)
//   W4A8   4-bit codes uint8 [N/16, K/8, 64] and float16 scales and corrections [N/16, K/group, 32]; x quantized
//          per block of 32 inputs (w4a8.cpp)  (W4A8Linear)
//   Int8   int8 weight [N, K], bf16 scales [N]; weight-only: x rounded to bf16, then 15-bit integers on a
//          power-of-two grid, exact integer sums (linear.cpp's split_rows, w8_into), y = bf16(sum a s)  (Int8Linear)
//   Int4   4-bit codes uint8 [N/16, K/8, 64] and bf16 scales and offsets [N/16, K/group, 16, 2]; weight-only:
//          x as for Int8, exact integer sums per group (w4a8.cpp's w4_into), y = bf16(...)  (Int4Linear)
// The result rounded to x's dtype once, as the modules' `.to(x.dtype)`.
enum class Kind { Plain, W8A8, W4A8, Int8, Int4 };
struct Product {
  Kind kind;
  const void* w;
  const void* s;
  int64_t N, K, group;
};

Product product_of(const torch::Tensor& w, const torch::Tensor& s, at::ScalarType dt, const char* name) {
  TORCH_CHECK(w.is_contiguous() && s.is_contiguous(), name, ": weight and scales contiguous");
  if (w.scalar_type() == dt) {
    TORCH_CHECK(w.dim() == 2 && s.numel() == 0, name, ": a weight [N, K] in x's dtype takes no scales; got ",
                w.sizes(), ", scales ", s.sizes());
    return {Kind::Plain, w.data_ptr(), nullptr, w.size(0), w.size(1), 0};
  }
  if (w.scalar_type() == torch::kChar) {
    TORCH_CHECK(w.dim() == 2 && (s.scalar_type() == torch::kFloat || s.scalar_type() == torch::kBFloat16) &&
                s.numel() == w.size(0), name, ": int8 [N, K] takes float32 (W8A8) or bf16 (weight-only) scales [N]; "
                "got ", w.sizes(), ", scales ", s.scalar_type(), " ", s.sizes());
    const Kind kind = s.scalar_type() == torch::kFloat ? Kind::W8A8 : Kind::Int8;
    return {kind, w.data_ptr(), s.data_ptr(), w.size(0), w.size(1), 0};
  }
  if (w.scalar_type() == torch::kByte && w.dim() == 3 && w.size(2) == 64 && s.scalar_type() == torch::kBFloat16) {
    const int64_t N = w.size(0) * 16, K = w.size(1) * 8;
    TORCH_CHECK(s.dim() == 4 && s.size(0) == w.size(0) && s.size(1) >= 1 && K % s.size(1) == 0 &&
                K / s.size(1) % 8 == 0 && s.size(2) == 16 && s.size(3) == 2, name, ": 4-bit codes [N/16, K/8, 64] "
                "take bf16 scales and offsets [N/16, K/group, 16, 2] (weight-only) or float16 [N/16, K/group, 32] "
                "(W4A8); got ", w.sizes(), ", scales ", s.sizes());
    return {Kind::Int4, w.data_ptr(), s.data_ptr(), N, K, K / s.size(1)};
  }
  TORCH_CHECK(w.scalar_type() == torch::kByte && w.dim() == 3 && w.size(2) == 64 && s.scalar_type() == torch::kHalf &&
              s.dim() == 3 && s.size(0) == w.size(0) && s.size(1) >= 1 && s.size(2) == 32 &&
              w.size(1) * 8 % s.size(1) == 0 && w.size(1) * 8 / s.size(1) % 32 == 0, name,
              ": a weight in x's dtype, W8A8 (int8) or W4A8 (uint8 [N/16, K/8, 64] with float16 scales [N/16, "
              "K/group, 32], group a multiple of 32); got ", w.scalar_type(), " ", w.sizes(), ", scales ",
              s.scalar_type(), " ", s.sizes());
  const int64_t K = w.size(1) * 8;
  return {Kind::W4A8, w.data_ptr(), s.data_ptr(), w.size(0) * 16, K, K / s.size(1)};
}

struct Layer {  // one block's weights: RMSNorm weights in x's dtype, products
  const void* ln1;
  Product qkv, o;
  const void* ln2;
  Product gate_up, down;
};

struct Shape {  // one block: model width, query / kv heads, head size, MLP width, cache slots
  int64_t D, H, Hkv, Dh, F, S;
};

// The block's weights w (ln1, qkv, o, ln2, gate_up, down) with scales s (qkv, o, gate_up, down; empty for weights in
// x's dtype) fit D and Dh: the layer, and its shape with H and F read off it
Layer layer_of(const torch::Tensor* w, const torch::Tensor* s, int64_t D, int64_t Hkv, int64_t Dh, int64_t S,
               at::ScalarType dt, Shape& shape) {
  for (int i : {0, 3})
    TORCH_CHECK(w[i].scalar_type() == dt && w[i].is_contiguous(), "RMSNorm weights contiguous in x's dtype");
  const Layer l{w[0].data_ptr(), product_of(w[1], s[0], dt, "qkv"), product_of(w[2], s[1], dt, "o"),
                w[3].data_ptr(), product_of(w[4], s[2], dt, "gate_up"), product_of(w[5], s[3], dt, "down")};
  TORCH_CHECK(l.qkv.N % Dh == 0, "qkv weight: [(H + 2 Hkv) Dh, D], got ", l.qkv.N, " rows");
  const int64_t H = l.qkv.N / Dh - 2 * Hkv;
  TORCH_CHECK(H > 0 && H % Hkv == 0, "qkv weight of ", l.qkv.N, " rows does not hold H + 2 x ", Hkv, " heads of ", Dh);
  TORCH_CHECK(w[0].numel() == D && w[3].numel() == D && l.qkv.K == D && l.o.N == D && l.o.K == H * Dh &&
              l.gate_up.K == D && l.down.N == D && l.gate_up.N == 2 * l.down.K, "block weights do not fit D = ", D);
  shape = {D, H, Hkv, Dh, l.down.K, S};
  return l;
}

template <typename T>
struct Scratch {  // a block's values between its products; the quantized products' own
  std::vector<T> h, qkv, q, y, o, gu, a;
  std::vector<int8_t> xq;  // W8A8: x's int8 codes
  std::vector<int32_t> acc;
  std::vector<float> xf, yf;  // W4A8, Int8, Int4: x and y in float32
  std::vector<at::BFloat16> yb;  // Int8 in a float32 step: y as w8_into rounds it
  explicit Scratch(const Shape& s)
      : h(s.D), qkv((s.H + 2 * s.Hkv) * s.Dh), q(s.H * s.Dh), y(s.H * s.Dh), o(s.D), gu(2 * s.F), a(s.F) {}
};

template <typename T>
void apply(const Product& p, const T* x, T* y, Scratch<T>& t) {
  const int64_t N = p.N, K = p.K;
  if (p.kind == Kind::Plain) {
    rows_into(x, static_cast<const T*>(p.w), y, 1, N, K, nullptr);
  } else if (p.kind == Kind::W8A8) {
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::abs(f(x[k])));
    const float a = std::max(amax, 1e-8f) / 127.f;
    t.xq.resize(K);  // a vector keeps its capacity when it shrinks: allocated once, for the largest product
    t.acc.resize(N);
    for (int64_t k = 0; k < K; ++k)
      t.xq[k] = static_cast<int8_t>(std::nearbyint(f(x[k]) / a));
    int8_rows_into(t.xq.data(), static_cast<const int8_t*>(p.w), t.acc.data(), 1, N, K);
    const float* s = static_cast<const float*>(p.s);
    for (int64_t n = 0; n < N; ++n) y[n] = rnd<T>(static_cast<float>(t.acc[n]) * a * s[n]);
  } else if (p.kind == Kind::Int8) {
    t.xf.resize(K);
    for (int64_t k = 0; k < K; ++k) t.xf[k] = f(x[k]);  // to bf16, then to the grid, in split_rows
    const auto* w = static_cast<const int8_t*>(p.w);
    const auto* s = static_cast<const at::BFloat16*>(p.s);
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      w8_into(t.xf.data(), w, s, y, 1, N, K);
    } else {
      t.yb.resize(N);
      w8_into(t.xf.data(), w, s, t.yb.data(), 1, N, K);
      for (int64_t n = 0; n < N; ++n) y[n] = f(t.yb[n]);
    }
  } else if (p.kind == Kind::Int4) {
    t.xf.resize(K);
    t.yf.resize(N);
    for (int64_t k = 0; k < K; ++k) t.xf[k] = f(x[k]);  // to bf16, then to the grid, in split_rows
    w4_into(t.xf.data(), static_cast<const uint8_t*>(p.w), static_cast<const uint32_t*>(p.s), t.yf.data(), 1, N, K,
            p.group);
    for (int64_t n = 0; n < N; ++n) y[n] = rnd<T>(f(rnd<at::BFloat16>(t.yf[n])));
  } else if constexpr (std::is_same_v<T, float>) {  // W4A8 takes and gives float32
    w4a8_into(x, static_cast<const uint8_t*>(p.w), static_cast<const uint16_t*>(p.s), y, 1, N, K, p.group);
  } else {
    t.xf.resize(K);
    t.yf.resize(N);
    for (int64_t k = 0; k < K; ++k) t.xf[k] = f(x[k]);
    w4a8_into(t.xf.data(), static_cast<const uint8_t*>(p.w), static_cast<const uint16_t*>(p.s), t.yf.data(), 1, N, K,
              p.group);
    for (int64_t n = 0; n < N; ++n) y[n] = rnd<T>(t.yf[n]);
  }
}

// x [D] <- the block on x. l: its weights; cos, sin [Dh] at this token's position; caches [Hkv, S, Dh], written at
// slot; mask [S] additive or null.
template <typename T>
void block(T* x, const Layer& l, const T* cos, const T* sin, T* k_cache, T* v_cache, int64_t slot,
           const T* mask, const Shape& s, float eps, Scratch<T>& t) {
  const int64_t D = s.D, H = s.H, Hkv = s.Hkv, Dh = s.Dh, F = s.F, S = s.S;
  rms_norm(x, static_cast<const T*>(l.ln1), t.h.data(), D, eps);
  apply(l.qkv, t.h.data(), t.qkv.data(), t);
  const T* qkv = t.qkv.data();
  for (int64_t j = 0; j < H; ++j) rope(qkv + j * Dh, cos, sin, t.q.data() + j * Dh, Dh);  // head j reads kv j / G
  for (int64_t j = 0; j < Hkv; ++j) {
    rope(qkv + (H + j) * Dh, cos, sin, k_cache + (j * S + slot) * Dh, Dh);
    std::copy_n(qkv + (H + Hkv + j) * Dh, Dh, v_cache + (j * S + slot) * Dh);
  }
  attention_into(t.q.data(), k_cache, v_cache, mask, t.y.data(), Hkv, H / Hkv, S, Dh);
  apply(l.o, t.y.data(), t.o.data(), t);
  for (int64_t d = 0; d < D; ++d) x[d] = rnd<T>(f(x[d]) + f(t.o[d]));
  rms_norm(x, static_cast<const T*>(l.ln2), t.h.data(), D, eps);
  apply(l.gate_up, t.h.data(), t.gu.data(), t);  // gate, up
  for (int64_t i = 0; i < F; ++i) {
    const float g = f(t.gu[i]);
    t.a[i] = rnd<T>(f(rnd<T>(g / (1.f + std::exp(-g)))) * f(t.gu[F + i]));  // silu(gate) * up
  }
  apply(l.down, t.a.data(), t.o.data(), t);
  for (int64_t d = 0; d < D; ++d) x[d] = rnd<T>(f(x[d]) + f(t.o[d]));
}

void check_cache(const torch::Tensor& k, const torch::Tensor& v, int64_t Hkv, at::ScalarType dt) {
  TORCH_CHECK(k.dim() == 4 && k.size(0) == 1 && k.sizes() == v.sizes() && k.size(1) == Hkv,
              "caches [1, ", Hkv, ", S, Dh]; got ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && k.is_contiguous() && v.is_contiguous(),
              "caches contiguous in x's dtype");
}

template <typename T>
torch::Tensor run_block(torch::Tensor x, const Layer& l, torch::Tensor cos, torch::Tensor sin, torch::Tensor k_cache,
                        torch::Tensor v_cache, int64_t slot, c10::optional<torch::Tensor> mask, const Shape& s,
                        double eps) {
  auto y = x.clone();
  Scratch<T> t(s);
  block<T>(y.data_ptr<T>(), l, cos.data_ptr<T>(), sin.data_ptr<T>(), k_cache.data_ptr<T>(), v_cache.data_ptr<T>(),
           slot, mask ? mask->data_ptr<T>() : nullptr, s, static_cast<float>(eps), t);
  return y;
}

template <typename T>
torch::Tensor run_step(int64_t token, int64_t position, int64_t slot, const bool* key_mask, torch::Tensor embed,
                       const std::vector<Layer>& layers, torch::Tensor norm, const Product& head, torch::Tensor cos,
                       torch::Tensor sin, const std::vector<torch::Tensor>& k_caches,
                       const std::vector<torch::Tensor>& v_caches, const Shape& s, double eps) {
  const float e = static_cast<float>(eps);
  std::vector<T> x(embed.data_ptr<T>() + token * s.D, embed.data_ptr<T>() + (token + 1) * s.D);
  std::vector<T> mask(s.S);  // additive: 0 where the slot is attended to, -inf where not
  for (int64_t j = 0; j < s.S; ++j) mask[j] = key_mask[j] ? T(0.f) : T(-std::numeric_limits<float>::infinity());
  const T* c = cos.data_ptr<T>() + position * s.Dh;
  const T* sn = sin.data_ptr<T>() + position * s.Dh;
  Scratch<T> t(s);
  for (size_t l = 0; l < layers.size(); ++l)
    block<T>(x.data(), layers[l], c, sn, k_caches[l].data_ptr<T>(), v_caches[l].data_ptr<T>(), slot, mask.data(), s,
             e, t);
  rms_norm(x.data(), norm.data_ptr<T>(), t.h.data(), s.D, e);
  auto logits = torch::empty({1, head.N}, embed.options());
  apply(head, t.h.data(), logits.data_ptr<T>(), t);
  return logits;
}

}  // namespace

// x [1, D]; weights: input_layernorm [D], qkv [(H + 2 Hkv) Dh, D], o [D, H Dh], post_attention_layernorm [D],
// gate_up [2F, D], down [D, F]; cos, sin [Dh] at this token's position; k_cache, v_cache [1, Hkv, S, Dh], written at
// slot[0]; mask [1, 1, 1, S] additive or None. All contiguous, float32 or bf16 alike. -> x after the block [1, D]
torch::Tensor decode_block(torch::Tensor x, std::vector<torch::Tensor> w, torch::Tensor cos, torch::Tensor sin,
                           torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot,
                           c10::optional<torch::Tensor> mask, int64_t n_kv_heads, double eps) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == torch::kFloat || dt == torch::kBFloat16, "float32 or bfloat16, got ", dt);
  TORCH_CHECK(w.size() == 6, "6 weights: ln1, qkv, o, ln2, gate_up, down; got ", w.size());
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && x.is_contiguous(), "x [1, D] contiguous; got ", x.sizes());
  check_cache(k_cache, v_cache, n_kv_heads, dt);
  const int64_t D = x.size(1), Dh = k_cache.size(3), S = k_cache.size(2);
  TORCH_CHECK(cos.numel() == Dh && sin.numel() == Dh && Dh % 2 == 0, "cos, sin: [", Dh, "]");
  for (const auto& t : {cos, sin}) TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "cos, sin in x's dtype");
  if (mask)
    TORCH_CHECK(mask->numel() == S && mask->scalar_type() == dt && mask->is_contiguous(), "mask: [1, 1, 1, ", S,
                "] in x's dtype");
  const std::vector<torch::Tensor> none(4, torch::empty({0}));
  Shape s;
  const Layer l = layer_of(w.data(), none.data(), D, n_kv_heads, Dh, S, dt, s);
  const int64_t at = slot.item<int64_t>();
  TORCH_CHECK(at >= 0 && at < S, "slot ", at, " outside the cache's ", S, " slots");
  if (dt == torch::kFloat) return run_block<float>(x, l, cos, sin, k_cache, v_cache, at, mask, s, eps);
  return run_block<at::BFloat16>(x, l, cos, sin, k_cache, v_cache, at, mask, s, eps);
}

// A whole one-token step of a batch-1 Llama: token, position [1, 1] (int64), slot [1] (the cache slot written),
// key_mask [1, S] bool (the slots attended to, this one included); embed [V, D]; layers: each block's 6 weights
// (as decode_block, or quantized: `Product`), one after the other; scales: each block's 4 linears' (qkv, o,
// gate_up, down), then the head's, empty for a weight in the embedding's dtype; norm [D]; head [V', D] (or
// quantized); cos, sin [P, Dh]: RoPE at positions 0..P-1; k_caches, v_caches: each layer's [1, Hkv, S, Dh].
// -> logits [1, V'] in the embedding's dtype
torch::Tensor decode_step(torch::Tensor token, torch::Tensor position, torch::Tensor slot, torch::Tensor key_mask,
                          torch::Tensor embed, std::vector<torch::Tensor> layers, std::vector<torch::Tensor> scales,
                          torch::Tensor norm, torch::Tensor head, torch::Tensor cos, torch::Tensor sin,
                          std::vector<torch::Tensor> k_caches, std::vector<torch::Tensor> v_caches, int64_t n_kv_heads,
                          double eps) {
  const auto dt = embed.scalar_type();
  TORCH_CHECK(dt == torch::kFloat || dt == torch::kBFloat16, "float32 or bfloat16, got ", dt);
  const size_t L = k_caches.size();
  TORCH_CHECK(L >= 1 && v_caches.size() == L && layers.size() == 6 * L && scales.size() == 4 * L + 1, L,
              " layers take ", L, " k and v caches, ", 6 * L, " weights and ", 4 * L + 1, " scales; got ",
              v_caches.size(), ", ", layers.size(), " and ", scales.size());
  const int64_t S = k_caches[0].size(2), Dh = k_caches[0].size(3), D = embed.size(1), V = embed.size(0);
  std::vector<Layer> ls;
  Shape s;
  for (size_t l = 0; l < L; ++l) {
    check_cache(k_caches[l], v_caches[l], n_kv_heads, dt);
    TORCH_CHECK(k_caches[l].sizes() == k_caches[0].sizes(), "every layer's cache as the first's");
    Shape sl;
    ls.push_back(layer_of(layers.data() + 6 * l, scales.data() + 4 * l, D, n_kv_heads, Dh, S, dt, sl));
    if (l == 0) s = sl;
    TORCH_CHECK(sl.H == s.H && sl.F == s.F, "layer ", l, " is not shaped as layer 0");
  }
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() && norm.numel() == D && norm.scalar_type() == dt &&
              norm.is_contiguous(), "embed [V, D], norm [D], contiguous in one dtype");
  const Product h = product_of(head, scales.back(), dt, "head");
  TORCH_CHECK(h.K == D, "head: [V', ", D, "], got ", head.sizes());
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == Dh && cos.sizes() == sin.sizes() && cos.scalar_type() == dt &&
              sin.scalar_type() == dt && cos.is_contiguous() && sin.is_contiguous(), "cos, sin: [P, ", Dh, "]");
  TORCH_CHECK(key_mask.scalar_type() == torch::kBool && key_mask.numel() == S && key_mask.is_contiguous(),
              "key_mask: [1, ", S, "] bool");
  const int64_t tok = token.item<int64_t>(), pos = position.item<int64_t>(), at = slot.item<int64_t>();
  TORCH_CHECK(tok >= 0 && tok < V, "token ", tok, " outside the vocabulary of ", V);
  TORCH_CHECK(pos >= 0 && pos < cos.size(0), "position ", pos, " beyond the ", cos.size(0), " RoPE rows given");
  TORCH_CHECK(at >= 0 && at < S, "slot ", at, " outside the cache's ", S, " slots");
  const bool* km = key_mask.data_ptr<bool>();
  if (dt == torch::kFloat)
    return run_step<float>(tok, pos, at, km, embed, ls, norm, h, cos, sin, k_caches, v_caches, s, eps);
  return run_step<at::BFloat16>(tok, pos, at, km, embed, ls, norm, h, cos, sin, k_caches, v_caches, s, eps);
}

TORCH_LIBRARY(mm_decode, m) {
  m.def("block(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot, Tensor? mask, int n_kv_heads, float eps) -> Tensor");
  m.def("step(Tensor token, Tensor position, Tensor slot, Tensor key_mask, Tensor embed, Tensor[] layers, "
        "Tensor[] scales, Tensor norm, Tensor head, Tensor cos, Tensor sin, Tensor(a!)[] k_caches, "
        "Tensor(b!)[] v_caches, int n_kv_heads, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(mm_decode, CPU, m) {
  m.impl("block", &decode_block);
  m.impl("step", &decode_step);
}

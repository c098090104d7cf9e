// One Llama block for one token (batch 1) of an eager CPU decode step, in one call: what the Python block does in
// ~45 PyTorch calls (decoders/llama.py Block.forward), with the same roundings, so eager decoding costs the kernels'
// time rather than Python's. The products run on linear.cpp's row kernel, attention on decode_attention.cpp's.
// `step` runs a whole step so: the token's embedding, every block, the final RMSNorm and the head, one call a token
// instead of one a block and ~20 PyTorch calls around them (10M float32: 1.16 -> 0.73 ms a token).
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
#include <vector>

void rows_into(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K,
               const float* bias);  // linear.cpp
void rows_into(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t M, int64_t N, int64_t K,
               const float* bias);
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

struct Shape {  // one block: model width, query / kv heads, head size, MLP width, cache slots
  int64_t D, H, Hkv, Dh, F, S;
};

// The block's weights (ln1, qkv, o, ln2, gate_up, down) fit D and Dh: the shape, with H and F read off them
Shape check_block(const torch::Tensor* w, int64_t D, int64_t Hkv, int64_t Dh, int64_t S, at::ScalarType dt) {
  TORCH_CHECK(w[1].dim() == 2 && w[1].size(0) % Dh == 0, "qkv weight: [(H + 2 Hkv) Dh, D], got ", w[1].sizes());
  const int64_t H = w[1].size(0) / Dh - 2 * Hkv;
  TORCH_CHECK(H > 0 && H % Hkv == 0, "qkv weight ", w[1].sizes(), " does not hold H + 2 x ", Hkv, " heads of ", Dh);
  TORCH_CHECK(w[0].numel() == D && w[3].numel() == D && w[1].size(1) == D && w[2].dim() == 2 && w[2].size(0) == D &&
              w[2].size(1) == H * Dh && w[4].dim() == 2 && w[4].size(1) == D && w[5].dim() == 2 &&
              w[5].size(0) == D && w[4].size(0) == 2 * w[5].size(1), "block weights do not fit D = ", D);
  for (int i = 0; i < 6; ++i)
    TORCH_CHECK(w[i].scalar_type() == dt && w[i].is_contiguous(), "every weight contiguous in x's dtype");
  return {D, H, Hkv, Dh, w[5].size(1), S};
}

template <typename T>
struct Scratch {  // a block's values between its products
  std::vector<T> h, qkv, q, y, o, gu, a;
  explicit Scratch(const Shape& s)
      : h(s.D), qkv((s.H + 2 * s.Hkv) * s.Dh), q(s.H * s.Dh), y(s.H * s.Dh), o(s.D), gu(2 * s.F), a(s.F) {}
};

// x [D] <- the block on x. w: its 6 weights; cos, sin [Dh] at this token's position; caches [Hkv, S, Dh], written at
// slot; mask [S] additive or null.
template <typename T>
void block(T* x, const torch::Tensor* w, const T* cos, const T* sin, T* k_cache, T* v_cache, int64_t slot,
           const T* mask, const Shape& s, float eps, Scratch<T>& t) {
  const int64_t D = s.D, H = s.H, Hkv = s.Hkv, Dh = s.Dh, F = s.F, S = s.S;
  rms_norm(x, w[0].data_ptr<T>(), t.h.data(), D, eps);
  rows_into(t.h.data(), w[1].data_ptr<T>(), t.qkv.data(), 1, (H + 2 * Hkv) * Dh, D, nullptr);
  const T* qkv = t.qkv.data();
  for (int64_t j = 0; j < H; ++j) rope(qkv + j * Dh, cos, sin, t.q.data() + j * Dh, Dh);  // head j reads kv j / G
  for (int64_t j = 0; j < Hkv; ++j) {
    rope(qkv + (H + j) * Dh, cos, sin, k_cache + (j * S + slot) * Dh, Dh);
    std::copy_n(qkv + (H + Hkv + j) * Dh, Dh, v_cache + (j * S + slot) * Dh);
  }
  attention_into(t.q.data(), k_cache, v_cache, mask, t.y.data(), Hkv, H / Hkv, S, Dh);
  rows_into(t.y.data(), w[2].data_ptr<T>(), t.o.data(), 1, D, H * Dh, nullptr);
  for (int64_t d = 0; d < D; ++d) x[d] = rnd<T>(f(x[d]) + f(t.o[d]));
  rms_norm(x, w[3].data_ptr<T>(), t.h.data(), D, eps);
  rows_into(t.h.data(), w[4].data_ptr<T>(), t.gu.data(), 1, 2 * F, D, nullptr);  // gate, up
  for (int64_t i = 0; i < F; ++i) {
    const float g = f(t.gu[i]);
    t.a[i] = rnd<T>(f(rnd<T>(g / (1.f + std::exp(-g)))) * f(t.gu[F + i]));  // silu(gate) * up
  }
  rows_into(t.a.data(), w[5].data_ptr<T>(), t.o.data(), 1, D, F, nullptr);
  for (int64_t d = 0; d < D; ++d) x[d] = rnd<T>(f(x[d]) + f(t.o[d]));
}

void check_cache(const torch::Tensor& k, const torch::Tensor& v, int64_t Hkv, at::ScalarType dt) {
  TORCH_CHECK(k.dim() == 4 && k.size(0) == 1 && k.sizes() == v.sizes() && k.size(1) == Hkv,
              "caches [1, ", Hkv, ", S, Dh]; got ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt && k.is_contiguous() && v.is_contiguous(),
              "caches contiguous in x's dtype");
}

template <typename T>
torch::Tensor run_block(torch::Tensor x, const std::vector<torch::Tensor>& w, torch::Tensor cos, torch::Tensor sin,
                        torch::Tensor k_cache, torch::Tensor v_cache, int64_t slot, c10::optional<torch::Tensor> mask,
                        const Shape& s, double eps) {
  auto y = x.clone();
  Scratch<T> t(s);
  block<T>(y.data_ptr<T>(), w.data(), cos.data_ptr<T>(), sin.data_ptr<T>(), k_cache.data_ptr<T>(),
           v_cache.data_ptr<T>(), slot, mask ? mask->data_ptr<T>() : nullptr, s, static_cast<float>(eps), t);
  return y;
}

template <typename T>
torch::Tensor run_step(int64_t token, int64_t position, int64_t slot, const bool* key_mask, torch::Tensor embed,
                       const std::vector<torch::Tensor>& layers, torch::Tensor norm, torch::Tensor head,
                       torch::Tensor cos, torch::Tensor sin, const std::vector<torch::Tensor>& k_caches,
                       const std::vector<torch::Tensor>& v_caches, const Shape& s, double eps) {
  const float e = static_cast<float>(eps);
  std::vector<T> x(embed.data_ptr<T>() + token * s.D, embed.data_ptr<T>() + (token + 1) * s.D);
  std::vector<T> mask(s.S);  // additive: 0 where the slot is attended to, -inf where not
  for (int64_t j = 0; j < s.S; ++j) mask[j] = key_mask[j] ? T(0.f) : T(-std::numeric_limits<float>::infinity());
  const T* c = cos.data_ptr<T>() + position * s.Dh;
  const T* sn = sin.data_ptr<T>() + position * s.Dh;
  Scratch<T> t(s);
  for (size_t l = 0; l < k_caches.size(); ++l)
    block<T>(x.data(), layers.data() + 6 * l, c, sn, k_caches[l].data_ptr<T>(), v_caches[l].data_ptr<T>(), slot,
             mask.data(), s, e, t);
  rms_norm(x.data(), norm.data_ptr<T>(), t.h.data(), s.D, e);
  auto logits = torch::empty({1, head.size(0)}, embed.options());
  rows_into(t.h.data(), head.data_ptr<T>(), logits.data_ptr<T>(), 1, head.size(0), s.D, nullptr);
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
  const Shape s = check_block(w.data(), D, n_kv_heads, Dh, S, dt);
  const int64_t at = slot.item<int64_t>();
  TORCH_CHECK(at >= 0 && at < S, "slot ", at, " outside the cache's ", S, " slots");
  if (dt == torch::kFloat) return run_block<float>(x, w, cos, sin, k_cache, v_cache, at, mask, s, eps);
  return run_block<at::BFloat16>(x, w, cos, sin, k_cache, v_cache, at, mask, s, eps);
}

// A whole one-token step of a batch-1 Llama: token, position [1, 1] (int64), slot [1] (the cache slot written),
// key_mask [1, S] bool (the slots attended to, this one included); embed [V, D]; layers: each block's 6 weights
// (as decode_block), one after the other; norm [D]; head [V', D]; cos, sin [P, Dh]: RoPE at positions 0..P-1;
// k_caches, v_caches: each layer's [1, Hkv, S, Dh]. -> logits [1, V'] in the weights' dtype
torch::Tensor decode_step(torch::Tensor token, torch::Tensor position, torch::Tensor slot, torch::Tensor key_mask,
                          torch::Tensor embed, std::vector<torch::Tensor> layers, torch::Tensor norm,
                          torch::Tensor head, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> k_caches,
                          std::vector<torch::Tensor> v_caches, int64_t n_kv_heads, double eps) {
  const auto dt = embed.scalar_type();
  TORCH_CHECK(dt == torch::kFloat || dt == torch::kBFloat16, "float32 or bfloat16, got ", dt);
  const size_t L = k_caches.size();
  TORCH_CHECK(L >= 1 && v_caches.size() == L && layers.size() == 6 * L, L, " layers take ", L,
              " k and v caches and ", 6 * L, " weights; got ", v_caches.size(), " and ", layers.size());
  check_cache(k_caches[0], v_caches[0], n_kv_heads, dt);
  const int64_t S = k_caches[0].size(2), Dh = k_caches[0].size(3), D = embed.size(1), V = embed.size(0);
  const Shape s = check_block(layers.data(), D, n_kv_heads, Dh, S, dt);
  for (size_t l = 1; l < L; ++l) {  // every other layer as the first
    check_cache(k_caches[l], v_caches[l], n_kv_heads, dt);
    TORCH_CHECK(k_caches[l].sizes() == k_caches[0].sizes(), "every layer's cache as the first's");
    const Shape sl = check_block(layers.data() + 6 * l, D, n_kv_heads, Dh, S, dt);
    TORCH_CHECK(sl.H == s.H && sl.F == s.F, "layer ", l, " is not shaped as layer 0");
  }
  TORCH_CHECK(embed.dim() == 2 && embed.is_contiguous() && norm.numel() == D && norm.scalar_type() == dt &&
              head.dim() == 2 && head.size(1) == D && head.scalar_type() == dt && head.is_contiguous(),
              "embed [V, D], norm [D], head [V', D], contiguous in one dtype");
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
    return run_step<float>(tok, pos, at, km, embed, layers, norm, head, cos, sin, k_caches, v_caches, s, eps);
  return run_step<at::BFloat16>(tok, pos, at, km, embed, layers, norm, head, cos, sin, k_caches, v_caches, s, eps);
}

TORCH_LIBRARY(mm_decode, m) {
  m.def("block(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot, Tensor? mask, int n_kv_heads, float eps) -> Tensor");
  m.def("step(Tensor token, Tensor position, Tensor slot, Tensor key_mask, Tensor embed, Tensor[] layers, "
        "Tensor norm, Tensor head, Tensor cos, Tensor sin, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "int n_kv_heads, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(mm_decode, CPU, m) {
  m.impl("block", &decode_block);
  m.impl("step", &decode_step);
}

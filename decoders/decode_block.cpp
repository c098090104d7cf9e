// One Llama block for one token (batch 1) of an eager CPU decode step, in one call: what the Python block does in
// ~45 PyTorch calls (decoders/llama.py Block.forward), with the same roundings, so eager decoding costs the kernels'
// time rather than Python's. The products run on linear.cpp's row kernel, attention on decode_attention.cpp's.
//
//   h = rmsnorm(x) ln1;  q, k, v = h Wqkv^T;  q, k = rope(q), rope(k);  cache[slot] = k, v
//   x = x + attend(q, cache) Wo^T;  h = rmsnorm(x) ln2;  g, u = h Wgu^T;  x = x + (silu(g) u) Wdown^T
//
// Every value the Python block rounds to its dtype is rounded here at the same point (bf16: nearest even), so
// float32 blocks agree to float32 rounding and bf16 blocks to the odd bf16 step where a sum's order differs.
#include <torch/extension.h>
#include <algorithm>
#include <cmath>

torch::Tensor rows_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias);  // linear.cpp
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                               c10::optional<torch::Tensor> mask);  // decode_attention.cpp

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

template <typename T>
torch::Tensor block(torch::Tensor x, const std::vector<torch::Tensor>& w, torch::Tensor cos, torch::Tensor sin,
                    torch::Tensor k_cache, torch::Tensor v_cache, int64_t slot, c10::optional<torch::Tensor> mask,
                    int64_t H, int64_t Hkv, int64_t Dh, double eps) {
  const int64_t D = x.size(1), S = k_cache.size(2), F = w[5].size(1);
  const T* c = cos.data_ptr<T>();
  const T* s = sin.data_ptr<T>();
  auto h = torch::empty_like(x);
  rms_norm(x.data_ptr<T>(), w[0].data_ptr<T>(), h.data_ptr<T>(), D, eps);
  auto qkv = rows_linear(h, w[1], c10::nullopt);  // [1, (H + 2 Hkv) Dh]
  const T* qkvp = qkv.data_ptr<T>();
  auto q = torch::empty({1, Hkv, H / Hkv, Dh}, x.options());  // query head j reads kv head j / G
  for (int64_t j = 0; j < H; ++j) rope(qkvp + j * Dh, c, s, q.data_ptr<T>() + j * Dh, Dh);
  for (int64_t j = 0; j < Hkv; ++j) {
    rope(qkvp + (H + j) * Dh, c, s, k_cache.data_ptr<T>() + (j * S + slot) * Dh, Dh);
    std::copy_n(qkvp + (H + Hkv + j) * Dh, Dh, v_cache.data_ptr<T>() + (j * S + slot) * Dh);
  }
  auto y = decode_attention(q, k_cache, v_cache, mask).view({1, H * Dh});
  auto o = rows_linear(y, w[2], c10::nullopt);
  auto x1 = torch::empty_like(x);
  T* x1p = x1.data_ptr<T>();
  const T *xp = x.data_ptr<T>(), *op = o.data_ptr<T>();
  for (int64_t d = 0; d < D; ++d) x1p[d] = rnd<T>(f(xp[d]) + f(op[d]));
  rms_norm(x1p, w[3].data_ptr<T>(), h.data_ptr<T>(), D, eps);
  auto gu = rows_linear(h, w[4], c10::nullopt);  // [1, 2F]: gate, up
  auto a = torch::empty({1, F}, x.options());
  const T* g = gu.data_ptr<T>();
  T* ap = a.data_ptr<T>();
  for (int64_t i = 0; i < F; ++i) {
    const float gi = f(g[i]);
    ap[i] = rnd<T>(f(rnd<T>(gi / (1.f + std::exp(-gi)))) * f(g[F + i]));  // silu(gate) * up
  }
  auto down = rows_linear(a, w[5], c10::nullopt);
  const T* dp = down.data_ptr<T>();
  for (int64_t d = 0; d < D; ++d) x1p[d] = rnd<T>(f(x1p[d]) + f(dp[d]));
  return x1;
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
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && k_cache.dim() == 4 && k_cache.size(0) == 1 &&
              k_cache.sizes() == v_cache.sizes() && k_cache.size(1) == n_kv_heads,
              "x [1, D], caches [1, Hkv, S, Dh]; got ", x.sizes(), ", ", k_cache.sizes());
  const int64_t D = x.size(1), Dh = k_cache.size(3), S = k_cache.size(2);
  TORCH_CHECK(cos.numel() == Dh && sin.numel() == Dh && Dh % 2 == 0, "cos, sin: [", Dh, "]");
  TORCH_CHECK(w[1].dim() == 2 && w[1].size(0) % Dh == 0, "qkv weight: [(H + 2 Hkv) Dh, D], got ", w[1].sizes());
  const int64_t H = w[1].size(0) / Dh - 2 * n_kv_heads;
  TORCH_CHECK(H > 0 && H % n_kv_heads == 0, "qkv weight ", w[1].sizes(), " does not hold H + 2 x ", n_kv_heads,
              " heads of ", Dh);
  TORCH_CHECK(w[0].numel() == D && w[3].numel() == D && w[1].size(1) == D && w[2].dim() == 2 && w[2].size(0) == D &&
              w[2].size(1) == H * Dh && w[4].dim() == 2 && w[4].size(1) == D && w[5].dim() == 2 &&
              w[5].size(0) == D && w[4].size(0) == 2 * w[5].size(1), "block weights do not fit D = ", D);
  for (const auto& t : {x, cos, sin, k_cache, v_cache})
    TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "every tensor contiguous in x's dtype");
  for (const auto& t : w) TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), "every weight contiguous in x's dtype");
  const int64_t at = slot.item<int64_t>();
  TORCH_CHECK(at >= 0 && at < S, "slot ", at, " outside the cache's ", S, " slots");
  if (dt == torch::kFloat) return block<float>(x, w, cos, sin, k_cache, v_cache, at, mask, H, n_kv_heads, Dh, eps);
  return block<at::BFloat16>(x, w, cos, sin, k_cache, v_cache, at, mask, H, n_kv_heads, Dh, eps);
}

TORCH_LIBRARY(mm_decode, m) {
  m.def("block(Tensor x, Tensor[] weights, Tensor cos, Tensor sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slot, Tensor? mask, int n_kv_heads, float eps) -> Tensor");
}
TORCH_LIBRARY_IMPL(mm_decode, CPU, m) { m.impl("block", &decode_block); }

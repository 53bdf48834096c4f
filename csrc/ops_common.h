// Argument checks and small helpers shared by the CPU (lcqat_ops.cpp) and CUDA
// (cuda/lcqat_cuda.cu) implementations of the lcqat ops.
#pragma once
#include <ATen/ATen.h>

#include <vector>

namespace lcqat {

using at::Tensor;

// ------------------------------------------------------------------ argument checks
inline void check_act_dtype(const Tensor& x, const char* op, const char* name) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "lcqat.", op, ": ", name,
              " must be float32, bfloat16 or float16, got ", dt);
}

inline bool is_pow2(int64_t v) { return v >= 1 && (v & (v - 1)) == 0; }

inline int64_t check_rotation(int64_t n, int64_t block, const c10::optional<Tensor>& left, const char* op,
                              const char* which) {
  TORCH_CHECK(is_pow2(block), "lcqat.", op, ": ", which, " Hadamard block must be a power of two, got ", block);
  if (left.has_value()) {
    const auto& L = *left;
    TORCH_CHECK(L.dim() == 2 && L.size(0) == L.size(1), "lcqat.", op, ": ", which,
                " left factor must be a square matrix, got shape ", L.sizes());
    TORCH_CHECK(L.size(0) * block == n, "lcqat.", op, ": ", which, " rotation ", L.size(0), " x ", block,
                " does not match the dimension ", n);
    return L.size(0);
  }
  TORCH_CHECK(n % block == 0, "lcqat.", op, ": ", which, " Hadamard block ", block,
              " does not divide the dimension ", n);
  return 1;
}

inline void check_codes(const Tensor& packed, const Tensor& A, const Tensor& beta, int64_t n, const char* op) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, "lcqat.", op, ": packed codes must be uint8, got ",
              packed.scalar_type());
  TORCH_CHECK(packed.dim() == 2, "lcqat.", op, ": packed codes must be 2-D [out, in/4], got shape ", packed.sizes());
  TORCH_CHECK(n % 4 == 0, "lcqat.", op, ": input dimension ", n, " must be a multiple of 4");
  TORCH_CHECK(packed.size(1) * 4 == n, "lcqat.", op, ": packed codes ", packed.sizes(),
              " do not match the input dimension ", n, " (expected [out, ", n / 4, "])");
  TORCH_CHECK(A.dim() == 2 && A.size(0) == 4 && A.size(1) == 4, "lcqat.", op,
              ": only vector_dim 4 is supported (A must be 4x4), got A of shape ", A.sizes());
  TORCH_CHECK(beta.numel() == 4, "lcqat.", op, ": beta must have 4 entries, got ", beta.numel());
  TORCH_CHECK(A.is_floating_point() && beta.is_floating_point(), "lcqat.", op, ": A and beta must be floating point");
}

// fp32 contiguous view of t; no dispatcher call when it already is one (decode calls these per
// layer and token, so the fast path matters).
inline Tensor f32(const Tensor& t) {
  if (t.scalar_type() == at::kFloat && t.is_contiguous()) return t;
  return t.to(at::kFloat).contiguous();
}

inline Tensor opt_f32(const c10::optional<Tensor>& t) { return t.has_value() ? f32(*t) : Tensor(); }

inline void check_vec(const c10::optional<Tensor>& t, int64_t n, const char* op, const char* name) {
  if (t.has_value())
    TORCH_CHECK(t->numel() == n && t->is_floating_point(), "lcqat.", op, ": ", name, " must be a float vector of ", n,
                " entries, got shape ", t->sizes());
}

inline std::vector<int64_t> out_shape(const Tensor& x, int64_t last) {
  auto s = x.sizes().vec();
  s.back() = last;
  return s;
}

}  // namespace lcqat

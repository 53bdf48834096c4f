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

// ------------------------------------------------------------------ per-op argument checks
// What the CPU (lcqat_ops.cpp) and CUDA (cuda/lcqat_cuda.cu) implementations of an op both
// check, in one place, so that both reject the same calls with the same messages.

// The activation argument `name` of `op`: a float tensor with at least one dimension.
inline void check_input(const Tensor& x, const char* op, const char* name) {
  check_act_dtype(x, op, name);
  TORCH_CHECK(x.dim() >= 1, "lcqat.", op, ": ", name, " must have at least one dimension");
}

// Every tensor argument on the activation's device (the kernels read them all through raw
// pointers on that device). The dispatcher sends a call with any CUDA argument to the CUDA
// implementation, so a CPU tensor there would otherwise be read as device memory.
inline void check_device(const Tensor& x, const char* xname, const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "lcqat.", op, ": ", name, " is on ", t.device(), " but ", xname, " is on ",
              x.device(), "; move every argument of the op to one device");
}

inline void check_device(const Tensor& x, const char* xname, const c10::optional<Tensor>& t, const char* op,
                         const char* name) {
  if (t.has_value()) check_device(x, xname, *t, op, name);
}

// hadamard(x, block, left?, scale_in?, scale_out?, transpose): returns K, the size of the left
// factor (1 without one).
inline int64_t check_hadamard_args(const Tensor& x, int64_t block, const c10::optional<Tensor>& left,
                                   const c10::optional<Tensor>& scale_in, const c10::optional<Tensor>& scale_out) {
  const char* op = "hadamard";
  check_input(x, op, "x");
  check_device(x, "x", left, op, "left");
  check_device(x, "x", scale_in, op, "scale_in");
  check_device(x, "x", scale_out, op, "scale_out");
  const int64_t n = x.size(-1);
  const int64_t K = check_rotation(n, block, left, op, "the");
  check_vec(scale_in, n, op, "scale_in");
  check_vec(scale_out, n, op, "scale_out");
  return K;
}

// lc_matmul(xt, packed, A, beta).
inline void check_lc_matmul_args(const Tensor& xt, const Tensor& packed, const Tensor& A, const Tensor& beta) {
  const char* op = "lc_matmul";
  check_input(xt, op, "xt");
  check_device(xt, "xt", packed, op, "packed");
  check_device(xt, "xt", A, op, "A");
  check_device(xt, "xt", beta, op, "beta");
  check_codes(packed, A, beta, xt.size(-1), op);
}

// Sizes of a checked lc_linear call: in n, out m, and the left factors' sizes (1 without one).
struct LcShape {
  int64_t n, m, Kin, Kout;
};

// lc_linear / lc_linear_a8 (`op`): x, packed, A, beta, s_u, s_v, bias?, block_in, left_in?,
// block_out, left_out?.
inline LcShape check_lc_linear_args(const char* op, const Tensor& x, const Tensor& packed, const Tensor& A,
                                    const Tensor& beta, const Tensor& s_u, const Tensor& s_v,
                                    const c10::optional<Tensor>& bias, int64_t block_in,
                                    const c10::optional<Tensor>& left_in, int64_t block_out,
                                    const c10::optional<Tensor>& left_out) {
  check_input(x, op, "x");
  check_device(x, "x", packed, op, "packed");
  check_device(x, "x", A, op, "A");
  check_device(x, "x", beta, op, "beta");
  check_device(x, "x", s_u, op, "s_u");
  check_device(x, "x", s_v, op, "s_v");
  check_device(x, "x", bias, op, "bias");
  check_device(x, "x", left_in, op, "left_in");
  check_device(x, "x", left_out, op, "left_out");
  LcShape s;
  s.n = x.size(-1);
  check_codes(packed, A, beta, s.n, op);
  s.m = packed.size(0);
  check_vec(s_u, s.n, op, "s_u");
  check_vec(s_v, s.m, op, "s_v");
  check_vec(bias, s.m, op, "bias");
  s.Kin = check_rotation(s.n, block_in, left_in, op, "input");
  s.Kout = check_rotation(s.m, block_out, left_out, op, "output");
  return s;
}

inline std::vector<int64_t> out_shape(const Tensor& x, int64_t last) {
  auto s = x.sizes().vec();
  s.back() = last;
  return s;
}

}  // namespace lcqat

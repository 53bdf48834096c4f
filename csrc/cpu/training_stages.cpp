// The LC layer's input side for training (nn/lc_training.py): z, c = fold(H_in(x * s_u)) and its
// backward, one pass over each activation row.
//
// Why: in torch ops the input side is a rotation matmul (or the Hadamard op), a [d, d] fold matmul
// over groups of 4 and a sum for c, and its backward through autograd some eight more passes over
// [tokens, n] tensors (the fold's adjoint, the A and beta reductions, H^T, the s_u product and its
// reduction). At 2 cores each pass over a [2048, 1536] float32 tensor takes ~1-3 ms, as long as a
// fifth of the layer's matmul: on SmolLM2-135M QAT these passes were ~4 s of a 20 s step. Here a
// row is rotated (row_stages.h's input_row, as lc_linear's input stage), folded and, in
// the backward, unfolded and rotated back while it is in cache.
//
// The parameter grads (s_u, A, beta) sum over rows: the rows are cut into a fixed number of
// chunks whatever the thread count, each chunk sums its rows in order (in double), and the chunks
// are added in order, so the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../ops_common.h"
#include "../row_stages.h"
#include "kernels.h"

namespace lcqat {
namespace {

using at::Tensor;

constexpr int64_t kChunks = 64;  // row chunks of the grads' sums (fixed: see above)

struct Stage {
  int64_t R, n, Kl;
  Tensor x, su, A, beta, L;  // float32, contiguous
  const float* left() const { return L.defined() ? L.data_ptr<float>() : nullptr; }
};

static Stage stage_args(const Tensor& x, int64_t block, const c10::optional<Tensor>& left, const Tensor& s_u,
                        const Tensor& A, const Tensor& beta, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": CPU tensors expected");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) % 4 == 0, op, ": x [..., n] with n a multiple of 4 expected, got ", x.sizes());
  TORCH_CHECK(A.numel() == 16 && beta.numel() == 4, op, ": a 4x4 codebook A and 4 offsets beta expected");
  const int64_t n = x.size(-1);
  TORCH_CHECK(s_u.numel() == n, op, ": s_u of ", n, " entries expected, got ", s_u.numel());
  Stage st;
  st.n = n;
  st.R = x.numel() / n;
  st.Kl = check_hadamard_args(x, block, left, s_u, c10::nullopt);
  auto f32 = [](const Tensor& t) { return t.to(at::kFloat).contiguous(); };
  st.x = f32(x).reshape({st.R, n});
  st.su = f32(s_u).reshape({n});
  st.A = f32(A).reshape({4, 4});
  st.beta = f32(beta).reshape({4});
  if (left.has_value() && left->defined()) st.L = f32(*left);
  return st;
}

// x [..., n] -> (z [..., n], c [..., 1]) in x's dtype, computed in float32.
std::tuple<Tensor, Tensor> lc_input_side_cpu(const Tensor& x, int64_t block, const c10::optional<Tensor>& left,
                                             const Tensor& s_u, const Tensor& A, const Tensor& beta) {
  const Stage st = stage_args(x, block, left, s_u, A, beta, "lc_input_side");
  const int64_t n = st.n;
  Tensor z = at::empty({st.R, n}, st.x.options());
  Tensor c = at::empty({st.R}, st.x.options());
  const float *xp = st.x.data_ptr<float>(), *su = st.su.data_ptr<float>(), *Ap = st.A.data_ptr<float>();
  const float* bp = st.beta.data_ptr<float>();
  float *zp = z.data_ptr<float>(), *cp = c.data_ptr<float>();
  const float* L = st.left();
  at::parallel_for(0, st.R, std::max<int64_t>(1, 16384 / n), [&](int64_t b0, int64_t b1) {
    std::vector<float> r(n), work(L ? n : 0);
    for (int64_t b = b0; b < b1; ++b) {
      input_row(xp + b * n, r.data(), n, su, block, L, st.Kl, work.data());
      cp[b] = cpu::fold_row(r.data(), n, Ap, bp, zp + b * n);
    }
  });
  auto lead = x.sizes().vec();
  lead.back() = 1;
  return {z.to(x.scalar_type()).view(x.sizes()), c.to(x.scalar_type()).view(lead)};
}

// The adjoint of lc_input_side at x for the output grads (g_z, g_c): (g_x, g_s_u, g_A, g_beta),
// float32; a grad not asked for is an empty tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor> lc_input_side_backward_cpu(
    const Tensor& x, const Tensor& g_z, const Tensor& g_c, int64_t block, const c10::optional<Tensor>& left,
    const Tensor& s_u, const Tensor& A, const Tensor& beta, bool need_x, bool need_su, bool need_A, bool need_beta) {
  const char* op = "lc_input_side_backward";
  const Stage st = stage_args(x, block, left, s_u, A, beta, op);
  const int64_t n = st.n, R = st.R;
  TORCH_CHECK(g_z.numel() == R * n && g_c.numel() == R, op, ": g_z [..., n] and g_c [..., 1] must match x");
  const Tensor gz = g_z.to(at::kFloat).contiguous().reshape({R, n}), gc = g_c.to(at::kFloat).contiguous().reshape({R});
  const Tensor At = st.A.t().contiguous();  // the fold's adjoint is the fold with A^T
  const bool need_params = need_A || need_beta, need_rows = need_x || need_su;
  const int64_t P = std::max<int64_t>(1, std::min(R, kChunks));
  Tensor gx = need_x ? at::empty({R, n}, st.x.options()) : Tensor();
  std::vector<double> part_su(need_su ? P * n : 0), part_A(P * 16, 0.0), part_b(P * 4, 0.0);
  const float *xp = st.x.data_ptr<float>(), *su = st.su.data_ptr<float>(), *Atp = At.data_ptr<float>();
  const float *bp = st.beta.data_ptr<float>(), *gzp = gz.data_ptr<float>(), *gcp = gc.data_ptr<float>();
  float* gxp = need_x ? gx.data_ptr<float>() : nullptr;
  const float* L = st.left();
  const float zero4[4] = {0.f, 0.f, 0.f, 0.f};
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> r(n), work(L ? n : 0);
    for (int64_t p = p0; p < p1; ++p) {
      double* psu = need_su ? part_su.data() + p * n : nullptr;
      for (int64_t b = R * p / P; b < R * (p + 1) / P; ++b) {
        const float* xb = xp + b * n;
        const float* gzb = gzp + b * n;
        if (need_params) {  // g_A = sum r_g gz_g^T, g_beta = sum g_c sum_g r_g, with r = H_in(x * s_u)
          input_row(xb, r.data(), n, su, block, L, st.Kl, work.data());
          float ga[16] = {0.f}, rs[4] = {0.f};
          cpu::accumulate_fold_grads(r.data(), gzb, n, ga, rs);
          for (int k = 0; k < 16; ++k) part_A[p * 16 + k] += ga[k];
          for (int t = 0; t < 4; ++t) part_b[p * 4 + t] += static_cast<double>(gcp[b]) * rs[t];
        }
        if (need_rows) {  // g_r = A g_z + beta g_c per group, then g_(x s_u) = H_in^T g_r
          cpu::fold_row(gzb, n, Atp, zero4, r.data());
          for (int64_t i = 0; i < n; ++i) r[i] += bp[i & 3] * gcp[b];
          cpu::hadamard_row(r.data(), n, block, L, st.Kl, true, work.data());
          if (gxp)
            for (int64_t i = 0; i < n; ++i) gxp[b * n + i] = r[i] * su[i];
          if (psu)
            for (int64_t i = 0; i < n; ++i) psu[i] += static_cast<double>(r[i]) * xb[i];
        }
      }
    }
  });
  auto sum_parts = [&](const std::vector<double>& part, int64_t len) {
    Tensor out = at::empty({len}, st.x.options());
    float* o = out.data_ptr<float>();
    for (int64_t k = 0; k < len; ++k) {
      double acc = 0.0;
      for (int64_t p = 0; p < P; ++p) acc += part[p * len + k];
      o[k] = static_cast<float>(acc);
    }
    return out;
  };
  auto none = [&] { return at::empty({0}, st.x.options()); };  // one each: outputs must not alias
  return {need_x ? gx.view(x.sizes()) : none(), need_su ? sum_parts(part_su, n) : none(),
          need_A ? sum_parts(part_A, 16).view({4, 4}) : none(), need_beta ? sum_parts(part_b, 4) : none()};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lcqat, m) {
  m.def("lc_input_side(Tensor x, int block, Tensor? left, Tensor s_u, Tensor A, Tensor beta) -> (Tensor, Tensor)");
  m.def("lc_input_side_backward(Tensor x, Tensor g_z, Tensor g_c, int block, Tensor? left, Tensor s_u, Tensor A, "
        "Tensor beta, bool need_x, bool need_s_u, bool need_A, bool need_beta) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lcqat, CPU, m) {
  m.impl("lc_input_side", &lc_input_side_cpu);
  m.impl("lc_input_side_backward", &lc_input_side_backward_cpu);
}

}  // namespace lcqat

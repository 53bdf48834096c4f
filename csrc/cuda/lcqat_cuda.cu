// CUDA implementations of the lcqat ops (registered for the CUDA dispatch key). Built only by the
// CUDAExtension (torch with CUDA + nvcc); the schemas are defined in csrc/lcqat_ops.cpp.
// Batches of at most 8 rows: the fused decode GEMV (lc_kernels.cu) reads the 2-bit codes once;
// larger batches: dequantize into the activation dtype, then cuBLAS (at::mm).
// Status: compiles with nvcc against torch's headers (tests/test_kernels.py); not yet run on a GPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops_common.h"
#include "lc_kernels.cuh"

namespace lcqat {

#define LCQAT_CUDA_CHECK(expr)                                                              \
  do {                                                                                      \
    cudaError_t err__ = (expr);                                                             \
    TORCH_CHECK(err__ == cudaSuccess, "lcqat CUDA kernel failed: ", cudaGetErrorString(err__)); \
  } while (0)

static const float* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

static void rotate_rows_cuda(Tensor& rows, int64_t block, const Tensor& left, bool transpose, const Tensor& scale_in,
                             const Tensor& scale_out, const Tensor& add) {
  const int64_t n = rows.size(1);
  const int K = left.defined() ? static_cast<int>(left.size(0)) : 1;
  LCQAT_CUDA_CHECK(cuda::hadamard_rows(rows.data_ptr<float>(), rows.size(0), static_cast<int>(n),
                                       static_cast<int>(block), ptr_or_null(left), K, transpose, ptr_or_null(scale_in),
                                       ptr_or_null(scale_out), ptr_or_null(add),
                                       c10::cuda::getCurrentCUDAStream()));
}

static Tensor rows_f32_cuda(const Tensor& x, int64_t n) {
  auto x2 = x.reshape({-1, n});
  return x2.scalar_type() == at::kFloat ? x2.clone(at::MemoryFormat::Contiguous) : x2.to(at::kFloat).contiguous();
}

// [B, n] fp32 -> [B, m] fp32 (rotated domain).
static Tensor matmul_rows_cuda(const Tensor& xt, const Tensor& packed, const Tensor& A32, const Tensor& b32,
                               at::ScalarType compute) {
  const int64_t B = xt.size(0), n = xt.size(1), m = packed.size(0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (B <= cuda::kMaxGemvBatch) {
    auto y = at::empty({B, m}, xt.options());
    LCQAT_CUDA_CHECK(cuda::lc_gemv(xt.data_ptr<float>(), static_cast<int>(B), static_cast<int>(n),
                                   packed.data_ptr<uint8_t>(), static_cast<int>(m), A32.data_ptr<float>(),
                                   b32.data_ptr<float>(), y.data_ptr<float>(), stream));
    return y;
  }
  auto w = at::empty({m, n}, xt.options().dtype(compute));
  if (compute == at::kBFloat16)
    LCQAT_CUDA_CHECK(cuda::dequant_bf16(packed.data_ptr<uint8_t>(), m, n, A32.data_ptr<float>(), b32.data_ptr<float>(),
                                        w.data_ptr(), stream));
  else if (compute == at::kHalf)
    LCQAT_CUDA_CHECK(cuda::dequant_f16(packed.data_ptr<uint8_t>(), m, n, A32.data_ptr<float>(), b32.data_ptr<float>(),
                                       w.data_ptr(), stream));
  else
    LCQAT_CUDA_CHECK(cuda::dequant_f32(packed.data_ptr<uint8_t>(), m, n, A32.data_ptr<float>(), b32.data_ptr<float>(),
                                       w.data_ptr<float>(), stream));
  return at::mm(xt.to(compute), w.t()).to(at::kFloat).contiguous();
}

Tensor hadamard_cuda(const Tensor& x, int64_t block, const c10::optional<Tensor>& left,
                     const c10::optional<Tensor>& scale_in, const c10::optional<Tensor>& scale_out, bool transpose) {
  check_hadamard_args(x, block, left, scale_in, scale_out);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  auto rows = rows_f32_cuda(x, n);
  rotate_rows_cuda(rows, block, opt_f32(left), transpose, opt_f32(scale_in), opt_f32(scale_out), Tensor());
  return rows.to(x.scalar_type()).view(x.sizes());
}

Tensor lc_matmul_cuda(const Tensor& xt, const Tensor& packed, const Tensor& A, const Tensor& beta) {
  check_lc_matmul_args(xt, packed, A, beta);
  c10::cuda::CUDAGuard guard(xt.device());
  const int64_t n = xt.size(-1);
  auto pk = packed.contiguous();
  auto y = matmul_rows_cuda(rows_f32_cuda(xt, n), pk, f32(A), f32(beta.reshape({-1})), xt.scalar_type());
  return y.to(xt.scalar_type()).view(out_shape(xt, pk.size(0)));
}

Tensor lc_linear_cuda(const Tensor& x, const Tensor& packed, const Tensor& A, const Tensor& beta, const Tensor& s_u,
                      const Tensor& s_v, const c10::optional<Tensor>& bias, int64_t block_in,
                      const c10::optional<Tensor>& left_in, int64_t block_out, const c10::optional<Tensor>& left_out) {
  const LcShape s =
      check_lc_linear_args("lc_linear", x, packed, A, beta, s_u, s_v, bias, block_in, left_in, block_out, left_out);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = s.n, m = s.m;
  auto pk = packed.contiguous();
  auto xt = rows_f32_cuda(x, n);
  rotate_rows_cuda(xt, block_in, opt_f32(left_in), false, f32(s_u), Tensor(), Tensor());
  auto yt = matmul_rows_cuda(xt, pk, f32(A), f32(beta.reshape({-1})), x.scalar_type());
  rotate_rows_cuda(yt, block_out, opt_f32(left_out), true, Tensor(), f32(s_v), opt_f32(bias));
  return yt.to(x.scalar_type()).view(out_shape(x, m));
}

TORCH_LIBRARY_IMPL(lcqat, CUDA, m) {
  m.impl("hadamard", &hadamard_cuda);
  m.impl("lc_matmul", &lc_matmul_cuda);
  m.impl("lc_linear", &lc_linear_cuda);
}

}  // namespace lcqat

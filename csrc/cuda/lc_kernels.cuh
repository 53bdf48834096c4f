// CUDA kernels of the LC layer over raw device pointers (fp32 compute). No torch headers, so
// this part compiles with plain nvcc (tests/test_kernels.py does that wherever nvcc exists).
// The torch glue is csrc/cuda/lcqat_cuda.cu.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

namespace lcqat {
namespace cuda {

constexpr int kMaxGemvBatch = 8;

// rows [B, n] fp32 in place: x <- (L (x) H_r)(x * scale_in) * scale_out + add (each optional,
// nullptr = none; left is K x K row-major, used transposed when transpose_left). One block per row;
// needs n (2n with left) floats of shared memory.
cudaError_t hadamard_rows(float* x, int64_t B, int n, int r, const float* left, int K, bool transpose_left,
                          const float* scale_in, const float* scale_out, const float* add, cudaStream_t stream);

// y[b, j] = sum_g <table[packed[j, g]], x[b, 4g:4g+4]>, B <= kMaxGemvBatch, with
// table[k] = A q(k) + beta built in shared memory from A (4x4 row-major) and beta (4) (fp32,
// device). x [B, n], y [B, m] fp32. One warp per output row; the codes are read once.
cudaError_t lc_gemv(const float* x, int B, int n, const uint8_t* packed, int m, const float* A, const float* beta,
                    float* y, cudaStream_t stream);

// W[j, 4g:4g+4] = A q(packed[j, g]) + beta into out [m, n] of type T (float, __half or
// __nv_bfloat16 through the three entry points), for the large-batch path (then cuBLAS).
cudaError_t dequant_f32(const uint8_t* packed, int m, int n, const float* A, const float* beta, float* out,
                        cudaStream_t stream);
cudaError_t dequant_f16(const uint8_t* packed, int m, int n, const float* A, const float* beta, void* out,
                        cudaStream_t stream);
cudaError_t dequant_bf16(const uint8_t* packed, int m, int n, const float* A, const float* beta, void* out,
                         cudaStream_t stream);

}  // namespace cuda
}  // namespace lcqat

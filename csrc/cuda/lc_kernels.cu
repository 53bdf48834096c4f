// CUDA kernels of the LC layer. See lc_kernels.cuh.
// Status: compiled with nvcc in the tests; not yet run on a GPU (no GPU in the session that wrote
// them): tests/test_kernels.py checks them against the reference when torch has CUDA.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "lc_kernels.cuh"

namespace lcqat {
namespace cuda {

__device__ __forceinline__ void make_table_entry(int k, const float* A, const float* beta, float4* table) {
  const float q0 = (k & 3), q1 = ((k >> 2) & 3), q2 = ((k >> 4) & 3), q3 = ((k >> 6) & 3);
  float v[4];
#pragma unroll
  for (int t = 0; t < 4; ++t) v[t] = beta[t] + A[t * 4 + 0] * q0 + A[t * 4 + 1] * q1 + A[t * 4 + 2] * q2 + A[t * 4 + 3] * q3;
  table[k] = make_float4(v[0], v[1], v[2], v[3]);
}

// ------------------------------------------------------------------ Hadamard (one block per row)
__global__ void hadamard_rows_kernel(float* x, int n, int r, const float* left, int K, bool transpose_left,
                                     const float* scale_in, const float* scale_out, const float* add) {
  extern __shared__ float smem[];
  float* buf = smem;
  float* work = smem + n;
  float* row = x + static_cast<int64_t>(blockIdx.x) * n;
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = scale_in ? row[i] * scale_in[i] : row[i];
  __syncthreads();
  const int half = r / 2;
  for (int h = 1; h < r; h *= 2) {
    for (int p = threadIdx.x; p < n / 2; p += blockDim.x) {
      const int base = (p / half) * r, w = p % half;
      const int i = base + (w / h) * 2 * h + (w % h);
      const float a = buf[i], b = buf[i + h];
      buf[i] = a + b;
      buf[i + h] = a - b;
    }
    __syncthreads();
  }
  const float norm = rsqrtf(static_cast<float>(r));
  if (left != nullptr && K > 1) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const int k = i / r, c = i % r;
      float s = 0.f;
      for (int l = 0; l < K; ++l) s += (transpose_left ? left[l * K + k] : left[k * K + l]) * buf[l * r + c];
      work[i] = s;
    }
    __syncthreads();
    buf = work;
  }
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    float v = buf[i] * norm;
    if (scale_out) v *= scale_out[i];
    if (add) v += add[i];
    row[i] = v;
  }
}

cudaError_t hadamard_rows(float* x, int64_t B, int n, int r, const float* left, int K, bool transpose_left,
                          const float* scale_in, const float* scale_out, const float* add, cudaStream_t stream) {
  if (B == 0) return cudaSuccess;
  const size_t smem = sizeof(float) * n * ((left && K > 1) ? 2 : 1);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(hadamard_rows_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int threads = n >= 1024 ? 512 : 128;
  hadamard_rows_kernel<<<static_cast<unsigned>(B), threads, smem, stream>>>(x, n, r, left, K, transpose_left, scale_in,
                                                                          scale_out, add);
  return cudaGetLastError();
}

// ------------------------------------------------------------------ decode GEMV
// One warp per row j; the 256-entry codebook (float4) in shared memory. Each lane reads 4 code
// bytes (one 32-bit load, coalesced across the warp) when the row is 4-byte aligned.
template <int B, bool ALIGNED>
__global__ void lc_gemv_kernel(const float* __restrict__ x, int n, const uint8_t* __restrict__ packed, int m,
                               const float* __restrict__ A, const float* __restrict__ beta, float* __restrict__ y) {
  __shared__ float4 table[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) make_table_entry(k, A, beta, table);
  __syncthreads();
  const int warps = blockDim.x / 32, lane = threadIdx.x % 32;
  const int j = blockIdx.x * warps + threadIdx.x / 32;
  if (j >= m) return;
  const int nb = n / 4;
  const uint8_t* p = packed + static_cast<int64_t>(j) * nb;
  const float4* x4 = reinterpret_cast<const float4*>(x);
  float acc[B];
#pragma unroll
  for (int b = 0; b < B; ++b) acc[b] = 0.f;
  auto consume = [&](unsigned byte, int g) {
    const float4 w = table[byte];
#pragma unroll
    for (int b = 0; b < B; ++b) {
      const float4 v = __ldg(x4 + static_cast<int64_t>(b) * nb + g);
      acc[b] += w.x * v.x + w.y * v.y + w.z * v.z + w.w * v.w;
    }
  };
  if (ALIGNED) {
    const uint32_t* p32 = reinterpret_cast<const uint32_t*>(p);
    for (int w = lane; w < nb / 4; w += 32) {
      const uint32_t word = __ldg(p32 + w);
#pragma unroll
      for (int t = 0; t < 4; ++t) consume((word >> (8 * t)) & 0xFF, 4 * w + t);
    }
    for (int g = (nb / 4) * 4 + lane; g < nb; g += 32) consume(p[g], g);
  } else {
    for (int g = lane; g < nb; g += 32) consume(__ldg(p + g), g);
  }
#pragma unroll
  for (int b = 0; b < B; ++b) {
    float s = acc[b];
    for (int off = 16; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) y[static_cast<int64_t>(b) * m + j] = s;
  }
}

template <int B>
static cudaError_t launch_gemv(const float* x, int n, const uint8_t* packed, int m, const float* A, const float* beta,
                               float* y, cudaStream_t stream) {
  const int warps = 8;
  const dim3 grid((m + warps - 1) / warps);
  if ((n / 4) % 4 == 0)
    lc_gemv_kernel<B, true><<<grid, warps * 32, 0, stream>>>(x, n, packed, m, A, beta, y);
  else
    lc_gemv_kernel<B, false><<<grid, warps * 32, 0, stream>>>(x, n, packed, m, A, beta, y);
  return cudaGetLastError();
}

cudaError_t lc_gemv(const float* x, int B, int n, const uint8_t* packed, int m, const float* A, const float* beta,
                    float* y, cudaStream_t stream) {
  switch (B) {
    case 1: return launch_gemv<1>(x, n, packed, m, A, beta, y, stream);
    case 2: return launch_gemv<2>(x, n, packed, m, A, beta, y, stream);
    case 3: return launch_gemv<3>(x, n, packed, m, A, beta, y, stream);
    case 4: return launch_gemv<4>(x, n, packed, m, A, beta, y, stream);
    case 5: return launch_gemv<5>(x, n, packed, m, A, beta, y, stream);
    case 6: return launch_gemv<6>(x, n, packed, m, A, beta, y, stream);
    case 7: return launch_gemv<7>(x, n, packed, m, A, beta, y, stream);
    case 8: return launch_gemv<8>(x, n, packed, m, A, beta, y, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ------------------------------------------------------------------ dequantize (large batches)
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void dequant_kernel(const uint8_t* __restrict__ packed, int64_t total_bytes, const float* __restrict__ A,
                               const float* __restrict__ beta, T* __restrict__ out) {
  __shared__ float4 table[256];
  for (int k = threadIdx.x; k < 256; k += blockDim.x) make_table_entry(k, A, beta, table);
  __syncthreads();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total_bytes;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 w = table[packed[i]];
    T* o = out + 4 * i;  // row-major [m, n] with n = 4 * bytes per row: byte i -> weights 4i..4i+3
    o[0] = from_float<T>(w.x);
    o[1] = from_float<T>(w.y);
    o[2] = from_float<T>(w.z);
    o[3] = from_float<T>(w.w);
  }
}

template <typename T>
static cudaError_t launch_dequant(const uint8_t* packed, int m, int n, const float* A, const float* beta, T* out,
                                  cudaStream_t stream) {
  const int64_t total = static_cast<int64_t>(m) * (n / 4);
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const unsigned blocks = static_cast<unsigned>(want < 65535 ? want : 65535);
  dequant_kernel<T><<<blocks, threads, 0, stream>>>(packed, total, A, beta, out);
  return cudaGetLastError();
}

cudaError_t dequant_f32(const uint8_t* packed, int m, int n, const float* A, const float* beta, float* out,
                        cudaStream_t stream) {
  return launch_dequant<float>(packed, m, n, A, beta, out, stream);
}
cudaError_t dequant_f16(const uint8_t* packed, int m, int n, const float* A, const float* beta, void* out,
                        cudaStream_t stream) {
  return launch_dequant<__half>(packed, m, n, A, beta, static_cast<__half*>(out), stream);
}
cudaError_t dequant_bf16(const uint8_t* packed, int m, int n, const float* A, const float* beta, void* out,
                         cudaStream_t stream) {
  return launch_dequant<__nv_bfloat16>(packed, m, n, A, beta, static_cast<__nv_bfloat16*>(out), stream);
}

}  // namespace cuda
}  // namespace lcqat

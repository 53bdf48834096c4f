// CPU kernels of the LC layer. See kernels.h. The AVX-512 and AVX2 variants are compiled with
// per-function target attributes (the rest of the file keeps the baseline ISA), and chosen at run
// time with __builtin_cpu_supports, so one binary runs on any x86-64 CPU.
#include "kernels.h"

#include <cmath>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LCQAT_X86 1
#else
#define LCQAT_X86 0
#endif

namespace lcqat {
namespace cpu {

// ------------------------------------------------------------------ ISA detection
static Isa detect_isa_uncached() {
  Isa best = Isa::Scalar;
#if LCQAT_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::Avx512;
#endif
  if (const char* env = std::getenv("LCQAT_CPU_ISA")) {
    std::string s(env);
    Isa cap = best;
    if (s == "scalar") cap = Isa::Scalar;
    else if (s == "avx2") cap = Isa::Avx2;
    else if (s == "avx512") cap = Isa::Avx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

Isa detect_isa() {
  static const Isa isa = detect_isa_uncached();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

// ------------------------------------------------------------------ codebook table
void make_table(const float* A, const float* beta, float* table) {
  for (int k = 0; k < 256; ++k) {
    float q[4];
    for (int s = 0; s < 4; ++s) q[s] = static_cast<float>((k >> (2 * s)) & 3);
    for (int t = 0; t < 4; ++t) {
      float v = beta[t];
      for (int s = 0; s < 4; ++s) v += A[t * 4 + s] * q[s];
      table[k * 4 + t] = v;
    }
  }
}

void dequant_rows_f32(const uint8_t* packed, int64_t n, int64_t j0, int64_t j1, const float* table, float* out) {
  const int64_t nb = n / 4;
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* p = packed + j * nb;
    float* o = out + (j - j0) * n;
    for (int64_t g = 0; g < nb; ++g) std::memcpy(o + 4 * g, table + 4 * p[g], 4 * sizeof(float));
  }
}

// ------------------------------------------------------------------ Hadamard
void hadamard_row(float* x, int64_t n, int64_t r, const float* left, int64_t K, bool transpose_left, float* work) {
  if (r > 1) {
    const float norm = 1.0f / std::sqrt(static_cast<float>(r));
    for (int64_t base = 0; base < n; base += r) {
      float* v = x + base;
      for (int64_t h = 1; h < r; h *= 2) {
        for (int64_t i = 0; i < r; i += 2 * h) {
          for (int64_t k = i; k < i + h; ++k) {  // vectorises for h >= 4
            const float a = v[k], b = v[k + h];
            v[k] = a + b;
            v[k + h] = a - b;
          }
        }
      }
      for (int64_t k = 0; k < r; ++k) v[k] *= norm;
    }
  }
  if (left != nullptr && K > 1) {
    // x viewed as [K, r]; x <- L x (or L^T x).
    for (int64_t k = 0; k < K; ++k) {
      float* w = work + k * r;
      for (int64_t c = 0; c < r; ++c) w[c] = 0.0f;
      for (int64_t l = 0; l < K; ++l) {
        const float coef = transpose_left ? left[l * K + k] : left[k * K + l];
        const float* xl = x + l * r;
        for (int64_t c = 0; c < r; ++c) w[c] += coef * xl[c];
      }
    }
    std::memcpy(x, work, sizeof(float) * n);
  }
}

// ------------------------------------------------------------------ activation preparation
// Blocks of `blk` bytes (4 * blk weights) are stored "code-plane major": zp[base + s*blk + k] =
// z[base + 4k + s], so that the s-th 2-bit field of blk consecutive bytes multiplies one
// contiguous vector. The tail (n/4 mod blk bytes) stays in natural order.
static int64_t block_bytes(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return 16;
    case Isa::Avx2: return 8;
    default: return 0;
  }
}

int64_t prepared_size(int64_t n, Isa) { return n; }

void prepare_activations(const float* x, int64_t B, int64_t n, const float* A, const float* beta, Isa isa,
                         float* zp, float* c) {
  const int64_t nb = n / 4;
  const int64_t blk = block_bytes(isa);
  const int64_t nfull = blk ? (nb / blk) * blk : 0;  // bytes covered by full blocks
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * n;
    float* zb = zp + b * n;
    double cst = 0.0;
    for (int64_t g = 0; g < nb; ++g) {
      const float* xg = xb + 4 * g;
      float z[4];
      for (int s = 0; s < 4; ++s) z[s] = A[0 * 4 + s] * xg[0] + A[1 * 4 + s] * xg[1] + A[2 * 4 + s] * xg[2] + A[3 * 4 + s] * xg[3];
      cst += static_cast<double>(beta[0] * xg[0] + beta[1] * xg[1] + beta[2] * xg[2] + beta[3] * xg[3]);
      if (g < nfull) {
        const int64_t base = (g / blk) * blk * 4, k = g % blk;
        for (int s = 0; s < 4; ++s) zb[base + s * blk + k] = z[s];
      } else {
        for (int s = 0; s < 4; ++s) zb[4 * g + s] = z[s];
      }
    }
    c[b] = static_cast<float>(cst);
  }
}

// ------------------------------------------------------------------ GEMV kernels
static inline float tail_dot(const uint8_t* p, int64_t g0, int64_t nb, const float* z) {
  float s = 0.0f;
  for (int64_t g = g0; g < nb; ++g) {
    const unsigned byte = p[g];
    const float* zg = z + 4 * g;
    s += static_cast<float>(byte & 3) * zg[0] + static_cast<float>((byte >> 2) & 3) * zg[1] +
         static_cast<float>((byte >> 4) & 3) * zg[2] + static_cast<float>(byte >> 6) * zg[3];
  }
  return s;
}

static void gemv_scalar(const float* zp, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                        int64_t j1, float* y, int64_t ldy) {
  const int64_t nb = n / 4;
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* p = packed + j * nb;
    for (int64_t b = 0; b < B; ++b) y[b * ldy + j] = tail_dot(p, 0, nb, zp + b * n) + c[b];
  }
}

#if LCQAT_X86
// Number of independent accumulators per activation row: enough FMA chains in flight.
template <int B>
struct Accs {
  static constexpr int value = B == 1 ? 4 : (B <= 3 ? 2 : 1);
};

// Column blocks per pass: the B activation rows of one pass (B * cb * 64 floats) stay in L1.
static inline int64_t col_blocks_per_pass(int B, int64_t block_weights) {
  return std::max<int64_t>(4, 24576 / (B * block_weights * 4) );
}

// 16 bytes (64 weights) per step. A byte v holds q0 | q1<<2 | q2<<4 | q3<<6; vpermps looks up
// only the low 4 bits of each index, so with the 16-entry tables lo[i] = i & 3 and hi[i] = i >> 2,
// permutexvar(v, lo) = q0 and permutexvar(v, hi) = q1 (and the same on v >> 4 for q2, q3):
// 1 zero-extension, 1 shift and 4 permutes decode 64 codes to floats.
template <int B>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void gemv_avx512(
    const float* zp, const float* c, int64_t n, const uint8_t* packed, int64_t j0, int64_t j1, float* y,
    int64_t ldy) {
  constexpr int NA = Accs<B>::value;
  const int64_t nb = n / 4;
  const int64_t nblk = nb / 16;
  const __m512 lo = _mm512_setr_ps(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const __m512 hi = _mm512_setr_ps(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* p = packed + j * nb;
    for (int b = 0; b < B; ++b) y[b * ldy + j] = tail_dot(p, nblk * 16, nb, zp + b * n) + c[b];
  }
  const int64_t cb = col_blocks_per_pass(B, 64);
  for (int64_t k0 = 0; k0 < nblk; k0 += cb) {
    const int64_t k1 = std::min(nblk, k0 + cb);
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* p = packed + j * nb;
      __m512 acc[B][NA];
      for (int b = 0; b < B; ++b)
        for (int a = 0; a < NA; ++a) acc[b][a] = _mm512_setzero_ps();
      for (int64_t bb = k0; bb < k1; ++bb) {
        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + bb * 16)));
        const __m512i v4 = _mm512_srli_epi32(v, 4);
        const __m512 q0 = _mm512_permutexvar_ps(v, lo);
        const __m512 q1 = _mm512_permutexvar_ps(v, hi);
        const __m512 q2 = _mm512_permutexvar_ps(v4, lo);
        const __m512 q3 = _mm512_permutexvar_ps(v4, hi);
        for (int b = 0; b < B; ++b) {
          const float* zb = zp + b * n + bb * 64;
          acc[b][0 % NA] = _mm512_fmadd_ps(q0, _mm512_loadu_ps(zb), acc[b][0 % NA]);
          acc[b][1 % NA] = _mm512_fmadd_ps(q1, _mm512_loadu_ps(zb + 16), acc[b][1 % NA]);
          acc[b][2 % NA] = _mm512_fmadd_ps(q2, _mm512_loadu_ps(zb + 32), acc[b][2 % NA]);
          acc[b][3 % NA] = _mm512_fmadd_ps(q3, _mm512_loadu_ps(zb + 48), acc[b][3 % NA]);
        }
      }
      for (int b = 0; b < B; ++b) {
        __m512 s = acc[b][0];
        for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[b][a]);
        y[b * ldy + j] += _mm512_reduce_add_ps(s);
      }
    }
  }
}

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

template <int B>
__attribute__((target("avx2,fma"))) static void gemv_avx2(const float* zp, const float* c, int64_t n,
                                                         const uint8_t* packed, int64_t j0, int64_t j1, float* y,
                                                         int64_t ldy) {
  constexpr int NA = Accs<B>::value;
  const int64_t nb = n / 4;
  const int64_t nblk = nb / 8;
  // vpermps (8 entries) looks up the low 3 bits: lo[i] = i & 3 gives q0 from v; q1 = (v >> 2) & 3.
  const __m256 lo = _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* p = packed + j * nb;
    for (int b = 0; b < B; ++b) y[b * ldy + j] = tail_dot(p, nblk * 8, nb, zp + b * n) + c[b];
  }
  const int64_t cb = col_blocks_per_pass(B, 32);
  for (int64_t k0 = 0; k0 < nblk; k0 += cb) {
    const int64_t k1 = std::min(nblk, k0 + cb);
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* p = packed + j * nb;
      __m256 acc[B][NA];
      for (int b = 0; b < B; ++b)
        for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
      for (int64_t bb = k0; bb < k1; ++bb) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + bb * 8)));
        const __m256 q0 = _mm256_permutevar8x32_ps(lo, v);
        const __m256 q1 = _mm256_permutevar8x32_ps(lo, _mm256_srli_epi32(v, 2));
        const __m256 q2 = _mm256_permutevar8x32_ps(lo, _mm256_srli_epi32(v, 4));
        const __m256 q3 = _mm256_permutevar8x32_ps(lo, _mm256_srli_epi32(v, 6));
        for (int b = 0; b < B; ++b) {
          const float* zb = zp + b * n + bb * 32;
          acc[b][0 % NA] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(zb), acc[b][0 % NA]);
          acc[b][1 % NA] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(zb + 8), acc[b][1 % NA]);
          acc[b][2 % NA] = _mm256_fmadd_ps(q2, _mm256_loadu_ps(zb + 16), acc[b][2 % NA]);
          acc[b][3 % NA] = _mm256_fmadd_ps(q3, _mm256_loadu_ps(zb + 24), acc[b][3 % NA]);
        }
      }
      for (int b = 0; b < B; ++b) {
        __m256 s = acc[b][0];
        for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[b][a]);
        y[b * ldy + j] += hsum256(s);
      }
    }
  }
}

#define LCQAT_DISPATCH_B(FN, B, ...)             \
  switch (B) {                                   \
    case 1: FN<1>(__VA_ARGS__); break;           \
    case 2: FN<2>(__VA_ARGS__); break;           \
    case 3: FN<3>(__VA_ARGS__); break;           \
    case 4: FN<4>(__VA_ARGS__); break;           \
    case 5: FN<5>(__VA_ARGS__); break;           \
    case 6: FN<6>(__VA_ARGS__); break;           \
    case 7: FN<7>(__VA_ARGS__); break;           \
    default: FN<8>(__VA_ARGS__); break;          \
  }
#endif

void lc_gemv_rows(const float* zp, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                  int64_t j1, Isa isa, float* y, int64_t ldy) {
  if (B < 1 || B > kMaxGemvBatch) std::abort();  // the caller checks; never reached
#if LCQAT_X86
  if (isa == Isa::Avx512) {
    LCQAT_DISPATCH_B(gemv_avx512, B, zp, c, n, packed, j0, j1, y, ldy);
    return;
  }
  if (isa == Isa::Avx2) {
    LCQAT_DISPATCH_B(gemv_avx2, B, zp, c, n, packed, j0, j1, y, ldy);
    return;
  }
#endif
  gemv_scalar(zp, c, B, n, packed, j0, j1, y, ldy);
}

// ------------------------------------------------------------------ int8 weight-only GEMV
static void int8_scalar(const float* x, int64_t B, int64_t n, const int8_t* w, const float* scale, int64_t j0,
                        int64_t j1, float* y, int64_t ldy, int64_t i0) {
  for (int64_t j = j0; j < j1; ++j) {
    const int8_t* wr = w + j * n;
    for (int64_t b = 0; b < B; ++b) {
      float s = 0.f;
      for (int64_t i = i0; i < n; ++i) s += static_cast<float>(wr[i]) * x[b * n + i];
      y[b * ldy + j] += s * scale[j];
    }
  }
}

#if LCQAT_X86
template <int B>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void int8_avx512(
    const float* x, int64_t n, const int8_t* w, const float* scale, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  constexpr int NA = B == 1 ? 4 : (B <= 3 ? 2 : 1);
  const int64_t n16 = n / 16 * 16;
  for (int64_t j = j0; j < j1; ++j) {
    const int8_t* wr = w + j * n;
    __m512 acc[B][NA];
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < NA; ++a) acc[b][a] = _mm512_setzero_ps();
    int64_t i = 0;
    int step = 0;
    for (; i < n16; i += 16, ++step) {
      const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + i))));
      for (int b = 0; b < B; ++b) acc[b][step % NA] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + b * n + i), acc[b][step % NA]);
    }
    for (int b = 0; b < B; ++b) {
      __m512 s = acc[b][0];
      for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc[b][a]);
      y[b * ldy + j] = _mm512_reduce_add_ps(s) * scale[j];
    }
  }
  if (n16 < n) int8_scalar(x, B, n, w, scale, j0, j1, y, ldy, n16);
}

template <int B>
__attribute__((target("avx2,fma"))) static void int8_avx2(const float* x, int64_t n, const int8_t* w,
                                                         const float* scale, int64_t j0, int64_t j1, float* y,
                                                         int64_t ldy) {
  constexpr int NA = B == 1 ? 4 : (B <= 3 ? 2 : 1);
  const int64_t n8 = n / 8 * 8;
  for (int64_t j = j0; j < j1; ++j) {
    const int8_t* wr = w + j * n;
    __m256 acc[B][NA];
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < NA; ++a) acc[b][a] = _mm256_setzero_ps();
    int64_t i = 0;
    int step = 0;
    for (; i < n8; i += 8, ++step) {
      const __m256 wv = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr + i))));
      for (int b = 0; b < B; ++b) acc[b][step % NA] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * n + i), acc[b][step % NA]);
    }
    for (int b = 0; b < B; ++b) {
      __m256 s = acc[b][0];
      for (int a = 1; a < NA; ++a) s = _mm256_add_ps(s, acc[b][a]);
      y[b * ldy + j] = hsum256(s) * scale[j];
    }
  }
  if (n8 < n) int8_scalar(x, B, n, w, scale, j0, j1, y, ldy, n8);
}
#endif

void int8_gemv_rows(const float* x, int64_t B, int64_t n, const int8_t* w, const float* scale, int64_t j0, int64_t j1,
                    Isa isa, float* y, int64_t ldy) {
  if (B < 1 || B > kMaxGemvBatch) std::abort();
#if LCQAT_X86
  if (isa == Isa::Avx512) {
    LCQAT_DISPATCH_B(int8_avx512, B, x, n, w, scale, j0, j1, y, ldy);
    return;
  }
  if (isa == Isa::Avx2) {
    LCQAT_DISPATCH_B(int8_avx2, B, x, n, w, scale, j0, j1, y, ldy);
    return;
  }
#endif
  for (int64_t j = j0; j < j1; ++j)
    for (int64_t b = 0; b < B; ++b) y[b * ldy + j] = 0.f;
  int8_scalar(x, B, n, w, scale, j0, j1, y, ldy, 0);
}

}  // namespace cpu
}  // namespace lcqat

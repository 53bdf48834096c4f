// CPU kernels of the LC layer. See kernels.h. The AVX-512 and AVX2 variants are compiled with
// per-function target attributes (the rest of the file keeps the baseline ISA), and chosen at run
// time with __builtin_cpu_supports, so one binary runs on any x86-64 CPU.
#include "kernels.h"

#include <cmath>
#include <cstdlib>
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <mutex>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LCQAT_X86 1
#else
#define LCQAT_X86 0
#endif

namespace lcqat {
namespace cpu {

// ------------------------------------------------------------------ ISA detection
const char* cpu_switch(const char* what) {
  const std::string name = std::string("OPTIMUM_LCQAT_CPU_") + what, old = std::string("LCQAT_CPU_") + what;
  if (const char* v = std::getenv(name.c_str())) return v;
  const char* v = std::getenv(old.c_str());
  if (v) {
    static std::mutex mu;
    static std::set<std::string> warned;
    std::lock_guard<std::mutex> lock(mu);
    if (warned.insert(old).second)
      std::fprintf(stderr, "optimum-lcqat: %s is deprecated and will be removed; set %s=%s instead\n", old.c_str(),
                   name.c_str(), v);
  }
  return v;
}

static Isa detect_isa_uncached() {
  Isa best = Isa::Scalar;
#if LCQAT_X86 && defined(__GNUC__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::Avx512;
#endif
  if (const char* env = cpu_switch("ISA")) {
    std::string s(env);
    Isa cap = best;
    if (s == "scalar") cap = Isa::Scalar;
    else if (s == "avx2") cap = Isa::Avx2;
    else if (s == "avx512") cap = Isa::Avx512;
    else
      std::fprintf(stderr, "optimum-lcqat: OPTIMUM_LCQAT_CPU_ISA=%s is not one of scalar, avx2, avx512; "
                   "the kernels use the CPU's best (%s). Set one of those three, or unset it.\n",
                   env, isa_name(best));
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

// ------------------------------------------------------------------ prefetch
// The weights of a decode step stream from DRAM once per token (a 2-bit SmolLM2 and its int8
// lm_head do not stay in the cache between tokens), one row after another. Asking for the bytes
// kPrefetchUnits units ahead (a unit: one row, or one group of rows) hides the DRAM latency that
// the hardware prefetcher leaves: measured on the int8 lm_head inside the model, see
// benchmarks/decode.py. `rest` is the number of units left, so nothing past the end is touched.
constexpr int64_t kPrefetchUnits = 4;  // 4 beat 0, 16, 32 and 64 (SmolLM2 decode, 2 threads)

static inline void prefetch_ahead(const void* unit, int64_t unit_bytes, int64_t rest, int64_t stride) {
#if LCQAT_X86 || defined(__GNUC__)
  if (rest <= kPrefetchUnits) return;
  const char* p = static_cast<const char*>(unit) + kPrefetchUnits * stride;
  for (int64_t o = 0; o < unit_bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
#endif
}

// ------------------------------------------------------------------ Hadamard
// The in-place fast Walsh-Hadamard transform of one r-block, scalar: stage h pairs v[k] and
// v[k + h] into (a + b, a - b). Only stages h >= 4 vectorise this way, and SmolLM2's blocks of
// 64 spent ~2 us a 576-row in it (~30% of a layer at 256 rows), hence the vector versions below.
static void fwht_scalar(float* v, int64_t r) {
  for (int64_t h = 1; h < r; h *= 2)
    for (int64_t i = 0; i < r; i += 2 * h)
      for (int64_t k = i; k < i + h; ++k) {
        const float a = v[k], b = v[k + h];
        v[k] = a + b;
        v[k + h] = a - b;
      }
}

#if LCQAT_X86
// Stages 1, 2, 4, 8 inside one 16-float vector (partner = a permute of the vector, new = v * sign +
// partner gives a + b in the lower and a - b in the upper half of each pair: the same sums as the
// scalar code, bit for bit).
__attribute__((target("avx512f,avx512dq"), always_inline)) static inline __m512 fwht16(__m512 x) {
  const __m512 s1 = _mm512_setr_ps(1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1);
  const __m512 s2 = _mm512_setr_ps(1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1);
  const __m512 s4 = _mm512_setr_ps(1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1);
  const __m512 s8 = _mm512_setr_ps(1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1);
  x = _mm512_fmadd_ps(x, s1, _mm512_permute_ps(x, 0xB1));
  x = _mm512_fmadd_ps(x, s2, _mm512_permute_ps(x, 0x4E));
  x = _mm512_fmadd_ps(x, s4, _mm512_shuffle_f32x4(x, x, 0xB1));
  return _mm512_fmadd_ps(x, s8, _mm512_shuffle_f32x4(x, x, 0x4E));
}

// The stages of one block held in registers, its r / 16 <= 16 vectors in v: the same operations in
// the same order as the loops below (so the same bits), without storing and reloading the block
// between stages. The block's product ends with the multiplication by norm (vn).
template <int V>
__attribute__((target("avx512f,avx512dq"), always_inline)) static inline void fwht_regs(__m512 (&v)[V], __m512 vn) {
  // fully unrolled, so that v stays in registers: GCC -O3 left the h loop rolled and kept v on the
  // stack (at 256 rows a quarter of the AMX layer's time went to its two row stages)
#pragma GCC unroll 16
  for (int i = 0; i < V; ++i) v[i] = fwht16(v[i]);
#pragma GCC unroll 4
  for (int h = 1; h < V; h *= 2)
#pragma GCC unroll 16
    for (int i = 0; i < V; i += 2 * h)
#pragma GCC unroll 16
      for (int k = i; k < i + h; ++k) {
        const __m512 a = v[k], b = v[k + h];
        v[k] = _mm512_add_ps(a, b);
        v[k + h] = _mm512_sub_ps(a, b);
      }
#pragma GCC unroll 16
  for (int i = 0; i < V; ++i) v[i] = _mm512_mul_ps(v[i], vn);
}

template <int V>
__attribute__((target("avx512f,avx512dq"))) static void fwht_block_regs(float* p, float norm) {
  __m512 v[V];
  #pragma GCC unroll 16
  for (int i = 0; i < V; ++i) v[i] = _mm512_loadu_ps(p + 16 * i);
  fwht_regs<V>(v, _mm512_set1_ps(norm));
  #pragma GCC unroll 16
  for (int i = 0; i < V; ++i) _mm512_storeu_ps(p + 16 * i, v[i]);
}

__attribute__((target("avx512f,avx512dq"))) static void fwht_avx512(float* v, int64_t r, float norm) {
  switch (r) {  // blocks up to 256: the register version, which the AMX layer's fused stages run too
    case 16: return fwht_block_regs<1>(v, norm);
    case 32: return fwht_block_regs<2>(v, norm);
    case 64: return fwht_block_regs<4>(v, norm);
    case 128: return fwht_block_regs<8>(v, norm);
    case 256: return fwht_block_regs<16>(v, norm);
    default: break;
  }
  // r a multiple of 16, larger blocks: stages 1-8 in each vector, then stages >= 16 between vectors
  for (int64_t i = 0; i < r; i += 16) _mm512_storeu_ps(v + i, fwht16(_mm512_loadu_ps(v + i)));
  for (int64_t h = 16; h < r; h *= 2)
    for (int64_t i = 0; i < r; i += 2 * h)
      for (int64_t k = i; k < i + h; k += 16) {
        const __m512 a = _mm512_loadu_ps(v + k), b = _mm512_loadu_ps(v + k + h);
        _mm512_storeu_ps(v + k, _mm512_add_ps(a, b));
        _mm512_storeu_ps(v + k + h, _mm512_sub_ps(a, b));
      }
  const __m512 vn = _mm512_set1_ps(norm);
  for (int64_t i = 0; i < r; i += 16) _mm512_storeu_ps(v + i, _mm512_mul_ps(_mm512_loadu_ps(v + i), vn));
}

// r a multiple of 8, the same with 8-float vectors.
__attribute__((target("avx2,fma"))) static void fwht_avx2(float* v, int64_t r, float norm) {
  const __m256 s1 = _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1);
  const __m256 s2 = _mm256_setr_ps(1, 1, -1, -1, 1, 1, -1, -1);
  const __m256 s4 = _mm256_setr_ps(1, 1, 1, 1, -1, -1, -1, -1);
  for (int64_t i = 0; i < r; i += 8) {
    __m256 x = _mm256_loadu_ps(v + i);
    x = _mm256_fmadd_ps(x, s1, _mm256_permute_ps(x, 0xB1));
    x = _mm256_fmadd_ps(x, s2, _mm256_permute_ps(x, 0x4E));
    x = _mm256_fmadd_ps(x, s4, _mm256_permute2f128_ps(x, x, 0x01));
    _mm256_storeu_ps(v + i, x);
  }
  for (int64_t h = 8; h < r; h *= 2)
    for (int64_t i = 0; i < r; i += 2 * h)
      for (int64_t k = i; k < i + h; k += 8) {
        const __m256 a = _mm256_loadu_ps(v + k), b = _mm256_loadu_ps(v + k + h);
        _mm256_storeu_ps(v + k, _mm256_add_ps(a, b));
        _mm256_storeu_ps(v + k + h, _mm256_sub_ps(a, b));
      }
  const __m256 vn = _mm256_set1_ps(norm);
  for (int64_t i = 0; i < r; i += 8) _mm256_storeu_ps(v + i, _mm256_mul_ps(_mm256_loadu_ps(v + i), vn));
}
#endif

void hadamard_row(float* x, int64_t n, int64_t r, const float* left, int64_t K, bool transpose_left, float* work) {
  if (r > 1) {
    const float norm = 1.0f / std::sqrt(static_cast<float>(r));
    const Isa isa = detect_isa();
    for (int64_t base = 0; base < n; base += r) {
      float* v = x + base;
#if LCQAT_X86
      if (isa == Isa::Avx512 && r % 16 == 0) {
        fwht_avx512(v, r, norm);
        continue;
      }
      if (isa != Isa::Scalar && r % 8 == 0) {
        fwht_avx2(v, r, norm);
        continue;
      }
#endif
      fwht_scalar(v, r);
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

// One row, natural order: z[4g + s] = sum_t A[t, s] x[4g + t], returns sum_g <beta, x_g>.
static float fold_row_scalar(const float* x, int64_t g0, int64_t nb, const float* A, const float* beta, float* z) {
  double cst = 0.0;
  for (int64_t g = g0; g < nb; ++g) {
    const float* xg = x + 4 * g;
    for (int s = 0; s < 4; ++s)
      z[4 * g + s] = A[0 * 4 + s] * xg[0] + A[1 * 4 + s] * xg[1] + A[2 * 4 + s] * xg[2] + A[3 * 4 + s] * xg[3];
    cst += static_cast<double>(beta[0] * xg[0] + beta[1] * xg[1] + beta[2] * xg[2] + beta[3] * xg[3]);
  }
  return static_cast<float>(cst);
}

#if LCQAT_X86
// Four groups per vector: element t of every group broadcast inside its 128-bit lane
// (vpermilps) times column t of A repeated four times. ~0.1 us a 576-row where the scalar loop
// took ~1.2 us (a visible share of a 256-row layer call).
// z = A^T x for the four 4-groups of one vector (a_t: row t of A in each 128-bit lane)
__attribute__((target("avx512f,avx512dq"), always_inline)) static inline __m512 fold16(__m512 xv, __m512 a0, __m512 a1,
                                                                                       __m512 a2, __m512 a3) {
  __m512 zv = _mm512_mul_ps(_mm512_permute_ps(xv, 0x00), a0);
  zv = _mm512_fmadd_ps(_mm512_permute_ps(xv, 0x55), a1, zv);
  zv = _mm512_fmadd_ps(_mm512_permute_ps(xv, 0xAA), a2, zv);
  return _mm512_fmadd_ps(_mm512_permute_ps(xv, 0xFF), a3, zv);
}

__attribute__((target("avx512f,avx512dq"))) static float fold_row_avx512(const float* x, int64_t nb, const float* A,
                                                                        const float* beta, float* z) {
  // The tail first: a call into baseline (SSE) code while a zmm register is live runs it with a
  // dirty upper state.
  const int64_t g4 = nb / 4 * 4;
  const float tail = fold_row_scalar(x, g4, nb, A, beta, z);
  const __m512 a0 = _mm512_broadcast_f32x4(_mm_loadu_ps(A)), a1 = _mm512_broadcast_f32x4(_mm_loadu_ps(A + 4));
  const __m512 a2 = _mm512_broadcast_f32x4(_mm_loadu_ps(A + 8)), a3 = _mm512_broadcast_f32x4(_mm_loadu_ps(A + 12));
  const __m512 bv = _mm512_broadcast_f32x4(_mm_loadu_ps(beta));
  __m512 cacc = _mm512_setzero_ps();
  for (int64_t g = 0; g < g4; g += 4) {
    const __m512 xv = _mm512_loadu_ps(x + 4 * g);
    _mm512_storeu_ps(z + 4 * g, fold16(xv, a0, a1, a2, a3));
    cacc = _mm512_fmadd_ps(xv, bv, cacc);
  }
  return _mm512_reduce_add_ps(cacc) + tail;
}
#endif

float fold_row(const float* x, int64_t n, const float* A, const float* beta, float* z) {
#if LCQAT_X86
  if (detect_isa() == Isa::Avx512) return fold_row_avx512(x, n / 4, A, beta, z);
#endif
  return fold_row_scalar(x, 0, n / 4, A, beta, z);
}

// One row's share of the fold's parameter grads: gA[4t + s] += sum_g r[4g + t] gz[4g + s] and
// rsum[t] += sum_g r[4g + t] (the caller scales rsum by the row's g_c for beta's grad).
static void fold_grads_scalar(const float* r, const float* gz, int64_t g0, int64_t nb, float* gA, float* rsum) {
  for (int64_t g = g0; g < nb; ++g)
    for (int t = 0; t < 4; ++t) {
      const float rv = r[4 * g + t];
      rsum[t] += rv;
      for (int s = 0; s < 4; ++s) gA[4 * t + s] += rv * gz[4 * g + s];
    }
}

#if LCQAT_X86
// Four groups a vector: lane 4k + s of acc_t sums r[4g + t] gz[4g + s] over the vector's k-th groups.
__attribute__((target("avx512f,avx512dq"))) static void fold_grads_avx512(const float* r, const float* gz, int64_t nb,
                                                                          float* gA, float* rsum) {
  const int64_t g4 = nb / 4 * 4;
  fold_grads_scalar(r, gz, g4, nb, gA, rsum);  // the tail first (see fold_row_avx512)
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, rs = a0;
  for (int64_t g = 0; g < g4; g += 4) {
    const __m512 rv = _mm512_loadu_ps(r + 4 * g), gv = _mm512_loadu_ps(gz + 4 * g);
    a0 = _mm512_fmadd_ps(_mm512_permute_ps(rv, 0x00), gv, a0);
    a1 = _mm512_fmadd_ps(_mm512_permute_ps(rv, 0x55), gv, a1);
    a2 = _mm512_fmadd_ps(_mm512_permute_ps(rv, 0xAA), gv, a2);
    a3 = _mm512_fmadd_ps(_mm512_permute_ps(rv, 0xFF), gv, a3);
    rs = _mm512_add_ps(rs, rv);
  }
  alignas(64) float buf[5][16];
  _mm512_store_ps(buf[0], a0);
  _mm512_store_ps(buf[1], a1);
  _mm512_store_ps(buf[2], a2);
  _mm512_store_ps(buf[3], a3);
  _mm512_store_ps(buf[4], rs);
  for (int k = 0; k < 4; ++k)
    for (int s = 0; s < 4; ++s) {
      for (int t = 0; t < 4; ++t) gA[4 * t + s] += buf[t][4 * k + s];
      rsum[s] += buf[4][4 * k + s];
    }
}
#endif

void accumulate_fold_grads(const float* r, const float* gz, int64_t n, float* gA, float* rsum) {
#if LCQAT_X86
  if (detect_isa() == Isa::Avx512) return fold_grads_avx512(r, gz, n / 4, gA, rsum);
#endif
  fold_grads_scalar(r, gz, 0, n / 4, gA, rsum);
}

void prepare_activations(const float* x, int64_t B, int64_t n, const float* A, const float* beta, Isa isa,
                         float* zp, float* c) {
  const int64_t nb = n / 4;
  const int64_t blk = block_bytes(isa);
  const int64_t nfull = blk ? (nb / blk) * blk : 0;  // bytes covered by full blocks
  float tmp[256];                                     // one block of 4 * blk <= 64 floats
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * n;
    float* zb = zp + b * n;
#if LCQAT_X86
    if (detect_isa() == Isa::Avx512) c[b] = fold_row_avx512(xb, nb, A, beta, zb);
    else c[b] = fold_row_scalar(xb, 0, nb, A, beta, zb);
#else
    c[b] = fold_row_scalar(xb, 0, nb, A, beta, zb);
#endif
    // code-plane-major blocks for the GEMV: zp[base + s*blk + k] = z[base + 4k + s]
    for (int64_t base = 0; base < 4 * nfull; base += 4 * blk) {
      std::memcpy(tmp, zb + base, sizeof(float) * 4 * blk);
      for (int64_t k = 0; k < blk; ++k)
        for (int s = 0; s < 4; ++s) zb[base + s * blk + k] = tmp[4 * k + s];
    }
  }
}

// ------------------------------------------------------------------ the AMX layer's row stages
// One pass per Hadamard block with the block in registers, where hadamard_row, the folding and the
// bf16 rounding each pass over the row (at 64 rows these passes took about as long as the AMX product
// of a k/v projection). The same operations in the same order as the unfused passes: the same bits.
#if LCQAT_X86
#define LCQAT_TARGET_STAGE __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

LCQAT_TARGET_STAGE static inline void store_bf16x16(uint16_t* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), (__m256i)_mm512_cvtneps_pbh(v));
}

// 16 bf16 -> fp32, exact: the bits above 16 zeros
LCQAT_TARGET_STAGE static inline __m512 widen(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// 16 floats -> bf16 parts at out, out + ld, ...: Parts 1, rounded to nearest even; Parts 3, hi, mid
// and lo with v = hi + mid + lo exactly for normal v (hi = v rounded, mid = the remainder rounded,
// lo = what is left: v - hi has at most 16 significant bits and v - hi - mid at most 8, so both
// subtractions are exact and lo is exact in bf16).
template <int Parts>
LCQAT_TARGET_STAGE static inline void store_bf16_parts(uint16_t* out, int64_t ld, __m512 v) {
  if constexpr (Parts == 1) {
    store_bf16x16(out, v);
  } else {
    static_assert(Parts == 3, "one part or three");
    const __m256i hi = (__m256i)_mm512_cvtneps_pbh(v);
    const __m512 r1 = _mm512_sub_ps(v, widen(hi));
    const __m256i mid = (__m256i)_mm512_cvtneps_pbh(r1);
    const __m256i lo = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(r1, widen(mid)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + ld), mid);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 2 * ld), lo);
  }
}

LCQAT_TARGET_STAGE static void split_bf16x3_avx512(const float* z, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) store_bf16_parts<3>(out + i, n, _mm512_loadu_ps(z + i));
}

// 16 activations from x + i: bf16 (widened, exact: the bits above 16 zeros) or fp32
LCQAT_TARGET_STAGE static inline __m512 load16(const uint16_t* x, int64_t i) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i)));
}
LCQAT_TARGET_STAGE static inline __m512 load16(const float* x, int64_t i) { return _mm512_loadu_ps(x + i); }

// x (bf16 or fp32) * s_u, Hadamard blocks of 16 V, folding as fold_row_avx512 (n a multiple of 16:
// no scalar tail, whose sum is +0), z as Parts bf16 parts (store_bf16_parts: rows zb, zb + n, ...);
// returns the row constant.
template <int V, int Parts, typename T>
LCQAT_TARGET_STAGE static float input_stage_row(const T* x, int64_t n, const float* su, const float* A,
                                                const float* beta, uint16_t* zb) {
  const __m512 vn = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(16 * V)));  // hadamard_row's norm
  const __m512 a0 = _mm512_broadcast_f32x4(_mm_loadu_ps(A)), a1 = _mm512_broadcast_f32x4(_mm_loadu_ps(A + 4));
  const __m512 a2 = _mm512_broadcast_f32x4(_mm_loadu_ps(A + 8)), a3 = _mm512_broadcast_f32x4(_mm_loadu_ps(A + 12));
  const __m512 bv = _mm512_broadcast_f32x4(_mm_loadu_ps(beta));
  __m512 cacc = _mm512_setzero_ps();
  for (int64_t base = 0; base < n; base += 16 * V) {
    __m512 v[V];
    #pragma GCC unroll 16
    for (int i = 0; i < V; ++i) v[i] = _mm512_mul_ps(load16(x, base + 16 * i), _mm512_loadu_ps(su + base + 16 * i));
    fwht_regs<V>(v, vn);
    #pragma GCC unroll 16
    for (int i = 0; i < V; ++i) {
      store_bf16_parts<Parts>(zb + base + 16 * i, n, fold16(v[i], a0, a1, a2, a3));
      cacc = _mm512_fmadd_ps(v[i], bv, cacc);
    }
  }
  const float tail = 0.0f;
  return _mm512_reduce_add_ps(cacc) + tail;
}

// 16 outputs to out + i: rounded to bf16, or fp32 as they are
LCQAT_TARGET_STAGE static inline void store16(uint16_t* out, int64_t i, __m512 v) { store_bf16x16(out + i, v); }
LCQAT_TARGET_STAGE static inline void store16(float* out, int64_t i, __m512 v) { _mm512_storeu_ps(out + i, v); }

// r (fp32 products; Parts 3: the parts' products in rows r, r + ld, r + 2 ld, summed hi + (mid + lo)),
// Hadamard blocks of 16 V, * s_v (+ bias), into out (bf16 or fp32).
template <int V, int Parts, typename T>
LCQAT_TARGET_STAGE static void output_stage_row(const float* r, int64_t ld, int64_t len, const float* sv,
                                                const float* bias, T* out) {
  const __m512 vn = _mm512_set1_ps(1.0f / std::sqrt(static_cast<float>(16 * V)));
  for (int64_t base = 0; base < len; base += 16 * V) {
    __m512 v[V];
    #pragma GCC unroll 16
    for (int i = 0; i < V; ++i) {
      const int64_t at = base + 16 * i;
      v[i] = _mm512_loadu_ps(r + at);
      if constexpr (Parts == 3)
        v[i] = _mm512_add_ps(v[i], _mm512_add_ps(_mm512_loadu_ps(r + ld + at), _mm512_loadu_ps(r + 2 * ld + at)));
    }
    fwht_regs<V>(v, vn);
    #pragma GCC unroll 16
    for (int i = 0; i < V; ++i) {
      __m512 y = _mm512_mul_ps(v[i], _mm512_loadu_ps(sv + base + 16 * i));
      // GCC contracts a product and a sum into an FMA in C++ (-ffp-contract=fast), which rounds once:
      // the empty asm keeps the rounded product, as the unfused (baseline ISA) code computes it
      __asm__("" : "+v"(y));
      if (bias) y = _mm512_add_ps(y, _mm512_loadu_ps(bias + base + 16 * i));
      store16(out, base + 16 * i, y);
    }
  }
}
#undef LCQAT_TARGET_STAGE
#endif

// V = block / 16 for the blocks the fused stages take (16..256), else 0
static int stage_vectors(int64_t block, int64_t len, int64_t K) {
  if (K > 1 || !has_bf16_dot() || len % block) return 0;
  switch (block) {
    case 16: return 1;
    case 32: return 2;
    case 64: return 4;
    case 128: return 8;
    case 256: return 16;
    default: return 0;
  }
}

// The fused stages for block 16 V (stage_vectors), false where they do not apply.
template <int Parts, typename T>
static bool input_stage(const T* x, int64_t n, const float* su, int64_t block, int64_t K, const float* A,
                        const float* beta, uint16_t* zb, float* c) {
#if LCQAT_X86
  switch (stage_vectors(block, n, K)) {
    case 1: *c = input_stage_row<1, Parts>(x, n, su, A, beta, zb); return true;
    case 2: *c = input_stage_row<2, Parts>(x, n, su, A, beta, zb); return true;
    case 4: *c = input_stage_row<4, Parts>(x, n, su, A, beta, zb); return true;
    case 8: *c = input_stage_row<8, Parts>(x, n, su, A, beta, zb); return true;
    case 16: *c = input_stage_row<16, Parts>(x, n, su, A, beta, zb); return true;
    default: return false;
  }
#else
  (void)x, (void)n, (void)su, (void)block, (void)K, (void)A, (void)beta, (void)zb, (void)c;
  return false;
#endif
}

template <int Parts, typename T>
static bool output_stage(const float* r, int64_t ld, int64_t len, int64_t block, int64_t K, const float* sv,
                         const float* bias, T* out) {
#if LCQAT_X86
  switch (stage_vectors(block, len, K)) {
    case 1: output_stage_row<1, Parts>(r, ld, len, sv, bias, out); return true;
    case 2: output_stage_row<2, Parts>(r, ld, len, sv, bias, out); return true;
    case 4: output_stage_row<4, Parts>(r, ld, len, sv, bias, out); return true;
    case 8: output_stage_row<8, Parts>(r, ld, len, sv, bias, out); return true;
    case 16: output_stage_row<16, Parts>(r, ld, len, sv, bias, out); return true;
    default: return false;
  }
#else
  (void)r, (void)ld, (void)len, (void)block, (void)K, (void)sv, (void)bias, (void)out;
  return false;
#endif
}

bool input_stage_bf16(const uint16_t* x, int64_t n, const float* su, int64_t block, int64_t K, const float* A,
                      const float* beta, uint16_t* zb, float* c) {
  return input_stage<1>(x, n, su, block, K, A, beta, zb, c);
}

bool output_stage_bf16(const float* r, int64_t len, int64_t block, int64_t K, const float* sv, const float* bias,
                       uint16_t* out) {
  return output_stage<1>(r, 0, len, block, K, sv, bias, out);
}

bool input_stage_f32x3(const float* x, int64_t n, const float* su, int64_t block, int64_t K, const float* A,
                       const float* beta, uint16_t* zb, float* c) {
  return input_stage<3>(x, n, su, block, K, A, beta, zb, c);
}

bool output_stage_f32x3(const float* r, int64_t ld, int64_t len, int64_t block, int64_t K, const float* sv,
                        const float* bias, float* out) {
  return output_stage<3>(r, ld, len, block, K, sv, bias, out);
}

void split_bf16x3(const float* z, int64_t n, uint16_t* out) {
  if (!has_bf16_dot() || n % 16) std::abort();  // the caller checks; never reached
#if LCQAT_X86
  split_bf16x3_avx512(z, n, out);
#else
  (void)z, (void)out;
#endif
}

// ------------------------------------------------------------------ GEMV kernels
// The fp32 GEMV and GEMM multiply centred codes q - 1.5 (kernels.h), as the bf16 paths do.
static inline float centred_code(unsigned q) { return static_cast<float>(q) - kCodeCentre; }

static inline float tail_dot(const uint8_t* p, int64_t g0, int64_t nb, const float* z) {
  float s = 0.0f;
  for (int64_t g = g0; g < nb; ++g) {
    const unsigned byte = p[g];
    const float* zg = z + 4 * g;
    s += centred_code(byte & 3) * zg[0] + centred_code((byte >> 2) & 3) * zg[1] +
         centred_code((byte >> 4) & 3) * zg[2] + centred_code(byte >> 6) * zg[3];
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

// Centred code values (q - 1.5) by the low 4 bits of a lane: lo[i] = (i & 3) - 1.5, hi[i] = (i >> 2) - 1.5.
__attribute__((target("avx512f"))) static inline __m512 centred_lo_512() {
  return _mm512_setr_ps(-1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f,
                        0.5f, 1.5f);
}
__attribute__((target("avx512f"))) static inline __m512 centred_hi_512() {
  return _mm512_setr_ps(-1.5f, -1.5f, -1.5f, -1.5f, -0.5f, -0.5f, -0.5f, -0.5f, 0.5f, 0.5f, 0.5f, 0.5f, 1.5f, 1.5f,
                        1.5f, 1.5f);
}

// hsum256 first: the AVX2 traits use it.
__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// ---- vector traits: the few operations of the LC GEMV and the int8 loop, one struct per ISA, each member with
// its ISA's target attribute. The loop is written once (int8_rows below) over these traits. A
// template cannot take its target attribute from a parameter, so int8_rows itself has the
// baseline target and is instantiated in per-ISA wrappers that carry the ISA's target and
// `flatten`: int8_rows and the trait members are all inlined into the wrapper, where every
// intrinsic meets its ISA (generated code as with the former hand-written copies). GCC warns
// (-Wpsabi) that a vector passed to or returned from a trait member by baseline code would use
// another ABI; no such call is left after flattening.
#define LCQAT_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl")))
#define LCQAT_TARGET_AVX2 __attribute__((target("avx2,fma")))

struct VecAvx512 {
  using F = __m512;
  static constexpr int kLanes = 16;
  LCQAT_TARGET_AVX512 static inline F zero() { return _mm512_setzero_ps(); }
  LCQAT_TARGET_AVX512 static inline F load(const float* p) { return _mm512_loadu_ps(p); }
  // kLanes int8 weights -> fp32 (sign extension, exact conversion)
  LCQAT_TARGET_AVX512 static inline F load_i8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  LCQAT_TARGET_AVX512 static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  LCQAT_TARGET_AVX512 static inline F add(F a, F b) { return _mm512_add_ps(a, b); }
  LCQAT_TARGET_AVX512 static inline float sum(F v) { return _mm512_reduce_add_ps(v); }
  // kLanes code bytes -> their four centred code planes (q[s]: field s of each byte). vpermps looks up
  // only the low 4 bits of each index: 1 zero-extension, 1 shift and 4 permutes decode 64 codes.
  LCQAT_TARGET_AVX512 static inline void decode(const uint8_t* p, F (&q)[4]) {
    const __m512 lo = centred_lo_512(), hi = centred_hi_512();
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m512i v4 = _mm512_srli_epi32(v, 4);
    q[0] = _mm512_permutexvar_ps(v, lo);
    q[1] = _mm512_permutexvar_ps(v, hi);
    q[2] = _mm512_permutexvar_ps(v4, lo);
    q[3] = _mm512_permutexvar_ps(v4, hi);
  }
};

struct VecAvx2 {
  using F = __m256;
  static constexpr int kLanes = 8;
  LCQAT_TARGET_AVX2 static inline F zero() { return _mm256_setzero_ps(); }
  LCQAT_TARGET_AVX2 static inline F load(const float* p) { return _mm256_loadu_ps(p); }
  LCQAT_TARGET_AVX2 static inline F load_i8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  LCQAT_TARGET_AVX2 static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  LCQAT_TARGET_AVX2 static inline F add(F a, F b) { return _mm256_add_ps(a, b); }
  LCQAT_TARGET_AVX2 static inline float sum(F v) { return hsum256(v); }
  // vpermps (8 entries) looks up the low 3 bits: lo[i] = (i & 3) - 1.5 gives field s of v >> 2s.
  LCQAT_TARGET_AVX2 static inline void decode(const uint8_t* p, F (&q)[4]) {
    const __m256 lo = _mm256_setr_ps(-1.5f, -0.5f, 0.5f, 1.5f, -1.5f, -0.5f, 0.5f, 1.5f);
    const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    q[0] = _mm256_permutevar8x32_ps(lo, v);
    q[1] = _mm256_permutevar8x32_ps(lo, _mm256_srli_epi32(v, 2));
    q[2] = _mm256_permutevar8x32_ps(lo, _mm256_srli_epi32(v, 4));
    q[3] = _mm256_permutevar8x32_ps(lo, _mm256_srli_epi32(v, 6));
  }
};

// The LC GEMV, rows [j0, j1), B activation rows: V::kLanes code bytes (4 * kLanes weights) per step,
// decoded once for the B rows; the activations in code-plane-major blocks of kLanes bytes
// (prepare_activations), so that code plane s of a step multiplies one contiguous vector.
template <class V, int B>
static inline void gemv_rows(const float* zp, const float* c, int64_t n, const uint8_t* packed, int64_t j0, int64_t j1,
                             float* y, int64_t ldy) {
  constexpr int NA = Accs<B>::value;
  constexpr int64_t W = V::kLanes;
  const int64_t nb = n / 4;
  const int64_t nblk = nb / W;
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* p = packed + j * nb;
    for (int b = 0; b < B; ++b) y[b * ldy + j] = tail_dot(p, nblk * W, nb, zp + b * n) + c[b];
  }
  const int64_t cb = col_blocks_per_pass(B, 4 * W);
  for (int64_t k0 = 0; k0 < nblk; k0 += cb) {
    const int64_t k1 = std::min(nblk, k0 + cb);
    for (int64_t j = j0; j < j1; ++j) {
      const uint8_t* p = packed + j * nb;
      if (k0 == 0) prefetch_ahead(p, nb, j1 - j, nb);
      typename V::F acc[B][NA];
      for (int b = 0; b < B; ++b)
        for (int a = 0; a < NA; ++a) acc[b][a] = V::zero();
      for (int64_t bb = k0; bb < k1; ++bb) {
        typename V::F q[4];
        V::decode(p + bb * W, q);
        for (int b = 0; b < B; ++b) {
          const float* zb = zp + b * n + bb * 4 * W;
          for (int s = 0; s < 4; ++s) acc[b][s % NA] = V::fma(q[s], V::load(zb + s * W), acc[b][s % NA]);
        }
      }
      for (int b = 0; b < B; ++b) {
        typename V::F s = acc[b][0];
        for (int a = 1; a < NA; ++a) s = V::add(s, acc[b][a]);
        y[b * ldy + j] += V::sum(s);
      }
    }
  }
}

template <int B>
LCQAT_TARGET_AVX512 __attribute__((flatten)) static void gemv_avx512(const float* zp, const float* c, int64_t n,
                                                                     const uint8_t* packed, int64_t j0, int64_t j1,
                                                                     float* y, int64_t ldy) {
  gemv_rows<VecAvx512, B>(zp, c, n, packed, j0, j1, y, ldy);
}

template <int B>
LCQAT_TARGET_AVX2 __attribute__((flatten)) static void gemv_avx2(const float* zp, const float* c, int64_t n,
                                                                 const uint8_t* packed, int64_t j0, int64_t j1,
                                                                 float* y, int64_t ldy) {
  gemv_rows<VecAvx2, B>(zp, c, n, packed, j0, j1, y, ldy);
}
#pragma GCC diagnostic pop

// Batch-1 rows [j0, j1): whole groups of four through `four`, the remaining (j1 - j0) mod 4
// rows through `one` (the GEMVs that process four rows per step).
template <class Four, class One>
static inline void rows_by_four(int64_t j0, int64_t j1, Four&& four, One&& one) {
  const int64_t j4 = j0 + (j1 - j0) / 4 * 4;
  if (j4 > j0) four(j0, j4);
  if (j4 < j1) one(j4, j1);
}

// [sum r0, sum r1, sum r2, sum r3] in one transpose-and-add tree (~11 uops where four separate
// _mm512_reduce_add_ps take ~32): the end-of-row reduction is a visible share of a 576-wide row.
__attribute__((target("avx512f,avx512dq"))) static inline __m128 reduce4_512(__m512 r0, __m512 r1, __m512 r2,
                                                                              __m512 r3) {
  const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(r0, r1), _mm512_unpackhi_ps(r0, r1));
  const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(r2, r3), _mm512_unpackhi_ps(r2, r3));
  const __m512 q = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 d = _mm256_add_ps(_mm512_castps512_ps256(q), _mm512_extractf32x8_ps(q, 1));
  return _mm_add_ps(_mm256_castps256_ps128(d), _mm256_extractf128_ps(d, 1));
}

// Batch 1 (token-by-token decode), four weight rows per step: the 64 activations of a block are
// loaded once for four rows and the four row sums are reduced together. Same decoding of the
// codes as gemv_avx512 (VecAvx512::decode); the rows left over (m mod 4) go through gemv_avx512<1>.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void gemv1_avx512_rows4(
    const float* zp, const float* c, int64_t n, const uint8_t* packed, int64_t j0, int64_t j1, float* y) {
  const int64_t nb = n / 4;
  const int64_t nblk = nb / 16;
  for (int64_t j = j0; j < j1; ++j) y[j] = tail_dot(packed + j * nb, nblk * 16, nb, zp) + c[0];
  const int64_t cb = col_blocks_per_pass(1, 64);
  for (int64_t k0 = 0; k0 < nblk; k0 += cb) {
    const int64_t k1 = std::min(nblk, k0 + cb);
    for (int64_t j = j0; j < j1; j += 4) {
      if (k0 == 0) prefetch_ahead(packed + j * nb, 4 * nb, (j1 - j) / 4, 4 * nb);
      const uint8_t* p[4];
      for (int r = 0; r < 4; ++r) p[r] = packed + (j + r) * nb;
      __m512 acc[4][2];
      for (int r = 0; r < 4; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
      for (int64_t bb = k0; bb < k1; ++bb) {
        const float* zb = zp + bb * 64;
        const __m512 z0 = _mm512_loadu_ps(zb), z1 = _mm512_loadu_ps(zb + 16);
        const __m512 z2 = _mm512_loadu_ps(zb + 32), z3 = _mm512_loadu_ps(zb + 48);
        for (int r = 0; r < 4; ++r) {
          __m512 q[4];
          VecAvx512::decode(p[r] + bb * 16, q);
          acc[r][0] = _mm512_fmadd_ps(q[0], z0, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(q[1], z1, acc[r][1]);
          acc[r][0] = _mm512_fmadd_ps(q[2], z2, acc[r][0]);
          acc[r][1] = _mm512_fmadd_ps(q[3], z3, acc[r][1]);
        }
      }
      const __m128 s = reduce4_512(_mm512_add_ps(acc[0][0], acc[0][1]), _mm512_add_ps(acc[1][0], acc[1][1]),
                                   _mm512_add_ps(acc[2][0], acc[2][1]), _mm512_add_ps(acc[3][0], acc[3][1]));
      _mm_storeu_ps(y + j, _mm_add_ps(_mm_loadu_ps(y + j), s));
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

// ------------------------------------------------------------------ batched GEMM (serving batches)
// The GEMV above keeps the input dimension in the vector lanes: every output needs a horizontal
// reduction and every code byte is decoded once per slice of <= 8 activation rows, which at
// 16-256 rows costs more than the FMAs (0.3-0.6x dense fp32 at 64 rows). Here the layout of a
// classical GEMM micro-kernel: a panel of JW weight rows x kKc inputs is decoded once into a
// transposed fp32 buffer (centred q values, the codebook is folded into the activations), and then
// every tile of BT activation rows runs over it with the output rows in the vector lanes:
// per input, JW/16 panel loads and BT broadcasts feed BT * JW/16 FMAs, no reductions. The panel
// (kKc * JW floats) and the BT activation rows of a tile stay in L1 while the block of
// activation rows (kBlockBytes) comes from L2/L3.
constexpr int64_t kKc = 128;      // inputs per fp32 panel pass (a multiple of 16): 16 KB of panel
constexpr int64_t kKcBf16 = 256;  // the same 16 KB in bf16 pairs
// Activation bytes per block of rows that every panel passes over. 4 MiB beat 1 MiB (an L2) by
// 20-35% at 64-256 rows on 4096-11008-wide layers (AMD EPYC, 2 threads, fp32 and bf16): the
// decoding of a panel is shared by more tiles, and the block streams well from L3.
constexpr int64_t kBlockBytes = int64_t{1} << 22;

#if LCQAT_X86
constexpr int kPanelAvx512 = 32;  // weight rows per panel: 2 vectors of 16
constexpr int kTileAvx512 = 12;   // activation rows per tile: 24 accumulators
constexpr int kPanelAvx2 = 16;    // 2 vectors of 8
constexpr int kTileAvx2 = 6;      // 12 accumulators (16 ymm registers)

// The code bytes the next panel will read (the next inputs of these rows, or the next rows'
// first ones): when serving streams the weights from DRAM, a panel's 16-row gathers otherwise
// wait on ~32 cache misses each time (measured 2-4x slower per call at 4-8 rows cold).
static inline void prefetch_next_panel(const uint8_t* packed, int64_t nb, int64_t j, int64_t rows, int64_t k1,
                                       int64_t n, int64_t bytes) {
  const bool next_rows = k1 >= n;
  const uint8_t* base = next_rows ? packed + (j + rows) * nb : packed + j * nb + k1 / 4;
  for (int64_t r = 0; r < rows; ++r) {
    __builtin_prefetch(base + r * nb, 0, 3);
    if (bytes > 1) __builtin_prefetch(base + r * nb + bytes - 1, 0, 3);
  }
}

// The 16 bf16 pairs a 4-bit field (q_even | q_odd << 2) of the codes stands for: entry i holds
// the centred code i & 3 in its low half and i >> 2 in its high half (kCentredCodeBf16).
__attribute__((target("avx512f"))) static inline __m512i bf16_pair_table() {
  alignas(64) uint32_t pairs[16];
  for (int i = 0; i < 16; ++i) pairs[i] = kCentredCodeBf16[i & 3] | (uint32_t{kCentredCodeBf16[i >> 2]} << 16);
  return _mm512_load_si512(pairs);
}

// Panel of weight rows [j, j + rows), inputs [k0, k1) (k0, k1 multiples of 16, rows <= 32;
// absent rows decode as code 0, -1.5 centred; never stored). One 32-bit gather per 16 rows reads 4 code bytes (16 inputs) of
// each row, then
// - fp32 (T = float): panel [k1 - k0][32] of centred q values; a shift and a permute (lo[i] = (i & 3) - 1.5 on
//   the low 4 bits) turn each 2-bit field into 16 floats;
// - bf16 pairs (T = uint32_t, for the bf16 GEMM below): panel [(k1 - k0) / 2][32]; the 4-bit
//   field of a pair (q_even | q_odd << 2) indexes a 16-entry table of ready-made pairs, so one
//   shift and one permute decode 32 codes.
template <class T>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void decode_panel_avx512(
    const uint8_t* packed, int64_t nb, int64_t j, int64_t rows, int64_t k0, int64_t k1, T* panel) {
  constexpr bool kPairs = std::is_same_v<T, uint32_t>;
  prefetch_next_panel(packed, nb, j, rows, k1, 4 * nb, (k1 - k0) / 4);
  const __m512 lo = centred_lo_512();
  const __m512i table = bf16_pair_table();
  const __m512i row_off = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                             _mm512_set1_epi32(static_cast<int>(nb)));
  for (int h = 0; h < 2; ++h) {
    const int64_t r0 = 16 * h;
    const int64_t live = std::max<int64_t>(0, std::min<int64_t>(16, rows - r0));
    const __mmask16 mk = static_cast<__mmask16>((1u << live) - 1u);
    const uint8_t* base = packed + (j + r0) * nb;
    for (int64_t k = k0; k < k1; k += 16) {
      const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mk, row_off, base + k / 4, 1);
      if constexpr (kPairs) {
        T* out = panel + (k - k0) / 2 * 32 + r0;
        for (int t = 0; t < 8; ++t)  // inputs k + 2t, k + 2t + 1: bits 4t .. 4t + 3 of the 4 code bytes
          _mm512_storeu_si512(out + t * 32, _mm512_permutexvar_epi32(_mm512_srli_epi32(v, 4 * t), table));
      } else {
        T* out = panel + (k - k0) * 32 + r0;
        for (int t = 0; t < 16; ++t)  // input k + t: byte t / 4, field t % 4
          _mm512_storeu_ps(out + t * 32, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 8 * (t / 4) + 2 * (t % 4)), lo));
      }
    }
  }
}

// The accumulators of a 32-wide tile of BT rows: y's rows as they are (or c[b] on the first
// pass), and back; rows of y past `rows` are neither read nor written. Shared by the fp32 and the
// bf16 tile (always inlined: the accumulators stay in registers).
struct TileMasks512 {
  __mmask16 m0, m1;
  explicit TileMasks512(int64_t rows)
      : m0(static_cast<__mmask16>((1u << std::min<int64_t>(16, rows)) - 1u)),
        m1(static_cast<__mmask16>((1u << std::max<int64_t>(0, std::min<int64_t>(16, rows - 16))) - 1u)) {}
};

template <int BT>
__attribute__((target("avx512f"), always_inline)) static inline void tile_load_512(__m512 (&acc)[BT][2],
                                                                                   const TileMasks512& mk,
                                                                                   const float* c, bool first,
                                                                                   const float* y, int64_t ldy) {
  for (int b = 0; b < BT; ++b) {
    if (first) {
      acc[b][0] = acc[b][1] = _mm512_set1_ps(c[b]);
    } else {
      acc[b][0] = _mm512_maskz_loadu_ps(mk.m0, y + b * ldy);
      acc[b][1] = _mm512_maskz_loadu_ps(mk.m1, y + b * ldy + 16);
    }
  }
}

template <int BT>
__attribute__((target("avx512f"), always_inline)) static inline void tile_store_512(const __m512 (&acc)[BT][2],
                                                                                    const TileMasks512& mk, float* y,
                                                                                    int64_t ldy) {
  for (int b = 0; b < BT; ++b) {
    _mm512_mask_storeu_ps(y + b * ldy, mk.m0, acc[b][0]);
    _mm512_mask_storeu_ps(y + b * ldy + 16, mk.m1, acc[b][1]);
  }
}

// y[b, j:j+32] (+)= sum_k panel[k] * z[b, k0 + k] over the panel's inputs, BT rows, z packed
// as zt[k * BT + b] (see gemm_panels); the first pass starts from c[b], later ones from y. Rows
// of y past `rows` are not written.
template <int BT>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))) static void panel_tile_avx512(
    const float* panel, int64_t kc, const float* z, int64_t n, const float* c, bool first, int64_t rows, float* y,
    int64_t ldy) {
  const TileMasks512 mk(rows);
  __m512 acc[BT][2];
  tile_load_512<BT>(acc, mk, c, first, y, ldy);
  for (int64_t k = 0; k < kc; ++k) {
    const __m512 w0 = _mm512_loadu_ps(panel + k * 32), w1 = _mm512_loadu_ps(panel + k * 32 + 16);
    for (int b = 0; b < BT; ++b) {
      const __m512 zb = _mm512_set1_ps(z[k * BT + b]);
      acc[b][0] = _mm512_fmadd_ps(w0, zb, acc[b][0]);
      acc[b][1] = _mm512_fmadd_ps(w1, zb, acc[b][1]);
    }
  }
  tile_store_512<BT>(acc, mk, y, ldy);
}

template <int BT>
__attribute__((target("avx2,fma"))) static void panel_tile_avx2(const float* panel, int64_t kc, const float* z,
                                                                int64_t n, const float* c, bool first, int64_t rows,
                                                                float* y, int64_t ldy) {
  __m256 acc[BT][2];
  for (int b = 0; b < BT; ++b) {
    if (first) {
      acc[b][0] = acc[b][1] = _mm256_set1_ps(c[b]);
    } else if (rows == 16) {
      acc[b][0] = _mm256_loadu_ps(y + b * ldy);
      acc[b][1] = _mm256_loadu_ps(y + b * ldy + 8);
    } else {
      alignas(32) float t[16] = {0};
      for (int64_t r = 0; r < rows; ++r) t[r] = y[b * ldy + r];
      acc[b][0] = _mm256_load_ps(t);
      acc[b][1] = _mm256_load_ps(t + 8);
    }
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * 16), w1 = _mm256_loadu_ps(panel + k * 16 + 8);
    for (int b = 0; b < BT; ++b) {
      const __m256 zb = _mm256_broadcast_ss(z + k * BT + b);
      acc[b][0] = _mm256_fmadd_ps(w0, zb, acc[b][0]);
      acc[b][1] = _mm256_fmadd_ps(w1, zb, acc[b][1]);
    }
  }
  for (int b = 0; b < BT; ++b) {
    if (rows == 16) {
      _mm256_storeu_ps(y + b * ldy, acc[b][0]);
      _mm256_storeu_ps(y + b * ldy + 8, acc[b][1]);
    } else {
      alignas(32) float t[16];
      _mm256_store_ps(t, acc[b][0]);
      _mm256_store_ps(t + 8, acc[b][1]);
      for (int64_t r = 0; r < rows; ++r) y[b * ldy + r] = t[r];
    }
  }
}

// ---- bf16 products (bf16 activations on CPUs with AVX512_BF16). Dense bf16 layers multiply in
// bf16 with fp32 accumulation (oneDNN's vdpbf16ps GEMM: twice the fp32 FMA rate), which left the
// fp32 GEMM above at 0.3-0.6x of them from 16 rows. The same instruction here: the panel holds
// the centred code values q - 1.5 in {-1.5, -0.5, 0.5, 1.5}, exact in bf16, so the weights lose
// nothing; only the codebook-folded activations z are rounded to bf16 (relative 2^-9, as a bf16
// activation already is), and the row constant carries 1.5 * sum z unrounded (kernels.h). Inputs go in pairs: a 32-bit lane holds (input 2p in the low half, 2p + 1 in the high
// half) of one weight row in the panel, of one activation row in zt, and vdpbf16ps adds
// q[j, 2p] z[b, 2p] + q[j, 2p + 1] z[b, 2p + 1] to lane j.

// y[b, j:j+32] (+)= sum over the panel's input pairs, BT rows, zt[p * BT + b] = the bf16 pair of
// row b; as panel_tile_avx512 otherwise.
template <int BT>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void panel_tile_bf16_avx512(
    const uint32_t* panel, int64_t kc, const uint32_t* z, int64_t n, const float* c, bool first, int64_t rows,
    float* y, int64_t ldy) {
  const TileMasks512 mk(rows);
  __m512 acc[BT][2];
  tile_load_512<BT>(acc, mk, c, first, y, ldy);
  for (int64_t p = 0; p < kc / 2; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + p * 32);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(panel + p * 32 + 16);
    for (int b = 0; b < BT; ++b) {
      const __m512bh zb = (__m512bh)_mm512_set1_epi32(static_cast<int>(z[p * BT + b]));
      acc[b][0] = _mm512_dpbf16_ps(acc[b][0], w0, zb);
      acc[b][1] = _mm512_dpbf16_ps(acc[b][1], w1, zb);
    }
  }
  tile_store_512<BT>(acc, mk, y, ldy);
}
#endif

// Panel [k1 - k0][JW] of centred q values, portable: rows [j, j + rows), inputs [k0, k1) (multiples of 4).
static void decode_panel_scalar(const uint8_t* packed, int64_t nb, int64_t j, int64_t rows, int64_t k0, int64_t k1,
                                int JW, float* panel) {
  std::memset(panel, 0, sizeof(float) * (k1 - k0) * JW);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* p = packed + (j + r) * nb;
    for (int64_t k = k0; k < k1; k += 4) {
      const unsigned byte = p[k / 4];
      float* o = panel + (k - k0) * JW + r;
      for (int s = 0; s < 4; ++s) o[s * JW] = centred_code((byte >> (2 * s)) & 3);
    }
  }
}

// The loop over panels and activation tiles, for any panel element: T holds PER inputs of one
// weight row (fp32: one q value; bf16 pairs: two), and zt the tiles' activations the same way.
template <int JW, int PER = 1, int KC = kKc, class T = float, class Decode, class Tile>
static void gemm_panels(const T* zt, const float* c, int64_t B, int64_t n, int64_t tile_rows, const uint8_t* packed,
                        int64_t j0, int64_t j1, float* y, int64_t ldy, Decode&& decode, Tile&& tile) {
  const int64_t nb = n / 4;
  alignas(64) T panel[KC * JW / PER];
  // Activation rows per block: ~kBlockBytes of them, so that a long prefill does not stream all
  // of zt from L3 once per panel, while each panel serves many tiles (panels are decoded again
  // for each block).
  const int64_t row_bytes = std::max<int64_t>(1, n / PER * static_cast<int64_t>(sizeof(T)));
  const int64_t blk = std::max<int64_t>(tile_rows, kBlockBytes / row_bytes / tile_rows * tile_rows);
  for (int64_t bb0 = 0; bb0 < B; bb0 += blk) {
    const int64_t bb1 = std::min(B, bb0 + blk);
    for (int64_t j = j0; j < j1; j += JW) {
      const int64_t rows = std::min<int64_t>(JW, j1 - j);
      for (int64_t k0 = 0; k0 < n; k0 += KC) {
        const int64_t k1 = std::min(n, k0 + KC);
        decode(packed, nb, j, rows, k0, k1, panel);
        for (int64_t b0 = bb0; b0 < bb1; b0 += tile_rows) {
          const int64_t bt = std::min<int64_t>(tile_rows, B - b0);
          tile(bt, panel, k1 - k0, zt + (b0 * n + k0 * bt) / PER, n, c + b0, k0 == 0, rows, y + b0 * ldy + j, ldy);
        }
      }
    }
  }
}

#define LCQAT_DISPATCH_TILE(FN, BT, ...)   \
  if ((BT) <= 8) {                         \
    LCQAT_DISPATCH_B(FN, BT, __VA_ARGS__); \
  } else {                                 \
    switch (BT) {                          \
      case 9: FN<9>(__VA_ARGS__); break;   \
      case 10: FN<10>(__VA_ARGS__); break; \
      case 11: FN<11>(__VA_ARGS__); break; \
      default: FN<12>(__VA_ARGS__); break; \
    }                                      \
  }

int64_t gemm_tile_rows(Isa isa, int64_t n, int64_t B) {
  int64_t most = 0;  // the scalar fallback reads natural rows
#if LCQAT_X86
  if (isa == Isa::Avx512 && n % 16 == 0) most = kTileAvx512;
  else if (isa != Isa::Scalar) most = kTileAvx2;
#endif
  (void)isa;
  (void)n;
  if (most == 0 || B <= 0) return most;
  // Balanced tiles: 16 rows as 2 x 8, not 12 + 4 (a 4-row tile keeps too few FMA chains in flight)
  const int64_t tiles = (B + most - 1) / most;
  return (B + tiles - 1) / tiles;
}

#if LCQAT_X86
// A full tile of 12 folded rows [12, n] -> zt[k * 12 + b], written sequentially: the pattern of
// (k, b) repeats every 48 outputs (4 inputs), so three gathers of fixed index vectors from the
// rows (in L1) fill 48 outputs. Strided scalar stores took ~0.4 us a 576-row here.
__attribute__((target("avx512f"))) static void pack_tile12_avx512(const float* rows, int64_t n, float* out) {
  static_assert(kTileAvx512 == 12, "the index pattern below is for 12-row tiles");
  __m512i idx[3];
  for (int i = 0; i < 3; ++i) {
    alignas(64) int32_t t[16];
    for (int l = 0; l < 16; ++l) {
      const int p = 16 * i + l;
      t[l] = static_cast<int32_t>((p % 12) * n + p / 12);
    }
    idx[i] = _mm512_load_si512(t);
  }
  for (int64_t q = 0; q < n / 4; ++q)
    for (int i = 0; i < 3; ++i) _mm512_storeu_ps(out + 48 * q + 16 * i, _mm512_i32gather_ps(idx[i], rows + 4 * q, 4));
}
#endif

void prepare_gemm_activations(const float* x, int64_t B, int64_t n, const float* A, const float* beta_in, Isa isa,
                              int64_t bt_max, float* zt, float* c) {
  float beta[4];  // the panels hold centred codes (kernels.h)
  centred_beta(A, beta_in, beta);
  if (bt_max == 0) return prepare_activations(x, B, n, A, beta, Isa::Scalar, zt, c);
  thread_local std::vector<float> rows;  // one tile of folded rows, natural order
  if (rows.size() < static_cast<size_t>(bt_max * n)) rows.resize(bt_max * n);
  for (int64_t b0 = 0; b0 < B; b0 += bt_max) {
    const int64_t bt = std::min(bt_max, B - b0);
    float* o = zt + b0 * n;
    prepare_activations(x + b0 * n, bt, n, A, beta, Isa::Scalar, rows.data(), c + b0);
#if LCQAT_X86
    if (bt == kTileAvx512 && isa == Isa::Avx512) {
      pack_tile12_avx512(rows.data(), n, o);
      continue;
    }
#endif
    for (int64_t k = 0; k < n; ++k)
      for (int64_t b = 0; b < bt; ++b) o[k * bt + b] = rows[b * n + k];
  }
}

void lc_gemm_rows(const float* zt, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0, int64_t j1,
                  Isa isa, int64_t tile_rows, float* y, int64_t ldy) {
#if LCQAT_X86
  if (isa == Isa::Avx512 && n % 16 == 0) {
    gemm_panels<kPanelAvx512>(
        zt, c, B, n, tile_rows, packed, j0, j1, y, ldy, decode_panel_avx512<float>,
        [](int64_t bt, const float* panel, int64_t kc, const float* zb, int64_t n, const float* cb, bool first,
           int64_t rows, float* yb, int64_t ldy) {
          LCQAT_DISPATCH_TILE(panel_tile_avx512, bt, panel, kc, zb, n, cb, first, rows, yb, ldy);
        });
    return;
  }
  if (isa != Isa::Scalar) {  // AVX2 (and AVX-512 with n not a multiple of 16)
    gemm_panels<kPanelAvx2>(
        zt, c, B, n, tile_rows, packed, j0, j1, y, ldy,
        [](const uint8_t* p, int64_t nb, int64_t j, int64_t rows, int64_t k0, int64_t k1, float* panel) {
          decode_panel_scalar(p, nb, j, rows, k0, k1, kPanelAvx2, panel);
        },
        [](int64_t bt, const float* panel, int64_t kc, const float* zb, int64_t n, const float* cb, bool first,
           int64_t rows, float* yb, int64_t ldy) {
          LCQAT_DISPATCH_B(panel_tile_avx2, std::min<int64_t>(bt, kTileAvx2), panel, kc, zb, n, cb, first, rows, yb, ldy);
        });
    return;
  }
#endif
  gemv_scalar(zt, c, B, n, packed, j0, j1, y, ldy);
}

bool has_bf16_dot() {
  static const bool ok = [] {
#if LCQAT_X86 && defined(__GNUC__)
    if (detect_isa() != Isa::Avx512) return false;  // OPTIMUM_LCQAT_CPU_ISA=avx2/scalar turns it off too
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512bf16")) return false;
    const char* env = cpu_switch("BF16");
    return !(env && std::string(env) == "0");
#else
    return false;
#endif
  }();
  return ok;
}

// Round to nearest even (the rounding of torch's .to(torch.bfloat16)); NaN stays NaN.
static inline uint32_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
}

void centred_beta(const float* A, const float* beta, float* out) {
  for (int t = 0; t < 4; ++t) out[t] = beta[t] + kCodeCentre * (A[4 * t] + A[4 * t + 1] + A[4 * t + 2] + A[4 * t + 3]);
}

void prepare_gemm_activations_bf16(const float* x, int64_t B, int64_t n, const float* A, const float* beta,
                                   int64_t bt_max, uint32_t* zt, float* c) {
#if LCQAT_X86
  thread_local std::vector<float> rows;  // one tile of folded rows, natural order
  if (rows.size() < static_cast<size_t>(bt_max * n)) rows.resize(bt_max * n);
  const int64_t np = n / 2;
  float cb[4];
  centred_beta(A, beta, cb);
  for (int64_t b0 = 0; b0 < B; b0 += bt_max) {
    const int64_t bt = std::min(bt_max, B - b0);
    prepare_activations(x + b0 * n, bt, n, A, cb, Isa::Scalar, rows.data(), c + b0);
    uint32_t* o = zt + b0 * np;
    for (int64_t p = 0; p < np; ++p)
      for (int64_t b = 0; b < bt; ++b)
        o[p * bt + b] = bf16_bits(rows[b * n + 2 * p]) | (bf16_bits(rows[b * n + 2 * p + 1]) << 16);
  }
#else
  (void)x, (void)B, (void)n, (void)A, (void)beta, (void)bt_max, (void)zt, (void)c;
  std::abort();  // has_bf16_dot() is false: never reached
#endif
}

void lc_gemm_bf16_rows(const uint32_t* zt, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                       int64_t j1, int64_t tile_rows, float* y, int64_t ldy) {
#if LCQAT_X86
  gemm_panels<kPanelAvx512, 2, kKcBf16>(
      zt, c, B, n, tile_rows, packed, j0, j1, y, ldy, decode_panel_avx512<uint32_t>,
      [](int64_t bt, const uint32_t* panel, int64_t kc, const uint32_t* zb, int64_t n, const float* cb, bool first,
         int64_t rows, float* yb, int64_t ldy) {
        LCQAT_DISPATCH_TILE(panel_tile_bf16_avx512, bt, panel, kc, zb, n, cb, first, rows, yb, ldy);
      });
#else
  (void)zt, (void)c, (void)B, (void)n, (void)packed, (void)j0, (void)j1, (void)tile_rows, (void)y, (void)ldy;
  std::abort();
#endif
}


// ---- bf16 GEMV (1-5 rows of bf16 activations on AVX512_BF16): the decode-step counterpart of
// the bf16 GEMM, with the input dimension in the lanes as in gemv_avx512. A lane holds 4 code
// bytes (16 inputs of one weight row, 8 pairs); pair t of all 16 lanes is one shift and one
// permute away from 16 bf16 pairs, which vdpbf16ps multiplies with the matching activation
// pairs: 32 codes a permute where the fp32 GEMV decodes 16 (the permutes bound it).
// Prepared activations: blocks of 256 inputs, zq[128 k + 16 t + l] = the bf16 pair of inputs
// 256 k + 16 l + 2 t, + 1; the last block zero-padded.
int64_t gemv_bf16_row_words(int64_t n) { return (n + 255) / 256 * 128; }

void prepare_gemv_bf16(const float* x, int64_t B, int64_t n, const float* A, const float* beta, uint32_t* zq,
                       float* c) {
  thread_local std::vector<float> row;  // one folded row, natural order
  if (row.size() < static_cast<size_t>(n)) row.resize(n);
  const int64_t words = gemv_bf16_row_words(n);
  float cb[4];
  centred_beta(A, beta, cb);
  for (int64_t b = 0; b < B; ++b) {
    prepare_activations(x + b * n, 1, n, A, cb, Isa::Scalar, row.data(), c + b);
    uint32_t* o = zq + b * words;
    std::memset(o, 0, sizeof(uint32_t) * words);
    for (int64_t i = 0; i < n; i += 2)
      o[(i >> 8) * 128 + ((i & 15) >> 1) * 16 + ((i & 255) >> 4)] = bf16_bits(row[i]) | (bf16_bits(row[i + 1]) << 16);
  }
}

#if LCQAT_X86
// R weight rows from j, B activation rows; NA accumulators per (row, activation row) so that
// enough vdpbf16ps chains are in flight at 1-2 rows.
template <int B, int R, int NA>
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16"))) static void gemv_bf16_avx512(
    const uint32_t* zq, int64_t words, const float* c, int64_t n, const uint8_t* packed, int64_t j, int64_t rest,
    float* y, int64_t ldy) {
  const __m512i table = bf16_pair_table();
  const int64_t nb = n / 4;
  const int64_t nblk = (nb + 63) / 64;
  const int64_t tail = (nb % 64) / 4;  // live lanes of the last block (0: it is full)
  prefetch_ahead(packed + j * nb, R * nb, rest, R * nb);
  __m512 acc[R][B][NA];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < NA; ++a) acc[r][b][a] = _mm512_setzero_ps();
  for (int64_t k = 0; k < nblk; ++k) {
    __m512i v[R];
    if (k == nblk - 1 && tail) {  // masked only here: a masked load of every block ran 2.7x slower from DRAM
      const __mmask16 mk = static_cast<__mmask16>((1u << tail) - 1u);
      for (int r = 0; r < R; ++r) v[r] = _mm512_maskz_loadu_epi32(mk, packed + (j + r) * nb + 64 * k);
    } else {
      for (int r = 0; r < R; ++r) v[r] = _mm512_loadu_si512(packed + (j + r) * nb + 64 * k);
    }
    // pairs t and t + 1 into the two accumulators (unrolled: an accumulator indexed at run time
    // would live on the stack)
#pragma GCC unroll 4
    for (int t = 0; t < 8; t += 2) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        __m512bh z[B];
        for (int b = 0; b < B; ++b) z[b] = (__m512bh)_mm512_loadu_si512(zq + b * words + 128 * k + 16 * (t + h));
        for (int r = 0; r < R; ++r) {
          const __m512bh w = (__m512bh)_mm512_permutexvar_epi32(_mm512_srli_epi32(v[r], 4 * (t + h)), table);
          for (int b = 0; b < B; ++b) acc[r][b][h % NA] = _mm512_dpbf16_ps(acc[r][b][h % NA], w, z[b]);
        }
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b)
      y[b * ldy + j + r] = _mm512_reduce_add_ps(NA == 2 ? _mm512_add_ps(acc[r][b][0], acc[r][b][NA - 1]) : acc[r][b][0]) + c[b];
}

template <int B>
static void gemv_bf16_rows_avx512(const uint32_t* zq, const float* c, int64_t n, const uint8_t* packed, int64_t j0,
                                  int64_t j1, float* y, int64_t ldy) {
  // R * B * NA accumulators (at most 20), R code vectors and B activation vectors: within the 32
  // registers up to 5 rows (6 rows spilled and ran 2x slower from DRAM)
  constexpr int NA = B <= 2 ? 2 : 1;
  constexpr int R = 4;
  const int64_t words = gemv_bf16_row_words(n);
  int64_t j = j0;
  for (; j + R <= j1; j += R) gemv_bf16_avx512<B, R, NA>(zq, words, c, n, packed, j, (j1 - j) / R, y, ldy);
  for (; j < j1; ++j) gemv_bf16_avx512<B, 1, NA>(zq, words, c, n, packed, j, 0, y, ldy);
}
#endif

void lc_gemv_bf16_rows(const uint32_t* zq, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                       int64_t j1, float* y, int64_t ldy) {
#if LCQAT_X86
  switch (B) {
    case 1: return gemv_bf16_rows_avx512<1>(zq, c, n, packed, j0, j1, y, ldy);
    case 2: return gemv_bf16_rows_avx512<2>(zq, c, n, packed, j0, j1, y, ldy);
    case 3: return gemv_bf16_rows_avx512<3>(zq, c, n, packed, j0, j1, y, ldy);
    case 4: return gemv_bf16_rows_avx512<4>(zq, c, n, packed, j0, j1, y, ldy);
    case 5: return gemv_bf16_rows_avx512<5>(zq, c, n, packed, j0, j1, y, ldy);
    default: break;
  }
#endif
  (void)zq, (void)c, (void)n, (void)packed, (void)j0, (void)j1, (void)y, (void)ldy;
  std::abort();  // the caller checks B <= 5 and has_bf16_dot(); never reached
}

void lc_gemv_rows(const float* zp, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                  int64_t j1, Isa isa, float* y, int64_t ldy) {
  if (B < 1 || B > kMaxGemvBatch) std::abort();  // the caller checks; never reached
#if LCQAT_X86
  if (isa == Isa::Avx512) {
    if (B == 1) {
      rows_by_four(j0, j1, [&](int64_t r0, int64_t r1) { gemv1_avx512_rows4(zp, c, n, packed, r0, r1, y); },
                   [&](int64_t r0, int64_t r1) { gemv_avx512<1>(zp, c, n, packed, r0, r1, y, ldy); });
      return;
    }
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
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"  // see the vector traits above
// Rows [j0, j1) of the weight-only int8 GEMV for B activation rows, V::kLanes weights per step.
template <class V, int B>
static inline void int8_rows(const float* x, int64_t n, const int8_t* w, const float* scale, int64_t j0, int64_t j1,
                             float* y, int64_t ldy) {
  constexpr int64_t W = V::kLanes;
  constexpr int NA = Accs<B>::value;
  const int64_t nv = n / W * W;
  for (int64_t j = j0; j < j1; ++j) {
    const int8_t* wr = w + j * n;
    prefetch_ahead(wr, n, j1 - j, n);
    typename V::F acc[B][NA];
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < NA; ++a) acc[b][a] = V::zero();
    // NA steps per iteration with compile-time accumulator indices: a run-time `step % NA`
    // index kept the accumulators in memory (measured 2.3x slower).
    int64_t i = 0;
    for (; i + W * NA <= nv; i += W * NA) {
      for (int a = 0; a < NA; ++a) {
        const typename V::F wv = V::load_i8(wr + i + W * a);
        for (int b = 0; b < B; ++b) acc[b][a] = V::fma(wv, V::load(x + b * n + i + W * a), acc[b][a]);
      }
    }
    for (; i < nv; i += W) {
      const typename V::F wv = V::load_i8(wr + i);
      for (int b = 0; b < B; ++b) acc[b][0] = V::fma(wv, V::load(x + b * n + i), acc[b][0]);
    }
    for (int b = 0; b < B; ++b) {
      typename V::F s = acc[b][0];
      for (int a = 1; a < NA; ++a) s = V::add(s, acc[b][a]);
      y[b * ldy + j] = V::sum(s) * scale[j];
    }
  }
  if (nv < n) int8_scalar(x, B, n, w, scale, j0, j1, y, ldy, nv);
}

template <int B>
LCQAT_TARGET_AVX512 __attribute__((flatten)) static void int8_avx512(const float* x, int64_t n, const int8_t* w,
                                                                     const float* scale, int64_t j0, int64_t j1,
                                                                     float* y, int64_t ldy) {
  int8_rows<VecAvx512, B>(x, n, w, scale, j0, j1, y, ldy);
}

template <int B>
LCQAT_TARGET_AVX2 __attribute__((flatten)) static void int8_avx2(const float* x, int64_t n, const int8_t* w,
                                                                 const float* scale, int64_t j0, int64_t j1, float* y,
                                                                 int64_t ldy) {
  int8_rows<VecAvx2, B>(x, n, w, scale, j0, j1, y, ldy);
}
#pragma GCC diagnostic pop
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

// ------------------------------------------------------------------ int8-activation GEMV
// Layout of a prepared row: chunks of 256 weights (64 code bytes); inside chunk k,
// zq[256k + 64s + t] = round(z[256k + 4t + s] / scale): the s-th 2-bit field of code byte t
// meets its activation at the same byte position, so one vpdpbusd multiplies 64 codes. The
// last chunk is zero-padded (and its code bytes are loaded masked).
bool has_vnni() {
#if LCQAT_X86 && defined(__GNUC__)
  static const bool v = detect_isa() == Isa::Avx512 && __builtin_cpu_supports("avx512vnni");
  return v;
#else
  return false;
#endif
}

int64_t a8_row_bytes(int64_t n) { return (n + 255) / 256 * 256; }

// Round to nearest, ties to even (as torch.round), for |v| < 2^22: adding and subtracting 1.5 * 2^23
// leaves the rounded value in fp32 arithmetic. Inline, where std::nearbyint is a libm call
// (~2 us per 576-vector) without -msse4.1.
static inline float round_even(float v) {
  volatile float big = 12582912.0f;  // volatile: no reassociation may fold the pair away
  return (v + big) - big;
}

void a8_prepare(const float* z, int64_t B, int64_t n, int8_t* zq, float* scale) {
  const int64_t rb = a8_row_bytes(n);
  for (int64_t b = 0; b < B; ++b) {
    const float* zb = z + b * n;
    int8_t* qb = zq + b * rb;
    float amax = 0.f;
    for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(zb[i]));
    const float s = amax > 0.f ? amax / 127.f : 1.f;
    const float inv = 1.f / s;
    std::memset(qb, 0, rb);
    for (int64_t k = 0; k < rb / 256; ++k)
      for (int64_t t = 0; t < 64; ++t)
        for (int s = 0; s < 4; ++s) {
          const int64_t i = 256 * k + 4 * t + s;
          if (i >= n) break;
          const float v = round_even(zb[i] * inv);
          qb[256 * k + 64 * s + t] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, v)));
        }
    scale[b] = s;
  }
}

static void gemv_a8_scalar(const int8_t* zq, const float* scale, const float* c, int64_t B, int64_t n,
                           const uint8_t* packed, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  const int64_t nb = n / 4, rb = a8_row_bytes(n);
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* p = packed + j * nb;
    for (int64_t b = 0; b < B; ++b) {
      const int8_t* qb = zq + b * rb;
      int32_t acc = 0;
      for (int64_t t = 0; t < nb; ++t) {
        const int64_t k = t / 64, tt = t % 64;
        const unsigned byte = p[t];
        for (int s = 0; s < 4; ++s) acc += static_cast<int32_t>((byte >> (2 * s)) & 3) * qb[256 * k + 64 * s + tt];
      }
      y[b * ldy + j] = scale[b] * static_cast<float>(acc) + c[b];
    }
  }
}

#if LCQAT_X86
// acc[s] holds 4^s * sum q_s z per lane (integers below 2^24: exact in fp32, and so is the
// division by 4^s), returned as one float vector of per-lane sums.
__attribute__((target("avx512f"))) static inline __m512 combine_fields(const __m512i* acc) {
  __m512 f = _mm512_cvtepi32_ps(acc[0]);
  f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[1]), _mm512_set1_ps(0.25f), f);
  f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[2]), _mm512_set1_ps(1.0f / 16), f);
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[3]), _mm512_set1_ps(1.0f / 64), f);
}

template <int B>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void gemv_a8_vnni(
    const int8_t* zq, const float* scale, const float* c, int64_t n, const uint8_t* packed, int64_t j0, int64_t j1,
    float* y, int64_t ldy) {
  const int64_t nb = n / 4, rb = a8_row_bytes(n);
  const int64_t nch = (nb + 63) / 64;
  const __mmask64 last = (nb % 64) ? ((1ULL << (nb % 64)) - 1) : ~0ULL;
  const __m512i f0 = _mm512_set1_epi8(0x03), f1 = _mm512_set1_epi8(0x0C);
  const __m512i f2 = _mm512_set1_epi8(0x30), f3 = _mm512_set1_epi8(static_cast<char>(0xC0));
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* p = packed + j * nb;
    prefetch_ahead(p, nb, j1 - j, nb);
    __m512i acc[B][4];  // one per 2-bit field
    for (int b = 0; b < B; ++b)
      for (int a = 0; a < 4; ++a) acc[b][a] = _mm512_setzero_si512();
    for (int64_t k = 0; k < nch; ++k) {
      const __m512i v = k + 1 < nch ? _mm512_loadu_si512(p + 64 * k) : _mm512_maskz_loadu_epi8(last, p + 64 * k);
      // Field s, unshifted: v & (3 << 2s) = 4^s q_s, so accumulator s sums 4^s q_s z (no shifts).
      const __m512i q0 = _mm512_and_si512(v, f0), q1 = _mm512_and_si512(v, f1);
      const __m512i q2 = _mm512_and_si512(v, f2), q3 = _mm512_and_si512(v, f3);
      for (int b = 0; b < B; ++b) {
        const int8_t* zb = zq + b * rb + 256 * k;
        acc[b][0] = _mm512_dpbusd_epi32(acc[b][0], q0, _mm512_loadu_si512(zb));
        acc[b][1] = _mm512_dpbusd_epi32(acc[b][1], q1, _mm512_loadu_si512(zb + 64));
        acc[b][2] = _mm512_dpbusd_epi32(acc[b][2], q2, _mm512_loadu_si512(zb + 128));
        acc[b][3] = _mm512_dpbusd_epi32(acc[b][3], q3, _mm512_loadu_si512(zb + 192));
      }
    }
    for (int b = 0; b < B; ++b)
      y[b * ldy + j] = scale[b] * _mm512_reduce_add_ps(combine_fields(acc[b])) + c[b];
  }
}

// Batch 1, four rows per step: the int8 activations of a chunk are loaded once for four rows,
// the four row sums are reduced together (exactly: every partial sum is an integer below 2^24
// for n < 44000) and the prefetch is issued once per group of rows. SmolLM2's rows are short (576 codes = 3
// chunks), so this per-row work is a large share of the time.
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni"))) static void gemv1_a8_vnni_rows4(
    const int8_t* zq, float scale, float c, int64_t n, const uint8_t* packed, int64_t j0, int64_t j1, float* y) {
  const int64_t nb = n / 4;
  const int64_t nch = (nb + 63) / 64;
  const __mmask64 last = (nb % 64) ? ((1ULL << (nb % 64)) - 1) : ~0ULL;
  const __m512i f0 = _mm512_set1_epi8(0x03), f1 = _mm512_set1_epi8(0x0C);
  const __m512i f2 = _mm512_set1_epi8(0x30), f3 = _mm512_set1_epi8(static_cast<char>(0xC0));
  const __m128 vs = _mm_set1_ps(scale), vc = _mm_set1_ps(c);
  for (int64_t j = j0; j < j1; j += 4) {
    prefetch_ahead(packed + j * nb, 4 * nb, (j1 - j) / 4, 4 * nb);
    __m512i acc[4][4];  // [row][2-bit field], see gemv_a8_vnni
    for (int r = 0; r < 4; ++r)
      for (int a = 0; a < 4; ++a) acc[r][a] = _mm512_setzero_si512();
    for (int64_t k = 0; k < nch; ++k) {
      const int8_t* zb = zq + 256 * k;
      const __m512i z0 = _mm512_loadu_si512(zb), z1 = _mm512_loadu_si512(zb + 64);
      const __m512i z2 = _mm512_loadu_si512(zb + 128), z3 = _mm512_loadu_si512(zb + 192);
      const __mmask64 mk = k + 1 < nch ? ~0ULL : last;
      for (int r = 0; r < 4; ++r) {
        const __m512i v = _mm512_maskz_loadu_epi8(mk, packed + (j + r) * nb + 64 * k);
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], _mm512_and_si512(v, f0), z0);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], _mm512_and_si512(v, f1), z1);
        acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], _mm512_and_si512(v, f2), z2);
        acc[r][3] = _mm512_dpbusd_epi32(acc[r][3], _mm512_and_si512(v, f3), z3);
      }
    }
    __m512 f[4];
    for (int r = 0; r < 4; ++r) f[r] = combine_fields(acc[r]);
    _mm_storeu_ps(y + j, _mm_add_ps(_mm_mul_ps(reduce4_512(f[0], f[1], f[2], f[3]), vs), vc));
  }
}
#endif

void lc_gemv_a8_rows(const int8_t* zq, const float* scale, const float* c, int64_t B, int64_t n,
                     const uint8_t* packed, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  if (B < 1 || B > kMaxGemvBatch) std::abort();  // the caller checks; never reached
#if LCQAT_X86
  if (has_vnni() && B == 1) {
    rows_by_four(j0, j1, [&](int64_t r0, int64_t r1) { gemv1_a8_vnni_rows4(zq, scale[0], c[0], n, packed, r0, r1, y); },
                 [&](int64_t r0, int64_t r1) { gemv_a8_vnni<1>(zq, scale, c, n, packed, r0, r1, y, ldy); });
    return;
  }
  if (has_vnni()) {
    LCQAT_DISPATCH_B(gemv_a8_vnni, B, zq, scale, c, n, packed, j0, j1, y, ldy);
    return;
  }
#endif
  gemv_a8_scalar(zq, scale, c, B, n, packed, j0, j1, y, ldy);
}

// ------------------------------------------------------------------ 16-bit activations (VNNI)
// bf16 activations of the int8 head and of the LC decode GEMV (see kernels.h). The int8 head's
// weight-only loop spends three vector instructions on 16 weights (sign-extend, convert, FMA) and
// read ~20 GB/s on one Zen 4 core, about half what a dense bf16 GEMV streams; here 64 weights take
// one XOR and one vpdpbusd per activation part. The LC bf16 GEMV spends a shift, a permute and a
// vdpbf16ps on 32 codes; here 256 codes take four masks, three shifts and eight vpdpbusd.
// has_int8_a16() implies AVX-512 (has_vnni() does), so every function here is AVX-512 code.
int64_t a16_row_bytes(int64_t n) { return (n + 63) / 64 * 64; }

bool has_int8_a16() {
  static const bool ok = [] {
    if (!has_vnni()) return false;
    for (const char* what : {"BF16", "A16"}) {
      const char* env = cpu_switch(what);
      if (env && std::string(env) == "0") return false;
    }
    return true;
  }();
  return ok;
}

#if LCQAT_X86
#define LCQAT_TARGET_A16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")))

// The row's step s and its inverse (kernels.h): s = max|x| / kA16Max in fp32; a row with a NaN or
// inf gets s = NaN (NaN outputs); a row below kA16Tiny counts as zero (inv = 0: every q is 0),
// where 1 / s would overflow fp32.
LCQAT_TARGET_A16 static void a16_row_step(const float* x, int64_t n, float* s, float* inv) {
  __m512 vmax = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mk = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(mk, x + i);
    finite &= _mm512_cmp_ps_mask(_mm512_sub_ps(v, v), zero, _CMP_EQ_OQ);  // v - v is NaN for NaN and inf
    vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
  }
  const float amax = _mm512_reduce_max_ps(vmax);
  if (finite != 0xFFFF) {
    *s = std::numeric_limits<float>::quiet_NaN();
    *inv = 0.f;
  } else if (amax < kA16Tiny) {
    *s = 1.f;
    *inv = 0.f;
  } else {
    *s = amax / static_cast<float>(kA16Max);
    *inv = 1.f / *s;
  }
}

// q = round(v * inv) (ties to even, as torch.round), |q| <= kA16Max, split q = 256 h + l
LCQAT_TARGET_A16 static inline void a16_split(__m512 v, __m512 inv, __m512i* h, __m512i* l) {
  const __m512 lim = _mm512_set1_ps(static_cast<float>(kA16Max));
  __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(v, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_min_ps(_mm512_max_ps(r, _mm512_sub_ps(_mm512_setzero_ps(), lim)), lim);
  const __m512i q = _mm512_cvtps_epi32(r);  // exact: r is an integer
  *h = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);  // floor((q + 128) / 256)
  *l = _mm512_sub_epi32(q, _mm512_slli_epi32(*h, 8));
}

LCQAT_TARGET_A16 static void a16_prepare_avx512(const float* x, int64_t B, int64_t n, int8_t* hl, float* s,
                                                int32_t* sums) {
  const int64_t rb = a16_row_bytes(n);
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * n;
    int8_t* h = hl + b * 2 * rb;
    std::memset(h, 0, 2 * rb);
    float inv;
    a16_row_step(xb, n, s + b, &inv);
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i sh = _mm512_setzero_si512(), sl = _mm512_setzero_si512();
    for (int64_t i = 0; i < n; i += 16) {
      const __mmask16 mk = n - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (n - i)) - 1u);
      __m512i hi, lo;
      a16_split(_mm512_maskz_loadu_ps(mk, xb + i), vinv, &hi, &lo);  // lanes past n: 0 -> h = l = 0
      _mm512_mask_cvtepi32_storeu_epi8(h + i, mk, hi);
      _mm512_mask_cvtepi32_storeu_epi8(h + rb + i, mk, lo);
      sh = _mm512_add_epi32(sh, hi);
      sl = _mm512_add_epi32(sl, lo);
    }
    sums[2 * b] = _mm512_reduce_add_epi32(sh);
    sums[2 * b + 1] = _mm512_reduce_add_epi32(sl);
  }
}

// The int8 head row's output from its two integer sums over the offset weights (w + 128):
// subtracting 128 * (sum of the part) takes the offset back; the combination is an integer below
// 2^47, exact in double, so the result does not depend on summation order, batch or thread split.
static inline float a16_output(int64_t dh, int64_t dl, const int32_t* sums, float s, float scale) {
  const int64_t q = 256 * (dh - 128 * static_cast<int64_t>(sums[0])) + (dl - 128 * static_cast<int64_t>(sums[1]));
  return static_cast<float>(static_cast<double>(q) * static_cast<double>(s) * static_cast<double>(scale));
}

// Rows [j0, j1), B activation rows. Bytes past n (the last chunk) load as 0 and become 128 after
// the offset; their activations are 0. Per lane at most n/16 products of 255 x 128: the 16 lanes
// sum to at most 32640 n, an int32 for n <= kA16MaxInputs.
template <int B>
LCQAT_TARGET_A16 static void int8_a16_vnni(const int8_t* hl, const float* s, const int32_t* sums, int64_t n,
                                           const int8_t* w, const float* scale, int64_t j0, int64_t j1, float* y,
                                           int64_t ldy) {
  const int64_t rb = a16_row_bytes(n), nch = rb / 64;
  const __mmask64 last = (n % 64) ? ((1ULL << (n % 64)) - 1) : ~0ULL;
  const __m512i off = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = j0; j < j1; ++j) {
    const int8_t* wr = w + j * n;
    prefetch_ahead(wr, n, j1 - j, n);
    __m512i ah[B], al[B];
    for (int b = 0; b < B; ++b) ah[b] = al[b] = _mm512_setzero_si512();
    for (int64_t k = 0; k < nch; ++k) {
      const __m512i v = _mm512_xor_si512(
          k + 1 < nch ? _mm512_loadu_si512(wr + 64 * k) : _mm512_maskz_loadu_epi8(last, wr + 64 * k), off);
      for (int b = 0; b < B; ++b) {
        const int8_t* h = hl + b * 2 * rb + 64 * k;
        ah[b] = _mm512_dpbusd_epi32(ah[b], v, _mm512_loadu_si512(h));  // unsigned weights x signed parts
        al[b] = _mm512_dpbusd_epi32(al[b], v, _mm512_loadu_si512(h + rb));
      }
    }
    for (int b = 0; b < B; ++b)
      y[b * ldy + j] = a16_output(_mm512_reduce_add_epi32(ah[b]), _mm512_reduce_add_epi32(al[b]), sums + 2 * b, s[b],
                                  scale[j]);
  }
}

// Batch 1, four rows per step: the activation chunks are loaded once for four rows and the eight
// accumulator chains keep vpdpbusd's latency covered.
LCQAT_TARGET_A16 static void int8_a16_vnni_rows4(const int8_t* hl, float s, const int32_t* sums, int64_t n,
                                                 const int8_t* w, const float* scale, int64_t j0, int64_t j1, float* y) {
  const int64_t rb = a16_row_bytes(n), nch = rb / 64;
  const __mmask64 last = (n % 64) ? ((1ULL << (n % 64)) - 1) : ~0ULL;
  const __m512i off = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t j = j0; j < j1; j += 4) {
    prefetch_ahead(w + j * n, 4 * n, (j1 - j) / 4, 4 * n);
    __m512i ah[4], al[4];
    for (int r = 0; r < 4; ++r) ah[r] = al[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < nch; ++k) {
      const __m512i h = _mm512_loadu_si512(hl + 64 * k), l = _mm512_loadu_si512(hl + rb + 64 * k);
      for (int r = 0; r < 4; ++r) {
        const int8_t* pr = w + (j + r) * n + 64 * k;
        const __m512i v = _mm512_xor_si512(k + 1 < nch ? _mm512_loadu_si512(pr) : _mm512_maskz_loadu_epi8(last, pr), off);
        ah[r] = _mm512_dpbusd_epi32(ah[r], v, h);
        al[r] = _mm512_dpbusd_epi32(al[r], v, l);
      }
    }
    for (int r = 0; r < 4; ++r)
      y[j + r] = a16_output(_mm512_reduce_add_epi32(ah[r]), _mm512_reduce_add_epi32(al[r]), sums, s, scale[j + r]);
  }
}
#endif

void a16_prepare(const float* x, int64_t B, int64_t n, int8_t* hl, float* s, int32_t* sums) {
  if (!has_int8_a16()) std::abort();  // the caller checks; never reached
#if LCQAT_X86
  a16_prepare_avx512(x, B, n, hl, s, sums);
#else
  (void)x, (void)B, (void)n, (void)hl, (void)s, (void)sums;
#endif
}

void int8_gemv_a16_rows(const int8_t* hl, const float* s, const int32_t* sums, int64_t B, int64_t n,
                        const int8_t* w, const float* scale, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  if (B < 1 || B > kMaxGemvBatch || n > kA16MaxInputs || !has_int8_a16()) std::abort();  // the caller checks
#if LCQAT_X86
  if (B == 1) {
    rows_by_four(j0, j1, [&](int64_t r0, int64_t r1) { int8_a16_vnni_rows4(hl, s[0], sums, n, w, scale, r0, r1, y); },
                 [&](int64_t r0, int64_t r1) { int8_a16_vnni<1>(hl, s, sums, n, w, scale, r0, r1, y, ldy); });
    return;
  }
  LCQAT_DISPATCH_B(int8_a16_vnni, B, hl, s, sums, n, w, scale, j0, j1, y, ldy);
#else
  (void)hl, (void)s, (void)sums, (void)w, (void)scale, (void)j0, (void)j1, (void)y, (void)ldy;
#endif
}

// ---- the LC decode GEMV with 16-bit activations. Parts in the a8 layout (part[256k + 64f + t] =
// the part of z[256k + 4t + f]: field f of code byte t meets it at the same byte position), h at
// 0 and l at a8_row_bytes(n) of a row; gathered 16 at a time from the natural-order row.
#if LCQAT_X86
LCQAT_TARGET_A16 static void lc_a16_prepare_avx512(const float* z, int64_t B, int64_t n, int8_t* zq, float* s) {
  const int64_t rb = a8_row_bytes(n);
  const __m512i lane4 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(4));
  for (int64_t b = 0; b < B; ++b) {
    const float* zb = z + b * n;
    int8_t* o = zq + b * 2 * rb;
    float inv;
    a16_row_step(zb, n, s + b, &inv);
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < rb / 256; ++k)
      for (int f = 0; f < 4; ++f)
        for (int64_t t0 = 0; t0 < 64; t0 += 16) {
          // inputs 256k + 4(t0 + lane) + f; past n: 0
          const __m512i idx = _mm512_add_epi32(lane4, _mm512_set1_epi32(static_cast<int>(256 * k + 4 * t0 + f)));
          const __mmask16 live = _mm512_cmplt_epi32_mask(idx, _mm512_set1_epi32(static_cast<int>(n)));
          const __m512 v = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live, idx, zb, 4);
          __m512i hi, lo;
          a16_split(v, vinv, &hi, &lo);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 256 * k + 64 * f + t0), _mm512_cvtepi32_epi8(hi));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(o + rb + 256 * k + 64 * f + t0), _mm512_cvtepi32_epi8(lo));
        }
  }
}

// y = s (256 sum q h + sum q l) + c: the integer is exact, one rounding to fp32 before c is added
static inline float a16_lc_output(int64_t th, int64_t tl, float s, float c) {
  return static_cast<float>(static_cast<double>(256 * th + tl) * static_cast<double>(s)) + c;
}

// Field f (0..3) of every code byte as an unsigned byte 0..3: 16-bit shifts are enough because the
// & 3 keeps each byte's own bits.
LCQAT_TARGET_A16 static inline __m512i a16_code_field(__m512i v, int f) {
  return _mm512_and_si512(f ? _mm512_srli_epi16(v, 2 * f) : v, _mm512_set1_epi8(3));
}

// Per lane and vpdpbusd at most 4 x 3 x 128: the 16 lanes of an accumulator sum to at most 384 n,
// an int32 for any n below 5.5 million.
template <int B>
LCQAT_TARGET_A16 static void gemv_a16_vnni(const int8_t* zq, const float* s, const float* c, int64_t n,
                                           const uint8_t* packed, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  const int64_t nb = n / 4, rb = a8_row_bytes(n), nch = (nb + 63) / 64;
  const __mmask64 last = (nb % 64) ? ((1ULL << (nb % 64)) - 1) : ~0ULL;
  for (int64_t j = j0; j < j1; ++j) {
    const uint8_t* p = packed + j * nb;
    prefetch_ahead(p, nb, j1 - j, nb);
    __m512i ah[B], al[B];
    for (int b = 0; b < B; ++b) ah[b] = al[b] = _mm512_setzero_si512();
    for (int64_t k = 0; k < nch; ++k) {
      const __m512i v = k + 1 < nch ? _mm512_loadu_si512(p + 64 * k) : _mm512_maskz_loadu_epi8(last, p + 64 * k);
      const __m512i q[4] = {a16_code_field(v, 0), a16_code_field(v, 1), a16_code_field(v, 2), a16_code_field(v, 3)};
      for (int b = 0; b < B; ++b) {
        const int8_t* zb = zq + b * 2 * rb + 256 * k;
        for (int f = 0; f < 4; ++f) {
          ah[b] = _mm512_dpbusd_epi32(ah[b], q[f], _mm512_loadu_si512(zb + 64 * f));  // unsigned codes x signed parts
          al[b] = _mm512_dpbusd_epi32(al[b], q[f], _mm512_loadu_si512(zb + rb + 64 * f));
        }
      }
    }
    for (int b = 0; b < B; ++b)
      y[b * ldy + j] = a16_lc_output(_mm512_reduce_add_epi32(ah[b]), _mm512_reduce_add_epi32(al[b]), s[b], c[b]);
  }
}

// Batch 1, four rows per step: the eight activation vectors of a chunk are loaded once for four
// rows; eight accumulator chains.
LCQAT_TARGET_A16 static void gemv1_a16_vnni_rows4(const int8_t* zq, float s, float c, int64_t n,
                                                  const uint8_t* packed, int64_t j0, int64_t j1, float* y) {
  const int64_t nb = n / 4, rb = a8_row_bytes(n), nch = (nb + 63) / 64;
  const __mmask64 last = (nb % 64) ? ((1ULL << (nb % 64)) - 1) : ~0ULL;
  for (int64_t j = j0; j < j1; j += 4) {
    prefetch_ahead(packed + j * nb, 4 * nb, (j1 - j) / 4, 4 * nb);
    __m512i ah[4], al[4];
    for (int r = 0; r < 4; ++r) ah[r] = al[r] = _mm512_setzero_si512();
    for (int64_t k = 0; k < nch; ++k) {
      const int8_t* zb = zq + 256 * k;
      __m512i hz[4], lz[4];
      for (int f = 0; f < 4; ++f) {
        hz[f] = _mm512_loadu_si512(zb + 64 * f);
        lz[f] = _mm512_loadu_si512(zb + rb + 64 * f);
      }
      for (int r = 0; r < 4; ++r) {
        const uint8_t* pr = packed + (j + r) * nb + 64 * k;
        // masked only on the last chunk (a masked load of every chunk ran slower from DRAM in the bf16 GEMV)
        const __m512i v = k + 1 < nch ? _mm512_loadu_si512(pr) : _mm512_maskz_loadu_epi8(last, pr);
        for (int f = 0; f < 4; ++f) {
          const __m512i q = a16_code_field(v, f);
          ah[r] = _mm512_dpbusd_epi32(ah[r], q, hz[f]);
          al[r] = _mm512_dpbusd_epi32(al[r], q, lz[f]);
        }
      }
    }
    for (int r = 0; r < 4; ++r)
      y[j + r] = a16_lc_output(_mm512_reduce_add_epi32(ah[r]), _mm512_reduce_add_epi32(al[r]), s, c);
  }
}
#endif

void lc_a16_prepare(const float* z, int64_t B, int64_t n, int8_t* zq, float* s) {
  if (!has_int8_a16()) std::abort();  // the caller checks; never reached
#if LCQAT_X86
  lc_a16_prepare_avx512(z, B, n, zq, s);
#else
  (void)z, (void)B, (void)n, (void)zq, (void)s;
#endif
}

void lc_gemv_a16_rows(const int8_t* zq, const float* s, const float* c, int64_t B, int64_t n, const uint8_t* packed,
                      int64_t j0, int64_t j1, float* y, int64_t ldy) {
  if (B < 1 || B > kMaxGemvBatch || !has_int8_a16()) std::abort();  // the caller checks; never reached
#if LCQAT_X86
  if (B == 1) {
    rows_by_four(j0, j1, [&](int64_t r0, int64_t r1) { gemv1_a16_vnni_rows4(zq, s[0], c[0], n, packed, r0, r1, y); },
                 [&](int64_t r0, int64_t r1) { gemv_a16_vnni<1>(zq, s, c, n, packed, r0, r1, y, ldy); });
    return;
  }
  LCQAT_DISPATCH_B(gemv_a16_vnni, B, zq, s, c, n, packed, j0, j1, y, ldy);
#else
  (void)zq, (void)s, (void)c, (void)n, (void)packed, (void)j0, (void)j1, (void)y, (void)ldy;
#endif
}

}  // namespace cpu
}  // namespace lcqat

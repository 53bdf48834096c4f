// Nearest codeword of the LC codebook, for the data-free initialiser (and any caller of
// optimum_lcqat.kernels.nearest_codeword): for each vector w_i (d floats), the index k of the
// codeword c_k = A q_k + beta minimising ||w_i - c_k||^2, ties to the lowest k.
//
// Why a kernel: the PyTorch reference (tensor/codebook.py) computes a [chunk, 256] distance block
// with a K = 4 matmul and then argmin over it: both passes are memory-bound, ~0.4 s per
// SmolLM2 MLP layer and 48 s for the whole model's data-free init, over 80% of it the search.
// Here the distances never leave registers: the vector lanes hold 16 (AVX-512) or 8 (AVX2)
// different w_i, the loop runs over the codewords with each codeword's coordinates broadcast, and
// each lane keeps its own running minimum and index. Per lane the distance of codeword k is
// ||c_k||^2 - 2 <w_i, c_k> (the term ||w_i||^2 does not move the argmin), evaluated in one fixed
// order (fused multiply-adds over the coordinates), so the result does not depend on the ISA tier
// or the thread count; it may differ from the reference's BLAS rounding on exact near-ties only
// (tests check the chosen codeword's distance in float64 against the minimum).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "kernels.h"

namespace lcqat {
namespace {

using at::Tensor;

// Tables in the layout the loops read: per codeword k, tab[k * (d + 1) + s] = -2 c_k[s] for
// s < d and tab[k * (d + 1) + d] = ||c_k||^2.
struct Table {
  const float* tab;
  int64_t K, d;
};

// Scalar: one vector at a time, the same expression as every vector lane below.
static void search_scalar(const float* wt, int64_t N, int64_t i0, int64_t i1, const Table& t, int64_t* out) {
  for (int64_t i = i0; i < i1; ++i) {
    float best = std::numeric_limits<float>::infinity();
    int64_t arg = 0;
    for (int64_t k = 0; k < t.K; ++k) {
      const float* c = t.tab + k * (t.d + 1);
      float acc = c[t.d];
      for (int64_t s = 0; s < t.d; ++s) acc = std::fma(wt[s * N + i], c[s], acc);
      if (acc < best) {
        best = acc;
        arg = k;
      }
    }
    out[i] = arg;
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
// ---- the few vector operations of the search, one struct per ISA, each member with its ISA's target
// attribute; the loop (search_lanes) is written once over them and instantiated in per-ISA wrappers
// that carry the target and `flatten`, so every member is inlined where its ISA is on (as
// kernels.cpp does with its GEMV traits). Indices travel as floats (exact: K < 2^24), so that one
// masked move keeps both the minimum and its index.
#define LCQAT_SEARCH_AVX512 __attribute__((target("avx512f,avx512dq")))
#define LCQAT_SEARCH_AVX2 __attribute__((target("avx2,fma")))

struct LanesAvx512 {
  using F = __m512;
  static constexpr int64_t kLanes = 16;
  LCQAT_SEARCH_AVX512 static inline F load(const float* p) { return _mm512_loadu_ps(p); }
  LCQAT_SEARCH_AVX512 static inline F set1(float v) { return _mm512_set1_ps(v); }
  LCQAT_SEARCH_AVX512 static inline F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  // lanes where acc < best (strict: the lowest k wins ties) take acc and k
  LCQAT_SEARCH_AVX512 static inline void keep_less(F acc, F k, F& best, F& arg) {
    const __mmask16 lt = _mm512_cmp_ps_mask(acc, best, _CMP_LT_OQ);
    best = _mm512_mask_mov_ps(best, lt, acc);
    arg = _mm512_mask_mov_ps(arg, lt, k);
  }
  LCQAT_SEARCH_AVX512 static inline void store(float* p, F v) { _mm512_storeu_ps(p, v); }
};

struct LanesAvx2 {
  using F = __m256;
  static constexpr int64_t kLanes = 8;
  LCQAT_SEARCH_AVX2 static inline F load(const float* p) { return _mm256_loadu_ps(p); }
  LCQAT_SEARCH_AVX2 static inline F set1(float v) { return _mm256_set1_ps(v); }
  LCQAT_SEARCH_AVX2 static inline F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  LCQAT_SEARCH_AVX2 static inline void keep_less(F acc, F k, F& best, F& arg) {
    const __m256 lt = _mm256_cmp_ps(acc, best, _CMP_LT_OQ);
    best = _mm256_blendv_ps(best, acc, lt);
    arg = _mm256_blendv_ps(arg, k, lt);
  }
  LCQAT_SEARCH_AVX2 static inline void store(float* p, F v) { _mm256_storeu_ps(p, v); }
};

// G groups of lanes at once: the G distance chains are independent, so the FMA latency (4 in a
// chain per codeword) overlaps; one group alone ran at a quarter of the FMA throughput.
constexpr int kGroups = 4;

// Vectors [i0, i1), V::kLanes a lane group: whole steps of kGroups groups, the rest by search_scalar.
template <class V>
static inline void search_lanes(const float* wt, int64_t N, int64_t i0, int64_t i1, const Table& t, int64_t* out) {
  using F = typename V::F;
  constexpr int64_t W = V::kLanes, G = kGroups;
  const int64_t d = t.d;
  int64_t i = i0;
  for (; i + G * W <= i1; i += G * W) {
    F w[G][4], best[G], arg[G];
    for (int g = 0; g < G; ++g) {
      for (int64_t s = 0; s < d; ++s) w[g][s] = V::load(wt + s * N + i + g * W);
      best[g] = V::set1(std::numeric_limits<float>::infinity());
      arg[g] = V::set1(0.0f);
    }
    for (int64_t k = 0; k < t.K; ++k) {
      const float* c = t.tab + k * (d + 1);
      const F kv = V::set1(static_cast<float>(k));
      F cs[4];
      for (int64_t s = 0; s < d; ++s) cs[s] = V::set1(c[s]);
      for (int g = 0; g < G; ++g) {
        F acc = V::set1(c[d]);
        for (int64_t s = 0; s < d; ++s) acc = V::fma(w[g][s], cs[s], acc);
        V::keep_less(acc, kv, best[g], arg[g]);
      }
    }
    for (int g = 0; g < G; ++g) {
      float idx[W];
      V::store(idx, arg[g]);
      for (int64_t j = 0; j < W; ++j) out[i + g * W + j] = static_cast<int64_t>(idx[j]);
    }
  }
  search_scalar(wt, N, i, i1, t, out);
}

LCQAT_SEARCH_AVX512 __attribute__((flatten)) static void search_avx512(const float* wt, int64_t N, int64_t i0,
                                                                        int64_t i1, const Table& t, int64_t* out) {
  search_lanes<LanesAvx512>(wt, N, i0, i1, t, out);
}

LCQAT_SEARCH_AVX2 __attribute__((flatten)) static void search_avx2(const float* wt, int64_t N, int64_t i0, int64_t i1,
                                                                    const Table& t, int64_t* out) {
  search_lanes<LanesAvx2>(wt, N, i0, i1, t, out);
}
#pragma GCC diagnostic pop

// w [N, d] float32, table [K, d] float32 (the codewords) -> int64 [N].
Tensor nearest_codeword_cpu(const Tensor& w, const Tensor& table) {
  TORCH_CHECK(w.dim() == 2 && table.dim() == 2 && w.size(1) == table.size(1),
              "nearest_codeword: w [N, d] and table [K, d] expected, got ", w.sizes(), " and ", table.sizes());
  TORCH_CHECK(w.scalar_type() == at::kFloat && table.scalar_type() == at::kFloat,
              "nearest_codeword: float32 w and table expected");
  const int64_t N = w.size(0), d = w.size(1), K = table.size(0);
  TORCH_CHECK(d >= 1 && d <= 4, "nearest_codeword: vectors of 1 to 4 values (vector_dim), got ", d);
  TORCH_CHECK(K >= 1 && K < (1 << 24), "nearest_codeword: 1 to 2^24 codewords, got ", K);
  // coordinate-major: lane j of a vector register reads w[i + j, s] from one contiguous row
  const Tensor wt = w.t().contiguous();
  const Tensor tab = at::cat({table * -2.0, (table * table).sum(1, true)}, 1).contiguous();
  Tensor out = at::empty({N}, w.options().dtype(at::kLong));
  const Table t{tab.data_ptr<float>(), K, d};
  const float* wp = wt.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  const cpu::Isa isa = cpu::detect_isa();
  // ~K * d FMAs a vector: a grain of 1024 vectors is ~1M FMAs, worth a thread
  at::parallel_for(0, N, 1024, [&](int64_t i0, int64_t i1) {
    if (isa == cpu::Isa::Avx512)
      search_avx512(wp, N, i0, i1, t, op);
    else if (isa == cpu::Isa::Avx2)
      search_avx2(wp, N, i0, i1, t, op);
    else
      search_scalar(wp, N, i0, i1, t, op);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lcqat, m) { m.def("nearest_codeword(Tensor w, Tensor table) -> Tensor"); }

TORCH_LIBRARY_IMPL(lcqat, CPU, m) { m.impl("nearest_codeword", &nearest_codeword_cpu); }

}  // namespace lcqat

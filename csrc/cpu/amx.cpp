// Kernels on AMX tiles (Intel Sapphire Rapids and later): the LC GEMM for bf16 activations (3 rows
// and more; fp32 from 2 rows as three bf16 parts a row) and the int8 head's product for bf16 activations (several rows).
//
// Why: on AMX CPUs a dense bf16 layer multiplies through oneDNN's AMX kernels, 16x16x32 products an
// instruction, and at 16-64 rows it left the AVX512_BF16 GEMM of kernels.cpp (32 products an
// instruction) 2.5-5x behind, and the int8 head's VNNI GEMV 2-4x behind a dense bf16 head.
//
// LC GEMM: the 2-bit codes of 16 weight rows x 32 inputs are decoded straight into one AMX B tile
// (as the centred codes -1.5..1.5, exact in bf16: kernels.h), and no dense weight exists beyond a
// few 1 KB tiles. Up to 16 activation rows, gemm_amx_1x4 multiplies them with 4 such tiles at a
// time; above, gemm_amx_2x2 multiplies 32 x 32 C blocks from a panel of decoded tiles (fewer
// activation tile loads, one decode per call). Both sum every output over the same 32-input chunks in
// the same order: a row's result does not depend on which one ran.
// The B tile of tdpbf16ps holds, in its row r, 16 dwords whose dword j is the pair
// (W[j, 2r], W[j, 2r + 1]) of a 32-input chunk. Code byte t of a weight row's chunk carries the
// codes of inputs 4t..4t+3 (field f = bits 2f..2f+1), so tile row r = 2t + h is nibble h of byte
// t of each of the 16 rows: one 16-entry dword table (nibble -> two bf16 codes) per row of the
// tile, after a 16-row dword gather that brings 4 code bytes of every row into its lane. The
// activations therefore stay in natural order: A tile row b is simply z[b, 32k : 32k + 32].
//
// int8 head: the roles swap, C^T = W X^T, so the int8 weight is the A tile as it lies in memory
// (16 rows x 64 inputs, row stride n: no decode at all) and the activations' 16-bit parts h and l
// (a16_prepare) are B tiles in the VNNI layout, built once a call. tdpbssd sums exact integers,
// the same integers as the VNNI GEMV's (which sums offset weights and takes the offset back), so the
// outputs are bit-identical to it.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.h"

// AMX intrinsics and target attributes: GCC 11+ or clang 12+ (and their binutils); older compilers
// build the extension without these paths.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LCQAT_AMX 1
#else
#define LCQAT_AMX 0
#endif

namespace lcqat {
namespace cpu {

// The CPU has AMX tiles and the given AMX compute (cpuid 7.0 EDX bit: 22 bf16, 25 int8), the OS
// grants the tile state, and OPTIMUM_LCQAT_CPU_AMX is not "0".
static bool amx_usable(int compute_bit) {
#if LCQAT_AMX
  const char* env = cpu_switch("AMX");
  if (env && std::string(env) == "0") return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1) || !((d >> compute_bit) & 1)) return false;
  // Linux hands out the 8 KB tile state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA);
  // process-wide, and harmless when oneDNN asked already.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  (void)compute_bit;
  return false;
#endif
}

bool has_amx_bf16() {
  // with bf16 products at all (AVX-512 + AVX512_BF16, OPTIMUM_LCQAT_CPU_BF16 not 0): this path rounds the
  // activations to bf16 as the AVX512_BF16 GEMM does (nearest even; the two differ only for fp32
  // denormals, flushed to zero here, and in NaN payloads)
  static const bool ok = has_bf16_dot() && amx_usable(22);
  return ok;
}

bool has_amx_int8() {
  // with the 16-bit activation path (its parts and its exact sums; OPTIMUM_LCQAT_CPU_A16 not 0)
  static const bool ok = has_int8_a16() && amx_usable(25);
  return ok;
}

int64_t amx_rows_padded(int64_t B) { return (B + 15) / 16 * 16; }

#if LCQAT_AMX
#define LCQAT_TARGET_AMX \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16,amx-tile,amx-bf16,amx-int8")))

// GCC's _tile_loadd / _tile_loadconfig are asm statements that do not tell the compiler they read
// memory: a fence keeps the stores of a buffer that a tile load reads (the decoded B tile, the
// padded weight tail, the tile config) before the load.
#define LCQAT_MEMORY_FENCE() __asm__ __volatile__("" ::: "memory")

struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// This thread's tiles: all eight 16 rows x 64 bytes (palette 1); _tile_release() gives them back.
LCQAT_TARGET_AMX static void load_tile_config() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof(cfg));
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = 16;
    cfg.colsb[t] = 64;
  }
  LCQAT_MEMORY_FENCE();
  _tile_loadconfig(&cfg);
}

// count floats -> bf16, round to nearest even (vcvtneps2bf16)
LCQAT_TARGET_AMX static void round_bf16_avx512(const float* x, int64_t count, uint16_t* out) {
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)v);
  }
  if (i < count) {
    const __mmask16 k = static_cast<__mmask16>((1u << (count - i)) - 1);
    const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(k, x + i));
    _mm256_mask_storeu_epi16(out + i, k, (__m256i)v);
  }
}

// The B tile of one 32-input chunk of 16 weight rows (rows past the range decode as code 0, the
// centred -1.5: their outputs are never stored).
// p: row 0's code byte 8k; lane j of `rows` = j * n/4.
LCQAT_TARGET_AMX static inline void decode_b_tile(const uint8_t* p, __m512i rows, __mmask16 live, __m512i table,
                                                  uint8_t* tile) {
  for (int half = 0; half < 2; ++half) {
    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, rows, p + 4 * half, 1);
    for (int t = 0; t < 4; ++t)
      for (int h = 0; h < 2; ++h)  // vpermd reads the low 4 bits of each lane: the nibble
        _mm512_store_si512(tile + 64 * (2 * (4 * half + t) + h),
                           _mm512_permutexvar_epi32(_mm512_srli_epi32(g, 8 * t + 4 * h), table));
  }
}

// Lane j: the offset of weight row j's code bytes (j * n/4), for decode_b_tile's gathers.
LCQAT_TARGET_AMX static inline __m512i code_row_offsets(int64_t nb) {
  return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                            _mm512_set1_epi32(static_cast<int>(nb)));
}

// nibble v -> the centred codes (v & 3, v >> 2) in bf16 (kCentredCodeBf16), for decode_b_tile
LCQAT_TARGET_AMX static inline __m512i centred_pair_table() {
  alignas(64) uint32_t tab[16];
  for (int v = 0; v < 16; ++v) tab[v] = kCentredCodeBf16[v & 3] | (uint32_t{kCentredCodeBf16[v >> 2]} << 16);
  return _mm512_load_si512(tab);
}

// The mask of weight rows [j, j + 16) below j1 (none when j >= j1).
static inline __mmask16 live_rows(int64_t j, int64_t j1) {
  const int64_t r = std::max<int64_t>(0, std::min<int64_t>(16, j1 - j));
  return r == 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << r) - 1);
}

// The next code rows into L2, a row or two per 32-input chunk k of the current products: a serving step
// streams every layer's codes from the L3 or DRAM, where the 16-row gathers otherwise wait on misses.
// next_rows <= 0: none (the range ends there).
LCQAT_TARGET_AMX static inline void prefetch_code_rows(const uint8_t* next, int64_t next_rows, int64_t k, int64_t kch,
                                                      int64_t nb) {
  for (int64_t r = k; r < next_rows; r += kch)
    for (int64_t o = 0; o < nb + 63; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(next + r * nb + std::min(o, nb - 1)), _MM_HINT_T1);
}

// A stored C tile `out` (activation rows bs.., below B; weight rows j.., the live ones) into y, plus
// the row constants: one vector a row.
LCQAT_TARGET_AMX static inline void store_c_tile(const float* out, const float* c, int64_t B, int64_t bs, float* y,
                                                 int64_t ldy, int64_t j, __mmask16 live) {
  for (int64_t b = bs; b < std::min<int64_t>(B, bs + 16); ++b)
    _mm512_mask_storeu_ps(y + b * ldy + j, live, _mm512_add_ps(_mm512_load_ps(out + (b - bs) * 16), _mm512_set1_ps(c[b])));
}

// Up to 16 activation rows: C tiles of 16 activation rows x 4 groups of 16 weight rows (C 0-3, A tile
// 4, B tiles 5, 6, 7 and 5 again), the 4 B tiles of each 32-input chunk decoded just before their
// products. Four independent accumulation chains: with one C tile a group (16 x 16 tiles), each
// product waited for the previous one into the same tile, and 8-16 rows ran 35-45% slower
// (SmolLM2 shapes, one thread: 576x576 at 16 rows 19.8 -> 11.9 us, 576x1536 60 -> 32 us). Above 16
// rows each 16-row block would decode the codes again: gemm_amx_2x2 takes over (at 24 and 32 rows it
// ran 5-15% ahead on SmolLM2's shapes, one thread; until then this loop took up to 32).
LCQAT_TARGET_AMX static void gemm_amx_1x4(const uint16_t* zb, const float* c, int64_t B, int64_t n,
                                          const uint8_t* packed, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  load_tile_config();
  alignas(64) uint8_t tile[4][1024];
  alignas(64) float out[16 * 16];
  const int64_t nb = n / 4, kch = n / 32;
  const __m512i rows = code_row_offsets(nb);
  const __m512i table = centred_pair_table();
  for (int64_t b0 = 0; b0 < B; b0 += 16) {
    for (int64_t j = j0; j < j1; j += 64) {
      const int groups = static_cast<int>(std::min<int64_t>(4, (j1 - j + 15) / 16));
      __mmask16 live[4];
      for (int g = 0; g < groups; ++g) live[g] = live_rows(j + 16 * g, j1);
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      const uint8_t* p = packed + j * nb;
      const uint8_t* next = p + 64 * nb;  // the next 64 code rows (prefetch_code_rows)
      const int64_t next_rows = std::min<int64_t>(64, j1 - j - 64);  // <= 0: none (the range ends)
      for (int64_t k = 0; k < kch; ++k) {
        prefetch_code_rows(next, next_rows, k, kch, nb);
        for (int g = 0; g < groups; ++g) decode_b_tile(p + 16 * g * nb + 8 * k, rows, live[g], table, tile[g]);
        LCQAT_MEMORY_FENCE();
        _tile_loadd(4, zb + b0 * n + 32 * k, 2 * n);
        _tile_loadd(5, tile[0], 64);
        _tile_dpbf16ps(0, 4, 5);
        if (groups > 1) {
          _tile_loadd(6, tile[1], 64);
          _tile_dpbf16ps(1, 4, 6);
        }
        if (groups > 2) {
          _tile_loadd(7, tile[2], 64);
          _tile_dpbf16ps(2, 4, 7);
        }
        if (groups > 3) {
          _tile_loadd(5, tile[3], 64);
          _tile_dpbf16ps(3, 4, 5);
        }
      }
      for (int g = 0; g < groups; ++g) {
        switch (g) {  // tile numbers are immediates
          case 0: _tile_stored(0, out, 64); break;
          case 1: _tile_stored(1, out, 64); break;
          case 2: _tile_stored(2, out, 64); break;
          default: _tile_stored(3, out, 64); break;
        }
        store_c_tile(out, c, B, b0, y, ldy, j + 16 * g, live[g]);
      }
    }
  }
  _tile_release();
}

// More than 16 activation rows: C tiles of 32 activation rows x 32 weight rows (C 0-3, A tiles 4 and
// 6, B tiles 5 and 7), the B tiles of the 32 weight rows decoded into a panel during the first 32-row
// pass (interleaved with its products, which hides the decode) and read back by the others. Against
// the 64 x 16 C tiles used before (4 activation tiles per decoded tile): half the activation tile
// loads per product, and the decode paid once per call rather than once per 64 rows. SmolLM2 shapes,
// one thread, 64 rows: down 177 -> 102 us, gate/up 167 -> 122 us, q/o and k/v equal (and 10-40%
// ahead of gemm_amx_1x4 at 48 rows). (Decoding the whole panel first ran ~30% slower: the decode then
// no longer overlaps the products.)
LCQAT_TARGET_AMX static void gemm_amx_2x2(const uint16_t* zb, const float* c, int64_t B, int64_t n,
                                          const uint8_t* packed, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  load_tile_config();
  alignas(64) float out[16 * 16];
  const int64_t nb = n / 4, kch = n / 32;
  thread_local std::vector<uint8_t> panel_buf;  // [kch][2] B tiles of 1 KB, 64-byte aligned
  const size_t panel_bytes = static_cast<size_t>(2 * kch * 1024);
  if (panel_buf.size() < panel_bytes + 64) panel_buf.resize(panel_bytes + 64);
  uint8_t* panel = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(panel_buf.data()) + 63) & ~uintptr_t{63});
  const __m512i rows = code_row_offsets(nb);
  const __m512i table = centred_pair_table();
  for (int64_t j = j0; j < j1; j += 32) {
    const __mmask16 live0 = live_rows(j, j1), live1 = live_rows(j + 16, j1);
    const uint8_t* p = packed + j * nb;
    const uint8_t* next = p + 32 * nb;  // the next 32 code rows into L2 during the first pass (as gemm_amx_1x4)
    const int64_t next_rows = std::min<int64_t>(32, j1 - j - 32);
    for (int64_t b0 = 0; b0 < B; b0 += 32) {
      const uint16_t* a0 = zb + b0 * n;
      const bool two = B - b0 > 16;  // a second 16-row activation tile (rows past B are zero padding)
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < kch; ++k) {
        uint8_t* t = panel + 2 * k * 1024;
        if (b0 == 0) {
          prefetch_code_rows(next, next_rows, k, kch, nb);
          decode_b_tile(p + 8 * k, rows, live0, table, t);
          if (live1) decode_b_tile(p + 16 * nb + 8 * k, rows, live1, table, t + 1024);
          LCQAT_MEMORY_FENCE();
        }
        _tile_loadd(5, t, 64);
        _tile_loadd(4, a0 + 32 * k, 2 * n);
        _tile_dpbf16ps(0, 4, 5);
        if (live1) {
          _tile_loadd(7, t + 1024, 64);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two) {
          _tile_loadd(6, a0 + 16 * n + 32 * k, 2 * n);
          _tile_dpbf16ps(2, 6, 5);
          if (live1) _tile_dpbf16ps(3, 6, 7);
        }
      }
      _tile_stored(0, out, 64);
      store_c_tile(out, c, B, b0, y, ldy, j, live0);
      if (live1) {
        _tile_stored(1, out, 64);
        store_c_tile(out, c, B, b0, y, ldy, j + 16, live1);
      }
      if (two) {
        _tile_stored(2, out, 64);
        store_c_tile(out, c, B, b0 + 16, y, ldy, j, live0);
        if (live1) {
          _tile_stored(3, out, 64);
          store_c_tile(out, c, B, b0 + 16, y, ldy, j + 16, live1);
        }
      }
    }
  }
  _tile_release();
}

// The activations' parts as int8 B tiles: [part h/l][16-row column block][64-input chunk] of
// 1 KB, tile row r = inputs 4r..4r+3, dword c = activation row 16 cb + c (zeros past B).
static void int8_amx_b_tiles(const int8_t* hl, int64_t B, int64_t n, int8_t* tiles) {
  const int64_t rb = a16_row_bytes(n), nch = n / 64, ncb = (B + 15) / 16;
  std::memset(tiles, 0, static_cast<size_t>(2 * ncb * nch * 1024));
  for (int64_t b = 0; b < B; ++b)
    for (int part = 0; part < 2; ++part) {
      const int8_t* src = hl + b * 2 * rb + part * rb;
      int8_t* dst = tiles + ((part * ncb + b / 16) * nch) * 1024 + 4 * (b % 16);
      for (int64_t k = 0; k < nch; ++k)
        for (int r = 0; r < 16; ++r) std::memcpy(dst + k * 1024 + 64 * r, src + 64 * k + 4 * r, 4);
    }
}

// C tiles 0-3: (h, l) sums of column blocks cb and cb + 1; A tile 4 (weight rows); B tiles 5-7.
LCQAT_TARGET_AMX static void int8_amx(const int8_t* tiles, const float* s, int64_t B, int64_t n, const int8_t* w,
                                      const float* scale, int64_t m, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  load_tile_config();
  alignas(64) int32_t ch[16 * 16], cl[16 * 16];
  const int64_t nch = n / 64, ncb = (B + 15) / 16;
  const int8_t* hpart = tiles;
  const int8_t* lpart = tiles + ncb * nch * 1024;
  std::vector<int8_t> tail;  // the last rows of the weight, zero-padded to 16 (tileloadd reads 16)
  for (int64_t j = j0; j < j1; j += 16) {
    const int live = static_cast<int>(std::min<int64_t>(16, j1 - j));  // outputs written
    const int64_t rows_left = m - j;                                     // rows that exist
    const int8_t* a = w + j * n;
    if (rows_left < 16) {  // the tile load reads 16 rows: past the weight's end, zeros
      tail.assign(static_cast<size_t>(16 * n), 0);
      std::memcpy(tail.data(), a, static_cast<size_t>(rows_left * n));
      LCQAT_MEMORY_FENCE();
      a = tail.data();
    }
    for (int64_t cb = 0; cb < ncb; cb += 2) {
      const bool two = cb + 1 < ncb;
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t k = 0; k < nch; ++k) {
        _tile_loadd(4, a + 64 * k, n);
        _tile_loadd(5, hpart + (cb * nch + k) * 1024, 64);
        _tile_dpbssd(0, 4, 5);
        _tile_loadd(6, lpart + (cb * nch + k) * 1024, 64);
        _tile_dpbssd(1, 4, 6);
        if (two) {
          _tile_loadd(7, hpart + ((cb + 1) * nch + k) * 1024, 64);
          _tile_dpbssd(2, 4, 7);
          _tile_loadd(5, lpart + ((cb + 1) * nch + k) * 1024, 64);
          _tile_dpbssd(3, 4, 5);
        }
      }
      for (int64_t half = 0; half < (two ? 2 : 1); ++half) {
        if (half == 0) {
          _tile_stored(0, ch, 64);
          _tile_stored(1, cl, 64);
        } else {
          _tile_stored(2, ch, 64);
          _tile_stored(3, cl, 64);
        }
        const int64_t bs = 16 * (cb + half), be = std::min<int64_t>(B, bs + 16);
        const __mmask16 cols = be - bs == 16 ? 0xFFFF : static_cast<__mmask16>((1u << (be - bs)) - 1);
        // activation rows bs.. in the lanes: their steps, and where their outputs go
        const __m512d s_lo = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(static_cast<__mmask8>(cols), s + bs));
        const __m512d s_hi = _mm512_cvtps_pd(_mm256_maskz_loadu_ps(static_cast<__mmask8>(cols >> 8), s + bs + 8));
        const __m512i rows_at = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(static_cast<int>(ldy)));
        for (int jj = 0; jj < live; ++jj) {
          // C[jj][c]: weight row j + jj, activation column c; the same integers as the VNNI GEMV's,
          // q = 256 h + l exact in double, then (q * s_b) * scale_j as a16_output rounds them
          const __m512i h = _mm512_load_si512(ch + 16 * jj), l = _mm512_load_si512(cl + 16 * jj);
          const __m512d sc = _mm512_set1_pd(static_cast<double>(scale[j + jj]));
          const __m512d q_lo = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_castsi512_si256(h)), _mm512_set1_pd(256.0),
                                               _mm512_cvtepi32_pd(_mm512_castsi512_si256(l)));
          const __m512d q_hi = _mm512_fmadd_pd(_mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(h, 1)), _mm512_set1_pd(256.0),
                                               _mm512_cvtepi32_pd(_mm512_extracti64x4_epi64(l, 1)));
          const __m256 y_lo = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(q_lo, s_lo), sc));
          const __m256 y_hi = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_mul_pd(q_hi, s_hi), sc));
          _mm512_mask_i32scatter_ps(y + bs * ldy + j + jj, cols, rows_at,
                                    _mm512_insertf32x8(_mm512_castps256_ps512(y_lo), y_hi, 1), 4);
        }
      }
    }
  }
  _tile_release();
}
#endif

int64_t int8_amx_tile_bytes(int64_t B, int64_t n) { return 2 * ((B + 15) / 16) * (n / 64) * 1024; }

void int8_amx_prepare(const int8_t* hl, int64_t B, int64_t n, int8_t* tiles) {
  if (!has_amx_int8() || n % 64 || n > kA16MaxInputs) std::abort();  // the caller checks; never reached
#if LCQAT_AMX
  int8_amx_b_tiles(hl, B, n, tiles);
#else
  (void)hl, (void)B, (void)n, (void)tiles;
#endif
}

void int8_amx_rows(const int8_t* tiles, const float* s, int64_t B, int64_t n, const int8_t* w, const float* scale,
                   int64_t m, int64_t j0, int64_t j1, float* y, int64_t ldy) {
  if (!has_amx_int8() || n % 64 || n > kA16MaxInputs) std::abort();  // the caller checks; never reached
#if LCQAT_AMX
  int8_amx(tiles, s, B, n, w, scale, m, j0, j1, y, ldy);
#else
  (void)tiles, (void)s, (void)B, (void)n, (void)w, (void)scale, (void)m, (void)j0, (void)j1, (void)y, (void)ldy;
#endif
}

void round_bf16(const float* x, int64_t count, uint16_t* out) {
  if (!has_amx_bf16()) std::abort();  // the caller checks; never reached
#if LCQAT_AMX
  round_bf16_avx512(x, count, out);
#else
  (void)x, (void)count, (void)out;
#endif
}

void prepare_amx_activations(const float* z, int64_t B, int64_t n, uint16_t* zb) {
  if (n % 32) std::abort();  // the caller checks; never reached
  round_bf16(z, B * n, zb);
  std::memset(zb + B * n, 0, sizeof(uint16_t) * (amx_rows_padded(B) - B) * n);
}

void lc_gemm_amx_rows(const uint16_t* zb, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                      int64_t j1, float* y, int64_t ldy) {
  if (!has_amx_bf16() || n % 32) std::abort();  // the caller checks; never reached
#if LCQAT_AMX
  if (B > 16) return gemm_amx_2x2(zb, c, B, n, packed, j0, j1, y, ldy);
  gemm_amx_1x4(zb, c, B, n, packed, j0, j1, y, ldy);
#else
  (void)zb, (void)c, (void)B, (void)n, (void)packed, (void)j0, (void)j1, (void)y, (void)ldy;
#endif
}

}  // namespace cpu
}  // namespace lcqat

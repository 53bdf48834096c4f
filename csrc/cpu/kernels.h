// CPU kernels of the LC layer (fp32 compute; bf16 products for bf16 activations on AVX512_BF16
// CPUs). Pure C++ over raw pointers; the torch glue lives in csrc/lcqat_ops.cpp. The ISA (AVX-512 / AVX2 / scalar) is chosen at run time.
#pragma once
#include <cstdint>

namespace lcqat {
namespace cpu {

enum class Isa { Scalar = 0, Avx2 = 1, Avx512 = 2 };

// The kernels' switches are environment variables OPTIMUM_LCQAT_CPU_<what> (ISA, BF16, A16, AMX), the
// package's one prefix. The older names LCQAT_CPU_<what> still work, with a warning once on stderr;
// the new name wins where both are set. Returns the value, or null when neither is set.
const char* cpu_switch(const char* what);

// Best ISA this CPU supports (cached), capped by OPTIMUM_LCQAT_CPU_ISA=scalar|avx2|avx512 (any other
// value: a warning naming these, and no cap).
Isa detect_isa();
const char* isa_name(Isa isa);

// In place on one row of length n = K * r: x <- (L (x) H_r) x, with H_r the orthonormal
// (natural-order Sylvester) Hadamard of size r applied to each of the K chunks and, when
// `left` is not null, the K x K matrix L (row-major; transposed if `transpose_left`) mixing the
// chunks. `work` must hold n floats when left is not null.
void hadamard_row(float* x, int64_t n, int64_t r, const float* left, int64_t K, bool transpose_left, float* work);

// The codebook fold of one rotated row x [n] (n a multiple of 4): z[4g + s] = sum_t A[t, s] x[4g + t];
// returns c = sum_g <beta, x_g>. The training stages (training_stages.cpp) use it forward, and with
// A transposed for the fold's adjoint.
float fold_row(const float* x, int64_t n, const float* A, const float* beta, float* z);
// One row's share of the fold's parameter grads: gA[4t + s] += sum_g r[4g + t] gz[4g + s],
// rsum[t] += sum_g r[4g + t] (float sums; the caller adds them up per row in double).
void accumulate_fold_grads(const float* r, const float* gz, int64_t n, float* gA, float* rsum);

// Decode GEMV for B <= kMaxGemvBatch rows of activations, rotated domain:
//   y[b, j] = sum_g <A q_{j,g} + beta, x[b, 4g:4g+4]>  for rows j in [j0, j1),
// computed as y[b, j] = sum_i (q_{j,i} - 1.5) z[b, i] + c[b] with z_g = A^T x_g and the centred
// constant c = sum_g <centred_beta, x_g> (see centred_beta below: the fp32 products multiply centred
// codes too, so that the sum does not cancel a large offset against c: with codes 0..3 a centred
// codebook's layer lost up to 2.4e-6 of its largest output, 2-5x a dense fp32 layer's rounding).
// `zp` is the output of prepare_activations with centred_beta (layout depends on the ISA). packed is [m, n/4].
constexpr int kMaxGemvBatch = 8;
int64_t prepared_size(int64_t n, Isa isa);  // floats per activation row in zp
void prepare_activations(const float* x, int64_t B, int64_t n, const float* A, const float* beta, Isa isa,
                         float* zp /* [B, prepared_size] */, float* c /* [B] */);
void lc_gemv_rows(const float* zp, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                  int64_t j1, Isa isa, float* y /* [B, m] */, int64_t ldy);

// The same product for any number of activation rows B (the serving batches), GEMM-style: code
// panels decoded once per call, output rows in the vector lanes. zt comes from
// prepare_gemm_activations with the same isa and tile_rows = gemm_tile_rows(isa, n, B)
// (activation rows packed in tiles of tile_rows rows, the last one maybe shorter, input-major
// inside a tile); [B, n] floats. A caller may prepare a range of whole tiles at a time. The panels
// hold centred codes; prepare_gemm_activations folds with centred_beta itself (pass the plain beta).
int64_t gemm_tile_rows(Isa isa, int64_t n, int64_t B);
void prepare_gemm_activations(const float* x, int64_t B, int64_t n, const float* A, const float* beta, Isa isa,
                              int64_t tile_rows, float* zt /* [B, n] */, float* c /* [B] */);
void lc_gemm_rows(const float* zt, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0, int64_t j1,
                  Isa isa, int64_t tile_rows, float* y /* [B, m] */, int64_t ldy);

// bf16 products (and the fp32 GEMV and GEMM) multiply centred codes: q - 1.5 in {-1.5, -0.5, 0.5, 1.5} (exact in bf16), with
// 1.5 * sum_i z_i moved into the row constant. sum_i z_i folds like <beta, x_g> does (z_g = A^T x_g,
// so sum_s z_{g,s} = <A 1, x_g>): the constant is the fold with beta + 1.5 * (row sums of A), at no
// cost, and it sees the unrounded z. Why: z is rounded to bf16 for the products, and with codes
// 0..3 the rounding errors add up with weights up to 3 around an offset the constant cancels again;
// centred, a SmolLM2-shaped layer's error fell from 1.9% to 0.16% of its largest output
// (float64 emulation; a dense bf16 layer: 0.35%). The model's perplexity did not move with it
// (benchmarks/results/bf16_quality*.md): a per-layer gain at no cost, not a quality fix.
constexpr float kCodeCentre = 1.5f;
constexpr uint16_t kCentredCodeBf16[4] = {0xBFC0u, 0xBF00u, 0x3F00u, 0x3FC0u};  // bf16 -1.5, -0.5, 0.5, 1.5
// beta + kCodeCentre * (row sums of A): the beta the bf16-product paths fold with
void centred_beta(const float* A, const float* beta, float* out /* [4] */);

// The GEMM with bf16 products (fp32 accumulation) for bf16 activations, on CPUs with
// AVX512_BF16 (has_bf16_dot(); OPTIMUM_LCQAT_CPU_BF16=0 turns it off): the code values are exact in bf16,
// the folded activations z are rounded to bf16. n a multiple of 16; zt holds [B, n/2] bf16 pairs
// in tiles of tile_rows = gemm_tile_rows(Isa::Avx512, n, B) rows.
bool has_bf16_dot();
void prepare_gemm_activations_bf16(const float* x, int64_t B, int64_t n, const float* A, const float* beta,
                                   int64_t tile_rows, uint32_t* zt /* [B, n/2] */, float* c /* [B] */);
void lc_gemm_bf16_rows(const uint32_t* zt, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                       int64_t j1, int64_t tile_rows, float* y /* [B, m] */, int64_t ldy);

// The decode GEMV with bf16 products for B <= 5 bf16 activation rows (has_bf16_dot(), n a
// multiple of 16): zq [B, gemv_bf16_row_words(n)] from prepare_gemv_bf16.
int64_t gemv_bf16_row_words(int64_t n);
void prepare_gemv_bf16(const float* x, int64_t B, int64_t n, const float* A, const float* beta, uint32_t* zq,
                       float* c /* [B] */);
void lc_gemv_bf16_rows(const uint32_t* zq, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                       int64_t j1, float* y /* [B, m] */, int64_t ldy);

// Weight-only int8 GEMV (compact lm_head): y[b, j] = scale[j] * sum_i w[j, i] x[b, i], B <= 8,
// rows [j0, j1); w is int8 [m, n] row-major, x fp32 [B, n].
void int8_gemv_rows(const float* x, int64_t B, int64_t n, const int8_t* w, const float* scale, int64_t j0, int64_t j1,
                    Isa isa, float* y, int64_t ldy);

// ---- int8-activation decode GEMV (opt-in: it rounds the activations, so results differ from
// the fp32 path by the activation rounding; see optimum_lcqat.nn.lc_linear.set_int8_activations).
// z = the codebook-folded rotated activations (natural order, fp32, from prepare_activations
// with Isa::Scalar) is rounded per row to int8 with one absmax scale, and
//   y[b, j] = scale[b] * sum_i q_{j,i} zq[b, i] + c[b]
// the integer dot products on AVX-512 VNNI (vpdpbusd, 64 codes per instruction) when the CPU
// has it, else the same integer sums in scalar code (identical results, slower).
bool has_vnni();
int64_t a8_row_bytes(int64_t n);  // int8 per prepared activation row (n rounded up to 256)
void a8_prepare(const float* z, int64_t B, int64_t n, int8_t* zq /* [B, a8_row_bytes] */, float* scale /* [B] */);
void lc_gemv_a8_rows(const int8_t* zq, const float* scale, const float* c, int64_t B, int64_t n,
                     const uint8_t* packed, int64_t j0, int64_t j1, float* y, int64_t ldy);

// ---- weight-only int8 GEMV for bf16 activations (int8_linear), B <= kMaxGemvBatch, on AVX-512
// VNNI CPUs (has_int8_a16(); OPTIMUM_LCQAT_CPU_BF16=0 turns it off with the bf16 products of the LC
// layers, OPTIMUM_LCQAT_CPU_A16=0 alone: bf16 activations then take the bf16 GEMV, or fp32). Each activation row is rounded to 16-bit fixed point, q = round(x / s) with
// s = max|x| / kA16Max (fp32), split as q = 256 h + l (h in [-127, 127], l in [-128, 127]); the
// sums sum_i w h, sum_i w l are exact integers (vpdpbusd, the weights offset to unsigned by +128)
// and
//   y[b, j] = scale[j] * s_b * (256 sum_i w_ji h_bi + sum_i w_ji l_bi)
// in double before the one rounding to fp32, so a row's output does not depend on the rows beside
// it (int8_linear takes this path up to 64 rows; more rows run its fp32 prefill GEMM). The only
// error against the exact product of the input is the rounding of x, at most max|x| / 65278 an
// element: below bf16's own rounding of every element above max|x| / 128. A row with a NaN or inf
// gives NaN outputs; a row whose max|x| is below kA16Tiny (2^-100) counts as zero.
// n <= kA16MaxInputs (int32 lane sums cannot overflow).
constexpr int32_t kA16Max = 32639;
constexpr int64_t kA16MaxInputs = 65536;
constexpr float kA16Tiny = 0x1p-100f;
bool has_int8_a16();
int64_t a16_row_bytes(int64_t n);  // int8 per activation part (n rounded up to 64)
void a16_prepare(const float* x, int64_t B, int64_t n, int8_t* hl /* [B, 2, a16_row_bytes] */, float* s /* [B] */,
                 int32_t* sums /* [B, 2]: sum h, sum l */);
void int8_gemv_a16_rows(const int8_t* hl, const float* s, const int32_t* sums, int64_t B, int64_t n,
                        const int8_t* w, const float* scale, int64_t j0, int64_t j1, float* y, int64_t ldy);

// ---- the LC decode GEMV for bf16 activations on the same CPUs (has_int8_a16()), B <= kMaxGemvBatch:
// z = the codebook-folded rotated activations (natural order, fp32, prepare_activations with
// Isa::Scalar) rounded per row to 16-bit fixed point as in a16_prepare (q = 256 h + l), both parts in
// the a8 layout, and
//   y[b, j] = s_b * (256 sum_i q_{j,i} h_{b,i} + sum_i q_{j,i} l_{b,i}) + c[b]
// with exact integer sums (vpdpbusd: the 2-bit codes unsigned, the parts signed). Against the
// bf16 GEMV (z rounded to bf16, relative 2^-9 an element) the rounding is max|z| / 65278 an
// element: smaller for every element above max|z| / 128.
void lc_a16_prepare(const float* z, int64_t B, int64_t n, int8_t* zq /* [B, 2, a8_row_bytes] */, float* s /* [B] */);
void lc_gemv_a16_rows(const int8_t* zq, const float* s, const float* c, int64_t B, int64_t n, const uint8_t* packed,
                      int64_t j0, int64_t j1, float* y, int64_t ldy);

// ---- the LC GEMM on AMX tiles for bf16 activations (amx.cpp), on CPUs with AMX-BF16
// (has_amx_bf16(): has_bf16_dot() as well, the OS grants the tile state; OPTIMUM_LCQAT_CPU_AMX=0 turns it
// off). The same product as lc_gemm_bf16_rows, with the same rounding for normal z (to bf16, nearest even;
// fp32 accumulation, in another order). z = the folded activations in natural order (fp32, from
// prepare_activations with Isa::Scalar and the centred beta: the caller folds with centred_beta,
// since the tiles hold centred codes; the bf16 GEMM's and GEMV's prepare functions centre inside);
// zb holds them in bf16, [amx_rows_padded(B), n], the padding rows zero. n a multiple of 32. Rows
// [j0, j1) of the weight, 16 at a time.
bool has_amx_bf16();
int64_t amx_rows_padded(int64_t B);
void prepare_amx_activations(const float* z, int64_t B, int64_t n, uint16_t* zb);
// count floats -> bf16 (round to nearest even, as the activations above; vcvtneps2bf16 flushes
// denormals to zero), on CPUs with has_amx_bf16(): the AMX layer's bf16 outputs
void round_bf16(const float* x, int64_t count, uint16_t* out);
// The AMX layer's per-row stages in one pass per Hadamard block (kernels.cpp), for blocks of 16..256
// (a power of two) without a left factor (K <= 1) on CPUs with has_bf16_dot(); false: not taken,
// nothing written. Bit-identical to the passes they fuse:
// input: x (bf16) * su, hadamard_row, prepare_activations (Isa::Scalar, the given beta), round_bf16
//   -> zb [n] bf16, *c the row constant;
// output: hadamard_row (transposed), r * sv (+ bias), round_bf16 -> out [len] bf16 (r is not written).
bool input_stage_bf16(const uint16_t* x, int64_t n, const float* su, int64_t block, int64_t K, const float* A,
                      const float* beta, uint16_t* zb, float* c);
bool output_stage_bf16(const float* r, int64_t len, int64_t block, int64_t K, const float* sv, const float* bias,
                       uint16_t* out);
// fp32 activations on the same tiles (the bf16x3 split): each row's z as three bf16 parts, z = hi + mid
// + lo exactly for normal z (hi = z rounded to bf16, mid = the remainder rounded, lo = the rest; parts
// below bf16's normal range flush to zero). The parts' products with the exact code values are exact
// and sum in fp32: the product of fp32 activations, at three times the bf16 products' tile work.
// split_bf16x3: z [n] -> out [3, n] (hi, mid, lo rows), n a multiple of 16, on has_bf16_dot() CPUs.
// input_stage_f32x3 / output_stage_f32x3: the fused stages above for fp32 rows: x (fp32) -> zb [3, n]
// parts; r the parts' products in rows r, r + ld, r + 2 ld, summed hi + (mid + lo) before the
// Hadamard -> out [len] fp32. Bit-identical to split_bf16x3 / that sum after the unfused passes.
void split_bf16x3(const float* z, int64_t n, uint16_t* out);
bool input_stage_f32x3(const float* x, int64_t n, const float* su, int64_t block, int64_t K, const float* A,
                       const float* beta, uint16_t* zb, float* c);
bool output_stage_f32x3(const float* r, int64_t ld, int64_t len, int64_t block, int64_t K, const float* sv,
                        const float* bias, float* out);
void lc_gemm_amx_rows(const uint16_t* zb, const float* c, int64_t B, int64_t n, const uint8_t* packed, int64_t j0,
                      int64_t j1, float* y /* [B, m] */, int64_t ldy);

// ---- int8_linear for bf16 activations on AMX tiles (amx.cpp), on CPUs with AMX-INT8 (has_amx_int8():
// has_int8_a16() as well; OPTIMUM_LCQAT_CPU_AMX=0 turns it off): the activations rounded to 16-bit fixed
// point by a16_prepare, the integer sums exact (tdpbssd), y as in int8_gemv_a16_rows: the same
// bits. n a multiple of 64, n <= kA16MaxInputs. tiles: int8_amx_tile_bytes(B, n) bytes from
// int8_amx_prepare; rows [j0, j1) of the weight (a multiple of 16 apart, except at m).
bool has_amx_int8();
int64_t int8_amx_tile_bytes(int64_t B, int64_t n);
void int8_amx_prepare(const int8_t* hl /* a16_prepare's parts */, int64_t B, int64_t n, int8_t* tiles);
void int8_amx_rows(const int8_t* tiles, const float* s, int64_t B, int64_t n, const int8_t* w, const float* scale,
                   int64_t m, int64_t j0, int64_t j1, float* y, int64_t ldy);

}  // namespace cpu
}  // namespace lcqat

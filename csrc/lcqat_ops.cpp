// torch.library registration of the lcqat ops and their CPU implementations.
//
// Ops (namespace lcqat, see optimum_lcqat/kernels/native.py for the Python side and the fake
// implementations used by torch.compile):
//   hadamard(x, block, left?, scale_in?, scale_out?, transpose)   y = H(x * scale_in) * scale_out
//   lc_matmul(xt, packed, A, beta)                                yt = xt @ What^T (rotated domain)
//   lc_linear(x, packed, A, beta, s_u, s_v, bias?, block_in, left_in?, block_out, left_out?)
//       y = s_v * H_out^T(What @ H_in(x * s_u)) + bias, the whole LC layer in one call
//   lc_linear_a8(same arguments)                                  lc_linear with int8 activations (opt-in;
//       the rotated, codebook-folded activations are rounded per row to int8, AVX-512 VNNI GEMV)
//   int8_linear(x, weight int8 [m, n], scale [m], bias?)          weight-only int8 (compact lm_head);
//                                                                 bf16 x on AVX-512 VNNI CPUs: 16-bit
//                                                                 fixed-point x, exact integer sums (kernels.h)
//   cpu_has_int8_a16() -> bool                                    whether int8_linear takes that path
//   cpu_has_amx_bf16() -> bool                                    whether bf16 activations of 3+ rows
//                                                                 multiply on AMX tiles (amx.cpp)
//   cpu_has_amx_int8() -> bool                                    whether int8_linear's 16-bit path
//                                                                 sums on AMX tiles from 2 rows
//   cpu_isa() -> str                                              the CPU kernel variant in use
//   cpu_has_bf16_dot() -> bool                                    whether bf16 activations multiply in bf16
// H = L (x) H_block (L = identity when `left` is None; else the K x K matrix `left`, n = K*block).
// Compute is fp32 whatever the activation dtype (fp32, bf16, fp16 accepted; outputs have the
// activation's dtype), with exceptions for bf16 activations (OPTIMUM_LCQAT_CPU_BF16=0 turns them off):
// on a CPU with AVX512_BF16 they multiply in bf16 with fp32 accumulation, as dense bf16 layers do
// (the code values are exact in bf16; the folded activations are rounded); on an AVX-512 VNNI CPU
// the decode GEMV (1-5 rows; 1-2 where the AMX layer takes 3) and int8_linear instead round them to
// 16-bit fixed point and sum exact integers (a finer rounding than bf16's for all but the smallest
// elements; kernels.h).
// No dense weight is ever built: 1-3 rows (1-5 with bf16 products) run the decode GEMV, more
// rows (serving batches, prefill) the GEMM of cpu/kernels.cpp that decodes code panels into L1;
// on AMX CPUs bf16 activations of 3+ rows the AMX layer (amx_call, cpu/amx.cpp: codes decoded
// into one 16 x 32 tile at a time; OPTIMUM_LCQAT_CPU_AMX=0 turns it off), and fp32 activations of 2+ rows
// the same layer as three bf16 parts a row (hi + mid + lo = x exactly: exact products, fp32 sums).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "ops_common.h"
#include "row_stages.h"

extern "C" {
// `import optimum_lcqat._C` loads this library, which runs the TORCH_LIBRARY registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "optimum-lcqat native ops (torch.ops.lcqat)",
                                          -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace lcqat {

using at::Tensor;
namespace K = cpu;

// stage(b, work) for rows b in [0, B) of length n, split across threads; work: n floats a thread
// where `left` (a left factor) is not null, else null.
template <typename F>
static void for_rows(int64_t B, int64_t n, const float* left, const F& stage) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    std::vector<float> work(left ? n : 0);
    for (int64_t b = b0; b < b1; ++b) stage(b, work.data());
  });
}

// Weights per thread below which a layer's GEMV stays on the calling thread. One sweep on 2 cores
// over SmolLM2's 210 layers: 4.33 ms a token at 2^17, ~4.5 at 2^15 and 2^18.6, 5.9 at 2^20 (a k/v
// projection, 110K weights, then runs serially).
constexpr int64_t kMinWeightsPerThread = 1 << 17;

// Rows below which the rotated product runs the GEMV (code bytes decoded per slice of rows, the
// input dimension in the vector lanes) rather than the GEMM (panels decoded once, output rows in
// the lanes). Measured on 2 cores over SmolLM2's four layer shapes: the GEMV is ahead at 2 rows,
// even at 4, the GEMM ahead from 8 (benchmarks/kernels.py).
constexpr int64_t kGemmMinRows = 4;
// With bf16 products the GEMV decodes 32 codes a permute and stays ahead of the GEMM up to 5 rows
// (one thread, 8192x2048: 4 rows 0.37 vs 0.79 ms hot, 0.44 vs 1.69 ms from DRAM).
constexpr int64_t kBf16GemvMaxRows = 5;
// On AMX CPUs the AMX layer (amx_call; amx.cpp's GEMM) takes bf16 activations from 3 rows: its
// cost is the code decode, nearly flat up to 16 rows, where the 16-bit GEMV grows with the rows.
// One thread, A/B of the two paths: at 3 rows 1.3-2.0x the GEMV on SmolLM2's and Llama-3.2-1B's
// shapes (2048x8192 0.95x), at 4 rows 1.5-2.2x; at 2 rows the GEMV stays ahead on the 1B shapes
// (AMX 0.57-0.96x) and is level on SmolLM2's (0.97-1.25x).
constexpr int64_t kAmxMinRows = 3;
// fp32 activations take the AMX layer (three bf16 parts a row, kernels.h) from 2 rows: at 2-3 rows
// 1.1-1.9x the fp32 GEMV on the same shapes, at 4+ rows still ahead of the fp32 GEMM's FMAs.
constexpr int64_t kAmxF32MinRows = 2;

// Rotated-domain product with the codes read directly: B rotated fp32 rows xt [B, n] -> yp [B, m]
// (B <= kMaxGemvBatch for the GEMV and when act_int8). The codebook is folded into the
// activations in a per-thread scratch (no allocation), then the rows of the weight are split
// across threads. act_int8: the folded activations are rounded to int8 and the int8-activation
// GEMV (lc_linear_a8) runs instead. bf16: the activations came in bf16, and the GEMV and the
// GEMM multiply in bf16 where the CPU has AVX512_BF16 (see kernels.h).
static void rotated_product(const float* xt, int64_t B, int64_t n, int64_t m, const uint8_t* pk, const float* A,
                            const float* beta, bool act_int8, bool bf16, float* yp) {
  const auto isa = K::detect_isa();
  // bf16 products (see kernels.h): the GEMV up to kBf16GemvMaxRows rows, then the GEMM
  const bool bf16_dot = bf16 && !act_int8 && n % 16 == 0 && K::has_bf16_dot();
  // bf16 products on AMX tiles from kAmxMinRows rows (amx.cpp)
  const bool amx = bf16_dot && B >= kAmxMinRows && n % 32 == 0 && K::has_amx_bf16();
  // bf16 activations on VNNI CPUs, GEMV sizes: 16-bit fixed point, exact integer sums (kernels.h)
  const bool a16 = bf16 && !act_int8 && !amx && B <= kBf16GemvMaxRows && K::has_int8_a16();
  const int64_t zn = (act_int8 || a16 || amx) ? n : std::max(K::prepared_size(n, isa), bf16_dot ? K::gemv_bf16_row_words(n) : 0);
  const int64_t qn = act_int8 ? K::a8_row_bytes(n) : (a16 ? 2 * K::a8_row_bytes(n) : 0);
  // [B, zn] prepared activations | [B] constants | [B] int8 scales | [B, qn] int8 activations
  // (as floats' worth of bytes)
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(B * zn + 2 * B + (B * qn + 3) / 4);
  if (scratch.size() < need) scratch.resize(need);
  float* zp = scratch.data();
  float* c = zp + B * zn;
  float* qs = c + B;
  int8_t* zq = reinterpret_cast<int8_t*>(qs + B);
  const int64_t grain = std::max<int64_t>(8, kMinWeightsPerThread / std::max<int64_t>(n * B, 1));
  if (act_int8) {
    K::prepare_activations(xt, B, n, A, beta, K::Isa::Scalar, zp, c);  // natural order
    K::a8_prepare(zp, B, n, zq, qs);
    at::parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { K::lc_gemv_a8_rows(zq, qs, c, B, n, pk, j0, j1, yp, m); });
  } else if (a16) {
    K::prepare_activations(xt, B, n, A, beta, K::Isa::Scalar, zp, c);  // natural order
    K::lc_a16_prepare(zp, B, n, zq, qs);
    at::parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { K::lc_gemv_a16_rows(zq, qs, c, B, n, pk, j0, j1, yp, m); });
  } else if (amx) {
    // AMX tiles (amx.cpp): z in natural order, rounded to bf16 into a second scratch
    thread_local std::vector<uint16_t> zb_scratch;
    const size_t zb_need = static_cast<size_t>(K::amx_rows_padded(B) * n);
    if (zb_scratch.size() < zb_need) zb_scratch.resize(zb_need);
    uint16_t* zb = zb_scratch.data();  // this thread's: the workers below read it through the pointer
    float cb[4];  // the products multiply centred codes (kernels.h)
    K::centred_beta(A, beta, cb);
    K::prepare_activations(xt, B, n, A, cb, K::Isa::Scalar, zp, c);
    K::prepare_amx_activations(zp, B, n, zb);
    // whole groups of 16 weight rows per thread (one B tile each)
    const int64_t groups = (m + 15) / 16;
    at::parallel_for(0, groups, std::max<int64_t>(1, kMinWeightsPerThread / (16 * n)), [&](int64_t g0, int64_t g1) {
      K::lc_gemm_amx_rows(zb, c, B, n, pk, 16 * g0, std::min(m, 16 * g1), yp, m);
    });
  } else if (B <= kBf16GemvMaxRows && bf16_dot) {
    uint32_t* zb = reinterpret_cast<uint32_t*>(zp);  // [B, gemv_bf16_row_words(n)] words
    K::prepare_gemv_bf16(xt, B, n, A, beta, zb, c);
    at::parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { K::lc_gemv_bf16_rows(zb, c, B, n, pk, j0, j1, yp, m); });
  } else if (B < kGemmMinRows) {
    float cb[4];  // the fp32 GEMV multiplies centred codes (kernels.h)
    K::centred_beta(A, beta, cb);
    K::prepare_activations(xt, B, n, A, cb, isa, zp, c);
    at::parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) { K::lc_gemv_rows(zp, c, B, n, pk, j0, j1, isa, yp, m); });
  } else {
    // the GEMM: fold and pack the activations tile by tile (tiles are independent: split across
    // threads), then the weight rows split across threads
    const int64_t tile = K::gemm_tile_rows(isa, n, B);  // 0: the scalar fallback (natural rows)
    const int64_t bt = std::max<int64_t>(1, tile);
    const auto by_tiles = [&](auto&& prepare) {  // prepare(b0, b1) for rows [b0, b1) of whole tiles
      at::parallel_for(0, (B + bt - 1) / bt, std::max<int64_t>(1, 16384 / std::max<int64_t>(n * bt, 1)),
                       [&](int64_t t0, int64_t t1) { prepare(t0 * bt, std::min(B, t1 * bt)); });
    };
    if (bf16_dot) {
      uint32_t* zb = reinterpret_cast<uint32_t*>(zp);  // bf16 pairs: B * n / 2 words of the scratch
      by_tiles([&](int64_t b0, int64_t b1) {
        K::prepare_gemm_activations_bf16(xt + b0 * n, b1 - b0, n, A, beta, bt, zb + b0 * n / 2, c + b0);
      });
      at::parallel_for(0, m, grain,
                       [&](int64_t j0, int64_t j1) { K::lc_gemm_bf16_rows(zb, c, B, n, pk, j0, j1, bt, yp, m); });
    } else {
      by_tiles([&](int64_t b0, int64_t b1) {
        K::prepare_gemm_activations(xt + b0 * n, b1 - b0, n, A, beta, isa, tile, zp + b0 * n, c + b0);
      });
      at::parallel_for(0, m, grain,
                       [&](int64_t j0, int64_t j1) { K::lc_gemm_rows(zp, c, B, n, pk, j0, j1, isa, tile, yp, m); });
    }
  }
}

// Rotated-domain matmul on fp32 rows [B, n] -> fp32 [B, m], any number of rows (decode batches
// and prefill alike: the GEMM beat dequantizing tiles for at::mm at 64-1024 rows here).
static Tensor matmul_rows_f32(const Tensor& x2, const Tensor& packed, const Tensor& A32, const Tensor& b32, bool bf16) {
  const int64_t B = x2.size(0), n = x2.size(1), m = packed.size(0);
  auto y = at::empty({B, m}, x2.options());
  rotated_product(x2.data_ptr<float>(), B, n, m, packed.data_ptr<uint8_t>(), A32.data_ptr<float>(),
                  b32.data_ptr<float>(), false, bf16, y.data_ptr<float>());
  return y;
}

static Tensor rows_f32(const Tensor& x, int64_t n) {
  // a fresh fp32 [B, n] buffer we may modify in place
  const int64_t B = n ? x.numel() / n : 0;
  if (x.scalar_type() == at::kFloat && x.is_contiguous()) {
    auto out = at::empty({B, n}, x.options());
    std::memcpy(out.data_ptr<float>(), x.data_ptr<float>(), sizeof(float) * B * n);
    return out;
  }
  return x.reshape({B, n}).to(at::kFloat).contiguous();
}

// [B, m] fp32 rows -> the op's output (dtype and leading dims of x).
static Tensor finish(const Tensor& rows, const Tensor& x, int64_t last) {
  auto shape = out_shape(x, last);
  if (x.scalar_type() == at::kFloat) return rows.view(shape);
  return rows.to(x.scalar_type()).view(shape);
}


// ------------------------------------------------------------------ op implementations (CPU)
Tensor hadamard_cpu(const Tensor& x, int64_t block, const c10::optional<Tensor>& left,
                    const c10::optional<Tensor>& scale_in, const c10::optional<Tensor>& scale_out, bool transpose) {
  const int64_t Kl = check_hadamard_args(x, block, left, scale_in, scale_out);
  const int64_t n = x.size(-1);
  auto rows = rows_f32(x, n);
  auto L = opt_f32(left), si = opt_f32(scale_in), so = opt_f32(scale_out);
  float* rp = rows.data_ptr<float>();
  const float* Lp = L.defined() ? L.data_ptr<float>() : nullptr;
  const float* sip = si.defined() ? si.data_ptr<float>() : nullptr;
  const float* sop = so.defined() ? so.data_ptr<float>() : nullptr;
  for_rows(rows.size(0), n, Lp, [&](int64_t b, float* work) {
    rotate_row(rp + b * n, rp + b * n, n, block, Lp, Kl, transpose, sip, sop, nullptr, work);
  });
  return rows.to(x.scalar_type()).view(x.sizes());
}

Tensor lc_matmul_cpu(const Tensor& xt, const Tensor& packed, const Tensor& A, const Tensor& beta) {
  check_lc_matmul_args(xt, packed, A, beta);
  const int64_t n = xt.size(-1);
  auto pk = packed.contiguous();
  auto A32 = f32(A), b32 = f32(beta.reshape({-1}));
  const int64_t m = pk.size(0);
  auto x2 = xt.reshape({-1, n});
  Tensor y = matmul_rows_f32(x2.to(at::kFloat).contiguous(), pk, A32, b32, xt.scalar_type() == at::kBFloat16);
  return y.to(xt.scalar_type()).view(out_shape(xt, m));
}

// ------------------------------------------------------------------ decode path (B <= 8 rows)
// The whole layer for B <= kMaxGemvBatch fp32 or bf16 rows xp [B, n] -> fp32 yp [B, m]: input scale and
// Hadamard into a per-thread scratch, rotated_product straight into yp, output Hadamard and scale in
// place. act_int8: the int8-activation GEMV (lc_linear_a8).
template <typename T>  // float, or c10::BFloat16 (widened exactly as each row is scaled)
static void decode_rows(const T* xp, int64_t B, int64_t n, int64_t m, const uint8_t* pk, const float* A,
                        const float* beta, const float* su, const float* sv, const float* bias, int64_t block_in,
                        const float* Li, int64_t Kin, int64_t block_out, const float* Lo, int64_t Kout, bool act_int8,
                        bool bf16, float* yp) {
  thread_local std::vector<float> scratch;  // [B, n] rotated activations | max(n, m) Hadamard work
  const size_t need = static_cast<size_t>(B * n + std::max(n, m));
  if (scratch.size() < need) scratch.resize(need);
  float* xt = scratch.data();
  float* work = xt + B * n;
  for (int64_t b = 0; b < B; ++b) input_row(xp + b * n, xt + b * n, n, su, block_in, Li, Kin, work);
  rotated_product(xt, B, n, m, pk, A, beta, act_int8, bf16, yp);
  for (int64_t b = 0; b < B; ++b) output_row(yp + b * m, m, block_out, Lo, Kout, sv, bias, work);
}

// Validated, fp32 views of an lc_linear call's arguments.
struct LcArgs : LcShape {
  Tensor pk, A32, b32, su, sv, bs, Li, Lo;
  const float* bias() const { return bs.defined() ? bs.data_ptr<float>() : nullptr; }
  const float* left_in() const { return Li.defined() ? Li.data_ptr<float>() : nullptr; }
  const float* left_out() const { return Lo.defined() ? Lo.data_ptr<float>() : nullptr; }
};

static LcArgs check_lc_args(const char* op, const Tensor& x, const Tensor& packed, const Tensor& A, const Tensor& beta,
                            const Tensor& s_u, const Tensor& s_v, const c10::optional<Tensor>& bias, int64_t block_in,
                            const c10::optional<Tensor>& left_in, int64_t block_out,
                            const c10::optional<Tensor>& left_out) {
  LcArgs a{check_lc_linear_args(op, x, packed, A, beta, s_u, s_v, bias, block_in, left_in, block_out, left_out)};
  a.pk = packed.is_contiguous() ? packed : packed.contiguous();
  a.A32 = f32(A);
  a.b32 = f32(beta);
  a.su = f32(s_u);
  a.sv = f32(s_v);
  a.bs = opt_f32(bias);
  a.Li = opt_f32(left_in);
  a.Lo = opt_f32(left_out);
  return a;
}

// Decode path of lc_linear (B <= kMaxGemvBatch rows, the batch-1..8 token-by-token case).
// At SmolLM2's sizes a layer's GEMV takes only ~5-30 us, so fixed costs matter as much as the
// inner loop: the only allocation is the output (rotated and prepared activations live in a
// per-thread scratch buffer), the input scaling, Hadamard and codebook folding run in one pass
// over the rows, the GEMV writes straight into the output, the output rotation runs in place,
// and a layer too small to pay for waking the OpenMP team runs on the calling thread.
static Tensor decode_call(const Tensor& x, int64_t B, const LcArgs& a, int64_t block_in, int64_t block_out,
                          bool act_int8) {
  // fp32 and bf16 activations are read where they lie and the outputs written straight into the result
  // (bf16: each row's fp32 outputs rounded as at::to rounds them, c10::BFloat16); a conversion to fp32
  // and back took ~2.4 us a call, a sixth of a 576x576 layer at 1 row. Other dtypes convert.
  const bool f32_in = x.scalar_type() == at::kFloat && x.is_contiguous();
  const bool bf16_in = x.scalar_type() == at::kBFloat16 && x.is_contiguous();
  Tensor xf = (f32_in || bf16_in) ? x : x.reshape({B, a.n}).to(at::kFloat).contiguous();
  Tensor out = at::empty(out_shape(x, a.m), x.options().dtype(f32_in || bf16_in ? x.scalar_type() : at::kFloat));
  thread_local std::vector<float> rows_out;  // bf16 activations: a chunk's fp32 outputs before rounding
  if (bf16_in && rows_out.size() < static_cast<size_t>(K::kMaxGemvBatch * a.m)) rows_out.resize(K::kMaxGemvBatch * a.m);
  for (int64_t b0 = 0; b0 < B; b0 += K::kMaxGemvBatch) {
    const int64_t bs = std::min<int64_t>(K::kMaxGemvBatch, B - b0);
    float* yp = bf16_in ? rows_out.data() : out.data_ptr<float>() + b0 * a.m;
    const auto run = [&](const auto* xp) {
      decode_rows(xp + b0 * a.n, bs, a.n, a.m, a.pk.data_ptr<uint8_t>(), a.A32.data_ptr<float>(),
                  a.b32.data_ptr<float>(), a.su.data_ptr<float>(), a.sv.data_ptr<float>(), a.bias(), block_in,
                  a.left_in(), a.Kin, block_out, a.left_out(), a.Kout, act_int8, x.scalar_type() == at::kBFloat16, yp);
    };
    if (bf16_in) {
      run(xf.data_ptr<at::BFloat16>());
      at::BFloat16* ob = out.data_ptr<at::BFloat16>() + b0 * a.m;
      for (int64_t i = 0; i < bs * a.m; ++i) ob[i] = at::BFloat16(yp[i]);
    } else {
      run(xf.data_ptr<float>());
    }
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

// The whole layer on AMX tiles for bf16 activations of more rows than the decode path takes (serving
// batches, prefill), and for fp32 activations from kAmxF32MinRows rows as three bf16 parts a row
// (kernels.h: the parts' rows 3b, 3b + 1, 3b + 2 multiply as rows of their own; the row constant goes
// with hi, and the output stage sums the three products first). Two parallel passes instead of the
// general path's four passes and serial folding:
// (1) over the activation rows: to fp32, input scale, Hadamard, codebook folding and rounding to
// bf16 (or splitting), one row at a time while it is in L1; (2) over the weight rows, in whole output
// Hadamard blocks: the AMX GEMM into an fp32 scratch, then, while those outputs are in cache, the output
// Hadamard, scale, bias (and rounding to bf16) straight into the output. For bf16, per row the same
// operations in the same order as the decode path's AMX branch (so a row's result does not depend on
// the batch); the outputs round to bf16 with vcvtneps2bf16 (denormals flush to zero) instead of at::to.
// With a full-dimension output rotation (a left factor: every output of a row mixes), or fewer output
// blocks than threads, the output stage runs as a third pass over the rows after the GEMM.
static Tensor amx_call(const Tensor& x, int64_t B, const LcArgs& a, int64_t block_in, int64_t block_out) {
  const int64_t n = a.n, m = a.m;
  const bool f32 = x.scalar_type() == at::kFloat;
  const int64_t parts = f32 ? 3 : 1, R = parts * B;  // R rows of bf16 activations multiply
  const Tensor xc = x.is_contiguous() ? x : x.contiguous();
  Tensor out = at::empty(out_shape(x, m), x.options());
  // the call's buffers: [amx_rows_padded(R), n] bf16 activations | [R, m] fp32 products | [R] folding
  // constants (the products start a multiple of 1 KiB in). Serving batches reuse this thread's, 64-byte
  // aligned (the tile loads read 64-byte rows; unaligned, the layer ran ~30% slower at 64 rows): a fresh
  // allocation of a few hundred KiB a call is at the mercy of malloc's trimming and page faults. A
  // prefill's take memory for the call only, so that it does not stay allocated. The workers read and
  // write them through the pointers.
  const int64_t Rp = K::amx_rows_padded(R);
  const size_t words = static_cast<size_t>((Rp * n + 1) / 2 + R * m + R);  // 4-byte words
  constexpr size_t kKeptWords = size_t{1} << 20;                           // 4 MiB
  thread_local std::vector<float> kept;
  Tensor fresh;
  float* buf;
  if (words <= kKeptWords) {
    if (kept.size() < words + 16) kept.resize(words + 16);
    buf = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(kept.data()) + 63) & ~uintptr_t{63});
  } else {
    fresh = at::empty({static_cast<int64_t>(words)}, x.options().dtype(at::kFloat));
    buf = fresh.data_ptr<float>();
  }
  uint16_t* zb = reinterpret_cast<uint16_t*>(buf);
  float* y = buf + (Rp * n + 1) / 2;
  float* c = y + R * m;
  const float *su = a.su.data_ptr<float>(), *sv = a.sv.data_ptr<float>(), *bias = a.bias();
  const float* A = a.A32.data_ptr<float>();
  float beta[4];  // the products multiply centred codes (kernels.h)
  K::centred_beta(A, a.b32.data_ptr<float>(), beta);

  // The input stage of rows [b0, b1): their bf16 activations (parts) in zb and constants in c.
  const auto input_rows = [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> row;  // [n] row | [n] folded row | [n] Hadamard work
    if (row.size() < static_cast<size_t>(3 * n)) row.resize(3 * n);
    float *r = row.data(), *z = r + n, *work = z + n;
    for (int64_t b = b0; b < b1; ++b) {
      uint16_t* zr = zb + parts * b * n;
      float* cr = c + parts * b;
      if (f32) {
        cr[1] = cr[2] = 0.0f;  // the row constant goes with hi
        const float* xb = xc.data_ptr<float>() + b * n;
        if (K::input_stage_f32x3(xb, n, su, block_in, a.Kin, A, beta, zr, cr)) continue;
        input_row(xb, r, n, su, block_in, a.left_in(), a.Kin, work);
      } else {
        const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()) + b * n;
        if (K::input_stage_bf16(xb, n, su, block_in, a.Kin, A, beta, zr, cr)) continue;
        input_row(xb, r, n, su, block_in, a.left_in(), a.Kin, work);
      }
      K::prepare_activations(r, 1, n, A, beta, K::Isa::Scalar, z, cr);
      if (f32)
        K::split_bf16x3(z, n, zr);
      else
        K::round_bf16(z, n, zr);
    }
  };
  if (Rp > R) std::memset(zb + R * n, 0, sizeof(uint16_t) * (Rp - R) * n);

  // The output stage (Hadamard, s_v, bias, and for bf16 the rounding) of outputs [j0, j1) of row b; for
  // bf16 the same arithmetic, in the same order, as decode_rows' (output_row, or the fused stage that
  // computes its bits; so a row's result does not depend on the path). fp32: the parts' products summed
  // hi + (mid + lo) first.
  float* out32 = f32 ? out.data_ptr<float>() : nullptr;
  uint16_t* out16 = f32 ? nullptr : reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const auto finish = [&](int64_t b, int64_t j0, int64_t j1, int64_t block, const float* left, int64_t K,
                          float* work) {
    float* r = y + parts * b * m + j0;
    const float* svj = sv + j0;
    const float* bj = bias ? bias + j0 : nullptr;
    float* of = f32 ? out32 + b * m + j0 : nullptr;     // this row's outputs, fp32
    uint16_t* ob = f32 ? nullptr : out16 + b * m + j0;  // or bf16
    if (f32) {
      if (K::output_stage_f32x3(r, m, j1 - j0, block, K, svj, bj, of)) return;
      for (int64_t j = 0; j < j1 - j0; ++j) r[j] = r[j] + (r[m + j] + r[2 * m + j]);
    } else if (K::output_stage_bf16(r, j1 - j0, block, K, svj, bj, ob)) {
      return;
    }
    output_row(r, j1 - j0, block, left, K, svj, bj, work);
    if (f32)
      std::memcpy(of, r, sizeof(float) * (j1 - j0));
    else
      K::round_bf16(r, j1 - j0, ob);
  };
  // The output stage of whole rows [b0, b1) (any output rotation), after their GEMM.
  const auto finish_rows = [&](int64_t b0, int64_t b1) {
    thread_local std::vector<float> work;  // the left factor's product (hadamard_row)
    if (work.size() < static_cast<size_t>(m)) work.resize(m);
    for (int64_t b = b0; b < b1; ++b) finish(b, 0, m, block_out, a.left_out(), a.Kout, work.data());
  };
  // Fused output stage: a thread's weight rows cover whole output blocks (and whole 16-row tiles),
  // finished while in cache. Only with a block-diagonal output rotation, and with enough blocks to
  // share among the threads (a full-dimension rotation of a power-of-two m is one block of m); else
  // the GEMM splits in 16-row groups and the output stage runs as a pass over the rows after it.
  const int64_t fused_unit = std::max<int64_t>(16, block_out);
  const int64_t threads = at::get_num_threads(), fused_units = (m + fused_unit - 1) / fused_unit;
  // Row-parallel: with several threads and fewer than two output blocks a thread (a k/v projection's 192
  // rows are one and a half blocks of 128: its weight rows split 2:1 on two threads, and the input stage
  // ran as a region of its own), 32 rows and more split by rows instead: each thread runs the whole layer
  // for its rows (input stage, the GEMM over all weight rows, output stage) in one parallel region,
  // decoding the codes once per thread. Two threads, SmolLM2's k/v: 1.1-1.6x at 32-64 rows, 1.65-1.86x at
  // 256; q/o and down (4.5 blocks of 128) did not gain from it (0.9-1.0x), so they keep the weight split.
  // Chunks of 16 rows: every tile load stays inside the thread's own rows (or the zeroed padding). A row's
  // arithmetic is the same either way (the GEMMs' results do not depend on the rows beside it; the output
  // stage runs per block as in the fused one).
  if (threads > 1 && B >= 32 && a.Kout <= 1 && fused_units < 2 * threads) {
    at::parallel_for(0, (B + 15) / 16, 1, [&](int64_t c0, int64_t c1) {
      const int64_t b0 = 16 * c0, b1 = std::min(B, 16 * c1);
      input_rows(b0, b1);
      K::lc_gemm_amx_rows(zb + parts * b0 * n, c + parts * b0, parts * (b1 - b0), n, a.pk.data_ptr<uint8_t>(), 0, m,
                          y + parts * b0 * m, m);
      finish_rows(b0, b1);
    });
    return out;
  }
  at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)), input_rows);
  const bool fused_out = a.Kout <= 1 && fused_units >= threads;
  const int64_t unit = fused_out ? fused_unit : 16;
  // a thread's share: kMinWeightsPerThread weight-row work units, where a 16-row activation tile
  // multiplies the decoded weights once more (at 64 rows a k/v projection, 110K weights, splits)
  const int64_t tiles = (R + 15) / 16;
  at::parallel_for(0, (m + unit - 1) / unit, std::max<int64_t>(1, kMinWeightsPerThread / (unit * n * tiles)),
                   [&](int64_t u0, int64_t u1) {
                     const int64_t j0 = u0 * unit, j1 = std::min(m, u1 * unit);
                     K::lc_gemm_amx_rows(zb, c, R, n, a.pk.data_ptr<uint8_t>(), j0, j1, y, m);
                     if (fused_out)
                       for (int64_t b = 0; b < B; ++b) finish(b, j0, j1, block_out, nullptr, 1, nullptr);
                   });
  if (!fused_out)
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / std::max<int64_t>(m, 1)), finish_rows);
  return out;
}

Tensor lc_linear_cpu(const Tensor& x, const Tensor& packed, const Tensor& A, const Tensor& beta, const Tensor& s_u,
                     const Tensor& s_v, const c10::optional<Tensor>& bias, int64_t block_in,
                     const c10::optional<Tensor>& left_in, int64_t block_out, const c10::optional<Tensor>& left_out) {
  const LcArgs a = check_lc_args("lc_linear", x, packed, A, beta, s_u, s_v, bias, block_in, left_in, block_out, left_out);
  const int64_t B = a.n ? x.numel() / a.n : 0;
  const bool amx = B > 0 && a.n % 32 == 0 && K::has_amx_bf16();
  if (amx && x.scalar_type() == at::kFloat && B >= kAmxF32MinRows) return amx_call(x, B, a, block_in, block_out);
  if (amx && x.scalar_type() == at::kBFloat16 && B >= kAmxMinRows) return amx_call(x, B, a, block_in, block_out);
  if (B >= 1 && B <= K::kMaxGemvBatch) return decode_call(x, B, a, block_in, block_out, false);

  // the general path (more rows than the decode path takes, no AMX): a pass over the rows for each
  // stage, the product between them
  const int64_t n = a.n, m = a.m;
  const float *su = a.su.data_ptr<float>(), *sv = a.sv.data_ptr<float>(), *bs = a.bias();
  const float *Li = a.left_in(), *Lo = a.left_out();
  auto xt = rows_f32(x, n);
  float* xp = xt.data_ptr<float>();
  for_rows(B, n, Li,
           [&](int64_t b, float* work) { input_row(xp + b * n, xp + b * n, n, su, block_in, Li, a.Kin, work); });
  Tensor yt = matmul_rows_f32(xt, a.pk, a.A32, a.b32, x.scalar_type() == at::kBFloat16);
  float* yp = yt.data_ptr<float>();
  for_rows(B, m, Lo,
           [&](int64_t b, float* work) { output_row(yp + b * m, m, block_out, Lo, a.Kout, sv, bs, work); });
  return finish(yt, x, m);
}

// lc_linear with int8 activations (opt-in): every row, whatever the batch, goes through the
// int8-activation GEMV in slices of kMaxGemvBatch rows, so a token's result does not depend on
// how many rows share its call.
Tensor lc_linear_a8_cpu(const Tensor& x, const Tensor& packed, const Tensor& A, const Tensor& beta, const Tensor& s_u,
                        const Tensor& s_v, const c10::optional<Tensor>& bias, int64_t block_in,
                        const c10::optional<Tensor>& left_in, int64_t block_out,
                        const c10::optional<Tensor>& left_out) {
  const LcArgs a =
      check_lc_args("lc_linear_a8", x, packed, A, beta, s_u, s_v, bias, block_in, left_in, block_out, left_out);
  const int64_t B = a.n ? x.numel() / a.n : 0;
  if (B == 0) return at::empty(out_shape(x, a.m), x.options());
  return decode_call(x, B, a, block_in, block_out, true);
}

bool cpu_has_vnni() { return K::has_vnni(); }
bool cpu_has_bf16_dot() { return K::has_bf16_dot(); }
bool cpu_has_int8_a16() { return K::has_int8_a16(); }
bool cpu_has_amx_bf16() { return K::has_amx_bf16(); }
bool cpu_has_amx_int8() { return K::has_amx_int8(); }

// ------------------------------------------------------------------ int8 weight-only linear (compact lm_head)
Tensor int8_linear_cpu(const Tensor& x, const Tensor& w, const Tensor& scale, const c10::optional<Tensor>& bias) {
  check_act_dtype(x, "int8_linear", "x");
  TORCH_CHECK(w.scalar_type() == at::kChar && w.dim() == 2, "lcqat.int8_linear: weight must be int8 [out, in], got ",
              w.scalar_type(), " ", w.sizes());
  const int64_t n = x.size(-1), m = w.size(0);
  TORCH_CHECK(w.size(1) == n, "lcqat.int8_linear: weight ", w.sizes(), " does not match the input dimension ", n);
  check_vec(scale, m, "int8_linear", "scale");
  check_vec(bias, m, "int8_linear", "bias");
  auto wc = w.contiguous();
  auto sc = f32(scale);
  auto x2 = x.reshape({-1, n}).to(at::kFloat).contiguous();
  const int64_t B = x2.size(0);
  auto y = at::empty({B, m}, x2.options());
  const auto isa = K::detect_isa();
  // bf16 activations: 16-bit fixed point and exact integer sums (see kernels.h)
  const bool a16 = x.scalar_type() == at::kBFloat16 && B <= 64 && n <= K::kA16MaxInputs && K::has_int8_a16();
  // AMX-INT8 CPUs: the same integer sums on tiles from 2 rows (amx.cpp; bit-identical outputs).
  // One thread, Llama-3.2-1B's 128256 x 2048 head: 20.9 / 24.1 / 24.1 / 80.8 ms at 2 / 8 / 16 / 64
  // rows where the VNNI GEMV took 30.2 / 53.6 / 89.5 / 306 (and a dense bf16 head 45-83 ms).
  constexpr int64_t kInt8AmxMinRows = 2;
  const bool amx = a16 && B >= kInt8AmxMinRows && n % 64 == 0 && K::has_amx_int8();
  // the 16-bit parts, shared by the AMX tiles and the GEMV (a16: [B, 2, rb] parts, steps, part sums)
  const int64_t rb = K::a16_row_bytes(n);
  thread_local std::vector<int8_t> parts;
  thread_local std::vector<float> steps;
  thread_local std::vector<int32_t> sums;
  if (a16) {
    if (parts.size() < static_cast<size_t>(B * 2 * rb)) parts.resize(B * 2 * rb);
    if (steps.size() < static_cast<size_t>(B)) steps.resize(B), sums.resize(2 * B);
    K::a16_prepare(x2.data_ptr<float>(), B, n, parts.data(), steps.data(), sums.data());
  }
  // this thread's buffers: the workers below read them through these pointers
  const int8_t* hp = parts.data();
  const float* st = steps.data();
  const int32_t* su = sums.data();
  const int8_t* wp = wc.data_ptr<int8_t>();
  const float* sp = sc.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (amx) {
    thread_local std::vector<int8_t> tiles;
    if (tiles.size() < static_cast<size_t>(K::int8_amx_tile_bytes(B, n))) tiles.resize(K::int8_amx_tile_bytes(B, n));
    K::int8_amx_prepare(hp, B, n, tiles.data());
    const int8_t* tp = tiles.data();
    at::parallel_for(0, (m + 15) / 16, std::max<int64_t>(1, (1 << 16) / (16 * n)), [&](int64_t g0, int64_t g1) {
      K::int8_amx_rows(tp, st, B, n, wp, sp, m, 16 * g0, std::min(m, 16 * g1), yp, m);
    });
  } else if (B <= 64) {
    const float* xp = x2.data_ptr<float>();
    // The GEMV takes kMaxGemvBatch activation rows a call. With more, each thread walks its
    // weight rows in tiles of ~128 KiB and runs every batch slice over a tile while it is in L2:
    // the weight streams from DRAM once a call, not once a slice (a 1B model's 263 MB head was
    // read 8 times at 64 rows). Tiles are multiples of 4 rows (the batch-1 GEMVs take 4 a step).
    const int64_t tile = B <= K::kMaxGemvBatch ? m : std::max<int64_t>(4, ((1 << 17) / std::max<int64_t>(n, 1)) / 4 * 4);
    const int64_t grain = std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(n * std::min<int64_t>(B, K::kMaxGemvBatch), 1));
    at::parallel_for(0, m, grain, [&](int64_t j0, int64_t j1) {
      for (int64_t t0 = j0; t0 < j1; t0 += tile) {
        const int64_t t1 = std::min(j1, t0 + tile);
        for (int64_t b0 = 0; b0 < B; b0 += K::kMaxGemvBatch) {
          const int64_t bs = std::min<int64_t>(K::kMaxGemvBatch, B - b0);
          if (a16)
            K::int8_gemv_a16_rows(hp + b0 * 2 * rb, st + b0, su + 2 * b0, bs, n, wp, sp, t0, t1, yp + b0 * m, m);
          else
            K::int8_gemv_rows(xp + b0 * n, bs, n, wp, sp, t0, t1, isa, yp + b0 * m, m);
        }
      }
    });
  } else {  // prefill: dequantize row tiles, at::mm
    const int64_t tr = std::max<int64_t>(256, (1 << 18) / std::max<int64_t>(n, 1));
    for (int64_t j0 = 0; j0 < m; j0 += tr) {
      const int64_t rows = std::min(tr, m - j0);
      auto wt = wc.narrow(0, j0, rows).to(at::kFloat) * sc.narrow(0, j0, rows).unsqueeze(1);
      y.narrow(1, j0, rows).copy_(at::mm(x2, wt.t()));
    }
  }
  if (bias.has_value()) y.add_(f32(*bias));
  return y.to(x.scalar_type()).view(out_shape(x, m));
}

std::string cpu_isa() { return K::isa_name(K::detect_isa()); }

TORCH_LIBRARY(lcqat, m) {
  m.def("hadamard(Tensor x, int block, Tensor? left=None, Tensor? scale_in=None, Tensor? scale_out=None, "
        "bool transpose=False) -> Tensor");
  m.def("lc_matmul(Tensor xt, Tensor packed, Tensor A, Tensor beta) -> Tensor");
  m.def("lc_linear(Tensor x, Tensor packed, Tensor A, Tensor beta, Tensor s_u, Tensor s_v, Tensor? bias, "
        "int block_in, Tensor? left_in, int block_out, Tensor? left_out) -> Tensor");
  m.def("lc_linear_a8(Tensor x, Tensor packed, Tensor A, Tensor beta, Tensor s_u, Tensor s_v, Tensor? bias, "
        "int block_in, Tensor? left_in, int block_out, Tensor? left_out) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  m.def("cpu_has_vnni() -> bool", &cpu_has_vnni);
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("cpu_has_bf16_dot() -> bool", &cpu_has_bf16_dot);
  m.def("cpu_has_int8_a16() -> bool", &cpu_has_int8_a16);
  m.def("cpu_has_amx_bf16() -> bool", &cpu_has_amx_bf16);
  m.def("cpu_has_amx_int8() -> bool", &cpu_has_amx_int8);
}

TORCH_LIBRARY_IMPL(lcqat, CPU, m) {
  m.impl("hadamard", &hadamard_cpu);
  m.impl("lc_matmul", &lc_matmul_cpu);
  m.impl("lc_linear", &lc_linear_cpu);
  m.impl("lc_linear_a8", &lc_linear_a8_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
}

}  // namespace lcqat

// The LC layer's row stages (input: x * s_u, then H_in; output: H_out^T, then * s_v, + bias), one
// statement of their arithmetic for every op that runs them: lcqat_ops.cpp's lc_linear paths and
// hadamard op, and cpu/training_stages.cpp. Compiled into each for the baseline ISA (no FMA).
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "cpu/kernels.h"

namespace lcqat {

// ------------------------------------------------------------------ the row stages
// Around the rotated product, the LC layer is a stage per row on each side: the input stage
// (x * s_u, then H_in) and the output stage (H_out^T, then * s_v, + bias). All three paths of
// lc_linear (decode_rows, amx_call, the general path) run them as input_row and output_row, and the
// hadamard op its rows as rotate_row: one statement of their arithmetic, so a row's stages are the
// same operations in the same order whichever path its batch size picks (the paths differ only in
// the product between the stages, and in how the outputs round to bf16). r * s + b is a product
// rounded, then a sum rounded: their includers are compiled for the baseline ISA, with no FMA to contract
// into, and kernels.cpp's fused AVX-512 stages of the AMX layer (input_stage_*, output_stage_*) keep
// that rounding (bit-identical to these functions, which the AMX layer runs where they do not apply).
// The training stages (cpu/training_stages.cpp) rotate their rows with the same functions.

// An activation element in fp32, exactly (bf16: its bits above 16 zeros).
static inline float widen(float v) { return v; }
static inline float widen(c10::BFloat16 v) { return static_cast<float>(v); }
static inline float widen(uint16_t bf16_bits) {
  const uint32_t u = static_cast<uint32_t>(bf16_bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// One row: r [len] <- H(x * scale_in) * scale_out + add, H = left (x) H_block (left's transpose with
// `transpose`); scale_in, scale_out and add may each be null. x (fp32, or bf16 widened as it is
// read) may be r itself. work: len floats where left is not null (hadamard_row).
template <typename T>
static inline void rotate_row(const T* x, float* r, int64_t len, int64_t block, const float* left, int64_t Kl,
                              bool transpose, const float* scale_in, const float* scale_out, const float* add,
                              float* work) {
  if (scale_in)
    for (int64_t i = 0; i < len; ++i) r[i] = widen(x[i]) * scale_in[i];
  else if (static_cast<const void*>(x) != static_cast<const void*>(r))
    for (int64_t i = 0; i < len; ++i) r[i] = widen(x[i]);
  cpu::hadamard_row(r, len, block, left, Kl, transpose, work);
  if (scale_out && add)
    for (int64_t i = 0; i < len; ++i) r[i] = r[i] * scale_out[i] + add[i];
  else if (scale_out)
    for (int64_t i = 0; i < len; ++i) r[i] *= scale_out[i];
  else if (add)
    for (int64_t i = 0; i < len; ++i) r[i] += add[i];
}

// The LC layer's input stage of one row: r [n] <- H_in(x * s_u).
template <typename T>
static inline void input_row(const T* x, float* r, int64_t n, const float* su, int64_t block, const float* left,
                             int64_t Kl, float* work) {
  rotate_row(x, r, n, block, left, Kl, false, su, nullptr, nullptr, work);
}

// The LC layer's output stage, in place on a row's fp32 products r [len] (the whole row, or whole
// output Hadamard blocks of it with sv, bias offset to match): r <- H_out^T(r) * s_v (+ bias).
static inline void output_row(float* r, int64_t len, int64_t block, const float* left, int64_t Kl, const float* sv,
                              const float* bias, float* work) {
  rotate_row(r, r, len, block, left, Kl, true, nullptr, sv, bias, work);
}

}  // namespace lcqat

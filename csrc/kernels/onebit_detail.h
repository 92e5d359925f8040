// Private: the formulas the CPU and CUDA sign kernels share (host and device code), so both
// round the same way. See autoglm_rt/kernels/onebit.h for the message format and sum order.
//
// Every float32 operation here is rounded once and never contracted into a multiply-add: on the
// device through the _rn intrinsics (which nvcc never fuses), on the host through plain operators
// in sources compiled with -ffp-contract=off (CMakeLists.txt). So the CPU, the CUDA kernels and a
// numpy reference doing the same operations one at a time give the same bits.
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "autoglm_rt/kernels/onebit.h"

#if defined(__CUDACC__)
#define AGRT_ONEBIT_HD __host__ __device__ __forceinline__
#else
#define AGRT_ONEBIT_HD inline
#endif

namespace agrt::kernels::onebit_detail {

AGRT_ONEBIT_HD float add_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

AGRT_ONEBIT_HD float sub_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

AGRT_ONEBIT_HD float mul_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

AGRT_ONEBIT_HD float div_rn(float a, float b) noexcept {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

/// False for NaN and +-Inf (a comparison, so compilers vectorize it).
AGRT_ONEBIT_HD bool is_finite(float v) noexcept {
#if defined(__CUDA_ARCH__)
  return fabsf(v) <= FLT_MAX;
#else
  return std::fabs(v) <= FLT_MAX;
#endif
}

/// A chunk's scale: its float64 sum of |c| divided by its length, rounded once to float32.
AGRT_ONEBIT_HD float chunk_scale(double sum, std::int64_t len) noexcept {
#if defined(__CUDA_ARCH__)
  return __double2float_rn(__ddiv_rn(sum, static_cast<double>(len)));
#else
  return static_cast<float>(sum / static_cast<double>(len));
#endif
}

/// The value a set or clear bit decodes to.
AGRT_ONEBIT_HD float decoded(bool bit, float scale) noexcept { return bit ? scale : -scale; }

/// The bit of c: set iff c >= 0 (so -0.0 sets it and NaN clears it).
AGRT_ONEBIT_HD bool sign_bit(float c) noexcept { return c >= 0.0f; }

/// What error feedback keeps of c once it is sent as a bit with scale s: c - d.
AGRT_ONEBIT_HD float error_after(float c, bool bit, float scale) noexcept { return sub_rn(c, decoded(bit, scale)); }

/// 1-bit Adam's coefficients as float32, the way torch applies Python scalars to float32 tensors:
/// beta1 rounded, and 1 - beta1 computed in float64, then rounded.
struct AdamCoefficients {
  float beta1;
  float one_minus_beta1;
};

inline AdamCoefficients adam_coefficients(double beta1) noexcept {
  return {static_cast<float>(beta1), static_cast<float>(1.0 - beta1)};
}

/// The momentum 1-bit Adam sends, plus the error fed back:
///   p = g / denom;  m = beta1 * u + (1 - beta1) * p;  c = m + e
/// each operation in float32, rounded once, no FMA.
AGRT_ONEBIT_HD float adam_momentum(float g, float denom, float u, float e, AdamCoefficients k) noexcept {
  const float p = div_rn(g, denom);
  const float m = add_rn(mul_rn(k.beta1, u), mul_rn(k.one_minus_beta1, p));
  return add_rn(m, e);
}

/// The average sign_decompress writes for acc = 0 + d_0 + ... + d_(W-1).
AGRT_ONEBIT_HD float averaged(float acc, float scale) noexcept { return mul_rn(scale, acc); }

/// 1-bit Adam's momentum after the exchange: the average where it is finite, else the old u
/// (a select, stored unconditionally, so the CPU loop vectorizes).
AGRT_ONEBIT_HD float kept_momentum(float avg, float u) noexcept { return is_finite(avg) ? avg : u; }

}  // namespace agrt::kernels::onebit_detail

// Private: the formulas the CPU and CUDA sign kernels share (host and device code), so both
// round the same way. See autoglm_rt/kernels/onebit.h for the message format and sum order.
#pragma once

#include <cstdint>

#include "autoglm_rt/kernels/onebit.h"

#if defined(__CUDACC__)
#define AGRT_ONEBIT_HD __host__ __device__ __forceinline__
#else
#define AGRT_ONEBIT_HD inline
#endif

namespace agrt::kernels::onebit_detail {

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

}  // namespace agrt::kernels::onebit_detail

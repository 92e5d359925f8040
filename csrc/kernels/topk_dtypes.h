// Private: element access by storage type and the magnitude key of the top-k kernels, shared by
// the CPU and CUDA twins (host and device code), so both round and rank with the same formulas.
// float16/bfloat16 are stored as their raw 16 bits; conversions round to nearest even on both.
#pragma once

#include <cstdint>

#include "autoglm_rt/detail/half.h"
#include "autoglm_rt/kernels/topk.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define AGRT_TOPK_HD __host__ __device__ __forceinline__
#else
#define AGRT_TOPK_HD inline
#endif

namespace agrt::kernels::topk_detail {

struct F32 {
  using Storage = float;
  AGRT_TOPK_HD static float load(float v) noexcept { return v; }
  AGRT_TOPK_HD static float store(float f) noexcept { return f; }
};

struct F16 {
  using Storage = std::uint16_t;
  AGRT_TOPK_HD static float load(std::uint16_t v) noexcept {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(v));
#else
    return detail::fp16_to_float(v);
#endif
  }
  AGRT_TOPK_HD static std::uint16_t store(float f) noexcept {
#if defined(__CUDA_ARCH__)
    return __half_as_ushort(__float2half_rn(f));
#else
    return detail::float_to_fp16(f);
#endif
  }
};

struct BF16 {
  using Storage = std::uint16_t;
  AGRT_TOPK_HD static float load(std::uint16_t v) noexcept {
#if defined(__CUDA_ARCH__)
    return __bfloat162float(__ushort_as_bfloat16(v));
#else
    return detail::bf16_to_float(v);
#endif
  }
  AGRT_TOPK_HD static std::uint16_t store(float f) noexcept {
#if defined(__CUDA_ARCH__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    return detail::float_to_bf16(f);
#endif
  }
};

/// The ranking key: the magnitude bits (sign dropped), every NaN mapped to kTopkNanKey (above
/// +Inf), so unsigned comparison of keys orders |x| with NaN first.
AGRT_TOPK_HD std::uint32_t magnitude_key(float f) noexcept {
#if defined(__CUDA_ARCH__)
  const std::uint32_t bits = __float_as_uint(f) & 0x7fffffffu;
#else
  const std::uint32_t bits = detail::float_to_bits(f) & 0x7fffffffu;
#endif
  return bits < kTopkNanKey ? bits : kTopkNanKey;
}

}  // namespace agrt::kernels::topk_detail

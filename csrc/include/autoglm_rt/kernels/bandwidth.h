// Memory-bandwidth probes: the yardstick kernel figures are stated against.
#pragma once

#include <cstdint>

#include "autoglm_rt/tensor_view.h"

namespace agrt::kernels {

/// Reads every byte of `src` (CPU) on all threads, with the widest loads the CPU offers, and
/// returns the sum of its 8-byte words (mod 2^64) plus its trailing bytes, so the read cannot be
/// optimised away and the result is checkable.
std::uint64_t read_checksum(const TensorView& src);

/// Copies src into dst (CPU, same byte size) on all threads.
void parallel_copy(const TensorView& dst, const TensorView& src);

}  // namespace agrt::kernels

// Memory-bandwidth probes: the yardstick kernel figures are stated against.
#pragma once

#include <cstdint>

#include "autoglm_rt/tensor_view.h"

namespace agrt::kernels {

/// Reads every byte of `src` (CPU) on all threads and returns a checksum (so the read cannot be
/// optimised away). Bytes past the last whole 8-byte word are included.
std::uint64_t read_checksum(const TensorView& src);

/// Copies src into dst (CPU, same byte size) on all threads.
void parallel_copy(const TensorView& dst, const TensorView& src);

}  // namespace agrt::kernels

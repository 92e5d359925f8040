// Internal, CUDA-free: the counters of the kernels' stream-ordered scratch memory
// (agrt::cuda::Scratch in core/cuda/helpers.h), readable from the bindings without CUDA headers.
#pragma once

#include <cstddef>
#include <cstdint>

namespace agrt::cuda {

struct ScratchStats {
  std::size_t live_bytes = 0;   // scratch allocated and not yet freed (on its stream)
  std::size_t peak_bytes = 0;   // highest live_bytes since the process started
  std::uint64_t allocations = 0;
  std::size_t keep_bytes = 0;   // release threshold set on each device's default memory pool
};

#ifdef AGRT_WITH_CUDA
/// Process-wide totals over all devices; thread-safe.
ScratchStats scratch_stats();
#endif

}  // namespace agrt::cuda

// Fused gradient statistics: one pass over a list of tensors gives, per tensor and merged over
// all of them, the element count, non-finite count, sum, sum of squares, max |x|, mean and
// population variance (sums, max and variance over the finite elements only).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "autoglm_rt/tensor_view.h"

namespace agrt::kernels {

/// Columns of one row of grad_stats' output; every value is a float64 (counts are exact up to
/// 2^53). mean and var are NaN for a tensor without finite elements; maxabs is 0 there.
enum GradStatsField : int {
  kStatNumel = 0,      // all elements
  kStatNonfinite = 1,  // NaN, +Inf, -Inf
  kStatSum = 2,
  kStatSumsq = 3,
  kStatMaxabs = 4,
  kStatMean = 5,
  kStatVar = 6,        // population variance (M2 / finite count)
  kStatM2 = 7,         // sum of squared deviations from the mean (Welford's M2)
};
inline constexpr int kGradStatsFields = 8;

/// Bytes of device workspace grad_stats needs for these tensors (0 for CPU tensors). The
/// workspace holds per-chunk partial results; its contents are scratch.
std::size_t grad_stats_workspace_bytes(const std::vector<TensorView>& tensors);

/// Computes the statistics of every tensor in one pass over memory and writes
/// (tensors.size() + 1) rows of kGradStatsFields float64 values to `out`: row i for tensors[i],
/// the last row merged over all tensors (Chan's parallel merge of Welford moments).
///
/// `tensors`: float32, float16 or bfloat16, all on one device, any sizes including 0.
/// `out`: on the same device, int64 dtype used as raw 8-byte words (the core's TensorView has no
/// float64), exactly (tensors.size() + 1) * kGradStatsFields elements, writable.
/// `workspace`: for CUDA tensors, at least grad_stats_workspace_bytes(tensors) bytes on the same
/// device (any dtype); ignored on the CPU.
///
/// Guarantees: accumulation in float64 in a fixed order that depends only on the tensor sizes, so
/// results are bit-identical for any thread count (and, on CUDA, from run to run: no float
/// atomics). CPU: multi-threaded, AVX2 when the CPU has it. CUDA: runs on tensors[0].stream (or
/// out.stream for an empty list), enqueues a few kernels and returns without synchronizing the
/// host; `out` is ready when that stream reaches this point.
/// Throws TypeError (dtype) or ValueError (mixed devices, wrong out/workspace size or device).
void grad_stats(const std::vector<TensorView>& tensors, const TensorView& out, const TensorView& workspace);

}  // namespace agrt::kernels

// Fused gradient accumulation: dst[i] += src[i] and the sum of squares of every src element in one
// pass over memory. The noise-scale estimator needs each micro-batch gradient's squared norm, and
// reading the gradients a second time for it cost more than the addition itself.
#pragma once

#include <vector>

#include "autoglm_rt/tensor_view.h"

namespace agrt::kernels {

/// Adds src[i] into dst[i] element by element (float32, one rounding per element, as torch.add)
/// and returns the sum of squares of every src element, accumulated in float64 in an order that
/// depends only on the sizes (the same bits for any thread count).
///
/// `dst` is empty (only the sum of squares is computed) or as long as `src`, with
/// dst[i].numel == src[i].numel. All tensors are float32, on the CPU; dst's are writable. NaN and
/// Inf propagate into dst and into the result as the plain arithmetic does.
/// Throws TypeError (dtype, device) or ValueError (lengths, sizes, read-only dst) before writing.
double add_sumsq(const std::vector<TensorView>& dst, const std::vector<TensorView>& src);

}  // namespace agrt::kernels

// Private: the CUDA half of grad_stats (csrc/kernels/cuda/grad_stats.cu), present when CUDA is built.
#pragma once

#include <cstddef>
#include <vector>

#include "autoglm_rt/tensor_view.h"

namespace agrt::kernels::detail {
#ifdef AGRT_WITH_CUDA
std::size_t grad_stats_cuda_workspace_bytes(const std::vector<TensorView>& tensors);
void grad_stats_cuda(const std::vector<TensorView>& tensors, const TensorView& out, const TensorView& workspace);
#endif
}  // namespace agrt::kernels::detail

// Internal: the CUDA half of build_info(), defined in core/cuda/cuda_info.cpp when CUDA is built.
#pragma once

#include "autoglm_rt/build_info.h"

namespace agrt::detail {
#ifdef AGRT_WITH_CUDA
void fill_cuda_info(BuildInfo& info);
#endif
}  // namespace agrt::detail

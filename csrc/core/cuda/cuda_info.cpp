#include <cuda_runtime_api.h>

#include <string>

#include "core/cuda_info.h"

namespace agrt::detail {

void fill_cuda_info(BuildInfo& info) {
  info.cuda_compiled = true;
  info.cuda_archs = AGRT_CUDA_ARCHS;
  int rt = 0;
  if (cudaRuntimeGetVersion(&rt) == cudaSuccess) {
    info.cuda_runtime_version = std::to_string(rt / 1000) + "." + std::to_string((rt % 1000) / 10);
  }
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    info.cuda_device_count = 0;
    info.cuda_unavailable_reason = std::string("the CUDA runtime reports no usable device (") +
                                   cudaGetErrorName(err) + ": " + cudaGetErrorString(err) + ")";
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
  } else if (count == 0) {
    info.cuda_unavailable_reason = "the CUDA runtime found no GPU on this machine";
  } else {
    info.cuda_device_count = count;
  }
}

}  // namespace agrt::detail

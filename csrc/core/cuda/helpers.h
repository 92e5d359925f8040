// The CUDA helpers every CUDA source uses, defined once (issue 13 item 6): the error check, the
// device guard and the kernels' scratch memory. Internal: CUDA headers never reach public headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <string>

#include "autoglm_rt/error.h"

namespace agrt::cuda {

/// "cudaErrorName: description" of a CUDA runtime error.
std::string error_text(cudaError_t err);

/// Throws agrt::RuntimeError "<expr> failed: <error text> [file:line]" after clearing the runtime's
/// last-error slot (so a later launch check does not report this error a second time).
[[noreturn]] void throw_error(cudaError_t err, const char* expr, const char* file, int line);

/// Makes `device` current for the scope. A thread where no context is current on entry (a fresh
/// thread: cudaGetDevice then answers 0 without a context behind it, and driver calls such as the
/// VMM ones do not create one) gets the device's primary context and keeps it afterwards: restoring
/// "device 0" there would create a context on a GPU the thread never used. Where a context was
/// current on entry, exactly that context is current again on exit. Throws agrt::RuntimeError when
/// the device cannot be made current; the destructor never throws.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  void* prev_context_ = nullptr;  // CUcontext current on entry; nullptr: none, nothing to restore
  int prev_device_ = -1;          // the runtime's device on entry (used without the driver entry points)
};

/// Stream-ordered scratch memory for a kernel launch: cudaMallocAsync from the device's default
/// memory pool, returned with cudaFreeAsync on the same stream. The first use on a device raises
/// that pool's release threshold to kScratchKeepBytes, so up to that much freed scratch stays mapped
/// across synchronisations instead of being unmapped and mapped again at every one (the default
/// threshold is 0). Live and peak bytes are counted (scratch_stats(), core/scratch_stats.h).
/// Call release() at the end of the normal path to see a failing free; the destructor frees what
/// an exception left behind and never throws.
class Scratch {
 public:
  static constexpr std::size_t kScratchKeepBytes = std::size_t{64} << 20;

  Scratch(std::size_t bytes, cudaStream_t stream, int device);
  ~Scratch();
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  void* data() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  /// Frees the memory on its stream now; throws agrt::RuntimeError if the runtime refuses.
  void release();

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
  cudaStream_t stream_ = nullptr;
};

}  // namespace agrt::cuda

/// AGRT_CUDA_CHECK(expr): evaluates a CUDA runtime call once and throws agrt::RuntimeError naming
/// the call, the error and file:line when it did not return cudaSuccess. Never swallows an error.
#define AGRT_CUDA_CHECK(expr)                                                                  \
  do {                                                                                         \
    const cudaError_t agrt_cuda_err_ = (expr);                                                 \
    if (agrt_cuda_err_ != cudaSuccess) ::agrt::cuda::throw_error(agrt_cuda_err_, #expr, __FILE__, __LINE__); \
  } while (0)

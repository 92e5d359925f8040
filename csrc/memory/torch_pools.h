// Internal: the per-device pools behind the extern "C" entry points that
// torch.cuda.memory.CUDAPluggableAllocator loads (agrt_torch_malloc / agrt_torch_free).
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <string>

#include "autoglm_rt/memory/caching_pool.h"

namespace agrt::memory {
#ifdef AGRT_WITH_CUDA
/// The pool torch allocates from on `device`, created on first use with the default limit.
/// Throws agrt::RuntimeError when the device is not usable.
std::shared_ptr<CachingPool> torch_device_pool(int device);
/// Limit applied to pools created from now on and to the existing ones.
void set_torch_pools_limit(std::size_t bytes);
/// Names of the entry points, for CUDAPluggableAllocator(path, malloc_name, free_name).
const char* torch_malloc_symbol();
const char* torch_free_symbol();

/// What agrt_torch_malloc throws when the pool is out of memory: a std::bad_alloc (so torch's
/// error translation can raise MemoryError) whose what() is the pool's OutOfMemoryError message.
class TorchOutOfMemory : public std::bad_alloc {
 public:
  explicit TorchOutOfMemory(std::string message);
  const char* what() const noexcept override;

 private:
  std::string message_;
};
#endif
}  // namespace agrt::memory

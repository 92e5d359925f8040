// The extern "C" entry points torch.cuda.memory.CUDAPluggableAllocator loads from the _C module:
//   void* agrt_torch_malloc(size_t size, int device, cudaStream_t stream);
//   void  agrt_torch_free(void* ptr, size_t size, int device, cudaStream_t stream);
// (torch's MallocFuncType / FreeFuncType; torch documents ssize_t, the same ABI.)
// Exported with default visibility although pybind11 builds the module with hidden visibility.
//
// Failure: torch does not check the pointer malloc returns (CUDAPluggableAllocator::malloc stores
// it and wraps it in a DataPtr), so a nullptr for size > 0 becomes a tensor at address 0 and the
// first kernel on it faults, which kills the CUDA context of the whole process. So malloc never
// returns nullptr for size > 0: it throws, as RMM's torch allocator does. An out-of-memory throws
// a std::bad_alloc whose what() carries the pool's message ("... out of memory ..." with limit and
// state): torch's error translation turns it into a Python MemoryError (pybind11's mapping) or a
// RuntimeError with that text, both recognised by autoglm_rt.policy.batch.is_out_of_memory.
// free never throws (torch calls it from deleters); a failure is printed and the block leaks.
//
// The pools are deliberately leaked: torch may free tensors during interpreter teardown, after
// static destructors would have run, and destroying a pool after the CUDA runtime unloaded would
// call into a dead runtime. The driver reclaims everything at process exit.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "autoglm_rt/error.h"
#include "autoglm_rt/memory/caching_pool.h"
#include "memory/torch_pools.h"

namespace agrt::memory {
namespace {
std::mutex g_mu;
// Leaked on purpose (see the top of the file): never destroyed, so valid until the process ends.
std::vector<std::shared_ptr<CachingPool>>& g_pools = *new std::vector<std::shared_ptr<CachingPool>>();
std::size_t g_limit = kNoLimit;
}  // namespace

TorchOutOfMemory::TorchOutOfMemory(std::string message) : message_(std::move(message)) {}
const char* TorchOutOfMemory::what() const noexcept { return message_.c_str(); }

std::shared_ptr<CachingPool> torch_device_pool(int device) {
  std::lock_guard<std::mutex> lock(g_mu);
  AGRT_EXPECTS(device >= 0 && device < 1024, ValueError, "torch_pool: device must be a CUDA device index, got ", device);
  if (g_pools.size() <= static_cast<std::size_t>(device)) g_pools.resize(device + 1);
  auto& p = g_pools[device];
  if (!p) {
    PoolOptions o;
    o.limit = g_limit;
    o.arena_reserve = std::size_t{256} << 30;  // address space only; the limit bounds memory
    p = std::make_shared<CachingPool>(make_cuda_upstream(device, /*expandable=*/true), o);
  }
  return p;
}

void set_torch_pools_limit(std::size_t bytes) {
  std::vector<std::shared_ptr<CachingPool>> pools;
  {
    std::lock_guard<std::mutex> lock(g_mu);
    g_limit = bytes;
    pools = g_pools;
  }
  for (auto& p : pools)
    if (p) p->set_limit(bytes);
}

const char* torch_malloc_symbol() { return "agrt_torch_malloc"; }
const char* torch_free_symbol() { return "agrt_torch_free"; }

}  // namespace agrt::memory

extern "C" __attribute__((visibility("default"))) void* agrt_torch_malloc(std::size_t size, int device,
                                                                         cudaStream_t stream) {
  if (size == 0) return nullptr;  // torch's own allocators give size-0 tensors no memory either
  try {
    return agrt::memory::torch_device_pool(device)->allocate(size, reinterpret_cast<std::uintptr_t>(stream));
  } catch (const agrt::memory::OutOfMemoryError& e) {
    throw agrt::memory::TorchOutOfMemory(e.what());
  }
  // Any other exception (no usable device, a driver error) propagates as it is: never nullptr.
}

extern "C" __attribute__((visibility("default"))) void agrt_torch_free(void* ptr, std::size_t size, int device,
                                                                      cudaStream_t stream) {
  if (!ptr) return;
  try {
    agrt::memory::torch_device_pool(device)->deallocate(ptr, reinterpret_cast<std::uintptr_t>(stream));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "autoglm_rt: torch free of %p (%zu bytes) on cuda:%d failed: %s\n", ptr, size, device,
                 e.what());
  }
}

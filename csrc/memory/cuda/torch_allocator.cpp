// The extern "C" entry points torch.cuda.memory.CUDAPluggableAllocator loads from the _C module:
//   void* agrt_torch_malloc(size_t size, int device, cudaStream_t stream);
//   void  agrt_torch_free(void* ptr, size_t size, int device, cudaStream_t stream);
// Exported with default visibility although pybind11 builds the module with hidden visibility.
// Exceptions never cross the C boundary: an out-of-memory returns nullptr (torch then raises)
// after printing the pool's message, which names the limit and the pool's state.
#include <cuda_runtime_api.h>

#include <cstdio>
#include <mutex>
#include <vector>

#include "autoglm_rt/error.h"
#include "autoglm_rt/memory/caching_pool.h"
#include "memory/torch_pools.h"

namespace agrt::memory {
namespace {
std::mutex g_mu;
std::vector<std::shared_ptr<CachingPool>> g_pools;
std::size_t g_limit = kNoLimit;
}  // namespace

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
  if (size == 0) return nullptr;
  try {
    return agrt::memory::torch_device_pool(device)->allocate(size, reinterpret_cast<std::uintptr_t>(stream));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "autoglm_rt: torch allocation of %zu bytes on cuda:%d failed: %s\n", size, device, e.what());
    return nullptr;
  }
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

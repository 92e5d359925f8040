// The shared CUDA helpers of core/cuda/helpers.h.
#include "core/cuda/helpers.h"

#include <cuda.h>  // driver types only: the two context calls come from the entry-point query

#include <atomic>
#include <mutex>
#include <vector>

#include "core/scratch_stats.h"

namespace agrt::cuda {
namespace {

// cuCtxGetCurrent / cuCtxSetCurrent through the runtime's entry-point query, so libcuda is never
// linked (the module still imports where no driver exists). Null when the driver lacks them.
struct ContextApi {
  decltype(&::cuCtxGetCurrent) get = nullptr;
  decltype(&::cuCtxSetCurrent) set = nullptr;
};

template <typename Fn>
Fn entry_point(const char* name) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status{};
  if (cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &status) != cudaSuccess ||
      status != cudaDriverEntryPointSuccess) {
    cudaGetLastError();  // an old driver: the guard falls back to device indices
    return nullptr;
  }
  return reinterpret_cast<Fn>(p);
}

const ContextApi& context_api() {
  static const ContextApi api = [] {
    ContextApi a;
    a.get = entry_point<decltype(a.get)>("cuCtxGetCurrent");
    a.set = entry_point<decltype(a.set)>("cuCtxSetCurrent");
    if (!a.get || !a.set) a = ContextApi{};
    return a;
  }();
  return api;
}

std::atomic<std::size_t> g_live{0}, g_peak{0};
std::atomic<std::uint64_t> g_allocations{0};

// Raises the default memory pool's release threshold of `device`, once per device.
void keep_scratch_mapped(int device) {
  static std::mutex mu;
  static std::vector<bool> done;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) return;
  if (done.size() <= static_cast<std::size_t>(device)) done.resize(static_cast<std::size_t>(device) + 1, false);
  if (done[static_cast<std::size_t>(device)]) return;
  cudaMemPool_t pool = nullptr;
  AGRT_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  cuuint64_t keep = Scratch::kScratchKeepBytes;
  AGRT_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
  done[static_cast<std::size_t>(device)] = true;
}

}  // namespace

std::string error_text(cudaError_t err) { return std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err); }

void throw_error(cudaError_t err, const char* expr, const char* file, int line) {
  cudaGetLastError();
  throw RuntimeError(detail::concat(expr, " failed: ", error_text(err), " [", file, ":", line, "]"));
}

DeviceGuard::DeviceGuard(int device) {
  const ContextApi& api = context_api();
  if (api.get) {
    CUcontext ctx = nullptr;
    if (api.get(&ctx) == CUDA_SUCCESS) prev_context_ = ctx;
    int current = -1;
    // With a context current on the right device already, there is nothing to do.
    if (prev_context_ && cudaGetDevice(&current) == cudaSuccess && current == device) {
      prev_context_ = nullptr;
      return;
    }
  } else {
    // Without the driver's answer: restore the device index if it changes, and still call
    // cudaSetDevice (it makes the primary context current, which a fresh thread needs).
    AGRT_CUDA_CHECK(cudaGetDevice(&prev_device_));
    if (prev_device_ == device) prev_device_ = -1;
  }
  AGRT_CUDA_CHECK(cudaSetDevice(device));
}

DeviceGuard::~DeviceGuard() {
  if (prev_context_) {
    context_api().set(static_cast<CUcontext>(prev_context_));
  } else if (prev_device_ >= 0) {
    cudaSetDevice(prev_device_);
  }
}

Scratch::Scratch(std::size_t bytes, cudaStream_t stream, int device) : bytes_(bytes), stream_(stream) {
  if (bytes == 0) return;
  keep_scratch_mapped(device);
  AGRT_CUDA_CHECK(cudaMallocAsync(&ptr_, bytes, stream));
  const std::size_t live = g_live.fetch_add(bytes) + bytes;
  std::size_t peak = g_peak.load();
  while (live > peak && !g_peak.compare_exchange_weak(peak, live)) {
  }
  ++g_allocations;
}

void Scratch::release() {
  if (!ptr_) return;
  void* p = ptr_;
  ptr_ = nullptr;
  g_live.fetch_sub(bytes_);
  AGRT_CUDA_CHECK(cudaFreeAsync(p, stream_));
}

Scratch::~Scratch() {
  if (!ptr_) return;
  g_live.fetch_sub(bytes_);
  // An exception is already on its way (a failed launch); a failing free cannot add to it.
  if (cudaFreeAsync(ptr_, stream_) != cudaSuccess) cudaGetLastError();
}

ScratchStats scratch_stats() {
  ScratchStats s;
  s.live_bytes = g_live.load();
  s.peak_bytes = g_peak.load();
  s.allocations = g_allocations.load();
  s.keep_bytes = Scratch::kScratchKeepBytes;
  return s;
}

}  // namespace agrt::cuda

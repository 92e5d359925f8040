// CUDA upstreams: cudaMalloc segments, or arenas on the driver's virtual memory management
// (cuMemAddressReserve / cuMemCreate / cuMemMap), reached through
// cudaGetDriverEntryPointByVersion so that the module never links libcuda and still imports
// where no driver exists. Events (cudaEventDisableTiming) guard cross-stream reuse.
#include <cuda.h>  // driver types and prototypes only; the functions come from the entry-point query
#include <cuda_runtime_api.h>

#include <cstdio>
#include <mutex>
#include <string>
#include <unordered_map>

#include "autoglm_rt/error.h"
#include "autoglm_rt/memory/upstream.h"
#include "core/cuda/helpers.h"

namespace agrt::memory {
namespace {

using cuda::DeviceGuard;

// The upstream's noexcept calls (deallocate, release, unmap) cannot throw: a device that cannot
// even be made current any more is reported on stderr, and the memory is lost with it.
template <typename Fn>
void never_throw(const char* what, Fn&& fn) noexcept {
  try {
    fn();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "autoglm_rt: cuda upstream: %s failed: %s\n", what, e.what());
  }
}

struct DriverApi {
  decltype(&::cuMemCreate) mem_create = nullptr;
  decltype(&::cuMemRelease) mem_release = nullptr;
  decltype(&::cuMemAddressReserve) address_reserve = nullptr;
  decltype(&::cuMemAddressFree) address_free = nullptr;
  decltype(&::cuMemMap) mem_map = nullptr;
  decltype(&::cuMemUnmap) mem_unmap = nullptr;
  decltype(&::cuMemSetAccess) set_access = nullptr;
  decltype(&::cuMemGetAllocationGranularity) granularity = nullptr;
  decltype(&::cuDeviceGet) device_get = nullptr;
  decltype(&::cuDeviceGetAttribute) device_attribute = nullptr;
  std::string missing;  // "" when every entry point was found
};

template <typename Fn>
void load_entry(const char* name, Fn& fn, std::string& missing) {
  void* p = nullptr;
  cudaDriverEntryPointQueryResult status{};
  const cudaError_t e = cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &status);
  if (e != cudaSuccess || status != cudaDriverEntryPointSuccess || !p) {
    cudaGetLastError();
    missing += missing.empty() ? name : std::string(", ") + name;
    return;
  }
  fn = reinterpret_cast<Fn>(p);
}

const DriverApi& driver() {
  static const DriverApi api = [] {
    DriverApi a;
    load_entry("cuMemCreate", a.mem_create, a.missing);
    load_entry("cuMemRelease", a.mem_release, a.missing);
    load_entry("cuMemAddressReserve", a.address_reserve, a.missing);
    load_entry("cuMemAddressFree", a.address_free, a.missing);
    load_entry("cuMemMap", a.mem_map, a.missing);
    load_entry("cuMemUnmap", a.mem_unmap, a.missing);
    load_entry("cuMemSetAccess", a.set_access, a.missing);
    load_entry("cuMemGetAllocationGranularity", a.granularity, a.missing);
    load_entry("cuDeviceGet", a.device_get, a.missing);
    load_entry("cuDeviceGetAttribute", a.device_attribute, a.missing);
    return a;
  }();
  return api;
}

class CudaUpstream final : public Upstream {
 public:
  CudaUpstream(int device, bool want_vmm) : device_(device), want_vmm_(want_vmm) {
    if (!want_vmm) return;
    const DriverApi& api = driver();
    if (!api.missing.empty()) {
      fallback_reason_ = "the driver lacks " + api.missing;
      return;
    }
    {
      DeviceGuard guard(device);  // makes the primary context current: the driver calls need one
      AGRT_CUDA_CHECK(cudaFree(nullptr));
    }
    CUdevice dev = 0;
    int supported = 0;
    if (api.device_get(&dev, device) != CUDA_SUCCESS ||
        api.device_attribute(&supported, CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED, dev) != CUDA_SUCCESS ||
        !supported) {
      fallback_reason_ = "the device does not support virtual memory management";
      return;
    }
    prop_.type = CU_MEM_ALLOCATION_TYPE_PINNED;
    prop_.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
    prop_.location.id = device;
    std::size_t g = 0;
    if (api.granularity(&g, &prop_, CU_MEM_ALLOC_GRANULARITY_MINIMUM) != CUDA_SUCCESS || g == 0) {
      fallback_reason_ = "cuMemGetAllocationGranularity failed";
      return;
    }
    granularity_ = g;
    fallback_reason_ = probe_vmm();
    vmm_ = fallback_reason_.empty();
  }

  std::string device() const override { return "cuda:" + std::to_string(device_); }
  std::string name() const override { return vmm_ ? "cuda-vmm" : "cuda-malloc"; }
  std::string fallback_reason() const override { return want_vmm_ ? fallback_reason_ : std::string(); }

  void* allocate(std::size_t bytes) override {
    DeviceGuard guard(device_);
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, bytes);
    if (e == cudaErrorMemoryAllocation) {
      cudaGetLastError();
      return nullptr;
    }
    AGRT_CUDA_CHECK(e);
    return p;
  }
  void deallocate(void* ptr, std::size_t) noexcept override {
    never_throw("cudaFree", [&] {
      DeviceGuard guard(device_);
      AGRT_CUDA_CHECK(cudaFree(ptr));
    });
  }

  bool supports_expansion() const override { return vmm_; }
  std::size_t granularity() const override { return vmm_ ? granularity_ : 0; }

  // The driver calls below run with this upstream's device current (its primary context), as
  // torch's expandable segments and RMM do: the caller's thread may have another device current,
  // or none at all (a fresh thread), and the pool is used from any thread.
  void* reserve(std::size_t bytes) override {
    DeviceGuard guard(device_);
    CUdeviceptr p = 0;
    if (driver().address_reserve(&p, bytes, granularity_, 0, 0) != CUDA_SUCCESS) return nullptr;
    return reinterpret_cast<void*>(p);
  }
  void release(void* base, std::size_t bytes) noexcept override {
    never_throw("cuMemAddressFree", [&] {
      DeviceGuard guard(device_);
      driver().address_free(reinterpret_cast<CUdeviceptr>(base), bytes);
    });
  }

  // One physical handle per granule, so any granule-aligned tail can be unmapped later.
  bool map(void* addr, std::size_t bytes) override {
    DeviceGuard guard(device_);
    const DriverApi& api = driver();
    const auto base = reinterpret_cast<CUdeviceptr>(addr);
    std::size_t done = 0;
    for (; done < bytes; done += granularity_) {
      CUmemGenericAllocationHandle h{};
      const CUresult r = api.mem_create(&h, granularity_, &prop_, 0);
      if (r == CUDA_ERROR_OUT_OF_MEMORY) break;
      if (r != CUDA_SUCCESS) {
        unmap(addr, done);
        AGRT_FAIL(RuntimeError, "cuMemCreate failed with CUresult ", static_cast<int>(r));
      }
      if (api.mem_map(base + done, granularity_, 0, h, 0) != CUDA_SUCCESS) {
        api.mem_release(h);
        unmap(addr, done);
        AGRT_FAIL(RuntimeError, "cuMemMap failed");
      }
      std::lock_guard<std::mutex> lock(mu_);
      handles_[base + done] = h;
    }
    if (done < bytes) {
      unmap(addr, done);
      return false;
    }
    CUmemAccessDesc access{};
    access.location = prop_.location;
    access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
    if (api.set_access(base, bytes, &access, 1) != CUDA_SUCCESS) {
      unmap(addr, bytes);
      AGRT_FAIL(RuntimeError, "cuMemSetAccess failed");
    }
    return true;
  }
  // The caller (CachingPool) has waited for the block's stream first: unlike cudaFree, cuMemUnmap
  // and cuMemRelease do not synchronise with work that may still use the memory.
  void unmap(void* addr, std::size_t bytes) noexcept override {
    never_throw("cuMemUnmap", [&] {
      DeviceGuard guard(device_);
      const DriverApi& api = driver();
      const auto base = reinterpret_cast<CUdeviceptr>(addr);
      std::lock_guard<std::mutex> lock(mu_);
      for (std::size_t off = 0; off < bytes; off += granularity_) {
        auto it = handles_.find(base + off);
        if (it == handles_.end()) continue;
        api.mem_unmap(base + off, granularity_);
        api.mem_release(it->second);
        handles_.erase(it);
      }
    });
  }

  bool has_events() const override { return true; }
  EventHandle record_event(std::uintptr_t stream) override {
    DeviceGuard guard(device_);
    cudaEvent_t ev = nullptr;
    AGRT_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    AGRT_CUDA_CHECK(cudaEventRecord(ev, reinterpret_cast<cudaStream_t>(stream)));
    return ev;
  }
  bool event_done(EventHandle ev) override {
    const cudaError_t e = cudaEventQuery(static_cast<cudaEvent_t>(ev));
    if (e == cudaSuccess) return true;
    if (e == cudaErrorNotReady) {
      cudaGetLastError();
      return false;
    }
    AGRT_CUDA_CHECK(e);
    return false;
  }
  void event_wait(EventHandle ev) override { AGRT_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(ev))); }
  void event_destroy(EventHandle ev) noexcept override { cudaEventDestroy(static_cast<cudaEvent_t>(ev)); }
  void synchronize() override {
    DeviceGuard guard(device_);
    AGRT_CUDA_CHECK(cudaDeviceSynchronize());
  }

 private:
  // One granule reserved, created, mapped, made accessible and unmapped again. Some setups report
  // VMM support and then fail at map or access (some vGPU and container configurations); the pool
  // then takes cudaMalloc segments. Out of memory is no reason to fall back: mapping works, memory
  // is short, and the pool's limit handling deals with that. Returns "" when VMM works.
  std::string probe_vmm() {
    const DriverApi& api = driver();
    DeviceGuard guard(device_);
    const auto failed = [](const char* call, CUresult r) {
      return detail::concat(call, " failed in the VMM probe (CUresult ", static_cast<int>(r), ")");
    };
    CUdeviceptr va = 0;
    CUresult r = api.address_reserve(&va, granularity_, granularity_, 0, 0);
    if (r != CUDA_SUCCESS) return failed("cuMemAddressReserve", r);
    std::string why;
    CUmemGenericAllocationHandle h{};
    r = api.mem_create(&h, granularity_, &prop_, 0);
    if (r == CUDA_SUCCESS) {
      r = api.mem_map(va, granularity_, 0, h, 0);
      if (r == CUDA_SUCCESS) {
        CUmemAccessDesc access{};
        access.location = prop_.location;
        access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
        r = api.set_access(va, granularity_, &access, 1);
        if (r != CUDA_SUCCESS && r != CUDA_ERROR_OUT_OF_MEMORY) why = failed("cuMemSetAccess", r);
        const CUresult u = api.mem_unmap(va, granularity_);
        if (u != CUDA_SUCCESS && why.empty()) why = failed("cuMemUnmap", u);
      } else if (r != CUDA_ERROR_OUT_OF_MEMORY) {
        why = failed("cuMemMap", r);
      }
      api.mem_release(h);
    } else if (r != CUDA_ERROR_OUT_OF_MEMORY) {
      why = failed("cuMemCreate", r);
    }
    api.address_free(va, granularity_);
    return why;
  }

  int device_;
  bool want_vmm_;
  std::string fallback_reason_;
  bool vmm_ = false;
  std::size_t granularity_ = 0;
  CUmemAllocationProp prop_{};
  std::mutex mu_;
  std::unordered_map<CUdeviceptr, CUmemGenericAllocationHandle> handles_;
};

}  // namespace

std::shared_ptr<Upstream> make_cuda_upstream(int device, bool expandable) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw RuntimeError("cuda:" + std::to_string(device) + ": the CUDA runtime reports no usable device (" +
                       cuda::error_text(e) + ")");
  }
  AGRT_EXPECTS(device >= 0 && device < count, ValueError, "device: cuda:", device, " does not exist (", count,
               " CUDA device(s) visible)");
  return std::make_shared<CudaUpstream>(device, expandable);
}

}  // namespace agrt::memory

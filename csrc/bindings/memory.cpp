// autoglm_rt._C memory bindings: CachingPool, trace replay, loop timings, torch pools.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <time.h>

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "autoglm_rt/error.h"
#include "autoglm_rt/memory/caching_pool.h"
#include "autoglm_rt/memory/upstream.h"
#include "bindings/registry.h"
#include "core/scratch_stats.h"
#include "memory/torch_pools.h"

namespace py = pybind11;
using namespace agrt::memory;

namespace {

// The Poll of long native loops: raises the pending Python exception (KeyboardInterrupt on
// Ctrl-C) inside a loop that runs without the GIL. Python runs signal handlers in the main thread
// only, so elsewhere this finds nothing.
void poll_signals() {
  py::gil_scoped_acquire gil;
  if (PyErr_CheckSignals() != 0) throw py::error_already_set();
}

// A limit as the native pool takes it: None means no limit; SIZE_MAX is the pool's own "none"
// and is refused so that no integer silently means "unlimited".
std::size_t limit_or_none(std::optional<std::size_t> limit) {
  if (!limit) return kNoLimit;
  AGRT_EXPECTS(*limit != kNoLimit, agrt::ValueError, "limit: ", *limit,
               " bytes is not a limit (it is the pool's internal 'none'); pass None for no limit");
  return *limit;
}

struct Config {
  PoolOptions options;
  std::size_t granularity = 64 * 1024;
};

Config make_config(std::optional<std::size_t> limit, bool expandable, std::size_t round_bytes, std::size_t small_size,
                   std::size_t small_segment, std::size_t large_segment, std::size_t arena_reserve,
                   std::size_t granularity, bool decommit) {
  Config c;
  c.options.limit = limit_or_none(limit);
  c.options.expandable = expandable;
  c.options.round_bytes = round_bytes;
  c.options.small_size = small_size;
  c.options.small_segment = small_segment;
  c.options.large_segment = large_segment;
  c.options.arena_reserve = arena_reserve;
  c.options.decommit = decommit;
  c.granularity = granularity;
  return c;
}

std::shared_ptr<Upstream> upstream_for(const std::string& device, const Config& c) {
  if (device == "cpu") return make_host_upstream(c.options.expandable, c.granularity);
  if (device.rfind("cuda", 0) == 0) {
    int index = 0;
    if (device.size() > 4) {
      AGRT_EXPECTS(device[4] == ':' && device.size() > 5 && device.find_first_not_of("0123456789", 5) == std::string::npos,
                   agrt::ValueError, "device: expected 'cpu', 'cuda' or 'cuda:N', got '", device, "'");
      index = std::stoi(device.substr(5));
    }
#ifdef AGRT_WITH_CUDA
    return make_cuda_upstream(index, c.options.expandable);
#else
    (void)index;
    throw agrt::RuntimeError("device '" + device + "': autoglm_rt was built without CUDA (AUTOGLM_RT_CUDA=OFF or no "
                             "nvcc at build time)");
#endif
  }
  throw agrt::ValueError("device: expected 'cpu', 'cuda' or 'cuda:N', got '" + device + "'");
}

py::dict stats_dict(const PoolStats& s) {
  py::dict d;
  d["allocated_bytes"] = s.allocated_bytes;
  d["reserved_bytes"] = s.reserved_bytes;
  d["requested_bytes"] = s.requested_bytes;
  d["peak_allocated_bytes"] = s.peak_allocated_bytes;
  d["peak_reserved_bytes"] = s.peak_reserved_bytes;
  d["peak_requested_bytes"] = s.peak_requested_bytes;
  d["limit_bytes"] = s.limit_bytes == kNoLimit ? py::object(py::none()) : py::int_(s.limit_bytes);
  d["num_allocs"] = s.num_allocs;
  d["num_frees"] = s.num_frees;
  d["num_cache_hits"] = s.num_cache_hits;
  d["num_upstream_allocs"] = s.num_upstream_allocs;
  d["num_upstream_frees"] = s.num_upstream_frees;
  d["num_ooms"] = s.num_ooms;
  d["num_trims"] = s.num_trims;
  d["num_pressure_reclaims"] = s.num_pressure_reclaims;
  d["pressure_reclaimed_bytes"] = s.pressure_reclaimed_bytes;
  d["num_trace_dropped"] = s.num_trace_dropped;
  d["largest_free_block_bytes"] = s.largest_free_block_bytes;
  d["fragmentation_ratio"] = s.fragmentation_ratio;
  d["num_segments"] = s.num_segments;
  d["num_free_blocks"] = s.num_free_blocks;
  d["num_live_blocks"] = s.num_live_blocks;
  d["num_stream_lists"] = s.num_stream_lists;
  return d;
}

// The calling thread's CPU time: unlike wall time it does not count the time a loaded machine
// keeps the thread descheduled.
struct ThreadCpuClock {
  using duration = std::chrono::nanoseconds;
  using rep = duration::rep;
  using period = duration::period;
  using time_point = std::chrono::time_point<ThreadCpuClock>;
  static time_point now() {
    timespec ts{};
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return time_point(duration(std::int64_t(ts.tv_sec) * 1000000000 + ts.tv_nsec));
  }
};

// Timing of `iters` alloc+free pairs of `nbytes` through one of: the pool ("pool"; "pool-2mi"
// with the 2 MiB growth granule of CUDA VMM), the host
// upstream's segments directly ("upstream": posix_memalign/free) or its arena mapping
// ("upstream-map": mprotect/remap of whole granules). Returns ns per pair.
constexpr std::size_t kPollEvery = 4096;  // loop steps between two checks for Ctrl-C

template <typename clock>
double loop_ns_with(std::size_t nbytes, std::size_t iters, const std::string& target) {
  AGRT_EXPECTS(nbytes > 0 && iters > 0, agrt::ValueError, "loop_ns: nbytes and iters must be > 0");
  if (target == "pool" || target == "pool-2mi") {
    // "pool-2mi": arenas growing in 2 MiB granules, as over CUDA VMM (small blocks in chunks).
    CachingPool pool(make_host_upstream(true, target == "pool" ? 64 * 1024 : 2 * 1024 * 1024), PoolOptions{});
    pool.deallocate(pool.allocate(nbytes, 0), 0);
    const auto t0 = clock::now();
    for (std::size_t i = 0; i < iters; ++i) {
      if (i % kPollEvery == kPollEvery - 1) poll_signals();
      pool.deallocate(pool.allocate(nbytes, 0), 0);
    }
    return std::chrono::duration<double, std::nano>(clock::now() - t0).count() / double(iters);
  }
  if (target == "upstream") {
    auto up = make_host_upstream(false);
    const auto t0 = clock::now();
    for (std::size_t i = 0; i < iters; ++i) {
      if (i % kPollEvery == kPollEvery - 1) poll_signals();
      void* p = up->allocate(nbytes);
      AGRT_EXPECTS(p != nullptr, agrt::RuntimeError, "loop_ns: upstream out of memory");
      static_cast<volatile char*>(p)[0] = 1;  // touch it, as a user would
      up->deallocate(p, nbytes);
    }
    return std::chrono::duration<double, std::nano>(clock::now() - t0).count() / double(iters);
  }
  if (target == "upstream-map") {
    auto up = make_host_upstream(true);
    const std::size_t g = up->granularity();
    const std::size_t n = (nbytes + g - 1) / g * g;
    void* base = up->reserve(n);
    AGRT_EXPECTS(base != nullptr, agrt::RuntimeError, "loop_ns: cannot reserve address space");
    // The reservation goes back however the loop ends (a map failure, Ctrl-C).
    std::unique_ptr<void, std::function<void(void*)>> reservation(base, [&](void* b) { up->release(b, n); });
    const auto t0 = clock::now();
    for (std::size_t i = 0; i < iters; ++i) {
      if (i % kPollEvery == kPollEvery - 1) poll_signals();
      AGRT_EXPECTS(up->map(base, n), agrt::RuntimeError, "loop_ns: map failed");
      static_cast<volatile char*>(base)[0] = 1;
      up->unmap(base, n);
    }
    return std::chrono::duration<double, std::nano>(clock::now() - t0).count() / double(iters);
  }
  throw agrt::ValueError("loop_ns: target must be 'pool', 'pool-2mi', 'upstream' or 'upstream-map', got '" + target + "'");
}

double loop_ns(std::size_t nbytes, std::size_t iters, const std::string& target, bool cpu_time) {
  return cpu_time ? loop_ns_with<ThreadCpuClock>(nbytes, iters, target)
                  : loop_ns_with<std::chrono::steady_clock>(nbytes, iters, target);
}

}  // namespace

AGRT_BINDINGS(memory) {
  py::register_exception<OutOfMemoryError>(m, "OutOfMemoryError", PyExc_MemoryError);

  py::class_<CachingPool, std::shared_ptr<CachingPool>>(m, "CachingPool")
      .def(py::init([](const std::string& device, std::optional<std::size_t> limit, bool expandable,
                       std::size_t round_bytes, std::size_t small_size, std::size_t small_segment,
                       std::size_t large_segment, std::size_t arena_reserve, std::size_t granularity,
                       bool decommit) {
             Config c = make_config(limit, expandable, round_bytes, small_size, small_segment, large_segment,
                                    arena_reserve, granularity, decommit);
             return std::make_shared<CachingPool>(upstream_for(device, c), c.options);
           }),
           py::arg("device"), py::arg("limit"), py::arg("expandable"), py::arg("round_bytes"), py::arg("small_size"),
           py::arg("small_segment"), py::arg("large_segment"), py::arg("arena_reserve"), py::arg("granularity"),
           py::arg("decommit"))
      .def(
          "allocate",
          [](CachingPool& p, std::size_t nbytes, std::uintptr_t stream) {
            return reinterpret_cast<std::uintptr_t>(p.allocate(nbytes, stream));
          },
          py::arg("nbytes"), py::arg("stream") = 0, py::call_guard<py::gil_scoped_release>())
      .def(
          "deallocate",
          [](CachingPool& p, std::uintptr_t ptr, std::optional<std::uintptr_t> stream) {
            if (stream) p.deallocate(reinterpret_cast<void*>(ptr), *stream);
            else p.deallocate(reinterpret_cast<void*>(ptr));
          },
          py::arg("ptr"), py::arg("stream") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def(
          "set_limit",
          [](CachingPool& p, std::optional<std::size_t> limit) { p.set_limit(limit_or_none(limit)); },
          py::arg("limit"), py::call_guard<py::gil_scoped_release>())
      .def("limit",
           [](const CachingPool& p) -> py::object {
             const std::size_t l = p.limit();
             return l == kNoLimit ? py::object(py::none()) : py::int_(l);
           })
      .def("trim", &CachingPool::trim, py::call_guard<py::gil_scoped_release>())
      .def("stats", [](const CachingPool& p) { return stats_dict(p.stats()); })
      .def("reset_peak_stats", &CachingPool::reset_peak_stats)
      .def("check", &CachingPool::check, py::call_guard<py::gil_scoped_release>())
      .def(
          "block_size",
          [](const CachingPool& p, std::uintptr_t ptr) { return p.block_size(reinterpret_cast<void*>(ptr)); },
          py::arg("ptr"))
      .def("record_trace", &CachingPool::record_trace, py::arg("on"), py::arg("max_records") = kDefaultTraceRecords)
      .def("dump_trace", &CachingPool::dump_trace, py::arg("path"), py::call_guard<py::gil_scoped_release>())
      .def("trace",
           [](const CachingPool& p) {
             py::list out;
             for (const TraceRecord& r : p.trace())
               out.append(py::make_tuple(r.is_alloc ? "alloc" : "free", r.id, r.bytes, r.stream));
             return out;
           })
      .def("device", [](const CachingPool& p) { return p.upstream().device(); })
      .def("upstream_name", [](const CachingPool& p) { return p.upstream().name(); })
      .def("upstream_fallback_reason", [](const CachingPool& p) { return p.upstream().fallback_reason(); });

  m.def(
      "memory_replay",
      [](const std::string& path, int repeat, std::optional<std::size_t> limit, bool expandable,
         std::size_t round_bytes, std::size_t small_size, std::size_t small_segment, std::size_t large_segment,
         std::size_t arena_reserve, std::size_t granularity, bool decommit) {
        Config c = make_config(limit, expandable, round_bytes, small_size, small_segment, large_segment,
                               arena_reserve, granularity, decommit);
        ReplayResult r;
        {
          py::gil_scoped_release nogil;
          r = replay(read_trace(path, poll_signals), repeat, make_host_upstream(expandable, c.granularity), c.options,
                     poll_signals);
        }
        py::dict d;
        d["peak_reserved_bytes"] = r.peak_reserved_bytes;
        d["peak_requested_bytes"] = r.peak_requested_bytes;
        d["reserved_to_requested"] = r.reserved_to_requested;
        d["upstream_allocs"] = r.upstream_allocs;
        d["upstream_allocs_after_first_pass"] = r.upstream_allocs_after_first_pass;
        d["pressure_reclaims"] = r.pressure_reclaims;
        d["pressure_reclaimed_bytes"] = r.pressure_reclaimed_bytes;
        d["ns_per_op"] = r.ns_per_op;
        d["ops"] = r.ops;
        return d;
      },
      py::arg("path"), py::arg("repeat"), py::arg("limit"), py::arg("expandable"), py::arg("round_bytes"),
      py::arg("small_size"),
      py::arg("small_segment"), py::arg("large_segment"), py::arg("arena_reserve"), py::arg("granularity"),
      py::arg("decommit"), "Replays a trace CSV through a fresh host pool in a C++ loop.");

  m.def(
      "memory_replay_direct_ns",
      [](const std::string& path, int repeat) {
        py::gil_scoped_release nogil;
        auto up = make_host_upstream(false);
        return replay_direct_ns_per_op(read_trace(path, poll_signals), repeat, *up, poll_signals);
      },
      py::arg("path"), py::arg("repeat"),
      "ns per operation replaying a trace with posix_memalign/free directly (the pool's baseline).");

  m.def("memory_loop_ns", &loop_ns, py::arg("nbytes"), py::arg("iters"), py::arg("target"),
        py::arg("cpu_time") = false, py::call_guard<py::gil_scoped_release>(),
        "ns per alloc+free pair in a C++ loop: 'pool', 'pool-2mi' (2 MiB growth granules), 'upstream' (posix_memalign/free) or 'upstream-map'; "
        "cpu_time: the thread's CPU time instead of wall time.");

#ifdef AGRT_WITH_CUDA
  m.def("torch_pool", &torch_device_pool, py::arg("device"), "The pool behind torch's pluggable allocator.");
  m.def(
      "set_torch_pools_limit",
      [](std::optional<std::size_t> limit) { set_torch_pools_limit(limit ? *limit : kNoLimit); },
      py::arg("limit"));
  m.def("torch_allocator_symbols", [] { return py::make_tuple(torch_malloc_symbol(), torch_free_symbol()); });
  m.def("cuda_scratch_stats", [] {
    const agrt::cuda::ScratchStats s = agrt::cuda::scratch_stats();
    py::dict d;
    d["live_bytes"] = s.live_bytes;
    d["peak_bytes"] = s.peak_bytes;
    d["allocations"] = s.allocations;
    d["keep_bytes"] = s.keep_bytes;
    return d;
  });
#endif
}

// The CPU kernels' thread pool: persistent workers, the calling thread takes part.
#pragma once

#include <cstdint>
#include <functional>

namespace agrt {

/// Number of threads parallel_for uses (>= 1). Default: the CPUs this process may run on
/// (sched_getaffinity), or AUTOGLM_RT_NUM_THREADS when set.
int num_threads() noexcept;

/// Sets the thread count for later parallel_for calls (n >= 1). Thread-safe; calls already running
/// finish with the old count.
void set_num_threads(int n);

/// Calls fn(begin, end) on disjoint chunks covering [begin, end), each at least `grain` long
/// (except the last), possibly on several threads, and returns when all are done. Chunks are
/// numbered deterministically: chunk i covers [begin + i*chunk, ...), so callers can reduce per
/// chunk into a fixed-order result. A nested call, or a range shorter than 2*grain, runs inline.
/// The first exception thrown by fn is rethrown in the caller after all chunks finished.
void parallel_for(std::int64_t begin, std::int64_t end, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& fn);

/// The chunk length parallel_for(begin, end, grain, ...) will use; lets a caller size a per-chunk
/// result array before the call.
std::int64_t parallel_chunk_size(std::int64_t begin, std::int64_t end, std::int64_t grain) noexcept;

}  // namespace agrt

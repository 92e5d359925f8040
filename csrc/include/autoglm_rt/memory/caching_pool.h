// CachingPool: a device-agnostic caching allocator over an Upstream.
//
// Sizes are rounded up to `round_bytes`; requests up to `small_size` (default: 128 KiB with
// arenas, 1 MiB with segments, as torch) and larger ones live in separate arenas or segments
// (small blocks never pin large ones). Free blocks are kept per (class, stream)
// in sets ordered by (size, address): best fit is one lower_bound, O(log n). Blocks are split on
// allocation (a large block beside the hole's newer neighbour: PoolOptions::recent_neighbour_from;
// a hole that holds the largest request seen kept whole: PoolOptions::spare_hole_ratio)
// and coalesced with free neighbours of the same stream on free. With an expandable
// upstream each class grows one arena in place (its free tail is extended, never stranded);
// otherwise segments come from allocate() (small: `small_segment`; large: torch's policy of
// `large_segment` below 10 MiB, else rounded to 2 MiB). Where the upstream's granularity exceeds
// 4 * small_size (CUDA VMM: 2 MiB), small blocks live in chunks of 4 * small_size carved from the
// large arena instead of an arena of their own. PoolOptions::decommit unmaps free granules inside
// the arenas before mapping more (smaller footprint, upstream calls on every step).
//
// Streams: a block freed on stream s is reusable on s at once (stream order). Another stream
// takes it only once an event recorded on s has completed; the event is recorded lazily, when
// another stream first wants the block, so alloc/free never touch the driver on the hot path.
//
// Limit: reserved bytes never grow above limit(). set_limit() below the reserved bytes releases
// cached free memory at once until reserved <= limit where possible; live blocks are never freed
// or moved, growth is refused until usage falls. An allocation that would cross the limit first
// defragments: it releases free tails and wholly free segments, then unmaps the whole free
// granules inside arena holes (mapped again when a block lands on them), and raises only if it
// still does not fit (counted in PoolStats::num_pressure_reclaims / pressure_reclaimed_bytes).
// Without pressure nothing is released: no upstream call after the first pass of a steady loop.
//
// Thread safety: every member function may be called from any thread.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "autoglm_rt/memory/upstream.h"

namespace agrt::memory {

/// An allocation that would take the pool above its limit (after trimming) or that the upstream
/// refused. what() carries requested bytes, limit, allocated, reserved and the largest free block.
class OutOfMemoryError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr std::size_t kNoLimit = ~std::size_t{0};
/// Requests above this are refused as absurd (ValueError), whatever the limit.
inline constexpr std::size_t kMaxRequest = std::size_t{1} << 48;
/// Default bound of the trace buffer, in records.
inline constexpr std::size_t kDefaultTraceRecords = std::size_t{1} << 20;

struct PoolOptions {
  std::size_t limit = kNoLimit;
  std::size_t round_bytes = 256;             // power of two, >= 256 (block alignment)
  std::size_t small_size = 0;                // requests up to this use the small class; 0: auto
  std::size_t small_segment = 2 * 1024 * 1024;   // segment size of the small class (segment mode)
  std::size_t large_segment = 20 * 1024 * 1024;  // minimum large segment below 10 MiB (segment mode)
  std::size_t arena_reserve = std::size_t{64} << 30;  // address space reserved per arena
  bool expandable = true;                    // use the upstream's expansion when it has one
  // Arenas only: before an arena maps more memory (to grow, or to back a block placed over
  // granules unmapped earlier), unmap the whole free granules inside its free blocks. Trades
  // upstream calls on every step (and, on CUDA, waits for the freed blocks' streams) for a
  // footprint near the live bytes; off by default (benches/RESULTS.md).
  bool decommit = false;
  // Arenas with a small arena of their own (granule <= 4 * small_size, e.g. 64 KiB host arenas):
  // a block of at least this many bytes cut from a free hole goes to the end of the hole whose
  // neighbour was allocated last (blocks allocated together tend to be freed together, so the
  // holes they leave merge); smaller ones, and all when 0, go to the hole's low end. Measured on
  // the eight traces in benches/ (benches/RESULTS.md, issue 17): 1 MiB lowers or keeps every
  // footprint with 64 KiB granules; with 2 MiB granules (small chunks in the large arena) it
  // raised cnn and convnet by 10-13 % and cost an upstream call after the first pass, so it is
  // not applied there.
  std::size_t recent_neighbour_from = std::size_t{1} << 20;
  // Same arenas, requests of at least recent_neighbour_from bytes: when the best-fitting hole can
  // hold the largest request its class has seen, would no longer hold it once cut, and is at
  // least this many times the request, the request takes the arena's free tail instead if the
  // tail holds it without growing (the hole stays whole for the next large request). 0: off.
  // gcn_graphs 1.176 -> 1.023, the other eight traces unchanged at 5-8 (benches/RESULTS.md).
  std::size_t spare_hole_ratio = 6;
};

struct PoolStats {
  std::size_t allocated_bytes = 0, reserved_bytes = 0, requested_bytes = 0;
  std::size_t peak_allocated_bytes = 0, peak_reserved_bytes = 0, peak_requested_bytes = 0;
  std::size_t limit_bytes = kNoLimit;
  std::uint64_t num_allocs = 0, num_frees = 0, num_cache_hits = 0;
  std::uint64_t num_upstream_allocs = 0, num_upstream_frees = 0, num_ooms = 0, num_trims = 0;
  // Allocations that met the limit and released cached memory to fit (free tails, free segments,
  // then free granules inside arena holes), and the bytes those releases returned.
  std::uint64_t num_pressure_reclaims = 0;
  std::size_t pressure_reclaimed_bytes = 0;
  // Trace records not kept because the trace buffer was full (record_trace's max_records).
  std::uint64_t num_trace_dropped = 0;
  std::size_t largest_free_block_bytes = 0;
  double fragmentation_ratio = 0.0;  // 1 - largest free block / cached free bytes; 0 when none
  std::size_t num_segments = 0, num_free_blocks = 0, num_live_blocks = 0;
  std::size_t num_stream_lists = 0;  // streams holding cached free blocks (plus at most one empty)
};

struct TraceRecord {
  bool is_alloc;
  std::uint64_t id;
  std::size_t bytes;
  std::uintptr_t stream;
};

class CachingPool {
 public:
  /// Throws agrt::ValueError for inconsistent options.
  CachingPool(std::shared_ptr<Upstream> upstream, PoolOptions options = {});
  /// Returns all memory to the upstream, live blocks included.
  ~CachingPool();
  CachingPool(const CachingPool&) = delete;
  CachingPool& operator=(const CachingPool&) = delete;

  /// A block of at least `nbytes` (aligned to round_bytes) usable on `stream`.
  /// Throws agrt::ValueError for 0 or > kMaxRequest bytes, OutOfMemoryError when the limit or
  /// the upstream refuses; the pool is unchanged on error.
  void* allocate(std::size_t nbytes, std::uintptr_t stream = 0);
  /// Returns a block. Throws agrt::ValueError (pool unchanged) for a pointer this pool did not
  /// hand out, a double free, or a stream other than the one it was allocated on.
  void deallocate(void* ptr, std::uintptr_t stream);
  /// Same, using the block's own stream.
  void deallocate(void* ptr);

  /// Sets the hard limit (kNoLimit: none) and trims at once to meet it where possible.
  void set_limit(std::size_t bytes);
  std::size_t limit() const;
  /// Releases cached free memory to the upstream (waiting for pending stream events); returns
  /// the bytes released.
  std::size_t trim();

  PoolStats stats() const;
  void reset_peak_stats();
  /// Verifies every internal invariant; throws agrt::RuntimeError describing the first violation.
  void check() const;

  /// Bytes of the block at ptr (rounded size); throws ValueError for an unknown pointer.
  std::size_t block_size(const void* ptr) const;

  /// Starts (or stops) recording allocate/deallocate calls. The buffer keeps at most
  /// `max_records` records (default 2^20, 32 MiB): once full, later records are dropped and
  /// counted in PoolStats::num_trace_dropped, so the kept trace is a consistent prefix. A block
  /// allocated while not recording is never recorded, its free neither.
  void record_trace(bool on, std::size_t max_records = kDefaultTraceRecords);
  /// Trace since recording started, in the order of the calls.
  std::vector<TraceRecord> trace() const;
  /// Writes the trace as CSV (op,id,bytes,stream); throws agrt::RuntimeError if it cannot.
  void dump_trace(const std::string& path) const;

  const Upstream& upstream() const;
  const PoolOptions& options() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Called by long native loops (trace parsing, replay) every few thousand steps, from the thread
/// running the loop; it may throw to stop the loop (the bindings raise KeyboardInterrupt there on
/// Ctrl-C), and everything the loop built is released. Empty: never called.
using Poll = std::function<void()>;

/// Reads a trace CSV (header op,id,bytes,stream; ids and streams non-negative integers, bytes of
/// an alloc row 1..2^48). Throws agrt::ValueError naming the file and line.
std::vector<TraceRecord> read_trace(const std::string& path, const Poll& poll = {});

struct ReplayResult {
  std::size_t peak_reserved_bytes = 0, peak_requested_bytes = 0;
  double reserved_to_requested = 0.0;
  std::uint64_t upstream_allocs = 0, upstream_allocs_after_first_pass = 0;
  std::uint64_t pressure_reclaims = 0;  // PoolStats::num_pressure_reclaims of the replay's pool
  std::size_t pressure_reclaimed_bytes = 0;
  double ns_per_op = 0.0;
  std::uint64_t ops = 0;
};

/// Replays `trace` `repeat` times through a fresh pool over `upstream`; allocations still live at
/// the end of a pass are freed before the next. Timing covers the pool calls only. Under
/// options.limit an allocation the pool refuses raises OutOfMemoryError naming the record.
ReplayResult replay(const std::vector<TraceRecord>& trace, int repeat, std::shared_ptr<Upstream> upstream,
                    PoolOptions options, const Poll& poll = {});

/// The baseline of replay(): the same trace calling upstream->allocate/deallocate directly for
/// every request (no pool). Returns ns per operation.
double replay_direct_ns_per_op(const std::vector<TraceRecord>& trace, int repeat, Upstream& upstream,
                               const Poll& poll = {});

}  // namespace agrt::memory

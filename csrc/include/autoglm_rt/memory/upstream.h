// Where a CachingPool gets its memory from. An Upstream hands out whole segments (allocate /
// deallocate) and, where it can, growable address ranges (reserve / map / unmap) so that a pool
// grows one contiguous arena instead of stranding memory across segments. It also owns the
// stream events that guard cross-stream reuse; an upstream without streams (the host) has none.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace agrt::memory {

/// Opaque handle of a recorded stream event (cudaEvent_t on CUDA); nullptr means "none".
using EventHandle = void*;

class Upstream {
 public:
  virtual ~Upstream() = default;

  /// "cpu" or "cuda:N".
  virtual std::string device() const = 0;
  /// Short description for messages and stats ("host", "cuda-malloc", "cuda-vmm", ...).
  virtual std::string name() const = 0;
  /// Why this upstream runs without a capability it was asked for ("" when it does not), e.g. the
  /// CUDA upstream's VMM probe failing, so it hands out cudaMalloc segments instead of arenas.
  virtual std::string fallback_reason() const { return {}; }

  /// A segment of exactly `bytes` (aligned to at least 256 B), or nullptr when the upstream is
  /// out of memory. Throws agrt::RuntimeError for any other failure.
  virtual void* allocate(std::size_t bytes) = 0;
  /// Returns a segment from allocate(); `bytes` is the size that was asked for.
  virtual void deallocate(void* ptr, std::size_t bytes) noexcept = 0;

  /// True when reserve/map/unmap work: the pool then grows arenas in place.
  virtual bool supports_expansion() const { return false; }
  /// Map/unmap granularity in bytes (a power of two); 0 without expansion.
  virtual std::size_t granularity() const { return 0; }
  /// Reserves `bytes` of address space (no memory behind it); nullptr when none is left.
  virtual void* reserve(std::size_t bytes) { return nullptr; }
  /// Releases a reservation; everything in it must be unmapped first.
  virtual void release(void* base, std::size_t bytes) noexcept {}
  /// Backs [addr, addr+bytes) with memory (both multiples of granularity()); false when the
  /// upstream is out of memory. Throws agrt::RuntimeError for any other failure.
  virtual bool map(void* addr, std::size_t bytes) { return false; }
  /// Returns the memory behind [addr, addr+bytes) (as mapped earlier) to the upstream.
  virtual void unmap(void* addr, std::size_t bytes) noexcept {}

  /// True when memory is used from streams whose work runs asynchronously (CUDA): the pool
  /// then guards cross-stream reuse with events. False for the host.
  virtual bool has_events() const { return false; }
  /// Records an event on `stream` capturing all work submitted to it so far.
  virtual EventHandle record_event(std::uintptr_t stream) { return nullptr; }
  /// Non-blocking: true when the event's work is complete.
  virtual bool event_done(EventHandle ev) { return true; }
  /// Blocks until the event's work is complete (used only off the hot path: trim, destruction).
  virtual void event_wait(EventHandle ev) {}
  virtual void event_destroy(EventHandle ev) noexcept {}
  /// Blocks until all work queued on the device so far is complete (destruction only: before the
  /// pool unmaps memory whose blocks were never handed an event). No-op without events.
  virtual void synchronize() {}
};

/// Host memory. With `expandable`, arenas are address ranges reserved with mmap(PROT_NONE) and
/// backed in `granularity` steps (mprotect), given back with MAP_FIXED remaps; allocate() always
/// works (posix_memalign, 4 KiB alignment).
std::shared_ptr<Upstream> make_host_upstream(bool expandable = true, std::size_t granularity = 64 * 1024);

/// A test upstream over another one: at most `capacity` bytes outstanding (segments plus mapped
/// arena bytes); fail_next(n) makes the next n allocate/map calls report out of memory; with
/// `manual_events`, events exist and complete only after complete_events() (or event_wait).
class LimitingUpstream : public Upstream {
 public:
  LimitingUpstream(std::shared_ptr<Upstream> inner, std::size_t capacity, bool manual_events = false);
  ~LimitingUpstream() override;

  std::string device() const override;
  std::string name() const override;
  void* allocate(std::size_t bytes) override;
  void deallocate(void* ptr, std::size_t bytes) noexcept override;
  bool supports_expansion() const override;
  std::size_t granularity() const override;
  void* reserve(std::size_t bytes) override;
  void release(void* base, std::size_t bytes) noexcept override;
  bool map(void* addr, std::size_t bytes) override;
  void unmap(void* addr, std::size_t bytes) noexcept override;
  bool has_events() const override { return manual_events_; }
  EventHandle record_event(std::uintptr_t stream) override;
  bool event_done(EventHandle ev) override;
  void event_wait(EventHandle ev) override;
  void event_destroy(EventHandle ev) noexcept override;
  /// With manual events: completes every event and counts the call; then the inner upstream's.
  void synchronize() override;
  long synchronize_calls() const;

  void set_capacity(std::size_t bytes);
  void fail_next(int n);
  /// Marks every event recorded so far complete.
  void complete_events();
  std::size_t outstanding() const;
  long live_events() const;

 private:
  struct State;
  std::shared_ptr<Upstream> inner_;
  bool manual_events_;
  std::unique_ptr<State> state_;
};

#ifdef AGRT_WITH_CUDA
/// CUDA memory of device `device`. With `expandable` and a driver that supports virtual memory
/// management (cuMemCreate/cuMemMap, reached through cudaGetDriverEntryPointByVersion so that
/// libcuda is never linked), arenas grow in place; otherwise segments come from cudaMalloc.
/// Throws agrt::RuntimeError naming the reason when the device is not usable.
std::shared_ptr<Upstream> make_cuda_upstream(int device, bool expandable = true);
#endif

}  // namespace agrt::memory

// Host upstreams: plain aligned segments and mmap-reserved arenas backed in granules.
#include <sys/mman.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>

#include "autoglm_rt/error.h"
#include "autoglm_rt/memory/upstream.h"

namespace agrt::memory {
namespace {

constexpr std::size_t kSegmentAlignment = 4096;

class HostUpstream final : public Upstream {
 public:
  HostUpstream(bool expandable, std::size_t granularity) : expandable_(expandable), granularity_(granularity) {
    AGRT_EXPECTS(granularity >= 4096 && (granularity & (granularity - 1)) == 0, ValueError,
                 "host upstream: granularity must be a power of two >= 4096, got ", granularity);
  }
  std::string device() const override { return "cpu"; }
  std::string name() const override { return expandable_ ? "host-mmap" : "host"; }

  void* allocate(std::size_t bytes) override {
    void* p = nullptr;
    if (posix_memalign(&p, kSegmentAlignment, bytes) != 0) return nullptr;
    return p;
  }
  void deallocate(void* ptr, std::size_t) noexcept override { std::free(ptr); }

  bool supports_expansion() const override { return expandable_; }
  std::size_t granularity() const override { return expandable_ ? granularity_ : 0; }

  void* reserve(std::size_t bytes) override {
    // Over-reserve by one granule and cut the ends so the base is granule-aligned.
    const std::size_t total = bytes + granularity_;
    void* raw = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (raw == MAP_FAILED) return nullptr;
    const auto start = reinterpret_cast<std::uintptr_t>(raw);
    const std::uintptr_t base = (start + granularity_ - 1) & ~(std::uintptr_t{granularity_} - 1);
    if (base > start) munmap(raw, base - start);
    const std::uintptr_t end = start + total;
    if (end > base + bytes) munmap(reinterpret_cast<void*>(base + bytes), end - (base + bytes));
    return reinterpret_cast<void*>(base);
  }
  void release(void* base, std::size_t bytes) noexcept override { munmap(base, bytes); }

  bool map(void* addr, std::size_t bytes) override {
    if (mprotect(addr, bytes, PROT_READ | PROT_WRITE) == 0) return true;
    if (errno == ENOMEM) return false;
    AGRT_FAIL(RuntimeError, "host upstream: mprotect failed: ", std::strerror(errno));
  }
  void unmap(void* addr, std::size_t bytes) noexcept override {
    // A fixed anonymous remap drops the pages and their commit charge in one call.
    mmap(addr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_FIXED, -1, 0);
  }

 private:
  bool expandable_;
  std::size_t granularity_;
};

struct ManualEvent {
  bool done = false;
};

}  // namespace

std::shared_ptr<Upstream> make_host_upstream(bool expandable, std::size_t granularity) {
  return std::make_shared<HostUpstream>(expandable, granularity);
}

struct LimitingUpstream::State {
  mutable std::mutex mu;
  std::size_t capacity;
  std::size_t outstanding = 0;
  int fail_next = 0;
  long synchronize_calls = 0;
  std::unordered_set<ManualEvent*> events;

  // True (and counts the bytes) when the request may proceed.
  bool admit(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    if (fail_next > 0) {
      --fail_next;
      return false;
    }
    if (bytes > capacity || outstanding > capacity - bytes) return false;
    outstanding += bytes;
    return true;
  }
  void give_back(std::size_t bytes) {
    std::lock_guard<std::mutex> lock(mu);
    outstanding -= bytes;
  }
};

LimitingUpstream::LimitingUpstream(std::shared_ptr<Upstream> inner, std::size_t capacity, bool manual_events)
    : inner_(std::move(inner)), manual_events_(manual_events), state_(std::make_unique<State>()) {
  AGRT_EXPECTS(inner_ != nullptr, ValueError, "LimitingUpstream: inner upstream is null");
  state_->capacity = capacity;
}

LimitingUpstream::~LimitingUpstream() {
  for (ManualEvent* e : state_->events) delete e;
}

std::string LimitingUpstream::device() const { return inner_->device(); }
std::string LimitingUpstream::name() const { return "limiting(" + inner_->name() + ")"; }

void* LimitingUpstream::allocate(std::size_t bytes) {
  if (!state_->admit(bytes)) return nullptr;
  void* p = inner_->allocate(bytes);
  if (!p) state_->give_back(bytes);
  return p;
}
void LimitingUpstream::deallocate(void* ptr, std::size_t bytes) noexcept {
  inner_->deallocate(ptr, bytes);
  state_->give_back(bytes);
}
bool LimitingUpstream::supports_expansion() const { return inner_->supports_expansion(); }
std::size_t LimitingUpstream::granularity() const { return inner_->granularity(); }
void* LimitingUpstream::reserve(std::size_t bytes) { return inner_->reserve(bytes); }
void LimitingUpstream::release(void* base, std::size_t bytes) noexcept { inner_->release(base, bytes); }
bool LimitingUpstream::map(void* addr, std::size_t bytes) {
  if (!state_->admit(bytes)) return false;
  if (inner_->map(addr, bytes)) return true;
  state_->give_back(bytes);
  return false;
}
void LimitingUpstream::unmap(void* addr, std::size_t bytes) noexcept {
  inner_->unmap(addr, bytes);
  state_->give_back(bytes);
}

EventHandle LimitingUpstream::record_event(std::uintptr_t) {
  if (!manual_events_) return nullptr;
  auto* e = new ManualEvent();
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->events.insert(e);
  return e;
}
bool LimitingUpstream::event_done(EventHandle ev) {
  std::lock_guard<std::mutex> lock(state_->mu);
  return ev == nullptr || static_cast<ManualEvent*>(ev)->done;
}
void LimitingUpstream::event_wait(EventHandle ev) {
  std::lock_guard<std::mutex> lock(state_->mu);
  if (ev) static_cast<ManualEvent*>(ev)->done = true;
}
void LimitingUpstream::event_destroy(EventHandle ev) noexcept {
  if (!ev) return;
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->events.erase(static_cast<ManualEvent*>(ev));
  delete static_cast<ManualEvent*>(ev);
}

void LimitingUpstream::synchronize() {
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    ++state_->synchronize_calls;
    for (ManualEvent* e : state_->events) e->done = true;
  }
  inner_->synchronize();
}
long LimitingUpstream::synchronize_calls() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->synchronize_calls;
}

void LimitingUpstream::set_capacity(std::size_t bytes) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->capacity = bytes;
}
void LimitingUpstream::fail_next(int n) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->fail_next = n;
}
void LimitingUpstream::complete_events() {
  std::lock_guard<std::mutex> lock(state_->mu);
  for (ManualEvent* e : state_->events) e->done = true;
}
std::size_t LimitingUpstream::outstanding() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return state_->outstanding;
}
long LimitingUpstream::live_events() const {
  std::lock_guard<std::mutex> lock(state_->mu);
  return static_cast<long>(state_->events.size());
}

}  // namespace agrt::memory

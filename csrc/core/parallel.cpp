#include "autoglm_rt/parallel.h"

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "autoglm_rt/error.h"

namespace agrt {
namespace {

// Chunking depends only on the range and the grain, never on the thread count, so per-chunk
// reductions give the same bits on any machine.
constexpr std::int64_t kMaxChunks = 256;

int default_threads() {
  if (const char* env = std::getenv("AUTOGLM_RT_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  return std::max(1u, std::thread::hardware_concurrency());
}

thread_local bool t_inside_pool = false;

class ThreadPool {
 public:
  explicit ThreadPool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this] { worker_loop(); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& w : workers_) w.join();
  }
  int threads() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs the job on the workers and the caller. Only one run() at a time (callers hold job_mu).
  void run(const std::function<void(std::int64_t, std::int64_t)>& fn, std::int64_t begin,
           std::int64_t end, std::int64_t chunk) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      begin_ = begin;
      end_ = end;
      chunk_ = chunk;
      nchunks_ = (end - begin + chunk - 1) / chunk;
      next_.store(0, std::memory_order_relaxed);
      done_.store(0, std::memory_order_relaxed);
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return done_.load() == nchunks_ && active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work() {
    const bool was_inside = t_inside_pool;
    t_inside_pool = true;
    for (;;) {
      const std::int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
      if (i >= nchunks_) break;
      const std::int64_t b = begin_ + i * chunk_;
      const std::int64_t e = std::min(end_, b + chunk_);
      try {
        (*fn_)(b, e);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
      }
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == nchunks_) {
        std::lock_guard<std::mutex> lk(mu_);
        done_cv_.notify_all();
      }
    }
    t_inside_pool = was_inside;
  }

  void worker_loop() {
    std::uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return stop_ || (generation_ != seen && fn_ != nullptr); });
      if (stop_) return;
      seen = generation_;
      ++active_;
      lk.unlock();
      work();
      lk.lock();
      if (--active_ == 0) done_cv_.notify_all();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  bool stop_ = false;
  std::uint64_t generation_ = 0;
  int active_ = 0;
  const std::function<void(std::int64_t, std::int64_t)>* fn_ = nullptr;
  std::int64_t begin_ = 0, end_ = 0, chunk_ = 1, nchunks_ = 0;
  std::atomic<std::int64_t> next_{0}, done_{0};
  std::exception_ptr error_;
};

std::mutex g_job_mu;  // one parallel job at a time; a concurrent caller runs inline
std::atomic<int> g_threads{0};
ThreadPool* g_pool = nullptr;  // created lazily under g_job_mu

void reset_after_fork() {
  // The child has only the forking thread: forget (leak) the parent's pool, whose workers do
  // not exist here, and make a fresh one on first use.
  g_pool = nullptr;
  new (&g_job_mu) std::mutex();
}

struct ForkHandler {
  ForkHandler() { pthread_atfork(nullptr, nullptr, &reset_after_fork); }
} g_fork_handler;

}  // namespace

int num_threads() noexcept {
  int n = g_threads.load(std::memory_order_relaxed);
  if (n == 0) {
    n = default_threads();
    int expected = 0;
    g_threads.compare_exchange_strong(expected, n);
    n = g_threads.load();
  }
  return n;
}

void set_num_threads(int n) {
  AGRT_EXPECTS(n >= 1 && n <= 4096, ValueError, "set_num_threads: expected 1..4096 threads, got ", n);
  g_threads.store(n);
}

std::int64_t parallel_chunk_size(std::int64_t begin, std::int64_t end, std::int64_t grain) noexcept {
  const std::int64_t n = std::max<std::int64_t>(0, end - begin);
  grain = std::max<std::int64_t>(1, grain);
  return std::max(grain, (n + kMaxChunks - 1) / kMaxChunks);
}

void parallel_for(std::int64_t begin, std::int64_t end, std::int64_t grain,
                  const std::function<void(std::int64_t, std::int64_t)>& fn) {
  if (end <= begin) return;
  const std::int64_t chunk = parallel_chunk_size(begin, end, grain);
  const int threads = num_threads();
  auto inline_run = [&] {
    for (std::int64_t b = begin; b < end; b += chunk) fn(b, std::min(end, b + chunk));
  };
  if (threads == 1 || t_inside_pool || end - begin < 2 * chunk) return inline_run();
  std::unique_lock<std::mutex> lk(g_job_mu, std::try_to_lock);
  if (!lk.owns_lock()) return inline_run();
  if (g_pool == nullptr || g_pool->threads() != threads) {
    delete g_pool;
    g_pool = nullptr;
    g_pool = new ThreadPool(threads);
  }
  g_pool->run(fn, begin, end, chunk);
}

}  // namespace agrt

// CPU twin of the fused top-k compression: a radix select over the float bits.
//
// Common case (>= 2^18 elements, k <= n/3): lower and upper bounds on the k-th largest magnitude
// are taken from 256 evenly spread blocks; one pass computes acc = grad + residual, stores it and
// keeps, per chunk and in index order, the entries above the upper bound (all selected; their
// residual is cleared in the pass) and those between the bounds (a band of about a tenth of k at
// density 0.1, more at low density); a three-digit radix select over the band finds the exact
// threshold (ties at it go to the lowest indices) and each chunk merges its two lists into the
// output. The pass has no branch per kept entry: at density 0.1 a tenth of the entries are kept,
// and a branch (and bookkeeping) per kept entry used to make that density five times slower than
// density 0.001, where the pass moves the same bytes. For float32 with AVX2 it left-packs eight
// lanes at a time into the lists (a permutation from a 256-row table, then a popcount); otherwise
// (float16/bfloat16, no AVX2, AUTOGLM_RT_TOPK_SIMD=scalar) a four-wide compare and a bit mask
// visit the kept entries only.
// Otherwise (small tensors, or a bound that kept fewer than k or far too many entries), an exact
// two-pass select: a per-chunk histogram of the top 11 bits, then entries above the threshold
// bin go straight to the outputs and entries in it become candidates for the last two digits.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <pthread.h>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#define AGRT_TOPK_X86 1
#endif

#include "autoglm_rt/build_info.h"
#include "autoglm_rt/detail/half.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/topk.h"
#include "autoglm_rt/parallel.h"
#include "kernels/topk_dtypes.h"

namespace agrt::kernels {
namespace {

constexpr std::int64_t kGrain = 1 << 16;
constexpr int kBins1 = 1 << kTopkDigitBits[0];

using topk_detail::BF16;
using topk_detail::F16;
using topk_detail::F32;
using topk_detail::magnitude_key;

template <typename Fn>
void dispatch_float(DType t, Fn&& fn) {
  switch (t) {
    case DType::kFloat32: return fn(F32{});
    case DType::kFloat16: return fn(F16{});
    case DType::kBFloat16: return fn(BF16{});
    default: AGRT_FAIL(RuntimeError, "topk: unexpected dtype ", dtype_name(t));
  }
}

template <typename Fn>
void dispatch_index(DType t, Fn&& fn) {
  if (t == DType::kInt32) return fn(std::int32_t{});
  if (t == DType::kInt64) return fn(std::int64_t{});
  AGRT_FAIL(RuntimeError, "topk: unexpected index dtype ", dtype_name(t));
}

// Finds the bin holding the k-th largest key: returns (bin, count strictly above that bin).
template <typename Count>
std::pair<int, std::int64_t> select_bin(const Count* hist, int bins, std::int64_t k) {
  std::int64_t above = 0;
  for (int b = bins - 1; b >= 0; --b) {
    const auto c = static_cast<std::int64_t>(hist[b]);
    if (above + c >= k) return {b, above};
    above += c;
  }
  AGRT_FAIL(RuntimeError, "topk: histogram holds fewer than k entries");
}

// An entry that may be selected: its accumulated value (rounded to grad's dtype) and index.
struct Candidate {
  float acc;
  std::int64_t idx;
};
using CandidateLists = std::vector<std::vector<Candidate>>;  // one list per chunk, index order

// Finishes the radix select among candidates that all match `prefix` under `mask`: returns the
// exact key of the k-th largest entry and how many entries at that key are taken. The candidates
// are `nlists` lists (`total` entries in all); for_each_acc(l, f) calls f(acc) for each entry of
// list l. The per-list histograms run on all threads when there are many candidates.
template <typename ForEachAcc>
std::pair<std::uint32_t, std::int64_t> threshold_among(std::int64_t nlists, std::int64_t total,
                                                        const ForEachAcc& for_each_acc, std::int64_t need, int level,
                                                        std::uint32_t prefix, std::uint32_t mask) {
  // A few runs of lists per thread, each with its own histogram (counts add up to the same
  // totals in any order, so the result does not depend on the split).
  const std::int64_t runs = total > (std::int64_t{1} << 16) ? std::min<std::int64_t>(nlists, 4 * num_threads()) : 1;
  const std::int64_t grain = (nlists + runs - 1) / runs;
  const std::int64_t run_len = parallel_chunk_size(0, nlists, grain);
  const std::int64_t nruns = (nlists + run_len - 1) / run_len;
  for (; level < 3; ++level) {
    const int bins = 1 << kTopkDigitBits[level];
    const int shift = kTopkDigitShift[level];
    std::vector<std::uint32_t> per_run(static_cast<std::size_t>(nruns * bins), 0);
    parallel_for(0, nlists, grain, [&](std::int64_t lb, std::int64_t le) {
      std::uint32_t* h = per_run.data() + (lb / run_len) * bins;
      for (std::int64_t l = lb; l < le; ++l) {
        for_each_acc(l, [&](float acc) {
          const std::uint32_t key = magnitude_key(acc);
          if ((key & mask) == prefix) ++h[(key >> shift) & static_cast<std::uint32_t>(bins - 1)];
        });
      }
    });
    std::vector<std::int64_t> h(static_cast<std::size_t>(bins), 0);
    for (std::int64_t l = 0; l < nruns; ++l) {
      for (int j = 0; j < bins; ++j) h[static_cast<std::size_t>(j)] += per_run[static_cast<std::size_t>(l * bins + j)];
    }
    const auto [bin, above] = select_bin(h.data(), bins, need);
    need -= above;
    prefix |= static_cast<std::uint32_t>(bin) << shift;
    mask |= static_cast<std::uint32_t>(bins - 1) << shift;
  }
  return {prefix, need};
}

std::pair<std::uint32_t, std::int64_t> threshold_among(const CandidateLists& lists, std::int64_t need, int level,
                                                        std::uint32_t prefix, std::uint32_t mask) {
  std::int64_t total = 0;
  for (const auto& list : lists) total += static_cast<std::int64_t>(list.size());
  return threshold_among(
      static_cast<std::int64_t>(lists.size()), total,
      [&](std::int64_t l, auto&& f) {
        for (const Candidate& c : lists[static_cast<std::size_t>(l)]) f(c.acc);
      },
      need, level, prefix, mask);
}

// Calls take(candidate) for every selected candidate, in index order.
template <typename Fn>
void pick(const CandidateLists& lists, std::uint32_t threshold, std::int64_t ties, Fn&& take) {
  for (const auto& list : lists) {
    for (const Candidate& c : list) {
      const std::uint32_t key = magnitude_key(c.acc);
      if (key > threshold || (key == threshold && ties > 0)) {
        if (key == threshold) --ties;
        take(c);
      }
    }
  }
}

// Sampling pre-pass: a lower bound on the k-th largest key from evenly spread contiguous blocks,
// set about four standard deviations low so that usually at least k entries reach it. nullopt
// when the tensor is small or k so large that a bound would not filter much.
constexpr std::int64_t kSampleMinNumel = std::int64_t{1} << 18;
constexpr std::int64_t kSampleBlocks = 256;
constexpr std::int64_t kSampleMaxDensityInverse = 3;  // sample only for k <= n / 3

struct SampleBound {
  std::uint32_t key;          // lower bound: usually at least k entries are >= key
  std::uint32_t upper;        // entries with a key above it are (usually) fewer than k: all selected
  double expected_fraction;   // of all entries expected at or above key
  double sure_fraction;       // of all entries expected above upper
};

template <typename G>
std::optional<SampleBound> sample_bound(const typename G::Storage* g, const typename G::Storage* r, std::int64_t n,
                                        std::int64_t k) {
  // Above a few percent the kept entries cost more (a 16-byte record each, then five sweeps)
  // than the two-pass select's second read of acc.
  if (n < kSampleMinNumel || k > n / kSampleMaxDensityInverse) return std::nullopt;
  const std::int64_t block = std::min<std::int64_t>(256, n / (kSampleBlocks * 8));
  const std::int64_t s = block * kSampleBlocks;
  const double expected = static_cast<double>(k) * static_cast<double>(s) / static_cast<double>(n);
  const auto m = static_cast<std::int64_t>(std::ceil(expected + 4.0 * std::sqrt(expected) + 16.0));
  if (m >= s / 2) return std::nullopt;
  std::vector<std::uint32_t> keys(static_cast<std::size_t>(s));
  for (std::int64_t j = 0; j < kSampleBlocks; ++j) {
    const std::int64_t start = (n - block) * j / (kSampleBlocks - 1);
    for (std::int64_t t = 0; t < block; ++t) {
      const std::int64_t i = start + t;
      float acc = G::load(g[i]);
      if (r != nullptr) acc = G::load(G::store(acc + G::load(r[i])));
      keys[static_cast<std::size_t>(j * block + t)] = magnitude_key(acc);
    }
  }
  // The m-th largest key by a histogram of the first digit, then nth_element within its bin only
  // (this runs on one thread before the pass: a full nth_element cost ~5% of the call).
  std::vector<std::uint32_t> hist(kBins1, 0);
  for (const std::uint32_t key : keys) ++hist[key >> kTopkDigitShift[0]];
  std::vector<std::uint32_t> in_bin;
  auto largest = [&](std::int64_t rank) {  // rank 1 = the largest
    const auto [bin, above] = select_bin(hist.data(), kBins1, rank);
    in_bin.clear();
    for (const std::uint32_t key : keys) {
      if ((key >> kTopkDigitShift[0]) == static_cast<std::uint32_t>(bin)) in_bin.push_back(key);
    }
    const auto nth = in_bin.begin() + (rank - above - 1);
    std::nth_element(in_bin.begin(), nth, in_bin.end(), std::greater<>());
    return *nth;
  };
  const std::uint32_t lower = largest(m);
  // The upper bound, as many standard deviations the other way: entries above it are kept in a
  // list of sure picks that skips the exact select.
  const auto m_hi = static_cast<std::int64_t>(std::floor(expected - 4.0 * std::sqrt(expected) - 16.0));
  std::uint32_t upper = ~0u;
  if (m_hi >= 1) upper = std::max(largest(m_hi), lower);
  return SampleBound{lower, upper, static_cast<double>(m) / static_cast<double>(s),
                     static_cast<double>(std::max<std::int64_t>(m_hi, 0)) / static_cast<double>(s)};
}

// One chunk's entries kept by the one pass, in index order: their acc and offset in the chunk, as
// two arrays so that eight of them are written with two vector stores. Writers may store up to
// kKeptSlack entries past `size` (branch-free compaction), so the arrays hold cap + kKeptSlack.
constexpr std::int64_t kKeptSlack = 8;

// Memory for the kept lists, kept between calls: a fresh page costs a fault and a kernel zeroing
// at first touch, which at N = 1e8 and density 0.1 (~90 MB of lists) cost about half as much as
// the pass itself. Lists hand their buffers back when a call ends; at most kScratchCacheBytes stay
// cached (process-wide, thread-safe), the rest is freed.
constexpr std::size_t kScratchCacheBytes = std::size_t{256} << 20;

class ScratchCache {
 public:
  struct Buffer {
    std::unique_ptr<unsigned char[]> data;
    std::size_t bytes = 0;
  };

  static ScratchCache& instance() {
    static ScratchCache cache;
    return cache;
  }

  // A buffer of at least `bytes` (a cached one if one fits without wasting much), uninitialised.
  Buffer take(std::size_t bytes) {
    {
      State& st = *state_;
      std::lock_guard<std::mutex> lock(st.mu);
      const auto it = st.free.lower_bound(bytes);
      if (it != st.free.end() && it->first <= 2 * bytes + (std::size_t{64} << 10)) {
        Buffer b = std::move(it->second);
        st.free.erase(it);
        st.cached -= b.bytes;
        return b;
      }
    }
    return Buffer{std::unique_ptr<unsigned char[]>(new unsigned char[bytes]), bytes};
  }

  void give(Buffer b) {
    if (!b.data) return;
    State& st = *state_;
    std::lock_guard<std::mutex> lock(st.mu);
    if (st.cached + b.bytes > kScratchCacheBytes) return;  // freed as `b` goes out of scope
    st.cached += b.bytes;
    st.free.emplace(b.bytes, std::move(b));
  }

 private:
  struct State {
    std::mutex mu;
    std::multimap<std::size_t, Buffer> free;
    std::size_t cached = 0;
  };

  ScratchCache() { pthread_atfork(nullptr, nullptr, &reset_after_fork); }

  // The child of a fork has only the forking thread; another thread of the parent may have held
  // the lock or been inside the map. Start over with a fresh state (the old one is leaked).
  static void reset_after_fork() { instance().state_ = new State(); }

  State* state_ = new State();  // never freed: a thread may still use it during exit
};

// One cache line each: threads fill neighbouring chunks' lists, and sharing a line made every
// block's count update bounce between cores.
struct alignas(64) KeptList {
  float* acc = nullptr;
  std::uint32_t* off = nullptr;
  std::int64_t size = 0;
  std::int64_t cap = 0;

  KeptList() = default;
  KeptList(const KeptList&) = delete;
  KeptList& operator=(const KeptList&) = delete;
  ~KeptList() { ScratchCache::instance().give(std::move(buf_)); }

  // Room for `more` further entries; false (nothing changed) when that would exceed `limit`.
  bool make_room(std::int64_t more, std::int64_t limit) {
    if (size + more <= cap) return true;
    if (size + more > limit) return false;
    const std::int64_t want = std::min(limit, std::max(2 * cap, size + more));
    constexpr std::size_t kEntryBytes = sizeof(float) + sizeof(std::uint32_t);
    ScratchCache::Buffer b = ScratchCache::instance().take(static_cast<std::size_t>(want + kKeptSlack) * kEntryBytes);
    // Uninitialised on purpose: only the part written is ever touched.
    const auto fits = static_cast<std::int64_t>(b.bytes / kEntryBytes) - kKeptSlack;
    auto* a = reinterpret_cast<float*>(b.data.get());
    auto* o = reinterpret_cast<std::uint32_t*>(a + fits + kKeptSlack);
    if (size > 0) {
      std::memcpy(a, acc, static_cast<std::size_t>(size) * sizeof(float));
      std::memcpy(o, off, static_cast<std::size_t>(size) * sizeof(std::uint32_t));
    }
    ScratchCache::instance().give(std::move(buf_));
    buf_ = std::move(b);
    acc = a;
    off = o;
    cap = fits;
    return true;
  }

 private:
  ScratchCache::Buffer buf_;
};

// Appends entries to a chunk's sure list (key above upper) or band list (between the bounds)
// without a data-dependent branch: both slots are written, only the matching count advances.
// Works on local copies of the lists' pointers and counts (the two lists could alias as far as
// the compiler knows, which made it reload them around every store); flush() writes the counts
// back.
class BranchFreeKeeper {
 public:
  BranchFreeKeeper(KeptList& sure, KeptList& band, std::uint32_t lower, std::uint32_t upper) noexcept
      : sure_(sure), band_(band), sa_(sure.acc), ba_(band.acc), so_(sure.off), bo_(band.off), ns_(sure.size),
        nb_(band.size), lower_(lower), upper_(upper) {}

  // Returns whether it is a sure entry.
  bool keep(float acc, std::uint32_t off) noexcept {
    const std::uint32_t key = magnitude_key(acc);
    const bool is_sure = key > upper_;
    const bool is_band = key >= lower_ && !is_sure;
    sa_[ns_] = acc;
    so_[ns_] = off;
    ns_ += is_sure;
    ba_[nb_] = acc;
    bo_[nb_] = off;
    nb_ += is_band;
    return is_sure;
  }

  void flush() noexcept {
    sure_.size = ns_;
    band_.size = nb_;
  }

 private:
  KeptList& sure_;
  KeptList& band_;
  float* __restrict sa_;
  float* __restrict ba_;
  std::uint32_t* __restrict so_;
  std::uint32_t* __restrict bo_;
  std::int64_t ns_, nb_;
  const std::uint32_t lower_, upper_;
};

// Whether the float32 one pass may use its AVX2 loop: the CPU has AVX2 and
// AUTOGLM_RT_TOPK_SIMD is not "scalar" (read on every call, so a test can compare both paths).
bool topk_use_avx2() noexcept {
#ifdef AGRT_TOPK_X86
  const char* cap = std::getenv("AUTOGLM_RT_TOPK_SIMD");
  if (cap != nullptr && std::strcmp(cap, "scalar") == 0) return false;
  return cpu_has_avx2() && __builtin_cpu_supports("popcnt");
#else
  return false;
#endif
}

#ifdef AGRT_TOPK_X86
// Left-packing table: row m lists, in order, the lanes whose bit is set in the 8-bit mask m.
struct LeftPackTable {
  std::uint8_t lane[256][8];
};
constexpr LeftPackTable make_left_pack_table() {
  LeftPackTable t{};
  for (int m = 0; m < 256; ++m) {
    int p = 0;
    for (int j = 0; j < 8; ++j) {
      if ((m >> j) & 1) t.lane[m][p++] = static_cast<std::uint8_t>(j);
    }
  }
  return t;
}
alignas(64) constexpr LeftPackTable kLeftPack = make_left_pack_table();

// The float32 one pass over [0, len) of g (and r), eight entries per step and no branch on the
// data: acc = g + r; residual = acc, or 0 above `upper` (a sure pick); the entries above `upper`
// and those in [lower, upper] are left-packed (a table permutation, then a popcount advance) onto
// the two lists with offsets off0 + j. Both lists need room for len entries (plus the slack).
// NaN keys are clamped to kTopkNanKey before the compares, as magnitude_key() does.
// kSkipEmpty: skip the packing for groups that keep nothing, a branch that is cheaper when few
// groups keep anything (low density) and mispredicts when many do.
template <bool kResidual, bool kSkipEmpty>
__attribute__((target("avx2,popcnt"))) void scan_f32_avx2(const float* __restrict g, float* __restrict r, int len,
                                                         std::uint32_t off0, std::uint32_t lower,
                                                         std::uint32_t upper, KeptList& sure, KeptList& band) {
  const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
  const __m256i nan_key = _mm256_set1_epi32(static_cast<std::int32_t>(kTopkNanKey));
  // Keys are < 2^31, so signed compares are exact; `lower - 1` is -1 when lower is 0 (keep all),
  // and an upper bound beyond every key (~0u: none sure) becomes 0x7fffffff.
  const __m256i below = _mm256_set1_epi32(static_cast<std::int32_t>(lower) - 1);
  const __m256i up = _mm256_set1_epi32(static_cast<std::int32_t>(std::min(upper, 0x7fffffffu)));
  const __m256i step = _mm256_set1_epi32(8);
  __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<std::int32_t>(off0)),
                                 _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  float* __restrict sa = sure.acc;
  std::uint32_t* __restrict so = sure.off;
  float* __restrict ba = band.acc;
  std::uint32_t* __restrict bo = band.off;
  std::int64_t ns = sure.size, nb = band.size;
  int j = 0;
  for (; j + 8 <= len; j += 8) {
    __m256 acc = _mm256_loadu_ps(g + j);
    if constexpr (kResidual) acc = _mm256_add_ps(acc, _mm256_loadu_ps(r + j));
    const __m256i key = _mm256_min_epu32(_mm256_and_si256(_mm256_castps_si256(acc), abs_mask), nan_key);
    const __m256i is_sure = _mm256_cmpgt_epi32(key, up);
    const __m256i is_kept = _mm256_cmpgt_epi32(key, below);
    if constexpr (kResidual) _mm256_storeu_ps(r + j, _mm256_andnot_ps(_mm256_castsi256_ps(is_sure), acc));
    const auto ms = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(is_sure)));
    const auto mb = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(is_sure, is_kept))));
    if constexpr (kSkipEmpty) {
      if ((ms | mb) == 0) {
        idx = _mm256_add_epi32(idx, step);
        continue;
      }
    }
    const __m256i ps = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kLeftPack.lane[ms])));
    _mm256_storeu_ps(sa + ns, _mm256_permutevar8x32_ps(acc, ps));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(so + ns), _mm256_permutevar8x32_epi32(idx, ps));
    ns += _mm_popcnt_u32(ms);
    const __m256i pb = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(kLeftPack.lane[mb])));
    _mm256_storeu_ps(ba + nb, _mm256_permutevar8x32_ps(acc, pb));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(bo + nb), _mm256_permutevar8x32_epi32(idx, pb));
    nb += _mm_popcnt_u32(mb);
    idx = _mm256_add_epi32(idx, step);
  }
  sure.size = ns;
  band.size = nb;
  BranchFreeKeeper keeper(sure, band, lower, upper);
  for (; j < len; ++j) {
    const float acc = kResidual ? g[j] + r[j] : g[j];
    const bool is_sure = keeper.keep(acc, off0 + static_cast<std::uint32_t>(j));
    if constexpr (kResidual) r[j] = is_sure ? 0.0f : acc;
  }
  keeper.flush();
}

// The first t in [si, ns) with off[t] >= end (ns if none), off ascending: eight offsets per
// compare. Reads up to 7 entries past ns (the lists' slack; what is there does not matter).
__attribute__((target("avx2,bmi"))) std::int64_t run_end_avx2(const std::uint32_t* off, std::int64_t si,
                                                              std::int64_t ns, std::uint32_t end) {
  // Offsets and end are unsigned: flip the top bit so the signed compare orders them right.
  const __m256i flip = _mm256_set1_epi32(static_cast<std::int32_t>(0x80000000u));
  const __m256i e = _mm256_xor_si256(_mm256_set1_epi32(static_cast<std::int32_t>(end)), flip);
  std::int64_t t = si;
  while (t < ns) {
    const __m256i o = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(off + t)), flip);
    const auto below = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(e, o))));
    if (below != 0xffu) {
      t += static_cast<std::int64_t>(_tzcnt_u32(~below));  // the entries below end are a prefix
      break;
    }
    t += 8;
  }
  return std::min(t, ns);
}
#endif  // AGRT_TOPK_X86

std::int64_t run_end_scalar(const std::uint32_t* off, std::int64_t si, std::int64_t ns, std::uint32_t end) {
  while (si < ns && off[si] < end) ++si;
  return si;
}


template <typename G, typename V, typename I>
class Compressor {
  using GS = typename G::Storage;
  using VS = typename V::Storage;

 public:
  Compressor(const TensorView& grad, const TensorView& residual, std::int64_t k, const TensorView& values,
             const TensorView& indices, const TensorView& sq_norm)
      : n_(grad.numel),
        k_(k),
        g_(grad.as<const GS>()),
        r_(residual.numel > 0 ? residual.as<GS>() : nullptr),
        src_(r_ != nullptr ? r_ : g_),
        vout_(values.as<VS>()),
        iout_(indices.as<I>()),
        chunk_(parallel_chunk_size(0, n_, kGrain)),
        nchunks_((n_ + chunk_ - 1) / chunk_),
        sq_out_(sq_norm.numel > 0 ? static_cast<double*>(sq_norm.data) : nullptr),
        sq_chunk_(sq_out_ != nullptr ? static_cast<std::size_t>(nchunks_) : 0, 0.0) {
    // Per-chunk histograms: chunk lengths are < 2^32 for any tensor below 2^40 elements.
    AGRT_EXPECTS(chunk_ < (std::int64_t{1} << 32), ValueError, "topk_compress: tensor too large (", n_,
                 " elements)");
  }

  void run() {
    bool accumulated = false;
    if (const auto bound = sample_bound<G>(g_, r_, n_, k_)) {
      accumulated = true;  // on a miss the residual already holds acc: select over it
      if (one_pass(*bound)) {
        write_sq_norm();
        return;
      }
    }
    two_pass(!accumulated);
    write_sq_norm();
  }

 private:
  // acc for entries [i, i+len) into accs (and residual); true if any reaches `lower`. Written so
  // that the float32 case vectorises: no early exit, restrict pointers, a branch-free flag.
  static constexpr int kBlock = 128;
  template <bool kResidual>
  bool accumulate_block(std::int64_t i, int len, float* __restrict accs, std::uint32_t lower) const {
    const GS* __restrict g = g_ + i;
    GS* __restrict r = kResidual ? r_ + i : nullptr;
    std::int32_t hit = 0;
    for (int j = 0; j < len; ++j) {
      float acc = G::load(g[j]);
      if constexpr (kResidual) {
        const GS stored = G::store(acc + G::load(r[j]));
        r[j] = stored;
        acc = G::load(stored);
      }
      accs[j] = acc;
      // Magnitude bits (< 2^31) compare correctly as signed. Raw NaN bits are >= the canonical
      // NaN key, the largest `lower` can be, so this filter needs no canonicalisation.
      const auto key = static_cast<std::int32_t>(detail::float_to_bits(acc) & 0x7fffffffu);
      hit |= static_cast<std::int32_t>(key >= static_cast<std::int32_t>(lower));
    }
    return hit != 0;
  }

  // Sum of grad^2 over one block, in float64 with four accumulators in a fixed order (so the
  // compiler may vectorise it and the result does not depend on threads). Called on the block the
  // pass is about to read, so the pass finds it in L1: grad still comes from memory once.
  double block_sq(std::int64_t i, int len) const {
    const GS* __restrict g = g_ + i;
    double s[4] = {0, 0, 0, 0};
    int j = 0;
    for (; j + 4 <= len; j += 4) {
      for (int t = 0; t < 4; ++t) {
        const double x = G::load(g[j + t]);
        s[t] += x * x;
      }
    }
    for (; j < len; ++j) {
      const double x = G::load(g[j]);
      s[0] += x * x;
    }
    return (s[0] + s[1]) + (s[2] + s[3]);
  }

  // The chunks' sums, added in chunk order (chunks do not depend on the thread count).
  void write_sq_norm() const {
    if (sq_out_ == nullptr) return;
    double total = 0;
    for (const double part : sq_chunk_) total += part;
    *sq_out_ = total;
  }

  void zero_residual(std::int64_t i) const {
    if (r_ != nullptr) r_[i] = G::store(0.0f);
  }

  // One block of the one pass without the AVX2 loop (other dtypes, or no AVX2): accumulate (a
  // loop the compiler vectorises), then, only if some entry reached `lower`, a compare of four
  // at a time and a bit mask, so the scan costs per entry kept rather than per entry looked at.
  // Measured against a branch-free append of every entry of such groups (four stores each), one
  // thread, N = 6.55e6: as fast at density 0.001, 35 -> 20 ms at 0.1 (the kernel before the AVX2
  // loop: 27 ms). Both lists need room for len entries (plus the slack).
  template <bool kResidual>
  void scan_block_scalar(std::int64_t i, int len, std::uint32_t off0, std::uint32_t lower, std::uint32_t upper,
                         KeptList& sure, KeptList& band) const {
    float accs[kBlock];
    if (!accumulate_block<kResidual>(i, len, accs, lower)) return;
    float* __restrict sa = sure.acc;
    float* __restrict ba = band.acc;
    std::uint32_t* __restrict so = sure.off;
    std::uint32_t* __restrict bo = band.off;
    std::int64_t ns = sure.size, nb = band.size;
    auto keep = [&](int j) {
      const auto off = off0 + static_cast<std::uint32_t>(j);
      if (magnitude_key(accs[j]) > upper) {
        sa[ns] = accs[j];
        so[ns++] = off;
        // Selected for certain: clear its residual now, while the line is in cache (undone by
        // restore_sure() if the bounds turn out to have missed).
        zero_residual(i + j);
      } else {
        ba[nb] = accs[j];
        bo[nb++] = off;
      }
    };
    int j = 0;
#ifdef AGRT_TOPK_X86
    // `lower - 1` as signed: keys are < 2^31, lower 0 keeps all. Raw NaN bits are >= the
    // canonical NaN key, the largest `lower` can be, so this filter needs no canonicalisation.
    const __m128i below = _mm_set1_epi32(static_cast<std::int32_t>(lower) - 1);
    const __m128i abs_mask = _mm_set1_epi32(0x7fffffff);
    for (; j + 4 <= len; j += 4) {
      const __m128i bits = _mm_and_si128(_mm_castps_si128(_mm_loadu_ps(accs + j)), abs_mask);
      auto m = static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(bits, below))));
      while (m != 0) {
        keep(j + __builtin_ctz(m));
        m &= m - 1;
      }
    }
#endif
    for (; j < len; ++j) {
      if (magnitude_key(accs[j]) >= lower) keep(j);
    }
    sure.size = ns;
    band.size = nb;
  }

  template <bool kResidual>
  void scan_block(bool avx2, bool sparse, std::int64_t i, int len, std::uint32_t off0, std::uint32_t lower,
                  std::uint32_t upper, KeptList& sure, KeptList& band) const {
#ifdef AGRT_TOPK_X86
    if constexpr (std::is_same_v<G, F32>) {
      GS* r = kResidual ? r_ + i : nullptr;
      if (avx2 && sparse) return scan_f32_avx2<kResidual, true>(g_ + i, r, len, off0, lower, upper, sure, band);
      if (avx2) return scan_f32_avx2<kResidual, false>(g_ + i, r, len, off0, lower, upper, sure, band);
    }
#endif
    (void)avx2;
    (void)sparse;
    scan_block_scalar<kResidual>(i, len, off0, lower, upper, sure, band);
  }

  // One pass: accumulate; entries above the upper bound go to per-chunk "sure" lists (their
  // residual cleared at once), entries between the bounds to per-chunk band lists, both without a
  // branch per kept entry. The exact select runs over the band alone, then each chunk merges its
  // sure entries and its selected band entries into the output in index order. Returns false
  // (nothing written but residual, which then holds acc) when the bounds missed: k or more sure
  // entries, fewer than k kept, or a chunk keeping far more than expected.
  bool one_pass(const SampleBound& bound) {
    const auto nl = static_cast<std::size_t>(nchunks_);
    std::vector<KeptList> sure(nl), band(nl);
    std::atomic<bool> overflow{false};
    const bool avx2 = topk_use_avx2();
    // Below 2% kept, most groups of eight keep nothing: skipping them beats packing every group
    // (measured at N = 1e8, density 0.001: 75 -> 64-68 ms).
    const bool sparse = bound.expected_fraction < 0.02;
    const std::uint32_t lower = bound.key, upper = bound.upper;
    parallel_for(0, n_, kGrain, [&](std::int64_t b, std::int64_t e) {
      KeptList& sl = sure[static_cast<std::size_t>(b / chunk_)];
      KeptList& bl = band[static_cast<std::size_t>(b / chunk_)];
      const auto len = static_cast<double>(e - b);
      // At most this many kept entries per chunk (heavy ties, or a bound far off): then the
      // exact two-pass select takes over.
      const auto limit = static_cast<std::int64_t>(4.0 * bound.expected_fraction * len) + 4096;
      const auto sure_guess = static_cast<std::int64_t>(1.25 * bound.sure_fraction * len) + 1024;
      const auto band_guess =
          static_cast<std::int64_t>(1.5 * (bound.expected_fraction - bound.sure_fraction) * len) + 1024;
      bool full = !sl.make_room(std::min(sure_guess, limit), limit) || !bl.make_room(std::min(band_guess, limit), limit);
      double sq = 0;
      for (std::int64_t i = b; i < e; i += kBlock) {
        const int blen = static_cast<int>(std::min<std::int64_t>(kBlock, e - i));
        if (sq_out_ != nullptr) sq += block_sq(i, blen);
        full = full || sl.size + bl.size + blen > limit || !sl.make_room(blen, limit) || !bl.make_room(blen, limit);
        if (full) {
          // Keep accumulating so that the residual holds acc everywhere for the exact select.
          overflow.store(true, std::memory_order_relaxed);
          float accs[kBlock];
          if (r_ != nullptr) accumulate_block<true>(i, blen, accs, lower);
          continue;
        }
        const auto off0 = static_cast<std::uint32_t>(i - b);
        if (r_ != nullptr) {
          scan_block<true>(avx2, sparse, i, blen, off0, lower, upper, sl, bl);
        } else {
          scan_block<false>(avx2, sparse, i, blen, off0, lower, upper, sl, bl);
        }
      }
      if (sq_out_ != nullptr) sq_chunk_[static_cast<std::size_t>(b / chunk_)] = sq;
    });
    // On a miss the residual must hold acc everywhere again before the exact select reads it.
    auto restore_sure = [&] {
      if (r_ == nullptr) return false;
      for (std::size_t c = 0; c < nl; ++c) {
        const std::int64_t base = static_cast<std::int64_t>(c) * chunk_;
        for (std::int64_t j = 0; j < sure[c].size; ++j) {
          r_[base + sure[c].off[static_cast<std::size_t>(j)]] = G::store(sure[c].acc[static_cast<std::size_t>(j)]);
        }
      }
      return false;
    };
    if (overflow.load()) return restore_sure();
    std::int64_t sure_total = 0, band_total = 0;
    for (std::size_t c = 0; c < nl; ++c) {
      sure_total += sure[c].size;
      band_total += band[c].size;
    }
    if (sure_total >= k_ || sure_total + band_total < k_) return restore_sure();
    const auto [threshold, ties] = threshold_among(
        nchunks_, band_total,
        [&](std::int64_t l, auto&& f) {
          const KeptList& list = band[static_cast<std::size_t>(l)];
          for (std::int64_t j = 0; j < list.size; ++j) f(list.acc[static_cast<std::size_t>(j)]);
        },
        k_ - sure_total, 0, 0u, 0u);

    // Per chunk: band entries above the threshold, and at it (ties go to the lowest indices).
    std::vector<std::int64_t> above(nl, 0), equal(nl, 0);
    parallel_for(0, nchunks_, 1, [&](std::int64_t cb, std::int64_t ce) {
      for (auto c = static_cast<std::size_t>(cb); c < static_cast<std::size_t>(ce); ++c) {
        // Counted in locals: neighbouring chunks' counters share a cache line across threads.
        std::int64_t a = 0, q = 0;
        for (std::int64_t j = 0; j < band[c].size; ++j) {
          const std::uint32_t key = magnitude_key(band[c].acc[static_cast<std::size_t>(j)]);
          a += key > threshold;
          q += key == threshold;
        }
        above[c] = a;
        equal[c] = q;
      }
    });
    std::vector<std::int64_t> out_off(nl), ties_before(nl);
    std::int64_t o = 0, t = 0;
    for (std::size_t c = 0; c < nl; ++c) {
      out_off[c] = o;
      ties_before[c] = t;
      o += sure[c].size + above[c] + std::clamp<std::int64_t>(ties - t, 0, equal[c]);
      t += equal[c];
    }
    if (o != k_) AGRT_FAIL(RuntimeError, "topk_compress: selected ", o, " entries, expected ", k_);
    parallel_for(0, nchunks_, 1, [&](std::int64_t cb, std::int64_t ce) {
      for (auto c = static_cast<std::size_t>(cb); c < static_cast<std::size_t>(ce); ++c) {
        const std::int64_t base = static_cast<std::int64_t>(c) * chunk_;
        // Locals, not members, so stores through the outputs cannot force reloads.
        VS* __restrict vout = vout_ + out_off[c];
        I* __restrict iout = iout_ + out_off[c];
        const float* __restrict sa = sure[c].acc;
        const std::uint32_t* __restrict so = sure[c].off;
        const std::int64_t ns = sure[c].size;
        std::int64_t pos = 0, si = 0, tie = ties_before[c];
        // Copies the sure entries [si, stop): a loop without a compare per entry.
        auto emit_sure_until = [&](std::int64_t stop) {
          VS* __restrict v = vout + pos;
          I* __restrict ix = iout + pos;
          const std::int64_t count = stop - si;
          for (std::int64_t t = 0; t < count; ++t) {
            v[t] = V::store(sa[si + t]);
            ix[t] = static_cast<I>(base + so[si + t]);
          }
          pos += count;
          si = stop;
        };
        // Where the run of sure entries before offset `end` stops (runs average ~sure/band long).
        auto run_end = [&](std::uint32_t end) {
#ifdef AGRT_TOPK_X86
          if (avx2) return run_end_avx2(so, si, ns, end);
#endif
          return run_end_scalar(so, si, ns, end);
        };
        const std::int64_t nb = band[c].size;
        for (std::int64_t j = 0; j < nb; ++j) {
          const float acc = band[c].acc[static_cast<std::size_t>(j)];
          const std::uint32_t key = magnitude_key(acc);
          if (!(key > threshold || (key == threshold && tie++ < ties))) continue;
          const std::uint32_t off = band[c].off[static_cast<std::size_t>(j)];
          emit_sure_until(run_end(off));
          vout[pos] = V::store(acc);
          iout[pos] = static_cast<I>(base + off);
          ++pos;
          zero_residual(base + off);  // sure entries were cleared in the pass
        }
        emit_sure_until(ns);
      }
    });
    return true;
  }

  // Pass 1: (accumulate and) histogram the first digit per chunk. Pass 2: entries above the
  // threshold bin go straight to the outputs, entries in it become candidates.
  void two_pass(bool do_accumulate) {
    std::vector<std::uint32_t> hist(static_cast<std::size_t>(nchunks_) * kBins1, 0);
    parallel_for(0, n_, kGrain, [&](std::int64_t b, std::int64_t e) {
      // Four sub-histograms break the store-to-load chain when neighbours share a bin.
      std::vector<std::uint32_t> sub(4 * kBins1, 0);
      std::uint32_t* __restrict hs = sub.data();
      float accs[kBlock];
      const bool sum_sq = do_accumulate && sq_out_ != nullptr;  // else one_pass summed already
      double sq = 0;
      for (std::int64_t i = b; i < e; i += kBlock) {
        const int len = static_cast<int>(std::min<std::int64_t>(kBlock, e - i));
        if (sum_sq) sq += block_sq(i, len);
        if (do_accumulate && r_ != nullptr) {
          accumulate_block<true>(i, len, accs, 0);
        } else {
          for (int j = 0; j < len; ++j) accs[j] = G::load(src_[i + j]);
        }
        for (int j = 0; j < len; ++j) ++hs[(j & 3) * kBins1 + (magnitude_key(accs[j]) >> kTopkDigitShift[0])];
      }
      if (sum_sq) sq_chunk_[static_cast<std::size_t>(b / chunk_)] = sq;
      std::uint32_t* h = hist.data() + (b / chunk_) * kBins1;
      for (int j = 0; j < kBins1; ++j) h[j] = sub[j] + sub[kBins1 + j] + sub[2 * kBins1 + j] + sub[3 * kBins1 + j];
    });

    std::vector<std::int64_t> total(kBins1, 0);
    for (std::int64_t c = 0; c < nchunks_; ++c) {
      for (int j = 0; j < kBins1; ++j) total[j] += hist[static_cast<std::size_t>(c * kBins1 + j)];
    }
    const auto [b1, above_total] = select_bin(total.data(), kBins1, k_);
    std::vector<std::int64_t> above_off(static_cast<std::size_t>(nchunks_) + 1, 0);
    CandidateLists lists(static_cast<std::size_t>(nchunks_));
    for (std::int64_t c = 0; c < nchunks_; ++c) {
      const std::uint32_t* h = hist.data() + c * kBins1;
      std::int64_t above = 0;
      for (int j = b1 + 1; j < kBins1; ++j) above += h[j];
      above_off[c + 1] = above_off[c] + above;
      lists[static_cast<std::size_t>(c)].resize(h[b1]);
    }

    parallel_for(0, n_, kGrain, [&](std::int64_t b, std::int64_t e) {
      // Locals, not members, so stores through the outputs cannot force reloads.
      std::int64_t ao = above_off[b / chunk_];
      Candidate* __restrict cand = lists[static_cast<std::size_t>(b / chunk_)].data();
      VS* __restrict vout = vout_;
      I* __restrict iout = iout_;
      GS* __restrict res = r_;
      const GS* __restrict src = src_;
      const auto ub1 = static_cast<std::uint32_t>(b1);
      for (std::int64_t i = b; i < e; ++i) {
        const float acc = G::load(src[i]);
        const std::uint32_t d = magnitude_key(acc) >> kTopkDigitShift[0];
        if (d > ub1) {
          vout[ao] = V::store(acc);
          iout[ao] = static_cast<I>(i);
          ++ao;
          if (res != nullptr) res[i] = G::store(0.0f);
        } else if (d == ub1) {
          *cand++ = {acc, i};
        }
      }
    });

    const auto [threshold, ties] =
        threshold_among(lists, k_ - above_total, 1, static_cast<std::uint32_t>(b1) << kTopkDigitShift[0],
                        ~0u << kTopkDigitShift[0]);
    std::vector<Candidate> picked;
    picked.reserve(static_cast<std::size_t>(k_ - above_total));
    pick(lists, threshold, ties, [&](const Candidate& c) { picked.push_back(c); });
    // Merge the two index-ordered runs from the back, in place.
    std::int64_t a = above_total - 1;
    auto p = static_cast<std::int64_t>(picked.size()) - 1;
    for (std::int64_t o = k_ - 1; p >= 0; --o) {
      if (a >= 0 && static_cast<std::int64_t>(iout_[a]) > picked[static_cast<std::size_t>(p)].idx) {
        vout_[o] = vout_[a];
        iout_[o] = iout_[a];
        --a;
      } else {
        const Candidate& c = picked[static_cast<std::size_t>(p--)];
        vout_[o] = V::store(c.acc);
        iout_[o] = static_cast<I>(c.idx);
        zero_residual(c.idx);
      }
    }
  }

  const std::int64_t n_, k_;
  const GS* g_;
  GS* r_;
  const GS* src_;  // acc as stored: residual, or grad without error feedback
  VS* vout_;
  I* iout_;
  const std::int64_t chunk_, nchunks_;
  double* sq_out_;                  // sum of grad^2 goes here (nullptr: not asked for)
  std::vector<double> sq_chunk_;    // per chunk, written by the pass that reads grad
};

constexpr std::int64_t kPrefetch = 16;

// Throws ValueError naming the first chunk's bad index, before anything is written.
template <typename I>
void check_decompress_indices(const I* idx, std::int64_t m, std::int64_t n) {
  const std::int64_t chunk = parallel_chunk_size(0, m, kGrain);
  std::vector<std::int64_t> bad((static_cast<std::size_t>(m / std::max<std::int64_t>(chunk, 1)) + 1), -1);
  parallel_for(0, m, kGrain, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      const auto j = static_cast<std::int64_t>(idx[i]);
      if (j < 0 || j >= n) {
        bad[static_cast<std::size_t>(b / chunk)] = i;
        return;
      }
    }
  });
  for (const std::int64_t i : bad) {
    AGRT_EXPECTS(i < 0, ValueError, "topk_decompress: indices[", i, "] = ", static_cast<std::int64_t>(idx[i]),
                 " is outside out (", n, " elements)");
  }
}

template <typename V, typename I, typename O>
void decompress_cpu(const TensorView& values, const TensorView& indices, const TensorView& out, float scale,
                    bool check_indices) {
  using VS = typename V::Storage;
  using OS = typename O::Storage;
  const VS* v = values.as<const VS>();
  const I* idx = indices.as<const I>();
  OS* o = out.as<OS>();
  const std::int64_t m = values.numel;
  const std::int64_t n = out.numel;

  // Validate every index first so a bad one leaves `out` untouched. Unchecked, the sweep below
  // skips indices outside [0, n) anyway: each part writes only inside its own slice.
  if (check_indices) check_decompress_indices(idx, m, n);

  // Each thread owns a slice of `out` and applies, in order, the updates that land in it: no
  // races, and duplicates accumulate in the order of `values` whatever the thread count.
  // Below a million updates one in-order sweep beats every thread re-reading all of them.
  const int parts = m >= (std::int64_t{1} << 20) ? std::max(1, num_threads()) : 1;
  const std::int64_t span = (n + parts - 1) / parts;
  parallel_for(0, parts, 1, [&](std::int64_t pb, std::int64_t pe) {
    for (std::int64_t part = pb; part < pe; ++part) {
      const std::int64_t lo = part * span, hi = std::min(n, lo + span);
      for (std::int64_t i = 0; i < m; ++i) {
        // Each rank's indices ascend with gaps of many cache lines: prefetch a few updates ahead.
        if (i + kPrefetch < m) {
          const auto ahead = static_cast<std::int64_t>(idx[i + kPrefetch]);
          if (ahead >= 0 && ahead < n) __builtin_prefetch(o + ahead, 1);
        }
        const auto j = static_cast<std::int64_t>(idx[i]);
        if (j >= lo && j < hi) o[j] = O::store(O::load(o[j]) + scale * V::load(v[i]));
      }
    }
  });
}

// Whether two views share any byte (same device, intersecting address ranges).
bool overlaps(const TensorView& a, const TensorView& b) noexcept {
  if (a.numel == 0 || b.numel == 0 || a.data == nullptr || b.data == nullptr || a.device != b.device) return false;
  const auto a0 = reinterpret_cast<std::uintptr_t>(a.data);
  const auto b0 = reinterpret_cast<std::uintptr_t>(b.data);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// Outputs are written while inputs are still read: any shared byte would give garbage silently.
void check_no_overlap(const TensorView& grad, const TensorView& residual, const TensorView& values,
                      const TensorView& indices, const TensorView& sq_norm) {
  const std::pair<const TensorView*, const char*> views[] = {
      {&grad, "grad"}, {&residual, "residual"}, {&values, "values"}, {&indices, "indices"}, {&sq_norm, "sq_norm"}};
  for (std::size_t i = 0; i < 5; ++i) {
    for (std::size_t j = i + 1; j < 5; ++j) {
      AGRT_EXPECTS(!overlaps(*views[i].first, *views[j].first), ValueError, "topk_compress: ", views[j].second,
                   " overlaps ", views[i].second, " in memory; expected separate buffers (", views[j].second,
                   " or ", views[i].second, " is written while the other is read)");
    }
  }
}

void check_compress_args(const TensorView& grad, const TensorView& residual, std::int64_t k, const TensorView& values,
                         const TensorView& indices, const TensorView& sq_norm) {
  AGRT_EXPECTS(is_floating(grad.dtype), TypeError, "topk_compress: grad: expected float32, float16 or bfloat16, got ",
               dtype_name(grad.dtype));
  AGRT_EXPECTS(grad.numel >= 1, ValueError, "topk_compress: grad is empty; expected at least one element");
  AGRT_EXPECTS(k >= 1 && k <= grad.numel, ValueError, "topk_compress: k must be in 1..", grad.numel,
               " (grad.numel), got ", k);
  if (residual.numel > 0) {
    AGRT_EXPECTS(residual.dtype == grad.dtype, TypeError, "topk_compress: residual has dtype ",
                 dtype_name(residual.dtype), ", expected grad's dtype ", dtype_name(grad.dtype));
    AGRT_EXPECTS(residual.numel == grad.numel, ValueError, "topk_compress: residual has ", residual.numel,
                 " elements, grad has ", grad.numel);
    AGRT_EXPECTS(residual.device == grad.device, ValueError, "topk_compress: residual is on ", residual.device.str(),
                 ", grad on ", grad.device.str());
    AGRT_EXPECTS(!residual.read_only, ValueError, "topk_compress: residual is read-only; it is updated in place");
  }
  AGRT_EXPECTS(is_floating(values.dtype), TypeError,
               "topk_compress: values: expected float32, float16 or bfloat16, got ", dtype_name(values.dtype));
  AGRT_EXPECTS(indices.dtype == DType::kInt32 || indices.dtype == DType::kInt64, TypeError,
               "topk_compress: indices: expected int32 or int64, got ", dtype_name(indices.dtype));
  AGRT_EXPECTS(indices.dtype == DType::kInt64 || topk_index_dtype(grad.numel) == DType::kInt32, TypeError,
               "topk_compress: indices: int32 cannot address ", grad.numel, " elements; expected int64");
  AGRT_EXPECTS(values.numel == k && indices.numel == k, ValueError, "topk_compress: values and indices must hold k=",
               k, " elements, got ", values.numel, " and ", indices.numel);
  AGRT_EXPECTS(values.device == grad.device && indices.device == grad.device, ValueError,
               "topk_compress: values and indices must be on grad's device ", grad.device.str(), ", got ",
               values.device.str(), " and ", indices.device.str());
  AGRT_EXPECTS(!values.read_only && !indices.read_only, ValueError, "topk_compress: values/indices are read-only");
  if (sq_norm.numel > 0 || sq_norm.data != nullptr) {
    AGRT_EXPECTS(sq_norm.nbytes() == sizeof(double) && sq_norm.data != nullptr, ValueError,
                 "topk_compress: sq_norm: expected 8 bytes (one float64), got ", sq_norm.nbytes());
    AGRT_EXPECTS(sq_norm.device == grad.device, ValueError, "topk_compress: sq_norm must be on grad's device ",
                 grad.device.str(), ", got ", sq_norm.device.str());
    AGRT_EXPECTS(!sq_norm.read_only, ValueError, "topk_compress: sq_norm is read-only");
    AGRT_EXPECTS(reinterpret_cast<std::uintptr_t>(sq_norm.data) % alignof(double) == 0, ValueError,
                 "topk_compress: sq_norm: expected 8-byte alignment");
  }
  check_no_overlap(grad, residual, values, indices, sq_norm);
}

void check_decompress_args(const TensorView& values, const TensorView& indices, const TensorView& out) {
  AGRT_EXPECTS(is_floating(values.dtype), TypeError,
               "topk_decompress: values: expected float32, float16 or bfloat16, got ", dtype_name(values.dtype));
  AGRT_EXPECTS(indices.dtype == DType::kInt32 || indices.dtype == DType::kInt64, TypeError,
               "topk_decompress: indices: expected int32 or int64, got ", dtype_name(indices.dtype));
  AGRT_EXPECTS(is_floating(out.dtype), TypeError, "topk_decompress: out: expected float32, float16 or bfloat16, got ",
               dtype_name(out.dtype));
  AGRT_EXPECTS(values.numel == indices.numel, ValueError, "topk_decompress: values has ", values.numel,
               " elements, indices has ", indices.numel);
  AGRT_EXPECTS(values.device == out.device && indices.device == out.device, ValueError,
               "topk_decompress: values, indices and out must be on one device, got ", values.device.str(), ", ",
               indices.device.str(), " and ", out.device.str());
  AGRT_EXPECTS(!out.read_only, ValueError, "topk_decompress: out is read-only; it is updated in place");
}

}  // namespace

void topk_compress(const TensorView& grad, const TensorView& residual, std::int64_t k, const TensorView& values,
                   const TensorView& indices, const TensorView& sq_norm) {
  check_compress_args(grad, residual, k, values, indices, sq_norm);
  if (grad.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::topk_compress(grad, residual, k, values, indices, sq_norm);
#else
    AGRT_EXPECTS(false, ValueError, "topk_compress: grad is on ", grad.device.str(),
                 " but this build of autoglm_rt has no CUDA kernels");
#endif
  }
  dispatch_float(grad.dtype, [&](auto g) {
    dispatch_float(values.dtype, [&](auto v) {
      dispatch_index(indices.dtype, [&](auto i) {
        Compressor<decltype(g), decltype(v), decltype(i)>(grad, residual, k, values, indices, sq_norm).run();
      });
    });
  });
}

void topk_decompress(const TensorView& values, const TensorView& indices, const TensorView& out, double scale,
                     bool check_indices) {
  check_decompress_args(values, indices, out);
  if (values.numel == 0) return;
  if (out.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::topk_decompress(values, indices, out, scale, check_indices);
#else
    AGRT_EXPECTS(false, ValueError, "topk_decompress: out is on ", out.device.str(),
                 " but this build of autoglm_rt has no CUDA kernels");
#endif
  }
  dispatch_float(values.dtype, [&](auto v) {
    dispatch_index(indices.dtype, [&](auto i) {
      dispatch_float(out.dtype, [&](auto o) {
        decompress_cpu<decltype(v), decltype(i), decltype(o)>(values, indices, out, static_cast<float>(scale),
                                                              check_indices);
      });
    });
  });
}

}  // namespace agrt::kernels

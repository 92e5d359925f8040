// CPU twin of the fused top-k compression: a radix select over the float bits.
//
// Common case (>= 2^18 elements, k <= n/3): lower and upper bounds on the k-th largest magnitude
// are taken from 256 evenly spread blocks; one pass computes acc = grad + residual, stores it and
// keeps, per chunk and in index order, the entries above the upper bound (all selected) and those
// between the bounds (a band of a few percent of k); a three-digit radix select over the band
// finds the exact threshold (ties at it go to the lowest indices) and each chunk merges its two
// lists into the output.
// Otherwise (small tensors, or a bound that kept fewer than k or far too many entries), an exact
// two-pass select: a per-chunk histogram of the top 11 bits, then entries above the threshold
// bin go straight to the outputs and entries in it become candidates for the last two digits.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <functional>
#include <optional>
#include <vector>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "autoglm_rt/detail/half.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/topk.h"
#include "autoglm_rt/parallel.h"

namespace agrt::kernels {
namespace {

constexpr std::int64_t kGrain = 1 << 16;
constexpr int kBins1 = 1 << kTopkDigitBits[0];

// Element access by storage type: float, or the raw 16 bits of a half/bfloat16.
struct F32 {
  using Storage = float;
  static float load(float v) noexcept { return v; }
  static float store(float f) noexcept { return f; }
};
struct F16 {
  using Storage = std::uint16_t;
  static float load(std::uint16_t v) noexcept { return detail::fp16_to_float(v); }
  static std::uint16_t store(float f) noexcept { return detail::float_to_fp16(f); }
};
struct BF16 {
  using Storage = std::uint16_t;
  static float load(std::uint16_t v) noexcept { return detail::bf16_to_float(v); }
  static std::uint16_t store(float f) noexcept { return detail::float_to_bf16(f); }
};

inline std::uint32_t magnitude_key(float f) noexcept {
  return std::min(detail::float_to_bits(f) & 0x7fffffffu, kTopkNanKey);
}

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
// exact key of the k-th largest entry and how many entries at that key are taken. The per-list
// histograms run on all threads when there are many candidates.
std::pair<std::uint32_t, std::int64_t> threshold_among(const CandidateLists& lists, std::int64_t need, int level,
                                                        std::uint32_t prefix, std::uint32_t mask) {
  std::int64_t total = 0;
  for (const auto& list : lists) total += static_cast<std::int64_t>(list.size());
  const auto nlists = static_cast<std::int64_t>(lists.size());
  const std::int64_t grain = total > (std::int64_t{1} << 16) ? 1 : nlists;
  for (; level < 3; ++level) {
    const int bins = 1 << kTopkDigitBits[level];
    const int shift = kTopkDigitShift[level];
    std::vector<std::uint32_t> per_list(static_cast<std::size_t>(nlists * bins), 0);
    parallel_for(0, nlists, grain, [&](std::int64_t lb, std::int64_t le) {
      for (std::int64_t l = lb; l < le; ++l) {
        std::uint32_t* h = per_list.data() + l * bins;
        for (const Candidate& c : lists[static_cast<std::size_t>(l)]) {
          const std::uint32_t key = magnitude_key(c.acc);
          if ((key & mask) == prefix) ++h[(key >> shift) & static_cast<std::uint32_t>(bins - 1)];
        }
      }
    });
    std::vector<std::int64_t> h(static_cast<std::size_t>(bins), 0);
    for (std::int64_t l = 0; l < nlists; ++l) {
      for (int j = 0; j < bins; ++j) h[static_cast<std::size_t>(j)] += per_list[static_cast<std::size_t>(l * bins + j)];
    }
    const auto [bin, above] = select_bin(h.data(), bins, need);
    need -= above;
    prefix |= static_cast<std::uint32_t>(bin) << shift;
    mask |= static_cast<std::uint32_t>(bins - 1) << shift;
  }
  return {prefix, need};
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
  std::nth_element(keys.begin(), keys.begin() + (m - 1), keys.end(), std::greater<>());
  const std::uint32_t lower = keys[static_cast<std::size_t>(m - 1)];
  // The upper bound, as many standard deviations the other way: entries above it are kept in a
  // list of sure picks that skips the exact select.
  const auto m_hi = static_cast<std::int64_t>(std::floor(expected - 4.0 * std::sqrt(expected) - 16.0));
  std::uint32_t upper = ~0u;
  if (m_hi >= 1) {
    std::nth_element(keys.begin(), keys.begin() + (m_hi - 1), keys.begin() + (m - 1), std::greater<>());
    upper = std::max(keys[static_cast<std::size_t>(m_hi - 1)], lower);
  }
  return SampleBound{lower, upper, static_cast<double>(m) / static_cast<double>(s)};
}

template <typename G, typename V, typename I>
class Compressor {
  using GS = typename G::Storage;
  using VS = typename V::Storage;

 public:
  Compressor(const TensorView& grad, const TensorView& residual, std::int64_t k, const TensorView& values,
             const TensorView& indices)
      : n_(grad.numel),
        k_(k),
        g_(grad.as<const GS>()),
        r_(residual.numel > 0 ? residual.as<GS>() : nullptr),
        src_(r_ != nullptr ? r_ : g_),
        vout_(values.as<VS>()),
        iout_(indices.as<I>()),
        chunk_(parallel_chunk_size(0, n_, kGrain)),
        nchunks_((n_ + chunk_ - 1) / chunk_) {
    // Per-chunk histograms: chunk lengths are < 2^32 for any tensor below 2^40 elements.
    AGRT_EXPECTS(chunk_ < (std::int64_t{1} << 32), ValueError, "topk_compress: tensor too large (", n_,
                 " elements)");
  }

  void run() {
    bool accumulated = false;
    if (const auto bound = sample_bound<G>(g_, r_, n_, k_)) {
      if (one_pass(*bound)) return;
      accumulated = true;  // the bound missed: residual already holds acc, select over it
    }
    two_pass(!accumulated);
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

  void zero_residual(std::int64_t i) const {
    if (r_ != nullptr) r_[i] = G::store(0.0f);
  }

  // One pass: accumulate, and keep every entry at or above the sampled bound. Returns false when
  // fewer than k entries reached it or a chunk kept far more than expected (heavy ties).
  // An entry above the upper bound: its value and offset in its chunk (8 bytes, not 16).
  struct Sure {
    float acc;
    std::uint32_t off;
  };

  // One pass: accumulate; entries above the upper bound go to per-chunk "sure" lists, entries
  // between the bounds to per-chunk band lists. The exact select runs over the band alone, then
  // each chunk merges its sure entries and its selected band entries into the output in index
  // order. Returns false (nothing written but residual, which then holds acc) when the bounds
  // missed: k or more sure entries, fewer than k kept, or a chunk keeping far more than expected.
  bool one_pass(const SampleBound& bound) {
    const auto nl = static_cast<std::size_t>(nchunks_);
    CandidateLists band(nl);
    std::vector<std::vector<Sure>> sure(nl);
    std::atomic<bool> overflow{false};
    parallel_for(0, n_, kGrain, [&](std::int64_t b, std::int64_t e) {
      auto& band_list = band[static_cast<std::size_t>(b / chunk_)];
      auto& sure_list = sure[static_cast<std::size_t>(b / chunk_)];
      const auto expected = static_cast<std::size_t>(bound.expected_fraction * static_cast<double>(e - b));
      const std::size_t cap = 4 * expected + 4096;
      sure_list.reserve(expected + 64);
      band_list.reserve(expected / 4 + 64);
      const std::uint32_t lower = bound.key, upper = bound.upper;
      float accs[kBlock];
      for (std::int64_t i = b; i < e; i += kBlock) {
        const int len = static_cast<int>(std::min<std::int64_t>(kBlock, e - i));
        const bool hit = r_ != nullptr ? accumulate_block<true>(i, len, accs, lower)
                                       : accumulate_block<false>(i, len, accs, lower);
        if (!hit) continue;
        auto keep = [&](int j) {
          if (sure_list.size() + band_list.size() >= cap) {
            overflow.store(true, std::memory_order_relaxed);
          } else if (magnitude_key(accs[j]) > upper) {
            sure_list.push_back({accs[j], static_cast<std::uint32_t>(i + j - b)});
            // Selected for certain: clear its residual now, while the line is in cache (undone
            // by restore_sure() if the bounds turn out to have missed).
            zero_residual(i + j);
          } else {
            band_list.push_back({accs[j], i + j});
          }
        };
        int j = 0;
#if defined(__SSE2__)
        // Four compares per instruction and a bit mask, so the scan costs per entry kept rather
        // than per entry looked at. `lower - 1` as signed: keys are < 2^31, lower 0 keeps all.
        const __m128i below = _mm_set1_epi32(static_cast<std::int32_t>(lower) - 1);
        const __m128i abs_mask = _mm_set1_epi32(0x7fffffff);
        for (; j + 4 <= len; j += 4) {
          const __m128i bits = _mm_and_si128(_mm_castps_si128(_mm_loadu_ps(accs + j)), abs_mask);
          unsigned m = static_cast<unsigned>(_mm_movemask_ps(_mm_castsi128_ps(_mm_cmpgt_epi32(bits, below))));
          while (m != 0) {
            keep(j + __builtin_ctz(m));
            m &= m - 1;
          }
        }
#endif
        for (; j < len; ++j) {
          if (magnitude_key(accs[j]) >= lower) keep(j);
        }
      }
    });
    // On a miss the residual must hold acc everywhere again before the exact select reads it.
    auto restore_sure = [&] {
      if (r_ == nullptr) return false;
      for (std::size_t c = 0; c < nl; ++c) {
        for (const Sure& x : sure[c]) r_[static_cast<std::int64_t>(c) * chunk_ + x.off] = G::store(x.acc);
      }
      return false;
    };
    if (overflow.load()) return restore_sure();
    std::int64_t sure_total = 0, band_total = 0;
    for (std::size_t c = 0; c < nl; ++c) {
      sure_total += static_cast<std::int64_t>(sure[c].size());
      band_total += static_cast<std::int64_t>(band[c].size());
    }
    if (sure_total >= k_ || sure_total + band_total < k_) return restore_sure();
    const auto [threshold, ties] = threshold_among(band, k_ - sure_total, 0, 0u, 0u);

    // Per chunk: band entries above the threshold, and at it (ties go to the lowest indices).
    std::vector<std::int64_t> above(nl, 0), equal(nl, 0);
    parallel_for(0, nchunks_, 1, [&](std::int64_t cb, std::int64_t ce) {
      for (auto c = static_cast<std::size_t>(cb); c < static_cast<std::size_t>(ce); ++c) {
        for (const Candidate& x : band[c]) {
          const std::uint32_t key = magnitude_key(x.acc);
          above[c] += key > threshold;
          equal[c] += key == threshold;
        }
      }
    });
    std::vector<std::int64_t> out_off(nl), ties_before(nl);
    std::int64_t o = 0, t = 0;
    for (std::size_t c = 0; c < nl; ++c) {
      out_off[c] = o;
      ties_before[c] = t;
      o += static_cast<std::int64_t>(sure[c].size()) + above[c] + std::clamp<std::int64_t>(ties - t, 0, equal[c]);
      t += equal[c];
    }
    if (o != k_) AGRT_FAIL(RuntimeError, "topk_compress: selected ", o, " entries, expected ", k_);
    parallel_for(0, nchunks_, 1, [&](std::int64_t cb, std::int64_t ce) {
      for (auto c = static_cast<std::size_t>(cb); c < static_cast<std::size_t>(ce); ++c) {
        const std::int64_t base = static_cast<std::int64_t>(c) * chunk_;
        std::int64_t pos = out_off[c], tie = ties_before[c];
        auto emit = [&](float acc, std::int64_t idx) {
          vout_[pos] = V::store(acc);
          iout_[pos] = static_cast<I>(idx);
          ++pos;
        };
        const auto& sl = sure[c];
        std::size_t si = 0;
        for (const Candidate& x : band[c]) {
          const std::uint32_t key = magnitude_key(x.acc);
          if (!(key > threshold || (key == threshold && tie++ < ties))) continue;
          for (; si < sl.size() && base + sl[si].off < x.idx; ++si) emit(sl[si].acc, base + sl[si].off);
          emit(x.acc, x.idx);
          zero_residual(x.idx);  // sure entries were cleared in the pass
        }
        for (; si < sl.size(); ++si) emit(sl[si].acc, base + sl[si].off);
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
      for (std::int64_t i = b; i < e; i += kBlock) {
        const int len = static_cast<int>(std::min<std::int64_t>(kBlock, e - i));
        if (do_accumulate && r_ != nullptr) {
          accumulate_block<true>(i, len, accs, 0);
        } else {
          for (int j = 0; j < len; ++j) accs[j] = G::load(src_[i + j]);
        }
        for (int j = 0; j < len; ++j) ++hs[(j & 3) * kBins1 + (magnitude_key(accs[j]) >> kTopkDigitShift[0])];
      }
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
};

constexpr std::int64_t kPrefetch = 16;

template <typename V, typename I, typename O>
void decompress_cpu(const TensorView& values, const TensorView& indices, const TensorView& out, float scale) {
  using VS = typename V::Storage;
  using OS = typename O::Storage;
  const VS* v = values.as<const VS>();
  const I* idx = indices.as<const I>();
  OS* o = out.as<OS>();
  const std::int64_t m = values.numel;
  const std::int64_t n = out.numel;

  // Validate every index first so a bad one leaves `out` untouched.
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
        if (i + kPrefetch < m) __builtin_prefetch(o + static_cast<std::int64_t>(idx[i + kPrefetch]), 1);
        const auto j = static_cast<std::int64_t>(idx[i]);
        if (j >= lo && j < hi) o[j] = O::store(O::load(o[j]) + scale * V::load(v[i]));
      }
    }
  });
}

void check_compress_args(const TensorView& grad, const TensorView& residual, std::int64_t k, const TensorView& values,
                         const TensorView& indices) {
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
                   const TensorView& indices) {
  check_compress_args(grad, residual, k, values, indices);
  if (grad.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::topk_compress(grad, residual, k, values, indices);
#else
    AGRT_EXPECTS(false, ValueError, "topk_compress: grad is on ", grad.device.str(),
                 " but this build of autoglm_rt has no CUDA kernels");
#endif
  }
  dispatch_float(grad.dtype, [&](auto g) {
    dispatch_float(values.dtype, [&](auto v) {
      dispatch_index(indices.dtype, [&](auto i) {
        Compressor<decltype(g), decltype(v), decltype(i)>(grad, residual, k, values, indices).run();
      });
    });
  });
}

void topk_decompress(const TensorView& values, const TensorView& indices, const TensorView& out, double scale) {
  check_decompress_args(values, indices, out);
  if (values.numel == 0) return;
  if (out.device.type == DeviceType::kCUDA) {
#ifdef AGRT_WITH_CUDA
    return cuda::topk_decompress(values, indices, out, scale);
#else
    AGRT_EXPECTS(false, ValueError, "topk_decompress: out is on ", out.device.str(),
                 " but this build of autoglm_rt has no CUDA kernels");
#endif
  }
  dispatch_float(values.dtype, [&](auto v) {
    dispatch_index(indices.dtype, [&](auto i) {
      dispatch_float(out.dtype, [&](auto o) {
        decompress_cpu<decltype(v), decltype(i), decltype(o)>(values, indices, out, static_cast<float>(scale));
      });
    });
  });
}

}  // namespace agrt::kernels

// CPU twin of the fused top-k compression: a three-digit radix select over the float bits.
//
// Pass 1 (all threads): acc = grad + residual, stored into residual, and a per-chunk histogram of
// the top 11 bits of the magnitude key. The threshold digit b1 follows from the summed histogram.
// Pass 2 (all threads): entries above b1 go straight to the outputs (per-chunk offsets from the
// histograms, so the order is the index order), entries in b1 are copied to a candidate list.
// The candidates (about k of them for gradient-like data) finish the select on their own: two
// more digits give the exact threshold key, ties at it go to the lowest indices, and the two
// sorted runs of selected entries are merged in place into index order.
#include <algorithm>
#include <array>
#include <cstring>
#include <vector>

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

template <typename G, typename V, typename I>
void compress_cpu(const TensorView& grad, const TensorView& residual, std::int64_t k, const TensorView& values,
                  const TensorView& indices) {
  using GS = typename G::Storage;
  using VS = typename V::Storage;
  const std::int64_t n = grad.numel;
  const GS* g = grad.as<const GS>();
  GS* r = residual.numel > 0 ? residual.as<GS>() : nullptr;
  VS* vout = values.as<VS>();
  I* iout = indices.as<I>();

  const std::int64_t chunk = parallel_chunk_size(0, n, kGrain);
  const std::int64_t nchunks = (n + chunk - 1) / chunk;
  // Per-chunk histograms: chunk lengths are < 2^32 for any tensor below 2^40 elements.
  AGRT_EXPECTS(chunk < (std::int64_t{1} << 32), ValueError, "topk_compress: tensor too large (", n, " elements)");
  std::vector<std::uint32_t> hist(static_cast<std::size_t>(nchunks) * kBins1, 0);

  // Pass 1: acc into residual and the first digit's histogram. Four sub-histograms break the
  // store-to-load dependency when neighbouring entries fall into the same bin.
  parallel_for(0, n, kGrain, [&](std::int64_t b, std::int64_t e) {
    std::vector<std::uint32_t> sub(4 * kBins1, 0);
    std::int64_t i = b;
    auto key_of = [&](std::int64_t j) {
      float acc = G::load(g[j]);
      if (r != nullptr) {
        const GS stored = G::store(acc + G::load(r[j]));
        r[j] = stored;
        acc = G::load(stored);  // rank what pass 2 will read back
      }
      return magnitude_key(acc) >> kTopkDigitShift[0];
    };
    for (; i + 4 <= e; i += 4) {
      const std::uint32_t d0 = key_of(i), d1 = key_of(i + 1), d2 = key_of(i + 2), d3 = key_of(i + 3);
      ++sub[d0];
      ++sub[kBins1 + d1];
      ++sub[2 * kBins1 + d2];
      ++sub[3 * kBins1 + d3];
    }
    for (; i < e; ++i) ++sub[key_of(i)];
    std::uint32_t* h = hist.data() + (b / chunk) * kBins1;
    for (int j = 0; j < kBins1; ++j) h[j] = sub[j] + sub[kBins1 + j] + sub[2 * kBins1 + j] + sub[3 * kBins1 + j];
  });

  std::vector<std::int64_t> total(kBins1, 0);
  for (std::int64_t c = 0; c < nchunks; ++c) {
    for (int j = 0; j < kBins1; ++j) total[j] += hist[static_cast<std::size_t>(c * kBins1 + j)];
  }
  const auto [b1, above_total] = select_bin(total.data(), kBins1, k);

  // Offsets of each chunk's entries above b1 in the output, and of its candidates (bin b1).
  std::vector<std::int64_t> above_off(static_cast<std::size_t>(nchunks) + 1, 0);
  std::vector<std::int64_t> cand_off(static_cast<std::size_t>(nchunks) + 1, 0);
  for (std::int64_t c = 0; c < nchunks; ++c) {
    const std::uint32_t* h = hist.data() + c * kBins1;
    std::int64_t above = 0;
    for (int j = b1 + 1; j < kBins1; ++j) above += h[j];
    above_off[c + 1] = above_off[c] + above;
    cand_off[c + 1] = cand_off[c] + h[b1];
  }
  const std::int64_t ncand = cand_off[nchunks];
  std::vector<std::uint32_t> cand_key(static_cast<std::size_t>(ncand));
  std::vector<std::int64_t> cand_idx(static_cast<std::size_t>(ncand));
  const GS* src = r != nullptr ? r : g;  // acc as stored

  // Pass 2: emit entries above the threshold bin, collect the candidates.
  parallel_for(0, n, kGrain, [&](std::int64_t b, std::int64_t e) {
    const std::int64_t c = b / chunk;
    std::int64_t ao = above_off[c], co = cand_off[c];
    const auto ub1 = static_cast<std::uint32_t>(b1);
    for (std::int64_t i = b; i < e; ++i) {
      const float acc = G::load(src[i]);
      const std::uint32_t key = magnitude_key(acc);
      const std::uint32_t d = key >> kTopkDigitShift[0];
      if (d > ub1) {
        vout[ao] = V::store(acc);
        iout[ao] = static_cast<I>(i);
        ++ao;
        if (r != nullptr) r[i] = G::store(0.0f);
      } else if (d == ub1) {
        cand_key[co] = key;
        cand_idx[co] = i;
        ++co;
      }
    }
  });

  std::int64_t need = k - above_total;  // entries still to take from the candidates, >= 1
  // Digits two and three over the candidates give the exact threshold key.
  std::uint32_t prefix = static_cast<std::uint32_t>(b1) << kTopkDigitShift[0];
  std::uint32_t prefix_mask = ~0u << kTopkDigitShift[0];
  for (int level = 1; level < 3; ++level) {
    const int bins = 1 << kTopkDigitBits[level];
    const int shift = kTopkDigitShift[level];
    std::vector<std::int64_t> h(static_cast<std::size_t>(bins), 0);
    for (std::int64_t j = 0; j < ncand; ++j) {
      const std::uint32_t key = cand_key[j];
      if ((key & prefix_mask) == prefix) ++h[(key >> shift) & static_cast<std::uint32_t>(bins - 1)];
    }
    const auto [bin, above] = select_bin(h.data(), bins, need);
    need -= above;
    prefix |= static_cast<std::uint32_t>(bin) << shift;
    prefix_mask |= static_cast<std::uint32_t>(bins - 1) << shift;
  }
  const std::uint32_t threshold = prefix;  // the k-th largest key; `need` ties at it are taken

  // Selected candidates, in index order, go behind the entries already written; then the two
  // sorted runs are merged from the back so the whole output is in index order.
  std::vector<std::int64_t> picked;
  picked.reserve(static_cast<std::size_t>(k - above_total));
  for (std::int64_t j = 0; j < ncand; ++j) {
    const std::uint32_t key = cand_key[j];
    if (key > threshold || (key == threshold && need > 0)) {
      if (key == threshold) --need;
      picked.push_back(cand_idx[j]);
    }
  }
  std::int64_t a = above_total - 1;
  auto p = static_cast<std::int64_t>(picked.size()) - 1;
  for (std::int64_t o = k - 1; p >= 0; --o) {
    if (a >= 0 && static_cast<std::int64_t>(iout[a]) > picked[p]) {
      vout[o] = vout[a];
      iout[o] = iout[a];
      --a;
    } else {
      const std::int64_t i = picked[p--];
      vout[o] = V::store(G::load(src[i]));
      iout[o] = static_cast<I>(i);
      if (r != nullptr) r[i] = G::store(0.0f);
    }
  }
}

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
  const int parts = m >= kGrain ? std::max(1, num_threads()) : 1;
  const std::int64_t span = (n + parts - 1) / parts;
  parallel_for(0, parts, 1, [&](std::int64_t pb, std::int64_t pe) {
    for (std::int64_t part = pb; part < pe; ++part) {
      const std::int64_t lo = part * span, hi = std::min(n, lo + span);
      for (std::int64_t i = 0; i < m; ++i) {
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
        compress_cpu<decltype(g), decltype(v), decltype(i)>(grad, residual, k, values, indices);
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

// CUDA twin of the fused top-k compression: radix select over the magnitude bits (AIR top-k
// style), everything on the caller's stream, no host synchronisation.
//
//   accumulate   acc = grad + residual -> residual, histogram of digit 1        (full pass)
//   select(1)    one block finds the threshold bin and what is still needed
//   histogram(2) entries matching the prefix so far -> histogram of digit 2     (full pass, skipped
//   select(2)                                                                     once the bin is
//   histogram(3), select(3)                                                      taken whole)
//   count        per tile: entries above the threshold prefix, ties at it        (full pass)
//   scan         exclusive prefix sums of the per-tile counts (one block)
//   emit         each tile writes its selected entries at their global rank      (full pass)
//
// The output is in index order and the selected set equals the CPU twin's (same key, same digit
// split, ties to the lowest index). Scratch: agrt::cuda::Scratch, stream-ordered on the same stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/topk.h"
#include "core/cuda/helpers.h"

namespace agrt::kernels::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 16;
constexpr int kTile = kThreads * kItems;
constexpr int kMaxBins = 1 << 11;

struct F32 {
  using Storage = float;
  static __device__ float load(float v) { return v; }
  static __device__ float store(float f) { return f; }
};
struct F16 {
  using Storage = unsigned short;
  static __device__ float load(unsigned short v) { return __half2float(__ushort_as_half(v)); }
  static __device__ unsigned short store(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BF16 {
  using Storage = unsigned short;
  static __device__ float load(unsigned short v) { return __bfloat162float(__ushort_as_bfloat16(v)); }
  static __device__ unsigned short store(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};

struct State {
  unsigned int prefix;  // key bits fixed so far
  unsigned int mask;    // which bits of the key `prefix` fixes
  long long need;       // entries still to take among those matching prefix
  int done;             // 1 once the chosen bin is taken whole (early stop)
};

struct Workspace {
  State* state;
  unsigned long long* hist;  // kMaxBins per level, three levels
  unsigned int* tile_above;
  unsigned int* tile_ties;
  unsigned long long* above_off;
  unsigned long long* ties_off;
};

// The shared digit split (topk.h), as device functions: the header's arrays live in host memory.
__device__ __forceinline__ int digit_bits(int level) { return level == 2 ? 9 : 11; }
__device__ __forceinline__ int digit_shift(int level) { return level == 0 ? 20 : (level == 1 ? 9 : 0); }
static_assert(kTopkDigitBits[0] == 11 && kTopkDigitBits[1] == 11 && kTopkDigitBits[2] == 9, "digit split");
static_assert(kTopkDigitShift[0] == 20 && kTopkDigitShift[1] == 9 && kTopkDigitShift[2] == 0, "digit split");

__device__ __forceinline__ unsigned int magnitude_key(float f) {
  return min(__float_as_uint(f) & 0x7fffffffu, kTopkNanKey);
}

__global__ void init_state(State* s, long long k) {
  s->prefix = 0;
  s->mask = 0;
  s->need = k;
  s->done = 0;
}

template <typename G>
__global__ void __launch_bounds__(kThreads) accumulate(const typename G::Storage* __restrict__ grad,
                                                       typename G::Storage* __restrict__ residual, long long n,
                                                       unsigned long long* __restrict__ hist) {
  __shared__ unsigned int sh[kMaxBins];
  for (int b = threadIdx.x; b < kMaxBins; b += kThreads) sh[b] = 0;
  __syncthreads();
  const long long base = static_cast<long long>(blockIdx.x) * kTile;
  for (int j = 0; j < kItems; ++j) {
    const long long i = base + j * kThreads + threadIdx.x;  // coalesced
    if (i >= n) break;
    float acc = G::load(grad[i]);
    if (residual != nullptr) {
      const auto stored = G::store(acc + G::load(residual[i]));
      residual[i] = stored;
      acc = G::load(stored);
    }
    atomicAdd(&sh[magnitude_key(acc) >> 20], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kMaxBins; b += kThreads) {
    if (sh[b] != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(sh[b]));
  }
}

// Finds the bin that holds the need-th largest key of this level. The block scans the histogram
// from the top: thread t sums bins [bins - (t+1)*per, bins - t*per), an exclusive block scan gives
// the count above its range, and the one thread whose range holds the crossing writes the state.
// (A single thread walking up to 2048 bins costs ~1000 dependent L2 round trips, 0.1-0.3 ms per
// level: far more than a full pass over a 25 MiB bucket at HBM bandwidth.)
__global__ void __launch_bounds__(kThreads) select_bin(State* s, const unsigned long long* hist, int level) {
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  if (s->done) return;  // uniform: every thread reads it before anyone writes the state
  const int bins = 1 << digit_bits(level);
  const int shift = digit_shift(level);
  const int per = bins / kThreads;  // 8 or 2
  const unsigned long long need = static_cast<unsigned long long>(s->need);
  const int hi = bins - static_cast<int>(threadIdx.x) * per;  // this thread's bins: [hi - per, hi)
  unsigned long long mine = 0;
  for (int b = hi - 1; b >= hi - per; --b) mine += hist[b];
  unsigned long long above = 0;
  Scan(tmp).ExclusiveSum(mine, above);  // all reads of *s happen before this barrier
  if (above >= need || above + mine < need) return;
  for (int b = hi - 1; b >= hi - per; --b) {
    const unsigned long long c = hist[b];
    if (above + c >= need) {
      const unsigned long long rest = need - above;
      s->need = static_cast<long long>(rest);
      s->prefix |= static_cast<unsigned int>(b) << shift;
      s->mask |= static_cast<unsigned int>(bins - 1) << shift;
      if (rest == c) s->done = 1;  // the whole bin is taken: no finer digit needed
      return;
    }
    above += c;
  }
}
static_assert(kMaxBins % kThreads == 0 && (1 << 9) % kThreads == 0, "select_bin splits the bins evenly");

template <typename G>
__global__ void __launch_bounds__(kThreads) histogram(const typename G::Storage* __restrict__ src, long long n,
                                                      const State* s, int level,
                                                      unsigned long long* __restrict__ hist) {
  if (s->done) return;
  __shared__ unsigned int sh[kMaxBins];
  const int bins = 1 << digit_bits(level);
  const int shift = digit_shift(level);
  const unsigned int prefix = s->prefix, mask = s->mask;
  for (int b = threadIdx.x; b < bins; b += kThreads) sh[b] = 0;
  __syncthreads();
  const long long base = static_cast<long long>(blockIdx.x) * kTile;
  for (int j = 0; j < kItems; ++j) {
    const long long i = base + j * kThreads + threadIdx.x;
    if (i >= n) break;
    const unsigned int key = magnitude_key(G::load(src[i]));
    if ((key & mask) == prefix) atomicAdd(&sh[(key >> shift) & (bins - 1)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < bins; b += kThreads) {
    if (sh[b] != 0) atomicAdd(&hist[b], static_cast<unsigned long long>(sh[b]));
  }
}

// Tiles are read as kItems consecutive entries per thread so block-wide scans give index order.
// load_items: this thread's entries from `base` (returns how many lie below n), once, into
// registers; emit counts and writes from the same values instead of reading its tile twice, and
// count_tiles goes through the same two helpers, so both count identically.
template <typename G>
__device__ __forceinline__ int load_items(const typename G::Storage* src, long long n, long long base,
                                          typename G::Storage (&raw)[kItems]) {
  const long long left = n - base;
  const int count = left <= 0 ? 0 : (left < kItems ? static_cast<int>(left) : kItems);
#pragma unroll
  for (int j = 0; j < kItems; ++j) raw[j] = j < count ? src[base + j] : typename G::Storage{};
  return count;
}

// How many of those entries lie above the selected prefix and how many tie with it.
template <typename G>
__device__ __forceinline__ void count_items(const typename G::Storage (&raw)[kItems], int count, unsigned int prefix,
                                            unsigned int mask, unsigned int& above, unsigned int& ties) {
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (j < count) {
      const unsigned int km = magnitude_key(G::load(raw[j])) & mask;
      above += km > prefix;
      ties += km == prefix;
    }
  }
}

template <typename G>
__global__ void __launch_bounds__(kThreads) count_tiles(const typename G::Storage* __restrict__ src, long long n,
                                                        const State* s, unsigned int* tile_above,
                                                        unsigned int* tile_ties) {
  using Reduce = cub::BlockReduce<unsigned int, kThreads>;
  __shared__ typename Reduce::TempStorage tmp_a, tmp_t;
  const unsigned int prefix = s->prefix, mask = s->mask;
  const long long base = static_cast<long long>(blockIdx.x) * kTile + static_cast<long long>(threadIdx.x) * kItems;
  typename G::Storage raw[kItems];
  const int count = load_items<G>(src, n, base, raw);
  unsigned int above = 0, ties = 0;
  count_items<G>(raw, count, prefix, mask, above, ties);
  const unsigned int a = Reduce(tmp_a).Sum(above);
  const unsigned int t = Reduce(tmp_t).Sum(ties);
  if (threadIdx.x == 0) {
    tile_above[blockIdx.x] = a;
    tile_ties[blockIdx.x] = t;
  }
}

__global__ void __launch_bounds__(kThreads) scan_tiles(const unsigned int* tile_above, const unsigned int* tile_ties,
                                                       long long tiles, unsigned long long* above_off,
                                                       unsigned long long* ties_off) {
  using Scan = cub::BlockScan<unsigned long long, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  __shared__ unsigned long long carry_a, carry_t;
  if (threadIdx.x == 0) carry_a = carry_t = 0;
  __syncthreads();
  for (long long b = 0; b < tiles; b += kThreads) {
    const long long i = b + threadIdx.x;
    unsigned long long a = i < tiles ? tile_above[i] : 0, t = i < tiles ? tile_ties[i] : 0;
    unsigned long long sum_a, sum_t;
    Scan(tmp).ExclusiveSum(a, a, sum_a);
    __syncthreads();
    Scan(tmp).ExclusiveSum(t, t, sum_t);
    if (i < tiles) {
      above_off[i] = carry_a + a;
      ties_off[i] = carry_t + t;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      carry_a += sum_a;
      carry_t += sum_t;
    }
    __syncthreads();
  }
}

// With error feedback `src` and `residual` are the same buffer (read, then cleared where taken),
// so neither may be __restrict__: a restrict pointer that aliases a written one is undefined
// behaviour and lets the compiler serve src through the read-only (non-coherent) cache. The tile
// is read once, into registers, before any write.
template <typename G, typename V, typename I>
__global__ void __launch_bounds__(kThreads) emit(const typename G::Storage* src, typename G::Storage* residual,
                                                 long long n,
                                                 const State* s, const unsigned long long* above_off,
                                                 const unsigned long long* ties_off,
                                                 typename V::Storage* __restrict__ values, I* __restrict__ indices) {
  using Scan = cub::BlockScan<unsigned int, kThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const unsigned int prefix = s->prefix, mask = s->mask;
  const unsigned long long need = static_cast<unsigned long long>(s->need);
  const long long base = static_cast<long long>(blockIdx.x) * kTile + static_cast<long long>(threadIdx.x) * kItems;
  typename G::Storage raw[kItems];
  const int count = load_items<G>(src, n, base, raw);
  unsigned int above = 0, ties = 0;
  count_items<G>(raw, count, prefix, mask, above, ties);
  // Pack both counts (each <= kTile < 2^16) into one scan.
  unsigned int packed = (above << 16) | ties;
  Scan(tmp).ExclusiveSum(packed, packed);
  unsigned long long a_rank = above_off[blockIdx.x] + (packed >> 16);
  unsigned long long t_rank = ties_off[blockIdx.x] + (packed & 0xffffu);
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    if (j >= count) break;
    const long long i = base + j;
    const float acc = G::load(raw[j]);
    const unsigned int km = magnitude_key(acc) & mask;
    bool take = false;
    unsigned long long pos = 0;
    if (km > prefix) {
      take = true;
      pos = a_rank + min(t_rank, need);
      ++a_rank;
    } else if (km == prefix) {
      take = t_rank < need;
      pos = a_rank + t_rank;
      ++t_rank;
    }
    if (take) {
      values[pos] = V::store(acc);
      indices[pos] = static_cast<I>(i);
      if (residual != nullptr) residual[i] = G::store(0.0f);
    }
  }
}

// out[idx] += scale * v with the documented rounding: the product in float32, then the sum in
// float32 rounded once into out's dtype (as the CPU twin). A native float16/bfloat16 atomicAdd
// would round scale * v to 16 bits first and the sum again: two roundings, results that differ
// from the CPU's in the last bit. __fmul_rn/__fadd_rn keep nvcc from contracting into an FMA.
__device__ __forceinline__ void add_rounded(float* out, float x) { atomicAdd(out, x); }

template <typename O>
__device__ __forceinline__ void add_rounded(unsigned short* out, float x) {
  unsigned short seen = *out, expected;
  do {
    expected = seen;
    seen = atomicCAS(out, expected, O::store(__fadd_rn(O::load(expected), x)));
  } while (seen != expected);
}

// An index outside [0, n) is skipped: unreachable after the host-side check, and the documented
// behaviour without it.
template <typename V, typename I, typename O>
__global__ void scatter_add(const typename V::Storage* __restrict__ values, const I* __restrict__ indices,
                            long long m, typename O::Storage* out, long long n, float scale) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < m;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long j = static_cast<long long>(indices[i]);
    if (j < 0 || j >= n) continue;
    const float x = __fmul_rn(scale, V::load(values[i]));
    if constexpr (std::is_same_v<O, F32>) {
      add_rounded(out + j, x);
    } else {
      add_rounded<O>(out + j, x);
    }
  }
}

// Flags any index outside [0, n) so the host can refuse before touching out. This is the one
// place that reads back to the host: decompress is documented to validate its indices.
template <typename I>
__global__ void find_bad_index(const I* __restrict__ indices, long long m, long long n, unsigned long long* first_bad) {
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < m;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long j = static_cast<long long>(indices[i]);
    if (j < 0 || j >= n) atomicMin(first_bad, static_cast<unsigned long long>(i));
  }
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
  if (t == DType::kInt32) return fn(int{});
  if (t == DType::kInt64) return fn(static_cast<long long>(0));
  AGRT_FAIL(RuntimeError, "topk: unexpected index dtype ", dtype_name(t));
}

int grid_for(long long m) {
  const long long blocks = (m + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 65536 ? (blocks > 0 ? blocks : 1) : 65536);
}

}  // namespace

void topk_compress(const TensorView& grad, const TensorView& residual, std::int64_t k, const TensorView& values,
                   const TensorView& indices) {
  ::agrt::cuda::DeviceGuard guard(grad.device.index);
  const auto stream = reinterpret_cast<cudaStream_t>(grad.stream);
  const long long n = grad.numel;
  const long long tiles = (n + kTile - 1) / kTile;
  AGRT_EXPECTS(tiles < (1ll << 31), ValueError, "topk_compress: tensor too large (", n, " elements)");

  const std::size_t hist_bytes = 3 * kMaxBins * sizeof(unsigned long long);
  const std::size_t bytes = 256 + hist_bytes + static_cast<std::size_t>(tiles) * (2 * sizeof(unsigned int) +
                                                                                   2 * sizeof(unsigned long long));
  ::agrt::cuda::Scratch scratch(bytes, stream, grad.device.index);
  auto* p = scratch.as<char>();
  Workspace ws;
  ws.state = reinterpret_cast<State*>(p);
  ws.hist = reinterpret_cast<unsigned long long*>(p + 256);
  ws.above_off = reinterpret_cast<unsigned long long*>(p + 256 + hist_bytes);
  ws.ties_off = ws.above_off + tiles;
  ws.tile_above = reinterpret_cast<unsigned int*>(ws.ties_off + tiles);
  ws.tile_ties = ws.tile_above + tiles;
  unsigned long long* hist[3] = {ws.hist, ws.hist + kMaxBins, ws.hist + 2 * kMaxBins};

  AGRT_CUDA_CHECK(cudaMemsetAsync(ws.hist, 0, hist_bytes, stream));
  init_state<<<1, 1, 0, stream>>>(ws.state, static_cast<long long>(k));
  const dim3 grid(static_cast<unsigned int>(tiles));
  dispatch_float(grad.dtype, [&](auto g) {
    using G = decltype(g);
    using GS = typename G::Storage;
    const GS* src_grad = grad.as<const GS>();
    GS* res = residual.numel > 0 ? residual.as<GS>() : nullptr;
    const GS* src = res != nullptr ? res : src_grad;
    accumulate<G><<<grid, kThreads, 0, stream>>>(src_grad, res, n, hist[0]);
    select_bin<<<1, kThreads, 0, stream>>>(ws.state, hist[0], 0);
    for (int level = 1; level < 3; ++level) {
      histogram<G><<<grid, kThreads, 0, stream>>>(src, n, ws.state, level, hist[level]);
      select_bin<<<1, kThreads, 0, stream>>>(ws.state, hist[level], level);
    }
    count_tiles<G><<<grid, kThreads, 0, stream>>>(src, n, ws.state, ws.tile_above, ws.tile_ties);
    scan_tiles<<<1, kThreads, 0, stream>>>(ws.tile_above, ws.tile_ties, tiles, ws.above_off, ws.ties_off);
    dispatch_float(values.dtype, [&](auto v) {
      using V = decltype(v);
      dispatch_index(indices.dtype, [&](auto i) {
        using I = decltype(i);
        emit<G, V, I><<<grid, kThreads, 0, stream>>>(src, res, n, ws.state, ws.above_off, ws.ties_off,
                                                     values.as<typename V::Storage>(), indices.as<I>());
      });
    });
  });
  AGRT_CUDA_CHECK(cudaGetLastError());
  scratch.release();
}

void topk_decompress(const TensorView& values, const TensorView& indices, const TensorView& out, double scale,
                     bool check_indices) {
  ::agrt::cuda::DeviceGuard guard(out.device.index);
  const auto stream = reinterpret_cast<cudaStream_t>(out.stream);
  const long long m = values.numel;
  const long long n = out.numel;
  const int grid = grid_for(m);
  if (check_indices) {
    ::agrt::cuda::Scratch scratch(sizeof(unsigned long long), stream, out.device.index);
    auto* bad = scratch.as<unsigned long long>();
    AGRT_CUDA_CHECK(cudaMemsetAsync(bad, 0xff, sizeof *bad, stream));
    unsigned long long first_bad = ~0ull;
    dispatch_index(indices.dtype, [&](auto i) {
      using I = decltype(i);
      find_bad_index<I><<<grid, kThreads, 0, stream>>>(indices.as<const I>(), m, n, bad);
    });
    AGRT_CUDA_CHECK(cudaMemcpyAsync(&first_bad, bad, sizeof first_bad, cudaMemcpyDeviceToHost, stream));
    scratch.release();
    AGRT_CUDA_CHECK(cudaStreamSynchronize(stream));
    AGRT_EXPECTS(first_bad == ~0ull, ValueError, "topk_decompress: indices[", first_bad, "] is outside out (", n,
                 " elements)");
  }
  const float s = static_cast<float>(scale);
  dispatch_float(values.dtype, [&](auto v) {
    using V = decltype(v);
    dispatch_index(indices.dtype, [&](auto i) {
      using I = decltype(i);
      const auto* vp = values.as<const typename V::Storage>();
      const auto* ip = indices.as<const I>();
      switch (out.dtype) {
        case DType::kFloat32: scatter_add<V, I, F32><<<grid, kThreads, 0, stream>>>(vp, ip, m, out.as<float>(), n, s); break;
        case DType::kFloat16:
          scatter_add<V, I, F16><<<grid, kThreads, 0, stream>>>(vp, ip, m, out.as<unsigned short>(), n, s);
          break;
        case DType::kBFloat16:
          scatter_add<V, I, BF16><<<grid, kThreads, 0, stream>>>(vp, ip, m, out.as<unsigned short>(), n, s);
          break;
        default: AGRT_FAIL(RuntimeError, "topk_decompress: unexpected out dtype");
      }
    });
  });
  AGRT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace agrt::kernels::cuda

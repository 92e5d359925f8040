// CUDA grad_stats: a multi-tensor chunked launch in the style of apex's multi_tensor_apply.
//
// Tensors go in batches of up to kMaxTensors; a batch's metadata (pointers, sizes, dtypes and
// the prefix sum of chunk counts) travels as one __grid_constant__ kernel parameter (CUDA 12.1+
// allows 32 KiB), so no host-to-device copy and no host synchronization is needed. Per batch:
//   1. partial_kernel: one block per chunk of kChunkElems elements of one tensor; each thread
//      accumulates float64 sums, a fixed shuffle tree merges them; one Moments per chunk goes to
//      the workspace.
//   2. finalize_kernel: one block per tensor merges its chunks' Moments in a fixed tree and
//      writes the tensor's output row.
// Finally total_kernel (one block) merges all rows into the last row. Every reduction has a fixed
// order and there are no atomics, so results are bit-identical from run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/grad_stats.h"
#include "core/cuda/helpers.h"
#include "kernels/grad_stats_cuda.h"
#include "kernels/grad_stats_moments.h"

namespace agrt::kernels::detail {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr std::int64_t kChunkElems = std::int64_t{1} << 16;
constexpr int kMaxTensors = 1024;

struct Batch {
  const void* ptr[kMaxTensors];
  std::int64_t numel[kMaxTensors];
  int chunk_prefix[kMaxTensors + 1];  // chunks of tensors [0, i) of this batch
  unsigned char dtype[kMaxTensors];   // agrt::DType
  int ntensors;
  int row_base;                       // output row of this batch's first tensor
};
static_assert(sizeof(Batch) < 32000, "kernel parameters are limited to 32 KiB");

__device__ __forceinline__ float load_elem(const void* p, std::int64_t i, unsigned char dtype) {
  if (dtype == static_cast<unsigned char>(DType::kFloat32)) return static_cast<const float*>(p)[i];
  if (dtype == static_cast<unsigned char>(DType::kFloat16)) return __half2float(static_cast<const __half*>(p)[i]);
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}

struct ThreadAcc {
  int count = 0, nonfinite = 0;  // at most kChunkElems / kThreads each
  double sum = 0, sumsq = 0, s2 = 0;
  float maxabs = 0;

  __device__ __forceinline__ void add(float xf, double shift) {
    if (!isfinite(xf)) {
      ++nonfinite;
      return;
    }
    const double x = xf;
    const double d = x - shift;
    ++count;
    sum += x;
    sumsq = fma(x, x, sumsq);
    s2 = fma(d, d, s2);
    maxabs = fmaxf(maxabs, fabsf(xf));
  }
};

__device__ Moments shfl_down(const Moments& m, int offset) {
  Moments r;
  r.count = __shfl_down_sync(0xffffffffu, m.count, offset);
  r.nonfinite = __shfl_down_sync(0xffffffffu, m.nonfinite, offset);
  r.sum = __shfl_down_sync(0xffffffffu, m.sum, offset);
  r.sumsq = __shfl_down_sync(0xffffffffu, m.sumsq, offset);
  r.maxabs = __shfl_down_sync(0xffffffffu, m.maxabs, offset);
  r.mean = __shfl_down_sync(0xffffffffu, m.mean, offset);
  r.m2 = __shfl_down_sync(0xffffffffu, m.m2, offset);
  return r;
}

// Merges every thread's Moments in a fixed tree; the result is valid in thread 0.
__device__ Moments block_reduce(Moments m) {
  __shared__ alignas(8) unsigned char smem[sizeof(Moments) * kWarps];
  auto* warp_result = reinterpret_cast<Moments*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) merge_into(m, shfl_down(m, off));
  if (lane == 0) warp_result[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? warp_result[lane] : Moments{};
    for (int off = 16; off > 0; off >>= 1) merge_into(m, shfl_down(m, off));
  }
  return m;
}

__device__ int tensor_of_block(const Batch& b, int block) {
  int lo = 0, hi = b.ntensors - 1;  // last tensor whose prefix <= block
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (b.chunk_prefix[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__global__ void __launch_bounds__(kThreads) partial_kernel(const __grid_constant__ Batch b, Moments* partials) {
  __shared__ double shift_s;
  const int block = static_cast<int>(blockIdx.x);
  const int t = tensor_of_block(b, block);
  const void* p = b.ptr[t];
  const unsigned char dtype = b.dtype[t];
  const std::int64_t begin = static_cast<std::int64_t>(block - b.chunk_prefix[t]) * kChunkElems;
  const std::int64_t end = min(b.numel[t], begin + kChunkElems);

  // The shift for M2: the chunk's first finite element (warp 0 searches 32 at a time).
  if (threadIdx.x < 32) {
    double shift = 0;
    for (std::int64_t j = begin; j < end; j += 32) {
      const std::int64_t i = j + threadIdx.x;
      const float x = i < end ? load_elem(p, i, dtype) : __int_as_float(0x7fc00000);
      const unsigned finite = __ballot_sync(0xffffffffu, isfinite(x));
      if (finite != 0) {
        shift = __shfl_sync(0xffffffffu, static_cast<double>(x), __ffs(finite) - 1);
        break;
      }
    }
    if (threadIdx.x == 0) shift_s = shift;
  }
  __syncthreads();
  const double shift = shift_s;

  ThreadAcc acc;
  const std::uintptr_t addr = reinterpret_cast<std::uintptr_t>(p);
  if (dtype == static_cast<unsigned char>(DType::kFloat32) && addr % 16 == 0) {
    // 16-byte loads: four floats per thread per step.
    const auto* v = reinterpret_cast<const float4*>(static_cast<const float*>(p) + begin);
    const std::int64_t nvec = (end - begin) / 4;
    for (std::int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const float4 x = v[i];
      acc.add(x.x, shift);
      acc.add(x.y, shift);
      acc.add(x.z, shift);
      acc.add(x.w, shift);
    }
    for (std::int64_t i = begin + nvec * 4 + threadIdx.x; i < end; i += kThreads) acc.add(load_elem(p, i, dtype), shift);
  } else if (dtype != static_cast<unsigned char>(DType::kFloat32) && addr % 16 == 0) {
    // 16-byte loads: eight 16-bit values per thread per step.
    const auto* v = reinterpret_cast<const uint4*>(static_cast<const std::uint16_t*>(p) + begin);
    const std::int64_t nvec = (end - begin) / 8;
    const bool half = dtype == static_cast<unsigned char>(DType::kFloat16);
    for (std::int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const uint4 w = v[i];
      const unsigned words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const unsigned short lo = static_cast<unsigned short>(words[k] & 0xffffu);
        const unsigned short hi = static_cast<unsigned short>(words[k] >> 16);
        if (half) {
          acc.add(__half2float(__ushort_as_half(lo)), shift);
          acc.add(__half2float(__ushort_as_half(hi)), shift);
        } else {
          acc.add(__bfloat162float(__ushort_as_bfloat16(lo)), shift);
          acc.add(__bfloat162float(__ushort_as_bfloat16(hi)), shift);
        }
      }
    }
    for (std::int64_t i = begin + nvec * 8 + threadIdx.x; i < end; i += kThreads) acc.add(load_elem(p, i, dtype), shift);
  } else {
    for (std::int64_t i = begin + threadIdx.x; i < end; i += kThreads) acc.add(load_elem(p, i, dtype), shift);
  }

  const double count = acc.count;
  Moments m = moments_from_shifted(count, acc.nonfinite, acc.sum, acc.sumsq, acc.maxabs, shift, acc.sum - count * shift,
                                   acc.s2);
  m = block_reduce(m);
  if (threadIdx.x == 0) partials[block] = m;
}

__global__ void __launch_bounds__(kThreads) finalize_kernel(const __grid_constant__ Batch b, const Moments* partials,
                                                            double* rows) {
  const int t = static_cast<int>(blockIdx.x);
  Moments m;
  for (int c = b.chunk_prefix[t] + static_cast<int>(threadIdx.x); c < b.chunk_prefix[t + 1]; c += kThreads) {
    merge_into(m, partials[c]);
  }
  m = block_reduce(m);
  if (threadIdx.x == 0) write_row(rows + static_cast<std::int64_t>(b.row_base + t) * kGradStatsFields,
                                  static_cast<double>(b.numel[t]), m);
}

__global__ void __launch_bounds__(kThreads) total_kernel(double* rows, int ntensors) {
  Moments m;
  for (int t = static_cast<int>(threadIdx.x); t < ntensors; t += kThreads) {
    const double* row = rows + static_cast<std::int64_t>(t) * kGradStatsFields;
    Moments r;
    r.nonfinite = row[kStatNonfinite];
    r.count = row[kStatNumel] - r.nonfinite;
    r.sum = row[kStatSum];
    r.sumsq = row[kStatSumsq];
    r.maxabs = row[kStatMaxabs];
    r.mean = r.count > 0 ? row[kStatMean] : 0.0;
    r.m2 = row[kStatM2];
    merge_into(m, r);
  }
  m = block_reduce(m);
  if (threadIdx.x == 0) {
    write_row(rows + static_cast<std::int64_t>(ntensors) * kGradStatsFields, m.count + m.nonfinite, m);
  }
}

std::int64_t chunks_of(std::int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

// Splits the tensors into batches: at most kMaxTensors each, and few enough chunks that the
// block index fits an int.
std::vector<std::pair<std::size_t, std::size_t>> plan_batches(const std::vector<TensorView>& tensors,
                                                               std::int64_t* max_chunks) {
  constexpr std::int64_t kMaxChunksPerBatch = std::int64_t{1} << 30;
  std::vector<std::pair<std::size_t, std::size_t>> batches;
  *max_chunks = 0;
  std::size_t first = 0;
  std::int64_t chunks = 0;
  for (std::size_t i = 0; i < tensors.size(); ++i) {
    const std::int64_t c = chunks_of(tensors[i].numel);
    AGRT_EXPECTS(c <= kMaxChunksPerBatch, ValueError, "grad_stats: tensors[", i, "] has too many elements (",
                 tensors[i].numel, ")");
    if (i - first == static_cast<std::size_t>(kMaxTensors) || chunks + c > kMaxChunksPerBatch) {
      batches.emplace_back(first, i);
      *max_chunks = std::max(*max_chunks, chunks);
      first = i;
      chunks = 0;
    }
    chunks += c;
  }
  if (first < tensors.size()) {
    batches.emplace_back(first, tensors.size());
    *max_chunks = std::max(*max_chunks, chunks);
  }
  return batches;
}

}  // namespace

std::size_t grad_stats_cuda_workspace_bytes(const std::vector<TensorView>& tensors) {
  std::int64_t max_chunks = 0;
  plan_batches(tensors, &max_chunks);
  return static_cast<std::size_t>(std::max<std::int64_t>(max_chunks, 1)) * sizeof(Moments);
}

void grad_stats_cuda(const std::vector<TensorView>& tensors, const TensorView& out, const TensorView& workspace) {
  std::int64_t max_chunks = 0;
  const auto batches = plan_batches(tensors, &max_chunks);
  const std::size_t need = static_cast<std::size_t>(std::max<std::int64_t>(max_chunks, 1)) * sizeof(Moments);
  const bool own_workspace = workspace.data == nullptr;
  if (!own_workspace) {
    AGRT_EXPECTS(workspace.device == out.device, ValueError, "grad_stats: workspace: expected a buffer on ",
                 out.device.str(), ", got one on ", workspace.device.str());
    AGRT_EXPECTS(workspace.nbytes() >= need, ValueError, "grad_stats: workspace: expected at least ", need,
                 " bytes, got ", workspace.nbytes());
    AGRT_EXPECTS(reinterpret_cast<std::uintptr_t>(workspace.data) % alignof(Moments) == 0, ValueError,
                 "grad_stats: workspace: expected 8-byte alignment");
  }
  ::agrt::cuda::DeviceGuard guard(out.device.index);
  const auto stream = reinterpret_cast<cudaStream_t>(tensors.empty() ? out.stream : tensors[0].stream);
  auto* rows = static_cast<double*>(out.data);
  Moments* partials = static_cast<Moments*>(workspace.data);
  // Stream-ordered scratch when the caller gave no workspace: no host synchronization, freed on
  // the stream after the kernels.
  ::agrt::cuda::Scratch scratch(own_workspace && !tensors.empty() ? need : 0, stream, out.device.index);
  if (scratch.data() != nullptr) partials = scratch.as<Moments>();
  Batch batch;
  for (const auto& [first, last] : batches) {
    batch.ntensors = static_cast<int>(last - first);
    batch.row_base = static_cast<int>(first);
    int chunks = 0;
    for (std::size_t i = first; i < last; ++i) {
      const std::size_t k = i - first;
      batch.ptr[k] = tensors[i].data;
      batch.numel[k] = tensors[i].numel;
      batch.dtype[k] = static_cast<unsigned char>(tensors[i].dtype);
      batch.chunk_prefix[k] = chunks;
      chunks += static_cast<int>(chunks_of(tensors[i].numel));
    }
    batch.chunk_prefix[batch.ntensors] = chunks;
    if (chunks > 0) partial_kernel<<<chunks, kThreads, 0, stream>>>(batch, partials);
    finalize_kernel<<<batch.ntensors, kThreads, 0, stream>>>(batch, partials, rows);
  }
  total_kernel<<<1, kThreads, 0, stream>>>(rows, static_cast<int>(tensors.size()));
  AGRT_CUDA_CHECK(cudaGetLastError());  // a failed launch; the scratch is freed on the way out
  scratch.release();
}

}  // namespace agrt::kernels::detail

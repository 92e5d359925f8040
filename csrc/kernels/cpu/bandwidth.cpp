#include "autoglm_rt/kernels/bandwidth.h"

#include <cstring>
#include <vector>

#include "autoglm_rt/error.h"
#include "autoglm_rt/parallel.h"

namespace agrt::kernels {
namespace {
constexpr std::int64_t kGrainBytes = 1 << 20;
}

std::uint64_t read_checksum(const TensorView& src) {
  AGRT_EXPECTS(src.device.type == DeviceType::kCPU, ValueError, "read_checksum: expected a CPU buffer");
  const auto* bytes = static_cast<const unsigned char*>(src.data);
  const std::int64_t n = static_cast<std::int64_t>(src.nbytes());
  const std::int64_t words = n / 8;
  const std::int64_t chunk = parallel_chunk_size(0, words, kGrainBytes / 8);
  std::vector<std::uint64_t> partial(static_cast<std::size_t>(words / chunk + 1), 0);
  parallel_for(0, words, kGrainBytes / 8, [&](std::int64_t b, std::int64_t e) {
    // Four independent lanes so the loop is limited by loads, not by the add chain.
    std::uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
    std::int64_t i = b;
    for (; i + 4 <= e; i += 4) {
      std::uint64_t w[4];
      std::memcpy(w, bytes + i * 8, sizeof w);
      a0 += w[0]; a1 ^= w[1]; a2 += w[2]; a3 ^= w[3];
    }
    for (; i < e; ++i) {
      std::uint64_t w;
      std::memcpy(&w, bytes + i * 8, sizeof w);
      a0 += w;
    }
    partial[static_cast<std::size_t>(b / chunk)] = a0 + a1 + a2 + a3;
  });
  std::uint64_t sum = 0;
  for (auto p : partial) sum += p;
  for (std::int64_t i = words * 8; i < n; ++i) sum += bytes[i];
  return sum;
}

void parallel_copy(const TensorView& dst, const TensorView& src) {
  AGRT_EXPECTS(dst.device.type == DeviceType::kCPU && src.device.type == DeviceType::kCPU, ValueError,
               "parallel_copy: expected CPU buffers");
  AGRT_EXPECTS(dst.nbytes() == src.nbytes(), ValueError, "parallel_copy: dst has ", dst.nbytes(),
               " bytes, src has ", src.nbytes());
  auto* d = static_cast<unsigned char*>(dst.data);
  const auto* s = static_cast<const unsigned char*>(src.data);
  parallel_for(0, static_cast<std::int64_t>(src.nbytes()), kGrainBytes,
               [&](std::int64_t b, std::int64_t e) { std::memcpy(d + b, s + b, static_cast<std::size_t>(e - b)); });
}

}  // namespace agrt::kernels

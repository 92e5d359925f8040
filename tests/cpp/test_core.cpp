// Core utilities: thread pool, half conversions, build info.
#include <algorithm>
#include <atomic>
#include <mutex>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <vector>

#include "agrt_test.h"
#include "autoglm_rt/build_info.h"
#include "autoglm_rt/detail/half.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/bandwidth.h"
#include "autoglm_rt/parallel.h"

using namespace agrt;

TEST(parallel_for_covers_range_exactly_once) {
  for (int threads : {1, 2, 3, 8}) {
    set_num_threads(threads);
    for (std::int64_t n : {0, 1, 7, 1000, 100003}) {
      std::vector<std::atomic<int>> hits(static_cast<std::size_t>(n));
      parallel_for(0, n, 16, [&](std::int64_t b, std::int64_t e) {
        for (auto i = b; i < e; ++i) hits[static_cast<std::size_t>(i)]++;
      });
      for (auto& h : hits) CHECK(h.load() == 1);
    }
  }
  set_num_threads(2);
}

TEST(parallel_for_chunks_do_not_depend_on_thread_count) {
  std::vector<std::int64_t> starts1, starts4;
  std::mutex mu;
  auto record = [&](std::vector<std::int64_t>& out) {
    return [&](std::int64_t b, std::int64_t) {
      std::lock_guard<std::mutex> lk(mu);
      out.push_back(b);
    };
  };
  set_num_threads(1);
  parallel_for(0, 1 << 20, 1000, record(starts1));
  set_num_threads(4);
  parallel_for(0, 1 << 20, 1000, record(starts4));
  std::sort(starts4.begin(), starts4.end());
  CHECK(starts1 == starts4);
  CHECK(parallel_chunk_size(0, 1 << 20, 1000) == static_cast<std::int64_t>(starts1[1] - starts1[0]));
  set_num_threads(2);
}

TEST(parallel_for_nested_and_exceptions) {
  set_num_threads(4);
  std::atomic<std::int64_t> total{0};
  parallel_for(0, 64, 1, [&](std::int64_t b, std::int64_t e) {
    parallel_for(0, 100, 1, [&](std::int64_t b2, std::int64_t e2) { total += (e - b) * (e2 - b2); });
  });
  CHECK(total.load() == 6400);
  CHECK_THROWS(std::runtime_error, parallel_for(0, 1000, 1, [](std::int64_t b, std::int64_t) {
                 if (b == 500) throw std::runtime_error("boom");
               }));
  // The pool still works after an exception.
  std::atomic<int> n{0};
  parallel_for(0, 1000, 1, [&](std::int64_t b, std::int64_t e) { n += static_cast<int>(e - b); });
  CHECK(n.load() == 1000);
  CHECK_THROWS(ValueError, set_num_threads(0));
  set_num_threads(2);
}

TEST(half_conversions_round_trip_every_value) {
  for (std::uint32_t h = 0; h < 65536; ++h) {
    const auto bits = static_cast<std::uint16_t>(h);
    const float f = detail::fp16_to_float(bits);
    if (std::isnan(f)) {
      CHECK(std::isnan(detail::fp16_to_float(detail::float_to_fp16(f))));
    } else {
      CHECK(detail::float_to_fp16(f) == bits);
    }
    const float g = detail::bf16_to_float(bits);
    if (std::isnan(g)) {
      CHECK(std::isnan(detail::bf16_to_float(detail::float_to_bf16(g))));
    } else {
      CHECK(detail::float_to_bf16(g) == bits);
    }
  }
  CHECK(detail::float_to_fp16(65520.0f) == 0x7c00);          // rounds to +Inf
  CHECK(detail::float_to_fp16(65519.0f) == 0x7bff);          // max finite
  CHECK(detail::float_to_fp16(1.0f + 1.0f / 2048) == 0x3c00);  // tie to even
  CHECK(detail::float_to_bf16(1.0f + 1.0f / 256) == 0x3f80);   // tie to even
}

TEST(build_info_is_consistent) {
  const BuildInfo b = build_info();
  CHECK(!b.version.empty());
  CHECK(b.cpu_threads >= 1);
  if (b.cuda_device_count == 0) CHECK(!b.cuda_unavailable_reason.empty());
  if (!b.cuda_compiled) CHECK(b.cuda_device_count == 0);
}

TEST(bandwidth_probes) {
  std::vector<std::uint8_t> src(3 * (1 << 20) + 5), dst(src.size());
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<std::uint8_t>(i * 7);
  TensorView s{src.data(), DType::kFloat16, static_cast<std::int64_t>(src.size() / 2)};
  s.numel = static_cast<std::int64_t>(src.size()) / 2;
  TensorView d = s;
  d.data = dst.data();
  kernels::parallel_copy(d, s);
  CHECK(std::equal(src.begin(), src.begin() + static_cast<std::ptrdiff_t>(s.nbytes()), dst.begin()));
  CHECK(kernels::read_checksum(s) == kernels::read_checksum(d));
  dst[12345] ^= 1;
  CHECK(kernels::read_checksum(s) != kernels::read_checksum(d));
}

AGRT_TEST_MAIN()

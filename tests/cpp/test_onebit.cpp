// The CPU sign kernels against an element-by-element reference of the header's rules, on both
// loops (AVX2 and portable) and several thread counts, plus bad input; the fused 1-bit Adam steps
// against the momentum built here one rounding at a time followed by the plain kernels. Run under ASan/UBSan by
// `make ctest-sanitize`, which is what catches a byte written past a chunk or past the end.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "agrt_test.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/onebit.h"
#include "autoglm_rt/parallel.h"

using namespace agrt;

namespace {

template <typename T>
TensorView view(std::vector<T>& v, DType t) {
  TensorView tv;
  tv.data = v.data();
  tv.dtype = t;
  tv.numel = static_cast<std::int64_t>(v.size());
  return tv;
}

kernels::SignRows rows(std::vector<std::uint8_t>& v, std::int64_t count, std::int64_t len, std::int64_t stride) {
  kernels::SignRows r;
  r.span = view(v, DType::kUInt8);
  r.span.numel = count == 0 ? 0 : (count - 1) * stride + len;
  r.rows = count;
  r.row_len = len;
  r.row_stride = stride;
  return r;
}

kernels::SignRows rows(std::vector<float>& v, std::int64_t count, std::int64_t len, std::int64_t stride) {
  kernels::SignRows r;
  r.span = view(v, DType::kFloat32);
  r.span.numel = count == 0 ? 0 : (count - 1) * stride + len;
  r.rows = count;
  r.row_len = len;
  r.row_stride = stride;
  return r;
}

// One segment's float64 sum in the header's order, written as plainly as possible.
double segment_sum(const std::vector<float>& c, std::int64_t lo, std::int64_t hi) {
  double lane[32] = {};
  for (std::int64_t i = lo; i < hi; ++i) lane[(i - lo) % 32] += std::fabs(static_cast<double>(c[static_cast<std::size_t>(i)]));
  for (int off = 16; off >= 1; off /= 2) {
    for (int l = 0; l < off; ++l) lane[l] += lane[l + off];
  }
  return lane[0];
}

struct Expected {
  std::vector<std::uint8_t> bits;
  std::vector<float> scales;
  std::vector<float> error;
};

Expected reference(const std::vector<float>& x, const std::vector<float>* error, std::int64_t chunk) {
  const auto n = static_cast<std::int64_t>(x.size());
  std::vector<float> c(x);
  if (error) {
    for (std::size_t i = 0; i < c.size(); ++i) c[i] = x[i] + (*error)[i];
  }
  Expected e;
  e.bits.assign(static_cast<std::size_t>((n + 7) / 8), 0);
  for (std::int64_t lo = 0; lo < n; lo += chunk) {
    const std::int64_t hi = std::min(n, lo + chunk);
    double sum = 0.0;
    for (std::int64_t s0 = lo; s0 < hi; s0 += kernels::kSignSegment) {
      sum += segment_sum(c, s0, std::min(hi, s0 + kernels::kSignSegment));
    }
    e.scales.push_back(static_cast<float>(sum / static_cast<double>(hi - lo)));
  }
  e.error.resize(x.size());
  for (std::int64_t i = 0; i < n; ++i) {
    const float ci = c[static_cast<std::size_t>(i)];
    const bool pos = ci >= 0.0f;
    if (pos) e.bits[static_cast<std::size_t>(i / 8)] |= static_cast<std::uint8_t>(1u << (i % 8));
    const float s = e.scales[static_cast<std::size_t>(i / chunk)];
    e.error[static_cast<std::size_t>(i)] = ci - (pos ? s : -s);
  }
  return e;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

std::vector<float> random_floats(std::int64_t n, unsigned seed, float scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(n));
  for (auto& f : v) f = dist(gen);
  return v;
}

void check_compress(std::int64_t n, std::int64_t chunk, bool feedback, unsigned seed) {
  const std::vector<float> x0 = random_floats(n, seed, 1.0f);
  std::vector<float> x = x0;
  std::vector<float> error = random_floats(n, seed + 1, 0.3f);
  const std::vector<float> error0 = error;
  const Expected want = reference(x0, feedback ? &error0 : nullptr, chunk);
  // Sentinels around the outputs: nothing may be written outside them.
  std::vector<std::uint8_t> bits_buf(static_cast<std::size_t>(kernels::sign_bits_bytes(n) + 2), 0xEE);
  std::vector<float> scales_buf(static_cast<std::size_t>(kernels::sign_chunks(n, chunk) + 2), -7.0f);
  TensorView bits = view(bits_buf, DType::kUInt8);
  bits.data = bits_buf.data() + 1;
  bits.numel -= 2;
  TensorView scales = view(scales_buf, DType::kFloat32);
  scales.data = scales_buf.data() + 1;
  scales.numel -= 2;
  TensorView ev = view(error, DType::kFloat32);
  kernels::sign_compress(view(x, DType::kFloat32), feedback ? &ev : nullptr, chunk, bits, scales);
  CHECK(bits_buf.front() == 0xEE && bits_buf.back() == 0xEE);
  CHECK(scales_buf.front() == -7.0f && scales_buf.back() == -7.0f);
  CHECK(std::equal(want.bits.begin(), want.bits.end(), bits_buf.begin() + 1));
  CHECK(std::equal(want.scales.begin(), want.scales.end(), scales_buf.begin() + 1));
  CHECK(same_bits(x, x0));
  CHECK(same_bits(error, feedback ? want.error : error0));
}

void for_each_loop(const std::function<void()>& body) {
  for (const char* simd : {"auto", "scalar"}) {
    setenv("AUTOGLM_RT_ONEBIT_SIMD", simd, 1);
    for (int threads : {1, 3}) {
      set_num_threads(threads);
      body();
    }
  }
  unsetenv("AUTOGLM_RT_ONEBIT_SIMD");
}

}  // namespace

TEST(compress_matches_reference_on_every_loop_and_thread_count) {
  for_each_loop([] {
    unsigned seed = 1;
    for (std::int64_t n : {1, 7, 9, 33, 2049, 70001, 300007}) {
      for (std::int64_t chunk : {1, 3, 7, 8, 2048, 2051, 5000, 300008}) {
        check_compress(n, chunk, true, seed++);
        check_compress(n, chunk, false, seed++);
      }
    }
  });
}

TEST(decompress_adds_strided_rows_in_order) {
  for_each_loop([] {
    for (std::int64_t chunk : {1, 5, 2048}) {
      const std::int64_t n = 20011, world = 3;
      const std::int64_t nbytes = kernels::sign_bits_bytes(n), nc = kernels::sign_chunks(n, chunk);
      const std::int64_t bstride = nbytes + 3, sstride = nc + 1;
      std::vector<std::uint8_t> bits(static_cast<std::size_t>(world * bstride));
      std::vector<float> scales = random_floats(world * sstride, static_cast<unsigned>(chunk), 1.0f);
      std::mt19937 gen(7);
      for (auto& b : bits) b = static_cast<std::uint8_t>(gen());
      std::vector<float> out(static_cast<std::size_t>(n), 123.0f);
      kernels::sign_decompress(rows(bits, world, nbytes, bstride), rows(scales, world, nc, sstride),
                               view(out, DType::kFloat32), chunk, 0.5);
      bool ok = true;
      for (std::int64_t i = 0; i < n; ++i) {
        float acc = 0.0f;
        for (std::int64_t r = 0; r < world; ++r) {
          const bool set = (bits[static_cast<std::size_t>(r * bstride + i / 8)] >> (i % 8)) & 1;
          const float s = scales[static_cast<std::size_t>(r * sstride + i / chunk)];
          acc += set ? s : -s;
        }
        ok = ok && out[static_cast<std::size_t>(i)] == 0.5f * acc;
      }
      CHECK(ok);
    }
  });
}

TEST(bad_input_is_refused_before_anything_is_written) {
  std::vector<float> x(100, 1.0f), error(100, 2.0f), scales(7, -1.0f), out(100, 3.0f);
  std::vector<std::uint8_t> bits(13, 0x55);
  std::vector<std::int32_t> ints(100);
  TensorView ev = view(error, DType::kFloat32);
  auto compress = [&](TensorView xv, std::int64_t chunk, TensorView bv, TensorView sv) {
    kernels::sign_compress(xv, &ev, chunk, bv, sv);
  };
  const TensorView xv = view(x, DType::kFloat32), bv = view(bits, DType::kUInt8), sv = view(scales, DType::kFloat32);
  CHECK_THROWS(TypeError, compress(view(ints, DType::kInt32), 16, bv, sv));
  CHECK_THROWS(TypeError, compress(xv, 16, view(ints, DType::kInt32), sv));
  CHECK_THROWS(ValueError, compress(xv, 0, bv, sv));
  CHECK_THROWS(ValueError, compress(xv, 20, bv, sv));  // 5 scales expected, 7 given
  CHECK_THROWS(ValueError, compress(xv, 16, bv, xv));  // scales overlap x
  TensorView ro = sv;
  ro.read_only = true;
  CHECK_THROWS(ValueError, compress(xv, 16, bv, ro));
  CHECK(std::all_of(bits.begin(), bits.end(), [](std::uint8_t b) { return b == 0x55; }));
  CHECK(std::all_of(scales.begin(), scales.end(), [](float f) { return f == -1.0f; }));
  CHECK(std::all_of(error.begin(), error.end(), [](float f) { return f == 2.0f; }));
  auto decompress = [&](kernels::SignRows b, kernels::SignRows s, TensorView o, std::int64_t chunk) {
    kernels::sign_decompress(b, s, o, chunk, 1.0);
  };
  const TensorView ov = view(out, DType::kFloat32);
  CHECK_THROWS(ValueError, decompress(rows(bits, 1, 13, 13), rows(scales, 2, 3, 3), ov, 16));
  CHECK_THROWS(ValueError, decompress(rows(bits, 1, 12, 12), rows(scales, 1, 7, 7), ov, 16));
  CHECK_THROWS(ValueError, decompress(rows(bits, 1, 13, 13), rows(scales, 1, 7, 7), ov, 0));
  CHECK_THROWS(ValueError, decompress(rows(bits, 1, 13, 13), rows(out, 1, 7, 7), ov, 16));  // out overlaps scales
  CHECK(std::all_of(out.begin(), out.end(), [](float f) { return f == 3.0f; }));
}

TEST(nan_sends_a_zero_bit_and_spoils_only_its_chunk) {
  std::vector<float> x(64, 1.0f), error(64, 0.0f), scales(4);
  std::vector<std::uint8_t> bits(8);
  x[20] = std::numeric_limits<float>::quiet_NaN();
  x[1] = -0.0f;
  TensorView ev = view(error, DType::kFloat32);
  kernels::sign_compress(view(x, DType::kFloat32), &ev, 16, view(bits, DType::kUInt8), view(scales, DType::kFloat32));
  CHECK(std::isnan(scales[1]) && scales[0] == 15.0f / 16.0f && scales[2] == 1.0f && scales[3] == 1.0f);
  CHECK(bits[0] == 0xFF && bits[2] == 0xEF);  // -0.0 sends 1; NaN (element 20 = bit 4 of byte 2) sends 0
  for (int i = 0; i < 64; ++i) CHECK(std::isnan(error[static_cast<std::size_t>(i)]) == (i / 16 == 1));
}

namespace {

// m = beta1 * u + (1 - beta1) * (g / denom), each step rounded to float32 (volatile: no FMA).
std::vector<float> momentum(const std::vector<float>& g, const std::vector<float>& denom, const std::vector<float>& u,
                            double beta1) {
  const float b1 = static_cast<float>(beta1), rest = static_cast<float>(1.0 - beta1);
  std::vector<float> m(g.size());
  for (std::size_t i = 0; i < g.size(); ++i) {
    volatile float p = g[i] / denom[i];
    volatile float a = b1 * u[i];
    volatile float b = rest * p;
    m[i] = a + b;
  }
  return m;
}

std::vector<float> positive_floats(std::int64_t n, unsigned seed) {
  std::vector<float> v = random_floats(n, seed, 1.0f);
  for (auto& f : v) f = std::fabs(f) + 1e-3f;
  return v;
}

// sum g^2 of the first call for each (n, chunk): later loops and thread counts must match its bits.
std::vector<double> g_norms;

void check_adam_compress(std::int64_t n, std::int64_t chunk, unsigned seed, std::size_t norm_slot) {
  std::vector<float> g = random_floats(n, seed, 1e-3f), denom = positive_floats(n, seed + 1);
  std::vector<float> u = random_floats(n, seed + 2, 0.5f), error = random_floats(n, seed + 3, 0.1f);
  std::vector<float> m = momentum(g, denom, u, 0.9);
  std::vector<float> want_error = error;
  std::vector<std::uint8_t> want_bits(static_cast<std::size_t>(kernels::sign_bits_bytes(n)));
  std::vector<float> want_scales(static_cast<std::size_t>(kernels::sign_chunks(n, chunk)));
  TensorView we = view(want_error, DType::kFloat32);
  kernels::sign_compress(view(m, DType::kFloat32), &we, chunk, view(want_bits, DType::kUInt8),
                         view(want_scales, DType::kFloat32));
  const std::vector<float> g0 = g, denom0 = denom, u0 = u;
  std::vector<std::uint8_t> bits_buf(want_bits.size() + 2, 0xEE);
  std::vector<float> scales_buf(want_scales.size() + 2, -7.0f);
  std::vector<std::int64_t> sq_buf(3, 0x5A5A5A5A);
  TensorView bits = view(bits_buf, DType::kUInt8), scales = view(scales_buf, DType::kFloat32);
  bits.data = bits_buf.data() + 1;
  bits.numel -= 2;
  scales.data = scales_buf.data() + 1;
  scales.numel -= 2;
  TensorView sq = view(sq_buf, DType::kInt64);
  sq.data = sq_buf.data() + 1;
  sq.numel = 1;
  kernels::onebit_adam_compress(view(g, DType::kFloat32), view(denom, DType::kFloat32), view(u, DType::kFloat32),
                                view(error, DType::kFloat32), 0.9, chunk, bits, scales, &sq);
  CHECK(bits_buf.front() == 0xEE && bits_buf.back() == 0xEE);
  CHECK(scales_buf.front() == -7.0f && scales_buf.back() == -7.0f);
  CHECK(sq_buf.front() == 0x5A5A5A5A && sq_buf.back() == 0x5A5A5A5A);
  CHECK(std::equal(want_bits.begin(), want_bits.end(), bits_buf.begin() + 1));
  CHECK(std::memcmp(want_scales.data(), scales_buf.data() + 1, want_scales.size() * sizeof(float)) == 0);
  CHECK(same_bits(error, want_error));
  CHECK(same_bits(g, g0) && same_bits(denom, denom0) && same_bits(u, u0));
  double got = 0.0, plain = 0.0;
  std::memcpy(&got, sq_buf.data() + 1, sizeof got);
  for (float x : g0) plain += static_cast<double>(x) * x;
  CHECK(std::fabs(got - plain) <= 1e-12 * plain);
  if (g_norms.size() <= norm_slot) g_norms.resize(norm_slot + 1, std::numeric_limits<double>::quiet_NaN());
  if (std::isnan(g_norms[norm_slot])) g_norms[norm_slot] = got;
  CHECK(std::memcmp(&g_norms[norm_slot], &got, sizeof got) == 0);
}

}  // namespace

TEST(adam_compress_equals_momentum_then_sign_compress) {
  for_each_loop([] {
    unsigned seed = 1;
    std::size_t slot = 0;
    for (std::int64_t n : {1, 9, 2049, 70001, 300007}) {
      for (std::int64_t chunk : {1, 7, 8, 2048, 2051, 300008}) check_adam_compress(n, chunk, seed++, slot++);
    }
  });
}

TEST(adam_decompress_equals_sign_decompress_then_the_rules) {
  for_each_loop([] {
    const std::int64_t n = 20011, chunk = 2048, world = 3;
    const std::int64_t nbytes = kernels::sign_bits_bytes(n), nc = kernels::sign_chunks(n, chunk);
    const std::int64_t bstride = nbytes + 3, sstride = nc + 1;
    std::vector<std::uint8_t> bits(static_cast<std::size_t>(world * bstride));
    std::vector<float> scales = random_floats(world * sstride, 5, 1.0f);
    scales[static_cast<std::size_t>(sstride + 2)] = std::numeric_limits<float>::quiet_NaN();
    scales[4] = std::numeric_limits<float>::infinity();
    std::mt19937 gen(7);
    for (auto& b : bits) b = static_cast<std::uint8_t>(gen());
    std::vector<float> avg(static_cast<std::size_t>(n));
    kernels::sign_decompress(rows(bits, world, nbytes, bstride), rows(scales, world, nc, sstride),
                             view(avg, DType::kFloat32), chunk, 0.25);
    std::vector<float> u = random_floats(n, 9, 1.0f), out(static_cast<std::size_t>(n), 123.0f);
    const std::vector<float> u0 = u;
    kernels::onebit_adam_decompress(rows(bits, world, nbytes, bstride), rows(scales, world, nc, sstride),
                                    view(out, DType::kFloat32), view(u, DType::kFloat32), chunk, 0.25, 3.0);
    bool ok = true;
    std::int64_t kept = 0;
    for (std::size_t i = 0; i < out.size(); ++i) {
      const bool finite = std::isfinite(avg[i]);
      const float want_u = finite ? avg[i] : u0[i];
      const float want_out = avg[i] * 3.0f;
      ok = ok && std::memcmp(&u[i], &want_u, sizeof(float)) == 0;
      ok = ok && (std::memcmp(&out[i], &want_out, sizeof(float)) == 0 || (std::isnan(out[i]) && std::isnan(want_out)));
      kept += finite ? 0 : 1;
    }
    CHECK(ok);
    CHECK(kept == 2 * chunk);  // chunks 2 (NaN in row 1) and 4 (Inf in row 0)
  });
}

TEST(adam_bad_input_is_refused_before_anything_is_written) {
  std::vector<float> g(100, 1.0f), denom(100, 2.0f), u(100, 3.0f), error(100, 4.0f), scales(7, -1.0f);
  std::vector<std::uint8_t> bits(13, 0x55);
  std::vector<std::int64_t> sq(2, 9);
  const TensorView gv = view(g, DType::kFloat32), dv = view(denom, DType::kFloat32), uv = view(u, DType::kFloat32);
  const TensorView ev = view(error, DType::kFloat32), bv = view(bits, DType::kUInt8);
  const TensorView sv = view(scales, DType::kFloat32);
  TensorView qv = view(sq, DType::kInt64);
  qv.numel = 1;
  auto compress = [&](const TensorView& e, double beta1, std::int64_t chunk, const TensorView* q) {
    kernels::onebit_adam_compress(gv, dv, uv, e, beta1, chunk, bv, sv, q);
  };
  CHECK_THROWS(ValueError, compress(ev, 1.0, 16, &qv));
  CHECK_THROWS(ValueError, compress(ev, -0.1, 16, &qv));
  CHECK_THROWS(ValueError, compress(ev, std::numeric_limits<double>::quiet_NaN(), 16, &qv));
  CHECK_THROWS(ValueError, compress(ev, 0.9, 0, &qv));
  CHECK_THROWS(ValueError, compress(gv, 0.9, 16, &qv));  // error overlaps g
  TensorView two = view(sq, DType::kInt64);
  CHECK_THROWS(ValueError, compress(ev, 0.9, 16, &two));  // 16 bytes
  TensorView sq_in_error = view(error, DType::kInt64);
  sq_in_error.numel = 1;
  CHECK_THROWS(ValueError, compress(ev, 0.9, 16, &sq_in_error));
  TensorView ro = ev;
  ro.read_only = true;
  CHECK_THROWS(ValueError, compress(ro, 0.9, 16, &qv));
  CHECK(std::all_of(bits.begin(), bits.end(), [](std::uint8_t b) { return b == 0x55; }));
  CHECK(std::all_of(scales.begin(), scales.end(), [](float f) { return f == -1.0f; }));
  CHECK(std::all_of(error.begin(), error.end(), [](float f) { return f == 4.0f; }));
  CHECK(sq[0] == 9 && sq[1] == 9);
  std::vector<float> out(100, 5.0f);
  const TensorView ov = view(out, DType::kFloat32);
  auto decompress = [&](const TensorView& o, const TensorView& uu, double scale, double bias) {
    kernels::onebit_adam_decompress(rows(bits, 1, 13, 13), rows(scales, 1, 7, 7), o, uu, 16, scale, bias);
  };
  CHECK_THROWS(ValueError, decompress(ov, ov, 1.0, 1.0));  // u overlaps out
  CHECK_THROWS(ValueError, decompress(ov, uv, std::numeric_limits<double>::infinity(), 1.0));
  CHECK_THROWS(ValueError, decompress(ov, uv, 1.0, std::numeric_limits<double>::quiet_NaN()));
  CHECK_THROWS(ValueError, decompress(ov, view(scales, DType::kFloat32), 1.0, 1.0));  // 7 elements
  CHECK(std::all_of(out.begin(), out.end(), [](float f) { return f == 5.0f; }));
  CHECK(std::all_of(u.begin(), u.end(), [](float f) { return f == 3.0f; }));
}

AGRT_TEST_MAIN()

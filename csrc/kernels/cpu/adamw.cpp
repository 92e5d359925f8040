// CPU fused Adam/AdamW: tensors are cut into items of at most kItemElems elements, spread over the
// thread pool; each element is updated by itself, so the result does not depend on the split.
// This file is compiled with -ffp-contract=off (CMakeLists.txt): every fma below is written out,
// and no other multiply-add may be fused, or the scalar oracle and the AVX2 path would differ
// from torch and from each other.
#include "autoglm_rt/kernels/adamw.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "autoglm_rt/build_info.h"
#include "autoglm_rt/detail/half.h"
#include "autoglm_rt/error.h"
#include "autoglm_rt/parallel.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define AGRT_ADAMW_X86 1
#endif

namespace agrt::kernels {
namespace {

// 64 Ki elements (1.75 MiB of the four streams) per item: per-item overhead vanishes and a
// GPT-2-sized list still gives every thread hundreds of items.
constexpr std::int64_t kItemElems = std::int64_t{1} << 16;

// The float32 scalars of one tensor's step, derived in float64 exactly as torch's Python code does.
struct Coeffs {
  float decay;      // 1 - lr * wd (AdamW)
  float wd;         // wd (Adam's L2 term)
  float w;          // 1 - beta1, lerp weight
  float w_minus_1;  // w - 1, for lerp's large-weight branch
  bool w_small;     // |w| < 0.5: lerp's small-weight branch
  float beta2;
  float one_minus_beta2;
  float bc2_sqrt;   // sqrt(1 - beta2^step)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^step)
  bool apply_decay;
  bool apply_l2;
  bool maximize;
};

Coeffs make_coeffs(const AdamConfig& c, double step) {
  Coeffs k{};
  const bool has_wd = c.weight_decay != 0.0;
  k.apply_decay = has_wd && c.decoupled_weight_decay;
  k.apply_l2 = has_wd && !c.decoupled_weight_decay;
  k.maximize = c.maximize;
  k.decay = static_cast<float>(1.0 - c.lr * c.weight_decay);
  k.wd = static_cast<float>(c.weight_decay);
  k.w = static_cast<float>(1.0 - c.beta1);
  k.w_minus_1 = k.w - 1.0f;
  k.w_small = std::fabs(k.w) < 0.5f;
  k.beta2 = static_cast<float>(c.beta2);
  k.one_minus_beta2 = static_cast<float>(1.0 - c.beta2);
  const double bc1 = 1.0 - std::pow(c.beta1, step);
  const double bc2 = 1.0 - std::pow(c.beta2, step);
  k.bc2_sqrt = static_cast<float>(std::pow(bc2, 0.5));  // Python's bc ** 0.5
  k.eps = static_cast<float>(c.eps);
  k.neg_step_size = static_cast<float>(-(c.lr / bc1));
  return k;
}

// Parameters and gradients are float32 (T = float) or bfloat16 (T = std::uint16_t, computed in
// float32 and rounded to nearest even on store); the moments are always float32.
template <typename T>
struct Streams {
  T* p;
  const T* g;
  float* m;
  float* v;
};

template <typename T>
inline float load_param(const T* x, std::int64_t i) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return x[i];
  } else {
    return detail::bf16_to_float(x[i]);
  }
}

template <typename T>
inline void store_param(T* x, std::int64_t i, float value) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    x[i] = value;
  } else {
    x[i] = detail::float_to_bf16(value);
  }
}

template <typename T>
void update_scalar(const Coeffs& k, const Streams<T>& s, std::int64_t b, std::int64_t e) noexcept {
  for (std::int64_t i = b; i < e; ++i) {
    float p = load_param(s.p, i);
    float g = load_param(s.g, i);
    if (k.maximize) g = -g;
    if (k.apply_decay) p = p * k.decay;
    if (k.apply_l2) g = std::fma(p, k.wd, g);
    const float m0 = s.m[i];
    const float m = k.w_small ? std::fma(k.w, g - m0, m0) : std::fma(k.w_minus_1, g - m0, g);
    const float v = std::fma(k.one_minus_beta2 * g, g, s.v[i] * k.beta2);
    const float d = std::sqrt(v) / k.bc2_sqrt + k.eps;
    p = p + (k.neg_step_size * m) / d;
    store_param(s.p, i, p);
    s.m[i] = m;
    s.v[i] = v;
  }
}

#ifdef AGRT_ADAMW_X86
#define AGRT_ADAMW_AVX2 __attribute__((target("avx2,fma")))

template <typename T>
AGRT_ADAMW_AVX2 inline __m256 load8(const T* x, std::int64_t i) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return _mm256_loadu_ps(x + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// float32 -> bfloat16, round to nearest even, NaN kept quiet: detail::float_to_bf16 on 8 lanes.
template <typename T>
AGRT_ADAMW_AVX2 inline void store8(T* x, std::int64_t i, __m256 value) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    _mm256_storeu_ps(x + i, value);
  } else {
    const __m256i u = _mm256_castps_si256(value);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    const __m256i abs = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
    const __m256i nan = _mm256_cmpgt_epi32(abs, _mm256_set1_epi32(0x7f800000));
    const __m256i r = _mm256_blendv_epi8(rounded, _mm256_and_si256(quiet, _mm256_set1_epi32(0xffff)), nan);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x + i), _mm256_castsi256_si128(packed));
  }
}

template <typename T>
AGRT_ADAMW_AVX2 void update_avx2(const Coeffs& k, const Streams<T>& s, std::int64_t b, std::int64_t e) noexcept {
  const __m256 decay = _mm256_set1_ps(k.decay), wd = _mm256_set1_ps(k.wd);
  const __m256 w = _mm256_set1_ps(k.w_small ? k.w : k.w_minus_1);
  const __m256 beta2 = _mm256_set1_ps(k.beta2), c2 = _mm256_set1_ps(k.one_minus_beta2);
  const __m256 bc2s = _mm256_set1_ps(k.bc2_sqrt), eps = _mm256_set1_ps(k.eps);
  const __m256 neg_step = _mm256_set1_ps(k.neg_step_size);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  std::int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    __m256 p = load8(s.p, i);
    __m256 g = load8(s.g, i);
    if (k.maximize) g = _mm256_xor_ps(g, sign);
    if (k.apply_decay) p = _mm256_mul_ps(p, decay);
    if (k.apply_l2) g = _mm256_fmadd_ps(p, wd, g);
    const __m256 m0 = _mm256_loadu_ps(s.m + i);
    const __m256 m = _mm256_fmadd_ps(w, _mm256_sub_ps(g, m0), k.w_small ? m0 : g);
    const __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(c2, g), g, _mm256_mul_ps(_mm256_loadu_ps(s.v + i), beta2));
    const __m256 d = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), bc2s), eps);
    p = _mm256_add_ps(p, _mm256_div_ps(_mm256_mul_ps(neg_step, m), d));
    store8(s.p, i, p);
    _mm256_storeu_ps(s.m + i, m);
    _mm256_storeu_ps(s.v + i, v);
  }
  update_scalar(k, s, i, e);
}
#endif

void check_list(const std::vector<TensorView>& list, const char* name, std::size_t n,
                const std::vector<TensorView>& params, bool writable, bool like_params) {
  AGRT_EXPECTS(list.size() == n, ValueError, "adam_step: ", name, " has ", list.size(),
               " tensors, expected one per parameter (", n, ")");
  for (std::size_t i = 0; i < n; ++i) {
    const TensorView& t = list[i];
    const std::string arg = std::string(name) + "[" + std::to_string(i) + "]";
    AGRT_EXPECTS(t.device.type == DeviceType::kCPU, TypeError, "adam_step: ", arg,
                 ": expected a CPU tensor, got one on ", t.device.str());
    if (like_params) {
      AGRT_EXPECTS(t.dtype == params[0].dtype, TypeError, "adam_step: ", arg, ": expected dtype ",
                   dtype_name(params[0].dtype), " like params[0], got ", dtype_name(t.dtype));
    } else {
      AGRT_EXPECTS(t.dtype == DType::kFloat32, TypeError, "adam_step: ", arg, ": expected dtype float32, got ",
                   dtype_name(t.dtype));
    }
    AGRT_EXPECTS(!writable || !t.read_only, ValueError, "adam_step: ", arg, ": expected a writable tensor");
    AGRT_EXPECTS(t.numel == params[i].numel, ValueError, "adam_step: ", arg, " has ", t.numel,
                 " elements, expected ", params[i].numel, " like params[", i, "]");
  }
}

struct Item {
  std::size_t tensor;
  std::int64_t begin;
  std::int64_t end;
};

template <typename T, typename Update>
void run_typed(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
         const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
         const std::vector<double>& steps, const AdamConfig& config, Update update) {
  const std::size_t n = params.size();
  if (n > 0) {
    AGRT_EXPECTS(params[0].dtype == DType::kFloat32 || params[0].dtype == DType::kBFloat16, TypeError,
                 "adam_step: params[0]: expected dtype float32 or bfloat16, got ", dtype_name(params[0].dtype));
  }
  check_list(params, "params", n, params, true, true);
  check_list(grads, "grads", n, params, false, true);
  check_list(exp_avgs, "exp_avgs", n, params, true, false);
  check_list(exp_avg_sqs, "exp_avg_sqs", n, params, true, false);
  AGRT_EXPECTS(steps.size() == n, ValueError, "adam_step: steps has ", steps.size(),
               " values, expected one per parameter (", n, ")");
  std::vector<Coeffs> coeffs(n);
  std::vector<Item> items;
  for (std::size_t i = 0; i < n; ++i) {
    AGRT_EXPECTS(std::isfinite(steps[i]) && steps[i] >= 1.0, ValueError, "adam_step: steps[", i, "] is ", steps[i],
                 ", expected the step count after this step (>= 1)");
    coeffs[i] = make_coeffs(config, steps[i]);
    for (std::int64_t b = 0; b < params[i].numel; b += kItemElems) {
      items.push_back({i, b, std::min(params[i].numel, b + kItemElems)});
    }
  }
  parallel_for(0, static_cast<std::int64_t>(items.size()), 1, [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t j = first; j < last; ++j) {
      const Item& it = items[static_cast<std::size_t>(j)];
      const Streams<T> s{params[it.tensor].as<T>(), grads[it.tensor].as<const T>(), exp_avgs[it.tensor].as<float>(),
                         exp_avg_sqs[it.tensor].as<float>()};
      update(coeffs[it.tensor], s, it.begin, it.end);
    }
  });
}

// Picks the parameters' type (run_typed checks that every list agrees) and the AVX2 path where
// the CPU has it and `vector` is set.
void run(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
         const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
         const std::vector<double>& steps, const AdamConfig& config, bool vector) {
  const bool bf16 = !params.empty() && params[0].dtype == DType::kBFloat16;
#ifdef AGRT_ADAMW_X86
  if (vector && cpu_has_avx2()) {
    if (bf16) {
      run_typed<std::uint16_t>(params, grads, exp_avgs, exp_avg_sqs, steps, config, update_avx2<std::uint16_t>);
    } else {
      run_typed<float>(params, grads, exp_avgs, exp_avg_sqs, steps, config, update_avx2<float>);
    }
    return;
  }
#endif
  if (bf16) {
    run_typed<std::uint16_t>(params, grads, exp_avgs, exp_avg_sqs, steps, config, update_scalar<std::uint16_t>);
  } else {
    run_typed<float>(params, grads, exp_avgs, exp_avg_sqs, steps, config, update_scalar<float>);
  }
}

}  // namespace

void adam_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
               const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
               const std::vector<double>& steps, const AdamConfig& config) {
  run(params, grads, exp_avgs, exp_avg_sqs, steps, config, true);
}

void adam_step_scalar(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                      const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
                      const std::vector<double>& steps, const AdamConfig& config) {
  run(params, grads, exp_avgs, exp_avg_sqs, steps, config, false);
}

}  // namespace agrt::kernels

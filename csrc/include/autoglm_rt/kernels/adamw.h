// Fused Adam/AdamW step over a list of float32 tensors: one pass over memory per element
// (read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq).
#pragma once

#include <vector>

#include "autoglm_rt/tensor_view.h"

namespace agrt::kernels {

/// Hyper-parameters of one step, as torch.optim.Adam/AdamW take them (amsgrad is not supported).
struct AdamConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;
  bool decoupled_weight_decay = true;  // true: AdamW; false: Adam's L2 term added to the gradient
  bool maximize = false;
};

/// Applies one Adam/AdamW step in place to every tensors[i]: params[i], exp_avgs[i] and
/// exp_avg_sqs[i] are updated from grads[i]; steps[i] is that tensor's step count after this
/// step (>= 1), as torch keeps it in state["step"].
///
/// The per-element formula and its order of float32 roundings are those of torch 2.x's CPU
/// `_single_tensor_adam` / `_multi_tensor_adam` (non-capturable): the scalars (bias corrections,
/// step size, 1 - lr * weight_decay) in float64, cast to float32, then
///   p = p * (1 - lr*wd)                         (AdamW, wd != 0)
///   g = fma(p, wd, g)                           (Adam, wd != 0)
///   m = fma(w, g - m, m)  with w = 1 - beta1    (torch's vectorised lerp; |w| >= 0.5: fma(w-1, g-m, g))
///   v = fma((1 - beta2) * g, g, v * beta2)   (torch's addcmul as its build contracts it)
///   d = sqrt(v) / sqrt(1 - beta2^step) + eps
///   p = p + ((-lr / (1 - beta1^step)) * m) / d
/// so results are bit-identical with torch wherever torch's vectorised loop handles the element
/// (see docs/offload.md for the exceptions), identical between the scalar and the AVX2 path,
/// and independent of the thread count (every element is computed alone).
///
/// bfloat16 parameters (with bfloat16 gradients) are read into float32, stepped by the same
/// formula and rounded to nearest even on store; their moments stay float32.
///
/// Inputs: CPU tensors, contiguous, writable; params and grads all float32 or all bfloat16,
/// exp_avgs and exp_avg_sqs float32; params[i]/grads[i]/exp_avgs[i]/
/// exp_avg_sqs[i] of equal numel; the four lists and steps of equal length. Throws TypeError or
/// ValueError naming the first offending argument; nothing is written then.
/// Threads: spread over the thread pool (parallel_for); the caller must not touch the tensors
/// while it runs.
void adam_step(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
               const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
               const std::vector<double>& steps, const AdamConfig& config);

/// The same step, always on the scalar path (the oracle of the vector path; tests only).
void adam_step_scalar(const std::vector<TensorView>& params, const std::vector<TensorView>& grads,
                      const std::vector<TensorView>& exp_avgs, const std::vector<TensorView>& exp_avg_sqs,
                      const std::vector<double>& steps, const AdamConfig& config);

}  // namespace agrt::kernels

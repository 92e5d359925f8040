// Bindings of the fused CPU Adam/AdamW step (autoglm_rt.offload.fused_adam_step is the public API).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/adamw.h"
#include "bindings/registry.h"
#include "bindings/tensor_boundary.h"

namespace py = pybind11;
using agrt::bindings::Access;

namespace {

std::vector<agrt::TensorView> borrow_list(py::handle seq, const char* name, Access access, agrt::bindings::DTypeSet dtypes,
                                          std::vector<agrt::bindings::BorrowedTensor>& keep) {
  if (!py::isinstance<py::sequence>(seq) || py::isinstance<py::str>(seq) || py::hasattr(seq, "__dlpack__")) {
    throw agrt::TypeError(std::string(name) + ": expected a list or tuple of tensors, got " +
                          std::string(py::str(py::type::handle_of(seq).attr("__qualname__"))));
  }
  auto borrowed = agrt::bindings::borrow_tensor_list(seq, name, access, dtypes);
  std::vector<agrt::TensorView> views;
  views.reserve(borrowed.size());
  for (auto& b : borrowed) {
    views.push_back(b.view);
    keep.push_back(std::move(b));
  }
  return views;
}

void adam_step(py::handle params, py::handle grads, py::handle exp_avgs, py::handle exp_avg_sqs,
               const std::vector<double>& steps, double lr, double beta1, double beta2, double eps,
               double weight_decay, bool decoupled_weight_decay, bool maximize, bool scalar) {
  std::vector<agrt::bindings::BorrowedTensor> keep;
  const agrt::bindings::DTypeSet param_types{agrt::DType::kFloat32, agrt::DType::kBFloat16};
  const agrt::bindings::DTypeSet moment_types{agrt::DType::kFloat32};
  const auto p = borrow_list(params, "params", Access::kWrite, param_types, keep);
  const auto g = borrow_list(grads, "grads", Access::kRead, param_types, keep);
  const auto m = borrow_list(exp_avgs, "exp_avgs", Access::kWrite, moment_types, keep);
  const auto v = borrow_list(exp_avg_sqs, "exp_avg_sqs", Access::kWrite, moment_types, keep);
  agrt::kernels::AdamConfig config;
  config.lr = lr;
  config.beta1 = beta1;
  config.beta2 = beta2;
  config.eps = eps;
  config.weight_decay = weight_decay;
  config.decoupled_weight_decay = decoupled_weight_decay;
  config.maximize = maximize;
  py::gil_scoped_release nogil;
  if (scalar) {
    agrt::kernels::adam_step_scalar(p, g, m, v, steps, config);
  } else {
    agrt::kernels::adam_step(p, g, m, v, steps, config);
  }
}

}  // namespace

AGRT_BINDINGS(adamw) {
  m.def("adam_step", &adam_step, py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("steps"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled_weight_decay"), py::arg("maximize") = false, py::arg("scalar") = false,
        "Fused in-place Adam/AdamW step over lists of CPU tensors (params/grads float32 or bfloat16, moments float32) (torch's formula and rounding "
        "order); scalar=True forces the scalar oracle path. See autoglm_rt.offload.fused_adam_step.");
}

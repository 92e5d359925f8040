// Bindings of the fused gradient statistics (autoglm_rt.ops.grad_stats is the public API).
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

#include "autoglm_rt/error.h"
#include "autoglm_rt/kernels/grad_stats.h"
#include "bindings/registry.h"
#include "bindings/tensor_boundary.h"

namespace py = pybind11;
using agrt::bindings::Access;

AGRT_BINDINGS(grad_stats) {
  m.def("grad_stats_fields", [] { return agrt::kernels::kGradStatsFields; },
        "Number of float64 columns per row of grad_stats' output.");
  m.def(
      "grad_stats_workspace_bytes",
      [](py::handle tensors) {
        std::vector<agrt::bindings::BorrowedTensor> keep;
        const auto views = agrt::bindings::borrow_floating_views(tensors, "tensors", Access::kRead, std::nullopt, keep);
        return agrt::kernels::grad_stats_workspace_bytes(views);
      },
      py::arg("tensors"), "Bytes of device workspace grad_stats needs (0 for CPU tensors).");
  m.def(
      "grad_stats",
      [](py::handle tensors, py::handle out, py::handle workspace, py::handle stream) {
        const auto s = agrt::bindings::parse_stream(stream);
        std::vector<agrt::bindings::BorrowedTensor> keep;
        auto views = agrt::bindings::borrow_floating_views(tensors, "tensors", Access::kRead, s, keep);
        auto o = agrt::bindings::borrow_tensor(out, "out", Access::kWrite, {agrt::DType::kInt64}, s);
        if (!views.empty() && views[0].device != o.view.device) {
          throw agrt::ValueError("out: expected a buffer on " + views[0].device.str() + " like tensors[0], got one on " +
                                 o.view.device.str());
        }
        agrt::TensorView ws;
        agrt::bindings::BorrowedTensor wb;
        if (!workspace.is_none()) {
          wb = agrt::bindings::borrow_tensor(workspace, "workspace", Access::kWrite,
                                             agrt::bindings::kFloatingTypes.with(agrt::DType::kInt64), s);
          require_same_device(o, "out", wb, "workspace");
          ws = wb.view;
        }
        py::gil_scoped_release nogil;
        agrt::kernels::grad_stats(views, o.view, ws);
      },
      py::arg("tensors"), py::arg("out"), py::arg("workspace") = py::none(), py::arg("stream") = py::none(),
      "Fused statistics of a list of tensors into out ((len+1) x grad_stats_fields() float64 words "
      "viewed as int64); see autoglm_rt.ops.grad_stats.");
}
